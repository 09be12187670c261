"""Round-to-nearest: every target linear of the layer on its grid, no calibration data."""
from __future__ import annotations

from .context import LayerContext, quantize_module


def quantize_layer(ctx: LayerContext) -> None:
    for name in list(ctx.linears):
        quantize_module(ctx, name)
