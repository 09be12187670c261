"""A transformers Cache that stores K and V quantized and keeps the massive K channels exact.

Per layer the sequence is: [quantized blocks | full-precision residual window]. New tokens enter
the residual; once it holds more than `residual` tokens the oldest ones are quantized as one block
(for per-channel keys, a whole number of `group_size`-token groups, as KIVI does). Blocks are never
re-quantized. Kept exact besides the residual: the protected K channels of each KV head (their
values are stored aside and written back after dequantization), the first `sink` real tokens of
each row (attention sinks), and nothing is computed from padding (left padding of a batch is
excluded from every group's range when the caller gives the attention mask).

Every attention read returns what the cache holds, the prompt's own attention at prefill included
(simulated quantization, as in KVQuant's evaluation): a cache that kept the prompt exact at
prefill would leave the first answer token untouched, and our tasks' answers sit in the prompt.

K is quantized after RoPE, as the HF cache stores it. The massive channels sit in the lowest RoPE
frequencies and barely rotate over these prompts, and a pair's norm is rotation-invariant, so the
pairs chosen on pre-RoPE statistics are the right ones after RoPE too.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import QuantizedCache, QuantizedLayer

from . import rotation as R
from ..quantization.core import dequantize_groups, quantize_groups

ROTATED = ("turboquant", "rht")   # key layouts that rotate each (token, head) vector (rotation.py)


class MassiveKVLayer(QuantizedLayer):
    """One layer's quantized K/V with exact protected K channels, sinks and a residual window."""

    def __init__(self, bits: int = 2, axis_key: str = "channel", group_size: int = 32, residual: int = 32,
                 sink: int = 0, protected: list[list[int]] | None = None, head_dim: int | None = None):
        super().__init__(nbits=bits, q_group_size=group_size, residual_length=residual)
        # "channel": groups of tokens per channel (KIVI); "token": groups of channels per token;
        # "turboquant" / "rht": vLLM's rotated per-(token, head) schemes for K and V (rotation.py)
        self.key_axis = axis_key
        self.sink = int(sink)
        self.protected = [list(h) for h in (protected or [])]
        self.head_dim = head_dim
        self._reset_state()

    def _reset_state(self):
        self.blocks: list[dict] = []
        self.n_quant = 0
        self.exact_tok = None             # [B, L] bool: padding or sink, excluded from group ranges
        self.sink_idx = self.sink_k = self.sink_v = None
        self.pidx = None                  # flat (head * head_dim + dim) indices of protected K channels

    def reset(self) -> None:
        super().reset()
        self._reset_state()

    # -- quantization of one block ---------------------------------------------------------------
    def _quantize(self, tensor: torch.Tensor, axis: int):
        """QuantizedLayer's hook: groups along `axis` of a [B, H, T, D] tensor."""
        return (*quantize_groups(tensor, self.nbits, dim=axis, group_size=self.q_group_size), axis)

    def _dequantize(self, q_tensor) -> torch.Tensor:
        codes, scale, minimum, axis = q_tensor
        return dequantize_groups(codes, scale, minimum, dim=axis, group_size=self.q_group_size)

    def _protected_index(self, heads: int, head_dim: int, device) -> torch.Tensor:
        if self.protected and len(self.protected) != heads:
            raise ValueError(f"protected channels given for {len(self.protected)} KV heads, the layer has {heads}")
        flat = [h * head_dim + d for h, dims in enumerate(self.protected) for d in dims]
        return torch.tensor(sorted(flat), dtype=torch.long, device=device)

    def _quantize_block(self, k: torch.Tensor, v: torch.Tensor, exact_tok: torch.Tensor) -> dict:
        b, h, n, d = k.shape
        g, bits = self.q_group_size, self.nbits
        pmask = torch.zeros(h * d, dtype=torch.bool, device=k.device)
        pmask[self.pidx] = True
        pmask = pmask.view(1, h, 1, d)
        if self.key_axis == "turboquant":   # protected channels stay out of the norm and the rotation
            kq, vq = R.turbo_quantize(k, bits, exclude=pmask), R.head_quantize(v, bits)
        elif self.key_axis == "rht":
            kq, vq = R.rht_quantize(k, bits, exclude=pmask), R.rht_quantize(v, bits)
        elif self.key_axis == "channel":   # groups run along tokens; padding/sinks must not set the range
            kq = quantize_groups(k, bits, dim=2, group_size=g, exclude=exact_tok[:, None, :, None])
        else:                            # groups run along channels; protected channels must not set it
            kq = quantize_groups(k, bits, dim=3, group_size=g, exclude=pmask)
        if self.key_axis not in ROTATED:
            vq = quantize_groups(v, bits, dim=3, group_size=g)
        kp = k.transpose(1, 2).reshape(b, n, h * d)[..., self.pidx].clone()   # exact protected K values
        return {"k": kq, "v": vq, "kp": kp, "n": n}

    def _dequantize_block(self, blk: dict, shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, _, d = shape
        n, g = blk["n"], self.q_group_size
        if self.key_axis == "turboquant":
            k = R.turbo_dequantize(*blk["k"], self.nbits, dtype=dtype)
            v = R.head_dequantize(*blk["v"], dtype=dtype)
        elif self.key_axis == "rht":
            k, v = R.rht_dequantize(*blk["k"], dtype=dtype), R.rht_dequantize(*blk["v"], dtype=dtype)
        else:
            kdim = 2 if self.key_axis == "channel" else 3
            k = dequantize_groups(*blk["k"], dim=kdim, group_size=g, dtype=dtype)
            v = dequantize_groups(*blk["v"], dim=3, group_size=g, dtype=dtype)
        if self.pidx.numel():
            flat = k.transpose(1, 2).reshape(b, n, h * d)
            flat[..., self.pidx] = blk["kp"]
            k = flat.view(b, n, h, d).transpose(1, 2)
        return k, v

    # -- the Cache protocol ------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, valid: torch.Tensor | None = None,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, t, d = key_states.shape
        if valid is None:
            valid = torch.ones(b, t, dtype=torch.bool, device=key_states.device)
        first = not self.is_initialized
        if first:
            self.lazy_initialization(key_states, value_states)
            self.pidx = self._protected_index(h, d, key_states.device)
            self.exact_tok = torch.zeros(b, 0, dtype=torch.bool, device=key_states.device)
            self.keys = key_states[:, :, :0]
            self.values = value_states[:, :, :0]
        self.cumulative_length += t
        exact_new = ~valid.to(torch.bool)
        if first and self.sink:          # the first `sink` real tokens of each row, wherever padding ends
            s = min(self.sink, t)
            start = (~valid).long().sum(-1, keepdim=True)
            self.sink_idx = (start + torch.arange(s, device=key_states.device)).clamp_max(t - 1)
            exact_new = exact_new.clone()
            exact_new.scatter_(1, self.sink_idx, True)
            ix = self.sink_idx[:, None, :, None].expand(b, h, s, d)
            self.sink_k, self.sink_v = key_states.gather(2, ix), value_states.gather(2, ix)
        self.exact_tok = torch.cat([self.exact_tok, exact_new], dim=1)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)

        n_flush = self.keys.shape[-2] - self.residual_length
        if self.key_axis == "channel":
            n_flush = n_flush // self.q_group_size * self.q_group_size
        if n_flush > 0:
            cols = slice(self.n_quant, self.n_quant + n_flush)
            self.blocks.append(self._quantize_block(self.keys[:, :, :n_flush], self.values[:, :, :n_flush],
                                                    self.exact_tok[:, cols]))
            self.n_quant += n_flush
            self.keys = self.keys[:, :, n_flush:].contiguous()
            self.values = self.values[:, :, n_flush:].contiguous()
        return self._read()

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole layer as attention sees it: dequantized blocks, residual, exact sinks."""
        ks, vs = [], []
        for blk in self.blocks:
            k, v = self._dequantize_block(blk, self.keys.shape, self.keys.dtype)
            ks.append(k)
            vs.append(v)
        k = torch.cat(ks + [self.keys], dim=-2)
        v = torch.cat(vs + [self.values], dim=-2)
        if self.sink_idx is not None and self.blocks:
            b, h, _, d = k.shape
            ix = self.sink_idx[:, None, :, None].expand(b, h, self.sink_idx.shape[1], d)
            k, v = k.scatter(2, ix, self.sink_k), v.scatter(2, ix, self.sink_v)
        return k, v

    # -- batch edits (the scorer expands one prompt to its choices; beam search reorders) ---------
    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values, self.exact_tok = fn(self.keys), fn(self.values), fn(self.exact_tok)
        if self.sink_idx is not None:
            self.sink_idx, self.sink_k, self.sink_v = fn(self.sink_idx), fn(self.sink_k), fn(self.sink_v)
        for blk in self.blocks:
            blk["k"] = tuple(fn(x) for x in blk["k"])
            blk["v"] = tuple(fn(x) for x in blk["v"])
            blk["kp"] = fn(blk["kp"])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda x: x[indices.to(x.device)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda x: x.repeat_interleave(repeats, dim=0))

    # -- accounting ------------------------------------------------------------------------------
    def stored_tokens(self) -> dict:
        return {"quantized": self.n_quant, "residual": int(self.keys.shape[-2]) if self.is_initialized else 0,
                "protected_k_channels": int(self.pidx.numel()) if self.pidx is not None else 0}


class MassiveKVCache(QuantizedCache):
    """The model's cache: one MassiveKVLayer per decoder layer (full-attention layers only).

    `set_attention_mask(mask)` (optional, [batch, tokens so far + new]) tells the layers which
    columns are padding, so padding never sets a quantization range and sinks are real tokens."""

    def __init__(self, num_layers: int, protected: list[list[list[int]]] | None = None, *, bits: int = 2,
                 axis_key: str = "channel", group_size: int = 32, residual: int = 32, sink: int = 0,
                 exact_layers: tuple[int, ...] = (), settings: dict | None = None):
        protected = protected or [[] for _ in range(num_layers)]
        # exact_layers (TurboQuant's boundary layers): every token stays in the full-precision window
        layers = [MassiveKVLayer(bits, axis_key, group_size, 2 ** 62 if i in exact_layers else residual, sink,
                                 protected[i]) for i in range(num_layers)]
        super(QuantizedCache, self).__init__(layers=layers)   # Cache.__init__: QuantizedCache's wants a backend
        self.settings = settings or {}
        self._mask = None

    def set_attention_mask(self, mask: torch.Tensor | None) -> None:
        self._mask = None if mask is None else mask.to(torch.bool)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        t = key_states.shape[-2]
        past = self.layers[layer_idx].get_seq_length()
        valid = None
        if self._mask is not None and self._mask.shape[0] == key_states.shape[0] and self._mask.shape[1] >= past + t:
            valid = self._mask[:, past:past + t].to(key_states.device)
        return self.layers[layer_idx].update(key_states, value_states, valid=valid)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self._mask is not None:
            self._mask = self._mask[indices.to(self._mask.device)]
