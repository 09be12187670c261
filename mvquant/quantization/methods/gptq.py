"""GPTQ (Frantar et al. 2022): quantize columns one at a time and push each column's rounding
error onto the not-yet-quantized columns through the inverse Hessian's Cholesky factor.

Our own implementation (optimum's GPTQ needs the gptqmodel / auto-gptq kernels, which are not
installed here and do not target this CPU). H = sum x x^T over calibration tokens of the linear's
input. Group parameters are taken when the sweep reaches a group (dynamic), or up front from the
unmodified weights with act-order (static groups), so every column has one (scale, zero).
"""
from __future__ import annotations

import torch

import warnings

from .. import core, grid as grids, q4k
from ..linear import linear_weight
from ..registry import METHODS
from .context import collect_layer_stats, kept_rows, quantize_module


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int | None,
                  symmetric: bool, damp: float = 0.01, block: int = 128, act_order: bool = False,
                  grid: str = "int"):
    """w [rows, cols], hessian [cols, cols] -> (codes uint8 [rows, cols], scale fp16 [rows, G], zero | None);
    grid "q4_k": (codes, superblock, sub_scales) on llama.cpp's Q4_K grid (q4k.py)."""
    w = w.detach().float().clone()
    rows, cols = w.shape
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    k_grid = grid == "q4_k"
    if k_grid:  # Q4_K: sub-blocks of 32 with a min each; parameters come per super-block of 256
        bits, group_size, symmetric = 4, q4k.SUB, False
    g = group_size or cols
    pb = q4k.QK_K if k_grid else g            # columns whose parameters are computed together
    groups = core.num_groups(cols, group_size)
    qmax = (1 << bits) - 1
    dev = w.device
    h = h.to(dev)
    if k_grid:
        superblock = torch.zeros(rows, cols // q4k.QK_K, 2, dtype=torch.float16, device=dev)
        sub = torch.zeros(rows, groups, 2, dtype=torch.uint8, device=dev)
        k_scale, k_offset = torch.zeros(rows, groups, device=dev), torch.zeros(rows, groups, device=dev)
    else:
        scale = torch.empty(rows, groups, dtype=torch.float16, device=dev)
        zero = None if symmetric else torch.empty(rows, groups, dtype=torch.uint8, device=dev)
    if act_order and k_grid:
        superblock[:], sub[:] = q4k.compute_params(w)
        k_scale[:], k_offset[:] = q4k.scale_offset(superblock, sub)
    elif act_order:  # static groups: parameters from the unmodified weights
        s_all, z_all = core.compute_params(w, bits, group_size, symmetric)
        scale.copy_(s_all)
        if zero is not None:
            zero.copy_(z_all)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols, device=dev)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype, device=dev)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=dev)
    perm_list = perm.tolist()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = perm_list[i1 + i]              # original column index
            grp = col // g
            if not act_order and col % pb == 0:   # dynamic groups: params from the updated weights
                end = min(col + pb, cols)
                # columns col..end are, without act-order, w1[:, i:] then w[:, i2:]
                cur = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :end - col]
                if k_grid:
                    sb, gs = col // q4k.QK_K, slice(grp, grp + q4k.NSUB)
                    superblock[:, sb:sb + 1], sub[:, gs] = q4k.compute_params(cur)
                    k_scale[:, gs], k_offset[:, gs] = q4k.scale_offset(superblock[:, sb:sb + 1], sub[:, gs])
                else:
                    s, z = core.compute_params(cur, bits, None, symmetric)
                    scale[:, grp] = s[:, 0]
                    if zero is not None:
                        zero[:, grp] = z[:, 0]
            if k_grid:
                s, off = k_scale[:, grp], k_offset[:, grp]
                q = q4k.round_codes(w1[:, i], s, off)
                deq = s * q - off
            elif zero is None:
                s = scale[:, grp].float()
                q = (torch.round(w1[:, i] / s) + (1 << (bits - 1))).clamp(1, qmax)
                deq = (q - (1 << (bits - 1))) * s
            else:
                s, z = scale[:, grp].float(), zero[:, grp].float()
                q = (torch.round(w1[:, i] / s) + z).clamp(0, qmax)
                deq = (q - z) * s
            codes[:, col] = q.to(torch.uint8)
            e = (w1[:, i] - deq) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q4k.Q4KQuantized(codes, superblock, sub) if k_grid else core.IntQuantized(codes, scale, zero)


def gptq_with_fallback(w: torch.Tensor, hessian: torch.Tensor, config, name: str = ""):
    """GPTQ on the linear's grid; when the damped Hessian is not positive definite, retry with 10x and
    100x the damping, then give up on this linear (None: the caller rounds to nearest) with a warning."""
    damp = config.gptq_damp
    for attempt in range(3):
        try:
            f = grids.linear_format(config, w.shape[1])
            return gptq_quantize(w, hessian, bits=f.bits, group_size=f.group_size,
                                 symmetric=f.symmetric, damp=damp, block=config.gptq_block,
                                 act_order=config.gptq_act_order, grid=f.grid)
        except torch.linalg.LinAlgError:
            if attempt < 2:
                warnings.warn(f"gptq {name}: Cholesky failed at damping {damp:g}; retrying with {damp * 10:g}")
            damp *= 10
    warnings.warn(f"gptq {name}: Cholesky failed even with damping {damp / 10:g}: this linear falls back to "
                  "round-to-nearest")
    return None


# -- one decoder layer at a time ------------------------------------------------------------------
# "True sequential" as in IST-DASLab's llama.py and GPTQModel: the layer's linears are split into
# the sets that read the same input, in the order the forward pass reaches them (q/k/v, o,
# gate/up, down on Llama); each set's Hessian is collected with the sets before it already
# quantized, so o_proj's GPTQ sees the error of the quantized q/k/v. ctx.inputs are already the
# outputs of the quantized layers before this one.

def input_sets(ctx) -> list[list[str]]:
    """Target linears (full names) grouped by the tensor they read, in forward order (first batch)."""
    order: list[list[str]] = []
    last = [None]

    def make(name):
        def hook(_m, args):
            if last[0] is args[0] and order:
                order[-1].append(name)
            else:
                last[0] = args[0]
                order.append([name])
        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in ctx.linears.items()]
    try:
        with torch.inference_mode():
            hidden, kwargs = ctx.inputs[0]
            ctx.layer(hidden, **kwargs)
    finally:
        last[0] = None
        for h in handles:
            h.remove()
    seen, sets = set(), []
    for group in order:
        group = [n for n in dict.fromkeys(group) if n not in seen]
        seen.update(group)
        if group:
            sets.append(group)
    missing = [n for n in ctx.linears if n not in seen]
    return sets + ([missing] if missing else [])


def quantize_layer(ctx) -> None:
    """GPTQ on one decoder layer, set by set.

    Between sets the quantized weights are written back into the float linears (dequantized, as the
    reference implementations do): the next set's Hessian pass runs a plain matmul instead of the
    int4 kernel, which is slow on long prefills. QuantLinears are built once at the end."""
    cfg = ctx.config
    results: dict[str, tuple] = {}
    originals: dict[str, torch.Tensor] = {}
    try:
        for names in input_sets(ctx):
            sub = type(ctx)(**{**ctx.__dict__, "linears": {n: ctx.linears[n] for n in names}})
            stats = collect_layer_stats(sub, METHODS["gptq"].needs)
            for name in names:
                wt = linear_weight(ctx.linears[name])
                w = wt.detach().float()
                keep = kept_rows(w.shape[0], ctx.rows.get(name), w.device)
                h = stats.pop(name).hessian
                q = gptq_with_fallback(w[keep], h.to(w.device), cfg, name) if keep.any() else None
                results[name] = q
                originals[name] = wt.detach().clone()
                deq = w.clone()
                if keep.any():
                    deq[keep] = grids.dequantize(q, cfg) if q is not None else grids.fake_quantize(w[keep], cfg)
                with torch.no_grad():
                    wt.copy_(deq.to(wt.dtype))
    finally:
        with torch.no_grad():
            for name, w0 in originals.items():
                linear_weight(ctx.linears[name]).copy_(w0)
    for name, q in results.items():
        quantize_module(ctx, name, quantized=q)
