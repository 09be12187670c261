"""`mvquant eval MODEL --tasks contextual,parametric [--disrupt massive] --output r.json`"""
from __future__ import annotations

import argparse
import sys

from ..io import atomic_write_json, check_output_path

HELP = "Evaluate a model (alias, directory, GGUF, hub id, or mvquant checkpoint) on contextual vs parametric tasks"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="model to evaluate (default: the built-in smollm2-135m; also gemma3-270m), or an OpenAI-compatible server URL "
                        "such as http://127.0.0.1:8000/v1 (mvquant serve)")
    p.add_argument("--tasks", default="contextual,parametric",
                   help="comma-separated: bundled tasks, the groups contextual / parametric, or any lm-eval task "
                        "(default: contextual,parametric)")
    p.add_argument("--output", "-o", help="write the result JSON here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --output")
    p.add_argument("--limit", help="evaluate only the first N items of each task (or a fraction < 1)")
    p.add_argument("--disrupt", choices=["massive", "non-massive"],
                   help="replace the selected Q/K dims by their prompt mean at prefill (paper, Table 1)")
    p.add_argument("--top-k", type=int, help="disrupt the top-k dims per head (default 1 when --lambda is not given)")
    p.add_argument("--lambda", dest="lam", type=float, help="disrupt dims with M > lambda x head mean instead of top-k")
    p.add_argument("--layers", help="disrupt only these layers, e.g. 0-9 or 0,5,7 (default: all)")
    p.add_argument("--pairs", action="store_true", help="also disrupt each selected dim's RoPE partner")
    p.add_argument("--calibration", metavar="REPORT.json",
                   help="pick disrupted dims from this calibration report (default: a quick calibration)")
    kv = p.add_argument_group("KV-cache quantization (K and V stored at low bit width, massive K channels exact)")
    kv.add_argument("--kv-bits", type=int, help="quantize the KV cache to 2, 3, 4 or 8 bits (prompt included)")
    kv.add_argument("--kv-protect", default="massive", choices=["massive", "none", "random"],
                    help="K channels kept exact: the calibration's massive RoPE pairs per layer and KV head (needs "
                         "--calibration), none (KIVI), or as many random pairs (seeded) (default massive)")
    kv.add_argument("--kv-group-size", type=int, default=32, help="tokens (per-channel K) or channels per group "
                    "(default 32)")
    kv.add_argument("--kv-residual", type=int, default=32, help="most recent tokens kept exact (default 32)")
    kv.add_argument("--kv-sink", type=int, default=0, help="first tokens kept exact (attention sinks, default 0)")
    kv.add_argument("--kv-axis", default="channel", choices=["channel", "token", "turboquant", "rht"],
                    help="K layout: per channel (KIVI, default) or per token (V per token); turboquant: vLLM's "
                         "TurboQuant (Hadamard + Lloyd-Max K, uniform V per head, first/last 2 layers exact); rht: "
                         "vLLM's int4_per_token_head (randomized Hadamard, K and V per head)")
    kv.add_argument("--kv-seed", type=int, default=0, help="seed of --kv-protect random (default 0)")
    kv.add_argument("--kv-backend", default="mvquant", choices=["mvquant", "quanto", "hqq"],
                    help="mvquant (default) or transformers' QuantizedCache with optimum-quanto / HQQ as a baseline "
                         "(needs --kv-protect none --kv-axis token)")
    p.add_argument("--dtype", default="float32", help="dtype to load the model in (default float32)")
    p.add_argument("--max-tokens", type=int, default=2048, help="padded prompt tokens per forward (default 2048)")
    p.add_argument("--include-path", help="extra folder of lm-eval task YAMLs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--served-model", help="with a server URL: the served model name (default: 'protect', the "
                   "protect-LoRA, when served, else the first)")
    p.add_argument("--tokenizer", help="with a server URL or --engine llamacpp: tokenizer directory (default: the "
                   "served model's own / the GGUF's own)")
    p.add_argument("--engine", default="transformers", choices=["transformers", "llamacpp"],
                   help="llamacpp: score MODEL.gguf in llama.cpp (bash scripts/setup-llamacpp.sh), on the same items")
    p.add_argument("--lora", default="auto", help="--engine llamacpp: adapter to apply (default auto: MODEL.protect.gguf "
                   "when present; none: the bare base)")


def _check_disruption_args(args) -> None:
    """What needs no weights (layer numbers, top-k, the report against the model's config) fails
    before the model loads and before a quick calibration."""
    from ..calibration import load_report
    from ..errors import MvquantError
    from ..models.sources import peek_layout
    from ..evaluation.lm import parse_layers

    if args.disrupt is None:
        return
    if args.top_k is not None and args.top_k <= 0:
        raise MvquantError(f"--top-k must be positive, got {args.top_k}")
    if args.lam is not None and not args.lam > 0:
        raise MvquantError(f"--lambda must be positive, got {args.lam}")
    layers = parse_layers(args.layers)
    if layers is not None and (not layers or min(layers) < 0):
        raise MvquantError(f"--layers '{args.layers}' names no valid layer: use e.g. 0-9 or 0,5,7")
    report = load_report(args.calibration) if args.calibration else None
    layout = peek_layout(args.model)
    if layout is None:
        return
    if layers and max(layers) >= layout.num_layers:
        raise MvquantError(f"--layers {args.layers} out of range: the model has layers 0..{layout.num_layers - 1}")
    if args.top_k is not None and args.top_k > layout.head_dim:
        raise MvquantError(f"--top-k {args.top_k} is more than head_dim {layout.head_dim}")
    if report is not None:
        report.check_matches(layout)


def _check_kv_args(args) -> dict | None:
    """--kv-* options checked before the model loads: bits, sizes, the report against the model's
    config, sliding-window layouts."""
    from ..errors import MvquantError
    from ..kvcache import KVConfig

    defaults = {"kv_protect": "massive", "kv_group_size": 32, "kv_residual": 32, "kv_sink": 0, "kv_axis": "channel",
                "kv_seed": 0, "kv_backend": "mvquant"}
    if args.kv_bits is None:
        changed = [k for k, v in defaults.items() if getattr(args, k) != v]
        if changed:
            raise MvquantError(f"--{changed[0].replace('_', '-')} sets up KV-cache quantization: add --kv-bits 2, 3, 4 or 8")
        return None
    config = KVConfig(bits=args.kv_bits, protect=args.kv_protect, group_size=args.kv_group_size,
                      residual=args.kv_residual, sink=args.kv_sink, axis=args.kv_axis, seed=args.kv_seed,
                      backend=args.kv_backend).check()
    from ..evaluation.remote import is_url
    if is_url(args.model):
        raise MvquantError("--kv-bits quantizes the KV cache inside the model: evaluate a model or checkpoint in this "
                           "process, not a server URL")
    from ..models.sources import peek_layout
    layout = peek_layout(args.model)
    if layout is not None and not layout.has_rope and config.protect != "none":
        raise MvquantError(f"--kv-protect {config.protect}: {layout.model_type} has no RoPE, so its keys have no massive "
                           "RoPE channels to keep: use --kv-protect none")
    if config.protect != "none" and not args.calibration:
        raise MvquantError(f"--kv-protect {config.protect} needs a calibration report: pass --calibration REPORT.json "
                           "(made by mvquant calibrate) or use --kv-protect none")
    if layout is not None and args.calibration:
        from ..calibration import load_report
        load_report(args.calibration).check_matches(layout)
    return config.to_dict()


def run(args) -> int:
    from ..errors import MvquantError
    from ..evaluation.runner import check_limit, evaluate, to_markdown

    if args.output:
        check_output_path(args.output, force=args.force, inputs=(args.model, args.calibration))
    limit = check_limit(args.limit)
    from ..evaluation.remote import is_url
    if args.engine == "llamacpp" and (is_url(args.model) or not str(args.model).endswith(".gguf")):
        raise MvquantError(f"--engine llamacpp scores a .gguf file (mvquant export --format gguf), not '{args.model}'")
    if args.engine == "llamacpp" and (args.disrupt is not None or args.kv_bits is not None):
        raise MvquantError("--disrupt and --kv-bits act inside mvquant's model: evaluate the checkpoint in process, "
                           "not a GGUF in llama.cpp")
    if args.engine != "llamacpp" and args.lora != "auto":
        raise MvquantError("--lora is for --engine llamacpp")
    disrupt_opts = (args.top_k, args.lam, args.layers) + ((args.calibration,) if args.kv_bits is None else ())
    if args.disrupt is None and any(o is not None for o in disrupt_opts) or (args.disrupt is None and args.pairs):
        raise MvquantError("--top-k/--lambda/--layers/--pairs/--calibration select what to disrupt: add "
                           "--disrupt massive or --disrupt non-massive")
    kv = _check_kv_args(args)
    if args.max_tokens <= 0:
        raise MvquantError("--max-tokens must be positive")
    from ..evaluation.remote import is_url
    if is_url(args.model) and args.disrupt is not None:
        raise MvquantError("--disrupt edits activations inside the model: evaluate a model or checkpoint in this "
                           "process, not a server URL")
    if not is_url(args.model) and (args.served_model or (args.tokenizer and args.engine != "llamacpp")):
        raise MvquantError("--served-model/--tokenizer are for a server URL (http://127.0.0.1:8000/v1)")
    _check_disruption_args(args)
    result = evaluate(args.model, args.tasks, limit=limit, disrupt=args.disrupt, top_k=args.top_k, lam=args.lam,
                      layers=args.layers, pairs=args.pairs, report=args.calibration, dtype=args.dtype,
                      max_tokens=args.max_tokens, include_path=args.include_path, progress=not args.no_progress,
                      served_model=args.served_model, tokenizer=args.tokenizer, kv=kv, engine=args.engine,
                      lora=args.lora)
    result["command"] = "mvquant eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else None
    print(to_markdown(result))
    if result["disruption"]:
        d = result["disruption"]
        print(f"\ndisruption: {d['mode']}, {d['selection']}, layers {len(d['layers'])}, "
              f"{d['dims_q']} Q + {d['dims_k']} K dims, from {d['source']}")
    if result.get("kv_cache"):
        k = result["kv_cache"]
        layout = {"turboquant": "TurboQuant (Hadamard + Lloyd-Max K, V per head)",
                  "rht": "randomized Hadamard, K and V per head"}.get(k["axis"], f"K per {k['axis']}, group {k['group_size']}")
        print(f"\nKV cache ({k.get('backend', 'mvquant')}): {k['bits']}-bit, {layout} (after RoPE), residual "
              f"{k['residual']}, sink {k['sink']}, protect {k['protect']} ({k['protected_k_channels']} K channels, "
              f"{100 * k['protected_share']:.1f}%): {k['bytes_per_token']:.0f} B/token vs fp16 "
              f"{k['fp16_bytes_per_token']:.0f} ({100 * k['ratio']:.1f}%)")
    print(f"\n{len(result['tasks'])} tasks in {result['seconds']:.0f} s")
    if args.output:
        atomic_write_json(args.output, result)
        print(f"wrote {args.output}")
    return 0
