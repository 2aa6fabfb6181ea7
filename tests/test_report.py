"""aphq report: what it collects from a run folder, and the PNG it writes."""

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from aphq_cli.artifacts import save_artifact, sha256_file
from aphq_cli.cli import app
from aphq_cli.errors import AphqError
from aphq_cli.report import collect, write_report
from aphq_cli.evalrecords import EvalResult, eval_record_path, write_eval_record


def _metrics(box, mask):
    return {"bbox_AP": box, "segm_AP": mask}


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    blocks = run / "reconstruct" / "blocks"
    for k, name in enumerate(["backbone.patch_embed", "backbone.stages.0.blocks.0", "neck"]):
        save_artifact(blocks / f"{k:02d}_{name}.safetensors", {"w": torch.zeros(1)}, stage="reconstruct-unit",
                      config={"unit": name, "losses": [2.0, 1.0 / (k + 1)]}, inputs={})
    (run / "calibrate.safetensors").write_bytes(b"calibrated")
    (run / "reconstruct.safetensors").write_bytes(b"reconstructed")
    result = EvalResult(_metrics(10.0, 9.0), "m [calibrate]", "ckpt", "data", 5, 1.0)
    write_eval_record(eval_record_path(run, "calibrate"), result,
                      {"weights": sha256_file(run / "calibrate.safetensors"), "annotations": "a", "images": 5})
    stale = EvalResult(_metrics(12.0, 11.0), "m [reconstruct]", "ckpt", "data", 5, 1.0)
    write_eval_record(eval_record_path(run, "reconstruct"), stale, {"weights": "an older artifact", "images": 5})
    return run


def test_collect_reads_losses_and_only_current_evaluations(run):
    report = collect(run)
    assert [n for n, _ in report.losses["reconstruct"]] == ["backbone.patch_embed", "backbone.stages.0.blocks.0",
                                                            "neck"]
    assert report.losses["reconstruct"][2][1] == [2.0, pytest.approx(1 / 3)]
    assert report.ap == {"calibrate": (10.0, 9.0)}
    assert report.stale == ["reconstruct"]


def test_writes_a_png_atomically_and_cli_prints_it(run, tmp_path):
    out, _ = write_report(run)
    assert out == run / "report.png"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 800
    result = CliRunner().invoke(app, ["report", "--run", str(run), "--out", str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "r.png") in result.output and "stale" in result.output
    assert not list(run.glob("*.tmp*")) and not list(tmp_path.glob(".*tmp*"))


def test_empty_or_missing_run_is_one_sentence(tmp_path):
    with pytest.raises(AphqError, match="does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AphqError, match="no finished blocks and no evaluations"):
        write_report(tmp_path / "empty")
    assert not (tmp_path / "empty" / "report.png").exists()
