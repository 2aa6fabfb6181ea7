"""Head reconstruction losses against independent references (torch's own KL and smooth-L1, hand-made cases)."""

import pytest
import torch
import torch.nn.functional as F

from aphq_cli.quant.aph import rpn_task_loss
from aphq_cli.quant.headloss import (box_delta_l1, class_deltas, class_kl, mean_squared_error, normalized_sum,
                                     rpn_terms)


def test_class_kl_is_torchs_kl_divergence_of_the_softmaxes():
    torch.manual_seed(0)
    q, fp = torch.randn(6, 8), torch.randn(6, 8)
    want = F.kl_div(F.log_softmax(q, 1), F.softmax(fp, 1), reduction="batchmean")
    assert torch.allclose(class_kl(q, fp), want, atol=1e-6)
    assert class_kl(fp, fp).abs() < 1e-6
    assert class_kl(torch.zeros(0, 8), torch.zeros(0, 8)) == 0


def test_box_term_takes_the_float_class_deltas_of_kept_rois_only():
    deltas = torch.arange(16.0).reshape(2, 8)  # 2 RoIs, 2 classes x 4 deltas
    assert torch.equal(class_deltas(deltas, torch.tensor([1, 0])), torch.tensor([[4., 5, 6, 7], [8, 9, 10, 11]]))
    target = deltas.clone()
    target[0, 4:] += 0.5  # RoI 0, class 1 (its float class): off by 0.5 -> smooth-L1 0.5 * 0.5^2 = 0.125
    target[1] += 3.0  # RoI 1 is not kept: ignored
    loss = box_delta_l1(deltas, target, torch.tensor([1, 0]), torch.tensor([True, False]))
    assert loss.item() == pytest.approx(0.125)
    assert box_delta_l1(deltas, target, torch.tensor([1, 0]), torch.tensor([False, False])) == 0
    agnostic = torch.zeros(2, 4)
    assert box_delta_l1(agnostic, agnostic + 2, torch.tensor([5, 6]), torch.tensor([True, True])).item() == 1.5


def test_mask_term_is_the_mean_squared_error_and_zero_without_detections():
    a, b = torch.zeros(3, 28, 28), torch.full((3, 28, 28), 2.0)
    assert mean_squared_error(a, b).item() == 4.0
    assert mean_squared_error(torch.zeros(0, 28, 28), torch.zeros(0, 28, 28)) == 0


def test_rpn_terms_are_the_task_loss_before_its_normalization():
    torch.manual_seed(1)
    cls = [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2)]
    reg = [torch.randn(1, 12, 4, 4), torch.randn(1, 12, 2, 2)]
    cls_fp = [c + 2 * torch.randn_like(c) for c in cls]
    reg_fp = [r + torch.randn_like(r) for r in reg]
    kl, box, kept = rpn_terms(cls, reg, cls_fp, reg_fp)
    assert kept and kl > 0 and box > 0
    assert torch.equal(rpn_task_loss(cls, reg, cls_fp, reg_fp), kl / kl.detach() + box / box.detach())


def test_normalized_sum_divides_each_term_by_its_first_non_zero_value():
    first = {}
    assert normalized_sum({"a": torch.tensor(0.0), "b": torch.tensor(0.0)}, first) is None
    loss = normalized_sum({"a": torch.tensor(4.0), "b": torch.tensor(0.0)}, first)
    assert loss.item() == 2 * 1.0 / 2 and set(first) == {"a"}  # b is left out while it is zero
    loss = normalized_sum({"a": torch.tensor(2.0), "b": torch.tensor(10.0)}, first)
    assert loss.item() == pytest.approx(2 * (0.5 + 1.0) / 2)
