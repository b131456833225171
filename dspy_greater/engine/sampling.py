"""Sampled generation drawn from a local :class:`torch.Generator`, so that no global random state is used.

``model.generate(do_sample=True)`` draws from torch's global generator. Instead, generation runs
greedy with :class:`LocalSampler` as its last logits processor: it reshapes the scores as sampling
would (temperature, top-k, top-p), draws the next token with the caller's generator, and leaves
only that token possible, so that the greedy pick is the drawn token.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

#: The top-k ``generate`` samples with when the model's generation config sets none.
DEFAULT_TOP_K = 50


class LocalSampler(LogitsProcessor):
    """Draws each row's next token with ``rng`` from the warped distribution.

    Args:
        rng: The generator (on any device) that draws one uniform number per row and token.
        temperature: Divides the logits (> 0).
        top_k: Keep only the ``top_k`` likeliest tokens (``0`` or ``None``: all).
        top_p: Keep the smallest set of likeliest tokens whose probability reaches ``top_p``.
    """

    def __init__(self, rng: torch.Generator, *, temperature: float, top_k: int | None, top_p: float):
        self.rng = rng
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(self.warpers(input_ids, scores).float(), dim=-1)
        cdf = probs.cumsum(-1)
        draws = torch.rand(len(probs), generator=self.rng, device=self.rng.device).to(probs.device)
        # The first token whose cumulative probability exceeds the draw: never one of probability 0.
        drawn = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).squeeze(1)
        last_possible = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1)
        drawn = torch.minimum(drawn, last_possible)  # a draw rounded up to the total
        only = torch.full_like(scores, -float("inf"))
        return only.scatter_(1, drawn[:, None], 0.0)
