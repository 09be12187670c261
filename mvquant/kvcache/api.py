"""`mvquant.kv_cache(model, report, bits=2, protect="massive")`: validate the settings once, pick the
protected K channels per layer and KV head, and build fresh caches from them."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import MvquantError
from .cache import MassiveKVCache
from .hf import BACKENDS as HF_BACKENDS
from .hf import backend_bits, hf_quantized_cache, require_backend
from ..quantization.registry import BITS as SUPPORTED_BITS
from .rotation import TURBO_BITS

POLICIES = ("massive", "none", "random")
AXES = ("channel", "token", "turboquant", "rht")   # the key layout (values follow, see cache.py)
BOUNDARY = {"turboquant": 2}   # vLLM keeps TurboQuant's first and last two layers unquantized
BACKENDS = ("mvquant",) + tuple(HF_BACKENDS)   # mvquant: cache.py; quanto / hqq: transformers' QuantizedCache


@dataclass(frozen=True)
class KVConfig:
    """KV-cache quantization settings (the `--kv-*` options)."""
    bits: int = 2
    protect: str = "massive"      # massive | none | random (same count of pairs per head, seeded)
    group_size: int = 32
    residual: int = 32            # most recent tokens kept in full precision
    sink: int = 0                 # first tokens kept in full precision
    axis: str = "channel"         # keys per channel (KIVI) or per token, or vLLM's rotated turboquant / rht
    seed: int = 0
    backend: str = "mvquant"      # or transformers' QuantizedCache: quanto | hqq (baselines, no protection)
    boundary: int | None = None   # first and last layers kept unquantized (None: the layout's own, BOUNDARY)

    def exact_layers(self, num_layers: int) -> tuple[int, ...]:
        n = BOUNDARY.get(self.axis, 0) if self.boundary is None else self.boundary
        n = min(n, num_layers // 2)     # as vLLM: never more than half the layers
        return tuple(sorted(set(range(n)) | set(range(num_layers - n, num_layers))))

    def check(self) -> "KVConfig":
        if self.backend not in BACKENDS:
            raise MvquantError(f"--kv-backend '{self.backend}' is unknown: use one of {', '.join(BACKENDS)}")
        bits = SUPPORTED_BITS if self.backend == "mvquant" else backend_bits(self.backend)
        if self.bits not in bits:
            raise MvquantError(f"--kv-bits {self.bits} is not supported{self._by()}: use one of {', '.join(map(str, bits))}")
        if self.backend != "mvquant":
            if self.protect != "none":
                raise MvquantError(f"--kv-backend {self.backend} keeps no K channels exact: use --kv-protect none "
                                   "(or --kv-backend mvquant)")
            if self.axis != "token":
                raise MvquantError(f"--kv-backend {self.backend} groups keys along channels per token: use --kv-axis token")
            if self.sink:
                raise MvquantError(f"--kv-backend {self.backend} has no attention sinks: use --kv-sink 0")
        if self.protect not in POLICIES:
            raise MvquantError(f"--kv-protect '{self.protect}' is unknown: use one of {', '.join(POLICIES)}")
        if self.axis not in AXES:
            raise MvquantError(f"--kv-axis '{self.axis}' is unknown: use channel (KIVI keys), token, turboquant or rht")
        if self.axis == "turboquant" and self.bits not in TURBO_BITS:
            raise MvquantError(f"--kv-axis turboquant takes --kv-bits {', '.join(map(str, TURBO_BITS))} (vLLM's 8-bit "
                               f"preset stores FP8 keys, not this scheme), got {self.bits}")
        if self.boundary is not None and (not isinstance(self.boundary, int) or self.boundary < 0):
            raise MvquantError(f"the boundary layer count must be an integer >= 0, got {self.boundary!r}")
        for name, value, low in (("group-size", self.group_size, 1), ("residual", self.residual, 0),
                                 ("sink", self.sink, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise MvquantError(f"--kv-{name} must be an integer >= {low}, got {value!r}")
        return self

    def _by(self) -> str:
        return "" if self.backend == "mvquant" else f" by --kv-backend {self.backend}"

    def to_dict(self) -> dict:
        return asdict(self)


# Sliding-window layers (Gemma 2/3, Mistral) are cached like full ones: every token stays in the cache
# and the model's sliding-window mask hides what lies outside the window, so attention is exact and
# only the eviction (memory beyond the window) is not modelled. Chunked, linear or shared-KV layouts
# attend in ways this cache does not follow.
LAYER_TYPES = ("full_attention", "sliding_attention")


def check_layer_types(config) -> None:
    """Refuse layouts other than full and sliding-window attention (see LAYER_TYPES)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True)
    types, _ = get_layer_types_and_kwargs(text)
    other = sorted(set(types) - set(LAYER_TYPES))
    if other:
        raise MvquantError(f"--kv-bits: {text.model_type} has {', '.join(other)} layers; the quantized KV cache supports "
                           "full-attention and sliding-window layers only: evaluate this model without --kv-bits")


def protected_channels(model, report, config: KVConfig) -> list[list[list[int]]]:
    """Per layer, per KV head: the K head dims kept exact (whole RoPE pairs, calibration/selection.py)."""
    from ..calibration import load_report
    from ..models import get_layout
    from ..calibration.selection import select_dims

    layout = get_layout(model)
    if config.protect == "none":
        return [[[] for _ in range(layout.num_kv_heads)] for _ in range(layout.num_layers)]
    if not layout.has_rope:
        raise MvquantError(f"--kv-protect {config.protect}: {layout.model_type} has no RoPE, so its keys have no massive "
                           "RoPE channels to keep: use --kv-protect none")
    if report is None:
        raise MvquantError(f"--kv-protect {config.protect} needs a calibration report: pass --calibration REPORT.json "
                           "(made by mvquant calibrate) or use --kv-protect none")
    if not hasattr(report, "massive"):
        report = load_report(report)
    report.check_matches(layout)
    gen = torch.Generator().manual_seed(int(config.seed))
    return [select_dims(config.protect, None, report, layer, "k", layout, gen) for layer in range(layout.num_layers)]


def packed_bytes(n_codes: int, bits: int) -> int:
    """Bytes for n codes packed densely (3-bit codes packed 10 per 32-bit word, as KIVI/GPTQ do)."""
    if bits == 3:
        return 4 * -(-n_codes // 10)
    return -(-n_codes * bits // 8)


def bytes_per_token(config: KVConfig, num_kv_heads: int, head_dim: int, protected: list[list[list[int]]],
                    dtype_bytes: int = 2) -> dict:
    """Steady-state cache bytes per token over all layers (codes packed, fp16 scales/minima and fp16
    exact channels; the residual window and sinks are a constant, not per token) vs fp16."""
    h, d, g, bits = num_kv_heads, head_dim, config.group_size, config.bits
    exact = config.exact_layers(len(protected))
    total = 0.0
    for i, layer in enumerate(protected):
        p = sum(len(x) for x in layer)
        if i in exact:                 # kept unquantized
            total += 2 * dtype_bytes * h * d
            continue
        codes = h * -(-d * bits // 8)     # vLLM packs each head's codes densely (3-bit: 8 in 3 bytes)
        if config.axis == "turboquant":   # codes + fp16 norm; values: codes + fp16 scale and minimum
            total += codes + 2 * h + codes + 4 * h + dtype_bytes * p
            continue
        if config.axis == "rht":          # codes + one fp32 scale (zero point in its low bits) per head, K and V
            total += 2 * (codes + 4 * h) + dtype_bytes * p
            continue
        if config.axis == "channel":   # one scale + minimum per channel per g tokens
            k = packed_bytes(h * d - p, bits) + 2 * dtype_bytes * (h * d - p) / g
        else:                          # one scale + minimum per token per group of channels
            k = packed_bytes(h * d - p, bits) + 2 * dtype_bytes * h * -(-d // min(g, d))
        v = packed_bytes(h * d, bits) + 2 * dtype_bytes * h * -(-d // min(g, d))
        total += k + v + dtype_bytes * p
    fp16 = 2 * dtype_bytes * h * d * len(protected)
    n_prot = sum(len(x) for layer in protected for x in layer)
    return {"bytes_per_token": total, "fp16_bytes_per_token": fp16, "ratio": total / fp16,
            "protected_k_channels": n_prot,
            "protected_share": n_prot / max(1, h * d * len(protected))}


class KVCacheFactory:
    """Settings checked and protected channels chosen once; `()` gives a fresh cache."""

    def __init__(self, model, report=None, config: KVConfig | None = None):
        from ..models import get_layout

        self.config = (config or KVConfig()).check()
        check_layer_types(model.config)
        if self.config.backend != "mvquant":
            require_backend(self.config.backend)
        layout = get_layout(model)
        self.num_layers, self.num_kv_heads, self.head_dim = layout.num_layers, layout.num_kv_heads, layout.head_dim
        self.protected = protected_channels(model, report, self.config)

    def __call__(self) -> MassiveKVCache:
        c = self.config
        if c.backend != "mvquant":
            return hf_quantized_cache(c.backend, self.num_layers, bits=c.bits, group_size=c.group_size,
                                      residual=c.residual)
        return MassiveKVCache(self.num_layers, self.protected, bits=c.bits, axis_key=c.axis,
                              group_size=c.group_size, residual=c.residual, sink=c.sink,
                              exact_layers=c.exact_layers(self.num_layers), settings=c.to_dict())

    def summary(self) -> dict:
        return {**self.config.to_dict(), "k_quantized": "after RoPE",
                **bytes_per_token(self.config, self.num_kv_heads, self.head_dim, self.protected)}


def kv_cache(model, report=None, bits: int = 2, protect: str = "massive", *, group_size: int = 32,
             residual: int = 32, sink: int = 0, axis: str = "channel", seed: int = 0,
             backend: str = "mvquant", boundary: int | None = None) -> MassiveKVCache:
    """A fresh quantized KV cache for `model`: pass it as `past_key_values=` to generate / forward.

    `report`: a CalibrationReport or its path (needed for protect='massive' / 'random').
    `backend`: 'quanto' / 'hqq' give transformers' QuantizedCache instead (a baseline: protect='none',
    axis='token'; see hf.py)."""
    config = KVConfig(bits=bits, protect=protect, group_size=group_size, residual=residual, sink=sink, axis=axis,
                      seed=seed, backend=backend, boundary=boundary)
    return KVCacheFactory(model, report, config)()
