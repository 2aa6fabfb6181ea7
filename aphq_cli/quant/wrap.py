"""Turning a float detector into a fake-quantized one, and the RepQ reparameterization.

:func:`apply_plan` swaps every layer a :class:`~aphq_cli.quant.plan.QuantPlan`
names for its quantized counterpart in place (the weights are shared, not
copied). :func:`fold_channel_scales` is the scale reparameterization of
method.md §2. Which layers, with which bits, is the model's to say
(``aphq_cli/models/plan.py``); nothing here knows the model.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from aphq_cli.quant.modules import QuantConv2d, QuantLinear, QuantMatMul, quantizers
from aphq_cli.quant.plan import LayerPlan, QuantPlan


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_plan(model: nn.Module, plan: QuantPlan) -> nn.Module:
    """Replace every layer ``plan`` names with its quantized layer, in place; returns ``model``.

    Quantizers start disabled; calibration sets and enables them.
    """
    for name, lp in plan.layers.items():
        if lp.kind == "linear":
            _set(model, name, QuantLinear(model.get_submodule(name), lp.w_bits, lp.a_bits, lp.w_group))
        elif lp.kind == "conv":
            _set(model, name, QuantConv2d(model.get_submodule(name), lp.w_bits, lp.a_bits, lp.w_group))
        elif lp.kind == "matmul":
            _set(model, name, QuantMatMul(lp.heads, lp.a_bits))
        else:
            raise ValueError(f"{name}: unknown layer kind {lp.kind!r}")
    return model


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The quantized layers in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul))}


def quantization_map(model: nn.Module) -> dict[str, dict[str, int | str]]:
    """Every quantized layer's kind and bits (a matmul's head count too), in module order.

    Saved in every quantized artifact and export, so a reload builds each
    layer with the bits it was calibrated with (:func:`plan_from_map`), not
    with bits re-derived from the stage settings.
    """
    out: dict[str, dict[str, int | str]] = {}
    for name, m in quant_layers(model).items():
        if isinstance(m, QuantMatMul):
            out[name] = {"kind": "matmul", "w_bits": 0, "a_bits": m.a_quant.bits, "heads": m.a_quant.scale.shape[1]}
        else:
            kind = "linear" if isinstance(m, QuantLinear) else "conv"
            out[name] = {"kind": kind, "w_bits": m.w_quant.bits, "a_bits": m.a_quant.bits}
            if m.w_group:  # only where set, so a map without groups reads as it always did
                out[name]["w_group"] = m.w_group
    return out


def plan_from_map(qmap: object, layers: set[str] | None = None) -> QuantPlan:
    """The plan a saved :func:`quantization_map` describes: layers and bits, enough to rebuild a calibrated model.

    Args:
        layers: the names the model's own plan quantizes; the map must name exactly these.

    Raises:
        ValueError: the map is not one this code wrote, or names other layers than ``layers``.
    """
    if not isinstance(qmap, dict) or not qmap:
        raise ValueError("its quantization map is missing or empty")
    plans = {}
    for name, entry in qmap.items():
        if not isinstance(entry, dict) or entry.get("kind") not in ("linear", "conv", "matmul"):
            raise ValueError(f"its quantization map entry for {name!r} is not a layer")
        bits = {k: entry.get(k) for k in ("w_bits", "a_bits")}
        heads, group = entry.get("heads", 1), entry.get("w_group", 0)
        matmul = entry["kind"] == "matmul"
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (*bits.values(), heads, group))
        if not ok or not 2 <= bits["a_bits"] <= 8 or not (bits["w_bits"] == 0 if matmul else 2 <= bits["w_bits"] <= 8) \
                or heads < 1 or group < 0 or (matmul and group):
            raise ValueError(f"its quantization map gives {name!r} impossible bits {bits}, heads {heads!r} "
                             f"or weight group {group!r}")
        plans[name] = LayerPlan(entry["kind"], bits["w_bits"], bits["a_bits"], heads=heads, w_group=group)
    if layers is not None and set(plans) != layers:
        extra, missing = sorted(set(plans) - layers), sorted(layers - set(plans))
        example = f"it names {extra[0]}" if extra else f"it lacks {missing[0]}"
        raise ValueError(f"its quantization map does not fit the model ({example})")
    return QuantPlan(plans)


def reparam_factors(s_c: torch.Tensor, z_c: torch.Tensor, bits: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel quantizer -> one per-tensor quantizer plus per-channel ``r, b``.

    Returns:
        ``s, z, r, b`` with ``s = mean(s_c)``, ``z = round(mean(z_c))``,
        ``r_c = s_c / s`` and ``b_c = -z_c s_c / r_c + z s`` (method.md §2):
        after ``y' = y / r - b``, channel c's grid equals the common one.
    """
    s = s_c.mean()
    z = torch.round(z_c.mean()).clamp(0, 2 ** bits - 1)
    r = s_c / s
    b = -z_c * s_c / r + z * s
    return s, z, r, b


@torch.no_grad()
def fold_channel_scales(norm: nn.LayerNorm, layer: QuantLinear, r: torch.Tensor, b: torch.Tensor,
                        padded_by: nn.Module | None = None) -> None:
    """Fold ``y' = y / r - b`` into ``norm`` and its compensation into ``layer``.

    ``norm.weight /= r``, ``norm.bias = norm.bias / r - b``,
    ``W'[:, c] = W[:, c] r_c``, ``bias' = bias + W' b``: in floating point the
    layer's output is unchanged. A bias-free layer (patch merging's reduction)
    gains a bias.

    Args:
        padded_by: the module that pads ``norm``'s output to whole windows
            (a Swin block pads its ``norm1``), through its ``pad_value``. A
            padded token is zero in the float model, ``-b`` after the fold, so
            the block pads with ``-b``: otherwise every window holding padding
            attends to other keys and values than in float.
    """
    if padded_by is not None:
        padded_by.pad_value = nn.Parameter(-b.detach().clone(), requires_grad=False)
    norm.weight.div_(r)
    norm.bias.copy_(norm.bias / r - b)
    layer.weight.mul_(r[None, :])
    shift = layer.weight @ b
    if layer.bias is None:
        layer.bias = nn.Parameter(shift.clone())
    else:
        layer.bias.add_(shift)


def keep_float(model: nn.Module, parts: list[str] | tuple[str, ...],
               originals: Callable[[], nn.Module] | None = None) -> int:
    """Turn off the quantizers of the named parts, so those parts run in float.

    For finding where quantization costs accuracy: each part is a module name
    (``roi_head``, ``backbone.layers.2``) with an optional ``:w`` (its weight
    quantizers only) or ``:a`` (its activation quantizers only).

    Weights that already hold their quantized values (reconstruct rounds
    them) get their float values back from the model ``originals()`` returns,
    the same model as calibrated (its weights as they were before any
    rounding, reparameterized alike); it is called only when a named weight
    is rounded, once every part is checked. Without it (an export keeps
    nothing else), naming them is refused rather than silently scoring them
    quantized; their activations (``PART:a``) can still run in float.

    Returns:
        How many quantizers were turned off.

    Raises:
        ValueError: a part names no quantized module, or weights on their grid without ``originals``.
    """
    found = quantizers(model)
    chosen: dict[str, nn.Module] = {}
    restore: list[str] = []
    for part in parts:
        prefix, _, kind = part.partition(":")
        if kind not in ("", "w", "a") or not prefix:
            raise ValueError(f"{part!r} is not PART, PART:w or PART:a")
        hits = {name: q for name, q in found.items()
                if name.startswith(prefix + ".") and (kind == "" or (kind == "w") == name.endswith("w_quant"))}
        if not hits:
            tops = sorted({name.split(".")[0] for name in found})
            raise ValueError(f"{part!r} names no quantized module (the model's parts: {', '.join(tops)})")
        rounded = [name[: -len(".w_quant")] for name in hits if name.endswith(".w_quant") and _on_grid(model, name)]
        if rounded and originals is None:
            raise ValueError(f"{part!r} includes weights that hold their quantized values, such as {rounded[0]}'s "
                             f"({len(rounded)} layer(s)); use {prefix}:a for its activations")
        chosen |= hits
        restore += rounded
    if restore:
        source = originals()
        with torch.no_grad():
            for layer in restore:
                model.get_submodule(layer).weight.copy_(source.get_submodule(layer).weight)
    off = 0
    for q in chosen.values():
        off += q.enabled
        q.enabled = False
    return off


def _on_grid(model: nn.Module, quantizer_name: str) -> bool:
    """Whether the weight of the layer owning this weight quantizer sits on the quantizer's grid."""
    q = model.get_submodule(quantizer_name)
    if not q.enabled:
        return False
    layer = model.get_submodule(quantizer_name[: -len(".w_quant")])
    codes = layer.weight_groups().detach() / q.scale + q.zero_point  # broadcast per output channel (or group)
    return bool((codes - codes.round()).abs().max() < 1e-3)
