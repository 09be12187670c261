"""llama.cpp's own converter, with mvquant's blocks in place of its quantization (run as a subprocess).

Run by gguf_export.py with llama.cpp's vendored `gguf-py` and `conversion/` first on sys.path (the
converter of the pinned llama-cpp-python sdist, see scripts/setup-llamacpp.sh): they are newer than
the `gguf` release mvquant imports, so they live in this separate process and never meet it.

    python gguf_convert.py LLAMA_CPP_DIR STAGING OUT.gguf [ADAPTER.gguf]

STAGING holds an HF-style model directory (config.json without quantization_config, tokenizer files,
model.safetensors with every tensor dense) plus mvquant_gguf.json and mvquant_gguf.safetensors:
per quantized linear its ggml type, its rows as ggml blocks (original row order) and, for protected
rows, their indices and the exact correction. The converter does everything it always does
(metadata, tokenizer, tensor names, the Llama q/k RoPE row permutation, F16/F32 for dense tensors);
only the add_tensor call of a quantized linear receives our blocks, permuted the converter's way.
Exit status 2 with one line on stderr: an input the converter does not take (unknown architecture).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


MARKER_KEY = "mvquant.export"   # every file mvquant writes carries it


def main(llama_dir: str, staging: str, out: str, adapter: str | None = None) -> int:
    sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).parent.resolve()]
    sys.path[0:0] = [str(Path(llama_dir) / "gguf-py"), llama_dir]
    import logging

    import numpy as np
    import torch
    from safetensors.numpy import load_file

    import gguf
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    logging.basicConfig(level=logging.WARNING)
    staging_dir = Path(staging)
    plan = json.loads((staging_dir / "mvquant_gguf.json").read_text())
    data = load_file(str(staging_dir / "mvquant_gguf.safetensors"))
    hparams = ModelBase.load_hparams(staging_dir, False)
    arch = get_model_architecture(hparams, ModelType.TEXT)
    try:
        cls = get_model_class(arch)
    except NotImplementedError:
        print(f"llama.cpp's converter does not know the architecture {arch!r}: no GGUF export for it", file=sys.stderr)
        return 2
    model = cls(staging_dir, gguf.LlamaFileType.MOSTLY_F16, Path(out), eager=True, model_name=plan["name"])

    # Where each quantized linear goes: the converter's own modify_tensors applied to the row indices
    # gives its GGUF name and its row permutation (Llama's q/k RoPE permute; identity elsewhere).
    blocks, perms = {}, {}
    for hf, info in plan["linears"].items():
        bid = next((int(p) for p in hf.split(".") if p.isdecimal()), None)
        idx = torch.arange(info["rows"], dtype=torch.float32).unsqueeze(1)
        (name, perm), = list(model.modify_tensors(idx, f"{hf}.weight", bid))
        perm = perm.reshape(-1).long().numpy()
        perms[hf] = (name, perm)
        if info["qtype"] is not None:
            blocks[name] = (np.ascontiguousarray(data[f"{hf}.blocks"][perm]), gguf.GGMLQuantizationType(info["qtype"]))

    writer_add = model.gguf_writer.add_tensor
    written = set()

    def add_tensor(name, tensor, raw_shape=None, raw_dtype=None, **kw):
        if name in blocks:
            written.add(name)
            b, qtype = blocks[name]
            return writer_add(name, b, raw_dtype=qtype)
        if name == "token_embd.weight" and plan.get("embed") == "q8_0":   # --gguf-embed q8_0, as llama-quantize does
            q8 = gguf.GGMLQuantizationType.Q8_0
            return writer_add(name, gguf.quants.quantize(np.asarray(tensor, dtype=np.float32), q8), raw_dtype=q8)
        return writer_add(name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype, **kw)

    model.gguf_writer.add_tensor = add_tensor
    model.prepare_tensors()
    if set(blocks) - written:
        print(f"the converter did not write {sorted(set(blocks) - written)[:3]}: mvquant and llama.cpp's converter "
              "disagree on this architecture's tensors", file=sys.stderr)
        return 2
    model.ftype = gguf.LlamaFileType(plan["file_type"])     # general.file_type: the linears' type
    model.prepare_metadata(vocab_only=False)
    model.gguf_writer.add_string(MARKER_KEY, plan["name"])      # what --force may replace (gguf_export.py)
    model.gguf_writer.write_header_to_file(path=Path(out))
    model.gguf_writer.write_kv_data_to_file()
    model.gguf_writer.write_tensors_to_file()
    model.gguf_writer.close()

    if adapter:
        # A LoRA adapter as llama.cpp loads it (llama-adapter.cpp): general.type "adapter", adapter.type
        # "lora", no alpha (scale = the --lora scale, 1), lora_a [r, in] = Delta_S, lora_b [out, r] one-hot
        # on the protected rows at their permuted positions.
        w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[model.model_arch])
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_name(f"{plan['name']} protected rows")
        w.add_string(MARKER_KEY, plan["name"])
        for hf, info in plan["linears"].items():
            if not info.get("protected"):
                continue
            name, perm = perms[hf]
            inv = np.empty_like(perm)
            inv[perm] = np.arange(len(perm))
            rows = inv[np.asarray(info["protected"], dtype=np.int64)]
            delta = data[f"{hf}.delta"].astype(np.float32)
            b = np.zeros((info["rows"], len(rows)), dtype=np.float32)
            b[rows, np.arange(len(rows))] = 1.0
            w.add_tensor(f"{name}.lora_a", np.ascontiguousarray(delta))
            w.add_tensor(f"{name}.lora_b", b)
        w.write_header_to_file(path=Path(adapter))
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
