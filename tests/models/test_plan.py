"""The detector's quantization plan: head_w_group groups the heads' weights, and only theirs."""

import pytest

from aphq_cli.errors import AphqError
from aphq_cli.models.plan import detector_plan
from aphq_cli.models.zoo import build_model, load_config, resolve_model


@pytest.fixture(scope="module")
def detector():
    return build_model(load_config(resolve_model("tiny-cascade-mask-rcnn")))


def test_head_w_group_groups_every_head_layer_and_nothing_else(detector):
    plan = detector_plan(detector, 4, 4, head_w_group=32)
    grouped = {n for n, lp in plan.layers.items() if lp.w_group}
    heads = {n for n, lp in plan.layers.items() if n.startswith(("rpn_head.", "roi_head.")) and lp.kind != "matmul"}
    assert grouped == heads
    assert any(n.startswith("roi_head.bbox_head.2.") for n in grouped)  # every cascade stage
    assert all(lp.w_group == 32 for n, lp in plan.layers.items() if n in grouped)
    assert not any(lp.w_group for lp in detector_plan(detector, 4, 4).layers.values())  # the published grid


def test_a_head_w_group_that_does_not_divide_a_head_layer_is_refused_by_name(detector):
    # The RPN conv has 64 x 3 x 3 = 576 inputs, the box heads' first FCs 64 x 7 x 7 = 3136: 64 divides all.
    with pytest.raises(AphqError, match=r"head_w_group 128 does not divide the 576 inputs of rpn_head\.rpn_conv; "
                                        r"for this model choose 8, 16, 32, 64$"):
        detector_plan(detector, 4, 4, head_w_group=128)


def test_a_head_w_group_for_a_model_without_heads_is_refused():
    from torch import nn

    from aphq_cli.models.plan import check_head_group

    with pytest.raises(AphqError, match="head_w_group 32 names no layer of this model: it has no rpn_head or roi_head"):
        check_head_group(nn.ModuleDict({"bbox_head": nn.Linear(64, 4)}), 32)
