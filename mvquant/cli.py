"""`mvquant VERB ...`: a thin layer. Each part of the flow owns its verb in a `cli.py` of its own
with `HELP`, `add_arguments(parser)` and `run(args) -> int`; this file only dispatches."""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from .errors import MvquantError

VERBS = {
    "calibrate": "mvquant.calibration.cli",
    "quantize": "mvquant.quantization.cli",
    "eval": "mvquant.evaluation.cli",
    "compare": "mvquant.compare.cli",
    "export": "mvquant.export.cli",
    "serve": "mvquant.serving.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mvquant", description="Find and protect the massive Q/K values of RoPE models.")
    parser.add_argument("--version", action="version", version=f"mvquant {__import__('mvquant').__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
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
        if "--debug" not in p._option_string_actions:  # `mvquant VERB ... --debug` works too
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show the full traceback of an error")
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args._run(args) or 0)
    except MvquantError as e:  # bad input: the message names the problem and the fix
        if debug:
            traceback.print_exc()
        print(f"mvquant {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mvquant {args.verb}: interrupted; no partial output was written", file=sys.stderr)
        return 130
    except Exception as e:  # a bug (or an unforeseen environment): one line, the traceback on request
        if debug:
            traceback.print_exc()
        print(f"mvquant {args.verb}: error: {internal_message(e)}"
              + ("" if debug else " (internal error; rerun with --debug for the traceback)"), file=sys.stderr)
        return 1


def internal_message(e: BaseException) -> str:
    """`Type: first line of the message`; a multi-line message would break the one-line contract."""
    text = (str(e).strip().splitlines() or [""])[0][:500]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
