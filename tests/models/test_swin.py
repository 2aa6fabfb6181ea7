"""Our Swin backbone against mmdetection's own SwinTransformer as the reference."""

import pytest
import torch

from aphq_cli.models.checkpoint import convert_layout
from aphq_cli.models.swin import APHQSwinTransformer, relative_position_index, shifted_window_mask

SMALL = dict(depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7)


def _pair(seed=0):
    """mmdetection's Swin with random weights, and ours loaded from its converted state."""
    from mmdet.models.backbones import SwinTransformer

    torch.manual_seed(seed)
    ref = SwinTransformer(embed_dims=32, drop_path_rate=0.0, **SMALL)
    ref.eval()  # its train() returns None
    for p in ref.parameters():  # LayerNorms start at 1/0: perturb so their order matters
        p.data.add_(0.05 * torch.randn_like(p))
    state = {f"backbone.{k}": v for k, v in ref.state_dict().items()}
    ours = APHQSwinTransformer(embed_dim=32, drop_path_rate=0.0, **SMALL).eval()
    converted = convert_layout(state, "original")
    ours.load_state_dict({k[len("backbone."):]: v for k, v in converted.items()}, strict=True)
    return ref, ours


@pytest.mark.parametrize("size", [(64, 64), (100, 132), (77, 61)])
def test_matches_mmdetection_swin(size):
    # Sizes that are not multiples of the patch, of the window, or even:
    # exercises patch padding, window padding, shifted masks and odd merges.
    ref, ours = _pair()
    img = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected, got = ref(img), ours(img)
    assert len(got) == 4
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_relative_position_index_matches_mmdetection():
    from mmdet.models.backbones.swin import WindowMSA

    ref = WindowMSA(embed_dims=8, num_heads=1, window_size=(7, 7))
    assert torch.equal(relative_position_index(7), ref.relative_position_index)


def test_layout_conversion_round_trip():
    ref, _ = _pair()
    state = {f"backbone.{k}": v for k, v in ref.state_dict().items()}
    state["neck.fpn_convs.0.conv.weight"] = torch.randn(4, 4, 3, 3)
    back = convert_layout(convert_layout(state, "original"), "mmdet")
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k]), k


def test_shifted_mask_blocks_wrapped_regions():
    mask = shifted_window_mask(14, 14, 7, 3, torch.device("cpu"))
    assert mask.shape == (4, 49, 49)
    assert (mask[0] == 0).all()  # the top-left window never wraps
    # The bottom-right window mixes four regions: token 0 (row 0, col 0) and
    # token 48 (row 6, col 6) come from different regions.
    assert mask[3, 0, 48] == -100 and mask[3, 0, 0] == 0


def test_units_are_in_forward_order_and_hookable():
    _, ours = _pair()
    names = [n for n, _ in ours.units()]
    assert names[0] == "patch_embed" and names[-1] == "layers.3.blocks.1"
    assert names.index("layers.0.downsample") == 3
    assert len(names) == 1 + 8 + 3
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        base = ours(img)
    block = dict(ours.units())["layers.1.blocks.0"]
    handle = block.register_forward_hook(lambda m, i, o: o + 1.0)
    try:
        with torch.no_grad():
            perturbed = ours(img)
    finally:
        handle.remove()
    assert torch.equal(base[0], perturbed[0])  # stage 0 is before the block
    assert not torch.allclose(base[1], perturbed[1])


def test_matmuls_are_submodules():
    _, ours = _pair()
    names = {n for n, _ in ours.named_modules()}
    assert "layers.0.blocks.0.attn.matmul_qk" in names
    assert "layers.0.blocks.0.attn.matmul_av" in names
    assert "layers.0.blocks.0.mlp.act" in names
