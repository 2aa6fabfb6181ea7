"""Bad input through the command line: one sentence, a non-zero exit, nothing already written damaged.

One test per case of the stage chain; the lower-level checks (artifact
tampering, torn writes, checkpoint layouts) live beside their modules.
"""

import errno
import os
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from aphq_cli import artifacts
from aphq_cli.artifacts import load_artifact, sha256_file
from aphq_cli.cli import app

FAST = ["--calib-images", "1"]
FAST_SETTINGS = {"eq_n": 16, "matmul_eq_n": 4, "search_round": 1, "max_windows": 8}


# A progress line: a bar, a bar not yet drawn (its count and times), or (stderr not a terminal) a
# timestamped plain line.
_PROGRESS = re.compile(r"━|\s\d+/\d+\s+\d+:\d\d:\d\d|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def _one_sentence(result, *fragments):
    assert result.exit_code != 0, result.output
    # Progress bars of work done before the failure may precede the error; nothing else may.
    lines = [line for line in result.output.splitlines() if line.strip() and not _PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, text


def _snapshot(folder):
    # The writer lock file holds the PID of the last writer, not data.
    return {p: sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".aphq.lock"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synth_dir, random_tiny_checkpoint):
    """A run calibrated at W4A4 from a private copy of the random testbed checkpoint."""
    from stages.calibrate import calibrate

    root = tmp_path_factory.mktemp("bad")
    ckpt = shutil.copy(random_tiny_checkpoint, root / "ckpt.safetensors")
    run = root / "run"
    calibrate(model="tiny-mask-rcnn", run=run, checkpoint=ckpt, data=synth_dir, calib_images=1,
              settings=FAST_SETTINGS)
    return root, run, ckpt, synth_dir


def _copy_run(setup, tmp_path):
    return shutil.copytree(setup[1], tmp_path / "run")


def test_missing_artifact(setup, tmp_path):
    _, run, _, _ = setup
    _one_sentence(CliRunner().invoke(app, ["eval", "--run", str(run), "--stage", "reconstruct"]),
                  "reconstruct.safetensors", "does not exist")
    _one_sentence(CliRunner().invoke(app, ["inspect", str(tmp_path / "none.safetensors")]), "does not exist")


def test_corrupt_artifact_is_refused_and_left_as_it_is(setup, tmp_path):
    run = _copy_run(setup, tmp_path)
    path = run / "calibrate.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    before = _snapshot(run)
    for command in (["eval", "--run", str(run)], ["reconstruct", "--run", str(run)],
                    ["export", "--run", str(run), "--out", str(tmp_path / "x.safetensors")]):
        _one_sentence(CliRunner().invoke(app, command), str(path), "damaged")
    assert _snapshot(run) == before and not (tmp_path / "x.safetensors").exists()


def test_stage_artifact_is_not_an_export(setup):
    _, run, _, _ = setup
    _one_sentence(CliRunner().invoke(app, ["eval", "--artifact", str(run / "calibrate.safetensors")]),
                  "calibrate", "export")


def test_checkpoint_changed_since_the_stage(setup, tmp_path):
    _, run, ckpt, synth = setup
    other = shutil.copytree(setup[0], tmp_path / "copy")
    run2 = other / "run"
    # The copied header still points at the original checkpoint path: point a copy at a changed file instead.
    changed = other / "ckpt.safetensors"
    from aphq_cli.models.checkpoint import read_state_dict, save_checkpoint

    state = read_state_dict(ckpt)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    save_checkpoint(state, changed)
    before = _snapshot(run2)
    # Calibrating the copied run from the changed checkpoint: the run belongs to the original one.
    result = CliRunner().invoke(app, ["calibrate", "--run", str(run2), "--checkpoint", str(changed),
                                      "--data", str(synth), *FAST])
    _one_sentence(result, "calibrate.safetensors", "another checkpoint")
    assert _snapshot(run2) == before


def test_checkpoint_file_changed_after_the_stage(setup, tmp_path, synth_dir, random_tiny_checkpoint):
    from stages.calibrate import calibrate

    ckpt = shutil.copy(random_tiny_checkpoint, tmp_path / "ckpt.safetensors")
    run = tmp_path / "run"
    calibrate(model="tiny-mask-rcnn", run=run, checkpoint=ckpt, data=synth_dir, calib_images=1,
              settings=FAST_SETTINGS)
    with open(ckpt, "ab") as f:
        f.write(b"\0")
    _one_sentence(CliRunner().invoke(app, ["eval", "--run", str(run)]), "changed since", "rerun the stage")


def test_other_model_or_data_in_the_same_run(setup, tmp_path):
    root, _, ckpt, synth = setup
    run = _copy_run(setup, tmp_path)
    before = _snapshot(run)
    result = CliRunner().invoke(app, ["mlp-recon", "--run", str(run), "--model", "mask-rcnn-swin-t",
                                      "--checkpoint", str(ckpt), "--data", str(synth)])
    assert result.exit_code != 0  # the checkpoint does not fit that model (or the run refuses it)
    other_data = shutil.copytree(synth, tmp_path / "data2")
    result = CliRunner().invoke(app, ["calibrate", "--run", str(run), "--checkpoint", str(ckpt),
                                      "--data", str(other_data), *FAST])
    _one_sentence(result, "calibrate.safetensors was made from data", "use another --run folder")
    assert _snapshot(run) == before


def test_other_bit_width_in_the_same_run_needs_force(setup, tmp_path):
    _, _, ckpt, synth = setup
    run = _copy_run(setup, tmp_path)
    before = _snapshot(run)
    result = CliRunner().invoke(app, ["calibrate", "--run", str(run), "--checkpoint", str(ckpt), "--data", str(synth),
                                      "--w-bits", "6", "--a-bits", "6", *FAST])
    _one_sentence(result, "holds W4A4, not W6A6", "--force")
    assert _snapshot(run) == before


def test_missing_annotation_file(setup, tmp_path):
    _, _, ckpt, synth = setup
    data = shutil.copytree(synth, tmp_path / "data")
    (data / "annotations" / "instances_val.json").unlink()
    _one_sentence(CliRunner().invoke(app, ["eval", "--checkpoint", str(ckpt), "--data", str(data)]),
                  "instances_val.json")


def test_checkpoint_that_does_not_fit_the_model(setup):
    _, _, ckpt, synth = setup
    result = CliRunner().invoke(app, ["eval", "--model", "tiny-cascade-mask-rcnn", "--checkpoint", str(ckpt),
                                      "--data", str(synth)])
    _one_sentence(result, "does not fit")


@pytest.mark.parametrize("args, message", [(["--keep-float", "roi_heads"], "'roi_heads' names no quantized module"),
                                           (["--keep-float", "neck:weights"], "is not PART, PART:w or PART:a")])
def test_keep_float_part_that_names_nothing(setup, args, message):
    run = setup[1]
    before = _snapshot(run)
    _one_sentence(CliRunner().invoke(app, ["eval", "--run", str(run), "--limit", "1", *args]), message)
    assert _snapshot(run) == before


def test_keep_float_of_a_float_model(setup):
    _, _, ckpt, synth = setup
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(ckpt), "--data", str(synth),
                                      "--keep-float", "roi_head"])
    _one_sentence(result, "--keep-float applies to a quantized model")


@pytest.mark.parametrize("command", [["calibrate", "--w-bits", "1"], ["calibrate", "--a-bits", "9"],
                                     ["demo", "--w-bits", "0"]])
def test_bit_widths_out_of_range(tmp_path, command):
    run = tmp_path / "run"
    _one_sentence(CliRunner().invoke(app, [*command, "--run", str(run)]), "from 2 to 8")
    assert not run.exists()


def test_another_head_weight_grid_in_the_same_run_needs_force(setup):
    _, run, ckpt, data = setup
    before = _snapshot(run)
    result = CliRunner().invoke(app, ["calibrate", "--run", str(run), "--head-w-group", "32", *FAST,
                                      "--checkpoint", str(ckpt), "--data", str(data)])
    _one_sentence(result, "holds W4A4, not W4A4 with head weights in groups of 32", "--force")
    assert _snapshot(run) == before


def test_a_head_weight_group_that_fits_no_head_layer_leaves_the_run_as_it_was(setup):
    _, run, ckpt, data = setup
    before = _snapshot(run)
    result = CliRunner().invoke(app, ["calibrate", "--run", str(run), "--head-w-group", "7", *FAST,
                                      "--checkpoint", str(ckpt), "--data", str(data)])
    _one_sentence(result, "head_w_group 7 does not divide the 576 inputs of rpn_head.rpn_conv",
                  "choose 8, 16, 32, 64")
    assert _snapshot(run) == before


@pytest.mark.parametrize("command", [["mlp-recon"], ["calibrate", *FAST], ["demo"]])
def test_unwritable_run_folder(setup, tmp_path, command):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # fails for root too, unlike a read-only mode
    _, _, ckpt, synth = setup
    extra = [] if command[0] == "demo" else ["--checkpoint", str(ckpt), "--data", str(synth)]
    _one_sentence(CliRunner().invoke(app, [*command, "--run", str(blocker / "run"), *extra]), str(blocker))


@pytest.mark.parametrize("fail_in", ["write"])  # fsync too in tests/test_artifacts.py
def test_disk_full_during_a_stage_write(setup, tmp_path, monkeypatch, fail_in):
    _, _, ckpt, synth = setup
    run = _copy_run(setup, tmp_path)
    before = _snapshot(run)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(artifacts.os, fail_in, full_disk)
    result = CliRunner().invoke(app, ["calibrate", "--run", str(run), "--checkpoint", str(ckpt), "--data", str(synth),
                                      "--force", *FAST])
    monkeypatch.undo()
    _one_sentence(result, "No space left on device", "unchanged")
    assert _snapshot(run) == before  # the previous calibrate.safetensors, byte for byte, and no temp files


@pytest.mark.parametrize("stop, code, how", [(signal.SIGINT, 130, "Ctrl-C"),
                                             # #22 item 7: a scheduler's or kill's SIGTERM, handled alike
                                             (signal.SIGTERM, 143, "SIGTERM")])
def test_ctrl_c_keeps_finished_blocks_and_the_rerun_resumes(setup, tmp_path, stop, code, how):
    run = _copy_run(setup, tmp_path)
    blocks = run / "reconstruct" / "blocks"
    env = dict(os.environ, APHQ_CACHE=str(tmp_path / "cache"))
    command = [sys.executable, "-m", "aphq_cli", "reconstruct", "--run", str(run), "--loss", "mse",
               "--iters", "4", "--images", "1"]
    # A shell without job control starts background jobs with SIGINT ignored, and children inherit that
    # (CI may run us so): give the child the default disposition, as a terminal's foreground job has.
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and len(list(blocks.glob("*.safetensors"))) < 3 and child.poll() is None:
        time.sleep(0.02)
    child.send_signal(stop)
    out, err = child.communicate(timeout=120)
    assert child.returncode == code, err
    assert f"interrupted: stopped by {how}" in err and "Traceback" not in err
    kept = {p: (p.stat().st_mtime_ns, sha256_file(p)) for p in blocks.glob("*.safetensors")}
    assert 3 <= len(kept) < 13, "the interrupt should land midway"
    for path in kept:
        load_artifact(path, stage="reconstruct-unit")  # every finished block is whole
    assert not (run / "reconstruct.safetensors").exists()
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert all(p.stat().st_mtime_ns == m for p, (m, _) in kept.items()), "finished blocks were redone"
    assert (run / "reconstruct.safetensors").is_file()


def test_an_output_never_replaces_an_input_or_a_run_artifact(setup, tmp_path):
    """#22 item 5: export --out and eval --json are refused before any work when they name what is read or kept."""
    root, _, ckpt, synth = setup
    run = _copy_run(setup, tmp_path)
    export = tmp_path / "w4a4.safetensors"
    assert CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(export)]).exit_code == 0
    ann = synth / "annotations" / "instances_val.json"
    before = _snapshot(run) | _snapshot(root) | {ann: sha256_file(ann), export: sha256_file(export)}
    cases = [
        (["export", "--run", str(run), "--out", str(run / "calibrate.safetensors")], "is one of this command's inputs"),
        (["export", "--run", str(run), "--out", str(ckpt)], "is one of this command's inputs"),
        (["export", "--run", str(run), "--out", str(run / "eval" / "x.safetensors")], "would overwrite eval"),
        (["eval", "--run", str(run), "--limit", "1", "--json", str(run / "calibrate.safetensors")],
         "would overwrite calibrate.safetensors"),
        (["eval", "--run", str(run), "--limit", "1", "--json", str(ckpt)], "is one of this command's inputs"),
        (["eval", "--artifact", str(export), "--limit", "1", "--json", str(export)], "is one of this command's inputs"),
        (["eval", "--checkpoint", str(ckpt), "--data", str(synth), "--limit", "1", "--json", str(ckpt)],
         "is one of this command's inputs"),
        (["eval", "--checkpoint", str(ckpt), "--data", str(synth), "--limit", "1", "--json", str(ann)],
         "is one of this command's inputs"),
        (["eval", "--checkpoint", str(ckpt), "--data", str(synth), "--limit", "1", "--json", str(export)],
         "is an aphq export artifact"),
    ]
    for command, message in cases:
        _one_sentence(CliRunner().invoke(app, command), message)
    assert _snapshot(run) | _snapshot(root) | {ann: sha256_file(ann), export: sha256_file(export)} == before


def test_an_artifact_never_makes_aphq_run_a_config_file(setup, tmp_path):
    """#22 item 2: a header naming a .py config is refused (status just says so) unless the user vouches for it."""
    from aphq_cli.artifacts import save_artifact

    run = _copy_run(setup, tmp_path)
    marker = tmp_path / "it-ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('code from an artifact')\n")
    path = run / "calibrate.safetensors"
    tensors, header = load_artifact(path)
    save_artifact(path, tensors, stage=header.stage, config=dict(header.config, model=str(evil)),
                  inputs=header.inputs, extra=header.extra)
    before = _snapshot(run)
    for command in (["eval", "--run", str(run), "--limit", "1"], ["export", "--run", str(run), "--out",
                    str(tmp_path / "e.safetensors")], ["reconstruct", "--run", str(run), "--iters", "1"]):
        _one_sentence(CliRunner().invoke(app, command), f"names model config {evil}", "--trust-config")
    from aphq_cli.inspect import run_status
    status = CliRunner().invoke(app, ["status", "--run", str(run)])
    assert status.exit_code == 0, status.output
    details = {s.stage: s.detail for s in run_status(run)}
    assert "is Python (pass --trust-config to read it)" in details["calibrate"]
    assert not marker.exists() and _snapshot(run) == before
    # Named on the command line, the file is the user's own: it is read (and runs).
    CliRunner().invoke(app, ["eval", "--run", str(run), "--limit", "1", "--model", str(evil)])
    assert marker.exists()


def test_an_edited_header_is_refused_as_damaged(setup, tmp_path):
    """#22 item 3: a_bits 4 -> 3 inside aphq.config (a stage artifact, an export) is caught, never evaluated."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from aphq_cli.inspect import run_status

    run = _copy_run(setup, tmp_path)
    export = tmp_path / "w4a4.safetensors"
    assert CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(export)]).exit_code == 0

    def edit(path, change):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        config = json.loads(meta["aphq.config"])
        change(config)
        save_file(load_file(str(path)), str(path), metadata=dict(meta, **{"aphq.config": json.dumps(config)}))

    edit(run / "calibrate.safetensors", lambda c: c["calibrate"].update(a_bits=3))
    edit(export, lambda c: c.update(a_bits=3))
    before = _snapshot(run) | {export: sha256_file(export)}
    _one_sentence(CliRunner().invoke(app, ["eval", "--run", str(run), "--limit", "1"]), "is damaged", "rerun the stage")
    _one_sentence(CliRunner().invoke(app, ["eval", "--artifact", str(export), "--limit", "1"]), "is damaged")
    _one_sentence(CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "x.safetensors")]),
                  "is damaged")
    status = {s.stage: s for s in run_status(run)}["calibrate"]
    assert status.current is False and status.detail.startswith("damaged:")
    assert CliRunner().invoke(app, ["status", "--run", str(run)]).exit_code == 0
    assert _snapshot(run) | {export: sha256_file(export)} == before


def test_a_stage_built_on_an_artifact_that_changed_is_stale_everywhere(setup, tmp_path):
    """#22 item 4: calibrate again, and the reconstruct made from the old calibration is stale, not current."""
    from aphq_cli.artifacts import save_artifact
    from aphq_cli.inspect import run_status

    run = _copy_run(setup, tmp_path)
    result = CliRunner().invoke(app, ["reconstruct", "--run", str(run), "--loss", "mse", "--images", "1",
                                      "--iters", "1"])
    assert result.exit_code == 0, result.output
    assert {s.stage: s.current for s in run_status(run)}["reconstruct"] is True
    # What `calibrate --force` with other settings leaves: another calibrate artifact in the folder.
    path = run / "calibrate.safetensors"
    tensors, header = load_artifact(path)
    key = next(k for k in tensors if k.endswith("a_quant.scale"))
    tensors[key] = tensors[key] * 2
    save_artifact(path, tensors, stage=header.stage, config=header.config, inputs=header.inputs, extra=header.extra)
    before = _snapshot(run)
    status = {s.stage: s for s in run_status(run)}
    assert status["calibrate"].current is True
    assert status["reconstruct"].current is False and "calibrate artifact" in status["reconstruct"].detail
    for command in (["eval", "--run", str(run), "--limit", "1"],
                    ["export", "--run", str(run), "--out", str(tmp_path / "e.safetensors")]):
        _one_sentence(CliRunner().invoke(app, command), "reconstruct.safetensors is stale", "--stage calibrate")
    assert _snapshot(run) == before
    assert CliRunner().invoke(app, ["export", "--run", str(run), "--stage", "calibrate", "--out",
                                    str(tmp_path / "e.safetensors")]).exit_code == 0


def test_one_writer_per_run_folder(setup, tmp_path):
    """#22 item 1 (the lock): a second writer on a busy run folder gets one sentence naming the holder."""
    run = _copy_run(setup, tmp_path)
    first = subprocess.Popen([sys.executable, "-m", "aphq_cli", "reconstruct", "--run", str(run), "--loss", "mse",
                              "--images", "2", "--iters", "100000"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lock = run / ".aphq.lock"
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, "the first writer never took the lock"
            time.sleep(0.2)
        before = sha256_file(run / "calibrate.safetensors")  # the first writer changes only its own cache
        for command in (["calibrate", "--run", str(run), "--model", "tiny-mask-rcnn", "--checkpoint", str(setup[2]),
                         "--data", str(setup[3]), "--w-bits", "6", "--a-bits", "6", "--force"],
                        ["reconstruct", "--run", str(run), "--loss", "mse", "--images", "2", "--iters", "1"]):
            _one_sentence(CliRunner().invoke(app, command), f"is being written by process {first.pid}")
        assert sha256_file(run / "calibrate.safetensors") == before and first.poll() is None
    finally:
        first.kill()
        first.wait()
    # Killed, its lock is gone with it: the next writer runs.
    result = CliRunner().invoke(app, ["reconstruct", "--run", str(run), "--loss", "none"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("setting, message", [
    ('eq_n = "abc"', "calibrate setting eq_n must be an integer, got 'abc'"),
    ('reparam = "no"', "calibrate setting reparam must be true or false, got 'no'"),
    ("pct = 2.0", "pct must be in (0.5, 1], got 2.0"),
    ("head_w_group = -4", "head_w_group must be 0 (per output channel) or a group size, got -4"),
])
def test_quant_config_values_of_the_wrong_type_or_range(setup, tmp_path, setting, message):
    """#22 item 7: every value of a --quant-config file is checked when read; nothing is written."""
    qc = tmp_path / "bad.toml"
    qc.write_text(f"[calibrate]\n{setting}\n")
    run = tmp_path / "fresh"
    _one_sentence(CliRunner().invoke(app, ["calibrate", "--run", str(run), "--quant-config", str(qc),
                                           "--data", str(setup[3]), "--checkpoint", str(setup[2])]), message)
    assert not run.exists()


@pytest.mark.parametrize("setting, message", [
    ("w_lr = -0.001", "w_lr must be positive, got -0.001"),
    ('loss = 3', "reconstruct setting loss must be a string, got 3"),
])
def test_reconstruct_settings_of_the_wrong_type_or_range(setup, tmp_path, setting, message):
    run = _copy_run(setup, tmp_path)
    qc = tmp_path / "bad.toml"
    qc.write_text(f"[reconstruct]\n{setting}\n")
    before = _snapshot(run)
    _one_sentence(CliRunner().invoke(app, ["reconstruct", "--run", str(run), "--quant-config", str(qc)]), message)
    assert _snapshot(run) == before


def test_a_header_of_valid_json_but_the_wrong_structure(setup, tmp_path):
    """#22 item 7: a header whose digest matches but whose fields have the wrong types: one sentence, everywhere."""
    from aphq_cli.artifacts import save_artifact
    from aphq_cli.inspect import run_status

    run = _copy_run(setup, tmp_path)
    path = run / "calibrate.safetensors"
    tensors, header = load_artifact(path)
    # Rewritten through the writer, so the digests match and only the structure is wrong.
    save_artifact(path, tensors, stage=header.stage, config=dict(header.config, image_ids="all"),
                  inputs=header.inputs, extra=header.extra)
    before = _snapshot(run)
    for args in (["eval", "--run", str(run), "--limit", "1"], ["export", "--run", str(run), "--out",
                 str(tmp_path / "x.safetensors")], ["reconstruct", "--run", str(run)]):
        _one_sentence(CliRunner().invoke(app, args), "malformed aphq header", "'image_ids' is str")
    assert {s.stage: s for s in run_status(run)}["calibrate"].detail.startswith("damaged:")
    assert _snapshot(run) == before


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _tensors(path):
    return load_artifact(path)[0]


def test_a_cache_left_by_a_run_with_other_settings_is_refilled(setup, tmp_path):
    """#22 item 1 (cache entries): a killed reconstruct's unit caches never feed a rerun with other settings."""
    from tests.conftest import kill_when_done

    run, clean = _copy_run(setup, tmp_path), shutil.copytree(setup[1], tmp_path / "clean")
    other = ["--loss", "mse", "--images", "2", "--iters", "2"]
    assert CliRunner().invoke(app, ["reconstruct", "--run", str(clean), *other]).exit_code == 0
    code = ("import sys; from aphq_cli.cli import main; sys.argv = ['aphq', 'reconstruct', '--run', "
            f"{str(run)!r}, '--loss', 'mse', '--images', '2', '--iters', '3']; main()")
    done = kill_when_done(code, run / "reconstruct" / "blocks", 3)
    assert 3 <= done < 13, "the kill should land midway"
    assert (run / "reconstruct" / "cache").is_dir()  # what the killed run left for the next
    result = CliRunner().invoke(app, ["reconstruct", "--run", str(run), *other])
    assert result.exit_code == 0, result.output
    got, want = _tensors(run / "reconstruct.safetensors"), _tensors(clean / "reconstruct.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _write_png(path, width, height):
    from aphq_cli.data.synth import encode_png
    import numpy as np

    path.write_bytes(encode_png(np.zeros((height, width, 3), dtype=np.uint8)))


@pytest.mark.parametrize("damage, message", [
    ("missing", "does not exist"),
    ("text", "is not a readable image file"),
    ("empty", "is empty"),
    ("size", "is 40x30 pixels, but"),
    ("truncated", "could not be loaded"),
])
def test_bad_images_are_named_before_any_work(setup, tmp_path, damage, message):
    """#22 item 6: a missing, foreign, empty, mis-sized or undecodable image: one sentence naming the file."""
    _, _, ckpt, synth = setup
    data = shutil.copytree(synth, tmp_path / "data")
    image = data / "val" / "000002.png"
    if damage == "missing":
        image.unlink()
    elif damage == "text":
        image.write_text("not an image")
    elif damage == "empty":
        image.write_bytes(b"")
    elif damage == "size":
        _write_png(image, 40, 30)
    else:  # the header (and size) intact, the pixel data cut off
        image.write_bytes(image.read_bytes()[:60])
    before = _snapshot(data)
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--limit", "3"])
    _one_sentence(result, str(image), message)
    assert _snapshot(data) == before


def test_a_bad_calibration_image_is_named_before_the_run_folder_is_made(setup, tmp_path):
    _, _, ckpt, synth = setup
    data = shutil.copytree(synth, tmp_path / "data")
    (data / "train" / "000000.png").unlink()  # the first: the one image calibration takes
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["calibrate", "--run", str(run), "--checkpoint", str(ckpt), "--data", str(data),
                                      *FAST])
    _one_sentence(result, str(data / "train" / "000000.png"), "does not exist")
    assert not run.exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_named(setup, tmp_path, value):
    """#22 item 6: NaN or Inf weights: one sentence naming the tensor, not 0 AP or a traceback."""
    from aphq_cli.models.checkpoint import read_state_dict, save_checkpoint

    _, run, ckpt, synth = setup
    state = read_state_dict(ckpt)
    name = "backbone.layers.0.blocks.0.mlp.fc1.weight"
    state[name] = state[name].clone()
    state[name][0, 0] = value
    broken = save_checkpoint(state, tmp_path / "broken.safetensors")
    for command in (["eval", "--limit", "1"], ["calibrate", "--run", str(tmp_path / "run"), *FAST]):
        result = CliRunner().invoke(app, [*command, "--checkpoint", str(broken), "--data", str(synth)])
        _one_sentence(result, "holds NaN or infinite values in 1 tensor(s)", name)
    assert not (tmp_path / "run" / "calibrate.safetensors").exists()


def _make_unwritable(folder):
    """A folder this process cannot write into, for root too (who ignores permission bits)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    # Root writes through any mode: occupy the path the records go to with a file instead.
    shutil.rmtree(folder, ignore_errors=True)
    folder.write_text("in the way")
    return lambda: None


def test_eval_of_a_run_folder_it_cannot_write(setup, tmp_path):
    """#22 item 7: eval --run of an unwritable run evaluates, says the result is not recorded, and writes nothing."""
    run = _copy_run(setup, tmp_path)
    restore = _make_unwritable(run / "eval")
    before = _snapshot(run)
    try:
        result = CliRunner().invoke(app, ["eval", "--run", str(run), "--limit", "1", "--json",
                                          str(tmp_path / "m.json")])
        assert _snapshot(run) == before
    finally:
        restore()
    assert result.exit_code == 0, result.output
    assert "is not writable: this result is not recorded" in " ".join(result.output.split())
    assert "bbox_AP" in json.loads((tmp_path / "m.json").read_text())


def test_a_damaged_finished_unit_is_reconstructed_again(setup, tmp_path):
    """#22 item 7: a finished unit whose file was damaged is redone on resume, not a dead end."""
    run = _copy_run(setup, tmp_path)
    command = ["reconstruct", "--run", str(run), "--loss", "mse", "--images", "1", "--iters", "2"]
    assert CliRunner().invoke(app, command).exit_code == 0
    want = _tensors(run / "reconstruct.safetensors")
    (run / "reconstruct.safetensors").unlink()  # as if killed before the end
    part = sorted((run / "reconstruct" / "blocks").glob("*.safetensors"))[3]
    data = bytearray(part.read_bytes())
    data[-5] ^= 0xFF
    part.write_bytes(bytes(data))
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    got = _tensors(run / "reconstruct.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    load_artifact(part, stage="reconstruct-unit")  # rewritten whole


def test_a_full_disk_while_generating_the_dataset(tmp_path, monkeypatch):
    """#22 item 7: one sentence, and neither the dataset folder nor a partial copy is left."""
    import pathlib

    real, calls = pathlib.Path.write_bytes, []

    def fills_up(self, data):
        calls.append(self)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", fills_up)
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "synth")])
    monkeypatch.undo()
    _one_sentence(result, "could not write the synthetic dataset", "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_an_export_put_in_place_of_a_stage_artifact(setup, tmp_path):
    """#22 item 7: an export copied under a stage's name is refused by name everywhere; status calls it damaged."""
    from aphq_cli.inspect import run_status

    run = _copy_run(setup, tmp_path)
    export = tmp_path / "e.safetensors"
    assert CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(export)]).exit_code == 0
    shutil.copy(export, run / "calibrate.safetensors")
    before = _snapshot(run)
    for command in (["eval", "--run", str(run), "--limit", "1"], ["reconstruct", "--run", str(run)],
                    ["export", "--run", str(run), "--out", str(tmp_path / "x.safetensors")]):
        _one_sentence(CliRunner().invoke(app, command), "holds an aphq export artifact, not the calibrate stage's")
    assert {s.stage: s for s in run_status(run)}["calibrate"].detail.startswith("damaged:")
    assert _snapshot(run) == before


def test_eval_run_refuses_a_model_or_checkpoint_it_would_ignore(setup, tmp_path):
    """#22 item 7: --model/--checkpoint with --run (or --artifact) name what is evaluated, or are refused."""
    _, run, ckpt, synth = setup
    other = tmp_path / "other.safetensors"
    shutil.copy(ckpt, other)
    with open(other, "ab") as f:
        f.write(b"\0")
    cases = [(["--run", str(run), "--checkpoint", str(other)], "is not the checkpoint"),
             (["--run", str(run), "--model", "tiny-cascade-mask-rcnn"], "is not the model"),
             (["--artifact", str(run / "calibrate.safetensors"), "--checkpoint", str(ckpt)],
              "holds its own model and weights")]
    for args, message in cases:
        _one_sentence(CliRunner().invoke(app, ["eval", *args, "--limit", "1"]), message)
    same = CliRunner().invoke(app, ["eval", "--run", str(run), "--model", "tiny-mask-rcnn", "--checkpoint",
                                    str(ckpt), "--limit", "1"])
    assert same.exit_code == 0, same.output


def test_temp_files_of_killed_writers_are_swept(setup, tmp_path):
    """#22 item 7: a killed writer's temp files go at the next write to the run; a live writer's stay."""
    run = _copy_run(setup, tmp_path)
    dead, old = _dead_pid(), time.time() - 3600
    stale = [run / f".calibrate.safetensors.{dead}.0123abcd.tmp",
             run / "reconstruct" / "blocks" / f".00_x.safetensors.{dead}.89abcdef.tmp"]
    live = run / f".other.safetensors.{os.getpid()}.00000000.tmp"
    for path in stale + [live]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
        os.utime(path, (old, old))
    result = CliRunner().invoke(app, ["reconstruct", "--run", str(run), "--loss", "none"])
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in stale) and live.exists()


def test_fewer_images_than_asked_is_said(setup, tmp_path, monkeypatch):
    """The split has 4 training images: asking for 6 runs on those 4, and says so; asking for 2 says nothing."""
    monkeypatch.setenv("APHQ_CACHE", str(tmp_path / "cache"))
    run = _copy_run(setup, tmp_path)
    result = CliRunner().invoke(app, ["reconstruct", "--run", str(run), "--loss", "mse", "--iters", "1",
                                      "--images", "6"])
    assert result.exit_code == 0, result.output
    assert ("note: reconstruct.safetensors was made from 4 image(s), not the 6 asked for: the train split has "
            "no more") in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["reconstruct", "--run", str(run), "--loss", "mse", "--iters", "1",
                                      "--images", "2"])
    assert result.exit_code == 0, result.output
    assert "note:" not in result.output
