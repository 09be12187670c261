"""The lm-eval model `mvquant`: HFLM over a model loaded by mvquant (built-in alias, directory, GGUF,
hub id or mvquant checkpoint), with optional massive-value disruption and the prefix-sharing scorer.

    lm_eval --model mvquant --model_args pretrained=smollm2-135m,disrupt=massive,top_k=1 ...

(the model is registered when this module is imported; `python -m mvquant.evaluation.lm_eval_cli`
does that and adds the bundled tasks to the include path before running lm-eval's own CLI).
"""
from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..errors import MvquantError
from ..loading import load_model
from .disruption import disrupt as make_disruption
from .scoring import score_continuations


def parse_layers(layers) -> list[int] | None:
    """None, a list of ints, or a string like '0,3,5-9' (lm-eval model_args cannot carry lists)."""
    if layers is None or isinstance(layers, (list, tuple)):
        return None if layers is None else [int(x) for x in layers]
    if isinstance(layers, int):
        return [layers]
    out = []
    try:
        for part in str(layers).replace(";", ",").split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                a, b = part.split("-", 1)
                out += list(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise MvquantError(f"--layers '{layers}' is not a list of layer indices: use e.g. 0,1,2 or 0-9") from None
    return out


def _none(x):
    return None if x in (None, "", "none", "None") else x


@register_model("mvquant")
class MvquantLM(HFLM):
    def __init__(self, pretrained: str | None = "smollm2-135m", *, disrupt: str | None = None,
                 top_k: int | None = None, lam: float | None = None, layers=None, report=None,
                 pairs: bool = False, dtype: str = "float32", max_tokens: int = 2048, progress: bool = True,
                 model=None, tokenizer=None, kv_bits=None, kv_protect: str = "massive", kv_group_size=32,
                 kv_residual=32, kv_sink=0, kv_axis: str = "channel", kv_seed=0,
                 kv_backend: str = "mvquant", **kwargs):
        if model is None:
            model, tokenizer = load_model(pretrained, dtype=dtype)
        elif tokenizer is None:
            raise MvquantError("an already-loaded model needs its tokenizer too: pass tokenizer=...")
        for key in ("device", "batch_size", "max_batch_size", "backend"):  # meaningless for a loaded model
            kwargs.pop(key, None)
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=1, **kwargs)
        self.model_name = str(pretrained or getattr(model.config, "name_or_path", "model"))
        self.max_tokens = int(max_tokens)
        self.progress = progress
        self.disruption = None
        mode = _none(disrupt)
        if mode is not None:
            self.disruption = make_disruption(
                model, mode, report=_none(report), tokenizer=tokenizer,
                top_k=None if _none(top_k) is None else int(top_k), lam=None if _none(lam) is None else float(lam),
                layers=parse_layers(_none(layers)), pairs=str(pairs).lower() in ("1", "true", "yes"),
                progress=progress).attach()
        self.kv_cache = None    # a factory of quantized KV caches (mvquant.kvcache), one per batch
        if _none(kv_bits) is not None:
            from ..kvcache import KVCacheFactory, KVConfig
            ints = {}
            for name, value in (("bits", kv_bits), ("group-size", kv_group_size), ("residual", kv_residual),
                                ("sink", kv_sink), ("seed", kv_seed)):
                try:
                    ints[name] = int(value)
                except (TypeError, ValueError):
                    raise MvquantError(f"--kv-{name} must be an integer, got '{value}'") from None
            config = KVConfig(bits=ints["bits"], protect=str(kv_protect), group_size=ints["group-size"],
                              residual=ints["residual"], sink=ints["sink"], axis=str(kv_axis), seed=ints["seed"],
                              backend=str(kv_backend))
            self.kv_cache = KVCacheFactory(model, _none(report), config)

    def close(self) -> None:
        """Remove the disruption hooks (the model may be shared with the caller)."""
        if self.disruption is not None:
            self.disruption.detach()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        results = score_continuations(
            self.model, [(ctx, cont) for _, ctx, cont in requests], pad_id=pad, disruption=self.disruption,
            max_length=self.max_length, max_tokens=self.max_tokens, progress=self.progress and not disable_tqdm,
            cache_factory=self.kv_cache)
        for (request_str, _, _), answer in zip(requests, results):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return results

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        """Generation reads the same quantized KV cache as scoring."""
        if self.kv_cache is not None:
            cache = self.kv_cache()
            cache.set_attention_mask(generation_kwargs.get("attention_mask"))
            generation_kwargs["past_key_values"] = cache
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def get_model_info(self) -> dict:
        info = {"model": self.model_name, "model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                "model_dtype": str(next(self._model.parameters()).dtype)}
        if self.disruption is not None:
            info["disruption"] = self.disruption.summary()
        if self.kv_cache is not None:
            info["kv_cache"] = self.kv_cache.summary()
        return info

    @property
    def device(self):
        return torch.device(self._model.get_input_embeddings().weight.device)
