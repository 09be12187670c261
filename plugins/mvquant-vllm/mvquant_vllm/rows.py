"""Exact protected rows inside a packed linear: the pure math of the `mvquant-rows` format (no vLLM).

An export with --protect-as rows packs every output row of a linear (protected rows re-quantized on the
module's grid) and stores, per module with protected rows S, `rows_index` (int32 [|S|]) and
`rows_weight` (fp16 [|S|, in], the checkpoint's stored rows). The layer computes the packed linear with
whatever W4A16 kernel the engine picks, then overwrites its protected outputs:

    y = W4A16(x);  y[..., S] = x @ rows_weight^T (+ bias[S])

so the protected rows' effective weights are the stored fp16 rows exactly (an added Delta_S = W_S -
deQ(Q(W_S)) in fp16 would round; both cost one |S| x in GEMM, see benchmarks/bench_rows.py).

vLLM fuses a model's q/k/v projections into one `qkv_proj` (gate/up into `gate_up_proj`): each
checkpoint module is one *shard* of the fused layer, loaded separately (shard id "q"/"k"/"v" or 0/1).
RowSlots maps each shard's S into the fused output (offset by the shards before it) and its rows into
one [sum |S|, in] buffer. A checkpoint module that already is the fused layer (Phi-3 `qkv_proj`,
GPT-NeoX `query_key_value`) is a single shard whose S already indexes the fused output."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

SHARD_IDS = {"q": 0, "k": 1, "v": 2}          # vLLM's QKVParallelLinear shard ids, in output order


def apply_rows(y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """y[..., index] = x @ weight^T (+ bias[index]), in place; index int64. Computed in weight's dtype
    (the plugin keeps the fp16 rows as fp32, exactly: torch's fp16 GEMM on CPUs without AVX512-FP16 is
    ~50x slower than fp32 for this |S| x in shape), rounded once to y's dtype."""
    if index.numel():
        b = None if bias is None else bias[index].to(weight.dtype)
        y.index_copy_(y.dim() - 1, index, F.linear(x.to(weight.dtype), weight, b).to(y.dtype))
    return y


def apply_delta(y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The alternative correction: y[..., index] += x @ delta^T (bias already in y). Measured, not used."""
    if index.numel():
        y.index_add_(y.dim() - 1, index, F.linear(x.to(delta.dtype), delta).to(y.dtype))
    return y


def checkpoint_modules(prefix: str, packed_modules_mapping: dict[str, list[str]]) -> list[str]:
    """The checkpoint modules a vLLM layer holds, in output order: model.layers.0.self_attn.qkv_proj ->
    its q_proj, k_proj, v_proj under Llama's mapping, itself under Phi-3's ({"qkv_proj": ["qkv_proj"]})
    or for a layer no mapping names (GPT-NeoX's query_key_value)."""
    parent, _, leaf = prefix.rpartition(".")
    return [f"{parent}.{p}" if parent else p for p in packed_modules_mapping.get(leaf, [leaf])]


@dataclass
class Shard:
    name: str             # the checkpoint module (e.g. model.layers.0.self_attn.k_proj)
    rows: int             # |S| the config declares for it
    out_offset: int       # where its outputs start in the fused layer
    out_size: int
    slot: int             # where its rows start in the fused [sum |S|, in] buffer
    loaded: set = field(default_factory=set)


class RowSlots:
    """The fused layer's protected rows: where each checkpoint shard's S and rows go, and what is loaded."""

    def __init__(self, names: list[str], rows: list[int], out_sizes: list[int], in_features: int):
        if len(names) != len(out_sizes):
            if len(names) != 1:
                raise ValueError(f"mvquant-rows: {len(names)} checkpoint modules {names} for a layer of "
                                 f"{len(out_sizes)} output shards")
            out_sizes = [sum(out_sizes)]          # one checkpoint module is the whole fused layer
        self.in_features = in_features
        self.shards, out, slot = [], 0, 0
        for name, n, size in zip(names, rows, out_sizes):
            self.shards.append(Shard(name, n, out, size, slot))
            out, slot = out + size, slot + n
        self.total = slot

    def shard(self, shard_id) -> Shard:
        if shard_id is None:
            if len(self.shards) != 1:
                raise ValueError(f"mvquant-rows: rows of the fused {[s.name for s in self.shards]} loaded without "
                                 "a shard id")
            return self.shards[0]
        i = SHARD_IDS.get(shard_id, shard_id)
        if not isinstance(i, int) or not 0 <= i < len(self.shards):
            raise ValueError(f"mvquant-rows: unknown shard {shard_id!r} of {[s.name for s in self.shards]}")
        return self.shards[i]

    def load(self, kind: str, buf: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        """Copy one checkpoint tensor (kind "index" or "weight") into the fused buffer, refusing one that
        does not match the module the config declares."""
        s = self.shard(shard_id)
        if kind == "index":
            idx = loaded.long().reshape(-1) if loaded.dim() == 1 else None
            if idx is None or idx.numel() != s.rows:
                raise ValueError(f"mvquant-rows: {s.name}.rows_index has shape {tuple(loaded.shape)}, the config "
                                 f"declares {s.rows} protected rows")
            if idx.numel() and (idx.min() < 0 or idx.max() >= s.out_size or idx.unique().numel() != idx.numel()):
                raise ValueError(f"mvquant-rows: {s.name}.rows_index must hold {s.rows} distinct rows in "
                                 f"[0, {s.out_size}), got {idx.tolist()[:8]}...")
            buf[s.slot: s.slot + s.rows] = (idx + s.out_offset).to(buf.dtype)
        else:
            if tuple(loaded.shape) != (s.rows, self.in_features):
                raise ValueError(f"mvquant-rows: {s.name}.rows_weight has shape {tuple(loaded.shape)}, the module "
                                 f"needs ({s.rows}, {self.in_features})")
            buf[s.slot: s.slot + s.rows] = loaded.to(buf.dtype)
        s.loaded.add(kind)

    def check_complete(self) -> None:
        missing = [f"{s.name}.rows_{k}" for s in self.shards if s.rows for k in ("index", "weight")
                   if k not in s.loaded]
        if missing:
            raise ValueError(f"mvquant-rows: the config declares protected rows the checkpoint lacks: "
                             f"{', '.join(missing[:4])}")
