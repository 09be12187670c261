"""The sequential pipeline (mvquant/pipeline): captured layer inputs, sequential vs one-shot,
streaming from safetensors shards, sharded checkpoints, runtime state on .to(), fallbacks."""
import json
import os
import warnings

import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny_model, make_tiny_tokenizer

import mvquant
from mvquant.cli import main
from mvquant.errors import MvquantError
from mvquant.pipeline import quantize
from mvquant.quantization import QuantConfig, QuantLinear, quantized_modules
from mvquant.quantization import methods
from mvquant.quantization.methods import gptq as gptq_method, rtn as rtn_method

TEXT_SEQS = [[2 + (7 * i + 3 * j) % 90 for j in range(40)] for i in range(6)]  # token windows, vocab-safe


def _gemma3_mixed():
    """Gemma3 with a sliding layer and a global one: per-layer masks and RoPE tables differ."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(TINY_CONFIGS["gemma3_text"])
    cfg.pop("model_type")
    cfg.update(num_hidden_layers=3, sliding_window=8, bos_token_id=1, eos_token_id=1,
               layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma3_text", **cfg)).float().eval()


def _patch_layer(monkeypatch, method, fn):
    """Stand `fn` in for the method's quantize_layer (the module its registry entry names)."""
    monkeypatch.setattr(methods.layer_function(method).__module__ + ".quantize_layer", fn)


def _record_runs(monkeypatch, method):
    """Replace the method by one that records each layer's inputs and ctx.run() outputs, quantizing nothing
    (so every layer's inputs are the float model's)."""
    seen = []

    def spy(ctx):
        seen.append({"index": ctx.index, "inputs": [h.clone() for h, _ in ctx.inputs],
                     "kwargs": [kw for _, kw in ctx.inputs], "outputs": ctx.run()})
    _patch_layer(monkeypatch, method, spy)
    return seen


# -- capture: each layer gets exactly what the model gives it --------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3-mixed", "gpt2", "opt", "gpt_neox", "phi3", "qwen3"])
def test_captured_inputs_reproduce_the_models_own_hidden_states(arch, monkeypatch):
    model = _gemma3_mixed() if arch == "gemma3-mixed" else make_tiny_model(arch)
    ids = torch.tensor(TEXT_SEQS[:4])
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    seen = _record_runs(monkeypatch, "smoothquant")  # a method that calibrates: inputs are captured
    quantize(model, QuantConfig(method="smoothquant", bits=8), calibration_data=TEXT_SEQS[:4], progress=False)
    assert [s["index"] for s in seen] == list(range(len(ref) - 1))
    # each layer's captured inputs and LayerContext.run() outputs are the model's own hidden states
    for s in seen:
        torch.testing.assert_close(s["inputs"][0], ref[s["index"]], rtol=1e-5, atol=1e-6)
    for s in seen[:-1]:  # the last entry of hidden_states is after the final norm
        torch.testing.assert_close(s["outputs"][0], ref[s["index"] + 1], rtol=1e-5, atol=1e-6)
    if arch == "gemma3-mixed":
        k0, k1 = seen[0]["kwargs"][0], seen[1]["kwargs"][0]
        assert not torch.equal(k0["position_embeddings"][0], k1["position_embeddings"][0])  # local vs global RoPE
        assert k0["attention_mask"] is not k1["attention_mask"]


def test_gptq_layer_inputs_come_from_the_quantized_layers(monkeypatch):
    """Layer 0 sees the embeddings; layer 1 sees the quantized layer 0's outputs, not the float model's."""
    model = make_tiny_model("llama")
    ids = torch.tensor(TEXT_SEQS[:4])
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    seen = []
    real = gptq_method.quantize_layer

    def spy(ctx):
        seen.append([h.clone() for h, _ in ctx.inputs])
        real(ctx)
        seen[-1] = (seen[-1], ctx.run())  # outputs of the quantized layer
    _patch_layer(monkeypatch, "gptq", spy)
    quantize(model, QuantConfig(method="gptq", bits=3, group_size=16), calibration_data=TEXT_SEQS[:4], progress=False)
    torch.testing.assert_close(seen[0][0][0], ref[0])
    diff = (seen[1][0][0] - ref[1]).norm() / ref[1].norm()
    assert 1e-4 < float(diff) < 0.5                          # quantized, not the float model's activations
    torch.testing.assert_close(seen[1][0][0], seen[0][1][0])  # exactly what quantized layer 0 produced


def test_rtn_sequential_gives_the_one_shot_codes():
    """RTN needs no activations: the pipeline's codes equal quantizing each weight on its own."""
    model, ref = make_tiny_model("qwen2"), make_tiny_model("qwen2")
    config = QuantConfig(bits=4, group_size=32, store_dtype="float32")
    quantize(model, config, progress=False)
    mods = quantized_modules(model)
    assert len(mods) == 14
    for name, q in mods.items():
        w = ref.get_submodule(name)
        one = QuantLinear.from_weight(w.weight.detach(), w.bias, bits=4, group_size=32, symmetric=False)
        assert torch.equal(q.qweight, one.qweight) and torch.equal(q.scales, one.scales)
        assert torch.equal(q.zeros, one.zeros)
        if w.bias is not None:
            assert torch.equal(q.bias, one.bias)


# -- fallbacks and ignores --------------------------------------------------------------------------------
def test_cholesky_failure_falls_back_with_warnings():
    config = QuantConfig(method="gptq", bits=4, group_size=None)
    w = torch.randn(6, 4)
    h = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.3]))  # not PD at 1% or 10% damping, PD at 100%
    with pytest.warns(UserWarning, match="retrying") as rec:
        out = gptq_method.gptq_with_fallback(w, h, config, "x")
    assert out is not None and len([r for r in rec if "retrying" in str(r.message)]) == 2
    with pytest.warns(UserWarning, match="round-to-nearest"):
        assert gptq_method.gptq_with_fallback(w, -torch.eye(4), config, "x") is None


def test_moe_router_is_not_quantized():
    model = make_tiny_model("llama")
    model.config.num_experts = 4
    model.model.layers[0].mlp.gate = torch.nn.Linear(64, 4)          # a router: one output per expert
    model.model.layers[0].mlp.expert_proj = torch.nn.Linear(64, 4)   # same shape, not a router name
    from mvquant.pipeline.quantize import target_linears
    names = set(target_linears(model, QuantConfig()))
    assert "model.layers.0.mlp.expert_proj" in names and "model.layers.0.mlp.gate" not in names


# -- QuantLinear runtime state follows the module --------------------------------------------------------
def test_quantlinear_to_meta_and_back():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    q = QuantLinear.from_weight(w, None, bits=4, group_size=32, symmetric=False, protected_rows=torch.tensor([3, 9]))
    x = torch.randn(5, 64)
    y = q(x)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    assert q.kernel == "int4pack" and q._cache
    q.to("meta")
    assert q.qweight.is_meta and q._cache == {} and q.quantized_rows.is_meta and q.kernel == "dequant"
    q.to_empty(device="cpu")   # uninitialized memory: nothing may be derived from it yet
    q.load_state_dict(state)
    torch.testing.assert_close(q(x), y, rtol=0, atol=0)  # first use rebuilds the runtime state
    assert q.kernel == "int4pack" and q.quantized_rows.device.type == "cpu" and q._cache
    q.to(torch.float64).to(torch.float32)  # a cast re-derives the same runtime state
    torch.testing.assert_close(q(x), y, rtol=0, atol=0)


def test_device_cuda_without_a_gpu_is_a_clear_error(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    from mvquant.models.device import compute_device
    with pytest.raises(MvquantError, match="no CUDA GPU"):
        compute_device("cuda")
    assert main(["quantize", "--device", "cuda", "--output", str(tmp_path / "x")]) == 2
    assert "--device cuda: no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# -- streaming from shards, sharded checkpoints ----------------------------------------------------------
@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """A tiny llama written as several safetensors shards (as big models are)."""
    d = tmp_path_factory.mktemp("src") / "tiny"
    model = make_tiny_model("llama")
    model.save_pretrained(d, max_shard_size="60KB")
    make_tiny_tokenizer().save_pretrained(d)
    assert (d / "model.safetensors.index.json").is_file()
    return d


def _tensors(d):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(d)):
        if f.startswith("model.mvquant") and f.endswith(".safetensors"):
            out.update(load_file(str(d / f)))
    return out


ARGS = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--calib-samples", "4", "--calib-seq-len", "32",
        "--quiet"]


@pytest.fixture(scope="module")
def streamed(sharded_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    assert main(["quantize", str(sharded_dir), *ARGS, "--output", str(out / "stream")]) == 0
    assert main(["quantize", str(sharded_dir), *ARGS, "--output", str(out / "mem"), "--in-memory"]) == 0
    return out / "stream", out / "mem"


def test_streaming_gives_the_in_memory_checkpoint(streamed):
    stream, mem = streamed
    a, b = _tensors(stream), _tensors(mem)
    assert a.keys() == b.keys() and len(a) > 50
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert a["model.embed_tokens.weight"].dtype == torch.float16       # unquantized tensors stored as fp16
    assert a["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.uint8
    ids = torch.tensor([TEXT_SEQS[0][:16]])
    ma, mb = mvquant.load(stream), mvquant.load(mem)
    with torch.no_grad():
        assert torch.equal(ma(ids).logits, mb(ids).logits)


def test_sharded_checkpoint_loads_and_checks_integrity(streamed, tmp_path):
    import shutil

    import transformers
    stream, _ = streamed
    index = json.loads((stream / "model.mvquant.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3  # one per decoder layer, then the rest
    manifest = json.loads((stream / "mvquant_manifest.json").read_text())
    assert set(shards) <= set(manifest["files"]) and manifest["weights"] == "model.mvquant.safetensors.index.json"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(stream))
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    bad = tmp_path / "bad"
    shutil.copytree(stream, bad)
    data = bytearray((bad / shards[1]).read_bytes())
    data[-10] ^= 0xFF
    (bad / shards[1]).write_bytes(bytes(data))
    with pytest.raises(MvquantError, match="SHA-256"):
        mvquant.load(bad)
    (bad / shards[0]).write_bytes((stream / shards[0]).read_bytes()[:100])
    with pytest.raises(MvquantError, match="truncated"):
        mvquant.load(bad)


def test_store_dtype_float32_keeps_fp32(sharded_dir, tmp_path):
    out = tmp_path / "fp32"
    assert main(["quantize", str(sharded_dir), "--quiet", "--store-dtype", "float32", "--output", str(out)]) == 0
    assert _tensors(out)["model.embed_tokens.weight"].dtype == torch.float32


def test_interrupted_streaming_run_leaves_nothing(sharded_dir, tmp_path, monkeypatch, capsys):
    calls = []

    def interrupt(ctx):
        calls.append(ctx.index)
        if ctx.index == 1:
            raise KeyboardInterrupt
        real(ctx)
    real = rtn_method.quantize_layer
    _patch_layer(monkeypatch, "rtn", interrupt)
    assert main(["quantize", str(sharded_dir), "--quiet", "--output", str(tmp_path / "ck")]) == 130
    assert calls == [0, 1]
    assert os.listdir(tmp_path) == []  # no checkpoint, no temporary directory
    assert "no partial output" in capsys.readouterr().err


def test_not_enough_disk_is_refused_before_work(sharded_dir, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    _patch_layer(monkeypatch, "rtn", lambda ctx: pytest.fail("work started"))
    assert main(["quantize", str(sharded_dir), "--quiet", "--output", str(tmp_path / "ck")]) == 2
    assert "not enough free space" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_short_calibration_set_is_a_clear_error(sharded_dir, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("only a few words here")
    argv = ["quantize", str(sharded_dir), "--method", "gptq", "--calib-data", str(text), "--calib-samples", "8",
            "--calib-seq-len", "64", "--quiet", "--output", str(tmp_path / "ck")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "calibration data too short" in err and "8 requested" in err
    assert not (tmp_path / "ck").exists()


def _live_cpu_storages() -> dict[int, int]:
    import gc
    gc.collect()
    out = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type == "cpu":
            out[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
    return out


def test_streaming_keeps_no_finished_layer_in_memory(tmp_path, monkeypatch):
    """After each streamed layer is written, nothing of it stays alive (a dict of the target linears once
    kept every replaced nn.Linear and its loaded weights: memory grew by one layer per layer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import TINY_CONFIGS
    from mvquant.pipeline import quantize_to_checkpoint, sequential
    cfg = dict(TINY_CONFIGS["llama"])
    cfg.pop("model_type")
    cfg.update(num_hidden_layers=6, hidden_size=128, intermediate_size=256, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **cfg)).save_pretrained(tmp_path / "src")
    after_layer = []
    monkeypatch.setattr(sequential, "release_freed_memory", lambda: after_layer.append(_live_cpu_storages()))
    quantize_to_checkpoint(tmp_path / "src", QuantConfig(method="rtn", bits=4, group_size=32),
                                  tmp_path / "out", progress=False)
    assert len(after_layer) == 6
    first, last = after_layer[0], after_layer[-1]
    grown = sum(n for p, n in last.items() if p not in first)
    layer_bytes = 4 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256)  # one layer's fp32 linear weights
    assert grown < layer_bytes / 4, f"{grown} bytes more alive after layer 5 than after layer 0"
