"""Programs with several predictors: each optimized in turn, labels from gold or from successful traces.

The search runs on the real embedded model with tiny settings; the target LM is a ``DummyLM`` whose
scripted answers decide which program runs pass the metric.
"""

import json

import dspy
import pytest
from dspy.utils import DummyLM

from dspy_greater import GReaTerTeleprompter
from dspy_greater.data import load_examples, split_examples
from dspy_greater.metrics import exact_match
from examples.two_step import PlanThenAnswer

@pytest.fixture(scope="module")
def data():
    train, val = split_examples(load_examples("navigate"), [4, 2], seed=5)
    return train, val


@pytest.fixture(scope="module")
def teleprompter(tiny_teleprompter):
    return tiny_teleprompter()


def _target(examples, wrong):
    """Step 1 answers "Plan number i: ..." for question i; step 2 answers the gold label unless i is in ``wrong``.

    Step 2's prompt holds the plan (and the question), step 1's only the question: the plan keys come first.
    """
    flip = {"Yes": "No", "No": "Yes"}
    step2 = {f"Plan number {i}:": {"reasoning": "Follow the plan.", "answer": flip[e.answer] if i in wrong else e.answer}
             for i, e in enumerate(examples)}
    step1 = {e.question: {"reasoning": "Read the steps.", "plan": f"Plan number {i}: add up the steps."}
             for i, e in enumerate(examples)}
    return DummyLM({**step2, **step1})


def test_two_predictors_first_learns_from_successful_traces(teleprompter, data, tmp_path):
    train, val = data
    student = PlanThenAnswer()
    before = json.dumps(student.dump_state(), sort_keys=True)
    target = _target(train + val, wrong={3, 5})  # 3 of 4 train runs and 1 of 2 valset runs pass
    with dspy.context(lm=target):
        optimized = teleprompter.compile(student, trainset=train, valset=val, checkpoint_dir=tmp_path)

    assert json.dumps(student.dump_state(), sort_keys=True) == before and not hasattr(student, "greater_results")
    results = optimized.greater_results
    assert list(results) == ["plan.predict", "solve.predict"]
    plan, solve = results["plan.predict"], results["solve.predict"]
    assert not plan.get("skipped") and not solve.get("skipped")

    # Predictor 1: labels are its own outputs in the runs that passed the metric.
    assert plan["labels"] == "traces"
    assert plan["program_runs"]["trainset"] == {"runs": 4, "passed": 3, "reached": 4, "errors": 0,
                                                "first_error": None, "examples": 3}
    assert plan["examples"] == {"train": 3, "heldout": 1}
    assert plan["extractor"]["field"] == "plan" and plan["extractor"]["kind"] == "text"
    # Predictor 2: gold labels, its `plan` input taken from every run that reached it.
    assert solve["labels"] == "gold" and solve["examples"] == {"train": 4, "heldout": 2}
    assert solve["extractor"]["kind"] == "choice"

    # Each final choice was made on the whole program's metric on the valset, on the target LM.
    for result, predictor in ((plan, optimized.plan.predict), (solve, optimized.solve.predict)):
        selection = result["target_selection"]
        assert selection["target_lm"] == "dspy.settings.lm"
        # Each candidate (the search's best and the program's own) runs the valset once, two calls a run:
        # every reply parsed at once.
        assert len(selection["scores"]) >= 2 and selection["calls"] == len(selection["scores"]) * len(val) * 2
        assert selection["estimated_calls"] == 2 * selection["calls"]  # at most: ChatAdapter may retry via JSONAdapter
        assert set(selection["scores"].values()) == {50.0}  # the DummyLM ignores the instruction
        assert predictor.signature.instructions == selection["chosen"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.predict.json", "solve.predict.json"]
    json.dumps(results)  # plain data

    # The optimized program still runs on its target.
    with dspy.context(lm=_target(train, wrong=set())):
        assert optimized(question=train[0].question).answer == train[0].answer


def test_first_predictor_skipped_when_no_trace_succeeds(teleprompter, data):
    train, val = data
    with dspy.context(lm=_target(train + val, wrong=set(range(6)))):
        optimized = teleprompter.compile(PlanThenAnswer(), trainset=train, valset=val)
    plan, solve = optimized.greater_results["plan.predict"], optimized.greater_results["solve.predict"]
    assert plan["skipped"] is True
    assert plan["reason"].startswith("no run of the program passed the metric, so it has no labelled examples")
    assert "4 runs on trainset, 0 passed the metric, 4 reached this predictor" in plan["reason"]
    assert optimized.plan.predict.signature.instructions == PlanThenAnswer().plan.predict.signature.instructions
    assert not solve.get("skipped") and solve["labels"] == "gold" and solve["examples"]["train"] == 4


def test_predictor_with_gold_inputs_and_labels_needs_no_target(teleprompter, data):
    """No target LM: a History predictor is skipped; the last one (inputs and labels in trainset) is optimized."""

    class Chat(dspy.Signature):
        question: str = dspy.InputField()
        history: dspy.History = dspy.InputField()
        reply: str = dspy.OutputField()

    class Program(dspy.Module):
        def __init__(self):
            super().__init__()
            self.chat = dspy.Predict(Chat)
            self.answer = dspy.ChainOfThought("question -> answer")

    train, val = data
    optimized = teleprompter.compile(Program(), trainset=train, valset=val)
    chat, answer = optimized.greater_results["chat"], optimized.greater_results["answer.predict"]
    assert chat["skipped"] and "dspy.History" in chat["reason"]
    assert answer["labels"] == "gold" and "program_runs" not in answer and "target_selection" not in answer
    assert optimized.answer.predict.signature.instructions == answer["best_instruction"]


def test_ctrl_c_while_the_program_runs_returns_a_program(data, monkeypatch):
    """Ctrl-C during the runs that collect labels: nothing is lost, every later predictor is left as it is."""

    def interrupted(self, program, examples):
        raise KeyboardInterrupt

    monkeypatch.setattr(GReaTerTeleprompter, "_run_program", interrupted)
    train, _ = data
    tp = GReaTerTeleprompter(metric=exact_match, progress=False)
    with dspy.context(lm=_target(train, wrong=set())):
        optimized = tp.compile(PlanThenAnswer(), trainset=train)
    results = optimized.greater_results
    assert [r["skipped"] for r in results.values()] == [True, True]
    assert all("interrupted (Ctrl-C)" in r["reason"] for r in results.values())
    assert tp._lm is None  # the optimizer model was never needed


def test_interrupted_in_the_second_predictor_resumes_to_the_same_end(tiny_teleprompter, data, tmp_path):
    """Ctrl-C after the second predictor's first step; the rerun with the same checkpoint folder
    ends where an uninterrupted run ends (the first predictor is restored from its finished checkpoint)."""
    import logging

    train, val = data
    teleprompter = tiny_teleprompter(num_steps=2, keep_current=False)

    def compile_once(folder):
        with dspy.context(lm=_target(train + val, wrong={3, 5})):
            return teleprompter.compile(PlanThenAnswer(), trainset=train, valset=val, checkpoint_dir=folder)

    uninterrupted = compile_once(tmp_path / "straight").greater_results

    class InterruptSecondPredictor(logging.Handler):
        seen = 0

        def emit(self, record):
            if record.getMessage().startswith("step 0 "):
                InterruptSecondPredictor.seen += 1
                if InterruptSecondPredictor.seen == 2:
                    raise KeyboardInterrupt

    log = logging.getLogger("dspy_greater.teleprompter")
    handler, level, disabled, previous_disable = InterruptSecondPredictor(), log.level, log.disabled, logging.root.manager.disable
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.disabled = False
    logging.disable(logging.NOTSET)
    try:
        stopped = compile_once(tmp_path / "resumable").greater_results
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.disabled = disabled
        logging.disable(previous_disable)
    assert stopped["plan.predict"]["stopped_reason"] == "completed"
    assert stopped["solve.predict"]["stopped_reason"] == "interrupted" and len(stopped["solve.predict"]["trace"]) == 1

    resumed = compile_once(tmp_path / "resumable").greater_results
    assert resumed["plan.predict"]["resumed_at_step"] == 2  # finished before: restored, no step redone
    assert resumed["solve.predict"]["resumed_at_step"] == 1
    for name in ("plan.predict", "solve.predict"):
        assert [s["instruction"] for s in resumed[name]["trace"]] == [s["instruction"] for s in uninterrupted[name]["trace"]]
        assert resumed[name]["best_instruction"] == uninterrupted[name]["best_instruction"]
        assert resumed[name]["target_selection"]["chosen"] == uninterrupted[name]["target_selection"]["chosen"]
