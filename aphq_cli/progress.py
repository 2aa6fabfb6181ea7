"""Progress for long jobs: plain log lines when stderr is a file, and a record other shells can read.

A batch job's stderr is a file, where progress bars arrive once, cut to a
guessed width. There, :class:`PlainLog` writes complete, timestamped lines at
a steady interval (``APHQ_PROGRESS_INTERVAL`` seconds, default 60) and one
line when a phase ends: phase, counts, rate, elapsed, ETA and, while a unit
is reconstructed, its loss.

While a stage writes a run folder it also keeps ``RUN/.aphq-progress.json``
(:class:`RunRecord`, written atomically a few times a minute at most), so
``aphq status`` in another shell can show the running stage, and tell a
running job from one whose process is gone. The record goes when the stage
returns (or fails, or is interrupted); after a SIGKILL it stays, and its
dead process id says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from aphq_cli.artifacts import atomic_write_text, process_alive

INTERVAL_ENV = "APHQ_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 60.0
RECORD_NAME = ".aphq-progress.json"
RECORD_EVERY = 5.0  # seconds between two writes of the record (and at each phase's end)


@dataclass
class Phase:
    """One phase of a stage (a bar in a terminal): counts, and what rate and ETA follow from them."""

    description: str
    total: int
    done: int = 0
    loss: object = None  # float or 0-d tensor
    first_done: int = 0
    started: float = 0.0  # time.monotonic() at the first report
    updated: float = 0.0

    @property
    def elapsed(self) -> float:
        return max(0.0, self.updated - self.started)

    @property
    def rate(self) -> float | None:
        """Items per second since the phase began (a resumed phase counts from where it resumed)."""
        return (self.done - self.first_done) / self.elapsed if self.elapsed > 0 and self.done > self.first_done else None

    @property
    def eta(self) -> float | None:
        rate = self.rate
        return (self.total - self.done) / rate if rate else None

    @property
    def finished(self) -> bool:
        return self.done >= self.total


class Tracker:
    """The phases of one stage's progress reports, by description."""

    def __init__(self) -> None:
        self.phases: dict[str, Phase] = {}

    def update(self, description: str, done: int, total: int, loss: float | None = None,
               now: float | None = None) -> Phase:
        now = time.monotonic() if now is None else now
        phase = self.phases.get(description)
        if phase is None:
            phase = self.phases[description] = Phase(description, total, done, first_done=done, started=now)
        phase.done, phase.total, phase.updated = done, total, now
        if loss is not None:
            phase.loss = loss  # a float, or a 0-d tensor read only when shown (no device sync per step)
        return phase


def clock(seconds: float | None) -> str:
    """``H:MM:SS``, or ``?`` when unknown."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def plain_line(phase: Phase, prefix: str = "", stamp: datetime | None = None) -> str:
    """One complete progress line: timestamp, phase, counts, rate, elapsed, ETA (or, once done, its time), loss."""
    stamp = stamp or datetime.now()
    head = f"{stamp:%Y-%m-%d %H:%M:%S} {prefix}{phase.description}:"
    rate = f"{phase.rate:.3g}/s" if phase.rate else "?/s"
    if phase.finished:
        body = f"done, {phase.done} in {clock(phase.elapsed)} ({rate})"
    else:
        pct = 100 * phase.done / phase.total if phase.total else 0
        body = f"{phase.done}/{phase.total} ({pct:.0f}%), {rate}, elapsed {clock(phase.elapsed)}, eta {clock(phase.eta)}"
    return f"{head} {body}" + (f", loss {float(phase.loss):.4g}" if phase.loss is not None else "")


def interval() -> float:
    """Seconds between two plain lines: ``APHQ_PROGRESS_INTERVAL``, default 60."""
    value = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(0.0, float(value)) if value else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


class PlainLog:
    """Progress as plain lines where stderr is not a terminal: one every ``interval``, one per finished phase."""

    def __init__(self, write: Callable[[str], None], prefix: str = "", every: float | None = None) -> None:
        self.write, self.prefix = write, prefix
        self.every = interval() if every is None else every
        self.last: float | None = None  # when a periodic line was last written

    def show(self, phase: Phase) -> None:
        if phase.finished:
            self._write(phase)
        elif self.last is None:
            self.last = phase.updated  # the first line comes one interval after the start
            if self.every == 0:
                self._write(phase)
        elif phase.updated - self.last >= self.every:
            self._write(phase)

    def _write(self, phase: Phase) -> None:
        self.last = phase.updated
        self.write(plain_line(phase, self.prefix))


class RunRecord:
    """``RUN/.aphq-progress.json`` while a stage writes the run folder."""

    def __init__(self, run: Path, stage: str) -> None:
        self.path = Path(run) / RECORD_NAME
        self.stage = stage
        self.started = _now()
        self.written = 0.0

    def update(self, phase: Phase) -> None:
        if not phase.finished and phase.updated - self.written < RECORD_EVERY:
            return
        self.written = phase.updated
        record = {"stage": self.stage, "phase": phase.description, "done": phase.done, "total": phase.total,
                  "rate": phase.rate, "eta_s": phase.eta, "elapsed_s": phase.elapsed,
                  "loss": None if phase.loss is None else float(phase.loss),
                  "pid": os.getpid(), "host": socket.gethostname(), "started": self.started, "updated": _now(),
                  "updated_epoch": time.time()}
        with contextlib.suppress(Exception):  # progress must never stop the work it reports on
            atomic_write_text(self.path, json.dumps(record, indent=1) + "\n")

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_ACTIVE: list[RunRecord] = []  # the records of this process's running stages (the innermost last)


@contextlib.contextmanager
def recording(run: Path, stage: str) -> Iterator[RunRecord]:
    """Keep the run's progress record for the scope; removed at its end, however it ends (SIGKILL aside)."""
    record = RunRecord(run, stage)
    _ACTIVE.append(record)
    try:
        yield record
    finally:
        _ACTIVE.remove(record)
        record.close()


def note(phase: Phase) -> None:
    """A progress report of this process, for the run folder it is writing (if any)."""
    if _ACTIVE:
        _ACTIVE[-1].update(phase)


def read_record(run: Path) -> dict | None:
    """The run's progress record with its ``state``: ``running``, or ``stopped`` (its process is gone)."""
    try:
        record = json.loads((Path(run) / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return None
    here = record.get("host") == socket.gethostname()
    # On another machine (a shared file system) a pid says nothing: a record not updated for ten
    # minutes is taken as stopped.
    alive = process_alive(record["pid"]) if here else time.time() - record.get("updated_epoch", 0) < 600
    record["state"] = "running" if alive else "stopped"
    return record


def describe(record: dict) -> str:
    """The record as one phrase for ``aphq status``."""
    counts = f"{record.get('phase')}: {record.get('done')}/{record.get('total')}"
    if record["state"] == "running":
        return (f"running (process {record['pid']}): {counts}, eta {clock(record.get('eta_s'))}"
                + (f", loss {record['loss']:.4g}" if record.get("loss") is not None else ""))
    return (f"stopped: process {record['pid']} is gone (last at {counts}, {record.get('updated')}); "
            "the same command resumes it")
