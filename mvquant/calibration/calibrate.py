"""The calibration pass: forward hooks on where Q, K and V enter attention, streaming sums of
squares per (layer, head, dim). Memory is O(layers x heads x head_dim), never O(tokens)."""
from __future__ import annotations

import contextlib
import time

import torch
from tqdm.auto import tqdm

from ..errors import MvquantError
from ..models.adapters import get_layout
from . import data as D
from .report import CalibrationReport
from .stats import sum_of_squares


@contextlib.contextmanager
def qkv_hooks(model, layout, fn, *, prenorm: bool = False):
    """Call fn(layer, kind, x[b, s, h, d]) for every Q/K/V as it enters attention, during the block.
    With `prenorm`, QK-norm models also report Q/K before the norm (kinds q_prenorm, k_prenorm)."""
    handles = []
    for layer in range(layout.num_layers):
        points = layout.capture_points(model, layer) + (layout.prenorm_points(model, layer) if prenorm else [])
        for module, split in points:
            def hook(_m, _inp, out, layer=layer, split=split):
                for kind, x in split(out[0] if isinstance(out, tuple) else out).items():
                    fn(layer, kind, x)
            handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _input_device(model) -> torch.device:
    # With accelerate offload the embedding may live on 'meta'; its hook moves inputs where they run.
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device


def accumulate_norms(model, layout, seqs: list[list[int]], *, batch_size: int, pad_id: int,
                     progress: bool = True) -> dict[tuple[int, str], torch.Tensor]:
    """Run the model over token sequences; return M[(layer, kind)] = sqrt(sum of squares) [heads, dim]
    for kind q/k/v (as attention reads them) and, in QK-norm models, q_prenorm/k_prenorm."""
    sums: dict[tuple[int, str], torch.Tensor] = {}
    current_mask: list[torch.Tensor] = []

    def add(layer, kind, x):
        mask = current_mask[0].to(x.device)
        s = sum_of_squares(x.detach(), mask).cpu()
        key = (layer, kind)
        sums[key] = sums[key] + s if key in sums else s

    # The decoder alone: Q/K/V statistics need no logits (saves the vocab projection).
    body = getattr(model, "base_model", model)
    device = _input_device(model)
    n_batches = (len(seqs) + batch_size - 1) // batch_size
    with torch.inference_mode(), qkv_hooks(model, layout, add, prenorm=True):
        for ids, mask in tqdm(D.batches(seqs, batch_size, pad_id), total=n_batches, desc="calibrate",
                              unit="batch", disable=not progress):
            current_mask[:] = [mask]
            body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    missing = [(i, k) for i in range(layout.num_layers) for k in ("q", "k", "v") if (i, k) not in sums]
    if missing:
        raise MvquantError(f"no activations were captured for {missing[:3]}...: the adapter for "
                           f"'{layout.model_type}' does not match this model's modules")
    return {key: s.sqrt().float() for key, s in sums.items()}


def max_positions(model) -> int | None:
    c = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(c, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_settings(*, samples: int, seq_len: int, batch_size: int, lam: float, top_k: int | None,
                   head_dim: int | None = None) -> None:
    """The settings that need no model (head_dim, when known, bounds --top-k): the CLI checks them
    before the model loads."""
    if samples <= 0:
        raise MvquantError(f"--samples must be positive, got {samples}")
    if seq_len <= 0:
        raise MvquantError(f"--seq-len must be positive, got {seq_len}")
    if batch_size <= 0:
        raise MvquantError(f"--batch-size must be positive, got {batch_size}")
    if not lam > 0:
        raise MvquantError(f"--lambda must be positive, got {lam}")
    if top_k is not None and not 0 < top_k <= (head_dim or top_k):
        raise MvquantError(f"--top-k must be in 1..{head_dim or 'head_dim'}, got {top_k}")


def calibrate(model, tokenizer, *, data: str = D.DEFAULT_SOURCE, texts: list[str] | None = None,
              samples: int = 32, seq_len: int = 512, batch_size: int = 4, lam: float = 5.0,
              top_k: int | None = None, seed: int = 0, pack: bool = True, progress: bool = True,
              model_name: str | None = None) -> CalibrationReport:
    """Find the massive Q/K dims of `model`. Returns a CalibrationReport (see report.py).

    `texts` overrides `data` (a source name or file). Selection: `top_k` per head if given, else
    M > lam x head mean.
    """
    layout = get_layout(model)
    check_settings(samples=samples, seq_len=seq_len, batch_size=batch_size, lam=lam, top_k=top_k,
                   head_dim=layout.head_dim)
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise MvquantError(f"--seq-len {seq_len} is beyond the model's {limit} positions: use --seq-len {limit} or less")
    source = "texts" if texts is not None else data
    seqs = D.token_windows(texts if texts is not None else D.load_texts(data), tokenizer,
                           samples=samples, seq_len=seq_len, seed=seed, pack=pack)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    t0 = time.perf_counter()
    norms = accumulate_norms(model, layout, seqs, batch_size=batch_size, pad_id=pad_id, progress=progress)
    info = {"source": source, "samples": len(seqs), "seq_len": seq_len, "tokens": sum(map(len, seqs)),
            "batch_size": batch_size, "seed": seed, "pack": pack, "seconds": round(time.perf_counter() - t0, 2)}
    name = model_name or getattr(model.config, "name_or_path", None) or layout.model_type
    return CalibrationReport.from_norms(norms, layout, model=str(name), lam=lam, top_k=top_k, calibration=info)
