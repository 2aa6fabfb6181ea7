"""Fake quantization and scale search against float64 re-derivations."""

import numpy as np
import pytest
import torch

from aphq_cli.quant.primitives import (below, candidate_ranges, clamp_backward, dequantize, fake_quantize, head_ranges,
                                       matmul_percentiles, quantize, round_ste, row_quantile, search_rowwise,
                                       select)


def _reference(x, s, z, bits):
    """Float64 numpy re-derivation with round-half-to-even, as torch.round does."""
    q = np.clip(np.round(x / s) + z, 0, 2 ** bits - 1)
    return (q - z) * s


@pytest.mark.parametrize("bits", range(2, 9))
def test_fake_quantize_matches_float64_reference(bits):
    rng = np.random.default_rng(bits)
    x = rng.normal(size=(6, 50)) * rng.uniform(0.1, 3, size=(6, 1))
    s = rng.uniform(0.01, 0.5, size=(6, 1))
    z = rng.integers(0, 2 ** bits, size=(6, 1)).astype(float)
    got = fake_quantize(torch.tensor(x), torch.tensor(s), torch.tensor(z), bits)
    np.testing.assert_allclose(got.numpy(), _reference(x, s, z, bits), rtol=0, atol=1e-12)
    codes = quantize(torch.tensor(x), torch.tensor(s), torch.tensor(z), bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2 ** bits - 1
    np.testing.assert_allclose(dequantize(codes, torch.tensor(s), torch.tensor(z)).numpy(),
                               _reference(x, s, z, bits), atol=1e-6)


def test_hand_computed_4bit():
    # s = 0.5, z = 3, 4 bits: codes 0..15 cover [-1.5, 6.0].
    x = torch.tensor([-2.0, -1.5, -0.26, 0.0, 0.74, 0.76, 6.0, 7.3])
    got = fake_quantize(x, torch.tensor(0.5), torch.tensor(3.0), 4)
    assert got.tolist() == [-1.5, -1.5, -0.5, 0.0, 0.5, 1.0, 6.0, 6.0]


def test_round_ste_gradient_is_identity():
    x = torch.tensor([0.2, 1.7, -3.4], requires_grad=True)
    round_ste(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("k", [2, 48, 96, 501, 1001])
def test_row_quantile_interpolates_like_numpy_linear(k):
    x = torch.randn(3, k, dtype=torch.float64)
    for q in (0.0, 0.001, 0.5, 0.999, 1.0):
        ref = np.quantile(x.numpy(), q, axis=1, method="linear")  # torch.quantile's default
        np.testing.assert_allclose(row_quantile(x, q).numpy(), ref, rtol=0, atol=1e-12)


def test_head_ranges_interpolate_like_numpy_linear():
    x = torch.randn(2, 3, 7, 5)  # (windows, heads, N, d): 70 values per head
    pcts = [0.9, 0.999, 1.0]
    lo, hi = head_ranges(x, pcts)
    rows = x.transpose(0, 1).reshape(3, -1).double().numpy()
    np.testing.assert_allclose(hi.numpy(), np.quantile(rows, pcts, axis=1, method="linear").clip(0), atol=1e-6)
    np.testing.assert_allclose(lo.numpy(), np.quantile(rows, [1 - p for p in pcts], axis=1).clip(None, 0),
                               atol=1e-6)


def test_a_short_row_with_an_outlier_gets_a_range_inside_its_min_max():
    """96 values and one outlier: the 99.9th percentile lies below the max, and the search uses it.

    A nearest-rank percentile of 96 values is the max itself, so every
    candidate would be the full range and the outlier would stretch the grid.
    """
    torch.manual_seed(0)
    row = torch.randn(1, 96) * 0.05
    row[0, 7] = 1.0  # the outlier
    lo, hi = candidate_ranges(row, 0.999, 8)
    assert float(hi[0, 0]) < 1.0 and float(hi[0, 0]) == pytest.approx(float(np.quantile(row.numpy(), 0.999)))
    s, z = search_rowwise(row, 4)
    full_s = (row.max() - row.min()) / 15  # the min/max quantizer the old percentile always gave
    full_z = torch.round(-row.min() / full_s)
    err = (fake_quantize(row, s[:, None], z[:, None], 4) - row).pow(2).mean()
    err_full = (fake_quantize(row, full_s, full_z, 4) - row).pow(2).mean()
    assert float(s[0]) < float(full_s) and float(err) < float(err_full)


def test_candidate_ranges_span_percentile_to_full():
    x = torch.linspace(-1, 3, 10001)[None]
    lo, hi = candidate_ranges(x, 0.999, 8)
    assert lo.shape == hi.shape == (8, 1)
    assert hi[-1, 0] == 3 and lo[-1, 0] == -1
    assert torch.all(hi[1:] >= hi[:-1]) and torch.all(lo[1:] <= lo[:-1])
    assert abs(float(hi[0, 0]) - 2.996) < 1e-3


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_search_beats_min_max_and_is_per_row(bits):
    torch.manual_seed(bits)
    x = torch.randn(4, 4096) * torch.tensor([[0.1], [1.0], [5.0], [0.5]])
    x[1, 0] = 40.0  # one outlier: clipping it pays off at low bit-width
    s, z = search_rowwise(x, bits)
    assert s.shape == z.shape == (4,)
    err = (fake_quantize(x, s[:, None], z[:, None], bits) - x).pow(2).mean(1)
    lo, hi = x.min(1).values, x.max(1).values
    s0 = (hi - lo) / (2 ** bits - 1)
    z0 = torch.round(-lo / s0)
    err0 = (fake_quantize(x, s0[:, None], z0[:, None], bits) - x).pow(2).mean(1)
    assert torch.all(err <= err0 * (1 + 1e-6))
    assert torch.all(z == z.round()) and torch.all((z >= 0) & (z <= 2 ** bits - 1))


def test_search_handles_one_sided_inputs():
    x = torch.relu(torch.randn(1, 20000))  # post-ReLU: the zero point belongs at 0
    s, z = search_rowwise(x, 8)
    assert z.item() <= 8
    assert (fake_quantize(x, s, z, 8) - x).pow(2).mean() < 1e-4
    s0, z0 = search_rowwise(x, 4, fixed_zero=True)
    assert z0.item() == 0 and s0.item() > 0


def test_centring_on_the_midpoint_would_fail_asymmetric_rows():
    # Why the zero points are centred on the range: an asymmetric 8-bit row
    # needs z near 10, far outside 128 +- 8.
    x = torch.linspace(-0.1, 2.4, 1001)[None]
    s, z = search_rowwise(x, 8)
    assert abs(z.item() - 10) <= 2
    assert (fake_quantize(x, s, z, 8) - x).abs().max() <= s.item() / 2 + 1e-6


def test_matmul_percentiles():
    p = matmul_percentiles()
    assert len(p) == 129 and p[0] == 0.999 and p[-1] == 1.0
    assert abs(p[-2] - 0.99999) < 1e-12 and all(a <= b for a, b in zip(p, p[1:]))


def test_head_ranges_are_per_head():
    x = torch.randn(8, 3, 49, 16) * torch.tensor([0.1, 1.0, 10.0])[None, :, None, None]
    lo, hi = head_ranges(x, [1.0])
    assert lo.shape == (1, 3)
    torch.testing.assert_close(hi[0], x.transpose(0, 1).reshape(3, -1).max(1).values)
    torch.testing.assert_close(lo[0], x.transpose(0, 1).reshape(3, -1).min(1).values)


def test_search_matmul_improves_on_full_range_per_head():
    from aphq_cli.quant.primitives import search_matmul

    torch.manual_seed(0)
    a = torch.randn(16, 2, 49, 8)
    a[:, 1] *= 5
    a[0, 0, 0, 0] = 60.0  # an outlier in head 0 only
    b = torch.randn(16, 2, 8, 49)
    ref = a @ b
    sa, za, sb, zb = search_matmul(a, b, 4, matmul_percentiles(eq_n=16), rounds=2)
    assert sa.shape == (2,)

    def err(sa, za, sb, zb):
        v = lambda t: t.view(1, -1, 1, 1)
        out = fake_quantize(a, v(sa), v(za), 4) @ fake_quantize(b, v(sb), v(zb), 4)
        return (out - ref).pow(2).sum(dim=(0, 2, 3))

    def minmax(x):
        lo = x.transpose(0, 1).reshape(2, -1).min(1).values
        hi = x.transpose(0, 1).reshape(2, -1).max(1).values
        s = (hi - lo) / 15
        return s, torch.round(-lo / s)

    searched, full = err(sa, za, sb, zb), err(*minmax(a), *minmax(b))
    assert torch.all(searched <= full)
    assert searched[0] < 0.8 * full[0]  # clipping head 0's outlier pays off


def test_fake_quantize_without_gradients_is_the_same_to_the_bit():
    """The in-place inference path gives the straight-through path's values exactly, ties and signed zeros too."""
    from aphq_cli.quant.primitives import qmax, round_ste

    torch.manual_seed(0)
    for magnitude in (1e-3, 1.0, 1e3):
        x = torch.randn(32, 48) * magnitude
        x[0, :7] = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, 0.0, -0.0])
        scale, zero = torch.rand(32, 1) * 0.1 + 1e-4, torch.randint(0, 16, (32, 1)).float()
        slow = (torch.clamp(round_ste(x / scale) + zero, 0, qmax(4)) - zero) * scale
        with torch.no_grad():
            fast = fake_quantize(x, scale, zero, 4)
        assert torch.equal(slow.view(torch.int32), fast.view(torch.int32))


def _plain_fake_quantize(x, s, z, bits):
    """The graph the fused quantizer stands for: straight-through rounding, autograd's own backward."""
    q = torch.clamp(round_ste(x / s) + z, 0, 2 ** bits - 1)
    return (q - z) * s


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("case", ["per-tensor", "per-channel", "per-head, transposed operand"])
def test_fused_fake_quantize_is_the_plain_graph_to_the_bit(bits, case):
    torch.manual_seed(bits)
    if case == "per-tensor":
        x, shape = torch.randn(64, 96) * 3, ()
    elif case == "per-channel":
        x, shape = torch.randn(64, 96) * 3, (64, 1)
    else:  # k^T of an attention matmul: a non-contiguous operand, one scale per head
        x, shape = (torch.randn(8, 3, 49, 16) * 3).transpose(-2, -1), (1, 3, 1, 1)
    s = torch.rand(shape) * 0.3 + 0.05
    z = torch.randint(0, 2 ** bits, shape).float()
    x, s = x.detach().requires_grad_(), s.requires_grad_()
    grad = torch.randn(x.shape)
    plain = _plain_fake_quantize(x, s, z, bits)
    fused = fake_quantize(x, s, z, bits)
    assert type(fused.grad_fn).__name__ == "_FakeQuantizeBackward"
    assert torch.equal(plain, fused)
    for a, b in zip(torch.autograd.grad(plain, (x, s), grad), torch.autograd.grad(fused, (x, s), grad)):
        assert torch.equal(a, b)


EDGES = torch.tensor([-2.0, -1e-30, 0.0, 1e-30, 0.5, 14.0, 15.0 - 1e-6, 15.0, 15.0 + 1e-6, 16.0])


def test_clamp_backward_is_this_torchs_clamp_gradient():
    leaf = EDGES.clone().requires_grad_()
    grad = torch.arange(1.0, 11.0)
    (expected,) = torch.autograd.grad(leaf.clamp(0, 15), leaf, grad)
    assert torch.equal(clamp_backward(grad, EDGES, 0, 15), expected)


@pytest.mark.parametrize("passes", [True, False])
def test_clamp_backward_follows_either_choice_at_the_bounds(monkeypatch, passes):
    """torch releases differ on the gradient at t == bound; both choices come out exactly."""
    import aphq_cli.quant.primitives as primitives

    monkeypatch.setattr(primitives, "clamp_passes_bounds", lambda: passes)
    primitives._strict_bounds.cache_clear()
    try:
        got = clamp_backward(torch.ones(10), EDGES, 0, 15)
    finally:
        primitives._strict_bounds.cache_clear()
    inside = (EDGES >= 0) & (EDGES <= 15) if passes else (EDGES > 0) & (EDGES < 15)
    assert torch.equal(got, inside.float())


def test_clamp_backward_is_laid_out_like_t():
    t = torch.randn(4, 6).t()
    assert clamp_backward(torch.ones(6, 4), t, -1, 1).stride() == t.stride()


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_below_is_the_comparison(p):
    torch.manual_seed(0)
    p32 = torch.tensor(p, dtype=torch.float32)
    edges = torch.stack([p32, torch.nextafter(p32, torch.tensor(0.0)), torch.nextafter(p32, torch.tensor(1.0))])
    r = torch.cat([torch.rand(100_000), edges])
    assert torch.equal(below(r.clone(), p), (r < p).float())


def test_select_is_where():
    torch.manual_seed(0)
    keep = (torch.rand(1000) < 0.5).float()
    q, x = torch.randn(1000), torch.randn(1000) * 1e30
    assert torch.equal(select(keep, q, x), torch.where(keep.bool(), q, x))
