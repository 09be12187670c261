"""mvquant export: compressed-tensors base + exact protect-LoRA on tiny GQA llama, Phi-3 (fused qkv_proj)
and GPT-NeoX (fused per-head query_key_value); transformers + peft reload; refusals."""
import json
import os

import pytest
import torch
from conftest import ToyTokenizer, make_tiny_model, make_tiny_tokenizer
from safetensors.torch import load_file

import mvquant
from mvquant.cli import main
from mvquant.errors import MvquantError
from mvquant.export import ENGINE_RANKS, export_compressed_tensors, padded_rank, selector_and_delta
from mvquant.export.compressed import check_exportable
from mvquant.pipeline import quantize
from mvquant.quantization import QuantConfig, QuantLinear
from mvquant.quantization import quantized_modules

IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 120, 64, 33, 2, 90, 11, 60]])
ARCHS = ["llama", "phi3", "gpt_neox"]


def _checkpoint(tmp, arch, **cfg):
    model = make_tiny_model(arch)
    report = mvquant.calibrate(model, ToyTokenizer(), samples=4, seq_len=32, top_k=1, progress=False)
    conf = dict(method="rtn", bits=4, group_size=32, protect="massive") | cfg
    quantize(model, QuantConfig(**conf), report=report, tokenizer=ToyTokenizer(), progress=False)
    return mvquant.save_quantized(model, make_tiny_tokenizer(), tmp / f"ck-{arch}", report=report)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    return tmp, {arch: _checkpoint(tmp, arch) for arch in ARCHS}


def _exact_reference(ck):
    """The mvquant model on its exact float path (no bf16 kernel rounding)."""
    ref = mvquant.load(ck)
    for q in quantized_modules(ref).values():
        q.compute = "dequant"
        q.prepare()
    return ref


def _decompress(tensors, name, bits, shape):
    """Base weight of one exported linear, unpacked by compressed-tensors' own helper."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    q = unpack_from_int32(tensors[f"{name}.weight_packed"], bits, torch.Size(shape)).float()
    s = tensors[f"{name}.weight_scale"].float()
    zp = tensors.get(f"{name}.weight_zero_point")
    z = torch.zeros_like(s) if zp is None else unpack_from_int32(zp, bits, torch.Size(s.shape), packed_dim=0).float()
    g = shape[1] // s.shape[1]
    return (q - z.repeat_interleave(g, 1)) * s.repeat_interleave(g, 1)


def test_padded_rank_and_selector():
    assert [padded_rank(n) for n in (1, 2, 8, 9, 33, 320, 321)] == [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(MvquantError, match="largest LoRA rank"):
        padded_rank(513)
    rows, delta = torch.tensor([5, 1, 7]), torch.randn(3, 6)
    a, b = selector_and_delta(rows, delta, out_features=10, rank=8, dtype=torch.float32)
    assert a.shape == (8, 6) and b.shape == (10, 8) and set(ENGINE_RANKS) >= {8}
    full = b @ a
    assert torch.equal(full[rows], delta) and full[[0, 2, 3, 4, 6, 8, 9]].abs().max() == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_base_plus_lora_is_the_quantlinear_weight(ckpts, arch):
    tmp, cks = ckpts
    out = tmp / f"lora-{arch}"
    s = export_compressed_tensors(cks[arch], out, protect_as="lora")
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == 4 and cfg["dtype"] == "float16"
    tensors = load_file(str(out / "model.safetensors"))
    lora_cfg = json.loads((out / "protect-lora" / "adapter_config.json").read_text())
    assert lora_cfg["r"] == lora_cfg["lora_alpha"] == s["lora_rank"] in ENGINE_RANKS
    adapter = load_file(str(out / "protect-lora" / "adapter_model.safetensors"))
    ref = mvquant.load(cks[arch])
    n_lora = 0
    for name, m in quantized_modules(ref).items():
        assert tensors[f"{name}.weight_scale"].dtype == torch.float16
        w = _decompress(tensors, name, 4, (m.out_features, m.in_features))
        eff = m.dequantized_weight(torch.float32)
        q_rows = m.quantized_rows
        assert torch.equal(w[q_rows], eff[q_rows])                    # packed rows: bit for bit
        if m.n_protected:
            n_lora += 1
            a = adapter[f"base_model.model.{name}.lora_A.weight"].float()
            b = adapter[f"base_model.model.{name}.lora_B.weight"].float()
            assert b.sum() == m.n_protected                           # a one-hot row selector
            fixed = w + b @ a
            p = m.protected_rows.long()
            err = (fixed[p] - eff[p]).abs()
            assert (w[p] - eff[p]).abs().max() > 10 * err.max()       # the base alone is not exact...
            assert torch.all(err <= (w[p] - eff[p]).abs() * 2 ** -10 + 1e-7)  # ...base + fp16 delta is
            assert torch.equal(fixed[q_rows], eff[q_rows])            # the correction touches only S
        else:
            assert f"base_model.model.{name}.lora_A.weight" not in adapter
    assert n_lora == len(s["lora_modules"]) > 0
    assert {"tokenizer.json", "mvquant_export.json"} <= set(os.listdir(out))
    assert (out / "calibration" / "calibration.json").is_file()
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]   # engines load every one


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("protect_as", ["lora", "fp16"])
def test_transformers_and_peft_reload_matches_mvquant(ckpts, arch, protect_as):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    tmp, cks = ckpts
    out = tmp / f"reload-{arch}-{protect_as}"
    export_compressed_tensors(cks[arch], out, protect_as=protect_as)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    if protect_as == "lora":
        model = PeftModel.from_pretrained(model, out / "protect-lora")
    else:
        assert not (out / "protect-lora").exists()
    model.eval()
    ref = _exact_reference(cks[arch])
    with torch.no_grad():
        a, b = ref(IDS).logits, model(IDS).logits
    # what differs: embeddings/norms stored in fp16 and the fp16 delta (both well under 1e-3 here)
    assert (a - b).abs().max() < 2e-3 * a.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_fp16_keeps_qkv_siblings_dense(ckpts):
    tmp, cks = ckpts
    s = export_compressed_tensors(cks["llama"], tmp / "dense-llama", protect_as="fp16")
    qc = json.loads((tmp / "dense-llama" / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(tmp / "dense-llama" / "model.safetensors"))
    for layer in (0, 1):
        for p in ("q_proj", "k_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{p}"
            assert name in qc["ignore"] and name in s["dense_modules"]
            assert tensors[f"{name}.weight"].dtype == torch.float16
        assert f"model.layers.{layer}.mlp.up_proj.weight_packed" in tensors
    assert "lm_head" in qc["ignore"]
    assert s["bits_per_weight"] > s["bits_per_weight_base"] - 1e-9 > 4.5


def test_symmetric_8bit_exports_without_zero_points(tmp_path):
    ck = _checkpoint(tmp_path, "llama", bits=8, group_size=None, symmetric=True)
    export_compressed_tensors(ck, tmp_path / "w8", protect_as="lora")
    tensors = load_file(str(tmp_path / "w8" / "model.safetensors"))
    assert not any(k.endswith("weight_zero_point") for k in tensors)
    ref = mvquant.load(ck)
    m = ref.model.layers[0].mlp.down_proj
    w = _decompress(tensors, "model.layers.0.mlp.down_proj", 8, (m.out_features, m.in_features))
    assert torch.equal(w, m.dequantized_weight(torch.float32))
    qc = json.loads((tmp_path / "w8" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["strategy"] == "channel"


# -- refusals: one line, exit 2, nothing written ---------------------------------------------------
def _refused(capsys, argv, match, out):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]   # (after any loading progress bar)
    assert err.startswith("mvquant export: error:") and len(err.splitlines()) == 1 and match in err, err
    assert not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


def test_refuses_3bit(tmp_path, capsys):
    ck = _checkpoint(tmp_path, "llama", bits=3)
    _refused(capsys, ["export", str(ck), "--output", str(tmp_path / "o")], "3-bit weights have no kernel", tmp_path / "o")


def test_refuses_group_not_dividing(tmp_path, capsys):
    ck = _checkpoint(tmp_path, "llama", group_size=48)        # 64 % 48 != 0 (the last group is short)
    _refused(capsys, ["export", str(ck), "--output", str(tmp_path / "o")], "--group-size 32 or -1", tmp_path / "o")


def test_refuses_smoothquant_bnb_and_input_scale():
    with pytest.raises(MvquantError, match="SmoothQuant W8A8 is not exported"):
        check_exportable({"method": "smoothquant", "bits": 8, "act_bits": 8}, {})
    with pytest.raises(MvquantError, match="bitsandbytes"):
        check_exportable({"method": "bnb-nf4", "bits": 4}, {})
    m = QuantLinear.from_weight(torch.randn(16, 64), None, bits=4, group_size=32, symmetric=False,
                                input_scale=torch.rand(64) + 0.5)
    with pytest.raises(MvquantError, match="stores an input_scale"):
        check_exportable({"method": "awq", "bits": 4}, {"model.layers.0.mlp.up_proj": m})


def test_refuses_existing_output_corrupt_and_foreign(ckpts, tmp_path, capsys):
    _, cks = ckpts
    existing = tmp_path / "exists"
    existing.mkdir()
    assert main(["export", str(cks["llama"]), "--output", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and not any(existing.iterdir())
    # a truncated weights file fails the integrity check
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(cks["llama"], bad)
    w = bad / "model.mvquant.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    _refused(capsys, ["export", str(bad), "--output", str(tmp_path / "o")], "truncated or corrupt", tmp_path / "o")
    plain = tmp_path / "plain"
    make_tiny_model("llama").save_pretrained(plain)
    _refused(capsys, ["export", str(plain), "--output", str(tmp_path / "o")], "not an mvquant checkpoint", tmp_path / "o")
    _refused(capsys, ["export", str(cks["llama"]), "--format", "onnx", "--output", str(tmp_path / "o")],
             "unknown --format", tmp_path / "o")


def test_cli_force_replaces(ckpts, tmp_path, capsys):
    _, cks = ckpts
    out = tmp_path / "served"
    assert main(["export", str(cks["phi3"]), "--output", str(out), "--protect-as", "lora"]) == 0
    assert "LoRA rank" in capsys.readouterr().out and (out / "protect-lora" / "adapter_config.json").is_file()
    assert main(["export", str(cks["phi3"]), "--output", str(out), "--protect-as", "fp16", "--force"]) == 0
    assert not (out / "protect-lora").exists()


def test_dense_copy_serves_the_same_function(ckpts, tmp_path):
    """The stand-in vLLM serves where it has no W4A16 kernel: dense fp16 base + the same adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mvquant.export.compressed import dense_copy

    tmp, cks = ckpts
    export_compressed_tensors(cks["llama"], tmp_path / "lora", protect_as="lora")
    dense = dense_copy(tmp_path / "lora", tmp_path / "dense")
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32),
                                      dense / "protect-lora").eval()
    ref = _exact_reference(cks["llama"])
    with torch.no_grad():
        a, b = ref(IDS).logits, model(IDS).logits
    assert (a - b).abs().max() < 2e-3 * a.abs().max() and torch.equal(a.argmax(-1), b.argmax(-1))
