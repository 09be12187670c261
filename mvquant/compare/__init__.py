"""`mvquant compare`: a recipe of arms (quantization methods, protection, disruption) x tasks ->
cached cells -> results.csv, groups.csv, results.md and Figure-5 style plots."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..io import check_output_path
from .engine import ArmContext, OutputDir, PreparedArm, run_cells
from .outputs import group_mean, group_rows, write_outputs
from .recipe import Arm, Recipe, load_recipe, parse_recipe

__all__ = ["compare", "CompareResult", "load_recipe", "parse_recipe", "Recipe", "Arm", "PreparedArm",
           "ArmContext", "group_mean", "group_rows"]


@dataclass
class CompareResult:
    rows: list[dict]          # one per (arm, task), the columns of results.csv
    groups: list[dict]        # one per (arm, group): mean accuracy and its standard error
    files: dict[str, Path]    # output name -> path
    computed: int             # cells computed by this call
    cached: int               # cells found in the cache
    arms: dict                # arm name -> size, bits/param, timings


def compare(recipe: str | os.PathLike | Recipe, output: str | os.PathLike, *, quick: bool = False,
            force: bool = False, resume: bool = False, prune: bool = False, progress: bool = True, arm_runner=None,
            task_runner=None, catalog: dict[str, list[str]] | None = None, log=None) -> CompareResult:
    """Run a recipe into `output` (a directory), reusing whatever cells it already holds.

    An output dir that holds another recipe's results is refused unless `resume` (reuse the cells
    that still match) or `force` (discard them). `prune`: once every cell is computed, remove the
    cached arms and cells the recipe no longer uses. `arm_runner` / `task_runner` default to the real
    quantize / evaluate path (see runners.py); tests inject small ones.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, catalog=catalog, quick=quick)
    if arm_runner is None or task_runner is None:
        from .runners import ModelArmRunner, EvalTaskRunner
        arm_runner = arm_runner or ModelArmRunner()
        task_runner = task_runner or EvalTaskRunner()
    if hasattr(arm_runner, "validate"):
        arm_runner.validate(recipe)   # e.g. quantizer settings: fail before the output dir is touched
    check_output_path(output, kind="dir", make_parents=True, reuse=True, force=True,  # writable, not a file
                      inputs=(recipe.source, recipe.model))
    out = OutputDir(output, recipe, arm_runner_id=getattr(arm_runner, "cache_id", ""),
                    task_runner_id=getattr(task_runner, "cache_id", ""))
    state = out.check(force=force, resume=resume)
    if state == "force":
        out.clear()
    elif state == "resume":
        (log or print)(f"compare: '{output}' held another recipe; reusing the cells that still match")
    out.write_manifest()
    done = run_cells(recipe, out, arm_runner=arm_runner, task_runner=task_runner, progress=progress, log=log)
    if prune:
        removed = out.prune()
        (log or print)(f"compare: pruned {len(removed)} cached arm(s)/cell(s) the recipe no longer uses")
    title = f"{recipe.name} ({recipe.model}{', quick' if recipe.quick else ''})"
    files = write_outputs(out.root, done["rows"], title=title, arm_infos=done["arms"], contrasts=recipe.contrasts)
    return CompareResult(rows=done["rows"], groups=group_rows(done["rows"]), files=files, computed=done["computed"],
                         cached=done["cached"], arms=done["arms"])
