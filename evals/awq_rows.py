"""Why does protecting the massive rows hurt AWQ w3 on the built-in model? (issue 21, part 1)

Decomposition at the recipe's own settings (recipes/figure5.yaml: group 128, 32 x 512 python-docs
calibration windows, the same report): quantize the model once with AWQ w3 and no protection, then
make rows exact *afterwards*, with AWQ's scales and every other code unchanged: the massive rows
(q and k, q only, k only) and as many random rows (the same selection `--protect random` makes).
The exact value of a row is the unquantized weight in AWQ's folded space, W * s, with s recovered
from the input norm the scale was folded into (s = norm before / norm after). Every variant is
scored on the same items; differences are paired against the unprotected AWQ w3 model.

    python evals/awq_rows.py --calibration evals/results/figure5/calibration/cc2c3e868d7fadf6.json \
        --output-dir evals/results/awq-w3-rows --limit 100 [--scales]

--scales also runs AWQ w3 with the massive rows protected and compares, layer by layer, the scale it
chose for the q/k/v input with the unprotected run's.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
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
from mvquant.models import get_layout
from mvquant.pipeline import quantize
from mvquant.quantization import QuantConfig, QuantLinear
from mvquant.calibration.selection import protected_rows

VARIANTS = [("awq-w3", None, ""), ("massive-qk", "massive", "qk"), ("massive-q", "massive", "q"),
            ("massive-k", "massive", "k"), ("random-qk", "random", "qk"), ("random-q", "random", "q"),
            ("random-k", "random", "k")]


def input_norms(model, layout) -> list[torch.Tensor]:
    return [layer.input_layernorm.weight.detach().float().clone() for layer in layout.decoder_layers(model)]


def awq_w3(model, tokenizer, report, args, protect: str):
    config = QuantConfig(method="awq", bits=3, group_size=args.group_size, protect=protect, seed=0,
                         calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, calib_data="python-docs")
    return quantize(model, config, report=report, tokenizer=tokenizer, progress=True)


def with_exact_rows(qlin: QuantLinear, folded: torch.Tensor, rows: torch.Tensor) -> QuantLinear:
    """The same codes and scales, with `rows` replaced by their exact (fp16) folded weights."""
    keep = torch.ones(qlin.out_features, dtype=torch.bool)
    keep[rows] = False
    zeros = qlin.zero_points()
    return QuantLinear.from_weight(folded, qlin.bias, bits=qlin.bits, group_size=qlin.group_size,
                                   symmetric=qlin.symmetric, protected_rows=rows,
                                   quantized=(qlin.codes()[keep], qlin.scales[keep],
                                              None if zeros is None else zeros[keep]))


@contextlib.contextmanager
def exact(model, rows: dict[str, torch.Tensor], folded: dict[str, torch.Tensor], which: str):
    """Swap q_proj / k_proj (as `which` says) for copies with the given rows exact; restore after."""
    swapped = {}
    for name, r in rows.items():
        if name.rsplit(".", 1)[-1][0] not in which:
            continue
        parent, attr = name.rsplit(".", 1)
        owner = model.get_submodule(parent)
        swapped[name] = (owner, attr, getattr(owner, attr))
        setattr(owner, attr, with_exact_rows(getattr(owner, attr), folded[name], r))
    try:
        yield sum(len(rows[n]) for n in swapped)
    finally:
        for owner, attr, old in swapped.values():
            setattr(owner, attr, old)


def paired(a: dict, b: dict, tasks: list[str]) -> dict:
    per = {t: S.paired_difference(a["tasks"][t]["correct"], b["tasks"][t]["correct"]) for t in tasks}
    group = S.macro_average([d for d, _ in per.values()], [s for _, s in per.values()])
    return {"tasks": per, "contextual": group}


def render(results: dict, meta: dict) -> str:
    tasks = meta["tasks_scored"]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = [f"# AWQ w3 on {meta['model']}: exact rows after quantizing", "", f"Command: `{meta['command']}`", "",
             f"AWQ w3 (group {meta['group_size']}, {meta['calib_samples']} x {meta['calib_seq_len']} calibration tokens, "
             "no protection), then the named rows set to their exact folded weights with every code and scale "
             f"unchanged. n = {meta['limit']} items per task; Δ paired on the same items against awq-w3, ± one "
             "standard error; contextual = mean of the contextual tasks scored.", "",
             "| variant | exact rows | " + " | ".join(tasks) + " | contextual | Δ contextual vs awq-w3 |",
             "|---|---:|" + "---:|" * (len(tasks) + 2)]
    base = results["awq-w3"]
    for name, r in results.items():
        cells = [pct(r["tasks"][t]["acc"]) for t in tasks]
        g = r["groups"]["contextual"]
        d = "" if name == "awq-w3" else "{:+.1f} ± {:.1f}".format(*(100 * x for x in paired(r, base, tasks)["contextual"]))
        lines.append(f"| {name} | {r['exact_rows']} | " + " | ".join(cells) + f" | {pct(g['acc'])} ± {pct(g['stderr'])} | {d} |")
    if meta.get("scales"):
        lines += ["", "## AWQ's q/k/v input scale: protected run vs unprotected run, per layer", "",
                  "| layer | ‖s_massive − s_none‖ / ‖s_none‖ | max |log(s_massive / s_none)| |", "|---:|---:|---:|"]
        for i, (rel, mx) in enumerate(meta["scales"]):
            lines.append(f"| {i} | {rel:.3f} | {mx:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", required=True, help="the report the recipe used")
    p.add_argument("--output-dir", type=Path, default=Path("evals/results/awq-w3-rows"))
    p.add_argument("--tasks", default="contextual")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--scales", action="store_true", help="also compare AWQ's scales with a protected run")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "limit": args.limit, "group_size": args.group_size, "calib_samples": args.calib_samples,
            "calib_seq_len": args.calib_seq_len, "calibration": args.calibration,
            "command": "python evals/awq_rows.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))}

    report = load_report(args.calibration)
    model, tokenizer = load_model(args.model)
    layout = get_layout(model)
    original = {n: m.weight.detach().float().clone() for n, m in model.named_modules()
                if n.endswith(("q_proj", "k_proj"))}
    norms_before = input_norms(model, layout)
    fresh = copy.deepcopy(model) if args.scales else None
    t0 = time.perf_counter()
    awq_w3(model, tokenizer, report, args, "none")
    print(f"AWQ w3: {time.perf_counter() - t0:.0f} s", flush=True)
    s_none = [b / a for b, a in zip(norms_before, input_norms(model, layout))]
    folded = {n: w * s_none[int(n.split(".layers.")[1].split(".")[0])][None, :] for n, w in original.items()}
    selections = {policy: protected_rows(model, layout, report, policy, seed=0)
                  for policy in ("massive", "random")}

    results = {}
    for name, policy, which in VARIANTS:
        path = args.output_dir / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
            continue
        rows = selections.get(policy, {})
        with exact(model, rows, folded, which) if policy else contextlib.nullcontext(0) as n_rows:
            t0 = time.perf_counter()
            r = evaluate(args.model, args.tasks, model=model, tokenizer=tokenizer, limit=args.limit, progress=False)
        r["exact_rows"] = n_rows
        atomic_write_json(path, r)
        results[name] = r
        print(f"{name} ({n_rows} exact rows): contextual {100 * r['groups']['contextual']['acc']:.1f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    meta["tasks_scored"] = list(results["awq-w3"]["tasks"])
    if args.scales:
        awq_w3(fresh, tokenizer, report, args, "massive")
        s_massive = [b / a for b, a in zip(norms_before, input_norms(fresh, layout))]
        meta["scales"] = [(float((m - n).norm() / n.norm()), float((m / n).log().abs().max()))
                          for m, n in zip(s_massive, s_none)]
    atomic_write_json(args.output_dir / "meta.json", meta)
    atomic_write_text(args.output_dir / "awq-w3-rows.md", render(results, meta))
    print(f"wrote {args.output_dir / 'awq-w3-rows.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
