"""End to end on the built-in model with a few items: evaluate(), disruption, the CLI, lm-eval registration."""
from __future__ import annotations

import json

import pytest
import torch

from mvquant.cli import main
from mvquant.errors import MvquantError


@pytest.mark.slow
def test_evaluate_builtin_small(builtin_model):
    from mvquant.evaluation import evaluate
    model, tok = builtin_model
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
    r = evaluate("smollm2-135m", "passkey_128,knowledge_conflict,capitals", model=model, tokenizer=tok, limit=4,
                 progress=False)
    assert list(r["tasks"]) == ["passkey_128", "knowledge_conflict", "capitals"]
    for name, t in r["tasks"].items():
        assert t["n"] == 4 and len(t["correct"]) == 4 and t["acc"] == sum(t["correct"]) / 4
        assert t["ci95"][0] <= t["acc"] <= t["ci95"][1] and t["seconds"] > 0
    # measured at full precision: 200/200 passkey_128 and 240/240... see evals/results; here a floor
    assert r["tasks"]["passkey_128"]["acc"] >= 0.75 and r["tasks"]["capitals"]["acc"] >= 0.75
    assert set(r["groups"]) == {"contextual", "parametric"}
    assert r["groups"]["contextual"]["acc"] == pytest.approx((r["tasks"]["passkey_128"]["acc"]
                                                              + r["tasks"]["knowledge_conflict"]["acc"]) / 2)
    assert r["disruption"] is None and r["limit"] == 4

    # massive disruption from a report; the hooks are gone afterwards
    from mvquant.calibration.report import CalibrationReport
    from mvquant.calibration.calibrate import accumulate_norms
    from mvquant.models import get_layout
    layout = get_layout(model)
    seqs = [tok("The quick brown fox jumps over the lazy dog. " * 12)["input_ids"][:96]] * 2
    norms = accumulate_norms(model, layout, seqs, batch_size=2, pad_id=0, progress=False)
    report = CalibrationReport.from_norms(norms, layout, model="smollm2-135m", top_k=1)
    d = evaluate("smollm2-135m", "passkey_256", model=model, tokenizer=tok, limit=3, disrupt="massive",
                 report=report, progress=False)
    assert d["disruption"]["mode"] == "massive" and d["disruption"]["dims_q"] == 30 * 9
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)


@pytest.mark.slow
def test_cli_eval_writes_json_and_refuses_overwrite(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--tasks", "capitals", "--limit", "3", "--output", str(out), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    assert data["tasks"]["capitals"]["n"] == 3 and "parametric" in data["groups"]
    assert "| capitals | parametric |" in capsys.readouterr().out
    text = out.read_text()
    assert main(["eval", "--tasks", "capitals", "--limit", "3", "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == text


def test_cli_bad_input(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--tasks", "capitals", "--limit", "0", "--output", str(out)]) == 2
    assert "--limit must be positive" in capsys.readouterr().err
    assert main(["eval", "--tasks", "capitals", "--top-k", "2", "--output", str(out)]) == 2
    assert "--disrupt" in capsys.readouterr().err
    assert main(["eval", "--tasks", "capitals", "--output", str(tmp_path / "missing" / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "no_such_model"), "--tasks", "capitals", "--limit", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_task_lists_bundled_ones(capsys, monkeypatch):
    import lm_eval.tasks

    class FakeManager:   # the real one indexes thousands of lm-eval YAMLs (slow)
        all_tasks = ["gsm8k"]

        def __init__(self, *a, **k):
            pass
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeManager)
    assert main(["eval", "--tasks", "capitals,no_such_task", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown task no_such_task" in err and "passkey_128" in err


def test_lm_eval_registry_knows_mvquant():
    from lm_eval.api.registry import get_model

    from mvquant.evaluation import register_lm_eval_model
    cls = register_lm_eval_model()
    assert get_model("mvquant") is cls
    from lm_eval.models.huggingface import HFLM
    assert issubclass(cls, HFLM)


def test_parse_layers():
    from mvquant.evaluation.lm import parse_layers
    assert parse_layers("0,3,5-7") == [0, 3, 5, 6, 7] and parse_layers(None) is None and parse_layers([1, 2]) == [1, 2]
    with pytest.raises(MvquantError, match="--layers"):
        parse_layers("a-b")
