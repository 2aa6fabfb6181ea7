"""Fixtures the stage tests share."""

import pytest

from stages.calibrate import calibrate

# A quick scale search: the stage tests check mechanics, not the search's quality.
FAST_CALIB = {"eq_n": 16, "matmul_eq_n": 4, "search_round": 1, "max_windows": 8}


@pytest.fixture
def calibrated(tmp_path, synth_dir, random_tiny_checkpoint, monkeypatch):
    """A calibrated tiny-mask-rcnn run (random weights) with its own APH cache."""
    monkeypatch.setenv("APHQ_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    calibrate(model="tiny-mask-rcnn", run=run, checkpoint=random_tiny_checkpoint, data=synth_dir, calib_images=1,
              settings=FAST_CALIB)
    return run
