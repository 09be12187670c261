"""What a comparison leaves behind: results.csv, groups.csv, results.md and the PNG plots."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from ..evaluation.stats import macro_average, paired_difference
from ..io import atomic_write_bytes

RESULT_COLUMNS = ["method", "task", "group", "acc", "stderr", "n", "ci95_lo", "ci95_hi", "chance", "quant_method", "bits", "group_size", "protect",
                  "disrupt", "bits_per_weight", "size_mb", "prepare_s", "eval_s", "limit", "excluded"]
GROUP_COLUMNS = ["method", "group", "acc", "stderr", "tasks", "n"]
CONTRAST_COLUMNS = ["method", "baseline", "task", "group", "diff", "stderr", "ci95_lo", "ci95_hi", "n"]
Z95 = 1.959964


def group_mean(accs: list[float], stderrs: list[float | None]) -> tuple[float, float | None]:
    """Unweighted mean of task accuracies and its standard error, tasks taken as independent:
    se = sqrt(sum se_i^2) / k. None when any task has no standard error."""
    if any(s is None for s in stderrs):
        return sum(accs) / len(accs), None
    return macro_average(accs, stderrs)


def in_group_mean(row: dict) -> bool:
    """Tasks near chance at full precision on the recipe's model (row['excluded'] says why) stay in
    every table but out of group means and group-level contrasts."""
    return not row.get("excluded")


def group_rows(rows: list[dict]) -> list[dict]:
    """Per (method, group): the mean accuracy over the group's tasks, in the order rows first show them."""
    order: dict[tuple[str, str], list[dict]] = {}
    for r in filter(in_group_mean, rows):
        order.setdefault((r["method"], r["group"]), []).append(r)
    out = []
    for (method, group), rs in order.items():
        acc, se = group_mean([r["acc"] for r in rs], [r["stderr"] for r in rs])
        out.append({"method": method, "group": group, "acc": acc, "stderr": se, "tasks": len(rs),
                    "n": sum(r["n"] for r in rs)})
    return out


GROUP_ROW = " (mean)"   # a contrast row whose task is "<group> (mean)" is the group-level difference


def is_group_contrast(row: dict) -> bool:
    return row["task"].endswith(GROUP_ROW)


def excludes_zero(lo: float, hi: float) -> bool:
    """Whether a 95% interval [lo, hi] excludes zero (how results mark a contrast as significant)."""
    return lo > 0 or hi < 0


def contrast_rows(rows: list[dict], pairs: list[tuple[str, str]]) -> list[dict]:
    """Per (method, baseline) pair: the paired accuracy difference per task (same items, per-item
    scores), and per group the unweighted mean over tasks with se = sqrt(sum se^2) / k.
    Pairs whose cells lack per-item scores or cover different items are skipped."""
    by = {(r["method"], r["task"]): r for r in rows}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    out = []
    for method, baseline in pairs:
        per_task = []
        for t in tasks:
            a, b = by.get((method, t)), by.get((baseline, t))
            if not a or not b or not a.get("correct") or not b.get("correct") or len(a["correct"]) != len(b["correct"]):
                per_task = None
                break
            d, se = paired_difference(a["correct"], b["correct"])
            per_task.append({"method": method, "baseline": baseline, "task": t, "group": a["group"], "diff": d,
                             "stderr": se, "n": len(a["correct"]), "excluded": a.get("excluded")})
        if not per_task:
            continue
        groups: dict[str, list[dict]] = {}
        for r in filter(in_group_mean, per_task):
            groups.setdefault(r["group"], []).append(r)
        for g, rs in groups.items():
            d, se = group_mean([r["diff"] for r in rs], [r["stderr"] for r in rs])
            per_task.append({"method": method, "baseline": baseline, "task": f"{g}{GROUP_ROW}", "group": g, "diff": d,
                             "stderr": se, "n": sum(r["n"] for r in rs)})
        for r in per_task:
            r["ci95_lo"], r["ci95_hi"] = r["diff"] - Z95 * r["stderr"], r["diff"] + Z95 * r["stderr"]
        out += per_task
    return out


def contrasts_markdown(contrasts: list[dict]) -> str:
    """Group-level paired differences, with 95% intervals and whether the interval excludes zero."""
    lines = ["| method | vs | group | Δ acc | 95% CI | excludes 0 |", "|---|---|---|---:|---|---|"]
    for c in contrasts:
        if not is_group_contrast(c):
            continue
        sign = "yes" if excludes_zero(c["ci95_lo"], c["ci95_hi"]) else "no"
        lines.append(f"| {c['method']} | {c['baseline']} | {c['group']} | {c['diff']:+.3f} | "
                     f"[{c['ci95_lo']:+.3f}, {c['ci95_hi']:+.3f}] | {sign} |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    return buf.getvalue()


def _fmt(acc: float, se: float | None) -> str:
    return f"{acc:.3f} ± {se:.3f}" if se is not None else f"{acc:.3f}"


def markdown(rows: list[dict], groups: list[dict], *, title: str = "", arm_infos: dict | None = None) -> str:
    """One row per method: each group's mean, then each task, as acc ± stderr; plus size and bits/param."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    group_names = list(dict.fromkeys(g["group"] for g in groups))
    by_cell = {(r["method"], r["task"]): r for r in rows}
    by_group = {(g["method"], g["group"]): g for g in groups}
    first = {m: next(r for r in rows if r["method"] == m) for m in methods}
    head = ["method", "bits/weight", *[f"{g} (mean)" for g in group_names], *tasks]
    lines = []
    if title:
        lines += [f"## {title}", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        bpp = first[m].get("bits_per_weight")
        cells = [m, "" if bpp is None else f"{bpp:.2f}"]
        cells += [_fmt(by_group[(m, g)]["acc"], by_group[(m, g)]["stderr"]) if (m, g) in by_group else ""
                  for g in group_names]
        cells += [_fmt(by_cell[(m, t)]["acc"], by_cell[(m, t)]["stderr"]) if (m, t) in by_cell else "" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    ns = {t: next(r["n"] for r in rows if r["task"] == t) for t in tasks}
    lines += ["", "acc ± standard error; group means are unweighted over tasks. Examples per task: "
              + ", ".join(f"{t} {n}" for t, n in ns.items()) + "."]
    left_out = {r["task"]: r["excluded"] for r in rows if not in_group_mean(r)}
    if left_out:
        lines += ["", "Left out of the group means (near chance at full precision on this model): "
                  + "; ".join(f"{t} ({why})" for t, why in left_out.items()) + "."]
    if arm_infos:
        def sec(v):
            return "" if v is None else f"{v:.1f}"

        lines += ["", "| method | size (MiB) | quantize (s) | prepare (s) | wall (s) |", "|---|---:|---:|---:|---:|"]
        for m in methods:
            info = arm_infos.get(m) or {}
            size = info.get("size_bytes")
            lines.append(f"| {m} | {'' if size is None else f'{size / 2**20:.1f}'} | {sec(info.get('quantize_s'))} | "
                         f"{sec(info.get('prepare_s'))} | {sec(info.get('wall_s'))} |")
        lines += ["", "size: quantized linears as stored plus every other tensor as held in memory; "
                  "prepare: load + calibrate + quantize + save; wall: prepare + this run's evaluations."]
    return "\n".join(lines) + "\n"


def _figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def bars_figure(series: dict[str, list[tuple[float, float | None]]], labels: list[str], *, title: str, ylabel: str):
    """Grouped bars: one cluster per label, one bar per series (acc, stderr), 95% error bars (1.96 x stderr)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(series)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) * max(1, n) * 0.6 + 2), 4.2))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
        ys = [v[0] for v in values]
        err = [Z95 * v[1] if v[1] is not None else 0.0 for v in values]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.18)  # room for the legend above full bars
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper center", ncol=min(n, 6))
    ax.grid(axis="y", alpha=0.3)
    return fig


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    data = _figure_bytes(fig)
    plt.close(fig)
    return data


def group_series(groups: list[dict]) -> tuple[dict, list[str]]:
    """{group: [(acc, stderr) per method]}, [methods]: the data of the Figure-5 plot."""
    methods = list(dict.fromkeys(g["method"] for g in groups))
    names = list(dict.fromkeys(g["group"] for g in groups))
    by = {(g["method"], g["group"]): (g["acc"], g["stderr"]) for g in groups}
    return {name: [by.get((m, name), (math.nan, None)) for m in methods] for name in names}, methods


def plot_groups(groups: list[dict], *, title: str = "") -> bytes:
    """Figure-5 style: per method, contextual vs parametric mean accuracy with 95% intervals."""
    series, methods = group_series(groups)
    return _png(bars_figure(series, methods, title=title or "contextual vs parametric",
                            ylabel="accuracy (mean over tasks, 95% CI)"))


def plot_tasks(rows: list[dict], *, title: str = "") -> bytes:
    """Per task, one bar per method, 95% intervals."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    by = {(r["method"], r["task"]): (r["acc"], r["stderr"]) for r in rows}
    series = {m: [by.get((m, t), (math.nan, None)) for t in tasks] for m in methods}
    return _png(bars_figure(series, tasks, title=title or "accuracy per task", ylabel="accuracy (95% CI)"))


def write_outputs(root: str | Path, rows: list[dict], *, title: str = "", arm_infos: dict | None = None,
                  contrasts: list[tuple[str, str]] = ()) -> dict:
    """Write every output file atomically; return {name: path}."""
    root = Path(root)
    groups = group_rows(rows)
    diffs = contrast_rows(rows, list(contrasts))
    md = markdown(rows, groups, title=title, arm_infos=arm_infos)
    if diffs:
        md += ("\n### Paired differences (same items; per-task se from per-item scores)\n\n"
               + contrasts_markdown(diffs))
    files = {
        "results.csv": to_csv(rows, RESULT_COLUMNS).encode(),
        "groups.csv": to_csv(groups, GROUP_COLUMNS).encode(),
        "contrasts.csv": to_csv(diffs, CONTRAST_COLUMNS).encode(),
        "results.md": md.encode(),
        "figure5.png": plot_groups(groups, title=title),
        "tasks.png": plot_tasks(rows, title=title),
    }
    for name, data in files.items():
        atomic_write_bytes(root / name, data)
    return {name: root / name for name in files}
