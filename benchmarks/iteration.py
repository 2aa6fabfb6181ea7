"""Time one reconstruction iteration per unit kind, split into its parts (issue #23).

For each unit kind (a stage-1 Swin block, a stage-3 block, a patch merging,
the FPN) of the testbed model at its image size and of a full-size Swin-T
Mask R-CNN at COCO size, this runs aphq's own loop
(:func:`stages.reconstruct.reconstruct_unit`) with a timer around each part of
an iteration: ``read`` (the cache entries of the image: float input,
quantized-model input, target, APH map), ``mix`` (QDrop), ``forward``,
``loss``, ``backward``, ``step``. The entries are real files in a
:class:`~aphq_cli.tensorcache.TensorCache`, as in the stage, so the cache read
is timed too.

Weights are the testbed's own (tiny-mask-rcnn) or seeded random ones (Swin-T,
whose published checkpoint a test machine does not have); inputs are the
float model's own activations of a synthetic image. The quantizers get a
min/max calibration of those activations: the time of an iteration does not
depend on where the scales lie, and the real search would take minutes at
full size.

    python benchmarks/iteration.py                       # both sizes, writes docs/speed-profile.md
    python benchmarks/iteration.py --sizes testbed --iters 20 --out -
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

from aphq_cli.models.plan import quantize_model, units_of  # noqa: E402
from aphq_cli.models.zoo import build_model, load_config, load_model, resolve_model  # noqa: E402
from aphq_cli.quant.calib import minmax_calibrate  # noqa: E402
from aphq_cli.tensorcache import TensorCache  # noqa: E402
from stages.reconstruct import PARTS, ReconstructConfig, reconstruct_unit  # noqa: E402

# (label, model, image height, image width): the testbed at its own size, Swin-T at COCO's 1333x800.
SIZES = {
    "testbed": ("tiny-mask-rcnn", 256, 256),
    "swin-t": ("mask-rcnn-swin-t", 800, 1344),  # 1333 padded to the size divisor 32, as the test pipeline does
}
# Unit kind -> its name in units_of() (the stage-1 and stage-3 block: the first of each stage).
KINDS = {
    "stage-1 block": "backbone.layers.0.blocks.0",
    "stage-3 block": "backbone.layers.2.blocks.1",
    "patch merging": "backbone.layers.0.downsample",
    "FPN": "neck",
}


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


def profile_size(label: str, iters: int, rounds: int, images: int, device: str) -> list[dict]:
    model_name, h, w = SIZES[label]
    fp = detector(model_name)
    q = quantize_model(detector(model_name), 4, 4)
    torch.manual_seed(0)
    image = torch.randn(1, 3, h, w)  # the activations' scale matters, not their content
    io = unit_inputs(fp, list(KINDS.values()), image)
    units = dict(units_of(q))
    rows = []
    for kind, name in KINDS.items():
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
        print(f"{label:8s} {kind:14s} {result['s_per_iter'] * 1e3:9.1f} ms/iter  "
              + " ".join(f"{p} {v * 1e3:.1f}" for p, v in result["parts"].items()), flush=True)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = ["| size | unit kind | input | ms / iteration | " + " | ".join(PARTS) + " |",
             "|---|---|---|---:|" + "---:|" * len(PARTS)]
    for r in rows:
        shares = " | ".join(f"{r['parts'][p] * 1e3:.1f} ({100 * r['parts'][p] / r['s_per_iter']:.0f} %)"
                            for p in PARTS)
        lines.append(f"| {r['size']} ({r['image']}) | {r['kind']} | {'x'.join(map(str, r['input']))} | "
                     f"{r['s_per_iter'] * 1e3:.1f} | {shares} |")
    machine = (f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
               f"Python {platform.python_version()}")
    return f"`{command}` ({machine}):\n\n" + "\n".join(lines) + "\n"


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
    rows = [r for label in args.sizes for r in profile_size(label, args.iters, args.rounds, args.images, args.device)]
    text = markdown(rows, command.strip())
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.out not in (None, "-"):
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
