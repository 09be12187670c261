"""Recipe validation: the format, defaults, --quick, and one clear error per kind of mistake."""
from __future__ import annotations

import pytest
import yaml

from mvquant.compare.engine import arm_key
from mvquant.compare.recipe import load_recipe, parse_recipe
from mvquant.errors import MvquantError

CATALOG = {"contextual": ["passkey", "squad"], "parametric": ["facts", "capitals"]}


def base(**over):
    data = {
        "name": "t", "model": "tiny", "seed": 3,
        "calibration": {"samples": 4, "seq_len": 32},
        "tasks": ["contextual", "capitals"], "limit": 10,
        "defaults": {"group_size": 64},
        "quick": {"limit": 2, "calibration": {"samples": 1}, "arms": ["fp", "m4"]},
        "arms": [
            {"name": "fp", "method": "none"},
            {"name": "r4", "method": "rtn", "bits": 4, "protect": "none"},
            {"name": "m4", "method": "rtn", "bits": 4, "protect": "massive"},
            {"name": "sq", "method": "smoothquant", "protect": "none"},
            {"name": "nf4", "method": "bnb-nf4"},
            {"name": "dis", "method": "none", "disrupt": "massive", "top_k": 1},
        ],
    }
    data.update(over)
    return data


def test_parse_expands_groups_merges_defaults_and_fills_bits():
    r = parse_recipe(base(), catalog=CATALOG)
    assert r.tasks == ["passkey", "squad", "capitals"]
    assert r.task_groups == {"passkey": "contextual", "squad": "contextual", "capitals": "parametric"}
    assert r.limits == {"passkey": 10, "squad": 10, "capitals": 10}
    assert r.calibration["samples"] == 4 and r.calibration["seq_len"] == 32 and r.calibration["lambda"] == 5.0
    arms = {a.name: a for a in r.arms}
    assert arms["r4"].group_size == 64 and arms["m4"].protect == "massive"
    assert arms["sq"].bits == 8 and arms["sq"].group_size is None        # W8A8 has one width, no groups
    assert arms["nf4"].bits == 4 and arms["nf4"].group_size is None
    assert arms["fp"].bits is None and arms["fp"].group_size is None
    assert arms["dis"].disrupt == "massive" and arms["dis"].top_k == 1
    assert all(a.seed == 3 for a in r.arms)                              # recipe seed is the arm default
    assert not arms["r4"].uses_calibration and arms["m4"].uses_calibration and arms["dis"].uses_calibration


def test_quick_shrinks_limits_calibration_and_arms():
    r = parse_recipe(base(), catalog=CATALOG, quick=True)
    assert r.limits == {"passkey": 2, "squad": 2, "capitals": 2}
    assert r.calibration["samples"] == 1 and r.calibration["seq_len"] == 32
    assert [a.name for a in r.arms] == ["fp", "m4"]
    assert r.fingerprint() != parse_recipe(base(), catalog=CATALOG).fingerprint()


def test_per_task_limits():
    r = parse_recipe(base(limit={"default": 5, "squad": 7}), catalog=CATALOG)
    assert r.limits == {"passkey": 5, "squad": 7, "capitals": 5}
    with pytest.raises(MvquantError, match="not in the recipe: facts"):
        parse_recipe(base(limit={"facts": 3}), catalog=CATALOG)


@pytest.mark.parametrize("change, match", [
    ({"arms": [{"name": "x", "method": "int4-magic"}]}, "unknown method 'int4-magic': use one of none, rtn, awq"),
    ({"arms": [{"name": "x", "method": "rtn", "bits": 5}]}, "bits 5 is not supported by rtn: use one of 2, 3, 4, 8"),
    ({"arms": [{"name": "x", "method": "smoothquant", "bits": 4}]}, "bits 4 is not supported by smoothquant: use one of 8"),
    ({"arms": [{"name": "x", "method": "none", "bits": 4}]}, "remove 'bits'"),
    ({"arms": [{"name": "x", "method": "rtn", "bits": 4, "protect": "top3"}]}, "unknown protect policy 'top3': use massive | none | random | topk:N"),
    ({"arms": [{"name": "x", "method": "bnb-int8", "protect": "massive"}]}, "cannot protect dims"),
    ({"arms": [{"name": "x", "method": "none", "disrupt": "all"}]}, "unknown disrupt 'all': use one of none, massive, non-massive"),
    ({"arms": [{"name": "x", "method": "rtn", "bits": 4, "groupsize": 64}]}, "unknown key 'groupsize' in arms\\[0\\]: allowed keys are name, method, bits, group_size"),
    ({"arms": [{"name": "x", "method": "rtn", "bits": 4, "group_size": 0}]}, "group_size must be an integer >= 1"),
    ({"arms": [{"name": "x"}, {"name": "x"}]}, "repeated: x"),
    ({"arms": [{"method": "rtn"}]}, "needs a 'name'"),
    ({"arms": []}, "non-empty list of arms"),
    ({"tasks": ["contextual", "trivia"]}, "unknown task or group 'trivia': use a group \\(contextual, parametric\\) or a task \\(capitals, facts, passkey, squad\\)"),
    ({"limit": 0}, "limit must be an integer >= 1 or null"),
    ({"calibration": {"samples": 4, "lambda": -1}}, "calibration.lambda must be a positive number"),
    ({"calibration": {"sample": 4}}, "unknown key 'sample' in calibration"),
    ({"quick": {"arms": ["nope"]}}, "quick.arms names unknown arm\\(s\\) nope"),
    ({"quick": {"limits": 3}}, "unknown key 'limits' in quick"),
    ({"modle": "x"}, "unknown key 'modle' in the recipe"),
    ({"dtype": "int8"}, "dtype 'int8' not supported"),
    ({"contrasts": [["m4", "nope"]]}, "'contrasts' names unknown arm\\(s\\) nope"),
    ({"contrasts": ["m4"]}, "list of \\[arm, baseline\\] pairs"),
    ({"arms": [{"name": "x", "method": "rtn", "bits": 4, "engine": "vllm"}]}, "unknown engine 'vllm': use one of transformers, llamacpp"),
    ({"arms": [{"name": "x", "method": "none", "engine": "llamacpp"}]}, "engine llamacpp scores the arm's GGUF export"),
    ({"arms": [{"name": "x", "method": "rtn", "bits": 4, "engine": "llamacpp", "kv_bits": 4}]}, "without disrupt or kv_"),
])
def test_bad_recipes_name_the_problem_and_the_allowed_values(change, match):
    with pytest.raises(MvquantError, match=match):
        parse_recipe(base(**change), catalog=CATALOG)


def test_missing_required_key():
    data = base()
    del data["model"]
    with pytest.raises(MvquantError, match="missing required key 'model'"):
        parse_recipe(data, catalog=CATALOG)


def test_load_recipe_file_errors(tmp_path):
    with pytest.raises(MvquantError, match="recipe '.*nope.yaml' not found"):
        load_recipe(tmp_path / "nope.yaml", catalog=CATALOG)
    bad = tmp_path / "bad.yaml"
    bad.write_text("arms: [\n")
    with pytest.raises(MvquantError, match="not valid YAML"):
        load_recipe(bad, catalog=CATALOG)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base()))
    r = load_recipe(good, catalog=CATALOG)
    assert r.source == str(good) and len(r.arms) == 6


def test_arm_keys_change_only_with_what_the_arm_depends_on():
    r1 = parse_recipe(base(), catalog=CATALOG)
    changed = base()
    changed["arms"][1] = {"name": "r4-renamed", "method": "rtn", "bits": 4, "protect": "none"}   # rename only
    changed["arms"][2] = {"name": "m4", "method": "rtn", "bits": 3, "protect": "massive"}       # real change
    changed["calibration"] = {"samples": 8, "seq_len": 32}                                        # calibration change
    r2 = parse_recipe(changed, catalog=CATALOG)
    k1 = {a.name: arm_key(r1, a) for a in r1.arms}
    k2 = {a.name: arm_key(r2, a) for a in r2.arms}
    assert k2["r4-renamed"] == k1["r4"]            # the name is not part of the key
    assert k2["m4"] != k1["m4"]
    assert k2["fp"] == k1["fp"] and k2["nf4"] == k1["nf4"]  # no calibration used: unaffected
    assert k2["dis"] != k1["dis"]                  # disruption uses the calibration report
    assert r1.fingerprint() != r2.fingerprint()


def test_group_size_defaults_and_per_row():
    r = parse_recipe(base(defaults={}, quick={}, arms=[{"name": "a", "method": "gptq", "bits": 4},
                                                       {"name": "b", "method": "awq", "bits": 4, "group_size": -1},
                                                       {"name": "c", "method": "rtn", "bits": 4, "group_size": 96}]),
                     catalog=CATALOG)
    assert [a.group_size for a in r.arms] == [128, -1, 96]   # QuantConfig's rule: any positive size (or -1)
    with pytest.raises(MvquantError, match="'options' configure a quantizer"):
        parse_recipe(base(quick={}, arms=[{"name": "a", "method": "none", "options": {"alpha": 0.5}}]),
                     catalog=CATALOG)
    r = parse_recipe(base(quick={}, arms=[{"name": "a", "method": "smoothquant", "options": {"alpha": 0.8}}]),
                     catalog=CATALOG)
    assert r.arms[0].options == {"alpha": 0.8} and r.arms[0].spec()["options"] == {"alpha": 0.8}


@pytest.mark.parametrize("name", ["figure5", "table1"])
def test_shipped_recipes_validate(name):
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml"
    limits = {}
    for quick in (False, True):
        r = load_recipe(path, quick=quick)   # against the bundled task suite
        assert {r.task_groups[t] for t in r.tasks} == {"contextual", "parametric"} and r.model == "smollm2-135m"
        limits[quick] = r.limits
        if not quick:
            full = r
        # the built-in model is Q4_1 with blocks of 32: no grouped arm may use that grid
        assert all(a.group_size in (None, 64, 128) for a in r.arms)
    assert all(limits[True][t] < (limits[False][t] or 10**9) for t in limits[True])   # --quick shrinks every task
    if name == "figure5":
        assert {(a.method, a.bits, a.protect) for a in full.arms} >= {
            ("none", None, "none"), ("rtn", 4, "none"), ("awq", 4, "none"), ("smoothquant", 8, "none"),
            ("gptq", 4, "none"), ("bnb-nf4", 4, "none"), ("bnb-int8", 8, "none"), ("rtn", 4, "massive"),
            ("rtn", 3, "massive"), ("rtn", 3, "random"), ("rtn", 3, "none")}
    else:
        assert [a.disrupt for a in full.arms] == ["none", "massive", "non-massive"]


def test_contrasts_default_to_every_arm_vs_the_first_and_follow_quick():
    r = parse_recipe(base(contrasts=[["m4", "r4"], ["r4", "fp"]]), catalog=CATALOG)
    assert r.contrasts == [("r4", "fp"), ("m4", "fp"), ("sq", "fp"), ("nf4", "fp"), ("dis", "fp"), ("m4", "r4")]
    q = parse_recipe(base(contrasts=[["m4", "r4"]]), catalog=CATALOG, quick=True)   # quick keeps fp, m4
    assert q.contrasts == [("m4", "fp")]
    assert r.fingerprint() == parse_recipe(base(), catalog=CATALOG).fingerprint()   # output only


def test_quick_may_narrow_the_tasks():
    r = parse_recipe(base(quick={"tasks": ["squad", "facts"], "limit": 3}), catalog=CATALOG, quick=True)
    assert r.tasks == ["squad", "facts"] and r.task_groups == {"squad": "contextual", "facts": "parametric"}
    assert r.limits == {"squad": 3, "facts": 3}
    with pytest.raises(MvquantError, match="\\(quick\\): unknown task or group 'nope'"):
        parse_recipe(base(quick={"tasks": ["nope"]}), catalog=CATALOG)


def test_gemma_recipes_mirror_the_smollm2_ones():
    """The Gemma 3 270M experiments run the same arms as SmolLM2's (Table 1 adds a top-4 pair), with a
    group size that divides its widths (640, 2048) and is not the Q4_K sub-block of 32."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "recipes"

    def arms(name):
        return {(a.name, a.method, a.bits, a.protect, a.disrupt, a.top_k, a.group_size)
                for a in load_recipe(root / f"{name}.yaml").arms}

    for name in ("gemma3-270m-figure5", "gemma3-270m-table1"):
        for quick in (False, True):
            r = load_recipe(root / f"{name}.yaml", quick=quick)
            assert r.model == "gemma3-270m" and {r.task_groups[t] for t in r.tasks} == {"contextual", "parametric"}
            assert all(a.group_size is None or (a.group_size != 32 and 640 % a.group_size == 0) for a in r.arms)
    assert arms("gemma3-270m-figure5") == arms("figure5")
    table1 = arms("gemma3-270m-table1")
    assert arms("table1") < table1 and {a[5] for a in table1 if a[4] != "none"} == {1, 4}


def test_engine_key_leaves_in_process_cache_keys_alone():
    r = parse_recipe(base(arms=[{"name": "a", "method": "rtn", "bits": 4},
                                {"name": "b", "method": "rtn", "bits": 4, "engine": "llamacpp"}], quick={"limit": 2}),
                     catalog=CATALOG)
    a, b = r.arm("a").spec(), r.arm("b").spec()
    assert "engine" not in a and b.pop("engine") == "llamacpp" and a == b
