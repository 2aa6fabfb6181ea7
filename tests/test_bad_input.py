"""Bad input through the command line: one sentence, a non-zero exit, nothing already written damaged.

One test per case of the stage chain; the lower-level checks (artifact
tampering, torn writes, checkpoint layouts) live beside their modules.
"""

import errno
import os
import json
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


def _one_sentence(result, *fragments):
    assert result.exit_code != 0, result.output
    # Progress bars of work done before the failure may precede the error; nothing else may.
    lines = [line for line in result.output.splitlines() if line.strip() and "━" not in line]
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


def test_ctrl_c_keeps_finished_blocks_and_the_rerun_resumes(setup, tmp_path):
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
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
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
