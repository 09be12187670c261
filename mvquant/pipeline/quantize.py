"""The entry points above the algorithms (llm-compressor's shape: the pipeline owns the model, the
methods see one decoder layer):

    quantize(model, config, report=...)                 a model in memory, swapped to QuantLinear in place
    quantize_to_checkpoint(model_dir, config, output)   a model directory streamed layer by layer to disk

Both choose the protected rows (calibration/selection.py), run the sequential pipeline with the
method's layer function, and describe the result with the same `checkpoint_config`.
"""
from __future__ import annotations

import time
import warnings

import torch

from ..calibration import load_report
from ..calibration.selection import protected_rows
from ..checkpoint import MANIFEST, ShardWriter, finish_checkpoint
from ..errors import MvquantError
from ..io import atomic_directory, check_output_path
from ..models.adapters import get_layout
from ..models.device import compute_device
from ..quantization.config import QuantConfig, storage_dtype
from ..quantization.linear import QuantLinear, is_linear, linear_weight, quantized_modules, set_module, storage_cast
from ..quantization.methods.activations import calibration_sequences
from ..quantization.methods.context import build_quant_linear
from ..quantization.summary import summarize
from .sequential import is_router, run_sequential
from .stream import NotStreamable, ShardReader, tied_keys, build_meta_model, load_tensors, weight_files


def quantize(model, config: QuantConfig | dict | None = None, report=None, calibration_data=None, tokenizer=None,
             progress: bool = True, device=None, **overrides):
    """Quantize `model` in place and return it.

    config: QuantConfig (or its dict); keyword overrides such as bits=4 are applied on top.
    report: CalibrationReport (or a path), needed by --protect massive/random/topk.
    calibration_data: None (the config's text source), a source name / file, or token id lists; used
        by awq / smoothquant / gptq. `tokenizer` turns text into tokens.
    device: where each decoder layer is quantized (e.g. "cuda"); None: where it is.
    The summary (bits per parameter, protected rows, bytes) is `model.mvquant_summary`.
    """
    if "calibration" in overrides:
        raise MvquantError("quantize(calibration=...) is now calibration_data=... (token windows or a text source); "
                           "the calibration report goes in report=")
    config = _config(config, overrides)
    if getattr(model, "mvquant_summary", None) is not None:
        raise MvquantError("this model is already quantized by mvquant: load the original model again")
    layout = get_layout(model)
    report = _checked_report(report, config, layout)
    t0 = time.perf_counter()
    targets = target_linears(model, config)
    rows = protected_rows(model, layout, report, *config.protect_policy(), seed=config.seed)
    if not config.spec.layer_by_layer:
        from ..quantization.methods.bnb import quantize_bnb, summarize_bnb
        quantize_bnb(model, targets, config, rows)
        summary = summarize_bnb(model, config, time.perf_counter() - t0)
    else:
        seqs = None
        if config.spec.needs_calibration:
            seqs = calibration_sequences(model, tokenizer, calibration_data, samples=config.calib_samples,
                                         seq_len=config.calib_seq_len, seed=config.seed, source=config.calib_data)
        if device is not None:
            device = compute_device(str(device))
        done = set(run_sequential(model, layout, config, rows, seqs, device=device, progress=progress))
        _round_outside_layers(model, {n: m for n, m in targets.items() if n not in done}, rows, config)
        round_for_storage(model, storage_dtype(config.store_dtype, next(model.parameters()).dtype))
        summary = summarize(model, config, layout, seconds=time.perf_counter() - t0)
    scaled = [n for n, m in quantized_modules(model).items() if m.input_scale is not None]
    model.config.quantization_config = checkpoint_config(config, targets, rows, scaled,
                                                         next(model.parameters()).dtype, report)
    model.mvquant_summary = summary
    return model


def quantize_to_checkpoint(model_dir, config: QuantConfig, output, *, report=None, tokenizer=None,
                           force: bool = False, device=None, dtype=None, progress: bool = True,
                           need_bytes=None) -> dict:
    """Quantize the model in `model_dir` layer by layer, streaming weights in from its shards and the
    checkpoint out to `output` (written atomically: an interrupted run leaves nothing). Returns the
    summary. Raises NotStreamable (before any work) when the tensor names do not map.

    The model is built on the meta device; the tensors outside the decoder layers are read first, then
    each decoder layer's weights when its turn comes; the finished layer is written as its own shard
    and dropped. Peak memory: the non-layer tensors, one layer and the calibration hidden states."""
    t0 = time.perf_counter()
    config = _config(config, {})
    device = compute_device(device) if not isinstance(device, torch.device) else device
    files = weight_files(model_dir)
    if files is None:
        raise NotStreamable("no model.safetensors or model.safetensors.index.json")
    model, dtype = build_meta_model(model_dir, dtype)
    layout = get_layout(model)
    layers_prefix = layout.spec.layers + "."
    keys = list(model.state_dict().keys())
    reader = ShardReader(files, keys, getattr(model, "base_model_prefix", "") or "", tied_keys(model))
    report = _checked_report(report, config, layout)
    # names only: holding the modules would keep each replaced nn.Linear, and the weights onload gave it,
    # alive to the end (one layer's weights per layer: peak memory grew with depth)
    targets = list(target_linears(model, config))
    rows = protected_rows(model, layout, report, *config.protect_policy(), seed=config.seed)
    if need_bytes is not None:
        check_output_path(output, force=force, kind="dir", need_bytes=int(need_bytes(model, config)),
                          inputs=(model_dir,), marker=MANIFEST)
    store = storage_dtype(config.store_dtype, dtype)

    # tensors outside the decoder layers: read once (embeddings are needed for the calibration pass)
    load_tensors(model, reader, [k for k in keys if not k.startswith(layers_prefix)], dtype, device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    seqs = None
    if config.spec.needs_calibration:
        seqs = calibration_sequences(model, tokenizer, None, samples=config.calib_samples,
                                     seq_len=config.calib_seq_len, seed=config.seed, source=config.calib_data)
    kernels: dict[str, int] = {}
    scaled: list[str] = []

    with atomic_directory(output, force=force, inputs=(model_dir,), marker=MANIFEST) as tmp:
        writer = ShardWriter(tmp)

        def onload(i, layer, dev):
            prefix = f"{layout.spec.layers}.{i}."
            load_tensors(model, reader, [k for k in keys if k.startswith(prefix)], dtype, dev)

        def offload(i, layer, prefix):
            quantized = {f"{prefix}.{n}" if n else prefix for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
            for n, m in layer.named_modules():
                if isinstance(m, QuantLinear):
                    kernels[m.kernel] = kernels.get(m.kernel, 0) + 1
                    if m.input_scale is not None:
                        scaled.append(f"{prefix}.{n}")
            sd = {f"{prefix}.{k}": t for k, t in layer.state_dict().items()}
            writer.add({k: storage_cast(k, t, quantized, store) for k, t in sd.items()})
            writer.flush()  # one shard per layer: nothing of it stays in memory
            layer.to("meta")

        run_sequential(model, layout, config, rows, seqs, device=device, progress=progress,
                       onload=onload, offload=offload)
        seen = set()
        rest = {}
        for k, t in model.state_dict().items():
            if k.startswith(layers_prefix) or t.device.type == "meta":
                continue
            ident = (t.data_ptr(), t.dtype, tuple(t.shape))
            if ident in seen:
                continue  # tied lm_head: stored once, re-tied on load
            seen.add(ident)
            rest[k] = storage_cast(k, t, set(), store)
        writer.add(rest)
        n_tensors, weights = writer.close()

        qc = checkpoint_config(config, targets, rows, scaled, dtype, report)
        summary = summarize(model, config, layout, seconds=time.perf_counter() - t0, rows=rows)
        summary["kernels"] = kernels
        model.config.quantization_config = qc
        generation = None
        try:
            from transformers import GenerationConfig
            generation = GenerationConfig.from_pretrained(str(model_dir))
        except (OSError, ValueError):
            pass
        finish_checkpoint(tmp, model.config, qc, weights=weights, tokenizer=tokenizer, report=report,
                          generation_config=generation, summary=summary, n_tensors=n_tensors)
    return summary


def checkpoint_config(config: QuantConfig, targets, rows: dict[str, torch.Tensor], scaled, dtype, report) -> dict:
    """The `quantization_config` of config.json: the recipe plus what loading needs to rebuild the
    modules (each target linear's protected row count, which divide by an input scale, the dtype)."""
    qc = config.to_dict()
    qc["modules"] = {name: int(rows[name].numel()) if name in rows else 0 for name in targets}
    # which QuantLinears divide by an input scale (AWQ folds its scales away, SmoothQuant keeps them)
    qc["input_scale_modules"] = sorted(scaled)
    qc["dtype"] = str(dtype).replace("torch.", "")
    qc["report_model"] = report.model if report is not None else None
    return qc


def target_linears(model, config: QuantConfig) -> dict[str, torch.nn.Module]:
    found = {name: m for name, m in model.named_modules()
             if is_linear(m) and config.is_target(name) and not is_router(name, m, model.config)}
    if not found:
        raise MvquantError("no linear layer matches the target patterns: check --targets / --ignore "
                           f"(targets {config.targets}, ignore {config.ignore})")
    return found


def round_for_storage(model, dtype) -> None:
    """Round the unquantized floating tensors to the dtype the checkpoint stores them in (in place, dtype
    kept), so the in-memory model and the loaded checkpoint compute the same logits."""
    if dtype is None:
        return
    quantized = set(quantized_modules(model))
    with torch.no_grad():
        for key, t in model.state_dict(keep_vars=True).items():
            if t.dtype != dtype and storage_cast(key, t, quantized, dtype) is not t:
                t.data.copy_(t.data.to(dtype))


def _config(config, overrides: dict) -> QuantConfig:
    if config is None:
        config = QuantConfig(**overrides)
    elif isinstance(config, dict):
        config = QuantConfig.from_dict({**config, **overrides})
    elif overrides:
        config = QuantConfig.from_dict({**config.to_dict(), **overrides})
    return config.validate()


def _checked_report(report, config: QuantConfig, layout):
    """The report (loaded if a path), checked against the model once; required by the protect policy."""
    if isinstance(report, (str, bytes)) or hasattr(report, "__fspath__"):
        report = load_report(report)
    if report is not None:
        report.check_matches(layout)
    elif config.needs_report:
        raise MvquantError(f"--protect {config.protect} needs a calibration report: pass --calibration REPORT.json "
                           "(made by mvquant calibrate) or use --protect none")
    return report


def _round_outside_layers(model, rest: dict, rows, config: QuantConfig) -> None:
    """Custom targets outside the decoder layers: rounded to nearest (the methods run per decoder layer)."""
    if rest and config.method != "rtn":
        warnings.warn(f"{len(rest)} target linears outside the decoder layers ({next(iter(rest))}, ...) are rounded "
                      f"to nearest: {config.method} runs per decoder layer")
    for name, module in rest.items():
        set_module(model, name, build_quant_linear(linear_weight(module), getattr(module, "bias", None),
                                                   rows.get(name), config))
