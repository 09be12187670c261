"""`mvquant compare --recipe recipes/X.yaml --output DIR [--quick] [--resume | --force] [--prune]`."""
from __future__ import annotations

HELP = "run a recipe of quantization/disruption arms x tasks; write results.csv, results.md and plots"


def add_arguments(parser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe YAML (see recipes/figure5.yaml, recipes/table1.yaml)")
    parser.add_argument("--output", required=True, help="output directory (cells are cached here; rerun to resume)")
    parser.add_argument("--quick", action="store_true",
                        help="apply the recipe's `quick` section (smaller limits/calibration) for a smoke run")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="the output dir holds another recipe's results: reuse the cells that still match")
    mode.add_argument("--force", action="store_true", help="discard whatever compare results the output dir holds")
    parser.add_argument("--prune", action="store_true",
                        help="after the run, delete cached arms/cells this recipe no longer uses (e.g. after --resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from ..compare import compare, load_recipe

    recipe = load_recipe(args.recipe, quick=args.quick)  # validate before touching the output dir
    print(f"compare: recipe '{recipe.name}': {len(recipe.arms)} arms x {len(recipe.tasks)} tasks "
          f"({', '.join(recipe.tasks)}){' [quick]' if args.quick else ''}")
    result = compare(recipe, args.output, force=args.force, resume=args.resume, prune=args.prune,
                     progress=not args.no_progress)
    print(open(result.files["results.md"], encoding="utf-8").read())
    print(f"compare: {result.computed} cells computed, {result.cached} cached; wrote "
          + ", ".join(str(p) for p in result.files.values()))
    return 0
