"""Calibration activations for AWQ / SmoothQuant / GPTQ: one pass of the unquantized model over
token windows from the same source `mvquant calibrate` reads, with forward pre-hooks on every
target linear. Only statistics are kept (memory independent of the number of tokens), plus a
bounded random sample of input rows for AWQ's search.

GPTQ here uses Hessians from the unquantized model's activations (all layers in one pass), not
the sequential variant that feeds each layer the already-quantized previous layers' outputs.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

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


def collect_input_stats(model, modules: dict[str, torch.nn.Module], seqs: list[list[int]], needs: set[str], *,
                        batch_size: int = 4, sample_rows: int = 512, seed: int = 0,
                        progress: bool = True) -> dict[str, InputStats]:
    gen = torch.Generator().manual_seed(seed)
    stats = {name: InputStats(needs, sample_rows) for name in modules}
    # q/k/v (and gate/up) are called one after the other on the same tensor: compute its statistics
    # once. Only the last input is remembered (by identity, holding a reference so that its memory
    # cannot be reused by another tensor meanwhile).
    last: list = [None, None]

    def make_hook(name):
        def hook(_m, args):
            x = args[0]
            if last[0] is not x:
                last[:] = [x, InputStats.increment(x, needs, sample_rows, gen)]
            stats[name].add(last[1])
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    device = model.get_input_embeddings().weight.device
    n_batches = -(-len(seqs) // batch_size)
    try:
        with torch.inference_mode():
            for ids, mask in tqdm(D.batches(seqs, batch_size, 0), total=n_batches, desc="activations",
                                  unit="batch", disable=not progress):
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        last[:] = [None, None]
        for h in handles:
            h.remove()
    missing = [n for n, s in stats.items() if s.count == 0]
    if missing:
        raise MvquantError(f"no calibration activations reached {missing[:3]}: these modules are not used "
                           "in the forward pass; exclude them with ignore patterns")
    return stats
