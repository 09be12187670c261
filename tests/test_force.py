"""Issue 22, data loss: `--force` replaces only an earlier output of the same kind that mvquant wrote
(it carries our manifest / export marker / compare.json and holds nothing else), never an input of
the command or a folder holding one. Every refusal is one line, exit 2, and every file is still
there byte for byte."""
from __future__ import annotations

import json

import pytest
from conftest import save_tiny_model

from mvquant.cli import main
from mvquant.errors import MvquantError
from mvquant.io import check_output_path


def snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(capsys, argv, *needles):
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def quantize(model, out, *extra):
    assert main(["quantize", str(model), "--protect", "none", "--bits", "4", "--group-size", "32",
                 "--output", str(out), "--quiet", *extra]) == 0


def export(ckpt, out, *extra):
    assert main(["export", str(ckpt), "--output", str(out), *extra]) == 0


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """work/model (a source model), work/ck (its checkpoint), work/served (the checkpoint's export)."""
    root = tmp_path_factory.mktemp("force") / "work"
    root.mkdir()
    model = save_tiny_model("llama", root / "model")
    quantize(model, root / "ck")
    export(root / "ck", root / "served")
    return root


def test_export_to_the_folder_holding_its_input_is_refused(work, capsys):
    (work / "notes.txt").write_text("my notes")
    before = snapshot(work)
    refused(capsys, ["export", str(work / "ck"), "--output", str(work), "--force"],
            f"--output '{work}' contains the input '{work / 'ck'}'", "choose another --output")
    assert snapshot(work) == before
    (work / "notes.txt").unlink()


def test_export_onto_its_own_checkpoint_is_refused(work, capsys):
    before = snapshot(work)
    refused(capsys, ["export", str(work / "ck"), "--output", str(work / "ck"), "--force"], "is the input")
    assert snapshot(work) == before


def test_quantize_onto_the_folder_of_its_source_model_is_refused(work, capsys):
    before = snapshot(work)
    refused(capsys, ["quantize", str(work / "model"), "--protect", "none", "--output", str(work), "--force"],
            "contains the input")
    refused(capsys, ["quantize", str(work / "model"), "--protect", "none", "--output", str(work / "model"),
                     "--force"], "is the input")
    assert snapshot(work) == before


def test_force_refuses_folders_mvquant_did_not_write(work, tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8 not ours")
    before = snapshot(tmp_path)
    refused(capsys, ["export", str(work / "ck"), "--output", str(foreign), "--force"],
            "was not written by this mvquant command", "mvquant_export.json")
    refused(capsys, ["quantize", str(work / "model"), "--protect", "none", "--output", str(foreign), "--force"],
            "was not written by this mvquant command", "mvquant_manifest.json")
    # an output of the other kind is not replaced either: an export is not a checkpoint, and back
    refused(capsys, ["quantize", str(work / "model"), "--protect", "none", "--output", str(work / "served"),
                     "--force"], "mvquant_manifest.json")
    refused(capsys, ["export", str(work / "ck"), "--output", str(work / "ck"), "--force"], "is the input")
    assert snapshot(tmp_path) == before


def test_force_refuses_an_earlier_output_the_user_added_files_to(work, tmp_path, capsys):
    out = tmp_path / "served"
    export(work / "ck", out)
    (out / "my-eval.json").write_text("{}")
    (out / "protect-lora").mkdir(exist_ok=True)
    (out / "protect-lora" / "notes.md").write_text("mine")
    before = snapshot(tmp_path)
    refused(capsys, ["export", str(work / "ck"), "--output", str(out), "--force"],
            "holds files mvquant did not write (my-eval.json, protect-lora/notes.md)")
    assert snapshot(tmp_path) == before
    ck = tmp_path / "ck"
    quantize(work / "model", ck)
    (ck / "eval.json").write_text("{}")
    refused(capsys, ["quantize", str(work / "model"), "--protect", "none", "--output", str(ck), "--force"],
            "holds files mvquant did not write (eval.json)")
    assert (ck / "eval.json").read_text() == "{}"


def test_force_replaces_an_earlier_output_of_the_same_kind(work, tmp_path):
    out, ck = tmp_path / "served", tmp_path / "ck"
    export(work / "ck", out, "--protect-as", "lora")
    marker = json.loads((out / "mvquant_export.json").read_text())
    assert set(marker["files"]) == set(snapshot(out)) - {"mvquant_export.json"}
    export(work / "ck", out, "--protect-as", "fp16", "--force")
    assert json.loads((out / "mvquant_export.json").read_text())["protect_as"] == "fp16"
    quantize(work / "model", ck, "--bits", "8")
    quantize(work / "model", ck, "--force")
    assert json.loads((ck / "config.json").read_text())["quantization_config"]["bits"] == 4
    empty = tmp_path / "empty"
    empty.mkdir()
    export(work / "ck", empty, "--force")        # an empty folder holds nothing to lose


def test_file_outputs_never_replace_an_input(work, tmp_path, capsys):
    config = work / "model" / "config.json"
    before = config.read_bytes()
    refused(capsys, ["calibrate", str(work / "model"), "--output", str(config), "--force"],
            "is a file inside the input")
    refused(capsys, ["eval", str(work / "ck"), "--tasks", "capitals", "--output", str(work / "ck" / "config.json"),
                     "--force"], "is a file inside the input")
    assert config.read_bytes() == before
    report = tmp_path / "r.json"
    report.write_text("{}")
    with pytest.raises(MvquantError, match="is the input"):
        check_output_path(report, force=True, inputs=[report])


def test_compare_refuses_an_output_that_holds_its_recipe(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: smollm2-135m\narms: [{name: fp, method: none}]\ntasks: [capitals]\n")
    refused(capsys, ["compare", "--recipe", str(recipe), "--output", str(recipe), "--force"], "is the input")
    assert recipe.read_text().startswith("name: r")
