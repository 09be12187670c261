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

    def __init__(self, model, *, lora=None, threads: int = 2, n_ctx: int = 2048, logits_all: bool = True):
        model = Path(model)
        if not model.is_file():
            raise MvquantError(f"GGUF file '{model}' does not exist")
        if lora is not None and not Path(lora).is_file():
            raise MvquantError(f"LoRA adapter '{lora}' does not exist")
        cmd = [str(venv_python()), str(Path(__file__).with_name("llamacpp_worker.py")), str(model),
               "--threads", str(threads), "--n-ctx", str(n_ctx)]
        if lora is not None:
            cmd += ["--lora", str(lora)]
        if not logits_all:
            cmd.append("--no-logits-all")
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

    def nll(self, tokens: list[int]) -> list[float]:
        """Per predicted token -log p(token | previous), as llama.cpp computes it."""
        return self._ask({"op": "nll", "tokens": list(tokens)})["nll"]

    def bench(self, prompt: list[int], decode: list[int]) -> dict:
        """Seconds to prefill `prompt`, then to decode `decode` one token per forward (batch 1)."""
        return self._ask({"op": "bench", "prompt": list(prompt), "decode": list(decode)})

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


def gguf_bool(path, key: str, default: bool = False) -> bool:
    from gguf import GGUFReader

    f = GGUFReader(str(path)).fields.get(key)
    return default if f is None else bool(f.contents())


def default_adapter(model) -> Path | None:
    """MODEL.protect.gguf next to MODEL.gguf (what `mvquant export --format gguf` writes), if present."""
    from ..export.gguf_export import adapter_path

    a = adapter_path(model)
    return a if a.is_file() else None


def llamacpp_lm(model, *, lora="auto", tokenizer=None, threads: int = 2, n_ctx: int = 2048, progress: bool = True):
    """An lm-eval model scoring log-likelihoods in llama.cpp. Token ids come from `tokenizer` (a
    directory) or the GGUF's own tokenizer as transformers reads it; a BOS is prepended when the GGUF
    says llama.cpp adds one (tokenizer.ggml.add_bos_token), as llama.cpp itself would."""
    from lm_eval.api.model import TemplateLM
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    model = Path(model)
    if not model.is_file():
        raise MvquantError(f"GGUF file '{model}' does not exist")
    lora = default_adapter(model) if lora == "auto" else (None if lora in (None, "none") else Path(lora))
    try:
        tok = (AutoTokenizer.from_pretrained(str(tokenizer)) if tokenizer else
               AutoTokenizer.from_pretrained(str(model.parent), gguf_file=model.name))
    except (OSError, ValueError) as e:
        raise MvquantError(f"no tokenizer for '{model}' ({str(e).splitlines()[0][:200]}): pass --tokenizer DIR "
                           "(the checkpoint it was exported from)") from None
    add_bos = gguf_bool(model, "tokenizer.ggml.add_bos_token") and tok.bos_token_id is not None
    engine = LlamaCpp(model, lora=lora, threads=threads, n_ctx=n_ctx)

    class LlamaCppLM(TemplateLM):
        disruption = None
        kv_cache = None

        def __init__(self):
            super().__init__()
            self.tokenizer, self.engine = tok, engine
            self.model_name = f"{model}" + (f" + {lora}" if lora else "")
            self.lora = lora

        @property
        def eot_token_id(self):
            return tok.eos_token_id

        @property
        def prefix_token_id(self):
            return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

        def tok_encode(self, string, add_special_tokens=None, **kw):
            ids = tok.encode(string, add_special_tokens=False)
            return [tok.bos_token_id] + ids if add_bos and add_special_tokens is not False else ids

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
            out = []
            for key, ctx, cont in tqdm(requests, desc="llama.cpp", disable=disable_tqdm or not progress):
                ans = engine.loglik(ctx, cont)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, ans)
                out.append(ans)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise MvquantError("llama.cpp scoring covers log-likelihood tasks (every bundled task); rolling "
                               "perplexity: use benchmarks/bench_llamacpp.py or llama-perplexity")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise MvquantError("llama.cpp scoring covers log-likelihood tasks (every bundled task), not generation")

        def close(self):
            engine.close()

    return LlamaCppLM()
