"""Measure box/mask AP of the testbed models in float and after calibration alone.

    .venv/bin/python benchmarks/calibration.py            # writes docs/calibration.md

For each testbed model: float AP, then calibrate at each bit-width into
``runs/bench/<model>-w<W>a<A>`` and evaluate that. Every number in
docs/calibration.md comes from this script; it also records the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from aphq_cli.artifacts import atomic_write_text
from stages.calibrate import calibrate
from stages.eval import evaluate

MODELS = ("tiny-mask-rcnn", "tiny-cascade-mask-rcnn")
BITS = ((4, 4), (6, 6))


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, device cpu")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--limit", type=int, default=None, help="first N val images (all 200 by default)")
    ap.add_argument("--runs", type=Path, default=Path("runs/bench"))
    ap.add_argument("--out", type=Path, default=Path("docs/calibration.md"))
    args = ap.parse_args(argv)

    rows = []
    for model in args.models:
        start = time.perf_counter()
        fp = evaluate(model=model, limit=args.limit)
        rows.append((model, "FP", fp.metrics, None, round(time.perf_counter() - start, 1)))
        for w, a in BITS:
            run = args.runs / f"{model}-w{w}a{a}"
            start = time.perf_counter()
            calibrate(model=model, run=run, w_bits=w, a_bits=a, force=True)
            calib_s = round(time.perf_counter() - start, 1)
            start = time.perf_counter()
            q = evaluate(run=run, limit=args.limit)
            rows.append((model, f"W{w}A{a} calibrate", q.metrics, calib_s, round(time.perf_counter() - start, 1)))
            print(model, w, a, q.metrics["bbox_AP"], q.metrics["segm_AP"], file=sys.stderr)

    images = "all 200" if args.limit is None else f"the first {args.limit}"
    lines = [
        "# Calibration alone on the testbed",
        "",
        f"Box and mask AP (COCO, percent) on {images} images of the synthetic val split,",
        "float and after `aphq calibrate` with the testbed defaults (4 calibration",
        "images; see `aphq_cli/models/configs/_base_/synth_instance.py`), no reconstruction.",
        "",
        "Measured with `.venv/bin/python " + " ".join(["benchmarks/calibration.py", *(argv or sys.argv[1:])]) + "`",
        f"on {machine()}.",
        "",
        "| model | stage | box AP | mask AP | box AP50 | calibrate s | eval s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for model, stage, m, calib_s, eval_s in rows:
        lines.append(f"| {model} | {stage} | {m['bbox_AP']:.1f} | {m['segm_AP']:.1f} | {m['bbox_AP50']:.1f} | "
                     f"{'' if calib_s is None else calib_s} | {eval_s} |")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(
        [dict(model=r[0], stage=r[1], metrics=r[2], calibrate_s=r[3], eval_s=r[4]) for r in rows], indent=2) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
