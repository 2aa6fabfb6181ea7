"""mmcv's compiled ops that aphq's detectors call, computed by torchvision (issue #20).

mmcv-full ships its ops as a compiled extension, ``mmcv._ext``, which must be
built against the installed torch and, on a GPU machine, a matching CUDA
toolkit. The detectors aphq runs call three of its functions (found by
instrumenting every stage and a forward of each model, ``tests/test_mmcv_ops.py``):
``nms`` (the RPN's and the RoI heads' NMS; ``batched_nms`` is Python around
it) and ``roi_align_forward``/``roi_align_backward`` (the RoI extractors,
``aligned=True``, average pooling; backward only when training).
torchvision has CPU and CUDA kernels of both. :mod:`aphq_cli.mmcv_ext`
serves these functions as ``mmcv._ext``.

The semantics are mmcv's exactly: torchvision's RoIAlign is mmcv's
(``aligned=True``, the same sampling ratio); NMS visits the boxes in the
order of mmcv's own sort (``scores.sort(0, descending=True)``), whose ties
torchvision's stable sort would order differently, with the same IoU
arithmetic. ``tests/fixtures/mmcv_ops.pt`` holds outputs recorded once with a
compiled mmcv (``scripts/record_mmcv_ops.py``) that the tests compare against.
"""

from __future__ import annotations

import torch
import torchvision

from aphq_cli.errors import AphqError

_AVG = 1  # mmcv's pool_mode code for average pooling (0: max)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0) -> torch.Tensor:
    """mmcv's ``nms``: indices of the kept boxes, highest score first."""
    if offset != 0:
        raise AphqError(f"mmcv nms with offset={offset} is not served from torchvision (only offset 0)")
    if boxes.numel() == 0:
        return boxes.new_zeros(0, dtype=torch.long)
    order = scores.sort(0, descending=True)[1]  # mmcv's own order, ties included
    # Strictly decreasing stand-in scores: torchvision's (stable) sort keeps mmcv's order as it is.
    rank = -torch.arange(order.numel(), device=scores.device, dtype=torch.float32)
    keep = torchvision.ops.nms(boxes[order].float(), rank, float(iou_threshold))
    return order[keep]


def _check_avg(pool_mode: int) -> None:
    if pool_mode != _AVG:
        raise AphqError("mmcv RoIAlign with max pooling is not served from torchvision (only average pooling)")


def roi_align_forward(input, rois, output, argmax_y, argmax_x, *, aligned_height: int, aligned_width: int,
                      spatial_scale: float, sampling_ratio: int, pool_mode: int, aligned: bool) -> None:
    """mmcv's ``roi_align_forward``: fills ``output`` (``(R, C, h, w)``) in place."""
    _check_avg(pool_mode)
    output.copy_(torchvision.ops.roi_align(input, rois, (aligned_height, aligned_width), spatial_scale,
                                           sampling_ratio, aligned))


def roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, *, aligned_height: int,
                       aligned_width: int, spatial_scale: float, sampling_ratio: int, pool_mode: int,
                       aligned: bool) -> None:
    """mmcv's ``roi_align_backward``: adds the input gradient into ``grad_input`` (zeros on entry)."""
    _check_avg(pool_mode)
    batch, channels, height, width = grad_input.shape
    grad_input.add_(torch.ops.torchvision._roi_align_backward(
        grad_output, rois, spatial_scale, aligned_height, aligned_width, batch, channels, height, width,
        sampling_ratio, aligned))
