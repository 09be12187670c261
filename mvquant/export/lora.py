"""Exact protected rows as a PEFT LoRA: the pure math of `W_S = deQ(Q(W_S)) + Delta_S`.

For a module whose output rows S were kept in fp16, the exported base packs every row (S included,
re-quantized RTN on the module's own grid). The correction restores S: B [out, r] is a one-hot row
selector (B[S[i], i] = 1), A [r, in] holds Delta_S, so x @ (B A)^T adds Delta_S to exactly the rows S.
lora_alpha = r makes PEFT's scaling alpha / r = 1. r is |S| padded with zero rows to a rank the engine
accepts (vLLM's max_lora_rank choices)."""
from __future__ import annotations

import torch

from ..errors import MvquantError

# vLLM's --max-lora-rank choices (vllm/config/lora.py, 0.3x); one rank for the whole adapter.
ENGINE_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def padded_rank(n_rows: int, ranks: tuple[int, ...] = ENGINE_RANKS) -> int:
    """Smallest engine-accepted rank >= n_rows (n_rows protected rows in the largest module)."""
    for r in ranks:
        if r >= n_rows:
            return r
    raise MvquantError(f"a module has {n_rows} protected rows, more than the largest LoRA rank an engine "
                       f"accepts ({ranks[-1]}): protect fewer dims (--protect topk:N) or export with --protect-as fp16")


def selector_and_delta(rows: torch.Tensor, delta: torch.Tensor, out_features: int, rank: int,
                       dtype=torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A [rank, in], lora_B [out, rank]) with B @ A placing delta [|S|, in] on rows S."""
    n, in_features = delta.shape
    if n > rank:
        raise MvquantError(f"{n} protected rows do not fit LoRA rank {rank}")
    a = torch.zeros(rank, in_features, dtype=dtype)
    a[:n] = delta.to(dtype)
    b = torch.zeros(out_features, rank, dtype=dtype)
    b[rows.long(), torch.arange(n)] = 1
    return a, b
