"""How a unit's reconstruction converges over its iterations: is there a plateau to stop on? (issue #23)

For each bit-width this calibrates the testbed model (``aphq calibrate``, its
own process, as a user runs it), then runs ``aphq reconstruct`` in this
process with two observers and nothing else changed:

* the loss the stage reports after every iteration (the reconstruction term
  relative to the unit's first image, the number its progress bar shows);
* how many rounding decisions flip per iteration: a weight's hard rounding
  (up or down, the sign of its rounding variable) as the soft rounding sees
  it at each forward, compared with the iteration before.

The observers wrap :func:`stages.reconstruct.reconstruct_unit` (its public
``progress`` callback) and :class:`stages.reconstruct.SoftRounding.forward`
(read only). For each unit the table gives both in windows of the
iterations: a rule that stops a unit "when its loss stops falling" or "when
its rounding stops changing" can be read off it.

    python benchmarks/convergence.py --bits 4 3 --json docs/convergence.json
    python benchmarks/convergence.py --tables docs/convergence.json   # the tables again, from the file
    python benchmarks/convergence.py --model mask-rcnn-swin-t --checkpoint ckpt.pth --data /data/coco \
        --device cuda --bits 4 --iters 20000                            # a real model's units
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import stages.reconstruct as stage  # noqa: E402


def observe(run: Path, iters: int | None, seed: int, device: str = "cpu", images: int | None = None
            ) -> dict[str, dict[str, list]]:
    """Reconstruct ``run`` (a calibrated run folder); per unit, the loss and the flips after every iteration."""
    seen: dict[str, dict[str, list]] = {}
    current: dict = {"unit": None, "hard": {}, "flips": 0}
    forward, reconstruct_unit = stage.SoftRounding.forward, stage.reconstruct_unit

    def watched_forward(self, weight):
        hard = self.alpha.detach() >= 0
        before = current["hard"].get(id(self))
        if before is not None:
            current["flips"] += int((hard != before).sum())
        current["hard"][id(self)] = hard.clone()
        return forward(self, weight)

    def watched_unit(unit, caches, k, weights, config, unit_seed, progress=None, **kwargs):
        record = seen.setdefault(f"{k}", {"loss": [], "flips": [], "weights": 0})
        current.update(unit=k, hard={}, flips=0)

        def step(done, total, loss):
            record["loss"].append(float(loss))
            record["flips"].append(current["flips"])
            current["flips"] = 0
            record["weights"] = sum(int(h.numel()) for h in current["hard"].values())
            if progress is not None:
                progress(done, total, loss)

        return reconstruct_unit(unit, caches, k, weights, config, unit_seed, step, **kwargs)

    stage.SoftRounding.forward, stage.reconstruct_unit = watched_forward, watched_unit
    try:
        overrides = {"iters": iters, "images": images}
        seed_file = run / "seed.toml"
        seed_file.write_text(f"[reconstruct]\nseed = {seed}\n")
        stage.reconstruct(run=run, quant_config=str(seed_file), device=device, **overrides)
    finally:
        stage.SoftRounding.forward, stage.reconstruct_unit = forward, reconstruct_unit
    return seen


def windows(values: list[float], count: int) -> list[float]:
    size = max(1, len(values) // count)
    return [statistics.fmean(values[i:i + size]) for i in range(0, size * count, size)]


def table(bits: int, seen: dict[str, dict[str, list]], count: int) -> str:
    iters = len(next(iter(seen.values()))["loss"])
    size = max(1, iters // count)
    spans = [f"{i * size + 1}-{(i + 1) * size}" for i in range(count)]
    rows = [f"W{bits}A{bits}, {iters} iterations per unit; per window of {size} iterations: the mean loss "
            "(relative to the unit's first image) / rounding decisions flipped per iteration", "",
            "| unit | rounding variables | " + " | ".join(spans) + " |", "|---|---:|" + "---:|" * count]
    for k, record in seen.items():
        cells = [f"{loss:.3f} / {flips:.1f}"
                 for loss, flips in zip(windows(record["loss"], count), windows(record["flips"], count))]
        rows.append(f"| {k} | {record['weights']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-mask-rcnn")
    parser.add_argument("--checkpoint", default=None, help="the model's checkpoint (a built-in model's own without)")
    parser.add_argument("--data", default=None, help="its COCO-layout data folder (the testbed's without)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--iters", type=int, default=None, help="iterations per unit (default: the model's)")
    parser.add_argument("--images", type=int, default=None, help="reconstruction images (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--windows", type=int, default=4, help="windows the iterations are summarized in")
    parser.add_argument("--json", type=Path, default=None, help="also write every iteration's numbers here")
    parser.add_argument("--tables", type=Path, default=None, help="only print the tables of a --json file")
    args = parser.parse_args()
    if args.tables:
        saved = json.loads(args.tables.read_text())
        for label, seen in saved["runs"].items():
            print(table(int(label[1:label.index("a")]), seen, args.windows) + "\n")
        return
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="aphq-convergence-") as tmp:
        for bits in args.bits:
            run = Path(tmp) / f"w{bits}a{bits}"
            source = [f"--{k}={v}" for k, v in (("checkpoint", args.checkpoint), ("data", args.data)) if v]
            subprocess.run([sys.executable, "-m", "aphq_cli", "calibrate", "--model", args.model, "--run", str(run),
                            "--w-bits", str(bits), "--a-bits", str(bits), "--device", args.device, *source],
                           cwd=ROOT, check=True)
            seen = observe(run, args.iters, args.seed, args.device, args.images)
            out[f"w{bits}a{bits}"] = seen
            print(table(bits, seen, args.windows) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "model": args.model, "seed": args.seed,
                                         "runs": out}) + "\n")


if __name__ == "__main__":
    main()
