"""``aphq demo``: the stage chain on the embedded testbed, with a table of AP and time per stage.

Runs what the pipeline has today: float evaluation, calibration at W4/A4 and
evaluation of the calibrated model. Each stage is served from the run
folder's cache when its inputs are unchanged, so a second demo takes seconds
for the stages and only re-evaluates.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from aphq_cli.console import err, progress_bar


@dataclass
class StageRow:
    """One line of the demo table."""

    stage: str
    seconds: float
    metrics: dict[str, float] | None = None
    note: str = ""


def run_demo(*, model: str = "tiny-mask-rcnn", run: Path = Path("runs/demo"), w_bits: int = 4, a_bits: int = 4,
             limit: int | None = None, device: str = "cpu", json_path: Path | None = None) -> list[StageRow]:
    """Run the chain and return one row per step.

    Args:
        limit: evaluate on the first N val images only (all by default).
    """
    from stages.calibrate import calibrate
    from stages.eval import evaluate

    rows: list[StageRow] = []

    def timed(label: str, fn):
        start = time.perf_counter()
        with progress_bar(label) as update:
            out = fn(update)
        return out, round(time.perf_counter() - start, 1)

    fp, sec = timed("eval fp", lambda u: evaluate(model=model, limit=limit, device=device, progress=u))
    rows.append(StageRow("fp eval", sec, fp.metrics))
    (path, hit), sec = timed(f"calibrate W{w_bits}A{a_bits}", lambda u: calibrate(
        model=model, run=run, w_bits=w_bits, a_bits=a_bits, device=device, progress=u))
    rows.append(StageRow(f"calibrate W{w_bits}A{a_bits}", sec, note="cached" if hit else str(path)))
    q, sec = timed("eval calibrated", lambda u: evaluate(run=run, stage="calibrate", limit=limit, device=device,
                                                         progress=u))
    rows.append(StageRow("calibrated eval", sec, q.metrics))
    if json_path is not None:
        from aphq_cli.artifacts import atomic_write_text
        payload = {"model": model, "run": str(run), "w_bits": w_bits, "a_bits": a_bits,
                   "stages": [r.__dict__ for r in rows]}
        atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    return rows


def demo_table(rows: list[StageRow], title: str):
    """The demo's summary as a rich table."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("stage", "box AP", "mask AP", "seconds", "note"):
        table.add_column(col, justify="right" if col in ("box AP", "mask AP", "seconds") else "left")
    for r in rows:
        box = f"{r.metrics['bbox_AP']:.1f}" if r.metrics else ""
        mask = f"{r.metrics['segm_AP']:.1f}" if r.metrics else ""
        table.add_row(r.stage, box, mask, f"{r.seconds:.1f}", r.note)
    return table


def print_demo(rows: list[StageRow], title: str) -> None:
    err.print(demo_table(rows, title))
