"""compressed-tensors pack-quantized int4 -> torch's CPU int4 GEMM (aten._weight_int4pack_mm_for_cpu).

Pure torch, no vLLM: the plugin's kernel calls these, and mvquant's default test suite checks them
against compressed-tensors' own packing. compressed-tensors stores a code q in [0, 15] as the unsigned
nibble of q - 8 (eight per int32, lowest bits first, along the packed dim) and dequantizes
(q - z) * s; torch's kernel computes (q - 8) * s + zero per group, so zero = (8 - z) * s."""
from __future__ import annotations

import torch

KERNEL_GROUPS = (256, 128, 64, 32)   # group sizes the kernel takes; a larger group is split into these
BITS = 4


def unpack_nibbles(packed: torch.Tensor, n: int, packed_dim: int) -> torch.Tensor:
    """int32 words holding 8 nibbles each -> unsigned codes [.., n] (packed_dim 1) or [n, ..] (0)."""
    words = packed if packed_dim == 1 else packed.t()
    out = torch.empty(words.shape[0], words.shape[1] * 8, dtype=torch.int32, device=packed.device)
    for i in range(8):
        out[:, i::8] = (words >> (BITS * i)) & 0xF
    out = out[:, :n]
    return out if packed_dim == 1 else out.t()


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def to_int4pack(weight_packed: torch.Tensor, scales: torch.Tensor, zero_packed: torch.Tensor | None,
                in_features: int) -> dict:
    """compressed-tensors tensors of one linear ([N, K/8] int32, [N, G] scales, [N/8, G] zero points or
    None for symmetric) -> the kernel's layout {w, sz, kg, n}. N is padded to 16 with zero rows."""
    n, g_count = scales.shape
    group = in_features // g_count
    kg = next((k for k in KERNEL_GROUPS if group % k == 0), None)
    if kg is None or in_features % group:
        raise ValueError(f"group size {group} is not a multiple of 32: torch's int4 kernel cannot run it")
    codes = unpack_nibbles(weight_packed, in_features, 1)
    s = scales.float()
    z = torch.full_like(s, 8.0) if zero_packed is None else unpack_nibbles(zero_packed, n, 0).float()
    n_pad = round_up(n, 16)
    w = torch.full((n_pad, in_features), 8, dtype=torch.int32)
    w[:n] = codes
    reps = group // kg                                # the kernel's groups per stored group
    sz = torch.zeros(in_features // kg, n_pad, 2)
    sz[:, :n, 0] = s.repeat_interleave(reps, dim=1).t()
    sz[:, :n, 1] = ((8.0 - z) * s).repeat_interleave(reps, dim=1).t()
    return {"w": torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 1), "sz": sz.to(torch.bfloat16).contiguous(),
            "kg": kg, "n": n}


def int4pack_linear(x: torch.Tensor, layout: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) with bf16 activations, in x's dtype and shape."""
    shape = x.shape
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16), layout["w"],
                                                   layout["kg"], layout["sz"])[:, :layout["n"]].to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], layout["n"])
