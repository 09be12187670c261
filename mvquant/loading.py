"""`load_model`: what the user named, loaded as (model, tokenizer).

Above checkpoint and export in the flow because it reads their outputs too: an mvquant checkpoint, a
compressed-tensors export (with exact rows or a LoRA correction) load like any model directory."""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import torch

from .errors import MvquantError
from .models.builtin import builtin_model_dir
from .models.sources import first_line, parse_dtype, read_config_json, resolve_model_source


def load_model(name: str | os.PathLike | None = None, *, dtype="float32", device_map=None,
               trust_remote_code: bool = False):
    """Load (model, tokenizer) in eval mode.

    `name`: None or 'smollm2-135m' (the default built-in model), 'gemma3-270m', a local directory, a .gguf file, an
    mvquant checkpoint, or a Hugging Face id (needs the network unless it is in the HF cache).
    `device_map`: passed to transformers/accelerate ('auto' offloads what does not fit).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model_source(name)
    if src["kind"] == "mvquant":
        from .checkpoint import load as load_checkpoint  # quantized checkpoints have their own loader
        return load_checkpoint(src["path"], device_map=device_map, return_tokenizer=True)
    path = str(builtin_model_dir(src["name"])) if src["kind"] == "builtin" else src["path"]
    kwargs = {"dtype": parse_dtype(dtype), "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if src.get("gguf_file"):
        kwargs["gguf_file"] = src["gguf_file"]
    rows_export = src["kind"] == "dir" and _is_rows_export(Path(path))
    if rows_export:     # transformers knows compressed-tensors, not our rows: load the base from a view
        stack = contextlib.ExitStack()
        path = str(stack.enter_context(_as_compressed_tensors(Path(path))))
    if src["kind"] == "dir":
        kwargs.update(_compressed_tensors_kwargs(Path(path)))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": src["gguf_file"]} if src.get("gguf_file") else {}),
                                                  trust_remote_code=trust_remote_code)
        with warnings.catch_warnings():   # run_compressed=False overrides the saved config, as meant
            warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:
        if src["kind"] == "hub":
            raise MvquantError(f"could not load '{name}' from the Hugging Face hub or its cache ({first_line(e)}): "
                               "check the id and your network, or give a local directory") from None
        raise MvquantError(f"could not load model from '{name}': {first_line(e)}: check its files, or re-create "
                           "the directory (save_pretrained)") from None
    finally:
        if rows_export:
            stack.close()
    if rows_export:
        _overwrite_rows(model, Path(src["path"]))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if src["kind"] == "dir" and "quantization_config" in kwargs and (Path(path) / "protect-lora").is_dir():
        model = _merge_protect_lora(model, Path(path) / "protect-lora")
    model.eval()
    if src["kind"] == "builtin":
        model.config.name_or_path = src["name"]
    return model, tokenizer


def _compressed_tensors_kwargs(path: Path) -> dict:
    """A compressed-tensors directory (mvquant export): decompressed into plain linears on load.
    transformers' default (run_compressed=True) keeps packed modules that only engines' kernels run,
    and fails on CPU ("ignore_mismatched_sizes") for the packed zero points."""
    qc = read_config_json(path / "config.json").get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        return {}
    try:
        from transformers import CompressedTensorsConfig
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise MvquantError(f"'{path}' is a compressed-tensors export: loading it needs compressed-tensors "
                           "(pip install -c scripts/constraints.txt -e '.[export]')") from None
    return {"quantization_config": CompressedTensorsConfig(run_compressed=False)}


def _is_rows_export(path: Path) -> bool:
    from .export.compressed import ROWS_METHOD
    qc = read_config_json(path / "config.json").get("quantization_config") or {}
    return qc.get("quant_method") == ROWS_METHOD


@contextlib.contextmanager
def _as_compressed_tensors(path: Path):
    """A temporary view of an --protect-as rows export (links to its files) whose config names plain
    compressed-tensors: the packed base loads as any export does; the rows are written after."""
    import tempfile

    from .export.compressed import ROWS_KEY, ROWS_WEIGHTS, WEIGHTS
    with tempfile.TemporaryDirectory(prefix="mvquant-rows-") as tmp:
        for f in path.iterdir():
            if f.name != "config.json":
                os.symlink(f.resolve(), Path(tmp) / (WEIGHTS if f.name == ROWS_WEIGHTS else f.name))
        cfg = read_config_json(path / "config.json")
        cfg["quantization_config"]["quant_method"] = "compressed-tensors"
        cfg["quantization_config"].pop(ROWS_KEY, None)
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        yield Path(tmp)


@torch.no_grad()
def _overwrite_rows(model, path: Path) -> None:
    """Each row-corrected module's protected rows set to the stored fp16 rows (exact, as the plugin)."""
    from safetensors import safe_open

    from .export.compressed import ROWS_KEY, weights_file
    modules = read_config_json(path / "config.json")["quantization_config"][ROWS_KEY]["modules"]
    with safe_open(str(weights_file(path)), framework="pt") as f:
        for name in modules:
            w = model.get_submodule(name).weight
            idx = f.get_tensor(f"{name}.rows_index").long()
            w[idx] = f.get_tensor(f"{name}.rows_weight").to(w.dtype)


def _merge_protect_lora(model, lora_dir: Path):
    """An export with --protect-as lora restores its protected rows exactly through the adapter:
    merged here, so the model computes what the mvquant checkpoint computed."""
    try:
        from peft import PeftModel
    except ImportError:
        raise MvquantError(f"'{lora_dir.parent}' keeps its protected rows in {lora_dir.name}/: loading it needs "
                           "peft (pip install -c scripts/constraints.txt -e '.[export]')") from None
    with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing")
        return PeftModel.from_pretrained(model, str(lora_dir)).merge_and_unload()


