"""AWQ (Lin et al. 2023) as llm-awq / AutoAWQ / llm-compressor run it: one decoder layer at a time.

1. Scale search, per scaling group (linears sharing an input, ArchSpec.scale_groups): s from the mean
   |x| per input channel (duo scaling: and the weights' mean), on a grid of exponents; keep the s that
   minimizes the error of the group's loss module output (the attention block for q/k/v: the softmax
   where the massive dims act is inside the loss). s is folded into the previous op where one exists,
   else kept as the QuantLinear's `input_scale` (divided at run time).
2. Clipping search: per (row, group), the range ratio c in (0.5, 1] that minimizes the group's
   output error on sampled tokens; not for linears that produce Q or K rows.
Protected rows are never fake-quantized during the search (they stay fp16: exact).
"""
from __future__ import annotations

import torch

from .. import core, grid as grids
from ..linear import linear_weight
from .context import kept_rows, quantize_module
from .scaling import _get, fold_into_prev, layer_groups, scale_linears


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


def grid_params(n_grid: int, duo: bool = True) -> list[tuple[float, bool]]:
    """(ratio, duo) pairs as llm-compressor's AWQModifier: with duo scaling the identity scale
    (0, plain) first, then n_grid - 1 ratios in [0, 1] of x_mean^r / w_mean^(1-r)."""
    if not duo:
        return [(i / max(1, n_grid - 1), False) for i in range(n_grid)]
    return [(0.0, False)] + [(i / max(1, n_grid - 2), True) for i in range(n_grid - 1)]


def weight_mean(ws: list[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """Per input channel mean of |w| normalized by its group's max (AutoAWQ's w_mean for duo scaling)."""
    total, count = 0.0, 0
    for w in ws:
        wg, pad = core._grouped(w.float().abs(), group_size)
        wg = wg / (torch.nan_to_num(wg, nan=0.0).amax(-1, keepdim=True) + 1e-6)
        wn = wg.reshape(w.shape[0], -1)[:, :w.shape[1]]
        total = total + wn.sum(0)
        count += w.shape[0]
    return total / max(1, count)


def candidate_scale(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float, duo: bool) -> torch.Tensor:
    if duo:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.nan_to_num(s, nan=1.0, posinf=1.0).clamp(1e-4, 6e4)


def _out0(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _capture(ctx, groups, layer) -> tuple[dict, dict]:
    """One pass of the layer: the inputs (args, kwargs) of every group's loss module per batch and
    the mean |x| per channel of each group's linears' input."""
    calls: dict[str, list] = {g.inspect: [] for g, _ in groups}
    xsum: dict[int, list] = {i: [0.0, 0] for i in range(len(groups))}
    handles = []
    for name in calls:
        if name == "":
            continue
        mod = _get(layer, name)

        def pre(_m, args, kwargs, name=name):
            calls[name].append((args, dict(kwargs)))
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    for i, (g, _) in enumerate(groups):
        def xhook(_m, args, i=i):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            xsum[i][0] = xsum[i][0] + x.abs().sum(0)
            xsum[i][1] += x.shape[0]
        handles.append(_get(layer, g.linears[0]).register_forward_pre_hook(xhook))
    try:
        ctx.run()
    finally:
        for h in handles:
            h.remove()
    if "" in calls:
        calls[""] = [((h,), kw) for h, kw in ctx.inputs]
    x_mean = {i: (v[0] / max(1, v[1])) for i, v in xsum.items()}
    return calls, x_mean


def _run_calls(module, calls) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [_out0(module(*a, **kw)) for a, kw in calls]


def search_group_scale(ctx, layer, g, calls, x_mean, *, n_grid: int, duo: bool = True) -> tuple[torch.Tensor, float, float]:
    """Grid search of s for one group on its loss module's output. Returns (s, best loss, loss at s = 1)."""
    cfg = ctx.config
    prefix = ctx.prefix + "." if ctx.prefix else ""
    mods = [_get(layer, n) for n in g.linears]
    w0 = [linear_weight(m).detach().clone() for m in mods]
    keeps = [kept_rows(w.shape[0], ctx.rows.get(prefix + n), w.device) for w, n in zip(w0, g.linears)]
    inspect = _get(layer, g.inspect)
    ref = _run_calls(inspect, calls)
    w_mean = weight_mean([w[k] for w, k in zip(w0, keeps)], cfg.group_size).to(w0[0].device) if duo else None
    xm = x_mean.to(w0[0].device)
    best, best_s, identity_loss = float("inf"), None, None
    try:
        for ratio, use_duo in grid_params(n_grid, duo):
            s = candidate_scale(xm, w_mean, ratio, use_duo).half().float()  # what a QuantLinear would store
            with torch.no_grad():
                for m, w, k in zip(mods, w0, keeps):
                    wq = w.float().clone()
                    if k.any():
                        wq[k] = grids.fake_quantize(wq[k] * s, cfg) / s
                    linear_weight(m).copy_(wq.to(w.dtype))
            out = _run_calls(inspect, calls)
            loss = float(sum((o.float() - r.float()).pow(2).sum() for o, r in zip(out, ref))
                         / max(1, sum(r.numel() for r in ref)))
            if ratio == 0.0 and not use_duo:
                identity_loss = loss
            if loss < best:
                best, best_s = loss, s
    finally:
        with torch.no_grad():
            for m, w in zip(mods, w0):
                linear_weight(m).copy_(w)
    if best_s is None:  # every loss was NaN
        best_s = torch.ones_like(xm)
    return best_s, best, identity_loss if identity_loss is not None else best


def _clip_inputs(ctx, layer, names: list[str], max_tokens: int = 512) -> dict[str, torch.Tensor]:
    """Up to max_tokens input rows of each linear, strided over all batches (AutoAWQ samples 512)."""
    seen: dict[str, list] = {n: [] for n in names}
    handles = []
    total = sum(h.shape[0] * h.shape[1] if h.dim() == 3 else h.shape[0] for h, _ in ctx.inputs)
    step = max(1, total // max_tokens)
    for n in names:
        def hook(_m, args, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            seen[n].append(x[::step].float())
        handles.append(_get(layer, n).register_forward_pre_hook(hook))
    try:
        ctx.run()
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v)[:max_tokens] for n, v in seen.items() if v}


def quantize_layer(ctx) -> None:
    """AWQ on one decoder layer."""
    cfg, layer = ctx.config, ctx.layer
    targets = {ctx.local_name(n) for n in ctx.linears}
    groups = [(g, fold) for g, fold in layer_groups(layer, ctx.layout)
              if all(n in targets for n in g.linears)]
    runtime_scale: dict[str, torch.Tensor] = {}
    if groups:
        calls, x_mean = _capture(ctx, groups, layer)
        found = []
        for i, (g, fold) in enumerate(groups):
            s, _, _ = search_group_scale(ctx, layer, g, calls[g.inspect], x_mean[i], n_grid=cfg.awq_grid)
            found.append((g, fold, s))
        del calls
        for g, fold, s in found:  # all scales found on the unscaled layer, then applied (as AutoAWQ)
            if fold:
                fold_into_prev(layer, g, s)
                scale_linears(layer, g, s)
            else:
                for n in g.linears:
                    runtime_scale[n] = s
    local = [ctx.local_name(n) for n in ctx.linears]
    # no clipping for linears that produce Q or K (a fused q/k/v too: the QK^T product amplifies the
    # error), nor on Q4_K, which searches its own ranges per sub-block (q4k.py)
    clip_names = [n for n in local if cfg.awq_clip_grid and not ctx.layout.produces_qk(n)
                  and grids.linear_format(cfg, linear_weight(_get(layer, n)).shape[1]).grid == "int"]
    xs = _clip_inputs(ctx, layer, clip_names) if clip_names else {}
    for full in list(ctx.linears):
        n = ctx.local_name(full)
        w = linear_weight(_get(layer, n)).detach().float()
        s = runtime_scale.get(n)
        keep = kept_rows(w.shape[0], ctx.rows.get(full), w.device)
        wk = w[keep] * s.to(w.device) if s is not None else w[keep]
        clip = None
        if n in xs and wk.shape[0]:
            x = xs[n] / s.to(xs[n].device) if s is not None else xs[n]
            f = grids.linear_format(cfg, wk.shape[1])
            clip = awq_clip(wk.cpu(), x.cpu(), bits=f.bits, group_size=f.group_size, symmetric=f.symmetric,
                            grid=cfg.awq_clip_grid).to(w.device)
        quantized = grids.quantize(wk, cfg, clip=clip) if wk.shape[0] else None
        quantize_module(ctx, full, quantized=quantized, input_scale=s)
