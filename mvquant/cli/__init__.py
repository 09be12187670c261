"""`mvquant VERB ...`: a thin layer. Each part of the flow owns its verb in a `cli.py` of its own
with `HELP`, `add_arguments(parser)` and `run(args) -> int`; this file only dispatches."""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import re
import shutil
import signal
import sys
import threading
import traceback

from ..errors import MvquantError

VERBS = {
    "calibrate": "mvquant.cli.calibrate",
    "quantize": "mvquant.cli.quantize",
    "eval": "mvquant.cli.eval",
    "compare": "mvquant.cli.compare",
    "export": "mvquant.cli.export",
    "serve": "mvquant.cli.serve",
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
    argv = sys.argv[1:] if argv is None else list(argv)
    with _record_sigint() as interrupted:
        return _main(argv, interrupted)


def _main(argv: list[str], interrupted: list) -> int:
    prog = "mvquant" + next((f" {a}" for a in argv if a in VERBS), "")
    try:  # building the parser imports the verbs (torch: a second); Ctrl-C there is one line too
        # Ctrl-C is only recorded while the verbs are imported: a KeyboardInterrupt raised inside torch's
        # C++ import code aborts the process ("terminate called ... pybind11::error_already_set")
        with _deferred_sigint(interrupted):
            parser = build_parser()
        if interrupted:  # recorded during the imports (or swallowed by a library's bare `except:`)
            raise KeyboardInterrupt
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    debug = bool(getattr(args, "debug", False))
    quiet_libraries()
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
        full = no_space_message(e, getattr(args, "output", None))
        if full:  # the user's environment, not a bug: bad input's exit code
            print(f"mvquant {args.verb}: error: {full}", file=sys.stderr)
            return 2
        print(f"mvquant {args.verb}: error: {internal_message(e)}"
              + ("" if debug else " (internal error; rerun with --debug for the traceback)"), file=sys.stderr)
        return 1


@contextlib.contextmanager
def _on_sigint(handler):
    """SIGINT handled by `handler` inside the block (signals reach only the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _record_sigint():
    """Python's own Ctrl-C behaviour (KeyboardInterrupt), and a record that it happened."""
    seen: list = []

    def on_sigint(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    with _on_sigint(on_sigint):
        yield seen


def _deferred_sigint(seen: list):
    """Inside _record_sigint: Ctrl-C appended to `seen` without raising (the caller raises after)."""
    return _on_sigint(lambda signum, frame: seen.append(signum))


def quiet_libraries() -> None:
    """Silence what other libraries print on import that the user can do nothing about: bitsandbytes
    (imported by peft) warns on every import that an optional CPU kernel package is missing."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def no_space_message(e: BaseException, output: str | None = None) -> str | None:
    """A full disk (ENOSPC) anywhere in the exception chain, as a one-line message naming the file
    system (of the file, else of --output) and its free space; None for any other error. Libraries that write through their own code
    (safetensors, torch) wrap the OSError in their own type: their message says "os error 28"."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            break
        if re.search(r"No space left on device|os error 28|StorageFull", str(seen)):
            break
        seen = seen.__cause__ or seen.__context__
    else:
        return None
    where = getattr(seen, "filename", None) or output or os.getcwd()
    mount = os.path.abspath(where)
    while not os.path.exists(mount) and mount != os.path.dirname(mount):
        mount = os.path.dirname(mount)
    free = shutil.disk_usage(mount).free
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    return (f"no space left on {mount} ({free / 2**20:.0f} MB free): free some space there or choose another "
            "--output; nothing was written")


def internal_message(e: BaseException) -> str:
    """`Type: first line of the message`; a multi-line message would break the one-line contract."""
    text = (str(e).strip().splitlines() or [""])[0][:500]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
