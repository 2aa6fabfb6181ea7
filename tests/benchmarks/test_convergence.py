"""benchmarks/convergence.py: its observers record every iteration of every unit and change nothing."""

import importlib.util
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import stages.reconstruct as stage
from tests.stages.conftest import calibrated  # noqa: F401 (the fixture)

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_convergence", ROOT / "benchmarks" / "convergence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_observing_records_each_iteration_and_reconstructs_the_same(calibrated, tmp_path):
    watched = tmp_path / "watched"
    shutil.copytree(calibrated, watched)
    forward, unit = stage.SoftRounding.forward, stage.reconstruct_unit
    seen = _bench().observe(watched, iters=3, seed=1, images=2)
    assert (stage.SoftRounding.forward, stage.reconstruct_unit) == (forward, unit)  # put back
    assert list(seen) == [str(k) for k in range(13)]  # every unit of tiny-mask-rcnn, in order
    for record in seen.values():
        assert len(record["loss"]) == len(record["flips"]) == 3 and record["weights"] > 0
        assert record["flips"][0] == 0 and all(0 <= f <= record["weights"] for f in record["flips"])
    # The same seed without observers: the same reconstructed tensors.
    (calibrated / "seed.toml").write_text("[reconstruct]\nseed = 1\n")
    stage.reconstruct(run=calibrated, quant_config=str(calibrated / "seed.toml"), iters=3, images=2)
    plain, observed = load_file(calibrated / "reconstruct.safetensors"), load_file(watched / "reconstruct.safetensors")
    assert plain.keys() == observed.keys() and all(torch.equal(plain[k], observed[k]) for k in plain)
