"""Bit-packing of integer codes: ``bits``-bit values, least significant bit first, no padding between.

Two 4-bit codes share a byte; 3-bit codes run across byte boundaries. The
last byte is zero-padded. Pure functions of arrays, exact for 1..8 bits.
"""

from __future__ import annotations

import numpy as np
import torch


def packed_size(count: int, bits: int) -> int:
    """Bytes needed for ``count`` codes of ``bits`` bits."""
    return (count * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a uint8 tensor of codes below ``2**bits`` into a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    flat = codes.detach().cpu().reshape(-1).numpy().astype(np.uint8)
    if flat.size and int(flat.max()) >= 2 ** bits:
        raise ValueError(f"a code exceeds {bits} bits")
    if bits == 8:
        return torch.from_numpy(flat.copy())
    bitplanes = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :bits]  # (N, bits)
    return torch.from_numpy(np.packbits(bitplanes.reshape(-1), bitorder="little"))


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 codes of ``shape``."""
    count = int(np.prod(shape)) if shape else 1
    data = packed.detach().cpu().numpy().astype(np.uint8)
    if data.size != packed_size(count, bits):
        raise ValueError(f"{data.size} bytes cannot hold {count} codes of {bits} bits")
    if bits == 8:
        return torch.from_numpy(data.copy()).reshape(shape)
    bitstream = np.unpackbits(data, bitorder="little")[: count * bits].reshape(count, bits)
    values = np.packbits(np.pad(bitstream, ((0, 0), (0, 8 - bits))), axis=1, bitorder="little")[:, 0]
    return torch.from_numpy(values).reshape(shape)
