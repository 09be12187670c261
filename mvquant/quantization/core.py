"""The integer grids, as pure math: group-wise weights (every method) and groups along any axis (the KV cache).

Asymmetric: w ~ (q - z) * s with q, z in [0, 2^b - 1]. Symmetric: z = 2^(b-1) fixed and
q in [1, 2^b - 1], so the grid is -(2^(b-1) - 1) .. 2^(b-1) - 1 times s. Scales are kept in fp16
(what the checkpoint stores), and codes are computed against the fp16 scale, so the stored
(codes, scales, zeros) reproduce exactly the weights the error bounds are about.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class IntQuantized(NamedTuple):
    """A weight on the integer grid: what every method hands QuantLinear (unpacked)."""
    codes: torch.Tensor               # uint8 [rows, in], in [0, 2^bits)
    scales: torch.Tensor              # fp16 [rows, groups]
    zeros: torch.Tensor | None        # uint8 [rows, groups]; None when symmetric (z = 2^(bits-1))

    def to(self, device) -> "IntQuantized":
        return type(self)(*(None if t is None else t.to(device) for t in self))


def num_groups(in_features: int, group_size: int | None) -> int:
    return 1 if not group_size else -(-in_features // group_size)


def group_index(in_features: int, group_size: int | None, device=None) -> torch.Tensor:
    """Column -> group id (the last group may be shorter)."""
    cols = torch.arange(in_features, device=device)
    return torch.zeros_like(cols) if not group_size else cols // group_size


def expand_groups(t: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """[rows, groups] -> [rows, in_features] (each group's value over its columns)."""
    if not group_size or t.shape[-1] == 1:
        return t[..., :1].expand(*t.shape[:-1], in_features)
    return t.repeat_interleave(group_size, dim=-1)[..., :in_features]


def _grouped(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    """[rows, in] -> [rows, groups, g] padded with NaN in the last group (ignored by nan-aware reductions)."""
    rows, n = w.shape
    g = group_size or n
    pad = (-n) % g
    wp = torch.nn.functional.pad(w, (0, pad), value=float("nan")) if pad else w
    return wp.view(rows, (n + pad) // g, g), pad


def compute_params(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                   clip: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-(row, group) fp16 scale and integer zero point (None when symmetric).

    `clip` (scalar or [rows, groups]) shrinks the range, as AWQ's clipping search does."""
    w = w.float()
    wg, _ = _grouped(w, group_size)
    qmax = (1 << bits) - 1
    if symmetric:
        amax = torch.nan_to_num(wg.abs(), nan=0.0).amax(-1)
        if clip is not None:
            amax = amax * clip
        scale = (amax / ((1 << (bits - 1)) - 1)).clamp(min=1e-8).half().clamp(min=torch.finfo(torch.float16).tiny)
        return scale, None
    wmax = torch.nan_to_num(wg, nan=-float("inf")).amax(-1).clamp(min=0)
    wmin = torch.nan_to_num(wg, nan=float("inf")).amin(-1).clamp(max=0)
    if clip is not None:
        wmax, wmin = wmax * clip, wmin * clip
    scale = ((wmax - wmin) / qmax).clamp(min=1e-8).half().clamp(min=torch.finfo(torch.float16).tiny)
    zero = torch.round(-wmin / scale.float()).clamp(0, qmax).to(torch.uint8)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                   group_size: int | None) -> torch.Tensor:
    """Round w to codes in [0, 2^b) given (scale, zero) per group. Returns uint8 [rows, in]."""
    n = w.shape[1]
    s = expand_groups(scale.float(), n, group_size)
    qmax = (1 << bits) - 1
    if zero is None:
        z = 1 << (bits - 1)
        return (torch.round(w.float() / s) + z).clamp(1, qmax).to(torch.uint8)
    z = expand_groups(zero.float(), n, group_size)
    return (torch.round(w.float() / s) + z).clamp(0, qmax).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                     group_size: int | None, dtype=torch.float32) -> torch.Tensor:
    n = codes.shape[-1]
    s = expand_groups(scale.to(dtype), n, group_size)
    z = float(1 << (bits - 1)) if zero is None else expand_groups(zero.to(dtype), n, group_size)
    return (codes.to(dtype) - z) * s


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, clip=None) -> IntQuantized:
    """Round to nearest on the integer grid."""
    scale, zero = compute_params(w, bits, group_size, symmetric, clip)
    return IntQuantized(quantize_codes(w, scale, zero, bits, group_size), scale, zero)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, clip=None) -> torch.Tensor:
    codes, scale, zero = quantize_weight(w, bits, group_size, symmetric, clip)
    return dequantize_codes(codes, scale, zero, bits, group_size, dtype=torch.float32)


def quantize_activations_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token quantization: (int8 codes, fp32 scale [..., 1])."""
    qmax = (1 << (bits - 1)) - 1
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-8) / qmax
    q = torch.round(x.float() / scale).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


# -- groups along any axis, with a float minimum (the KV cache, KIVI's convention) -----------------
# Keys are quantized per channel (a group is `group_size` consecutive tokens of one channel: the outlier
# channels get their own range) or per token; values per token. Entries flagged in `exclude` (protected
# channels, padding, sink tokens) take no part in a group's min/max: they are stored elsewhere in full
# precision and must not widen the range of the entries that are quantized. Unlike the weight grid the
# minimum is a float (no integer zero point) and the scale is not rounded to fp16: nothing is stored.

def _along(x: torch.Tensor, dim: int, group_size: int) -> tuple[torch.Tensor, int]:
    """Move `dim` last and split it into groups of `group_size` (the last group padded by
    repeating its final entry, which changes neither min nor max). Returns [..., groups, G], length."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    pad = (-n) % group_size
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, group_size), n


def _unalong(g: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    return g.reshape(*g.shape[:-2], -1)[..., :n].movedim(-1, dim)


def quantize_groups(x: torch.Tensor, bits: int, dim: int, group_size: int,
                    exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric `bits`-bit codes of x in groups of `group_size` along `dim`.

    Returns (codes uint8 shaped like x, scale, minimum), scale/minimum shaped [..., groups, 1] with
    `dim` moved last. x ~ codes * scale + minimum, |error| <= scale / 2 for entries not excluded.
    """
    group_size = min(group_size, x.shape[dim])
    xf = x.float()
    g, n = _along(xf, dim, group_size)
    if exclude is not None:
        e, _ = _along(exclude.expand_as(x), dim, group_size)
        lo = g.masked_fill(e, float("inf")).amin(-1, keepdim=True)
        hi = g.masked_fill(e, float("-inf")).amax(-1, keepdim=True)
        empty = torch.isinf(lo)                 # a group made only of excluded entries
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    else:
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    qmax = 2 ** bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    codes = ((g - lo) / scale).round_().clamp_(0, qmax).to(torch.uint8)
    return _unalong(codes, dim, n), scale, lo


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, dim: int,
                      group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_groups (up to the rounding error)."""
    group_size = min(group_size, codes.shape[dim])
    g, n = _along(codes.float(), dim, group_size)
    return _unalong(g * scale + minimum, dim, n).to(dtype)
