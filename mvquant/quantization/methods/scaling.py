"""Scaling groups (ArchSpec.scale_groups, models/adapters.py) as they exist in one decoder layer, and
folding a per-input-channel scale into the op before the scaled linears. Where there is no such op (a
GELU before GPT-NeoX / GPT-2 / GPT-J down projections; a norm without weights) the group cannot fold and
the caller stores the scale in the QuantLinear instead (`input_scale`, divided at run time).
"""
from __future__ import annotations

import torch

from ...models.adapters import ScaleGroup
from ..linear import is_linear, linear_weight


def _get(module: torch.nn.Module, name: str):
    try:
        return module.get_submodule(name) if name else module
    except AttributeError:
        return None


def layer_groups(layer: torch.nn.Module, layout) -> list[tuple[ScaleGroup, bool]]:
    """The scaling groups that exist in this layer, each with whether its scale can be folded."""
    out = []
    for g in layout.spec.scale_groups:
        if any(_get(layer, n) is None for n in (*g.linears, g.inspect)):
            continue
        if g.mha_only and layout.num_kv_heads != layout.num_heads:
            continue
        out.append((g, can_fold(layer, g, layout)))
    return out


def can_fold(layer, g: ScaleGroup, layout) -> bool:
    if g.prev is None:
        return False
    prev = _get(layer, g.prev)
    if prev is None:
        return False
    if layout.spec.family == "opt":
        if not getattr(layer, "do_layer_norm_before", True):
            return False  # the norm comes after attention / MLP: nothing produces their input
        if g.prev == "fc1" and type(getattr(layer, "activation_fn", None)).__name__ != "ReLU":
            return False
    if is_linear(prev):
        return True
    return getattr(prev, "weight", None) is not None  # a norm with no affine weight cannot absorb s


def is_gemma_norm(norm) -> bool:
    """Gemma's RMSNorms multiply by (1 + w) instead of w."""
    return type(norm).__name__.startswith("Gemma") and "RMSNorm" in type(norm).__name__


@torch.no_grad()
def fold_into_prev(layer, g: ScaleGroup, s: torch.Tensor) -> None:
    """Divide the output of g.prev by s (its last len(s) output rows for a linear)."""
    prev = _get(layer, g.prev)
    if is_linear(prev):
        w = linear_weight(prev)
        n = s.numel()
        w[-n:].copy_((w[-n:].float() / s.to(w.device).view(-1, 1)).to(w.dtype))
        if getattr(prev, "bias", None) is not None:
            b = prev.bias
            b[-n:].copy_((b[-n:].float() / s.to(b.device)).to(b.dtype))
        return
    w = prev.weight
    sd = s.to(w.device)
    if is_gemma_norm(prev):
        w.copy_(((1.0 + w.float()) / sd - 1.0).to(w.dtype))
    else:
        w.copy_((w.float() / sd).to(w.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.copy_((prev.bias.float() / sd).to(prev.bias.dtype))


@torch.no_grad()
def scale_linears(layer, g: ScaleGroup, s: torch.Tensor) -> None:
    """Multiply the input columns of g's linears by s."""
    for name in g.linears:
        w = linear_weight(_get(layer, name))
        w.copy_((w.float() * s.to(w.device).view(1, -1)).to(w.dtype))
