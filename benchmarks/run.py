"""Accuracy and cost of every stage on the testbed (or a real model); writes docs/results.md and a PNG.

    .venv/bin/python benchmarks/run.py                      # both testbed models, the full grid
    .venv/bin/python benchmarks/run.py --models tiny-mask-rcnn --bits 4 --methods calib aph --limit 50
    .venv/bin/python benchmarks/run.py --models mask-rcnn-swin-t --checkpoint ckpt.pth --data /data/coco \\
        --device cuda --out docs/results-swin-t.md

Every stage runs as its own ``python -m aphq_cli`` process, exactly as a user
chains them, so the wall time and peak resident memory of each (``os.wait4``)
are the stage's own. Methods, per bit-width:

* ``calib``: calibration alone;
* ``mse``, ``fisher``, ``aph``: calibration, then block reconstruction with that loss;
* ``mlp+aph``: mlp-recon, calibration on the ReLU model, aph reconstruction.

Reconstruction methods run once per ``--seeds`` value (the reconstruct seed,
set through a ``--quant-config`` file); the table shows mean and spread.
``--breakdown`` evaluates the first bit-width's calibrated model with one
part at a time in float (``aphq eval --keep-float``), and each reconstruction
with float heads: where quantization costs accuracy, and how much of the
part reconstruction touches it wins back. ``--scaling`` adds reconstruct
runs at several image and iteration counts.
The output names the machine; no number in docs/results.md comes from anywhere
else.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("calib", "mse", "fisher", "aph", "mlp+aph")
TESTBED = ("tiny-mask-rcnn", "tiny-cascade-mask-rcnn")


@dataclass
class Step:
    """One stage process: what ran, how long, how much memory, what it wrote."""

    model: str
    label: str
    argv: list[str]
    seconds: float
    peak_rss_mib: float
    metrics: dict[str, float] = field(default_factory=dict)
    artifact_mib: float | None = None
    variant: str = ""  # --variant: which code or settings, for a change measured alone


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.steps: list[Step] = []
        self.checkpoints: dict[str, float] = {}  # model -> float checkpoint size, MiB

    def aphq(self, model: str, label: str, *argv: str, json_out: Path | None = None,
             artifact: Path | None = None) -> Step:
        """Run one ``aphq`` command; record time, peak RSS, metrics (eval) and artifact size."""
        command = [sys.executable, "-m", "aphq_cli", *argv]
        if json_out is not None:
            command += ["--json", str(json_out)]
        if self.args.variant:
            label = f"{label} [{self.args.variant}]"
        print("$ aphq " + " ".join(argv), file=sys.stderr, flush=True)
        log = self.args.runs / ".step.log"
        start = time.perf_counter()
        with open(log, "w") as sink:
            # cwd first on sys.path: `--code DIR` runs that checkout's aphq (an earlier commit).
            child = subprocess.Popen(command, cwd=self.args.code, stdout=subprocess.DEVNULL, stderr=sink)
            # wait4 gives this child's own rusage: ru_maxrss is its peak resident set (KiB on Linux).
            _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        rss = round(usage.ru_maxrss / 1024, 1)
        err = log.read_text()
        if child.returncode != 0:
            raise SystemExit(f"benchmark step failed ({child.returncode}): aphq {' '.join(argv)}\n{err[-2000:]}")
        metrics = json.loads(Path(json_out).read_text()) if json_out is not None else {}
        metrics = {k: v for k, v in metrics.items() if k.startswith(("bbox_", "segm_"))}
        size = artifact.stat().st_size / 2**20 if artifact is not None and artifact.is_file() else None
        step = Step(model, label, argv, round(seconds, 1), rss, metrics, None if size is None else round(size, 2),
                    self.args.variant)
        self.steps.append(step)
        return step

def step_key(step: Step) -> tuple:
    """What makes two rows the same measurement: model, variant, label and reconstruct seed (run folder ``-sN``)."""
    seed = next((m.group(1) for a in step.argv if (m := re.search(r"-s(\d+)$", a))), None)
    return step.model, step.variant, step.label, seed


def commit(code: Path) -> str:
    """The short commit of checkout ``code``, ``+changes`` when its tracked files differ from it."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", str(code), *argv], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return head + ("+changes" if head and git("status", "--porcelain", "--untracked-files=no") else "")


def machine(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = ""
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"device {device}{gpu}")


def model_args(args: argparse.Namespace) -> list[str]:
    out = []
    if args.checkpoint is not None:
        out += ["--checkpoint", str(args.checkpoint)]
    if args.data is not None:
        out += ["--data", str(args.data)]
    return out


def toml_setting(item: str, ap: argparse.ArgumentParser, option: str) -> tuple[str, str]:
    """``KEY=VALUE`` as a TOML line's key and value: numbers and booleans as they are, anything else quoted."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        ap.error(f"{option} takes KEY=VALUE, got {item!r}")
    try:
        float(value)
    except ValueError:
        if value not in ("true", "false"):
            value = json.dumps(value)
    return key, value


def write_section(path: Path, section: str, settings: dict) -> Path:
    """A --quant-config file of one ``[section]`` holding ``settings`` (values as :func:`toml_setting` gives them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([f"[{section}]"] + [f"{k} = {v}" for k, v in settings.items()]) + "\n")
    return path


def calib_config(folder: Path, extra: dict) -> list[str]:
    """``--quant-config`` with a file of the benchmark's [calibrate] overrides, or nothing without any."""
    return ["--quant-config", str(write_section(folder / "calibrate.toml", "calibrate", extra))] if extra else []


def seed_config(folder: Path, seed: int, extra: dict) -> Path:
    """A --quant-config file setting the reconstruct seed (and any benchmark overrides)."""
    return write_section(folder / f"seed{seed}.toml", "reconstruct", {"seed": seed} | extra)


def bench_model(b: Bench, model: str) -> None:
    args = b.args
    base = args.runs / model
    if base.exists():
        shutil.rmtree(base)  # a benchmark measures from scratch
    base.mkdir(parents=True)
    margs, dev = model_args(args), ["--device", args.device]
    from aphq_cli.models.zoo import builtin_models

    ckpt = args.checkpoint or builtin_models()[model].weights
    b.checkpoints[model] = round(Path(ckpt).stat().st_size / 2**20, 2)
    lim = ["--limit", str(args.limit)] if args.limit else []
    b.aphq(model, "FP", "eval", "--model", model, *margs, *dev, *lim, json_out=base / "fp.json")
    recon_opts = []
    if args.recon_iters:
        recon_opts += ["--iters", str(args.recon_iters)]
    if args.recon_images:
        recon_opts += ["--images", str(args.recon_images)]

    calib_opts = calib_config(base, args.calib_set)  # one file for every calibration of the model
    mlp_run = base / "mlp"
    grid = args.grid or [(bits, list(args.methods)) for bits in args.bits]
    all_methods = {m for _, methods in grid for m in methods}
    needs_mlp = "mlp+aph" in all_methods or args.mlp_eval
    if needs_mlp:
        b.aphq(model, "mlp-recon", "mlp-recon", "--model", model, "--run", str(mlp_run), *margs, *dev,
               artifact=mlp_run / "mlp_recon.safetensors")
        b.aphq(model, "FP after mlp-recon", "eval", "--run", str(mlp_run), "--stage", "mlp-recon", *dev, *lim,
               json_out=base / "mlp.json")
    for bits, methods in grid:
        tag = f"W{bits}A{bits}"
        calib_run = base / f"w{bits}a{bits}"
        b.aphq(model, f"{tag} calibrate (stage)", "calibrate", "--model", model, "--run", str(calib_run),
               "--w-bits", str(bits), "--a-bits", str(bits), *calib_opts, *margs, *dev,
               artifact=calib_run / "calibrate.safetensors")
        if "calib" in methods:
            b.aphq(model, f"{tag} calib", "eval", "--run", str(calib_run), *dev, *lim,
                   json_out=calib_run / "eval.json")
        for method in [m for m in methods if m != "calib"]:
            loss = method.split("+")[-1]
            for seed in args.seeds:
                run = base / f"w{bits}a{bits}-{method.replace('+', '-')}-s{seed}"
                if method == "mlp+aph":
                    run.mkdir()
                    shutil.copy(mlp_run / "mlp_recon.safetensors", run / "mlp_recon.safetensors")
                    b.aphq(model, f"{tag} calibrate after mlp-recon (stage)", "calibrate", "--model", model,
                           "--run", str(run), "--w-bits", str(bits), "--a-bits", str(bits),
                           *calib_opts, *margs, *dev)
                else:
                    shutil.copytree(calib_run, run, ignore=shutil.ignore_patterns("eval", "eval.json"))
                qc = seed_config(run, seed, args.recon_set)
                # The seeds and bit-widths of a model share its APH estimates (made once, as before the
                # stage removed them by default).
                b.aphq(model, f"{tag} reconstruct {method} (stage)", "reconstruct", "--run", str(run), "--loss", loss,
                       "--quant-config", str(qc), "--keep-aph-cache", *recon_opts, *dev,
                       artifact=run / "reconstruct.safetensors")
                b.aphq(model, f"{tag} {method}", "eval", "--run", str(run), *dev, *lim, json_out=run / "eval.json")
    if args.export:
        bits, methods = grid[0]
        method = next((m for m in ("aph", "mlp+aph", "mse", "fisher") if m in methods), None)
        run = base / (f"w{bits}a{bits}-{method.replace('+', '-')}-s{args.seeds[0]}" if method else f"w{bits}a{bits}")
        out = base / "export.safetensors"
        b.aphq(model, f"W{bits}A{bits} export (stage)", "export", "--run", str(run), "--out", str(out), artifact=out)
        b.aphq(model, f"W{bits}A{bits} export reloaded", "eval", "--artifact", str(out), *dev, *lim,
               json_out=base / "export.json")
    if args.breakdown:
        breakdown(b, model, base, grid[0], args.seeds, [*dev, *lim])
    if args.scaling:
        bits = grid[0][0]
        calib_run = base / f"w{bits}a{bits}"
        for images, iters in args.scaling_points:
            run = base / f"scale-i{images}-n{iters}"
            shutil.copytree(calib_run, run, ignore=shutil.ignore_patterns("eval", "eval.json"))
            b.aphq(model, f"scaling: reconstruct aph, {images} images x {iters} iters", "reconstruct", "--run",
                   str(run), "--loss", "aph", "--images", str(images), "--iters", str(iters), "--keep-aph-cache", *dev,
                   artifact=run / "reconstruct.safetensors")


# Parts of a detector that --breakdown runs in float, one evaluation each.
PARTS = {"heads": ["rpn_head", "roi_head"], "backbone+neck": ["backbone", "neck"],
         "weights": ["backbone:w", "neck:w", "rpn_head:w", "roi_head:w"],
         "activations": ["backbone:a", "neck:a", "rpn_head:a", "roi_head:a"]}


def breakdown(b: Bench, model: str, base: Path, first: tuple[int, list[str]], seeds: list[int],
              opts: list[str]) -> None:
    """Where quantization costs accuracy: the calibrated model with each part in float (``--keep-float``).

    With float heads, calibration and each reconstruction (every seed, so the
    row has a spread) are compared on the part reconstruction changes
    (backbone and neck) alone: the most that reconstructing the heads could
    add on top.
    """
    bits, methods = first
    tag = f"W{bits}A{bits}"

    def flags(what: str) -> list[str]:
        return [a for part in PARTS[what] for a in ("--keep-float", part)]

    for what in PARTS:
        b.aphq(model, f"{tag} calib, float {what}", "eval", "--run", str(base / f"w{bits}a{bits}"), "--stage",
               "calibrate", *flags(what), *opts, json_out=base / f"breakdown-calib-{what}.json")
    for method in [m for m in methods if m != "calib"]:
        for seed in seeds:
            name = f"{method.replace('+', '-')}-s{seed}"
            b.aphq(model, f"{tag} {method}, float heads", "eval", "--run", str(base / f"w{bits}a{bits}-{name}"),
                   *flags("heads"), *opts, json_out=base / f"breakdown-{name}-heads.json")


def summarize(steps: list[Step]) -> dict:
    """Mean and spread (population stdev) over seeds of each (model, label) with metrics."""
    groups: dict[tuple[str, str], list[Step]] = {}
    for s in steps:
        if s.metrics:
            groups.setdefault((s.model, s.label), []).append(s)
    out = {}
    for (model, label), group in groups.items():
        row = {"n": len(group)}
        for key in ("bbox_AP", "segm_AP"):
            values = [g.metrics[key] for g in group]
            row[key] = round(statistics.fmean(values), 2)
            row[key + "_spread"] = round(statistics.pstdev(values), 2) if len(values) > 1 else 0.0
        row["eval_seconds"] = round(statistics.fmean(g.seconds for g in group), 1)
        out.setdefault(model, {})[label] = row
    return out


def loss_panels(summary: dict) -> list[tuple[str, list[tuple[str, dict]]]]:
    """``(title, [(method, row), ...])`` per model and bit-width: what the plot compares.

    Each quantized setting (``W4A4 aph``) goes to its model's panel for that
    bit-width; breakdown rows (``..., float heads``) and the export stay out,
    so each panel holds methods that differ only in what is compared. Within
    a panel the rows go by method, then variant (the current code first), so
    that one method's variants stand next to each other.
    """
    panels: dict[str, list[tuple[str, dict]]] = {}
    for model, rows in summary.items():
        for label, row in rows.items():
            tag, _, method = label.partition(" ")
            if not (tag.startswith("W") and "A" in tag) or "," in method or method.startswith("export"):
                continue
            panels.setdefault(f"{model} {tag}", []).append((method, row))

    def order(entry: tuple[str, dict]) -> tuple[int, str]:
        base, _, variant = entry[0].partition(" [")
        return (METHODS.index(base) if base in METHODS else len(METHODS), variant)

    return [(title, sorted(entries, key=order)) for title, entries in panels.items()]


def plot(summary: dict, path: Path) -> None:
    """AP lost against the float model per method, with the seed spread, one panel per model and bit-width.

    The axis spans each panel's own range (not from 0), with a grid line per
    point, so a 1-point difference between methods is visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MultipleLocator

    panels = loss_panels(summary)
    if not panels:
        return
    # One panel under the other, each as tall as its rows, so every row gets the same space.
    sizes = [len(entries) for _, entries in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8.5, 0.38 * sum(sizes) + 1.1 * len(panels)), squeeze=False,
                             gridspec_kw={"height_ratios": [n + 2 for n in sizes]})
    for ax, (title, entries) in zip(axes.flat, panels):
        model = title.split(" ")[0]
        fp = summary[model].get("FP")
        y = list(range(len(entries)))[::-1]
        lo, hi = 0.0, 0.0
        for offset, key, name in ((0.15, "bbox_AP", "box"), (-0.15, "segm_AP", "mask")):
            ref = fp[key] if fp else 0.0
            vals = [row[key] - ref for _, row in entries]
            errs = [row[key + "_spread"] for _, row in entries]
            ax.errorbar(vals, [v + offset for v in y], xerr=errs, fmt="o", capsize=3, label=f"{name} AP")
            lo, hi = min(lo, *(v - e for v, e in zip(vals, errs))), max(hi, *(v + e for v, e in zip(vals, errs)))
        ax.set_yticks(y, [f"{m} (n={row['n']})" for m, row in entries], fontsize=8)
        ax.set_xlim(lo - 0.5, hi + 0.5)
        ax.xaxis.set_major_locator(MultipleLocator(1 if hi - lo < 12 else 5))
        ax.grid(axis="x", alpha=0.4)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("AP minus float AP (points)" if fp else "AP (%)")
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(args, steps: list[Step], summary: dict, commands: list[dict], checkpoints: dict) -> str:
    lines = [
        "# Results: accuracy and cost per stage",
        "",
        "Written by `benchmarks/run.py`; every number here comes from these runs of it:",
        "",
        *[f"- `python benchmarks/run.py {' '.join(c['argv'])}`: {c['machine']}; "
          + (f"aphq at commit {c['commit']}; " if c.get("commit") else "")
          + f"started {c['started']}, took {c['seconds'] / 60:.1f} min." for c in commands],
        "",
        "Evaluation on the val images each command's `--limit` names (all of them without it); reconstruct seeds "
        "as its `--seeds` name (0 without it). With several seeds the table shows mean ± population spread.",
        "Each stage runs as its own process; `eval s` is the whole `aphq eval` process (about 6 s of it is "
        "importing torch and mmdetection).",
        "",
        "## Accuracy (COCO AP, %)",
        "",
    ]
    for model, rows in summary.items():
        lines += [f"### {model}", "", "| setting | box AP | mask AP | runs | eval s |", "|---|---:|---:|---:|---:|"]
        for label, r in rows.items():
            pm = (lambda k: f"{r[k]:.1f} ± {r[k + '_spread']:.1f}") if r["n"] > 1 else (lambda k: f"{r[k]:.1f}")
            lines.append(f"| {label} | {pm('bbox_AP')} | {pm('segm_AP')} | {r['n']} | {r['eval_seconds']} |")
        lines.append("")
    lines += ["## Cost per stage process", "",
              "Wall time and peak resident memory of each `aphq` process (stage or eval); artifact size on disk. "
              "Float checkpoints for comparison: "
              + ", ".join(f"{m} {size:.2f} MiB" for m, size in checkpoints.items()) + ".",
              "", "| model | step | wall s | peak RSS MiB | artifact MiB |", "|---|---|---:|---:|---:|"]
    for s in steps:
        size = "" if s.artifact_mib is None else f"{s.artifact_mib:.2f}"
        lines.append(f"| {s.model} | {s.label} | {s.seconds} | {s.peak_rss_mib} | {size} |")
    lines += ["", "![results](results.png)", ""]
    return "\n".join(lines)


READING = "\n## Reading"


def kept_reading(out: Path) -> str:
    """The hand-written ``## Reading`` section at the end of ``out`` (what the numbers say), carried over."""
    old = out.read_text() if out.is_file() else ""
    return old[old.index(READING) + 1:] if READING in old else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(TESTBED))
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3, 6], help="W=A bit-widths")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--grid", nargs="+", default=None, metavar="BITS:METHODS",
                    help="per bit-width methods, e.g. 4:calib,mse,fisher,aph,mlp+aph 3:calib,aph (overrides --bits "
                         "and --methods)")
    ap.add_argument("--merge", action="store_true",
                    help="add to OUT's JSON: rows measured again (model, variant, label, seed) are replaced, "
                         "all others kept (one table for runs made apart)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N val images")
    ap.add_argument("--recon-iters", type=int, default=None, help="reconstruct --iters (default: the model's)")
    ap.add_argument("--recon-images", type=int, default=None, help="reconstruct --images (default: the model's)")
    ap.add_argument("--recon-set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="further [reconstruct] settings for every reconstruction, e.g. qdrop_scope=all")
    ap.add_argument("--calib-set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="further [calibrate] settings for every calibration, e.g. calib_images=16")
    ap.add_argument("--mlp-eval", action="store_true", help="measure FP after mlp-recon even without mlp+aph")
    ap.add_argument("--export", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--breakdown", action="store_true",
                    help="evaluate the first bit-width with heads, backbone+neck, weights, activations in float")
    ap.add_argument("--scaling", action="store_true", help="reconstruct time/memory at several sizes")
    ap.add_argument("--scaling-points", nargs="+", default=["4x50", "8x50", "16x50", "8x25", "8x100"],
                    help="IMAGESxITERS points for --scaling")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=Path, default=Path("runs/bench"))
    ap.add_argument("--code", type=Path, default=ROOT,
                    help="the checkout whose aphq runs (e.g. a git worktree of an earlier commit, to measure one "
                         "change alone); its commit is recorded")
    ap.add_argument("--variant", default="",
                    help="a name appended to every row's label ([NAME]); with --merge, rows of other variants stay")
    ap.add_argument("--out", type=Path, default=Path("docs/results.md"))
    args = ap.parse_args(argv)
    args.scaling_points = [tuple(int(v) for v in p.split("x")) for p in args.scaling_points]
    args.recon_set = dict(toml_setting(item, ap, "--recon-set") for item in args.recon_set)
    args.calib_set = dict(toml_setting(item, ap, "--calib-set") for item in args.calib_set)
    if args.grid:
        args.grid = [(int(g.split(":")[0]), g.split(":")[1].split(",")) for g in args.grid]
        bad = {m for _, ms in args.grid for m in ms} - set(METHODS)
        if bad:
            ap.error(f"unknown method(s) {', '.join(sorted(bad))}; choose from {', '.join(METHODS)}")
    args.runs = args.runs.resolve()
    args.code = args.code.resolve()
    args.runs.mkdir(parents=True, exist_ok=True)

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.perf_counter()
    bench = Bench(args)
    for model in args.models:
        bench_model(bench, model)
    total = time.perf_counter() - t0

    from aphq_cli.artifacts import atomic_write_text

    out = args.out
    this = {"argv": sys.argv[1:] if argv is None else argv, "machine": machine(args.device), "started": started,
            "seconds": round(total, 1), "models": args.models, "variant": args.variant, "commit": commit(args.code)}
    steps, commands, checkpoints = list(bench.steps), [this], dict(bench.checkpoints)
    if args.merge and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        # A row measured again (same model, variant, label and seed) replaces the old one; every other row
        # stays, so that seeds or methods measured by separate commands add up to one table.
        fresh = {step_key(s) for s in steps}
        kept = [s for s in (Step(**s) for s in old["steps"]) if step_key(s) not in fresh]
        steps = kept + steps
        commands = [c for c in old["commands"] if c["argv"] != this["argv"] or c.get("commit") != this["commit"]]
        commands += [this]
        checkpoints = old.get("checkpoints", {}) | checkpoints
    summary = summarize(steps)
    png = out.with_suffix(".png")
    plot(summary, png)
    text = write_markdown(args, steps, summary, commands, checkpoints).replace("results.png", png.name)
    reading = kept_reading(out)
    atomic_write_text(out, text + ("\n" + reading if reading else ""))
    atomic_write_text(out.with_suffix(".json"), json.dumps(
        {"commands": commands, "checkpoints": checkpoints, "summary": summary,
         "steps": [asdict(s) for s in steps]}, indent=2) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
