"""Quantization with protected massive Q/K rows: config, packing, QuantLinear, methods."""
from .api import format_summary, quantize, quantized_modules, summarize
from .config import METHODS, QuantConfig
from .linear import QuantLinear
from .packing import pack_bits, unpack_bits

__all__ = ["QuantConfig", "QuantLinear", "quantize", "summarize", "format_summary", "quantized_modules",
           "pack_bits", "unpack_bits", "METHODS"]
