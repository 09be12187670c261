"""Evaluation: the bundled contextual-vs-parametric suite through lm-eval, and massive-value disruption.

lm-eval is imported only when an evaluation runs (it costs seconds), not on `import mvquant`.
"""
from .disruption import Disruption, disrupt, mean_replace_


def evaluate(*args, **kwargs):
    from .runner import evaluate as _evaluate
    return _evaluate(*args, **kwargs)


evaluate.__doc__ = "See mvquant.evaluation.runner.evaluate."


def register_lm_eval_model():
    """Register the lm-eval model 'mvquant' (imports lm-eval)."""
    from . import lm  # noqa: F401  (the @register_model decorator runs on import)
    return lm.MvquantLM


__all__ = ["evaluate", "disrupt", "Disruption", "mean_replace_", "register_lm_eval_model"]
