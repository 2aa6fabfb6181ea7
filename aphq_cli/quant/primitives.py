"""Uniform asymmetric fake quantization and the scale searches of method.md §3.

Pure functions of tensors: no modules, no model. Shapes broadcast, so one
function serves per-tensor (scale of shape ``()``), per-channel (``(C, 1)``
against a ``(C, K)`` weight) and per-head (``(1, H, 1, 1)``) quantizers.
"""

from __future__ import annotations

import functools

import torch


def qmax(bits: int) -> int:
    """Largest integer code of a ``bits``-bit unsigned quantizer."""
    return 2 ** bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, with the identity as its gradient (straight-through)."""
    return x + (x.round() - x).detach()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """``(clamp(round(x / s) + z, 0, 2^b - 1) - z) * s``; rounding is straight-through."""
    if not torch.is_grad_enabled() or not (x.requires_grad or scale.requires_grad or zero_point.requires_grad):
        # No gradient wanted (inference, cache filling): the same operations in place on one new
        # tensor. round_ste(v) equals round(v) to the bit (v + (round(v) - v) is exact in floating
        # point: the difference is exact by Sterbenz's lemma), so the result is the same.
        q = x / scale
        return q.round_().add_(zero_point).clamp_(0, qmax(bits)).sub_(zero_point).mul_(scale)
    if zero_point.requires_grad:  # never learned here; the plain graph keeps it correct if it ever is
        q = torch.clamp(round_ste(x / scale) + zero_point, 0, qmax(bits))
        return (q - zero_point) * scale
    return _FakeQuantize.apply(x, scale, zero_point, bits)


@functools.cache
def clamp_passes_bounds() -> bool:
    """Whether this torch's ``clamp`` passes the gradient at a value equal to a bound.

    It is a subgradient choice that has changed between torch releases (2.x
    before 2.14 passes it, 2.14 does not); the fused quantizers follow the
    running torch so their numbers stay the plain graph's.
    """
    with torch.enable_grad():
        t = torch.tensor([0.0, 1.0], requires_grad=True)
        (grad,) = torch.autograd.grad(t.clamp(0, 1).sum(), t)
    return bool((grad == 1).all())


@functools.cache
def _strict_bounds(lo: float, hi: float, dtype: torch.dtype) -> tuple[float, float]:
    """Bounds that ``hardtanh_backward`` (strict: ``lo < t < hi``) must get to act as this torch's clamp."""
    if not clamp_passes_bounds():
        return lo, hi
    # lo <= t <= hi is prev(lo) < t < next(hi) for t of this dtype: no value lies in between.
    bounds = torch.tensor([lo, hi], dtype=dtype)
    outward = torch.tensor([-float("inf"), float("inf")], dtype=dtype)
    below, above = torch.nextafter(bounds, outward).tolist()
    return below, above


def clamp_backward(grad: torch.Tensor, t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """The gradient ``clamp(t, lo, hi)`` passes back: ``grad`` where this torch's clamp passes it, else 0.

    One fused ``hardtanh_backward`` instead of the graph's comparisons and
    ``where`` (on CPU a comparison or ``where`` costs 5 to 35 times a
    multiplication). The result is laid out like ``t``, as the graph's
    ``where`` (whose mask is made from ``t``) lays it out, so a reduction of
    it sums in the same order.
    """
    low, high = _strict_bounds(lo, hi, t.dtype)
    return torch.ops.aten.hardtanh_backward.grad_input(grad, t, low, high, grad_input=torch.empty_like(t))


class _FakeQuantize(torch.autograd.Function):
    """:func:`fake_quantize` with its gradients written out: the graph's numbers, far fewer operations.

    The plain graph ``(clamp(round_ste(x / s) + z, 0, Q) - z) * s`` records six
    nodes per quantizer, and the clamp's backward is a ``where``, the costliest
    operation of a reconstruction iteration on CPU. This computes the same
    forward values and, in backward, the same products in the same order as
    those nodes (``grad * s``, masked by the clamp, ``/ s`` for ``x``;
    ``grad * (c - z)`` plus ``-grad_t * ((x / s) / s)`` summed to the scale's
    shape for ``s``), so the results are the graph's to the bit, except the
    sign of a zero (a masked gradient is ``0 * g`` here, ``+0`` there).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, bits):
        v = x / scale
        t = torch.round(v).add_(zero_point)
        a = t.clamp(0, qmax(bits)).sub_(zero_point)
        ctx.bits = bits
        ctx.save_for_backward(scale, t, v, a) if ctx.needs_input_grad[1] else ctx.save_for_backward(scale, t)
        return a * scale

    @staticmethod
    def backward(ctx, grad):
        scale, t = ctx.saved_tensors[:2]
        grad_t = clamp_backward(grad * scale, t, 0, qmax(ctx.bits))
        grad_x = grad_t / scale if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            v, a = ctx.saved_tensors[2:]
            # The graph negates grad_t before its product and sum; subtracting the small sum instead is the
            # same number (IEEE products and sums are symmetric in sign), without a pass over grad_t.
            grad_s = (grad * a).sum_to_size(scale.shape) - (grad_t * (v / scale)).sum_to_size(scale.shape)
        return grad_x, grad_s, None, None


def select(keep: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``q`` where ``keep`` is 1.0, ``x`` where it is 0.0: ``torch.where`` to the bit, in one fused pass.

    ``lerp`` computes ``end - (end - start) * (1 - w)`` for ``w >= 0.5`` and
    ``start + w * (end - start)`` below, so a weight of exactly 1 or 0 gives
    exactly ``q`` or ``x``; its gradients are ``grad * keep`` and ``grad * (1 - keep)``.
    """
    return torch.lerp(x, q, keep)


def below(r: torch.Tensor, p: float) -> torch.Tensor:
    """``(r < p)`` as float 1.0/0.0, in place on ``r``, without a bool tensor (see :func:`clamp_backward`).

    ``p - r`` is positive exactly when ``r < p`` (IEEE subtraction keeps the
    sign and, with gradual underflow, is zero only for equal values), so its
    sign clamped at 0 is the comparison.
    """
    return r.neg_().add_(p).sign_().clamp_(min=0)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(x / s) + z, 0, 2^b - 1)`` as uint8."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, qmax(bits)).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(q - z) * s`` in float32."""
    return (q.float() - zero_point) * scale


def row_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row ``q``-quantile of ``(R, K)``, linearly interpolated as ``torch.quantile`` does.

    The value at fractional rank ``q (K - 1)`` between the two order
    statistics around it. A nearest-rank quantile would collapse the 99.9th
    percentile of a row of 501 values or fewer onto its max (method.md §3),
    so every candidate range of most Swin-T weight rows would be the full
    range. Two ``kthvalue`` calls give the same numbers as ``torch.quantile``
    without its limit of 16 million elements.
    """
    n = x.shape[1]
    pos = min(max(q, 0.0), 1.0) * (n - 1)
    below = int(pos)  # floor: pos >= 0
    frac = pos - below
    lo = x.kthvalue(below + 1, dim=1).values
    if frac == 0.0 or below + 1 >= n:
        return lo
    hi = x.kthvalue(below + 2, dim=1).values
    return torch.lerp(lo, hi, torch.tensor(frac, dtype=lo.dtype, device=lo.device))


def quantiles_of_sorted(srt: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Interpolated quantiles ``qs`` (shape ``(P,)``) of each row of the sorted ``(R, K)``: ``(P, R)``."""
    n = srt.shape[1]
    pos = qs.to(torch.float64).clamp(0, 1) * (n - 1)  # float64: exact ranks for millions of values
    below = pos.floor().long().clamp(max=n - 1)
    above = (below + 1).clamp(max=n - 1)
    frac = (pos - below.to(torch.float64)).to(srt.dtype)[:, None]
    lo, hi = srt[:, below].T, srt[:, above].T
    return lo + (hi - lo) * frac


def candidate_ranges(x: torch.Tensor, pct: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (lower, upper) ranges per row, evenly from percentile to full range.

    Args:
        x: ``(R, K)`` rows of values.
        pct: upper percentile as a fraction (0.999); the lower one is ``1 - pct``.
        n: number of candidates.

    Returns:
        ``lo, hi`` of shape ``(n, R)``; candidate 0 is the percentile range and
        candidate ``n - 1`` the min/max range.
    """
    lo_p, hi_p = row_quantile(x, 1 - pct), row_quantile(x, pct)
    lo_f, hi_f = x.min(dim=1).values, x.max(dim=1).values
    t = torch.linspace(0, 1, n, device=x.device, dtype=x.dtype)[:, None] if n > 1 else x.new_ones(1, 1)
    lo = lo_p + (lo_f - lo_p) * t
    hi = hi_p + (hi_f - hi_p) * t
    # Keep 0 inside the range (exact zeros stay exact) and the range non-empty.
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    hi = torch.maximum(hi, lo + 1e-8)
    return lo, hi


def search_rowwise(x: torch.Tensor, bits: int, *, eq_n: int = 128, pct: float = 0.999,
                   fixed_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point with the least squared fake-quantization error.

    ``num_zp = min(16, 2^b)`` zero points times ``eq_n // num_zp`` scales from
    the candidate ranges (method.md §3). The zero points are centred on each
    candidate range's own zero point ``round(-lo / s)``. For near-symmetric
    weights that is the published centre ``2^(b-1)``; for an asymmetric row at
    5 bits or more, 16 zero points around ``2^(b-1)`` cannot reach the right
    one and lose to plain min/max (tests/quant/test_primitives.py shows it).

    Args:
        x: ``(R, K)``; one quantizer per row (a weight's output channel, or
            one row for a per-tensor input).
        fixed_zero: zero point fixed at 0 (a post-ReLU input after mlp-recon);
            only the upper bound is searched.

    Returns:
        ``scale, zero_point``, each of shape ``(R,)``.
    """
    x = x.float()
    num_zp = 1 if fixed_zero else min(16, 2 ** bits)
    n_scales = max(1, eq_n // num_zp)
    lo, hi = candidate_ranges(x, pct, n_scales)  # (S, R)
    if fixed_zero:
        lo = torch.zeros_like(lo)
    scales = (hi - lo) / qmax(bits)
    offsets = torch.arange(num_zp, device=x.device, dtype=x.dtype) - num_zp // 2
    best_err = torch.full((x.shape[0],), float("inf"), device=x.device)
    best_s, best_z = scales[0].clone(), torch.zeros_like(scales[0])
    for i in range(n_scales):
        s = scales[i]
        centre = torch.round(-lo[i] / s)
        for off in offsets:
            z = torch.clamp(centre + off, 0, qmax(bits))
            err = _squared_error(x, s[:, None], z[:, None], bits)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


@torch.no_grad()
def _squared_error(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row mean squared fake-quantization error; in place, for the search's inner loop."""
    q = torch.round(x / scale).add_(zero_point).clamp_(0, qmax(bits))
    return q.sub_(zero_point).mul_(scale).sub_(x).pow_(2).mean(dim=1)


def matmul_percentiles(eq_n: int = 128, lo: float = 0.999, hi: float = 0.99999, k: float = 0.1) -> list[float]:
    """Percentile candidates ``l + (r - l) (i / (eq_n - 1))^k`` plus 1.0 (method.md §3)."""
    return [lo + (hi - lo) * (i / (eq_n - 1)) ** k for i in range(eq_n)] + [1.0]


def head_ranges(x: torch.Tensor, percentiles: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head candidate (lower, upper) bounds of an operand ``(B, H, N, D)``.

    Returns:
        ``lo, hi`` of shape ``(P, H)``: upper at percentile p, lower at 1 - p.
    """
    rows = x.transpose(0, 1).reshape(x.shape[1], -1).float()  # (H, B*N*D)
    if rows.shape[1] > 1_000_000:  # order statistics on a fixed, evenly strided subset
        rows = rows[:, :: rows.shape[1] // 1_000_000 + 1]
    srt = rows.sort(dim=1).values
    p = torch.tensor(percentiles, device=x.device, dtype=torch.float64)
    up = quantiles_of_sorted(srt, p)  # (P, H)
    down = quantiles_of_sorted(srt, 1 - p)
    return down.clamp(max=0), torch.maximum(up.clamp(min=0), down.clamp(max=0) + 1e-8)


def _range_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = (hi - lo) / qmax(bits)
    return s, torch.round(-lo / s).clamp(0, qmax(bits))


def search_matmul(a: torch.Tensor, b: torch.Tensor, bits: int, percentiles: list[float],
                  rounds: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head ranges of both operands of ``a @ b`` by least output error (method.md §3).

    Both operands start at their full (p = 1.0) range. Each round refines,
    for ``a`` then ``b``, the upper and then the lower bound: every candidate
    percentile is tried with the other operand quantized, and each head keeps
    the candidate whose output ``q(a) @ q(b)`` is closest to ``a @ b``.

    Args:
        a: ``(W, H, N, K)``; b: ``(W, H, K, M)``; heads on dimension 1.

    Returns:
        ``scale_a, zero_a, scale_b, zero_b``, each of shape ``(H,)``.
    """
    a, b = a.float(), b.float()
    ref = a @ b
    ranges = [list(head_ranges(a, percentiles)), list(head_ranges(b, percentiles))]  # [lo, hi] (P, H)
    heads, last = a.shape[1], len(percentiles) - 1
    choice = [[torch.full((heads,), last, dtype=torch.long, device=a.device) for _ in range(2)]
              for _ in range(2)]  # choice[operand][0 = lo, 1 = hi]
    hidx = torch.arange(heads, device=a.device)

    def current(op: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo = ranges[op][0][choice[op][0], hidx]
        hi = ranges[op][1][choice[op][1], hidx]
        return lo, hi

    def fq(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        s, z = _range_qparams(lo, torch.maximum(hi, lo + 1e-8), bits)
        return fake_quantize(x, s.view(1, -1, 1, 1), z.view(1, -1, 1, 1), bits)

    for _ in range(rounds):
        for op, x in ((0, a), (1, b)):
            other = fq(b, *current(1)) if op == 0 else fq(a, *current(0))
            for bound in (1, 0):
                errs = torch.empty(len(percentiles), heads, device=a.device)
                for p in range(len(percentiles)):
                    lo, hi = current(op)
                    cand = ranges[op][bound][p]
                    lo, hi = (lo, cand) if bound == 1 else (cand, hi)
                    xq = fq(x, lo, hi)
                    out = xq @ other if op == 0 else other @ xq
                    errs[p] = (out - ref).pow(2).sum(dim=(0, 2, 3))
                choice[op][bound] = errs.argmin(dim=0)
    sa, za = _range_qparams(*current(0), bits)
    sb, zb = _range_qparams(*current(1), bits)
    return sa, za, sb, zb
