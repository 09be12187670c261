"""`mvquant serve OUT`: vLLM's OpenAI-compatible server on 127.0.0.1 for an exported checkpoint."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..errors import MvquantError

HELP = "serve an exported checkpoint (mvquant export) with vLLM on 127.0.0.1 (protected rows by the mvquant-vllm plugin, or a protect-LoRA)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a directory written by mvquant export")
    p.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default 8000)")
    p.add_argument("--venv", default=None, help="the serving environment (default .venv-serve/ from scripts/setup-serve.sh)")
    p.add_argument("--no-lora", action="store_true", help="serve the bare base even if OUT/protect-lora/ exists")
    p.add_argument("--max-model-len", type=int, default=2048, help="context length vLLM reserves (default 2048)")
    p.add_argument("--dtype", default="float16", help="activation dtype (default float16: the scales stay exact)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the engine to start (default 600)")
    p.add_argument("--log", default=None, help="vLLM's log file (default a temporary file, named on errors)")


def run(args) -> int:
    from ..serving.server import serve_forever

    check_options(args)

    return serve_forever(args.model, args.port, venv=args.venv, lora=not args.no_lora, timeout=args.timeout,
                         log=args.log, max_model_len=args.max_model_len, dtype=args.dtype)


DTYPES = ("float16", "bfloat16", "float32", "auto")


def check_options(args) -> None:
    """Every option and the directory's format, before anything starts (vLLM takes a minute to fail)."""
    if not 1 <= args.port <= 65535:
        raise MvquantError(f"--port {args.port} is not a TCP port: give one in 1..65535, e.g. --port 8000")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise MvquantError(f"--timeout {args.timeout} must be a positive number of seconds, e.g. --timeout 600")
    if args.max_model_len < 1:
        raise MvquantError(f"--max-model-len {args.max_model_len} must be a positive number of tokens, e.g. 2048")
    if args.dtype not in DTYPES:
        raise MvquantError(f"unknown --dtype '{args.dtype}': use one of {', '.join(DTYPES)}")
    if args.log is not None and not Path(args.log).absolute().parent.is_dir():
        raise MvquantError(f"--log '{args.log}': its directory does not exist: create it or choose another --log")
    check_served_directory(Path(args.model))


def check_served_directory(path: Path) -> None:
    """An mvquant checkpoint is refused with the export command that makes it servable (which quant
    methods the engine takes is server.py's business)."""
    if not path.is_dir():
        raise MvquantError(f"'{path}' is not a directory: give the --output of mvquant export")
    config = path / "config.json"
    if not config.is_file():
        return  # server.check_export names the missing config.json
    try:
        qc = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise MvquantError(f"'{config}' is not a valid model config (JSON object): re-create it with mvquant export") from None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method == "mvquant":
        raise MvquantError(f"'{path}' is an mvquant checkpoint, which vLLM cannot load: export it first "
                           f"(mvquant export {path} --output {path}-served) and serve that directory")
    lora = path / "protect-lora" / "adapter_config.json"
    if lora.is_file():
        try:
            rank = json.loads(lora.read_text(encoding="utf-8")).get("r")
        except (ValueError, UnicodeDecodeError, AttributeError):
            rank = None
        if not isinstance(rank, int) or rank < 1:
            raise MvquantError(f"'{lora}' has no valid LoRA rank 'r': re-create the export (mvquant export --force), "
                               "or pass --no-lora")
