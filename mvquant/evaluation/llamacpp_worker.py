"""Score token ids with llama.cpp (llama-cpp-python), run in .venv-llamacpp/ as a subprocess of mvquant.

    .venv-llamacpp/bin/python llamacpp_worker.py MODEL.gguf [--lora ADAPTER.gguf] [--threads N] [--n-ctx N]

One JSON request per stdin line, one JSON answer per stdout line (nothing else is printed on stdout):
    {"op": "loglik", "context": [ids], "continuation": [ids]}  -> {"logprob": float, "greedy": bool}
    {"op": "logits", "tokens": [ids], "path": "X.npy"}         -> {"shape": [n, vocab]}  (float32 to X.npy)
    {"op": "generate", "tokens": [ids], "max_tokens": n}       -> {"tokens": [ids]}  (greedy, llama.cpp's sampler)
    {"op": "nll", "tokens": [ids]}                             -> {"nll": [per predicted token]}
    {"op": "bench", "prompt": [ids], "decode": [ids]}          -> {"prefill_s", "decode_s"} (start --no-logits-all)
    {"op": "info"}                                             -> {"n_vocab", "n_ctx", "system_info"}
Token ids come from mvquant's tokenizer, so llama.cpp scores exactly the tokens scored in process.
This file imports only the venv's own packages (llama_cpp, numpy): no mvquant, no torch.
"""
from __future__ import annotations

import argparse
import json
import sys


def log_softmax_row(row):
    import numpy as np

    row = row.astype(np.float64)
    m = row.max()
    return row - m - np.log(np.exp(row - m).sum())


def main(argv=None) -> int:
    import numpy as np
    from llama_cpp import Llama, llama_print_system_info

    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--lora", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--no-logits-all", action="store_true", help="timing: logits of the last token only, as llama.cpp's tools")
    a = p.parse_args(argv)
    llm = Llama(model_path=a.model, lora_path=a.lora, n_ctx=a.n_ctx, n_batch=512, n_threads=a.threads,
                n_threads_batch=a.threads, logits_all=not a.no_logits_all, verbose=False)
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "info":
                ans = {"n_vocab": llm.n_vocab(), "n_ctx": llm.n_ctx(),
                       "system_info": llama_print_system_info().decode()}
            elif op == "loglik":
                ctx, cont = list(req["context"]), list(req["continuation"])
                toks = (ctx + cont)[-a.n_ctx:]
                n_cont = len(cont)
                # prefix sharing: keep the KV cache of the tokens this request shares with the last one
                # (the choices of one item share their context); at least one token is evaluated again
                prev = llm.input_ids[: llm.n_tokens]
                m = min(len(prev), len(toks) - 1)
                diff = np.flatnonzero(prev[:m] != np.asarray(toks[:m]))
                llm.n_tokens = int(diff[0]) if diff.size else m
                llm.eval(toks[llm.n_tokens:])
                scores = llm.scores[: len(toks)]
                logprob, greedy = 0.0, True
                for i in range(len(toks) - n_cont, len(toks)):
                    row = scores[i - 1]
                    logprob += float(log_softmax_row(row)[toks[i]])
                    greedy &= int(np.argmax(row)) == toks[i]
                ans = {"logprob": logprob, "greedy": bool(greedy)}
            elif op == "nll":
                toks = list(req["tokens"])
                llm.reset()
                llm.eval(toks)
                x = np.asarray(llm.scores[: len(toks) - 1], dtype=np.float64)
                m = x.max(-1, keepdims=True)
                lse = (m[:, 0] + np.log(np.exp(x - m).sum(-1)))
                ans = {"nll": (lse - x[np.arange(len(toks) - 1), toks[1:]]).tolist()}
            elif op == "bench":
                import time
                llm.reset()
                t = time.perf_counter()
                llm.eval(list(req["prompt"]))
                t_prefill = time.perf_counter() - t
                t = time.perf_counter()
                for tok in req["decode"]:          # batch 1: one token per forward, on top of the prompt
                    llm.eval([tok])
                ans = {"prefill_s": t_prefill, "decode_s": time.perf_counter() - t}
            elif op == "logits":
                llm.reset()
                llm.eval(list(req["tokens"]))
                x = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
                np.save(req["path"], x)
                ans = {"shape": list(x.shape)}
            elif op == "generate":
                llm.reset()
                gen = []
                for t in llm.generate(list(req["tokens"]), temp=0.0, top_k=1, reset=True):
                    gen.append(int(t))
                    if len(gen) >= req["max_tokens"] or t == llm.token_eos():
                        break
                ans = {"tokens": gen}
            else:
                ans = {"error": f"unknown op {op!r}"}
        except Exception as e:   # one bad request answers with its error, the worker goes on
            ans = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(ans) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
