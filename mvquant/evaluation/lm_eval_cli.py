"""lm-eval's own CLI with the `mvquant` model registered and the bundled tasks on the include path:

    python -m mvquant.evaluation.lm_eval_cli run --model mvquant \\
        --model_args pretrained=smollm2-135m,disrupt=massive --tasks mvquant_contextual

(lm-eval 0.4.13 finds models only in its own registry, with no plugin entry point, so a plain
`lm_eval --model mvquant` cannot see a model that was never imported; this wrapper imports it.)
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    from . import register_lm_eval_model
    from .tasks import tasks_dir

    register_lm_eval_model()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in argv and any(a in ("run", "ls", "validate") for a in argv[:1]) or (
            "--include_path" not in argv and "--tasks" in argv):
        argv += ["--include_path", str(tasks_dir())]
    sys.argv = ["lm_eval"] + argv
    cli_evaluate()


if __name__ == "__main__":
    main()
