"""`mvquant serve OUT`: vLLM's OpenAI-compatible server on 127.0.0.1 for an exported checkpoint."""
from __future__ import annotations

import argparse

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
    from .server import serve_forever

    return serve_forever(args.model, args.port, venv=args.venv, lora=not args.no_lora, timeout=args.timeout,
                         log=args.log, max_model_len=args.max_model_len, dtype=args.dtype)
