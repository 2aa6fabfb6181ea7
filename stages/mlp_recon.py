"""Stage: mlp-recon. GELU -> ReLU in every Swin MLP, reconstructed block by block (method.md §5).

For each Swin block in forward order, fc1 and fc2 are trained so that the
ReLU MLP reproduces the float (GELU) MLP's output on the float MLP inputs,
weighted by the block's APH estimate, plus the same error with the fc2 input
clipped to [0, ub]. Each finished block is written atomically to
``RUN/mlp_recon/blocks/``, so a killed run restarted with the same command
continues after the last finished block and ends with the same result.
Each block's float MLP inputs and outputs are cached on disk just before it
trains and removed once it is done, so the cache holds one block at a time.
``RUN/mlp_recon.safetensors`` holds every block's fc1/fc2 and clip bound.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from aphq_cli import distributed
from aphq_cli.artifacts import load_if_current, save_artifact
from aphq_cli.data.coco import check_calib_split
from aphq_cli.diskplan import (CachePlan, aph_plan, check_free_space, complete_entries, mlp_plan,
                               per_image_shapes, write_plan)
from aphq_cli.errors import AphqError
from aphq_cli.headers import StageRecord
from aphq_cli.models.plan import RPN_TASK
from aphq_cli.models.swin import SwinBlock
from aphq_cli.quant.aph import ensure_block_aph
from aphq_cli.quant.primitives import row_quantile
from aphq_cli.runs import ModelSource, aph_cache, used_by_the_stage, writes_run
from aphq_cli.settings import resolve_settings, with_arguments
from aphq_cli.stage import StageResult, StageSpec, open_stage
from aphq_cli.tensorcache import TensorCache

STAGE = "mlp-recon"
CONFIG_VERSION = 2  # 2: ub is an interpolated percentile


@dataclass(frozen=True)
class MlpReconConfig:
    """Typed, versioned settings of mlp-recon (defaults: method.md §5).

    Attributes:
        iters: Adam steps per block, one image each.
        images: reconstruction images (the first N training images).
        lr: Adam learning rate, cosine-decayed to 0.
        clamp_weight: weight of the clipped-input term.
        pct: ub is this percentile of the positive float fc2 inputs.
        delta: APH perturbation.
        seed: image order.
        calib_split: where the images come from (``train``, or ``val``: the published protocol).
    """

    iters: int = 20000
    images: int = 256
    lr: float = 4e-5
    clamp_weight: float = 2.0
    pct: float = 0.999
    delta: float = 1e-3
    seed: int = 0
    calib_split: str = "train"
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        for name in ("iters", "images"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise AphqError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("lr", "delta"):
            if not getattr(self, name) > 0:
                raise AphqError(f"{name} must be positive, got {getattr(self, name)}")
        if self.clamp_weight < 0:
            raise AphqError(f"clamp_weight must be >= 0, got {self.clamp_weight}")
        if not 0.5 < self.pct <= 1.0:
            raise AphqError(f"pct must be in (0.5, 1], got {self.pct}")
        check_calib_split(self.calib_split)



SPEC = StageSpec(STAGE, MlpReconConfig)


def resolve_config(cfg, overrides: dict, file_values: dict | None = None) -> MlpReconConfig:
    """Defaults, the model config's ``aphq_defaults``, a ``--quant-config`` section, then the command line."""
    return resolve_settings(MlpReconConfig, cfg, STAGE, overrides, file_values)


def swin_blocks(detector: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, block)`` of every Swin block, in forward order."""
    return [(f"backbone.{n}", m) for n, m in detector.backbone.units() if isinstance(m, SwinBlock)]


def reconstruction_loss(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """APH-weighted squared error: sum over channels, mean over tokens, divided by 10."""
    return (weight * (out - target).pow(2)).sum(dim=-1).mean() / 10


def mlp_with_clip(mlp: nn.Module, x: torch.Tensor, ub: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ReLU MLP's output, and its output with the fc2 input clipped to ``[0, ub]``."""
    hidden = torch.relu(mlp.fc1(x))
    return mlp.fc2(hidden), mlp.fc2(hidden.clamp(max=ub))


def cosine_lr(step: int, total: int, base: float) -> float:
    """Cosine decay from ``base`` to 0 over ``total`` steps."""
    return base * 0.5 * (1 + math.cos(math.pi * step / total))


def train_block(mlp: nn.Module, cache, entry: str, aph, aph_entry: str, count: int, ub: float,
                config: MlpReconConfig, block_seed: int, progress=None) -> list[float]:
    """Train ``mlp``'s fc1 and fc2 (ReLU already in place) on cached float inputs/outputs.

    Returns:
        The loss every 10 % of the iterations.
    """
    params = list(mlp.fc1.parameters()) + list(mlp.fc2.parameters())
    optim = torch.optim.Adam(params, lr=config.lr)
    gen = torch.Generator().manual_seed(block_seed)
    order = torch.randperm(count, generator=gen)
    device = mlp.fc1.weight.device
    losses = []
    for step in range(config.iters):
        index = int(order[step % count])
        if step % count == count - 1:
            order = torch.randperm(count, generator=gen)
        item = cache.get(entry, index, device)
        weight = aph.get(aph_entry, index, device)["aph"]
        for group in optim.param_groups:
            group["lr"] = cosine_lr(step, config.iters, config.lr)
        out, clipped = mlp_with_clip(mlp, item["x"], ub)
        loss = (reconstruction_loss(out, item["y"], weight)
                + config.clamp_weight * reconstruction_loss(clipped, item["y"], weight))
        optim.zero_grad()
        loss.backward()
        optim.step()
        if (step + 1) % max(1, config.iters // 10) == 0:
            losses.append(loss.item())
        if progress is not None:
            progress(step + 1, config.iters, loss.detach())
    return losses


class _Collected(Exception):
    """Raised by the collecting hook once the block's MLP has run: the rest of the forward is not needed."""


def collect_block_io(detector: nn.Module, name: str, block: nn.Module, images, cache, pct: float,
                     progress=None) -> float:
    """Cache one block's float MLP input/output per image; return its ``ub``.

    Each image's float forward stops at the block's MLP, so collecting block
    by block costs less than one full forward per image and block, and the
    cache never holds more than one block's tensors (the largest block's at
    COCO size is a fifth of all blocks' together: docs/scale.md).
    """
    positives: list[torch.Tensor] = []
    per_image = max(1, 2_000_000 // max(1, len(images)))

    def fc2_hook(m, args):
        pos = args[0].detach().flatten()
        pos = pos[pos > 0]
        positives.append(pos[:: max(1, math.ceil(pos.numel() / per_image))].cpu())

    for i, img in enumerate(images):
        seen: dict[str, torch.Tensor] = {}

        def io_hook(m, args, out):
            seen.update(x=args[0].detach(), y=out.detach())
            raise _Collected

        handles = [block.mlp.register_forward_hook(io_hook), block.mlp.fc2.register_forward_pre_hook(fc2_hook)]
        try:
            with torch.no_grad():
                detector.backbone(img)
        except _Collected:
            pass
        finally:
            for h in handles:
                h.remove()
        if not seen:
            raise AphqError(f"the float forward never reached {name}'s MLP")
        cache.put(name, i, seen)
        if progress is not None:
            progress(i + 1, len(images))
    cache.finish(name, len(images))
    values = torch.cat(positives)
    return float(row_quantile(values[None], pct)[0]) if values.numel() else 0.0


def disk_plans(detector: nn.Module, names: list[str], images, io_cache: TensorCache, aph: TensorCache,
               key: str, keep: bool = False) -> dict[str, CachePlan]:
    """What the MLP cache and the APH cache will hold, from float feature passes (one per input shape).

    ``keep``: the MLP cache keeps every block's entry (``--keep-cache``).
    """
    ios = per_image_shapes(detector, names, images, extra={f"{n}.mlp": f"{n}.mlp" for n in names})
    count = len(images)
    return {"mlp_cache": mlp_plan(io_cache.root, names, ios, key, complete_entries(io_cache, names, count), keep),
            "aph_cache": aph_plan(aph.root, names, ios, complete_entries(aph, names, count))}


@writes_run
def mlp_recon(*, model: str, run: Path, iters: int | None = None, images: int | None = None,
              calib_split: str | None = None,
              checkpoint: Path | None = None, data: Path | None = None, device: str = "cpu",
              force: bool = False, trust_checkpoint: bool = False, settings: dict | None = None,
              quant_config: str | Path | None = None, progress=None, free_space=None,
              keep_cache: bool = False) -> StageResult:
    """Run mlp-recon into ``run/mlp_recon.safetensors``; resumable per block.

    Before any cache is filled, the bytes of the MLP and APH caches are
    predicted (``RUN/mlp_recon/disk_plan.json``) and the stage stops if they do not fit.

    Args:
        keep_cache: keep the MLP cache (``RUN/mlp_recon/cache``): every block's entry, instead of
            removing each once its block is trained. It only serves a resumed or forced mlp-recon,
            and whole it is the largest cache of all at COCO size (about 63 GB for Swin-T's 256
            images against 13 GB for its largest block, docs/scale.md), so by default it goes.
        progress: optional callable ``(description, done, total)``.
        free_space: ``path -> free bytes`` instead of the filesystem's (tests).
    """
    stage = open_stage(
        SPEC, run=run, overrides=with_arguments(settings, iters=iters, images=images, calib_split=calib_split),
        quant_config=quant_config, force=force,
        source=lambda: ModelSource.open(model, checkpoint, data, trust_checkpoint=trust_checkpoint),
        images=lambda source, config: source.calibration_dataset(config.calib_split, limit=config.images))
    io_root = Path(run) / "mlp_recon" / "cache"
    if stage.current:
        if not keep_cache and distributed.is_main():  # left by an earlier run that kept it, or was cut short
            TensorCache(io_root).drop("")
        return stage.reused()
    source, config, dataset, inputs = stage.source, stage.config, stage.dataset, stage.inputs

    report = progress or (lambda *a, **kw: None)
    device = distributed.init(device)
    detector = source.build(device)
    blocks = swin_blocks(detector)
    images = source.images(dataset, device)
    block_dir = Path(run) / "mlp_recon" / "blocks"
    io_cache = TensorCache(io_root, key=stage.cache_key)
    aph = aph_cache(source, dataset, config.delta)
    header = StageRecord(**stage.header(), mlp_recon=asdict(config), quant_config=stage.quant_config)
    plans = disk_plans(detector, [n for n, _ in blocks], images, io_cache, aph, stage.cache_key, keep_cache)
    check_free_space(STAGE, [("MLP cache", plans["mlp_cache"]), ("APH cache", plans["aph_cache"])], free_space)
    used_by_the_stage(aph)  # from here on no other run's reconstruct removes the estimates while this one reads them

    # Under torchrun every rank computes its share of the APH estimates; rank 0 alone caches the MLP
    # inputs and trains. The detector stays float throughout (each block trains a copy of its MLP), so
    # the APH estimates and each block's cached inputs both come from the untouched float model.
    main = distributed.is_main()
    if main:
        write_plan(Path(run) / "mlp_recon" / "disk_plan.json", plans, len(images))
    for name, block in blocks:
        ensure_block_aph(detector, name, block, images, aph, RPN_TASK, config.delta,
                         lambda d, t, name=name: report(f"APH {name}", d, t))
    if not main:
        return StageResult(stage.out, False)
    ub_path = Path(run) / "mlp_recon" / "ub.safetensors"
    # A block's bound and its cached inputs are made together: a damaged, older-format or stale bounds
    # file is remade with the cache, not a dead end for every rerun.
    saved = {} if force else (load_if_current(ub_path, stage="mlp-recon-ub", inputs=inputs) or {})
    ubs = {k[: -len(".ub")]: float(v) for k, v in saved.items()}

    result: dict[str, torch.Tensor] = {}
    for index, (name, block) in enumerate(blocks):
        path = block_dir / f"{index:02d}_{name.replace('.', '_')}.safetensors"
        # A finished block is reused; a damaged one (or one made from other inputs) is trained again.
        tensors = None if force else load_if_current(path, stage="mlp-recon-block", inputs=inputs)
        if tensors is None:
            if force or name not in ubs or not io_cache.complete(name, len(images)):
                ubs[name] = collect_block_io(detector, name, block, images, io_cache, config.pct,
                                             lambda d, t, name=name: report(f"collect {name}", d, t))
                save_artifact(ub_path, {f"{n}.ub": torch.tensor(v) for n, v in ubs.items()},
                              stage="mlp-recon-ub", config=header.to_dict(), inputs=inputs)
            mlp = copy.deepcopy(block.mlp)
            mlp.act = nn.ReLU()
            with torch.enable_grad():
                losses = train_block(mlp, io_cache, name, aph, name, len(images), ubs[name], config,
                                     config.seed * 1000 + index,
                                     lambda d, t, value, name=name: report(f"train {name}", d, t, loss=value))
            tensors = {f"{name}.mlp.{k}": v.detach().clone() for k, v in mlp.state_dict().items()}
            tensors[f"{name}.ub"] = torch.tensor(ubs[name])
            part = header.with_fields(block=name, losses=losses, total_blocks=len(blocks))
            save_artifact(path, tensors, stage="mlp-recon-block", config=part.to_dict(), inputs=inputs)
        result.update(tensors)
        if not keep_cache:  # only this block reads its entry: the cache holds one block at a time
            io_cache.drop(name)
    saved = stage.save(result, header.to_dict())
    if not keep_cache:  # left by an earlier run that kept it
        io_cache.drop("")
    return saved
