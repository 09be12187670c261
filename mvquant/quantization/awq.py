"""AWQ-style activation-aware scaling (Lin et al. 2023), per linear.

1. Scale search: s = mean|x|^a (normalized), a on a grid in [0, 1); keep the s that minimizes
   ||X W^T - (X / s) Q(W s)^T||^2 over sampled calibration tokens.
2. Clipping search: per (row, group), the range ratio c in (0.5, 1] that minimizes the group's
   output error on the same tokens.
AutoAWQ folds 1/s into the previous op (norm / linear) and searches one s per group of linears
that share an input; here each linear keeps its own `input_scale` and divides x by it at run time
(works for every linear, including o_proj / down_proj, at the cost of one elementwise division).
"""
from __future__ import annotations

import torch

from . import core


def awq_search(w: torch.Tensor, x: torch.Tensor, x_abs_mean: torch.Tensor, *, bits: int, group_size: int | None,
               symmetric: bool, grid: int = 20, clip_grid: int = 10, clip_tokens: int = 256):
    """w [rows, in], x [tokens, in] -> (input_scale [in], (codes, scale, zero) of w * input_scale)."""
    w, x = w.detach().float(), x.detach().float()
    y = x @ w.t()
    best, best_s = float("inf"), torch.ones(w.shape[1])
    base = x_abs_mean.float().clamp(min=1e-8)
    for r in range(grid):
        a = r / grid
        s = base.pow(a).clamp(min=1e-4)
        s = (s / (s.max() * s.min()).sqrt()).clamp(1e-4, 6e4).half().float()  # stored in fp16: search that
        wq = core.fake_quantize(w * s, bits, group_size, symmetric) / s
        err = float((x @ wq.t() - y).pow(2).mean())
        if err < best:
            best, best_s = err, s
    s = best_s
    clip = awq_clip(w * s, x[:clip_tokens] / s, bits=bits, group_size=group_size, symmetric=symmetric, grid=clip_grid)
    return s, core.quantize_weight(w * s, bits, group_size, symmetric, clip=clip)


def awq_clip(w: torch.Tensor, x: torch.Tensor, *, bits: int, group_size: int | None, symmetric: bool,
             grid: int = 10, min_ratio: float = 0.5) -> torch.Tensor:
    """Per (row, group) clipping ratio minimizing sum_t (x_t,g . (w_g - Q_c(w_g)))^2. Returns [rows, G]."""
    rows, n = w.shape
    g = group_size or n
    pad = (-n) % g
    xg = torch.nn.functional.pad(x, (0, pad)).view(x.shape[0], -1, g)           # [T, G, g]
    best_err = torch.full((rows, xg.shape[1]), float("inf"))
    best_c = torch.ones(rows, xg.shape[1])
    for i in range(grid):
        c = 1.0 - (1.0 - min_ratio) * i / grid
        dw = w - core.fake_quantize(w, bits, group_size, symmetric, clip=c)
        dwg = torch.nn.functional.pad(dw, (0, pad)).view(rows, -1, g)            # [rows, G, g]
        err = torch.einsum("tGj,rGj->rGt", xg, dwg).pow(2).sum(-1)               # [rows, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_c = torch.where(better, torch.full_like(best_c, c), best_c)
    return best_c
