"""The same seeded compiles give the same search before and after a refactor.

``tests/data/recorded_traces.json`` holds the trace (per step: position, candidates, finalists'
scores, chosen token, loss, instruction) of two small seeded compiles on the embedded model: one
predictor in GReaTer's layout, and a two-predictor program. Regenerate it only when a change is
meant to alter the search: ``python tests/test_trace_equivalence.py --record``.
"""

from __future__ import annotations

import json
import pathlib
import sys

import dspy
import pytest

RECORDED = pathlib.Path(__file__).parent / "data" / "recorded_traces.json"
SETTINGS = dict(num_steps=2, batch_size=3, max_reasoning_tokens=8, eval_every=2, progress=False,
                target_candidates=2, num_threads=1)


class _TwoSteps(dspy.Module):
    def __init__(self):
        super().__init__()
        self.first = dspy.ChainOfThought("question -> answer")
        self.second = dspy.Predict("question -> answer")

    def forward(self, question):
        return self.second(question=question)


def _compiles(model, tokenizer) -> dict:
    from dspy_greater import GReaTerTeleprompter
    from dspy_greater.data import load_examples
    from dspy_greater.metrics import exact_match

    rows = load_examples("navigate")[:10]
    traces = {}
    for name, program in (("one", dspy.ChainOfThought("question -> answer")), ("two", _TwoSteps())):
        teleprompter = GReaTerTeleprompter(metric=exact_match, seed=1, **SETTINGS).use_loaded_model(model, tokenizer)
        compiled = teleprompter.compile(program, trainset=rows[:6], valset=rows[6:9])
        traces[name] = {
            predictor: {
                "initial": result["initial_instruction"],
                "best": result["best_instruction"],
                "steps": [_step(record) for record in result["trace"]],
            }
            for predictor, result in sorted(compiled.greater_results.items())
        }
    return traces


def _step(record: dict) -> dict:
    return {
        "position": record["position"],
        "candidates": record["candidates"],
        "finalists": [{k: f[k] for k in sorted(f) if k in ("token", "mistake_rate", "answer_loss", "score")}
                      for f in record["finalists"]],
        "chosen": record["chosen"],
        "loss": record["loss"],
        "instruction": record["instruction"],
    }


def _close(recorded, now, path="") -> None:
    if isinstance(recorded, float) or isinstance(now, float):
        assert now == pytest.approx(recorded, rel=1e-3, abs=1e-4), path
    elif isinstance(recorded, dict):
        assert sorted(recorded) == sorted(now), path
        for key in recorded:
            _close(recorded[key], now[key], f"{path}.{key}")
    elif isinstance(recorded, list):
        assert len(recorded) == len(now), path
        for i, (a, b) in enumerate(zip(recorded, now)):
            _close(a, b, f"{path}[{i}]")
    else:
        assert recorded == now, path


@pytest.mark.slow
def test_seeded_compiles_search_as_recorded(optimizer):
    _close(json.loads(RECORDED.read_text()), _compiles(*optimizer))


if __name__ == "__main__" and "--record" in sys.argv:
    from dspy_greater.models.loading import load_optimizer_model

    RECORDED.write_text(json.dumps(_compiles(*load_optimizer_model()), indent=1) + "\n")
    print(f"wrote {RECORDED}")
