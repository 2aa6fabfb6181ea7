"""The quantization plan of our Swin two-stage detectors (Mask R-CNN, Cascade Mask R-CNN).

Everything ``aphq_cli/quant`` needs to know about the model and may not
import: which layers are quantized and with which bits, the LayerNorm ->
Linear pairs that take the RepQ fold, the Swin block that pads each folded
norm's output, the inputs that follow a ReLU (fc2 after mlp-recon), the
reconstruction units, and the RPN task loss that APH differentiates.
"""

from __future__ import annotations

import torch
from torch import nn

from aphq_cli.errors import AphqError
from aphq_cli.models.swin import MatMul, Mlp, SwinBlock, WindowAttention
from aphq_cli.quant.aph import rpn_task_loss
from aphq_cli.quant.plan import LayerPlan, QuantPlan, Task
from aphq_cli.quant.wrap import apply_plan

IMAGE_BITS = 8  # the patch embedding's input, the image, stays at 8 bits

# Layers whose input is a LayerNorm output, and that LayerNorm (relative names).
LN_FOLLOWERS = {"attn.qkv": "norm1", "mlp.fc1": "norm2", "downsample.reduction": "downsample.norm"}


def layer_norm_of(layer_name: str) -> str | None:
    """Qualified name of the LayerNorm feeding ``layer_name``, if it is one of the RepQ layers."""
    for suffix, norm in LN_FOLLOWERS.items():
        if layer_name.endswith("." + suffix):
            return f"{layer_name[: -len(suffix) - 1]}.{norm}"
    return None


def padding_block(model: nn.Module, norm_name: str) -> SwinBlock | None:
    """The Swin block whose ``norm1`` is ``norm_name`` (it pads that norm's output), else None."""
    owner, _, attr = norm_name.rpartition(".")
    block = model.get_submodule(owner) if owner else model
    return block if attr == "norm1" and isinstance(block, SwinBlock) else None


def rpn_outputs(detector: nn.Module, img: torch.Tensor) -> tuple[list, list]:
    """Backbone -> neck -> RPN head of an mmdetection two-stage detector; RoI heads are not run."""
    cls, reg = detector.rpn_head(detector.extract_feat(img))
    return list(cls), list(reg)


def _rpn_loss(outputs, float_outputs) -> torch.Tensor:
    return rpn_task_loss(*outputs, *float_outputs)


# method.md §4: the RPN outputs against the float model's.
RPN_TASK = Task(outputs=rpn_outputs, loss=_rpn_loss)


def detector_plan(model: nn.Module, w_bits: int, a_bits: int, head_w_group: int = 0) -> QuantPlan:
    """The plan of a float detector (or any module holding Swin blocks): every layer, in module order.

    Every Linear and Conv2d is quantized, subclasses included (mmcv's ``Conv2d``
    wrapper, the mask head's ``conv_logits``), as in the published code;
    transposed convolutions (the mask head's upsampling) are no Conv2d and
    stay in floating point there too. Window-attention matmuls get one
    quantizer per head; the image (the patch embedding's input) 8 bits.

    Args:
        head_w_group: 0, every weight scaled per output channel (the
            published method); else the RPN and RoI heads' weights in groups
            of this many inputs (beyond it, issue #18), which must divide
            each head layer's inputs.

    Raises:
        AphqError: ``head_w_group`` does not divide a head layer's inputs.
    """
    heads = {f"{n}.{m}": mod.heads for n, mod in model.named_modules() if isinstance(mod, WindowAttention)
             for m in ("matmul_qk", "matmul_av")}
    relu_fc2 = {f"{n}.fc2" for n, mod in model.named_modules() if isinstance(mod, Mlp)
                and isinstance(mod.act, nn.ReLU)}
    if head_w_group:
        check_head_group(model, head_w_group)
    layers: dict[str, LayerPlan] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            norm = layer_norm_of(name)
            pads = norm is not None and padding_block(model, norm) is not None
            pad_owner = norm.rpartition(".")[0] if pads else None
            layers[name] = LayerPlan("linear", w_bits, a_bits, norm=norm, pad_owner=pad_owner,
                                     relu_input=name in relu_fc2, w_group=_head_group(name, head_w_group))
        elif isinstance(module, nn.Conv2d):
            image = name.endswith("patch_embed.proj")
            layers[name] = LayerPlan("conv", w_bits, IMAGE_BITS if image else a_bits,
                                     w_group=_head_group(name, head_w_group))
        elif isinstance(module, MatMul):
            layers[name] = LayerPlan("matmul", 0, a_bits, heads=heads[name])
    return QuantPlan(layers, RPN_TASK)


HEADS = ("rpn_head", "roi_head")  # the modules whose weights head_w_group groups


def check_head_group(model: nn.Module, group: int) -> None:
    """Refuse a ``head_w_group`` that does not divide every head layer's inputs (naming sizes that do),
    or a model with no ``rpn_head`` or ``roi_head`` layer for it to group."""
    fan_in = {n: m.weight[0].numel() for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d)) and n.split(".")[0] in HEADS}
    if not fan_in:
        raise AphqError(f"head_w_group {group} names no layer of this model: it has no {' or '.join(HEADS)}")
    bad = next((n for n, k in fan_in.items() if k % group), None)
    if bad is not None:
        fits = [g for g in (8, 16, 32, 64, 128, 256) if all(k % g == 0 for k in fan_in.values())]
        raise AphqError(f"head_w_group {group} does not divide the {fan_in[bad]} inputs of {bad}; "
                        f"for this model choose {', '.join(map(str, fits)) or 'a common divisor of its head layers'}")


def _head_group(name: str, group: int) -> int:
    """``group`` for a head layer's weight, 0 for any other layer."""
    return group if name.split(".")[0] in HEADS else 0


def quantize_model(model: nn.Module, w_bits: int, a_bits: int) -> nn.Module:
    """Quantize ``model`` in place by its plan (:func:`detector_plan`); returns ``model``."""
    return apply_plan(model, detector_plan(model, w_bits, a_bits))


def units_of(detector: nn.Module) -> list[tuple[str, nn.Module]]:
    """The reconstruction units in forward order: backbone units, then the neck."""
    return [(f"backbone.{n}", m) for n, m in detector.backbone.units()] + [("neck", detector.neck)]
