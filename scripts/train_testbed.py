"""Train a testbed detector on the synthetic dataset, on CPU, and bundle its weights.

    .venv/bin/python scripts/train_testbed.py --model tiny-mask-rcnn --iters 3000 --lr 8e-4 --warmup 200
    .venv/bin/python scripts/train_testbed.py --model tiny-cascade-mask-rcnn --iters 300 --lr 6e-4 \
        --warmup 30 --init aphq_cli/models/weights/tiny-mask-rcnn.safetensors

Writes ``aphq_cli/models/weights/<model>.safetensors`` (float16 to keep the
repository small; the models run in float32) and ``<model>.json``, the record
of how it was made: command, seed, data spec, iterations, wall time, losses
and the FP box/mask AP on the synthetic val split. ``--init`` starts from
another testbed model's weights wherever names and shapes agree (the cascade
reuses the Mask R-CNN's backbone, FPN and RPN); it is repeatable, a later file
overriding an earlier one, and each is recorded with its hash and its own
record, so a chain of runs stays traceable. ``--spec FIELD=VALUE`` trains on
synthetic data with a SynthSpec field changed.

Long schedules can be split: ``--snapshot-every N`` saves weights, optimizer
state and the schedule position to ``<model>.snapshot.pt``, and the same
command with ``--resume <model>.snapshot.pt`` continues from there.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from aphq_cli.artifacts import atomic_write_text, sha256_file
from aphq_cli.console import err, metrics_table, progress_bar
from aphq_cli.data.coco import build_dataset, to_device
from aphq_cli.data.synth import SynthSpec, ensure_dataset
from aphq_cli.errors import AphqError
from aphq_cli.models.checkpoint import read_state_dict, save_checkpoint
from aphq_cli.models.zoo import WEIGHTS_DIR, build_model, load_config, resolve_model
from stages.eval import coco_metrics, run_inference


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 1 % of ``base``."""
    if step < warmup:
        return base * (0.1 + 0.9 * step / warmup)
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


def init_from(model: torch.nn.Module, path: Path) -> int:
    """Copy tensors whose names and shapes match; returns how many."""
    state, own = read_state_dict(path), model.state_dict()
    shared = {k: v.float() for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    return len(shared)


def plain_args(args: argparse.Namespace) -> dict:
    """The parsed arguments as JSON types (paths, also inside lists, as strings)."""
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v
    return {k: plain(v) for k, v in vars(args).items()}


def init_provenance(path: Path, reused: int) -> dict:
    """What an ``--init`` file was: its hash, how many tensors it gave, and its
    own training record (the ``.json`` beside it) when it has one, so a chain
    of runs stays traceable after the file itself is replaced."""
    beside = Path(path).with_suffix(".json")
    try:
        record = json.loads(beside.read_text())
    except (OSError, ValueError):
        record = None
    return {"path": str(path), "sha256": sha256_file(Path(path)), "tensors_reused": reused, "record": record}


def save_snapshot(path: Path, args, step: int, model, optim, history: list, seconds: float) -> None:
    """Everything needed to continue: weights, optimizer moments, schedule position.

    Written to a temporary file and renamed, so a run killed while saving
    leaves the previous snapshot whole.
    """
    state = {"model": args.model, "iters": args.iters, "iter": step, "state_dict": model.state_dict(),
             "optimizer": optim.state_dict(), "history": history, "train_seconds": seconds}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def resume_from(path: Path, args, model, optim) -> tuple[int, list, float]:
    """Load a snapshot into ``model`` and ``optim``; returns (iteration, history, seconds).

    The learning-rate schedule depends on ``--iters``, so a snapshot only
    continues the schedule it was made with. Data order after resuming differs
    from an uninterrupted run (the loader is reseeded with seed + iteration).
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("model", args.model) != args.model:
        raise SystemExit(f"error: {path} is a snapshot of {state['model']}, not {args.model}.")
    if state.get("iters", args.iters) != args.iters:
        raise SystemExit(f"error: {path} follows a {state['iters']}-iteration schedule; pass --iters {state['iters']}.")
    model.load_state_dict(state["state_dict"])
    if "optimizer" in state:  # snapshots from before this option hold weights only
        optim.load_state_dict(state["optimizer"])
    return state["iter"], state.get("history", []), state.get("train_seconds", 0.0)


def set_rcnn_samples(cfg, num: int) -> None:
    """Sample ``num`` RoIs per image in every RoI-head stage (one for Mask R-CNN, three for the cascade).

    Training only; the synthetic images hold at most 8 objects, so 256 keep the
    positives COCO's 512 would and make an iteration about a quarter cheaper.
    """
    rcnn = cfg.model.train_cfg.rcnn
    for stage in rcnn if isinstance(rcnn, list) else [rcnn]:
        stage.sampler.num = num


def quiet_mmcv_logger() -> None:
    """mmcv logs one paragraph per tensor from ``init_weights``: keep warnings only."""
    import logging

    from mmcv.utils import get_logger

    get_logger("mmcv").setLevel(logging.WARNING)


def train_loader(cfg, data_dir: Path, batch: int, workers: int, seed: int):
    from mmdet.datasets import build_dataloader
    from mmdet.datasets import build_dataset as mmdet_build

    from aphq_cli.data.coco import with_data_root

    split = with_data_root(cfg.data.train, data_dir, cfg.get("data_root"))
    dataset = mmdet_build(split)
    return build_dataloader(dataset, samples_per_gpu=batch, workers_per_gpu=workers, dist=False,
                            shuffle=True, seed=seed, persistent_workers=workers > 0)


def spec_with(changes: list[str]) -> SynthSpec:
    """The default SynthSpec with ``FIELD=VALUE`` changes (a tuple field takes ``a,b,c``)."""
    fields = SynthSpec().to_dict()
    for change in changes:
        name, sep, value = change.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--spec {change!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        kind = type(fields[name])
        try:
            fields[name] = [int(v) for v in value.split(",")] if kind is list else kind(value)
        except ValueError:
            want = {list: "a comma-separated list of integers", int: "an integer"}.get(kind, "a number")
            raise SystemExit(f"--spec {change!r}: {value!r} is not {want}")
    try:
        return SynthSpec.from_dict(fields)
    except AphqError as e:  # the spec's own checks, e.g. a size fraction above 1
        raise SystemExit(f"--spec: {e}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-mask-rcnn")
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rcnn-samples", type=int, default=256, help="RoIs sampled per image per RoI-head stage")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--init", type=Path, action="append", default=[],
                    help="start from these weights where names and shapes fit; repeatable, a later file "
                         "overrides an earlier one")
    ap.add_argument("--out", type=Path, default=None, help="default: the package's weights folder")
    ap.add_argument("--snapshot-every", type=int, default=0,
                    help="save the training state to OUT.snapshot.pt every N iterations (0: never)")
    ap.add_argument("--resume", type=Path, default=None,
                    help="continue from a snapshot of this model made with the same --iters schedule")
    ap.add_argument("--spec", action="append", default=[], metavar="FIELD=VALUE",
                    help="train on synthetic data with this SynthSpec field changed (e.g. max_object_frac=0.8); "
                         "repeatable, recorded with the weights")
    args = ap.parse_args(argv)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    spec = spec_with(args.spec)
    with progress_bar("synthetic data") as update:
        data_dir = ensure_dataset(spec, progress=update)
    model_spec = resolve_model(args.model)
    cfg = load_config(model_spec)
    set_rcnn_samples(cfg, args.rcnn_samples)
    model = build_model(cfg)
    # mmdetection's own initialization of FPN, RPN and RoI heads (Xavier, N(0, 0.01)
    # classifiers, N(0, 0.001) box regressors), which its training tool applies and
    # building alone does not; the Swin backbone initializes itself on construction.
    quiet_mmcv_logger()
    model.init_weights()
    # Hashed and read now: --out may replace an --init file when training ends.
    inits = [init_provenance(path, init_from(model, path)) for path in args.init]
    loader = train_loader(cfg, data_dir, args.batch, args.workers, args.seed)

    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "relative_position" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "relative_position" not in n)]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    step, history, seconds_before, resumed = 0, [], 0.0, None
    if args.resume:
        step, history, seconds_before = resume_from(args.resume, args, model, optim)
        resumed = {"snapshot": str(args.resume), "iter": step}
        loader = train_loader(cfg, data_dir, args.batch, args.workers, args.seed + step)
    model.train()
    start = time.perf_counter()
    snap = (args.out or WEIGHTS_DIR / f"{args.model}.safetensors").with_suffix(".snapshot.pt")
    with progress_bar(f"train {args.model}") as update:
        while step < args.iters:
            for batch in loader:
                if step >= args.iters:
                    break
                for group in optim.param_groups:
                    group["lr"] = lr_at(step, args.iters, args.lr, args.warmup)
                losses = model(return_loss=True, **to_device(batch, "cpu"))
                loss, log_vars = model._parse_losses(losses)
                optim.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
                optim.step()
                step += 1
                if step % 50 == 0 or step == args.iters:
                    history.append({"iter": step, **{k: round(float(v), 4) for k, v in log_vars.items()}})
                    err.print(f"iter {step}: " + " ".join(f"{k}={v:.3f}" for k, v in log_vars.items()
                                                          if k in ("loss", "loss_rpn_cls", "loss_cls",
                                                                   "loss_mask", "s0.loss_cls")))
                if args.snapshot_every and step % args.snapshot_every == 0:
                    save_snapshot(snap, args, step, model, optim, history,
                                  seconds_before + time.perf_counter() - start)
                update(step, args.iters)
    train_seconds = seconds_before + time.perf_counter() - start

    # Evaluate the weights as they will be bundled (float16 round trip).
    model.eval()
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
    dataset = build_dataset(cfg, "test", data_dir)
    with progress_bar("eval") as update:
        results = run_inference(model, dataset, device="cpu", progress=update)
    metrics, _ = coco_metrics(dataset, results)
    err.print(metrics_table(f"{args.model} FP on synthetic val ({len(dataset)} images)", {"FP": metrics}))

    out = args.out or WEIGHTS_DIR / f"{args.model}.safetensors"
    save_checkpoint(half, out, meta={"model": args.model, "classes": ",".join(cfg.classes)})
    record = {
        "model": args.model,
        "command": "python scripts/train_testbed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": plain_args(args),
        "init": inits,
        "resumed": resumed,
        "data_spec": spec.to_dict() | {"key": spec.key()},
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1),
        "machine": f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "fp_metrics_val": metrics,
        "weights_sha256": sha256_file(out),
        "loss_history": history,
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
