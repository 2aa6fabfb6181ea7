"""aphq calibrate: config checks, caching, and save -> load -> identical predictions."""

import numpy as np
import pytest
from typer.testing import CliRunner

from aphq_cli.cli import app
from aphq_cli.errors import AphqError
from aphq_cli.runs import ModelSource, load_stage
from aphq_cli.settings import settings_from_dict
from stages.calibrate import CalibrateConfig, build_calibrated, calibrate, resolve_config
from stages.eval import run_inference

FAST = {"eq_n": 32, "matmul_eq_n": 8, "search_round": 1, "max_windows": 16}


@pytest.mark.parametrize("bits", [1, 9, 0, 2.5])
def test_bits_out_of_range(bits):
    with pytest.raises(AphqError, match="must be an integer from 2 to 8"):
        CalibrateConfig(w_bits=bits)


def test_unknown_setting_is_an_error():
    with pytest.raises(AphqError, match="unknown calibrate setting"):
        settings_from_dict(CalibrateConfig, {"w_bit": 4}, "calibrate")


def test_testbed_defaults_come_from_the_config(synth_dir, random_tiny_checkpoint):
    source = ModelSource.open("tiny-mask-rcnn", random_tiny_checkpoint, synth_dir)
    config = resolve_config(source.cfg, {"w_bits": 6, "calib_images": None})
    assert config.calib_images == 4 and config.matmul_eq_n == 32 and config.w_bits == 6
    full = ModelSource.open("mask-rcnn-swin-t", random_tiny_checkpoint, synth_dir)
    assert resolve_config(full.cfg, {}).calib_images == 1  # the paper's calib_size


def _predictions(detector, source, n=2):
    return run_inference(detector, source.dataset("test", limit=n), device="cpu")


def _same(a, b):
    for (bb_a, sg_a), (bb_b, sg_b) in zip(a, b):
        assert all(np.array_equal(x, y) for x, y in zip(bb_a, bb_b))
        assert sg_a == sg_b


def test_save_load_gives_identical_predictions_and_cache_hits(synth_dir, random_tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    kwargs = dict(model="tiny-mask-rcnn", run=run, w_bits=4, a_bits=4, calib_images=1,
                  checkpoint=random_tiny_checkpoint, data=synth_dir, settings=FAST)
    path, hit = calibrate(**kwargs)
    assert not hit and path == run / "calibrate.safetensors"
    source = ModelSource.open("tiny-mask-rcnn", random_tiny_checkpoint, synth_dir)
    config = resolve_config(source.cfg, dict(FAST, w_bits=4, a_bits=4, calib_images=1))
    in_memory, _ = build_calibrated(source, config, source.dataset("calib", limit=1), "cpu")
    loaded, _, header = load_stage(run)
    assert header.config["calibrate"]["w_bits"] == 4
    _same(_predictions(in_memory, source), _predictions(loaded, source))
    # The quantized model differs from the float one.
    fp = source.build("cpu")
    assert not all(np.array_equal(a[0][0], b[0][0]) for a, b in
                   zip(_predictions(fp, source), _predictions(loaded, source)))
    mtime = path.stat().st_mtime_ns
    assert calibrate(**kwargs) == (path, True) and path.stat().st_mtime_ns == mtime
    assert calibrate(**kwargs, force=True) == (path, False)


def test_cli_rejects_bits_before_touching_the_run(tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["calibrate", "--run", str(run), "--w-bits", "9"])
    assert result.exit_code == 2
    assert "--w-bits must be an integer from 2 to 8, got 9" in result.output
    assert not run.exists()


def test_eval_of_empty_run_is_one_sentence(tmp_path):
    (tmp_path / "run").mkdir()
    result = CliRunner().invoke(app, ["eval", "--run", str(tmp_path / "run")])
    assert result.exit_code == 2 and "holds no stage artifact yet" in result.output


def test_image_list(tmp_path, synth_dir):
    from stages.calibrate import read_image_list

    good = tmp_path / "ids.txt"
    good.write_text("# calibration images\n3\n\n1  # the first\n")
    assert read_image_list(good) == [3, 1]
    bad = tmp_path / "bad.txt"
    bad.write_text("3\nthree\n")
    with pytest.raises(AphqError, match="line 2 is not an image id: 'three'"):
        read_image_list(bad)
    source = ModelSource.open("tiny-mask-rcnn", good, synth_dir)  # any file serves as checkpoint here
    assert source.dataset("calib", image_ids=[3, 1]).img_ids == [3, 1]
    with pytest.raises(AphqError, match=r"image id\(s\) \[999\] are not in"):
        source.dataset("calib", image_ids=[999])


@pytest.mark.slow
def test_w8a8_stays_within_one_point_of_float(tmp_path, bundled_fp40):
    """At 8 bits the bundled testbed model keeps its box AP within 1 point (first 40 val images)."""
    from stages.eval import evaluate

    calibrate(model="tiny-mask-rcnn", run=tmp_path / "w8a8", w_bits=8, a_bits=8)
    q = evaluate(run=tmp_path / "w8a8", limit=40)
    assert abs(q.metrics["bbox_AP"] - bundled_fp40["bbox_AP"]) <= 1.0
    assert q.metrics["bbox_AP"] > 0


def test_unwritable_run_folder_fails_before_calibrating(tmp_path, synth_dir, random_tiny_checkpoint):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(AphqError, match="cannot create folder"):
        calibrate(model="tiny-mask-rcnn", run=blocker / "run", checkpoint=random_tiny_checkpoint, data=synth_dir)


def test_quant_config_is_resolved_and_recorded(synth_dir, random_tiny_checkpoint, tmp_path):
    qc = tmp_path / "q.yaml"
    qc.write_text("w_bits: 3\na_bits: 3\ncalibrate:\n  eq_n: 16\n  matmul_eq_n: 8\n  search_round: 1\n"
                  "  max_windows: 8\n")
    run = tmp_path / "run"
    # --a-bits on the command line overrides the file's a_bits; the rest comes from the file.
    path, _ = calibrate(model="tiny-mask-rcnn", run=run, a_bits=5, calib_images=1, checkpoint=random_tiny_checkpoint,
                        data=synth_dir, quant_config=qc)
    _, _, header = load_stage(run)
    resolved = header.config["calibrate"]
    assert (resolved["w_bits"], resolved["a_bits"], resolved["eq_n"], resolved["search_round"]) == (3, 5, 16, 1)
    assert header.config["quant_config"] == str(qc.resolve())


def test_the_published_image_protocol_by_name(synth_dir, random_tiny_checkpoint, tmp_path, monkeypatch):
    """--calib-split val: the first annotated images of the evaluation split, said in header, status and eval."""
    import json

    from aphq_cli.artifacts import read_header
    from aphq_cli.inspect import run_status

    monkeypatch.setenv("APHQ_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["calibrate", "--run", str(run), "--checkpoint", str(random_tiny_checkpoint),
                                      "--data", str(synth_dir), "--calib-images", "2", "--calib-split", "val",
                                      "--quant-config", str(_fast_config(tmp_path))])
    assert result.exit_code == 0, result.output
    header = read_header(run / "calibrate.safetensors").config
    val = ModelSource.open("tiny-mask-rcnn", random_tiny_checkpoint, synth_dir).dataset("test")
    annotated = [i for i in val.img_ids if val.coco.get_ann_ids(img_ids=[i])]
    assert header["image_ids"] == annotated[:2] and header["calib_split"] == "val"
    assert header["calibrate"]["calib_split"] == "val"
    assert "published val-split images" in run_status(run)[1].detail
    out = tmp_path / "e.json"
    result = CliRunner().invoke(app, ["eval", "--run", str(run), "--limit", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["calib_split"] == "val"
    bad = CliRunner().invoke(app, ["calibrate", "--run", str(tmp_path / "r2"), "--calib-split", "test"])
    assert bad.exit_code != 0 and "--calib-split must be one of train, val" in bad.output


def _fast_config(folder):
    path = folder / "fast.toml"
    path.write_text("[calibrate]\n" + "".join(f"{k} = {v}\n" for k, v in FAST.items()))
    return path


def _rewrite(path, config):
    """The same artifact with another header config (what an older aphq, or a hand edit, would leave)."""
    from aphq_cli.artifacts import load_artifact, save_artifact
    tensors, header = load_artifact(path)
    save_artifact(path, tensors, stage=header.stage, config=config, inputs=header.inputs, extra=header.extra)


def test_reload_builds_every_quantizer_from_the_saved_map(synth_dir, random_tiny_checkpoint, tmp_path):
    from aphq_cli.quant.modules import quantizers
    from aphq_cli.quant.wrap import quant_layers

    run = tmp_path / "run"
    path, _ = calibrate(model="tiny-mask-rcnn", run=run, w_bits=4, a_bits=4, calib_images=1,
                        checkpoint=random_tiny_checkpoint, data=synth_dir, settings=FAST)
    source = ModelSource.open("tiny-mask-rcnn", random_tiny_checkpoint, synth_dir)
    loaded, _, header = load_stage(run)
    qmap = header.config["quantization_map"]
    assert set(qmap) == set(quant_layers(loaded))  # every quantized layer
    assert qmap["backbone.patch_embed.proj"] == {"kind": "conv", "w_bits": 4, "a_bits": 8}  # the image: 8 bits
    assert {q.bits for n, q in quantizers(loaded).items() if "patch_embed" not in n} == {4}

    # The map, not w_bits/a_bits, decides: a layer the map gives 6 bits is rebuilt with 6.
    edited = dict(header.config, quantization_map=dict(qmap, **{"neck.fpn_convs.0.conv": {
        "kind": "conv", "w_bits": 6, "a_bits": 6}}))
    _rewrite(path, edited)
    rebuilt, _, _ = load_stage(run)
    assert rebuilt.neck.fpn_convs[0].conv.w_quant.bits == rebuilt.neck.fpn_convs[0].conv.a_quant.bits == 6

    # An artifact written before the map was recorded loads as it always did.
    _rewrite(path, {k: v for k, v in header.config.items() if k != "quantization_map"})
    legacy, _, _ = load_stage(run)
    _same(_predictions(loaded, source), _predictions(legacy, source))

    # A map that names another model's layers is one sentence.
    _rewrite(path, dict(header.config, quantization_map={"head.fc": {"kind": "linear", "w_bits": 4, "a_bits": 4}}))
    with pytest.raises(AphqError, match="cannot be rebuilt: its quantization map does not fit the model"):
        load_stage(run)
