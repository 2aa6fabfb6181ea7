"""The APH estimate against an exact Hessian-vector product, and the RPN task loss by hand."""

import math

import pytest
import torch

from aphq_cli.quant.aph import normalize_per_image, perturbation_gradients, rpn_task_loss


def _net(dtype):
    torch.manual_seed(0)
    w1 = torch.randn(6, 5, dtype=dtype) * 0.7
    w2 = torch.randn(3, 6, dtype=dtype) * 0.7

    def loss(o):  # a smooth "rest of the network" with cross-channel coupling
        return torch.nn.functional.softplus(torch.tanh(o @ w1.T) @ w2.T).pow(2).sum()

    return loss


@pytest.mark.parametrize("dtype, rtol", [
    # float64: the central difference's truncation error is O(delta^2) = 1e-6
    # of the third derivative's scale, so 1e-5 relative holds.
    (torch.float64, 1e-5),
    # float32: each gradient carries ~1e-7 relative rounding, and their
    # difference is ~2e-3 of their size, so ~1e-4 relative; allow 2e-3.
    (torch.float32, 2e-3),
])
def test_matches_exact_hessian_vector_product(dtype, rtol):
    loss = _net(dtype)
    o = torch.randn(4, 5, dtype=dtype)
    delta = 1e-3
    got = perturbation_gradients(loss, o, delta)
    _, hv = torch.autograd.functional.hvp(loss, o, torch.ones_like(o))
    expected = (2 * delta * hv).abs()
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def test_hessian_ones_differs_from_the_diagonal():
    # The off-diagonal mass matters: |H 1| is not |diag(H)|.
    loss = _net(torch.float64)
    o = torch.randn(1, 5, dtype=torch.float64)
    hess = torch.autograd.functional.hessian(lambda x: loss(x.view(1, 5)), o.view(5))
    got = perturbation_gradients(loss, o, 1e-3).view(5) / 2e-3
    torch.testing.assert_close(got, hess.sum(1).abs(), rtol=1e-5, atol=1e-8)
    assert not torch.allclose(got, hess.diagonal().abs(), rtol=0.1)


def test_normalize_per_image():
    w = torch.stack([torch.full((2, 3), 4.0), torch.arange(6.0).view(2, 3), torch.zeros(2, 3)])
    n = normalize_per_image(w)
    torch.testing.assert_close(n.flatten(1).mean(1), torch.ones(3))
    torch.testing.assert_close(n[1], torch.arange(6.0).view(2, 3) / 2.5)


def test_rpn_task_loss_by_hand():
    cf = [torch.tensor([[[[2.0]]]])]  # float objectness sigmoid(2) = 0.881 > 0.7: box term on
    rf = [torch.tensor([[[[0.0]], [[0.0]], [[0.0]], [[0.0]]]])]
    c = [torch.tensor([[[[1.0]]]], requires_grad=True)]
    r = [torch.tensor([[[[0.5]], [[0.0]], [[2.0]], [[0.0]]]], requires_grad=True)]
    loss = rpn_task_loss(c, r, cf, rf)
    assert loss.item() == pytest.approx(2.0)  # each term divided by itself
    loss.backward()
    p, q = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-2))
    kl = q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
    # d(kl)/d(logit) = p - q; divided by kl
    assert c[0].grad.item() == pytest.approx((p - q) / kl, rel=1e-5)
    # smooth-L1 mean over 4: (0.125 + 0 + 1.5 + 0) / 4; grads 0.5/4 and 1/4, divided by it
    sl1 = (0.5 * 0.5 ** 2 + (2.0 - 0.5)) / 4
    assert r[0].grad.view(4).tolist() == pytest.approx([0.5 / 4 / sl1, 0, 1 / 4 / sl1, 0], rel=1e-5)


def test_rpn_task_loss_without_confident_anchors_has_no_box_term():
    cf, rf = [torch.full((1, 3, 2, 2), -3.0)], [torch.zeros(1, 12, 2, 2)]
    c, r = [torch.zeros(1, 3, 2, 2, requires_grad=True)], [torch.ones(1, 12, 2, 2, requires_grad=True)]
    loss = rpn_task_loss(c, r, cf, rf)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert r[0].grad is None or torch.all(r[0].grad == 0)


def test_rpn_box_term_averages_over_every_element_of_each_level():
    """Two levels, one confident anchor each: level 0 has 1 anchor (4 deltas), level 1 has 4 (16 deltas).

    The published code multiplies both delta tensors by the anchor mask and
    averages over all elements of the level, so a kept delta of level 1
    weighs a quarter of one of level 0. Averaging over the kept anchors
    only would weigh them the same.
    """
    cf = [torch.tensor([[[[2.0]]]]), torch.tensor([[[[2.0, -3.0], [-3.0, -3.0]]]])]
    rf = [torch.zeros(1, 4, 1, 1), torch.zeros(1, 4, 2, 2)]
    c = [torch.zeros_like(t, requires_grad=True) for t in cf]
    r = [torch.full((1, 4, 1, 1), 0.5, requires_grad=True), torch.full((1, 4, 2, 2), 0.5, requires_grad=True)]
    rpn_task_loss(c, r, cf, rf).backward()
    # smooth-L1 of 0.5 is 0.125 with gradient 0.5; level means: 4 * 0.125 / 4 and 4 * 0.125 / 16.
    total = 4 * 0.125 / 4 + 4 * 0.125 / 16
    assert r[0].grad.flatten().tolist() == pytest.approx([0.5 / 4 / total] * 4, rel=1e-5)
    g1 = r[1].grad[0, :, 0, 0]  # the confident anchor of level 1
    assert g1.tolist() == pytest.approx([0.5 / 16 / total] * 4, rel=1e-5)
    assert float(r[1].grad.abs().sum() - g1.abs().sum()) == 0.0  # the other anchors carry no gradient
