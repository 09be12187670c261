"""Bit packing and the group-wise quantization math."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mvquant.quantization import core
from mvquant.quantization.packing import pack_bits, packed_width, unpack_bits


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(0, 5), cols=st.integers(1, 70), seed=st.integers(0, 10**6))
def test_pack_unpack_round_trip(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.int64)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_width(cols, bits))
    assert torch.equal(unpack_bits(packed, bits, cols).long(), codes)


def test_pack_sizes_and_layout():
    # 4-bit: two codes per byte, low nibble first; 3-bit: 8 codes in 3 bytes
    assert pack_bits(torch.tensor([[1, 2, 3]]), 4).tolist() == [[0x21, 0x03, 0, 0]]
    assert packed_width(576, 4) == 288 and packed_width(576, 3) == 216 and packed_width(576, 2) == 144
    assert packed_width(10, 3) == 6 and packed_width(10, 8) == 10


def test_rows_are_independent():
    codes = torch.randint(0, 16, (4, 37))
    packed = pack_bits(codes, 4)
    assert torch.equal(unpack_bits(packed[2:3], 4, 37).long(), codes[2:3])


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([[16]]), 4)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([None, 8, 16, 24, 32]), cols=st.integers(1, 80),
       symmetric=st.booleans(), seed=st.integers(0, 10**6))
def test_rtn_error_bound(bits, group, cols, symmetric, seed):
    """Every weight is within half a step of its group's grid, plus the fp16 rounding of the scale:
    a scale rounded down by up to 2^-11 (relative) shortens the grid by up to qmax * 2^-11 steps."""
    w = torch.randn(6, cols, generator=torch.Generator().manual_seed(seed))
    codes, scale, zero = core.quantize_weight(w, bits, group, symmetric)
    deq = core.dequantize_codes(codes, scale, zero, bits, group)
    step = core.expand_groups(scale.float(), cols, group)
    assert scale.shape == (6, core.num_groups(cols, group))
    slack = (1 << bits) * 2.0 ** -11
    assert (deq - w).abs().le(step * (0.5 + slack) + 1e-6).all()
    # independent check of the group layout: columns [k*g, (k+1)*g) share one scale
    if group:
        for k in range(core.num_groups(cols, group)):
            cols_k = slice(k * group, min(cols, (k + 1) * group))
            assert torch.all(step[:, cols_k] == scale[:, k:k + 1].float())


def test_last_group_shorter_uses_only_its_columns():
    w = torch.zeros(1, 10)
    w[0, 8:] = torch.tensor([0.5, -0.25])  # last group (size 2 of group 8) has a range of its own
    w[0, :8] = 100.0
    codes, scale, zero = core.quantize_weight(w, 4, 8, symmetric=False)
    assert scale.shape == (1, 2)
    assert abs(float(scale[0, 1]) - 0.75 / 15) < 1e-4
    deq = core.dequantize_codes(codes, scale, zero, 4, 8)
    assert (deq[0, 8:] - w[0, 8:]).abs().max() <= float(scale[0, 1]) / 2 + 1e-6


def test_symmetric_grid_is_symmetric():
    w = torch.tensor([[-1.0, 1.0, 0.0, 0.5]])
    codes, scale, zero = core.quantize_weight(w, 4, None, symmetric=True)
    assert zero is None
    deq = core.dequantize_codes(codes, scale, zero, 4, None)
    assert torch.allclose(deq[0, :2], torch.tensor([-1.0, 1.0]), atol=1e-3) and deq[0, 2] == 0


def test_per_token_activation_quantization():
    x = torch.randn(5, 33)
    q, s = core.quantize_activations_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (5, 1)
    assert torch.allclose(s.squeeze(1), x.abs().amax(1) / 127)
    assert ((q.float() * s - x).abs() <= s / 2 + 1e-6).all()
