"""Per-architecture scaling groups for AWQ / SmoothQuant, and folding a per-input-channel scale
into the op before the scaled linears.

A group is a set of linears that read the same input, the op that produces that input (a norm, or
another linear whose last output rows feed them) and the module whose output is the search's
loss (the attention block for q/k/v, the MLP for gate/up; the linear itself for v->o and up->down),
as in llm-awq / AutoAWQ / llm-compressor's AWQ mappings. Scaling the linears' input columns by s
and dividing the previous op's output by s leaves the layer's function unchanged (up to rounding),
so no division remains at run time. Where there is no such op (a GELU before GPT-NeoX / GPT-2 /
GPT-J down projections; a norm without weights) the group is `foldable=False` and the caller stores
the scale in the QuantLinear instead (`input_scale`, divided at run time).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScaleGroup:
    prev: str | None                 # module (layer-relative) whose output the linears read; None: no op to fold into
    linears: tuple[str, ...]         # layer-relative names of the linears scaled together
    inspect: str                     # module whose output is the loss ("" = the whole decoder layer)
    mha_only: bool = False           # v -> o: only when o's input is v's output (no GQA)


_LLAMA = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", mha_only=True),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
# Gemma 2/3: post_attention_layernorm normalizes the attention *output*; the MLP reads pre_feedforward_layernorm.
_GEMMA2 = (_LLAMA[0], _LLAMA[1], ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
           _LLAMA[3])
_PHI3 = (
    ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
    ScaleGroup("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", mha_only=True),  # v = last rows
    ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
    ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj"),  # up = the last half of the rows
)
_GPT_NEOX = (  # v rows are interleaved per head in query_key_value: no v -> dense fold (AutoAWQ skips it too)
    ScaleGroup("input_layernorm", ("attention.query_key_value",), "attention"),
    ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"),
    ScaleGroup(None, ("mlp.dense_4h_to_h",), "mlp.dense_4h_to_h"),  # GELU in between
)
_GPTJ = (  # parallel attention + MLP read the same ln_1 output: one group, the loss on the whole layer
    ScaleGroup("ln_1", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in"), ""),
    ScaleGroup("attn.v_proj", ("attn.out_proj",), "attn.out_proj", mha_only=True),
    ScaleGroup(None, ("mlp.fc_out",), "mlp.fc_out"),
)
_GPT2 = (
    ScaleGroup("ln_1", ("attn.c_attn",), "attn"),
    ScaleGroup("attn.c_attn", ("attn.c_proj",), "attn.c_proj", mha_only=True),
    ScaleGroup("ln_2", ("mlp.c_fc",), "mlp"),
    ScaleGroup(None, ("mlp.c_proj",), "mlp.c_proj"),
)
_OPT = (
    ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj", mha_only=True),
    ScaleGroup("final_layer_norm", ("fc1",), "fc1"),
    ScaleGroup("fc1", ("fc2",), "fc2"),  # ReLU(x / s) = ReLU(x) / s for s > 0
)
GROUPS = {"llama": _LLAMA, "qwen3": _LLAMA, "gemma3": _GEMMA2, "phi3": _PHI3, "gpt_neox": _GPT_NEOX,
          "gptj": _GPTJ, "gpt2": _GPT2, "opt": _OPT}


def _get(module: torch.nn.Module, name: str):
    try:
        return module.get_submodule(name) if name else module
    except AttributeError:
        return None


def is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def weight_view(module) -> torch.Tensor:
    """The weight as [out, in] (a view: GPT-2 Conv1D stores [in, out])."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def layer_groups(layer: torch.nn.Module, layout) -> list[tuple[ScaleGroup, bool]]:
    """The scaling groups that exist in this layer, each with whether its scale can be folded."""
    family = layout.spec.family
    if layout.model_type in ("gemma2",):
        specs = _GEMMA2
    else:
        specs = GROUPS.get(family, ())
    out = []
    for g in specs:
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
        w = weight_view(prev)
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
        w = weight_view(_get(layer, name))
        w.copy_((w.float() * s.to(w.device).view(1, -1)).to(w.dtype))


def qk_row_mask(layout, local_name: str, out_features: int) -> torch.Tensor:
    """Output rows that produce Q or K (AWQ does not clip them: the QK^T product amplifies the error)."""
    spec, d = layout.spec, layout.head_dim
    last = local_name.rsplit(".", 1)[-1]
    mask = torch.zeros(out_features, dtype=torch.bool)
    if last in (spec.q, spec.k) or last in ("query", "key"):
        mask[:] = True
    elif spec.fused and last == spec.fused:
        if spec.fused_layout == "per_head":
            mask = (torch.arange(out_features) // d) % 3 < 2
        else:
            mask[:(layout.num_heads + layout.num_kv_heads) * d] = True
    return mask
