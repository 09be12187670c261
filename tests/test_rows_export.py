"""--protect-as rows and the plugin's `mvquant-rows` linear method, without vLLM: tiny models of each fused
layout (Llama q/k/v fused into qkv_proj by vLLM, Phi-3's qkv_proj, GPT-NeoX's per-head interleaved
query_key_value) exported, loaded the way vLLM's weight loader feeds a fused layer (one checkpoint module
per shard, shard ids "q"/"k"/"v"), and computed with the plugin's own functions. (Inside a running vLLM:
the `serve`-marked tests/test_serve.py.)"""
import json
import sys
from pathlib import Path

import pytest
import torch
from test_export import _checkpoint
from safetensors.torch import load_file

import mvquant
from mvquant.export import export_compressed_tensors
from mvquant.export.compressed import ROWS_KEY, ROWS_METHOD, from_compressed, weights_file
from mvquant.quantization import quantized_modules

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "mvquant-vllm"))
from mvquant_vllm.rows import RowSlots, apply_delta, apply_rows, checkpoint_modules  # noqa: E402

# vLLM 0.32's packed_modules_mapping per architecture (llama.py, phi3.py; GPT-NeoX runs on the
# Transformers backend, which keeps HF's module names and fuses nothing)
VLLM_PACKED = {"llama": {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]},
               "phi3": {"qkv_proj": ["qkv_proj"], "gate_up_proj": ["gate_up_proj"]},
               "gpt_neox": {}}
# the vLLM layer holding each architecture's attention projection: its shard ids as the loader passes
# them, and its output partitions (QKVParallelLinear: q, k, v; the Transformers backend's ReplicatedLinear: one)
VLLM_QKV = {"llama": ("model.layers.{}.self_attn.qkv_proj", ["q", "k", "v"], [64, 32, 32]),
            "phi3": ("model.layers.{}.self_attn.qkv_proj", [None], [64, 32, 32]),
            "gpt_neox": ("gpt_neox.layers.{}.attention.query_key_value", [None], [192])}
ARCHS = list(VLLM_QKV)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rows")
    out = {}
    for arch in ARCHS:
        ck = _checkpoint(tmp, arch)
        out[arch] = (ck, tmp / f"rows-{arch}", export_compressed_tensors(ck, tmp / f"rows-{arch}", protect_as="rows"))
    return out


def load_fused(out_dir, prefix, shard_ids, out_sizes, packed):
    """What vLLM's loader builds for one fused layer: the base weight (dequantized from the packed
    tensors, concatenated in shard order) and the plugin's RowSlots filled shard by shard."""
    cfg = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    t = load_file(str(weights_file(out_dir)))
    names = checkpoint_modules(prefix, packed)
    bases = [from_compressed(t, n, 4) for n in names]
    in_f = bases[0].shape[1]
    rows = [cfg[ROWS_KEY]["modules"].get(n, 0) for n in names]
    assert sum(out_sizes) == sum(b.shape[0] for b in bases)
    slots = RowSlots(names, rows, out_sizes, in_f)
    index, weight = torch.zeros(slots.total, dtype=torch.int32), torch.zeros(slots.total, in_f)
    for n, sid in zip(names, shard_ids):
        if f"{n}.rows_index" in t:
            slots.load("index", index, t[f"{n}.rows_index"], sid)
            slots.load("weight", weight, t[f"{n}.rows_weight"], sid)
    slots.check_complete()
    bias = torch.cat([t[f"{n}.bias"].float() for n in names]) if f"{names[0]}.bias" in t else None
    return torch.cat(bases), index.long(), weight, bias, names


def test_checkpoint_modules_follow_vllms_fusion():
    assert checkpoint_modules("model.layers.3.self_attn.qkv_proj", VLLM_PACKED["llama"]) == [
        f"model.layers.3.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    assert checkpoint_modules("model.layers.3.mlp.gate_up_proj", VLLM_PACKED["llama"]) == [
        "model.layers.3.mlp.gate_proj", "model.layers.3.mlp.up_proj"]
    assert checkpoint_modules("model.layers.3.self_attn.qkv_proj", VLLM_PACKED["phi3"]) == [
        "model.layers.3.self_attn.qkv_proj"]
    assert checkpoint_modules("gpt_neox.layers.0.attention.query_key_value", {}) == [
        "gpt_neox.layers.0.attention.query_key_value"]


@pytest.mark.parametrize("arch", ARCHS)
def test_export_packs_like_lora_and_stores_the_rows(exports, arch, tmp_path):
    ck, out, s = exports[arch]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == ROWS_METHOD and qc["format"] == "pack-quantized"
    t = load_file(str(weights_file(out)))
    lora = tmp_path / "lora"
    export_compressed_tensors(ck, lora, protect_as="lora")
    tl = load_file(str(lora / "model.safetensors"))
    assert {k for k in t if ".rows_" not in k} == set(tl)                 # the base: the LoRA route's, bit for bit
    assert all(torch.equal(t[k], tl[k]) for k in tl)
    ref = mvquant.load(ck)
    mods = quantized_modules(ref)
    declared = qc[ROWS_KEY]["modules"]
    assert declared == {n: m.n_protected for n, m in mods.items() if m.n_protected} and declared
    assert set(s["rows_modules"]) == set(declared) and not s["lora_modules"] and not s["dense_modules"]
    for name, n in declared.items():
        m = mods[name]
        assert t[f"{name}.rows_index"].dtype == torch.int32 and t[f"{name}.rows_weight"].dtype == torch.float16
        assert torch.equal(t[f"{name}.rows_index"], m.protected_rows)
        assert torch.equal(t[f"{name}.rows_weight"], m.protected_weight)
    # bits: the packed base plus 16 bits per stored row weight and 32 per index
    extra = sum(n * (32 + 16 * mods[name].in_features) for name, n in declared.items())
    total = sum(m.out_features * m.in_features for m in mods.values())
    assert s["bits_per_weight"] == pytest.approx(s["bits_per_weight_base"] + extra / total, abs=2e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_layer_effective_weight_is_the_quantlinear_weight(exports, arch):
    """x = identity: the layer's output is its effective weight (transposed), with no rounding."""
    ck, out, _ = exports[arch]
    ref = quantized_modules(mvquant.load(ck))
    prefix, shard_ids, out_sizes = VLLM_QKV[arch]
    for layer in (0, 1):
        w_base, index, weight, bias, names = load_fused(out, prefix.format(layer), shard_ids, out_sizes,
                                                        VLLM_PACKED[arch])
        eff = torch.cat([ref[n].dequantized_weight(torch.float32) for n in names])
        protected = torch.cat([ref[n].protected_rows.long() + sum(ref[p].out_features for p in names[:i])
                               for i, n in enumerate(names)])
        assert index.sort().values.tolist() == protected.sort().values.tolist() and index.numel() > 0
        x = torch.eye(w_base.shape[1])
        y = apply_rows(x @ w_base.t(), x, index, weight)
        assert torch.equal(y.t(), eff)                                  # every row, protected ones included
        assert not torch.equal(w_base[index], eff[index])               # (the base alone is not exact there)
        # with a bias and a batch of activations: bias kept on the overwritten rows
        if bias is not None:
            xs = torch.randn(3, 5, w_base.shape[1])
            yb = apply_rows(xs @ w_base.t() + bias, xs, index, weight, bias)
            assert torch.allclose(yb, xs @ eff.t() + bias, atol=1e-5)


def test_rows_and_delta_corrections_agree_and_overwrite_is_exact():
    g = torch.Generator().manual_seed(0)
    w_s = (torch.randn(6, 64, generator=g) * 0.05).half()
    base = torch.randn(32, 64, generator=g) * 0.05
    index = torch.tensor([3, 9, 10, 20, 21, 31])
    base[index] = w_s.float() + torch.randn(6, 64, generator=g) * 0.003       # a grid step off
    x = torch.eye(64)
    y_rows = apply_rows(x @ base.t(), x, index, w_s.float())
    y_delta = apply_delta(x @ base.t(), x, index, (w_s.float() - base[index]).half().float())
    assert torch.equal(y_rows.t()[index], w_s.float())                         # difference 0
    err = (y_delta.t()[index] - w_s.float()).abs().max()
    assert 0 < err < 1e-5                                                      # fp16 delta: rounds
    assert torch.equal(y_rows.t()[[0, 1, 2]], base[[0, 1, 2]])


def test_loader_refuses_a_correction_that_does_not_match_its_modules():
    names = ["a.q_proj", "a.k_proj", "a.v_proj"]
    slots = RowSlots(names, [2, 1, 0], [8, 4, 4], 16)
    idx, w = torch.zeros(3, dtype=torch.int32), torch.zeros(3, 16)
    with pytest.raises(ValueError, match=r"a.q_proj.rows_index has shape \(3,\), the config declares 2"):
        slots.load("index", idx, torch.tensor([0, 1, 2], dtype=torch.int32), "q")
    with pytest.raises(ValueError, match=r"a.k_proj.rows_weight has shape \(1, 12\), the module needs \(1, 16\)"):
        slots.load("weight", w, torch.zeros(1, 12), "k")
    with pytest.raises(ValueError, match=r"distinct rows in \[0, 4\)"):
        slots.load("index", idx, torch.tensor([4], dtype=torch.int32), "k")
    with pytest.raises(ValueError, match="distinct rows"):
        slots.load("index", idx, torch.tensor([5, 5], dtype=torch.int32), "q")
    with pytest.raises(ValueError, match="unknown shard 'x'"):
        slots.load("index", idx, torch.tensor([1], dtype=torch.int32), "x")
    slots.load("index", idx, torch.tensor([1, 6], dtype=torch.int32), "q")
    slots.load("weight", w, torch.ones(2, 16), "q")
    slots.load("index", idx, torch.tensor([3], dtype=torch.int32), "k")
    with pytest.raises(ValueError, match="the checkpoint lacks: a.k_proj.rows_weight"):
        slots.check_complete()
    slots.load("weight", w, torch.ones(1, 16), "k")
    slots.check_complete()
    assert idx.tolist() == [1, 6, 8 + 3]                                       # k's row 3 after q's 8 outputs
    with pytest.raises(ValueError, match="2 checkpoint modules"):
        RowSlots(["a", "b"], [1, 1], [4, 4, 4], 16)


def test_no_protected_rows_exports_plain_compressed_tensors(tmp_path):
    ck = _checkpoint(tmp_path, "llama", protect="none")
    s = export_compressed_tensors(ck, tmp_path / "o", protect_as="rows")
    qc = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and ROWS_KEY not in qc and s["rows_modules"] == []


def test_transformers_without_the_plugin_refuses_a_rows_export(exports):
    """transformers does not know mvquant-rows: it would build the linears with random weights. The rows
    export's weights are not named model.safetensors, so it refuses the directory instead (vLLM loads
    every *.safetensors)."""
    import subprocess
    import textwrap

    _, out, _ = exports["llama"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.mvquant-rows.safetensors"]
    code = textwrap.dedent(f"""
        import transformers
        transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "OSError" in r.stderr and "model.safetensors" in r.stderr, r.stderr[-1500:]
