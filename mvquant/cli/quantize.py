"""`mvquant quantize`: quantize a model (protecting massive Q/K rows) and write a checkpoint."""
from __future__ import annotations

import argparse
import sys

from ..errors import MvquantError
from ..io import atomic_write_json, check_output_path
from ..quantization.config import BITS, DEFAULT_IGNORE, DEFAULT_TARGETS, GRIDS, METHODS

HELP = "quantize a model to packed int2/3/4/8 with fp16-protected massive Q/K rows and write a checkpoint"


def _group_size(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer (-1 = one group per row), got '{text}'") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="HF id, local dir, .gguf file, or a built-in model: 'smollm2-135m' (default), 'gemma3-270m'")
    p.add_argument("--calibration", default=None, help="calibration report JSON (mvquant calibrate); "
                   "needed by --protect massive / random / topk:N")
    p.add_argument("--protect", default="none", help="massive | none | random (same count, seeded) | topk:N")
    p.add_argument("--method", default="rtn", help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
                   + " (default rtn)")
    p.add_argument("--bits", type=int, default=None, help=f"one of {', '.join(map(str, BITS))} (default: the "
                   "method's, " + ", ".join(f"{m.default_bits} for {m.name}" for m in METHODS.values()) + ")")
    p.add_argument("--group-size", type=_group_size, default=None,
                   help="columns per scale (default 128; -1 = one per output row; need not divide in_features)")
    p.add_argument("--symmetric", action="store_true", help="symmetric grid (no zero points); default asymmetric")
    p.add_argument("--grid", default="int", choices=GRIDS,
                   help="int (default): mvquant's integer grid; q4_k: llama.cpp's Q4_K grid (4-bit, sub-blocks of 32 "
                        "with 6-bit scales and mins), exported bit-exactly by `mvquant export --format gguf`")
    p.add_argument("--output", "-o", default=None, help="checkpoint directory to write (its parent must exist)")
    p.add_argument("--force", action="store_true", help="replace an existing --output directory")
    p.add_argument("--seed", type=int, default=0, help="seed for --protect random and calibration sampling")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows for awq/smoothquant/gptq (default 32)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--calib-data", default="python-docs", help="calibration text source (same as mvquant calibrate --data)")
    p.add_argument("--alpha", type=float, default=0.5, help="smoothquant migration strength (default 0.5)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="gptq: quantize columns by decreasing Hessian diagonal with static groups (default on; "
                        "--no-act-order: left to right)")
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), help="regex of module names to quantize")
    p.add_argument("--ignore", nargs="+", default=list(DEFAULT_IGNORE), help="regex of module names to skip")
    p.add_argument("--compute", default="auto", help="auto (torch integer kernels where they apply) | dequant")
    p.add_argument("--summary-json", default=None, help="also write the summary (bits/weight, bytes, rows) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--device", default=None, help="where each layer is quantized: cpu (default), cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (what the model's config.json names; "
                   "float32 for the in-memory path), float32, bfloat16, float16")
    p.add_argument("--store-dtype", default="auto", help="dtype of the unquantized tensors in the checkpoint "
                   "(embeddings, norms, lm_head): auto (the model's when 16-bit, else float16), float16, "
                   "bfloat16, float32")
    p.add_argument("--in-memory", action="store_true", help="load the whole model first instead of streaming "
                   "its layers from the safetensors shards")


def config_from_args(args):
    from ..quantization.config import QuantConfig
    from ..quantization.registry import method_spec

    method = args.method
    spec = method_spec(method)
    bits = args.bits if args.bits is not None else spec.default_bits
    group = args.group_size
    if method == "smoothquant" and group not in (None, -1):
        raise MvquantError("smoothquant uses one weight scale per output row: drop --group-size (or pass -1)")
    if getattr(args, "grid", "int") == "q4_k":
        if group not in (None, 32):
            raise MvquantError(f"--grid q4_k has sub-blocks of 32 weights: drop --group-size {group} (or pass 32)")
        group = 32
    if group is None:
        group = None if method == "smoothquant" else 128
    return QuantConfig(method=method, bits=bits, group_size=group, symmetric=args.symmetric, protect=args.protect,
                       seed=args.seed, targets=args.targets, ignore=args.ignore, alpha=args.alpha,
                       gptq_act_order=args.act_order, calib_samples=args.calib_samples,
                       calib_seq_len=args.calib_seq_len, calib_data=args.calib_data, compute=args.compute,
                       store_dtype=getattr(args, "store_dtype", "auto"), grid=getattr(args, "grid", "int"))


def checkpoint_bytes(model, config) -> int:
    """A generous estimate of the checkpoint's size: decoder linears at `bits` (+25% for scales, zero
    points and protected rows), everything else (embeddings, norms) as held; tied tensors once."""
    import torch

    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    total, seen = 0, set()
    for p in [*model.parameters(), *model.buffers()]:
        ident = id(p) if p.device.type == "meta" else p.data_ptr()  # meta tensors all have data_ptr 0
        if ident in seen:
            continue
        seen.add(ident)
        total += p.numel() * config.bits / 8 * 1.25 if id(p) in linear else p.numel() * p.element_size()
    return int(total) + (1 << 20)  # + config, tokenizer, manifest


def _warn_unprotected(config, report, layout) -> None:
    """--protect massive/random on a model without RoPE (or with no massive dims), or a method and width
    where protection was measured to hurt (guidance.py): say so, before the work."""
    from ..pipeline.guidance import protection_warning

    measured = protection_warning(config.method, config.bits, config.protect)
    if measured:
        print(f"mvquant quantize: warning: {measured}", file=sys.stderr)
    policy, _ = config.protect_policy()
    if policy not in ("massive", "random"):
        return
    dims = sum(len(d) for i in range(layout.num_layers) for kind in ("q", "k") for d in report.massive(i, kind))
    if not layout.has_rope:
        print(f"mvquant quantize: warning: {layout.model_type} has no RoPE, so no concentrated massive Q/K values "
              f"are expected; --protect {config.protect} follows the report's {dims} selected dims"
              + (" (none: nothing is protected)" if dims == 0 else ""), file=sys.stderr)
    elif dims == 0:
        print(f"mvquant quantize: warning: the report selects no massive Q/K dims, so --protect {config.protect} "
              "protects nothing: recalibrate with a lower --lambda or use --protect topk:N", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from ..calibration import load_report
    from ..checkpoint import MANIFEST, save_quantized
    from ..loading import load_model
    from ..models import get_layout
    from ..models.device import compute_device
    from ..models.sources import parse_dtype, peek_layout
    from ..pipeline import quantize
    from ..quantization import format_summary

    config = config_from_args(args)  # bad method / bits / policy / group size fail here, before any work
    inputs = (args.model, args.calibration)
    if config.needs_report and not args.calibration:
        raise MvquantError(f"--protect {config.protect} needs --calibration REPORT.json: run "
                           "mvquant calibrate MODEL --output REPORT.json first, or use --protect none")
    if args.output:
        if not config.spec.saved:
            raise MvquantError(f"--method {config.method} is an in-memory bitsandbytes baseline and cannot be saved: "
                               "drop --output (the summary is still printed) or use rtn/awq/gptq/smoothquant")
        check_output_path(args.output, force=args.force, kind="dir", inputs=inputs, marker=MANIFEST)
    if args.summary_json:
        check_output_path(args.summary_json, force=args.force, inputs=inputs)
    if config.method.startswith("bnb-"):
        from ..quantization.methods.bnb import require_bnb
        require_bnb()
    report = load_report(args.calibration) if args.calibration else None
    peeked = peek_layout(args.model)  # from config.json: a report of another model fails before loading
    if report is not None and peeked is not None:
        report.check_matches(peeked)
    device = compute_device(args.device)  # --device cuda without a GPU fails here, before any work
    dtype = None if args.dtype == "auto" else parse_dtype(args.dtype)
    if args.output and not args.in_memory and _quantize_streaming(args, config, report, peeked, device, dtype):
        return 0
    model, tokenizer = load_model(args.model, dtype=dtype or "float32")
    layout = get_layout(model)
    if report is not None:
        if peeked is None:  # checked above from config.json where there is one; quantize() checks again
            report.check_matches(layout)
        _warn_unprotected(config, report, layout)
    if args.output:  # the weights are known now: is there room for the checkpoint?
        check_output_path(args.output, force=args.force, kind="dir", need_bytes=checkpoint_bytes(model, config),
                          inputs=inputs, marker=MANIFEST)
    quantize(model, config, report=report, tokenizer=tokenizer, progress=not args.quiet,
             device=None if device.type == "cpu" else device)
    summary = model.mvquant_summary
    if args.output:
        save_quantized(model, tokenizer, args.output, report=report, force=args.force)
    print(format_summary(summary))
    if args.output:
        print(f"checkpoint: {args.output}")
    if args.summary_json:
        atomic_write_json(args.summary_json, summary)
    return 0


def _quantize_streaming(args, config, report, peeked, device, dtype) -> bool:
    """Layer by layer from the model directory's safetensors shards straight into the checkpoint.
    False (nothing done) when the model is not a local safetensors directory or its names do not map."""
    from ..pipeline import quantize_to_checkpoint
    from ..pipeline.stream import NotStreamable, load_tokenizer, streamable_dir
    from ..quantization import format_summary

    model_dir = streamable_dir(args.model)
    if model_dir is None:
        return False
    if report is not None and peeked is not None:
        _warn_unprotected(config, report, peeked)
    try:
        summary = quantize_to_checkpoint(model_dir, config, args.output, report=report,
                                         tokenizer=load_tokenizer(model_dir), force=args.force, device=device,
                                         dtype=dtype, progress=not args.quiet, need_bytes=checkpoint_bytes)
    except NotStreamable as e:
        print(f"mvquant quantize: note: cannot stream this model's weights ({e}); loading it whole",
              file=sys.stderr)
        return False
    print(format_summary(summary))
    print(f"checkpoint: {args.output}")
    if args.summary_json:
        atomic_write_json(args.summary_json, summary)
    return True
