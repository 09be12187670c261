"""The bundled task suite: where its lm-eval YAMLs live and what each task is (group, chance)."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import yaml

from ..errors import MvquantError

GROUPS = ("contextual", "parametric")
# what users may type in --tasks for a whole group
ALIASES = {"contextual": "contextual", "mvquant_contextual": "contextual",
           "parametric": "parametric", "mvquant_parametric": "parametric"}
SUITE_ALIASES = ("all", "mvquant", "mvquant_suite")


# Per model, the bundled tasks it does near chance at full precision (the rule: `near_chance`, on a
# full-precision `mvquant eval MODEL --tasks all` run). They stay in every result with their accuracy
# and chance level but are left out of that model's group means: a task the model cannot do at full
# precision says nothing about what quantization keeps. They are reported, not tuned until they pass.
# Measured: evals/results/<model>/tasks.md. Keys are built-in model names (checkpoints quantized from
# one inherit its entry through their calibration report's model).
NEAR_CHANCE_AT_FULL_PRECISION: dict[str, dict[str, str]] = {
    # a base model: after "What is the pass key? The pass key is" it defines the word ("the number that
    # is used to unlock the door...") instead of copying the key; at 256/512 tokens it copies (62%/100%)
    "gemma3-270m": {"passkey_128": "0/40 at full precision (95% CI 0-8.8%), chance 0%"},
}
NEAR_CHANCE_MARGIN = 0.05


def near_chance(ci95_low: float, chance: float | None, margin: float = NEAR_CHANCE_MARGIN) -> bool:
    """Not clearly above chance: the 95% interval's lower end is within `margin` of the chance level."""
    return chance is not None and ci95_low <= chance + margin


def excluded_tasks(model_name: str | None) -> dict[str, str]:
    """task -> why it is left out of `model_name`'s group means (empty for models without an entry)."""
    return dict(NEAR_CHANCE_AT_FULL_PRECISION.get(str(model_name or "").lower(), {}))


def evals_dir() -> Path:
    """The repository's evals/ folder (override with MVQUANT_EVALS_DIR)."""
    env = os.environ.get("MVQUANT_EVALS_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "evals"
    if not (path / "tasks").is_dir():
        raise MvquantError(f"task folder '{path / 'tasks'}' not found: run from an mvquant checkout "
                           "or set MVQUANT_EVALS_DIR to its evals/ folder")
    return path


def tasks_dir() -> Path:
    return evals_dir() / "tasks"


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


@lru_cache(maxsize=4)
def _suite(folder: str) -> dict[str, dict]:
    out, order = {}, []
    for path in sorted(Path(folder).glob("*.yaml")):
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
        if isinstance(cfg.get("group"), str) and isinstance(cfg.get("task"), list):
            order += [t for t in cfg["task"] if isinstance(t, str)]
        if "task" in cfg and isinstance(cfg["task"], str):
            meta = cfg.get("metadata") or {}
            out[cfg["task"]] = {"group": meta.get("group"), "chance": meta.get("chance"),
                                "output_type": cfg.get("output_type"), "yaml": str(path)}
    # the order of the group YAMLs (passkey first), then anything not in a group
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(out.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def suite() -> dict[str, dict]:
    """Bundled task name -> {'group', 'chance', 'output_type', 'yaml'}."""
    return _suite(str(tasks_dir()))


def group_tasks(group: str) -> list[str]:
    return [name for name, info in suite().items() if info["group"] == group]


def resolve_tasks(tasks: str | list[str]) -> tuple[list[str], list[str]]:
    """Split --tasks into (bundled task names, other lm-eval task names), expanding group aliases.
    Order is kept, duplicates dropped."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise MvquantError("no tasks given: use --tasks contextual,parametric or a task name "
                           f"({', '.join(suite())})")
    ours, other = [], []
    for name in names:
        key = name.lower()
        if key in SUITE_ALIASES:
            expanded = [t for g in GROUPS for t in group_tasks(g)]
        elif key in ALIASES:
            expanded = group_tasks(ALIASES[key])
        elif name in suite():
            expanded = [name]
        else:
            if name not in other:
                other.append(name)
            continue
        ours += [t for t in expanded if t not in ours]
    return ours, other


def check_external_tasks(names: list[str], task_manager) -> None:
    """Fail early, listing what exists, when a non-bundled name is not an lm-eval task either."""
    known = set(task_manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MvquantError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: bundled tasks are "
                           f"{', '.join(suite())} (groups: contextual, parametric); any lm-eval task name also "
                           "works (lm_eval ls tasks)")
