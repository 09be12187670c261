"""The compare engine with injected runners: caching, resume after an interruption, partial recompute,
the output-dir guard, and the numbers that reach results.csv / groups.csv."""
from __future__ import annotations

import csv
import hashlib
import json
import math

import pytest

from mvquant.compare import compare, parse_recipe
from mvquant.compare.engine import PreparedArm
from mvquant.errors import MvquantError

CATALOG = {"contextual": ["passkey", "squad"], "parametric": ["facts"]}


def recipe_data(**over):
    data = {"name": "fake", "model": "tiny", "calibration": {"samples": 2, "seq_len": 16},
            "tasks": ["contextual", "parametric"], "limit": {"default": 50, "facts": 40},
            "defaults": {"group_size": 64},
            "arms": [{"name": "fp", "method": "none"},
                     {"name": "rtn-w4", "method": "rtn", "bits": 4, "protect": "none"},
                     {"name": "mv-w3", "method": "rtn", "bits": 3, "protect": "massive"}]}
    data.update(over)
    return data


class FakeArmRunner:
    cache_id = "fake"

    def __init__(self):
        self.calls = []

    def __call__(self, arm, ctx):
        self.calls.append(arm.name)
        assert ctx.arm_dir.is_dir()
        return PreparedArm(model={"spec": arm.spec()}, tokenizer=None,
                           info={"size_bytes": 1000 * (arm.bits or 32), "n_params": 250,
                                 "bits_per_weight": 8 * 1000 * (arm.bits or 32) / 250})


class FakeTaskRunner:
    """k correct of n = limit, k from a hash of (arm spec, task); raises on call number `fail_at`."""
    cache_id = "fake"

    def __init__(self, fail_at: int | None = None):
        self.calls = []
        self.fail_at = fail_at

    @staticmethod
    def expected(spec: dict, task: str, limit: int) -> dict:
        h = int(hashlib.sha256(json.dumps([spec, task], sort_keys=True).encode()).hexdigest(), 16)
        k = h % (limit + 1)
        p = k / limit
        return {"acc": p, "stderr": math.sqrt(p * (1 - p) / (limit - 1)), "n": limit,
                "correct": [1] * k + [0] * (limit - k)}

    def __call__(self, prepared, task, *, limit, seed):
        self.calls.append((prepared.arm.name, task))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("simulated interruption")
        return self.expected(prepared.model["spec"], task, limit)


def run(tmp_path, data=None, *, fail_at=None, **kw):
    recipe = parse_recipe(data or recipe_data(), catalog=CATALOG)
    arms, tasks = FakeArmRunner(), FakeTaskRunner(fail_at)
    result = compare(recipe, tmp_path / "out", arm_runner=arms, task_runner=tasks, progress=False,
                     log=lambda *_: None, **kw)
    return result, arms, tasks


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_all_cells_computed_and_csv_holds_the_runner_numbers(tmp_path):
    result, arms, tasks = run(tmp_path)
    assert arms.calls == ["fp", "rtn-w4", "mv-w3"]
    assert len(tasks.calls) == 9 and result.computed == 9 and result.cached == 0
    recipe = parse_recipe(recipe_data(), catalog=CATALOG)
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert [(r["method"], r["task"], r["group"]) for r in rows] == [
        (a, t, g) for a in ("fp", "rtn-w4", "mv-w3")
        for t, g in (("passkey", "contextual"), ("squad", "contextual"), ("facts", "parametric"))]
    for r in rows:
        arm = recipe.arm(r["method"])
        want = FakeTaskRunner.expected(arm.spec(), r["task"], recipe.limits[r["task"]])
        assert float(r["acc"]) == pytest.approx(want["acc"], abs=1e-12)
        assert float(r["stderr"]) == pytest.approx(want["stderr"], abs=1e-12)
        assert int(r["n"]) == want["n"] == (40 if r["task"] == "facts" else 50)
        assert float(r["bits_per_weight"]) == pytest.approx(8 * 1000 * (arm.bits or 32) / 250)
        assert r["bits"] == ("" if arm.bits is None else str(arm.bits))
    # group means: unweighted over tasks, se = sqrt(sum se^2) / k, computed here independently
    groups = read_csv(tmp_path / "out" / "groups.csv")
    assert len(groups) == 6
    for g in groups:
        members = [r for r in rows if r["method"] == g["method"] and r["group"] == g["group"]]
        accs = [float(r["acc"]) for r in members]
        ses = [float(r["stderr"]) for r in members]
        assert float(g["acc"]) == pytest.approx(sum(accs) / len(accs))
        assert float(g["stderr"]) == pytest.approx(math.sqrt(sum(s * s for s in ses)) / len(ses))
        assert int(g["tasks"]) == len(members) and int(g["n"]) == sum(int(r["n"]) for r in members)
    # paired contrasts: every arm vs the first; the per-task difference of the same items' scores
    contrasts = read_csv(tmp_path / "out" / "contrasts.csv")
    assert {(c["method"], c["baseline"]) for c in contrasts} == {("rtn-w4", "fp"), ("mv-w3", "fp")}
    acc = {(r["method"], r["task"]): float(r["acc"]) for r in rows}
    for c in contrasts:
        if not c["task"].endswith("(mean)"):
            assert float(c["diff"]) == pytest.approx(acc[(c["method"], c["task"])] - acc[(c["baseline"], c["task"])])
    md = (tmp_path / "out" / "results.md").read_text()
    assert "Paired differences" in md
    first = rows[0]
    assert f"{float(first['acc']):.3f} ± {float(first['stderr']):.3f}" in md
    for png in ("figure5.png", "tasks.png"):
        data = (tmp_path / "out" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_resume_after_interruption_computes_only_the_missing_cells(tmp_path):
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run(tmp_path, fail_at=5)   # cells 1-4 finished, the 5th (rtn-w4 x squad) failed
    assert not (tmp_path / "out" / "results.csv").exists()   # no half-written outputs
    result, arms, tasks = run(tmp_path)
    assert result.cached == 4 and result.computed == 5
    assert tasks.calls == [("rtn-w4", "squad"), ("rtn-w4", "facts"),
                           ("mv-w3", "passkey"), ("mv-w3", "squad"), ("mv-w3", "facts")]
    assert arms.calls == ["rtn-w4", "mv-w3"]     # fp was complete: its model is never made again
    fresh, _, _ = run(tmp_path / "fresh")
    assert read_csv(tmp_path / "out" / "results.csv") == [
        {**r, "eval_s": r2["eval_s"], "prepare_s": r2["prepare_s"]}
        for r, r2 in zip(read_csv(tmp_path / "fresh" / "out" / "results.csv"), read_csv(tmp_path / "out" / "results.csv"))]
    # a third run computes nothing
    again, arms3, tasks3 = run(tmp_path)
    assert again.computed == 0 and again.cached == 9 and arms3.calls == [] and tasks3.calls == []


def test_changed_arm_recomputes_only_itself(tmp_path):
    run(tmp_path)
    changed = recipe_data()
    changed["arms"][2] = {"name": "mv-w3", "method": "rtn", "bits": 4, "protect": "massive"}   # w3 -> w4
    changed["arms"][1] = {"name": "rtn-w4-renamed", "method": "rtn", "bits": 4, "protect": "none"}
    with pytest.raises(MvquantError, match="holds results of a different recipe \\('fake'\\).*--resume.*--force"):
        run(tmp_path, changed)
    result, arms, tasks = run(tmp_path, changed, resume=True)
    assert arms.calls == ["mv-w3"] and result.computed == 3 and result.cached == 6
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert [r["method"] for r in rows[::3]] == ["fp", "rtn-w4-renamed", "mv-w3"]
    # the same recipe again is accepted without flags and computes nothing
    again, _, tasks2 = run(tmp_path, changed)
    assert again.computed == 0 and tasks2.calls == []
    # --prune: the old mv-w3 (w3) arm and its cells go; what the recipe uses stays byte for byte
    out = tmp_path / "out"
    assert len(list((out / "arms").iterdir())) == 4
    kept = {p: p.read_bytes() for d in ("arms", "cells") for p in (out / d).rglob("*.json")}
    pruned, _, tasks3 = run(tmp_path, changed, prune=True)
    assert pruned.computed == 0 and tasks3.calls == []
    left = {p: p.read_bytes() for d in ("arms", "cells") for p in (out / d).rglob("*.json")}
    assert len(list((out / "arms").iterdir())) == 3 and len(list((out / "cells").iterdir())) == 3
    assert len(left) == 3 + 9 and all(kept[p] == b for p, b in left.items())
    assert read_csv(out / "results.csv") == rows


def test_refusals_leave_the_directory_untouched_and_force_starts_over(tmp_path):
    run(tmp_path)
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = recipe_data(name="other", limit=5)
    with pytest.raises(MvquantError, match="different recipe"):
        run(tmp_path, other)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    result, arms, _ = run(tmp_path, other, force=True)
    assert result.computed == 9 and result.cached == 0 and len(arms.calls) == 3
    assert {int(r["n"]) for r in read_csv(out / "results.csv")} == {5}
    assert len(list((out / "cells").rglob("*.json"))) == 9   # the old recipe's cells were discarded


def test_unrelated_nonempty_directory_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    for force in (False, True):   # --force replaces only an earlier compare run, never a foreign folder
        with pytest.raises(MvquantError, match="not empty and holds no compare results"):
            run(tmp_path, force=force)
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    nested, _, _ = run(tmp_path / "missing" / "deeper")   # parents are created
    assert nested.computed == 9 and (tmp_path / "missing" / "deeper" / "out" / "results.csv").is_file()


def test_cells_of_different_runners_never_mix(tmp_path):
    run(tmp_path)
    recipe = parse_recipe(recipe_data(), catalog=CATALOG)

    class OtherTasks(FakeTaskRunner):
        cache_id = "other"

    tasks = OtherTasks()
    result = compare(recipe, tmp_path / "out", arm_runner=FakeArmRunner(), task_runner=tasks, progress=False,
                     log=lambda *_: None)
    assert result.computed == 9 and len(tasks.calls) == 9


def test_bad_task_runner_result_is_a_clear_error(tmp_path):
    recipe = parse_recipe(recipe_data(), catalog=CATALOG)
    with pytest.raises(MvquantError, match="must return a dict with acc, stderr and n"):
        compare(recipe, tmp_path / "out", arm_runner=FakeArmRunner(), task_runner=lambda *a, **k: {"acc": 1.0},
                progress=False, log=lambda *_: None)


def test_a_new_method_revision_recomputes_only_that_methods_arms(tmp_path):
    """The arm runner's cache id may depend on the arm (the real one keys on the method's declared revision):
    bumping the RTN revision recomputes the RTN arms and keeps the unquantized arm's cells."""
    run(tmp_path)
    recipe = parse_recipe(recipe_data(), catalog=CATALOG)

    class RevisedArms(FakeArmRunner):
        @staticmethod
        def cache_id(arm):
            return "fake/rtn-r2" if arm.method == "rtn" else "fake"

    arms, tasks = RevisedArms(), FakeTaskRunner()
    result = compare(recipe, tmp_path / "out", arm_runner=arms, task_runner=tasks, progress=False,
                     log=lambda *_: None)
    assert sorted(arms.calls) == ["mv-w3", "rtn-w4"] and result.computed == 6


def test_real_arm_runner_keys_on_the_method_revision():
    from mvquant.compare.runners import ModelArmRunner
    from mvquant.quantization.registry import METHODS
    recipe = parse_recipe(recipe_data(), catalog=CATALOG)
    ids = {a.name: ModelArmRunner.cache_id(a) for a in recipe.arms}
    assert ids == {"fp": "mvquant", "rtn-w4": f"mvquant/rtn-r{METHODS['rtn'].revision}",
                   "mv-w3": f"mvquant/rtn-r{METHODS['rtn'].revision}"}


def test_tasks_near_chance_on_the_recipes_model_stay_in_results_but_leave_group_means(tmp_path, monkeypatch):
    from mvquant.evaluation import tasks as T

    monkeypatch.setitem(T.NEAR_CHANCE_AT_FULL_PRECISION, "smollm2-135m", {"squad": "0/40 at fp, chance 0%"})
    run(tmp_path, recipe_data(model="smollm2-135m"))
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert {r["task"]: r["excluded"] for r in rows if r["method"] == "fp"} == {
        "passkey": "", "squad": "0/40 at fp, chance 0%", "facts": ""}
    acc = {(r["method"], r["task"]): float(r["acc"]) for r in rows}
    groups = {(g["method"], g["group"]): g for g in read_csv(tmp_path / "out" / "groups.csv")}
    for method in ("fp", "rtn-w4", "mv-w3"):
        ctx = groups[(method, "contextual")]
        assert int(ctx["tasks"]) == 1 and float(ctx["acc"]) == pytest.approx(acc[(method, "passkey")])
    means = [c for c in read_csv(tmp_path / "out" / "contrasts.csv") if c["task"] == "contextual (mean)"]
    assert means and all(float(c["diff"]) == pytest.approx(acc[(c["method"], "passkey")] - acc[(c["baseline"], "passkey")])
                         for c in means)
    assert "Left out of the group means" in (tmp_path / "out" / "results.md").read_text()
    # another model's recipe keeps every task in its means
    run(tmp_path / "other", recipe_data(model="tiny"))
    groups = read_csv(tmp_path / "other" / "out" / "groups.csv")
    assert all(int(g["tasks"]) == 2 for g in groups if g["group"] == "contextual")
