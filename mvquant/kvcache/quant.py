"""The K/V quantizer: asymmetric round-to-nearest in groups along one axis (KIVI style).

Keys are quantized per channel (a group is `group_size` consecutive tokens of one channel: the
outlier channels get their own range) or per token; values per token (a group is `group_size`
consecutive channels of one token). Entries flagged in `exclude` (protected channels, padding,
sink tokens) take no part in a group's min/max: they are stored elsewhere in full precision and
must not widen the range of the entries that are quantized.
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def _grouped(x: torch.Tensor, dim: int, group_size: int) -> tuple[torch.Tensor, int]:
    """Move `dim` last and split it into groups of `group_size` (the last group padded by
    repeating its final entry, which changes neither min nor max). Returns [..., groups, G], length."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    pad = (-n) % group_size
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, group_size), n


def _ungrouped(g: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    return g.reshape(*g.shape[:-2], -1)[..., :n].movedim(-1, dim)


def quantize_groups(x: torch.Tensor, bits: int, dim: int, group_size: int,
                    exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric `bits`-bit codes of x in groups of `group_size` along `dim`.

    Returns (codes uint8 shaped like x, scale, minimum), scale/minimum shaped [..., groups, 1] with
    `dim` moved last. x ~ codes * scale + minimum, |error| <= scale / 2 for entries not excluded.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    group_size = min(group_size, x.shape[dim])
    xf = x.float()
    g, n = _grouped(xf, dim, group_size)
    if exclude is not None:
        e, _ = _grouped(exclude.expand_as(x), dim, group_size)
        lo = g.masked_fill(e, float("inf")).amin(-1, keepdim=True)
        hi = g.masked_fill(e, float("-inf")).amax(-1, keepdim=True)
        empty = torch.isinf(lo)                 # a group made only of excluded entries
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    else:
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    qmax = 2 ** bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    codes = ((g - lo) / scale).round_().clamp_(0, qmax).to(torch.uint8)
    return _ungrouped(codes, dim, n), scale, lo


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, dim: int,
                      group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_groups (up to the rounding error)."""
    group_size = min(group_size, codes.shape[dim])
    g, n = _grouped(codes.float(), dim, group_size)
    return _ungrouped(g * scale + minimum, dim, n).to(dtype)


def packed_bytes(n_codes: int, bits: int) -> int:
    """Bytes for n codes packed densely (3-bit codes packed 10 per 32-bit word, as KIVI/GPTQ do)."""
    if bits == 3:
        return 4 * -(-n_codes // 10)
    return -(-n_codes * bits // 8)
