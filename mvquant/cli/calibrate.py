"""`mvquant calibrate`: find the massive Q/K dims of a model and write the report."""
from __future__ import annotations

import argparse

from ..errors import MvquantError
from ..io import atomic_write_bytes, check_output_path
from ..calibration.data import DEFAULT_SOURCE
from ..calibration.report import stats_path_for

HELP = "find the massive Q/K dimensions of a RoPE model and write a JSON report (+ stats, + plot)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="HF id, local dir, .gguf file, or a built-in model: 'smollm2-135m' (default), 'gemma3-270m'")
    p.add_argument("--output", "-o", required=True, help="report JSON path (raw stats go beside it as .stats.safetensors)")
    p.add_argument("--data", default=DEFAULT_SOURCE,
                   help=f"calibration text: '{DEFAULT_SOURCE}' (offline, default), a .txt/.jsonl file, or a datasets name NAME[:CONFIG]")
    p.add_argument("--samples", type=int, default=32, help="number of calibration sequences (default 32)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lambda", dest="lam", type=float, default=5.0, help="massive when M > lambda x head mean (default 5)")
    p.add_argument("--top-k", type=int, default=None, help="select the top-k dims per head instead of lambda")
    p.add_argument("--no-pack", action="store_true", help="one (padded) sequence per text instead of packed windows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="write a head x dim heatmap PNG (Q/K/V, chosen layers)")
    p.add_argument("--plot-layers", default=None, help="comma-separated layers for --plot (default: first, second, middle, last)")
    p.add_argument("--dtype", default="float32", help="float32 (default on CPU), bfloat16, float16, auto")
    p.add_argument("--device-map", default=None, help="e.g. 'auto' to spread/offload a large model with accelerate")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _parse_layers(text: str | None, num_layers: int | None) -> list[int] | None:
    """--plot-layers as a list; range-checked when the layer count is known."""
    if text is None:
        return None
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MvquantError(f"--plot-layers '{text}' is not a comma-separated list of integers, e.g. 0,15,29") from None
    if not layers:
        raise MvquantError(f"--plot-layers '{text}' names no layer: give e.g. 0,15,29")
    bad = [x for x in layers if x < 0 or (num_layers is not None and x >= num_layers)]
    if bad:
        raise MvquantError(f"--plot-layers {text}: layers must be in 0..{'N-1' if num_layers is None else num_layers - 1}"
                           f"{'' if num_layers is None else ' (the model has ' + str(num_layers) + ' layers)'}")
    return layers


def run(args: argparse.Namespace) -> int:
    from ..loading import load_model
    from ..models import get_layout
    from ..models.sources import peek_layout
    from ..calibration.calibrate import calibrate, check_settings
    from ..calibration.plot import plot_report
    from ..calibration.summary import format_summary

    # Validate every output path before the (long) pass, so it cannot fail at the end.
    inputs = (args.model, args.data)
    check_output_path(args.output, force=args.force, inputs=inputs)
    check_output_path(stats_path_for(args.output), force=args.force, inputs=inputs)
    if args.plot:
        check_output_path(args.plot, force=args.force, inputs=inputs)
    if args.plot_layers is not None and not args.plot:
        raise MvquantError("--plot-layers chooses the layers of --plot: add --plot REPORT.png")
    # Settings that need no weights fail now, not after the model loads or the pass ends.
    layout = peek_layout(args.model)
    check_settings(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size, lam=args.lam,
                   top_k=args.top_k, head_dim=layout.head_dim if layout else None)
    _parse_layers(args.plot_layers, layout.num_layers if layout else None)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device_map=args.device_map)
    _parse_layers(args.plot_layers, get_layout(model).num_layers)
    report = calibrate(model, tokenizer, data=args.data, samples=args.samples, seq_len=args.seq_len,
                       batch_size=args.batch_size, lam=args.lam, top_k=args.top_k, seed=args.seed,
                       pack=not args.no_pack, progress=not args.quiet, model_name=str(args.model))
    plot_png = plot_report(report, _parse_layers(args.plot_layers, report.meta["num_layers"])) if args.plot else None
    report.save(args.output)
    if plot_png is not None:
        atomic_write_bytes(args.plot, plot_png)
    if not args.quiet:
        print(format_summary(report))
        print(f"\nwrote {args.output}" + (f" and {args.plot}" if args.plot else ""))
    return 0
