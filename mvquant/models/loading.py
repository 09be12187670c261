"""Resolve what the user named (alias, local dir, GGUF file, HF id) into a model and tokenizer."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import urllib.parse
import warnings
from pathlib import Path

import torch

from ..errors import MvquantError
from .builtin import BUILTIN_ALIASES, BUILTIN_MODELS, builtin_model_dir, builtin_spec

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "auto": "auto"}


def parse_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise MvquantError(f"unknown dtype '{dtype}': use one of {', '.join(sorted(DTYPES))}") from None


def is_mvquant_checkpoint(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return ((read_config_json(config).get("quantization_config") or {}).get("quant_method")) == "mvquant"


def read_config_json(path: Path) -> dict:
    """A model's config.json as a dict; a torn or hand-broken file is one clear error."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MvquantError(f"'{path}' is not valid JSON ({e}): restore it, or re-create the model directory "
                           "(save_pretrained / mvquant quantize)") from None
    if not isinstance(data, dict):
        raise MvquantError(f"'{path}' is not a model config (a JSON object is expected): restore it, or "
                           "re-create the model directory") from None
    return data


def peek_layout(name: str | os.PathLike | None):
    """The ModelLayout (layers, heads, head_dim) of what `name` names, from its config alone, without
    loading weights: lets the CLI check layer numbers and reports before the model loads. None where
    that needs the network or a GGUF parse."""
    from transformers import AutoConfig

    from .adapters import get_layout

    if "://" in str(name):  # a server URL (mvquant eval URL): no local config
        return None
    src = resolve_model_source(name)
    if src["kind"] not in ("builtin", "dir", "mvquant"):
        return None
    path = builtin_model_dir(src["name"]) if src["kind"] == "builtin" else Path(src["path"])
    read_config_json(path / "config.json")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise MvquantError(f"could not read the config of '{name}': {_first_line(e)}") from None
    return get_layout(config)


def resolve_model_source(name: str | os.PathLike | None) -> dict:
    """Return {'kind': 'builtin'|'dir'|'gguf'|'hub'|'mvquant', 'path': ..., 'gguf_file': ...}; a
    built-in model also has 'name' (its canonical alias)."""
    if name is None or str(name).lower() in BUILTIN_ALIASES:
        return {"kind": "builtin", "path": None, "name": builtin_spec(None if name is None else str(name)).name}
    p = Path(name)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise MvquantError(f"GGUF file '{p}' not found: check the path")
        return {"kind": "gguf", "path": str(p.parent), "gguf_file": p.name}
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise MvquantError(f"'{p}' is a directory but not a model (no config.json): point to a "
                               "directory written by save_pretrained or `mvquant quantize`")
        return {"kind": "mvquant" if is_mvquant_checkpoint(p) else "dir", "path": str(p)}
    if p.exists():
        raise MvquantError(f"'{p}' is a file but not a .gguf model: give a model directory, a .gguf "
                           f"file, a Hugging Face id, or a built-in model ({', '.join(BUILTIN_MODELS)})")
    looks_like_path = str(name).startswith((".", "/", "~")) or str(name).count("/") > 1
    if looks_like_path:
        raise MvquantError(f"model path '{name}' does not exist: check the path, or use a built-in "
                           f"model ({', '.join(BUILTIN_MODELS)})")
    check_hub_model(str(name))
    return {"kind": "hub", "path": str(name)}


def check_hub_model(name: str) -> None:
    """A Hugging Face id must be in the local cache or the hub must be reachable: otherwise the
    hub client retries for about a minute (with a warning per try) before it gives up."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:
        return
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    hint = (f"give a local model directory, a .gguf file, or a built-in model ({', '.join(BUILTIN_MODELS)})")
    offline = [v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
               if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
    if offline:
        raise MvquantError(f"model '{name}' is not a local path, not a built-in model and not in the Hugging Face "
                           f"cache, and the hub is off ({offline[0]}=1): {hint}")
    host = urllib.parse.urlsplit(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise MvquantError(f"model '{name}' is not a local path, not a built-in model and not in the Hugging Face "
                           f"cache, and {host} cannot be reached (offline?): {hint}") from None


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
        from ..checkpoint import load as load_checkpoint  # quantized checkpoints have their own loader
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
            raise MvquantError(f"could not load '{name}' from the Hugging Face hub or its cache ({_first_line(e)}): "
                               "check the id and your network, or give a local directory") from None
        raise MvquantError(f"could not load model from '{name}': {_first_line(e)}: check its files, or re-create "
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
    from ..export.compressed import ROWS_METHOD
    qc = read_config_json(path / "config.json").get("quantization_config") or {}
    return qc.get("quant_method") == ROWS_METHOD


@contextlib.contextmanager
def _as_compressed_tensors(path: Path):
    """A temporary view of an --protect-as rows export (links to its files) whose config names plain
    compressed-tensors: the packed base loads as any export does; the rows are written after."""
    import tempfile

    from ..export.compressed import ROWS_KEY, ROWS_WEIGHTS, WEIGHTS
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

    from ..export.compressed import ROWS_KEY, weights_file
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


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
