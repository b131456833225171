"""Plain-Python scores over gold and predicted labels, and an exact-match DSPy metric.

All comparisons go through :func:`normalize_answer`: surrounding whitespace, quotes and a final
period are dropped, whitespace is collapsed, case is ignored, and a lone option letter is
reduced to the letter, so ``"(a)" == "(A)" == "A" == "a."``. ``None`` (no parseable answer)
never equals anything.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Sequence

__all__ = [
    "normalize_answer",
    "accuracy",
    "majority_rate",
    "balanced_accuracy",
    "summarize",
    "exact_match",
]

_LETTER = re.compile(r"^\(?\s*([a-z])\s*\)?$")
_STRIP = " \t\r\n\"'`*“”‘’"


def normalize_answer(value: Any) -> str | None:
    """Comparable form of an answer; ``None`` stays ``None``."""
    if value is None:
        return None
    s = " ".join(str(value).split()).strip(_STRIP)
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip(_STRIP)
    s = s.casefold()
    m = _LETTER.match(s)
    return m.group(1) if m else s


def _pairs(golds: Sequence[Any], preds: Sequence[Any]) -> list[tuple[str | None, str | None]]:
    golds, preds = list(golds), list(preds)
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold labels but {len(preds)} predictions")
    return [(normalize_answer(g), normalize_answer(p)) for g, p in zip(golds, preds)]


def _same(g: str | None, p: str | None) -> bool:
    return g is not None and g == p


def accuracy(golds: Sequence[Any], preds: Sequence[Any]) -> float:
    """Share of predictions equal to their gold label (0.0 when there are none)."""
    pairs = _pairs(golds, preds)
    if not pairs:
        return 0.0
    return sum(_same(g, p) for g, p in pairs) / len(pairs)


def majority_rate(golds: Sequence[Any]) -> float:
    """Share of the most common gold label: the accuracy of always answering it."""
    counts = Counter(normalize_answer(g) for g in golds)
    total = sum(counts.values())
    return max(counts.values()) / total if total else 0.0


def balanced_accuracy(golds: Sequence[Any], preds: Sequence[Any]) -> float:
    """Mean over the distinct gold labels of the recall on that label (0.0 when empty).

    A constant answer scores 1/(number of gold labels), whatever the label balance.
    """
    pairs = _pairs(golds, preds)
    if not pairs:
        return 0.0
    seen: Counter = Counter()
    hit: Counter = Counter()
    for g, p in pairs:
        seen[g] += 1
        hit[g] += _same(g, p)
    return sum(hit[g] / seen[g] for g in seen) / len(seen)


def summarize(golds: Sequence[Any], preds: Sequence[Any]) -> dict:
    """``{"n", "accuracy", "balanced_accuracy", "majority_rate", "pred_distribution"}``.

    ``pred_distribution`` counts the predictions as given (``None`` for unparseable ones),
    most common first, as a plain dict.
    """
    preds = list(preds)
    golds = list(golds)
    acc = accuracy(golds, preds)
    return {
        "n": len(golds),
        "accuracy": acc,
        "balanced_accuracy": balanced_accuracy(golds, preds),
        "majority_rate": majority_rate(golds),
        "pred_distribution": dict(Counter(preds).most_common()),
    }


def exact_match(example: Any, prediction: Any, trace: Any = None) -> bool:
    """DSPy metric: every labelled field of ``example`` equals the prediction's, normalized.

    The labelled fields are the example's non-input fields (``example.labels()``). Usable with
    ``dspy.Evaluate`` and as an optimizer metric; returns a ``bool``.
    """
    labels = example.labels() if hasattr(example, "labels") else example
    keys = list(labels.keys())
    if not keys:
        raise ValueError("exact_match: the example has no labelled (non-input) fields")
    for key in keys:
        if isinstance(prediction, dict):
            got = prediction.get(key)
        else:
            try:
                got = prediction[key]
            except (KeyError, TypeError, AttributeError):
                got = getattr(prediction, key, None)
        if not _same(normalize_answer(labels[key]), normalize_answer(got)):
            return False
    return True


def evaluate_program(program: Any, examples: Sequence[Any], *, adapter: Any = None, threads: int = 1,
                     field: str = "answer") -> dict:
    """Run ``program`` on ``examples`` on its own LM and :func:`summarize` its ``field`` answers.

    An answer the adapter cannot parse counts as wrong (``None``); ``"unparsed"`` counts them.
    ``adapter`` (e.g. :class:`~dspy_greater.targets.adapter.GReaTerAdapter`) applies for this call only.
    """
    import contextlib

    import dspy

    context = dspy.context(adapter=adapter) if adapter is not None else contextlib.nullcontext()
    with context:
        result = dspy.Evaluate(devset=list(examples), metric=exact_match, num_threads=threads, display_progress=False,
                               provide_traceback=False, max_errors=len(examples) + 1)(program)
    answers = [prediction.get(field) if prediction is not None else None for _, prediction, _ in result.results]
    row = summarize([e[field] for e in examples], answers)
    row["unparsed"] = sum(a is None for a in answers)
    return row
