"""Model wrapping and the RepQ scale reparameterization."""

import pytest
import torch
from torch import nn

from aphq_cli.models.swin import APHQSwinTransformer, SwinBlock
from aphq_cli.quant.modules import QuantConv2d, QuantLinear, QuantMatMul, quantizers
from aphq_cli.quant.primitives import fake_quantize, quantize, search_rowwise
from aphq_cli.models.plan import layer_norm_of, padding_block, quantize_model
from aphq_cli.quant.wrap import fold_channel_scales, keep_float, reparam_factors


def _block(seed=0):
    torch.manual_seed(seed)
    block = SwinBlock(32, 2, 7, 3, 4.0, True, None, 0.0, 0.0, 0.0).eval()
    with torch.no_grad():  # LayerNorm affine far from 1/0, channels of very different range
        block.norm1.weight.copy_(torch.rand(32) * 3 + 0.1)
        block.norm1.bias.copy_(torch.randn(32))
    return block


# 14 x 21 tokens fill 7 x 7 windows; 10 x 19 pads, so padded tokens must stay float zeros.
@pytest.mark.parametrize("size", [(14, 21), (10, 19)])
def test_reparameterization_keeps_the_float_output(size):
    block = _block()
    model = quantize_model(nn.Sequential(block), 4, 4)
    wrapped = model[0]
    x = torch.randn(2, *size, 32)
    with torch.no_grad():
        before = wrapped(x)
        y = wrapped.norm1(x).reshape(-1, 32)
        s_c, z_c = search_rowwise(y.T.contiguous(), 4)
        _, _, r, b = reparam_factors(s_c, z_c, 4)
        fold_channel_scales(wrapped.norm1, wrapped.attn.qkv, r, b, padding_block(model, "0.norm1"))
        after = wrapped(x)
    # float32: the fold rescales by r (up to ~10x here) and shifts by b, which
    # changes rounding of sums over 32 channels: a few ulps of outputs of size
    # ~1-10, so 1e-5 absolute and relative is what float32 allows.
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(wrapped.norm1.weight, _block().norm1.weight)


def test_folded_per_tensor_grid_equals_the_per_channel_grid():
    # y' = y / r - b quantized with the common (s, z) gives the same integer
    # codes as y quantized channel by channel with (s_c, z_c):
    # y'/s + z = y/s_c + z_c exactly, since b_c/s = z - z_c.
    torch.manual_seed(0)
    y = torch.randn(5000, 16, dtype=torch.float64) * torch.rand(16, dtype=torch.float64) * 4 + torch.randn(16)
    s_c, z_c = search_rowwise(y.T.contiguous(), 4)
    s_c, z_c = s_c.double(), z_c.double()
    s, z, r, b = reparam_factors(s_c, z_c, 4)
    per_channel = quantize(y, s_c, z_c, 4)
    folded = quantize(y / r - b, s, z, 4)
    # Equal but for values within float64 rounding of a .5 tie.
    assert (folded == per_channel).double().mean() > 0.9999


def test_quantize_model_replaces_every_layer():
    model = nn.ModuleDict({"backbone": APHQSwinTransformer(embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                                                           out_indices=(0, 1))})
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    quantize_model(model, 4, 4)
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules())
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == n_linear
    assert sum(isinstance(m, QuantMatMul) for m in model.modules()) == 2 * 4
    proj = model["backbone"].patch_embed.proj
    assert isinstance(proj, QuantConv2d) and proj.a_quant.bits == 8 and proj.w_quant.bits == 4
    assert not any(q.enabled for q in quantizers(model).values())  # float until calibrated


def test_disabled_quantizers_are_the_identity():
    torch.manual_seed(0)
    ref = APHQSwinTransformer(embed_dim=16, depths=(2, 2), num_heads=(1, 2), out_indices=(0, 1)).eval()
    wrapped = APHQSwinTransformer(embed_dim=16, depths=(2, 2), num_heads=(1, 2), out_indices=(0, 1)).eval()
    wrapped.load_state_dict(ref.state_dict())
    quantize_model(wrapped, 4, 4)
    x = torch.randn(1, 3, 40, 52)
    with torch.no_grad():
        for a, b in zip(ref(x), wrapped(x)):
            assert torch.equal(a, b)


def test_enabled_quantizer_matches_the_primitive():
    lin = QuantLinear(nn.Linear(8, 4), 4, 4)
    lin.a_quant.set_params(torch.tensor(0.1), torch.tensor(7.0))
    lin.w_quant.set_params(torch.full((4,), 0.02), torch.full((4,), 8.0))
    x = torch.randn(3, 8)
    expected = nn.functional.linear(fake_quantize(x, torch.tensor(0.1), torch.tensor(7.0), 4),
                                    fake_quantize(lin.weight, torch.full((4, 1), 0.02), torch.full((4, 1), 8.0), 4),
                                    lin.bias)
    assert torch.equal(lin(x), expected)


@pytest.mark.parametrize("layer", [nn.Linear(18, 3), nn.Conv2d(2, 3, 3, padding=1)])
def test_grouped_weights_are_quantized_group_by_group(layer):
    """Each run of 6 inputs of a row (a conv's channels and kernel flattened) on its own grid, by a plain loop."""
    torch.manual_seed(0)
    layer.weight.data.normal_()
    q = QuantLinear(layer, 4, 4, w_group=6) if isinstance(layer, nn.Linear) else QuantConv2d(layer, 4, 4, w_group=6)
    scale, zero = torch.rand(3, 3) * 0.2 + 0.05, torch.randint(4, 12, (3, 3)).float()
    q.w_quant.set_params(scale, zero)
    rows = layer.weight.detach().reshape(3, 18)
    expected = torch.stack([torch.cat([fake_quantize(rows[o, 6 * g: 6 * g + 6], scale[o, g], zero[o, g], 4)
                                       for g in range(3)]) for o in range(3)]).reshape(layer.weight.shape)
    assert torch.equal(q.quantized_weight(), expected)


def test_the_search_gives_each_weight_group_its_own_range():
    """calibrate_layer on a grouped layer: every group gets what the search finds for that group alone."""
    from aphq_cli.quant.calib import calibrate_layer, InputRecorder, SearchSettings
    from aphq_cli.quant.plan import LayerPlan, QuantPlan

    torch.manual_seed(0)
    fc = nn.Linear(16, 2)
    fc.weight.data[:, 8:] *= 20  # the second group of each row is wide: a per-row scale would flatten the first
    layer = QuantLinear(fc, 4, 4, w_group=8)
    recorder = InputRecorder({"fc": layer}, 1000, 8, 1)
    recorder.rows["fc"] = [torch.randn(50, 16)]
    plan = QuantPlan({"fc": LayerPlan("linear", 4, 4, w_group=8)})
    calibrate_layer(nn.Module(), plan, "fc", layer, recorder, SearchSettings(eq_n=16, reparam=False))
    for o in range(2):
        for g in range(2):
            s, z = search_rowwise(fc.weight.detach()[o:o + 1, 8 * g: 8 * g + 8], 4, eq_n=16)
            assert torch.equal(layer.w_quant.scale[o, g], s.reshape(1)) and torch.equal(layer.w_quant.zero_point[o, g],
                                                                                        z.reshape(1))
    assert layer.w_quant.scale[:, 1].min() > 5 * layer.w_quant.scale[:, 0].max()


def test_keep_float_sees_grouped_weights_on_their_grid():
    fc = QuantLinear(nn.Linear(8, 2), 4, 4, w_group=4)
    fc.w_quant.set_params(torch.full((2, 2), 0.1), torch.full((2, 2), 8.0))
    fc.a_quant.set_params(torch.tensor(0.1), torch.tensor(8.0))
    model = nn.ModuleDict({"head": fc})
    with torch.no_grad():
        fc.weight.copy_(fc.quantized_weight())  # rounded, as reconstruct leaves it
    with pytest.raises(ValueError, match="hold their quantized values"):
        keep_float(model, ["head"])


def _calibrated_backbone() -> nn.Module:
    """A small quantized Swin under ``backbone`` with every quantizer on (as calibration leaves it)."""
    model = quantize_model(nn.ModuleDict({"backbone": APHQSwinTransformer(
        embed_dim=16, depths=(2, 2), num_heads=(1, 2), out_indices=(0, 1))}), 4, 4)
    for q in quantizers(model).values():
        q.enabled = True
    return model


def test_keep_float_turns_off_exactly_the_named_part():
    model = _calibrated_backbone()
    qs = quantizers(model)
    in_layer1 = {n for n in qs if n.startswith("backbone.layers.1.")}
    weights = {n for n in in_layer1 if n.endswith("w_quant")}
    assert keep_float(model, ["backbone.layers.1:w"]) == len(weights) > 0
    assert {n for n, q in qs.items() if not q.enabled} == weights
    # A second call counts only what it newly turns off.
    assert keep_float(model, ["backbone.layers.1"]) == len(in_layer1 - weights)
    assert {n for n, q in qs.items() if not q.enabled} == in_layer1


def test_keep_float_refuses_weights_that_hold_their_quantized_values():
    model = _calibrated_backbone()
    layer = model["backbone"].layers[1].blocks[0].mlp.fc1
    with torch.no_grad():  # what reconstruct does to a layer: its weight becomes its quantized value
        layer.w_quant.set_params(torch.full((layer.out_features,), 0.05), torch.full((layer.out_features,), 8.0))
        layer.weight.copy_(layer.w_quant(layer.weight))
    with pytest.raises(ValueError, match="layers.1.blocks.0.mlp.fc1's"):
        keep_float(model, ["backbone.layers.1"])
    assert all(q.enabled for q in quantizers(model).values())  # a refused call turns nothing off
    assert keep_float(model, ["backbone.layers.0:w", "backbone.layers.1:a"]) > 0  # the rest is allowed


def test_keep_float_gives_rounded_weights_their_originals_back():
    model, originals = _calibrated_backbone(), _calibrated_backbone()
    originals.load_state_dict(model.state_dict())
    layer = model["backbone"].layers[1].blocks[0].mlp.fc1
    with torch.no_grad():  # reconstruct's rounding, as above
        layer.w_quant.set_params(torch.full((layer.out_features,), 0.05), torch.full((layer.out_features,), 8.0))
        layer.weight.copy_(layer.w_quant(layer.weight))
    x = torch.randn(5, layer.in_features)
    rounded = layer.weight.clone()
    with pytest.raises(ValueError, match="names no quantized module"):  # a refused call restores nothing
        keep_float(model, ["backbone.layers.1:w", "roi_head"], lambda: originals)
    assert torch.equal(layer.weight, rounded) and layer.w_quant.enabled
    assert keep_float(model, ["backbone.layers.1.blocks.0.mlp.fc1:w"], lambda: originals) == 1
    original = originals.get_submodule("backbone.layers.1.blocks.0.mlp.fc1")
    assert torch.equal(layer.weight, original.weight) and not layer.w_quant.enabled
    original.w_quant.enabled = False
    with torch.no_grad():
        assert torch.equal(layer(x), original(x))  # float weights, the same (still quantized) input
    # Weights not on a grid are left as they are.
    other = model["backbone"].layers[0].blocks[0].mlp.fc1.weight.clone()
    keep_float(model, ["backbone.layers.0:w"], _calibrated_backbone)
    assert torch.equal(model["backbone"].layers[0].blocks[0].mlp.fc1.weight, other)


@pytest.mark.parametrize("part, message", [("roi_head", "names no quantized module .*backbone"),
                                           ("backbone.layers.1:x", "is not PART"),
                                           ("backbone.layers.", "names no quantized module"),
                                           ("backbone.layer", "names no quantized module")])
def test_keep_float_refuses_what_names_nothing(part, message):
    model = _calibrated_backbone()
    with pytest.raises(ValueError, match=message):
        keep_float(model, [part])


def test_padding_block_is_the_norm1_owner_only():
    model = nn.Sequential(_block())
    assert padding_block(model, "0.norm1") is model[0]
    assert padding_block(model, "0.norm2") is None  # its output is never padded


def test_layer_norm_of():
    assert layer_norm_of("backbone.layers.1.blocks.0.attn.qkv") == "backbone.layers.1.blocks.0.norm1"
    assert layer_norm_of("backbone.layers.1.blocks.0.mlp.fc1") == "backbone.layers.1.blocks.0.norm2"
    assert layer_norm_of("backbone.layers.2.downsample.reduction") == "backbone.layers.2.downsample.norm"
    assert layer_norm_of("backbone.layers.1.blocks.0.mlp.fc2") is None


def test_subclasses_of_linear_and_conv2d_are_quantized_transposed_convs_are_not():
    """mmcv's ``Conv2d`` wrapper (the mask head's ``conv_logits``) is a subclass: it carries quantizers."""
    from mmcv.cnn.bricks.wrappers import Conv2d as MmcvConv2d, ConvTranspose2d as MmcvConvTranspose2d

    class MyLinear(nn.Linear):
        pass

    model = nn.ModuleDict({"logits": MmcvConv2d(4, 2, 1), "fc": MyLinear(3, 2),
                           "up": MmcvConvTranspose2d(4, 4, 2, stride=2), "plain": nn.ConvTranspose2d(4, 4, 2)})
    quantize_model(model, 4, 4)
    assert isinstance(model["logits"], QuantConv2d) and isinstance(model["fc"], QuantLinear)
    assert isinstance(model["up"], nn.ConvTranspose2d) and isinstance(model["plain"], nn.ConvTranspose2d)


def test_the_mask_heads_conv_logits_carries_quantizers():
    from aphq_cli.models.zoo import build_model, load_config, resolve_model

    for name, stages in (("tiny-mask-rcnn", 1), ("tiny-cascade-mask-rcnn", 3)):
        model = quantize_model(build_model(load_config(resolve_model(name))), 4, 4)
        logits = [n for n, m in model.named_modules() if n.endswith("conv_logits")]
        assert len(logits) == stages
        assert all(isinstance(model.get_submodule(n), QuantConv2d) for n in logits), name


def test_matmul_calibration_samples_windows_across_the_whole_image():
    from aphq_cli.quant.calib import InputRecorder

    mm = QuantMatMul(1, 4)
    recorder = InputRecorder({"mm": mm}, max_values=1000, max_windows=4, images=1)
    a = torch.arange(16.0).view(16, 1, 1, 1)  # window w holds the value w
    with recorder.attached():
        mm(a, a)
    windows = recorder.pairs["mm"][0][0].flatten().tolist()
    assert windows == [0.0, 4.0, 8.0, 12.0]  # not the first four


def test_the_kept_quantized_weight_follows_every_change():
    """Without gradients a layer keeps its fake-quantized weight, and makes it again when anything changes."""
    import torch.nn as nn

    from aphq_cli.quant.modules import QuantLinear

    torch.manual_seed(0)
    layer = QuantLinear(nn.Linear(8, 4), 4, 8)
    layer.w_quant.set_params(torch.full((4, 1), 0.05), torch.full((4, 1), 8.0))
    x = torch.randn(3, 8)

    def reference():
        return torch.nn.functional.linear(x, layer.w_quant(layer.weight), layer.bias)

    with torch.no_grad():
        assert torch.equal(layer(x), reference())
        first = layer.quantized_weight()
        assert layer.quantized_weight() is first  # kept
        layer.weight.mul_(1.5)  # in place: made again
        assert torch.equal(layer(x), reference())
        layer.w_quant.scale.fill_(0.1)
        assert torch.equal(layer(x), reference())
        layer.w_quant.enabled = False
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    layer.w_quant.enabled = True
    layer.weight.requires_grad_(True)
    layer(x).sum().backward()  # with gradients: computed every time, and it backpropagates
    assert layer.weight.grad is not None
