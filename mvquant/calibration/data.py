"""Calibration text: where it comes from and how it becomes token windows.

Sources: 'python-docs' (default, offline: the English reference text every CPython ships in
pydoc_data), a local .txt or .jsonl file (field 'text'), or a `datasets` name 'NAME[:CONFIG]'
(needs the network or the HF cache).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import MvquantError

DEFAULT_SOURCE = "python-docs"


def load_texts(source: str = DEFAULT_SOURCE) -> list[str]:
    if source == DEFAULT_SOURCE:
        from pydoc_data.topics import topics
        return [topics[k] for k in sorted(topics)]
    p = Path(source)
    if p.suffix in (".txt", ".jsonl", ".json") or p.exists():
        if not p.is_file():
            raise MvquantError(f"calibration file '{p}' not found: check the path or use --data {DEFAULT_SOURCE}")
        if p.suffix == ".jsonl":
            texts = []
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise MvquantError(f"{p}:{n}: each JSONL line needs a 'text' field") from None
            return texts
        return [p.read_text(encoding="utf-8")]
    name, _, config = source.partition(":")
    try:
        import datasets
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:  # datasets raises many types for offline / unknown names
        raise MvquantError(f"could not load calibration dataset '{source}' ({str(e).splitlines()[0][:200]}): "
                           f"use a local .txt/.jsonl file or --data {DEFAULT_SOURCE} when offline") from None
    return [t for t in ds["text"] if t and t.strip()]


def token_windows(texts: list[str], tokenizer, *, samples: int, seq_len: int, seed: int = 0,
                  pack: bool = True) -> list[list[int]]:
    """`samples` token sequences, chosen deterministically by `seed`.

    pack=True: join the texts and cut equal windows of `seq_len` tokens (no padding needed).
    pack=False: one sequence per text, truncated to `seq_len` (batches are padded and masked).
    A tokenizer that starts every text with BOS (Gemma) gets BOS at the start of every window, as the
    model always sees it (Gemma without BOS is off its training distribution); `seq_len` counts it.
    """
    if samples <= 0 or seq_len <= 0:
        raise MvquantError("--samples and --seq-len must be positive")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise MvquantError("calibration data is empty: give a file with text in it")
    gen = torch.Generator().manual_seed(seed)
    bos = leading_bos(tokenizer)
    if bos is not None:
        if seq_len < 2:
            raise MvquantError("--seq-len must be at least 2 for a tokenizer that starts every text with BOS")
        windows = token_windows(texts, _NoBos(tokenizer), samples=samples, seq_len=seq_len - 1, seed=seed, pack=pack)
        return [[bos] + w for w in windows]
    if pack:
        sep = tokenizer.eos_token_id
        ids: list[int] = []
        for t in texts:
            ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
            if sep is not None:
                ids.append(sep)
        n = len(ids) // seq_len
        if n < samples:
            raise MvquantError(f"calibration data too short: {len(ids)} tokens give {n} windows of {seq_len}, "
                               f"{samples} requested; lower --samples or --seq-len, or give more text")
        starts = torch.randperm(n, generator=gen)[:samples].sort().values.tolist()
        return [ids[s * seq_len:(s + 1) * seq_len] for s in starts]
    if len(texts) < samples:
        raise MvquantError(f"calibration data too short: {len(texts)} texts, {samples} samples requested; "
                           "lower --samples or give more texts")
    order = torch.randperm(len(texts), generator=gen)[:samples].tolist()
    seqs = [tokenizer(texts[i], add_special_tokens=False)["input_ids"][:seq_len] for i in order]
    return [s for s in seqs if s]


def batches(seqs: list[list[int]], batch_size: int, pad_id: int):
    """Right-padded (input_ids, attention_mask) batches: with causal attention, pads after a
    sequence cannot change its real tokens, and the mask removes the pads from the statistics."""
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, s in enumerate(chunk):
            ids[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = 1
        yield ids, mask


def leading_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts it before every text by default, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        ids = tokenizer("a")["input_ids"]
    except Exception:  # a tokenizer-like object without the usual call: no BOS to add
        return None
    return bos if ids and ids[0] == bos else None


class _NoBos:
    """The tokenizer with BOS left out (token_windows adds it once per window)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = None

    def __call__(self, text, **kwargs):
        return self._tokenizer(text, **kwargs)
