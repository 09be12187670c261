"""The quantization recipe as data. It serializes into config.json as `quantization_config`
(quant_method "mvquant"), so a checkpoint says exactly how it was made and how to rebuild it."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

from ..errors import MvquantError

from .registry import BITS, GRIDS, METHODS, MethodSpec, method_spec

POLICIES = ("massive", "none", "random")          # plus "topk:N"
PROTECT_PATTERN = r"massive|none|random|topk:[1-9][0-9]*"
COMPUTE = ("auto", "dequant")
STORE_DTYPES = ("auto", "float16", "bfloat16", "float32")
# Every nn.Linear inside the decoder layers; lm_head and embeddings stay as they are.
DEFAULT_TARGETS = (r"(^|\.)(layers|h)\.\d+\..*",)
DEFAULT_IGNORE = (r"(^|\.)lm_head$", r"(^|\.)embed_out$")
FORMAT = "mvquant.checkpoint/1"                    # the checkpoint format this config belongs to


def storage_dtype(name: str, model_dtype):
    """torch dtype for the tensors left unquantized; None keeps them as they are."""
    import torch

    if name == "auto":
        return None if model_dtype in (torch.float16, torch.bfloat16) else torch.float16
    return getattr(torch, name)


@dataclass
class QuantConfig:
    """How to quantize. `group_size` None or -1: one group per output row; a size that does not
    divide in_features leaves a shorter last group. `protect`: 'massive' | 'none' | 'random' |
    'topk:N' (N RoPE pairs per head with the largest norms). `compute`: 'auto' runs the torch
    integer kernels where they apply (bf16 activations for weight-only int4/int8), 'dequant'
    dequantizes and multiplies in the activation dtype."""
    method: str = "rtn"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    grid: str = "int"                  # "q4_k": codes and scales on llama.cpp's Q4_K grid (sets 4-bit, groups of 32)
    protect: str = "none"
    seed: int = 0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))
    alpha: float = 0.5                 # SmoothQuant migration strength
    act_bits: int | None = None        # SmoothQuant quantizes activations per token (8); None elsewhere
    awq_grid: int = 20                 # AWQ: scale exponents tried in [0, 1)
    awq_clip_grid: int = 10            # AWQ: clipping ratios tried in (0.5, 1]
    gptq_damp: float = 0.01            # GPTQ: dampening, fraction of mean(diag H)
    gptq_act_order: bool = True        # GPTQ: columns by decreasing H diagonal, static groups (llm-compressor's default; beat it on the built-in model)
    gptq_block: int = 128
    calib_samples: int = 32
    calib_seq_len: int = 256
    calib_data: str = "python-docs"
    compute: str = "auto"
    store_dtype: str = "auto"          # tensors left unquantized (embeddings, norms, lm_head): auto = the
                                       # model's dtype when 16-bit, else float16; float32 keeps fp32

    def __post_init__(self):
        self.validate()

    # -- checks ---------------------------------------------------------------------------------
    def validate(self) -> "QuantConfig":
        spec = method_spec(self.method)
        if self.bits not in spec.bits or isinstance(self.bits, bool):
            only = spec.bits != BITS
            raise MvquantError(f"unsupported bits {self.bits!r} for {self.method}"
                               + (f" ({spec.summary}: {'/'.join(map(str, spec.bits))}-bit only)" if only else "")
                               + f": use {' or '.join(f'--bits {b}' for b in spec.bits)}")
        if self.group_size is not None and self.group_size != -1:
            if not isinstance(self.group_size, int) or self.group_size <= 0:
                raise MvquantError(f"group size must be a positive integer (or -1 for one group per row), "
                                   f"got {self.group_size!r}: use e.g. --group-size 128")
        if self.group_size == -1:
            self.group_size = None
        if self.grid not in GRIDS:
            raise MvquantError(f"unknown grid '{self.grid}': use one of {', '.join(GRIDS)}")
        if self.grid not in spec.grids:
            raise MvquantError(f"--grid {self.grid} works with "
                               f"{', '.join(m.name for m in METHODS.values() if self.grid in m.grids)}, not "
                               f"{self.method}: use --grid int")
        if self.grid == "q4_k":
            if self.bits != 4:
                raise MvquantError(f"--grid q4_k is 4-bit (llama.cpp's Q4_K), got --bits {self.bits}: use --bits 4")
            self.group_size, self.symmetric = 32, False   # Q4_K's sub-blocks, each with its own min
        self.protect_policy()  # raises on a bad policy
        if self.method == "smoothquant":
            if self.act_bits is None:
                self.act_bits = 8
            # W8A8 as in the paper: int8 symmetric weights, one scale per output row
            self.symmetric, self.group_size = True, None
            if not 0.0 <= self.alpha <= 1.0:
                raise MvquantError(f"smoothquant alpha must be in [0, 1], got {self.alpha}: use e.g. --alpha 0.5")
        if self.act_bits not in (None, 8):
            raise MvquantError(f"act_bits must be 8 or None, got {self.act_bits}")
        if self.compute not in COMPUTE:
            raise MvquantError(f"unknown compute '{self.compute}': use one of {', '.join(COMPUTE)}")
        if self.store_dtype not in STORE_DTYPES:
            raise MvquantError(f"unknown store dtype '{self.store_dtype}': use one of {', '.join(STORE_DTYPES)}")
        for pat in [*self.targets, *self.ignore]:
            try:
                re.compile(pat)
            except re.error as e:
                raise MvquantError(f"bad target/ignore pattern '{pat}' ({e}): give a Python regular expression") from None
        if self.calib_samples <= 0 or self.calib_seq_len <= 0:
            raise MvquantError("calibration samples and sequence length must be positive")
        return self

    def protect_policy(self) -> tuple[str, int | None]:
        """('massive'|'none'|'random'|'topk', N or None)."""
        p = str(self.protect)
        if p in POLICIES:
            return p, None
        if re.fullmatch(PROTECT_PATTERN, p):
            return "topk", int(p.split(":")[1])
        raise MvquantError(f"unknown protection policy '{p}': use massive, none, random or topk:N (N >= 1)")

    @property
    def needs_report(self) -> bool:
        return self.protect_policy()[0] in ("massive", "random", "topk")

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    def is_target(self, name: str) -> bool:
        if any(re.search(p, name) for p in self.ignore):
            return False
        return any(re.search(p, name) for p in self.targets)

    # -- serialization --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"quant_method": "mvquant", "format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
