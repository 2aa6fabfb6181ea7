"""--quant-config: TOML/YAML parsing, the shipped preset, precedence, and errors."""

from dataclasses import asdict

import pytest
from typer.testing import CliRunner

from aphq_cli.cli import app
from aphq_cli.errors import AphqError
from aphq_cli.quantconfig import load_quant_config, presets, stage_settings
from stages.calibrate import CalibrateConfig
from stages.calibrate import resolve_config as calibrate_config
from stages.mlp_recon import MlpReconConfig
from stages.reconstruct import ReconstructConfig
from stages.reconstruct import resolve_config as reconstruct_config


def test_published_preset_matches_method_section_8():
    assert "4bit" in presets()
    label, sections = load_quant_config("4bit")
    assert label == "preset 4bit"
    # method.md §8, value by value.
    calib = CalibrateConfig(**sections["calibrate"])
    assert (calib.w_bits, calib.a_bits, calib.calib_images) == (4, 4, 1)
    assert (calib.eq_n, calib.search_round, calib.pct) == (128, 3, 0.999)
    recon = ReconstructConfig(**sections["reconstruct"])
    assert (recon.loss, recon.images, recon.drop_prob, recon.quant_ratio) == ("aph", 256, 0.5, 0.5)
    assert MlpReconConfig(**sections["mlp_recon"]).images == 256


def test_the_heads_preset_is_the_published_one_plus_reconstructed_heads():
    published, heads = load_quant_config("4bit")[1], load_quant_config("4bit-heads")[1]
    assert CalibrateConfig(**heads["calibrate"]) == CalibrateConfig(**published["calibrate"])
    assert ReconstructConfig(**heads["reconstruct"]) == ReconstructConfig(**published["reconstruct"], heads=True)
    assert heads["mlp_recon"] == published["mlp_recon"]
    assert CalibrateConfig(**published["calibrate"]).head_w_group == 0  # the published grid


def test_toml_and_yaml_give_the_same_settings(tmp_path):
    (tmp_path / "q.toml").write_text('w_bits = 3\n[reconstruct]\nloss = "mse"\niters = 7\n')
    (tmp_path / "q.yaml").write_text("w_bits: 3\nreconstruct:\n  loss: mse\n  iters: 7\n")
    toml = load_quant_config(tmp_path / "q.toml")[1]
    yaml = load_quant_config(tmp_path / "q.yaml")[1]
    assert toml == yaml == {"calibrate": {"w_bits": 3}, "mlp_recon": {}, "reconstruct": {"loss": "mse", "iters": 7}}


def test_original_option_names_are_translated(tmp_path):
    (tmp_path / "orig.yaml").write_text("w_bit: 6\na_bit: 5\ncalib_size: 2\noptim_size: 32\n"
                                        "optim_metric: hessian_perturb\noptim_mode: qdrop\n")
    sections = load_quant_config(tmp_path / "orig.yaml")[1]
    assert sections["calibrate"] == {"w_bits": 6, "a_bits": 5, "calib_images": 2}
    assert sections["mlp_recon"] == {"images": 32}
    assert sections["reconstruct"] == {"images": 32, "loss": "aph"}


def test_precedence_defaults_model_config_file_command_line(tmp_path):
    cfg = {"aphq_defaults": {"calibrate": {"calib_images": 4, "eq_n": 32}}}
    (tmp_path / "q.toml").write_text("[calibrate]\neq_n = 64\nsearch_round = 2\n")
    _, values = stage_settings(tmp_path / "q.toml", "calibrate")
    resolved = calibrate_config(cfg, {"search_round": 1, "w_bits": None}, values)
    # model config (calib_images), file over model config (eq_n), command line over file (search_round),
    # an option not given (w_bits=None) leaves the dataclass default.
    assert (resolved.calib_images, resolved.eq_n, resolved.search_round, resolved.w_bits) == (4, 64, 1, 4)
    assert asdict(reconstruct_config({}, {}, {"loss": "fisher"}))["loss"] == "fisher"


@pytest.mark.parametrize("name, text, message", [
    ("bad.toml", "w_bits = [", "cannot be parsed"),
    ("bad.yaml", "a: [1,\n", "cannot be parsed"),
    ("list.yaml", "- 1\n- 2\n", "table of settings"),
    ("unknown.toml", "bitz = 4\n", "unknown key 'bitz'"),
    ("section.toml", "calibrate = 3\n", "must be a table"),
    ("fixed.yaml", "optim_mode: brecq\n", "optim_mode = 'brecq' is not supported"),
    ("metric.yaml", "optim_metric: kl\n", "optim_metric 'kl'"),
    ("conf.json", "{}", "must end in .toml"),
])
def test_bad_files_are_one_sentence(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(AphqError, match=message):
        load_quant_config(tmp_path / name)


def test_missing_file_names_the_presets(tmp_path):
    with pytest.raises(AphqError, match="neither a file nor a preset.*4bit"):
        load_quant_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("command, message", [(["calibrate"], "--w-bits must be an integer from 2 to 8, got 11"),
                                              (["mlp-recon"], "--iters must be a positive integer, got 0"),
                                              (["reconstruct"], "--loss must be one of")])
def test_cli_refuses_bad_values_in_the_file_before_touching_the_run(tmp_path, command, message):
    (tmp_path / "q.toml").write_text("w_bits = 11\n[mlp_recon]\niters = 0\n[reconstruct]\nloss = 'l1'\n")
    run = tmp_path / "run"
    result = CliRunner().invoke(app, [*command, "--run", str(run), "--quant-config", str(tmp_path / "q.toml")])
    assert result.exit_code == 2
    assert "error:" in result.output and "\n" not in result.output.split("error:")[1].strip()
    assert message in " ".join(result.output.split())
    assert not run.exists()


def test_calib_split_at_the_top_level_sets_every_stage(tmp_path):
    (tmp_path / "q.toml").write_text('calib_split = "val"\n[reconstruct]\nqdrop_scope = "all"\n')
    sections = load_quant_config(tmp_path / "q.toml")[1]
    assert {s: v.get("calib_split") for s, v in sections.items()} == dict.fromkeys(sections, "val")
    assert ReconstructConfig(**sections["reconstruct"]).qdrop_scope == "all"
    (tmp_path / "bad.toml").write_text('[reconstruct]\nqdrop_scope = "matmul"\n')
    with pytest.raises(AphqError, match="qdrop_scope must be one of linear, all"):
        ReconstructConfig(**load_quant_config(tmp_path / "bad.toml")[1]["reconstruct"])


def test_the_quarter_preset_is_the_published_one_with_a_quarter_of_the_steps_four_times_as_large():
    published, quarter = load_quant_config("4bit")[1], load_quant_config("4bit-quarter")[1]
    assert published["calibrate"] == quarter["calibrate"] and published["mlp_recon"] == quarter["mlp_recon"]
    full, short = ReconstructConfig(**published["reconstruct"]), ReconstructConfig(**quarter["reconstruct"])
    assert short.iters * 4 == full.iters == 20000
    assert (short.w_lr, short.a_lr) == pytest.approx((4 * full.w_lr, 4 * full.a_lr))
    others = {k: v for k, v in asdict(full).items() if k not in ("iters", "w_lr", "a_lr")}
    assert others == {k: v for k, v in asdict(short).items() if k not in ("iters", "w_lr", "a_lr")}
