"""mmcv's compiled ops served from torchvision: the golden outputs of a compiled mmcv, and the routing."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from aphq_cli import mmcv_ext, mmcv_ops
from aphq_cli.errors import AphqError

GOLDEN = Path(__file__).parent / "fixtures" / "mmcv_ops.safetensors"


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN))


def test_golden_outputs_come_from_a_compiled_mmcv():
    with safe_open(str(GOLDEN), framework="pt") as f:
        assert f.metadata()["mmcv"] == "1.7.2"


@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("threshold", [0.5, 0.7])
def test_nms_keeps_what_mmcv_keeps_in_its_order(golden, case, threshold):
    """Tied scores, zero-area and inverted boxes included: the same indices in the same order."""
    keep = mmcv_ops.nms(golden[f"nms{case}.boxes"], golden[f"nms{case}.scores"], threshold)
    assert torch.equal(keep, golden[f"nms{case}.keep@{threshold}"])


def test_nms_of_no_box_and_the_offset_it_does_not_serve():
    assert mmcv_ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
    with pytest.raises(AphqError, match="offset=1 is not served"):
        mmcv_ops.nms(torch.zeros(2, 4), torch.zeros(2), 0.5, offset=1)


def _roi_cases(golden):
    return sorted({k.rsplit(".", 1)[0] for k in golden if k.startswith("roi@")})


def test_roi_align_forward_and_backward_equal_mmcv(golden):
    feats, rois = golden["roi.feats"], golden["roi.rois"]
    cases = _roi_cases(golden)
    assert len(cases) == 10
    for key in cases:
        scale, ratio, size = key[len("roi@"):].split("/")
        args = dict(aligned_height=int(size), aligned_width=int(size), spatial_scale=float(scale),
                    sampling_ratio=int(ratio), pool_mode=1, aligned=True)
        out = feats.new_zeros(golden[f"{key}.out"].shape)
        mmcv_ops.roi_align_forward(feats, rois, out, None, None, **args)
        assert torch.equal(out, golden[f"{key}.out"]), key
        grad_in = torch.zeros_like(feats)
        mmcv_ops.roi_align_backward(golden[f"{key}.grad_out"], rois, None, None, grad_in, **args)
        assert torch.allclose(grad_in, golden[f"{key}.grad_in"], atol=1e-6, rtol=0), key


def test_max_pooling_is_not_served():
    with pytest.raises(AphqError, match="max pooling is not served"):
        mmcv_ops.roi_align_forward(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), torch.zeros(1, 1, 2, 2), None, None,
                                   aligned_height=2, aligned_width=2, spatial_scale=1.0, sampling_ratio=0,
                                   pool_mode=0, aligned=True)


def test_mmcv_ops_route_to_the_served_functions_on_every_device():
    """The routing decision, checked on CPU: mmcv's ops call aphq's functions, which torchvision serves for CUDA too."""
    import mmcv.ops

    assert isinstance(sys.modules["mmcv._ext"], mmcv_ext.ServedExt)
    for module in ("mmcv.ops.nms", "mmcv.ops.roi_align"):
        assert sys.modules[module].ext_module is sys.modules["mmcv._ext"], module
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
    dets, keep = mmcv.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2] and "nms" in mmcv_ext.CALLED
    for op in ("torchvision::nms", "torchvision::roi_align", "torchvision::_roi_align_backward"):
        # A CUDA tensor reaches torchvision's CUDA kernel: it is registered in every build that has CUDA.
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op
        if torch.version.cuda:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


def test_any_other_compiled_op_is_one_sentence(monkeypatch):
    monkeypatch.setattr(mmcv_ext, "_COMPILED", [None])  # as in an install without compiled ops
    served = mmcv_ext.ServedExt("mmcv._ext")
    with pytest.raises(AphqError, match="mmcv op deform_conv_forward is not available"):
        served.deform_conv_forward(torch.zeros(1))
