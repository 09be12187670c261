"""`mvquant export`: an mvquant checkpoint as compressed-tensors (+ OUT/protect-lora/) for vLLM/transformers."""
from __future__ import annotations

import argparse

from ..errors import MvquantError

HELP = ("export a checkpoint with its protected rows exact: compressed-tensors W4A16/W8A16 (vLLM + our plugin; or "
        "LoRA / dense for any engine) or GGUF (llama.cpp, rows as a LoRA adapter)")
FORMATS = ("compressed-tensors", "gguf")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..export.compressed import DTYPES, PROTECT_AS

    p.add_argument("checkpoint", help="an mvquant checkpoint directory (mvquant quantize --output)")
    p.add_argument("--format", default="compressed-tensors", help="compressed-tensors (default) or gguf (llama.cpp)")
    p.add_argument("--output", "-o", required=True, help="directory to write (its parent must exist); gguf: a .gguf file")
    p.add_argument("--gguf-int4", default="q5_0", help="gguf: type of asymmetric int4 linears, q5_0 (exact, default) "
                                                        "or q4_1 (smaller, m = -s*z rounded to fp16)")
    p.add_argument("--gguf-embed", default="f16", help="gguf: type of the token embedding, f16 (as the converter "
                                                        "writes it, default) or q8_0 (what llama-quantize's Q4_K_M "
                                                        "stores; 8.5 bits/weight)")
    p.add_argument("--protect-as", default=None, choices=PROTECT_AS + ("f16",),
                   help="compressed-tensors: rows (default): every linear packed plus the protected rows themselves, "
                        "applied inside vLLM by plugins/mvquant-vllm (quant_method mvquant-rows: engines without it "
                        "refuse it); lora: protected rows restored exactly by OUT/protect-lora/ (any vLLM or peft; vLLM "
                        "disables compilation with LoRA); fp16: q/k/v kept dense where protected (any engine, largest). "
                        "gguf: lora (default, OUT.protect.gguf for --lora) or f16 (one file)")
    p.add_argument("--dtype", default="float16", choices=list(DTYPES),
                   help="dtype of the unquantized tensors (default float16: the fp16 scales stay exact)")
    p.add_argument("--force", action="store_true", help="replace an existing --output directory")


def run(args) -> int:
    from ..export.compressed import LORA_DIR, export_compressed_tensors

    if args.format not in FORMATS:
        raise MvquantError(f"unknown --format '{args.format}': use {' or '.join(FORMATS)}")
    if args.format == "gguf":
        from ..export.gguf_export import run_cli
        return run_cli(args)
    s = export_compressed_tensors(args.checkpoint, args.output, protect_as=args.protect_as or "rows", dtype=args.dtype,
                                  force=args.force)
    print(f"wrote {args.output}: compressed-tensors {s['bits']}-bit group {s['group_size'] or 'per-row'} "
          f"{'symmetric' if s['symmetric'] else 'asymmetric'}, {s['dtype']}, "
          f"{s['bits_per_weight']:.3f} bits/weight over the quantized linears")
    if s["lora_modules"]:
        print(f"  {args.output}/{LORA_DIR}/: {s['protected_rows']} protected rows in {len(s['lora_modules'])} "
              f"modules, LoRA rank {s['lora_rank']} (load with peft, or vLLM --enable-lora)")
    elif s["rows_modules"]:
        print(f"  {s['protected_rows']} protected rows in {len(s['rows_modules'])} modules stored as fp16 rows "
              f"(quant_method mvquant-rows: serve with vLLM + plugins/mvquant-vllm, mvquant serve)")
    elif s["dense_modules"]:
        print(f"  {len(s['dense_modules'])} attention projections kept dense ({s['dtype']}): protected rows exact")
    return 0
