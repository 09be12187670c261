"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights with a per-channel
scale s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha), then quantize both: weights int8 symmetric
per output row, activations int8 per token at run time (QuantLinear with act_bits=8). The
division by s happens inside the linear (not folded into the previous norm), so it applies to
every linear."""
from __future__ import annotations

import torch

from ..linear import linear_weight
from ..registry import METHODS
from .context import collect_layer_stats, kept_rows, quantize_module
from .scaling import _get, fold_into_prev, layer_groups, scale_linears


def smooth_scales(x_abs_max: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    w_max = w.detach().float().abs().amax(0).clamp(min=1e-5)
    a_max = x_abs_max.float().clamp(min=1e-5)
    # rounded to fp16, the dtype QuantLinear stores it in
    return (a_max.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=1e-4, max=6e4).half().float()


def quantize_layer(ctx) -> None:
    """SmoothQuant on one decoder layer. Linears that share an input (ArchSpec.scale_groups) get one
    s from the max over the group's weights and are folded into the previous norm / linear, as the
    paper's smooth_lm does for the LayerNorm -> q/k/v and -> fc1 pairs; a linear with no op to fold
    into (GQA o_proj, a down projection after GELU) keeps s and divides by it at run time."""
    cfg, layer = ctx.config, ctx.layer
    stats = collect_layer_stats(ctx, METHODS["smoothquant"].needs)
    local = {ctx.local_name(n): n for n in ctx.linears}
    runtime: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for g, fold in layer_groups(layer, ctx.layout):
        if not all(n in local for n in g.linears):
            continue
        ws = []
        for n in g.linears:
            w = linear_weight(_get(layer, n)).detach().float()
            ws.append(w[kept_rows(w.shape[0], ctx.rows.get(local[n]), w.device)])
        s = smooth_scales(stats[local[g.linears[0]]].abs_max.to(ws[0].device), torch.cat(ws), cfg.alpha)
        if fold:
            fold_into_prev(layer, g, s)
            scale_linears(layer, g, s)
        else:
            runtime.update({n: s for n in g.linears})
        done.update(g.linears)
    for n, full in local.items():
        if n not in done:  # no group: its own scale, divided at run time (as before issue 11)
            w = linear_weight(_get(layer, n)).detach().float()
            wk = w[kept_rows(w.shape[0], ctx.rows.get(full), w.device)]
            runtime[n] = smooth_scales(stats[full].abs_max.to(w.device), wk, cfg.alpha)
        quantize_module(ctx, full, input_scale=runtime.get(n))
