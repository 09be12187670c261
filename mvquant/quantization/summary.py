"""What a quantized model costs: effective bits per weight, protected rows, bytes against fp16."""
from __future__ import annotations

import torch

from .config import QuantConfig, storage_dtype
from .linear import quantized_modules


def unique_bytes(tensors, dtype=None) -> int:
    """Bytes of the tensors, each storage counted once (tied embeddings share one); floating tensors
    counted at `dtype`'s size when given (what a checkpoint stores). Meta tensors count by identity."""
    seen, total = set(), 0
    for t in tensors:
        ident = id(t) if t.device.type == "meta" else t.data_ptr()
        if ident not in seen:
            seen.add(ident)
            size = dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()
            total += t.numel() * size
    return total


def summarize(model, config: QuantConfig, layout, seconds: float | None = None,
              rows: dict[str, torch.Tensor] | None = None) -> dict:
    """Effective bits per weight of the quantized linears (packed codes + scales + zeros + protected
    fp16 rows and their indices + input scales), protected rows by kind (`layout`: the model's
    ModelLayout, which knows what each row of a projection produces), and bytes vs fp16.
    `rows`: the protected rows by module, where the modules no longer hold them (streamed to disk)."""
    mods = quantized_modules(model)
    if rows is None:
        rows = {name: m.protected_rows for name, m in mods.items()}
    n_weights = sum(m.in_features * m.out_features for m in mods.values())
    parts: dict[str, int] = {}
    for m in mods.values():
        for k, v in m.storage_bytes().items():
            parts[k] = parts.get(k, 0) + v
    linear_bytes = sum(parts.values())
    prot = {"q": 0, "k": 0, "other": 0}
    for name, r in rows.items():
        for row in r.tolist():
            kind = layout.row_kind(name, row)
            prot[kind if kind in ("q", "k") else "other"] += 1
    other = [p for n, p in model.named_parameters() if not any(n.startswith(q + ".") for q in mods)]
    other_bytes = unique_bytes(other, storage_dtype(config.store_dtype, other[0].dtype) if other else None)
    other_fp16 = unique_bytes(other, torch.float16)
    kernels: dict[str, int] = {}
    for m in mods.values():
        kernels[m.kernel] = kernels.get(m.kernel, 0) + 1
    return {
        "method": config.method, "bits": config.bits, "group_size": config.group_size,
        "symmetric": config.symmetric, "protect": config.protect,
        "quantized_linears": len(mods), "quantized_weights": n_weights,
        "bits_per_weight": 8 * linear_bytes / max(1, n_weights),
        "bytes_by_part": parts, "linear_bytes": linear_bytes, "linear_bytes_fp16": 2 * n_weights,
        "protected_rows": sum(m.n_protected for m in mods.values()), "protected_rows_by_kind": prot,
        "protected_weight_share": sum(m.n_protected * m.in_features for m in mods.values()) / max(1, n_weights),
        "other_bytes": other_bytes, "other_bytes_fp16": other_fp16,
        "model_bytes": linear_bytes + other_bytes, "model_bytes_fp16": 2 * n_weights + other_fp16,
        "kernels": kernels, "seconds": None if seconds is None else round(seconds, 2),
    }


def format_summary(s: dict) -> str:
    mb = 1 / 2**20
    lines = [
        f"method {s['method']}  bits {s['bits']}  group {s['group_size'] or 'row'}  "
        f"{'symmetric' if s['symmetric'] else 'asymmetric'}  protect {s['protect']}",
        f"quantized linears: {s['quantized_linears']} ({s['quantized_weights']:,} weights)",
        f"effective bits/weight: {s['bits_per_weight']:.3f} (incl. scales, zeros, protected rows)",
        f"protected rows: {s['protected_rows']} (q {s['protected_rows_by_kind']['q']}, k {s['protected_rows_by_kind']['k']}), "
        f"{100 * s['protected_weight_share']:.2f}% of quantized weights",
        f"linear bytes: {s['linear_bytes'] * mb:.1f} MiB vs fp16 {s['linear_bytes_fp16'] * mb:.1f} MiB "
        f"({s['linear_bytes'] / max(1, s['linear_bytes_fp16']):.3f}x)",
        f"model bytes: {s['model_bytes'] * mb:.1f} MiB vs fp16 {s['model_bytes_fp16'] * mb:.1f} MiB "
        f"(other tensors as stored: {s['other_bytes'] * mb:.1f} MiB)",
    ]
    if s.get("kernels"):
        lines.append("kernels: " + ", ".join(f"{k} x{v}" for k, v in sorted(s["kernels"].items())))
    if s.get("seconds") is not None:
        lines.append(f"time: {s['seconds']:.1f} s")
    return "\n".join(lines)
