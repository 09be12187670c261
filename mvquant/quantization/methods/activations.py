"""Calibration activations for AWQ / SmoothQuant / GPTQ: the token windows (from the same source
`mvquant calibrate` reads) and the streaming statistics of one linear's input. The sequential pipeline
hooks one decoder layer's linears at a time (context.py collect_layer_stats), so only statistics are
kept: memory independent of the number of tokens.
"""
from __future__ import annotations

import torch

from ...calibration import data as D
from ...errors import MvquantError


class InputStats:
    """Streaming statistics of one linear's input x [tokens, in]: "absmax" (SmoothQuant), "hessian" (GPTQ)."""

    def __init__(self, needs: set[str]):
        self.needs = needs
        self.count = 0
        self.abs_max = self.hessian = None

    @staticmethod
    def increment(x: torch.Tensor, needs: set[str]) -> dict:
        """One batch's contribution, computed once and shared by the linears that read the same x."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        inc = {"count": x.shape[0]}
        if "absmax" in needs:
            inc["abs_max"] = x.abs().amax(0)
        if "hessian" in needs:
            inc["hessian"] = x.t() @ x
        return inc

    def add(self, inc: dict) -> None:
        self.count += inc["count"]
        if "abs_max" in inc:
            self.abs_max = inc["abs_max"] if self.abs_max is None else torch.maximum(self.abs_max, inc["abs_max"])
        if "hessian" in inc:
            self.hessian = inc["hessian"].clone() if self.hessian is None else self.hessian + inc["hessian"]


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
