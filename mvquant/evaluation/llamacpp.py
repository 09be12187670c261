"""llama.cpp as a scorer: a worker process in .venv-llamacpp/ (llamacpp_worker.py) fed token ids.

llama-cpp-python pins its own build and lives in its own venv (scripts/setup-llamacpp.sh), so mvquant
talks to it over a pipe, one JSON line per request. `mvquant eval MODEL.gguf --engine llamacpp` and
benchmarks/bench_llamacpp.py use it; the token ids come from mvquant's tokenizer.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from ..errors import MvquantError

VENV_ENV = "MVQUANT_LLAMACPP_VENV"


def venv_python() -> Path:
    d = os.environ.get(VENV_ENV)
    d = Path(d) if d else Path(__file__).resolve().parents[2] / ".venv-llamacpp"
    py = d / "bin" / "python"
    if not py.is_file():
        raise MvquantError(f"llama.cpp's environment was not found at {d}: run bash scripts/setup-llamacpp.sh "
                           f"(or set {VENV_ENV})")
    return py


def venv_tool(name: str) -> Path | None:
    """A llama.cpp tool (llama-quantize, llama-bench, llama-perplexity) built by the setup script, or None."""
    t = venv_python().parent / name
    return t if t.exists() else None


class LlamaCpp:
    """with LlamaCpp("m.gguf", lora="m.protect.gguf") as lm: lm.loglik(ctx_ids, cont_ids)"""

    def __init__(self, model, *, lora=None, threads: int = 2, n_ctx: int = 2048):
        model = Path(model)
        if not model.is_file():
            raise MvquantError(f"GGUF file '{model}' does not exist")
        if lora is not None and not Path(lora).is_file():
            raise MvquantError(f"LoRA adapter '{lora}' does not exist")
        cmd = [str(venv_python()), str(Path(__file__).with_name("llamacpp_worker.py")), str(model),
               "--threads", str(threads), "--n-ctx", str(n_ctx)]
        if lora is not None:
            cmd += ["--lora", str(lora)]
        self.model, self.lora, self.n_ctx = model, lora, n_ctx
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.info = self._ask({"op": "info"})

    def _ask(self, req: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            err = self.proc.stderr.read().strip().splitlines()
            raise MvquantError(f"llama.cpp could not load '{self.model}'"
                               f"{' with ' + str(self.lora) if self.lora else ''}: {err[-1] if err else 'no output'}")
        ans = json.loads(line)
        if "error" in ans:
            raise MvquantError(f"llama.cpp: {ans['error']}")
        return ans

    def loglik(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        a = self._ask({"op": "loglik", "context": list(context), "continuation": list(continuation)})
        return a["logprob"], a["greedy"]

    def logits(self, tokens: list[int]):
        import numpy as np

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "logits.npy")
            self._ask({"op": "logits", "tokens": list(tokens), "path": path})
            return np.load(path)

    def generate(self, tokens: list[int], max_tokens: int) -> list[int]:
        return self._ask({"op": "generate", "tokens": list(tokens), "max_tokens": max_tokens})["tokens"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
