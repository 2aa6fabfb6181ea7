"""The detection heads as reconstruction units (issue #18; beyond the published method).

After the FPN, in forward order: the RPN head, then for each RoI stage its
box head (RoI extractor, shared convs/FCs, classifier and regressor) and its
mask head (RoI extractor, convs, the upsampling and ``conv_logits``). Mask
R-CNN has one RoI stage; the cascade three (box stages 0, 1, 2, then the
three mask heads, which all see the final detections).

Every head unit reads the FPN outputs. The RoIs a box or mask unit pools are
the float model's, fixed per image (:func:`float_head_inputs`): the float
proposals for box stage 0, the float model's refined boxes for later cascade
stages, the float detections for the mask heads. So the quantized and the
float heads see the same boxes, and a unit's float inputs reproduce the float
model's head outputs exactly.

A unit module returns a list of tensors (what the caches store) and its loss
(:mod:`aphq_cli.quant.headloss`) reads the float model's choices (its
labels, the RoIs it keeps) from the same per-image record.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from mmdet.core import bbox2roi
from torch import nn

from aphq_cli.quant.aph import OBJECTNESS
from aphq_cli.quant.headloss import box_delta_l1, class_kl, mean_squared_error, rpn_terms


class RpnUnit(nn.Module):
    """The RPN head on the FPN outputs: ``[objectness of each level..., deltas of each level...]``."""

    def __init__(self, rpn_head: nn.Module) -> None:
        super().__init__()
        self.head = rpn_head

    def forward(self, feats) -> list[torch.Tensor]:
        cls, reg = self.head(tuple(feats))
        return list(cls) + list(reg)


class BoxUnit(nn.Module):
    """One RoI stage's box branch on fixed RoIs: ``[class logits (N, C+1), deltas (N, 4C or 4)]``."""

    def __init__(self, extractor: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.extractor, self.head = extractor, head

    def forward(self, feats, rois: torch.Tensor, **_) -> list[torch.Tensor]:
        pooled = self.extractor(tuple(feats)[: self.extractor.num_inputs], rois)
        cls, reg = self.head(pooled)
        return [cls, reg]


class MaskUnit(nn.Module):
    """One mask head on the float detections: the logits of each detection's class, ``(N, 28, 28)``."""

    def __init__(self, extractor: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.extractor, self.head = extractor, head

    def forward(self, feats, rois: torch.Tensor, labels: torch.Tensor, **_) -> list[torch.Tensor]:
        pooled = self.extractor(tuple(feats)[: self.extractor.num_inputs], rois)
        logits = self.head(pooled)  # (N, C, 28, 28)
        return [logits[torch.arange(len(labels), device=logits.device), labels.long()]]


def _rpn_loss(out, target, extra) -> dict[str, torch.Tensor]:
    half = len(out) // 2
    kl, box, kept = rpn_terms(out[:half], out[half:], target[:half], target[half:], OBJECTNESS)
    return {"objectness": kl, "box": box} if kept else {"objectness": kl}


def _box_loss(out, target, extra) -> dict[str, torch.Tensor]:
    return {"class": class_kl(out[0], target[0]),
            "box": box_delta_l1(out[1], target[1], extra["labels"], extra["keep"])}


def _mask_loss(out, target, extra) -> dict[str, torch.Tensor]:
    return {"mask": mean_squared_error(out[0], target[0])}


# The alternative the task losses above are measured against (head_loss = "mse"): the squared error of
# every raw output, on every anchor and RoI, one term per kind of output (each normalized alike).
def _rpn_mse(out, target, extra) -> dict[str, torch.Tensor]:
    half = len(out) // 2
    return {"objectness": sum(mean_squared_error(o, t) for o, t in zip(out[:half], target[:half])),
            "box": sum(mean_squared_error(o, t) for o, t in zip(out[half:], target[half:]))}


def _box_mse(out, target, extra) -> dict[str, torch.Tensor]:
    return {"class": mean_squared_error(out[0], target[0]), "box": mean_squared_error(out[1], target[1])}


# Head losses by name, each with one function per kind of head unit.
HEAD_LOSSES: dict[str, dict[str, Callable]] = {
    "task": {"rpn": _rpn_loss, "box": _box_loss, "mask": _mask_loss},
    "mse": {"rpn": _rpn_mse, "box": _box_mse, "mask": _mask_loss},
}


@dataclass(frozen=True)
class HeadUnit:
    """A head reconstruction unit.

    Attributes:
        name: where it lives in the detector (``roi_head.bbox_head.1``).
        module: the unit (shares its layers with the detector).
        kind: ``rpn``, ``box`` or ``mask``; which record of
            :func:`float_head_inputs` it reads (``box1``, ``mask``) is ``key``.
    """

    name: str
    module: nn.Module
    kind: str
    key: str

    def loss(self, choice: str = "task") -> Callable:
        """The unit's ``(outputs, float outputs, record) -> {term: value}`` of :data:`HEAD_LOSSES` ``choice``."""
        return HEAD_LOSSES[choice][self.kind]


def _indexed(owner: nn.Module, attr: str, stage: int, stages: int) -> tuple[str, nn.Module]:
    module = getattr(owner, attr)
    return (f"{attr}.{stage}", module[stage]) if stages > 1 else (attr, module)


def head_units(detector: nn.Module) -> list[HeadUnit]:
    """The head units of a two-stage mmdetection detector, in forward order."""
    roi = detector.roi_head
    stages = getattr(roi, "num_stages", 1)
    units = [HeadUnit("rpn_head", RpnUnit(detector.rpn_head), "rpn", "")]
    for s in range(stages):
        _, extractor = _indexed(roi, "bbox_roi_extractor", s, stages)
        name, head = _indexed(roi, "bbox_head", s, stages)
        units.append(HeadUnit(f"roi_head.{name}", BoxUnit(extractor, head), "box", f"box{s}"))
    if getattr(roi, "with_mask", False):
        for s in range(stages):
            _, extractor = _indexed(roi, "mask_roi_extractor", s, stages)
            name, head = _indexed(roi, "mask_head", s, stages)
            units.append(HeadUnit(f"roi_head.{name}", MaskUnit(extractor, head), "mask", "mask"))
    return units


@torch.no_grad()
def float_head_inputs(detector: nn.Module, feats, meta: dict) -> dict[str, dict[str, torch.Tensor]]:
    """What the float model's test pass decides for one image, per box and mask stage.

    Args:
        feats: the float FPN outputs of the image (batch of one).
        meta: the image's meta (``img_shape``, ``scale_factor``).

    Returns:
        ``{"box0": {"rois", "labels", "keep"}, ..., "mask": {"rois", "labels"}}``:
        the RoIs each stage pools (``(N, 5)``, batch index first), the float
        class of each RoI, and (box stages) which RoIs the float model keeps
        (a foreground score at or above the test score threshold).
    """
    roi = detector.roi_head
    stages = getattr(roi, "num_stages", 1)
    heads = roi.bbox_head if stages > 1 else [roi.bbox_head]
    extractors = roi.bbox_roi_extractor if stages > 1 else [roi.bbox_roi_extractor]
    cfg = roi.test_cfg
    proposals = detector.rpn_head.simple_test_rpn(tuple(feats), [meta])
    rois = bbox2roi([p[:, :4] for p in proposals])
    records, scores = {}, []
    for s in range(stages):
        cls, reg = BoxUnit(extractors[s], heads[s])(feats, rois)
        fg = torch.softmax(cls, dim=1)[:, :-1]
        labels = fg.argmax(dim=1)
        records[f"box{s}"] = {"rois": rois, "labels": labels, "keep": fg.max(dim=1).values >= cfg.score_thr}
        scores.append(cls)
        if s < stages - 1:
            rois = heads[s].regress_by_class(rois, cls[:, :-1].argmax(dim=1), reg, meta)
    score = sum(scores) / len(scores)
    boxes, labels = heads[-1].get_bboxes(rois, score, reg, meta["img_shape"], meta["scale_factor"],
                                         rescale=False, cfg=cfg)
    if getattr(roi, "with_mask", False):  # every mask head (three in the cascade) sees the final detections
        records["mask"] = {"rois": bbox2roi([boxes[:, :4]]), "labels": labels}
    return records


def _most(cfg, *keys: str) -> int:
    """The first of ``keys`` a test config sets (mmdetection renamed ``nms_post`` to ``max_per_img``)."""
    for key in keys:
        if cfg.get(key) is not None:
            return int(cfg[key])
    raise KeyError(f"the test config sets none of {', '.join(keys)}")


def head_cache_shapes(detector: nn.Module, feats: list[tuple[int, ...]]
                      ) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict[str, list[tuple[int, ...]]]]:
    """The most one image's head cache entries can hold, for planning their disk before any is made.

    How many RoIs an image has is data: at most the RPN test config's
    ``max_per_img`` proposals per box stage and the RoI test config's
    ``max_per_img`` detections for the masks, which these shapes assume. The
    shapes of what a head computes come from a pass of its layers on the meta
    device (no arithmetic).

    Args:
        feats: the shapes of the image's FPN outputs.

    Returns:
        ``(record, outputs)``: the float record (:func:`float_head_inputs`, flattened as
        ``box0/rois``) as ``name -> (shape, dtype)``, and each head unit's outputs by its name.
    """
    roi = detector.roi_head
    proposals = _most(detector.rpn_head.test_cfg, "max_per_img", "nms_post")
    detections = _most(roi.test_cfg, "max_per_img")
    record: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    outputs: dict[str, list[tuple[int, ...]]] = {}
    with torch.no_grad():
        for unit in head_units(detector):
            module = unit.module
            if unit.kind == "rpn":
                meta = _on_meta(module.head)
                outs = RpnUnit(meta)([torch.empty(s, device="meta") for s in feats])
                outputs[unit.name] = [tuple(t.shape) for t in outs]
                continue
            count = proposals if unit.kind == "box" else detections
            size = module.extractor.roi_layers[0].output_size
            pooled = torch.empty(count, module.extractor.out_channels, *size, device="meta")
            outs = _on_meta(module.head)(pooled)
            if unit.kind == "box":
                outputs[unit.name] = [tuple(t.shape) for t in outs]
                record |= {f"{unit.key}/rois": ((count, 5), torch.float32),
                           f"{unit.key}/labels": ((count,), torch.int64), f"{unit.key}/keep": ((count,), torch.bool)}
            else:  # the logits of each detection's class
                outputs[unit.name] = [(count, *outs.shape[2:])]
                record |= {"mask/rois": ((count, 5), torch.float32), "mask/labels": ((count,), torch.int64)}
    return record, outputs


def _on_meta(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).to("meta")
