"""mvquant checkpoint -> GGUF for llama.cpp, without re-quantizing (`mvquant export --format gguf`).

    OUT.gguf            every quantized linear on its exact ggml type (gguf_blocks.py), the rest as
                        llama.cpp's converter writes it (F16 matrices, F32 norms, metadata, tokenizer)
    OUT.protect.gguf    --protect-as lora (default): a GGUF LoRA adapter restoring the protected rows
                        exactly (`llama-cli -m OUT.gguf --lora OUT.protect.gguf`); the base holds those
                        rows re-quantized RTN on the module's own grid, so without --lora it is a plain
                        quantized model, never zeroed rows
    --protect-as f16    one file: linears with protected rows stored F16 (protected rows exact)

The metadata and tokenizer come from llama.cpp's converter itself (convert_hf_to_gguf's `conversion`
package and its `gguf-py`, from the llama-cpp-python sdist that scripts/setup-llamacpp.sh unpacks),
run in a subprocess (gguf_convert.py) on a staging copy of the checkpoint: no table of it is restated here.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import MvquantError
from ..quantization import q4k
from ..io import apply_umask, check_output_path
from . import gguf_blocks
from .compressed import checkpoint_quant_config, full_grid

PROTECT_AS = ("lora", "f16")
EMBED_TYPES = ("f16", "q8_0")               # --gguf-embed: the token embedding (re-quantized by gguf-py for q8_0)
LLAMACPP_VERSION = "0.3.36"                 # the pinned llama-cpp-python sdist (scripts/*llamacpp*.sh)
LLAMACPP_ENV = "MVQUANT_LLAMACPP_DIR"      # a llama.cpp source tree (convert_hf_to_gguf.py, conversion/, gguf-py/)
_SKIP = {"config.json", "mvquant_manifest.json", "README.md"}


def adapter_path(output) -> Path:
    """model.gguf -> model.protect.gguf"""
    output = Path(output)
    stem = output.name[:-5] if output.name.endswith(".gguf") else output.name
    return output.with_name(f"{stem}.protect.gguf")


def llamacpp_dir() -> Path:
    """The llama.cpp sources whose converter the export reuses: $MVQUANT_LLAMACPP_DIR, else the ones
    scripts/setup-llamacpp.sh unpacked into .venv-llamacpp/ of this repository, else the converter alone
    that scripts/fetch-llamacpp-converter.sh (run by setup.sh) put in the mvquant cache."""
    from ..models.builtin import cache_root

    given = os.environ.get(LLAMACPP_ENV)
    places = [Path(given)] if given else [Path(__file__).resolve().parents[2] / ".venv-llamacpp" / "llama.cpp",
                                          cache_root() / f"llama.cpp-{LLAMACPP_VERSION}"]
    for d in places:
        if (d / "convert_hf_to_gguf.py").is_file() and (d / "gguf-py").is_dir():
            return d
    raise MvquantError(f"llama.cpp's converter was not found ({', '.join(map(str, places))}): run bash "
                       f"scripts/fetch-llamacpp-converter.sh (or set {LLAMACPP_ENV} to a llama.cpp source tree)")


def check_ours(path: Path) -> None:
    """--force replaces only a GGUF file mvquant wrote (it carries gguf_convert.MARKER_KEY)."""
    from gguf import GGUFReader

    from .gguf_convert import MARKER_KEY
    try:
        ours = MARKER_KEY in GGUFReader(str(path)).fields
    except Exception:            # not a GGUF file at all
        ours = False
    if not ours:
        raise MvquantError(f"'{path}' was not written by mvquant export (no {MARKER_KEY} in it): --force only "
                           "replaces an earlier export; choose another --output, or move it away yourself")


def check_gguf_exportable(qc: dict, modules: dict, int4: str) -> dict:
    """Per quantized linear its ggml type; one-line errors for what GGUF cannot hold without re-quantizing."""
    method = qc.get("method")
    if str(method).startswith("bnb-"):
        raise MvquantError(f"{method} is an in-memory bitsandbytes baseline with no exportable weights: "
                           "quantize with --method rtn/awq/gptq")
    if qc.get("act_bits") or method == "smoothquant":
        raise MvquantError("SmoothQuant W8A8 is not exported to GGUF: llama.cpp has no per-channel input scale "
                           "for its int8 activations; quantize with --method rtn/awq/gptq")
    types = {}
    for name, m in modules.items():
        if m.input_scale is not None:
            raise MvquantError(f"{name} stores an input_scale (x / s at run time): GGUF has no place for it; "
                               "re-quantize with --method rtn/gptq or an AWQ that folds its scales")
        types[name] = (gguf_blocks.T.Q4_K if m.grid == "q4_k"
                       else gguf_blocks.gguf_type(m.bits, m.symmetric, m.group_size, m.in_features, int4))
    return types


def linear_blocks(m, qtype) -> np.ndarray:
    """Every output row of a QuantLinear as ggml blocks; protected rows re-quantized to nearest on the
    module's own grid (the base a user without --lora runs)."""
    if m.grid != "q4_k":
        codes, scales, zeros, _ = full_grid(m)
        return gguf_blocks.to_blocks(codes, scales, zeros, m.bits, m.group_size, qtype)
    blocks = np.empty((m.out_features, m.in_features // q4k.QK_K * q4k.BLOCK_BYTES), dtype=np.uint8)
    blocks[m.quantized_rows.numpy()] = q4k.to_blocks(*m.quantized())
    if m.n_protected:
        blocks[m.protected_rows.long().numpy()] = q4k.to_blocks(*q4k.quantize(m.protected_weight.float()))
    return blocks


def _staging(ckpt: Path, model, modules: dict, types: dict, protect_as: str, tmp: Path, embed: str = "f16") -> dict:
    """The converter's input (see gguf_convert.py). Returns the export summary."""
    from safetensors.torch import save_file

    from ..checkpoint import state_dict_for_saving

    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("quantization_config", None)
    if not cfg.get("architectures"):          # configs made by from_config lack it; the converter keys on it
        cfg["architectures"] = [type(model).__name__]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in sorted(ckpt.iterdir()):
        if f.is_file() and f.name not in _SKIP and not f.name.endswith(".safetensors") \
                and not f.name.startswith(("calibration", ".", "model.mvquant")):
            shutil.copy2(f, tmp / f.name)

    qnames = tuple(f"{n}." for n in modules)
    dense = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict_for_saving(model).items()
             if not k.startswith(qnames)}
    linears, arrays = {}, {}
    n_bits = n_weights = n_protected = adapter_params = 0
    type_counts: dict[str, int] = {}
    for name, m in modules.items():
        if m.bias is not None:
            dense[f"{name}.bias"] = m.bias.detach().float()
        keep_dense = protect_as == "f16" and m.n_protected > 0
        info = {"rows": m.out_features, "qtype": None, "protected": []}
        n_weights += m.out_features * m.in_features
        n_protected += m.n_protected
        if keep_dense:
            dense[f"{name}.weight"] = m.dequantized_weight(torch.float32)
            n_bits += m.out_features * m.in_features * 16
            type_counts["F16"] = type_counts.get("F16", 0) + 1
        else:
            qtype = types[name]
            blocks = linear_blocks(m, qtype)
            base = gguf_blocks.dequantize_blocks(blocks, qtype, m.in_features)   # what llama.cpp computes
            dense[f"{name}.weight"] = base
            arrays[f"{name}.blocks"] = torch.from_numpy(blocks)
            info["qtype"] = int(qtype)
            n_bits += blocks.size * 8
            type_counts[qtype.name] = type_counts.get(qtype.name, 0) + 1
            if m.n_protected:
                rows = m.protected_rows.long()
                # the correction against the base as llama.cpp dequantizes it (Q4_1's fp16 m included)
                arrays[f"{name}.delta"] = m.protected_weight.float() - base[rows]
                info["protected"] = rows.tolist()
                adapter_params += m.n_protected * (m.in_features + m.out_features)
        linears[name] = info
    save_file({k: v.contiguous() for k, v in dense.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in arrays.items()}, str(tmp / "mvquant_gguf.safetensors"))
    main_type = max((t for t in type_counts if t != "F16"), key=type_counts.get, default="F16")
    file_type = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q4_K": 15, "F16": 1}[main_type]   # gguf.LlamaFileType
    (tmp / "mvquant_gguf.json").write_text(json.dumps({"file_type": file_type, "name": ckpt.name, "linears": linears,
                                                       "embed": embed}))
    return {"types": type_counts, "file_type": main_type, "protected_rows": n_protected,
            "bits_per_weight": round(n_bits / max(n_weights, 1), 4), "adapter_params": adapter_params,
            "types_bits_per_weight": {t: (16.0 if t == "F16" else gguf_blocks.bits_per_weight(getattr(gguf_blocks.T, t)))
                                      for t in type_counts}}


@contextlib.contextmanager
def _temp_sibling(path: Path):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def export_gguf(ckpt, output, *, protect_as: str = "lora", int4: str = "q5_0", embed: str = "f16",
                force: bool = False) -> dict:
    """Write OUT.gguf (+ OUT.protect.gguf), see the module docstring. Returns a summary."""
    from ..checkpoint import load, verify_checkpoint
    from ..quantization.linear import quantized_modules

    if protect_as not in PROTECT_AS:
        raise MvquantError(f"--protect-as '{protect_as}' is not a GGUF form: use lora (default) or f16")
    if embed not in EMBED_TYPES:
        raise MvquantError(f"unknown --gguf-embed '{embed}': use {' or '.join(EMBED_TYPES)}")
    if int4 not in gguf_blocks.INT4_TYPES:
        raise MvquantError(f"unknown --gguf-int4 '{int4}': use {' or '.join(gguf_blocks.INT4_TYPES)}")
    ckpt, output = Path(ckpt), Path(output)
    if output.suffix != ".gguf":
        raise MvquantError(f"--output '{output}' must be a .gguf file, e.g. --output model.gguf")
    adapter = adapter_path(output)
    # checked in both forms: a stale adapter beside a new base would be picked up by --lora auto
    for path in (output, adapter):
        check_output_path(path, force=force, kind="file", inputs=(ckpt,))
        if force and path.exists():
            check_ours(path)
    qc = checkpoint_quant_config(ckpt)
    check_gguf_exportable(qc, {}, int4)
    if qc.get("bits") is not None:
        gguf_blocks.gguf_type(qc["bits"], bool(qc.get("symmetric")), qc.get("group_size"), 32, int4)
    src = llamacpp_dir()
    cfg_type = str(json.loads((ckpt / "config.json").read_text()).get("model_type", ""))
    verify_checkpoint(ckpt, checksums=True)
    model = load(ckpt)
    modules = quantized_modules(model)
    types = check_gguf_exportable(qc, modules, int4)

    with tempfile.TemporaryDirectory(prefix="mvquant-gguf-") as staging, \
            _temp_sibling(output) as tmp_out, _temp_sibling(adapter) as tmp_adapter:
        summary = _staging(ckpt, model, modules, types, protect_as, Path(staging), embed)
        del model
        with_adapter = protect_as == "lora" and summary["protected_rows"] > 0
        cmd = [sys.executable, str(Path(__file__).with_name("gguf_convert.py")), str(src), staging, str(tmp_out)]
        if with_adapter:
            cmd.append(str(tmp_adapter))
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()] or ["(no output)"]
            if r.returncode == 2:
                raise MvquantError(lines[-1])
            raise RuntimeError(f"llama.cpp's converter failed: {lines[-1]}")
        if cfg_type.startswith("gemma") and not (ckpt / "tokenizer.model").is_file():
            print("warning: no tokenizer.model in the checkpoint (a model loaded from GGUF): llama.cpp's converter "
                  "then reads tokenizer.json as BPE, so text that llama.cpp tokenizes itself may split differently; "
                  "mvquant eval --engine llamacpp passes mvquant's token ids and is unaffected", file=sys.stderr)
        if with_adapter:
            apply_umask(tmp_adapter)
            os.replace(tmp_adapter, adapter)
        apply_umask(tmp_out)
        os.replace(tmp_out, output)
        if not with_adapter and adapter.is_file():      # --force: the adapter of the replaced export
            adapter.unlink()
    summary.update({"output": str(output), "adapter": str(adapter) if with_adapter else None,
                    "protect_as": protect_as, "source": str(ckpt), "bytes": output.stat().st_size,
                    "adapter_bytes": adapter.stat().st_size if with_adapter else 0})
    return summary


def run_cli(args) -> int:
    """`mvquant export CKPT --format gguf --output OUT.gguf` (called from export/cli.py)."""
    protect_as = {None: "lora", "fp16": "f16"}.get(args.protect_as, args.protect_as)
    s = export_gguf(args.checkpoint, args.output, protect_as=protect_as, int4=args.gguf_int4,
                    embed=getattr(args, "gguf_embed", "f16"), force=args.force)
    types = ", ".join(f"{n} {t} ({s['types_bits_per_weight'][t]:.1f} bits/weight)" for t, n in sorted(s["types"].items()))
    print(f"wrote {s['output']} ({s['bytes'] / 2**20:.1f} MiB): linears {types}; {s['bits_per_weight']:.3f} "
          f"bits/weight over the quantized linears, other tensors as llama.cpp's converter writes them")
    if s["adapter"]:
        print(f"  {s['adapter']} ({s['adapter_bytes'] / 2**20:.2f} MiB): {s['protected_rows']} protected rows, exact "
              f"(llama.cpp: -m {s['output']} --lora {s['adapter']}; without --lora the rows stay re-quantized)")
    elif s["protected_rows"]:
        print(f"  {s['types'].get('F16', 0)} linears with protected rows stored F16: {s['protected_rows']} rows exact")
    return 0
