"""aphq export: reload gives the quantized model's exact predictions; damage is refused."""

import numpy as np
import pytest
from typer.testing import CliRunner

from aphq_cli.cli import app
from aphq_cli.errors import AphqError
from aphq_cli.runs import load_stage
from stages.calibrate import calibrate
from stages.eval import run_inference
from aphq_cli.exports import load_export
from stages.export import export


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synth_dir, random_tiny_checkpoint):
    root = tmp_path_factory.mktemp("export")
    calibrate(model="tiny-mask-rcnn", run=root / "run", checkpoint=random_tiny_checkpoint, data=synth_dir,
              calib_images=1, w_bits=4, a_bits=4,
              settings={"eq_n": 16, "matmul_eq_n": 4, "search_round": 1, "max_windows": 8})
    return root / "run", export(run=root / "run", out=root / "model.safetensors").path


def test_reload_gives_identical_predictions(exported):
    run, path = exported
    quantized, source, _ = load_stage(run)
    reloaded, cfg, header = load_export(path)
    assert header.config["w_bits"] == 4
    dataset = source.dataset("test", limit=2)
    for (a_box, a_seg), (b_box, b_seg) in zip(run_inference(quantized, dataset, device="cpu"),
                                              run_inference(reloaded, dataset, device="cpu")):
        assert all(np.array_equal(x, y) for x, y in zip(a_box, b_box))
        assert a_seg == b_seg


def test_export_is_smaller_than_the_float_checkpoint(exported, random_tiny_checkpoint):
    _, path = exported
    assert path.stat().st_size < 0.4 * random_tiny_checkpoint.stat().st_size


def test_truncated_or_tampered_export_is_refused(exported, tmp_path):
    _, path = exported
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 1000])
    with pytest.raises(AphqError, match="not a readable safetensors"):
        load_export(truncated)
    tampered = tmp_path / "tampered.safetensors"
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    tampered.write_bytes(bytes(flipped))
    with pytest.raises(AphqError, match="damaged"):
        load_export(tampered)


def test_eval_artifact_command(exported, synth_dir):
    _, path = exported
    result = CliRunner().invoke(app, ["eval", "--artifact", str(path), "--data", str(synth_dir), "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert "[export]" in result.output


def test_exporting_a_float_stage_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    result = CliRunner().invoke(app, ["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "holds no stage artifact yet" in result.output


def test_the_model_config_keeps_its_tuples_through_the_export_header():
    """The COCO test pipeline's img_scale=(1333, 800) must come back a tuple: as a list, MultiScaleFlipAug
    takes it for a list of scales and refuses it (found by benchmarks/scale.py; the testbed has no img_scale)."""
    import json

    from mmdet.datasets.pipelines import Compose

    from aphq_cli.exports import config_from_json, config_to_json
    from aphq_cli.models.zoo import load_config, resolve_model

    original = load_config(resolve_model("mask-rcnn-swin-t"))._cfg_dict.to_dict()
    back = config_from_json(json.loads(json.dumps(config_to_json(original))))
    assert back == original and back["data"]["test"]["pipeline"][1]["img_scale"] == (1333, 800)
    Compose(back["data"]["test"]["pipeline"])  # refused before: a list of two ints is no list of scales
    assert config_from_json({"a": [1, 2]}) == {"a": [1, 2]}  # an older export's lists stay lists


def test_grouped_head_weights_survive_calibrate_export_and_reload(tmp_path, synth_dir, random_tiny_checkpoint):
    """head_w_group: the run, its export and the export's reload give the same predictions; the groups are recorded."""
    run = tmp_path / "run"
    calibrate(model="tiny-mask-rcnn", run=run, checkpoint=random_tiny_checkpoint, data=synth_dir, calib_images=1,
              settings={"eq_n": 16, "matmul_eq_n": 4, "search_round": 1, "max_windows": 8, "head_w_group": 32})
    path = export(run=run, out=tmp_path / "model.safetensors").path
    quantized, source, _ = load_stage(run)
    reloaded, _, header = load_export(path)
    fc = "roi_head.bbox_head.shared_fcs.0"
    assert header.config["export_format"] == 2  # a format-1 reader would take the groups for channels
    assert header.config["quantization_map"][fc]["w_group"] == 32
    assert header.config["manifest"][f"w:{fc}"]["group"] == 32
    assert reloaded.get_submodule(fc).w_quant.scale.shape == (256, 3136 // 32, 1)
    assert "w_group" not in header.config["quantization_map"]["neck.fpn_convs.0.conv"]  # the neck: per channel
    dataset = source.dataset("test", limit=2)
    for (a_box, a_seg), (b_box, b_seg) in zip(run_inference(quantized, dataset, device="cpu"),
                                              run_inference(reloaded, dataset, device="cpu")):
        assert all(np.array_equal(x, y) for x, y in zip(a_box, b_box))
        assert a_seg == b_seg


def test_a_head_w_group_that_fits_no_head_layer_makes_no_run_folder(tmp_path, synth_dir, random_tiny_checkpoint):
    run = tmp_path / "run"
    with pytest.raises(AphqError, match="head_w_group 7 does not divide"):
        calibrate(model="tiny-mask-rcnn", run=run, checkpoint=random_tiny_checkpoint, data=synth_dir,
                  calib_images=1, settings={"head_w_group": 7})
    assert not run.exists()


def test_an_export_whose_weight_scales_do_not_fit_its_map_is_refused(exported, monkeypatch):
    """A grouped map over per-channel scales (a foreign writer's file): one sentence, not a reshape error."""
    import aphq_cli.exports as exports

    _, path = exported
    real = exports.load_artifact

    def grouped_map(*args, **kwargs):  # the file as such a writer would make it, digests and all
        tensors, header = real(*args, **kwargs)
        header.config["quantization_map"]["roi_head.bbox_head.fc_cls"]["w_group"] = 32
        return tensors, header

    monkeypatch.setattr(exports, "load_artifact", grouped_map)
    with pytest.raises(AphqError, match=r"is inconsistent: roi_head\.bbox_head\.fc_cls has 8 weight scales and 8 "
                                        r"zero points, its quantization map implies 64"):
        load_export(path)
