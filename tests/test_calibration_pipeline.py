"""Calibration end to end: planted massive rows, padding, determinism, the report, the CLI, and the
built-in model's real phenomenon."""
import json

import pytest
import torch

from conftest import make_tiny_model, make_tiny_tokenizer
from mvquant import MvquantError, calibrate, load_report
from mvquant.calibration.report import stats_path_for
from mvquant.cli import main
from mvquant.models import get_layout

TEXTS = [("The quick brown fox jumps over the lazy dog. " * (3 + i)) + f"Sample {i}." for i in range(12)]


def _plant(model, layer, kind, head, dim, factor=40.0):
    layout = get_layout(model)
    name, rows = layout.projection_rows(kind, [[dim] if h == head else [] for h in range(layout.heads(kind))])
    with torch.no_grad():
        getattr(layout.attention(model, layer), name).weight[rows] *= factor


def test_planted_massive_dims_are_found_with_their_pairs():
    model = make_tiny_model("llama")            # head_dim 16: pair partner of 13 is 5
    _plant(model, 0, "q", head=1, dim=13)
    _plant(model, 1, "k", head=0, dim=2)
    report = calibrate(model, make_tiny_tokenizer(), texts=TEXTS, samples=4, seq_len=64, progress=False)
    assert report.massive(0, "q", closed=False) == [[], [13], [], []]
    assert report.massive(0, "q") == [[], [5, 13], [], []]
    assert report.massive(1, "k", closed=False) == [[2], []]
    assert report.massive(1, "k") == [[2, 10], []]
    assert report.layers[0]["k"]["count"] == 0 and report.layers[0]["v"]["count"] == 0
    # pair 5 of 8 at base 10,000: 2 pi / 10000^(-10/16) = 1986.9 tokens per turn
    assert report.layers[0]["q"]["top"][0] == {"head": 1, "dim": 13, "pair": 5, "wavelength": 1986.9,
                                               "ratio": report.layers[0]["q"]["max_ratio"]}
    top1 = calibrate(model, make_tiny_tokenizer(), texts=TEXTS, samples=4, seq_len=64, top_k=1, progress=False)
    assert top1.massive(0, "q", closed=False)[1] == [13]
    assert all(len(d) == 1 for d in top1.massive(0, "q", closed=False))


def test_padding_does_not_change_statistics():
    model, tok = make_tiny_model("qwen3"), make_tiny_tokenizer()
    kw = dict(texts=TEXTS, samples=6, seq_len=200, pack=False, progress=False)
    batched = calibrate(model, tok, batch_size=3, **kw)      # sequences of different lengths, padded
    single = calibrate(model, tok, batch_size=1, **kw)       # no padding at all
    for key, m in single.norms.items():
        torch.testing.assert_close(batched.norms[key], m, rtol=1e-5, atol=1e-6)


def test_deterministic_given_seed():
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    a = calibrate(model, tok, texts=TEXTS, samples=3, seq_len=32, seed=7, progress=False)
    b = calibrate(model, tok, texts=TEXTS, samples=3, seq_len=32, seed=7, progress=False)
    c = calibrate(model, tok, texts=TEXTS, samples=3, seq_len=32, seed=8, progress=False)
    assert all(torch.equal(a.norms[k], b.norms[k]) for k in a.norms)
    assert any(not torch.equal(a.norms[k], c.norms[k]) for k in a.norms)


def test_report_round_trip_and_model_check(tmp_path):
    model, tok = make_tiny_model("phi3"), make_tiny_tokenizer()
    report = calibrate(model, tok, texts=TEXTS, samples=2, seq_len=32, progress=False)
    path = tmp_path / "r.json"
    report.save(path)
    data = json.loads(path.read_text())
    for key in ("model", "lambda", "num_layers", "rope", "layers"):
        assert key in data
    assert data["rope"] == {"rotary_dim": 16, "pairing": "half", "theta": 10000.0, "head_dim": 16,
                            "theta_per_layer": [10000.0, 10000.0]}
    assert [len(layer["k"]["massive"]) for layer in data["layers"]] == [2, 2]   # per KV head
    again = load_report(path)
    assert again.layers == report.layers
    assert all(torch.equal(again.norm(i, k), report.norm(i, k)) for i in range(2) for k in "qkv")
    again.check_matches(get_layout(model))
    with pytest.raises(MvquantError, match="does not match"):
        again.check_matches(get_layout(make_tiny_model("llama")))


def test_offloaded_model_gives_the_same_statistics(tiny_model_dir, tmp_path):
    """A model larger than memory runs layer by layer with accelerate offload; the hooks still see q/k/v."""
    from transformers import AutoModelForCausalLM
    from mvquant.loading import load_model
    d = tiny_model_dir("qwen2")
    plain, tok = load_model(d)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(d, device_map=device_map, offload_folder=str(tmp_path / "off"))
    assert offloaded.hf_device_map["model.layers.1"] == "disk"
    a = calibrate(plain, tok, texts=TEXTS, samples=2, seq_len=32, progress=False)
    b = calibrate(offloaded, tok, texts=TEXTS, samples=2, seq_len=32, progress=False)
    assert all(torch.allclose(a.norms[k], b.norms[k], atol=1e-6) for k in a.norms)


def test_non_rope_model_calibrates_and_says_so():
    report = calibrate(make_tiny_model("gpt2"), make_tiny_tokenizer(), texts=TEXTS, samples=2, seq_len=32, progress=False)
    assert report.rope is None
    assert report.meta["note"] == "no RoPE: no concentrated massive values expected"
    assert report.layers[0]["q"]["low_frequency_share"] is None


# -- the CLI and bad input ------------------------------------------------------------------------

def _cli(capsys, *argv):
    capsys.readouterr()                       # drop what fixtures printed
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_writes_report_stats_and_plot(tiny_model_dir, tmp_path, capsys):
    d = tiny_model_dir("llama")
    out = tmp_path / "r.json"
    code, stdout, _ = _cli(capsys, "calibrate", str(d), "--output", str(out), "--plot", str(tmp_path / "r.png"),
                           "--samples", "2", "--seq-len", "64", "--data", str(_corpus(tmp_path)), "--quiet")
    assert code == 0
    assert json.loads(out.read_text())["num_layers"] == 2
    assert stats_path_for(out).is_file()
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # An existing output is refused without --force and kept intact.
    before = out.read_text()
    code, _, err = _cli(capsys, "calibrate", str(d), "--output", str(out), "--samples", "2", "--seq-len", "64",
                        "--data", str(_corpus(tmp_path)), "--quiet")
    assert code == 2 and "already exists" in err and "--force" in err and out.read_text() == before
    code, _, _ = _cli(capsys, "calibrate", str(d), "--output", str(out), "--samples", "2", "--seq-len", "64",
                      "--data", str(_corpus(tmp_path)), "--quiet", "--force", "--top-k", "1")
    assert code == 0 and json.loads(out.read_text())["top_k"] == 1


def test_cli_non_rope_model_reports_it(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, _ = _cli(capsys, "calibrate", str(tiny_model_dir("gpt2")), "--output", str(out),
                           "--samples", "2", "--seq-len", "64", "--data", str(_corpus(tmp_path)))
    assert code == 0 and "no RoPE: no concentrated massive values expected" in stdout
    assert json.loads(out.read_text())["rope"] is None


def _corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    if not p.exists():
        p.write_text(" ".join(TEXTS) * 4)
    return p


@pytest.mark.parametrize("case,expect", [
    ("missing_model", "does not exist"),
    ("not_a_model_dir", "not a model"),
    ("seq_len_too_long", "beyond the model's 256 positions"),
    ("empty_data", "calibration data is empty"),
    ("short_data", "calibration data too short"),
    ("missing_output_dir", "does not exist: create it first"),
    ("bad_top_k", "--top-k must be in 1..16"),
    ("missing_data_file", "not found"),
])
def test_cli_bad_input(case, expect, tiny_model_dir, tmp_path, capsys):
    model = str(tiny_model_dir("llama"))
    out = tmp_path / "r.json"
    data = str(_corpus(tmp_path))
    args = {"samples": "2", "seq_len": "64"}
    if case == "missing_model":
        model = str(tmp_path / "nope")
    elif case == "not_a_model_dir":
        (tmp_path / "empty").mkdir()
        model = str(tmp_path / "empty")
    elif case == "seq_len_too_long":
        args["seq_len"] = "1000"
    elif case == "empty_data":
        (tmp_path / "empty.txt").write_text("  \n")
        data = str(tmp_path / "empty.txt")
    elif case == "short_data":
        args["samples"] = "500"
    elif case == "missing_output_dir":
        out = tmp_path / "no" / "such" / "r.json"
    elif case == "missing_data_file":
        data = str(tmp_path / "absent.txt")
    argv = ["calibrate", model, "--output", str(out), "--data", data, "--samples", args["samples"],
            "--seq-len", args["seq_len"], "--quiet"]
    if case == "bad_top_k":
        argv += ["--top-k", "99"]
    code, _, err = _cli(capsys, *argv)
    assert code == 2
    last = err.strip().splitlines()[-1]     # loading progress bars may precede it
    assert last.startswith("mvquant calibrate: error: ") and expect in last
    assert not out.exists() and not stats_path_for(out).exists()


# -- the real phenomenon on the built-in model -----------------------------------------------------

@pytest.mark.slow
def test_builtin_model_has_massive_low_frequency_qk_and_not_v(builtin_model):
    model, tok = builtin_model
    report = calibrate(model, tok, samples=8, seq_len=256, progress=False)
    s = report.meta["summary"]
    n = report.meta["num_layers"]
    assert n == 30 and report.rope["theta"] == 100000.0 and report.rope["pairing"] == "half"
    assert s["q"]["layers_with_massive"] >= 0.9 * n
    assert s["k"]["layers_with_massive"] >= 0.9 * n
    assert s["q"]["low_frequency_share"] >= 0.8 and s["k"]["low_frequency_share"] >= 0.8
    assert s["v"]["layers_with_massive"] <= 0.1 * n
    # Q/K massive dims concentrate: on average they stand out far more than V's largest dim.
    q_ratio = sum(layer["q"]["max_ratio"] for layer in report.layers) / n
    v_ratio = sum(layer["v"]["max_ratio"] for layer in report.layers) / n
    assert q_ratio > 2 * v_ratio
