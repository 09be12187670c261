"""transformers' QuantizedCache (optimum-quanto / HQQ) as a KV baseline: --kv-backend quanto|hqq."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import make_tiny_model
from mvquant.errors import MvquantError
from mvquant.evaluation.scoring import score_continuations
from mvquant.kvcache import KVCacheFactory, KVConfig, kv_cache

BACKENDS = [b for b, mod in (("quanto", "optimum.quanto"), ("hqq", "hqq"))
            if importlib.util.find_spec(mod.split(".")[0]) and importlib.util.find_spec(mod)]
pytestmark = pytest.mark.skipif(not BACKENDS, reason="pip install optimum-quanto hqq (mvquant[kv-baselines])")


def _prefill_error(model, cache, ids, bits, group=16):
    """Layer 1's stored keys against the exact ones: the largest error in steps of its group's grid
    ((max - min) / (2^b - 1) of `group` channels of one token), and the mean absolute error."""
    from transformers import DynamicCache
    ref = DynamicCache()
    model(ids, past_key_values=ref, use_cache=True)
    model(ids, past_key_values=cache, use_cache=True)
    k = cache.layers[1]._dequantize(cache.layers[1]._quantized_keys)
    r = ref.layers[1].keys
    g = r.reshape(*r.shape[:-1], -1, group)
    step = ((g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / (2 ** bits - 1)).expand_as(g).reshape(r.shape)
    return float(((k - r).abs() / step).max()), float((k - r).abs().mean())


def exact_keys(model, ids):
    from transformers import DynamicCache
    ref = DynamicCache()
    model(ids, past_key_values=ref, use_cache=True)
    return ref.layers[1].keys


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_reads_the_quantized_prompt_and_bits_order_the_error(backend):
    model = make_tiny_model("llama")
    ids = torch.randint(2, 100, (2, 40))
    nxt = torch.randint(2, 100, (2, 3))
    ref = model(torch.cat([ids, nxt], 1)).logits
    errs = {}
    for bits in (2, 4):
        cache = kv_cache(model, None, bits=bits, protect="none", axis="token", group_size=16, residual=8,
                         backend=backend)
        a = model(ids, past_key_values=cache, use_cache=True).logits
        assert not torch.allclose(a, ref[:, :40], atol=1e-6)       # the prompt's own attention saw quantized K/V
        c = model(nxt, past_key_values=cache, use_cache=True).logits
        assert cache.get_seq_length() == 43
        errs[bits] = float((torch.cat([a, c], 1) - ref).abs().max())
        steps, mean = _prefill_error(model, kv_cache(model, None, bits=bits, protect="none", axis="token",
                                                     group_size=16, residual=8, backend=backend), ids, bits)
        ours = kv_cache(model, None, bits=bits, protect="none", axis="token", group_size=16, residual=0)
        model(ids, past_key_values=ours, use_cache=True)
        ours_mean = float((ours.layers[1]._read()[0] - exact_keys(model, ids)).abs().mean())
        # quanto rounds to nearest on the min-max grid: within one step (half, plus the rounded zero point);
        # HQQ moves the zero point to cut an Lp (p < 1) loss, which lets a few entries go further
        assert 0 < steps <= (1 + 1e-3 if backend == "quanto" else 1.5)
        assert 0.8 * ours_mean < mean < 1.15 * ours_mean   # the same scheme as our per-token cache (quanto: equal)
    assert errs[4] < errs[2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_scorer_batch_select_and_repeat(backend):
    """The scorer selects/expands batch rows after prefill; each row must score as it does alone."""
    model = make_tiny_model("llama")
    factory = KVCacheFactory(model, None, KVConfig(bits=4, protect="none", axis="token", group_size=16, residual=4,
                                                   backend=backend))
    ctx = [list(range(3, 40)), list(range(5, 30))]
    reqs = [(ctx[0], [7, 8, 9]), (ctx[0], [9, 8]), (ctx[1], [4, 5, 6, 7, 8, 9])]
    together = score_continuations(model, reqs, cache_factory=factory, progress=False)
    alone = [score_continuations(model, [r], cache_factory=factory, progress=False)[0] for r in reqs]
    for (a, _), (b, _) in zip(together, alone):
        assert a == pytest.approx(b, abs=1e-3)
    cache = factory()
    model(torch.tensor([ctx[0]]), past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(3)
    out = model(torch.tensor([[7], [8], [9]]), past_key_values=cache, use_cache=True).logits
    assert out.shape[0] == 3


def test_backend_rules_in_one_place():
    model = make_tiny_model("llama")
    with pytest.raises(MvquantError, match="--kv-backend quanto keeps no K channels exact: use --kv-protect none"):
        KVConfig(bits=2, protect="massive", backend="quanto").check()
    with pytest.raises(MvquantError, match="per token: use --kv-axis token"):
        KVConfig(bits=2, protect="none", backend="hqq").check()
    with pytest.raises(MvquantError, match="--kv-bits 3 is not supported by --kv-backend quanto: use one of 2, 4"):
        KVConfig(bits=3, protect="none", axis="token", backend="quanto").check()
    with pytest.raises(MvquantError, match="--kv-backend 'vllm' is unknown"):
        kv_cache(model, None, protect="none", backend="vllm")
    s = KVCacheFactory(model, None, KVConfig(bits=2, protect="none", axis="token", backend=BACKENDS[0])).summary()
    mine = KVCacheFactory(model, None, KVConfig(bits=2, protect="none", axis="token")).summary()
    # 2-bit codes + an fp16 scale and minimum per 16 channels: 0.5 of 2 bytes
    assert s["backend"] == BACKENDS[0] and s["ratio"] == mine["ratio"] == pytest.approx(0.25)


def test_recipe_and_cli_take_the_backend(tmp_path, capsys):
    from mvquant.cli import main
    from mvquant.compare import parse_recipe

    def recipe(arms):
        return parse_recipe({"name": "kv", "model": "tiny-llama", "tasks": ["capitals"], "limit": 2, "arms": arms},
                            catalog={"parametric": ["capitals"]})

    arms = [{"name": "q2", "kv_bits": 2, "kv_protect": "none", "kv_axis": "token", "kv_backend": "quanto"},
            {"name": "m2", "kv_bits": 2, "kv_protect": "none"}]
    r = recipe(arms)
    assert r.arms[0].kv_config()["backend"] == "quanto" and r.arms[0].spec()["kv_backend"] == "quanto"
    assert "kv_backend" not in r.arms[1].spec()          # default backend: the cache keys of earlier kv arms
    with pytest.raises(MvquantError, match="kv_bits 3 is not supported by kv_backend quanto"):
        recipe([dict(arms[0], kv_bits=3)])
    rc = main(["eval", "smollm2-135m", "--tasks", "capitals", "--kv-bits", "2", "--kv-backend", "hqq",
               "--output", str(tmp_path / "r.json")])
    assert rc == 2 and "--kv-backend hqq keeps no K channels exact" in capsys.readouterr().err
