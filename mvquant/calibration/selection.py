"""Which Q/K dims a policy selects, and so which weight rows or K-cache channels: the one place for
dim selection. Quantization (protected rows), the KV cache (exact K channels) and disruption all call
it; RoPE pairing itself is stats.pair_partner.

Protection policies (per layer, per Q/K head, always whole RoPE pairs):
  massive  the report's massive dims, closed under RoPE pairing
  random   the same number of pairs (and unpaired dims) per head, drawn with a seed from the
           dims that are NOT massive: the control for "does it matter *which* rows?"
  topk:N   the N pairs per head with the largest pair norm sqrt(M_i^2 + M_partner^2)
  none     nothing
Rows come from `layout.projection_rows`, which handles GQA and fused projections.
"""
from __future__ import annotations

import torch

from ..errors import MvquantError
from . import stats as S

PAIRINGS = ("half", "interleaved")
DISRUPTIONS = ("massive", "non-massive")


def pair_units(head_dim: int, rotary_dim: int | None, pairing: str | None) -> list[tuple[int, ...]]:
    """The units protection works in: RoPE pairs inside the rotary dims (in order of their first dim),
    single dims elsewhere."""
    if rotary_dim and pairing and pairing not in PAIRINGS:
        raise MvquantError(f"unknown RoPE pairing '{pairing}'")
    units = []
    for d in range(head_dim):
        partner = S.pair_partner(d, rotary_dim or None, pairing if rotary_dim else None)
        if partner is None:
            units.append((d,))
        elif d < partner:
            units.append((d, partner))
    return units


def _units_of(dims: list[int], units: list[tuple[int, ...]]) -> list[int]:
    """Indices of the units that contain any of `dims` (closure under pairing)."""
    wanted = set(dims)
    return [i for i, u in enumerate(units) if wanted.intersection(u)]


def select_dims(policy: str, n: int | None, report, layer: int, kind: str, layout,
                generator: torch.Generator | None = None) -> list[list[int]]:
    """Per head, the sorted head dims to protect for (layer, kind)."""
    heads, d = layout.heads(kind), layout.head_dim
    if policy == "none":
        return [[] for _ in range(heads)]
    units = pair_units(d, layout.rotary_dim, layout.pairing)
    if policy == "topk":
        m = report.norm(layer, kind).float()
        if m.shape != (heads, d):
            raise MvquantError(f"report statistics for layer {layer} {kind} have shape {tuple(m.shape)}, "
                               f"the model needs ({heads}, {d}): calibrate this model first")
        out = []
        for h in range(heads):
            unit_norm = torch.tensor([float(m[h, list(u)].pow(2).sum().sqrt()) for u in units])
            top = torch.topk(unit_norm, min(n, len(units))).indices.tolist()
            out.append(sorted(x for i in top for x in units[i]))
        return out
    massive = report.massive(layer, kind, closed=True)
    if len(massive) != heads:
        raise MvquantError(f"calibration report has {len(massive)} {kind} heads in layer {layer}, the model has "
                           f"{heads}: calibrate this model first (mvquant calibrate MODEL --output REPORT.json)")
    if policy == "massive":
        return [sorted({x for i in _units_of(dims, units) for x in units[i]}) for dims in massive]
    if policy == "random":
        out = []
        for dims in massive:
            chosen = _units_of(dims, units)
            pairs = [i for i in range(len(units)) if len(units[i]) == 2 and i not in chosen]
            singles = [i for i in range(len(units)) if len(units[i]) == 1 and i not in chosen]
            n_pairs = sum(len(units[i]) == 2 for i in chosen)
            n_singles = len(chosen) - n_pairs
            pick = []
            for pool, k in ((pairs, n_pairs), (singles, n_singles)):
                k = min(k, len(pool))
                perm = torch.randperm(len(pool), generator=generator)[:k].tolist()
                pick += [pool[j] for j in perm]
            out.append(sorted(x for i in pick for x in units[i]))
        return out
    raise MvquantError(f"unknown protection policy '{policy}'")


def protected_rows(model, layout, report, policy: str, n: int | None = None, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full module name -> sorted LongTensor of the W_q / W_k output rows to keep in fp16, for a
    protection policy (QuantConfig.protect_policy()); `report` already checked against the model."""
    if policy == "none":
        return {}
    if report is None:
        raise MvquantError(f"--protect {policy} needs a calibration report: pass --calibration REPORT.json "
                           "(made by mvquant calibrate) or use --protect none")
    names = {id(m): name for name, m in model.named_modules()}
    gen = torch.Generator().manual_seed(int(seed))
    rows: dict[str, set[int]] = {}
    for layer in range(layout.num_layers):
        attn = layout.attention(model, layer)
        for kind in ("q", "k"):
            dims = select_dims(policy, n, report, layer, kind, layout, gen)
            attr, idx = layout.projection_rows(kind, dims)
            full = f"{names[id(attn)]}.{attr}"
            rows.setdefault(full, set()).update(idx.tolist())
    return {name: torch.tensor(sorted(r), dtype=torch.long) for name, r in rows.items() if r}


def disruption_dims(norms: dict[tuple[int, str], torch.Tensor], mode: str = "massive", *, top_k: int | None = None,
                lam: float | None = None, layers: list[int] | None = None, pairs: bool = False,
                rope: dict | None = None) -> dict[tuple[int, str], list[list[int]]]:
    """Per (layer, kind in q/k), per head, the dims to disrupt.

    `norms[(layer, kind)]` is M [heads, head_dim]. 'massive': top_k largest per head, or with `lam`
    the dims with M > lam x head mean. 'non-massive': per head, as many of the lowest-M dims as the
    massive selection has there. `pairs` adds RoPE partners (needs `rope`: rotary_dim, pairing).
    """
    if mode not in DISRUPTIONS:
        raise MvquantError(f"unknown disruption '{mode}': use one of {', '.join(DISRUPTIONS)}")
    if top_k is not None and lam is not None:
        raise MvquantError("give either --top-k or --lambda for the disruption, not both")
    if top_k is None and lam is None:
        top_k = 1  # the paper's setting for Llama-family models
    available = sorted({layer for layer, _ in norms})
    chosen = available if layers is None else list(layers)
    bad = [i for i in chosen if i not in available]
    if bad:
        raise MvquantError(f"--layers {bad} out of range: the model has layers 0..{max(available)}")
    out = {}
    for layer in chosen:
        for kind in ("q", "k"):
            m = norms[(layer, kind)].float()
            if top_k is not None:
                if not 0 < top_k <= m.shape[-1]:
                    raise MvquantError(f"--top-k must be in 1..{m.shape[-1]} (head_dim), got {top_k}")
                massive = S.massive_by_topk(m, top_k)
            else:
                if lam <= 0:
                    raise MvquantError(f"--lambda must be positive, got {lam}")
                massive = S.massive_by_lambda(m, lam)
            if mode == "massive":
                sel = massive
            else:
                sel = [S.lowest_by_topk(m[h:h + 1], len(massive[h]))[0] if massive[h] else []
                       for h in range(m.shape[0])]
            if pairs and rope:
                sel = S.close_pairs(sel, rope["rotary_dim"], rope["pairing"])
            out[(layer, kind)] = sel
    return out
