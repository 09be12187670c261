"""KV-cache quantization on a model: KV bits x K-channel protection (massive / none / random) and
transformers' QuantizedCache baselines, one model load, every arm on the same items, paired contrasts,
cache bytes per token and decode speed.

    flock /tmp/mvquant-heavy.lock python evals/kv.py --output-dir evals/results/kv --limit 20 \
        --calibration evals/results/calibration/smollm2-135m.json

Arms: fp (the usual cache) and for each --bits and --axes: kv{B}-{axis}-{protect}. protect none is the
KIVI-style baseline (per-channel K, per-token V, residual window, no protection); random keeps as
many random RoPE pairs per KV head (seeded) as massive keeps. --baselines quanto2,hqq4,... adds
transformers' QuantizedCache arms {backend}{B}-token-none (mvquant/kvcache/hf.py). Every arm's
result is saved to <dir>/arms/<arm>.json as it finishes (a rerun skips those made with the same
tasks and limit); then every arm's greedy decode speed is measured, interleaved with the dense
cache over --speed-rounds rounds (<dir>/speed.json); <dir>/kv.md is rendered from them.
--ppl-windows N adds held-out perplexity per arm (<dir>/arms/<arm>.ppl.json): N windows of --ppl-seq-len
tokens of python-docs (seed 12345, apart from calibration's seed 0), each prefilled through the arm's cache,
with the paired relative change against the fp arm on the same windows.
--axes turboquant,rht add vLLM's rotated layouts (mvquant/kvcache/rotation.py).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from mvquant import load_model, load_report
from mvquant.calibration import data as D
from mvquant.evaluation import stats as S
from mvquant.evaluation.perplexity import perplexity_summary, window_nll
from mvquant.evaluation.runner import evaluate
from mvquant.io import atomic_write_json, atomic_write_text
from mvquant.kvcache import KVCacheFactory, KVConfig
from mvquant.kvcache.cache import ROTATED

DEFAULT_TASKS = "contextual,parametric"


ARM = re.compile(r"^(kv|quanto|hqq)(\d+)-(channel|token|turboquant|rht)-(none|massive|random)$")


def arm_names(bits, axes, protects, baselines=()):
    names = ["fp"] + [f"kv{b}-{a}-{p}" for a in axes for b in bits for p in protects]
    for x in baselines:
        m = re.fullmatch(r"(quanto|hqq)(\d+)", x)
        if not m:
            raise SystemExit(f"evals/kv.py: error: --baselines '{x}' is not quanto<B> or hqq<B>")
        names.append(f"{x}-token-none")
    return names


def parse_arm(name: str) -> tuple[str, int, str, str]:
    """'kv2-channel-massive' -> ('mvquant', 2, 'channel', 'massive'); 'quanto4-token-none' -> ('quanto', ...)."""
    m = ARM.fullmatch(name)
    if not m:
        raise SystemExit(f"evals/kv.py: error: arm '{name}' is not fp, kv<B>-<channel|token|turboquant|rht>-"
                         "<none|massive|random> "
                         "or <quanto|hqq><B>-token-none")
    backend, bits, axis, protect = m.groups()
    return ("mvquant" if backend == "kv" else backend), int(bits), axis, protect


def arm_config(name: str, args) -> dict | None:
    if name == "fp":
        return None
    backend, bits, axis, protect = parse_arm(name)
    return KVConfig(bits=bits, axis=axis, protect=protect, group_size=args.group_size, residual=args.residual,
                    sink=args.sink if backend == "mvquant" else 0, seed=args.seed, backend=backend).check().to_dict()


@torch.inference_mode()
def decode_seconds(model, ids, factory, new_tokens: int) -> float:
    """Seconds for `new_tokens` greedy decode steps after prefilling `ids` (batch 1)."""
    cache = factory() if factory else None
    out = model(ids, past_key_values=cache, use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(tok, past_key_values=cache, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - t0


def decode_speed(model, tokenizer, arms: dict, report, prompt_tokens: int, new_tokens: int, rounds: int,
                 on_round=None) -> dict:
    """Greedy decode tokens/s per arm, measured round-robin with the dense cache so that machine load
    hits every arm alike; the ratio to the dense cache is taken within each round, then the median."""
    text = open(__file__).read()   # a few hundred tokens of ordinary text
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :prompt_tokens]
    factories = {n: (KVCacheFactory(model, report, KVConfig(**kv)) if kv else None) for n, kv in arms.items()}
    decode_seconds(model, ids, None, 4)   # warm-up
    times = {n: [] for n in arms}
    ratios = {n: [] for n in arms}
    for done in range(1, rounds + 1):
        dense = decode_seconds(model, ids, None, new_tokens)
        for n, f in factories.items():
            t = dense if f is None else decode_seconds(model, ids, f, new_tokens)
            times[n].append(t)
            ratios[n].append(dense / t)
        out = {"prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens, "rounds": done,
               "threads": torch.get_num_threads(),
               "arms": {n: {"tok_s_median": new_tokens / statistics.median(times[n]),
                            "vs_dense_median": statistics.median(ratios[n]),
                            "vs_dense_min": min(ratios[n]), "vs_dense_max": max(ratios[n])} for n in arms}}
        if on_round is not None:   # a run cut short keeps the rounds it finished
            on_round(out)
    return out


def delta(a: dict, b: dict, task: str) -> tuple[float, float]:
    return S.paired_difference(a["tasks"][task]["correct"], b["tasks"][task]["correct"])


def group_delta(a: dict, b: dict, tasks: list[str]) -> tuple[float, float]:
    parts = [delta(a, b, t) for t in tasks]
    return S.macro_average([p[0] for p in parts], [p[1] for p in parts])


def contrasts(names: list[str]) -> list[tuple[str, str]]:
    """massive vs none and vs random at the same bits/axis; rotated arms (turboquant / rht, unprotected or
    massive) vs protection without rotation (per-token K, massive) and vs KIVI (per-channel K, none) at the
    same bits; each baseline vs our unprotected cache at the same bits (KIVI per-channel K, and per-token K
    if run); every arm vs fp."""
    pairs = []
    for n in names:
        if n == "fp":
            continue
        backend, b, axis, protect = parse_arm(n)
        if backend == "mvquant" and protect == "massive":
            pairs += [(n, f"kv{b}-{axis}-{o}") for o in ("none", "random") if f"kv{b}-{axis}-{o}" in names]
        if backend == "mvquant" and axis in ROTATED and protect != "random":   # rotation against protection
            pairs += [(n, o) for o in (f"kv{b}-token-massive", f"kv{b}-channel-none") if o in names]
        if backend != "mvquant":
            pairs += [(n, f"kv{b}-{a}-{p}") for a in ("channel", "token") for p in ("none", "massive")
                      if f"kv{b}-{a}-{p}" in names]
        pairs.append((n, "fp"))
    return pairs


EQUAL_BYTES = 0.02   # "equal bytes": cache sizes within 2% of the fp16 cache of each other


def equal_bytes_pairs(names: list[str], ratio: dict) -> list[tuple[str, str]]:
    """Rotated arms (unprotected or massive) vs the unrotated per-token massive and per-channel (KIVI)
    unprotected arms at another bit width whose bytes per token (`ratio`: arm -> share of fp16) is within
    EQUAL_BYTES: the comparison at equal memory that the same-bits contrasts do not make (rotation stores
    one scale per head vector, turboquant keeps boundary layers exact, so equal bits are not equal bytes)."""
    pairs = []
    for n in names:
        if n == "fp" or n not in ratio:
            continue
        backend, b, axis, protect = parse_arm(n)
        if backend != "mvquant" or axis not in ROTATED or protect == "random":
            continue
        for o in names:
            if o == "fp" or o not in ratio:
                continue
            ob, obits, oaxis, oprot = parse_arm(o)
            if (ob == "mvquant" and obits != b and (oaxis, oprot) in (("token", "massive"), ("channel", "none"))
                    and abs(ratio[o] - ratio[n]) <= EQUAL_BYTES):
                pairs.append((n, o))
    return pairs


def group_cell(diff: float, stderr: float) -> str:
    """A group contrast in points; bold when it is more than two standard errors from zero."""
    mark = "**" if abs(diff) > 2 * stderr else ""
    return f"{mark}{100 * diff:+.1f}{mark} ± {100 * stderr:.1f}"


def record_command(meta: dict, command: str) -> None:
    """Every evaluation command run on this directory, in order (an earlier run's arms are reused, so the
    header must list them all); a directory from before this list starts it with its one saved command."""
    meta["commands"] = [c for c in meta.get("commands", [meta.get("command")]) if c] + [command]


def render_ppl(ppl: dict, meta: dict) -> list[str]:
    """Held-out perplexity per arm and its paired change against the fp arm."""
    if "fp" not in ppl:
        return []
    base = ppl["fp"]["nll"]
    lines = ["", f"## Held-out perplexity ({len(base)} windows x {meta.get('ppl_seq_len')} tokens of python-docs, "
             "seed 12345; ± one standard error over windows, change paired on the same windows)", "",
             "| arm | perplexity | change vs fp |", "|---|---:|---:|"]
    for n in [a for a in meta["arms"] if a in ppl]:
        s = perplexity_summary(ppl[n]["nll"], None if n == "fp" else base)
        change = "" if n == "fp" else f"{100 * s['ppl_change']:+.2f}% ± {100 * s['ppl_change_se']:.2f}"
        lines.append(f"| {n} | {s['ppl']:.3f} | {change} |")
    return lines


def render(results: dict, meta: dict, speed: dict | None = None, ppl: dict | None = None) -> str:
    names = [n for n in meta["arms"] if n in results]
    tasks = list(results[names[0]]["tasks"])
    # a group's own task list: tasks near chance at full precision on this model are left out (runner.py)
    first = results[names[0]]
    groups = {g: first["groups"].get(g, {}).get("tasks", [t for t in tasks if first["tasks"][t]["group"] == g])
              for g in ("contextual", "parametric")}
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    sp = (speed or {}).get("arms", {})
    lines = [f"# KV-cache quantization on {meta['model']}", "",
             "Commands (in order; a rerun skips the arms already saved): "
             + "; ".join(f"`{c}`" for c in meta.get("commands", [meta.get("command")]))
             + (f"; decode speed: `{meta['speed_command']}`" if meta.get("speed_command") else ""), "",
             f"n = {meta['limit']} items per task (the first n of each bundled task), log-likelihood scoring; "
             f"group size {meta['group_size']}, residual {meta['residual']} tokens, sink {meta['sink']}; K quantized "
             "after RoPE; every attention read (the prompt's own included) sees the quantized cache. "
             "± is one standard error; Δ are paired differences on the same items (bold: more than two standard errors "
             "from zero). "
             "kv* arms are mvquant's cache; quanto*/hqq* arms are transformers' QuantizedCache (K and V grouped "
             "along channels per token, the whole prompt quantized, see mvquant/kvcache/hf.py). "
             "B/token: steady-state cache bytes per token over all layers, codes packed and fp16 scales, "
             "vs an fp16 cache. Decode: greedy tokens/s at batch 1 relative to the dense cache, median of "
             "per-round ratios (min-max)" + (f" over {speed['rounds']} rounds, {speed['prompt_tokens']}-token prompt, "
                                              f"{speed['new_tokens']} new tokens, {speed['threads']} threads; a shared "
                                              "2-core machine, so only the ratios mean anything" if speed else "") + ".",
             "",
             "| arm | " + " | ".join(tasks) + " | contextual | parametric | B/token (fp16 = 100%) | protected K | "
             "decode vs dense |", "|---|" + "---:|" * (len(tasks) + 5)]
    for n in names:
        r = results[n]
        k = r.get("kv_cache")
        cells = [f"{pct(r['tasks'][t]['acc'])} ± {pct(r['tasks'][t]['stderr'])}" for t in tasks]
        gs = [f"{pct(r['groups'][g]['acc'])} ± {pct(r['groups'][g]['stderr'])}" if g in r["groups"] else "-"
              for g in groups]
        size = "100%" if not k else f"{k['bytes_per_token']:.0f} B ({pct(k['ratio'])}%)"
        prot = "-" if not k else f"{k['protected_k_channels']} ({pct(k['protected_share'])}%)"
        s = sp.get(n)
        speed_cell = "-" if s is None else f"{s['vs_dense_median']:.2f}x ({s['vs_dense_min']:.2f}-{s['vs_dense_max']:.2f})"
        lines.append(f"| {n} | " + " | ".join(cells + gs) + f" | {size} | {prot} | {speed_cell} |")
    lines += ["", "## Paired contrasts (points)", "",
              "| contrast | " + " | ".join(tasks) + " | contextual | parametric |", "|---|" + "---:|" * (len(tasks) + 2)]
    for a, b in contrasts(names):
        ra, rb = results[a], results[b]
        cells = ["{:+.1f} ± {:.1f}".format(*(100 * x for x in delta(ra, rb, t))) for t in tasks]
        gs = [group_cell(*group_delta(ra, rb, ts)) if ts else "-" for ts in groups.values()]
        lines.append(f"| {a} − {b} | " + " | ".join(cells + gs) + " |")
    ratio = {n: results[n]["kv_cache"]["ratio"] for n in names if results[n].get("kv_cache")}
    same_size = equal_bytes_pairs(names, ratio)
    if same_size:
        lines += ["", f"## Rotation against protection at equal bytes (B/token within {100 * EQUAL_BYTES:.0f}% of "
                  "fp16's of each other, other bit widths; points)", "",
                  "| contrast | B/token (% of fp16) | " + " | ".join(tasks) + " | contextual | parametric | "
                  "perplexity, paired change |", "|---|---:|" + "---:|" * (len(tasks) + 3)]
        for a, b in same_size:
            ra, rb = results[a], results[b]
            cells = ["{:+.1f} ± {:.1f}".format(*(100 * x for x in delta(ra, rb, t))) for t in tasks]
            gs = [group_cell(*group_delta(ra, rb, ts)) if ts else "-" for ts in groups.values()]
            pc = "-"
            if a in (ppl or {}) and b in ppl:
                s = perplexity_summary(ppl[a]["nll"], ppl[b]["nll"])
                pc = f"{100 * s['ppl_change']:+.1f}% ± {100 * s['ppl_change_se']:.1f}"
            lines.append(f"| {a} − {b} | {100 * ratio[a]:.1f} vs {100 * ratio[b]:.1f} | " + " | ".join(cells + gs)
                         + f" | {pc} |")
    lines += render_ppl(ppl or {}, meta)
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
    p.add_argument("--baselines", default="quanto2,quanto4,hqq2,hqq4",
                   help="transformers QuantizedCache arms, backend+bits ('' for none)")
    p.add_argument("--arms", help="only these arm names (comma-separated)")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--residual", type=int, default=32)
    p.add_argument("--sink", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration", required=True)
    p.add_argument("--speed-rounds", type=int, default=3, help="decode-speed rounds (0: skip)")
    p.add_argument("--speed-prompt", type=int, default=384, help="prompt tokens before decoding")
    p.add_argument("--speed-new", type=int, default=64, help="greedy decode steps timed")
    p.add_argument("--speed-only", action="store_true", help="only measure decode speed (no task evaluation)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--ppl-windows", type=int, default=0, help="held-out perplexity windows per arm (0: skip)")
    p.add_argument("--ppl-seq-len", type=int, default=512, help="tokens per perplexity window")
    p.add_argument("--render", action="store_true", help="only re-write kv.md from the saved arms")
    args = p.parse_args(argv)
    names = arm_names([int(b) for b in args.bits.split(",")], args.axes.split(","), args.protects.split(","),
                      [x for x in args.baselines.split(",") if x])
    if args.arms:
        names = [n for n in args.arms.split(",")]
    configs = {n: arm_config(n, args) for n in names}          # bad arm names fail before the model loads
    arms_dir = args.output_dir / "arms"
    arms_dir.mkdir(parents=True, exist_ok=True)
    meta_path = args.output_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"arms": []}
    settings = {"tasks": args.tasks, "limit": args.limit, "group_size": args.group_size, "residual": args.residual,
                "sink": args.sink}
    stale = {k: meta.get(k) for k, v in settings.items() if k in meta and meta[k] != v}
    if not args.render and meta.get("arms") and stale:   # a saved arm is skipped only if made the same way
        raise SystemExit(f"evals/kv.py: error: {args.output_dir} holds arms made with "
                         + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in stale.items()) + ": use another --output-dir")
    if not args.render:
        meta.update({"model": args.model, **settings, "calibration": args.calibration})
        command = "python evals/kv.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
        if not args.speed_only:
            record_command(meta, command)   # before "command" is overwritten: a directory from before the list
        meta["speed_command" if args.speed_only else "command"] = command
    if not args.render:   # --render only re-writes kv.md: it adds no arm names (the defaults, without --arms)
        meta["arms"] = meta["arms"] + [n for n in names if n not in meta["arms"]]
    speed_path = args.output_dir / "speed.json"
    if not args.render:
        atomic_write_json(meta_path, meta)
        torch.set_num_threads(args.threads)
        model, tokenizer = load_model(args.model)
        report = load_report(args.calibration)
        if args.ppl_windows and not args.speed_only:
            if meta.get("ppl_seq_len", args.ppl_seq_len) != args.ppl_seq_len:
                raise SystemExit(f"evals/kv.py: error: {args.output_dir} holds perplexities of --ppl-seq-len "
                                 f"{meta['ppl_seq_len']}: use another --output-dir")
            meta["ppl_seq_len"] = args.ppl_seq_len
            atomic_write_json(meta_path, meta)
            windows = D.token_windows(D.load_texts(), tokenizer, samples=args.ppl_windows, seq_len=args.ppl_seq_len,
                                      seed=12345)
            for name in ["fp"] + [n for n in names if n != "fp"]:
                path = arms_dir / f"{name}.ppl.json"
                if path.exists() and len(json.loads(path.read_text())["nll"]) == len(windows):
                    continue
                t0 = time.perf_counter()
                factory = KVCacheFactory(model, report, KVConfig(**configs[name])) if configs.get(name) else None
                atomic_write_json(path, {"nll": window_nll(model, windows, factory), "seq_len": args.ppl_seq_len})
                print(f"{name}: perplexity done ({time.perf_counter() - t0:.0f} s)", flush=True)
        for name in [] if args.speed_only else names:
            path = arms_dir / f"{name}.json"
            if path.exists():
                continue
            t0 = time.perf_counter()
            r = evaluate(args.model, args.tasks, model=model, tokenizer=tokenizer, limit=args.limit, report=report,
                         kv=configs[name], progress=False)
            atomic_write_json(path, r)
            print(f"{name}: " + ", ".join(f"{t} {100 * x['acc']:.0f}" for t, x in r["tasks"].items())
                  + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.speed_rounds > 0:
            t0 = time.perf_counter()
            old = json.loads(speed_path.read_text())["arms"] if speed_path.exists() else {}

            def save(speed):
                speed["arms"] = {**{n: v for n, v in old.items() if n not in speed["arms"]}, **speed["arms"]}
                atomic_write_json(speed_path, speed)
            speed = decode_speed(model, tokenizer, {"fp": None, **{n: c for n, c in configs.items() if c}}, report,
                                 args.speed_prompt, args.speed_new, args.speed_rounds, on_round=save)
            print(f"decode speed ({time.perf_counter() - t0:.0f} s): " + ", ".join(
                f"{n} {v['vs_dense_median']:.2f}x" for n, v in speed["arms"].items()), flush=True)
    atomic_write_json(meta_path, meta)
    results = {n: json.loads((arms_dir / f"{n}.json").read_text()) for n in meta["arms"]
               if (arms_dir / f"{n}.json").exists()}
    speed = json.loads(speed_path.read_text()) if speed_path.exists() else None
    ppl = {n: json.loads((arms_dir / f"{n}.ppl.json").read_text()) for n in ["fp", *meta["arms"]]
           if (arms_dir / f"{n}.ppl.json").exists()}
    if results:
        atomic_write_text(args.output_dir / "kv.md", render(results, meta, speed, ppl))
        print(f"wrote {args.output_dir / 'kv.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
