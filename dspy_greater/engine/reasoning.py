"""The optimizer model's own reasoning per example and instruction, generated once and kept.

GReaTer scores the gold answer *after* the model's reasoning, so every instruction the search
scores needs each example's reasoning under it; the gradient and the finalists of a step reuse it.
"""

from __future__ import annotations

import torch

from dspy_greater.engine.config import GreaterConfig
from dspy_greater.engine.layout import GreaterLayout
from dspy_greater.engine.model import OptimizerLM
from dspy_greater.engine.records import SearchExample


class ReasoningCache:
    """Reasoning token ids keyed by ``(inputs_text, instruction ids)``; missing ones are generated.

    Args:
        rng: Draws sampled reasoning (``config.reasoning_temperature > 0``).
    """

    def __init__(self, lm: OptimizerLM, layout: GreaterLayout, config: GreaterConfig, rng: torch.Generator):
        self.lm = lm
        self.layout = layout
        self.config = config
        self.rng = rng
        self.stored: dict[tuple[str, tuple[int, ...]], list[int]] = {}

    def under_each(
        self, instructions: list[list[int]], examples: list[SearchExample], pool: list[SearchExample] = ()
    ) -> list[list[list[int]]]:
        """Each example's reasoning under each instruction, with whatever is missing generated in one
        call (a generation batch may hold rows of different instructions).

        Args:
            pool: Examples that later steps may need. When a generation batch has room left (it runs
                up to the model batch size), it is filled with pool examples that have no reasoning
                under the instructions yet: generating a token reads the weights once for the whole
                batch, so extra rows cost little now and save a batch of their own later. Not done
                with a generation server (``lm.generator``), which serves one request at a time.
        """
        if not self.layout.reasons:  # the layout answers right away (a ChatAdapter reply without reasoning)
            return [[[] for _ in examples] for _ in instructions]
        keys = [tuple(i) for i in instructions]
        missing = self._lacking(keys, examples)
        if missing:
            room = 0 if self.lm.generator is not None else -len(missing) % self.lm.batch_size
            missing += [pair for pair in self._lacking(keys, pool) if pair not in missing][:room]
            self._generate(missing)
        return [[self.stored[(ex.inputs_text, key)] for ex in examples] for key in keys]

    def _lacking(self, keys: list[tuple[int, ...]], group: list[SearchExample]) -> list[tuple[tuple[int, ...], SearchExample]]:
        return [(key, ex) for key in dict.fromkeys(keys) for ex in dict.fromkeys(group)
                if (ex.inputs_text, key) not in self.stored]

    def _generate(self, missing: list[tuple[tuple[int, ...], SearchExample]]) -> None:
        prompts = [self.layout.prompt(ex.inputs_text, list(key)) for key, ex in missing]
        stops = {"stop_strings": list(self.layout.stop_strings)} if self.layout.stop_strings else {}
        stored = {"context_lengths": [p.instruction_start for p in prompts]} if self.config.prefix_cache else {}
        outputs = self.lm.generate(
            [p.ids for p in prompts], max_new_tokens=self.config.max_reasoning_tokens,
            temperature=self.config.reasoning_temperature, rng=self.rng, **stops, **stored,
        )
        for (key, ex), out in zip(missing, outputs):
            self.stored[(ex.inputs_text, key)] = self.layout.finish_reasoning(out)
