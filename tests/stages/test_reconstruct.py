"""aphq reconstruct: hard rounding, losses, kill-and-resume equality, and the gain over calibration."""

import pytest
import torch

from aphq_cli.artifacts import load_artifact
from aphq_cli.errors import AphqError
from aphq_cli.quant.modules import QuantConv2d, QuantLinear
from aphq_cli.runs import load_stage
from stages.calibrate import calibrate
from stages.reconstruct import LOSSES, ReconstructConfig, reconstruct
from tests.conftest import kill_when_done
from tests.stages.conftest import FAST_CALIB

SMALL = {"iters": 4, "images": 2}


def test_loss_registry_and_settings():
    assert set(LOSSES) == {"aph", "mse", "fisher", "none"}
    with pytest.raises(AphqError, match="--loss must be one of"):
        ReconstructConfig(loss="hessian")


def test_needs_a_calibrated_run(tmp_path):
    with pytest.raises(AphqError, match="run `aphq calibrate"):
        reconstruct(run=tmp_path)


# One loss suffices for where weights end up (the aph path runs in the W3A3 and torchrun tests).
@pytest.mark.parametrize("loss", ["fisher"])
def test_weights_end_on_their_grid(calibrated, loss):
    reconstruct(run=calibrated, loss=loss, settings={"iters": 2, "images": 1})
    model, _, header = load_stage(calibrated)
    assert header.stage == "reconstruct" and header.config["reconstruct"]["loss"] == loss
    # The settings dict reaches the stage (not the testbed's defaults of 200 x 16).
    assert (header.config["reconstruct"]["iters"], header.config["reconstruct"]["images"]) == (2, 1)
    for m in model.backbone.modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            codes = m.weight / m.w_quant.scale + m.w_quant.zero_point
            assert torch.allclose(codes, codes.round(), atol=1e-3)


def test_none_keeps_calibration(calibrated):
    reconstruct(run=calibrated, loss="none", settings=SMALL)
    cal, _ = load_artifact(calibrated / "calibrate.safetensors")
    rec, _ = load_artifact(calibrated / "reconstruct.safetensors")
    assert cal.keys() == rec.keys() and all(torch.equal(cal[k], rec[k]) for k in cal)


def test_kill_and_resume_gives_the_uninterrupted_result(calibrated, tmp_path):
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(calibrated, twin)
    reference, _ = reconstruct(run=calibrated, loss="mse", settings=SMALL)
    expected, _ = load_artifact(reference)
    blocks = twin / "reconstruct" / "blocks"
    code = ("from pathlib import Path; from stages.reconstruct import reconstruct; "
            f"reconstruct(run=Path({str(twin)!r}), loss='mse', settings={SMALL!r})")
    done = kill_when_done(code, blocks, 4)
    assert 4 <= done < 13, "the kill should land midway"
    resumed, hit = reconstruct(run=twin, loss="mse", settings=SMALL)
    assert not hit
    got, _ = load_artifact(resumed)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def _ap_before_and_after_aph(run, settings: dict) -> tuple[dict, dict]:
    """Box and mask AP on the first 40 val images of the calibrated run, then after aph reconstruction."""
    from stages.eval import evaluate

    calib = evaluate(run=run, stage="calibrate", limit=40).metrics
    reconstruct(run=run, loss="aph", settings=settings)
    recon = evaluate(run=run, stage="reconstruct", limit=40).metrics
    print("calibrate", calib["bbox_AP"], calib["segm_AP"], "reconstruct", recon["bbox_AP"], recon["segm_AP"])
    return calib, recon


@pytest.fixture(scope="module")
def bundled_w3a3(tmp_path_factory):
    """The bundled tiny-mask-rcnn calibrated at W3A3 with the testbed defaults."""
    run = tmp_path_factory.mktemp("bundled") / "w3a3"
    calibrate(model="tiny-mask-rcnn", run=run, w_bits=3, a_bits=3)
    return run


@pytest.mark.slow
def test_aph_reconstruction_beats_calibration_alone(bundled_w3a3):
    """The bundled testbed model at W3A3: reconstruct (aph) raises box AP over calibrate alone.

    At W3A3 calibration costs the 52-AP model half its accuracy and aph
    reconstruction wins back part of it: on this test's 40 images with 8
    images x 100 iterations, 26.1 -> 31.8 box AP (23.4 -> 29.4 mask AP)
    with the published method's details. The W4A4 test below runs on the
    cascade.
    """
    calib, recon = _ap_before_and_after_aph(bundled_w3a3, {"images": 8, "iters": 100})
    calib, recon = calib["bbox_AP"], recon["bbox_AP"]
    # Measured gain 5.7 points; 1 is the bar, so a reconstruction that does
    # nothing, or makes the calibrated model worse, fails.
    assert recon >= calib + 1.0


@pytest.mark.slow
def test_aph_reconstruction_beats_calibration_at_w4a4_on_the_cascade(tmp_path):
    """The bundled cascade at W4A4 with the testbed defaults (16 images x 200 iterations per block).

    On this test's 40 val images: 45.8 -> 46.0 box AP and 43.7 -> 45.0 mask
    AP with the published method's details (100 images, docs/results.md:
    +0.4 box, +1.1 mask). Calibration alone scores a point higher than when
    this test was first written (44.7), and at W4A4 the gain left is mostly
    in the masks, so the bar is on box and mask gains together.
    """
    run = tmp_path / "w4a4"
    calibrate(model="tiny-cascade-mask-rcnn", run=run, w_bits=4, a_bits=4)
    calib, recon = _ap_before_and_after_aph(run, {})
    gain = {k: recon[k] - calib[k] for k in ("bbox_AP", "segm_AP")}
    # Measured 1.5 points together; a reconstruction that does nothing, or
    # trades one task for the other, fails.
    assert gain["bbox_AP"] + gain["segm_AP"] >= 1.0, gain
    assert min(gain.values()) >= -0.5, gain


@pytest.mark.slow
def test_keep_float_everything_is_the_float_model(bundled_w3a3, bundled_fp40):
    """Every part in float: the calibrated model (LayerNorm scales folded) scores as the float model."""
    from stages.eval import evaluate

    def records():
        return {p.name: p.read_text() for p in (bundled_w3a3 / "eval").glob("*")}

    before = records()
    result = evaluate(run=bundled_w3a3, stage="calibrate", limit=40,
                      keep_float=["backbone", "neck", "rpn_head", "roi_head"])
    assert "float: backbone neck rpn_head roi_head" in result.model
    for key in ("bbox_AP", "segm_AP"):
        assert result.metrics[key] == pytest.approx(bundled_fp40[key], abs=0.2), key
    assert records() == before  # not recorded: the run's eval/ holds real stages only


@pytest.mark.slow
def test_keep_float_everything_after_reconstruction_is_the_float_model(bundled_w3a3, bundled_fp40, tmp_path):
    """Reconstructed (rounded) weights take their calibrated float values back: every part in float scores as float.

    A short mse reconstruction (heads too) rounds every layer's weight; without the calibrated weights
    this would be refused, with wrong ones (the checkpoint's, where LayerNorm scales are folded) it
    would not score as the float model.
    """
    import shutil

    from stages.eval import evaluate

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(bundled_w3a3 / "calibrate.safetensors", run)
    reconstruct(run=run, loss="mse", heads=True, settings={"images": 1, "iters": 2})
    everything = ["backbone", "neck", "rpn_head", "roi_head"]
    result = evaluate(run=run, stage="reconstruct", limit=40, keep_float=everything)
    for key in ("bbox_AP", "segm_AP"):
        assert result.metrics[key] == pytest.approx(bundled_fp40[key], abs=0.2), key
    from stages.export import export

    exported = export(run=run, out=tmp_path / "e.safetensors").path
    with pytest.raises(AphqError, match="hold their quantized values"):  # an export keeps no float weights
        evaluate(artifact=exported, limit=1, keep_float=["roi_head:w"])


def test_the_teacher_is_the_original_float_model_after_mlp_recon(tmp_path, synth_dir, random_tiny_checkpoint,
                                                                  monkeypatch):
    """After mlp-recon, a unit's float input and target come from the original (GELU) model.

    The published code hands the model copied before the ReLU swap to the
    block reconstructor, so reconstruction can win back what the swap cost.
    """
    import stages.reconstruct as rec
    from aphq_cli.runs import ModelSource
    from stages.mlp_recon import mlp_recon

    monkeypatch.setenv("APHQ_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    mlp_recon(model="tiny-mask-rcnn", run=run, checkpoint=random_tiny_checkpoint, data=synth_dir, settings=SMALL)
    calibrate(model="tiny-mask-rcnn", run=run, checkpoint=random_tiny_checkpoint, data=synth_dir, calib_images=1,
              settings=FAST_CALIB)
    seen = {}
    real = rec.reconstruct_unit

    def spy(unit, caches, k, *args, **kwargs):
        if k == 1:  # the first Swin block, after the patch embedding
            seen["x"], seen["y"], seen["img"] = caches.fp_in(k, 0), caches.target(k, 0), caches.imgs[0]
        return real(unit, caches, k, *args, **kwargs)

    monkeypatch.setattr(rec, "reconstruct_unit", spy)
    reconstruct(run=run, loss="mse", settings=SMALL)

    source = ModelSource.open("tiny-mask-rcnn", random_tiny_checkpoint, synth_dir)
    original = source.build("cpu")
    relu = source.build("cpu", mlp_recon=run / "mlp_recon.safetensors")
    block = "layers.0.blocks.0"
    with torch.no_grad():
        x = original.backbone.patch_embed(seen["img"])
        y = original.backbone.get_submodule(block)(x)
        y_relu = relu.backbone.get_submodule(block)(relu.backbone.patch_embed(seen["img"]))
    assert torch.allclose(seen["x"], x, atol=1e-5)
    assert torch.allclose(seen["y"], y, atol=1e-5)
    assert not torch.allclose(seen["y"], y_relu, atol=1e-3)  # the mlp-recon model would be another teacher


def test_fpn_loss_is_one_mean_over_all_levels_concatenated():
    from stages.reconstruct import unit_loss

    out = [torch.ones(1, 2, 4, 4), torch.zeros(1, 2, 1, 1)]  # 32 elements off by 1, then 2 exact
    target = [torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 1, 1)]
    assert unit_loss(out, target, None).item() == pytest.approx(32 / 34)  # not (1 + 0) / 2 per level


def test_weighted_loss_is_a_sum_over_the_image():
    from stages.reconstruct import unit_loss

    out, target = [torch.full((1, 2, 2, 3), 2.0)], [torch.zeros(1, 2, 2, 3)]
    weight = torch.arange(12.0).view(1, 2, 2, 3)
    assert unit_loss(out, target, weight).item() == pytest.approx(4 * sum(range(12)))


def test_qdrop_keeps_the_quantized_value_with_probability_drop_prob():
    """drop_prob is the published meaning: the chance that an element keeps its quantized value."""
    from aphq_cli.quant.modules import Quantizer

    q = Quantizer(2)
    q.set_params(torch.tensor(1.0), torch.tensor(0.0))
    x = torch.full((100_000,), 0.3)  # quantizes to 0.0
    torch.manual_seed(0)
    q.keep_quantized = 0.9
    share = (q(x) == 0).float().mean().item()
    assert share == pytest.approx(0.9, abs=0.01)


def test_qdrop_acts_on_linear_inputs_by_default():
    from aphq_cli.models.swin import SwinBlock
    from aphq_cli.models.plan import quantize_model
    from stages.reconstruct import qdrop_quantizers

    block = quantize_model(torch.nn.Sequential(SwinBlock(8, 2, 7, 0, 4.0, True, None, 0.0, 0.0, 0.0)), 4, 4)[0]
    linear = {id(m.a_quant) for m in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2)}
    assert {id(q) for q in qdrop_quantizers(block, "linear")} == linear
    everything = {id(q) for q in qdrop_quantizers(block, "all")}
    matmul = {id(block.attn.matmul_qk.a_quant), id(block.attn.matmul_av.b_quant)}
    assert linear < everything and matmul <= everything


def test_images_are_taken_in_order():
    """Iteration t reconstructs on image t mod N, as the published loop does."""
    from aphq_cli.quant.modules import QuantLinear
    from stages.reconstruct import reconstruct_unit

    torch.manual_seed(0)
    unit = torch.nn.Sequential(QuantLinear(torch.nn.Linear(4, 3), 4, 4))
    unit[0].w_quant.set_params(torch.full((3, 1), 0.1), torch.full((3, 1), 8.0))
    unit[0].a_quant.set_params(torch.tensor(0.1), torch.tensor(8.0))
    asked = []

    class Caches:
        count = 3

        def fp_in(self, k, i):
            asked.append(i)
            return torch.randn(2, 4)

        q_in = fp_in

        def target(self, k, i):
            return torch.randn(2, 3)

    reconstruct_unit(unit, Caches(), 0, lambda i: None, ReconstructConfig(iters=7), seed=0)
    assert asked[::2] == [0, 1, 2, 0, 1, 2, 0]

    asked.clear()
    reconstruct_unit(unit, Caches(), 0, lambda i: None, ReconstructConfig(iters=4, images_per_iter=2), seed=0)
    assert asked[::2] == [0, 1, 2, 0, 1, 2, 0, 1]


def test_grouped_weights_are_rounded_onto_their_groups_grid():
    """A layer with weight groups reconstructs, and ends with every weight on its own group's grid."""
    from aphq_cli.quant.modules import QuantLinear
    from aphq_cli.quant.wrap import _on_grid
    from stages.reconstruct import reconstruct_unit

    torch.manual_seed(0)
    unit = torch.nn.Sequential(QuantLinear(torch.nn.Linear(8, 3), 4, 4, w_group=4))
    unit[0].weight.data[:, 4:] *= 10
    unit[0].w_quant.set_params(torch.tensor([[0.05, 0.5]] * 3), torch.full((3, 2), 8.0))
    unit[0].a_quant.set_params(torch.tensor(0.1), torch.tensor(8.0))
    before = unit[0].weight.detach().clone()

    class Caches:
        count = 2

        def fp_in(self, k, i):
            return torch.randn(4, 8)

        q_in = fp_in

        def target(self, k, i):
            return torch.randn(4, 3)

    reconstruct_unit(unit, Caches(), 0, lambda i: None, ReconstructConfig(iters=5), seed=0)
    assert unit[0].weight.shape == before.shape
    assert _on_grid(unit, "0.w_quant")
    steps = (unit[0].weight - before).abs()
    assert steps[:, :4].max() < 0.05 and steps[:, 4:].max() < 0.5  # within one step of each group's own grid


def _small_block():
    """A shifted-window Swin block (dim 16, 2 heads, window 4, shift 2) quantized W4/A4 and min/max-calibrated,
    with two inputs, the float block's outputs for them and an APH map for each."""
    from aphq_cli.models.plan import quantize_model
    from aphq_cli.models.swin import SwinBlock
    from aphq_cli.quant.calib import minmax_calibrate

    torch.manual_seed(0)
    block = SwinBlock(16, 2, 4, 2, 4.0, True, None, 0.0, 0.0, 0.0).eval()
    xs = [torch.randn(1, 10, 10, 16) for _ in range(2)]
    with torch.no_grad():
        targets = [block(x) for x in xs]
    unit = quantize_model(torch.nn.Sequential(block), 4, 4)[0]
    minmax_calibrate(unit, xs[0])
    aph = [torch.rand(1, 10, 10, 16) + 0.5 for _ in xs]
    return unit, xs, targets, aph


def test_a_step_of_two_images_averages_their_losses():
    """images_per_iter=2 on the images a, a, b, b learns what one image per step learns on a, b: each
    step's gradient is the mean of its images' (QDrop and the regularizer off, so no draw differs)."""
    import copy

    from stages.reconstruct import reconstruct_unit

    unit, xs, targets, aph = _small_block()

    class Caches:
        def __init__(self, order):
            self.order, self.count = order, len(order)

        def fp_in(self, k, i):
            return xs[self.order[i]]

        def q_in(self, k, i):
            return xs[self.order[i]] * 1.05

        def target(self, k, i):
            return targets[self.order[i]]

    plain = dict(iters=12, warmup=1.0, drop_prob=1.0, quant_ratio=1.0)
    one, two = copy.deepcopy(unit), copy.deepcopy(unit)
    reconstruct_unit(one, Caches([0, 1]), 1, lambda i: aph[i], ReconstructConfig(**plain), seed=3)
    reconstruct_unit(two, Caches([0, 0, 1, 1]), 1, lambda i: aph[i // 2],
                     ReconstructConfig(**plain, images_per_iter=2), seed=3)
    learned = [k for k, v in one.state_dict().items() if not torch.equal(v, unit.state_dict()[k])]
    assert any(k.endswith("scale") for k in learned)
    for key, value in one.state_dict().items():
        assert torch.equal(two.state_dict()[key], value), key
    # With distinct images in a step, it learns something else than one image per step.
    other = copy.deepcopy(unit)
    reconstruct_unit(other, Caches([0, 1]), 1, lambda i: aph[i], ReconstructConfig(**plain, images_per_iter=2),
                     seed=3)
    assert any(not torch.equal(other.state_dict()[k], one.state_dict()[k]) for k in learned)


def test_images_per_iter_is_checked():
    assert ReconstructConfig().images_per_iter == 1
    with pytest.raises(AphqError, match="^images_per_iter must be a positive integer, got 0"):
        ReconstructConfig(images_per_iter=0)

HEADS = {"iters": 3, "images": 2, "heads": True}


def _head_params(tensors):
    return {k: v for k, v in tensors.items() if k.startswith(("param:rpn_head.", "param:roi_head."))}


def test_without_heads_the_heads_keep_their_calibrated_weights(calibrated):
    """#18: the published scope (the default): 13 units, and no head weight changes from calibrate's."""
    reconstruct(run=calibrated, loss="mse", settings=SMALL)
    blocks = sorted((calibrated / "reconstruct" / "blocks").glob("*.safetensors"))
    assert len(blocks) == 13 and blocks[-1].name == "12_neck.safetensors"
    cal, _ = load_artifact(calibrated / "calibrate.safetensors")
    rec, _ = load_artifact(calibrated / "reconstruct.safetensors")
    assert _head_params(rec).keys() == _head_params(cal).keys()
    assert all(torch.equal(rec[k], cal[k]) for k in _head_params(cal))


def test_head_units_kill_and_resume_gives_the_uninterrupted_result(calibrated, tmp_path):
    """#18: the heads after the FPN are units like the others: hard-rounded, resumable, exported."""
    import shutil

    from aphq_cli.exports import load_export
    from aphq_cli.inspect import run_status
    from stages.export import export

    twin = shutil.copytree(calibrated, tmp_path / "twin")
    reference = reconstruct(run=calibrated, loss="mse", settings=HEADS).path
    expected, header = load_artifact(reference)
    names = [p.name for p in sorted((calibrated / "reconstruct" / "blocks").glob("*.safetensors"))]
    assert names[12:] == ["12_neck.safetensors", "13_rpn_head.safetensors", "14_roi_head_bbox_head.safetensors",
                          "15_roi_head_mask_head.safetensors"]
    model, _, _ = load_stage(calibrated)
    for m in list(model.rpn_head.modules()) + list(model.roi_head.modules()):
        if isinstance(m, (QuantLinear, QuantConv2d)):  # every head weight on its grid
            codes = m.weight / m.w_quant.scale + m.w_quant.zero_point
            assert torch.allclose(codes, codes.round(), atol=1e-3)
    blocks = twin / "reconstruct" / "blocks"
    code = ("from pathlib import Path; from stages.reconstruct import reconstruct; "
            f"reconstruct(run=Path({str(twin)!r}), loss='mse', settings={HEADS!r})")
    done = kill_when_done(code, blocks, 14)  # past the RPN head
    assert 14 <= done < 16, "the kill should land among the head units"
    assert {s.stage: s.detail for s in run_status(twin)}["reconstruct"] == f"{done} of 16 blocks done"
    resumed, hit = reconstruct(run=twin, loss="mse", settings=HEADS)
    got, _ = load_artifact(resumed)
    assert not hit and got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    # The export packs the reconstructed head weights.
    exported, _, _ = load_export(export(run=calibrated, out=tmp_path / "e.safetensors").path)
    for name in ("rpn_head.rpn_cls.weight", "roi_head.bbox_head.fc_cls.weight", "roi_head.mask_head.conv_logits.weight"):
        assert torch.equal(exported.get_parameter(name), model.get_parameter(name)), name


def test_one_kind_of_head_alone(calibrated):
    """#18: head_kinds picks the heads to reconstruct (to see where each helps); the rest stay calibrated."""
    with pytest.raises(AphqError, match="head_kinds must name some of rpn, box, mask"):
        ReconstructConfig(head_kinds="roi")
    with pytest.raises(AphqError, match="head_loss must be one of task, mse, got 'l1'"):
        ReconstructConfig(head_loss="l1")
    reconstruct(run=calibrated, loss="mse", settings={"iters": 1, "images": 1, "heads": True, "head_kinds": "mask"})
    names = [p.name for p in sorted((calibrated / "reconstruct" / "blocks").glob("*.safetensors"))]
    assert names[12:] == ["12_neck.safetensors", "13_roi_head_mask_head.safetensors"]
    rec, _ = load_artifact(calibrated / "reconstruct.safetensors")
    # An artifact stores the parameters that differ from the float model's: the mask head's now, not the box head's.
    assert "param:roi_head.mask_head.conv_logits.weight" in rec
    assert not any(k.startswith(("param:roi_head.bbox_head.", "param:rpn_head.")) for k in rec)


def _weight_scales(tensors, prefixes):
    return {k: v for k, v in tensors.items() if k.startswith(prefixes) and k.endswith(".w_quant.scale")}


def test_head_weight_scales_learn_only_when_asked(calibrated):
    """#18: head_w_scale_lr > 0 learns the head layers' weight scales (0, the default, keeps calibrate's);
    the weights end on the learned grid, and the backbone's scales are calibrate's either way."""
    with pytest.raises(AphqError, match="head_w_scale_lr must be >= 0, got -0.1"):
        ReconstructConfig(head_w_scale_lr=-0.1)
    cal, _ = load_artifact(calibrated / "calibrate.safetensors")
    heads, body = ("quant:rpn_head.", "quant:roi_head."), ("quant:backbone.", "quant:neck.")
    assert _weight_scales(cal, heads) and _weight_scales(cal, body)
    for lr, learned in ((0.0, False), (0.05, True)):
        reconstruct(run=calibrated, loss="mse", force=True,
                    settings={"iters": 3, "images": 1, "heads": True, "head_w_scale_lr": lr})
        rec, _ = load_artifact(calibrated / "reconstruct.safetensors")
        changed = [k for k, v in _weight_scales(cal, heads).items() if not torch.equal(rec[k], v)]
        assert bool(changed) == learned and (not learned or len(changed) == len(_weight_scales(cal, heads)))
        assert all(torch.equal(rec[k], v) for k, v in _weight_scales(cal, body).items())
    model, _, _ = load_stage(calibrated)
    for m in list(model.rpn_head.modules()) + list(model.roi_head.modules()):
        if isinstance(m, (QuantLinear, QuantConv2d)):  # on the grid of the learned scale
            codes = m.weight / m.w_quant.scale + m.w_quant.zero_point
            assert torch.allclose(codes, codes.round(), atol=1e-3)
            assert torch.equal(m.w_quant(m.weight), m.weight)


def test_straight_through_rounding_trains_on_the_weights_it_keeps(calibrated):
    """#18: rounding = "ste" is asked for by name (a typo is refused) and learns other roundings than
    AdaRound's soft training does, every weight still on its calibrated grid."""
    with pytest.raises(AphqError, match="rounding must be one of adaround, ste, got 'nearest'"):
        ReconstructConfig(rounding="nearest")
    weights = {}
    for rounding in ("adaround", "ste"):
        reconstruct(run=calibrated, loss="mse", force=True,
                    settings={"iters": 20, "images": 1, "w_lr": 0.05, "rounding": rounding})
        rec, _ = load_artifact(calibrated / "reconstruct.safetensors")
        weights[rounding] = {k: v for k, v in rec.items() if k.startswith("param:backbone.") and k.endswith("weight")}
    assert weights["adaround"].keys() == weights["ste"].keys()
    assert any(not torch.equal(v, weights["ste"][k]) for k, v in weights["adaround"].items())
    model, _, _ = load_stage(calibrated)
    for m in model.backbone.modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            assert torch.equal(m.w_quant(m.weight), m.weight)


def _plain_graph(monkeypatch):
    """The loop as it was before its speed work: every quantizer and QDrop choice as a plain autograd graph.

    (The fused quantizers, the float QDrop masks and the fixed floor(W / s)
    replaced these; the frozen weights and the read-ahead change no number.)
    """
    import aphq_cli.quant.adaround as adaround
    import aphq_cli.quant.modules as modules
    import stages.reconstruct as recon
    from aphq_cli.quant.primitives import round_ste

    def fake_quantize(x, s, z, bits):
        return (torch.clamp(round_ste(x / s) + z, 0, 2 ** bits - 1) - z) * s

    def soft_forward(self, weight):
        q = self.quantizer
        return adaround.soft_quantize_weight(weight, q.scale, q.zero_point, q.bits, self.alpha)

    for module in (modules, adaround):
        monkeypatch.setattr(module, "below", lambda r, p: (r < p).float())
        monkeypatch.setattr(module, "select", lambda keep, q, x: torch.where(keep.bool(), q, x))
    monkeypatch.setattr(modules, "fake_quantize", fake_quantize)
    monkeypatch.setattr(recon.SoftRounding, "forward", soft_forward)


def test_the_fast_loop_reconstructs_the_same_tensors_as_the_plain_graph(monkeypatch):
    """A shifted-window block (masks, per-head matmul quantizers, QDrop, the rounding regularizer after
    warm-up), APH-weighted: every learned tensor equal to the bit after 20 iterations."""
    import copy

    from stages.reconstruct import reconstruct_unit

    unit, xs, targets, aph = _small_block()

    class Caches:
        count = 2

        def fp_in(self, k, i):
            return xs[i]

        def q_in(self, k, i):
            return xs[i] * 1.05

        def target(self, k, i):
            return targets[i]

    config = ReconstructConfig(iters=20, warmup=0.2)
    fast, plain = copy.deepcopy(unit), copy.deepcopy(unit)
    reconstruct_unit(fast, Caches(), 1, lambda i: aph[i], config, seed=3)
    with monkeypatch.context() as m:
        _plain_graph(m)
        reconstruct_unit(plain, Caches(), 1, lambda i: aph[i], config, seed=3)
    before = unit.state_dict()
    learned = [k for k, v in plain.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in learned) and any(k.endswith("scale") for k in learned)
    for key, value in plain.state_dict().items():
        assert torch.equal(fast.state_dict()[key], value), key


def test_cache_dtype_is_checked():
    from stages.reconstruct import CACHE_DTYPES

    assert ReconstructConfig().cache_dtype == "float32" and set(CACHE_DTYPES) == {"float32", "float16"}
    with pytest.raises(AphqError, match="cache_dtype must be one of float32, float16, got 'int8'"):
        ReconstructConfig(cache_dtype="int8")
