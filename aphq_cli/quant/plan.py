"""A quantization plan: what the model tells the quantization code about itself.

``aphq_cli/quant`` knows how to quantize a Linear, a Conv2d or a matmul, how
to search a range and how to fold a per-channel scale into a LayerNorm; it
does not know which model it is working on. The model side
(``aphq_cli/models/plan.py``) walks its detector once and writes a plan: the
layers to quantize with their bits, the LayerNorm feeding each Linear that
can take the RepQ fold, the block that pads that norm's output, the inputs
that follow a ReLU, and the task loss whose Hessian weighs the reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

LayerKind = Literal["linear", "conv", "matmul"]


@dataclass(frozen=True)
class LayerPlan:
    """One layer to quantize.

    Attributes:
        kind: ``linear`` and ``conv`` keep their module (weights shared);
            ``matmul`` is a two-operand product module replaced whole.
        w_bits: weight bits (0 for a matmul, which has no weight).
        a_bits: input bits (both operands of a matmul).
        heads: a matmul's head count (one quantizer per head and operand).
        norm: the LayerNorm whose output is this Linear's input, for the
            RepQ fold (qualified name), or None.
        pad_owner: the module that pads ``norm``'s output to whole windows; its
            ``pad_value`` takes the folded zero (qualified name), or None.
        relu_input: the input follows a ReLU, so it may take zero point 0.
        w_group: 0, one weight scale and zero point per output channel (the
            published method); else one per group of this many consecutive
            inputs of each output channel (beyond it; the heads' option).
    """

    kind: LayerKind
    w_bits: int
    a_bits: int
    heads: int = 1
    norm: str | None = None
    pad_owner: str | None = None
    relu_input: bool = False
    w_group: int = 0


@dataclass(frozen=True)
class Task:
    """The task loss that APH and Fisher weights differentiate.

    Attributes:
        outputs: ``outputs(model, image)``, the model outputs the loss
            compares (for a two-stage detector: the RPN's).
        loss: ``loss(outputs, float_outputs)``, a scalar.
    """

    outputs: Callable[[nn.Module, torch.Tensor], object]
    loss: Callable[[object, object], torch.Tensor]


@dataclass(frozen=True)
class QuantPlan:
    """Every layer to quantize, in module order, and the model's task loss."""

    layers: dict[str, LayerPlan]
    task: Task | None = None

