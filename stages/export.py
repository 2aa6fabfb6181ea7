"""Stage: export. A deployable file with packed integer weights, and its loader.

The export holds everything needed to rebuild the fake-quantized detector:
the mmdetection config, packed weight codes with per-channel scales and zero
points, every activation quantizer, and the parameters that stay in floating
point. A manifest in the header says what each tensor is. Format:
``docs/export-format.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from aphq_cli.errors import AphqError

STAGE = "export"
EXPORT_FORMAT = 1


def _weight_layers(detector) -> dict:
    from aphq_cli.quant.modules import QuantConv2d, QuantLinear
    return {n: m for n, m in detector.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}


def export_tensors(detector) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The export's tensors and manifest for a calibrated detector."""
    from aphq_cli.quant.modules import quantizers
    from aphq_cli.quant.packing import pack
    from aphq_cli.quant.primitives import quantize

    tensors: dict[str, torch.Tensor] = {}
    manifest: dict[str, dict] = {}
    layers = _weight_layers(detector)
    for name, layer in layers.items():
        q = layer.w_quant
        codes = quantize(layer.weight.detach(), q.scale, q.zero_point, q.bits)
        tensors[f"w:{name}"] = pack(codes, q.bits)
        tensors[f"w:{name}.scale"] = q.scale.detach().float().reshape(-1)
        tensors[f"w:{name}.zero_point"] = q.zero_point.detach().to(torch.uint8).reshape(-1)
        manifest[f"w:{name}"] = {"kind": "packed weight codes", "bits": q.bits, "shape": list(layer.weight.shape),
                                 "layout": "uint8 bit stream, LSB first, row-major"}
        manifest[f"w:{name}.scale"] = {"kind": "weight scale per output channel", "dtype": "float32"}
        manifest[f"w:{name}.zero_point"] = {"kind": "weight zero point per output channel", "dtype": "uint8"}
    weight_quantizers = {f"{n}.w_quant" for n in layers}
    buffers = set()
    for name, q in quantizers(detector).items():
        buffers |= {f"{name}.scale", f"{name}.zero_point"}
        if name in weight_quantizers:
            continue
        tensors[f"a:{name}.scale"] = q.scale.detach().float()
        tensors[f"a:{name}.zero_point"] = q.zero_point.detach().float()
        manifest[f"a:{name}.scale"] = {"kind": "activation scale", "bits": q.bits, "shape": list(q.scale.shape)}
        manifest[f"a:{name}.zero_point"] = {"kind": "activation zero point", "bits": q.bits}
    packed = {f"{n}.weight" for n in layers}
    for name, value in detector.state_dict().items():
        if name in buffers or name in packed:
            continue
        tensors[f"fp:{name}"] = value.detach()
        manifest[f"fp:{name}"] = {"kind": "floating-point parameter or buffer", "dtype": str(value.dtype)}
    return tensors, manifest


def export(*, run: Path, out: Path, stage: str | None = None, trust_checkpoint: bool = False,
           force: bool = False) -> Path:
    """Write the quantized model of ``run`` (its newest quantized stage) to ``out``.

    An ``out`` already exported from the same stage artifact is kept as it is
    unless ``force``.

    Returns:
        ``out``.
    """
    from torch import nn

    from aphq_cli.artifacts import is_current, save_artifact, sha256_file
    from aphq_cli.runs import image_protocol, load_stage, newest_stage, stage_path

    stage = stage or newest_stage(run)
    if stage == "mlp-recon":
        raise AphqError(f"{run} holds no quantized stage yet; run `aphq calibrate --run {run}` before exporting")
    inputs = {"stage_artifact": sha256_file(stage_path(run, stage))}
    if not force and is_current(out, stage=STAGE, inputs=inputs):
        return Path(out)
    detector, source, header = load_stage(run, stage, "cpu", trust_checkpoint=trust_checkpoint)
    tensors, manifest = export_tensors(detector)
    bits = header.config["calibrate"]
    relu = sorted(n[: -len(".mlp.act")] for n, m in detector.named_modules()
                  if n.endswith(".mlp.act") and isinstance(m, nn.ReLU))
    config = {
        "export_format": EXPORT_FORMAT,
        "model": header.config["model"],
        "data": header.config["data"],
        "source_stage": stage,
        "calib_split": image_protocol(header.config),
        "w_bits": bits["w_bits"],
        "a_bits": bits["a_bits"],
        "relu_mlp_blocks": relu,
        "mmdet_config": json.loads(json.dumps(source.cfg._cfg_dict.to_dict(), default=str)),
        "manifest": manifest,
    }
    return save_artifact(out, tensors, stage=STAGE, config=config,
                         inputs=inputs,
                         extra={"model": header.extra.get("model", "")})


def load_export(path: Path, device="cpu"):
    """Rebuild the fake-quantized detector from an export alone.

    Returns:
        ``(detector, mmcv config, header)``.
    """
    from mmcv import Config
    from torch import nn

    from aphq_cli.artifacts import load_artifact
    from aphq_cli.models.plan import quantize_model
    from aphq_cli.models.zoo import build_model
    from aphq_cli.quant.modules import quantizers
    from aphq_cli.quant.packing import unpack
    from aphq_cli.quant.primitives import dequantize
    from aphq_cli.runs import apply_params

    tensors, header = load_artifact(path, stage=STAGE)
    config = header.config
    if config.get("export_format") != EXPORT_FORMAT:
        raise AphqError(f"{path} is export format {config.get('export_format')}, this aphq reads {EXPORT_FORMAT}")
    cfg = Config(config["mmdet_config"])
    detector = build_model(cfg)
    for block in config["relu_mlp_blocks"]:
        detector.get_submodule(f"{block}.mlp").act = nn.ReLU()
    quantize_model(detector, config["w_bits"], config["a_bits"])
    layers = _weight_layers(detector)
    expected = {f"w:{n}" for n in layers}
    found = {k for k in tensors if k.startswith("w:") and not k.endswith((".scale", ".zero_point"))}
    if found != expected:
        raise AphqError(f"{path} does not match its model config: packed weights differ "
                        f"({len(found ^ expected)} layer(s))")
    with torch.no_grad():
        for name, layer in layers.items():
            shape = tuple(config["manifest"][f"w:{name}"]["shape"])
            q = layer.w_quant
            scale = tensors[f"w:{name}.scale"].reshape(q.scale.shape)
            zero = tensors[f"w:{name}.zero_point"].float().reshape(q.zero_point.shape)
            layer.weight.copy_(dequantize(unpack(tensors[f"w:{name}"], q.bits, shape), scale, zero))
            q.set_params(scale, zero)
        for name, q in quantizers(detector).items():
            if f"a:{name}.scale" in tensors:
                q.set_params(tensors[f"a:{name}.scale"], tensors[f"a:{name}.zero_point"])
        floats = {k[len("fp:"):]: v for k, v in tensors.items() if k.startswith("fp:")}
        apply_params(detector, floats)
    covered = set(floats) | {f"{n}.weight" for n in layers} | {
        f"{n}.{b}" for n in quantizers(detector) for b in ("scale", "zero_point")}
    missing = [k for k in detector.state_dict() if k not in covered]
    if missing:
        raise AphqError(f"{path} lacks {len(missing)} parameter(s) of its model, such as {missing[0]}")
    unset = [n for n, q in quantizers(detector).items() if not q.enabled]
    if unset:
        raise AphqError(f"{path} lacks quantizer parameters, such as for {unset[0]}")
    return detector.to(device), cfg, header
