"""Checkpoints: save -> load (mvquant.load and transformers' from_pretrained) -> identical logits,
in a fresh process; loud failure without mvquant; integrity checks; atomic, no overwrite."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ToyTokenizer, make_tiny_model
from safetensors.torch import load_file, save_file

import mvquant
from mvquant.errors import MvquantError
from mvquant.pipeline import quantize
from mvquant.quantization import QuantConfig, QuantLinear

REPO = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 120, 64, 33, 2, 90]])


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A protected AWQ checkpoint of a tiny GQA llama, and its in-memory logits."""
    tmp = tmp_path_factory.mktemp("ckpt")
    model = make_tiny_model("llama")
    report = mvquant.calibrate(model, ToyTokenizer(), samples=4, seq_len=32, top_k=1, progress=False)
    quantize(model, QuantConfig(method="awq", bits=4, group_size=32, protect="massive", calib_samples=4,
                                calib_seq_len=32, awq_grid=5, awq_clip_grid=3),
             report=report, tokenizer=ToyTokenizer(), progress=False)
    with torch.no_grad():
        logits = model(IDS).logits
    save_file({"logits": logits.contiguous(), "ids": IDS}, str(tmp / "expected.safetensors"))
    out = mvquant.save_quantized(model, None, tmp / "ck", report=report)
    return out, tmp / "expected.safetensors", model


def test_checkpoint_layout(saved):
    ck, _, model = saved
    names = set(os.listdir(ck))
    assert {"model.mvquant.safetensors", "config.json", "mvquant_manifest.json", "calibration.json"} <= names
    assert "model.safetensors" not in names
    qc = json.loads((ck / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "mvquant" and qc["method"] == "awq" and qc["protect"] == "massive"
    assert sum(qc["modules"].values()) == model.mvquant_summary["protected_rows"] > 0
    tensors = load_file(str(ck / "model.mvquant.safetensors"))
    q = tensors["model.layers.0.self_attn.q_proj.qweight"]
    assert q.dtype == torch.uint8 and q.shape[1] == 64 // 2            # two int4 codes per byte
    assert tensors["model.layers.0.self_attn.q_proj.protected_weight"].dtype == torch.float16
    assert not any(k.endswith("q_proj.weight") for k in tensors)
    manifest = json.loads((ck / "mvquant_manifest.json").read_text())
    assert manifest["files"]["model.mvquant.safetensors"]["bytes"] == (ck / "model.mvquant.safetensors").stat().st_size


def test_fresh_process_loads_identical_logits(saved):
    ck, expected, _ = saved
    r = _run(f"""
        import torch, mvquant, transformers
        from safetensors.torch import load_file
        exp = load_file({str(expected)!r})
        a = mvquant.load({str(ck)!r})
        b = transformers.AutoModelForCausalLM.from_pretrained({str(ck)!r})
        m, tok = mvquant.load_model({str(ck)!r})
        with torch.no_grad():
            for model in (a, b, m):
                assert isinstance(model.model.layers[0].self_attn.q_proj, mvquant.quantization.QuantLinear)
                assert torch.equal(model(exp["ids"]).logits, exp["logits"]), "logits differ"
        print("IDENTICAL")
    """)
    assert r.returncode == 0 and "IDENTICAL" in r.stdout, r.stderr[-2000:]


def test_without_mvquant_loading_fails_loudly(saved):
    ck, _, _ = saved
    r = _run(f"""
        import transformers
        transformers.AutoModelForCausalLM.from_pretrained({str(ck)!r})
    """)
    assert r.returncode != 0
    assert "OSError" in r.stderr and "model.safetensors" in r.stderr


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_corrupt_and_truncated_shards(saved, tmp_path):
    ck, _, _ = saved
    bad = _copy(ck, tmp_path / "corrupt")
    data = bytearray((bad / "model.mvquant.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (bad / "model.mvquant.safetensors").write_bytes(bytes(data))
    with pytest.raises(MvquantError, match="corrupt"):
        mvquant.load(bad)
    short = _copy(ck, tmp_path / "short")
    (short / "model.mvquant.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MvquantError, match="truncated"):
        mvquant.load(short)
    gone = _copy(ck, tmp_path / "gone")
    (gone / "mvquant_manifest.json").unlink()
    with pytest.raises(MvquantError, match="not a complete mvquant checkpoint"):
        mvquant.load(gone)


def test_output_rules(saved, tmp_path):
    _, _, model = saved
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(MvquantError, match="already exists"):
        mvquant.save_quantized(model, None, out)
    assert (out / "keep.txt").exists()
    with pytest.raises(MvquantError, match="was not written by this mvquant command"):   # --force: ours only
        mvquant.save_quantized(model, None, out, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    mvquant.save_quantized(model, None, out, force=True)                 # an empty folder holds nothing
    mvquant.save_quantized(model, None, out, force=True)                 # an earlier checkpoint is replaced
    assert (out / "model.mvquant.safetensors").exists()
    with pytest.raises(MvquantError, match="does not exist"):
        mvquant.save_quantized(model, None, tmp_path / "missing" / "ck")
    assert not (tmp_path / "missing").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left behind
    with pytest.raises(MvquantError, match="not quantized"):
        mvquant.save_quantized(make_tiny_model("llama"), None, tmp_path / "plain")


def test_failed_save_leaves_nothing(saved, tmp_path, monkeypatch):
    _, _, model = saved
    import mvquant.checkpoint.format as C

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(C, "_sha256", boom)
    with pytest.raises(RuntimeError):
        mvquant.save_quantized(model, None, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["phi3", "gpt2"])
def test_round_trip_other_architectures(arch, tmp_path):
    """Fused qkv (phi3) and transposed Conv1D weights (gpt2), in process."""
    model = make_tiny_model(arch)
    quantize(model, QuantConfig(bits=3, group_size=16), progress=False)
    with torch.no_grad():
        ref = model(IDS).logits
    loaded = mvquant.load(mvquant.save_quantized(model, None, tmp_path / "ck"))
    assert any(isinstance(m, QuantLinear) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, ref)
