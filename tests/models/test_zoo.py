"""The paper's four full-size models: build by name, load random weights in both layouts, run."""

import numpy as np
import pytest
import torch

from aphq_cli.errors import AphqError
from aphq_cli.models.checkpoint import load_checkpoint, save_checkpoint
from aphq_cli.models.zoo import build_heads, build_model, load_config, load_model, normalize_backbone, resolve_model

PAPER_MODELS = {  # name -> (detector type, Swin depths)
    "mask-rcnn-swin-t": ("MaskRCNN", [2, 2, 6, 2]),
    "mask-rcnn-swin-s": ("MaskRCNN", [2, 2, 18, 2]),
    "cascade-mask-rcnn-swin-t": ("CascadeRCNN", [2, 2, 6, 2]),
    "cascade-mask-rcnn-swin-s": ("CascadeRCNN", [2, 2, 18, 2]),
}


def _forward(model, h=160, w=224):
    meta = dict(img_shape=(h, w, 3), ori_shape=(h, w, 3), pad_shape=(h, w, 3), scale_factor=np.ones(4, dtype=np.float32),
                flip=False, batch_input_shape=(h, w))
    with torch.no_grad():
        return model(return_loss=False, rescale=True, img=[torch.randn(1, 3, h, w)], img_metas=[[meta]])


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_paper_model_loads_both_layouts_and_runs(name, tmp_path):
    kind, depths = PAPER_MODELS[name]
    cfg = load_config(resolve_model(name))
    assert cfg.model.type == kind
    assert list(cfg.model.backbone.depths) == depths
    torch.manual_seed(0)
    source = build_model(cfg)
    # Both layouts and both formats: the published .pth layout and
    # mmdetection's own layout as safetensors.
    files = [save_checkpoint(source, tmp_path / "orig.pth", layout="original", meta={"epoch": 36}),
             save_checkpoint(source, tmp_path / "mmdet.safetensors", layout="mmdet")]
    probe = [k for k in source.state_dict() if k.endswith("downsample.reduction.weight")][0]
    for path in files:
        model, _, _ = load_model(name, path, cfg=cfg)
        for key, value in source.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key
        assert torch.equal(model.state_dict()[probe], source.state_dict()[probe])
        del model
    (bboxes, masks), = _forward(source)
    assert len(bboxes) == len(masks) == 80
    assert all(b.shape[1] == 5 for b in bboxes)


def test_published_and_mmdet_swin_configs_become_ours():
    published = dict(type="SwinTransformer", embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                     window_size=7, ape=False, patch_norm=True, use_checkpoint=False)
    mmdet = dict(type="SwinTransformer", embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                 window_size=7, use_abs_pos_embed=False, with_cp=False, convert_weights=True,
                 init_cfg=dict(type="Pretrained", checkpoint="x.pth"))
    a, b = normalize_backbone(published), normalize_backbone(mmdet)
    assert a["type"] == b["type"] == "APHQSwinTransformer"
    assert a["embed_dim"] == b["embed_dim"] == 96
    assert "init_cfg" not in b and "convert_weights" not in b
    assert normalize_backbone(dict(type="ResNet", depth=50)) == dict(type="ResNet", depth=50)


def test_config_path_works(tmp_path):
    cfg_file = tmp_path / "my_model.py"
    base = resolve_model("mask-rcnn-swin-t").config
    cfg_file.write_text(f"_base_ = [{str(base)!r}]\nmodel = dict(roi_head=dict(bbox_head=dict(num_classes=3)))\n")
    cfg = load_config(resolve_model(str(cfg_file)))
    assert cfg.model.roi_head.bbox_head.num_classes == 3


def test_unknown_model_is_one_sentence():
    with pytest.raises(AphqError, match="unknown model 'mask-rcnn-swin-x'.*mask-rcnn-swin-t"):
        resolve_model("mask-rcnn-swin-x")
    with pytest.raises(AphqError, match="does not exist"):
        resolve_model("/nonexistent/config.py")


def test_full_model_without_checkpoint_is_refused():
    with pytest.raises(AphqError, match="pass --checkpoint"):
        load_model("mask-rcnn-swin-t")


def test_wrong_model_checkpoint_is_refused(tmp_path):
    t = build_model(load_config(resolve_model("mask-rcnn-swin-t")))
    path = save_checkpoint(t, tmp_path / "t.safetensors")
    s = build_model(load_config(resolve_model("mask-rcnn-swin-s")))
    with pytest.raises(AphqError, match=r"does not fit the model: 168 missing key\(s\) such as "
                                        r"backbone\.layers\.2\.blocks\.6\."):
        load_checkpoint(s, path)


@pytest.mark.parametrize("name", ["tiny-mask-rcnn", "tiny-cascade-mask-rcnn"])
def test_the_heads_alone_have_the_detectors_head_layers(name):
    """build_heads (what calibrate checks head_w_group on) names and shapes every head parameter as the detector."""
    cfg = load_config(resolve_model(name))
    heads = {n: p.shape for n, p in build_heads(cfg).named_parameters()}
    assert heads == {n: p.shape for n, p in build_model(cfg).named_parameters()
                     if n.startswith(("rpn_head.", "roi_head."))}
    assert any(n.startswith("roi_head.mask_head") for n in heads)
