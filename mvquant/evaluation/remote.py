"""Evaluate a model behind an OpenAI-compatible completions server (vLLM from `mvquant serve`).

lm-eval's `local-completions` does the work: log-likelihoods from `echo` + prompt logprobs, greedy
generation with temperature 0. Requests go as token ids (`tokenized_requests`), tokenized locally with
the served checkpoint's own tokenizer, so the server scores exactly the tokens the in-process scorer
scores. The served model is the protect-LoRA one ('protect') when the server has it, else its base."""
from __future__ import annotations

import json
import urllib.request

from ..errors import MvquantError


def is_url(x) -> bool:
    return isinstance(x, str) and x.startswith(("http://", "https://"))


def served_models(url: str) -> list[dict]:
    base = url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/models", timeout=10) as r:
            return json.loads(r.read())["data"]
    except (OSError, ValueError, KeyError) as e:
        raise MvquantError(f"no OpenAI-compatible server answers at {base}/models ({e}): start one with "
                           "mvquant serve OUT, and give its URL ending in /v1") from None


def pick_model(models: list[dict], name: str | None = None) -> tuple[str, str | None]:
    """(model name to request, tokenizer path): `name` if given, else the LoRA 'protect' if served,
    else the first. The tokenizer is the base model's root (the exported directory) when local."""
    names = [m["id"] for m in models]
    if name is not None and name not in names:
        raise MvquantError(f"the server has no model '{name}': it serves {', '.join(names)}")
    chosen = name or ("protect" if "protect" in names else names[0])
    roots = {m["id"]: m.get("root") for m in models}
    parent = next((m.get("parent") for m in models if m["id"] == chosen), None)
    root = roots.get(parent) if parent else roots.get(chosen)
    return chosen, root


def remote_lm(url: str, *, model: str | None = None, tokenizer: str | None = None, max_length: int = 2048,
              concurrent: int = 4):
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    try:
        import aiohttp  # noqa: F401
        import tenacity  # noqa: F401
    except ImportError:
        raise MvquantError("evaluating a server needs lm-eval's API extras: pip install -c scripts/constraints.txt "
                           "'lm-eval[api]' (or bash scripts/setup.sh)") from None

    models = served_models(url)
    name, root = pick_model(models, model)
    has_lora = any(m.get("parent") for m in models)
    tok = tokenizer or root
    if not tok:
        raise MvquantError("the server does not say where its tokenizer is: pass --tokenizer DIR (the exported directory)")

    class RemoteLM(LocalCompletionsAPI):
        disruption = None
        model_name = f"{url} ({name})"
        server_has_lora = has_lora

        def close(self) -> None:
            pass

    return RemoteLM(base_url=url.rstrip("/") + "/completions", model=name, tokenizer=tok,
                    tokenizer_backend="huggingface", tokenized_requests=True, max_length=max_length,
                    num_concurrent=concurrent, max_retries=3, timeout=600)
