"""Calibration activations for AWQ / SmoothQuant / GPTQ: the token windows (from the same source
`mvquant calibrate` reads) and the streaming statistics of one linear's input. The sequential pipeline
hooks one decoder layer's linears at a time (quantization/layer.py collect_layer_stats), so only
statistics are kept (memory independent of the number of tokens), plus a bounded random sample of
input rows for AWQ's search.
"""
from __future__ import annotations

import torch

from ..calibration import data as D
from ..errors import MvquantError


class InputStats:
    """Streaming statistics of one linear's input x [tokens, in]."""

    def __init__(self, needs: set[str], sample_rows: int):
        self.needs, self.sample_rows = needs, sample_rows
        self.count = 0
        self.abs_sum = self.abs_max = self.hessian = None
        self.samples: list[torch.Tensor] = []

    @staticmethod
    def increment(x: torch.Tensor, needs: set[str], sample_rows: int, gen: torch.Generator) -> dict:
        """One batch's contribution, computed once and shared by the linears that read the same x."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        a = x.abs()
        inc = {"count": x.shape[0]}
        if "absmean" in needs:
            inc["abs_sum"] = a.sum(0)
        if "absmax" in needs:
            inc["abs_max"] = a.amax(0)
        if "hessian" in needs:
            inc["hessian"] = x.t() @ x
        if "samples" in needs and sample_rows:
            inc["sample"] = x[torch.randperm(x.shape[0], generator=gen)[:min(x.shape[0], sample_rows)]]
        return inc

    def add(self, inc: dict) -> None:
        self.count += inc["count"]
        if "abs_sum" in inc:
            self.abs_sum = inc["abs_sum"].clone() if self.abs_sum is None else self.abs_sum + inc["abs_sum"]
        if "abs_max" in inc:
            self.abs_max = inc["abs_max"] if self.abs_max is None else torch.maximum(self.abs_max, inc["abs_max"])
        if "hessian" in inc:
            self.hessian = inc["hessian"].clone() if self.hessian is None else self.hessian + inc["hessian"]
        if "sample" in inc:
            self.samples.append(inc["sample"])

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(1, self.count)

    def sample(self, gen: torch.Generator | None = None) -> torch.Tensor:
        """At most `sample_rows` rows drawn from all batches."""
        x = torch.cat(self.samples)
        if x.shape[0] > self.sample_rows:
            x = x[torch.randperm(x.shape[0], generator=gen)[:self.sample_rows]]
        return x


def calibration_sequences(model, tokenizer, calibration, *, samples: int, seq_len: int, seed: int,
                          source: str = D.DEFAULT_SOURCE) -> list[list[int]]:
    """`calibration`: None (the default source), a source name/file, or token id lists."""
    if calibration is not None and not isinstance(calibration, str):
        seqs = [list(map(int, s)) for s in calibration]
        if not seqs:
            raise MvquantError("calibration sequences are empty: give token windows or a text source")
        return seqs
    if tokenizer is None:
        raise MvquantError("this method needs calibration text and a tokenizer: pass tokenizer=... "
                           "(or token id sequences as calibration=...)")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and seq_len > limit:
        seq_len = int(limit)
    return D.token_windows(D.load_texts(calibration or source), tokenizer, samples=samples, seq_len=seq_len, seed=seed)
