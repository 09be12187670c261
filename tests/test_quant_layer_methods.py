"""AWQ and GPTQ on one decoder layer (issue 11): folds are exact, the searches beat round-to-nearest
on their own objectives, GPTQ matches a plain textbook implementation, Cholesky failures fall back."""
import copy

import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny_model

from mvquant.models.adapters import get_layout
from mvquant.pipeline.sequential import capture_layer_inputs, layer_linears
from mvquant.quantization import QuantConfig, core
from mvquant.quantization.methods import awq, gptq
from mvquant.quantization.methods import LayerContext
from mvquant.quantization.methods.gptq import gptq_with_fallback
from mvquant.quantization.methods.rtn import quantize_layer as rtn_layer
from mvquant.quantization.methods.scaling import fold_into_prev, layer_groups, scale_linears


def _model(arch, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(TINY_CONFIGS[arch], **overrides)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=1, **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # norms away from their init (Gemma's w = 0, LayerNorm bias = 0) so folds are tested
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _ctx(model, config, index=0, n_seqs=4, seq_len=32, seed=0):
    layout = get_layout(model)
    layers = model.get_submodule(layout.spec.layers)
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(2, 120, (n_seqs, seq_len), generator=g).tolist()
    hidden, kwargs = capture_layer_inputs(model, layers, seqs, batch_size=2)
    prefix = f"{layout.spec.layers}.{index}"
    layer = layers[index]
    return LayerContext(index=index, layer=layer, linears=layer_linears(layer, prefix, config, model.config),
                        rows={}, config=config, layout=layout,
                        inputs=[(h, kwargs[b][index]) for b, h in enumerate(hidden)], prefix=prefix)


def _err(outs, ref):
    return float(sum((o - r).pow(2).sum() for o, r in zip(outs, ref)))


FOLD_ARCHS = [("llama", {}), ("llama", {"num_key_value_heads": 4}), ("gemma", {}), ("gemma3_text", {}),
              ("qwen3", {}), ("phi3", {}), ("phi3", {"num_key_value_heads": 4}), ("gpt_neox", {}),
              ("gpt2", {}), ("opt", {})]


@pytest.mark.parametrize("arch,over", FOLD_ARCHS, ids=[f"{a}{'-mha' if o else ''}" for a, o in FOLD_ARCHS])
def test_fold_is_exact_before_quantization(arch, over):
    """Scaling the linears' inputs by s and dividing the previous op by s leaves the layer unchanged."""
    model = _model(arch, **over)
    ctx = _ctx(model, QuantConfig(method="awq", bits=4, group_size=16))
    ref = ctx.run()
    groups = layer_groups(ctx.layer, ctx.layout)
    folded = [g for g, fold in groups if fold]
    assert folded, arch
    g = torch.Generator().manual_seed(1)
    for grp in folded:
        in_f = ctx.layer.get_submodule(grp.linears[0]).weight.shape[1 if type(ctx.layer.get_submodule(grp.linears[0])).__name__ != "Conv1D" else 0]
        s = torch.rand(in_f, generator=g) * 3 + 0.25
        fold_into_prev(ctx.layer, grp, s)
        scale_linears(ctx.layer, grp, s)
    out = ctx.run()
    for o, r in zip(out, ref):
        assert torch.allclose(o, r, atol=1e-4, rtol=1e-4), (arch, float((o - r).abs().max()))
    if over.get("num_key_value_heads") == 4 and arch in ("llama", "phi3"):
        assert any("o_proj" in grp.linears[0] for grp in folded)  # v -> o exists without GQA
    if arch == "llama" and not over:
        assert not any("o_proj" in grp.linears[0] for grp in folded)  # and not with it


def test_groups_without_a_foldable_op_fall_back_to_a_runtime_scale():
    model = _model("gpt_neox")
    ctx = _ctx(model, QuantConfig(method="awq", bits=4, group_size=16, awq_grid=6, awq_clip_grid=3))
    groups = dict((g.linears, fold) for g, fold in layer_groups(ctx.layer, ctx.layout))
    assert groups[("mlp.dense_4h_to_h",)] is False and groups[("attention.query_key_value",)] is True
    awq.quantize_layer(ctx)
    q = ctx.linears[ctx.prefix + ".mlp.dense_4h_to_h"]
    assert q.input_scale is not None and not torch.all(q.input_scale == 1)
    assert ctx.linears[ctx.prefix + ".attention.query_key_value"].input_scale is None


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "phi3"])
def test_awq_layer_beats_rtn_on_the_layer_output(arch):
    model = _model(arch)
    cfg = QuantConfig(method="awq", bits=3, group_size=16, awq_grid=10, awq_clip_grid=5)
    ctx = _ctx(model, cfg)
    ref = ctx.run()
    rtn_ctx = copy.deepcopy(ctx)
    rtn_layer(rtn_ctx)
    # the search itself: the chosen scale's block loss is never above s = 1 (round-to-nearest)
    groups = layer_groups(ctx.layer, ctx.layout)
    calls, x_mean = awq._capture(ctx, groups, ctx.layer)
    g0 = groups[0][0]
    s, best, identity = awq.search_group_scale(ctx, ctx.layer, g0, calls[g0.inspect], x_mean[0], n_grid=10)
    assert best <= identity and s.shape == x_mean[0].shape
    awq.quantize_layer(ctx)
    assert all(m.input_scale is None for m in ctx.linears.values())  # Llama-like: every scale folded
    e_awq, e_rtn = _err(ctx.run(), ref), _err(rtn_ctx.run(), ref)
    assert e_awq < e_rtn, (arch, e_awq, e_rtn)


def test_awq_keeps_protected_rows_exact_and_does_not_clip_qk():
    model = _model("llama")
    cfg = QuantConfig(method="awq", bits=3, group_size=16, awq_grid=6, awq_clip_grid=4)
    ctx = _ctx(model, cfg)
    qname = ctx.prefix + ".self_attn.q_proj"
    ctx.rows = {qname: torch.tensor([3, 17, 40])}
    norm_w = ctx.layer.input_layernorm.weight.detach().clone()
    w_q = ctx.linears[qname].weight.detach().clone()
    awq.quantize_layer(ctx)
    s = norm_w / ctx.layer.input_layernorm.weight.detach()  # the folded scale
    q = ctx.linears[qname]
    assert torch.allclose(q.protected_weight.float(), (w_q[[3, 17, 40]] * s).half().float(), rtol=1e-3, atol=1e-4)
    assert ctx.layout.produces_qk("self_attn.q_proj") and not ctx.layout.produces_qk("mlp.up_proj")


# -- GPTQ --------------------------------------------------------------------------------------------
def textbook_gptq(w, h, bits, group, damp=0.01):
    """Frantar et al. Algorithm 1 without lazy batches: one column at a time, the inverse Hessian
    updated by Gaussian elimination of the quantized column; asymmetric min-max groups taken from the
    updated weights when the sweep reaches a group."""
    w = w.double().clone()
    h = h.double().clone()
    n = w.shape[1]
    h += damp * h.diag().mean() * torch.eye(n, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    qmax = 2 ** bits - 1
    deq = torch.zeros_like(w)
    for i in range(n):
        if i % group == 0:
            blk = w[:, i:i + group]
            lo, hi = blk.amin(1).clamp(max=0), blk.amax(1).clamp(min=0)
            scale = ((hi - lo) / qmax).clamp(min=1e-8).half().double()
            zero = torch.round(-lo / scale).clamp(0, qmax)
        q = (torch.round(w[:, i] / scale) + zero).clamp(0, qmax)
        deq[:, i] = (q - zero) * scale
        err = (w[:, i] - deq[:, i]) / hinv[i, i]
        w[:, i:] -= err.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return deq.float()


def _inputs(n=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ (torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d))
    x[:, :3] *= 20
    return x


def test_gptq_matches_textbook_implementation():
    x = _inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    h = x.t() @ x
    codes, scale, zero = gptq.gptq_quantize(w, h, bits=3, group_size=16, symmetric=False, damp=0.01, block=16)
    ours = core.dequantize_codes(codes, scale, zero, 3, 16)
    ref = textbook_gptq(w, h, 3, 16)
    same = (ours - ref).abs() < 1e-4
    assert same.float().mean() > 0.99, float(same.float().mean())
    obj = lambda d: float((x @ (w - d).t()).pow(2).sum())  # noqa: E731
    assert abs(obj(ours) - obj(ref)) / obj(ref) < 0.02
    assert obj(ours) < 0.7 * obj(core.fake_quantize(w, 3, 16, False))


def test_gptq_cholesky_failure_falls_back_to_rtn_with_a_warning():
    w = torch.randn(8, 16)
    bad = -torch.eye(16)  # negative definite: no damping that is a fraction of mean(diag) can fix it
    cfg = QuantConfig(method="gptq", bits=4, group_size=8)
    with pytest.warns(UserWarning, match="round-to-nearest"):
        assert gptq_with_fallback(w, bad, cfg, "x") is None


def test_gptq_layer_true_sequential_sets_and_beats_rtn():
    model = _model("llama")
    cfg = QuantConfig(method="gptq", bits=3, group_size=16)
    ctx = _ctx(model, cfg)
    p = ctx.prefix + "."
    assert gptq.input_sets(ctx) == [[p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
                                    [p + "self_attn.o_proj"], [p + "mlp.gate_proj", p + "mlp.up_proj"],
                                    [p + "mlp.down_proj"]]
    ref = ctx.run()
    rtn_ctx = copy.deepcopy(ctx)
    rtn_layer(rtn_ctx)
    gptq.quantize_layer(ctx)
    e_gptq, e_rtn = _err(ctx.run(), ref), _err(rtn_ctx.run(), ref)
    assert e_gptq < e_rtn, (e_gptq, e_rtn)


# -- SmoothQuant ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt_neox"])
def test_smoothquant_folds_into_norms_and_stays_close(arch):
    from mvquant.quantization.methods import smoothquant
    model = _model(arch)
    ctx = _ctx(model, QuantConfig(method="smoothquant", bits=8))
    ref = ctx.run()
    folded = {n for g, fold in layer_groups(ctx.layer, ctx.layout) if fold for n in g.linears}
    smoothquant.quantize_layer(ctx)
    for full, m in ctx.linears.items():
        assert (m.input_scale is None) == (ctx.local_name(full) in folded), full
    out = ctx.run()
    rel = _err(out, ref) / float(sum(r.pow(2).sum() for r in ref))
    assert rel < 1e-3, rel


@pytest.mark.parametrize("method, impl", [("smoothquant", "mvquant.quantization.methods.smoothquant"),
                                          ("awq", "mvquant.quantization.methods.awq"),
                                          ("gptq", "mvquant.quantization.methods.gptq")])
def test_methods_dispatch_to_their_layer_implementation(method, impl, monkeypatch):
    """quantize(method=...) runs the layer function of the module the method's declaration names."""
    import importlib

    from mvquant.pipeline import quantize
    from mvquant.quantization.registry import METHODS
    assert METHODS[method].module == impl
    mod = importlib.import_module(impl)
    seen = []
    real = mod.quantize_layer
    monkeypatch.setattr(mod, "quantize_layer", lambda ctx: (seen.append(ctx.index), real(ctx))[1])
    model = _model("llama")
    norm = model.model.layers[0].input_layernorm.weight.clone()
    bits = 8 if method == "smoothquant" else 4
    quantize(model, QuantConfig(method=method, bits=bits, group_size=32), progress=False,
             calibration_data=[[2 + (7 * i + 3 * j) % 90 for j in range(24)] for i in range(4)])
    assert seen == [0, 1]
    folds = method in ("smoothquant", "awq")  # scales folded into the norm, none divided at run time in q_proj
    new = model.model.layers[0].input_layernorm.weight  # stored fp16 (--store-dtype auto)
    assert (not torch.equal(norm.half(), new.half())) == folds
    assert model.model.layers[0].self_attn.q_proj.input_scale is None
