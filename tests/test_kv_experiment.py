"""evals/kv.py: arm names, contrasts, the rendered table's paired numbers, decode-speed bookkeeping."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model

spec = importlib.util.spec_from_file_location("kv_experiment", Path(__file__).parents[1] / "evals" / "kv.py")
kv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kv)


def test_arm_names_and_configs():
    names = kv.arm_names([2, 3], ["channel"], ["none", "massive"], ["quanto2", "hqq4"])
    assert names == ["fp", "kv2-channel-none", "kv2-channel-massive", "kv3-channel-none", "kv3-channel-massive",
                     "quanto2-token-none", "hqq4-token-none"]
    assert kv.parse_arm("quanto2-token-none") == ("quanto", 2, "token", "none")
    args = type("A", (), {"group_size": 32, "residual": 32, "sink": 4, "seed": 0})()
    assert kv.arm_config("quanto2-token-none", args)["sink"] == 0          # the baseline has no sinks
    assert kv.arm_config("kv3-channel-massive", args)["backend"] == "mvquant"
    with pytest.raises(SystemExit, match="kv<B>"):
        kv.parse_arm("kv2-head-none")
    with pytest.raises(SystemExit, match="not quanto<B> or hqq<B>"):
        kv.arm_names([2], ["channel"], ["none"], ["bnb4"])
    with pytest.raises(Exception, match="--kv-bits 3 is not supported by --kv-backend quanto"):
        kv.arm_config("quanto3-token-none", args)


def _result(correct: dict[str, list[int]], groups: dict[str, str], kv_cache=None) -> dict:
    import statistics
    tasks = {t: {"acc": statistics.mean(c), "stderr": 0.0, "correct": c, "group": groups[t]} for t, c in correct.items()}
    return {"tasks": tasks, "groups": {g: {"acc": 0.5, "stderr": 0.1} for g in set(groups.values())},
            "kv_cache": kv_cache}


def test_contrasts_and_rendered_paired_differences():
    names = ["fp", "kv2-channel-none", "kv2-channel-massive", "kv2-channel-random", "quanto2-token-none"]
    pairs = kv.contrasts(names)
    assert ("kv2-channel-massive", "kv2-channel-none") in pairs and ("kv2-channel-massive", "kv2-channel-random") in pairs
    assert ("quanto2-token-none", "kv2-channel-none") in pairs and ("quanto2-token-none", "fp") in pairs
    groups = {"passkey_128": "contextual", "capitals": "parametric"}
    cache = {"bytes_per_token": 100.0, "ratio": 0.2, "protected_k_channels": 0, "protected_share": 0.0}
    results = {"fp": _result({"passkey_128": [1, 1, 1, 1], "capitals": [1, 1, 0, 1]}, groups),
               "kv2-channel-none": _result({"passkey_128": [0, 0, 1, 1], "capitals": [1, 1, 0, 1]}, groups, cache),
               "kv2-channel-massive": _result({"passkey_128": [1, 0, 1, 1], "capitals": [1, 1, 0, 0]}, groups, cache)}
    speed = {"rounds": 3, "prompt_tokens": 384, "new_tokens": 64, "threads": 2,
             "arms": {"kv2-channel-none": {"vs_dense_median": 0.5, "vs_dense_min": 0.4, "vs_dense_max": 0.6}}}
    md = kv.render(results, {"arms": list(results), "model": "m", "command": "c", "limit": 4, "group_size": 32,
                             "residual": 32, "sink": 0}, speed)
    # massive - none on passkey: +1 on one item of four = +25.0, stderr of (0,1,0,0) = 25.0
    # one standard error from zero: not bold (bold marks more than two)
    assert "| kv2-channel-massive − kv2-channel-none | +25.0 ± 25.0 | -25.0 ± 25.0 | +25.0 ± 25.0 |" in md
    assert "| kv2-channel-none − fp | -50.0 ± 28.9 | +0.0 ± 0.0 | -50.0 ± 28.9 |" in md
    assert kv.group_cell(-0.3, 0.1) == "**-30.0** ± 10.0" and kv.group_cell(0.0, 0.0) == "+0.0 ± 0.0"
    assert "0.50x (0.40-0.60)" in md and "100 B (20.0%)" in md
    assert "Commands (in order; a rerun skips the arms already saved): `c`" in md
    md = kv.render(results, {"arms": list(results), "model": "m", "commands": ["a", "b"], "limit": 4,
                             "group_size": 32, "residual": 32, "sink": 0})
    assert "saved): `a`; `b`" in md
    meta = {"command": "old"}
    kv.record_command(meta, "new")
    kv.record_command(meta, "newer")
    assert meta["commands"] == ["old", "new", "newer"]
    fresh = {}
    kv.record_command(fresh, "first")
    assert fresh["commands"] == ["first"]


def test_decode_speed_ratios_per_round():
    model = make_tiny_model("llama")

    def tokenizer(text, return_tensors):
        return {"input_ids": torch.randint(2, 100, (1, 64))}

    cfg = {"bits": 2, "protect": "none", "group_size": 16, "residual": 8, "sink": 0, "axis": "channel", "seed": 0,
           "backend": "mvquant"}
    seen = []
    out = kv.decode_speed(model, tokenizer, {"fp": None, "kv2": cfg}, None, prompt_tokens=40, new_tokens=4, rounds=2,
                          on_round=lambda r: seen.append(r["rounds"]))
    assert seen == [1, 2]
    assert out["prompt_tokens"] == 40 and out["rounds"] == 2
    assert out["arms"]["fp"]["vs_dense_median"] == 1.0
    a = out["arms"]["kv2"]
    assert a["vs_dense_min"] <= a["vs_dense_median"] <= a["vs_dense_max"] and a["tok_s_median"] > 0


def test_decode_speed_bookkeeping_with_known_times(monkeypatch):
    """Ratios are taken within each round against that round's dense time, then the median; tok/s is
    new tokens over the median seconds (timings replaced by known numbers)."""
    model = make_tiny_model("llama")
    times = iter([1.0, 2.0, 4.0, 2.0, 1.0, 1.0, 2.0])   # warm-up, then (dense, kv2) per round (fp is dense)

    def fake(model, ids, factory, new_tokens):
        return next(times)
    monkeypatch.setattr(kv, "decode_seconds", fake)
    cfg = {"bits": 2, "protect": "none", "group_size": 16, "residual": 8, "sink": 0, "axis": "channel", "seed": 0,
           "backend": "mvquant"}
    out = kv.decode_speed(model, lambda text, return_tensors: {"input_ids": torch.ones(1, 64, dtype=torch.long)},
                          {"fp": None, "kv2": cfg}, None, prompt_tokens=40, new_tokens=8, rounds=3)
    # rounds: dense 2.0 -> kv2 4.0 (0.5x); dense 2.0 -> kv2 1.0 (2x); dense 1.0 -> kv2 2.0 (0.5x)
    a = out["arms"]["kv2"]
    assert (a["vs_dense_median"], a["vs_dense_min"], a["vs_dense_max"]) == (0.5, 0.5, 2.0)
    assert a["tok_s_median"] == 8 / 2.0 and out["arms"]["fp"]["tok_s_median"] == 8 / 2.0
    assert out["arms"]["fp"]["vs_dense_median"] == 1.0


def test_a_saved_run_with_other_cache_settings_is_not_reused(tmp_path):
    """Saved arms are skipped on a rerun, so a rerun with another residual must be refused, not mixed in."""
    (tmp_path / "meta.json").write_text('{"arms": ["fp"], "tasks": "contextual", "limit": 12, "group_size": 32, '
                                        '"residual": 32, "sink": 0}')
    with pytest.raises(SystemExit, match="--residual 32: use another --output-dir"):
        kv.main(["--output-dir", str(tmp_path), "--tasks", "contextual", "--limit", "12", "--residual", "0",
                 "--calibration", "x.json", "--arms", "fp"])


def test_rotated_arms_and_the_perplexity_table():
    args = type("A", (), {"group_size": 32, "residual": 0, "sink": 0, "seed": 0})()
    assert kv.parse_arm("kv3-turboquant-massive") == ("mvquant", 3, "turboquant", "massive")
    assert kv.arm_config("kv4-rht-none", args)["axis"] == "rht"
    with pytest.raises(Exception, match="turboquant takes --kv-bits 2, 3, 4"):
        kv.arm_config("kv8-turboquant-none", args)
    assert ("kv3-rht-massive", "kv3-rht-random") in kv.contrasts(["fp", "kv3-rht-massive", "kv3-rht-random"])
    # rotation against protection at the same bits: rotated none / massive vs per-token massive and KIVI
    pairs = kv.contrasts(["fp", "kv3-token-massive", "kv3-channel-none", "kv3-rht-none", "kv3-rht-random",
                          "kv3-turboquant-massive", "kv2-token-massive"])
    assert {("kv3-rht-none", "kv3-token-massive"), ("kv3-rht-none", "kv3-channel-none"),
            ("kv3-turboquant-massive", "kv3-token-massive")} <= set(pairs)
    assert not {p for p in pairs if p[0] == "kv3-rht-random" and p[1] != "fp"}
    assert ("kv3-rht-none", "kv2-token-massive") not in pairs
    meta = {"arms": ["fp", "kv3-turboquant-none"], "ppl_seq_len": 256}
    lines = kv.render_ppl({"fp": {"nll": [2.0, 3.0]}, "kv3-turboquant-none": {"nll": [2.1, 3.1]}}, meta)
    assert "| kv3-turboquant-none | 13.464 | +10.52% ± 0.00 |" in lines
    assert kv.render_ppl({"kv3-turboquant-none": {"nll": [2.1]}}, meta) == []     # no fp arm: no contrast


def test_equal_bytes_pairs_cross_bit_widths():
    ratio = {"kv3-channel-none": 0.271, "kv3-token-massive": 0.278, "kv4-rht-none": 0.281, "kv4-rht-random": 0.293,
             "kv3-rht-none": 0.219, "kv2-channel-none": 0.188, "kv4-channel-none": 0.312, "kv3-turboquant-none": 0.316}
    names = ["fp", *ratio]
    pairs = kv.equal_bytes_pairs(names, ratio)
    # 4-bit rht (28.1%) against 3-bit KIVI (27.1%) and 3-bit per-token massive (27.8%); 3-bit turboquant
    # (31.6%, boundary layers exact) against 4-bit KIVI (31.2%); 3-bit rht (21.9%) has nothing within 2%
    assert sorted(pairs) == sorted([("kv4-rht-none", "kv3-channel-none"), ("kv4-rht-none", "kv3-token-massive"),
                                    ("kv3-turboquant-none", "kv4-channel-none")])


def test_a_rerun_keeps_the_earlier_command(tmp_path, monkeypatch):
    """A directory from before the command list: its one saved command is kept ahead of the new one."""
    (tmp_path / "meta.json").write_text('{"arms": ["fp"], "tasks": "contextual", "limit": 12, "group_size": 32, '
                                        '"residual": 0, "sink": 0, "command": "python evals/kv.py old"}')

    def stop(*a, **k):
        raise RuntimeError("model not loaded in this test")
    monkeypatch.setattr(kv, "load_model", stop)
    with pytest.raises(RuntimeError, match="not loaded"):
        kv.main(["--output-dir", str(tmp_path), "--tasks", "contextual", "--limit", "12", "--residual", "0",
                 "--calibration", "x.json", "--arms", "fp"])
    meta = json.loads((tmp_path / "meta.json").read_text())
    new = ("python evals/kv.py --output-dir " + str(tmp_path) + " --tasks contextual --limit 12 --residual 0 "
           "--calibration x.json --arms fp")
    assert meta["commands"] == ["python evals/kv.py old", new] and meta["command"] == new


def test_rendered_equal_bytes_table_with_paired_perplexity():
    groups = {"passkey_128": "contextual", "capitals": "parametric"}
    c = lambda r: {"bytes_per_token": 100 * r, "ratio": r, "protected_k_channels": 0, "protected_share": 0.0}  # noqa: E731
    results = {"fp": _result({"passkey_128": [1, 1, 1, 1], "capitals": [1, 1, 1, 1]}, groups),
               "kv3-channel-none": _result({"passkey_128": [0, 0, 1, 1], "capitals": [1, 1, 1, 1]}, groups, c(0.27)),
               "kv4-rht-none": _result({"passkey_128": [1, 0, 1, 1], "capitals": [1, 1, 1, 1]}, groups, c(0.28))}
    ppl = {"fp": {"nll": [2.0, 3.0]}, "kv3-channel-none": {"nll": [2.2, 3.2]}, "kv4-rht-none": {"nll": [2.1, 3.1]}}
    md = kv.render(results, {"arms": list(results), "model": "m", "command": "c", "limit": 4, "group_size": 32,
                             "residual": 0, "sink": 0, "ppl_seq_len": 512}, None, ppl)
    # +1 of 4 passkey items = +25.0 ± 25.0; nll 0.1 lower on both windows: exp(-0.1) - 1 = -9.5%, se 0
    assert "| kv4-rht-none − kv3-channel-none | 28.0 vs 27.0 | +25.0 ± 25.0 | +0.0 ± 0.0 | +25.0 ± 25.0 | " \
           "+0.0 ± 0.0 | -9.5% ± 0.0 |" in md


def test_group_contrasts_leave_out_the_tasks_the_group_leaves_out():
    """A task near chance at full precision (gemma3-270m's passkey_128) is out of the group mean, so it is
    out of the group's paired contrast too."""
    groups = {"passkey_128": "contextual", "passkey_256": "contextual", "capitals": "parametric"}
    results = {"fp": _result({"passkey_128": [0, 0], "passkey_256": [1, 1], "capitals": [1, 1]}, groups),
               "kv3-token-none": _result({"passkey_128": [1, 1], "passkey_256": [0, 1], "capitals": [1, 1]}, groups,
                                         {"bytes_per_token": 1.0, "ratio": 0.25, "protected_k_channels": 0,
                                          "protected_share": 0.0})}
    for r in results.values():
        r["groups"]["contextual"]["tasks"] = ["passkey_256"]
    md = kv.render(results, {"arms": list(results), "model": "m", "command": "c", "limit": 2, "group_size": 32,
                             "residual": 0, "sink": 0})
    # passkey_256 alone: -50.0 ± 50.0 (with passkey_128's +100 the mean would be +25.0)
    assert "| kv3-token-none − fp | +100.0 ± 0.0 | -50.0 ± 50.0 | +0.0 ± 0.0 | -50.0 ± 50.0 | +0.0 ± 0.0 |" in md


def test_render_adds_no_arm_names(tmp_path):
    (tmp_path / "meta.json").write_text('{"arms": ["fp"], "tasks": "contextual", "limit": 12, "group_size": 32, '
                                        '"residual": 0, "sink": 0}')
    assert kv.main(["--output-dir", str(tmp_path), "--calibration", "x.json", "--render"]) == 0
    assert json.loads((tmp_path / "meta.json").read_text())["arms"] == ["fp"]
