"""Weights streamed from a model directory's safetensors shards, for a model that need not fit in memory:
the model skeleton on the meta device, and each tensor read when its decoder layer's turn comes
(pipeline/quantize.py `quantize_to_checkpoint` drives it)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import MvquantError


class NotStreamable(Exception):
    """The directory's tensor names do not map onto the model's: load it whole instead."""


def weight_files(model_dir) -> dict[str, str] | None:
    """Checkpoint tensor name -> safetensors file, or None when the directory has no safetensors."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise MvquantError(f"'{index}' is not a valid safetensors index ({e}): re-save the model") from None
        return {k: str(d / f) for k, f in weight_map.items()}
    single = d / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open
        try:
            with safe_open(str(single), "pt") as f:
                return dict.fromkeys(f.keys(), str(single))
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise MvquantError(f"'{single}' is not a readable safetensors file ({e}): re-save the model") from None
    return None


class ShardReader:
    """Reads named tensors from a model directory's safetensors shards, opening each file only while
    reading it (a kept-open memory map would count its touched pages in the process's memory)."""

    def __init__(self, files: dict[str, str], model_keys: list[str], base_prefix: str = "", tied: set[str] = ()):
        self.files = files
        self.keymap: dict[str, str] = {}
        missing = []
        for key in model_keys:
            found = next((c for c in _candidates(key, base_prefix) if c in files), None)
            if found is not None:
                self.keymap[key] = found
            elif key not in tied:
                missing.append(key)
        if missing:
            raise NotStreamable(f"{len(missing)} tensors not found under their module names (e.g. {missing[0]})")

    def read(self, keys: list[str], dtype: torch.dtype | None = None, device=None) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for k in keys:
            if k in self.keymap:
                by_file.setdefault(self.files[self.keymap[k]], []).append(k)
        out = {}
        for path, ks in by_file.items():
            with safe_open(path, "pt") as f:
                for k in ks:
                    t = f.get_tensor(self.keymap[k])
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[k] = t.to(device) if device is not None else t
        return out


def _candidates(key: str, base_prefix: str) -> list[str]:
    """Names a module's tensor may have in a checkpoint: as is, or with/without the base model prefix."""
    out = [key]
    if base_prefix:
        if key.startswith(base_prefix + "."):
            out.append(key[len(base_prefix) + 1:])
        else:
            out.append(f"{base_prefix}.{key}")
    return out


def build_meta_model(model_dir, dtype=None):
    """The model skeleton on the meta device (buffers such as RoPE tables stay real), in `dtype`
    (None: the dtype config.json names, float32 when it names none)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    if dtype is None:
        named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = getattr(torch, named) if isinstance(named, str) and hasattr(torch, named) else \
            named if isinstance(named, torch.dtype) else torch.float32
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()  # lm_head is the embedding matrix: not in the checkpoint, one tensor here
    return model.eval(), dtype


def load_tensors(model, reader: ShardReader, keys: list[str], dtype, device) -> None:
    """Materialize the named parameters / buffers of `model` from the shards, on `device`."""
    from accelerate.utils import set_module_tensor_to_device

    for key, t in reader.read(keys, dtype=dtype, device=device).items():
        set_module_tensor_to_device(model, key, device, value=t)


def tied_keys(model) -> set[str]:
    """State-dict keys that are the same tensor as an earlier key (lm_head tied to the embeddings)."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied


def streamable_dir(name) -> str | None:
    """The local directory of `name` (a model dir or the built-in alias) when it holds safetensors
    weights that can be streamed; None for GGUF files, hub ids, mvquant checkpoints."""
    from ..models.builtin import builtin_model_dir
    from ..models.sources import resolve_model_source

    src = resolve_model_source(name)
    if src["kind"] == "builtin":
        path = str(builtin_model_dir(src["name"]))
    elif src["kind"] == "dir":
        path = src["path"]
    else:
        return None
    return path if weight_files(path) is not None else None


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise MvquantError(f"could not load the tokenizer of '{model_dir}': {str(e).strip().splitlines()[0][:200]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
