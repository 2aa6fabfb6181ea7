"""What the paper's models cost at COCO size: time, memory and disk of every stage; writes docs/scale.md.

    .venv/bin/python benchmarks/scale.py                                   # 1333x800, both models (hours on a CPU)
    .venv/bin/python benchmarks/scale.py --models cascade-mask-rcnn-swin-s --images 2 --merge  # one model's rows
    .venv/bin/python benchmarks/scale.py --size 320x224 --images 2 --iters 2 --models mask-rcnn-swin-t \\
        --out /tmp/scale.md                                                # a smoke run: minutes

For each model (seeded random weights written to a checkpoint, as a user
passes ``--checkpoint``) on synthetic COCO-layout images of exactly
``--size`` pixels, every stage runs as its own ``python -m aphq_cli``
process, as a user chains them: eval (float), mlp-recon, calibrate,
reconstruct --loss aph, export, eval of the export. Per stage it records
wall time, the process's peak resident memory (``os.wait4``), the bytes the
run folder and ``$APHQ_CACHE`` hold at their fullest (polled) and at the end,
and, from the stage's plain progress lines, seconds per iteration of each
reconstruction unit and per image of each APH estimate. Each ``--images``
count is a separate chain (fresh run folder and cache), so two counts show
whether memory stays flat as images double. From the measured per-image
cache sizes (``RUN/<stage>/disk_plan.json``) and per-iteration times the
report extrapolates the published schedule (256 images x 20000 iterations
per unit).

At a size other than 1333x800 the model is a config file inheriting the
built-in one with only the test pipeline's scale changed (so ``--trust-config``
is passed to later stages); the architecture is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the package from this checkout

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from aphq_cli.data.synth import CLASSES, SynthSpec, generate  # noqa: E402
from benchmarks.run import kept_reading  # noqa: E402
from aphq_cli.diskplan import (aph_plan, folder_bytes, joint_plan, mlp_plan, per_image_shapes,  # noqa: E402
                               reconstruct_plan)
from aphq_cli.models.heads import head_units  # noqa: E402
from aphq_cli.models.plan import units_of  # noqa: E402
from aphq_cli.models.zoo import build_model, load_config, resolve_model  # noqa: E402
from stages.reconstruct import head_plan_of  # noqa: E402

MODELS = ("mask-rcnn-swin-t", "cascade-mask-rcnn-swin-s")
PAPER_MODELS = ("mask-rcnn-swin-t", "mask-rcnn-swin-s", "cascade-mask-rcnn-swin-t", "cascade-mask-rcnn-swin-s")
# The largest input the COCO test pipeline makes: 1333x800 kept within, padded to a multiple of 32.
COCO_CANVAS = (1344, 800)
COCO_SIZE = (1333, 800)
PUBLISHED = {"images": 256, "iters": 20000}
# COCO's first category names: the detectors' CocoDataset matches annotation categories by name.
COCO_NAMES = ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train")
DONE_LINE = re.compile(r"^\S+ \S+ (?P<stage>[\w-]+): (?P<phase>.+): done, (?P<n>\d+) in (?P<clock>[\d:]+) "
                       r"\((?P<rate>[\d.e+-]+|\?)/s\)")


@dataclass
class Step:
    """One stage process."""

    model: str
    images: int
    stage: str
    argv: list[str]
    seconds: float
    peak_rss_mib: float
    run_peak_mib: float
    run_end_mib: float
    cache_peak_mib: float
    cache_end_mib: float
    phases: dict[str, dict] = field(default_factory=dict)  # phase -> {"n", "rate"} from the done lines


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--size must be WxH (e.g. 1333x800), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def coco_data(out: Path, size: tuple[int, int], train: int, val: int, seed: int = 0) -> Path:
    """A COCO-2017-layout folder of synthetic images of exactly ``size`` (width, height).

    The generator draws width and height per image from its sizes, so it
    renders until enough images have exactly this size; their categories are
    renamed to COCO's first names, which the full models' dataset matches.
    """
    out = Path(out)
    need = {"train": train, "val": val}
    try:  # one made before, with as many images as needed or more, serves (its first ones are taken)
        if all(len(json.loads((out / "annotations" / f"instances_{s}2017.json").read_text())["images"]) >= n
               for s, n in need.items()):
            return out
    except (OSError, ValueError, KeyError):
        pass
    # Fewer (a smaller --images before): the stages would quietly use what there is.
    shutil.rmtree(out, ignore_errors=True)
    width, height = size
    factor = 1 if width == height else 4  # one draw in four has (width, height) when they differ
    for attempt in range(6):
        spec = SynthSpec(seed=seed, num_train=max(1, factor * train * 2 ** attempt + 4),
                         num_val=max(1, factor * val * 2 ** attempt + 4), image_sizes=tuple(sorted({width, height})))
        src = generate(out.parent / f"{out.name}.synth-{spec.key()}", spec)
        coco = {s: json.loads((src / "annotations" / f"instances_{s}.json").read_text()) for s in need}
        kept = {s: [im for im in coco[s]["images"] if (im["width"], im["height"]) == (width, height)][:need[s]]
                for s in need}
        if all(len(kept[s]) == need[s] for s in need):
            break
    else:
        raise SystemExit(f"could not render {train}+{val} images of {width}x{height}")
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for s in need:
        folder = out / f"{s}2017"
        folder.mkdir(exist_ok=True)
        ids = {im["id"] for im in kept[s]}
        for im in kept[s]:
            link = folder / im["file_name"]
            if not link.exists():
                link.symlink_to(src / s / im["file_name"])
        cats = coco_categories(coco[s]["categories"])
        record = dict(coco[s], images=kept[s], categories=cats,
                      annotations=[a for a in coco[s]["annotations"] if a["image_id"] in ids])
        (out / "annotations" / f"instances_{s}2017.json").write_text(json.dumps(record))
    return out


def coco_categories(synthetic: list[dict]) -> list[dict]:
    """All 80 COCO categories in COCO's order, the synthetic ones holding the first names (and their ids).

    The full models predict 80 classes; with only the synthetic categories in
    the file, mmdet's COCO evaluation fails on the first prediction of a
    class the file lacks (a random-weight model makes many).
    """
    from mmdet.datasets import CocoDataset

    ids = {COCO_NAMES[CLASSES.index(c["name"])]: c["id"] for c in synthetic}
    spare = iter(range(max(ids.values()) + 1, 10_000))
    return [{"id": ids[name] if name in ids else next(spare), "name": name, "supercategory": "none"}
            for name in CocoDataset.CLASSES]


def scaled_config(model: str, size: tuple[int, int], out: Path) -> Path:
    """A config inheriting the built-in ``model`` whose test pipeline scales images to ``size``."""
    from aphq_cli.models.zoo import load_config, resolve_model  # mmdet import: only when a config is written

    spec = resolve_model(model)
    pipeline = load_config(spec).data.test.pipeline
    pipeline[1]["img_scale"] = tuple(size)
    out.write_text(f"# {model} with its test pipeline scaled to {size[0]}x{size[1]} (benchmarks/scale.py).\n"
                   f"_base_ = [{str(spec.config)!r}]\n"
                   f"test_pipeline = {list(pipeline)!r}\n"
                   "data = dict(calib=dict(pipeline=test_pipeline), val=dict(pipeline=test_pipeline), "
                   "test=dict(pipeline=test_pipeline))\n")
    return out


def random_checkpoint(model: str, out: Path, seed: int = 0) -> Path:
    """The model with seeded random weights, in the published .pth layout."""
    import torch

    from aphq_cli.models.checkpoint import save_checkpoint
    from aphq_cli.models.zoo import build_model, load_config, resolve_model

    if out.is_file():
        return out
    torch.manual_seed(seed)
    return save_checkpoint(build_model(load_config(resolve_model(model))), out, layout="original")


def run_step(model: str, images: int, stage: str, argv: list[str], run: Path, cache: Path, log: Path) -> Step:
    """Run one ``aphq`` command; poll the disk it uses while it runs."""
    env = dict(os.environ, APHQ_CACHE=str(cache), APHQ_PROGRESS_INTERVAL="100000")
    print("$ APHQ_CACHE=" + str(cache) + " aphq " + " ".join(argv), file=sys.stderr, flush=True)
    peaks = [0, 0]
    start = time.perf_counter()
    with open(log, "w") as sink:
        child = subprocess.Popen([sys.executable, "-m", "aphq_cli", *argv], cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=sink)
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)  # this child's own rusage once it ends
            peaks = [max(peaks[0], folder_bytes(run)), max(peaks[1], folder_bytes(cache))]
            if pid:
                break
            time.sleep(0.5)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if code != 0:
        raise SystemExit(f"step failed ({code}): aphq {' '.join(argv)}\n{text[-3000:]}")
    phases = {}
    for line in text.splitlines():
        m = DONE_LINE.match(line)
        if m:
            phases[m.group("phase")] = {"n": int(m.group("n")),
                                        "rate": None if m.group("rate") == "?" else float(m.group("rate"))}
    mib = 2 ** 20
    return Step(model, images, stage, argv, round(seconds, 1), round(usage.ru_maxrss / 1024, 1),
                round(peaks[0] / mib, 2), round(folder_bytes(run) / mib, 2), round(peaks[1] / mib, 2),
                round(folder_bytes(cache) / mib, 2), phases)


def chain(args, model: str, images: int, work: Path) -> list[Step]:
    """Every stage of one model at one image count, in a fresh run folder and cache."""
    size = args.size
    ckpt = random_checkpoint(model, work / f"{model}.pth", args.seed)
    data = coco_data(work / f"coco-{size[0]}x{size[1]}", size, max(args.images), args.eval_images)
    if tuple(size) == COCO_SIZE:
        model_arg, trust = model, []
    else:
        model_arg, trust = str(scaled_config(model, size, work / f"{model}-{size[0]}x{size[1]}.py")), ["--trust-config"]
    base = work / f"{model}-n{images}"
    run, cache, export = base / "run", base / "cache", base / "export.safetensors"
    # A chain left in --work by an earlier run would make every stage a cache hit and time nothing.
    shutil.rmtree(base, ignore_errors=True)
    for path in (run, cache):
        path.mkdir(parents=True)
    common = ["--model", model_arg, "--checkpoint", str(ckpt), "--data", str(data), "--device", args.device]
    counts = ["--images", str(images), "--iters", str(args.iters)]
    plan = [("eval", ["eval", *common, "--limit", str(args.eval_images)]),
            ("mlp-recon", ["mlp-recon", *common, "--run", str(run), *counts]),
            ("calibrate", ["calibrate", *common, "--run", str(run),
                           *(["--quant-config", str(args.quant_config)] if args.quant_config else [])]),
            ("reconstruct", ["reconstruct", "--run", str(run), "--loss", "aph", *counts, "--device", args.device,
                             *trust]),
            ("export", ["export", "--run", str(run), "--out", str(export), *trust]),
            # The export names its model itself (a scaled config file: trusted like the stages before).
            ("eval export", ["eval", "--artifact", str(export), "--data", str(data),
                             "--limit", str(args.eval_images), "--device", args.device, *trust])]
    steps = []
    for stage, argv in plan:
        if images != min(args.images) and stage in ("eval",):
            continue  # the float model does not depend on the image count
        step = run_step(model, images, stage, argv, run, cache, base / f"{stage.replace(' ', '-')}.log")
        if stage in ("mlp-recon", "reconstruct"):
            disk = run / stage.replace("-", "_") / "disk_plan.json"
            step.phases["disk_plan"] = json.loads(disk.read_text())
        steps.append(step)
    return steps


def unit_kind(phase: str) -> str | None:
    """The kind of a reconstruct unit phase (``unit 3/17 backbone.layers.0.blocks.1``): patch_embed, blocks of stage i, ..."""
    m = re.match(r"unit \d+/\d+ (\S+)$", phase)
    if not m:
        return None
    name = m.group(1)
    if (b := re.match(r"backbone\.layers\.(\d+)\.blocks\.\d+$", name)):
        return f"block (stage {b.group(1)})"
    if (d := re.match(r"backbone\.layers\.(\d+)\.downsample$", name)):
        return f"patch merging {d.group(1)}"
    return name.replace("backbone.", "")


def cost_model(steps: list[Step], images: int, iters: int) -> dict:
    """The published schedule extrapolated from one chain: seconds and bytes for ``images`` x ``iters``.

    Training: each unit's measured seconds per iteration x ``iters``. APH: each
    unit's seconds per image x ``images``. Caches: the predicted peak bytes
    scale with the image count (one file per image). What is left of the
    stage's wall time (model loading, cache fills) is scaled by images, an
    upper bound for its fixed part.
    """
    out = {}
    for stage, train_prefix in (("mlp-recon", "train "), ("reconstruct", "unit ")):
        step = next((s for s in steps if s.stage == stage), None)
        if step is None:
            continue
        train = aph = measured = 0.0
        for phase, info in step.phases.items():
            if phase == "disk_plan" or not info.get("rate"):
                continue
            if phase.startswith(train_prefix):
                train += iters / info["rate"]
                measured += info["n"] / info["rate"]
            elif phase.startswith("APH "):
                aph += images / info["rate"]
                measured += info["n"] / info["rate"]
        other = max(0.0, step.seconds - measured) * images / step.images
        plan = step.phases["disk_plan"]
        caches = {k: v["peak_bytes"] * images / plan["images"] for k, v in plan.items() if isinstance(v, dict)}
        out[stage] = {"train_s": train, "aph_s": aph, "other_s": other, "total_s": train + aph + other,
                      "cache_bytes": caches}
    return out


def published_disk(model: str, images: int = PUBLISHED["images"], size: tuple[int, int] = COCO_CANVAS) -> dict:
    """The caches of the published schedule for ``model``, planned as the stages plan them (no compute).

    Every image at the largest canvas (an upper bound: a 640x480 COCO image
    becomes 1088x800). The unit shapes come from a shape-only pass on the
    meta device (:func:`~aphq_cli.diskplan.per_image_shapes`); the bytes are
    those the stages' own planners predict, exact per file.
    """
    fp = build_model(load_config(resolve_model(model)))
    names = [n for n, _ in units_of(fp)]
    blocks = [n for n in names if ".blocks." in n]
    img = torch.empty(1, 3, size[1], size[0], device="meta")
    ios = per_image_shapes(fp, names, [img] * images, extra={f"{n}.mlp": f"{n}.mlp" for n in blocks})
    key = "0" * 16
    backbone = [n for n in names if n != "neck"]
    aph = aph_plan(Path("aph"), backbone, ios)
    found = {"units": len(names), "aph": aph.peak, "mlp cache": mlp_plan(Path("mlp"), blocks, ios, key).peak,
             "mlp cache kept": mlp_plan(Path("mlp"), blocks, ios, key, keep=True).peak}
    heads = [h.name for h in head_units(fp)]
    for itemsize, dtype in ((4, "float32"), (2, "float16")):
        unit = reconstruct_plan(Path("unit"), names, ios, key, "aph", itemsize=itemsize)
        found[f"unit cache {dtype}"] = unit.peak
        # With --heads (beyond the paper): the neck's inputs stay for the heads, which add their own entries.
        found[f"unit cache {dtype} heads"] = reconstruct_plan(
            Path("unit"), names, ios, key, "aph", itemsize=itemsize,
            heads=head_plan_of(fp, ios, heads, key, itemsize)).peak
        for drop, how in ((False, "kept"), (True, "dropped")):
            # Both caches on one disk, APH maps already made (by mlp-recon): what reconstruct needs free.
            both = joint_plan(unit, aph, names, ios, key, "aph", itemsize, drop_aph=drop, aph_complete=aph.entries)
            found[f"both {dtype} aph {how}"] = both.peak
    return found


def unit_flops(model: str, size: tuple[int, int] = COCO_CANVAS) -> dict[str, dict[str, float]]:
    """FLOPs of one reconstruction iteration of every unit of ``model`` at ``size`` (and of each block's MLP).

    Each unit (and MLP) alone, fed the inputs a shape-only float pass gave it:
    one forward and one backward pass with gradients for its weights (as its
    rounding variables need) and none for its input, as in an iteration,
    counted by :class:`torch.utils.flop_counter.FlopCounterMode`: matrix
    products and convolutions only (the quantizers' elementwise work is not
    counted). On the meta device: seconds, no weights or images.

    Returns:
        ``{unit name: {"unit": flops, "mlp": flops of its MLP (blocks only)}}``.
    """
    meta = build_model(load_config(resolve_model(model))).to("meta")  # only shapes are needed: no copy kept
    names = [name for name, _ in units_of(meta)]
    targets = names + [f"{n}.mlp" for n in names if ".blocks." in n]
    inputs: dict[str, tuple] = {}

    def detached(value):
        if isinstance(value, torch.Tensor):
            return value.detach()
        return type(value)(detached(v) for v in value) if isinstance(value, (list, tuple)) else value

    def keep(name: str):
        def hook(module, args, kwargs, out) -> None:  # returns nothing: the output stays
            inputs.setdefault(name, (detached(args), detached(kwargs)))
        return hook

    handles = [meta.get_submodule(name).register_forward_hook(keep(name), with_kwargs=True) for name in targets]
    try:
        with torch.no_grad():
            meta.extract_feat(torch.empty(1, 3, size[1], size[0], device="meta"))
    finally:
        for h in handles:
            h.remove()

    def flops(name: str) -> float:
        args, kwargs = inputs[name]
        with FlopCounterMode(display=False) as counter:
            out = meta.get_submodule(name)(*args, **kwargs)
            outs = out if isinstance(out, (list, tuple)) else [out]
            sum(o.sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad).backward()
        return counter.get_total_flops()
    return {name: {"unit": flops(name)} | ({"mlp": flops(f"{name}.mlp")} if ".blocks." in name else {})
            for name in names}


def flops_table() -> list[str]:
    """Markdown: GFLOPs per iteration per unit kind, and the published schedule's total, for the four models."""
    iters = PUBLISHED["iters"]
    lines = ["### FLOPs per iteration, for a GPU's arithmetic", "",
             f"Counted at {COCO_CANVAS[0]}x{COCO_CANVAS[1]} by `torch.utils.flop_counter` (`unit_flops` in this "
             "script): one forward and backward pass of the unit alone (gradients for its weights, none for its "
             "input), matrix products and convolutions only (the fake quantizers add elementwise work on top). "
             f"The schedule's total is every unit's iterations (reconstruct: {iters} per unit) and, for "
             f"mlp-recon, every block's MLP's ({iters} per block). A GPU's hours for the iterations are about "
             "that total divided by the FLOP rate it sustains on these shapes: at 10 TFLOP/s sustained, 1 PFLOP "
             "is 100 s (arithmetic, not a measurement).", "",
             "| model | unit kind | units | GFLOP / iteration | MLP GFLOP / iteration (mlp-recon) |",
             "|---|---|---:|---:|---:|"]
    totals = []
    for model in PAPER_MODELS:
        found = unit_flops(model)
        kinds: dict[str, list[dict[str, float]]] = {}
        for name, f in found.items():
            kinds.setdefault(unit_kind(f"unit 1/1 {name}"), []).append(f)
        for kind, fs in kinds.items():
            mlp = f"{sum(f['mlp'] for f in fs) / len(fs) / 1e9:.1f}" if "mlp" in fs[0] else "-"
            lines.append(f"| {model} | {kind} | {len(fs)} | {sum(f['unit'] for f in fs) / len(fs) / 1e9:.1f} | "
                         f"{mlp} |")
        recon = sum(f["unit"] for f in found.values()) * iters / 1e15
        mlp = sum(f.get("mlp", 0) for f in found.values()) * iters / 1e15
        totals.append(f"| {model} | {recon:.0f} PFLOP | {mlp:.0f} PFLOP |")
    return lines + ["", "| model | reconstruct iterations, published schedule | mlp-recon iterations |",
                    "|---|---:|---:|", *totals]


def disk_table() -> list[str]:
    """Markdown: the published schedule's caches for the paper's four models."""
    w, h = COCO_CANVAS
    lines = [f"## Disk of the published schedule ({PUBLISHED['images']} images, each at {w}x{h})", "",
             "Planned by the stages' own disk planners (`aphq_cli/diskplan.py`, exact per file) from a shape-only "
             "pass; no weights or images needed. The APH cache is float16; the unit cache float32 (default) or "
             "float16 (`cache_dtype`). reconstruct's two caches on one disk, with the APH maps made beforehand (by "
             "mlp-recon): each unit's APH maps go once it is done (the default), and the two together peak at the "
             "first Swin block, below the sum of their peaks; with `--keep-aph-cache` every APH map is still on "
             "disk when the unit cache peaks at the FPN (its inputs are the largest entries). mlp-recon holds "
             "the APH cache and its MLP cache (float32), one block's entry at a time: made just before the block "
             "trains, removed after it (every block's with `--keep-cache`, in brackets). With `--heads` (beyond "
             "the paper) the head units make the FPN's outputs from the neck's inputs, which stay on disk until the "
             "end; their own entries (the float model's RoIs, each head's outputs) are planned at the most RoIs "
             "the test configs allow (1000 proposals, 100 detections per image).",
             "", "| model | units | APH (float16) | unit cache peak, float32 / float16 | reconstruct, both caches, "
             "float32 / float16 | the same with `--keep-aph-cache` | unit cache peak with `--heads`, "
             "float32 / float16 | mlp-recon MLP cache (kept) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model in PAPER_MODELS:
        d = published_disk(model)
        gb = {k: v / 1e9 for k, v in d.items()}
        lines.append(f"| {model} | {d['units']} | {gb['aph']:.1f} GB | {gb['unit cache float32']:.1f} / "
                     f"{gb['unit cache float16']:.1f} GB | {gb['both float32 aph dropped']:.1f} / "
                     f"{gb['both float16 aph dropped']:.1f} GB | {gb['both float32 aph kept']:.1f} / "
                     f"{gb['both float16 aph kept']:.1f} GB | {gb['unit cache float32 heads']:.1f} / "
                     f"{gb['unit cache float16 heads']:.1f} GB | {gb['mlp cache']:.1f} "
                     f"({gb['mlp cache kept']:.1f}) GB |")
    return lines


def with_disk_section(text: str, section: str, reading: str) -> str:
    """``text`` (a scale.md) with its disk section replaced by ``section``; the measured tables stay."""
    start = text.find("## Disk of the published schedule")
    if start < 0:
        return "\n".join(["# Cost at scale", "", section]) + reading
    end = text.find("\n## ", start + 1)
    return text[:start] + section + (text[end + 1:] if end >= 0 else reading)


def earlier_run(out: Path, models, images=None) -> tuple[list[Step], list[str]]:
    """The steps (from ``out``'s .json) and commands (from its Commands block) of an earlier run that are
    about none of ``models`` (with ``images``: none of those models' chains of these image counts):
    what ``--merge`` keeps."""
    data = out.with_suffix(".json")
    if not data.exists():
        return [], []

    def measured(model: str, count: int | None) -> bool:
        return model in models and (images is None or count in images)

    steps = [Step(**s) for s in json.loads(data.read_text()) if not measured(s["model"], s["images"])]
    text = out.read_text() if out.exists() else ""
    block = text.split("## Commands", 1)[1].split("```")[1] if "## Commands" in text else ""
    named = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, models)) + r")(?![\w-])")  # not a longer name
    chain_dir = re.compile(r"/([\w.-]+)-n(\d+)/")
    commands = []
    for line in block.splitlines():
        if not line.startswith("$ ") or "--disk-only" in line:
            continue
        folder = chain_dir.search(line)
        if folder:  # a stage of one chain
            gone = measured(folder.group(1), int(folder.group(2)))
        else:  # a benchmark command, or the float eval: kept while any of its rows are
            gone = bool(named.search(line)) and images is None
        if not gone:
            commands.append(line)
    return steps, commands


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def twin(model: str) -> str:
    """The paper model with ``model``'s backbone and the other detector (``mask-rcnn-swin-t`` <-> ``cascade-...``).

    mlp-recon and reconstruct (without --heads) touch the backbone and the FPN only, and their APH task
    loss is the RPN's: the two have the same units, shapes and task, so one's measured chain prices the
    other's published schedule.
    """
    return model.removeprefix("cascade-") if model.startswith("cascade-") else "cascade-" + model


def schedule_table(steps: list[Step]) -> list[str]:
    """Markdown: the published schedule's time and caches per model, from each model's largest chain.

    A paper model without a chain of its own is priced from its twin's (:func:`twin`), and says so.
    """
    lines = [f"## The published schedule ({PUBLISHED['images']} images x {PUBLISHED['iters']} iterations per unit)",
             "", "Extrapolated from the largest image count above: training = each unit's s/iteration x "
             "iterations, APH = s/image x images, the rest of the stage's wall time scaled by images (an upper "
             "bound); caches = the stage's predicted peak (`RUN/<stage>/disk_plan.json`, exact per image) x images. "
             "A model not rehearsed is priced from the one with its backbone (these two stages touch the "
             "backbone and FPN only, with the RPN's task loss).",
             "", "| model | stage | training | APH | rest | total | cache peaks |", "|---|---|---:|---:|---:|---:|---|"]
    measured = list(dict.fromkeys(s.model for s in steps))
    priced = measured + [m for m in PAPER_MODELS if m not in measured and twin(m) in measured]
    for model in priced:
        source = model if model in measured else twin(model)
        most = max(s.images for s in steps if s.model == source)
        mine = [s for s in steps if s.model == source and s.images == most]
        label = model if source == model else f"{model} (as {source}: the same units)"
        for stage, c in cost_model(mine, PUBLISHED["images"], PUBLISHED["iters"]).items():
            caches = ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in c["cache_bytes"].items())
            lines.append(f"| {label} | {stage} | {hours(c['train_s'])} | {hours(c['aph_s'])} | "
                         f"{hours(c['other_s'])} | {hours(c['total_s'])} | {caches} |")
    return lines


def write_markdown(args, steps: list[Step], commands: list[str]) -> str:
    w, h = args.size
    lines = [f"# Cost at scale: {w}x{h} images", "",
             f"Measured by `benchmarks/scale.py` on {platform.node()} ({os.cpu_count()} CPUs, {args.device}), "
             f"{time.strftime('%Y-%m-%d')}: seeded random weights, synthetic images of exactly {w}x{h}, "
             f"{args.iters} iterations per unit. Every stage is its own process; RSS is its peak resident "
             "memory, disk the most the run folder / `$APHQ_CACHE` held while it ran (and at its end)."
             + (" Only the rows of " + ", ".join(args.models) + " with "
                + " and ".join(map(str, sorted(set(args.images)))) + " images are this run's; the others "
                "come from earlier runs (`--merge`; their commands are below)."
                if args.merge else ""), "",
             "| model | images | stage | wall s | peak RSS MiB | run peak / end MiB | cache peak / end MiB |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for s in steps:
        lines.append(f"| {s.model} | {s.images} | {s.stage} | {s.seconds} | {s.peak_rss_mib} | "
                     f"{s.run_peak_mib} / {s.run_end_mib} | {s.cache_peak_mib} / {s.cache_end_mib} |")
    lines += ["", "## Seconds per iteration per unit kind (reconstruct) and per APH image", "",
              "| model | images | unit kind | units | s / iteration | APH s / image |", "|---|---:|---|---:|---:|---:|"]
    for s in (s for s in steps if s.stage == "reconstruct"):
        kinds: dict[str, dict] = {}
        for phase, info in s.phases.items():
            kind = unit_kind(phase)
            if kind and info.get("rate"):
                k = kinds.setdefault(kind, {"units": 0, "it": [], "aph": []})
                k["units"] += 1
                k["it"].append(1 / info["rate"])
                aph = s.phases.get("APH " + phase.split(" ", 2)[2], {})
                if aph.get("rate"):
                    k["aph"].append(1 / aph["rate"])
        for kind, k in kinds.items():
            aph = f"{sum(k['aph']) / len(k['aph']):.3g}" if k["aph"] else "-"
            lines.append(f"| {s.model} | {s.images} | {kind} | {k['units']} | {sum(k['it']) / len(k['it']):.3g} | {aph} |")
    lines += ["", *schedule_table(steps)]
    lines += ["", *disk_table(), "", *flops_table()]
    lines += ["", "## Commands", "", "```bash", *commands, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--size", type=parse_size, default=COCO_SIZE, help="image size WxH (default 1333x800)")
    # The smallest counts that still measure every unit kind (those docs/scale.md was measured with).
    ap.add_argument("--images", type=int, nargs="+", default=[2, 4],
                    help="reconstruction images per chain; two counts show whether memory stays flat (default 2 4)")
    ap.add_argument("--iters", type=int, default=2, help="iterations per unit (default 2: a rate needs two)")
    ap.add_argument("--eval-images", type=int, default=1, help="images evaluated (default 1)")
    ap.add_argument("--quant-config", type=Path, help="settings file for calibrate (a fast search for a smoke run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "scale", help="runs, caches, data, checkpoints")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "scale.md")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows and commands of an earlier run in --out (its .json) of other models, "
                         "or of these models at other image counts")
    ap.add_argument("--disk-only", action="store_true",
                    help="only plan the published schedule's disk and count its FLOPs for the four models "
                         "(seconds; no stage runs)")
    args = ap.parse_args(argv)
    command = "$ .venv/bin/python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
    reading = kept_reading(args.out)  # the hand-written "## Reading" at the end stays
    if args.disk_only:
        section = "\n".join([*disk_table(), "", *flops_table(), "", "```bash", command, "```", "", ""])
        args.out.write_text(with_disk_section(args.out.read_text() if args.out.exists() else "", section, reading))
        print(args.out)
        return 0
    if args.iters < 2 or min(args.images) < 2:
        ap.error("--iters and --images must be at least 2 (a rate needs two reports)")
    args.work.mkdir(parents=True, exist_ok=True)
    steps: list[Step] = []
    for model in args.models:
        for images in sorted(set(args.images)):
            steps += chain(args, model, images, args.work)
    commands = [command]
    commands += ["$ aphq " + " ".join(s.argv) for s in steps]
    if args.merge:
        kept_steps, kept_commands = earlier_run(args.out, args.models, set(args.images))
        steps, commands = kept_steps + steps, kept_commands + commands
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(write_markdown(args, steps, commands) + reading)
    args.out.with_suffix(".json").write_text(json.dumps([asdict(s) for s in steps], indent=1))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
