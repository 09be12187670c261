"""`mvquant VERB ...`: a thin layer. Each part of the flow owns its verb in a `cli.py` of its own
with `HELP`, `add_arguments(parser)` and `run(args) -> int`; this file only dispatches."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import MvquantError

VERBS = {
    "calibrate": "mvquant.calibration.cli",
    "quantize": "mvquant.quantization.cli",
    "eval": "mvquant.evaluation.cli",
    "compare": "mvquant.compare.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mvquant", description="Find and protect the massive Q/K values of RoPE models.")
    parser.add_argument("--version", action="version", version=f"mvquant {__import__('mvquant').__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb, module_name in VERBS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if not module_name.startswith(e.name or "?"):  # a real import error inside an existing verb
                raise
            continue
        p = sub.add_parser(verb, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except MvquantError as e:
        print(f"mvquant {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mvquant {args.verb}: interrupted; no partial output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
