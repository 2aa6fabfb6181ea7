"""Stage settings: the layering of named arguments over a settings dict, and the type of every value."""

import pytest

from aphq_cli.errors import AphqError
from aphq_cli.settings import check_values, with_arguments
from stages.reconstruct import ReconstructConfig


def test_an_argument_left_at_none_keeps_the_dict_value():
    assert with_arguments({"iters": 4, "images": 2}, iters=None, images=None, loss=None) == {"iters": 4, "images": 2}


def test_a_given_argument_wins_and_the_dict_is_not_changed():
    settings = {"iters": 4, "seed": 1}
    assert with_arguments(settings, iters=9, loss="mse") == {"iters": 9, "seed": 1, "loss": "mse"}
    assert settings == {"iters": 4, "seed": 1}
    assert with_arguments(None, iters=None) == {}


def test_values_are_checked_against_the_field_types():
    assert check_values(ReconstructConfig, {"w_lr": 1, "iters": 3, "loss": "mse"}, "reconstruct") == {
        "w_lr": 1.0, "iters": 3, "loss": "mse"}
    for values, message in [({"iters": 2.5}, "iters must be an integer, got 2.5"),
                            ({"iters": True}, "iters must be an integer, got True"),
                            ({"w_lr": "fast"}, "w_lr must be a number, got 'fast'"),
                            ({"w_lr": float("nan")}, "w_lr must be a number, got nan"),
                            ({"qdrop_scope": 1}, "qdrop_scope must be a string, got 1"),
                            ({"nonsense": 1}, "unknown reconstruct setting(s): nonsense")]:
        with pytest.raises(AphqError) as err:
            check_values(ReconstructConfig, values, "reconstruct")
        assert message in str(err.value)


def test_a_setting_added_later_is_left_out_of_the_record_at_its_default():
    """Runs made before head_w_group existed keep their settings and cache key; a set value is recorded."""
    from dataclasses import asdict

    from aphq_cli.settings import settings_record
    from stages.calibrate import CalibrateConfig

    default = settings_record(CalibrateConfig())
    assert "head_w_group" not in default
    assert default == {k: v for k, v in asdict(CalibrateConfig()).items() if k != "head_w_group"}
    assert settings_record(CalibrateConfig(head_w_group=32))["head_w_group"] == 32
