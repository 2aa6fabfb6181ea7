"""Stage: export. A deployable file with packed integer weights, and its loader.

The export holds everything needed to rebuild the fake-quantized detector:
the mmdetection config, packed weight codes with per-channel scales and zero
points, every activation quantizer, and the parameters that stay in floating
point. A manifest in the header says what each tensor is. Format:
``docs/export-format.md``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from aphq_cli.artifacts import sha256_file
from aphq_cli.errors import AphqError
from aphq_cli.exports import config_to_json, export_format, weight_layers
from aphq_cli.headers import ExportRecord
from aphq_cli.quant.modules import quantizers
from aphq_cli.quant.packing import pack
from aphq_cli.quant.primitives import quantize
from aphq_cli.quant.wrap import quantization_map
from aphq_cli.runs import check_output, load_stage, newest_stage, read_stage, stage_path
from aphq_cli.stage import StageResult, StageRun, StageSpec

STAGE = "export"


def export_tensors(detector) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The export's tensors and manifest for a calibrated detector."""
    tensors: dict[str, torch.Tensor] = {}
    manifest: dict[str, dict] = {}
    layers = weight_layers(detector)
    for name, layer in layers.items():
        q = layer.w_quant
        codes = quantize(layer.weight_groups().detach(), q.scale, q.zero_point, q.bits)  # row-major as the weight
        tensors[f"w:{name}"] = pack(codes, q.bits)
        tensors[f"w:{name}.scale"] = q.scale.detach().float().reshape(-1)
        tensors[f"w:{name}.zero_point"] = q.zero_point.detach().to(torch.uint8).reshape(-1)
        manifest[f"w:{name}"] = {"kind": "packed weight codes", "bits": q.bits, "shape": list(layer.weight.shape),
                                 "layout": "uint8 bit stream, LSB first, row-major"}
        per = f"output channel and group of {layer.w_group} inputs" if layer.w_group else "output channel"
        if layer.w_group:
            manifest[f"w:{name}"]["group"] = layer.w_group
        manifest[f"w:{name}.scale"] = {"kind": f"weight scale per {per}", "dtype": "float32"}
        manifest[f"w:{name}.zero_point"] = {"kind": f"weight zero point per {per}", "dtype": "uint8"}
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


SPEC = StageSpec(STAGE)


def export(*, run: Path, out: Path, stage: str | None = None, trust_checkpoint: bool = False,
           force: bool = False, trust_config: bool = False) -> StageResult:
    """Write the quantized model of ``run`` (its newest quantized stage) to ``out``.

    An ``out`` already exported from the same stage artifact is kept as it is
    unless ``force``.
    """
    stage = stage or newest_stage(run)
    if stage == "mlp-recon":
        raise AphqError(f"{run} holds no quantized stage yet; run `aphq calibrate --run {run}` before exporting")
    header, made = read_stage(run, stage)
    check_output(out, "--out", inputs=[stage_path(run, stage), made.checkpoint, made.mlp_recon_artifact or None],
                 runs=[run], replaces=STAGE)
    written = StageRun(SPEC, Path(out), {"stage_artifact": sha256_file(stage_path(run, stage))},
                       header.extra.get("model", ""), force)
    if written.current:
        return written.reused()
    detector, source, _ = load_stage(run, stage, "cpu", trust_checkpoint=trust_checkpoint,
                                     trust_config=trust_config)
    tensors, manifest = export_tensors(detector)
    relu = sorted(n[: -len(".mlp.act")] for n, m in detector.named_modules()
                  if n.endswith(".mlp.act") and isinstance(m, nn.ReLU))
    qmap = quantization_map(detector)
    return written.save(tensors, ExportRecord(
        export_format=export_format(qmap), model=made.model, data=made.data, source_stage=stage,
        calib_split=made.protocol, w_bits=made.w_bits, a_bits=made.a_bits, relu_mlp_blocks=relu,
        quantization_map=qmap,
        mmdet_config=config_to_json(source.cfg._cfg_dict.to_dict()),
        manifest=manifest).to_dict())
