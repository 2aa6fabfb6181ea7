"""Terminal output for people: rich progress, tables and one-sentence errors, on stderr.

stdout stays free for data (the paths a stage wrote), so stages chain in a
shell script.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.table import Table

from aphq_cli.progress import PlainLog, Tracker, note

# Under torchrun only rank 0 talks: K progress bars on one terminal would be noise.
err = Console(stderr=True, quiet=int(os.environ.get("RANK", "0")) > 0)
if not err.is_terminal and "COLUMNS" not in os.environ:
    # A log file has no width: rich's guess of 80 columns would fold a sentence over two lines.
    err.width = 200


@contextlib.contextmanager
def stage_progress(prefix: str = "") -> Iterator[Callable[..., None]]:
    """Progress of a stage's phases; yields ``report(description, done, total, loss=None)``.

    In a terminal, one bar per phase, appearing at its first report (so a
    command that fails on its input prints its one error line and nothing
    else). Where stderr is a file (a batch job's log), complete timestamped
    lines instead (:class:`~aphq_cli.progress.PlainLog`), never cut and
    without cursor codes. Either way each report reaches the run folder's
    progress record while a stage writes one (:func:`aphq_cli.progress.note`).

    Args:
        prefix: put before each description in plain lines (``reconstruct: ``).
    """
    tracker = Tracker()
    live = err.is_terminal
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    progress = Progress(*columns, console=err, transient=False)
    plain = PlainLog(lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True), prefix)
    tasks: dict[str, int] = {}

    def report(description: str, done: int, total: int, loss: float | None = None) -> None:
        phase = tracker.update(description, done, total, loss)
        note(phase)
        if not live:
            plain.show(phase)
            return
        if not tasks:
            progress.start()
        if description not in tasks:
            tasks[description] = progress.add_task(description, total=total)
        progress.update(tasks[description], completed=done, total=total)

    try:
        yield report
    finally:
        if tasks:
            progress.stop()


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A single bar that appears at its first update; yields ``update(done, total)``."""
    with stage_progress() as report:
        yield lambda done, total: report(description, done, total)


def metrics_table(title: str, rows: dict[str, dict[str, float]]) -> Table:
    """Rows of ``{label: {"bbox_AP": ..}}`` as a box/mask AP table."""
    cols = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    table = Table(title=escape(title))
    table.add_column("")
    table.add_column("iou")
    for c in cols:
        table.add_column(c, justify="right")
    for label, metrics in rows.items():
        for iou, name in (("bbox", "box"), ("segm", "mask")):
            table.add_row(escape(label), name, *(f"{metrics[f'{iou}_{c}']:.1f}" for c in cols))
    return table


def class_table(title: str, per_class: dict[str, dict[str, float]]) -> Table:
    """``{"bbox": {class: AP}, "segm": {...}}`` as one row per class."""
    ious = [(iou, name) for iou, name in (("bbox", "box AP"), ("segm", "mask AP")) if iou in per_class]
    table = Table(title=escape(title))
    table.add_column("class")
    for _, name in ious:
        table.add_column(name, justify="right")
    for cls in per_class[ious[0][0]]:
        table.add_row(escape(cls), *(f"{per_class[iou].get(cls, float('nan')):.1f}" for iou, _ in ious))
    return table
