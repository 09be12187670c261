"""The execution engine: arms x tasks, each cell cached on disk, independent of how models are made.

Two injected callables do the work, so the engine never depends on quantize/eval internals:
- an arm runner: `arm_runner(arm, ctx) -> PreparedArm` (make the model for one arm),
- a task runner: `task_runner(prepared, task, *, limit, seed) -> {"acc", "stderr", "n"}`.
Both may carry a `cache_id` (a string, or for the arm runner a function of the arm): results from
different runners, or from different revisions of a method, never share cache entries.

Output directory layout (everything keyed by content hashes, so resume and partial recompute are free):
    compare.json                      the recipe this directory holds (refuse another without --resume/--force)
    calibration/<key>.json            calibration report(s), one per (model, calibration settings)
    arms/<arm key>/arm.json           size, bits/param, preparation time of the arm
    arms/<arm key>/checkpoint/        the arm's quantized checkpoint (real runner)
    cells/<arm key>/<task>.json       one (arm, task) result
    results.csv, groups.csv, contrasts.csv, results.md, figure5.png, tasks.png
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from ..errors import MvquantError
from ..evaluation.runner import base_model_name
from ..evaluation.tasks import excluded_tasks
from ..io import atomic_write_json
from .recipe import Arm, Recipe, stable_hash

MANIFEST = "compare.json"
FORMAT = "mvquant.compare/1"
CACHE_DIRS = ("arms", "cells", "calibration")
OUTPUT_FILES = ("results.csv", "groups.csv", "contrasts.csv", "results.md", "figure5.png", "tasks.png")


@dataclass
class PreparedArm:
    """A ready model for one arm, plus what the report says about it."""
    model: Any = None
    tokenizer: Any = None
    report: Any = None                       # calibration report (disruption, protection), if the arm needs one
    info: dict = field(default_factory=dict)  # size_bytes, bits_per_weight, quantize_s, checkpoint ...
    arm: Arm | None = None                   # set by the engine before tasks run

    def close(self) -> None:
        self.model = None
        self.tokenizer = None


@dataclass
class ArmContext:
    """What the engine hands an arm runner: the recipe and where the arm may cache files."""
    recipe: Recipe
    arm_dir: Path            # arms/<arm key>/: the runner keeps its checkpoint under here
    calibration_path: Path   # where the calibration report for this recipe is (or is to be) cached
    progress: bool = True


ArmRunner = Callable[[Arm, ArmContext], PreparedArm]
TaskRunner = Callable[..., dict]


def calibration_key(recipe: Recipe) -> str:
    return stable_hash({"model": recipe.model, "dtype": recipe.dtype, "calibration": recipe.calibration,
                        "seed": recipe.seed})[:16]


def arm_key(recipe: Recipe, arm: Arm, runner_id: str = "") -> str:
    """Hash of everything an arm's model depends on; calibration only counts for arms that use it."""
    spec = {"model": recipe.model, "dtype": recipe.dtype, "arm": arm.spec(), "runner": runner_id}
    if arm.uses_calibration:
        spec["calibration"] = recipe.calibration
        spec["calibration_seed"] = recipe.seed
    return stable_hash(spec)[:16]


def cell_key(a_key: str, task: str, limit: int | None, seed: int, runner_id: str = "") -> str:
    return stable_hash({"arm": a_key, "task": task, "limit": limit, "seed": seed, "runner": runner_id})[:16]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


@dataclass
class Cell:
    arm: Arm
    task: str
    limit: int | None
    path: Path
    key: str


class OutputDir:
    """The output directory: manifest check, cache paths, reading and writing cells."""

    def __init__(self, root: str | os.PathLike, recipe: Recipe, *, arm_runner_id: str | Callable[[Arm], str] = "",
                 task_runner_id: str = ""):
        self.root = Path(root)
        self.recipe = recipe
        self.arm_runner_id = arm_runner_id
        self.task_runner_id = task_runner_id

    # -- the guard against mixing experiments ------------------------------------------------------
    def check(self, *, force: bool, resume: bool) -> str:
        """Return 'new' | 'same' | 'resume' | 'force'; raise if the directory holds something else."""
        root = self.root
        if not root.exists():
            return "new"  # created with its parents (results/fig5 needs no mkdir first)
        if not root.is_dir():
            raise MvquantError(f"output '{root}' is a file: --output needs a directory")
        manifest = root / MANIFEST
        if not manifest.is_file():
            if not any(root.iterdir()):
                return "new"
            # --force discards an earlier compare's results, never a folder compare did not write
            raise MvquantError(f"output directory '{root}' is not empty and holds no compare results ({MANIFEST}): "
                               "choose another --output (--force only replaces an earlier compare run)")
        try:
            held = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            held = {}
        if held.get("fingerprint") == self.recipe.fingerprint():
            return "force" if force else "same"
        if not self.holds_results():
            return "new"  # the manifest of a run that computed nothing: not binding
        if force:
            return "force"
        if resume:
            return "resume"
        raise MvquantError(f"output directory '{root}' holds results of a different recipe "
                           f"('{held.get('recipe', {}).get('name', '?')}'"
                           f"{', quick' if held.get('recipe', {}).get('quick') else ''}): choose another --output, "
                           "pass --resume to reuse its cached cells, or --force to discard them")

    def clear(self) -> None:
        """--force: remove what an earlier compare wrote here (and only that)."""
        for d in CACHE_DIRS:
            shutil.rmtree(self.root / d, ignore_errors=True)
        for f in (MANIFEST, *OUTPUT_FILES):
            (self.root / f).unlink(missing_ok=True)

    def prune(self) -> list[Path]:
        """--prune: remove cached arms and cells this recipe no longer uses (an arm changed, a method's
        revision moved on, a task or limit changed). Returns what was removed."""
        arms = {self.arm_key(arm) for arm in self.recipe.arms}
        cells = {c.path for arm in self.recipe.arms for c in self.cells(arm)}
        stale = [d for d in sorted((self.root / "arms").glob("*")) if d.name not in arms]
        for d in sorted((self.root / "cells").glob("*")):   # a live arm's folder may hold old cells
            stale += [d] if d.name not in arms else [f for f in sorted(d.iterdir()) if f not in cells]
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return stale

    def write_manifest(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / MANIFEST, {"format": FORMAT, "fingerprint": self.recipe.fingerprint(),
                                                 "source": self.recipe.source, "recipe": self.recipe.to_dict()})

    # -- cache paths -------------------------------------------------------------------------------
    def arm_key(self, arm: Arm) -> str:
        rid = self.arm_runner_id(arm) if callable(self.arm_runner_id) else self.arm_runner_id
        return arm_key(self.recipe, arm, rid)

    def arm_dir(self, arm: Arm) -> Path:
        return self.root / "arms" / self.arm_key(arm)

    def calibration_path(self) -> Path:
        return self.root / "calibration" / f"{calibration_key(self.recipe)}.json"

    def cells(self, arm: Arm) -> list[Cell]:
        a_key = self.arm_key(arm)
        out = []
        for task in self.recipe.tasks:
            limit = self.recipe.limits[task]
            key = cell_key(a_key, task, limit, arm.seed, self.task_runner_id)
            out.append(Cell(arm, task, limit, self.root / "cells" / a_key / f"{_safe(task)}-{key}.json", key))
        return out

    def cached(self, cell: "Cell") -> dict | None:
        """A cell's stored result, or None when it is missing or damaged (then it is recomputed)."""
        r = self.read_json(cell.path)
        if not isinstance(r, dict) or not {"acc", "stderr", "n"} <= set(r) or not isinstance(r["acc"], (int, float)):
            return None
        return r

    def holds_results(self) -> bool:
        """Any computed cell or arm here? A manifest without them (a run that failed before its first
        cell, e.g. on a missing model) binds nothing, so the fixed recipe may take the directory."""
        return any(p.is_file() for d in ("cells", "arms") for p in (self.root / d).rglob("*"))

    @staticmethod
    def read_json(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError, json.JSONDecodeError):
            return None  # a missing or torn file is simply not cached


def _validate_result(result, arm: Arm, task: str) -> dict:
    if not isinstance(result, dict) or not {"acc", "stderr", "n"} <= set(result):
        raise MvquantError(f"the task runner returned {result!r} for arm '{arm.name}', task '{task}': it must "
                           "return a dict with acc, stderr and n")
    out = {"acc": float(result["acc"]), "stderr": None if result["stderr"] is None else float(result["stderr"]),
           "n": int(result["n"])}
    for key in ("chance", "ci95", "correct"):   # kept when the runner gives them (per-item scores: paired tests)
        if result.get(key) is not None:
            out[key] = result[key]
    return out


def run_cells(recipe: Recipe, out: OutputDir, *, arm_runner: ArmRunner, task_runner: TaskRunner,
              progress: bool = True, log=None) -> dict:
    """Compute every missing (arm, task) cell; return {'rows': [...], 'arms': {name: info}, 'computed': n}."""
    if log is None:
        def log(msg):  # through tqdm, so that messages do not tear the progress bar
            tqdm.write(msg, file=sys.stdout)
    t_start = time.perf_counter()
    all_cells = {arm.name: out.cells(arm) for arm in recipe.arms}
    total = sum(map(len, all_cells.values()))
    cached_before = sum(out.cached(c) is not None for cells in all_cells.values() for c in cells)
    if cached_before:
        log(f"compare: {cached_before} of {total} cells cached in {out.root}; computing the other {total - cached_before}")
    bar = tqdm(total=total, initial=cached_before, desc="arm x task", unit="cell", disable=not progress,
               file=sys.stderr)
    computed = 0
    arm_infos: dict[str, dict] = {}
    try:
        for arm in recipe.arms:
            cells = all_cells[arm.name]
            missing = [c for c in cells if out.cached(c) is None]  # absent or damaged: (re)compute
            arm_dir = out.arm_dir(arm)
            info_path = arm_dir / "arm.json"
            if not missing:
                arm_infos[arm.name] = out.read_json(info_path) or {}
                log(f"arm {arm.name}: all {len(cells)} tasks cached")
                continue
            t0 = time.perf_counter()
            ctx = ArmContext(recipe=recipe, arm_dir=arm_dir, calibration_path=out.calibration_path(),
                             progress=progress)
            bar.set_description(f"{arm.name} (preparing)")
            arm_dir.mkdir(parents=True, exist_ok=True)
            prepared = arm_runner(arm, ctx)
            prepared.arm = arm
            prepare_s = time.perf_counter() - t0
            info = {"arm": arm.name, "spec": arm.spec(), **prepared.info, "prepare_s": round(prepare_s, 3)}
            atomic_write_json(info_path, info)
            arm_infos[arm.name] = info
            try:
                for cell in missing:
                    bar.set_description(f"{arm.name} x {cell.task}")
                    t1 = time.perf_counter()
                    result = _validate_result(task_runner(prepared, cell.task, limit=cell.limit, seed=arm.seed),
                                              arm, cell.task)
                    result.update(arm=arm.name, task=cell.task, limit=cell.limit, seed=arm.seed,
                                  eval_s=round(time.perf_counter() - t1, 3))
                    cell.path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_json(cell.path, result)
                    computed += 1
                    bar.update(1)
            finally:
                prepared.close()
                gc.collect()  # the next arm loads a fresh model: free this one first
            wall = time.perf_counter() - t0
            info["wall_s"] = round(wall, 3)
            atomic_write_json(info_path, info)
            log(f"arm {arm.name}: {len(missing)} task(s) computed, {len(cells) - len(missing)} cached; "
                f"prepare {prepare_s:.1f} s, wall {wall:.1f} s")
    finally:
        bar.close()
    log(f"compare: {computed} cell(s) computed in {time.perf_counter() - t_start:.1f} s")

    rows = []
    excluded = excluded_tasks(base_model_name(recipe.model))
    for arm in recipe.arms:
        info = arm_infos.get(arm.name, {})
        for cell in all_cells[arm.name]:
            r = out.cached(cell)
            if r is None:
                raise MvquantError(f"cell {arm.name} x {cell.task} is missing from {cell.path.parent} after the run: "
                                   "rerun the same command to compute it")
            rows.append(make_row(recipe, arm, cell.task, r, info, excluded=excluded.get(cell.task)))
    return {"rows": rows, "arms": arm_infos, "computed": computed, "cached": cached_before, "total": total}


def make_row(recipe: Recipe, arm: Arm, task: str, result: dict, info: dict, *, excluded: str | None = None) -> dict:
    """One results.csv row. `excluded`: why the task is left out of the group means (near chance at full
    precision on the recipe's model), or None."""
    size = info.get("size_bytes")
    return {
        "method": arm.name, "task": task, "group": recipe.task_groups[task],
        "acc": result["acc"], "stderr": result["stderr"], "n": result["n"], "chance": result.get("chance"),
        "ci95_lo": (result.get("ci95") or [None, None])[0], "ci95_hi": (result.get("ci95") or [None, None])[1],
        "quant_method": arm.method, "bits": arm.bits, "group_size": arm.group_size, "protect": arm.protect,
        "disrupt": arm.disrupt, "bits_per_weight": info.get("bits_per_weight"),
        "size_mb": None if size is None else round(size / 2**20, 3),
        "prepare_s": info.get("prepare_s"), "eval_s": result.get("eval_s"), "limit": result.get("limit"),
        "excluded": excluded,
        "correct": result.get("correct"),   # per-item scores (not a CSV column): paired contrasts
    }
