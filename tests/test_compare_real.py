"""compare through the real calibrate / quantize / checkpoint / evaluate path, on a tiny Llama that
shares the built-in model's tokenizer (so the bundled tasks tokenize as they do for real)."""
from __future__ import annotations

import csv

import pytest
import torch

from conftest import TINY_CONFIGS
from mvquant.compare import compare, parse_recipe
from mvquant.compare.recipe import default_catalog
from mvquant.compare.runners import EvalTaskRunner, ModelArmRunner

TASKS = ["capitals", "passkey_128"]
LIMIT = 3


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from mvquant.models.builtin import builtin_model_dir
    return AutoTokenizer.from_pretrained(str(builtin_model_dir()))


def tiny_llama(vocab_size: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_CONFIGS["llama"])
    cfg.pop("model_type")
    cfg.update(vocab_size=vocab_size, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **cfg)).float().eval()


def recipe():
    return parse_recipe({
        "name": "tiny-real", "model": "tiny-llama", "calibration": {"samples": 2, "seq_len": 32, "top_k": 1},  # random init: no dim passes lambda
        "tasks": TASKS, "limit": LIMIT, "defaults": {"group_size": 64},
        "arms": [{"name": "fp", "method": "none"},
                 {"name": "rtn-w4-massive", "method": "rtn", "bits": 4, "protect": "massive"},
                 {"name": "disrupted", "method": "none", "disrupt": "massive", "top_k": 1}],
    }, catalog=default_catalog())


def test_real_path_end_to_end_and_resume_from_checkpoint(tmp_path, tokenizer):
    loads = []

    def load(name, dtype):
        assert name == "tiny-llama" and dtype == "float32"
        loads.append(name)
        return tiny_llama(len(tokenizer)), tokenizer

    out = tmp_path / "out"
    first = compare(recipe(), out, arm_runner=ModelArmRunner(load_model=load), task_runner=EvalTaskRunner(),
                    progress=False, log=lambda *_: None)
    assert first.computed == 6 and len(loads) == 3
    rows = {(r["method"], r["task"]): r for r in csv.DictReader(open(out / "results.csv"))}
    assert len(rows) == 6 and all(int(r["n"]) == LIMIT for r in rows.values())

    # the fp cells equal a direct evaluation of the same model (an independent run of evaluate)
    from mvquant.evaluation import evaluate
    direct = evaluate(None, TASKS, limit=LIMIT, model=tiny_llama(len(tokenizer)), tokenizer=tokenizer, progress=False)
    for task in TASKS:
        assert float(rows[("fp", task)]["acc"]) == pytest.approx(direct["tasks"][task]["acc"])
        assert float(rows[("fp", task)]["stderr"]) == pytest.approx(direct["tasks"][task]["stderr"])

    # the quantized arm kept a checkpoint and its size says ~4-bit linears plus protected rows
    info = first.arms["rtn-w4-massive"]
    assert (out / "arms").is_dir() and info["checkpoint"].endswith("checkpoint")
    assert 4.0 < info["bits_per_weight"] < 6.0 and info["protected_rows"] > 0
    assert first.arms["fp"]["bits_per_weight"] == 32.0
    assert len(list((out / "calibration").glob("*.json"))) == 1   # one calibration, shared by two arms

    # the other two arms' cells equal direct evaluations too: the saved checkpoint, and the fp model
    # disrupted with the recipe's own calibration report
    import mvquant
    report = mvquant.load_report(next((out / "calibration").glob("*.json")))
    ckpt = mvquant.load(info["checkpoint"])
    direct_q = evaluate(None, TASKS, limit=LIMIT, model=ckpt, tokenizer=tokenizer, progress=False)
    direct_d = evaluate(None, TASKS, limit=LIMIT, model=tiny_llama(len(tokenizer)), tokenizer=tokenizer,
                        disrupt="massive", top_k=1, report=report, progress=False)
    for task in TASKS:
        assert float(rows[("rtn-w4-massive", task)]["acc"]) == pytest.approx(direct_q["tasks"][task]["acc"])
        assert float(rows[("disrupted", task)]["acc"]) == pytest.approx(direct_d["tasks"][task]["acc"])

    # simulate an interruption: the quantized arm's cells are lost, its checkpoint is not
    cells = sorted((out / "cells").rglob("*.json"))
    quant_cells = [c for c in cells if '"rtn-w4-massive"' in c.read_text()]
    assert len(quant_cells) == 2
    for c in quant_cells:
        c.unlink()
    loads.clear()
    again = compare(recipe(), out, arm_runner=ModelArmRunner(load_model=load), task_runner=EvalTaskRunner(),
                    progress=False, log=lambda *_: None)
    assert again.computed == 2 and again.cached == 4
    assert loads == []                      # reloaded from the checkpoint, not quantized again
    assert again.arms["rtn-w4-massive"]["from_cache"] is True
    rows2 = {(r["method"], r["task"]): r for r in csv.DictReader(open(out / "results.csv"))}
    for task in TASKS:   # the reloaded checkpoint scores exactly as the in-memory quantized model did
        assert rows2[("rtn-w4-massive", task)]["acc"] == rows[("rtn-w4-massive", task)]["acc"]
