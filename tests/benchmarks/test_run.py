"""benchmarks/run.py: what its plot compares, and the hand-written reading it carries over."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _row(ap: float) -> dict:
    return {"bbox_AP": ap, "segm_AP": ap, "bbox_AP_spread": 0.0, "segm_AP_spread": 0.0, "n": 1}


def test_panels_group_each_method_with_its_variants_and_leave_out_breakdowns():
    bench = _bench()
    labels = ["FP", "W4A4 aph [heads]", "W4A4 calib", "W4A4 aph", "W4A4 mse [before]", "W4A4 calib [before]",
              "W4A4 aph, float heads", "W4A4 export reloaded", "W3A3 aph", "W4A4 mse"]
    summary = {"m": {label: _row(50.0) for label in labels}}
    panels = dict(bench.loss_panels(summary))
    assert list(panels) == ["m W4A4", "m W3A3"]
    assert [name for name, _ in panels["m W4A4"]] == [
        "calib", "calib [before]", "mse", "mse [before]", "aph", "aph [heads]"]
    assert [name for name, _ in panels["m W3A3"]] == ["aph"]


def test_the_reading_section_is_carried_over(tmp_path):
    bench = _bench()
    out = tmp_path / "results.md"
    assert bench.kept_reading(out) == ""
    out.write_text("# Results\n\n| a | b |\n\n## Reading\n\nWhat the numbers say.\n")
    assert bench.kept_reading(out) == "## Reading\n\nWhat the numbers say.\n"


def test_calib_set_becomes_a_quant_config_the_calibrate_stage_reads(tmp_path):
    from aphq_cli.quantconfig import stage_settings

    bench = _bench()
    assert bench.calib_config(tmp_path / "none", {}) == []
    flag, path = bench.calib_config(tmp_path / "m", {"calib_images": "16", "pct": "0.99"})
    assert flag == "--quant-config"
    assert stage_settings(path, "calibrate")[1] == {"calib_images": 16, "pct": 0.99}
    assert stage_settings(path, "reconstruct")[1] == {}
