"""Which output rows of W_q / W_k stay in fp16.

Policies (per layer, per Q/K head, always whole RoPE pairs):
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


def pair_units(head_dim: int, rotary_dim: int | None, pairing: str | None) -> list[tuple[int, ...]]:
    """The units protection works in: RoPE pairs inside the rotary dims, single dims elsewhere."""
    if not rotary_dim or not pairing:
        return [(d,) for d in range(head_dim)]
    if pairing == "half":
        half = rotary_dim // 2
        units = [(i, i + half) for i in range(half)]
    elif pairing == "interleaved":
        units = [(2 * i, 2 * i + 1) for i in range(rotary_dim // 2)]
    else:
        raise MvquantError(f"unknown RoPE pairing '{pairing}'")
    return units + [(d,) for d in range(rotary_dim, head_dim)]


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


def protected_rows(model, layout, config, report=None) -> dict[str, torch.Tensor]:
    """Full module name -> sorted LongTensor of output rows to keep in fp16."""
    policy, n = config.protect_policy()
    if policy == "none":
        return {}
    if report is None:
        raise MvquantError(f"--protect {config.protect} needs a calibration report: pass --calibration REPORT.json "
                           "(made by mvquant calibrate) or use --protect none")
    report.check_matches(layout)
    names = {id(m): name for name, m in model.named_modules()}
    gen = torch.Generator().manual_seed(int(config.seed))
    rows: dict[str, set[int]] = {}
    for layer in range(layout.num_layers):
        attn = layout.attention(model, layer)
        for kind in ("q", "k"):
            dims = select_dims(policy, n, report, layer, kind, layout, gen)
            attr, idx = layout.projection_rows(kind, dims)
            full = f"{names[id(attn)]}.{attr}"
            rows.setdefault(full, set()).update(idx.tolist())
    return {name: torch.tensor(sorted(r), dtype=torch.long) for name, r in rows.items() if r}
