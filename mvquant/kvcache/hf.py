"""transformers' own `QuantizedCache` (optimum-quanto or HQQ backend) as a baseline beside our cache.

Their layers are used unchanged (their quantizer, their grouping, their residual window) except in
three places that the comparison needs:
- the prefill read returns the dequantized prompt: transformers returns the exact K/V at prefill,
  so the prompt's own attention (and the first answer token) would never see the quantized cache,
  while every other arm reads what the cache stores (the protocol of cache.py);
- `batch_select_indices` / `batch_repeat_interleave` (the scorer expands one prompt to its choices)
  go through transformers' deferred beam reordering, which indexes the dequantized states: the
  inherited versions index the empty residual tensor and fail;
- `set_attention_mask` is accepted and ignored: these quantizers group channels per token, so
  padding tokens form their own groups and set no other token's range.

What transformers does differently from cache.py, kept as it is: the whole prompt is quantized at
prefill (no exact window of the last prompt tokens); new tokens stay exact until `residual` of them
have gathered, then the whole cache is dequantized and quantized again (a second rounding).
Keys and values are both grouped along channels per token (quanto axis 0, HQQ axis 1): quanto's
per-channel mode groups consecutive rows of the flattened [batch, heads, tokens] and needs their
count divisible by the group size, which an arbitrary prompt length is not. HQQ 3-bit fails in
hqq 0.2.8's dequantize for this layout (a packed-shape mismatch), so HQQ takes 2, 4 or 8 bits.
"""
from __future__ import annotations

import importlib.util

import torch

# backend -> (bits it takes, the layer's axis argument for "groups of channels per token", pip package)
BACKENDS = {"quanto": ((2, 4), 0, "optimum-quanto", "optimum.quanto"),
            "hqq": ((2, 4, 8), 1, "hqq", "hqq")}


def backend_bits(backend: str) -> tuple[int, ...]:
    return BACKENDS[backend][0]


def require_backend(backend: str) -> None:
    """A clear error when the backend's package is missing (transformers raises an ImportError deep inside)."""
    from ..errors import MvquantError

    _, _, package, module = BACKENDS[backend]
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        raise MvquantError(f"--kv-backend {backend} needs {package}: pip install {package} "
                           "(or pip install 'mvquant[kv-baselines]')")


def _layer_class(backend: str):
    from transformers.cache_utils import HQQQuantizedLayer, QuantoQuantizedLayer

    base = QuantoQuantizedLayer if backend == "quanto" else HQQQuantizedLayer

    class Layer(base):
        def update(self, key_states, value_states, *args, **kwargs):
            first = not self.is_initialized
            k, v = super().update(key_states, value_states, *args, **kwargs)
            if first:   # read what was stored, as every later step does
                self._batch = key_states.shape[0]
                k, v = self._dequantize(self._quantized_keys), self._dequantize(self._quantized_values)
                k, v = k.to(key_states.dtype), v.to(value_states.dtype)
            return k, v

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            super().reorder_cache(beam_idx)
            if self.is_initialized:
                self._batch = beam_idx.numel()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self.reorder_cache(indices)

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self.reorder_cache(torch.arange(self._batch, device=self.device).repeat_interleave(repeats))

    Layer.__name__ = Layer.__qualname__ = f"Simulated{base.__name__}"
    return Layer


def hf_quantized_cache(backend: str, num_layers: int, *, bits: int, group_size: int, residual: int):
    """A transformers QuantizedCache of `num_layers` layers of the backend's (adjusted) layer class.
    The backend's package is checked once, by KVCacheFactory, not on every fresh cache."""
    from transformers.cache_utils import Cache, QuantizedCache

    axis = BACKENDS[backend][1]
    cls = _layer_class(backend)
    layers = [cls(nbits=bits, axis_key=axis, axis_value=axis, q_group_size=group_size, residual_length=residual)
              for _ in range(num_layers)]

    class HFQuantizedKVCache(QuantizedCache):
        def __init__(self):
            Cache.__init__(self, layers=layers)   # QuantizedCache's own __init__ builds unadjusted layers
            self.backend = backend

        def set_attention_mask(self, mask) -> None:
            pass

    return HFQuantizedKVCache()
