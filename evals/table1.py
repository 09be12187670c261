"""The paper's Table 1 on a model: vanilla vs non-massive-disrupted vs massive-disrupted, every task.

    flock /tmp/mvquant-heavy.lock python evals/table1.py --output-dir evals/results [--top-k 1] [--limit N]

Writes <dir>/table1.json (every arm's full result, per-item correctness included) and <dir>/table1.md.
One calibration report picks the dims for both disrupted arms (saved beside the results).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from mvquant import calibrate, load_model, load_report
from mvquant.evaluation import stats as S
from mvquant.evaluation.runner import evaluate, to_markdown
from mvquant.io import atomic_write_json, atomic_write_text

ARMS = {"vanilla": None, "non-massive": "non-massive", "massive": "massive"}


def diff_row(task, base, arm):
    d, se = S.paired_difference(arm["correct"], base["correct"])
    return f"{100 * d:+.1f} ± {100 * se:.1f}"


def group_delta(base, arm, group):
    """Task mean of the paired per-task differences, se combined over the (independent) tasks."""
    parts = [S.paired_difference(arm["tasks"][t]["correct"], base["tasks"][t]["correct"])
             for t in base["groups"][group]["tasks"]]
    d, se = S.macro_average([p[0] for p in parts], [p[1] for p in parts])
    return f"**{100 * d:+.1f}** ± {100 * se:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--output-dir", type=Path, default=Path("evals/results"))
    p.add_argument("--tasks", default="contextual,parametric")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--limit", type=int)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--calibration", help="existing report; default: calibrate (32 x 512 tokens) and save it")
    p.add_argument("--render", type=Path, help="only re-write table1.md from this table1.json")
    args = p.parse_args(argv)
    if args.render:
        out = json.loads(args.render.read_text())
        atomic_write_text(args.render.with_suffix(".md"), render(out))
        return 0
    torch.set_num_threads(2)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args.model)
    if args.calibration:
        report, report_path = load_report(args.calibration), args.calibration
    else:
        report = calibrate(model, tokenizer, samples=32, seq_len=512, top_k=args.top_k)
        report_path = str(args.output_dir / "calibration.json")
        report.save(report_path)
    results = {}
    for arm in args.arms.split(","):
        t0 = time.perf_counter()
        results[arm] = evaluate(args.model, args.tasks, model=model, tokenizer=tokenizer, limit=args.limit,
                                disrupt=ARMS[arm], top_k=args.top_k if ARMS[arm] else None,
                                report=report if ARMS[arm] else None)
        print(f"## {arm} ({time.perf_counter() - t0:.0f} s)\n{to_markdown(results[arm])}\n", flush=True)
    command = "flock /tmp/mvquant-heavy.lock python evals/table1.py " + " ".join(map(shlex.quote, argv or sys.argv[1:]))
    out = {"command": command, "model": args.model, "top_k": args.top_k, "calibration": report_path,
           "arms": results}
    atomic_write_json(args.output_dir / "table1.json", out)
    atomic_write_text(args.output_dir / "table1.md", render(out))
    print(render(out))
    return 0


def render(out: dict) -> str:
    arms = out["arms"]
    names = list(arms)
    tasks = list(next(iter(arms.values()))["tasks"])
    lines = [f"# Table 1 on {out['model']}: disruption of top-{out['top_k']} Q/K dims per head, all layers", "",
             f"Command: `{out['command']}`", "",
             "Accuracy in % ± standard error (n items); Δ = arm − vanilla on the same items (paired ± se).", "",
             "| task | group | chance | " + " | ".join(names) + " | " +
             " | ".join(f"Δ {a}" for a in names if a != "vanilla") + " |",
             "|---|---|---:|" + "---:|" * len(names) + "---:|" * (len(names) - 1)]
    for t in tasks:
        first = arms[names[0]]["tasks"][t]
        cells = [f"{100 * arms[a]['tasks'][t]['acc']:.1f} ± {100 * arms[a]['tasks'][t]['stderr']:.1f} "
                 f"({arms[a]['tasks'][t]['n']})" for a in names]
        deltas = [diff_row(t, arms["vanilla"]["tasks"][t], arms[a]["tasks"][t]) for a in names
                  if a != "vanilla" and "vanilla" in arms]
        lines.append(f"| {t} | {first['group']} | {100 * first['chance']:.0f} | " + " | ".join(cells) + " | "
                     + " | ".join(deltas) + " |")
    for g in next(iter(arms.values()))["groups"]:
        cells = [f"**{100 * arms[a]['groups'][g]['acc']:.1f}** ± {100 * arms[a]['groups'][g]['stderr']:.1f}"
                 for a in names]
        deltas = [group_delta(arms["vanilla"], arms[a], g) for a in names if a != "vanilla" and "vanilla" in arms]
        lines.append(f"| **{g}** (task mean) | | {100 * arms[names[0]]['groups'][g]['chance']:.0f} | "
                     + " | ".join(cells) + " | " + " | ".join(deltas) + " |")
    secs = {a: arms[a]["seconds"] for a in names}
    lines += ["", "Wall time per arm (s): " + ", ".join(f"{a} {s:.0f}" for a, s in secs.items())]
    for a in names:
        if arms[a]["disruption"]:
            d = arms[a]["disruption"]
            lines.append(f"- {a}: {d['selection']}, {len(d['layers'])} layers, {d['dims_q']} Q + {d['dims_k']} K "
                         f"dims, single dims (pairs={d['pairs']}), dims from {d['source']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
