"""Accuracy with uncertainty: small pure functions."""
from __future__ import annotations

import math
from typing import Sequence


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std with n-1, over sqrt(n)); stderr 0 for n < 2."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (sane at 0 and 1, unlike mean +- 2 se)."""
    if n <= 0:
        raise ValueError("n must be positive")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)
    hi = 1.0 if successes >= n else min(1.0, centre + half)   # exact ends despite rounding
    return lo, hi


def macro_average(accs: Sequence[float], stderrs: Sequence[float]) -> tuple[float, float]:
    """Unweighted mean of task accuracies; stderr of that mean for independent tasks."""
    k = len(accs)
    if k == 0:
        raise ValueError("no tasks")
    return sum(accs) / k, math.sqrt(sum(s * s for s in stderrs)) / k


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of a - b over the same items, with its standard error (paired: item difficulty cancels)."""
    if len(a) != len(b):
        raise ValueError("paired scores need the same items")
    return mean_stderr([x - y for x, y in zip(a, b)])
