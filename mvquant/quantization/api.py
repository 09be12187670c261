"""`quantize(model, config, report=...)`: swap the target linears for QuantLinear, in place."""
from __future__ import annotations

import time
import warnings

import torch

from ..errors import MvquantError
from ..models.adapters import get_layout
from . import activations as A
from .config import QuantConfig, storage_dtype
from .layer import is_linear, linear_weight  # noqa: F401  (linear_weight: used by hf.py / bnb.py)
from .linear import QuantLinear
from .protect import protected_rows


def target_linears(model, config: QuantConfig) -> dict[str, torch.nn.Module]:
    from ..pipeline import is_router
    found = {name: m for name, m in model.named_modules()
             if is_linear(m) and config.is_target(name) and not is_router(name, m, model.config)}
    if not found:
        raise MvquantError("no linear layer matches the target patterns: check --targets / --ignore "
                           f"(targets {config.targets}, ignore {config.ignore})")
    return found


def set_module(model, name: str, module: torch.nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def quantize(model, config: QuantConfig | dict | None = None, report=None, calibration=None, tokenizer=None,
             progress: bool = True, device=None, **overrides):
    """Quantize `model` in place and return it.

    config: QuantConfig (or its dict); keyword overrides such as bits=4 are applied on top.
    report: CalibrationReport (or a path), needed by --protect massive/random/topk.
    calibration: None (the default text source), a source name / file, or token id lists; used by
        awq / smoothquant / gptq. `tokenizer` turns text into tokens.
    device: where each decoder layer is quantized (e.g. "cuda"); None: where it is.
    The summary (bits per parameter, protected rows, bytes) is `model.mvquant_summary`.
    """
    if config is None:
        config = QuantConfig(**overrides)
    elif isinstance(config, dict):
        config = QuantConfig.from_dict({**config, **overrides})
    elif overrides:
        config = QuantConfig.from_dict({**config.to_dict(), **overrides})
    config.validate()
    if getattr(model, "mvquant_summary", None) is not None:
        raise MvquantError("this model is already quantized by mvquant: load the original model again")
    if isinstance(report, (str, bytes)) or hasattr(report, "__fspath__"):
        from ..calibration import load_report
        report = load_report(report)
    layout = get_layout(model)
    if report is not None:
        report.check_matches(layout)
    if config.needs_report and report is None:
        raise MvquantError(f"--protect {config.protect} needs a calibration report: pass --calibration REPORT.json "
                           "(made by mvquant calibrate) or use --protect none")
    t0 = time.perf_counter()
    targets = target_linears(model, config)
    rows = protected_rows(model, layout, config, report)
    if config.is_bnb:
        from .bnb import quantize_bnb
        quantize_bnb(model, targets, config, rows)
    else:
        if device is not None:
            from ..pipeline.stream import compute_device
            device = compute_device(str(device))
        _quantize_integer(model, layout, targets, rows, config, calibration, tokenizer, progress, device)
    if not config.is_bnb:
        round_for_storage(model, storage_dtype(config.store_dtype, next(model.parameters()).dtype))
    modules = {name: int(rows[name].numel()) if name in rows else 0 for name in targets}
    qc = config.to_dict()
    qc["modules"] = modules
    # which QuantLinears divide by an input scale (AWQ folds its scales away, SmoothQuant keeps them)
    qc["input_scale_modules"] = sorted(n for n, m in quantized_modules(model).items() if m.input_scale is not None)
    qc["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    qc["report_model"] = report.model if report is not None else None
    model.config.quantization_config = qc
    model.mvquant_summary = summarize(model, config, seconds=time.perf_counter() - t0)
    return model


def _quantize_integer(model, layout, targets, rows, config: QuantConfig, calibration, tokenizer, progress,
                      device=None):
    """One code path for every integer method: the sequential pipeline, layer by layer."""
    from ..pipeline import run_sequential
    from .layer import NEEDS, build_quant_linear

    seqs = None
    if config.method in NEEDS:
        seqs = A.calibration_sequences(model, tokenizer, calibration, samples=config.calib_samples,
                                       seq_len=config.calib_seq_len, seed=config.seed, source=config.calib_data)
    done = set(run_sequential(model, layout, config, rows, seqs, device=device, progress=progress))
    rest = [name for name in targets if name not in done]  # custom targets outside the decoder layers
    if rest and config.method != "rtn":
        warnings.warn(f"{len(rest)} target linears outside the decoder layers ({rest[0]}, ...) are rounded to "
                      f"nearest: {config.method} runs per decoder layer")
    for name in rest:
        module = targets[name]
        set_module(model, name, build_quant_linear(linear_weight(module), getattr(module, "bias", None),
                                                   rows.get(name), config))


def round_for_storage(model, dtype) -> None:
    """Round the unquantized floating tensors to the dtype the checkpoint stores them in (in place, dtype
    kept), so the in-memory model and the loaded checkpoint compute the same logits."""
    from ..checkpoint import storage_cast

    if dtype is None:
        return
    quantized = set(quantized_modules(model))
    with torch.no_grad():
        for key, t in model.state_dict(keep_vars=True).items():
            if t.dtype != dtype and storage_cast(key, t, quantized, dtype) is not t:
                t.data.copy_(t.data.to(dtype))


def quantized_modules(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


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


def summarize(model, config: QuantConfig, seconds: float | None = None) -> dict:
    """Effective bits per weight of the quantized linears (packed codes + scales + zeros + protected
    fp16 rows and their indices + input scales), protected row counts, and bytes vs fp16."""
    if config.is_bnb:
        from .bnb import summarize_bnb
        return summarize_bnb(model, config, seconds)
    mods = quantized_modules(model)
    n_weights = sum(m.in_features * m.out_features for m in mods.values())
    parts: dict[str, int] = {}
    for m in mods.values():
        for k, v in m.storage_bytes().items():
            parts[k] = parts.get(k, 0) + v
    linear_bytes = sum(parts.values())
    prot = {"q": 0, "k": 0, "other": 0}
    for name, m in mods.items():
        key = "q" if "q_proj" in name else "k" if "k_proj" in name else "other"
        prot[key] += m.n_protected
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
