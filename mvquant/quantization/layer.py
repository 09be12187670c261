"""One decoder layer at a time: what a quantization method sees, and the methods' dispatch.

The sequential pipeline (mvquant/pipeline) builds a `LayerContext` per decoder layer, with the
layer's weights on the compute device and its calibration inputs (the outputs of the already
quantized layers before it), and calls `quantize_layer(ctx)`. A method replaces the layer's
target linears by QuantLinear modules through `ctx.replace`; it never sees the whole model.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import MvquantError
from .activations import InputStats
from .config import QuantConfig
from .grid import linear_format
from .linear import QuantLinear


@dataclass
class LayerContext:
    index: int                              # decoder layer index
    layer: torch.nn.Module                  # the decoder layer, on the compute device, weights real
    linears: dict[str, torch.nn.Module]     # target linears of this layer: full model name -> module
    rows: dict[str, torch.Tensor]           # full name -> protected output rows (sorted LongTensor)
    config: QuantConfig
    layout: object                          # ModelLayout
    inputs: list[tuple[torch.Tensor, dict]] = field(default_factory=list)  # per batch: (hidden, kwargs)
    prefix: str = ""                        # the layer's full model name, e.g. "model.layers.3"
    progress: bool = False

    def run(self) -> list[torch.Tensor]:
        """Run the layer over every calibration batch (inference mode); its output hidden states."""
        outs = []
        with torch.inference_mode():
            for hidden, kwargs in self.inputs:
                out = self.layer(hidden, **kwargs)
                outs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return outs

    def local_name(self, name: str) -> str:
        if self.prefix and name.startswith(self.prefix + "."):
            return name[len(self.prefix) + 1:]
        if name in self.linears or not self.prefix:
            return name
        raise MvquantError(f"'{name}' is not a module of decoder layer {self.index} ({self.prefix})")

    def replace(self, name: str, module: torch.nn.Module) -> None:
        """Swap the linear `name` (full model name) inside the layer."""
        parent, _, attr = self.local_name(name).rpartition(".")
        setattr(self.layer.get_submodule(parent) if parent else self.layer, attr, module)
        self.linears[name] = module


def is_linear(module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # GPT-2: weight stored [in, out]


def linear_weight(module) -> torch.Tensor:
    """Weight as [out, in] for nn.Linear and GPT-2 Conv1D alike."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def kept_rows(n_rows: int, rows: torch.Tensor | None, device=None) -> torch.Tensor:
    """Boolean mask of the output rows that get packed (the protected ones are excluded)."""
    keep = torch.ones(n_rows, dtype=torch.bool, device=device)
    if rows is not None and rows.numel():
        keep[rows.to(keep.device)] = False
    return keep


def build_quant_linear(weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor | None,
                       config: QuantConfig, *, quantized: tuple | None = None,
                       input_scale: torch.Tensor | None = None) -> QuantLinear:
    """A QuantLinear for one linear, on the weight's device, in the weight's dtype.

    weight [out, in]; rows: protected output rows (kept in fp16); quantized: (codes, scales, zeros)
    of the non-protected rows (times input_scale) from AWQ / GPTQ, else round-to-nearest."""
    f = linear_format(config, weight.shape[1])
    return QuantLinear.from_weight(weight.detach(), bias, bits=f.bits, group_size=f.group_size,
                                   symmetric=f.symmetric, protected_rows=rows, input_scale=input_scale,
                                   quantized=quantized, act_bits=config.act_bits, compute=config.compute,
                                   grid=f.grid)


def quantize_module(ctx: LayerContext, name: str, *, quantized: tuple | None = None,
                    input_scale: torch.Tensor | None = None) -> QuantLinear:
    """Replace ctx.linears[name] by its QuantLinear (same device) and return it."""
    module = ctx.linears[name]
    q = build_quant_linear(linear_weight(module), getattr(module, "bias", None), ctx.rows.get(name), ctx.config,
                           quantized=quantized, input_scale=input_scale)
    ctx.replace(name, q)
    return q


# -- methods ----------------------------------------------------------------------------------------
def rtn_layer(ctx: LayerContext) -> None:
    """Round-to-nearest: no calibration data."""
    for name in list(ctx.linears):
        quantize_module(ctx, name)


NEEDS = {"awq": {"absmean", "samples"}, "smoothquant": {"absmax"}, "gptq": {"hessian"}}


def collect_layer_stats(ctx: LayerContext, needs: set[str], sample_rows: int = 512) -> dict[str, InputStats]:
    """Input statistics of this layer's linears: forward pre-hooks while ctx.run()."""
    gen = torch.Generator().manual_seed(int(ctx.config.seed) + ctx.index)
    stats = {name: InputStats(needs, sample_rows) for name in ctx.linears}
    last: list = [None, None]  # q/k/v share one input: compute its increment once (held by identity)

    def make_hook(name):
        def hook(_m, args):
            x = args[0]
            if last[0] is not x:
                last[:] = [x, InputStats.increment(x, needs, sample_rows, gen)]
            stats[name].add(last[1])
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in ctx.linears.items()]
    try:
        ctx.run()
    finally:
        last[:] = [None, None]
        for h in handles:
            h.remove()
    missing = [n for n, s in stats.items() if s.count == 0]
    if missing:
        raise MvquantError(f"no calibration activations reached {missing[:3]}: these modules are not used "
                           "in the forward pass; exclude them with --ignore patterns")
    return stats


def gptq_with_fallback(w: torch.Tensor, hessian: torch.Tensor, config: QuantConfig, name: str = "") -> tuple | None:
    """GPTQ; when the damped Hessian is not positive definite, retry with 10x and 100x the damping,
    then give up on this linear (None: the caller rounds to nearest) with a warning."""
    from .gptq import gptq_quantize

    damp = config.gptq_damp
    for attempt in range(3):
        try:
            f = linear_format(config, w.shape[1])
            return gptq_quantize(w, hessian, bits=f.bits, group_size=f.group_size,
                                 symmetric=f.symmetric, damp=damp, block=config.gptq_block,
                                 act_order=config.gptq_act_order, grid=f.grid)
        except torch.linalg.LinAlgError:
            if attempt < 2:
                warnings.warn(f"gptq {name}: Cholesky failed at damping {damp:g}; retrying with {damp * 10:g}")
            damp *= 10
    warnings.warn(f"gptq {name}: Cholesky failed even with damping {damp / 10:g}: this linear falls back to "
                  "round-to-nearest")
    return None


def generic_layer(ctx: LayerContext) -> None:
    """Per-linear AWQ / SmoothQuant / GPTQ on this layer's statistics (one linear's loss each)."""
    from .awq import awq_search
    from .smoothquant import smooth_scales

    config, method = ctx.config, ctx.config.method
    stats = collect_layer_stats(ctx, NEEDS[method])
    for name in list(ctx.linears):
        w = linear_weight(ctx.linears[name]).detach().float()
        wk = w[kept_rows(w.shape[0], ctx.rows.get(name), w.device)]
        st = stats.pop(name)  # free the Hessian / samples as we go
        input_scale = quantized = None
        if wk.shape[0] == 0:
            pass  # every row protected: nothing to search
        elif method == "awq":
            dev = wk.device
            s, quantized = awq_search(wk.cpu(), st.sample(), st.abs_mean.cpu(), bits=config.bits,
                                      group_size=config.group_size, symmetric=config.symmetric,
                                      grid=config.awq_grid, clip_grid=config.awq_clip_grid)
            input_scale, quantized = s.to(dev), tuple(None if t is None else t.to(dev) for t in quantized)
        elif method == "smoothquant":
            input_scale = smooth_scales(st.abs_max.to(wk.device), wk, config.alpha)
        elif method == "gptq":
            quantized = gptq_with_fallback(wk.cpu(), st.hessian.cpu(), config, name)
            if quantized is not None:
                quantized = tuple(None if t is None else t.to(wk.device) for t in quantized)
        quantize_module(ctx, name, quantized=quantized, input_scale=input_scale)


def _awq_layer(ctx: LayerContext) -> None:
    from .awq import quantize_layer as awq_layer
    awq_layer(ctx)


def _gptq_layer(ctx: LayerContext) -> None:
    from .gptq import quantize_layer as gptq_layer
    gptq_layer(ctx)


def _smoothquant_layer(ctx: LayerContext) -> None:
    from .smoothquant import quantize_layer as smoothquant_layer
    smoothquant_layer(ctx)


LAYER_METHODS: dict[str, Callable[[LayerContext], None]] = {
    "rtn": rtn_layer,
    "awq": _awq_layer,
    "gptq": _gptq_layer,
    "smoothquant": _smoothquant_layer,
}


def quantize_layer(ctx: LayerContext) -> None:
    try:
        method = LAYER_METHODS[ctx.config.method]
    except KeyError:
        raise MvquantError(f"method '{ctx.config.method}' has no layer-by-layer implementation: use one of "
                           f"{', '.join(LAYER_METHODS)}") from None
    method(ctx)


__all__ = ["LayerContext", "LAYER_METHODS", "quantize_layer", "build_quant_linear", "quantize_module",
           "linear_weight", "is_linear", "kept_rows", "collect_layer_stats", "gptq_with_fallback", "rtn_layer", "generic_layer"]
