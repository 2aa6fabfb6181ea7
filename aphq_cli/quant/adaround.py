"""AdaRound soft rounding, its regularizer and schedule, and QDrop mixing (method.md §6).

Pure functions: the block reconstruction loop learns ``alpha`` per weight
element so that ``floor(W / s) + h(alpha)`` rounds each weight up or down.
"""

from __future__ import annotations

import math

import torch

from aphq_cli.quant.primitives import below, clamp_backward, select

ZETA, GAMMA = 1.1, -0.1  # rectified-sigmoid stretch


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """``h(alpha) = clamp(sigmoid(alpha) (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)


def init_alpha(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``alpha`` with ``h(alpha)`` equal to the fractional part of ``W / s`` (soft = plain value)."""
    rest = weight / scale - torch.floor(weight / scale)  # in [0, 1)
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def soft_quantize_weight(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                         alpha: torch.Tensor, hard: bool = False) -> torch.Tensor:
    """``(clamp(floor(W / s) + h(alpha) + z, 0, 2^b - 1) - z) s``; ``hard`` rounds ``h`` to 0 or 1."""
    h = (rectified_sigmoid(alpha) >= 0.5).to(weight.dtype) if hard else rectified_sigmoid(alpha)
    q = torch.clamp(torch.floor(weight / scale) + h + zero_point, 0, 2 ** bits - 1)
    return (q - zero_point) * scale


def soft_quantize_floor(floor: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                        alpha: torch.Tensor) -> torch.Tensor:
    """:func:`soft_quantize_weight` (soft) from ``floor(W / s)``, which stays fixed while ``alpha`` learns.

    The same numbers, forward and backward, as the plain graph, in a fraction
    of its operations: see :class:`_SoftQuantize`. A ``scale`` that requires
    grad learns too (the head units' option): the integer grid ``floor`` stays
    the one its first scale made, and only the step between its levels moves.
    """
    return _SoftQuantize.apply(alpha, floor, scale, zero_point, bits)


class _SoftQuantize(torch.autograd.Function):
    """``((clamp(floor + h(alpha) + z, 0, Q) - z) s``, with the graph's gradient for ``alpha`` written out.

    Backward is, in the graph's order, ``grad * s`` masked by the outer clamp,
    masked by the clamp of ``h``, times ``zeta - gamma``, through the sigmoid:
    the graph's numbers to the bit (but the sign of a zero), without its
    comparisons and ``where`` (costly on CPU). Only when ``s`` needs one, its
    gradient ``grad * (clamp(t, 0, Q) - z)`` summed to the shape of ``s``.
    """

    @staticmethod
    def forward(ctx, alpha, floor, scale, zero_point, bits):
        y = torch.sigmoid(alpha)
        h0 = y * (ZETA - GAMMA) + GAMMA  # rectified_sigmoid, before its clamp
        t = floor + torch.clamp(h0, 0, 1) + zero_point
        ctx.bits = bits
        ctx.zero_point = zero_point  # a buffer, never learned (the backward of a learned scale reads it)
        ctx.save_for_backward(y, h0, t, scale)
        return t.clamp(0, 2 ** bits - 1).sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        y, h0, t, scale = ctx.saved_tensors
        grad_h = clamp_backward(clamp_backward(grad * scale, t, 0, 2 ** ctx.bits - 1), h0, 0, 1)
        grad_scale = None
        if ctx.needs_input_grad[2]:
            grad_scale = (grad * (t.clamp(0, 2 ** ctx.bits - 1) - ctx.zero_point)).sum_to_size(scale.shape)
        return torch.ops.aten.sigmoid_backward(grad_h * (ZETA - GAMMA), y), None, grad_scale, None, None


def hard_quantize_floor(floor: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                        alpha: torch.Tensor) -> torch.Tensor:
    """The hard rounding :func:`soft_quantize_floor` ends in: ``h`` rounded to 0 or 1."""
    h = (rectified_sigmoid(alpha) >= 0.5).to(floor.dtype)
    return (torch.clamp(floor + h + zero_point, 0, 2 ** bits - 1) - zero_point) * scale


def straight_through_floor(floor: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                           alpha: torch.Tensor) -> torch.Tensor:
    """The hard rounding's values forward, :func:`soft_quantize_floor`'s gradient backward.

    AdaRound trains on the soft weights and keeps the hard ones; when its
    regularizer has not driven every ``h`` to 0 or 1 (a short schedule:
    docs/results.md), the two differ. Trained this way, a unit sees in
    training the weights it keeps (up to the last bit of ``soft + (hard - soft)``).
    """
    soft = soft_quantize_floor(floor, scale, zero_point, bits, alpha)
    with torch.no_grad():  # a constant: no graph is recorded for it in the training loop
        step = hard_quantize_floor(floor, scale, zero_point, bits, alpha) - soft
    return soft + step


def rounding_regularizer(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum(1 - |2 h(alpha) - 1|^beta)``: zero once every ``h`` is exactly 0 or 1."""
    return (1 - (2 * rectified_sigmoid(alpha) - 1).abs().pow(beta)).sum()


def beta_schedule(step: int, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """``beta`` for the regularizer at ``step``; None during warm-up (no regularizer then).

    After ``warmup * total`` steps, beta falls linearly from ``start`` to ``end``.
    """
    first = int(math.ceil(warmup * total))
    if step < first:
        return None
    t = (step - first) / max(1, total - first)
    return start + (end - start) * t


def qdrop_mix(x_q: torch.Tensor, x_fp: torch.Tensor, prob_q: float, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """Each element from ``x_q`` with probability ``prob_q``, else from ``x_fp``."""
    keep = below(torch.rand(x_q.shape, generator=generator, device=x_q.device), prob_q)
    return select(keep, x_q, x_fp)
