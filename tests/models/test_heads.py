"""The detection heads as reconstruction units: order, and the float RoIs reproduce the float detections."""

import pytest
import torch

from aphq_cli.models.heads import float_head_inputs, head_units
from aphq_cli.runs import ModelSource

ORDER = {
    "tiny-mask-rcnn": ["rpn_head", "roi_head.bbox_head", "roi_head.mask_head"],
    "tiny-cascade-mask-rcnn": ["rpn_head", "roi_head.bbox_head.0", "roi_head.bbox_head.1", "roi_head.bbox_head.2",
                               "roi_head.mask_head.0", "roi_head.mask_head.1", "roi_head.mask_head.2"],
}


@pytest.fixture(scope="module", params=list(ORDER))
def bundled(request):
    """A bundled testbed model (trained weights: it detects objects) and its first val images."""
    source = ModelSource.open(request.param, None, None)
    images = source.images(source.dataset("test", limit=2), "cpu")
    return request.param, source.build("cpu"), images


def test_head_units_come_after_the_fpn_in_forward_order(bundled):
    name, detector, _ = bundled
    units = head_units(detector)
    assert [u.name for u in units] == ORDER[name]
    assert [u.kind for u in units] == ["rpn"] + ["box"] * (len(units) // 2) + ["mask"] * (len(units) // 2)
    # A unit's layers are the detector's own: what it learns lands in the model.
    box = units[1].module
    assert box.head is detector.get_submodule(units[1].name)


def test_the_float_rois_reproduce_the_float_models_detections(bundled):
    """The float records feed the float heads the RoIs the float model's own test pass uses: same detections."""
    name, detector, images = bundled
    found = 0
    for i in range(len(images)):
        img, meta = images[i], images.meta(i)
        with torch.no_grad():
            feats = detector.extract_feat(img)
            records = float_head_inputs(detector, list(feats), meta)
            boxes_by_class = detector.simple_test(img, [meta], rescale=False)[0][0]
        rois, labels = records["mask"]["rois"], records["mask"]["labels"]
        for c, want in enumerate(boxes_by_class):
            got = rois[labels == c, 1:].numpy()
            assert got.shape[0] == want.shape[0] and (abs(got - want[:, :4]) < 1e-4).all(), (name, i, c)
        found += len(labels)
        stages = len(ORDER[name]) // 2
        assert set(records) == {f"box{s}" for s in range(stages)} | {"mask"}
    assert found > 0  # the bundled models detect the synthetic objects


def test_each_head_loss_is_zero_on_the_float_outputs_and_positive_off_them(bundled):
    """Both head losses match a unit to its float outputs: 0 there, > 0 once the outputs move."""
    _, detector, images = bundled
    img, meta = images[0], images.meta(0)
    with torch.no_grad():
        feats = list(detector.extract_feat(img))
        records = float_head_inputs(detector, feats, meta)
        for unit in head_units(detector):
            extra = {name: v for name, v in records.get(unit.key, {}).items()}
            target = list(unit.module(feats, **extra))
            moved = [t * 1.5 + 0.5 for t in target]  # a scale too: a shift alone leaves a softmax as it is
            for choice in ("task", "mse"):
                loss = unit.loss(choice)
                assert all(float(v) == 0 for v in loss(target, target, extra).values()), (unit.name, choice)
                assert all(float(v) > 0 for v in loss(moved, target, extra).values()), (unit.name, choice)
            # The plain loss sees every output; the task loss only what the float model keeps.
            assert set(unit.loss("mse")(moved, target, extra)) == set(unit.loss("task")(moved, target, extra)) | (
                {"box"} if unit.kind == "rpn" else set())
