"""The quantization core: the config and method declarations, the grids (integer and llama.cpp's Q4_K),
bit packing, QuantLinear and what a quantized model costs. The algorithms are in methods/; running them
over a model is mvquant.pipeline."""
from .config import QuantConfig
from .linear import QuantLinear, quantized_modules
from .packing import pack_bits, unpack_bits
from .registry import METHODS, MethodSpec, method_spec
from .summary import format_summary, summarize

__all__ = ["QuantConfig", "QuantLinear", "quantized_modules", "summarize", "format_summary", "pack_bits",
           "unpack_bits", "METHODS", "MethodSpec", "method_spec"]
