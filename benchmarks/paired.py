"""A paired bootstrap of the accuracy difference between two systems on the same examples."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from dspy_greater.metrics import normalize_answer


def paired_difference(golds: Sequence[Any], preds_a: Sequence[Any], preds_b: Sequence[Any], *,
                      resamples: int = 2000, seed: int = 0) -> dict:
    """Accuracy of ``preds_a`` minus that of ``preds_b`` on the same examples, with a paired
    bootstrap 95% interval (examples resampled with replacement, both systems on the same draw).

    Returns ``{"difference", "low", "high", "a_only", "b_only"}``: the last two count the examples
    only one of the two gets right (the rest agree and do not move the difference).
    """
    golds, preds_a, preds_b = list(golds), list(preds_a), list(preds_b)
    if not len(golds) == len(preds_a) == len(preds_b):
        raise ValueError(f"{len(golds)} gold labels but {len(preds_a)} and {len(preds_b)} predictions")
    gold = [normalize_answer(g) for g in golds]
    right_a = [g is not None and g == normalize_answer(p) for g, p in zip(gold, preds_a)]
    right_b = [g is not None and g == normalize_answer(p) for g, p in zip(gold, preds_b)]
    n = len(right_a)
    if n == 0:
        return {"difference": 0.0, "low": 0.0, "high": 0.0, "a_only": 0, "b_only": 0}
    deltas = [int(a) - int(b) for a, b in zip(right_a, right_b)]
    rng = random.Random(seed)
    draws = sorted(sum(rng.choices(deltas, k=n)) / n for _ in range(resamples))
    return {
        "difference": sum(deltas) / n,
        "low": draws[int(0.025 * (resamples - 1))],
        "high": draws[int(0.975 * (resamples - 1))],
        "a_only": deltas.count(1),
        "b_only": deltas.count(-1),
    }
