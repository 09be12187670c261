"""mvquant's integer grid -> ggml block types, bit for bit: the pure packing math of `--format gguf`.

Every ggml type used here is a block of 32 consecutive weights of one row with an fp16 scale d
(ggml-common.h, the dequantize_row_* functions of ggml-quants.c):

    Q4_0  w = d * (q - 8),   q in 0..15      18 bytes / 32 = 4.5 bits/weight
    Q4_1  w = d * q + m,     q in 0..15      20 bytes / 32 = 5.0 bits/weight (m fp16)
    Q5_0  w = d * (q - 16),  q in 0..31      22 bytes / 32 = 5.5 bits/weight
    Q8_0  w = d * q,         q in -128..127  34 bytes / 32 = 8.5 bits/weight

mvquant stores w = s * (c - z) per group (c, z in 0..2^b-1; symmetric: z = 2^(b-1)), so with
d = s the signed code c - z is carried over unchanged whenever it fits the block's range:

    int3 (any)           c - z in -7..7      -> Q4_0  exact
    int4 symmetric       c - z in -7..7      -> Q4_0  exact
    int4 asymmetric      c - z in -15..15    -> Q5_0  exact (default), or
    int5 symmetric       c - z in -15..15    -> Q5_0  exact (--grid q4_k's fallback)
                                             -> Q4_1  q = c, m = fp16(-s * z): exact up to that one rounding
    int8 symmetric       c - z in -127..127  -> Q8_0  exact (asymmetric int8: only if every c - z fits)

A group of G = 32k weights is k blocks repeating its scale; per-row scales repeat over the row.
Groups under 32 or not a multiple of 32, rows not a multiple of 32 and 2-bit grids have no block type.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ..errors import MvquantError
from ..quantization import core

BLOCK = 32
INT4_TYPES = {"q5_0": T.Q5_0, "q4_1": T.Q4_1}


def bits_per_weight(qtype: T) -> float:
    block, nbytes = GGML_QUANT_SIZES[qtype]
    return nbytes * 8 / block


def gguf_type(bits: int, symmetric: bool, group_size: int | None, in_features: int, int4: str = "q5_0") -> T:
    """The ggml type a linear of this grid is carried onto without re-quantization (or a one-line error)."""
    if group_size and group_size % BLOCK:
        raise MvquantError(f"group size {group_size} has no GGUF block type (blocks of {BLOCK} weights share one "
                           f"scale): re-quantize with --group-size 32, 64, 128 or -1")
    if in_features % BLOCK:
        raise MvquantError(f"a linear with {in_features} inputs cannot be stored in GGUF blocks of {BLOCK}: this "
                           "model has no GGUF quantized form")
    if bits == 3 or (bits == 4 and symmetric):
        return T.Q4_0
    if bits == 5 and symmetric:         # the q4_k grid's fallback (quantization/grid.py)
        return T.Q5_0
    if bits == 4:
        if int4 not in INT4_TYPES:
            raise MvquantError(f"unknown --gguf-int4 '{int4}': use {' or '.join(INT4_TYPES)}")
        return INT4_TYPES[int4]
    if bits == 8:
        return T.Q8_0
    raise MvquantError(f"{bits}-bit weights have no GGUF block type that holds them (Q2_K is another grid): "
                       "re-quantize with --bits 3, 4 or 8")


def _per_block(t: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """[rows, groups] -> [rows, in_features / 32]: each 32-block's value (groups are whole blocks)."""
    g = group_size or in_features
    return core.expand_groups(t, in_features, g)[:, ::BLOCK]


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 32] values 0..15 -> [..., 16] bytes: element j in the low nibble, element j + 16 in the high."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.to(torch.float16).numpy()).view(np.uint8).reshape(*x.shape, 2)


def to_blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
              group_size: int | None, qtype: T) -> np.ndarray:
    """codes uint8 [rows, in], scales fp16 [rows, groups], zeros uint8 [rows, groups] | None
    -> uint8 [rows, in / 32 * bytes per block]: the rows as ggml stores them."""
    rows, n = codes.shape
    nb = n // BLOCK
    d = _per_block(scales.to(torch.float16), n, group_size)                       # [rows, nb] fp16
    z = (torch.full_like(d, 1 << (bits - 1), dtype=torch.int16) if zeros is None
         else _per_block(zeros.to(torch.int16), n, group_size))
    c = codes.to(torch.int16).view(rows, nb, BLOCK)
    signed = c - z.to(torch.int16).unsqueeze(-1)                                  # c - z per weight
    lo, hi = {T.Q4_0: (-8, 7), T.Q5_0: (-16, 15), T.Q8_0: (-128, 127), T.Q4_1: (-15, 15)}[qtype]
    if signed.numel() and (int(signed.min()) < lo or int(signed.max()) > hi):
        raise MvquantError(f"codes minus zero points span {int(signed.min())}..{int(signed.max())}, outside "
                           f"{qtype.name}'s {lo}..{hi}: this grid has no exact GGUF type (asymmetric 8-bit: "
                           "re-quantize with --symmetric)")
    dh = _f16_bytes(d)                                                             # [rows, nb, 2]
    if qtype == T.Q4_0:
        body = [dh, _nibbles((signed + 8).numpy())]
    elif qtype == T.Q5_0:
        q = (signed + 16).numpy().astype(np.uint32)
        qh = ((q >> 4) << np.arange(BLOCK, dtype=np.uint32)).sum(-1, dtype=np.uint32)
        body = [dh, qh.astype("<u4").view(np.uint8).reshape(rows, nb, 4), _nibbles(q & 0xF)]
    elif qtype == T.Q4_1:
        m = -(d.float() * z.float())                                               # fp16-rounded below
        body = [dh, _f16_bytes(m), _nibbles(c.numpy())]
    elif qtype == T.Q8_0:
        body = [dh, signed.numpy().astype(np.int8).view(np.uint8)]
    else:
        raise MvquantError(f"no block packing for {qtype.name}")
    return np.concatenate(body, axis=-1).reshape(rows, -1)


def dequantize_blocks(blocks: np.ndarray, qtype: T, in_features: int) -> torch.Tensor:
    """What llama.cpp computes from the blocks (gguf's reference dequantize), float32 [rows, in]."""
    from gguf.quants import dequantize

    return torch.from_numpy(np.ascontiguousarray(dequantize(blocks, qtype), dtype=np.float32)).view(-1, in_features)
