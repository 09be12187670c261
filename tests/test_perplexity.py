"""Held-out perplexity through a quantized KV cache (evals/kv.py --ppl-windows)."""
import math

import pytest
import torch

from mvquant.evaluation.perplexity import perplexity_summary, window_nll
from mvquant.kvcache import KVCacheFactory, KVConfig
from tests.conftest import make_tiny_model


def test_window_nll_equals_cross_entropy_and_an_8_bit_cache_barely_moves_it():
    model = make_tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(2, 100, (48,), generator=g).tolist() for _ in range(3)]
    nll = window_nll(model, windows)
    ids = torch.tensor(windows)
    ref = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1),
                                            reduction="none").view(3, -1).mean(1)
    assert nll == pytest.approx(ref.tolist(), abs=1e-5)
    q8 = window_nll(model, windows, KVCacheFactory(model, None, KVConfig(bits=8, protect="none", residual=0)))
    q2 = window_nll(model, windows, KVCacheFactory(model, None, KVConfig(bits=2, protect="none", residual=0,
                                                                         axis="token")))
    d8 = max(abs(a - b) for a, b in zip(q8, nll))
    d2 = max(abs(a - b) for a, b in zip(q2, nll))
    assert d8 < 1e-3 < d2


def test_summary_pairs_windows():
    s = perplexity_summary([2.0, 2.2, 2.4], base=[1.9, 2.1, 2.3])
    assert s["ppl"] == pytest.approx(math.exp(2.2)) and s["windows"] == 3
    assert s["delta_nll"] == pytest.approx(0.1) and s["delta_nll_se"] == pytest.approx(0.0, abs=1e-12)
    assert s["ppl_change"] == pytest.approx(math.exp(0.1) - 1)
    assert s["nll_se"] == pytest.approx(0.2 / math.sqrt(3))
