"""What the user named (alias, local dir, GGUF file, HF id, mvquant checkpoint): its kind, path and config,
without loading weights. `mvquant.loading.load_model` loads it."""
from __future__ import annotations

import json
import os
import socket
import urllib.parse
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
        raise MvquantError(f"could not read the config of '{name}': {first_line(e)}") from None
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


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
