"""AdaRound soft rounding, regularizer and schedule against hand-computed values."""

import math

import pytest
import torch

from aphq_cli.quant.adaround import (beta_schedule, hard_quantize_floor, init_alpha, qdrop_mix, rectified_sigmoid,
                                     rounding_regularizer, soft_quantize_floor, soft_quantize_weight,
                                     straight_through_floor)


def test_rectified_sigmoid_hand_values():
    # sigmoid(0) = 0.5 -> 0.5 * 1.2 - 0.1 = 0.5; saturates to exactly 0 and 1.
    got = rectified_sigmoid(torch.tensor([0.0, -20.0, 20.0, math.log(3.0)]))
    assert got[:3].tolist() == [pytest.approx(0.5), 0.0, 1.0]
    assert got[3].item() == pytest.approx(0.75 * 1.2 - 0.1)  # sigmoid(log 3) = 0.75


def test_init_makes_soft_rounding_the_identity():
    torch.manual_seed(0)
    w = torch.randn(8, 16, dtype=torch.float64)
    s = torch.full((8, 1), 0.07, dtype=torch.float64)
    z = torch.full((8, 1), 7.0, dtype=torch.float64)
    soft = soft_quantize_weight(w, s, z, 4, init_alpha(w, s))
    inside = (w / s + z > 0.01) & (w / s + z < 14.99)  # away from the clamp
    torch.testing.assert_close(soft[inside], w[inside], rtol=0, atol=1e-6)


def test_hard_rounding_picks_floor_or_ceil():
    w = torch.tensor([[0.26, 0.34]])
    s, z = torch.tensor([[0.1]]), torch.tensor([[0.0]])
    alpha = torch.tensor([[-5.0, 5.0]])  # h ~ 0 -> floor, h ~ 1 -> ceil
    assert soft_quantize_weight(w, s, z, 4, alpha, hard=True).tolist() == [[pytest.approx(0.2), pytest.approx(0.4)]]


def test_regularizer_hand_values():
    # h = 0.5 -> |2h-1| = 0 -> term 1; h in {0, 1} -> term 0.
    alpha = torch.tensor([0.0, -30.0, 30.0])
    assert rounding_regularizer(alpha, 2.0).item() == pytest.approx(1.0)
    a = torch.tensor([math.log(3.0)])  # h = 0.8 -> |2h-1| = 0.6
    assert rounding_regularizer(a, 2.0).item() == pytest.approx(1 - 0.36)
    assert rounding_regularizer(a, 20.0).item() == pytest.approx(1 - 0.6 ** 20)


def test_beta_schedule():
    assert beta_schedule(0, 100) is None and beta_schedule(19, 100) is None
    assert beta_schedule(20, 100) == pytest.approx(20.0)
    assert beta_schedule(60, 100) == pytest.approx(11.0)
    assert beta_schedule(100, 100) == pytest.approx(2.0)


def test_qdrop_mix_takes_each_element_from_one_side():
    gen = torch.Generator().manual_seed(0)
    xq, xf = torch.ones(10000), torch.zeros(10000)
    mixed = qdrop_mix(xq, xf, 0.5, gen)
    assert set(mixed.unique().tolist()) == {0.0, 1.0}
    assert abs(mixed.mean().item() - 0.5) < 0.02


def test_soft_quantize_from_the_floor_is_the_plain_graph_to_the_bit():
    """The fused soft rounding: the same weight and the same gradient for alpha as the plain graph."""
    torch.manual_seed(0)
    w = torch.randn(32, 48)
    s, z = torch.rand(32, 1) * 0.2 + 0.02, torch.full((32, 1), 8.0)
    alpha = (init_alpha(w, s) + torch.randn(32, 48) * 3).requires_grad_()  # some h pinned at 0 or 1
    grad = torch.randn(32, 48)
    plain = soft_quantize_weight(w, s, z, 4, alpha)
    fused = soft_quantize_floor(torch.floor(w / s), s, z, 4, alpha)
    assert torch.equal(plain, fused)
    assert torch.equal(torch.autograd.grad(plain, alpha, grad)[0], torch.autograd.grad(fused, alpha, grad)[0])


def test_a_learned_scale_gets_the_gradient_of_the_plain_graph():
    """#18's learned weight scale: the fused op's gradient for ``s`` is the graph's, ``sum grad * (q - z)`` per row."""
    torch.manual_seed(1)
    w = torch.randn(16, 40)
    s0, z = torch.rand(16, 1) * 0.2 + 0.02, torch.full((16, 1), 8.0)
    floor = torch.floor(w / s0)
    alpha = init_alpha(w, s0) + torch.randn(16, 40) * 3
    s = (s0 * (1 + torch.rand(16, 1) * 0.2)).requires_grad_()  # a step away from the calibrated one
    grad = torch.randn(16, 40)
    fused = soft_quantize_floor(floor, s, z, 4, alpha)
    codes = torch.clamp(floor + rectified_sigmoid(alpha) + z, 0, 15)  # the level each weight sits on, by hand
    assert torch.allclose(fused, (codes - z) * s.detach(), rtol=0, atol=1e-6)
    got = torch.autograd.grad(fused, s, grad)[0]
    expected = (grad * (codes - z)).sum(dim=1, keepdim=True)
    assert got.shape == s.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_hard_rounding_from_the_floor_is_the_hard_plain_graph():
    torch.manual_seed(2)
    w = torch.randn(8, 24)
    s, z = torch.rand(8, 1) * 0.2 + 0.02, torch.full((8, 1), 8.0)
    alpha = init_alpha(w, s) + torch.randn(8, 24)
    assert torch.equal(hard_quantize_floor(torch.floor(w / s), s, z, 4, alpha),
                       soft_quantize_weight(w, s, z, 4, alpha, hard=True))


def test_straight_through_is_the_hard_rounding_forward_and_the_soft_gradient_backward():
    """rounding = "ste": the values a unit trains on are the hard weights it keeps (to the last bit of
    soft + (hard - soft)), and alpha's gradient is the soft rounding's, by hand through h."""
    torch.manual_seed(3)
    w = torch.randn(16, 40)
    s, z = torch.rand(16, 1) * 0.2 + 0.02, torch.full((16, 1), 8.0)
    floor = torch.floor(w / s)
    alpha = (init_alpha(w, s) + torch.randn(16, 40)).requires_grad_()
    grad = torch.randn(16, 40)
    ste = straight_through_floor(floor, s, z, 4, alpha)
    hard = hard_quantize_floor(floor, s, z, 4, alpha.detach())
    assert not torch.equal(hard, soft_quantize_floor(floor, s, z, 4, alpha.detach()))  # the two differ here
    assert torch.allclose(ste, hard, rtol=0, atol=1e-6)
    got = torch.autograd.grad(ste, alpha, grad)[0]
    # d/dalpha of (floor + h(alpha) + z - z) * s inside the clamps: grad * s * (zeta - gamma) * sigmoid'(alpha),
    # zero where h is pinned at 0 or 1 or the level is clamped.
    a = alpha.detach()
    h0 = torch.sigmoid(a) * 1.2 - 0.1
    inside = (h0 > 0) & (h0 < 1) & (floor + h0 + z > 0) & (floor + h0 + z < 15)
    expected = torch.where(inside, grad * s * 1.2 * torch.sigmoid(a) * (1 - torch.sigmoid(a)), torch.zeros(()))
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
