"""The quantization algorithms, one module per method (declared in quantization/registry.py): each
layer-by-layer method has `quantize_layer(ctx: LayerContext)`; bitsandbytes swaps the linears itself."""
from __future__ import annotations

import importlib
from typing import Callable

from ..registry import method_spec
from .context import LayerContext


def layer_function(method: str) -> Callable[[LayerContext], None]:
    """The method's `quantize_layer`, from the module its declaration names."""
    return importlib.import_module(method_spec(method).module).quantize_layer


def quantize_layer(ctx: LayerContext) -> None:
    layer_function(ctx.config.method)(ctx)


__all__ = ["LayerContext", "layer_function", "quantize_layer"]
