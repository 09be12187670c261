"""Massive-value disruption: the math on hand-made tensors, and the hooks on every RoPE adapter."""
from __future__ import annotations

import pytest
import torch

from conftest import ROPE_ARCHS, make_tiny_model
from mvquant.calibration.calibrate import qkv_hooks
from mvquant.errors import MvquantError
from mvquant.calibration.selection import disruption_dims as select_dims
from mvquant.evaluation.disruption import Disruption, disrupt, mean_replace_
from mvquant.models import get_layout


def test_mean_replace_by_hand():
    x = torch.tensor([[[[1., 10.]], [[3., 20.]], [[5., 30.]], [[100., 40.]]]])  # [1, 4, 1, 2]
    dims = torch.tensor([[True, False]])
    mask = torch.tensor([[1, 1, 1, 0]])                # last token is padding
    mean_replace_(x, dims, mask)
    assert x[0, :, 0, 0].tolist() == [3., 3., 3., 100.]  # mean of 1, 3, 5; the pad keeps its value
    assert x[0, :, 0, 1].tolist() == [10., 20., 30., 40.]


def test_mean_replace_rows_independent():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4)
    ref = x.clone()
    dims = torch.zeros(3, 4, dtype=torch.bool)
    dims[0, 1] = dims[2, 3] = True
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    mean_replace_(x, dims, mask)
    for b in range(2):
        real = mask[b].bool()
        for h, d in [(0, 1), (2, 3)]:
            want = ref[b, real, h, d].mean()
            torch.testing.assert_close(x[b, real, h, d], want.expand(int(real.sum())))
            torch.testing.assert_close(x[b, ~real, h, d], ref[b, ~real, h, d])
    untouched = ~dims
    torch.testing.assert_close(x[:, :, untouched], ref[:, :, untouched])


def test_select_dims_topk_lambda_and_control():
    m = torch.tensor([[1., 9., 2., 0.5], [4., 1., 1., 30.]])
    norms = {(0, "q"): m, (0, "k"): m.flip(-1)}
    sel = select_dims(norms, "massive", top_k=1)
    assert sel[(0, "q")] == [[1], [3]] and sel[(0, "k")] == [[2], [0]]
    ctrl = select_dims(norms, "non-massive", top_k=1)
    assert ctrl[(0, "q")] == [[3], [1]]  # lowest-norm dim per head (head 1: dims 1, 2 tie at 1.0)
    lam = select_dims(norms, "massive", lam=2.0)
    assert lam[(0, "q")] == [[1], [3]]   # head means 3.125 and 9: 9 > 6.25, 30 > 18
    lam_ctrl = select_dims(norms, "non-massive", lam=2.0)
    assert [len(d) for d in lam_ctrl[(0, "q")]] == [1, 1]
    pairs = select_dims(norms, "massive", top_k=1, pairs=True, rope={"rotary_dim": 4, "pairing": "half"})
    assert pairs[(0, "q")] == [[1, 3], [1, 3]]
    only = select_dims(norms, "massive", layers=[0])
    assert set(only) == {(0, "q"), (0, "k")}
    with pytest.raises(MvquantError, match="layers"):
        select_dims(norms, "massive", layers=[3])
    with pytest.raises(MvquantError, match="unknown disruption"):
        select_dims(norms, "all")
    with pytest.raises(MvquantError, match="not both"):
        select_dims(norms, "massive", top_k=1, lam=5.0)


def _random_selection(layout, seed=0, k=2):
    g = torch.Generator().manual_seed(seed)
    return {(i, kind): [sorted(torch.randperm(layout.head_dim, generator=g)[:k].tolist())
                        for _ in range(layout.heads(kind))]
            for i in range(layout.num_layers) for kind in ("q", "k")}


@pytest.mark.parametrize("arch", ROPE_ARCHS)
def test_hooks_replace_selected_dims_by_prompt_mean(arch):
    """Captured before and after the edit in the same forward: selected Q/K dims equal their mean over
    the row's real tokens, padding and every other dim (and all of V) keep their values."""
    model = make_tiny_model(arch)
    layout = get_layout(model)
    selection = _random_selection(layout)
    before, after = {}, {}
    ids = torch.randint(2, 120, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0   # row 0 left-padded

    def record(store):
        return lambda layer, kind, x: store.__setitem__((layer, kind), x.detach().clone())

    with qkv_hooks(model, layout, record(before)):
        with Disruption(model, selection):
            with qkv_hooks(model, layout, record(after)), torch.no_grad():
                model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    assert set(after) == {(i, k) for i in range(layout.num_layers) for k in "qkv"}
    for (layer, kind), pre in before.items():
        post = after[(layer, kind)]
        if kind == "v":
            torch.testing.assert_close(post, pre)
            continue
        for h, dims in enumerate(selection[(layer, kind)]):
            for d in range(layout.head_dim):
                for b in range(2):
                    real = mask[b].bool()
                    if d in dims:
                        want = pre[b, real, h, d].mean().expand(int(real.sum()))
                        torch.testing.assert_close(post[b, real, h, d], want, rtol=1e-5, atol=1e-6)
                        torch.testing.assert_close(post[b, ~real, h, d], pre[b, ~real, h, d])
                    else:
                        torch.testing.assert_close(post[b, :, h, d], pre[b, :, h, d])


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt_neox"])
def test_padding_does_not_change_a_rows_result(arch):
    """A left-padded row gives the logits it gets alone: the mean excludes padding."""
    model = make_tiny_model(arch)
    layout = get_layout(model)
    ids = torch.randint(2, 120, (1, 9))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    with Disruption(model, _random_selection(layout, k=3)), torch.no_grad():
        alone = model(input_ids=ids).logits[0, -1]
        both = model(input_ids=padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits[0, -1]
        plain = None
    with torch.no_grad():
        plain = model(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(both, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(alone, plain, atol=1e-4)   # the disruption did change something


def test_decoding_steps_are_left_alone_and_detach_restores():
    model = make_tiny_model("llama")
    layout = get_layout(model)
    seen = []
    ids = torch.randint(2, 120, (1, 8))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    dis = Disruption(model, _random_selection(layout))
    orig = dis._edit

    def spy(layer, split, out):
        seen.append(dis._current is not None)
        orig(layer, split, out)
    dis._edit = spy
    with dis, torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        assert all(seen) and seen
        seen.clear()
        model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
        assert seen and not any(seen)       # one-token step with a cache: no edit
        seen.clear()
        with dis.paused():
            model(input_ids=ids)
        assert seen and not any(seen)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref)   # hooks removed


def test_disrupt_from_report_and_errors(tmp_path):
    from mvquant.calibration.report import CalibrationReport
    model = make_tiny_model("llama")
    layout = get_layout(model)
    g = torch.Generator().manual_seed(1)
    norms = {(i, k): torch.rand(layout.heads(k), layout.head_dim, generator=g) for i in range(layout.num_layers)
             for k in "qkv"}
    norms[(0, "q")][:, 5] = 50.0
    report = CalibrationReport.from_norms(norms, layout, model="tiny", top_k=1)
    report.save(tmp_path / "r.json")
    d = disrupt(model, "massive", report=str(tmp_path / "r.json"), top_k=1)
    assert d.selection[(0, "q")] == [[5]] * layout.num_heads
    assert d.summary()["dims_q"] == layout.num_layers * layout.num_heads
    d2 = disrupt(model, "non-massive", report=report, layers=[1])
    assert set(d2.selection) == {(1, "q"), (1, "k")}
    with pytest.raises(MvquantError, match="report or a tokenizer"):
        disrupt(model, "massive")
    other = make_tiny_model("gemma")   # 1 KV head, head_dim 16: the report does not match
    with pytest.raises(MvquantError, match="does not match"):
        disrupt(other, "massive", report=report)


def test_non_rope_model_warns():
    from mvquant.calibration.report import CalibrationReport
    model = make_tiny_model("gpt2")
    layout = get_layout(model)
    norms = {(i, k): torch.rand(layout.heads(k), layout.head_dim) for i in range(layout.num_layers) for k in "qkv"}
    report = CalibrationReport.from_norms(norms, layout, model="tiny-gpt2")
    with pytest.warns(UserWarning, match="without RoPE"):
        d = disrupt(model, "massive", report=report)
    with d, torch.no_grad():
        model(input_ids=torch.randint(2, 120, (1, 6)))


def test_generate_disrupts_the_prompt_once():
    """Through model.generate (left-padded batch): the prefill forward is edited with the batch's
    attention mask, the decoding steps are not."""
    model = make_tiny_model("llama")
    layout = get_layout(model)
    dis = Disruption(model, _random_selection(layout))
    masks = []
    orig = dis._edit

    def spy(layer, split, out):
        if layer == 0:
            masks.append(None if dis._current is None else dis._current.clone())
        orig(layer, split, out)
    dis._edit = spy
    ids = torch.randint(2, 120, (2, 7))
    attn = torch.ones(2, 7, dtype=torch.long)
    attn[1, :3] = 0
    with dis, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=3, do_sample=False, pad_token_id=0)
    prefill = [m for m in masks if m is not None]
    assert prefill and all(torch.equal(m, attn) for m in prefill)
    assert len(masks) > len(prefill)          # decoding steps ran, unedited
