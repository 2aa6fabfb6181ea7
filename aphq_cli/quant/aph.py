"""Average Perturbation Hessian (method.md §4): pure functions and the detector-level estimate.

For a block output O and a task loss L of the rest of the network,
``|g(O + delta) - g(O - delta)|`` with ``g = dL/dO`` is about
``2 delta |H 1|``: a Hessian-vector product with the all-ones vector, which
keeps the Hessian's off-diagonal mass that a diagonal or Fisher weight drops.
The estimate uses the float model only, so it is cached per (model, data,
delta) and shared by mlp-recon and reconstruct.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from aphq_cli.quant.headloss import rpn_terms
from aphq_cli.quant.plan import Task

DELTA = 1e-3
OBJECTNESS = 0.7  # anchors whose float objectness exceeds this carry the box term


def perturbation_gradients(loss_fn: Callable[[torch.Tensor], torch.Tensor], output: torch.Tensor,
                           delta: float = DELTA) -> torch.Tensor:
    """``|g(O + delta) - g(O - delta)|`` for a loss that is a function of ``O``.

    Args:
        loss_fn: the rest of the network and the task loss, as a function of O.
        output: O, the block's float output.

    Returns:
        Tensor of O's shape.
    """
    grads = []
    for sign in (1.0, -1.0):
        o = (output.detach() + sign * delta).requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(loss_fn(o), o)
        grads.append(g)
    return (grads[0] - grads[1]).abs()


def normalize_per_image(weight: torch.Tensor) -> torch.Tensor:
    """Scale each image's weight map (dimension 0) to mean 1; an all-zero map becomes all ones."""
    mean = weight.flatten(1).mean(dim=1).view(-1, *([1] * (weight.dim() - 1)))
    return torch.where(mean > 0, weight / mean.clamp_min(torch.finfo(weight.dtype).tiny), torch.ones_like(weight))


def rpn_task_loss(cls: Sequence[torch.Tensor], reg: Sequence[torch.Tensor], cls_fp: Sequence[torch.Tensor],
                  reg_fp: Sequence[torch.Tensor]) -> torch.Tensor:
    """Task loss of RPN outputs against the float model's, over every FPN level.

    Binary KL between sigmoid objectness and the float objectness
    (probabilities clamped to [1e-7, 1 - 1e-7], mean over elements), plus
    smooth-L1 between box deltas and the float deltas, both multiplied by the
    mask of anchors whose float objectness exceeds 0.7 and averaged over
    every element of the level, as the published code does (not over the
    kept anchors only). Each sum is divided by its own detached value, so the
    two terms weigh equally whatever their scale. Where no anchor of any
    level passes 0.7 the box term is left out (the published code divides
    0 by 0 there and its APH is NaN).

    Args:
        cls, cls_fp: per level ``(B, A, H, W)`` logits.
        reg, reg_fp: per level ``(B, 4A, H, W)`` deltas (channel ``4a + k``).
    """
    sum_cls, sum_reg, kept = rpn_terms(cls, reg, cls_fp, reg_fp, OBJECTNESS)
    loss = sum_cls / sum_cls.detach().clamp_min(1e-12)
    if kept:
        loss = loss + sum_reg / sum_reg.detach().clamp_min(1e-12)
    return loss


@contextlib.contextmanager
def replace_output(module: nn.Module, value: torch.Tensor) -> Iterator[None]:
    """Within the scope, ``module``'s forward returns ``value`` instead of its output."""
    handle = module.register_forward_hook(lambda m, args, out: value)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_output(module: nn.Module) -> Iterator[list]:
    """Within the scope, every output of ``module`` is appended to the yielded list (detached)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    try:
        yield seen
    finally:
        handle.remove()


def block_aph(detector: nn.Module, block: nn.Module, img: torch.Tensor, task: Task,
              delta: float = DELTA) -> torch.Tensor:
    """Normalized APH weight of ``block``'s output for one image batch, from the float detector.

    Args:
        task: the model's task loss (for our detectors the RPN's, method.md §4).

    Returns:
        The block output's shape (``(B, H, W, C)`` for Swin units), mean 1 per image.
    """
    with torch.no_grad(), capture_output(block) as seen:
        target = task.outputs(detector, img)
    output = seen[0]

    def loss_fn(o: torch.Tensor) -> torch.Tensor:
        with replace_output(block, o):
            out = task.outputs(detector, img)
        return task.loss(out, target)

    with _frozen(detector):
        weight = perturbation_gradients(loss_fn, output, delta)
    return normalize_per_image(weight)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters need no gradient for the estimate: only the block output does."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def ensure_block_aph(detector: nn.Module, name: str, block: nn.Module, images: Sequence[torch.Tensor],
                     cache, task: Task, delta: float = DELTA, progress=None) -> None:
    """Compute and cache the APH weight of ``block`` for every image, unless cached already.

    Under torchrun every rank computes its share of the images into the
    shared cache folder; rank 0 marks the entry complete once all are there.

    Args:
        images: model inputs ``(1, 3, H, W)`` in dataset order.
        cache: a :class:`~aphq_cli.tensorcache.TensorCache`; entry ``name``
            holds one ``aph`` tensor per image.
        task: the model's task loss.
        progress: optional callable ``(done, total)`` over images.
    """
    cache.fill(name, len(images), lambda i: {"aph": block_aph(detector, block, images[i], task, delta)}, progress)


def block_fisher(detector: nn.Module, fp: nn.Module, block: nn.Module, img: torch.Tensor, task: Task) -> torch.Tensor:
    """BRECQ's weight: the squared task-loss gradient at ``block``'s output in the partially quantized model.

    The task loss compares the quantized detector's outputs with the float
    model's; unlike APH this depends on the quantization state, so it is not
    cached across runs. Normalized per image to mean 1 like APH.
    """
    with torch.no_grad():
        target = task.outputs(fp, img)
    with torch.no_grad(), capture_output(block) as seen:
        task.outputs(detector, img)

    def loss_fn(o: torch.Tensor) -> torch.Tensor:
        with replace_output(block, o):
            out = task.outputs(detector, img)
        return task.loss(out, target)

    o = seen[0].detach().requires_grad_(True)
    with _frozen(detector), torch.enable_grad():
        (g,) = torch.autograd.grad(loss_fn(o), o)
    return normalize_per_image(g.pow(2))
