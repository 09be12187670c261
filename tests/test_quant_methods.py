"""RTN / AWQ / GPTQ / SmoothQuant / bitsandbytes on tiny models, and each method's own objective."""
import sys

import pytest
import torch
from conftest import ToyTokenizer, make_tiny_model

import mvquant
from mvquant.errors import MvquantError
from mvquant.pipeline import quantize
from mvquant.quantization import QuantConfig, core
from mvquant.quantization.methods.awq import awq_clip
from mvquant.quantization.methods.gptq import gptq_quantize
from mvquant.quantization.linear import QuantLinear
from mvquant.quantization.methods.smoothquant import smooth_scales

CALIB = dict(calib_samples=4, calib_seq_len=32, awq_grid=8, awq_clip_grid=4)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _correlated_inputs(n=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=g) @ mix
    x[:, :3] *= 20  # a few outlier channels, as in LLM activations
    return x


def _out_err(w, deq, x):
    return float((x @ (w - deq).t()).pow(2).mean())


def test_gptq_beats_rtn_on_its_objective():
    x = _correlated_inputs()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    h = x.t() @ x
    for group, sym, act_order in ((16, False, False), (None, True, False), (24, False, True)):
        codes, scale, zero = gptq_quantize(w, h, bits=3, group_size=group, symmetric=sym, act_order=act_order, block=32)
        gptq = _out_err(w, core.dequantize_codes(codes, scale, zero, 3, group), x)
        rtn = _out_err(w, core.fake_quantize(w, 3, group, sym), x)
        assert gptq < 0.8 * rtn, (group, sym, act_order, gptq, rtn)


def test_gptq_with_identity_hessian_is_rtn():
    """Uncorrelated unit inputs: no error feedback, so GPTQ must pick exactly the RTN codes."""
    w = torch.randn(16, 40)
    codes, scale, zero = gptq_quantize(w, torch.eye(40), bits=4, group_size=16, symmetric=False, damp=0.0)
    r_codes, r_scale, r_zero = core.quantize_weight(w, 4, 16, False)
    assert torch.equal(codes, r_codes) and torch.equal(scale, r_scale) and torch.equal(zero, r_zero)


def test_awq_clip_lowers_its_objective():
    """Per (row, group) the chosen range ratio's output error is at most the unclipped one, and below it
    somewhere (on heavy-tailed inputs the full range is not the best)."""
    x = _correlated_inputs()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(2))
    c = awq_clip(w, x, bits=3, group_size=16, symmetric=False)
    assert c.shape == (48, 4) and ((c > 0.5) & (c <= 1.0)).all()

    def group_err(clip):  # sum over tokens of (x_g . (w_g - Q_c(w_g)))^2, per (row, group)
        dw = (w - core.fake_quantize(w, 3, 16, False, clip=clip)).view(48, 4, 16)
        return torch.einsum("tGj,rGj->rGt", x.view(-1, 4, 16), dw).pow(2).sum(-1)
    chosen, full = group_err(c), group_err(1.0)
    assert (chosen <= full * (1 + 1e-5)).all() and (chosen < full * 0.99).any()


def test_smooth_scales_formula():
    xmax = torch.tensor([1.0, 16.0, 4.0])
    w = torch.tensor([[1.0, -0.25, 2.0], [0.5, 0.5, -1.0]])
    s = smooth_scales(xmax, w, alpha=0.5)
    assert torch.allclose(s, torch.tensor([1.0, 16.0 ** 0.5 / 0.5 ** 0.5, 2.0 / 2.0 ** 0.5]), rtol=1e-3)
    # after smoothing the max of x / s equals the max of w * s per channel (alpha = 0.5 balances them)
    assert torch.allclose(xmax / s, w.abs().amax(0) * s, rtol=2e-3)


def test_rtn_model_matches_fake_quantized_model():
    """Independent computation: replace every decoder linear weight by its fake-quantized copy."""
    ids = torch.randint(2, 128, (2, 24))
    model, ref = make_tiny_model("llama"), make_tiny_model("llama")
    for name, m in ref.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            m.weight.data = core.fake_quantize(m.weight.data, 4, 16, False)
    quantize(model, QuantConfig(bits=4, group_size=16, compute="dequant", store_dtype="float32"), progress=False)
    assert torch.allclose(_logits(model, ids), _logits(ref, ids), atol=1e-5)
    assert isinstance(model.lm_head, torch.nn.Linear)  # lm_head is ignored by default


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gpt_neox", "gpt2", "gemma2"])
@pytest.mark.parametrize("method", ["rtn", "awq", "gptq", "smoothquant"])
def test_methods_on_tiny_architectures(arch, method):
    ids = torch.randint(2, 128, (1, 24))
    model = make_tiny_model(arch)
    ref = _logits(model, ids)
    bits = 8 if method == "smoothquant" else 4
    quantize(model, QuantConfig(method=method, bits=bits, group_size=None if method == "smoothquant" else 16, **CALIB),
             tokenizer=ToyTokenizer(), progress=False)
    out = _logits(model, ids)
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert mods and all(m.bits == bits for m in mods)
    rel = float((out - ref).norm() / ref.norm())
    assert torch.isfinite(out).all()
    assert rel < (0.05 if bits == 8 else 0.25), rel
    s = model.mvquant_summary
    assert s["quantized_linears"] == len(mods)
    assert bits < s["bits_per_weight"] < bits + 3  # tiny rows: scales weigh a lot


def test_awq_and_gptq_need_calibration_tokens():
    model = make_tiny_model("llama")
    with pytest.raises(MvquantError, match="tokenizer"):
        quantize(model, QuantConfig(method="gptq", **CALIB), progress=False)
    seqs = [[5 + (i * 7 + j) % 100 for j in range(32)] for i in range(4)]  # token ids work without a tokenizer
    quantize(model, QuantConfig(method="gptq", **CALIB), calibration_data=seqs, progress=False)
    assert model.mvquant_summary["method"] == "gptq"


def test_config_round_trip_and_errors():
    c = QuantConfig(method="awq", bits=3, group_size=-1, protect="topk:2", symmetric=True)
    assert c.group_size is None
    d = c.to_dict()
    assert d["quant_method"] == "mvquant" and QuantConfig.from_dict(d) == c
    for kwargs, msg in (({"method": "hqq"}, "unknown method"), ({"bits": 5}, "unsupported bits"),
                        ({"group_size": 0}, "group size"), ({"group_size": -3}, "group size"),
                        ({"method": "bnb-nf4", "bits": 8}, "4-bit"), ({"targets": ["("]}, "pattern")):
        with pytest.raises(MvquantError, match=msg):
            QuantConfig(**kwargs)
    sq = QuantConfig(method="smoothquant", bits=8)
    assert sq.act_bits == 8 and sq.symmetric and sq.group_size is None


def test_quantize_twice_is_refused():
    model = make_tiny_model("llama")
    quantize(model, QuantConfig(), progress=False)
    with pytest.raises(MvquantError, match="already quantized"):
        quantize(model, QuantConfig(), progress=False)


@pytest.mark.parametrize("method,bits,tol", [("bnb-nf4", 4, 0.25), ("bnb-int8", 8, 0.02)])
def test_bitsandbytes_baselines(method, bits, tol):
    pytest.importorskip("bitsandbytes")
    ids = torch.randint(2, 128, (1, 16))
    model = make_tiny_model("llama")
    ref = _logits(model, ids)
    quantize(model, QuantConfig(method=method, bits=bits), progress=False)
    out = _logits(model, ids)
    assert float((out - ref).norm() / ref.norm()) < tol
    assert model.mvquant_summary["quantized_linears"] == 14
    with pytest.raises(MvquantError, match="in-memory bitsandbytes baseline"):
        mvquant.save_quantized(model, None, "/nonexistent-dir/x")


def test_bitsandbytes_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(MvquantError, match="bitsandbytes is unavailable"):
        quantize(make_tiny_model("llama"), QuantConfig(method="bnb-nf4", bits=4), progress=False)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_awq_and_gptq_beat_rtn_on_their_own_calibration_data(arch):
    """A method that silently fell back to round-to-nearest would pass the test above: here AWQ and
    GPTQ must each change the codes and leave a smaller output error than RTN at the same width, on
    the token windows they were calibrated on (what both minimise)."""
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(2, 128, (32,), generator=g).tolist() for _ in range(8)]
    ids = torch.tensor(seqs)
    ref = _logits(make_tiny_model(arch), ids)
    err, codes = {}, {}
    for method in ("rtn", "awq", "gptq"):
        model = make_tiny_model(arch)
        quantize(model, QuantConfig(method=method, bits=3, group_size=16, **CALIB), calibration_data=seqs, progress=False)
        err[method] = float((_logits(model, ids) - ref).norm() / ref.norm())
        codes[method] = {n: m.codes() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for method in ("awq", "gptq"):
        assert err[method] < err["rtn"], err
        assert any(not torch.equal(codes[method][n], c) for n, c in codes["rtn"].items())
