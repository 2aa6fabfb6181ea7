"""The stage skeleton: settings resolved once in layer order, checked before anything opens, one cache key."""

from dataclasses import dataclass

import pytest
import torch

from aphq_cli.errors import AphqError
from aphq_cli.stage import StageResult, StageSpec, open_stage

MADE = []


@dataclass(frozen=True)
class ToySettings:
    iters: int = 10
    lr: float = 0.1
    calib_split: str = "train"

    def __post_init__(self):
        MADE.append(self)
        if self.iters < 1:
            raise AphqError(f"iters must be at least 1, got {self.iters}")


SPEC = StageSpec("toy", ToySettings)


class ToySource:
    """What open_stage asks of a model source, without a model."""

    class spec:
        name = "toy-model"

    def __init__(self, defaults):
        self.cfg = {"aphq_defaults": {"toy": defaults}}
        self.checked = []

    def calibration_dataset(self, split, limit=None):
        return [split] * limit

    def fingerprints(self, dataset):
        return {"checkpoint": "c" * 64, "data": str(len(dataset))}

    def check_run(self, run):
        self.checked.append(run)

    def header(self, dataset, split):
        return {"images": len(dataset), "calib_split": split}


def _open(tmp_path, quant_config=None, overrides=None, defaults=None, opened=None):
    source = ToySource(defaults or {})

    def open_source():
        (opened if opened is not None else []).append(True)
        return source
    return open_stage(SPEC, run=tmp_path / "run", source=open_source, overrides=overrides or {},
                      quant_config=quant_config, images=lambda s, c: s.calibration_dataset(c.calib_split, c.iters),
                      upstream=lambda: {"calibrate": "u" * 64})


def test_settings_resolve_the_command_line_over_the_model_defaults(tmp_path):
    # (The --quant-config layer between them: tests/test_quantconfig.py.)
    MADE.clear()
    stage = _open(tmp_path, overrides={"iters": 4}, defaults={"iters": 2, "lr": 0.5})
    made = list(MADE)  # before the expected value below adds its own instance
    # The values given are checked first (before the model's defaults are known); then the one object.
    assert made == [ToySettings(iters=4), ToySettings(iters=4, lr=0.5)] and made[-1] is stage.config
    assert stage.source.checked == [tmp_path / "run"] and stage.out == tmp_path / "run" / "toy.safetensors"


@pytest.mark.parametrize("value, message", [("many", "toy setting iters must be an integer, got 'many'"),
                                            (0, "iters must be at least 1, got 0")])
def test_a_value_of_the_wrong_type_or_range_is_refused_before_the_source_opens(tmp_path, value, message):
    opened = []
    with pytest.raises(AphqError, match=message):
        _open(tmp_path, overrides={"iters": value}, opened=opened)
    assert opened == [] and not (tmp_path / "run").exists()


def test_the_cache_key_covers_settings_images_and_upstream_and_save_makes_it_current(tmp_path):
    stage = _open(tmp_path, overrides={"iters": 2})
    assert set(stage.inputs) == {"checkpoint", "data", "options", "calibrate"}
    assert not stage.current
    result = stage.save({"x": torch.ones(2)}, stage.header())
    assert result == StageResult(stage.out, False) and stage.current
    assert stage.reused() == (stage.out, True)
    other = _open(tmp_path, overrides={"iters": 3})
    assert other.inputs["options"] != stage.inputs["options"] and not other.current
