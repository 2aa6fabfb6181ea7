"""The disk a stage predicts before it starts is the disk its caches take; a stage that would not fit stops first.

The full-size test builds mask-rcnn-swin-t with seeded random weights and
runs it at 224x320 through a config file that inherits the built-in one and
only shrinks the test pipeline's scale (the built-in one resizes every image
to 1333x800, minutes a unit on two cores): the architecture, unit list and
cache layout are the paper's.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from aphq_cli.cli import app
from aphq_cli.diskplan import folder_bytes
from aphq_cli.errors import AphqError
from aphq_cli.tensorcache import SharedUse, TensorCache
from stages.mlp_recon import mlp_recon
from stages.reconstruct import reconstruct
from tests.stages.conftest import FAST_CALIB


def peak_meter(folder, *others):
    """A progress callback that records the most bytes ``folder`` held at any report (``both``: with ``others``)."""
    seen = {"peak": 0, "both": 0}

    def report(description, done, total, loss=None):
        held = folder_bytes(folder)
        seen["peak"] = max(seen["peak"], held)
        seen["both"] = max(seen["both"], held + sum(folder_bytes(o) for o in others))
    return report, seen


def check_reconstruct_plan(run, cache_root, seen, images):
    plan = json.loads((run / "reconstruct" / "disk_plan.json").read_text())
    assert plan["images"] == images
    assert plan["unit_cache"]["peak_bytes"] == seen["peak"] > 0
    assert not (run / "reconstruct" / "cache").exists()  # dropped at the end, as before
    aph = plan["aph_cache"]
    assert aph["peak_bytes"] == folder_bytes(aph["folder"]) > 0
    assert str(cache_root) in aph["folder"]
    return plan


def test_reconstruct_writes_what_it_predicted_and_removes_the_aph_cache_unless_kept(calibrated, tmp_path):
    report, seen = peak_meter(calibrated / "reconstruct" / "cache")
    reconstruct(run=calibrated, loss="aph", settings={"iters": 1, "images": 2}, progress=report, keep_aph_cache=True)
    plan = check_reconstruct_plan(calibrated, tmp_path / "cache", seen, 2)
    # Without --keep-aph-cache the finished run (a cache hit) removes this run's APH entry and nothing else,
    # but not while another process uses it (a shared lock beside it, as another run's stage holds).
    mine = tmp_path / "cache" / "aph" / plan["aph_cache"]["folder"].rsplit("/", 1)[1]
    other = tmp_path / "cache" / "aph" / "other"
    other.mkdir()
    argv = ["reconstruct", "--run", str(calibrated), "--iters", "1", "--images", "2"]
    with SharedUse(TensorCache(mine)):
        result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "is current" in result.output and "another run is using it" in result.output and mine.is_dir()
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "is current" in result.output and "removed APH cache" in result.output
    assert not mine.exists() and other.is_dir()


def test_each_units_aph_maps_go_once_it_is_done(calibrated, tmp_path):
    """The two caches together hold what the joint plan says, less than the sum of their peaks
    (with the APH maps in float32 here, twice the bytes of the default's)."""
    with pytest.raises(AphqError, match="aph_dtype must be one of float32, float16, got 'bfloat16'"):
        reconstruct(run=calibrated, settings={"aph_dtype": "bfloat16"})
    aph_root = tmp_path / "cache" / "aph"
    report, seen = peak_meter(calibrated / "reconstruct" / "cache", aph_root)
    reconstruct(run=calibrated, loss="aph", settings={"iters": 1, "images": 2, "aph_dtype": "float32"},
                progress=report)
    plan = json.loads((calibrated / "reconstruct" / "disk_plan.json").read_text())
    assert plan["both"]["peak_bytes"] == seen["both"] > 0
    assert plan["both"]["peak_bytes"] < plan["unit_cache"]["peak_bytes"] + plan["aph_cache"]["peak_bytes"]
    assert plan["unit_cache"]["peak_bytes"] == seen["peak"]
    assert folder_bytes(aph_root) == 0


def test_with_heads_each_entry_is_what_was_planned_and_the_heads_at_most_that(calibrated):
    """#18/#19: the head units' entries are planned too. Every backbone and neck entry is exact; the
    records and the heads' targets hold as many RoIs as an image turns out to have, so they are planned
    at the most the test configs allow, and the peak is at most the planned one."""
    folder = calibrated / "reconstruct" / "cache"
    report, seen = peak_meter(folder)
    largest: dict[str, int] = {}

    def measure(description, done, total, loss=None):
        report(description, done, total, loss)
        for entry in (p for p in folder.rglob("*") if p.is_dir() and any(f.is_file() for f in p.iterdir())):
            name = str(entry.relative_to(folder))
            largest[name] = max(largest.get(name, 0), folder_bytes(entry))

    reconstruct(run=calibrated, loss="aph", settings={"iters": 1, "images": 2, "heads": True}, progress=measure)
    unit = json.loads((calibrated / "reconstruct" / "disk_plan.json").read_text())["unit_cache"]
    planned, heads = unit["entry_bytes"], [f"y/{k}" for k in range(13, 16)]  # 13 units, then rpn, box, mask
    # The FPN's outputs are made from the neck's inputs as they are read: never on disk.
    assert set(heads) | {"rec", "fp/12", "q/12"} <= set(planned) and not {"y/12", "y/16"} & set(planned)
    # (Random weights may detect nothing: a mask head then has no step, and no report sees its target.)
    assert largest.keys() <= planned.keys() and {"rec", "y/13", "y/14"} <= largest.keys()
    for name, size in largest.items():
        if name == "rec" or name in heads:
            assert 0 < size <= planned[name], name
        else:
            assert size == planned[name], name
    slack = sum(planned[name] - largest.get(name, 0) for name in ["rec", *heads])
    assert unit["peak_bytes"] - slack <= seen["peak"] <= unit["peak_bytes"]

def test_a_stage_that_would_not_fit_stops_before_writing(calibrated, tmp_path):
    before = sorted(p.relative_to(calibrated) for p in calibrated.rglob("*"))
    with pytest.raises(AphqError, match=r"^reconstruct would write .* GiB to the reconstruct unit cache .* and the "
                                        r"APH cache .* but only 0.00 GiB is free there"):
        reconstruct(run=calibrated, loss="aph", settings={"iters": 1, "images": 2}, free_space=lambda p: 0)
    assert sorted(p.relative_to(calibrated) for p in calibrated.rglob("*")) == before
    assert not (tmp_path / "cache" / "aph").exists()


def test_mlp_recon_writes_what_it_predicted_and_holds_one_block_at_a_time(tmp_path, synth_dir,
                                                                            random_tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("APHQ_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    kwargs = dict(model="tiny-mask-rcnn", run=run, checkpoint=random_tiny_checkpoint, data=synth_dir,
                  settings={"iters": 1, "images": 2})
    report, seen = peak_meter(run / "mlp_recon" / "cache")
    mlp_recon(**kwargs, progress=report)
    plan = json.loads((run / "mlp_recon" / "disk_plan.json").read_text())
    entries = plan["mlp_cache"]["entry_bytes"]
    # Each block's entry is made before it trains and removed after: the peak is the largest block's.
    assert plan["mlp_cache"]["peak_bytes"] == seen["peak"] == max(entries.values()) < sum(entries.values())
    assert plan["aph_cache"]["peak_bytes"] == folder_bytes(plan["aph_cache"]["folder"]) > 0
    assert not (run / "mlp_recon" / "cache").exists()
    tensors = load_file(run / "mlp_recon.safetensors")
    # --keep-cache keeps every block's entry, as planned, and learns the same tensors.
    (run / "mlp_recon.safetensors").unlink()
    mlp_recon(**kwargs, keep_cache=True, force=True)
    plan = json.loads((run / "mlp_recon" / "disk_plan.json").read_text())
    assert plan["mlp_cache"]["peak_bytes"] == folder_bytes(run / "mlp_recon" / "cache") == sum(entries.values())
    again = load_file(run / "mlp_recon.safetensors")
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    artifact = (run / "mlp_recon.safetensors").read_bytes()
    # Run again without it: the artifact is current (reused as it is) and the cache goes.
    mlp_recon(**kwargs)
    assert not (run / "mlp_recon" / "cache").exists()
    assert (run / "mlp_recon.safetensors").read_bytes() == artifact


def _scale_bench():
    """benchmarks/scale.py, whose helpers make the data, config and checkpoint a user would pass."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def swin_t_at_320x224(tmp_path_factory):
    """mask-rcnn-swin-t with seeded random weights, a config scaled to 320x224, and COCO-layout data of that size."""
    bench, root = _scale_bench(), tmp_path_factory.mktemp("swin-t")
    ckpt = bench.random_checkpoint("mask-rcnn-swin-t", root / "swin-t.pth")
    data = bench.coco_data(root / "coco", (320, 224), train=2, val=1)
    return ckpt, data, bench.scaled_config("mask-rcnn-swin-t", (320, 224), root / "swin-t-320x224.py")


@pytest.mark.slow
def test_full_size_swin_t_writes_what_it_predicted(swin_t_at_320x224, tmp_path, monkeypatch):
    ckpt, data, cfg = swin_t_at_320x224
    monkeypatch.setenv("APHQ_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    settings = tmp_path / "fast.toml"
    settings.write_text("[calibrate]\n" + "".join(f"{k} = {v}\n" for k, v in FAST_CALIB.items()))
    result = CliRunner().invoke(app, ["calibrate", "--model", str(cfg), "--checkpoint", str(ckpt), "--data",
                                      str(data), "--run", str(run), "--quant-config", str(settings)])
    assert result.exit_code == 0, result.output
    report, seen = peak_meter(run / "reconstruct" / "cache")
    # One image: the layout is the paper's either way, and each image costs a float and APH pass per unit.
    reconstruct(run=run, loss="aph", settings={"iters": 1, "images": 1}, trust_config=True, progress=report,
                keep_aph_cache=True)
    plan = check_reconstruct_plan(run, tmp_path / "cache", seen, 1)
    # 12 Swin blocks, 3 patch mergings and the patch embedding carry APH; the neck does not.
    assert len(plan["aph_cache"]["entry_bytes"]) == 16
