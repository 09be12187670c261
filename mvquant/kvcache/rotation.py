"""Rotation-based K/V quantizers, as vLLM 0.32 stores its low-bit KV caches (pure torch, CPU).

Rotation is the other answer to outlier K channels: a Hadamard rotation spreads a massive channel
over every channel of the head, so no group range is set by it. Two of vLLM's schemes, each
reproduced from its source (vllm/model_executor/layers/quantization/turboquant/, and
vllm/v1/attention/ops/int4_per_token_head.py):

- TurboQuant keys (`--kv-cache-dtype turboquant_*`): per (token, head) vector k, keep ||k|| in fp16,
  rotate the unit vector by the orthonormal Sylvester Hadamard matrix H (no random signs: the
  quantizer is symmetric), give each coordinate the nearest of 2^bits Lloyd-Max centroids for
  N(0, 1/d), and on reading re-normalize the centroid vector to unit norm ("norm correction", the
  `_nc` presets), rotate back and scale by the norm. Its values: uniform asymmetric codes over the
  whole head (fp16 scale and minimum). vLLM keeps the first and last two layers unquantized.
- int4_per_token_head: a randomized Hadamard transform (fixed +-1 signs, then the unnormalized
  Hadamard; block-diagonal with the largest power-of-two block when head_dim is not a power of
  two) of K and V, then asymmetric codes over the whole head with an integer zero point.

`exclude` marks channels that are kept exact elsewhere (the massive K channels): they are zeroed
before the rotation, so they neither enter the norm nor spread over the other channels, and the
caller writes their exact values back after the inverse rotation (rotation + protection).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

TURBO_BITS = (2, 3, 4)           # vLLM ships 3 and 4 (turboquant_3bit_nc / _4bit_nc); 2 is the same recipe


def largest_pow2_divisor(n: int) -> int:
    return n & -n


@lru_cache(maxsize=16)
def hadamard(d: int) -> torch.Tensor:
    """Orthonormal Hadamard matrix [d, d] (Sylvester), block-diagonal over the largest power-of-two
    divisor of d when d is not a power of two. Symmetric, so it is its own inverse."""
    b = largest_pow2_divisor(d)
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.block_diag(*([h / math.sqrt(b)] * (d // b)))


@lru_cache(maxsize=16)
def lloyd_max(d: int, bits: int, max_iter: int = 200, tol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd-Max centroids and decision boundaries for N(0, 1/d): the distribution of one coordinate
    of a rotated unit vector. vLLM's solver (turboquant/centroids.py): 3.5-sigma start, trapezoid
    integrals with 200 steps, integration edges at +-10.5 sigma."""
    n = 2 ** bits
    var = 1.0 / d
    sigma = math.sqrt(var)

    def pdf(x):
        return math.exp(-x * x / (2 * var)) / math.sqrt(2 * math.pi * var)

    def trapz(f, a, b, steps=200):
        h = (b - a) / steps
        return h * (0.5 * (f(a) + f(b)) + sum(f(a + i * h) for i in range(1, steps)))

    lo, hi = -3.5 * sigma, 3.5 * sigma
    c = [lo + (hi - lo) * (i + 0.5) / n for i in range(n)]
    for _ in range(max_iter):
        edges = [lo * 3] + [(c[i] + c[i + 1]) / 2 for i in range(n - 1)] + [hi * 3]
        new = []
        for i in range(n):
            den = trapz(pdf, edges[i], edges[i + 1])
            new.append(trapz(lambda x: x * pdf(x), edges[i], edges[i + 1]) / den if den > 1e-15 else c[i])
        done = max(abs(a - b) for a, b in zip(new, c)) < tol
        c = new
        if done:
            break
    bounds = [(c[i] + c[i + 1]) / 2 for i in range(n - 1)]
    return torch.tensor(c, dtype=torch.float32), torch.tensor(bounds, dtype=torch.float32)


def _zero_excluded(x: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    return x if exclude is None else x.masked_fill(exclude, 0.0)


# -- TurboQuant ------------------------------------------------------------------------------------
def turbo_quantize(x: torch.Tensor, bits: int, exclude: torch.Tensor | None = None):
    """Codes of the last dim of x (one vector per token and head): (indices uint8, norm fp16)."""
    if bits not in TURBO_BITS:
        raise ValueError(f"TurboQuant keys take {TURBO_BITS} bits, got {bits}")
    d = x.shape[-1]
    xf = _zero_excluded(x.float(), exclude)
    norm = xf.norm(dim=-1, keepdim=True)
    y = (xf / (norm + 1e-8)) @ hadamard(d).to(x.device)
    _, bounds = lloyd_max(d, bits)
    idx = torch.bucketize(y, bounds.to(x.device), right=True).to(torch.uint8)   # y >= midpoint: next centroid
    return idx, norm.to(torch.float16)


def turbo_dequantize(idx: torch.Tensor, norm: torch.Tensor, bits: int, norm_correction: bool = True,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    d = idx.shape[-1]
    c = lloyd_max(d, bits)[0].to(idx.device)[idx.long()]
    if norm_correction:
        c = c / torch.sqrt((c * c).sum(-1, keepdim=True) + 1e-16)
    return (norm.float() * (c @ hadamard(d).to(idx.device))).to(dtype)


# -- int4_per_token_head (randomized Hadamard + asymmetric codes over the head) ---------------------
@lru_cache(maxsize=16)
def rht_signs(d: int) -> torch.Tensor:
    """vLLM's fixed +-1 signs (_get_rht_signs, round 0): the same generator seed and draw."""
    gen = torch.Generator(device="cpu").manual_seed(0x9E3779B9)
    return 2.0 * torch.bernoulli(torch.full((d,), 0.5), generator=gen) - 1.0


def rht(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """H D x (unnormalized Hadamard H, H H^T = b I for block b) or, inverse, D H x / b."""
    d = x.shape[-1]
    b = largest_pow2_divisor(d)
    h = hadamard(d).to(x.device) * math.sqrt(b)       # unnormalized, as vLLM's butterfly
    s = rht_signs(d).to(x.device)
    return (x @ h) * s / b if inverse else (x * s) @ h


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """The kernels' rounding: (v + 0.5) truncated for v >= 0, (v - 0.5) truncated below."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def rht_quantize(x: torch.Tensor, bits: int, exclude: torch.Tensor | None = None):
    """(codes uint8, scale, zero point) of RHT(x) over the last dim: scale = range / (2^b - 1),
    zero = round(-min / scale) clamped to the code range, codes = round(x / scale + zero). vLLM
    stores the zero point in the scale's 4 low mantissa bits, so the scale read back is the fp32
    scale with those bits cleared; that is the scale returned."""
    y = rht(_zero_excluded(x.float(), exclude))
    qmax = 2 ** bits - 1
    lo, hi = y.amin(-1, keepdim=True), y.amax(-1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp_min(1e-6)
    zero = _round_half_away(-lo / scale).clamp(0, qmax)
    codes = _round_half_away(y / scale + zero).clamp(0, qmax).to(torch.uint8)
    stored = (scale.contiguous().view(torch.int32) & -16).view(torch.float32)
    return codes, stored, zero


def rht_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return rht((codes.float() - zero) * scale, inverse=True).to(dtype)


# -- TurboQuant's values: uniform codes over the whole head, fp16 scale and minimum -----------------
def head_quantize(x: torch.Tensor, bits: int):
    """(codes uint8, scale fp16, minimum fp16) over the last dim, as vLLM's _store_quantized_value."""
    xf = x.float()
    qmax = 2 ** bits - 1
    lo = xf.amin(-1, keepdim=True)
    scale = ((xf.amax(-1, keepdim=True) - lo) / qmax).clamp_min(1e-8)
    codes = torch.floor((xf - lo) / scale + 0.5).clamp(0, qmax).to(torch.uint8)
    return codes, scale.to(torch.float16), lo.to(torch.float16)


def head_dequantize(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (codes.float() * scale.float() + minimum.float()).to(dtype)
