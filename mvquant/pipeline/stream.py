"""Quantize a model directory that need not fit in memory.

The model is built on the meta device (no weights); the tensors outside the decoder layers
(embeddings, final norm, lm_head) are read first, then each decoder layer's weights are read from
the safetensors shards when its turn comes, the layer is quantized on the compute device, written to
the checkpoint as its own shard and dropped. Peak memory: the non-layer tensors, one layer, and the
calibration hidden states; it does not grow with depth.
"""
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


def compute_device(name: str | None) -> torch.device:
    """--device: cpu (default), cuda, cuda:N; refused clearly when no GPU is visible."""
    name = name or "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MvquantError(f"unknown device '{name}': use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MvquantError(f"--device {name}: no CUDA GPU is visible to torch (torch.cuda.is_available() is "
                               "False; a CPU-only torch build, or no driver): drop --device or use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MvquantError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible: "
                               "use cuda:0 .. cuda:N-1")
    elif device.type != "cpu":
        raise MvquantError(f"--device {name} is not supported: use cpu, cuda or cuda:N")
    return device


def quantize_to_checkpoint(model_dir, config, output, *, report=None, tokenizer=None, force: bool = False,
                           device=None, dtype=None, progress: bool = True, need_bytes=None) -> dict:
    """Quantize the model in `model_dir` layer by layer, streaming weights in from its shards and the
    checkpoint out to `output` (written atomically: an interrupted run leaves nothing). Returns the
    summary. Raises NotStreamable (before any work) when the tensor names do not map."""
    from ..calibration import data as D  # noqa: F401  (calibration sources)
    from ..checkpoint import MANIFEST, ShardWriter, finish_checkpoint, storage_cast
    from ..io import atomic_directory, check_output_path
    from ..models.adapters import get_layout
    from ..quantization import activations as A
    from ..quantization.api import summarize, target_linears, unique_bytes  # noqa: F401
    from ..quantization.config import storage_dtype
    from ..quantization.layer import NEEDS
    from ..quantization.linear import QuantLinear
    from ..quantization.protect import protected_rows
    from .sequential import run_sequential

    import time
    t0 = time.perf_counter()
    device = compute_device(device) if not isinstance(device, torch.device) else device
    files = weight_files(model_dir)
    if files is None:
        raise NotStreamable("no model.safetensors or model.safetensors.index.json")
    model, dtype = build_meta_model(model_dir, dtype)
    layout = get_layout(model)
    layers_prefix = layout.spec.layers + "."
    keys = list(model.state_dict().keys())
    tied = _tied_keys(model)
    reader = ShardReader(files, keys, getattr(model, "base_model_prefix", "") or "", tied)
    if report is not None:
        report.check_matches(layout)
    # names only: holding the modules would keep each replaced nn.Linear, and the weights onload gave it,
    # alive to the end (one layer's weights per layer: peak memory grew with depth)
    targets = list(target_linears(model, config))
    rows = protected_rows(model, layout, config, report)
    if need_bytes is not None:
        check_output_path(output, force=force, kind="dir", need_bytes=int(need_bytes(model, config)),
                          inputs=(model_dir,), marker=MANIFEST)
    store = storage_dtype(config.store_dtype, dtype)

    # tensors outside the decoder layers: read once (embeddings are needed for the calibration pass)
    outer = [k for k in keys if not k.startswith(layers_prefix)]
    load_tensors(model, reader, outer, dtype, device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    seqs = None
    if config.method in NEEDS:
        seqs = A.calibration_sequences(model, tokenizer, None, samples=config.calib_samples,
                                       seq_len=config.calib_seq_len, seed=config.seed, source=config.calib_data)
    kernels: dict[str, int] = {}
    scaled: list[str] = []

    with atomic_directory(output, force=force, inputs=(model_dir,), marker=MANIFEST) as tmp:
        writer = ShardWriter(tmp)

        def onload(i, layer, dev):
            prefix = f"{layout.spec.layers}.{i}."
            load_tensors(model, reader, [k for k in keys if k.startswith(prefix)], dtype, dev)

        def offload(i, layer, prefix):
            quantized = {f"{prefix}.{n}" if n else prefix for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
            for n, m in layer.named_modules():
                if isinstance(m, QuantLinear):
                    kernels[m.kernel] = kernels.get(m.kernel, 0) + 1
                    if m.input_scale is not None:
                        scaled.append(f"{prefix}.{n}")
            sd = {f"{prefix}.{k}": t for k, t in layer.state_dict().items()}
            writer.add({k: storage_cast(k, t, quantized, store) for k, t in sd.items()})
            writer.flush()  # one shard per layer: nothing of it stays in memory
            layer.to("meta")

        run_sequential(model, layout, config, rows, seqs, device=device, progress=progress,
                       onload=onload, offload=offload)
        seen = set()
        rest = {}
        for k, t in model.state_dict().items():
            if k.startswith(layers_prefix) or t.device.type == "meta":
                continue
            ident = (t.data_ptr(), t.dtype, tuple(t.shape))
            if ident in seen:
                continue  # tied lm_head: stored once, re-tied on load
            seen.add(ident)
            rest[k] = storage_cast(k, t, set(), store)
        writer.add(rest)
        n_tensors, weights = writer.close()

        qc = config.to_dict()
        qc["modules"] = {name: int(rows[name].numel()) if name in rows else 0 for name in targets}
        qc["input_scale_modules"] = sorted(scaled)
        qc["dtype"] = str(dtype).replace("torch.", "")
        qc["report_model"] = report.model if report is not None else None
        summary = summarize(model, config, seconds=time.perf_counter() - t0)
        summary["kernels"] = kernels
        model.config.quantization_config = qc
        generation = None
        try:
            from transformers import GenerationConfig
            generation = GenerationConfig.from_pretrained(str(model_dir))
        except (OSError, ValueError):
            pass
        finish_checkpoint(tmp, model.config, qc, weights=weights, tokenizer=tokenizer, report=report,
                          generation_config=generation, summary=summary, n_tensors=n_tensors)
    return summary


def _tied_keys(model) -> set[str]:
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
    from ..models.loading import resolve_model_source

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
