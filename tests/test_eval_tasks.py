"""The bundled task suite: generators deterministic and well-formed, YAMLs consistent, task
resolution, statistics, and scoring of hand-made lm-eval outputs."""
from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest

from mvquant.errors import MvquantError
from mvquant.evaluation import stats as S
from mvquant.evaluation import tasks as T
from mvquant.evaluation.runner import _task_result, check_limit, summarise_groups, to_markdown

EVALS = Path(__file__).resolve().parents[1] / "evals"


def _generator():
    spec = importlib.util.spec_from_file_location("mvquant_evals_generate", EVALS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_generators_are_deterministic_and_shipped_files_current():
    gen = _generator()
    a, b = gen.build_all(), gen.build_all()
    assert a == b
    for name, rows in a.items():
        shipped = (EVALS / "data" / f"{name}.jsonl").read_text(encoding="utf-8")
        assert shipped == gen.dumps(rows), f"{name}.jsonl is stale: run python evals/generate.py"


def test_rows_are_well_formed():
    gen = _generator()
    suite = T.suite()
    data = gen.build_all()
    assert set(data) == set(suite)
    for name, rows in data.items():
        assert len(rows) >= (100 if name == "passkey_512" else 200), name
        assert [r["id"] for r in rows] == list(range(len(rows)))
        assert len({r["context"] for r in rows}) > 0.5 * len(rows), f"{name}: too many repeated prompts"
        for r in rows:
            assert r["context"] == r["context"].rstrip(), "a trailing space would split the answer's token"
            if suite[name]["output_type"] == "loglikelihood":
                assert r["target"].isdigit() and r["target"] in r["context"]
                assert r["context"].count(r["target"]) == 2       # the needle states the key twice
            else:
                choices = r["choices"]
                assert len(set(choices)) == len(choices) == round(1 / suite[name]["chance"])
                assert 0 <= r["answer"] < len(choices)


def test_contextual_answers_are_in_context_and_distractors_too():
    data = _generator().build_all()
    for r in data["kv_retrieval"] + data["multifact"]:
        assert all(c in r["context"] for c in r["choices"])     # copying alone is at chance
    for r in data["knowledge_conflict"]:
        right = r["choices"][r["answer"]]
        assert right in r["context"] and right != r["memorised"] and r["memorised"] in r["choices"]
    for r in data["reading_qa"]:
        if r["kind"] != "day":
            assert sum(c in r["context"] for c in r["choices"]) == 2


def test_passkey_lengths_grow():
    data = _generator().build_all()
    means = [sum(len(r["context"]) for r in data[n]) / len(data[n]) for n in ("passkey_128", "passkey_256", "passkey_512")]
    assert means[0] * 1.6 < means[1] < means[2] / 1.6


def test_answer_positions_are_balanced():
    data = _generator().build_all()
    for name in ("kv_retrieval", "reading_qa", "capitals", "knowledge_conflict"):
        counts = {}
        for r in data[name]:
            counts[r["answer"]] = counts.get(r["answer"], 0) + 1
        k = len(data[name][0]["choices"])
        assert max(counts.values()) < 2.0 * len(data[name]) / k, name


def test_yaml_groups_and_resolution():
    suite = T.suite()
    assert list(suite)[:3] == ["passkey_128", "passkey_256", "passkey_512"]
    ctx, par = T.group_tasks("contextual"), T.group_tasks("parametric")
    assert set(ctx) | set(par) == set(suite) and not set(ctx) & set(par)
    assert T.resolve_tasks("contextual,parametric") == (ctx + par, [])
    assert T.resolve_tasks(["capitals", "mvquant_parametric", "gsm8k"]) == (par, ["gsm8k"])
    with pytest.raises(MvquantError, match="no tasks"):
        T.resolve_tasks(" , ")

    class FakeManager:
        all_tasks = ["gsm8k", "triviaqa"]
    T.check_external_tasks(["gsm8k"], FakeManager())
    with pytest.raises(MvquantError, match="unknown task nope.*passkey_128"):
        T.check_external_tasks(["nope"], FakeManager())


def test_limit_validation():
    assert check_limit(None) is None and check_limit("5") == 5 and check_limit(0.5) == 0.5
    for bad in ("0", 0, -3, "x", "2.5"):
        with pytest.raises(MvquantError, match="--limit"):
            check_limit(bad)


def test_stats_against_closed_forms():
    acc, se = S.mean_stderr([1, 0, 1, 1])
    assert acc == 0.75 and se == pytest.approx(math.sqrt(0.25 / 4))
    lo, hi = S.wilson_interval(0, 20)
    assert lo == 0 and hi == pytest.approx(0.1611, abs=1e-3)        # textbook value for 0/20
    lo, hi = S.wilson_interval(10, 20)
    assert lo == pytest.approx(0.2993, abs=1e-3) and hi == pytest.approx(0.7007, abs=1e-3)
    assert S.macro_average([0.5, 1.0], [0.1, 0.2]) == (0.75, pytest.approx(math.sqrt(0.05) / 2))
    d, se = S.paired_difference([1, 1, 0, 1], [1, 0, 0, 0])
    assert d == 0.5 and se == pytest.approx(math.sqrt(1 / 3 / 4))


def test_scoring_of_hand_made_lm_eval_output():
    """A fake simple_evaluate result: per-item acc flags -> acc, stderr, interval, n; groups."""
    suite = T.suite()
    out = {"results": {"capitals": {"acc,none": 0.5}, "kv_retrieval": {"acc,none": 0.25}},
           "samples": {"capitals": [{"acc": 1.0}, {"acc": 0.0}, {"acc": 1.0}, {"acc": 0.0}],
                       "kv_retrieval": [{"acc": 0.0}, {"acc": 0.0}, {"acc": 1.0}, {"acc": 0.0}]}}
    cap = _task_result("capitals", out, suite["capitals"])
    kv = _task_result("kv_retrieval", out, suite["kv_retrieval"])
    assert cap["acc"] == 0.5 and cap["n"] == 4 and cap["chance"] == 0.25 and cap["correct"] == [1, 0, 1, 0]
    assert cap["stderr"] == pytest.approx(math.sqrt((4 / 3 * 0.25) / 4))
    groups = summarise_groups({"capitals": cap, "kv_retrieval": kv})
    assert groups["parametric"]["acc"] == 0.5 and groups["contextual"]["acc"] == 0.25
    ext = _task_result("gsm8k", {"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict": 0.3,
                                                        "exact_match_stderr,strict": 0.05}},
                                 "samples": {"gsm8k": [{}, {}]}}, None)
    assert ext["acc"] == 0.3 and ext["stderr"] == 0.05 and ext["n"] == 2 and ext["metric"] == "exact_match,strict"
    table = to_markdown({"tasks": {"capitals": cap | {"seconds": 1.0}}, "groups": {"parametric": groups["parametric"]}})
    assert "| capitals | parametric | 50.0 |" in table


def test_lm_eval_loader_reads_shipped_rows():
    spec = importlib.util.spec_from_file_location("mvquant_evals_utils", EVALS / "tasks" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    ds = utils.load(name="capitals", version=1.0, group="parametric", chance=0.25)
    first = json.loads((EVALS / "data" / "capitals.jsonl").read_text().splitlines()[0])
    assert len(ds["test"]) == 240 and ds["test"][0]["context"] == first["context"]
