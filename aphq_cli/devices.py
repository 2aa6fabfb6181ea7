"""Device selection: the device always comes from an option, never hard-coded."""

from __future__ import annotations

import torch

from aphq_cli.errors import AphqError


def resolve_device(name: str):
    """``cpu``, ``cuda`` or ``cuda:N`` -> ``torch.device``, checked to exist."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise AphqError(f"--device {name!r} is not a device name (use cpu, cuda or cuda:N)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AphqError(f"--device {name} asks for a GPU, but torch sees no CUDA device here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AphqError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise AphqError(f"--device {name!r} is not supported (use cpu, cuda or cuda:N)")
    return device
