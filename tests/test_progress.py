"""Progress for long jobs: plain lines when stderr is a file, and the run's progress record for `aphq status`."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest
from typer.testing import CliRunner

from aphq_cli.cli import app
from aphq_cli.progress import RECORD_NAME, PlainLog, Tracker, clock, plain_line


def test_rate_eta_and_one_complete_line():
    tracker = Tracker()
    tracker.update("unit 3/13 neck", 0, 200, now=100.0)
    phase = tracker.update("unit 3/13 neck", 50, 200, loss=0.5, now=110.0)
    assert phase.rate == 5.0 and phase.eta == 30.0 and clock(3725) == "1:02:05"
    line = plain_line(phase, "reconstruct: ", datetime(2026, 12, 3, 9, 41, 7))
    assert line == ("2026-12-03 09:41:07 reconstruct: unit 3/13 neck: 50/200 (25%), 5/s, elapsed 0:00:10, "
                    "eta 0:00:30, loss 0.5")
    done = tracker.update("unit 3/13 neck", 200, 200, now=140.0)
    assert plain_line(done, "", datetime(2026, 12, 3)).endswith("unit 3/13 neck: done, 200 in 0:00:40 (5/s), loss 0.5")


def test_plain_lines_come_at_the_interval_and_at_each_phase_end():
    lines, tracker = [], Tracker()
    log = PlainLog(lines.append, every=60)
    for t in range(0, 200, 10):  # one report every 10 s for 190 s
        log.show(tracker.update("apply", t, 400, now=float(t)))
    log.show(tracker.update("apply", 400, 400, now=200.0))
    assert [line.split(": ", 1)[1].split(",")[0] for line in lines] == ["60/400 (15%)", "120/400 (30%)",
                                                                        "180/400 (45%)", "done"]


@pytest.fixture
def calibrated_run(tmp_path, synth_dir, random_tiny_checkpoint):
    from stages.calibrate import calibrate

    run = tmp_path / "run"
    calibrate(model="tiny-mask-rcnn", run=run, checkpoint=random_tiny_checkpoint, data=synth_dir, calib_images=1,
              settings={"eq_n": 16, "matmul_eq_n": 4, "search_round": 1, "max_windows": 8})
    return run


def test_a_reconstruct_logged_to_a_file_writes_complete_lines(calibrated_run, tmp_path):
    log = tmp_path / "job.log"
    env = dict(os.environ, APHQ_PROGRESS_INTERVAL="0", APHQ_CACHE=str(tmp_path / "cache"))
    with open(log, "w") as stderr:
        done = subprocess.run([sys.executable, "-m", "aphq_cli", "reconstruct", "--run", str(calibrated_run),
                               "--loss", "mse", "--iters", "3", "--images", "1"], stderr=stderr,
                              stdout=subprocess.PIPE, text=True, env=env, timeout=600)
    assert done.returncode == 0, log.read_text()
    text = log.read_text()
    assert "\x1b" not in text and "\r" not in text and "…" not in text  # no cursor codes, nothing cut
    lines = text.splitlines()
    unit = [line for line in lines if "reconstruct: unit 5/13 backbone.layers.1.blocks.0:" in line]
    assert any(", eta " in line and "/3 (" in line and ", loss " in line for line in unit), unit
    assert any(": done, 3 in " in line and ", loss " in line for line in unit), unit
    assert all(line[:19].replace("-", "").replace(":", "").replace(" ", "").isdigit() for line in unit)
    assert not (calibrated_run / RECORD_NAME).exists()  # the record goes when the stage ends


def test_status_shows_a_running_stage_and_a_killed_one(calibrated_run, tmp_path):
    env = dict(os.environ, APHQ_CACHE=str(tmp_path / "cache"))
    child = subprocess.Popen([sys.executable, "-m", "aphq_cli", "reconstruct", "--run", str(calibrated_run),
                              "--loss", "mse", "--images", "2", "--iters", "100000"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (calibrated_run / RECORD_NAME).is_file():
            assert child.poll() is None and time.monotonic() < deadline, "no progress record appeared"
            time.sleep(0.2)
        result = CliRunner().invoke(app, ["status", "--run", str(calibrated_run), "--json"])
        assert result.exit_code == 0, result.output
        stages = {s["stage"]: s for s in json.loads(result.stdout)["stages"]}
        running = stages["reconstruct"]
        assert running["state"] == "running" and running["progress"]["pid"] == child.pid
        assert running["progress"]["total"] > 0 and running["detail"].startswith(f"running (process {child.pid})")
        assert stages["calibrate"]["state"] == "current"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    result = CliRunner().invoke(app, ["status", "--run", str(calibrated_run), "--json"])
    reconstruct = {s["stage"]: s for s in json.loads(result.stdout)["stages"]}["reconstruct"]
    assert reconstruct["state"] == "stopped" and f"process {child.pid} is gone" in reconstruct["detail"]
    table = CliRunner().invoke(app, ["status", "--run", str(calibrated_run)])
    assert table.exit_code == 0 and "stopped" in table.output


def test_a_sentence_in_a_log_file_is_not_folded_at_80_columns(tmp_path):
    sentence = "export 2.14 MiB; float checkpoint " + "x" * 90 + " (3.2x larger)"
    log = tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    with open(log, "w") as sink:
        subprocess.run([sys.executable, "-c", f"from aphq_cli.console import err; err.print({sentence!r})"],
                       stderr=sink, env=env, check=True)
    lines = [line for line in log.read_text().splitlines() if sentence[:20] in line]
    assert lines == [sentence]
