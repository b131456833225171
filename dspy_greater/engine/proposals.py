"""The paper's proposal rule: candidate tokens for one position from each example's next-token distribution.

Each example proposes its top-k allowed tokens; the candidates are the union, over random subsets of
examples, of the tokens every example of the subset proposes. When too few survive, k grows.
"""

from __future__ import annotations

import math
import random

import torch

from dspy_greater.engine.config import GreaterConfig


def intersect_candidates(
    topk_sets: list[set[int]], *, q: int, subset_size: int, rng: random.Random
) -> set[int]:
    """Union over ``q`` random subsets of examples of the intersection of their top-k sets."""
    union: set[int] = set()
    size = min(subset_size, len(topk_sets))
    for _ in range(q):
        union |= set.intersection(*rng.sample(topk_sets, size))
    return union


def candidates_from_logprobs(
    logprobs: torch.Tensor, allowed: torch.Tensor, current: int | None, config: GreaterConfig, rng: random.Random
) -> list[int]:
    """Candidate tokens (never ``current``) by the proposal rule, most likely first (summed
    log-probability over the examples), then ``current`` when there is one.

    Args:
        logprobs: Each example's next-token log-probabilities, ``[examples, vocab]``.
        allowed: Boolean mask of the tokens that may be proposed here.
        current: The token the position holds now (``None`` past the instruction's end).
    """
    width = min(len(allowed), logprobs.shape[1])
    logprobs = logprobs[:, :width].masked_fill(~allowed[:width], -math.inf)
    k = config.topk
    while True:
        top = logprobs.topk(min(k, int(allowed.sum())), dim=-1).indices.tolist()
        found = intersect_candidates(
            [set(row) for row in top], q=config.intersect_q, subset_size=config.intersect_size, rng=rng
        )
        found.discard(current)
        if len(found) >= config.min_candidates or k >= int(allowed.sum()):
            break
        k += config.topk_growth
    total = logprobs.sum(0)
    ordered = sorted(found, key=lambda t: -float(total[t]))
    return ordered + ([current] if current is not None else [])
