"""Stage: reconstruct. Block-wise AdaRound + activation-scale reconstruction (method.md §6).

Units in forward order: the patch embedding, every Swin block, every patch
merging, then the FPN. For each unit the rounding of every weight and the
scale of every activation quantizer are learned so the quantized unit, fed a
QDrop mix of its quantized-model and float-model inputs, reproduces the float
unit's output under the chosen loss (``aph``, ``mse``, ``fisher``; ``none``
keeps calibration alone). Unit inputs and outputs stream through an on-disk
cache (two units' worth of images at a time), and each finished unit is
written atomically to ``RUN/reconstruct/blocks/``: a killed run restarted with
the same command recomputes the cached inputs through the finished units and
continues after the last one, ending with the result of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from aphq_cli import distributed
from aphq_cli.artifacts import load_artifact, load_if_current, save_artifact, sha256_file
from aphq_cli.data.coco import check_calib_split
from aphq_cli.devices import resolve_device
from aphq_cli.diskplan import (CachePlan, HeadPlan, aph_plan, check_free_space, complete_entries, entry_bytes,
                               folder_bytes, gib, joint_plan, outputs, per_image_shapes, reconstruct_plan,
                               write_plan)
from aphq_cli.errors import AphqError
from aphq_cli.models.heads import HEAD_LOSSES, float_head_inputs, head_cache_shapes, head_units
from aphq_cli.models.plan import RPN_TASK, units_of
from aphq_cli.quant.adaround import (beta_schedule, hard_quantize_floor, init_alpha, qdrop_mix, rounding_regularizer,
                                     soft_quantize_floor, straight_through_floor)
from aphq_cli.quant.aph import block_fisher, ensure_block_aph
from aphq_cli.quant.headloss import normalized_sum
from aphq_cli.quant.modules import QuantConv2d, QuantLinear, Quantizer
from aphq_cli.quant.wrap import quantization_map
from aphq_cli.runs import (aph_cache, check_fresh, load_stage, quantized_tensors, read_stage, recorded_source,
                           stage_path, used_by_the_stage, writes_run)
from aphq_cli.settings import resolve_settings, with_arguments
from aphq_cli.stage import StageResult, StageSpec, open_stage
from aphq_cli.tensorcache import SharedUse, TensorCache

STAGE = "reconstruct"
# 2: targets, float inputs and APH come from the original float model (not the mlp-recon one);
# QDrop on Linear inputs only, drop_prob keeps the quantized value; summed APH loss; one FPN mean;
# images in order.
CONFIG_VERSION = 2


@dataclass(frozen=True)
class ReconstructConfig:
    """Typed, versioned settings of reconstruct (defaults: method.md §6 and §8)."""

    loss: str = "aph"
    iters: int = 20000
    images: int = 256
    images_per_iter: int = 1  # images whose losses one Adam step averages (the published code: 1)
    w_lr: float = 1e-3  # Adam's default, for the rounding variables
    a_lr: float = 4e-5
    drop_prob: float = 0.5  # QDrop: probability that a quantized input keeps its quantized value
    quant_ratio: float = 0.5
    qdrop_scope: str = "linear"
    reg_weight: float = 0.01
    warmup: float = 0.2
    delta: float = 1e-3
    seed: int = 0
    calib_split: str = "train"  # or "val": the published protocol (aphq_cli.data.coco)
    heads: bool = False  # also reconstruct the RPN, box and mask heads (beyond the paper; issue #18)
    head_kinds: str = "rpn,box,mask"  # with heads: which of them (one alone, to see where each helps)
    head_loss: str = "task"  # with heads: "task" (KL, smooth-L1 on what the float model keeps) or "mse"
    # With heads: Adam's learning rate for the head layers' weight-quantizer scales, learned beside
    # their rounding (as relative gains, cosine decay); 0 keeps the calibrated scales, as AdaRound does.
    head_w_scale_lr: float = 0.0
    # "adaround": train on the soft rounding, keep the hard one (the published method); "ste": the hard
    # rounding forward and the soft one's gradient backward (beyond it: docs/results.md, issue #18).
    rounding: str = "adaround"
    cache_dtype: str = "float32"  # the unit cache's floats: "float16" halves its disk (issue #19)
    aph_dtype: str = "float16"  # the APH cache's floats: float16 is half the disk of float32 (issue #19)
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise AphqError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        for name in ("--iters", "--images", "images_per_iter"):
            value = getattr(self, name.lstrip("-"))
            if not isinstance(value, int) or value < 1:
                raise AphqError(f"{name} must be a positive integer, got {value}")
        for name in ("drop_prob", "quant_ratio", "warmup"):
            if not 0 <= getattr(self, name) <= 1:
                raise AphqError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("w_lr", "a_lr", "delta"):
            if not getattr(self, name) > 0:
                raise AphqError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("reg_weight", "head_w_scale_lr"):
            if not getattr(self, name) >= 0:
                raise AphqError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_calib_split(self.calib_split)
        kinds = self.head_kinds.split(",")
        if not kinds or not set(kinds) <= set(HEAD_KINDS) or len(set(kinds)) != len(kinds):
            raise AphqError(f"head_kinds must name some of {', '.join(HEAD_KINDS)} (comma-separated), "
                            f"got {self.head_kinds!r}")
        if self.head_loss not in HEAD_LOSSES:
            raise AphqError(f"head_loss must be one of {', '.join(HEAD_LOSSES)}, got {self.head_loss!r}")
        for name in ("cache_dtype", "aph_dtype"):
            if getattr(self, name) not in CACHE_DTYPES:
                raise AphqError(f"{name} must be one of {', '.join(CACHE_DTYPES)}, got {getattr(self, name)!r}")
        if self.rounding not in ROUNDINGS:
            raise AphqError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if self.qdrop_scope not in QDROP_SCOPES:
            raise AphqError(f"qdrop_scope must be one of {', '.join(QDROP_SCOPES)}, got {self.qdrop_scope!r}")


SPEC = StageSpec(STAGE, ReconstructConfig)


def resolve_config(cfg, overrides: dict, file_values: dict | None = None) -> ReconstructConfig:
    """Defaults, the model config's ``aphq_defaults``, a ``--quant-config`` section, then the command line."""
    return resolve_settings(ReconstructConfig, cfg, STAGE, overrides, file_values)


# Loss registry: how each loss weighs the squared error of a backbone unit's
# output. The FPN always uses plain MSE (method.md §4).
LOSSES: dict[str, str] = {
    "aph": "APH-weighted squared error (average perturbation Hessian of the RPN task loss)",
    "mse": "plain mean squared error (QDrop)",
    "fisher": "squared task-loss gradient of the partially quantized model (BRECQ)",
    "none": "no reconstruction: calibration alone",
}


# Which activation quantizers of a unit QDrop lets fall back to float during
# reconstruction. "linear" is the published code's: Linear-layer inputs only;
# "all" also drops on the attention-matmul operands and conv inputs (the image too).
QDROP_SCOPES = ("linear", "all")

# How a unit's weights round while it learns: what its forward pass sees.
ROUNDINGS = ("adaround", "ste")

# The parts of one reconstruction iteration a `timer` sees (benchmarks/iteration.py).
PARTS = ("read", "mix", "forward", "loss", "backward", "step")

# How the unit cache stores its floats (read back as float32). float16 keeps 11 significant bits and
# values up to 65504, ample for the inputs and outputs of a unit next to 4-bit quantization steps.
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}

# The kinds of head unit (aphq_cli/models/heads.py) that `head_kinds` may name.
HEAD_KINDS = ("rpn", "box", "mask")


class SoftRounding(nn.Module):
    """Stands in for a layer's weight quantizer while its rounding is learned.

    The weight is fixed meanwhile, so ``floor(W / s)`` is computed once (not a
    buffer: it never reaches an artifact). With ``learn_scale`` the quantizer's
    scale learns too, as ``s * gain`` (one gain per scale entry, starting at 1,
    so one learning rate suits layers whose steps differ by orders of
    magnitude); the integer grid ``floor`` stays the calibrated one, and
    :meth:`harden` writes the learned scale into the quantizer. ``weight``
    is the weight as the quantizer sees it (the layer's ``weight_groups()``).
    With ``straight_through`` the forward pass sees the hard rounding it
    will keep, and the gradient is the soft rounding's (``rounding = "ste"``).
    """

    def __init__(self, quantizer: nn.Module, weight: torch.Tensor, learn_scale: bool = False,
                 straight_through: bool = False) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.straight_through = straight_through
        self.alpha = nn.Parameter(init_alpha(weight.detach(), quantizer.scale))
        self.floor = torch.floor(weight.detach() / quantizer.scale)
        self.gain = nn.Parameter(torch.ones_like(quantizer.scale)) if learn_scale else None

    def scale(self) -> torch.Tensor:
        return self.quantizer.scale if self.gain is None else self.quantizer.scale * self.gain

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        rounded = straight_through_floor if self.straight_through else soft_quantize_floor
        return rounded(self.floor, self.scale(), q.zero_point, q.bits, self.alpha)

    @torch.no_grad()
    def harden(self, weight: torch.Tensor) -> torch.Tensor:
        """The hard-rounded weight; a learned scale goes into the quantizer, so the weight is on its grid."""
        q, scale = self.quantizer, self.scale()
        if self.gain is not None:
            q.scale.copy_(scale)
        return hard_quantize_floor(self.floor, scale, q.zero_point, q.bits, self.alpha)


def _run_unit(unit: nn.Module, x, extra: dict | None = None):
    """The neck and the heads take the tuple of maps (the heads also the float model's RoIs); the rest one tensor."""
    if extra is not None:
        return unit(tuple(x), **extra)
    return unit(tuple(x)) if isinstance(x, (list, tuple)) else unit(x)


def _as_list(y) -> list[torch.Tensor]:
    return list(y) if isinstance(y, (list, tuple)) else [y]


def _pack(y) -> dict[str, torch.Tensor]:
    if isinstance(y, dict):  # named tensors (a head record) are stored by name
        return y
    return {f"t{i}": t for i, t in enumerate(_as_list(y))}


def _unpack(d: dict[str, torch.Tensor]):
    items = [d[f"t{i}"] for i in range(len(d))]
    return items[0] if len(items) == 1 else items


def unit_loss(out: list[torch.Tensor], target: list[torch.Tensor], weight: torch.Tensor | None) -> torch.Tensor:
    """Reconstruction error of one image (method.md §6), before the first-iteration normalization.

    A weighted loss (APH, Fisher) is ``sum(weight * (out - target)^2)`` over
    every element of the image, as the published code sums it. Unweighted, it
    is one mean squared error over all outputs concatenated: for the FPN's
    five levels, P2 (most of the elements) carries most of the loss.
    """
    if weight is not None:
        return sum((weight * (o - t).pow(2)).sum() for o, t in zip(out, target))
    diff = torch.cat([(o - t).reshape(-1) for o, t in zip(out, target)])
    return diff.pow(2).mean()


def qdrop_quantizers(unit: nn.Module, scope: str) -> list[nn.Module]:
    """The activation quantizers of ``unit`` that QDrop acts on under ``scope``."""
    if scope == "all":
        return [m for n, m in unit.named_modules() if isinstance(m, Quantizer) and not n.endswith("w_quant")]
    return [m.a_quant for m in unit.modules() if isinstance(m, QuantLinear)]


def reconstruct_unit(unit: nn.Module, caches: "UnitCaches", k: int, weights, config: ReconstructConfig,
                     seed: int, progress: Callable[[int, int, float], None] | None = None,
                     head_loss: Callable | None = None, timer: Callable[[str], contextlib.AbstractContextManager]
                     | None = None) -> list[float]:
    """Learn rounding and activation scales of unit ``k`` from its cached inputs and targets.

    Afterwards the rounding is hard: each weight holds its quantized value.

    Args:
        caches: the float input, quantized-model input and float output per image.
        weights: callable ``(index) -> weight or None`` (None: plain MSE).
        progress: optional callable ``(step, total, loss)``.
        head_loss: a head unit's ``(outputs, float outputs, record) -> {term: value}``
            (:mod:`aphq_cli.models.heads`); each term is normalized by its first
            non-zero value (:func:`~aphq_cli.quant.headloss.normalized_sum`).
        timer: optional ``part -> context manager`` around each part of an iteration
            (``read``, ``mix``, ``forward``, ``loss``, ``backward``, ``step``), for
            benchmarks/iteration.py; None costs nothing.

    Returns:
        The loss every 10 % of the iterations.
    """
    layers = [m for m in unit.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    acts = [m for n, m in unit.named_modules() if isinstance(m, Quantizer) and not n.endswith("w_quant")]
    if not layers and not acts:
        return []
    # A head unit may learn its weight scales too (head_w_scale_lr; beyond AdaRound, issue #18).
    learn_scale = head_loss is not None and config.head_w_scale_lr > 0
    soft = {id(layer): SoftRounding(layer.w_quant, layer.weight_groups(), learn_scale, config.rounding == "ste")
            for layer in layers}
    # Only the rounding variables and the activation scales learn: the unit's own weights, biases and
    # norms are frozen, so backward computes no gradient for them (it used to: unused work).
    frozen = [p for p in unit.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    originals = {id(layer): layer.w_quant for layer in layers}
    for layer in layers:
        layer.w_quant = soft[id(layer)]
    scales = [q.scale for q in acts]
    for s in scales:
        s.requires_grad_(True)
    dropping = qdrop_quantizers(unit, config.qdrop_scope)
    for q in dropping:
        q.keep_quantized = config.drop_prob
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt_w = torch.optim.Adam([s.alpha for s in soft.values()], lr=config.w_lr)
    opt_a = torch.optim.Adam(scales, lr=config.a_lr) if scales else None
    gains = [s.gain for s in soft.values() if s.gain is not None]
    opt_g = torch.optim.Adam(gains, lr=config.head_w_scale_lr) if gains else None
    first, losses, firsts = None, [], {}
    part = timer or _untimed

    def read(i: int) -> tuple:
        """Image i's cached tensors: float input, quantized-model input, target, head record, loss weight."""
        return (_as_list(caches.fp_in(k, i)), _as_list(caches.q_in(k, i)), _as_list(caches.target(k, i)),
                caches.extra(k, i) if head_loss is not None else None,
                weights(i) if head_loss is None else None)

    def image_loss(x_fp, x_q, target, extra, weight):
        """One image's loss (normalized, before the regularizer) and its reconstruction term; None: nothing to match."""
        with part("mix"):
            x = [qdrop_mix(a, b, config.quant_ratio, gen) for a, b in zip(x_q, x_fp)]
        if head_loss is not None:
            with part("forward"):
                out = _as_list(_run_unit(unit, x, extra))
            with part("loss"):
                loss = normalized_sum(head_loss(out, target, extra), firsts)
            if loss is None:  # nothing to match on this image yet (no kept RoI, no detection)
                return None
            return loss, loss.detach() / 2  # recorded: the mean of the normalized terms
        nonlocal first
        with part("forward"):
            out = _as_list(_run_unit(unit, x if len(x) > 1 else x[0]))
        with part("loss"):
            rec = unit_loss(out, target, weight)
            if first is None:
                first = rec.detach().clamp_min(1e-12)
            return 2 * rec / first, rec.detach() / first

    # Each step averages the loss of `per` consecutive images, one forward and backward at a time
    # (gradients accumulate), so memory stays that of one image whatever `per` is.
    per, total = config.images_per_iter, config.iters * config.images_per_iter
    # The next image's entries are read while this one computes (reads are file loads and copies,
    # no random numbers, so the result is the same); on a GPU they would otherwise stall it.
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aphq-cache-read")
    ahead = reader.submit(read, 0)
    try:
        for step in range(config.iters):
            with part("backward"):
                # Activation scales (method.md §6), and learned weight scales: cosine decay.
                for opt, lr in ((opt_a, config.a_lr), (opt_g, config.head_w_scale_lr)):
                    if opt is not None:
                        for g in opt.param_groups:
                            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / config.iters))
                opt_w.zero_grad()
                if opt_a is not None:
                    opt_a.zero_grad()
                if opt_g is not None:
                    opt_g.zero_grad()
            matched = []  # the reconstruction terms of this step's images
            for j in range(per):
                i = step * per + j
                with part("read"):  # the wait for what the read-ahead has not finished
                    cached = ahead.result()
                    if i + 1 < total:  # images in order, as the published code takes them
                        ahead = reader.submit(read, (i + 1) % caches.count)
                found = image_loss(*cached)
                if found is None:
                    continue
                loss, rec = found
                if per > 1:
                    loss = loss / per
                if not matched:  # the regularizer once per step, with its first image that has a loss
                    with part("loss"):
                        beta = beta_schedule(step, config.iters, config.warmup)
                        if beta is not None:
                            loss = loss + config.reg_weight * sum(rounding_regularizer(s.alpha, beta)
                                                                  for s in soft.values())
                matched.append(rec)
                with part("backward"):
                    loss.backward()
            if not matched:
                continue
            with part("step"):
                opt_w.step()
                if opt_a is not None:
                    opt_a.step()
                    with torch.no_grad():
                        for s in scales:
                            s.clamp_(min=1e-8)
                if opt_g is not None:
                    opt_g.step()
                    with torch.no_grad():  # a step stays positive
                        for gain in gains:
                            gain.clamp_(min=1e-3)
            # The reconstruction term alone, relative to the first step's (the rounding
            # regularizer's scale is the number of weights, which would swamp it).
            rec = matched[0] if per == 1 else torch.stack(matched).mean()
            if (step + 1) % max(1, config.iters // 10) == 0:
                losses.append(float(rec))
            if progress is not None:  # the reconstruction error relative to the first step (as recorded)
                progress(step + 1, config.iters, rec)
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        with torch.no_grad():
            for layer in layers:
                layer.weight.copy_(soft[id(layer)].harden(layer.weight).reshape(layer.weight.shape))
                layer.w_quant = originals[id(layer)]
        for s in scales:
            s.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
        for q in dropping:
            q.keep_quantized = 1.0
    return losses


def _untimed(part: str) -> contextlib.nullcontext:
    return contextlib.nullcontext()


def _fill(cache, entry: str, count: int, fn, progress=None) -> None:
    """``cache[entry][i] = fn(i)`` for every image, unless already complete (each rank: its share)."""
    with torch.no_grad():
        cache.fill(entry, count, lambda i: _pack(fn(i)), progress)


def _get(cache, entry: str, i: int, device):
    return _unpack(cache.get(entry, i, device))


class UnitCaches:
    """Per-image tensors of the unit being reconstructed, on disk.

    Unit k's float input is unit k-1's float output ``y/<k-1>`` (the image
    for k = 0); its quantized-model input ``q/<k>`` is unit k-1, already
    reconstructed, applied to ``q/<k-1>``. The neck's inputs are the two
    backbones' outputs; its target, the float FPN's output, is computed from
    its float input as it is read (at COCO size it would be the largest
    entry on disk). An entry is dropped once nothing reads it, so a backbone
    unit trains with three on disk: ``q/<k>``, ``y/<k-1>`` and ``y/<k>``.

    Head units (``heads``: unit index -> the key of its record in
    :func:`~aphq_cli.models.heads.float_head_inputs`, "" for the RPN) all read
    the FPN outputs, which are not cached either: the float FPN applied to
    the neck's float input ``fp/<neck>`` and the reconstructed neck to its
    quantized input ``q/<neck>`` as they are read (two FPN passes per head
    iteration instead of two FPN-sized entries per image on disk, which are
    twice the neck's inputs). ``rec`` holds what the float model decided for
    each image (its RoIs, classes, kept RoIs).
    """

    def __init__(self, cache, imgs, device, heads: dict[int, str] | None = None) -> None:
        self.cache, self.imgs, self.device, self.count = cache, imgs, device, len(imgs)
        self.heads = heads or {}
        self.neck = min(self.heads) - 1 if self.heads else None
        self.fpns: dict[str, nn.Module] = {}  # the neck's input entry -> the FPN it feeds ("fp" float, "q" quantized)

    def fp_in(self, k: int, i: int):
        if k in self.heads:
            return self._fpn("fp", i)
        return self.imgs[i] if k == 0 else _get(self.cache, f"fp/{k}" if self.cache.complete(f"fp/{k}", self.count)
                                                else f"y/{k - 1}", i, self.device)

    def q_in(self, k: int, i: int):
        if k in self.heads:
            return self._fpn("q", i)
        return self.imgs[i] if k == 0 else _get(self.cache, f"q/{k}", i, self.device)

    def target(self, k: int, i: int):
        if k == self.neck:
            return self._fpn("fp", i)
        return _get(self.cache, f"y/{k}", i, self.device)

    def _fpn(self, entry: str, i: int) -> list[torch.Tensor]:
        """Image i's FPN outputs made from the neck's input ``entry``: "fp" by the float FPN, "q" by the quantized."""
        x = tuple(_as_list(_get(self.cache, f"{entry}/{self.neck}", i, self.device)))
        with torch.no_grad():  # the same computation as a fill would make: the same numbers
            return _as_list(self.fpns[entry](x))

    def extra(self, k: int, i: int) -> dict[str, torch.Tensor]:
        """Head unit k's record of image i (its RoIs, the float classes, the kept RoIs); {} for the RPN."""
        key = self.heads.get(k)
        if not key:
            return {}
        record = self.cache.get("rec", i, self.device)
        return {name.split("/", 1)[1]: v for name, v in record.items() if name.startswith(f"{key}/")}

    def prepare(self, k: int, name: str, unit_q, unit_fp, detector, fp, prev_unit, report) -> None:
        """Make unit k's quantized input and float output available, dropping what that makes obsolete.

        An entry goes as soon as nothing reads it: the previous unit's quantized
        input once k's is made from it (so a backbone unit's peak is three
        entries: its two inputs and its target). Drops are rank 0's, after the
        fill's closing barrier, when no rank reads any more.
        """
        main = distributed.is_main()
        if k in self.heads:
            if k == self.neck + 1:  # the first head: the float RoIs every RoI head reads
                _fill(self.cache, "rec", self.count, lambda i: _records(fp, self.fp_in(k, i), self.imgs.meta(i)),
                      lambda d, t: report("float RoIs", d, t))
            _fill(self.cache, f"y/{k}", self.count, lambda i: unit_fp(tuple(self.fp_in(k, i)), **self.extra(k, i)))
            return
        if name == "neck":
            self.neck, self.fpns = k, {"fp": unit_fp, "q": unit_q}
            if main and k > 0:  # the neck's inputs come from the images: the last backbone unit's entries go
                self._drop(f"q/{k - 1}", f"y/{k - 1}")
            _fill(self.cache, f"fp/{k}", self.count, lambda i: fp.backbone(self.imgs[i]),
                  lambda d, t: report("neck inputs (float)", d, t))
            _fill(self.cache, f"q/{k}", self.count, lambda i: detector.backbone(self.imgs[i]),
                  lambda d, t: report("neck inputs (quantized)", d, t))
            return
        if k > 0:
            _fill(self.cache, f"q/{k}", self.count, lambda i: prev_unit(self.q_in(k - 1, i)))
            if main:
                self._drop(f"q/{k - 1}")
        _fill(self.cache, f"y/{k}", self.count, lambda i: unit_fp(self.fp_in(k, i)))

    def release(self, k: int) -> None:
        """Unit k is done (rank 0, after a barrier): the inputs only it read go.

        A backbone unit's float input ``y/<k-1>`` (its own output stays: the
        next unit's float input); a head's float outputs. The neck's inputs
        (the heads make the FPN outputs from them) and the float records stay
        to the end.
        """
        if k in self.heads:
            self._drop(f"y/{k}")
        elif k != self.neck and k > 0:
            self._drop(f"y/{k - 1}")

    def _drop(self, *entries: str) -> None:
        for entry in entries:
            self.cache.drop(entry)


def _records(fp, feats, meta) -> dict[str, torch.Tensor]:
    """:func:`float_head_inputs` of one image, flattened for the cache (``box0/rois``)."""
    return {f"{key}/{name}": value for key, record in float_head_inputs(fp, list(feats), meta).items()
            for name, value in record.items()}


def _loss_weights(loss: str, k: int, name: str, unit_q, detector, fp, caches: UnitCaches, aph, delta: float,
                  report) -> Callable[[int], torch.Tensor | None]:
    """``index -> weight map`` of the chosen loss for a backbone unit (None: plain MSE)."""
    if name == "neck" or loss == "mse":
        return lambda i: None
    if loss == "aph":
        ensure_block_aph(fp, name, fp.get_submodule(name), caches.imgs, aph, RPN_TASK, delta,
                         lambda d, t: report(f"APH {name}", d, t))
        return lambda i: aph.get(name, i, caches.device)["aph"]
    if loss == "fisher":
        entry = f"fisher/{k}"
        _fill(caches.cache, entry, caches.count, lambda i: block_fisher(detector, fp, unit_q, caches.imgs[i], RPN_TASK),
              lambda d, t: report(f"Fisher {name}", d, t))
        return lambda i: _get(caches.cache, entry, i, caches.device)
    raise AphqError(f"unknown loss {loss!r}")


@writes_run
def reconstruct(*, run: Path, loss: str | None = None, iters: int | None = None, images: int | None = None,
                calib_split: str | None = None, heads: bool | None = None,
                device: str = "cpu", force: bool = False, trust_checkpoint: bool = False,
                settings: dict | None = None, quant_config: str | Path | None = None,
                trust_config: bool = False, keep_aph_cache: bool = False, progress=None,
                free_space=None) -> StageResult:
    """Reconstruct the calibrated model of ``run`` into ``run/reconstruct.safetensors``.

    Before any cache is filled, the bytes its caches will take are predicted
    (``RUN/reconstruct/disk_plan.json``) and the stage stops if they do not fit.

    Args:
        heads: also reconstruct the RPN, box and mask heads (``--heads``; beyond the paper).
        trust_config: read the model config file the run's header names (it is Python).
        keep_aph_cache: keep this run's entry of the shared APH cache for later runs on the same
            checkpoint and images (``--keep-aph-cache``). By default reconstruct, the last stage that
            reads it, removes it: each unit's maps once the unit is done (so the two caches' joint
            peak is lower: docs/scale.md), the rest once the artifact is written (or found current);
            not while another process (run) uses the entry.
        progress: optional callable ``(description, done, total)``.
        free_space: ``path -> free bytes`` instead of the filesystem's (tests).
    """
    calib_path = stage_path(run, "calibrate")

    def calibrated():
        """The calibrate artifact reconstruct starts from (read once the settings are checked)."""
        if not calib_path.is_file():
            raise AphqError(f"{calib_path} does not exist; run `aphq calibrate --run {run}` first")
        header, made = read_stage(run, "calibrate")
        check_fresh(run, "calibrate", header)
        return header, made

    def upstream() -> dict[str, str]:
        # The calibrate artifact, and the mlp-recon artifact it records (the same fingerprint, or a
        # second run would never be a cache hit).
        header, made = calibrated()
        return {"calibrate": sha256_file(calib_path)} | (
            {"mlp_recon": header.inputs["mlp_recon"]} if made.mlp_recon_artifact else {})

    dev = resolve_device(distributed.init(device))
    stage = open_stage(
        SPEC, run=run, overrides=with_arguments(settings, loss=loss, iters=iters, images=images,
                                                calib_split=calib_split, heads=heads),
        quant_config=quant_config, force=force, upstream=upstream,
        source=lambda: recorded_source(calib_path, calibrated()[0], trust_checkpoint=trust_checkpoint,
                                       trust_config=trust_config),
        images=lambda source, config: source.calibration_dataset(config.calib_split, limit=config.images))
    made = calibrated()[1]
    if stage.current:
        if not keep_aph_cache and distributed.is_main():
            _drop_aph(used_by_the_stage(_aph_of(stage)), progress)
        return stage.reused()
    source, config, dataset, inputs = stage.source, stage.config, stage.dataset, stage.inputs
    detector, _, _ = load_stage(run, "calibrate", dev, trust_checkpoint=trust_checkpoint,
                                    trust_config=trust_config)

    report = progress or (lambda *a, **kw: None)
    # The teacher is the original float model (GELU), also after mlp-recon, as in the
    # published code: its float inputs, targets and APH weights, so reconstruction can
    # win back what the GELU -> ReLU swap cost. The quantized model keeps the ReLU MLPs.
    fp = source.build(dev)
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    # Entries of an earlier run with other settings or another calibrate artifact are refilled.
    cache = TensorCache(Path(run) / "reconstruct" / "cache", dtype=CACHE_DTYPES[config.cache_dtype],
                        key=stage.cache_key)
    main = distributed.is_main()
    if force and main:
        cache.drop("")
    distributed.barrier()
    aph = _aph_of(stage)
    # The calibrate settings (bit-widths) carry over; images are reconstruct's own.
    header = made.with_fields(**stage.header(), reconstruct=asdict(config),
                              reconstruct_quant_config=stage.quant_config)
    blocks = Path(run) / "reconstruct" / "blocks"
    units = units_of(detector) if config.loss != "none" else []
    # With --heads, the RPN, box and mask heads follow the neck (aphq_cli/models/heads.py): each is a small
    # module over the detector's own layers, with a float twin over the float model's.
    kinds = config.head_kinds.split(",")
    heads = [h for h in head_units(detector) if h.kind in kinds] if config.heads and units else []
    twins = {h.name: h.module for h in head_units(fp)} if heads else {}
    by_index = {len(units) + j: h for j, h in enumerate(heads)}
    units += [(h.name, h.module) for h in heads]
    caches = UnitCaches(cache, source.images(dataset, dev), dev, heads={k: h.key for k, h in by_index.items()})
    planned = [name for k, (name, _) in enumerate(units) if k not in by_index]
    plans = disk_plans(fp, planned, caches.imgs, config.loss, cache, aph, stage.cache_key,
                       CACHE_DTYPES[config.cache_dtype].itemsize, drop_aph=not keep_aph_cache,
                       heads=[h.name for h in heads])
    check_free_space(STAGE, [("reconstruct unit cache", plans["unit_cache"]), ("APH cache", plans["aph_cache"])],
                     free_space, together=plans["both"])
    aph_use = used_by_the_stage(aph)  # from here on no other run removes the estimates while this one reads them
    if main:
        write_plan(blocks.parent / "disk_plan.json", plans, len(dataset))
    for k, (name, unit) in enumerate(units):
        twin = twins[name] if k in by_index else fp.get_submodule(name)
        caches.prepare(k, name, unit, twin, detector, fp, units[k - 1][1] if k else None, report)
        path = blocks / f"{k:02d}_{name.replace('.', '_')}.safetensors"
        # Rank 0 decides, so every rank takes the same branch (and meets the same barriers). A finished
        # unit whose file is damaged, or was made from other inputs, is reconstructed again.
        saved = None if force or not main else load_if_current(path, stage="reconstruct-unit", inputs=inputs)
        finished = distributed.broadcast(saved is not None)
        if not finished:
            head = by_index.get(k)
            weights = (lambda i: None) if head else _loss_weights(config.loss, k, name, unit, detector, fp, caches,
                                                                  aph, config.delta, report)
            if main:  # the optimization itself runs on one rank; the others wait for its result
                label = f"unit {k + 1}/{len(units)} {name}"
                losses = reconstruct_unit(unit, caches, k, weights, config, config.seed * 1000 + k,
                                          lambda s, t, value: report(label, s, t, loss=value),
                                          head_loss=head.loss(config.head_loss) if head else None)
                part = header.with_fields(unit=name, losses=losses, total_blocks=len(units))
                save_artifact(path, {f"{name}.{key}": v.detach().clone() for key, v in unit.state_dict().items()},
                              stage="reconstruct-unit", config=part.to_dict(), inputs=inputs)
            distributed.barrier()
        if not main:
            saved = load_artifact(path, stage="reconstruct-unit", expect_inputs=inputs)[0]
        if finished or not main:
            _load_unit(unit, name, saved)
        distributed.barrier()  # nobody still reads what release() deletes
        if main:
            caches.release(k)
            if not keep_aph_cache:  # this unit's APH maps (if it has any): this run reads them no more
                aph_use.drop(name)
    distributed.barrier()
    if not main:
        return StageResult(stage.out, False)
    cache.drop("")
    result = stage.save(quantized_tensors(detector, before),
                        header.with_fields(quantization_map=quantization_map(detector)).to_dict())
    if not keep_aph_cache:
        _drop_aph(aph_use, report)
    return result


def disk_plans(fp: nn.Module, names: list[str], images, loss: str, cache: TensorCache,
               aph: TensorCache, key: str, itemsize: int = 4, drop_aph: bool = False,
               heads: list[str] | None = None) -> dict[str, CachePlan]:
    """What the unit cache and the APH cache will hold for ``names`` (backbone units and the neck) and ``heads``.

    ``both`` is the two together, for when they share a filesystem (:func:`joint_plan`).
    The shapes come from float feature passes, one per distinct input shape:
    measured, so any input size, padding or backbone variant is planned as it will run.
    A head unit's entries hold as many RoIs as the image turns out to have, so they are
    planned at the most the test configs allow (:func:`~aphq_cli.models.heads.head_cache_shapes`).
    """
    ios, count = per_image_shapes(fp, names, images), len(images)
    backbone = [n for n in names if n != "neck"] if loss == "aph" else []
    head_plan = head_plan_of(fp, ios, heads, key, itemsize) if heads else None
    unit_names = [f"{p}/{k}" for k in range(len(names) + len(heads or [])) for p in ("q", "y", "fp", "fisher")]
    complete = complete_entries(cache, unit_names + ["rec"], count)
    aph_complete = complete_entries(aph, backbone, count)
    unit = reconstruct_plan(cache.root, names, ios, key, loss, complete, itemsize, head_plan)
    maps = aph_plan(aph.root, backbone, ios, aph_complete, aph.dtype.itemsize)
    both = joint_plan(unit, maps, names, ios, key, loss, itemsize, drop_aph, complete, aph_complete, head_plan)
    return {"unit_cache": unit, "aph_cache": maps, "both": both}


def head_plan_of(fp: nn.Module, ios: list[dict], heads: list[str], key: str, itemsize: int) -> HeadPlan:
    """The head units' entries per image, from each image's FPN output shapes (one meta pass per distinct one)."""
    by_feats: dict[tuple, tuple] = {}
    for io in ios:
        feats = tuple(tuple(s) for s in io["neck"]["out"])
        if feats not in by_feats:
            by_feats[feats] = head_cache_shapes(fp, list(feats))
    found = [by_feats[tuple(tuple(s) for s in io["neck"]["out"])] for io in ios]
    dtypes = {name: dtype for name, (_, dtype) in found[0][0].items() if not dtype.is_floating_point}
    records = entry_bytes([{name: shape for name, (shape, _) in rec.items()} for rec, _ in found], itemsize, key,
                          dtypes)
    targets = [entry_bytes([outputs(outs[name]) for _, outs in found], itemsize, key) for name in heads]
    return HeadPlan(records, targets)


def _aph_of(stage) -> TensorCache:
    """The run's entry of the shared APH cache: mlp-recon's estimates (it stores float16; another
    ``aph_dtype`` is an entry of its own). Made only where needed: its key hashes the checkpoint."""
    return aph_cache(stage.source, stage.dataset, stage.config.delta, CACHE_DTYPES[stage.config.aph_dtype])


def _drop_aph(aph: SharedUse, report=None) -> None:
    """Remove one APH cache entry folder (this run's images, checkpoint and delta), saying how much it freed.

    Not while another process uses it: then it says so, and the entry stays.
    """
    root = aph.cache.root
    freed = folder_bytes(root)
    dropped = aph.drop("")
    if report is not None and freed:
        report(f"removed APH cache {root} ({gib(freed)})" if dropped
               else f"kept APH cache {root} ({gib(freed)}): another run is using it", 1, 1)


def _load_unit(unit: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Put a finished unit's saved state (hard-rounded weights, learned scales) back in place."""
    state = unit.state_dict()
    with torch.no_grad():
        for key, value in tensors.items():
            state[key[len(name) + 1:]].copy_(value)
