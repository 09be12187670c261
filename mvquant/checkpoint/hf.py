"""transformers integration: `AutoModelForCausalLM.from_pretrained(DIR)` on an mvquant checkpoint,
once `import mvquant` has run (it registers quant_method "mvquant").

Why loading fails loudly without mvquant: the weights live in `model.mvquant.safetensors`, and
there is no `model.safetensors`. transformers without this registration skips the unknown
quantization_config (with a warning) and then finds no weight file it knows: it raises OSError
("does not appear to have a file named model.safetensors ...") instead of building a model with
random weights. With mvquant imported, the quantizer below points transformers at the file
(`config.transformers_weights`), checks its size and checksum, swaps in empty QuantLinear modules
before the weights load and builds their kernel layouts after.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers.quantizers import auto as hf_auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..models.adapters import get_layout
from ..quantization.config import QuantConfig
from ..quantization.grid import linear_format
from ..quantization.linear import STORED_DTYPES, QuantLinear, linear_weight, quantized_modules, set_module
from ..quantization.summary import summarize
from .format import WEIGHTS_NAME, verify_checkpoint


class MvquantHfConfig(QuantizationConfigMixin):
    """The `quantization_config` dict of config.json as transformers sees it (all keys kept)."""

    def __init__(self, **kwargs):
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.quant_method = "mvquant"

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class MvquantHfQuantizer(HfQuantizer):
    requires_calibration = True  # only pre-quantized checkpoints; quantize with mvquant.quantize

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._checkpoint_dir = None

    def validate_environment(self, *args, **kwargs):
        return

    def update_attn_implementation(self, config):
        # Runs before transformers resolves the weight files: name ours.
        # sharded checkpoints name their index; older ones have the single file
        config.transformers_weights = getattr(self.quantization_config, "weights", None) or WEIGHTS_NAME
        return config

    def update_dtype(self, dtype):
        # Compute in the dtype the model was quantized in, so logits match the in-memory model bit for bit.
        saved = getattr(self.quantization_config, "dtype", None)
        return getattr(torch, saved) if isinstance(saved, str) and hasattr(torch, saved) else dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if checkpoint_files:
            self._checkpoint_dir = Path(checkpoint_files[0]).parent
            verify_checkpoint(self._checkpoint_dir)
        build_empty_modules(model, self.quantization_config.to_dict())
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        finish_loading(model, self.quantization_config.to_dict())
        return model

    def is_serializable(self):
        return False  # save with mvquant.save_quantized

    @property
    def is_trainable(self):
        return False


def build_empty_modules(model, qc: dict) -> None:
    """Replace each quantized linear by an empty QuantLinear of the same shape (any device, meta included)."""
    config = QuantConfig.from_dict(qc)
    scaled = qc.get("input_scale_modules")
    scaled = set(scaled) if scaled is not None else None  # older checkpoints: by method
    for name, n_protected in (qc.get("modules") or {}).items():
        input_scale = name in scaled if scaled is not None else qc.get("method") in ("awq", "smoothquant")
        old = model.get_submodule(name)
        if isinstance(old, QuantLinear):
            continue
        w = linear_weight(old)
        device = w.device
        f = linear_format(config, w.shape[1])
        new = QuantLinear(w.shape[1], w.shape[0], bits=f.bits, group_size=f.group_size,
                          symmetric=f.symmetric, n_protected=int(n_protected),
                          bias=getattr(old, "bias", None) is not None, input_scale=input_scale,
                          act_bits=qc.get("act_bits"), compute=qc.get("compute", "auto"),
                          grid=f.grid, dtype=w.dtype, device=device)
        set_module(model, name, new)
        # transformers runs `_init_weights` on modules it does not consider loaded; some (GPT-2's
        # attention / MLP) reach into `child.weight`, which a QuantLinear does not have. Its tensors
        # all come from the checkpoint, so mark it and its parent as initialized.
        new._is_hf_initialized = True
        parent = name.rpartition(".")[0]
        if parent:
            model.get_submodule(parent)._is_hf_initialized = True


def finish_loading(model, qc: dict) -> None:
    """Undo any dtype cast the loader applied to stored tensors (fp16 -> fp32 is exact, so casting back
    restores the stored values) and build each module's kernel layout."""
    for module in quantized_modules(model).values():
        for key, dtype in STORED_DTYPES.items():
            t = getattr(module, key)
            if t is not None and t.dtype != dtype:
                setattr(module, key, t.to(dtype))
        module.prepare()
    model.mvquant_summary = summarize(model, QuantConfig.from_dict(qc), get_layout(model))


def register() -> None:
    """Idempotent: registering twice (a reloaded module) is not an error."""
    if "mvquant" not in hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        hf_auto.register_quantization_config("mvquant")(MvquantHfConfig)
    if "mvquant" not in hf_auto.AUTO_QUANTIZER_MAPPING:
        hf_auto.register_quantizer("mvquant")(MvquantHfQuantizer)


register()
