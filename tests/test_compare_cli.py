"""`mvquant compare` on bad input: a one-line error, exit 2, nothing written or lost."""
from __future__ import annotations

import yaml

from mvquant.cli import main
from mvquant.compare import compare, load_recipe
from test_compare_engine import FakeArmRunner, FakeTaskRunner


def write(path, **over):
    data = {"name": "cli", "model": "smollm2-135m", "tasks": ["capitals"], "limit": 2,
            "arms": [{"name": "fp", "method": "none"}]}
    data.update(over)
    path.write_text(yaml.safe_dump(data))
    return path


def test_missing_recipe(tmp_path, capsys):
    assert main(["compare", "--recipe", str(tmp_path / "nope.yaml"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "recipe '" in err and "nope.yaml' not found" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_unknown_method_and_task(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", arms=[{"name": "x", "method": "hqq", "bits": 4}])
    assert main(["compare", "--recipe", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'hqq': use one of none, rtn, awq, gptq, smoothquant, bnb-nf4, bnb-int8" in err
    bad = write(tmp_path / "bad2.yaml", tasks=["capitals", "mmlu_pro_max"])
    assert main(["compare", "--recipe", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown task or group 'mmlu_pro_max'" in err and "passkey_128" in err
    assert not (tmp_path / "o").exists()


def test_output_of_another_recipe_is_refused_untouched(tmp_path, capsys):
    first = write(tmp_path / "a.yaml")
    out = tmp_path / "o"
    compare(load_recipe(first), out, arm_runner=FakeArmRunner(), task_runner=FakeTaskRunner(), progress=False,
            log=lambda *_: None)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = write(tmp_path / "b.yaml", limit=3)
    assert main(["compare", "--recipe", str(other), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds results of a different recipe ('cli')" in err and "--resume" in err and "--force" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
