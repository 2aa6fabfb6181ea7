"""Reading an export (``aphq export``'s self-contained file) back into a fake-quantized detector.

The export stage writes the format; ``eval --artifact`` and anyone else reads
it through :func:`load_export`, so the reader lives in the library.
"""

from __future__ import annotations

from pathlib import Path

import torch
from mmcv import Config

from aphq_cli.artifacts import load_artifact
from aphq_cli.errors import AphqError
from aphq_cli.headers import ExportRecord
from aphq_cli.models.surgery import relu_mlps
from aphq_cli.models.zoo import build_model
from aphq_cli.quant.modules import QuantConv2d, QuantLinear, quantizers
from aphq_cli.quant.packing import unpack
from aphq_cli.quant.primitives import dequantize
from aphq_cli.runs import apply_params, apply_saved_plan

# 2: some layer's weights are grouped (a quantization map entry with ``w_group``), which a reader of
# format 1 would misread; an export with none is written as format 1, byte for byte as before.
EXPORT_FORMAT = 1
GROUPED_EXPORT_FORMAT = 2
READS = (EXPORT_FORMAT, GROUPED_EXPORT_FORMAT)


def export_format(qmap: dict) -> int:
    """The format number an export of this quantization map is written with."""
    return GROUPED_EXPORT_FORMAT if any(e.get("w_group") for e in qmap.values()) else EXPORT_FORMAT
TUPLE = "__tuple__"  # how a tuple of the model config is kept in the export's JSON header


def config_to_json(value):
    """The model config as JSON values, tuples marked: JSON has only lists, and mmdet tells them apart.

    The COCO test pipeline's ``img_scale=(1333, 800)`` read back as a list is
    a list of scales to ``MultiScaleFlipAug``, which then refuses it (the
    testbed's pipeline has no ``img_scale``, so only a full-size export showed
    it). Anything JSON cannot hold becomes its ``str``, as before.
    """
    if isinstance(value, tuple):
        return {TUPLE: [config_to_json(v) for v in value]}
    if isinstance(value, list):
        return [config_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): config_to_json(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def config_from_json(value):
    """:func:`config_to_json` undone: marked tuples are tuples again (older exports have none)."""
    if isinstance(value, dict):
        if set(value) == {TUPLE} and isinstance(value[TUPLE], list):
            return tuple(config_from_json(v) for v in value[TUPLE])
        return {k: config_from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [config_from_json(v) for v in value]
    return value


def weight_layers(detector) -> dict:
    """The quantized layers that carry a weight (Linear, Conv2d), in module order."""
    return {n: m for n, m in detector.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}


def load_export(path: Path, device="cpu"):
    """Rebuild the fake-quantized detector from an export alone.

    Returns:
        ``(detector, mmcv config, header)``.
    """
    tensors, header = load_artifact(path, stage="export")
    made = ExportRecord.from_dict(header.config, path)
    if made.export_format not in READS:
        raise AphqError(f"{path} is export format {made.export_format}, this aphq reads "
                        f"{' and '.join(map(str, READS))}")
    cfg = Config(config_from_json(made.mmdet_config))
    detector = build_model(cfg)
    relu_mlps(detector, made.relu_mlp_blocks)
    apply_saved_plan(detector, made, path)
    layers = weight_layers(detector)
    expected = {f"w:{n}" for n in layers}
    found = {k for k in tensors if k.startswith("w:") and not k.endswith((".scale", ".zero_point"))}
    if found != expected:
        raise AphqError(f"{path} does not match its model config: packed weights differ "
                        f"({len(found ^ expected)} layer(s))")
    with torch.no_grad():
        for name, layer in layers.items():
            entry = made.manifest.get(f"w:{name}")
            if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
                raise AphqError(f"{path} has a malformed aphq header: its manifest lacks w:{name}; re-export it")
            shape = tuple(entry["shape"])
            q = layer.w_quant
            if entry.get("bits") != q.bits:
                raise AphqError(f"{path} is inconsistent: {name}'s packed weights are {entry.get('bits')}-bit, "
                                f"its quantization map says {q.bits}")
            scale, zero = tensors[f"w:{name}.scale"], tensors[f"w:{name}.zero_point"].float()
            if scale.numel() != q.scale.numel() or zero.numel() != q.scale.numel():
                raise AphqError(f"{path} is inconsistent: {name} has {scale.numel()} weight scales and "
                                f"{zero.numel()} zero points, its quantization map implies {q.scale.numel()}")
            scale, zero = scale.reshape(q.scale.shape), zero.reshape(q.zero_point.shape)
            codes = layer.weight_groups(unpack(tensors[f"w:{name}"], q.bits, shape))
            layer.weight.copy_(dequantize(codes, scale, zero).reshape(shape))
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
