"""Quantizer modules and the quantized layers that replace Linear, Conv2d and MatMul.

A :class:`Quantizer` holds its scale and zero point as buffers, so a model's
state dict *is* the quantization state the artifacts store. Calibration
fills them; nothing guesses them in the constructor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aphq_cli.quant.primitives import below, fake_quantize, select


class Quantizer(nn.Module):
    """Uniform asymmetric fake quantizer.

    Args:
        bits: 2..8.
        shape: shape of scale and zero point, broadcast against the input:
            ``()`` per tensor, ``(C, 1)`` per output channel of a Linear
            weight, ``(1, H, 1, 1)`` per attention head.
    """

    def __init__(self, bits: int, shape: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.bits = bits
        self.enabled = False  # turned on once calibrated
        # QDrop (reconstruction only): each element keeps its quantized value
        # with this probability, else its float value (the published code's
        # ``drop_prob``; 1 means no drop).
        self.keep_quantized = 1.0
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        q = fake_quantize(x, self.scale, self.zero_point, self.bits)
        if self.keep_quantized < 1:
            q = select(below(torch.rand_like(x), self.keep_quantized), q, x)
        return q

    def extra_repr(self) -> str:
        return f"bits={self.bits}, shape={tuple(self.scale.shape)}, enabled={self.enabled}"


class _QuantWeight(nn.Module):
    """A layer whose weight is fake-quantized by ``w_quant``, computed once for as long as nothing changes.

    ``w_quant`` sees the weight as :meth:`weight_groups` shapes it: one row
    per output channel, or with ``w_group`` (beyond the published method)
    each row cut into groups of ``w_group`` consecutive inputs (a conv's
    inputs flattened with its kernel), one scale and zero point per group.

    Without gradients (evaluation, cache filling) the fake-quantized weight is
    the same for every input: it is kept, keyed by everything it follows
    from (the weight tensor and its in-place version, the quantizer and its
    scale, zero point, bits and state), and made again when any of them
    changes. With gradients (reconstruction) it is computed every time.
    """

    weight: torch.Tensor
    w_quant: nn.Module
    w_group: int = 0

    def weight_groups(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` (the layer's own by default) as its quantizer sees it; the same tensor without groups."""
        w = self.weight if weight is None else weight
        return w.reshape(w.shape[0], -1, self.w_group) if self.w_group else w

    def quantized_weight(self) -> torch.Tensor:
        q, w = self.w_quant, self.weight
        if getattr(q, "keep_quantized", 1.0) < 1 or (  # random (QDrop), or a gradient is wanted
                torch.is_grad_enabled() and (w.requires_grad or any(t.requires_grad for t in q.parameters()))):
            return q(self.weight_groups()).reshape(w.shape)
        state = [*q.parameters(), *q.buffers()]
        key = (id(q), w.data_ptr(), w._version, getattr(q, "bits", None), getattr(q, "enabled", None),
               *((t.data_ptr(), t._version) for t in state))
        cached = self.__dict__.get("_memo")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, q(self.weight_groups()).reshape(w.shape))
            self.__dict__["_memo"] = cached  # not a buffer: never saved, never moved
        return cached[1]


def _weight_quantizer(weight: torch.Tensor, bits: int, group: int) -> Quantizer:
    """Per output channel (broadcast against the weight), or per group of :meth:`_QuantWeight.weight_groups`."""
    fan_in = weight[0].numel()
    if not group:
        return Quantizer(bits, (weight.shape[0],) + (1,) * (weight.dim() - 1))
    if group < 1 or fan_in % group:
        raise ValueError(f"a weight group of {group} does not divide the layer's {fan_in} inputs")
    return Quantizer(bits, (weight.shape[0], fan_in // group, 1))


class QuantLinear(_QuantWeight):
    """``linear(quant_in(x), quant_w(W), b)``; per-tensor input, per-output-channel (or per-group) weight."""

    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int, w_group: int = 0) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.w_group = w_group
        self.w_quant = _weight_quantizer(linear.weight, w_bits, w_group)
        self.a_quant = Quantizer(a_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.a_quant(x), self.quantized_weight(), self.bias)


class QuantConv2d(_QuantWeight):
    """``conv2d(quant_in(x), quant_w(W))``; per-tensor input, per-output-channel (or per-group) weight."""

    def __init__(self, conv: nn.Conv2d, w_bits: int, a_bits: int, w_group: int = 0) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding mode {conv.padding_mode!r} is not supported")
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = conv.kernel_size
        self.w_group = w_group
        self.w_quant = _weight_quantizer(conv.weight, w_bits, w_group)
        self.a_quant = Quantizer(a_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.a_quant(x), self.quantized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class QuantMatMul(nn.Module):
    """``quant_a(a) @ quant_b(b)`` with one quantizer per head for each operand.

    Operands are ``(B*nW, heads, N, d)``-shaped (q, k^T, softmax, v): the head
    is dimension 1.
    """

    def __init__(self, heads: int, a_bits: int) -> None:
        super().__init__()
        self.a_quant = Quantizer(a_bits, (1, heads, 1, 1))
        self.b_quant = Quantizer(a_bits, (1, heads, 1, 1))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a_quant(a) @ self.b_quant(b)


def quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every quantizer of a model by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Quantizer)}


def quant_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Scales and zero points of every quantizer, as artifact tensors."""
    out = {}
    for name, q in quantizers(model).items():
        out[f"{name}.scale"] = q.scale.detach().clone()
        out[f"{name}.zero_point"] = q.zero_point.detach().clone()
    return out


def load_quant_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Set every quantizer from :func:`quant_state` output; every quantizer must be present."""
    for name, q in quantizers(model).items():
        q.set_params(state[f"{name}.scale"], state[f"{name}.zero_point"])
