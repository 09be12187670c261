"""Which grid a linear is quantized on, and the three operations every method needs on it.

`--grid int` (default): mvquant's integer grid (core.py), `bits` x `group_size` x symmetric.
`--grid q4_k`: llama.cpp's Q4_K (q4k.py) for linears whose inputs are whole super-blocks of 256.
The others take what llama-quantize's Q4_K_M falls back to for a tensor it cannot block, Q5_0:
5-bit symmetric groups of 32 (our symmetric grid -15..15 inside Q5_0's -16..15, held exactly).
The format is derived from the config and the linear's width, never stored per linear.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import core, q4k

FALLBACK_BITS = 5                 # Q4_K's fallback in llama-quantize: Q5_0


class LinearFormat(NamedTuple):
    grid: str                     # "int" | "q4_k"
    bits: int
    group_size: int | None
    symmetric: bool


def linear_format(config, in_features: int) -> LinearFormat:
    if getattr(config, "grid", "int") != "q4_k":
        return LinearFormat("int", config.bits, config.group_size, config.symmetric)
    if q4k.fits(in_features):
        return LinearFormat("q4_k", 4, q4k.SUB, False)
    return LinearFormat("int", FALLBACK_BITS, q4k.SUB, True)


def quantize(w: torch.Tensor, config, clip=None) -> core.IntQuantized | q4k.Q4KQuantized:
    """Round to nearest on the linear's grid. `clip` (AWQ's range search) applies to the integer grid;
    Q4_K searches its own ranges."""
    f = linear_format(config, w.shape[1])
    if f.grid == "q4_k":
        return q4k.quantize(w)
    return core.quantize_weight(w, f.bits, f.group_size, f.symmetric, clip=clip)


def dequantize(quantized: core.IntQuantized | q4k.Q4KQuantized, config, dtype=torch.float32) -> torch.Tensor:
    f = linear_format(config, quantized.codes.shape[1])
    if f.grid == "q4_k":
        return q4k.dequantize(*quantized, dtype)
    return core.dequantize_codes(*quantized, f.bits, f.group_size, dtype)


def fake_quantize(w: torch.Tensor, config, clip=None) -> torch.Tensor:
    return dequantize(quantize(w, config, clip), config)
