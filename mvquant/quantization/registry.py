"""The quantization methods as data (torchao's one declaration per method): what each takes, what it
needs, and where it is implemented. QuantConfig validation, the quantize verb and compare recipes read
this table; the algorithms live in quantization/methods/, one module per method, which this table
names rather than imports (the declarations stay below the algorithms)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import MvquantError

BITS = (2, 3, 4, 8)
GRIDS = ("int", "q4_k")               # grid.py; q4_k: llama.cpp's Q4_K (4-bit, sub-blocks of 32)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str                      # one line for --help and errors
    bits: tuple[int, ...]             # weight widths it takes
    default_bits: int
    grouped: bool                     # takes a group size (else one scale per row, or a layout of its own)
    protectable: bool                 # can keep protected rows in fp16
    grids: tuple[str, ...]            # grids (grid.py) it rounds on
    needs: frozenset[str]             # what it collects per decoder layer from calibration data; empty: none
    revision: int | None              # bumped whenever its output changes: caches of results key on it
    layer_by_layer: bool = True       # runs in the sequential pipeline; else swaps the linears itself (bnb)
    saved: bool = True                # writes a checkpoint (the bitsandbytes baselines live in memory only)

    @property
    def module(self) -> str:
        """The module in quantization/methods/ that implements it."""
        return "mvquant.quantization.methods." + self.name.split("-")[0]

    @property
    def needs_calibration(self) -> bool:
        return bool(self.needs)


# Revision 2: layer-by-layer GPTQ with act-order, AWQ with the block loss and folded scales, fp16/bf16 storage.
METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("rtn", "round to nearest", BITS, 4, grouped=True, protectable=True, grids=GRIDS,
               needs=frozenset(), revision=2),
    MethodSpec("awq", "activation-aware scaling (block loss, folded scales) and clipping", BITS, 4, grouped=True,
               protectable=True, grids=GRIDS, needs=frozenset({"block_inputs", "absmean"}), revision=2),
    MethodSpec("gptq", "second-order error compensation, act-order", BITS, 4, grouped=True, protectable=True,
               grids=GRIDS, needs=frozenset({"hessian"}), revision=2),
    MethodSpec("smoothquant", "W8A8 with activation smoothing", (8,), 8, grouped=False, protectable=True,
               grids=("int",), needs=frozenset({"absmax"}), revision=2),
    MethodSpec("bnb-nf4", "bitsandbytes NF4, an in-memory baseline", (4,), 4, grouped=False, protectable=False,
               grids=("int",), needs=frozenset(), revision=None, layer_by_layer=False, saved=False),
    MethodSpec("bnb-int8", "bitsandbytes LLM.int8, an in-memory baseline", (8,), 8, grouped=False,
               protectable=False, grids=("int",), needs=frozenset(), revision=None, layer_by_layer=False, saved=False),
)}


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise MvquantError(f"unknown method '{name}': use one of {', '.join(METHODS)}") from None
