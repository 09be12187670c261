"""The prefix-sharing scorer against a plain full forward, on tiny models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from mvquant.evaluation.disruption import Disruption
from mvquant.evaluation.scoring import plan_batches, score_continuations, truncate_left
from mvquant.models import get_layout


def naive(model, ctx, cont, disruption=None):
    """One request alone: full forward of context + continuation; a disruption sees the context only."""
    ids = torch.tensor([ctx + cont[:-1]])
    prompt = torch.zeros_like(ids)
    prompt[0, :len(ctx)] = 1
    with torch.no_grad():
        if disruption is not None:
            with disruption.prompt_mask(prompt):
                logits = model(input_ids=ids).logits
        else:
            logits = model(input_ids=ids).logits
    logp = F.log_softmax(logits[0, len(ctx) - 1:].float(), -1)
    target = torch.tensor(cont)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def make_requests(seed=0):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for n in range(7):
        ctx = torch.randint(2, 120, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
        for c in range(1 + n % 3):   # shared contexts with 1-3 choices of 1-4 tokens
            reqs.append((ctx, torch.randint(2, 120, (1 + (n + c) % 4,), generator=g).tolist()))
    return reqs


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "phi3", "gpt_neox", "gpt2", "opt"])
def test_matches_full_forward(arch):
    model = make_tiny_model(arch)
    reqs = make_requests()
    got = score_continuations(model, reqs, max_tokens=40, max_cont_tokens=8, progress=False)  # several batches
    for (ctx, cont), (lp, greedy) in zip(reqs, got):
        want_lp, want_greedy = naive(model, ctx, cont)
        assert lp == pytest.approx(want_lp, rel=1e-4, abs=1e-4)
        assert greedy == want_greedy


def test_greedy_flag_on_a_continuation_the_model_generates():
    model = make_tiny_model("llama")
    ctx = [5, 9, 17, 33]
    with torch.no_grad():
        gen = model.generate(torch.tensor([ctx]), max_new_tokens=3, do_sample=False, pad_token_id=0)[0, 4:].tolist()
    wrong = gen[:2] + [(gen[2] + 1) % 128]
    (lp_gen, g_gen), (lp_wrong, g_wrong) = score_continuations(model, [(ctx, gen), (ctx, wrong)], progress=False)
    assert g_gen and not g_wrong and lp_gen > lp_wrong


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_disrupted_scores_match_prefill_then_decode(arch):
    model = make_tiny_model(arch)
    layout = get_layout(model)
    sel = {(i, k): [[1, 2]] * layout.heads(k) for i in range(layout.num_layers) for k in ("q", "k")}
    reqs = make_requests(1)
    with Disruption(model, sel) as d:
        got = score_continuations(model, reqs, disruption=d, max_tokens=50, progress=False)
        want = [naive(model, c, x, disruption=d) for c, x in reqs]
    plain = score_continuations(model, reqs, progress=False)
    for (lp, g), (wlp, wg) in zip(got, want):
        assert lp == pytest.approx(wlp, rel=1e-4, abs=1e-4) and g == wg
    assert any(abs(a[0] - b[0]) > 1e-3 for a, b in zip(got, plain))


def test_truncate_and_plan():
    assert truncate_left(list(range(10)), [1, 2, 3], max_length=8) == [4, 5, 6, 7, 8, 9]
    assert truncate_left([1, 2], [7] * 20, max_length=8) == [2]
    batches = plan_batches([10, 50, 20, 40], [1, 1, 1, 1], [0, 0, 0, 0], max_tokens=100)
    assert batches == [[1, 3], [2, 0]]
    assert sorted(i for b in plan_batches([5] * 9, [2] * 9, [3] * 9, max_cont_tokens=12) for i in b) == list(range(9))
    assert all(len(b) <= 2 for b in plan_batches([5] * 9, [2] * 9, [3] * 9, max_cont_tokens=12))
