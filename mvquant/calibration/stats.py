"""The math of massive values, as small pure functions.

M[h, d] = ||X[:, h, d]||_2 over all calibration tokens, X one of Q/K/V of shape [tokens, heads, dim].
We stream sums of squares and take the root at the end, so memory is O(heads x dim), not O(tokens).
"""
from __future__ import annotations

import torch


def sum_of_squares(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """x: [batch, seq, heads, dim]; mask: [batch, seq] (1 = real token). Returns float64 [heads, dim]."""
    x = x.float()
    if mask is None:
        return x.square().sum(dim=(0, 1)).double()
    return torch.einsum("bshd,bs->hd", x.square(), mask.to(x.dtype)).double()


def massive_by_lambda(m: torch.Tensor, lam: float = 5.0) -> list[list[int]]:
    """Per head, the dims whose norm exceeds lam times the head's mean norm (the paper's definition)."""
    mean = m.mean(dim=-1, keepdim=True)
    sel = m > lam * mean
    return [torch.nonzero(row).flatten().tolist() for row in sel]


def massive_by_topk(m: torch.Tensor, k: int) -> list[list[int]]:
    """Per head, the k dims of largest norm (the paper's code: top-1 for Llama, top-3 for Qwen2)."""
    k = min(k, m.shape[-1])
    return [sorted(row.tolist()) for row in torch.topk(m, k, dim=-1).indices]


def lowest_by_topk(m: torch.Tensor, k: int) -> list[list[int]]:
    """Per head, the k dims of smallest norm: the 'non-massive' control of the disruption experiment."""
    k = min(k, m.shape[-1])
    return [sorted(row.tolist()) for row in torch.topk(m, k, dim=-1, largest=False).indices]


def pair_partner(dim: int, rotary_dim: int | None, pairing: str | None) -> int | None:
    """The dim RoPE rotates together with `dim`, or None if `dim` is not rotated."""
    if rotary_dim is None or pairing is None or dim >= rotary_dim:
        return None
    if pairing == "interleaved":
        return dim ^ 1
    half = rotary_dim // 2
    return dim + half if dim < half else dim - half


def pair_index(dim: int, rotary_dim: int | None, pairing: str | None) -> int | None:
    """Frequency index i of the pair holding `dim` (theta_i = base^(-2i/R); larger i = lower frequency)."""
    if rotary_dim is None or pairing is None or dim >= rotary_dim:
        return None
    return dim // 2 if pairing == "interleaved" else dim % (rotary_dim // 2)


def pair_frequency(i: int, rotary_dim: int, theta: float) -> float:
    return float(theta ** (-2.0 * i / rotary_dim))


def pair_wavelength(i: int, rotary_dim: int, theta: float) -> float:
    """Tokens for pair i to turn a full circle, 2 pi / theta_i: the same pair index is a much longer
    wavelength under a global base of 1e6 than under a local 1e4 (Gemma3), so compare these."""
    import math
    return 2 * math.pi / pair_frequency(i, rotary_dim, theta)


def top1_agreement(a: torch.Tensor, b: torch.Tensor, rotary_dim: int | None, pairing: str | None) -> int:
    """Heads whose largest dim in `a` and in `b` ([heads, dim] norms) lie in the same RoPE pair
    (the same dim without RoPE)."""
    same = 0
    for da, db in zip(a.argmax(dim=-1).tolist(), b.argmax(dim=-1).tolist()):
        pa, pb = pair_index(da, rotary_dim, pairing), pair_index(db, rotary_dim, pairing)
        same += (pa == pb) if pa is not None and pb is not None else (da == db)
    return same


def close_pairs(dims_per_head: list[list[int]], rotary_dim: int | None, pairing: str | None) -> list[list[int]]:
    """Add each dim's RoPE partner: rotation mixes the two halves, so they are protected together."""
    out = []
    for dims in dims_per_head:
        closed = set(dims)
        for d in dims:
            p = pair_partner(d, rotary_dim, pairing)
            if p is not None:
                closed.add(p)
        out.append(sorted(closed))
    return out


def low_frequency_share(dims_per_head: list[list[int]], rotary_dim: int | None, pairing: str | None) -> float | None:
    """Share of selected rotated dims whose pair lies in the low-frequency half of the pairs."""
    if rotary_dim is None or pairing is None:
        return None
    idx = [pair_index(d, rotary_dim, pairing) for dims in dims_per_head for d in dims]
    idx = [i for i in idx if i is not None]
    if not idx:
        return None
    half = rotary_dim // 4  # pairs are rotary_dim/2; the low-frequency half has i >= rotary_dim/4
    return sum(i >= half for i in idx) / len(idx)


def concentration(m: torch.Tensor) -> torch.Tensor:
    """Per head, max_d M / mean_d M: how far the largest dim stands out (1 = flat)."""
    return m.max(dim=-1).values / m.mean(dim=-1).clamp_min(1e-30)
