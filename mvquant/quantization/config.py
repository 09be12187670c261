"""The quantization recipe as data. It serializes into config.json as `quantization_config`
(quant_method "mvquant"), so a checkpoint says exactly how it was made and how to rebuild it."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

from ..errors import MvquantError

BITS = (2, 3, 4, 8)
# The rules every front end checks against (QuantConfig.validate, compare recipes): one place.
METHOD_BITS = {"rtn": BITS, "awq": BITS, "gptq": BITS, "smoothquant": (8,), "bnb-nf4": (4,), "bnb-int8": (8,)}
METHODS = tuple(METHOD_BITS)
GROUPED_METHODS = ("rtn", "awq", "gptq")          # take a group size; bnb has its own layout, SmoothQuant per row
PROTECTABLE_METHODS = ("rtn", "awq", "gptq", "smoothquant")
POLICIES = ("massive", "none", "random")          # plus "topk:N"
PROTECT_PATTERN = r"massive|none|random|topk:[1-9][0-9]*"
COMPUTE = ("auto", "dequant")
GRIDS = ("int", "q4_k")                            # grid.py; q4_k: llama.cpp's Q4_K (4-bit, groups of 32)
GRID_METHODS = ("rtn", "awq", "gptq")
STORE_DTYPES = ("auto", "float16", "bfloat16", "float32")
# Every nn.Linear inside the decoder layers; lm_head and embeddings stay as they are.
DEFAULT_TARGETS = (r"(^|\.)(layers|h)\.\d+\..*",)
DEFAULT_IGNORE = (r"(^|\.)lm_head$", r"(^|\.)embed_out$")
FORMAT = "mvquant.checkpoint/1"
# Bumped whenever a method's output changes (2: layer-by-layer GPTQ with act-order, AWQ with the block
# loss and folded scales, fp16/bf16 storage). Caches of results (compare) key on it, so a cell computed
# by an older implementation is recomputed instead of reused.
METHOD_REVISION = {"rtn": 2, "awq": 2, "smoothquant": 2, "gptq": 2}


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
        if self.method not in METHODS:
            raise MvquantError(f"unknown method '{self.method}': use one of {', '.join(METHODS)}")
        if self.bits not in BITS or isinstance(self.bits, bool):
            raise MvquantError(f"unsupported bits {self.bits!r}: use one of {', '.join(map(str, BITS))}")
        if self.group_size is not None and self.group_size != -1:
            if not isinstance(self.group_size, int) or self.group_size <= 0:
                raise MvquantError(f"group size must be a positive integer (or -1 for one group per row), "
                                   f"got {self.group_size!r}: use e.g. --group-size 128")
        if self.group_size == -1:
            self.group_size = None
        if self.grid not in GRIDS:
            raise MvquantError(f"unknown grid '{self.grid}': use one of {', '.join(GRIDS)}")
        if self.grid == "q4_k":
            if self.method not in GRID_METHODS:
                raise MvquantError(f"--grid q4_k works with {', '.join(GRID_METHODS)}, not {self.method}: "
                                   "use --grid int")
            if self.bits != 4:
                raise MvquantError(f"--grid q4_k is 4-bit (llama.cpp's Q4_K), got --bits {self.bits}: use --bits 4")
            self.group_size, self.symmetric = 32, False   # Q4_K's sub-blocks, each with its own min
        self.protect_policy()  # raises on a bad policy
        if self.method == "smoothquant":
            if self.bits != 8:
                raise MvquantError(f"smoothquant is W8A8: --bits must be 8, got {self.bits}: use --bits 8")
            if self.act_bits is None:
                self.act_bits = 8
            # W8A8 as in the paper: int8 symmetric weights, one scale per output row
            self.symmetric, self.group_size = True, None
            if not 0.0 <= self.alpha <= 1.0:
                raise MvquantError(f"smoothquant alpha must be in [0, 1], got {self.alpha}: use e.g. --alpha 0.5")
        if self.act_bits not in (None, 8):
            raise MvquantError(f"act_bits must be 8 or None, got {self.act_bits}")
        if self.method == "bnb-nf4" and self.bits != 4:
            raise MvquantError(f"bnb-nf4 is 4-bit: use --bits 4 (got {self.bits})")
        if self.method == "bnb-int8" and self.bits != 8:
            raise MvquantError(f"bnb-int8 is 8-bit: use --bits 8 (got {self.bits})")
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
    def is_bnb(self) -> bool:
        return self.method.startswith("bnb-")

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
