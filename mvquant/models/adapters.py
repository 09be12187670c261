"""Per-architecture declarations: where Q, K and V enter attention, and how their rows map to heads.

One small `ArchSpec` per family (in the spirit of AutoAWQ's model adapters). `ModelLayout` joins a
spec with a model's config and is what the rest of mvquant uses:

- `capture_points(model, layer)`: (module, splitter) pairs. A forward hook on `module` sees its
  output; `splitter(output)` returns {kind: view [batch, seq, heads, head_dim]} for kind in q/k/v.
  The views share storage with the output, so an editing hook (disruption) may write into them.
  Q/K are taken where they enter attention *before RoPE*: after the projection, or after the
  per-head norm in Qwen3/Gemma3. RoPE rotates whole pairs, so pair norms are the same after it.
- `prenorm_points(model, layer)`: for QK-norm models (Qwen3, Gemma3), Q/K as the projections emit
  them, before the per-head norm: the rows of W_q/W_k produce these, while attention and the KV cache
  see the normed values. Calibration records both (kinds `q_prenorm`, `k_prenorm`).
- `projection_rows(kind, dims_per_head)`: (projection module name, weight row indices) that produce
  the given Q/K/V dims, for protecting rows when quantizing; fused projections included. `row_kind`
  is its inverse: which of q/k/v an output row of a projection produces.
- `ArchSpec.scale_groups`: the linears that read one input, for AWQ / SmoothQuant (see ScaleGroup).

A new architecture needs one ArchSpec here and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import MvquantError

KINDS = ("q", "k", "v")
PRENORM_KINDS = {"q": "q_prenorm", "k": "k_prenorm"}   # Q/K before a per-head norm (QK-norm models)


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same input, for AWQ / SmoothQuant (as llm-awq / AutoAWQ / llm-compressor's
    mappings): the op producing that input (a norm, or a linear whose last output rows feed them), and
    the module whose output is the search's loss (the attention block for q/k/v, the MLP for gate/up,
    the linear itself for v->o and up->down). Scaling the linears' input columns by s and dividing
    `prev`'s output by s leaves the layer's function unchanged, so no division remains at run time;
    with no such op (a GELU before a down projection) the scale is divided at run time instead."""
    prev: str | None                 # module (layer-relative) whose output the linears read; None: no op to fold into
    linears: tuple[str, ...]         # layer-relative names of the linears scaled together
    inspect: str                     # module whose output is the loss ("" = the whole decoder layer)
    mha_only: bool = False           # v -> o: only when o's input is v's output (no GQA)


LLAMA_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", mha_only=True),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
# Gemma 2/3: post_attention_layernorm normalizes the attention *output*; the MLP reads pre_feedforward_layernorm.
GEMMA2_GROUPS = (LLAMA_GROUPS[0], LLAMA_GROUPS[1],
                 ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"), LLAMA_GROUPS[3])
PHI3_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
    ScaleGroup("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", mha_only=True),  # v = last rows
    ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
    ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj"),  # up = the last half of the rows
)
GPT_NEOX_GROUPS = (  # v rows are interleaved per head in query_key_value: no v -> dense fold (AutoAWQ skips it too)
    ScaleGroup("input_layernorm", ("attention.query_key_value",), "attention"),
    ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"),
    ScaleGroup(None, ("mlp.dense_4h_to_h",), "mlp.dense_4h_to_h"),  # GELU in between
)
GPTJ_GROUPS = (  # parallel attention + MLP read the same ln_1 output: one group, the loss on the whole layer
    ScaleGroup("ln_1", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in"), ""),
    ScaleGroup("attn.v_proj", ("attn.out_proj",), "attn.out_proj", mha_only=True),
    ScaleGroup(None, ("mlp.fc_out",), "mlp.fc_out"),
)
GPT2_GROUPS = (
    ScaleGroup("ln_1", ("attn.c_attn",), "attn"),
    ScaleGroup("attn.c_attn", ("attn.c_proj",), "attn.c_proj", mha_only=True),
    ScaleGroup("ln_2", ("mlp.c_fc",), "mlp"),
    ScaleGroup(None, ("mlp.c_proj",), "mlp.c_proj"),
)
OPT_GROUPS = (
    ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj", mha_only=True),
    ScaleGroup("final_layer_norm", ("fc1",), "fc1"),
    ScaleGroup("fc1", ("fc2",), "fc2"),  # ReLU(x / s) = ReLU(x) / s for s > 0
)


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    layers: str                      # dotted path from the CausalLM to the decoder-layer ModuleList
    attention: str                   # attribute of a decoder layer holding the attention module
    q: str | None = "q_proj"         # separate projections (None when fused)
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    fused: str | None = None         # one projection emitting q, k and v
    fused_layout: str = "concat"     # "concat": rows [q | k | v]; "per_head": rows [head][q, k, v][dim]
    q_norm: str | None = None        # per-head norm applied before RoPE; Q is read after it
    k_norm: str | None = None
    norm_layout: str = "bshd"        # the norm's input layout: [b, s, h, d] (Qwen3) or [b, h, s, d] (Gemma3)
    rope: bool = True
    pairing: str = "half"            # "half": d <-> d + R/2 (HF rotate_half); "interleaved": 2i <-> 2i+1
    transposed_weight: bool = False  # GPT-2 Conv1D stores weight as [in, out]
    scale_groups: tuple[ScaleGroup, ...] = LLAMA_GROUPS   # AWQ / SmoothQuant groups; () for none


ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama", "mistral", "qwen2", "gemma", "olmo", "granite", "smollm3"),
             layers="model.layers", attention="self_attn"),
    ArchSpec("gemma2", ("gemma2",), layers="model.layers", attention="self_attn", scale_groups=GEMMA2_GROUPS),
    ArchSpec("qwen3", ("qwen3", "qwen3_moe"), layers="model.layers", attention="self_attn",
             q_norm="q_norm", k_norm="k_norm", norm_layout="bshd"),
    ArchSpec("gemma3", ("gemma3_text",), layers="model.layers", attention="self_attn",
             q_norm="q_norm", k_norm="k_norm", norm_layout="bhsd", scale_groups=GEMMA2_GROUPS),
    ArchSpec("phi3", ("phi3",), layers="model.layers", attention="self_attn",
             q=None, k=None, v=None, fused="qkv_proj", fused_layout="concat", scale_groups=PHI3_GROUPS),
    ArchSpec("gpt_neox", ("gpt_neox",), layers="gpt_neox.layers", attention="attention",
             q=None, k=None, v=None, fused="query_key_value", fused_layout="per_head", scale_groups=GPT_NEOX_GROUPS),
    ArchSpec("gptj", ("gptj",), layers="transformer.h", attention="attn",
             q="q_proj", k="k_proj", v="v_proj", pairing="interleaved", scale_groups=GPTJ_GROUPS),
    ArchSpec("gpt2", ("gpt2",), layers="transformer.h", attention="attn", q=None, k=None, v=None,
             fused="c_attn", fused_layout="concat", rope=False, transposed_weight=True, scale_groups=GPT2_GROUPS),
    ArchSpec("opt", ("opt",), layers="model.decoder.layers", attention="self_attn", rope=False,
             scale_groups=OPT_GROUPS),
)
SUPPORTED_ARCHITECTURES = tuple(t for a in ARCHITECTURES for t in a.model_types)


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _rope_parameters(config, layer_type: str | None = None) -> dict:
    """transformers 5 keeps RoPE settings in `rope_parameters`, per layer type for Gemma3
    (`sliding_attention`: base 10,000; `full_attention`: base 1,000,000). Without a layer type, the
    full-attention settings."""
    rp = dict(getattr(config, "rope_parameters", None) or {})
    if rp and all(isinstance(v, dict) for v in rp.values()):
        rp = dict(rp.get(layer_type or "full_attention") or rp.get("full_attention") or next(iter(rp.values())))
    return rp


def _theta(config, layer_type: str | None = None) -> float:
    rp = _rope_parameters(config, layer_type)
    return float(rp.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


@dataclass(frozen=True)
class ModelLayout:
    spec: ArchSpec
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int | None           # dims of a head that RoPE rotates (partial rotary: < head_dim)
    rope_theta: float | None         # the (global-attention) base; per layer below
    layer_thetas: tuple[float, ...] | None = None    # RoPE base of each layer (Gemma3: local 1e4, global 1e6)
    layer_types: tuple[str, ...] | None = None       # e.g. sliding_attention / full_attention, where declared

    # -- facts ----------------------------------------------------------------------------------
    @property
    def has_rope(self) -> bool:
        return self.spec.rope

    @property
    def pairing(self) -> str | None:
        return self.spec.pairing if self.spec.rope else None

    def heads(self, kind: str) -> int:
        return self.num_heads if kind in ("q", "q_prenorm") else self.num_kv_heads

    @property
    def has_qk_norm(self) -> bool:
        return bool(self.spec.q_norm or self.spec.k_norm) and not self.spec.fused

    def theta_of(self, layer: int) -> float | None:
        """The RoPE base of `layer` (they differ per layer in Gemma2/3's local/global scheme)."""
        if not self.has_rope:
            return None
        return self.layer_thetas[layer] if self.layer_thetas else self.rope_theta

    def rope_info(self) -> dict | None:
        if not self.has_rope:
            return None
        info = {"rotary_dim": self.rotary_dim, "pairing": self.pairing, "theta": self.rope_theta,
                "head_dim": self.head_dim,
                "theta_per_layer": [self.theta_of(i) for i in range(self.num_layers)]}
        if self.layer_types:
            info["layer_types"] = list(self.layer_types)
        return info

    # -- modules --------------------------------------------------------------------------------
    def decoder_layers(self, model) -> list:
        return list(_get(model, self.spec.layers))

    def attention(self, model, layer: int):
        return getattr(self.decoder_layers(model)[layer], self.spec.attention)

    def projection_names(self) -> dict[str, str]:
        """kind -> attribute of the attention module that computes it (same name for all when fused)."""
        s = self.spec
        return {kind: s.fused or getattr(s, kind) for kind in KINDS}

    def capture_points(self, model, layer: int) -> list[tuple[torch.nn.Module, Callable]]:
        attn = self.attention(model, layer)
        s = self.spec
        points: list[tuple[torch.nn.Module, Callable]] = []
        if s.fused:
            points.append((getattr(attn, s.fused), self._split_fused))
            return points
        for kind in KINDS:
            norm = s.q_norm if kind == "q" else s.k_norm if kind == "k" else None
            if norm:
                points.append((getattr(attn, norm), self._splitter_norm(kind)))
            else:
                points.append((getattr(attn, getattr(s, kind)), self._splitter_proj(kind)))
        return points

    def prenorm_points(self, model, layer: int) -> list[tuple[torch.nn.Module, Callable]]:
        """QK-norm models: (projection, splitter) giving Q/K before the per-head norm, as kinds
        `q_prenorm` / `k_prenorm`: the values the W_q/W_k rows produce. Empty for other models."""
        if not self.has_qk_norm:
            return []
        attn = self.attention(model, layer)
        points = []
        for kind in ("q", "k"):
            if getattr(self.spec, f"{kind}_norm"):
                split = self._splitter_proj(kind)
                points.append((getattr(attn, getattr(self.spec, kind)),
                               lambda out, split=split, kind=kind: {PRENORM_KINDS[kind]: split(out)[kind]}))
        return points

    # -- splitters: module output -> {kind: [b, s, h, d] view} ------------------------------------
    def _splitter_proj(self, kind: str):
        h, d = self.heads(kind), self.head_dim

        def split(out: torch.Tensor) -> dict[str, torch.Tensor]:
            return {kind: out.view(*out.shape[:-1], h, d)}
        return split

    def _splitter_norm(self, kind: str):
        transpose = self.spec.norm_layout == "bhsd"

        def split(out: torch.Tensor) -> dict[str, torch.Tensor]:
            return {kind: out.transpose(1, 2) if transpose else out}
        return split

    def _split_fused(self, out: torch.Tensor) -> dict[str, torch.Tensor]:
        d = self.head_dim
        lead = out.shape[:-1]
        if self.spec.fused_layout == "per_head":
            qkv = out.view(*lead, self.num_heads, 3, d)
            return {"q": qkv[..., 0, :], "k": qkv[..., 1, :], "v": qkv[..., 2, :]}
        nq, nk = self.num_heads * d, self.num_kv_heads * d
        return {"q": out[..., :nq].view(*lead, self.num_heads, d),
                "k": out[..., nq:nq + nk].view(*lead, self.num_kv_heads, d),
                "v": out[..., nq + nk:nq + 2 * nk].view(*lead, self.num_kv_heads, d)}

    # -- weights --------------------------------------------------------------------------------
    def row_of(self, kind: str, head: int, dim: int) -> int:
        """Output row (column for transposed weights) of the projection that produces (kind, head, dim)."""
        d = self.head_dim
        if self.spec.fused and self.spec.fused_layout == "per_head":
            return head * 3 * d + KINDS.index(kind) * d + dim
        offset = 0
        if self.spec.fused:
            offset = {"q": 0, "k": self.num_heads * d, "v": (self.num_heads + self.num_kv_heads) * d}[kind]
        return offset + head * d + dim

    def row_kind(self, module_name: str, row: int) -> str | None:
        """'q' | 'k' | 'v' for an output row of an attention projection (full or layer-relative module
        name; fused projections included): the inverse of `row_of`. None for any other module."""
        parent, _, attr = module_name.rpartition(".")
        s, d = self.spec, self.head_dim
        if parent.rpartition(".")[2] != s.attention:
            return None
        if not s.fused:
            return next((kind for kind in KINDS if getattr(s, kind) == attr), None)
        if attr != s.fused:
            return None
        if s.fused_layout == "per_head":
            return KINDS[(row // d) % 3]
        nq, nk = self.num_heads * d, self.num_kv_heads * d
        return "q" if row < nq else "k" if row < nq + nk else "v"

    def produces_qk(self, module_name: str) -> bool:
        """Whether the module emits Q or K rows (a fused q/k/v projection does)."""
        return self.row_kind(module_name, 0) in ("q", "k")

    def projection_rows(self, kind: str, dims_per_head: list[list[int]]) -> tuple[str, torch.Tensor]:
        if len(dims_per_head) != self.heads(kind):
            raise MvquantError(f"{kind}: got dims for {len(dims_per_head)} heads, the model has "
                               f"{self.heads(kind)}: the calibration report is from another model")
        rows = sorted(self.row_of(kind, h, dim) for h, dims in enumerate(dims_per_head) for dim in dims)
        return self.projection_names()[kind], torch.tensor(rows, dtype=torch.long)


def find_spec(model_type: str) -> ArchSpec:
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise MvquantError(
        f"architecture '{model_type}' is not supported: supported are {', '.join(SUPPORTED_ARCHITECTURES)}. "
        "To add it, declare an ArchSpec in mvquant/models/adapters.py naming its decoder layers, "
        "attention module, q/k/v projections and RoPE pairing")


def get_layout(model_or_config) -> ModelLayout:
    config = getattr(model_or_config, "config", model_or_config)
    config = getattr(config, "text_config", None) or config if config.model_type == "gemma3" else config
    spec = find_spec(config.model_type)
    num_heads = getattr(config, "num_attention_heads", None) or config.n_head
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // num_heads
    kv = getattr(config, "num_key_value_heads", None) or num_heads
    num_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    rotary_dim = theta = thetas = None
    types = getattr(config, "layer_types", None)
    types = tuple(str(t) for t in types) if isinstance(types, (list, tuple)) and len(types) == num_layers else None
    if spec.rope:
        rp = _rope_parameters(config)
        theta = _theta(config)
        thetas = tuple(_theta(config, t) for t in types) if types else None
        if getattr(config, "rotary_dim", None):  # GPT-J names it directly
            rotary_dim = int(config.rotary_dim)
        else:
            factor = rp.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) \
                or getattr(config, "rotary_pct", None) or 1.0
            rotary_dim = int(head_dim * float(factor))
    return ModelLayout(spec=spec, model_type=config.model_type, num_layers=num_layers, num_heads=num_heads,
                       num_kv_heads=kv, head_dim=head_dim, rotary_dim=rotary_dim, rope_theta=theta,
                       layer_thetas=thetas, layer_types=types)
