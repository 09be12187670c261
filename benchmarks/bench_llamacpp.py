"""llama.cpp benchmark on the built-in model (SmolLM2-135M), all numbers from one run, as ratios.

Files: (a) llama.cpp's own Q4_K_M and Q4_1, made by llama-quantize from an F16 GGUF that llama.cpp's
converter writes from the dense model; (b) mvquant's export (`mvquant export --format gguf`) of one
checkpoint, with and without its protect adapter; (c) mvquant in process (the same checkpoint).
Per file: decode tok/s at batch 1 (one token per forward after the prompt), prefill tok/s (one prompt,
logits of the last token only), both through llama-cpp-python in .venv-llamacpp/ (the same calls for
every file: llama-bench takes no --lora), median of --repeats; and perplexity on held-out python-docs
windows (token ids from mvquant's tokenizer, the same windows for every file and for mvquant in process).

    bash scripts/setup-llamacpp.sh
    python benchmarks/bench_llamacpp.py --checkpoint CKPT --output evals/results/llamacpp/bench.json
(the timed part takes /tmp/mvquant-bench.lock itself; other helpers share the cores)
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import mvquant  # noqa: E402
from mvquant.calibration import data as D  # noqa: E402
from mvquant.evaluation.llamacpp import LlamaCpp, venv_tool  # noqa: E402
from mvquant.export.gguf_export import adapter_path, export_gguf, llamacpp_dir  # noqa: E402
from mvquant.models.builtin import builtin_model_dir  # noqa: E402
from mvquant.quantization import quantized_modules  # noqa: E402

LOCK = "/tmp/mvquant-bench.lock"


@contextmanager
def bench_lock(wait_s: float):
    """Hold /tmp/mvquant-bench.lock for the timed part; after wait_s without it, go on and say so."""
    with open(LOCK, "a") as f:
        t0, got = time.monotonic(), False
        while not got:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                got = True
            except BlockingIOError:
                if time.monotonic() - t0 > wait_s:
                    break
                time.sleep(2)
        try:
            yield {"lock": "held" if got else f"not acquired after {wait_s:.0f} s: timed while other jobs ran",
                   "waited_s": round(time.monotonic() - t0, 1)}
        finally:
            if got:
                fcntl.flock(f, fcntl.LOCK_UN)


def nll_summary(nll: list[float]) -> dict:
    n = len(nll)
    m = sum(nll) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in nll) / (n - 1))
    return {"ppl": math.exp(m), "nll": m, "nll_se": sd / math.sqrt(n), "n": n}


def cpu_flags() -> str:
    flags = set(open("/proc/cpuinfo").read().split())
    return " ".join(sorted(f for f in flags if f.startswith(("avx512", "avx2", "avx_vnni", "amx"))))


def make_llamacpp_files(work: Path, threads: int) -> dict:
    """F16 GGUF by llama.cpp's converter, then Q4_K_M and Q4_1 by llama-quantize (None where it is absent)."""
    src = builtin_model_dir("smollm2-135m")
    f16 = work / "smollm2-f16.gguf"
    subprocess.run([sys.executable, str(llamacpp_dir() / "convert_hf_to_gguf.py"), str(src), "--outtype", "f16",
                    "--outfile", str(f16)], check=True, capture_output=True)
    files = {"llama.cpp F16": f16}
    q = venv_tool("llama-quantize")
    if q is None:
        print("llama-quantize was not built: no llama.cpp Q4_K_M / Q4_1 baselines", file=sys.stderr)
        return files
    for t in ("Q4_K_M", "Q4_1"):
        out = work / f"smollm2-{t}.gguf"
        subprocess.run([str(q), str(f16), str(out), t, str(threads)], check=True, capture_output=True)
        files[f"llama.cpp {t}"] = out
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="an mvquant checkpoint of the built-in model")
    p.add_argument("--gguf-int4", default="q5_0", help="type of our export's int4 linears (q5_0 or q4_1)")
    p.add_argument("--gguf-embed", default="f16", help="type of our export's token embedding (f16 or q8_0)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--require-lock", action="store_true", help="exit without timing if the lock is not free in --lock-wait")
    p.add_argument("--timing-only", action="store_true", help="skip the perplexity pass (speed rows only)")
    p.add_argument("--lock-wait", type=float, default=600, help="seconds to wait for the bench lock (then time anyway, noted)")
    p.add_argument("--output", help="write the result JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    model, tok = mvquant.load(a.checkpoint, return_tokenizer=True)
    text = " ".join(D.load_texts("python-docs")[:40])
    ids = tok(text)["input_ids"]
    prompt, decode = ids[: a.prompt_tokens], ids[a.prompt_tokens: a.prompt_tokens + a.decode_tokens]
    windows = D.token_windows(D.load_texts("python-docs"), tok, samples=a.eval_windows, seq_len=256, seed=12345)

    work = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    files = {k: (v, None) for k, v in make_llamacpp_files(work, a.threads).items()}
    ours = work / "mvquant.gguf"
    s = export_gguf(a.checkpoint, ours, int4=a.gguf_int4, embed=a.gguf_embed)
    files["mvquant export + adapter"] = (ours, adapter_path(ours) if s["adapter"] else None)
    files["mvquant export, no adapter"] = (ours, None)

    rows = {}
    for label, (path, lora) in files.items():                  # quality first: not timed, no lock
        rows[label] = {"file_mib": round(path.stat().st_size / 2**20, 2),
                       "adapter_mib": round(lora.stat().st_size / 2**20, 3) if lora else 0.0}
        if not a.timing_only:
            with LlamaCpp(path, lora=lora, threads=a.threads) as lm:
                rows[label].update(nll_summary([x for w in windows for x in lm.nll(w)]))
    rows["mvquant in process"] = {"file_mib": None, "adapter_mib": 0.0,
                                  "kernels": sorted({q.kernel for q in quantized_modules(model).values()})}
    if not a.timing_only:
        with torch.inference_mode():
            nll = []
            for w in windows:
                x = torch.tensor([w])
                logits = model(x).logits[0, :-1].float()
                nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none").tolist()
        rows["mvquant in process"].update(nll_summary(nll))

    # timing: every engine loaded, then round-robin repeats so any background load falls on all alike
    engines = {label: LlamaCpp(path, lora=lora, threads=a.threads, logits_all=False)
               for label, (path, lora) in files.items()}
    x = torch.tensor([prompt])

    def mvquant_run():
        with torch.inference_mode():
            t = time.perf_counter()
            past = model(x, use_cache=True).past_key_values
            t_prefill = time.perf_counter() - t
            t = time.perf_counter()
            for d in decode:
                past = model(torch.tensor([[d]]), past_key_values=past, use_cache=True).past_key_values
            return {"prefill_s": t_prefill, "decode_s": time.perf_counter() - t}

    times = {label: [] for label in rows}
    with bench_lock(a.lock_wait) as lock:
        if a.require_lock and lock["lock"] != "held":
            print(f"bench lock not free after {a.lock_wait:.0f} s: no timing (--require-lock)", file=sys.stderr)
            return 3
        for lm in engines.values():
            lm.bench(prompt[:16], decode[:4])                                   # warm-up
        with torch.inference_mode():
            model(x[:, :16])
        for _ in range(a.repeats):
            for label, lm in engines.items():
                times[label].append(lm.bench(prompt, decode))
            times["mvquant in process"].append(mvquant_run())
    for lm in engines.values():
        lm.close()
    for label, runs in times.items():
        rows[label]["prefill_tok_s"] = statistics.median(len(prompt) / r["prefill_s"] for r in runs)
        rows[label]["decode_tok_s"] = statistics.median(len(decode) / r["decode_s"] for r in runs)
        rows[label]["decode_tok_s_all"] = [round(len(decode) / r["decode_s"], 2) for r in runs]
        rows[label]["decode_spread"] = max(rows[label]["decode_tok_s_all"]) / min(rows[label]["decode_tok_s_all"])
        print(label, {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[label].items()}, flush=True)

    base = rows.get("llama.cpp Q4_K_M")
    for r in rows.values():
        r["decode_vs_q4_k_m"] = r["decode_tok_s"] / base["decode_tok_s"] if base else None
        r["prefill_vs_q4_k_m"] = r["prefill_tok_s"] / base["prefill_tok_s"] if base else None
    # a row whose repeats differ by more than 1.5x was timed while something else ran: no verdict from it
    stable = all(r["decode_spread"] <= 1.5 for r in rows.values())
    holds = (rows["mvquant export + adapter"]["decode_vs_q4_k_m"] >= 0.9) if base and stable else None
    result = {"model": "smollm2-135m", "checkpoint": str(a.checkpoint), "export": s["types"],
              "export_bits_per_weight": s["bits_per_weight"], "protected_rows": s["protected_rows"],
              "threads": a.threads, "prompt_tokens": len(prompt), "decode_tokens": len(decode),
              "repeats": a.repeats, "timing_lock": lock, "eval": f"{a.eval_windows} x 256-token python-docs windows (seed 12345)",
              "cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(),
              "target": "mvquant export + adapter decode >= 0.9x llama.cpp Q4_K_M",
              "target_holds": holds, "timings_stable": stable,
              "rows": rows, "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + (argv or sys.argv[1:]))}
    print(f"\n{'file':<28} {'MiB':>7} {'prefill t/s':>11} {'x Q4_K_M':>8} {'decode t/s':>10} {'x Q4_K_M':>8} "
          f"{'ppl':>8} {'nll±se':>14}")
    for label, r in rows.items():
        ratio = (lambda v: f"{v:.2f}" if v is not None else "-")
        q = f"{r['ppl']:>8.3f} {r['nll']:>7.4f}±{r['nll_se']:.4f}" if "ppl" in r else "-"
        print(f"{label:<28} {r['file_mib'] if r['file_mib'] is not None else '-':>7} {r['prefill_tok_s']:>11.1f} "
              f"{ratio(r['prefill_vs_q4_k_m']):>8} {r['decode_tok_s']:>10.1f} {ratio(r['decode_vs_q4_k_m']):>8} {q}")
    verdict = {True: "holds", False: "does NOT hold", None: "no verdict (timings unstable or no Q4_K_M)"}[holds]
    print(f"target (export + adapter decode >= 0.9x Q4_K_M): {verdict}")
    if a.output:
        from mvquant.io import atomic_write_json
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(a.output, result)
        print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
