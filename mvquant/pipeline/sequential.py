"""The sequential pipeline: quantize a model one decoder layer at a time.

    embed the calibration batches once; capture what the model passes to each decoder layer;
    for each layer: onload it, quantize its linears on its inputs (the outputs of the already
    quantized layers before it), recompute its outputs with the quantized layer, offload it.

Only one layer's weights (when streamed) and statistics exist at a time; the hidden states of the
calibration batches are the only thing carried from one layer to the next. Where weights come from
and where finished layers go is the `onload` / `offload` pair: a no-op for a model in memory,
shard reading and writing for `quantize_to_checkpoint` (pipeline/quantize.py, stream.py).
"""
from __future__ import annotations

import contextlib
import ctypes
import inspect
import os
import sys
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..calibration import data as D
from ..errors import MvquantError
from ..quantization.linear import is_linear
from ..quantization.methods import LayerContext, quantize_layer


class _Stop(Exception):
    """Raised by the last catcher: nothing after the decoder layers needs to run."""


class _Catcher(torch.nn.Module):
    """Stands in for one decoder layer: records what the model passes to it and hands the hidden
    states on unchanged (decoder layers in transformers 5 return the hidden-states tensor)."""

    def __init__(self, index: int, layer: torch.nn.Module, record: Callable, last: bool):
        super().__init__()
        self.index, self.record, self.last = index, record, last
        self.__dict__["_wrapped"] = layer  # not a submodule: its (maybe meta) weights stay out of the model

    def __getattr__(self, name):  # some models read layer attributes (e.g. `attention_type`) in forward
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_wrapped"], name)

    def forward(self, hidden_states, *args, **kwargs):
        if args:  # GPT-2 passes some positionally: name them after the real layer's signature
            sig = inspect.signature(self.__dict__["_wrapped"].forward)
            kwargs = dict(sig.bind_partial(hidden_states, *args, **kwargs).arguments)
            kwargs.pop(next(iter(kwargs)))
            for p in sig.parameters.values():  # a **kwargs parameter binds as one dict: flatten it
                if p.kind is p.VAR_KEYWORD and isinstance(kwargs.get(p.name), dict):
                    kwargs.update(kwargs.pop(p.name))
        self.record(self.index, hidden_states, kwargs)
        if self.last:
            raise _Stop
        return hidden_states


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def capture_layer_inputs(model, layers: torch.nn.ModuleList, seqs: list[list[int]], *, batch_size: int = 4,
                         device=None) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Run the model once per batch with every decoder layer replaced by a catcher.

    Returns (hidden states entering layer 0 per batch, kwargs[batch][layer]). The kwargs differ per
    layer on some models (Gemma3: sliding vs global masks and RoPE tables); tensors shared between
    layers stay shared, so this costs little memory."""
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = []
    n = len(layers)

    def record(i, h, kw):
        if i == 0:
            hidden.append(h.detach())
            kwargs.append([None] * n)
        kwargs[-1][i] = {k: v for k, v in kw.items()}

    originals = list(layers)
    device = device or model.get_input_embeddings().weight.device
    try:
        for i, layer in enumerate(originals):
            layers[i] = _Catcher(i, layer, record, last=i == n - 1)
        with torch.inference_mode():
            for ids, mask in D.batches(seqs, batch_size, 0):
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if len(hidden) != -(-len(seqs) // batch_size) or any(k is None for b in kwargs for k in b):
        raise MvquantError("could not capture the decoder layers' inputs: the model does not call each decoder "
                           "layer once per forward pass; use --method rtn")
    return hidden, kwargs


def is_router(name: str, module, model_config) -> bool:
    """MoE routers (`gate` / `router` linears with one output per expert) stay unquantized."""
    experts = (getattr(model_config, "num_experts", None) or getattr(model_config, "num_local_experts", None)
               or getattr(model_config, "n_routed_experts", None))
    last = name.rsplit(".", 1)[-1]
    out = getattr(module, "out_features", None)
    return bool(experts) and last in ("gate", "router") and out == experts


def layer_linears(layer, prefix: str, config, model_config) -> dict[str, torch.nn.Module]:
    """Target linears of one decoder layer: full model name -> module."""
    out = {}
    for name, m in layer.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if is_linear(m) and config.is_target(full) and not is_router(full, m, model_config):
            out[full] = m
    return out


def _in_memory_onload(index, layer, device):
    if device is not None:
        layer.to(device)


def run_sequential(model, layout, config, rows: dict[str, torch.Tensor], seqs: list[list[int]] | None, *,
                   device=None, batch_size: int = 4, progress: bool = True,
                   onload: Callable | None = None, offload: Callable | None = None) -> list[str]:
    """Quantize every decoder layer of `model` in order, in place. Returns the quantized linears' names.

    seqs: calibration token windows (None for rtn). device: where each layer computes (None: where
    it is). onload(index, layer, device) brings a layer's weights in; offload(index, layer, prefix)
    takes a finished layer out (the default moves it back to the device it came from)."""
    layers_path = layout.spec.layers
    layers = model.get_submodule(layers_path)
    n = len(layers)
    hidden = kwargs = None
    if seqs is not None:
        hidden, kwargs = capture_layer_inputs(model, layers, seqs, batch_size=batch_size)
        if device is not None:
            hidden = [h.to(device) for h in hidden]
            kwargs = [_to_device(b, device) for b in kwargs]
    done: list[str] = []
    for i in tqdm(range(n), desc=f"quantize {config.method}", unit="layer", disable=not progress):
        layer = layers[i]
        prefix = f"{layers_path}.{i}"
        home = next(iter(layer.parameters())).device
        (onload or _in_memory_onload)(i, layer, device)
        linears = layer_linears(layer, prefix, config, model.config)
        inputs = [] if hidden is None else [(h, kwargs[b][i]) for b, h in enumerate(hidden)]
        ctx = LayerContext(index=i, layer=layer, linears=linears,
                           rows={k: v for k, v in rows.items() if k in linears},
                           config=config, layout=layout, inputs=inputs, prefix=prefix, progress=progress)
        quantize_layer(ctx)
        done.extend(ctx.linears)
        if hidden is not None and i < n - 1:
            with float_kernels(ctx.linears.values()):
                hidden = ctx.run()  # the next layer sees what the quantized layer produces
        del ctx, inputs
        if offload is not None:
            offload(i, layer, prefix)
        elif device is not None and home.type != "meta":
            layer.to(home)
        for b in range(len(kwargs or [])):
            kwargs[b][i] = None  # this layer's masks / RoPE tables are no longer needed
        release_freed_memory()
    return done


@contextlib.contextmanager
def float_kernels(modules):
    """Run QuantLinears on the exact dequantize-and-matmul path while recomputing calibration outputs:
    the CPU int4 kernel (bf16 activations) is built for decoding and is slow on long prefills, and the
    float path gives the next layer the quantized weights' exact outputs. The kernel is restored after."""
    saved = [(m, m.kernel) for m in modules if hasattr(m, "kernel") and m.kernel not in ("none", "int_mm")]
    for m, _ in saved:
        if m._stale:
            m.prepare()
        m.kernel = "dequant"
    try:
        yield
    finally:
        for m, kernel in saved:
            m.kernel = kernel


def release_freed_memory() -> None:
    """Hand memory freed by the finished layer back to the OS. glibc keeps freed heap chunks (and, after
    large frees, raises its mmap threshold so later large tensors land on the heap too), so without
    this the resident size creeps up layer after layer. MVQUANT_MALLOC_TRIM=0 turns it off (benchmarks)."""
    if os.environ.get("MVQUANT_MALLOC_TRIM", "1") == "0" or not sys.platform.startswith("linux"):
        return
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None
