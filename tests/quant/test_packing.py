"""Bit-packing round trips and the byte layout."""

import pytest
import torch

from aphq_cli.quant.packing import pack, packed_size, unpack


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 3, 3), (1,), (13, 1, 1, 1)])
def test_round_trip_every_width_and_odd_shapes(bits, shape):
    gen = torch.Generator().manual_seed(bits * 100 + len(shape))
    codes = torch.randint(0, 2 ** bits, shape, generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(codes.numel(), bits)
    assert torch.equal(unpack(packed, bits, shape), codes)


def test_two_4bit_codes_per_byte_low_nibble_first():
    assert pack(torch.tensor([1, 2, 15, 0], dtype=torch.uint8), 4).tolist() == [0x21, 0x0F]


def test_3bit_codes_cross_byte_boundaries():
    # codes 0b101, 0b011, 0b111 -> bits (LSB first) 1,0,1, 1,1,0, 1,1,1 -> 0b11011101, 0b00000001
    assert pack(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [0b11011101, 0b1]


def test_errors():
    with pytest.raises(ValueError, match="exceeds 2 bits"):
        pack(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, (7,))
