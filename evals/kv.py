"""KV-cache quantization on a model: KV bits x K-channel protection (massive / none / random), one
model load, every arm on the same items, paired contrasts.

    flock /tmp/mvquant-heavy.lock python evals/kv.py --output-dir evals/results/kv --limit 20 \
        --calibration evals/results/calibration/smollm2-135m.json

Arms: fp (the usual cache) and for each --bits and --axes: kv{B}-{axis}-{protect}. protect none is the
KIVI-style baseline (per-channel K, per-token V, residual window, no protection); random keeps as
many random RoPE pairs per KV head (seeded) as massive keeps. Every arm's result is saved to
<dir>/arms/<arm>.json as it finishes (a rerun skips those); <dir>/kv.md is rendered from them.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from mvquant import load_model, load_report
from mvquant.evaluation import stats as S
from mvquant.evaluation.runner import evaluate
from mvquant.io import atomic_write_json, atomic_write_text
from mvquant.kvcache import KVCacheFactory, KVConfig

DEFAULT_TASKS = "passkey_256,kv_retrieval,reading_qa,knowledge_conflict,capitals,world_facts"


def arm_names(bits, axes, protects):
    return ["fp"] + [f"kv{b}-{a}-{p}" for a in axes for b in bits for p in protects]


def arm_config(name: str, args) -> dict | None:
    if name == "fp":
        return None
    b, axis, protect = name[2:].split("-")
    return {"bits": int(b), "axis": axis, "protect": protect, "group_size": args.group_size,
            "residual": args.residual, "sink": args.sink, "seed": args.seed}


@torch.inference_mode()
def decode_speed(model, tokenizer, kv: dict | None, report, prompt_tokens: int = 256, new_tokens: int = 32) -> float:
    """Greedy decode tokens/s after a prompt (batch 1), this cache vs others in the same run."""
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 40, return_tensors="pt")["input_ids"]
    ids = ids[:, :prompt_tokens]
    cache = KVCacheFactory(model, report, KVConfig(**kv))() if kv else None
    out = model(ids, past_key_values=cache, use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(tok, past_key_values=cache, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return new_tokens / (time.perf_counter() - t0)


def delta(a: dict, b: dict, task: str) -> tuple[float, float]:
    return S.paired_difference(a["tasks"][task]["correct"], b["tasks"][task]["correct"])


def group_delta(a: dict, b: dict, tasks: list[str]) -> tuple[float, float]:
    parts = [delta(a, b, t) for t in tasks]
    return S.macro_average([p[0] for p in parts], [p[1] for p in parts])


def render(results: dict, meta: dict) -> str:
    names = [n for n in meta["arms"] if n in results]
    tasks = list(results[names[0]]["tasks"])
    groups = {g: [t for t in tasks if results[names[0]]["tasks"][t]["group"] == g] for g in ("contextual", "parametric")}
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = [f"# KV-cache quantization on {meta['model']}", "",
             f"Command: `{meta['command']}`", "",
             f"n = {meta['limit']} items per task (the first n of each bundled task), greedy/log-likelihood scoring; "
             f"group size {meta['group_size']}, residual {meta['residual']} tokens, sink {meta['sink']}; K quantized "
             "after RoPE; every attention read (the prompt's own included) sees the quantized cache. "
             "± is one standard error; Δ are paired differences on the same items.", "",
             "| arm | " + " | ".join(tasks) + " | contextual | parametric | B/token (fp16 = 100%) | protected K | decode tok/s |",
             "|---|" + "---:|" * (len(tasks) + 5)]
    for n in names:
        r = results[n]
        k = r.get("kv_cache")
        cells = [f"{pct(r['tasks'][t]['acc'])} ± {pct(r['tasks'][t]['stderr'])}" for t in tasks]
        gs = [f"{pct(r['groups'][g]['acc'])} ± {pct(r['groups'][g]['stderr'])}" if g in r["groups"] else "-"
              for g in groups]
        size = "100%" if not k else f"{k['bytes_per_token']:.0f} B ({pct(k['ratio'])}%)"
        prot = "-" if not k else f"{k['protected_k_channels']} ({pct(k['protected_share'])}%)"
        speed = r.get("decode_tok_s")
        lines.append(f"| {n} | " + " | ".join(cells + gs) + f" | {size} | {prot} | "
                     f"{'-' if speed is None else f'{speed:.1f}'} |")
    lines += ["", "## Paired contrasts (points)", "",
              "| contrast | " + " | ".join(tasks) + " | contextual | parametric |", "|---|" + "---:|" * (len(tasks) + 2)]
    pairs = []
    for n in names:
        if n == "fp":
            continue
        b, axis, protect = n[2:].split("-")
        if protect == "massive":
            for other in ("none", "random"):
                o = f"kv{b}-{axis}-{other}"
                if o in results:
                    pairs.append((n, o))
        pairs.append((n, "fp"))
    for a, b in pairs:
        ra, rb = results[a], results[b]
        cells = ["{:+.1f} ± {:.1f}".format(*(100 * x for x in delta(ra, rb, t))) for t in tasks]
        gs = ["**{:+.1f}** ± {:.1f}".format(*(100 * x for x in group_delta(ra, rb, ts))) if ts else "-"
              for ts in groups.values()]
        lines.append(f"| {a} − {b} | " + " | ".join(cells + gs) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--output-dir", type=Path, default=Path("evals/results/kv"))
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--axes", default="channel")
    p.add_argument("--protects", default="none,massive,random")
    p.add_argument("--arms", help="only these arm names (comma-separated)")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--residual", type=int, default=32)
    p.add_argument("--sink", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration", required=True)
    p.add_argument("--render", action="store_true", help="only re-write kv.md from the saved arms")
    args = p.parse_args(argv)
    names = arm_names([int(b) for b in args.bits.split(",")], args.axes.split(","), args.protects.split(","))
    if args.arms:
        names = [n for n in args.arms.split(",")]
    arms_dir = args.output_dir / "arms"
    arms_dir.mkdir(parents=True, exist_ok=True)
    meta_path = args.output_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"arms": []}
    meta.update({"model": args.model, "limit": args.limit, "group_size": args.group_size, "residual": args.residual,
                 "sink": args.sink, "calibration": args.calibration,
                 "command": "python evals/kv.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))})
    meta["arms"] = meta["arms"] + [n for n in names if n not in meta["arms"]]
    if not args.render:
        torch.set_num_threads(2)
        model, tokenizer = load_model(args.model)
        report = load_report(args.calibration)
        for name in names:
            path = arms_dir / f"{name}.json"
            if path.exists():
                continue
            kv = arm_config(name, args)
            t0 = time.perf_counter()
            r = evaluate(args.model, args.tasks, model=model, tokenizer=tokenizer, limit=args.limit, report=report,
                         kv=kv, progress=False)
            r["decode_tok_s"] = decode_speed(model, tokenizer, kv, report)
            r["decode_fp_tok_s_same_time"] = decode_speed(model, tokenizer, None, report)
            atomic_write_json(path, r)
            print(f"{name}: " + ", ".join(f"{t} {100 * x['acc']:.0f}" for t, x in r["tasks"].items())
                  + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    atomic_write_json(meta_path, meta)
    results = {n: json.loads((arms_dir / f"{n}.json").read_text()) for n in meta["arms"]
               if (arms_dir / f"{n}.json").exists()}
    atomic_write_text(args.output_dir / "kv.md", render(results, meta))
    print(f"wrote {args.output_dir / 'kv.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
