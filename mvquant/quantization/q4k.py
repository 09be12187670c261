"""llama.cpp's Q4_K grid as a quantization grid: codes and double-quantized scales that a GGUF
file holds bit for bit (`--grid q4_k`). The pure math; the methods call it through grids.py.

A row is cut into super-blocks of 256 weights = 8 sub-blocks of 32 (ggml-common.h, block_q4_K):

    w = d * sc_j * q - dmin * m_j      q in 0..15; sc_j, m_j in 0..63 (6 bits); d, dmin fp16

computed in float32 as ggml's dequantize_row_q4_K does (d1 = d * sc, m1 = dmin * m, then d1 * q - m1).
Parameters follow quantize_row_q4_K_ref of ggml-quants.c (what llama-quantize does without an
importance matrix): per sub-block a weighted least-squares search of (scale, min) over 21 candidate
ranges (make_qkx2_quants, weights sqrt(mean x^2) + |x|), then the 8 scales and 8 mins quantized to
6 bits under the super-block's fp16 d = max scale / 63 and dmin = max min / 63, and the codes
rounded against those stored values. 144 bytes per 256 weights: 4.5 bits/weight.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

QK_K = 256          # weights per super-block
SUB = 32            # weights per sub-block (one 6-bit scale and min)
NSUB = QK_K // SUB
BLOCK_BYTES = 2 + 2 + 12 + QK_K // 2


def fits(in_features: int) -> bool:
    """Q4_K needs whole super-blocks along the input dimension (llama-quantize falls back otherwise)."""
    return in_features % QK_K == 0


def _make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
               nstep: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qkx2_quants over [..., 32] sub-blocks at once: (scale, the_min >= 0) with x ~ scale * L - the_min.

    The same steps as the C loop, vectorized over sub-blocks: start from the min/max range, then try
    nstep + 1 shrunk/stretched ranges, each refit by weighted least squares, keeping a candidate only
    on a strictly lower error; later candidates start from the best min so far, as in the C code."""
    mn = x.amin(-1).clamp(max=0)
    mx = x.amax(-1)
    flat = mx == mn
    sum_w, sum_x = w.sum(-1), (w * x).sum(-1)

    def err_of(scale, low, L):
        return (w * (scale.unsqueeze(-1) * L + low.unsqueeze(-1) - x) ** 2).sum(-1)

    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = nmax / rng
    scale = 1 / iscale
    L = torch.round(iscale.unsqueeze(-1) * (x - mn.unsqueeze(-1))).clamp(0, nmax)
    best, low = err_of(scale, mn, L), mn
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / torch.where(flat, torch.ones_like(mx), mx - low)
        L = torch.round(iscale.unsqueeze(-1) * (x - low.unsqueeze(-1))).clamp(0, nmax)
        sum_l, sum_l2, sum_xl = (w * L).sum(-1), (w * L * L).sum(-1), (w * L * x).sum(-1)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        cur = err_of(this_scale, this_min, L)
        better = (D > 0) & (cur < best) & ~flat
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        low = torch.where(better, this_min, low)
    return torch.where(flat, torch.zeros_like(scale), scale), -low


def compute_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [rows, n] (n % 256 == 0) -> (superblock fp16 [rows, n/256, 2] = (d, dmin),
    sub uint8 [rows, n/32, 2] = (sc, m) 6-bit)."""
    rows, n = w.shape
    x = w.detach().float().reshape(rows, n // QK_K, NSUB, SUB)
    av = (x * x).mean(-1, keepdim=True).sqrt()
    scale, the_min = _make_qkx2(x, av + x.abs())                                     # [rows, nsb, 8]
    max_scale = scale.amax(-1, keepdim=True).clamp(min=0)
    max_min = the_min.amax(-1, keepdim=True).clamp(min=0)
    inv_s = torch.where(max_scale > 0, 63.0 / max_scale, torch.zeros_like(max_scale))
    inv_m = torch.where(max_min > 0, 63.0 / max_min, torch.zeros_like(max_min))
    sc = torch.round(inv_s * scale).clamp(0, 63)
    m = torch.round(inv_m * the_min).clamp(0, 63)
    superblock = torch.cat([max_scale / 63.0, max_min / 63.0], -1).half()
    sub = torch.stack([sc, m], -1).to(torch.uint8).reshape(rows, n // SUB, 2)
    return superblock, sub


def scale_offset(superblock: torch.Tensor, sub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block float32 (d * sc, dmin * m), [rows, n/32] each: w = s * q - offset."""
    rows = superblock.shape[0]
    d = superblock.float().repeat_interleave(NSUB, dim=1)                            # [rows, n/32, 2]
    s = d[..., 0] * sub[..., 0].float()
    off = d[..., 1] * sub[..., 1].float()
    return s.reshape(rows, -1), off.reshape(rows, -1)


def round_codes(w: torch.Tensor, s: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (float) of w against (s, offset) of the same shape, as ggml rounds them: nearest of
    (w + offset) / s; a zero scale gives code 0 (its weights are -offset whatever the code)."""
    q = torch.round((w.float() + off) / torch.where(s == 0, torch.ones_like(s), s)).clamp(0, 15)
    return torch.where(s == 0, torch.zeros_like(q), q)


def quantize_codes(w: torch.Tensor, s: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 of w [rows, n] against per-32 (s, offset) [rows, n/32]."""
    return round_codes(w, s.repeat_interleave(SUB, dim=-1), off.repeat_interleave(SUB, dim=-1)).to(torch.uint8)


def dequantize(codes: torch.Tensor, superblock: torch.Tensor, sub: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    s, off = scale_offset(superblock, sub)
    w = s.repeat_interleave(SUB, dim=-1) * codes.float() - off.repeat_interleave(SUB, dim=-1)
    return w.to(dtype)


class Q4KQuantized(NamedTuple):
    """A weight on llama.cpp's Q4_K grid (unpacked): w = d * sc * q - dmin * m per sub-block of 32."""
    codes: torch.Tensor               # uint8 [rows, in], in [0, 16)
    superblock: torch.Tensor          # fp16 [rows, in / 256, 2]: (d, dmin)
    sub_scales: torch.Tensor          # uint8 [rows, in / 32, 2]: 6-bit (sc, m)

    def to(self, device) -> "Q4KQuantized":
        return type(self)(*(t.to(device) for t in self))


def quantize(w: torch.Tensor) -> Q4KQuantized:
    """Round to nearest on the Q4_K grid."""
    superblock, sub = compute_params(w)
    return Q4KQuantized(quantize_codes(w, *scale_offset(superblock, sub)), superblock, sub)


def to_blocks(codes: torch.Tensor, superblock: torch.Tensor, sub: torch.Tensor) -> np.ndarray:
    """-> uint8 [rows, n/256 * 144]: block_q4_K as ggml stores it (d, dmin, scales[12], qs[128])."""
    rows, n = codes.shape
    nsb = n // QK_K
    sb = np.ascontiguousarray(superblock.to(torch.float16).numpy()).view(np.uint8).reshape(rows, nsb, 4)
    sm = sub.to(torch.uint8).numpy().reshape(rows, nsb, NSUB, 2).astype(np.uint8)
    ls, lm = sm[..., 0], sm[..., 1]
    scales = np.zeros((rows, nsb, 12), dtype=np.uint8)
    scales[..., 0:4] = ls[..., :4] | ((ls[..., 4:] >> 4) << 6)       # sc 0-3, high bits of sc 4-7
    scales[..., 4:8] = lm[..., :4] | ((lm[..., 4:] >> 4) << 6)       # m 0-3, high bits of m 4-7
    scales[..., 8:12] = (ls[..., 4:] & 0xF) | ((lm[..., 4:] & 0xF) << 4)
    q = codes.to(torch.uint8).numpy().reshape(rows, nsb, QK_K // 64, 2, 32)
    qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(rows, nsb, QK_K // 2)
    return np.concatenate([sb, scales, qs], axis=-1).reshape(rows, nsb * BLOCK_BYTES)
