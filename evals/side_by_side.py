"""Two (or more) `mvquant compare` runs of the same recipe arms side by side: group accuracy per arm and
the paired group contrasts with 95% intervals, one column per model, read from each run's groups.csv
and contrasts.csv (so the numbers are the runs' own, not copied by hand).

    python evals/side_by_side.py SmolLM2=evals/results/figure5 Gemma=evals/results/gemma3-270m/figure5 \
        --output evals/results/figure5-two-models.md
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from mvquant.compare.outputs import excludes_zero, is_group_contrast
from mvquant.io import atomic_write_text

GROUPS = ("contextual", "parametric")


def read_run(folder: Path) -> dict:
    """{'groups': {(arm, group): row}, 'contrasts': {(arm, baseline, group): row}, 'arms': [...]} of one run."""
    for name in ("groups.csv", "contrasts.csv"):
        if not (folder / name).exists():
            raise SystemExit(f"side_by_side: error: {folder / name} is missing: give a finished `mvquant compare` "
                             "output folder")
    with open(folder / "groups.csv") as f:
        groups = list(csv.DictReader(f))
    with open(folder / "contrasts.csv") as f:
        contrasts = [r for r in csv.DictReader(f) if is_group_contrast(r)]
    arms = list(dict.fromkeys(r["method"] for r in groups))
    return {"arms": arms,
            "groups": {(r["method"], r["group"]): r for r in groups},
            "contrasts": {(r["method"], r["baseline"], r["group"]): r for r in contrasts}}


def accuracy_cell(row: dict | None) -> str:
    if row is None:
        return "-"
    return f"{100 * float(row['acc']):.1f} ± {100 * float(row['stderr']):.1f} ({row['tasks']})"


def contrast_cell(row: dict | None) -> str:
    if row is None:
        return "-"
    d, lo, hi = (100 * float(row[k]) for k in ("diff", "ci95_lo", "ci95_hi"))
    sign = "**" if excludes_zero(lo, hi) else ""
    return f"{sign}{d:+.1f}{sign} [{lo:+.1f}, {hi:+.1f}]"


def render(runs: dict[str, dict]) -> str:
    labels = list(runs)
    arms = list(dict.fromkeys(a for r in runs.values() for a in r["arms"]))
    head = "| arm | " + " | ".join(f"{m} {g}" for g in GROUPS for m in labels) + " |"
    rule = "|---|" + "---:|" * (len(GROUPS) * len(labels))
    lines = ["Group accuracy in % ± standard error (tasks in the mean):", "", head, rule]
    for a in arms:
        lines.append(f"| {a} | " + " | ".join(accuracy_cell(runs[m]["groups"].get((a, g))) for g in GROUPS
                                              for m in labels) + " |")
    pairs = list(dict.fromkeys((a, b) for r in runs.values() for (a, b, _) in r["contrasts"]))
    pairs = [p for p in pairs if p[1] != "fp32"] + [p for p in pairs if p[1] == "fp32"]
    lines += ["", "Paired group contrasts in points, 95% interval (bold: excludes zero):", "", head.replace("arm", "contrast"),
              rule]
    for a, b in pairs:
        lines.append(f"| {a} − {b} | " + " | ".join(contrast_cell(runs[m]["contrasts"].get((a, b, g)))
                                                    for g in GROUPS for m in labels) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="LABEL=COMPARE_OUTPUT_DIR")
    p.add_argument("--output", type=Path, help="write the markdown here (default: print it)")
    args = p.parse_args(argv)
    runs = {}
    for spec in args.runs:
        label, sep, folder = spec.partition("=")
        if not sep:
            raise SystemExit(f"side_by_side: error: '{spec}' is not LABEL=DIR")
        runs[label] = read_run(Path(folder))
    text = render(runs)
    if args.output:
        atomic_write_text(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
