"""Massive-value disruption (the paper's Table 1) as a transform over a loaded model.

At prefill, in every chosen layer and for every head, the selected Q and K dims are replaced by
their mean over the prompt's real tokens (the attention mask says which); V is untouched.

Choices, and why:
- Hook point: where Q/K enter attention *before RoPE* (`layout.capture_points`), so one hook works
  for every adapter (fused projections, per-head norms). The paper's code edits Q/K after RoPE. The
  massive dims sit in low-frequency RoPE pairs, which rotate by less than ~0.2 rad over the prompt
  lengths we use (theta_i = base^(-2i/R), i >= 22 of 32 here), so replacing them before or after
  RoPE gives nearly the same vectors; before RoPE the replaced value still carries position.
- Single dims, not whole RoPE pairs (default): the paper's code replaces exactly the selected dims
  (top-1 per head for Llama). `pairs=True` also replaces each dim's RoPE partner.
- Prefill only: a forward that starts a sequence (empty KV cache) with more than one token is
  disrupted; a forward that extends a cache (a decoding step, or a continuation scored on top of a
  cached prompt) is left alone, as in the paper's code (`if q_len != 1`). With an explicit
  `prompt_mask(...)` the caller says which tokens are the prompt instead.
- Dims are chosen once from calibration statistics (M = per-dim L2 norm over calibration tokens),
  not per prompt: 'massive' = top-k (or M > lambda x head mean), 'non-massive' = the same number
  of lowest-M dims per head.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from ..calibration.selection import DISRUPTIONS, disruption_dims
from ..errors import MvquantError
from ..models.adapters import get_layout

_UNSET = object()


def mean_replace_(x: torch.Tensor, dims: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """In place: x [batch, seq, heads, dim]; dims bool [heads, dim]; token_mask [batch, seq] (1 = prompt token).

    For each row, every selected (head, dim) at a prompt token becomes its mean over that row's
    prompt tokens. Other tokens (padding) and unselected dims are unchanged. Returns x.
    """
    if not bool(dims.any()):
        return x
    m = token_mask.to(device=x.device, dtype=torch.float32)
    sel = x[:, :, dims].float()                                  # [b, s, n_selected]
    mean = torch.einsum("bsn,bs->bn", sel, m) / m.sum(1).clamp_min(1.0)[:, None]
    replaced = torch.where(m.bool()[:, :, None], mean[:, None, :], sel)
    x[:, :, dims] = replaced.to(x.dtype)
    return x


def _dims_mask(sel: list[list[int]], head_dim: int) -> torch.Tensor:
    mask = torch.zeros(len(sel), head_dim, dtype=torch.bool)
    for h, dims in enumerate(sel):
        mask[h, dims] = True
    return mask


def _past_length(past) -> int:
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    try:  # legacy tuple cache: ((k, v), ...) with k [b, h, s, d]
        return int(past[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


class Disruption:
    """Forward hooks that mean-replace the selected Q/K dims at prefill. Use as a context manager,
    or `attach()` / `detach()`. `selection[(layer, kind)]` = dims per head (kind 'q' or 'k')."""

    def __init__(self, model, selection: dict[tuple[int, str], list[list[int]]], *, mode: str = "massive",
                 info: dict | None = None):
        self.model = model
        self.layout = get_layout(model)
        self.mode = mode
        self.selection = selection
        self.info = dict(info or {})
        d = self.layout.head_dim
        self._masks = {key: _dims_mask(sel, d) for key, sel in selection.items()}
        for (layer, kind), mask in self._masks.items():
            if kind not in ("q", "k"):
                raise MvquantError(f"disruption edits Q and K only, got kind '{kind}'")
            if mask.shape[0] != self.layout.heads(kind):
                raise MvquantError(f"layer {layer} {kind}: selection has {mask.shape[0]} heads, the model has "
                                   f"{self.layout.heads(kind)}: the calibration report is from another model")
        self._handles: list = []
        self._override = _UNSET      # set by prompt_mask()/paused(): a token mask, or None for "leave alone"
        self._current = None         # the token mask of the forward in progress (None: not a prefill)

    # -- the hooks ----------------------------------------------------------------------------------
    def _pre_forward(self, _module, args, kwargs):
        if self._override is not _UNSET:
            self._current = self._override
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            self._current = None
            return
        batch, seq = ids.shape[0], ids.shape[1]
        past = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("past_key_value")))
        if seq <= 1 or _past_length(past) > 0:
            self._current = None     # a decoding step: left alone
            return
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[-1] >= seq:
            self._current = mask[:, -seq:]
        else:
            self._current = torch.ones(batch, seq, dtype=torch.long, device=ids.device)

    def _edit(self, layer: int, split, output):
        if self._current is None:
            return
        views = split(output[0] if isinstance(output, tuple) else output)
        for kind in ("q", "k"):
            mask = self._masks.get((layer, kind))
            if mask is not None and kind in views:
                mean_replace_(views[kind], mask.to(views[kind].device), self._current)

    # -- lifecycle ----------------------------------------------------------------------------------
    def attach(self) -> "Disruption":
        if self._handles:
            return self
        base = getattr(self.model, "base_model", self.model)
        self._handles.append(base.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        for layer in sorted({layer for layer, _ in self._masks}):
            for module, split in self.layout.capture_points(self.model, layer):
                self._handles.append(module.register_forward_hook(
                    lambda _m, _i, out, layer=layer, split=split: self._edit(layer, split, out)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._current = None

    def __enter__(self) -> "Disruption":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @contextlib.contextmanager
    def prompt_mask(self, token_mask: torch.Tensor | None):
        """During the block, every forward treats `token_mask` [batch, seq] as the prompt tokens to
        average over and replace (None: disrupt nothing)."""
        old = self._override
        self._override = token_mask
        try:
            yield
        finally:
            self._override = old

    def paused(self):
        return self.prompt_mask(None)

    def summary(self) -> dict:
        counts = {kind: sum(len(d) for (layer, k), sel in self.selection.items() if k == kind for d in sel)
                  for kind in ("q", "k")}
        return {"mode": self.mode, "layers": sorted({layer for layer, _ in self.selection}),
                "dims_q": counts["q"], "dims_k": counts["k"], **self.info}


def disrupt(model, mode: str = "massive", *, report=None, tokenizer=None, top_k: int | None = None,
            lam: float | None = None, layers: list[int] | None = None, pairs: bool = False,
            calibration_samples: int = 8, calibration_seq_len: int = 256, progress: bool = False) -> Disruption:
    """Build (not yet attached) a Disruption of `model`: `with disrupt(model, 'massive', report=r): ...`.

    The dims come from `report` (a CalibrationReport or its path: its raw M statistics), or, with
    no report, from a quick calibration with `tokenizer` on the default offline text.
    """
    layout = get_layout(model)
    if mode not in DISRUPTIONS:
        raise MvquantError(f"unknown disruption '{mode}': use one of {', '.join(DISRUPTIONS)}")
    if not layout.has_rope:
        warnings.warn(f"disrupting '{layout.model_type}', a model without RoPE: the paper expects no "
                      "concentrated massive values here, so the selected dims are ordinary ones", stacklevel=2)
    source = "report"
    if report is None:
        if tokenizer is None:
            raise MvquantError("disruption needs a calibration report or a tokenizer for a quick calibration: "
                               "pass report=... (mvquant calibrate) or tokenizer=...")
        from ..calibration import calibrate
        report = calibrate(model, tokenizer, samples=calibration_samples, seq_len=calibration_seq_len,
                           batch_size=4, progress=progress)
        source = f"quick calibration ({calibration_samples} x {calibration_seq_len} tokens)"
    elif not hasattr(report, "norm"):
        from ..calibration import load_report
        source = str(report)
        report = load_report(report)
    report.check_matches(layout)
    norms = {(i, kind): report.norm(i, kind) for i in range(layout.num_layers) for kind in ("q", "k")}
    selection = disruption_dims(norms, mode, top_k=top_k, lam=lam, layers=layers, pairs=pairs, rope=layout.rope_info())
    info = {"selection": f"top-{top_k or 1} per head" if lam is None else f"M > {lam} x head mean",
            "pairs": pairs, "source": source}
    return Disruption(model, selection, mode=mode, info=info)
