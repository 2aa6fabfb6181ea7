"""``aphq demo``: the whole stage chain on the embedded testbed, with AP and time per stage.

Each stage is served from the run folder's cache when its inputs are
unchanged, so a second demo takes seconds for the stages and only
re-evaluates.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from aphq_cli.artifacts import atomic_write_text
from aphq_cli.console import err, stage_progress
from aphq_cli.runs import prepare_run
from aphq_cli.settings import with_arguments
from stages.calibrate import CalibrateConfig, calibrate
from stages.eval import evaluate
from stages.export import export
from stages.mlp_recon import mlp_recon
from stages.reconstruct import reconstruct


@dataclass
class StageRow:
    """One line of the demo table."""

    stage: str
    seconds: float
    metrics: dict[str, float] | None = None
    note: str = ""


def run_demo(*, model: str = "tiny-mask-rcnn", run: Path = Path("runs/demo"), w_bits: int | None = None,
             a_bits: int | None = None,
             limit: int | None = None, device: str = "cpu", json_path: Path | None = None) -> list[StageRow]:
    """Run the chain and return one row per step.

    FP eval, mlp-recon, eval of the ReLU model, calibrate, reconstruct (aph),
    eval, export, and eval of the export reloaded from its file alone.

    Args:
        limit: evaluate on the first N val images only (all by default).
    """
    # Nonsense bit-widths or an unwritable folder fail now, not after minutes of earlier stages.
    bits = CalibrateConfig(**with_arguments(None, w_bits=w_bits, a_bits=a_bits))  # calibrate's defaults
    w_bits, a_bits = bits.w_bits, bits.a_bits
    prepare_run(run)
    rows: list[StageRow] = []

    def step(label: str, fn, metrics=False):
        start = time.perf_counter()
        with stage_progress() as report:
            out = fn(lambda *a, **kw: report(f"{label}: {a[0]}" if len(a) == 3 else label, *a[-2:], **kw))
        seconds = round(time.perf_counter() - start, 1)
        if metrics:  # an EvalResult
            rows.append(StageRow(label, seconds, out.metrics, note="cached" if out.reused else ""))
        else:  # a StageResult
            rows.append(StageRow(label, seconds, note="cached" if out.reused else str(out.path)))
        return out

    cached = dict(reuse=True, record_run=run, limit=limit, device=device)
    step("fp eval", lambda p: evaluate(model=model, progress=p, **cached), metrics=True)
    step("mlp-recon", lambda p: mlp_recon(model=model, run=run, device=device, progress=p))
    step("mlp-recon eval", lambda p: evaluate(run=run, stage="mlp-recon", progress=p, **cached),
         metrics=True)
    step(f"calibrate W{w_bits}A{a_bits}", lambda p: calibrate(model=model, run=run, w_bits=w_bits, a_bits=a_bits,
                                                              device=device, progress=p))
    step("calibrate eval", lambda p: evaluate(run=run, stage="calibrate", progress=p, **cached),
         metrics=True)
    step("reconstruct (aph)", lambda p: reconstruct(run=run, loss="aph", device=device, progress=p))
    step("reconstruct eval", lambda p: evaluate(run=run, stage="reconstruct", progress=p,
                                                **cached), metrics=True)
    out = Path(run) / "export.safetensors"
    step("export", lambda p: export(run=run, out=out))
    step("export reload eval", lambda p: evaluate(artifact=out, progress=p, **cached),
         metrics=True)
    if json_path is not None:
        payload = {"model": model, "run": str(run), "w_bits": w_bits, "a_bits": a_bits,
                   "stages": [r.__dict__ for r in rows]}
        atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    return rows


def demo_table(rows: list[StageRow], title: str):
    """The demo's summary as a rich table."""
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
