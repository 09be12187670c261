"""The checkpoint format: safetensors shards (no pickle) + config.json + tokenizer + the
calibration report + a manifest of sizes and SHA-256 checksums, written atomically.

    DIR/model.mvquant-0000N.safetensors   the tensors, shard by shard (packed linears; everything else
                                          in fp16/bf16 by default, see QuantConfig.store_dtype)
    DIR/model.mvquant.safetensors.index.json   tensor -> shard (older checkpoints: one
                                          model.mvquant.safetensors, still loaded)
    DIR/config.json                 the model config with quantization_config (quant_method "mvquant")
    DIR/mvquant_manifest.json       format, file sizes and sha256, the quantization summary
    DIR/calibration.json (+ .stats.safetensors)   the report the protection came from, if any
    DIR/tokenizer files, generation_config.json
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import MvquantError
from ..io import atomic_directory, atomic_write_json, save_safetensors
from ..quantization.config import FORMAT, storage_dtype
from ..quantization.linear import quantized_modules, storage_cast
from ..quantization.registry import METHODS

MANIFEST = "mvquant_manifest.json"
README = """# mvquant checkpoint ({method}, {bits}-bit, protect {protect})

Load it with mvquant installed:

    import mvquant
    model = mvquant.load("THIS_DIR")                      # or, after `import mvquant`:
    model = transformers.AutoModelForCausalLM.from_pretrained("THIS_DIR")

Without mvquant, transformers refuses it (no model.safetensors): the packed weights in
model.mvquant.safetensors need mvquant's QuantLinear modules.
"""
WEIGHTS_NAME = "model.mvquant.safetensors"   # everything in one shard (older checkpoints: always)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


INDEX_NAME = "model.mvquant.safetensors.index.json"   # checkpoints written shard by shard
SHARD_NAME = "model.mvquant-{:05d}.safetensors"
SHARD_BYTES = 1 << 30
def state_dict_for_saving(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Persistent tensors, each stored once: tied weights (lm_head = embeddings) are re-tied on load."""
    quantized = set(quantized_modules(model))
    out, seen = {}, {}
    for key, t in model.state_dict().items():
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if ident is not None and ident in seen:
            continue
        if ident is not None:
            seen[ident] = key
        out[key] = storage_cast(key, t.detach(), quantized, dtype).contiguous().cpu()
    return out


class ShardWriter:
    """Numbered safetensors shards in a directory, then the index naming each tensor's shard.

    add() buffers tensors and writes a shard once `max_bytes` are pending; flush() writes what is
    pending now (the streaming pipeline flushes after each decoder layer, so memory stays one layer)."""

    def __init__(self, directory, max_bytes: int = SHARD_BYTES):
        self.dir, self.max_bytes = Path(directory), max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = self.total_bytes = self.shards = 0
        self.weight_map: dict[str, str] = {}

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, t in tensors.items():
            if key in self.weight_map or key in self.pending:
                raise MvquantError(f"tensor '{key}' written twice to the checkpoint")
            self.pending[key] = t.detach().contiguous().cpu()
            self.pending_bytes += t.numel() * t.element_size()
            if self.pending_bytes >= self.max_bytes:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        self.shards += 1
        name = SHARD_NAME.format(self.shards)
        save_safetensors(self.pending, self.dir / name, metadata={"format": "mvquant", "mvquant_format": FORMAT})
        self.weight_map.update(dict.fromkeys(self.pending, name))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> tuple[int, str]:
        """Write the index; returns (number of tensors, the file transformers is pointed at). Everything
        in one shard is written as the single model.mvquant.safetensors of earlier versions."""
        if self.shards == 0:
            n = len(self.pending)
            save_safetensors(self.pending, self.dir / WEIGHTS_NAME,
                             metadata={"format": "mvquant", "mvquant_format": FORMAT})
            self.pending, self.pending_bytes = {}, 0
            return n, WEIGHTS_NAME
        self.flush()
        atomic_write_json(self.dir / INDEX_NAME, {"metadata": {"total_size": self.total_bytes, "format": "mvquant"},
                                                  "weight_map": dict(sorted(self.weight_map.items()))})
        return len(self.weight_map), INDEX_NAME


def _checked_qc(qc) -> dict:
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    if not qc or qc.get("quant_method") != "mvquant":
        raise MvquantError("this model is not quantized by mvquant: run mvquant.quantize(model, config) first")
    if qc.get("method") in METHODS and not METHODS[qc["method"]].saved:
        raise MvquantError(f"{qc['method']} is an in-memory bitsandbytes baseline and is not saved as a "
                           "checkpoint: evaluate it in the same process, or use --method rtn/awq/gptq/smoothquant")
    return dict(qc)


def save_quantized(model, tokenizer, out_dir, report=None, force: bool = False,
                   shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a quantized model to `out_dir` (refused if it exists, unless force). Returns the path."""
    qc = _checked_qc(getattr(model.config, "quantization_config", None))
    if not quantized_modules(model):
        raise MvquantError("the model has no QuantLinear modules: quantize it before saving")
    dtype = storage_dtype(qc.get("store_dtype", "float32"), next(model.parameters()).dtype)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, force=force, marker=MANIFEST) as tmp:
        writer = ShardWriter(tmp, shard_bytes)
        writer.add(state_dict_for_saving(model, dtype))
        n_tensors, weights = writer.close()
        finish_checkpoint(tmp, model.config, qc, weights=weights, tokenizer=tokenizer, report=report,
                          generation_config=getattr(model, "generation_config", None),
                          summary=getattr(model, "mvquant_summary", None), n_tensors=n_tensors)
    return out_dir


def finish_checkpoint(tmp: Path, config, qc: dict, *, weights: str, tokenizer=None, report=None,
                      generation_config=None, summary=None, n_tensors: int = 0) -> None:
    """Everything but the weight shards (already in `tmp`): config.json with quantization_config,
    generation config, tokenizer, report, README, and last the manifest of sizes and checksums.
    `weights`: the single weights file or the shards' index."""
    qc = {**qc, "weights": weights}
    saved_qc = getattr(config, "quantization_config", None)
    config.quantization_config = qc
    try:
        config.save_pretrained(tmp)
    finally:
        config.quantization_config = saved_qc
    if generation_config is not None:
        try:
            generation_config.save_pretrained(tmp)
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
    atomic_write_json(tmp / MANIFEST, {"format": FORMAT, "weights": weights, "files": files,
                                       "tensors": n_tensors, "summary": summary})


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
    so this and `AutoModelForCausalLM.from_pretrained(path)` are the same code path). The quantizer
    (hf.py) is registered by `import mvquant` as soon as transformers' quantizers are imported."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
