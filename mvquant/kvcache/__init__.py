"""KV-cache quantization that keeps the massive K channels in full precision (see cache.py)."""
from .api import KVCacheFactory, KVConfig, bytes_per_token, kv_cache, protected_channels
from .cache import MassiveKVCache, MassiveKVLayer
from ..quantization.core import dequantize_groups, quantize_groups

__all__ = ["kv_cache", "KVConfig", "KVCacheFactory", "MassiveKVCache", "MassiveKVLayer", "protected_channels",
           "bytes_per_token", "quantize_groups", "dequantize_groups"]
