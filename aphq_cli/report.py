"""``aphq report``: one PNG of a run: reconstruction loss per block and AP per stage.

Everything comes from what the stages already wrote: each finished block's
header holds its logged losses (ten points per block), and every evaluation of
a run is recorded in ``RUN/eval/<name>.json`` with the fingerprint of the
weights it scored. Records whose weights changed since are left out of the
picture and listed as stale, so the figure never mixes old and new numbers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from aphq_cli.artifacts import atomic_write_bytes, read_header, sha256_file
from aphq_cli.errors import AphqError
from aphq_cli.headers import StageRecord
from aphq_cli.evalrecords import eval_record_path, read_eval_record
from aphq_cli.runs import stage_path

# Stage folders whose block files carry losses, and their header stage names.
BLOCK_STAGES = {"mlp-recon": ("mlp_recon", "mlp-recon-block"), "reconstruct": ("reconstruct", "reconstruct-unit")}
# Evaluations in chain order.
EVAL_ORDER = ("fp", "mlp-recon", "calibrate", "reconstruct", "export")


@dataclass
class RunReport:
    """What a run folder holds that can be drawn.

    Attributes:
        losses: stage -> [(block name, logged losses)] in block order.
        ap: evaluation name -> (box AP, mask AP), current records only.
        stale: evaluation names whose weights changed since they were scored.
    """

    losses: dict[str, list[tuple[str, list[float]]]] = field(default_factory=dict)
    ap: dict[str, tuple[float, float]] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)


def collect(run: Path) -> RunReport:
    """Read block losses and current evaluation records of ``run``."""
    run = Path(run)
    if not run.is_dir():
        raise AphqError(f"run folder {run} does not exist")
    report = RunReport()
    for stage, (folder, kind) in BLOCK_STAGES.items():
        rows = []
        for path in sorted((run / folder / "blocks").glob("*.safetensors")):
            try:
                head = read_header(path)
                made = StageRecord.from_dict(head.config, path, provenance=False) if head.stage == kind else None
            except AphqError:
                continue  # a torn, foreign or malformed file: resume would redo it; nothing to draw
            if made is not None and made.losses:
                rows.append((made.unit or made.block or path.stem, [float(v) for v in made.losses]))
        if rows:
            report.losses[stage] = rows
    for name in EVAL_ORDER:
        record = read_eval_record(eval_record_path(run, name))
        if record is None:
            continue
        result, key = record
        source = stage_path(run, name) if name not in ("fp", "export") else Path(result.checkpoint)
        current = source.is_file() and sha256_file(source) == key.get("weights")
        if current:
            report.ap[name] = (result.metrics.get("bbox_AP", 0.0), result.metrics.get("segm_AP", 0.0))
        else:
            report.stale.append(name)
    return report


def render(report: RunReport, title: str) -> bytes:
    """The PNG bytes: losses per block (left), box and mask AP per stage (right)."""
    matplotlib.use("Agg")

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    colours = {"mlp-recon": "tab:green", "reconstruct": "tab:blue"}
    for stage, rows in report.losses.items():
        names = [n for n, _ in rows]
        first = [v[0] for _, v in rows]
        last = [v[-1] for _, v in rows]
        x = range(len(names))
        left.plot(x, first, "o--", color=colours[stage], alpha=0.4, label=f"{stage}: first logged")
        left.plot(x, last, "o-", color=colours[stage], label=f"{stage}: last logged")
    if report.losses:
        longest = max(report.losses.values(), key=len)
        left.set_xticks(range(len(longest)), [_short(n) for n, _ in longest], rotation=60, ha="right", fontsize=7)
        left.set_yscale("log")
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "no block losses yet", ha="center", va="center", transform=left.transAxes)
    left.set_title("reconstruction loss per block (reconstruct: error relative to its first step)")
    left.set_ylabel("loss")

    names = list(report.ap)
    if names:
        x = range(len(names))
        box = [report.ap[n][0] for n in names]
        mask = [report.ap[n][1] for n in names]
        right.bar([i - 0.2 for i in x], box, 0.4, label="box AP")
        right.bar([i + 0.2 for i in x], mask, 0.4, label="mask AP")
        for i, (b, m) in enumerate(zip(box, mask)):
            right.text(i - 0.2, b, f"{b:.1f}", ha="center", va="bottom", fontsize=7)
            right.text(i + 0.2, m, f"{m:.1f}", ha="center", va="bottom", fontsize=7)
        right.set_xticks(list(x), names)
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "no evaluations yet\n(aphq eval --run RUN)", ha="center", va="center",
                   transform=right.transAxes)
    right.set_title("COCO AP per stage" + (f" (stale, left out: {', '.join(report.stale)})" if report.stale else ""))
    right.set_ylabel("AP (%)")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(run: Path, out: Path | None = None) -> tuple[Path, RunReport]:
    """Collect, render and atomically write ``out`` (default ``RUN/report.png``)."""
    report = collect(run)
    if not report.losses and not report.ap:
        raise AphqError(f"{run} has no finished blocks and no evaluations to report; "
                        "run a stage and `aphq eval --run` first")
    out = Path(out) if out is not None else Path(run) / "report.png"
    atomic_write_bytes(out, render(report, f"aphq report: {run}"))
    return out, report


def _short(name: str) -> str:
    return name.replace("backbone.", "").replace("stages.", "s").replace("blocks.", "b")
