"""Model surgery: the GELU -> ReLU swap of mlp-recon (method.md §5), for building and reloading alike."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def relu_mlps(detector: nn.Module, blocks: Iterable[str]) -> None:
    """Swap the MLP activation of each named block for ReLU."""
    for block in blocks:
        detector.get_submodule(f"{block}.mlp").act = nn.ReLU()


def apply_mlp_recon(detector: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Swap GELU for ReLU in every block an mlp-recon artifact reconstructed, and load its fc1/fc2."""
    state = detector.state_dict()
    blocks = sorted({name[: -len(".ub")] for name in tensors if name.endswith(".ub")})
    relu_mlps(detector, blocks)
    for block in blocks:
        for key in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            state[f"{block}.mlp.{key}"].copy_(tensors[f"{block}.mlp.{key}"])
