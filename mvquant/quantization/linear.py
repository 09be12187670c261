"""QuantLinear: packed integer rows plus protected fp16 rows, one nn.Module per quantized linear.

Stored (persistent buffers, what the checkpoint holds):
  qweight           uint8 [n_quantized, packed]   codes packed along in_features (packing.py)
  scales            fp16  [n_quantized, groups]
  zeros             uint8 [n_quantized, packed(groups)]   asymmetric only, packed like the codes
  grid q4_k (llama.cpp's Q4_K, q4k.py) stores instead of scales/zeros:
  superblock        fp16  [n_quantized, in / 256, 2]      (d, dmin) per super-block
  sub_scales        uint8 [n_quantized, in / 32, 2]       6-bit (sc, m) per 32: w = d*sc*q - dmin*m
  protected_rows    int32 [n_protected]           output rows kept in fp16 (sorted)
  protected_weight  fp16  [n_protected, in]
  input_scale       fp16  [in]                    AWQ / SmoothQuant: x / input_scale enters the packed rows
  bias              (parameter, model dtype)
Protected rows see the original activation and their fp16 weights: their outputs are the
unquantized linear's outputs up to the single fp16 rounding of the weights.

Runtime (non-persistent, rebuilt by `prepare()` from the stored tensors, so an in-memory model
and a loaded checkpoint compute identically):
  'int4pack'  torch.ops.aten._weight_int4pack_mm_for_cpu (bf16 activations), group sizes % 32 == 0
  'int8pack'  torch.ops.aten._weight_int8pack_mm (bf16 activations), 8-bit, one scale per row
  'int_mm'    SmoothQuant W8A8: per-token int8 activations x int8 weights via torch._int_mm
  'dequant'   unpack + dequantize in the activation dtype, then F.linear (always available)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import core, q4k
from .packing import pack_bits, packed_width, unpack_bits

INT4_KERNEL_GROUPS = (256, 128, 64, 32)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class QuantLinear(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int | None,
                 symmetric: bool, n_protected: int = 0, bias: bool = False, input_scale: bool = False,
                 act_bits: int | None = None, compute: str = "auto", grid: str = "int", dtype=torch.float32,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if grid == "q4_k":  # the grid fixes the layout: 4-bit codes, sub-blocks of 32, a min per sub-block
            bits, group_size, symmetric = 4, q4k.SUB, False
        self.bits, self.group_size, self.symmetric, self.grid = bits, group_size or None, symmetric, grid
        self.act_bits, self.compute = act_bits, compute
        n_q = out_features - n_protected
        groups = core.num_groups(in_features, self.group_size)
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(n_q, packed_width(in_features, bits), dtype=torch.uint8, **kw))
        k_grid = grid == "q4_k"
        self.register_buffer("scales", None if k_grid else torch.ones(n_q, groups, dtype=torch.float16, **kw))
        self.register_buffer("zeros", None if symmetric or k_grid else
                             torch.zeros(n_q, packed_width(groups, bits), dtype=torch.uint8, **kw))
        self.register_buffer("superblock", torch.zeros(n_q, in_features // q4k.QK_K, 2, dtype=torch.float16, **kw)
                             if k_grid else None)
        self.register_buffer("sub_scales", torch.zeros(n_q, groups, 2, dtype=torch.uint8, **kw) if k_grid else None)
        self.register_buffer("protected_rows", torch.zeros(n_protected, dtype=torch.int32, **kw))
        self.register_buffer("protected_weight", torch.zeros(n_protected, in_features, dtype=torch.float16, **kw))
        self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.float16, **kw) if input_scale else None)
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw), requires_grad=False) if bias else None
        self.kernel = "dequant"
        self._cache: dict[str, torch.Tensor] = {}
        self._qrows: torch.Tensor | None = None
        self._stale = True  # runtime state not built from the stored tensors yet (prepare() on first use)

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, bits: int, group_size: int | None,
                    symmetric: bool, protected_rows: torch.Tensor | None = None,
                    input_scale: torch.Tensor | None = None,
                    quantized: core.IntQuantized | q4k.Q4KQuantized | None = None,
                    act_bits: int | None = None, compute: str = "auto", grid: str = "int") -> "QuantLinear":
        """Quantize `weight` [out, in]: round to nearest, unless `quantized` holds the non-protected rows
        of weight * input_scale as a method found them (AWQ, GPTQ)."""
        out_f, in_f = weight.shape
        device = weight.device  # built where the weight lives (CPU or GPU)
        rows = torch.as_tensor([] if protected_rows is None else protected_rows, dtype=torch.long)
        rows = rows.to(device).unique(sorted=True)
        keep = torch.ones(out_f, dtype=torch.bool, device=device)
        keep[rows] = False
        m = cls(in_f, out_f, bits=bits, group_size=group_size, symmetric=symmetric, n_protected=len(rows),
                bias=bias is not None, input_scale=input_scale is not None, act_bits=act_bits, compute=compute,
                grid=grid, dtype=weight.dtype, device=device)
        w = weight.detach().float()
        if quantized is None:
            wq = w[keep] * input_scale.half().float() if input_scale is not None else w[keep]
            quantized = q4k.quantize(wq) if grid == "q4_k" else core.quantize_weight(wq, bits, m.group_size, symmetric)
        codes, scales, zeros = quantized
        m.qweight.copy_(pack_bits(codes, m.bits))
        if grid == "q4_k":
            m.superblock.copy_(scales)
            m.sub_scales.copy_(zeros)
        else:
            m.scales.copy_(scales)
            if zeros is not None:
                m.zeros.copy_(pack_bits(zeros, bits))
        m.protected_rows.copy_(rows.to(torch.int32))
        m.protected_weight.copy_(w[rows].half())
        if input_scale is not None:
            m.input_scale.copy_(input_scale.half())
        if bias is not None:
            m.bias.data.copy_(bias.detach())
        return m.prepare()

    # -- stored -> runtime ----------------------------------------------------------------------
    @property
    def n_protected(self) -> int:
        return int(self.protected_rows.numel())

    def codes(self) -> torch.Tensor:
        return unpack_bits(self.qweight, self.bits, self.in_features)

    def zero_points(self) -> torch.Tensor | None:
        return None if self.zeros is None else unpack_bits(self.zeros, self.bits, self.scales.shape[1])

    def quantized(self) -> core.IntQuantized | q4k.Q4KQuantized:
        """The packed rows unpacked: what from_weight's `quantized` takes."""
        if self.grid == "q4_k":
            return q4k.Q4KQuantized(self.codes(), self.superblock, self.sub_scales)
        return core.IntQuantized(self.codes(), self.scales, self.zero_points())

    def dequantized_rows(self, dtype=torch.float32) -> torch.Tensor:
        """The packed rows as floats [n_quantized, in] (in the input_scale-multiplied basis)."""
        if self.grid == "q4_k":
            return q4k.dequantize(self.codes(), self.superblock, self.sub_scales, dtype)
        return core.dequantize_codes(self.codes(), self.scales, self.zero_points(), self.bits, self.group_size, dtype)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The full effective weight [out, in] in the original basis (for tests and error reports)."""
        w = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.qweight.device)
        rows = self.dequantized_rows(dtype)
        if self.input_scale is not None:
            rows = rows / self.input_scale.float().to(dtype)
        w[self.quantized_rows] = rows
        w[self.protected_rows.long()] = self.protected_weight.to(dtype)
        return w

    def _choose_kernel(self) -> str:
        if self.compute == "dequant":
            return "dequant"
        if self.act_bits == 8 and self.bits == 8 and self.symmetric and self.group_size is None:
            return "int_mm"
        if self.act_bits is not None:
            return "dequant"
        if self.bits == 4 and (self.group_size is None or self.group_size % 32 == 0):
            return "int4pack"
        if self.bits == 8 and self.group_size is None:
            return "int8pack"
        return "dequant"

    def prepare(self) -> "QuantLinear":
        """Build the runtime index and the kernel's own weight layout from the stored tensors."""
        device = self.qweight.device
        self._qrows = None
        if device.type == "meta":  # no data: drop the runtime state, rebuilt when real tensors arrive
            self.kernel, self._cache, self._stale = "dequant", {}, True
            return self
        self._stale = False
        self.kernel = self._choose_kernel() if device.type == "cpu" else "dequant"
        self._cache = {}
        n_q, K = self.qweight.shape[0], self.in_features
        if n_q == 0:
            self.kernel = "none"
        elif self.kernel == "int4pack":
            g = self.group_size or _round_up(K, 32)
            kg = next(k for k in INT4_KERNEL_GROUPS if g % k == 0)
            k_pad, n_pad = _round_up(K, kg), _round_up(n_q, 16)
            codes = torch.full((n_pad, k_pad), 8, dtype=torch.int32, device=device)
            codes[:n_q, :K] = self.codes().to(torch.int32)
            # ours: (q - z) * s; the kernel's: (q - 8) * s + zero  =>  zero = (8 - z) * s
            # (q4_k: s * q - offset  =>  zero = 8 s - offset)
            if self.grid == "q4_k":
                s, offset = q4k.scale_offset(self.superblock, self.sub_scales)
                zf = 8.0 * s - offset
            else:
                s = self.scales.float()
                z = torch.full_like(s, 8.0) if self.zero_points() is None else self.zero_points().float()
                zf = (8.0 - z) * s
            s_cols = core.expand_groups(s, k_pad, self.group_size or k_pad)[:, ::kg]
            zf_cols = core.expand_groups(zf, k_pad, self.group_size or k_pad)[:, ::kg]
            sz = torch.zeros(k_pad // kg, n_pad, 2, device=device)
            sz[:, :n_q, 0], sz[:, :n_q, 1] = s_cols.t(), zf_cols.t()
            self._cache = {"w": torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1),
                           "sz": sz.to(torch.bfloat16).contiguous()}
            self._kg, self._k_pad = kg, k_pad
        elif self.kernel in ("int8pack", "int_mm"):
            # _weight_int8pack_mm returns garbage or segfaults unless K % 16 == 0 (seen on AVX2
            # Xeons with torch 2.13); 32 leaves margin for wider vector paths. _int_mm needs K % 8.
            k_pad = _round_up(K, 32)
            q = self.codes().to(torch.int16) - 128
            w8 = torch.zeros(n_q, k_pad, dtype=torch.int8, device=device)
            w8[:, :K] = q.to(torch.int8)
            s = self.scales[:, 0].float()
            zp = self.zero_points()
            # asymmetric per-row: (q - z) s = (q - 128) s - (z - 128) s; the second term multiplies sum(x)
            offset = None if zp is None else (zp[:, 0].float() - 128.0) * s
            self._k_pad = k_pad
            if self.kernel == "int8pack":
                self._cache = {"w": w8, "s": s.to(torch.bfloat16)}
            else:
                self._cache = {"wt": w8.t().contiguous(), "s": s}
            if offset is not None:
                self._cache["offset"] = offset
        return self

    @property
    def quantized_rows(self) -> torch.Tensor:
        """Output rows held packed (all but the protected ones), on the module's device."""
        rows = self._qrows
        if rows is None or rows.device != self.protected_rows.device:
            keep = torch.ones(self.out_features, dtype=torch.bool, device=self.protected_rows.device)
            keep[self.protected_rows.long()] = False
            rows = keep.nonzero().squeeze(1) if not keep.is_meta else \
                torch.empty(self.qweight.shape[0], dtype=torch.long, device="meta")
            self._qrows = rows
        return rows

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() / .to("meta") / to_empty / device_map moves: the runtime state (kernel
        # choice, packed cache, row index) derives from the stored tensors, which may not hold their
        # values yet (to_empty, then load_state_dict): drop it here, rebuild it where they are on first use.
        super()._apply(fn, recurse)
        if hasattr(self, "_cache"):
            self.kernel, self._cache, self._qrows, self._stale = "dequant", {}, None, True
        return self

    # -- forward --------------------------------------------------------------------------------
    def _packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] (already divided by input_scale) -> [T, n_quantized]."""
        k = self.kernel
        if k == "int4pack":
            xb = F.pad(x, (0, self._k_pad - self.in_features)).to(torch.bfloat16)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self._cache["w"], self._kg, self._cache["sz"])
            return y[:, :self.qweight.shape[0]].to(x.dtype)
        if k == "int8pack":
            xb = F.pad(x, (0, self._k_pad - self.in_features)).to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(xb, self._cache["w"], self._cache["s"]).to(x.dtype)
            if "offset" in self._cache:
                y = y - x.sum(-1, keepdim=True) * self._cache["offset"].to(x.dtype)
            return y
        if k == "int_mm":
            xq, xs = core.quantize_activations_per_token(x, self.act_bits)
            y = torch._int_mm(F.pad(xq, (0, self._k_pad - self.in_features)), self._cache["wt"])
            y = y.float() * xs * self._cache["s"]
            if "offset" in self._cache:
                y = y - (xq.float() * xs).sum(-1, keepdim=True) * self._cache["offset"]
            return y.to(x.dtype)
        if self.act_bits is not None:  # activation quantization without the integer kernel
            xq, xs = core.quantize_activations_per_token(x, self.act_bits)
            x = (xq.float() * xs).to(x.dtype)
        return F.linear(x, self.dequantized_rows(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._stale:
            self.prepare()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        xin = x2 / self.input_scale.float().to(x.dtype) if self.input_scale is not None else x2
        if self.n_protected == 0:
            out = self._packed_matmul(xin)
        else:
            out = x2.new_empty(x2.shape[0], self.out_features)
            if self.kernel != "none":
                out.index_copy_(1, self.quantized_rows, self._packed_matmul(xin))
            out.index_copy_(1, self.protected_rows.long(), F.linear(x2, self.protected_weight.to(x.dtype)))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*lead, self.out_features)

    # -- accounting -----------------------------------------------------------------------------
    def storage_bytes(self) -> dict[str, int]:
        """Bytes of what the checkpoint stores for this layer's weight (bias excluded)."""
        parts = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros,
                 "superblock": self.superblock, "sub_scales": self.sub_scales,
                 "protected_rows": self.protected_rows, "protected_weight": self.protected_weight,
                 "input_scale": self.input_scale}
        return {k: t.numel() * t.element_size() for k, t in parts.items() if t is not None}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, "
                f"symmetric={self.symmetric}, grid={self.grid}, protected={self.n_protected}, act_bits={self.act_bits}, kernel={self.kernel}")

    def spec(self) -> dict:
        """What is needed to rebuild the empty module before loading its tensors."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric, "n_protected": self.n_protected,
                "bias": self.bias is not None, "input_scale": self.input_scale is not None, "act_bits": self.act_bits,
                "grid": self.grid}


# What a QuantLinear stores, as stored: the checkpoint keeps these as they are (everything else in the
# store dtype), and loading casts back whatever the loader converted.
STORED_DTYPES = {"qweight": torch.uint8, "zeros": torch.uint8, "scales": torch.float16,
                 "superblock": torch.float16, "sub_scales": torch.uint8,
                 "protected_rows": torch.int32, "protected_weight": torch.float16, "input_scale": torch.float16}


def storage_cast(key: str, t: torch.Tensor, quantized: set[str], dtype: torch.dtype | None) -> torch.Tensor:
    """The tensor as stored: QuantLinear's packed buffers as they are, other floating tensors
    (embeddings, norms, biases, an untied lm_head) in `dtype` (None: unchanged)."""
    module, _, attr = key.rpartition(".")
    if dtype is None or not t.is_floating_point() or (module in quantized and attr in STORED_DTYPES):
        return t
    return t.to(dtype)


def quantized_modules(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


# -- the linears a method replaces ----------------------------------------------------------------
def is_linear(module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # GPT-2: weight stored [in, out]


def linear_weight(module) -> torch.Tensor:
    """Weight as [out, in] for nn.Linear and GPT-2 Conv1D alike (a view)."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def set_module(model, name: str, module: torch.nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)
