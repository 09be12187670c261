"""`mvquant quantize`: quantize a model (protecting massive Q/K rows) and write a checkpoint."""
from __future__ import annotations

import argparse
import json

from ..errors import MvquantError
from ..io import atomic_write_json, check_output_path
from .config import BITS, DEFAULT_IGNORE, DEFAULT_TARGETS, METHODS

HELP = "quantize a model to packed int2/3/4/8 with fp16-protected massive Q/K rows and write a checkpoint"


def _group_size(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer (-1 = one group per row), got '{text}'") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="HF id, local dir, .gguf file, or the built-in 'smollm2-135m' (default)")
    p.add_argument("--calibration", default=None, help="calibration report JSON (mvquant calibrate); "
                   "needed by --protect massive / random / topk:N")
    p.add_argument("--protect", default="none", help="massive | none | random (same count, seeded) | topk:N")
    p.add_argument("--method", default="rtn", help=f"one of {', '.join(METHODS)} (default rtn)")
    p.add_argument("--bits", type=int, default=None, help=f"one of {', '.join(map(str, BITS))} "
                   "(default 4; 8 for smoothquant and bnb-int8)")
    p.add_argument("--group-size", type=_group_size, default=None,
                   help="columns per scale (default 128; -1 = one per output row; need not divide in_features)")
    p.add_argument("--symmetric", action="store_true", help="symmetric grid (no zero points); default asymmetric")
    p.add_argument("--output", "-o", default=None, help="checkpoint directory to write (its parent must exist)")
    p.add_argument("--force", action="store_true", help="replace an existing --output directory")
    p.add_argument("--seed", type=int, default=0, help="seed for --protect random and calibration sampling")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows for awq/smoothquant/gptq (default 32)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--calib-data", default="python-docs", help="calibration text source (same as mvquant calibrate --data)")
    p.add_argument("--alpha", type=float, default=0.5, help="smoothquant migration strength (default 0.5)")
    p.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), help="regex of module names to quantize")
    p.add_argument("--ignore", nargs="+", default=list(DEFAULT_IGNORE), help="regex of module names to skip")
    p.add_argument("--compute", default="auto", help="auto (torch integer kernels where they apply) | dequant")
    p.add_argument("--summary-json", default=None, help="also write the summary (bits/weight, bytes, rows) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args) -> "QuantConfig":
    from .config import QuantConfig

    method = args.method
    bits = args.bits if args.bits is not None else (8 if method in ("smoothquant", "bnb-int8") else 4)
    group = args.group_size
    if method == "smoothquant" and group not in (None, -1):
        raise MvquantError("smoothquant uses one weight scale per output row: drop --group-size (or pass -1)")
    if group is None:
        group = None if method == "smoothquant" else 128
    return QuantConfig(method=method, bits=bits, group_size=group, symmetric=args.symmetric, protect=args.protect,
                       seed=args.seed, targets=args.targets, ignore=args.ignore, alpha=args.alpha,
                       gptq_act_order=args.act_order, calib_samples=args.calib_samples,
                       calib_seq_len=args.calib_seq_len, calib_data=args.calib_data, compute=args.compute)


def run(args: argparse.Namespace) -> int:
    from ..calibration import load_report
    from ..checkpoint import save_quantized
    from ..models import get_layout, load_model
    from .api import format_summary, quantize

    config = config_from_args(args)  # bad method / bits / policy / group size fail here, before any work
    if config.needs_report and not args.calibration:
        raise MvquantError(f"--protect {config.protect} needs --calibration REPORT.json: run "
                           "mvquant calibrate MODEL --output REPORT.json first, or use --protect none")
    if args.output:
        if config.is_bnb:
            raise MvquantError(f"--method {config.method} is an in-memory bitsandbytes baseline and cannot be saved: "
                               "drop --output (the summary is still printed) or use rtn/awq/gptq/smoothquant")
        check_output_path(args.output, force=args.force, kind="dir")
    if args.summary_json:
        check_output_path(args.summary_json, force=args.force)
    if config.is_bnb:
        from .bnb import require_bnb
        require_bnb()
    report = load_report(args.calibration) if args.calibration else None
    model, tokenizer = load_model(args.model)
    if report is not None:
        report.check_matches(get_layout(model))
    quantize(model, config, report=report, tokenizer=tokenizer, progress=not args.quiet)
    summary = model.mvquant_summary
    if args.output:
        save_quantized(model, tokenizer, args.output, report=report, force=args.force)
    print(format_summary(summary))
    if args.output:
        print(f"checkpoint: {args.output}")
    if args.summary_json:
        atomic_write_json(args.summary_json, summary)
    return 0
