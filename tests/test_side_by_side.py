"""evals/side_by_side.py: two compare runs' group accuracies and contrasts in one table, numbers read from their CSVs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("side_by_side", Path(__file__).parents[1] / "evals" / "side_by_side.py")
sbs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sbs)


def _run(folder: Path, acc: float, diff: float, lo: float, hi: float) -> Path:
    folder.mkdir()
    (folder / "groups.csv").write_text("method,group,acc,stderr,tasks,n\n"
                                       f"fp32,contextual,0.9,0.01,7,700\nprot,contextual,{acc},0.02,6,600\n")
    (folder / "contrasts.csv").write_text(
        "method,baseline,task,group,diff,stderr,ci95_lo,ci95_hi,n\n"
        f"prot,fp32,contextual (mean),contextual,{diff},0.01,{lo},{hi},600\n"
        "prot,fp32,passkey_256,contextual,-0.5,0.05,-0.6,-0.4,100\n")   # a task row: not a group contrast
    return folder


def test_side_by_side_reads_each_runs_numbers(tmp_path):
    runs = {"A": sbs.read_run(_run(tmp_path / "a", 0.5, -0.4, -0.45, -0.35)),
            "B": sbs.read_run(_run(tmp_path / "b", 0.8, -0.01, -0.03, 0.01))}
    text = sbs.render(runs)
    assert "| prot | 50.0 ± 2.0 (6) | 80.0 ± 2.0 (6) | - | - |" in text
    assert "| prot − fp32 | **-40.0** [-45.0, -35.0] | -1.0 [-3.0, +1.0] | - | - |" in text
    assert "passkey" not in text


def test_a_missing_run_is_named(tmp_path):
    with pytest.raises(SystemExit, match="groups.csv is missing"):
        sbs.main([f"A={tmp_path}"])
