"""Quantized checkpoints: one safetensors file (no pickle) + config.json + tokenizer + the
calibration report + a manifest of sizes and SHA-256 checksums, written atomically.

    DIR/model.mvquant.safetensors   all tensors (packed linears + everything else in the model dtype)
    DIR/config.json                 the model config with quantization_config (quant_method "mvquant")
    DIR/mvquant_manifest.json       format, file sizes and sha256, the quantization summary
    DIR/calibration.json (+ .stats.safetensors)   the report the protection came from, if any
    DIR/tokenizer files, generation_config.json
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import MvquantError
from ..io import atomic_directory, atomic_write_json, save_safetensors

MANIFEST = "mvquant_manifest.json"
README = """# mvquant checkpoint ({method}, {bits}-bit, protect {protect})

Load it with mvquant installed:

    import mvquant
    model = mvquant.load("THIS_DIR")                      # or, after `import mvquant`:
    model = transformers.AutoModelForCausalLM.from_pretrained("THIS_DIR")

Without mvquant, transformers refuses it (no model.safetensors): the packed weights in
model.mvquant.safetensors need mvquant's QuantLinear modules.
"""
FORMAT = "mvquant.checkpoint/1"


def _weights_name() -> str:
    from ..quantization.hf import WEIGHTS_NAME
    return WEIGHTS_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _state_dict_for_saving(model) -> dict[str, torch.Tensor]:
    """Persistent tensors, each stored once: tied weights (lm_head = embeddings) are re-tied on load."""
    out, seen = {}, {}
    for key, t in model.state_dict().items():
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if ident is not None and ident in seen:
            continue
        if ident is not None:
            seen[ident] = key
        out[key] = t.detach().contiguous().cpu()
    return out


def save_quantized(model, tokenizer, out_dir, report=None, force: bool = False) -> Path:
    """Write a quantized model to `out_dir` (refused if it exists, unless force). Returns the path."""
    from ..quantization.api import quantized_modules

    qc = getattr(model.config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    if not qc or qc.get("quant_method") != "mvquant":
        raise MvquantError("this model is not quantized by mvquant: run mvquant.quantize(model, config) first")
    if qc.get("method", "").startswith("bnb-"):
        raise MvquantError(f"{qc['method']} is an in-memory bitsandbytes baseline and is not saved as a "
                           "checkpoint: evaluate it in the same process, or use --method rtn/awq/gptq/smoothquant")
    if not quantized_modules(model):
        raise MvquantError("the model has no QuantLinear modules: quantize it before saving")
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, force=force) as tmp:
        tensors = _state_dict_for_saving(model)
        # sorted metadata (byte-identical reruns) and the user's umask (save_file writes 0600)
        save_safetensors(tensors, tmp / _weights_name(), metadata={"format": "mvquant", "mvquant_format": FORMAT})
        config = model.config
        saved_qc = config.quantization_config
        config.quantization_config = qc
        try:
            config.save_pretrained(tmp)
        finally:
            config.quantization_config = saved_qc
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except Exception:  # a generation config that does not validate is not worth failing the save
                pass
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        if report is not None:
            report.save(tmp / "calibration.json")
        (tmp / "README.md").write_text(README.format(method=qc.get("method"), bits=qc.get("bits"),
                                                     protect=qc.get("protect")))
        files = {}
        for p in sorted(tmp.iterdir()):
            if p.is_file():
                files[p.name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        summary = getattr(model, "mvquant_summary", None)
        atomic_write_json(tmp / MANIFEST, {"format": FORMAT, "weights": _weights_name(), "files": files,
                                           "tensors": len(tensors), "summary": summary})
    return out_dir


def verify_checkpoint(path, checksums: bool = True) -> dict:
    """Check every file listed in the manifest: present, same size, same SHA-256 (when `checksums`)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise MvquantError(f"'{path}' has no {MANIFEST}: it is not a complete mvquant checkpoint; "
                           "re-create it with mvquant quantize --output")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise MvquantError(f"{manifest_path} is corrupt ({e}): re-create the checkpoint with mvquant quantize") from None
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise MvquantError(f"checkpoint file '{f}' is missing: re-create the checkpoint with mvquant quantize")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise MvquantError(f"checkpoint file '{f}' is truncated or corrupt ({size} bytes, expected "
                               f"{info['bytes']}): re-create the checkpoint with mvquant quantize")
        if checksums and _sha256(f) != info["sha256"]:
            raise MvquantError(f"checkpoint file '{f}' is corrupt (SHA-256 mismatch): re-create the checkpoint "
                               "with mvquant quantize")
    return manifest


def load(path, device_map=None, return_tokenizer: bool = False):
    """Load an mvquant checkpoint (through transformers' from_pretrained and the registered quantizer,
    so this and `AutoModelForCausalLM.from_pretrained(path)` are the same code path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..quantization import hf  # noqa: F401  (registers quant_method "mvquant")

    path = Path(path)
    if not (path / "config.json").is_file():
        raise MvquantError(f"'{path}' is not a checkpoint directory (no config.json): give the --output of mvquant quantize")
    verify_checkpoint(path, checksums=False)  # sizes now; the quantizer checks the checksums while loading
    kwargs = {} if device_map is None else {"device_map": device_map}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise MvquantError(f"could not load checkpoint '{path}': {str(e).strip().splitlines()[0][:300]}") from None
    model.eval()
    if not return_tokenizer:
        return model
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
