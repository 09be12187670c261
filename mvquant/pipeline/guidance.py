"""What protecting the massive rows was measured to do, per method and width: `quantize` warns when
the combination asked for was measured to lose contextual skill. One table, filled from committed
runs (recipes/figure5.yaml and recipes/gemma3-270m-figure5.yaml, n = 100 items per task, contrasts
paired on the same items), so the warning names its evidence."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measurement:
    method: str
    bits: int
    model: str
    contextual: float                 # protected minus unprotected, contextual points
    ci95: tuple[float, float]
    source: str


# Only combinations whose 95% interval lies below zero; where protection helped or did not move
# accuracy measurably (RTN w3, GPTQ w3 on SmolLM2; GPTQ w4 on Gemma; the rest) there is nothing to warn.
HURT = (
    # massive rows, not any rows: as many random rows cost -6.4 [-10.1, -2.7], massive - random -13.6 [-17.6, -9.5]
    Measurement("awq", 3, "SmolLM2-135M-Instruct", -20.0, (-23.4, -16.6), "evals/results/figure5 (awq-w3-massive vs awq-w3)"),
    Measurement("gptq", 4, "SmolLM2-135M-Instruct", -2.0, (-3.8, -0.2), "evals/results/figure5 (gptq-w4-massive vs gptq-w4)"),
)


def protection_warning(method: str, bits: int, protect: str) -> str | None:
    """One line for `quantize` when --protect massive with this method and width was measured to hurt."""
    if protect != "massive":
        return None
    hits = [m for m in HURT if m.method == method and m.bits == bits]
    if not hits:
        return None
    said = "; ".join(f"{m.contextual:+.1f} [{m.ci95[0]:+.1f}, {m.ci95[1]:+.1f}] contextual points on {m.model} "
                     f"({m.source})" for m in hits)
    return (f"--protect massive with --method {method} --bits {bits} was measured to cost contextual skill: {said}; "
            "results may differ on your model (see recipes/README.md for the measured combinations)")
