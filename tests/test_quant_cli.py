"""`mvquant quantize`: every bad input is a one-line error, exit 2, nothing written."""
import json

import pytest
import torch
from conftest import ToyTokenizer, make_tiny_model

import mvquant
from mvquant.cli import main


def _fails(capsys, argv, match):
    assert main(["quantize", *argv]) == 2
    err = capsys.readouterr().err.strip().replace("\r", "\n")
    errors = [line for line in err.splitlines() if "error" in line]  # transformers' loading bar may precede it
    assert len(errors) == 1 and errors[0].startswith("mvquant quantize: error: ") and match in errors[0], err
    return errors[0]


@pytest.mark.parametrize("argv,match", [
    (["--method", "hqq"], "unknown method"),
    (["--bits", "5"], "unsupported bits"),
    (["--protect", "everything"], "unknown protection policy"),
    (["--protect", "topk:0"], "unknown protection policy"),
    (["--group-size", "0"], "group size"),
    (["--group-size", "-8"], "group size"),
    (["--protect", "massive"], "needs --calibration"),
    (["--protect", "random"], "needs --calibration"),
    (["--method", "smoothquant", "--group-size", "64"], "one weight scale per output row"),
    (["--method", "bnb-nf4", "--bits", "8"], "4-bit"),
    (["--calibration", "/no/such/report.json", "--protect", "massive"], "not found"),
])
def test_bad_arguments(capsys, tmp_path, argv, match):
    _fails(capsys, [*argv, "--output", str(tmp_path / "ck")], match)
    assert list(tmp_path.iterdir()) == []


def test_output_paths(capsys, tmp_path):
    _fails(capsys, ["--output", str(tmp_path / "missing" / "ck")], "does not exist")
    (tmp_path / "ck").mkdir()
    _fails(capsys, ["--output", str(tmp_path / "ck")], "already exists")
    _fails(capsys, ["--method", "bnb-nf4", "--output", str(tmp_path / "new")], "cannot be saved")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.slow
def test_report_from_another_model(capsys, tmp_path):
    tiny = make_tiny_model("llama")
    mvquant.calibrate(tiny, ToyTokenizer(), samples=2, seq_len=16, progress=False).save(tmp_path / "tiny.json")
    err = _fails(capsys, ["--calibration", str(tmp_path / "tiny.json"), "--protect", "massive",
                          "--output", str(tmp_path / "ck")], "does not match this model")
    assert "num_layers 2 vs model 30" in err
    assert not (tmp_path / "ck").exists()


@pytest.mark.slow
def test_quantize_builtin_end_to_end(capsys, tmp_path, builtin_model):
    """Built-in model: CLI checkpoint == in-memory quantization, bit for bit, through from_pretrained."""
    import transformers

    model, tok = builtin_model
    report = mvquant.calibrate(model, tok, samples=2, seq_len=64, progress=False)
    report.save(tmp_path / "report.json")
    out = tmp_path / "ck"
    assert main(["quantize", "--calibration", str(tmp_path / "report.json"), "--protect", "massive", "--bits", "4",
                 "--group-size", "64", "--output", str(out), "--quiet", "--summary-json", str(tmp_path / "s.json")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert f"{summary['bits_per_weight']:.3f}" in printed and "protected rows" in printed
    assert summary["protected_rows"] > 0 and summary["quantized_linears"] == 30 * 7
    # bits per weight from the format alone: a packed row holds in/2 code bytes, an fp16 scale per group
    # of 64 and the groups' 4-bit zero points (packed 8 codes in 4 bytes); a protected row 2 bytes a
    # weight and an int32 index
    from mvquant.quantization import quantized_modules
    mods = quantized_modules(mvquant.load(out)).values()

    def packed_row(m):
        groups = -(-m.in_features // 64)
        return m.in_features // 2 + 2 * groups + 4 * -(-groups // 8)
    weights = sum(m.out_features * m.in_features for m in mods)
    expected = sum(8 * ((m.out_features - m.n_protected) * packed_row(m) + m.n_protected * (2 * m.in_features + 4))
                   for m in mods) / weights
    unprotected = sum(8 * m.out_features * packed_row(m) for m in mods) / weights
    assert sum(m.n_protected for m in mods) == summary["protected_rows"]
    assert summary["bits_per_weight"] == pytest.approx(expected, rel=1e-9)
    assert summary["bits_per_weight"] - unprotected > 0.03          # the protected rows cost 0.043 here
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    fresh, _ = mvquant.load_model()
    mvquant.quantize(fresh, mvquant.QuantConfig(bits=4, group_size=64, protect="massive"), report=report, progress=False)
    ids = tok("Paris is the capital of", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, fresh(ids).logits)
    assert (out / "calibration.json").is_file() and (out / "tokenizer.json").is_file()
