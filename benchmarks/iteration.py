"""Time one reconstruction iteration per unit kind, split into its parts (issue #23).

For each unit kind (the patch embedding, a Swin block of each stage, each
patch merging, the FPN) of the testbed model at its image size and of a
full-size Swin-T Mask R-CNN at COCO size, this runs aphq's own loop
(:func:`stages.reconstruct.reconstruct_unit`) with a timer around each part of
an iteration: ``read`` (the cache entries of the image: float input,
quantized-model input, target, APH map), ``mix`` (QDrop), ``forward``,
``loss``, ``backward``, ``step``. The entries are real files in a
:class:`~aphq_cli.tensorcache.TensorCache`, as in the stage, so the cache read
is timed too. From the times and the number of units of each kind it adds
up the iterations of the published schedule (20000 per unit).

Weights are the testbed's own (tiny-mask-rcnn) or seeded random ones (Swin-T,
whose published checkpoint a test machine does not have); inputs are the
float model's own activations of a synthetic image. The quantizers get a
min/max calibration of those activations: the time of an iteration does not
depend on where the scales lie, and the real search would take minutes at
full size.

    python benchmarks/iteration.py --out docs/speed-profile.md   # both sizes
    python benchmarks/iteration.py --sizes testbed --iters 20      # print only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aphq_cli.allocator import retain_freed_memory  # noqa: E402
from aphq_cli.models.plan import quantize_model, units_of  # noqa: E402
from aphq_cli.models.zoo import build_model, load_config, load_model, resolve_model  # noqa: E402
from aphq_cli.quant.calib import minmax_calibrate  # noqa: E402
from aphq_cli.tensorcache import TensorCache  # noqa: E402
from stages.reconstruct import PARTS, ReconstructConfig, reconstruct_unit  # noqa: E402

PUBLISHED_ITERS = 20000  # per unit (method.md §8)
# (label, model, image height, image width): the testbed at its own size, Swin-T at COCO's 1333x800.
SIZES = {
    "testbed": ("tiny-mask-rcnn", 256, 256),
    "swin-t": ("mask-rcnn-swin-t", 800, 1344),  # 1333 padded to the size divisor 32, as the test pipeline does
}


def unit_kind(name: str) -> str:
    """The kind a unit of units_of() times as: one Swin block per stage (the blocks of a stage share
    their shapes), each patch merging, the patch embedding, the FPN."""
    if name == "neck":
        return "FPN"
    if name.endswith("patch_embed"):
        return "patch embedding"
    stage = int(name.split(".")[2]) + 1
    return f"stage-{stage} merging" if name.endswith("downsample") else f"stage-{stage} block"


def kinds(units: list[str]) -> dict[str, str]:
    """Each kind and the unit that stands for it (the stage's first block: no shift, the
    shifted ones cost the same but for the mask add)."""
    first: dict[str, str] = {}
    for name in units:
        first.setdefault(unit_kind(name), name)
    return first


def detector(model: str, seed: int = 0) -> torch.nn.Module:
    """The testbed's weights, or seeded random ones for a model without bundled weights."""
    spec = resolve_model(model)
    if spec.weights is not None:
        return load_model(spec)[0]
    torch.manual_seed(seed)
    return build_model(load_config(spec))


def unit_inputs(model: torch.nn.Module, names: list[str], image: torch.Tensor) -> dict[str, tuple]:
    """Each named unit's (input, output) on one float forward pass of ``image``."""
    seen: dict[str, tuple] = {}

    def keep(name: str):
        def hook(module, args, out) -> None:  # returns None: the output is left as it is
            seen.setdefault(name, (args[0], out))
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        with torch.no_grad():
            model.neck(model.backbone(image))
    finally:
        for h in hooks:
            h.remove()
    return seen


class DiskCaches:
    """The reads of one unit's iteration, from real cache files: float input, quantized input, target."""

    def __init__(self, root: Path, x, y, count: int, seed: int = 0) -> None:
        self.cache, self.count = TensorCache(root), count
        gen = torch.Generator().manual_seed(seed)
        xs = list(x) if isinstance(x, (list, tuple)) else [x]
        ys = list(y) if isinstance(y, (list, tuple)) else [y]
        for i in range(count):  # each image its own files, as in the stage; the quantized input is a noisy copy
            self.cache.put("fp", i, {f"t{j}": t for j, t in enumerate(xs)})
            self.cache.put("q", i, {f"t{j}": t + 0.05 * t.std() * torch.randn(t.shape, generator=gen)
                                    for j, t in enumerate(xs)})
            self.cache.put("y", i, {f"t{j}": t for j, t in enumerate(ys)})
            self.cache.put("aph", i, {"aph": torch.rand(ys[0].shape, generator=gen) + 0.5})

    def _read(self, entry: str, i: int):
        d = self.cache.get(entry, i)
        items = [d[f"t{j}"] for j in range(len(d))]
        return items[0] if len(items) == 1 else items

    def fp_in(self, k: int, i: int):
        return self._read("fp", i)

    def q_in(self, k: int, i: int):
        return self._read("q", i)

    def target(self, k: int, i: int):
        return self._read("y", i)

    def aph(self, i: int) -> torch.Tensor:
        return self.cache.get("aph", i)["aph"]


class PartTimer:
    """``timer(part)`` for reconstruct_unit: wall seconds per part, per iteration."""

    def __init__(self, device: str) -> None:
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, part: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[part] += time.perf_counter() - start


def profile_unit(unit, caches: DiskCaches, loss: str, iters: int, rounds: int, device: str) -> dict:
    """Median seconds per iteration over ``rounds`` runs of ``iters`` iterations, and each part's share."""
    state = {k: v.clone() for k, v in unit.state_dict().items()}
    weights = (lambda i: caches.aph(i)) if loss == "aph" else (lambda i: None)
    totals, parts = [], defaultdict(list)
    for r in range(rounds + 1):  # round 0 warms up
        unit.load_state_dict(state)
        timer = PartTimer(device)
        start = time.perf_counter()
        reconstruct_unit(unit, caches, 1, weights, ReconstructConfig(loss=loss, iters=iters), seed=r, timer=timer)
        if r:
            totals.append((time.perf_counter() - start) / iters)
            for p in PARTS:
                parts[p].append(timer.seconds[p] / iters)
    unit.load_state_dict(state)
    return {"s_per_iter": statistics.median(totals), "parts": {p: statistics.median(v) for p, v in parts.items()}}


def profile_size(label: str, iters: int, rounds: int, images: int, device: str) -> tuple[list[dict], dict]:
    """Every unit kind of one model at one size; also the number of units of each kind."""
    model_name, h, w = SIZES[label]
    fp = detector(model_name).to(device)
    q = quantize_model(detector(model_name), 4, 4).to(device)
    names = [n for n, _ in units_of(q)]
    torch.manual_seed(0)
    image = torch.randn(1, 3, h, w, device=device)  # the activations' scale matters, not their content
    chosen = kinds(names)
    io = unit_inputs(fp, list(chosen.values()), image)
    units = dict(units_of(q))
    rows = []
    for kind, name in chosen.items():
        x, y = io[name]
        unit = units[name]
        minmax_calibrate(unit, x)
        with tempfile.TemporaryDirectory() as tmp:
            caches = DiskCaches(Path(tmp), x, y, images)
            loss = "mse" if name == "neck" else "aph"  # the FPN's loss is plain MSE (method.md §4)
            result = profile_unit(unit, caches, loss, iters, rounds, device)
        first = x[0] if isinstance(x, (list, tuple)) else x
        rows.append({"size": label, "model": model_name, "image": f"{w}x{h}", "kind": kind, "unit": name,
                     "input": list(first.shape), "loss": loss} | result)
        print(f"{label:8s} {kind:16s} {result['s_per_iter'] * 1e3:9.1f} ms/iter  "
              + " ".join(f"{p} {v * 1e3:.1f}" for p, v in result["parts"].items()), flush=True)
    counts: dict[str, int] = {}
    for name in names:
        counts[unit_kind(name)] = counts.get(unit_kind(name), 0) + 1
    return rows, counts


def schedule_hours(rows: list[dict], counts: dict[str, int], iters: int) -> float:
    """Hours of reconstruction iterations for ``iters`` per unit (no cache filling, no APH estimates)."""
    per_kind = {r["kind"]: r["s_per_iter"] for r in rows}
    return sum(per_kind[k] * n for k, n in counts.items()) * iters / 3600


def markdown(rows: list[dict], schedules: dict[str, tuple[dict, float]], command: str,
             malloc_retained: bool) -> str:
    lines = ["| size | unit kind | input | ms / iteration | " + " | ".join(PARTS) + " | other |",
             "|---|---|---|---:|" + "---:|" * (len(PARTS) + 1)]
    for r in rows:
        parts = dict(r["parts"]) | {"other": r["s_per_iter"] - sum(r["parts"].values())}  # the loop's own
        shares = " | ".join(f"{v * 1e3:.1f} ({100 * v / r['s_per_iter']:.0f} %)" for v in parts.values())
        lines.append(f"| {r['size']} ({r['image']}) | {r['kind']} | {'x'.join(map(str, r['input']))} | "
                     f"{r['s_per_iter'] * 1e3:.1f} | {shares} |")
    machine = (f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
               f"Python {platform.python_version()}, malloc {'retained' if malloc_retained else 'default'}")
    text = f"`{command}` ({machine}):\n\n" + "\n".join(lines) + "\n"
    for label, (counts, hours) in schedules.items():
        units = ", ".join(f"{n} x {k}" for k, n in counts.items())
        text += (f"\nThe published schedule's iterations (20000 per unit) for {SIZES[label][0]} at "
                 f"{SIZES[label][2]}x{SIZES[label][1]} ({units}): **{hours:.1f} hours** here, from the times above.\n")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--iters", type=int, default=10, help="iterations per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median), after one warm-up round")
    parser.add_argument("--images", type=int, default=2, help="cached images the iterations cycle through")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--out", default=None, help="write the markdown table here ('-': stdout only)")
    args = parser.parse_args(argv)
    command = "python benchmarks/iteration.py " + " ".join(argv if argv is not None else sys.argv[1:])
    retained = retain_freed_memory()  # as the aphq command does at its start ($APHQ_MALLOC=default: not)
    rows, schedules = [], {}
    for label in args.sizes:
        measured, counts = profile_size(label, args.iters, args.rounds, args.images, args.device)
        rows += measured
        schedules[label] = (counts, schedule_hours(measured, counts, PUBLISHED_ITERS))
    text = markdown(rows, schedules, command.strip(), retained)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.out not in (None, "-"):
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
