"""One decoder layer at a time: what a quantization method sees, and the helpers every method shares.

The sequential pipeline (mvquant/pipeline) builds a `LayerContext` per decoder layer, with the
layer's weights on the compute device and its calibration inputs (the outputs of the already
quantized layers before it), and calls the method's `quantize_layer(ctx)`. A method replaces the
layer's target linears by QuantLinear modules through `ctx.replace`; it never sees the whole model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import MvquantError
from ..config import QuantConfig
from ..grid import linear_format
from ..linear import QuantLinear, linear_weight
from .activations import InputStats


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


def kept_rows(n_rows: int, rows: torch.Tensor | None, device=None) -> torch.Tensor:
    """Boolean mask of the output rows that get packed (the protected ones are excluded)."""
    keep = torch.ones(n_rows, dtype=torch.bool, device=device)
    if rows is not None and rows.numel():
        keep[rows.to(keep.device)] = False
    return keep


def build_quant_linear(weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor | None,
                       config: QuantConfig, *, quantized=None, input_scale: torch.Tensor | None = None) -> QuantLinear:
    """A QuantLinear for one linear, on the weight's device, in the weight's dtype.

    weight [out, in]; rows: protected output rows (kept in fp16); quantized: the non-protected rows
    (times input_scale) as AWQ / GPTQ found them (core.IntQuantized / q4k.Q4KQuantized), else
    round-to-nearest."""
    f = linear_format(config, weight.shape[1])
    return QuantLinear.from_weight(weight.detach(), bias, bits=f.bits, group_size=f.group_size,
                                   symmetric=f.symmetric, protected_rows=rows, input_scale=input_scale,
                                   quantized=quantized, act_bits=config.act_bits, compute=config.compute,
                                   grid=f.grid)


def quantize_module(ctx: LayerContext, name: str, *, quantized=None,
                    input_scale: torch.Tensor | None = None) -> QuantLinear:
    """Replace ctx.linears[name] by its QuantLinear (same device) and return it."""
    module = ctx.linears[name]
    q = build_quant_linear(linear_weight(module), getattr(module, "bias", None), ctx.rows.get(name), ctx.config,
                           quantized=quantized, input_scale=input_scale)
    ctx.replace(name, q)
    return q


def collect_layer_stats(ctx: LayerContext, needs: set[str]) -> dict[str, InputStats]:
    """Input statistics of this layer's linears: forward pre-hooks while ctx.run()."""
    stats = {name: InputStats(needs) for name in ctx.linears}
    last: list = [None, None]  # q/k/v share one input: compute its increment once (held by identity)

    def make_hook(name):
        def hook(_m, args):
            x = args[0]
            if last[0] is not x:
                last[:] = [x, InputStats.increment(x, needs)]
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
