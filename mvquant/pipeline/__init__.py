"""Layer by layer: onload, capture inputs, quantize, recompute outputs, offload (see sequential.py)."""
from .sequential import capture_layer_inputs, is_router, layer_linears, run_sequential

__all__ = ["run_sequential", "capture_layer_inputs", "layer_linears", "is_router"]
