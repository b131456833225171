"""What a compile returns about each predictor: typed results, and the plain data on the program.

``program.greater_results`` maps each predictor's name to ``result.to_dict()`` (JSON data);
``program.score`` and ``program.candidate_programs`` sit where DSPy's own optimizers put theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import dspy

from dspy_greater.engine.search import SearchResult
from dspy_greater.targets.adapter import keep_extractor


@dataclass(frozen=True)
class TargetSelection:
    """The best instructions scored on the valset on the target LM with the metric.

    Attributes:
        candidates: The instructions scored, in order (the search's best first; the program's own last).
        scores: Metric score (percent, as ``dspy.Evaluate`` reports it) per instruction that ran.
        errors: Why an instruction got no score (LM failures, a raising metric, a target that is down).
        unparsed: How many replies the adapter could not parse, per instruction (counted as wrong).
        chosen: The instruction with the best score (the search's best when none scored).
        baseline: The program's own instruction's score.
        estimated_calls: The most target-LM calls the selection could take (told before it ran).
        calls: Target-LM calls that returned (cache hits included).
        tokens: Their total tokens, from DSPy's usage tracker (cache hits cost none).
        target_lm: ``"predictor.lm"`` or ``"dspy.settings.lm"``.
        target_model: The target LM's model name.
    """

    candidates: tuple[str, ...]
    scores: dict[str, float]
    errors: dict[str, str]
    unparsed: dict[str, int]
    chosen: str
    baseline: float | None
    estimated_calls: int
    calls: int
    tokens: int
    target_lm: str
    target_model: str

    def to_dict(self) -> dict:
        return {"candidates": list(self.candidates), "scores": dict(self.scores), "errors": dict(self.errors),
                "unparsed": dict(self.unparsed), "chosen": self.chosen, "baseline": self.baseline,
                "estimated_calls": self.estimated_calls, "calls": self.calls, "tokens": self.tokens,
                "target_lm": self.target_lm, "target_model": self.target_model}


@dataclass(frozen=True)
class PredictorResult:
    """One optimized predictor.

    Attributes:
        search: The search's own result (instructions, held-out scores, trace).
        instruction: The instruction written into the returned program.
        program_instruction: The program's own instruction (the baseline).
        extractor: The answer format searched with: ``{"field", "kind", "text", "choices"}``.
        layout: The layout searched in: ``{"name", "adapter", "reason"}``.
        labels: ``"gold"`` (the trainset's labels) or ``"traces"`` (outputs of passing program runs).
        examples: How many examples the search trained and was checked on: ``{"train", "heldout"}``.
        program_heldout: The program's own instruction on the held-out examples, when the search
            started elsewhere.
        target_selection: The choice on the target LM, when one was made.
        program_runs: Counts of the program runs that supplied labels or inputs, per set.
    """

    search: SearchResult
    instruction: str
    program_instruction: str
    extractor: dict
    layout: dict
    labels: str
    examples: dict
    program_heldout: dict | None = None
    target_selection: TargetSelection | None = None
    program_runs: dict | None = None

    skipped = False

    def to_dict(self) -> dict:
        data = self.search.to_dict()
        data.update(instruction=self.instruction, program_instruction=self.program_instruction,
                    extractor=dict(self.extractor), layout=dict(self.layout), labels=self.labels,
                    examples=dict(self.examples))
        if self.program_heldout is not None:
            data["program_heldout"] = dict(self.program_heldout)
        if self.target_selection is not None:
            data["target_selection"] = self.target_selection.to_dict()
        if self.program_runs is not None:
            data["program_runs"] = dict(self.program_runs)
        return data


@dataclass(frozen=True)
class SkippedPredictor:
    """A predictor left as it was, and why."""

    reason: str
    instruction: str

    skipped = True

    def to_dict(self) -> dict:
        return {"skipped": True, "reason": self.reason, "instruction": self.instruction}


def attach(program: dspy.Module, results: dict[str, PredictorResult | SkippedPredictor]) -> None:
    """Put the results on ``program``: ``greater_results`` (plain data), each optimized predictor's
    extractor in its saved state, and ``score`` / ``candidate_programs``."""
    program.greater_results = {name: result.to_dict() for name, result in results.items()}
    predictors = dict(program.named_predictors())
    for name, result in results.items():
        if not result.skipped and name in predictors:
            # A saved and loaded program replays the prompts GReaTerAdapter.from_program builds for this one.
            keep_extractor(predictors[name], result.extractor)
    _attach_scores(program, results)


def _attach_scores(program: dspy.Module, results: dict[str, PredictorResult | SkippedPredictor]) -> None:
    """``score`` and ``candidate_programs`` where DSPy's optimizers put them, as plain data on one scale
    (percent: target-LM scores from ``dspy.Evaluate``, else held-out accuracy on the optimizer model).

    ``candidate_programs`` lists each scored instruction as ``{"predictor", "instruction", "score",
    "scored_on"}``, best first; programs themselves are not attached (they would join the returned
    program's parameters and its saved state).
    """
    candidates = []
    for name, result in results.items():
        if result.skipped:
            continue
        selection = result.target_selection
        if selection is not None and selection.scores:
            scored = [(text, score, "target") for text, score in selection.scores.items()]
        else:
            scored = [(t["instruction"], 100 * t["accuracy"], "held-out") for t in result.search.top_instructions]
            if result.program_heldout:
                scored.append((result.program_instruction, 100 * result.program_heldout["accuracy"], "held-out"))
        candidates += [{"predictor": name, "instruction": text, "score": score, "scored_on": where}
                       for text, score, where in scored]
    candidates.sort(key=lambda c: -c["score"])
    program.candidate_programs = candidates
    chosen = {n: p.signature.instructions for n, p in program.named_predictors()}
    mine = [c["score"] for c in candidates if chosen.get(c["predictor"]) == c["instruction"]]
    program.score = mine[-1] if mine else None
