"""Evaluate a model behind an OpenAI-compatible completions server (vLLM from `mvquant serve`).

lm-eval's `local-completions` does the work: log-likelihoods from `echo` + prompt logprobs, greedy
generation with temperature 0. Requests go as token ids (`tokenized_requests`), tokenized locally with
the served checkpoint's own tokenizer, so the server scores exactly the tokens the in-process scorer
scores. The served model is the protect-LoRA one ('protect') when the server has it, else its base."""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import MvquantError

START = "start one with mvquant serve OUT, and give its URL ending in /v1 (e.g. http://127.0.0.1:8000/v1)"


def is_url(x) -> bool:
    return isinstance(x, str) and x.startswith(("http://", "https://"))


def check_url(url: str) -> str:
    """The base URL without a trailing slash; a URL urllib cannot send (a space, no host) is refused."""
    parts = urllib.parse.urlsplit(url)
    if any(c.isspace() for c in url) or not parts.hostname:
        raise MvquantError(f"'{url}' is not a valid server URL (no spaces, a host and a port): give e.g. "
                           "http://127.0.0.1:8000/v1")
    try:
        parts.port
    except ValueError as e:
        raise MvquantError(f"'{url}' is not a valid server URL ({e}): give e.g. http://127.0.0.1:8000/v1") from None
    return url.rstrip("/")


def _http(method: str, url: str, body: dict | None = None, timeout: float = 10):
    """(status, parsed JSON or None) of one request; no answer at all is an MvquantError."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, None
    except (OSError, ValueError) as e:   # refused, unreachable, timed out, InvalidURL
        raise MvquantError(f"no OpenAI-compatible server answers at {url} ({e}): {START}") from None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def served_models(url: str) -> list[dict]:
    """The server's model list (GET /models), checked: a non-empty list of objects with a string id."""
    base = check_url(url)
    status, body = _http("GET", f"{base}/models")
    if status != 200 or not isinstance(body, dict):
        raise MvquantError(f"no OpenAI-compatible server answers at {base}/models (HTTP {status}"
                           f"{'' if status != 200 else ', not a JSON object'}): {START}")
    models = body.get("data")
    if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in models):
        raise MvquantError(f"{base}/models is not an OpenAI model list ('data' must be a list of objects with an "
                           f"'id'): point the URL at an OpenAI-compatible server; {START}")
    if not models:
        raise MvquantError(f"the server at {base} serves no model ({base}/models lists none): restart it with a "
                           "model, e.g. mvquant serve OUT")
    return models


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


def check_tokenizer(tokenizer: str | None, root: str | None):
    """The tokenizer requests are encoded with: --tokenizer, else the served model's root when that is
    a directory here (a server on another host names a path of its own machine)."""
    from transformers import AutoTokenizer

    if tokenizer is None:
        if not root:
            raise MvquantError("the server does not say where its tokenizer is: pass --tokenizer DIR (the exported "
                               "directory)")
        if not Path(root).is_dir():
            raise MvquantError(f"the server's model root '{root}' is not a directory on this machine (a server on "
                               "another host?): pass --tokenizer DIR, a copy of the exported directory")
        tokenizer, flag = root, "the server's model root"
    else:
        flag = "--tokenizer"
        if not Path(tokenizer).is_dir():
            raise MvquantError(f"--tokenizer '{tokenizer}' is not a directory: pass the exported directory "
                               "(mvquant export --output)")
    try:
        AutoTokenizer.from_pretrained(tokenizer)
    except Exception as e:  # transformers raises OSError, ValueError, TypeError... for a directory without one
        raise MvquantError(f"{flag} '{tokenizer}' holds no tokenizer transformers can load "
                           f"({type(e).__name__}): pass the exported directory (mvquant export --output)") from None
    return tokenizer


def check_completions(url: str, model: str) -> None:
    """One tiny completion before lm-eval starts: a server that lists models but cannot complete
    (HTTP 501, an error page) would otherwise fail every request with retries and tracebacks."""
    base = check_url(url)
    status, body = _http("POST", f"{base}/completions",
                         {"model": model, "prompt": [1, 2, 3], "max_tokens": 1, "temperature": 0}, timeout=600)
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("choices"), list) or not body["choices"]:
        raise MvquantError(f"the server at {base} lists models but does not answer completions (POST "
                           f"{base}/completions: HTTP {status}{'' if status != 200 else ', no choices'}): evaluate "
                           "an OpenAI-compatible completions server (vLLM: mvquant serve OUT)")


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
    tok = check_tokenizer(tokenizer, root)
    check_completions(url, name)

    class RemoteLM(LocalCompletionsAPI):
        disruption = None
        model_name = f"{url} ({name})"
        server_has_lora = has_lora

        def close(self) -> None:
            pass

    return RemoteLM(base_url=url.rstrip("/") + "/completions", model=name, tokenizer=tok,
                    tokenizer_backend="huggingface", tokenized_requests=True, max_length=max_length,
                    num_concurrent=concurrent, max_retries=3, timeout=600)
