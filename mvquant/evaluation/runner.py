"""`evaluate()`: run bundled and lm-eval tasks through lm-eval's Python API, one task at a time
(so each gets its wall time), and summarise accuracy with uncertainty per task and per group."""
from __future__ import annotations

import logging
import math
import os
import time

from tqdm.auto import tqdm

from ..errors import MvquantError
from . import stats as S
from . import tasks as T

FORMAT = "mvquant.eval/1"


def check_limit(limit):
    if limit is None:
        return None
    try:
        value = float(limit)
    except (TypeError, ValueError):
        raise MvquantError(f"--limit must be a positive number of items, got '{limit}'") from None
    if value <= 0 or math.isnan(value):
        raise MvquantError(f"--limit must be positive, got {limit}: leave it out to run every item")
    if math.isinf(value):
        raise MvquantError(f"--limit {limit} is not a number of items: leave --limit out to run every item")
    if value >= 1 and value != int(value):
        raise MvquantError(f"--limit {limit}: give a whole number of items (or a fraction below 1)")
    return int(value) if value >= 1 else value


def _quiet_lm_eval():
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _task_result(name: str, out: dict, info: dict | None) -> dict:
    samples = out.get("samples", {}).get(name, [])
    metrics = out["results"].get(name, {})
    if info is not None or "acc,none" in metrics:
        correct = [float(s["acc"]) for s in samples if "acc" in s]
        if not correct:
            raise MvquantError(f"task '{name}' produced no scored items")
        acc, se = S.mean_stderr(correct)
        lo, hi = S.wilson_interval(sum(correct), len(correct))
        res = {"acc": acc, "stderr": se, "ci95": [lo, hi], "n": len(correct),
               "chance": None if info is None else info["chance"],
               "group": None if info is None else info["group"], "correct": [int(c) for c in correct]}
    else:  # an lm-eval task with other metrics: keep them as lm-eval reports them
        res = {"metrics": {k: v for k, v in metrics.items() if k != "alias" and isinstance(v, (int, float))},
               "n": len(samples), "chance": None, "group": None}
        main = next((k for k in res["metrics"] if not k.split(",")[0].endswith("_stderr")), None)
        if main is not None:
            res["acc"] = res["metrics"][main]
            se = res["metrics"].get(main.replace(",", "_stderr,", 1))
            res["stderr"] = se if isinstance(se, (int, float)) else None
            res["metric"] = main
    return res


def summarise_groups(task_results: dict[str, dict]) -> dict[str, dict]:
    """Per group, the unweighted mean over its tasks, leaving out tasks marked `excluded` (near chance
    at full precision on this model: T.NEAR_CHANCE_AT_FULL_PRECISION)."""
    groups = {}
    for group in T.GROUPS:
        members = [(n, r) for n, r in task_results.items() if r.get("group") == group and not r.get("excluded")]
        left_out = [n for n, r in task_results.items() if r.get("group") == group and r.get("excluded")]
        if members:
            acc, se = S.macro_average([r["acc"] for _, r in members], [r["stderr"] for _, r in members])
            chance = sum(r["chance"] for _, r in members) / len(members)
            groups[group] = {"acc": acc, "stderr": se, "chance": chance, "tasks": [n for n, _ in members],
                             "n": sum(r["n"] for _, r in members)}
            if left_out:
                groups[group]["excluded"] = left_out
    return groups


def base_model_name(model_or_path) -> str | None:
    """The built-in model `model_or_path` is or was quantized from (an mvquant checkpoint records its
    calibration report's model), or None."""
    from pathlib import Path

    from ..models.builtin import BUILTIN_ALIASES, builtin_spec

    name = "smollm2-135m" if model_or_path is None else str(model_or_path)
    if name.lower() in BUILTIN_ALIASES:
        return builtin_spec(name).name
    config = Path(name) / "config.json"
    if "://" not in name and config.is_file():
        try:
            import json
            source = (json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}).get("report_model")
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(source, str) and source.lower() in BUILTIN_ALIASES:
            return builtin_spec(source).name
    return None


def evaluate(model_or_path=None, tasks="contextual,parametric", *, limit=None, disrupt=None, top_k=None,
             lam=None, layers=None, pairs: bool = False, report=None, max_tokens: int = 2048,
             progress: bool = True, model=None, tokenizer=None, dtype: str = "float32",
             include_path=None, served_model: str | None = None, kv=None, engine: str = "transformers",
             lora="auto") -> dict:
    """Evaluate a model on bundled tasks (names, or the groups 'contextual' / 'parametric') and any
    lm-eval task. Returns {'tasks': {name: {acc, stderr, ci95, n, chance, seconds, ...}},
    'groups': {contextual: {acc, stderr}, parametric: {...}}, 'model', 'disruption', 'limit', ...}.

    `model`/`tokenizer`: an already-loaded model (then `model_or_path` only names it).
    `disrupt`: 'massive' | 'non-massive' | None, with `top_k` or `lam`, `layers`, `pairs`, and
    `report` (CalibrationReport or path; without one a quick calibration picks the dims).
    `model_or_path` may be a server URL (http://127.0.0.1:8000/v1): `served_model` picks the served
    name (default: the protect-LoRA if served), `tokenizer` a tokenizer path if the server names none.
    `kv`: quantize the KV cache (a mvquant.KVConfig or a dict of its fields); protect='massive' or
    'random' take the K channels from `report`.
    `engine`: 'llamacpp' scores `model_or_path` (a .gguf) in llama.cpp (evaluation/llamacpp.py), with the
    adapter `lora` ('auto': MODEL.protect.gguf when present; None or 'none': the bare base).
    """
    limit = check_limit(limit)
    ours, other = T.resolve_tasks(tasks)
    _quiet_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .lm import MvquantLM

    paths = [str(T.tasks_dir())] + ([str(include_path)] if include_path else [])
    manager = TaskManager(include_path=paths, include_defaults=bool(other or include_path))
    if other:
        T.check_external_tasks(other, manager)
    from .remote import is_url, remote_lm
    if engine == "llamacpp":
        if disrupt is not None or kv is not None:
            raise MvquantError("--disrupt and --kv-bits act inside mvquant's model: evaluate the checkpoint in "
                               "process, not a GGUF in llama.cpp")
        from .llamacpp import llamacpp_lm
        lm = llamacpp_lm(model_or_path, lora=lora, tokenizer=tokenizer if isinstance(tokenizer, str) else None,
                         progress=progress)
        name = lm.model_name
    elif engine != "transformers":
        raise MvquantError(f"unknown --engine '{engine}': use transformers or llamacpp")
    elif is_url(model_or_path):   # an OpenAI-compatible server (mvquant serve): lm-eval's local-completions
        if disrupt is not None:
            raise MvquantError("--disrupt edits activations inside the model: evaluate a model or checkpoint "
                               "in this process, not a server URL")
        if kv is not None:
            raise MvquantError("--kv-bits quantizes the KV cache inside the model: evaluate a model or checkpoint "
                               "in this process, not a server URL")
        lm = remote_lm(model_or_path, model=served_model, tokenizer=tokenizer if isinstance(tokenizer, str) else None)
        if lm.server_has_lora:
            raise MvquantError("vLLM (0.32, CPU) crashes computing prompt log-probabilities on a LoRA-enabled server "
                               "(vllm-project/vllm#29955, #16668), and every bundled task is scored from them: serve "
                               "with --no-lora to evaluate the bare base, or evaluate the export in process with "
                               "transformers + peft (benchmarks/bench_serve.py measures the served LoRA by greedy passkey)")
        name = lm.model_name
    else:
        if model is None:
            from ..loading import load_model
            model, tokenizer = load_model(model_or_path, dtype=dtype)
        name = str(model_or_path or getattr(model.config, "name_or_path", None) or "model")
        kv_args = {}
        if kv is not None:
            from ..kvcache import KVConfig
            kv = kv.to_dict() if hasattr(kv, "to_dict") else dict(kv)
            unknown = sorted(set(kv) - set(KVConfig.__dataclass_fields__))
            if unknown:
                raise MvquantError(f"unknown KV-cache setting(s) {', '.join(unknown)}: use "
                                   f"{', '.join(KVConfig.__dataclass_fields__)}")
            kv_args = {f"kv_{k}": v for k, v in kv.items()}
            if kv_args.get("kv_bits") is None:
                raise MvquantError("KV-cache settings without bits: give --kv-bits 2, 3, 4 or 8")
        lm = MvquantLM(name, model=model, tokenizer=tokenizer, disrupt=disrupt, top_k=top_k, lam=lam, layers=layers,
                       report=report, pairs=pairs, max_tokens=max_tokens, progress=progress, **kv_args)
    suite = T.suite()
    excluded = T.excluded_tasks(base_model_name(model_or_path if model_or_path is not None or model is None
                                                else getattr(model.config, "name_or_path", None)))
    results, t_start = {}, time.perf_counter()
    import lm_eval.evaluator as lm_evaluator
    add_env_info, git_hash = lm_evaluator.add_env_info, lm_evaluator.get_git_commit_hash
    lm_evaluator.add_env_info = lambda _results: None   # it runs `pip`/`nvidia-smi` probes: ~1.3 s per task
    # it runs `git describe` in the working directory: "fatal: not a git repository" on stderr, and
    # the hash of whatever repository the user happens to be in is not a fact about the evaluation
    lm_evaluator.get_git_commit_hash = lambda: None
    try:
        bar = tqdm(ours + other, desc="eval", unit="task", disable=not progress)
        for task in bar:
            bar.set_postfix_str(task)
            t0 = time.perf_counter()
            out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=True,
                                  bootstrap_iters=0, verbosity="ERROR")
            if out is None or task not in out.get("results", {}):
                raise MvquantError(f"lm-eval returned no result for '{task}'")
            res = _task_result(task, out, suite.get(task))
            res["seconds"] = round(time.perf_counter() - t0, 2)
            if "ci95" in res:
                res["near_chance"] = T.near_chance(res["ci95"][0], res.get("chance"))
            if task in excluded:
                res["excluded"] = excluded[task]
            results[task] = res
    finally:
        lm_evaluator.add_env_info, lm_evaluator.get_git_commit_hash = add_env_info, git_hash
        lm.close()
    import lm_eval
    return {
        "format": FORMAT, "model": name, "tasks": results, "groups": summarise_groups(results),
        "disruption": None if lm.disruption is None else lm.disruption.summary(),
        "kv_cache": None if getattr(lm, "kv_cache", None) is None else lm.kv_cache.summary(),
        "limit": limit, "seconds": round(time.perf_counter() - t_start, 2), "lm_eval_version": lm_eval.__version__,
        "excluded_from_groups": {t: why for t, why in excluded.items() if t in results},
    }


def to_markdown(result: dict) -> str:
    """A Markdown table: one row per task, then one per group."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    lines = ["| task | group | acc (%) | ± se | 95% CI | chance | n | s |", "|---|---|---:|---:|---|---:|---:|---:|"]
    for name, r in result["tasks"].items():
        ci = r.get("ci95")
        group = (r.get("group") or "-") + (" (near chance at fp: not in the mean)" if r.get("excluded") else "")
        lines.append(f"| {name} | {group} | {pct(r.get('acc'))} | {pct(r.get('stderr'))} | "
                     f"{'-' if not ci else f'{pct(ci[0])}–{pct(ci[1])}'} | {pct(r.get('chance'))} | {r['n']} | "
                     f"{r.get('seconds', '-')} |")
    for group, g in result["groups"].items():
        lines.append(f"| **{group}** (mean of {len(g['tasks'])}) | | **{pct(g['acc'])}** | {pct(g['stderr'])} | | "
                     f"{pct(g['chance'])} | {g['n']} | |")
    return "\n".join(lines)
