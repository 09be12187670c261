"""QK-norm models (Gemma 3, Qwen3): which statistic should pick the W_q / W_k rows to protect, Q/K as
the projections emit them (before q_norm / k_norm) or as attention reads them (after the norm)?

    flock /tmp/mvquant-heavy.lock python evals/qknorm.py --model gemma3-270m \
        --calibration evals/results/gemma3-270m/calibration.json --output-dir evals/results/gemma3-270m

Per layer and for Q and K: the top-k RoPE pairs per head by the pre-norm and by the post-norm
statistic (the calibration report holds both), and a seeded random control with as many pairs
(never a selected one). W_q / W_k are fake-quantized (RTN, asymmetric, --bits, --group-size) except
the protected rows, and the error is measured where attention and the KV cache read Q/K: after the
norm (RoPE is a rotation of each pair, so the same error after it), on other text windows than the
calibration's (--seed). Per (layer, kind): relative error ||X_hat - X||_F / ||X||_F; arms are compared
by paired differences over the layers (mean +- se, n = layers).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
from pathlib import Path

import torch

from mvquant import calibrate, load_model, load_report
from mvquant.calibration import data as D
from mvquant.calibration import stats as S
from mvquant.evaluation.stats import mean_stderr, paired_difference
from mvquant.io import atomic_write_json, atomic_write_text
from mvquant.models import get_layout
from mvquant.quantization.core import fake_quantize

ARMS = ("none", "pre-norm", "post-norm", "random")


def top_pairs(m: torch.Tensor, k: int, rotary_dim: int, pairing: str) -> list[set[int]]:
    """Per head, the k RoPE pairs of largest pair norm sqrt(M_d^2 + M_partner^2)."""
    out = []
    for row in m:
        norms = {}
        for d in range(rotary_dim):
            i = S.pair_index(d, rotary_dim, pairing)
            norms[i] = norms.get(i, 0.0) + float(row[d]) ** 2
        out.append(set(sorted(norms, key=norms.get, reverse=True)[:k]))
    return out


def pair_dims(pairs: set[int], rotary_dim: int, pairing: str) -> list[int]:
    return sorted(d for d in range(rotary_dim) if S.pair_index(d, rotary_dim, pairing) in pairs)


def capture_attention_inputs(model, layout, seqs) -> dict[int, torch.Tensor]:
    """The hidden states entering each layer's q/k projections, [tokens, hidden]."""
    xs: dict[int, list[torch.Tensor]] = {i: [] for i in range(layout.num_layers)}
    handles = []
    for i in range(layout.num_layers):
        proj = getattr(layout.attention(model, i), layout.spec.q)
        handles.append(proj.register_forward_pre_hook(lambda _m, args, i=i: xs[i].append(args[0].detach().flatten(0, 1))))
    try:
        with torch.inference_mode():
            for s in seqs:
                getattr(model, "base_model", model)(input_ids=torch.tensor([s]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v) for i, v in xs.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--calibration", help="report with pre- and post-norm statistics (default: calibrate 32 x 512)")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--top-k", default="1,4", help="pairs protected per head, comma-separated")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=1, help="text windows (calibration uses seed 0)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model, tokenizer = load_model(args.model)
    layout = get_layout(model)
    if not layout.has_qk_norm:
        raise SystemExit(f"{args.model} has no per-head Q/K norm: nothing to compare")
    report = (load_report(args.calibration) if args.calibration
              else calibrate(model, tokenizer, seq_len=args.seq_len, progress=False))
    rd, pairing = layout.rotary_dim, layout.pairing
    seqs = D.token_windows(D.load_texts(D.DEFAULT_SOURCE), tokenizer, samples=args.windows, seq_len=args.seq_len,
                           seed=args.seed, pack=True)
    xs = capture_attention_inputs(model, layout, seqs)
    rng = random.Random(0)
    ks = [int(k) for k in args.top_k.split(",")]
    rows_out, placement = [], []
    for layer in range(layout.num_layers):
        attn = layout.attention(model, layer)
        x = xs[layer]
        for kind in ("q", "k"):
            proj, norm = getattr(attn, getattr(layout.spec, kind)), getattr(attn, getattr(layout.spec, f"{kind}_norm"))
            heads = layout.heads(kind)
            w = proj.weight.detach().float()
            with torch.inference_mode():
                ref = norm(torch.nn.functional.linear(x, w).view(-1, heads, layout.head_dim))
            m_pre, m_post = report.norm(layer, f"{kind}_prenorm"), report.norm(layer, kind)
            pre1, post1 = top_pairs(m_pre, 1, rd, pairing), top_pairs(m_post, 1, rd, pairing)
            placement.append({"layer": layer, "kind": kind, "rope_theta": layout.theta_of(layer),
                              "pre_top_pair": [sorted(s)[0] for s in pre1], "post_top_pair": [sorted(s)[0] for s in post1],
                              "pre_max_ratio": report.layers[layer][f"{kind}_prenorm"]["max_ratio"],
                              "post_max_ratio": report.layers[layer][kind]["max_ratio"],
                              "pre_massive": report.layers[layer][f"{kind}_prenorm"]["count"],
                              "post_massive": report.layers[layer][kind]["count"]})
            quantized = fake_quantize(w, args.bits, args.group_size, symmetric=False)
            for k in ks:
                pre, post = top_pairs(m_pre, k, rd, pairing), top_pairs(m_post, k, rd, pairing)
                rand = []
                for h in range(heads):
                    pool = sorted(set(range(rd // 2)) - pre[h] - post[h])
                    rand.append(set(rng.sample(pool, k)))
                sel = {"none": [set() for _ in range(heads)], "pre-norm": pre, "post-norm": post, "random": rand}
                row = {"layer": layer, "kind": kind, "k": k,
                       "same_pairs": sum(len(a & b) for a, b in zip(pre, post)), "pairs": k * heads}
                for arm in ARMS:
                    wq = quantized.clone()
                    _, idx = layout.projection_rows(kind, [pair_dims(s, rd, pairing) for s in sel[arm]])
                    wq[idx] = w[idx]
                    with torch.inference_mode():
                        out = norm(torch.nn.functional.linear(x, wq).view(-1, heads, layout.head_dim))
                    row[arm] = float((out - ref).norm() / ref.norm())
                rows_out.append(row)
    summary = {}
    for k in ks:
        for kind in ("q", "k"):
            rs = [r for r in rows_out if r["k"] == k and r["kind"] == kind]
            s = {arm: mean_stderr([r[arm] for r in rs]) for arm in ARMS}
            s["post-norm minus pre-norm"] = paired_difference([r["post-norm"] for r in rs], [r["pre-norm"] for r in rs])
            s["pre-norm minus random"] = paired_difference([r["pre-norm"] for r in rs], [r["random"] for r in rs])
            s["post-norm minus random"] = paired_difference([r["post-norm"] for r in rs], [r["random"] for r in rs])
            s["same_pairs"] = [sum(r["same_pairs"] for r in rs), sum(r["pairs"] for r in rs)]
            summary[f"top{k}-{kind}"] = s
    command = "flock /tmp/mvquant-heavy.lock python evals/qknorm.py " + " ".join(map(shlex.quote, argv or sys.argv[1:]))
    out = {"command": command, "model": args.model, "bits": args.bits, "group_size": args.group_size,
           "windows": len(seqs), "seq_len": args.seq_len, "tokens": sum(map(len, seqs)), "placement": placement,
           "rows": rows_out, "summary": summary}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output_dir / "qknorm.json", out)
    atomic_write_text(args.output_dir / "qknorm.md", render(out))
    print(render(out))
    return 0


def render(out: dict) -> str:
    def ms(x):
        return f"{100 * x[0]:.2f} ± {100 * x[1]:.2f}"
    lines = [f"# Pre- vs post-norm selection of protected W_q/W_k rows on {out['model']}", "",
             f"Command: `{out['command']}`", "",
             f"RTN w{out['bits']} g{out['group_size']} (asymmetric) on W_q / W_k only; error of Q/K where attention reads "
             f"them (after q_norm/k_norm; RoPE rotates pairs, so the same after it), {out['tokens']} held-out tokens. "
             "Relative error in % (mean ± se over layers, n = layers); differences are paired over layers.", "",
             "| protect | kind | same pairs pre/post | none | pre-norm | post-norm | random | post − pre | post − random |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, s in out["summary"].items():
        k, kind = key.split("-")
        lines.append(f"| {k} pairs/head | {kind.upper()} | {s['same_pairs'][0]}/{s['same_pairs'][1]} | {ms(s['none'])} | "
                     f"{ms(s['pre-norm'])} | {ms(s['post-norm'])} | {ms(s['random'])} | "
                     f"{ms(s['post-norm minus pre-norm'])} | {ms(s['post-norm minus random'])} |")
    lines += ["", "Where the largest pair sits, per layer (head-wise top-1 pair index; pair i has wavelength "
              "2π·base^(2i/R) tokens):", "",
              "| layer | base | kind | top pair before norm | after norm | max ratio before | after | massive dims before | after |",
              "|---:|---:|---|---|---|---:|---:|---:|---:|"]
    for r in out["placement"]:
        lines.append(f"| {r['layer']} | {r['rope_theta']:g} | {r['kind'].upper()} | {r['pre_top_pair']} | {r['post_top_pair']} | "
                     f"{r['pre_max_ratio']:.1f} | {r['post_max_ratio']:.1f} | {r['pre_massive']} | {r['post_massive']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
