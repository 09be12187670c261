"""The pipeline: the entry points (quantize, quantize_to_checkpoint) and the layer-by-layer loop under
them (onload, capture inputs, quantize, recompute outputs, offload; sequential.py)."""
from .quantize import quantize, quantize_to_checkpoint
from .sequential import capture_layer_inputs, is_router, layer_linears, run_sequential

__all__ = ["quantize", "quantize_to_checkpoint", "run_sequential", "capture_layer_inputs", "layer_linears",
           "is_router"]
