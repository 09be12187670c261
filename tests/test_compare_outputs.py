"""Pure output helpers: group means with standard errors, the CSV text, the Markdown table, the plots."""
from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest

from mvquant.compare.outputs import (GROUP_COLUMNS, RESULT_COLUMNS, contrast_rows, group_mean, group_rows, markdown,
                                     plot_groups, to_csv)


def test_group_mean_matches_a_simulation_of_independent_tasks():
    accs, ses = [0.9, 0.5, 0.2], [0.03, 0.05, 0.04]
    mean, se = group_mean(accs, ses)
    assert mean == pytest.approx(np.mean(accs))
    # independent estimate: Monte Carlo of the mean of three independent normal estimates
    rng = np.random.default_rng(0)
    draws = rng.normal(accs, ses, size=(200_000, 3)).mean(axis=1)
    assert se == pytest.approx(draws.std(), rel=0.01)
    assert group_mean([0.5], [0.1]) == (0.5, 0.1)
    assert group_mean([0.5, 0.7], [0.1, None]) == (pytest.approx(0.6), None)
    with pytest.raises(ValueError):
        group_mean([], [])


ROWS = [
    {"method": "a", "task": "t1", "group": "contextual", "acc": 0.8, "stderr": 0.04, "n": 100, "bits_per_weight": 4.5},
    {"method": "a", "task": "t2", "group": "contextual", "acc": 0.6, "stderr": 0.05, "n": 100, "bits_per_weight": 4.5},
    {"method": "a", "task": "t3", "group": "parametric", "acc": 0.3, "stderr": 0.046, "n": 100, "bits_per_weight": 4.5},
    {"method": "b", "task": "t1", "group": "contextual", "acc": 0.2, "stderr": 0.04, "n": 100, "bits_per_weight": None},
    {"method": "b", "task": "t2", "group": "contextual", "acc": 0.4, "stderr": 0.049, "n": 100, "bits_per_weight": None},
    {"method": "b", "task": "t3", "group": "parametric", "acc": 0.3, "stderr": 0.046, "n": 100, "bits_per_weight": None},
]


def test_group_rows_and_csv_round_trip():
    groups = group_rows(ROWS)
    assert [(g["method"], g["group"]) for g in groups] == [("a", "contextual"), ("a", "parametric"),
                                                          ("b", "contextual"), ("b", "parametric")]
    assert groups[0]["acc"] == pytest.approx(0.7)
    assert groups[0]["stderr"] == pytest.approx(math.hypot(0.04, 0.05) / 2)
    assert groups[2]["acc"] == pytest.approx(0.3) and groups[2]["n"] == 200 and groups[2]["tasks"] == 2
    back = list(csv.DictReader(io.StringIO(to_csv(ROWS, RESULT_COLUMNS))))
    assert list(back[0]) == RESULT_COLUMNS
    assert [float(r["acc"]) for r in back] == [r["acc"] for r in ROWS]
    assert back[3]["bits_per_weight"] == ""                       # None -> empty cell
    gback = list(csv.DictReader(io.StringIO(to_csv(groups, GROUP_COLUMNS))))
    assert float(gback[1]["stderr"]) == pytest.approx(0.046)


def test_markdown_table():
    md = markdown(ROWS, group_rows(ROWS), title="demo")
    lines = md.splitlines()
    assert lines[0] == "## demo"
    assert lines[2] == "| method | bits/weight | contextual (mean) | parametric (mean) | t1 | t2 | t3 |"
    assert lines[4] == "| a | 4.50 | 0.700 ± 0.032 | 0.300 ± 0.046 | 0.800 ± 0.040 | 0.600 ± 0.050 | 0.300 ± 0.046 |"
    assert lines[5].startswith("| b |  | 0.300 ± 0.032 |")


def test_figure5_bars_have_the_group_means_and_95_percent_error_bars():
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt
    from mvquant.compare.outputs import Z95, bars_figure, group_series

    groups = group_rows(ROWS)
    series, methods = group_series(groups)
    assert methods == ["a", "b"] and list(series) == ["contextual", "parametric"]
    fig = bars_figure(series, methods, title="t", ylabel="acc")
    ax = fig.axes[0]
    from matplotlib.container import BarContainer
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 2
    for container, name in zip(bars, series):
        heights = [bar.get_height() for bar in container.patches]
        want = [g["acc"] for g in groups if g["group"] == name]
        assert heights == pytest.approx(want)
        segments = container.errorbar.lines[2][0].get_segments()
        half = [(seg[1][1] - seg[0][1]) / 2 for seg in segments]
        assert half == pytest.approx([Z95 * g["stderr"] for g in groups if g["group"] == name])
    plt.close(fig)
    img = mpimg.imread(io.BytesIO(plot_groups(groups, title="demo")), format="png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300


def test_paired_contrasts_match_numpy():
    rng = np.random.default_rng(1)
    rows = []
    for method, p in (("base", 0.7), ("q", 0.5)):
        for task, group, n in (("t1", "contextual", 40), ("t2", "contextual", 30), ("t3", "parametric", 50)):
            correct = [int(x) for x in rng.random(n) < p]
            rows.append({"method": method, "task": task, "group": group, "acc": float(np.mean(correct)),
                         "stderr": 0.0, "n": n, "correct": correct})
    out = contrast_rows(rows, [("q", "base"), ("q", "missing")])
    assert [c["task"] for c in out] == ["t1", "t2", "t3", "contextual (mean)", "parametric (mean)"]
    by = {(r["method"], r["task"]): np.array(r["correct"], dtype=float) for r in rows}
    for c in out[:3]:
        d = by[("q", c["task"])] - by[("base", c["task"])]
        assert c["diff"] == pytest.approx(d.mean())
        assert c["stderr"] == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))
        assert c["ci95_lo"] == pytest.approx(d.mean() - 1.959964 * c["stderr"])
    ctx = out[3]
    assert ctx["diff"] == pytest.approx((out[0]["diff"] + out[1]["diff"]) / 2)
    assert ctx["stderr"] == pytest.approx(math.hypot(out[0]["stderr"], out[1]["stderr"]) / 2)
    assert out[4]["diff"] == pytest.approx(out[2]["diff"]) and out[4]["n"] == 50
    # no per-item scores: no contrast rather than a wrong one
    assert contrast_rows([{**r, "correct": None} for r in rows], [("q", "base")]) == []
