"""Checkpoint reading, layout conversion and every checkpoint error, on a small detector."""

import collections

import pytest
import torch
from torch import nn

from aphq_cli.errors import AphqError
from aphq_cli.models.checkpoint import (convert_layout, detect_layout, load_checkpoint, load_into,
                                        read_state_dict, save_checkpoint)
from aphq_cli.models.zoo import build_model, load_config, resolve_model


@pytest.fixture(scope="module")
def small_model():
    cfg = load_config(resolve_model("mask-rcnn-swin-t"))
    cfg.model.backbone.update(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8])
    cfg.model.neck.in_channels = [32, 64, 128, 256]
    torch.manual_seed(1)
    return build_model(cfg)


@pytest.mark.parametrize("layout", ["original", "mmdet"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip_each_layout_and_format(small_model, tmp_path, layout, suffix):
    path = save_checkpoint(small_model, tmp_path / f"w{suffix}", layout=layout, meta={"CLASSES": "a,b"})
    state = read_state_dict(path)
    assert detect_layout(state) == layout
    fresh = build_model(small_model.cfg)
    assert load_checkpoint(fresh, path) == layout
    for key, value in small_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_mmdet_layout_names(small_model):
    state = convert_layout(small_model.state_dict(), "mmdet")
    assert "backbone.stages.0.blocks.0.attn.w_msa.qkv.weight" in state
    assert "backbone.stages.0.blocks.0.ffn.layers.0.0.weight" in state
    assert "backbone.stages.0.blocks.0.ffn.layers.1.bias" in state
    assert "backbone.patch_embed.projection.weight" in state
    assert "neck.lateral_convs.0.conv.weight" in state


def test_module_prefix_and_model_key_are_unwrapped(small_model, tmp_path):
    path = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in small_model.state_dict().items()}}, path)
    load_checkpoint(build_model(small_model.cfg), path)


def test_missing_unexpected_and_shape_errors(small_model):
    state = dict(small_model.state_dict())
    fresh = build_model(small_model.cfg)
    missing = {k: v for k, v in state.items() if not k.startswith("rpn_head.")}
    with pytest.raises(AphqError, match=r"6 missing key\(s\) such as rpn_head\.rpn_conv\.weight"):
        load_into(fresh, missing, "x.pth")
    extra = dict(state, **{"backbone.head.weight": torch.zeros(1)})
    with pytest.raises(AphqError, match=r"1 unexpected key\(s\) such as backbone\.head\.weight"):
        load_into(fresh, extra, "x.pth")
    wrong = dict(state)
    wrong["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(3, 1024)
    with pytest.raises(AphqError, match=r"another shape.*fc_cls\.weight \(3, 1024\) vs \(81, 1024\)"):
        load_into(fresh, wrong, "x.pth")


def test_many_missing_keys_are_summarized(small_model):
    with pytest.raises(AphqError, match=r"missing key\(s\) such as .* \(and \d+ more\)"):
        load_into(build_model(small_model.cfg), {"a": torch.zeros(1)}, "x.pth")


class Evil:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_pickle_with_objects_needs_trust(small_model, tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": small_model.state_dict(), "meta": {"hook": Evil()}}, path)
    with pytest.raises(AphqError, match=r"pickled object \(print\).*--trust-checkpoint"):
        read_state_dict(path)
    assert "unpickled code ran" not in capsys.readouterr().out
    # Trusting it loads it (and, as warned, runs the pickle's code).
    assert read_state_dict(path, trust_pickle=True).keys() == small_model.state_dict().keys()


def test_mmdet_meta_loads_without_trust(small_model, tmp_path):
    # mmcv saves meta with an OrderedDict and plain values: weights_only accepts these.
    path = tmp_path / "mm.pth"
    torch.save({"state_dict": collections.OrderedDict(small_model.state_dict()),
                "meta": {"epoch": 36, "CLASSES": ("a", "b"), "mmdet_version": "2.28.2"}}, path)
    load_checkpoint(build_model(small_model.cfg), path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_and_missing_files(tmp_path, suffix):
    with pytest.raises(AphqError, match="does not exist"):
        read_state_dict(tmp_path / f"none{suffix}")
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(AphqError, match="not a readable"):
        read_state_dict(bad)


def test_truncated_checkpoint(small_model, tmp_path):
    path = save_checkpoint(small_model, tmp_path / "w.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AphqError, match="not a readable safetensors"):
        read_state_dict(path)


def test_non_tensor_entries_are_refused(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"state_dict": {"a": torch.zeros(1), "b": 3}}, path)
    with pytest.raises(AphqError, match="'b' is a int, not a tensor"):
        read_state_dict(path)


def test_a_plain_module_checkpoint_does_not_fit(small_model, tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(nn.Linear(3, 3).state_dict(), path)
    with pytest.raises(AphqError, match="does not fit the model"):
        load_checkpoint(build_model(small_model.cfg), path)
