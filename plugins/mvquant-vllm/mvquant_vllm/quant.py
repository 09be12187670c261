"""vLLM quantization method `mvquant-rows`: compressed-tensors W4A16/W8A16 plus exact protected rows.

The config is vLLM's own CompressedTensorsConfig (same config_groups, ignore, format) and every linear
gets vLLM's own CompressedTensorsLinearMethod, so the W4A16 kernel is whatever vLLM picks for the
platform (cpu_gemm_wna16 on AVX-512 CPUs, this plugin's torch int4 kernel on AVX2, Marlin/Machete on a
GPU). A linear whose checkpoint modules have protected rows gets RowsLinearMethod, which wraps that
method and overwrites the protected outputs (rows.py). Tensor parallelism: refused (a sharded layer
would need S split by rank); vLLM's --tensor-parallel-size 1 only."""
from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
    CompressedTensorsConfig,
    CompressedTensorsLinearMethod,
)
from vllm.model_executor.utils import set_weight_attrs

from .rows import RowSlots, apply_rows, checkpoint_modules

NAME = "mvquant-rows"          # mvquant.export.compressed.ROWS_METHOD
KEY = "mvquant_rows"           # mvquant.export.compressed.ROWS_KEY
VERSION = 1


@register_quantization_config(NAME)
class MvquantRowsConfig(CompressedTensorsConfig):
    rows_modules: dict[str, int] = {}

    def get_name(self):
        return NAME

    @classmethod
    def from_config(cls, config: dict) -> "MvquantRowsConfig":
        spec = config.get(KEY) or {}
        if spec.get("version") != VERSION or spec.get("correction") != "overwrite" or not isinstance(
                spec.get("modules"), dict):
            raise ValueError(f"{NAME}: quantization_config.{KEY} must be {{'version': {VERSION}, 'correction': "
                             f"'overwrite', 'modules': {{...}}}} (written by mvquant export --protect-as rows); "
                             f"got {str(spec)[:200]}: upgrade plugins/mvquant-vllm or re-export")
        cfg = super().from_config({k: v for k, v in config.items() if k != KEY})
        cfg.rows_modules = {str(k): int(v) for k, v in spec["modules"].items()}
        return cfg

    def apply_vllm_mapper(self, hf_to_vllm_mapper):
        super().apply_vllm_mapper(hf_to_vllm_mapper)
        self.rows_modules = {hf_to_vllm_mapper._map_name(k) or k: v for k, v in self.rows_modules.items()}

    def get_quant_method(self, layer, prefix: str):
        method = super().get_quant_method(layer, prefix)
        names = checkpoint_modules(prefix, self.packed_modules_mapping)
        rows = [self.rows_modules.get(n, 0) for n in names]
        if not any(rows):
            return method
        if not isinstance(method, CompressedTensorsLinearMethod):
            raise ValueError(f"{NAME}: {prefix} has protected rows but is not a compressed-tensors quantized linear "
                             f"({type(method).__name__}): the checkpoint's config does not match its modules")
        return RowsLinearMethod(method, names, rows)


class RowsLinearMethod(LinearMethodBase):
    """vLLM's compressed-tensors linear method, then y[..., S] = x @ rows_weight^T (+ bias[S]); the rows are
    held in fp32 (the stored fp16 values, exactly, whatever dtype vLLM serves in)."""

    def __init__(self, base: CompressedTensorsLinearMethod, names: list[str], rows: list[int]):
        self.base, self.names, self.rows = base, names, rows

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        if input_size_per_partition != input_size or sum(output_partition_sizes) != output_size:
            raise ValueError(f"{NAME}: {self.names} is sharded by tensor parallelism, which this plugin does not "
                             "support: serve with --tensor-parallel-size 1, or export with --protect-as lora / fp16")
        self.base.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                                 params_dtype, **extra_weight_attrs)
        slots = RowSlots(self.names, self.rows, list(output_partition_sizes), input_size)
        layer.mvquant_rows = slots
        for kind, t in (("index", torch.zeros(slots.total, dtype=torch.int32)),
                        ("weight", torch.zeros(slots.total, input_size, dtype=torch.float32))):   # fp16 rows, exactly
            p = torch.nn.Parameter(t, requires_grad=False)
            set_weight_attrs(p, {"weight_loader": lambda param, w, shard_id=None, kind=kind:
                                 slots.load(kind, param.data, w, shard_id)})
            layer.register_parameter(f"rows_{kind}", p)

    def process_weights_after_loading(self, layer) -> None:
        layer.mvquant_rows.check_complete()
        layer.rows_index = torch.nn.Parameter(layer.rows_index.data.long(), requires_grad=False)  # index_copy_
        self.base.process_weights_after_loading(layer)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_rows(self.base.apply(layer, x, bias), x, layer.rows_index, layer.rows_weight, bias)


def effective_weights(model, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """For checks (benchmarks/rows_equivalence.py, via LLM.apply_model; importable, so vLLM can send it to
    its workers): the effective weight of every checkpoint module a mvquant-rows layer serves, read by
    running the layer's own quant method (W4A16 kernel + row overwrite) on the identity in `dtype` (the
    activation dtype vLLM serves in)."""
    res = {}
    for layer in model.modules():
        slots = getattr(layer, "mvquant_rows", None)
        if slots is None:
            continue
        eye = torch.eye(slots.in_features, dtype=dtype)
        with torch.no_grad():
            w = layer.quant_method.apply(layer, eye).t().contiguous()
        for s in slots.shards:
            res[s.name] = w[s.out_offset: s.out_offset + s.out_size].clone()
    return res
