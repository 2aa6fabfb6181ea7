"""Reconstruction losses of the detection heads (issue #18; beyond the published method).

The published method reconstructs the backbone and the FPN only. A head unit
(the RPN head; a RoI stage's box head or mask head) is reconstructed against
the float head's outputs on the same inputs, with one loss term per output:

* RPN: the terms of the APH task loss (method.md §4), the binary KL of the
  objectness and the smooth-L1 of the box deltas on anchors the float model
  finds (objectness above 0.7);
* box head: the KL between the float and the quantized class distributions
  (softmax over the classes and background), and the smooth-L1 of the box
  deltas of the class the float head predicts, on the RoIs the float model
  keeps (a foreground score at or above the test score threshold);
* mask head: the squared error of the mask logits on the channel of the class
  the float model detected.

Each term is a mean, so its scale does not grow with the number of RoIs or
anchors; :func:`normalized_sum` then divides every term by its first non-zero
value, so that no term dominates by its units (the APH loss divides by the
term's own value for the same reason). The plain alternative they are
measured against (``head_loss = "mse"``) is :func:`mean_squared_error` of
every raw output. Pure functions of tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

_EPS = 1e-7


def objectness_kl(logits: torch.Tensor, logits_fp: torch.Tensor) -> torch.Tensor:
    """Binary KL(float || quantized) of sigmoid probabilities clamped to ``[1e-7, 1 - 1e-7]``, elementwise."""
    p = torch.sigmoid(logits).clamp(_EPS, 1 - _EPS)
    q = torch.sigmoid(logits_fp).clamp(_EPS, 1 - _EPS)
    return q * (q.log() - p.log()) + (1 - q) * ((1 - q).log() - (1 - p).log())


def rpn_terms(cls: Sequence[torch.Tensor], reg: Sequence[torch.Tensor], cls_fp: Sequence[torch.Tensor],
              reg_fp: Sequence[torch.Tensor], objectness: float = 0.7) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The two raw terms of the RPN task loss, summed over FPN levels.

    Args:
        cls, cls_fp: per level ``(B, A, H, W)`` objectness logits.
        reg, reg_fp: per level ``(B, 4A, H, W)`` deltas (channel ``4a + k``).
        objectness: anchors whose float objectness exceeds this carry the box term.

    Returns:
        ``(kl, box, kept)``: the mean KL of each level summed; the smooth-L1 of
        mask-multiplied deltas, averaged over every element of each level
        and summed; whether any anchor passed ``objectness``.
    """
    sum_cls, sum_reg = cls[0].new_zeros(()), cls[0].new_zeros(())
    kept = False
    for c, r, cf, rf in zip(cls, reg, cls_fp, reg_fp):
        sum_cls = sum_cls + objectness_kl(c, cf).mean()
        mask = (torch.sigmoid(cf).clamp(_EPS, 1 - _EPS) > objectness).repeat_interleave(4, dim=1).to(r.dtype)
        kept = kept or bool(mask.any())
        sum_reg = sum_reg + F.smooth_l1_loss(r * mask, rf * mask, reduction="mean")
    return sum_cls, sum_reg, kept


def class_kl(logits: torch.Tensor, logits_fp: torch.Tensor) -> torch.Tensor:
    """KL(float || quantized) of the softmax class distributions ``(N, C + 1)``, averaged over RoIs."""
    if logits.shape[0] == 0:
        return logits.sum() * 0
    log_p = F.log_softmax(logits, dim=1)
    log_q = F.log_softmax(logits_fp, dim=1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=1).mean()


def class_deltas(deltas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The ``(N, 4)`` deltas of each RoI's class from ``(N, 4)`` (class-agnostic) or ``(N, 4C)`` predictions."""
    if deltas.shape[1] == 4:
        return deltas
    index = (labels[:, None] * 4 + torch.arange(4, device=deltas.device)).long()
    return deltas.gather(1, index)


def box_delta_l1(deltas: torch.Tensor, deltas_fp: torch.Tensor, labels: torch.Tensor,
                 keep: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between the deltas of the float class, on the kept RoIs (mean; 0 when none is kept)."""
    keep = keep.bool()
    if not bool(keep.any()):
        return deltas.sum() * 0
    return F.smooth_l1_loss(class_deltas(deltas, labels)[keep], class_deltas(deltas_fp, labels)[keep],
                            reduction="mean")


def mean_squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean squared difference of two tensors; 0 when they are empty (an image without RoIs or detections).

    The mask head's term (its logits on the detected class's channel), and every term of ``head_loss = "mse"``.
    """
    if out.numel() == 0:
        return out.sum() * 0
    return (out - target).pow(2).mean()


def normalized_sum(terms: dict[str, torch.Tensor], first: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Twice the mean of the terms, each divided by its first non-zero value (recorded in ``first``).

    A term that has been zero so far (no kept RoI yet) is left out until it
    is not. Returns None while every term is zero.
    """
    parts = []
    for name, term in terms.items():
        if name not in first and float(term.detach()) > 0:
            first[name] = term.detach()
        if name in first:
            parts.append(term / first[name])
    if not parts:
        return None
    return 2 * sum(parts) / len(terms)
