"""Labelled examples for a predictor whose labels or inputs are not in the trainset: runs of the
whole program on the target LM, each traced, kept when the program's result passes the metric."""

from __future__ import annotations

import logging

import dspy

from dspy_greater.planning import Plan
from dspy_greater.validation import SCALAR_TYPES

logger = logging.getLogger(__name__)


class Run:
    """One run of the program on one example: its prediction, trace, each predictor's calls, and
    whether it passed the metric."""

    __slots__ = ("prediction", "trace", "calls", "error", "passed")

    def __init__(self, prediction, trace, calls, error):
        self.prediction, self.trace, self.calls, self.error, self.passed = prediction, trace, calls, error, False


class Runs:
    """Runs of the program on a set of examples, turned into labelled examples for one predictor."""

    def __init__(self, runs: list[tuple[dspy.Example, Run]]):
        self.runs = runs

    def examples(self, plan: Plan) -> list[dspy.Example]:
        """Gold labels: the predictor's inputs in each run (its last call) with the example's label.
        Otherwise: every call of the predictor in the runs that passed the metric (inputs -> its output)."""
        found = []
        for example, run in self.runs:
            calls = [(inputs, outputs) for name, inputs, outputs in run.calls if name == plan.name]
            if not calls:
                continue
            if plan.gold:
                pairs = [(calls[-1][0], example[plan.output])]
            elif run.passed:
                pairs = [(inputs, getattr(outputs, "get", lambda _: None)(plan.output)) for inputs, outputs in calls]
            else:
                continue
            for inputs, label in pairs:
                if not isinstance(label, SCALAR_TYPES) or not str(label).strip():
                    continue
                if any(not isinstance(inputs.get(f), SCALAR_TYPES) for f in plan.inputs):
                    continue
                found.append(dspy.Example({f: inputs[f] for f in plan.inputs}, **{plan.output: label})
                             .with_inputs(*plan.inputs))
        return found

    def summary(self, plan: Plan) -> dict:
        errors = [run.error for _, run in self.runs if run.error]
        return {"runs": len(self.runs), "passed": sum(run.passed for _, run in self.runs),
                "reached": sum(any(name == plan.name for name, _, _ in run.calls) for _, run in self.runs),
                "errors": len(errors), "first_error": errors[0] if errors else None,
                "examples": len(self.examples(plan))}

    def why_empty(self, plan: Plan) -> str:
        """Why no labelled example came out of these runs, with their counts."""
        summary = self.summary(plan)
        why = "no run of the program passed the metric" if not plan.gold else "no run of the program reached this predictor"
        detail = (f"{summary['runs']} runs on trainset, {summary['passed']} passed the metric, "
                  f"{summary['reached']} reached this predictor, {summary['errors']} raised")
        if summary["first_error"]:
            detail += f" (first error: {summary['first_error']})"
        return f"{why}, so it has no labelled examples ({detail})."


def run_program(program: dspy.Module, examples: list, metric, *, num_threads: int, progress: bool) -> Runs:
    """Run ``program`` on ``examples`` on its target LM, recording each run's trace and whether it passed ``metric``."""
    names = {id(p): n for n, p in program.named_predictors()}

    def traced(**inputs):
        with dspy.context(trace=[]):
            try:
                prediction, error = program(**inputs), None
            except Exception as exc:  # a failing run is data here, not a reason to stop
                prediction, error = None, f"{type(exc).__name__}: {exc}"
            trace = list(dspy.settings.trace)
        return Run(prediction, trace, [(names.get(id(p)), dict(i), o) for p, i, o in trace], error)

    def passes(example, run, trace=None):
        if not isinstance(run, Run) or run.prediction is None or metric is None:
            return False
        try:
            score = metric(example, run.prediction, run.trace)
            run.passed = bool(getattr(score, "score", score))  # a dspy.Prediction(score=..., feedback=...) too
        except Exception as exc:
            run.error = f"the metric raised {type(exc).__name__}: {exc}"
            run.passed = False
        return run.passed

    logger.info("Running the program on %d examples on the target LM to collect traces.", len(examples))
    evaluate = dspy.Evaluate(devset=list(examples), metric=passes, num_threads=num_threads,
                             display_progress=progress, provide_traceback=False, max_errors=len(examples) + 1)
    outcome = evaluate(traced)
    return Runs([(example, run) for example, run, _ in outcome.results if isinstance(run, Run)])
