"""Held-out perplexity: the mean next-token NLL of each text window, optionally read through a
quantized KV cache (every attention read at prefill sees what the cache stores, cache.py)."""
from __future__ import annotations

import math

import torch


@torch.inference_mode()
def window_nll(model, windows: list[list[int]], make_cache=None) -> list[float]:
    """Per window, the mean NLL of tokens 2..n given the ones before them (natural log)."""
    out = []
    for w in windows:
        ids = torch.tensor([w])
        cache = make_cache() if make_cache is not None else None
        logits = model(ids, past_key_values=cache, use_cache=cache is not None).logits[0, :-1].float()
        out.append(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))
    return out


def perplexity_summary(nll: list[float], base: list[float] | None = None) -> dict:
    """Perplexity over equal-length windows, the NLL's standard error over windows and, against `base`
    (the same windows), the paired relative change of perplexity exp(mean diff) - 1 with its standard
    error (delta method)."""
    n = len(nll)
    mean = sum(nll) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in nll) / (n - 1) / n) if n > 1 else float("nan")
    out = {"windows": n, "nll": mean, "nll_se": se, "ppl": math.exp(mean)}
    if base is not None:
        d = [a - b for a, b in zip(nll, base)]
        dm = sum(d) / n
        dse = math.sqrt(sum((x - dm) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
        out.update({"delta_nll": dm, "delta_nll_se": dse, "ppl_change": math.exp(dm) - 1,
                    "ppl_change_se": math.exp(dm) * dse})
    return out
