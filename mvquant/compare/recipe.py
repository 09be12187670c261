"""The recipe: one YAML file that names a model, its calibration, the arms to compare and the tasks.

```yaml
name: figure5
model: smollm2-135m          # anything `mvquant.load_model` takes
dtype: float32
seed: 0
calibration: {samples: 32, seq_len: 512, lambda: 5.0, top_k: null, data: python-docs}
tasks: [contextual, parametric]   # task groups and/or task names
limit: 200                   # examples per task (null: all); or a mapping task -> limit
defaults: {group_size: 128}  # merged into every arm
quick: {limit: 20, calibration: {samples: 8}}   # what --quick changes
arms:
  - {name: fp32, method: none}
  - {name: rtn-w4, method: rtn, bits: 4, protect: none}
  - {name: mvquant-w4, method: rtn, bits: 4, protect: massive}
  - {name: massive-disrupted, method: none, disrupt: massive, top_k: 1}
  - {name: kv2-massive, method: none, kv_bits: 2, kv_protect: massive}   # quantized KV cache
```

Everything is validated before any work starts; every error names the key and what is allowed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import MvquantError
from ..quantization import config as qconfig
from ..quantization.registry import METHODS

# The quantizer's rules (the method declarations, quantization/registry.py), checked here so that errors
# name the recipe key. Method "none": no quantization, the model as loaded.
METHOD_NAMES = ("none", *METHODS)
DISRUPTIONS = ("none", "massive", "non-massive")
PROTECT_RE = re.compile(f"^({qconfig.PROTECT_PATTERN})$")
PROTECT_ALLOWED = "massive | none | random | topk:N"

RECIPE_KEYS = ("name", "description", "model", "dtype", "seed", "calibration", "tasks", "limit",
               "defaults", "quick", "arms", "contrasts")
KV_KEYS = ("kv_bits", "kv_protect", "kv_group_size", "kv_residual", "kv_sink", "kv_axis", "kv_backend")
ARM_KEYS = ("name", "method", "bits", "group_size", "protect", "disrupt", "top_k", "seed", "options", "engine") + KV_KEYS
ENGINES = ("transformers", "llamacpp")   # llamacpp: the arm's checkpoint exported to GGUF and scored in llama.cpp
DEFAULT_GROUP_SIZE = qconfig.QuantConfig.group_size   # written out so that it is part of the arm's cache key
CALIBRATION_KEYS = ("samples", "seq_len", "lambda", "top_k", "data", "batch_size")
QUICK_KEYS = ("limit", "calibration", "arms", "tasks")
CALIBRATION_DEFAULTS = {"samples": 32, "seq_len": 512, "lambda": 5.0, "top_k": None, "data": "python-docs",
                        "batch_size": 4}


@dataclass(frozen=True)
class Arm:
    """One column of the comparison: how to make the model, and how to run it."""
    name: str
    method: str = "none"
    bits: int | None = None
    group_size: int | None = None
    protect: str = "none"
    disrupt: str = "none"
    top_k: int | None = None          # dims per head for disruption (None: the evaluator's default, top-1)
    seed: int = 0
    options: dict = field(default_factory=dict)   # further QuantConfig fields (symmetric, alpha, ...)
    # KV-cache quantization at run time (mvquant.kvcache); kv_bits None: the usual full-precision cache
    kv_bits: int | None = None
    kv_protect: str = "massive"
    kv_group_size: int = 32
    kv_residual: int = 32
    kv_sink: int = 0
    kv_axis: str = "channel"
    kv_backend: str = "mvquant"       # quanto / hqq: transformers' QuantizedCache (a baseline)
    engine: str = "transformers"      # llamacpp: `mvquant export --format gguf` of the checkpoint, scored in llama.cpp

    @property
    def quantized(self) -> bool:
        return self.method != "none"

    @property
    def uses_calibration(self) -> bool:
        """Whether the arm's result depends on the calibration report / calibration data."""
        return (self.protect != "none" or self.disrupt != "none"
                or self.method in ("awq", "gptq", "smoothquant")
                or (self.kv_bits is not None and self.kv_protect != "none"))

    def kv_config(self) -> dict | None:
        """The arm's KV-cache settings for mvquant.evaluate(kv=...), or None."""
        if self.kv_bits is None:
            return None
        return {"bits": self.kv_bits, "protect": self.kv_protect, "group_size": self.kv_group_size,
                "residual": self.kv_residual, "sink": self.kv_sink, "axis": self.kv_axis, "seed": self.seed,
                "backend": self.kv_backend}

    def spec(self) -> dict:
        """What determines the arm's results (the name does not: renaming reuses the cache)."""
        d = asdict(self)
        d.pop("name")
        if self.kv_bits is None:   # arms without a quantized KV cache keep the keys they always had
            for k in KV_KEYS:
                d.pop(k)
        elif self.kv_backend == "mvquant":   # the default backend keeps the cache keys of earlier kv arms
            d.pop("kv_backend")
        if self.engine == "transformers":   # in-process arms keep the keys they always had
            d.pop("engine")
        return d


@dataclass
class Recipe:
    name: str
    model: str
    arms: list[Arm]
    tasks: list[str]                          # task names, groups expanded, in order
    task_groups: dict[str, str]               # task -> group it is reported under
    limits: dict[str, int | None]             # task -> examples (None: all)
    calibration: dict = field(default_factory=lambda: dict(CALIBRATION_DEFAULTS))
    dtype: str = "float32"
    seed: int = 0
    description: str = ""
    source: str | None = None                 # the file it came from
    quick: bool = False
    contrasts: list[tuple[str, str]] = field(default_factory=list)   # (arm, baseline arm): paired differences

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model, "dtype": self.dtype, "seed": self.seed,
                "calibration": self.calibration, "tasks": self.tasks, "task_groups": self.task_groups,
                "limits": self.limits, "arms": [{"name": a.name, **a.spec()} for a in self.arms], "quick": self.quick}

    def fingerprint(self) -> str:
        """Identifies the experiment an output dir holds (description and file path excluded)."""
        return stable_hash(self.to_dict())

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# -- validation ------------------------------------------------------------------------------------

def _where(path: str | None) -> str:
    return f"recipe '{path}'" if path else "recipe"


def _check_keys(obj: dict, allowed, what: str, where: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise MvquantError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                           f"in {what}: allowed keys are {', '.join(allowed)}")


def _int(value, what: str, where: str, *, minimum: int = 0, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MvquantError(f"{where}: {what} must be an integer >= {minimum}{' or null' if allow_none else ''}, "
                           f"got {value!r}")
    return value


def _validate_calibration(cal, where: str) -> dict:
    if cal is None:
        cal = {}
    if not isinstance(cal, dict):
        raise MvquantError(f"{where}: 'calibration' must be a mapping of {', '.join(CALIBRATION_KEYS)}")
    _check_keys(cal, CALIBRATION_KEYS, "calibration", where)
    out = {**CALIBRATION_DEFAULTS, **cal}
    _int(out["samples"], "calibration.samples", where, minimum=1)
    _int(out["seq_len"], "calibration.seq_len", where, minimum=2)
    _int(out["batch_size"], "calibration.batch_size", where, minimum=1)
    _int(out["top_k"], "calibration.top_k", where, minimum=1, allow_none=True)
    lam = out["lambda"]
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam <= 0:
        raise MvquantError(f"{where}: calibration.lambda must be a positive number, got {lam!r}")
    out["lambda"] = float(lam)
    if not isinstance(out["data"], str):
        raise MvquantError(f"{where}: calibration.data must be a source name or file path, got {out['data']!r}")
    return out


def _validate_arm(raw, defaults: dict, index: int, recipe_seed: int, where: str) -> Arm:
    if not isinstance(raw, dict):
        raise MvquantError(f"{where}: arms[{index}] must be a mapping with at least 'name' and 'method'")
    _check_keys(raw, ARM_KEYS, f"arms[{index}]", where)
    a = {**defaults, **raw}
    name = a.get("name")
    if not isinstance(name, str) or not name.strip() or not re.fullmatch(r"[A-Za-z0-9_.+\-]+", name):
        raise MvquantError(f"{where}: arms[{index}] needs a 'name' of letters, digits and . _ + - (got {name!r})")
    at = f"{where}, arm '{name}'"
    method = a.get("method", "none")
    if method not in METHOD_NAMES:
        raise MvquantError(f"{at}: unknown method {method!r}: use one of {', '.join(METHOD_NAMES)}")
    spec = METHODS.get(method)
    bits = a.get("bits")
    if spec is None:
        if bits is not None:
            raise MvquantError(f"{at}: method 'none' runs the model unquantized; remove 'bits' ({bits!r}) "
                               f"or choose a method ({', '.join(METHODS)})")
    else:
        allowed_bits = spec.bits
        if bits is None and len(allowed_bits) == 1:
            bits = allowed_bits[0]
        if bits not in allowed_bits or isinstance(bits, bool):
            raise MvquantError(f"{at}: bits {bits!r} is not supported by {method}: use one of "
                               f"{', '.join(map(str, allowed_bits))}")
    group_size = a.get("group_size")
    if spec is not None and spec.grouped:
        if group_size is None:
            group_size = DEFAULT_GROUP_SIZE
        if group_size != -1:
            group_size = _int(group_size, "group_size", at, minimum=1)   # QuantConfig's rule: positive or -1
    else:
        group_size = None  # not a knob of this method (a recipe-wide default may still name one)
    protect = str(a.get("protect", "none")).strip()
    if not PROTECT_RE.match(protect):
        raise MvquantError(f"{at}: unknown protect policy {protect!r}: use {PROTECT_ALLOWED}")
    if protect != "none" and not (spec is not None and spec.protectable):
        if "protect" in raw:
            raise MvquantError(f"{at}: method {method!r} cannot protect dims: use protect: none, or one of "
                               f"{', '.join(m.name for m in METHODS.values() if m.protectable)}")
        protect = "none"  # a recipe-wide default does not apply to this method
    disrupt = a.get("disrupt", "none")
    disrupt = "none" if disrupt in (None, False) else disrupt
    if disrupt not in DISRUPTIONS:
        raise MvquantError(f"{at}: unknown disrupt {disrupt!r}: use one of {', '.join(DISRUPTIONS)}")
    top_k = _int(a.get("top_k"), "top_k", at, minimum=1, allow_none=True)
    seed = _int(a.get("seed", recipe_seed), "seed", at, minimum=0)
    options = a.get("options") or {}
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise MvquantError(f"{at}: 'options' must be a mapping of quantizer settings (e.g. symmetric: true)")
    if options and method == "none":
        raise MvquantError(f"{at}: 'options' configure a quantizer; method 'none' has none: remove them")
    kv = _validate_kv(raw, a, at)
    engine = a.get("engine", "transformers")
    if engine not in ENGINES:
        raise MvquantError(f"{at}: unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    if engine == "llamacpp" and (spec is None or "q4_k" not in spec.grids or disrupt != "none" or kv):
        raise MvquantError(f"{at}: engine llamacpp scores the arm's GGUF export: it needs method rtn, awq or gptq, "
                           "without disrupt or kv_* (bash scripts/setup-llamacpp.sh once)")
    return Arm(name=name, method=method, bits=bits, group_size=group_size, protect=protect, disrupt=disrupt,
               top_k=top_k, seed=seed, options=dict(options), engine=engine, **kv)


def _validate_kv(raw: dict, merged: dict, at: str) -> dict:
    """kv_* keys: checked as `mvquant eval --kv-*` checks them; without kv_bits an arm's own kv_* key
    is an error (a recipe-wide default simply does not apply)."""
    from ..kvcache import KVConfig

    if merged.get("kv_bits") is None:
        own = [k for k in KV_KEYS[1:] if k in raw]
        if own:
            raise MvquantError(f"{at}: {own[0]} configures a quantized KV cache: add kv_bits (2, 3, 4 or 8)")
        return {}
    field_names = {"kv_bits": "bits", "kv_protect": "protect", "kv_group_size": "group_size",
                   "kv_residual": "residual", "kv_sink": "sink", "kv_axis": "axis", "kv_backend": "backend"}
    given = {f: merged[k] for k, f in field_names.items() if k in merged}
    try:
        config = KVConfig(**given).check()
    except MvquantError as e:
        raise MvquantError(f"{at}: {str(e).replace('--kv-group-size', 'kv_group_size').replace('--kv-', 'kv_')}") from None
    return {k: getattr(config, f) for k, f in field_names.items()}


def _expand_tasks(raw, catalog: dict[str, list[str]], where: str) -> tuple[list[str], dict[str, str]]:
    """Group names become their tasks; a task named directly is reported under the group holding it."""
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(t, str) for t in raw):
        raise MvquantError(f"{where}: 'tasks' must be a non-empty list of task or group names "
                           f"(groups: {', '.join(catalog)})")
    group_of = {t: g for g, ts in catalog.items() for t in ts}
    tasks: list[str] = []
    groups: dict[str, str] = {}
    for item in raw:
        if item in catalog:
            members = [(t, item) for t in catalog[item]]
        elif item in group_of:
            members = [(item, group_of[item])]
        else:
            known = sorted(group_of)
            raise MvquantError(f"{where}: unknown task or group {item!r}: use a group ({', '.join(catalog)}) "
                               f"or a task ({', '.join(known)})")
        for t, g in members:
            if t not in groups:
                tasks.append(t)
                groups[t] = g
    return tasks, groups


def _limits(raw, tasks: list[str], where: str) -> dict[str, int | None]:
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - set(tasks) - {"default"})
        if unknown:
            raise MvquantError(f"{where}: 'limit' names task(s) not in the recipe: {', '.join(unknown)}; "
                               f"use 'default' or one of {', '.join(tasks)}")
        default = _int(raw.get("default"), "limit.default", where, minimum=1, allow_none=True)
        return {t: _int(raw.get(t, default), f"limit.{t}", where, minimum=1, allow_none=True) for t in tasks}
    value = _int(raw, "limit", where, minimum=1, allow_none=True)
    return {t: value for t in tasks}


def parse_recipe(data, *, catalog: dict[str, list[str]], source: str | None = None, quick: bool = False) -> Recipe:
    """Validate a recipe (already parsed YAML) against the task catalog {group: [task, ...]}."""
    where = _where(source)
    if not isinstance(data, dict):
        raise MvquantError(f"{where}: expected a YAML mapping with keys {', '.join(RECIPE_KEYS)}")
    _check_keys(data, RECIPE_KEYS, "the recipe", where)
    data = copy.deepcopy(data)
    for key in ("model", "arms", "tasks"):
        if key not in data:
            raise MvquantError(f"{where}: missing required key '{key}' (see recipes/figure5.yaml for an example)")
    name = data.get("name") or (Path(source).stem if source else "recipe")
    model = data["model"]
    if not isinstance(model, str) or not model:
        raise MvquantError(f"{where}: 'model' must be a model name or path, e.g. smollm2-135m")
    dtype = str(data.get("dtype", "float32"))
    if dtype not in ("float32", "bfloat16", "float16"):
        raise MvquantError(f"{where}: dtype {dtype!r} not supported: use float32, bfloat16 or float16")
    seed = _int(data.get("seed", 0), "seed", where, minimum=0)
    calibration = _validate_calibration(data.get("calibration"), where)
    tasks, task_groups = _expand_tasks(data["tasks"], catalog, where)
    limits = _limits(data.get("limit"), tasks, where)

    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise MvquantError(f"{where}: 'defaults' must be a mapping of arm keys ({', '.join(ARM_KEYS[1:])})")
    _check_keys(defaults, ARM_KEYS[1:], "defaults", where)
    arms_raw = data["arms"]
    if not isinstance(arms_raw, list) or not arms_raw:
        raise MvquantError(f"{where}: 'arms' must be a non-empty list of arms (name, method, ...)")
    arms = [_validate_arm(a, defaults, i, seed, where) for i, a in enumerate(arms_raw)]
    names = [a.name for a in arms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MvquantError(f"{where}: arm names must be unique; repeated: {', '.join(dupes)}")

    q = data.get("quick") or {}
    if not isinstance(q, dict):
        raise MvquantError(f"{where}: 'quick' must be a mapping of {', '.join(QUICK_KEYS)}")
    _check_keys(q, QUICK_KEYS, "quick", where)
    quick_tasks = quick_groups = None
    if "tasks" in q:
        quick_tasks, quick_groups = _expand_tasks(q["tasks"], catalog, where + " (quick)")
    quick_limits = (_limits(q["limit"], quick_tasks or tasks, where + " (quick)") if "limit" in q
                    else {t: limits.get(t) for t in quick_tasks} if quick_tasks else None)
    quick_cal = _validate_calibration({**{k: v for k, v in calibration.items()}, **(q.get("calibration") or {})},
                                      where + " (quick)")
    quick_arms = q.get("arms")
    if quick_arms is not None:
        if not isinstance(quick_arms, list) or not quick_arms:
            raise MvquantError(f"{where}: quick.arms must be a non-empty list of arm names")
        missing = [n for n in quick_arms if n not in names]
        if missing:
            raise MvquantError(f"{where}: quick.arms names unknown arm(s) {', '.join(map(str, missing))}: "
                               f"use names from {', '.join(names)}")
    if quick:
        if quick_tasks is not None:
            tasks, task_groups = quick_tasks, quick_groups
        if quick_limits is not None:
            limits = quick_limits
        calibration = quick_cal
        if quick_arms is not None:
            arms = [a for a in arms if a.name in quick_arms]

    contrasts = _contrasts(data.get("contrasts"), arms, names, where)
    return Recipe(name=str(name), model=model, arms=arms, tasks=tasks, task_groups=task_groups, limits=limits,
                  calibration=calibration, dtype=dtype, seed=seed, description=str(data.get("description", "")),
                  source=source, quick=quick, contrasts=contrasts)


def _contrasts(raw, arms: list[Arm], all_names: list[str], where: str) -> list[tuple[str, str]]:
    """Every arm against the first one, then the recipe's own [arm, baseline] pairs (output only:
    they change no cell). Pairs naming an arm that --quick left out are dropped."""
    names = [a.name for a in arms]
    pairs = [(n, names[0]) for n in names[1:]]
    if raw is None:
        return pairs
    if not isinstance(raw, list) or not all(isinstance(p, list) and len(p) == 2 for p in raw):
        raise MvquantError(f"{where}: 'contrasts' must be a list of [arm, baseline] pairs, e.g. [[mvquant-w3, none-w3]]")
    unknown = sorted({n for p in raw for n in p if n not in all_names}, key=str)
    if unknown:
        raise MvquantError(f"{where}: 'contrasts' names unknown arm(s) {', '.join(map(str, unknown))}: use names from "
                           f"{', '.join(all_names)}")
    for a, b in raw:
        if (a, b) not in pairs and a in names and b in names:
            pairs.append((a, b))
    return pairs


def default_catalog() -> dict[str, list[str]]:
    """{group: [task, ...]} of the tasks mvquant's eval knows."""
    from ..evaluation import tasks as T
    return {group: T.group_tasks(group) for group in T.GROUPS}


def load_recipe(path: str | os.PathLike, *, catalog: dict[str, list[str]] | None = None,
                quick: bool = False) -> Recipe:
    """Read and validate a recipe file. `catalog` {group: [tasks]} defaults to mvquant's eval tasks."""
    import yaml

    path = Path(path)
    if not path.is_file():
        hint = ", ".join(sorted(p.name for p in Path("recipes").glob("*.yaml"))) if Path("recipes").is_dir() else ""
        raise MvquantError(f"recipe '{path}' not found: check the path" + (f" (recipes/ has {hint})" if hint else ""))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise MvquantError(f"recipe '{path}' is not valid YAML ({str(e).splitlines()[0]}): fix the syntax") from None
    except UnicodeDecodeError:
        raise MvquantError(f"recipe '{path}' is not a text file (not UTF-8): give a YAML recipe such as "
                           "recipes/figure5.yaml") from None
    if catalog is None:
        catalog = default_catalog()
    return parse_recipe(data, catalog=catalog, source=str(path), quick=quick)
