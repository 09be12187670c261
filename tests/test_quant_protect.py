"""Protection policies: whole RoPE pairs, per head, GQA and fused projections."""
import pytest
import torch
from conftest import ROPE_ARCHS, ToyTokenizer, make_tiny_model

import mvquant
from mvquant.errors import MvquantError
from mvquant.models import get_layout
from mvquant.quantization import QuantConfig
from mvquant.calibration.selection import pair_units, protected_rows, select_dims


def _report(model, top_k=1):
    return mvquant.calibrate(model, ToyTokenizer(), samples=4, seq_len=32, top_k=top_k, progress=False)


def test_pair_units():
    assert pair_units(4, 4, "half") == [(0, 2), (1, 3)]
    assert pair_units(4, 4, "interleaved") == [(0, 1), (2, 3)]
    assert pair_units(6, 4, "half") == [(0, 2), (1, 3), (4,), (5,)]  # partial rotary: the rest unpaired
    assert pair_units(3, None, None) == [(0,), (1,), (2,)]


class FakeReport:
    """Just what select_dims reads."""

    def __init__(self, massive, norms=None):
        self._massive, self._norms = massive, norms

    def massive(self, layer, kind, closed=True):
        return self._massive[kind]

    def norm(self, layer, kind):
        return self._norms[kind]


class FakeLayout:
    head_dim, rotary_dim, pairing = 8, 8, "half"

    def heads(self, kind):
        return 2


def test_select_massive_random_topk():
    rep = FakeReport({"q": [[1, 5], []], "k": [[3, 7], [0, 4, 2, 6]]},
                     {"q": torch.tensor([[1.0] * 8, [1, 1, 9, 1, 1, 1, 1, 1]]), "k": torch.ones(2, 8)})
    lay = FakeLayout()
    assert select_dims("massive", None, rep, 0, "k", lay) == [[3, 7], [0, 2, 4, 6]]
    assert select_dims("none", None, rep, 0, "q", lay) == [[], []]
    assert select_dims("topk", 1, rep, 0, "q", lay)[1] == [2, 6]          # the pair holding the big dim
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        picked = select_dims("random", None, rep, 0, "k", lay, g)
        assert [len(p) for p in picked] == [2, 4]                          # same count per head
        for head, dims in enumerate(picked):
            assert all((d + 4) % 8 in dims for d in dims)                  # whole pairs
            assert not set(dims) & set(rep.massive(0, "k")[head])          # never the massive ones
    a = select_dims("random", None, rep, 0, "q", lay, torch.Generator().manual_seed(3))
    b = select_dims("random", None, rep, 0, "q", lay, torch.Generator().manual_seed(3))
    assert a == b                                                          # seeded


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt_neox", "qwen3"])
def test_protected_rows_map_to_projection_rows(arch):
    model = make_tiny_model(arch)
    layout = get_layout(model)
    report = _report(model)
    rows = protected_rows(model, layout, report, "massive")
    assert rows
    d = layout.head_dim
    for layer in range(layout.num_layers):
        attn = layout.attention(model, layer)
        for kind in ("q", "k"):
            for head, dims in enumerate(report.massive(layer, kind)):
                name = [n for n, m in model.named_modules() if m is getattr(attn, layout.projection_names()[kind])][0]
                for dim in dims:
                    assert layout.row_of(kind, head, dim) in rows[name].tolist()
    # random protects as many rows as massive, elsewhere
    rnd = protected_rows(model, layout, report, "random", seed=1)
    assert {n: len(r) for n, r in rnd.items()} == {n: len(r) for n, r in rows.items()}
    assert any(not torch.equal(rnd[n], rows[n]) for n in rows)


def test_policy_errors():
    model = make_tiny_model("llama")
    layout = get_layout(model)
    with pytest.raises(MvquantError, match="needs a calibration report"):
        protected_rows(model, layout, None, "massive")
    other = _report(make_tiny_model("gemma"))  # 1 KV head vs 2
    with pytest.raises(MvquantError, match="does not match"):
        mvquant.quantize(model, QuantConfig(protect="massive"), report=other, progress=False)
    for bad in ("topk:0", "topk:x", "all", ""):
        with pytest.raises(MvquantError, match="protection policy"):
            QuantConfig(protect=bad)


@pytest.mark.parametrize("arch", ROPE_ARCHS)
def test_quantize_keeps_protected_rows_exact(arch):
    model = make_tiny_model(arch)
    layout = get_layout(model)
    report = _report(model)
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    rows = protected_rows(model, layout, report, "massive")
    mvquant.quantize(model, QuantConfig(bits=2, group_size=16, protect="massive"), report=report, progress=False)
    for name, r in rows.items():
        q = model.get_submodule(name)
        assert torch.equal(q.protected_rows.long(), r)
        assert torch.equal(q.dequantized_weight()[r], original[name][r].half().float())
    assert model.mvquant_summary["protected_rows"] == sum(len(r) for r in rows.values())
    by_kind = model.mvquant_summary["protected_rows_by_kind"]   # fused q/k/v projections (phi3, gpt_neox) too
    assert by_kind["other"] == 0 and by_kind["q"] > 0 and by_kind["k"] > 0
