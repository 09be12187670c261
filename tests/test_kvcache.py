"""KV-cache quantization: the group quantizer, the cache's exact parts, and the model-level checks."""
from __future__ import annotations

import pytest
import torch

import mvquant
from mvquant.errors import MvquantError
from mvquant.kvcache import (KVCacheFactory, KVConfig, MassiveKVLayer, bytes_per_token, dequantize_groups,
                             kv_cache, quantize_groups)
from tests.conftest import ToyTokenizer, make_tiny_model


def _report(model):
    return mvquant.calibrate(model, ToyTokenizer(), samples=4, seq_len=32, top_k=1, progress=False)


def _elementwise_scale(codes, scale, dim, g):
    return dequantize_groups(torch.ones_like(codes), scale, torch.zeros_like(scale), dim=dim, group_size=g)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim,g", [(2, 8), (2, 5), (3, 16), (3, 7), (3, 64)])
def test_quantize_dequantize_bounds(bits, dim, g):
    torch.manual_seed(bits * 100 + g)
    x = torch.randn(2, 3, 21, 16) * torch.logspace(-2, 1, 16)   # channels of very different ranges
    codes, scale, lo = quantize_groups(x, bits, dim=dim, group_size=g)
    assert codes.shape == x.shape and codes.dtype == torch.uint8
    assert int(codes.max()) <= 2 ** bits - 1
    xd = dequantize_groups(codes, scale, lo, dim=dim, group_size=g)
    step = _elementwise_scale(codes, scale, dim, g)
    err = (xd - x).abs()
    assert bool((err <= step / 2 + 1e-5).all())
    # the step is the group range over 2^b - 1: more bits, smaller error
    assert float(err.max()) <= float((x.amax() - x.amin()) / (2 ** bits - 1))


def test_constant_group_is_exact_and_exclusion_keeps_the_range():
    x = torch.full((1, 1, 8, 4), 3.25)
    codes, scale, lo = quantize_groups(x, 2, dim=2, group_size=8)
    assert torch.equal(dequantize_groups(codes, scale, lo, dim=2, group_size=8), x)
    y = torch.randn(1, 2, 4, 16)
    big = y.clone()
    big[..., 5] = 1e4                                  # a "massive" channel
    mask = torch.zeros(1, 1, 1, 16, dtype=torch.bool)
    mask[..., 5] = True
    _, s_ref, _ = quantize_groups(y, 4, dim=3, group_size=16, exclude=mask)
    _, s_big, _ = quantize_groups(big, 4, dim=3, group_size=16, exclude=mask)
    _, s_unprot, _ = quantize_groups(big, 4, dim=3, group_size=16)
    assert torch.equal(s_ref, s_big)                   # the excluded channel sets no range
    assert float(s_unprot.min()) > 100 * float(s_ref.max())


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_layer_keeps_protected_channels_sinks_and_residual_exact(axis):
    torch.manual_seed(0)
    b, h, t, d = 2, 2, 50, 16
    k, v = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    k[:, :, :, 3] *= 50
    protected = [[3, 11], [7, 15]]                     # per KV head, whole pairs (i, i + d/2)
    layer = MassiveKVLayer(bits=2, axis_key=axis, group_size=8, residual=6, sink=2, protected=protected)
    kr, vr = layer.update(k, v)
    for head, dims in enumerate(protected):
        assert torch.equal(kr[:, head, :, dims], k[:, head, :, dims])
    assert torch.equal(kr[:, :, :2], k[:, :, :2]) and torch.equal(vr[:, :, :2], v[:, :, :2])   # sinks
    n_res = layer.stored_tokens()["residual"]
    assert 6 <= n_res < 6 + (8 if axis == "channel" else 1)
    assert torch.equal(kr[:, :, -n_res:], k[:, :, -n_res:])
    assert not torch.equal(kr, k) and not torch.equal(vr, v)                                 # the rest is 2-bit
    # decoding appends: new tokens read exact, the old quantized blocks are not re-quantized
    k2, v2 = torch.randn(b, h, 9, d), torch.randn(b, h, 9, d)
    kr2, vr2 = layer.update(k2, v2)
    assert kr2.shape[-2] == t + 9 and layer.get_seq_length() == t + 9
    assert torch.equal(kr2[:, :, :layer.blocks[0]["n"]], kr[:, :, :layer.blocks[0]["n"]])
    assert torch.equal(kr2[:, :, -6:], k2[:, :, -6:])
    # the scorer's expansion of a prompt to its choices: selection commutes with the read
    layer.batch_select_indices(torch.tensor([1, 1, 0]))
    kr3, _ = layer._read()
    assert torch.equal(kr3, kr2[[1, 1, 0]])


def test_padding_sets_no_range():
    """With the attention mask given, the ids of left padding do not change a single logit."""
    model = make_tiny_model("llama")
    factory = KVCacheFactory(model, None, KVConfig(bits=2, protect="none", group_size=8, residual=4, sink=1))
    ids = torch.randint(2, 100, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    outs = []
    for pad in (0, 77):
        x = ids.clone()
        x[1, :9] = pad
        cache = factory()
        cache.set_attention_mask(mask)
        outs.append(model(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=cache).logits)
    assert torch.allclose(outs[0][1, 9:], outs[1][1, 9:], atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma", "qwen3", "phi3", "gpt_neox"])
def test_eight_bit_cache_matches_the_unquantized_cache(arch):
    model = make_tiny_model(arch)
    ids = torch.randint(2, 100, (2, 48))
    nxt = torch.randint(2, 100, (2, 5))
    ref = model(torch.cat([ids, nxt], 1)).logits
    errs = {}
    for bits in (8, 2):
        cache = kv_cache(model, None, bits=bits, protect="none", group_size=16, residual=8)
        a = model(ids, past_key_values=cache, use_cache=True).logits
        c = model(nxt, past_key_values=cache, use_cache=True).logits
        errs[bits] = float((torch.cat([a, c], 1) - ref).abs().max())
        assert cache.get_seq_length() == 53
    scale = float(ref.abs().max())
    assert errs[8] < 0.01 * scale
    assert errs[2] > 5 * errs[8]


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_gqa_massive_and_random_protection(arch):
    model = make_tiny_model(arch)
    report = _report(model)
    layout = mvquant.get_layout(model)
    massive = KVCacheFactory(model, report, KVConfig(bits=2, protect="massive"))
    random = KVCacheFactory(model, report, KVConfig(bits=2, protect="random", seed=3))
    for layer in range(layout.num_layers):
        assert len(massive.protected[layer]) == layout.num_kv_heads
        for head, (m, r) in enumerate(zip(massive.protected[layer], random.protected[layer])):
            assert set(report.massive(layer, "k")[head]) <= set(m)
            assert len(m) == len(r) and not set(m) & set(r)            # same count, other channels
    ids = torch.randint(2, 100, (1, 40))
    cache = massive()
    model(ids, past_key_values=cache, use_cache=True)
    k_cached, _ = cache.layers[1]._read()
    ref = DynamicReference(model, ids)
    for head, dims in enumerate(massive.protected[1]):
        assert torch.equal(k_cached[:, head, :, dims], ref[:, head, :, dims])
    s = massive.summary()
    assert s["protected_k_channels"] == sum(len(x) for layer in massive.protected for x in layer)
    none = KVCacheFactory(model, report, KVConfig(bits=2, protect="none")).summary()
    assert none["ratio"] < s["ratio"] < 0.5 and s["ratio"] == random.summary()["ratio"]


def DynamicReference(model, ids):
    """Layer 1's post-RoPE keys from a plain DynamicCache (what the quantized cache received)."""
    from transformers import DynamicCache
    cache = DynamicCache()
    model(ids, past_key_values=cache, use_cache=True)
    return cache.layers[1].keys


def test_model_without_rope():
    model = make_tiny_model("gpt2")
    ids = torch.randint(2, 100, (1, 40))
    cache = kv_cache(model, None, bits=8, protect="none", residual=4, group_size=8)
    out = model(ids, past_key_values=cache, use_cache=True).logits
    assert cache.layers[0].stored_tokens()["quantized"] == 32
    assert torch.allclose(out, model(ids).logits, atol=0.01 * float(out.abs().max()))
    with pytest.raises(MvquantError, match="no RoPE.*--kv-protect none"):
        kv_cache(model, _report(model), bits=2, protect="massive")


def test_bad_input():
    model = make_tiny_model("llama")
    with pytest.raises(MvquantError, match="needs a calibration report"):
        kv_cache(model, None, protect="massive")
    with pytest.raises(MvquantError, match="--kv-bits 5 is not supported"):
        kv_cache(model, None, bits=5, protect="none")
    with pytest.raises(MvquantError, match="--kv-axis"):
        kv_cache(model, None, protect="none", axis="head")
    with pytest.raises(MvquantError, match="--kv-group-size"):
        kv_cache(model, None, protect="none", group_size=0)
    with pytest.raises(MvquantError, match="does not match this model"):
        kv_cache(model, _report(make_tiny_model("gemma")), protect="massive")


def test_bytes_per_token():
    cfg = KVConfig(bits=4, group_size=32, protect="none")
    b = bytes_per_token(cfg, num_kv_heads=3, head_dim=64, protected=[[[], [], []]] * 30)
    # K: 192 codes x 4 bits = 96 B + 192 channels x 4 B / 32 tokens = 24 B; V: 96 B + 3 heads x 2 groups x 4 B
    assert b["bytes_per_token"] == pytest.approx(30 * (96 + 24 + 96 + 24))
    assert b["fp16_bytes_per_token"] == 30 * 2 * 2 * 192
    prot = bytes_per_token(cfg, 3, 64, [[[0, 32], [], []]] * 30)
    assert prot["bytes_per_token"] > b["bytes_per_token"]


# -- evaluation wiring ----------------------------------------------------------------------------------
def test_scorer_prefills_into_the_quantized_cache_and_continuations_read_it():
    from mvquant.evaluation.scoring import score_continuations
    model = make_tiny_model("llama")
    torch.manual_seed(1)
    reqs = [(torch.randint(2, 100, (n,)).tolist(), torch.randint(2, 100, (c,)).tolist())
            for n, c in ((60, 4), (45, 3), (60, 1), (70, 6))]
    reqs.append((reqs[0][0], torch.randint(2, 100, (5,)).tolist()))     # a second choice of the same context
    exact = score_continuations(model, reqs, progress=False)
    diff = {}
    for bits in (8, 2):
        factory = KVCacheFactory(model, None, KVConfig(bits=bits, protect="none", group_size=8, residual=4))
        got = score_continuations(model, reqs, progress=False, cache_factory=factory)
        diff[bits] = max(abs(a[0] - b[0]) for a, b in zip(got, exact))
        # batch of one, by hand: prefill the context into a fresh cache, then the continuation on top of it
        ctx, cont = reqs[3]
        cache = factory()
        first = model(torch.tensor([ctx]), past_key_values=cache, use_cache=True).logits[0, -1].log_softmax(-1)
        rest = model(torch.tensor([cont[:-1]]), past_key_values=cache, use_cache=True).logits[0].log_softmax(-1)
        lp = float(first[cont[0]]) + float(rest.gather(-1, torch.tensor(cont[1:])[:, None]).sum())
        alone = score_continuations(model, [reqs[3]], progress=False, cache_factory=factory)[0][0]
        assert alone == pytest.approx(lp, abs=1e-4)
    assert diff[8] < 0.01 and diff[2] > 5 * diff[8]


def test_evaluate_with_a_quantized_kv_cache():
    from mvquant.evaluation import evaluate
    from tests.conftest import make_tiny_tokenizer
    model = make_tiny_model("llama")
    r = evaluate("tiny", "capitals", model=model, tokenizer=make_tiny_tokenizer(), limit=3, progress=False,
                 kv={"bits": 4, "protect": "none", "group_size": 16})
    assert r["tasks"]["capitals"]["n"] == 3
    k = r["kv_cache"]
    assert k["bits"] == 4 and k["protect"] == "none" and k["k_quantized"] == "after RoPE" and 0 < k["ratio"] < 0.5
    with pytest.raises(MvquantError, match="unknown KV-cache setting"):
        evaluate("tiny", "capitals", model=model, tokenizer=make_tiny_tokenizer(), limit=1, progress=False,
                 kv={"bits": 4, "protect": "none", "groups": 16})


@pytest.mark.parametrize("argv,match", [
    (["--kv-bits", "5", "--kv-protect", "none"], "--kv-bits 5 is not supported: use one of 2, 3, 4, 8"),
    (["--kv-bits", "2"], "--kv-protect massive needs a calibration report"),
    (["--kv-bits", "2", "--kv-group-size", "0", "--kv-protect", "none"], "--kv-group-size must be an integer >= 1"),
    (["--kv-axis", "token"], "--kv-axis sets up KV-cache quantization: add --kv-bits"),
    (["--kv-bits", "2", "--calibration", "OTHER"], "does not match this model (model_type llama vs model qwen3"),
])
def test_cli_kv_bad_input(argv, match, tmp_path, capsys):
    from mvquant.cli import main
    from tests.conftest import save_tiny_model
    other = tmp_path / "other.json"
    _report(make_tiny_model("llama")).save(other)
    model_dir = save_tiny_model("qwen3", tmp_path / "q")
    argv = [str(other) if a == "OTHER" else a for a in argv]
    capsys.readouterr()
    assert main(["eval", str(model_dir), "--tasks", "capitals", "--limit", "1", *argv,
                 "--output", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not (tmp_path / "e.json").exists()


def test_cli_kv_refuses_massive_without_rope_and_chunked_attention(tmp_path, capsys):
    from mvquant.cli import main
    from mvquant.kvcache.api import check_layer_types
    from tests.conftest import save_tiny_model
    gpt2 = save_tiny_model("gpt2", tmp_path / "g")
    assert main(["eval", str(gpt2), "--tasks", "capitals", "--kv-bits", "2", "--kv-protect", "random"]) == 2
    assert "has no RoPE" in capsys.readouterr().err
    chunked = make_tiny_model("llama").config
    chunked.layer_types = ["chunked_attention", "full_attention"]
    chunked.attention_chunk_size = 16
    with pytest.raises(MvquantError, match="chunked_attention layers; .*full-attention and sliding-window layers only"):
        check_layer_types(chunked)


@pytest.mark.parametrize("window", [8, 24])
def test_sliding_window_layers_gemma3(window):
    """Gemma 3's sliding layers: the window is honoured (it changes the logits) and an 8-bit cache
    reproduces the model with its own cache; 2-bit does not."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import TINY_CONFIGS
    cfg = {k: v for k, v in TINY_CONFIGS["gemma3_text"].items() if k != "model_type"}
    config = AutoConfig.for_model("gemma3_text", **cfg, bos_token_id=1, eos_token_id=1,
                                  layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    model.config.sliding_window = window
    ids, nxt = torch.randint(2, 100, (2, 40)), torch.randint(2, 100, (2, 5))
    ref = model(torch.cat([ids, nxt], 1)).logits
    errs = {}
    for bits in (8, 2):
        cache = kv_cache(model, None, bits=bits, protect="none", group_size=16, residual=4)
        a = model(ids, past_key_values=cache, use_cache=True).logits
        c = model(nxt, past_key_values=cache, use_cache=True).logits
        errs[bits] = float((torch.cat([a, c], 1) - ref).abs().max())
    model.config.sliding_window = 4096
    unwindowed = model(torch.cat([ids, nxt], 1)).logits
    scale = float(ref.abs().max())
    assert float((unwindowed - ref).abs().max()) > 0.1 * scale     # the window matters on these lengths
    assert errs[8] < 0.01 * scale < errs[2]


# -- compare recipes -------------------------------------------------------------------------------------
def _recipe(arms, **extra):
    from mvquant.compare import parse_recipe
    return parse_recipe({"name": "kv", "model": "tiny-llama", "tasks": ["capitals", "passkey_128"], "limit": 2,
                         "calibration": {"samples": 2, "seq_len": 32, "top_k": 1}, "arms": arms, **extra},
                        catalog={"contextual": ["passkey_128"], "parametric": ["capitals"]})


def test_recipe_kv_arm_keys():
    r = _recipe([{"name": "fp", "method": "none"},
                 {"name": "kv2", "method": "none", "kv_bits": 2, "kv_protect": "none", "kv_residual": 16},
                 {"name": "kv2-massive", "method": "rtn", "bits": 4, "kv_bits": 2}],
                defaults={"kv_axis": "token"})
    fp, kv2, both = r.arms
    assert fp.kv_config() is None and "kv_bits" not in fp.spec()          # old arms keep their cache keys
    assert not fp.uses_calibration and not kv2.uses_calibration and both.uses_calibration
    assert kv2.kv_config() == {"bits": 2, "protect": "none", "group_size": 32, "residual": 16, "sink": 0,
                               "axis": "token", "seed": 0, "backend": "mvquant"}
    assert both.kv_protect == "massive" and both.spec()["kv_bits"] == 2
    for arm, match in (({"name": "a", "kv_bits": 5}, "kv_bits 5 is not supported"),
                       ({"name": "a", "kv_protect": "none"}, "kv_protect configures a quantized KV cache: add kv_bits"),
                       ({"name": "a", "kv_bits": 2, "kv_axis": "head"}, "kv_axis 'head' is unknown"),
                       ({"name": "a", "kv_bits": 2, "kv_group_size": -1}, "kv_group_size must be an integer >= 1, got -1")):
        with pytest.raises(MvquantError, match=match):
            _recipe([arm])


def test_compare_runs_kv_arms_on_a_quantized_checkpoint(tmp_path):
    """fp / KV 2-bit (KIVI) / w4 checkpoint + KV 2-bit massive: the task runner hands the arm's KV
    settings to evaluate, whose scorer reads the quantized cache."""
    from mvquant.compare import compare
    from mvquant.compare.runners import EvalTaskRunner, ModelArmRunner
    from mvquant.evaluation import evaluate
    from tests.conftest import make_tiny_tokenizer
    seen = []

    def spy(*args, **kwargs):
        out = evaluate(*args, **kwargs)
        seen.append((kwargs.get("kv"), out["kv_cache"]))
        return out

    r = _recipe([{"name": "fp", "method": "none"},
                 {"name": "kv2", "method": "none", "kv_bits": 2, "kv_protect": "none"},
                 {"name": "w4-kv2-massive", "method": "rtn", "bits": 4, "group_size": 16, "kv_bits": 2}])
    res = compare(r, tmp_path / "out", arm_runner=ModelArmRunner(load_model=lambda n, d: (make_tiny_model("llama"),
                                                                                           make_tiny_tokenizer())),
                  task_runner=EvalTaskRunner(evaluate=spy), progress=False, log=lambda *_: None)
    assert res.computed == 6
    kvs = [k for k, _ in seen]
    assert kvs.count(None) == 2 and sum(k is not None and k["protect"] == "none" for k in kvs) == 2
    massive = [s for k, s in seen if k is not None and k["protect"] == "massive"]
    assert len(massive) == 2 and all(s["protected_k_channels"] > 0 for s in massive)
