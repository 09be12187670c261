"""Adapters checked against an independent source: the q/k/v each model hands to its own attention.

We wrap the model's eager attention function (it receives q/k after any per-head norm and after
RoPE, and v) and compare with what our hooks on the projections accumulate. RoPE rotates pairs, so
post-RoPE pair sums must equal our pre-RoPE pair sums: this also pins down each pairing convention.
"""
import importlib

import pytest
import torch

from conftest import TINY_CONFIGS, make_tiny_model
from mvquant import MvquantError
from mvquant.calibration.calibrate import accumulate_norms
from mvquant.models import get_layout
from mvquant.models.adapters import find_spec

GPTJ = dict(model_type="gptj", n_embd=64, n_head=4, n_layer=2, vocab_size=128, n_positions=256,
            rotary_dim=8, bos_token_id=1, eos_token_id=1)
ALL = list(TINY_CONFIGS) + ["gptj"]


def _model(arch):
    if arch != "gptj":
        model = make_tiny_model(arch)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM
        cfg = dict(GPTJ)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).eval()
    model.set_attn_implementation("eager")
    return model


def _record_attention_inputs(model, arch, ids, mask):
    """Run the model; return per layer the (q, k, v) its attention received, as [b, s, h, d]."""
    records = []
    module = importlib.import_module(type(model).__module__)
    if not hasattr(module, "eager_attention_forward"):  # transformers < 5.2x: GPT-J's own _attn
        layout = get_layout(model)
        for i in range(layout.num_layers):
            attn = layout.attention(model, i)
            orig = attn._attn

            def wrapped(query, key, value, *a, orig=orig, **kw):
                records.append((query, key, value))
                return orig(query, key, value, *a, **kw)
            attn._attn = wrapped
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    else:
        orig = module.eager_attention_forward

        def wrapped(mod, query, key, value, *a, **kw):
            records.append((query, key, value))
            return orig(mod, query, key, value, *a, **kw)
        module.eager_attention_forward = wrapped
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
        finally:
            module.eager_attention_forward = orig
    return [tuple(t.transpose(1, 2).float() for t in r) for r in records]


def _pair_sums(sumsq: torch.Tensor, rotary_dim: int, pairing: str) -> torch.Tensor:
    """Sum of squares per RoPE pair (the rotation-invariant quantity), plus unrotated dims as they are."""
    rot, rest = sumsq[:, :rotary_dim], sumsq[:, rotary_dim:]
    if pairing == "half":
        half = rotary_dim // 2
        pairs = rot[:, :half] + rot[:, half:]
    else:
        pairs = rot[:, 0::2] + rot[:, 1::2]
    return torch.cat([pairs, rest], dim=1)


@pytest.mark.parametrize("arch", ALL)
def test_hooks_see_what_attention_receives(arch):
    model = _model(arch)
    layout = get_layout(model)
    torch.manual_seed(1)
    ids = torch.randint(2, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0                                    # right padding must be masked out
    seqs = [ids[0].tolist(), ids[1, :8].tolist()]
    ours = accumulate_norms(model, layout, seqs, batch_size=2, pad_id=0, progress=False)
    recorded = _record_attention_inputs(model, arch, ids, mask)
    assert len(recorded) == layout.num_layers
    m = mask[:, :, None, None].float()
    scale = {"opt": layout.head_dim ** -0.5}.get(arch, 1.0)   # OPT scales q before attention
    for layer, (q, k, v) in enumerate(recorded):
        ref = {"q": ((q / scale) ** 2 * m).sum((0, 1)), "k": (k ** 2 * m).sum((0, 1)), "v": (v ** 2 * m).sum((0, 1))}
        got = {kind: ours[(layer, kind)].double() ** 2 for kind in "qkv"}
        torch.testing.assert_close(got["v"].float(), ref["v"], rtol=1e-4, atol=1e-5)
        for kind in "qk":
            if layout.has_rope:
                torch.testing.assert_close(_pair_sums(got[kind].float(), layout.rotary_dim, layout.pairing),
                                           _pair_sums(ref[kind], layout.rotary_dim, layout.pairing),
                                           rtol=1e-4, atol=1e-5)
            else:
                torch.testing.assert_close(got[kind].float(), ref[kind], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ALL)
def test_projection_rows_produce_the_captured_dims(arch):
    """Zeroing the weight rows named for (head, dim) zeroes exactly those captured dims."""
    model = _model(arch)
    layout = get_layout(model)
    chosen = {"q": [[1, 3]] + [[]] * (layout.num_heads - 1),
              "k": [[]] * (layout.num_kv_heads - 1) + [[2]],
              "v": [[0]] + [[]] * (layout.num_kv_heads - 1)}
    attn = layout.attention(model, 0)
    with torch.no_grad():
        for kind, dims in chosen.items():
            name, rows = layout.projection_rows(kind, dims)
            proj = getattr(attn, name)
            if layout.spec.transposed_weight:
                proj.weight[:, rows] = 0
            else:
                proj.weight[rows] = 0
            if getattr(proj, "bias", None) is not None:
                proj.bias[rows] = 0
    torch.manual_seed(2)
    ids = torch.randint(2, 100, (1, 10))
    norms = accumulate_norms(model, layout, [ids[0].tolist()], batch_size=1, pad_id=0, progress=False)
    for kind, dims in chosen.items():
        m = norms[(0, kind)]
        for h, ds in enumerate(dims):
            for d in range(layout.head_dim):
                if d in ds:
                    assert m[h, d] == 0, (kind, h, d)
                else:
                    assert m[h, d] > 0, (kind, h, d)


def test_layout_facts():
    gptj = get_layout(_model("gptj"))
    assert (gptj.pairing, gptj.rotary_dim) == ("interleaved", 8)
    neox = get_layout(make_tiny_model("gpt_neox"))
    assert (neox.rotary_dim, neox.head_dim, neox.pairing) == (8, 16, "half")
    llama = get_layout(make_tiny_model("llama"))
    assert (llama.num_heads, llama.num_kv_heads, llama.rope_theta) == (4, 2, 10000.0)
    assert get_layout(make_tiny_model("gpt2")).rope_info() is None
    assert get_layout(make_tiny_model("opt")).has_rope is False


def test_unknown_architecture_names_the_fix():
    with pytest.raises(MvquantError, match="not supported.*ArchSpec"):
        find_spec("mamba")


def test_rows_for_wrong_head_count_is_an_error():
    layout = get_layout(make_tiny_model("llama"))
    with pytest.raises(MvquantError, match="another model"):
        layout.projection_rows("k", [[1]] * 4)   # 2 KV heads, not 4


@pytest.mark.parametrize("arch", ALL)
def test_row_kind_inverts_row_of(arch):
    """Which of q/k/v a projection row produces (summaries, AWQ's no-clip rule) is the inverse of the row
    protection uses, fused projections included; every row of the projection has exactly one kind."""
    model = _model(arch)
    layout = get_layout(model)
    attn = f"{layout.spec.layers}.0.{layout.spec.attention}"
    names = layout.projection_names()
    for kind in ("q", "k", "v"):
        for head in range(layout.heads(kind)):
            for dim in range(layout.head_dim):
                assert layout.row_kind(f"{attn}.{names[kind]}", layout.row_of(kind, head, dim)) == kind
    for proj in set(names.values()):
        rows = model.get_submodule(f"{attn}.{proj}")
        out = rows.weight.shape[1] if layout.spec.transposed_weight else rows.weight.shape[0]
        kinds = [layout.row_kind(f"{attn}.{proj}", r) for r in range(out)]
        assert None not in kinds
        assert layout.produces_qk(f"{attn}.{proj}") == ("q" in kinds or "k" in kinds)
    assert layout.row_kind(f"{layout.spec.layers}.0.mlp.up_proj", 0) is None
