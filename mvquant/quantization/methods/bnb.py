"""bitsandbytes baselines (LLM.int8 and NF4), in memory only: swap the target linears for
bnb.nn.Linear8bitLt / Linear4bit. They are external references, so no protection and no
checkpoint (bitsandbytes' own serialization is not ours to re-implement)."""
from __future__ import annotations

import torch

from ...errors import MvquantError
from ..linear import linear_weight, set_module


def require_bnb():
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken native library
        raise MvquantError(f"bitsandbytes is unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}): "
                           "pip install bitsandbytes, or use --method rtn/awq/gptq/smoothquant") from None
    return bnb


def quantize_bnb(model, targets: dict, config, rows: dict) -> None:
    bnb = require_bnb()
    if rows:
        raise MvquantError(f"--method {config.method} is an external baseline without protection: use --protect none")
    for name, module in targets.items():
        w = linear_weight(module).detach()
        bias = getattr(module, "bias", None)
        out_f, in_f = w.shape
        if config.method == "bnb-nf4":
            new = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=w.dtype, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(w.contiguous().clone(), requires_grad=False, quant_type="nf4")
        else:
            new = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=6.0)
            new.weight = bnb.nn.Int8Params(w.contiguous().clone(), requires_grad=False, has_fp16_weights=False)
        if bias is not None:
            new.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        new = new.to(w.device)  # quantizes on the move
        set_module(model, name, new)


def summarize_bnb(model, config, seconds=None) -> dict:
    bnb = require_bnb()
    mods = {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    n_weights = sum(m.in_features * m.out_features for m in mods.values())
    linear_bytes = 0
    for m in mods.values():
        linear_bytes += m.weight.numel() * m.weight.element_size()
        qs = getattr(m.weight, "quant_state", None)
        if qs is not None and getattr(qs, "absmax", None) is not None:
            linear_bytes += qs.absmax.numel() * qs.absmax.element_size()
        scb = getattr(m.weight, "SCB", None)
        if scb is not None:
            linear_bytes += scb.numel() * scb.element_size()
    return {"method": config.method, "bits": config.bits, "group_size": 64 if config.method == "bnb-nf4" else None,
            "symmetric": True, "protect": "none", "quantized_linears": len(mods), "quantized_weights": n_weights,
            "bits_per_weight": 8 * linear_bytes / max(1, n_weights), "bytes_by_part": {},
            "linear_bytes": linear_bytes, "linear_bytes_fp16": 2 * n_weights, "protected_rows": 0,
            "protected_rows_by_kind": {"q": 0, "k": 0, "other": 0}, "protected_weight_share": 0.0,
            "other_bytes": 0, "other_bytes_fp16": 0, "model_bytes": linear_bytes, "model_bytes_fp16": 2 * n_weights,
            "kernels": {"bitsandbytes": len(mods)}, "seconds": None if seconds is None else round(seconds, 2)}
