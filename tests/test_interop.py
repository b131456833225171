"""GReaTer next to the rest of DSPy: saving, BootstrapFewShot after it, BetterTogether around it, get_params.

The target LM is a ``DummyLM`` wherever the target is beside the point; the search itself runs on
the real embedded model with tiny settings.
"""

import json

import dspy
import pytest
from dspy.utils import DummyLM

from dspy_greater import GReaTerTeleprompter
from dspy_greater.data import load_examples, split_examples
from dspy_greater.metrics import exact_match

@pytest.fixture(scope="module")
def navigate():
    train, val = split_examples(load_examples("navigate"), [4, 2], seed=3)
    return train, val


@pytest.fixture(scope="module")
def teleprompter(tiny_teleprompter):
    return tiny_teleprompter(keep_current=False)


@pytest.fixture(scope="module")
def optimized(teleprompter, navigate):
    train, val = navigate
    program = teleprompter.compile(dspy.ChainOfThought("question -> answer"), trainset=train, valset=val)
    # keep_current=False always replaces the token: the instruction differs from DSPy's default.
    assert program.predict.signature.instructions != dspy.ChainOfThought("question -> answer").predict.signature.instructions
    return program


def _oracle(examples, wrong=()):
    """A DummyLM answering each question with its gold label (or the other label for indices in ``wrong``)."""
    answers = {}
    for i, e in enumerate(examples):
        label = e.answer if i not in wrong else {"Yes": "No", "No": "Yes"}[e.answer]
        answers[e.question] = {"reasoning": "Count the steps.", "answer": label}
    return answers


class LaunchableDummyLM(DummyLM):
    """DummyLM with the no-op ``launch``/``kill`` that ``dspy.LM`` has and BetterTogether calls on every LM."""

    def launch(self, launch_kwargs=None):
        pass

    def kill(self, launch_kwargs=None):
        pass


def test_save_load_keeps_the_instruction_in_both_formats(optimized, tmp_path):
    instruction = optimized.predict.signature.instructions
    state = tmp_path / "program.json"
    optimized.save(str(state))
    fresh = dspy.ChainOfThought("question -> answer")
    fresh.load(str(state))
    assert fresh.predict.signature.instructions == instruction

    whole = tmp_path / "program_dir"
    optimized.save(str(whole), save_program=True)  # the whole module via cloudpickle
    loaded = dspy.load(str(whole), allow_pickle=True)
    assert loaded.predict.signature.instructions == instruction
    assert loaded.greater_results["predict"]["best_instruction"] == instruction  # plain data travels along


def test_bootstrap_few_shot_after_greater_keeps_the_instruction(optimized, navigate):
    train, _ = navigate
    instruction = optimized.predict.signature.instructions
    with dspy.context(lm=DummyLM(_oracle(train))):
        with_demos = dspy.BootstrapFewShot(metric=exact_match, max_bootstrapped_demos=2, max_labeled_demos=0,
                                           max_rounds=1).compile(optimized, trainset=train)
    assert with_demos.predict.signature.instructions == instruction
    assert len(with_demos.predict.demos) == 2
    assert {d["answer"] for d in with_demos.predict.demos} <= {"Yes", "No"}
    assert optimized.predict.demos == []  # BootstrapFewShot worked on its own copy


def test_better_together_takes_greater_as_its_prompt_optimizer(teleprompter, navigate):
    train, val = navigate
    lm = LaunchableDummyLM(_oracle(train + val, wrong={len(train)}))
    student = dspy.ChainOfThought("question -> answer")
    student.set_lm(lm)  # BetterTogether requires every predictor to have its own LM
    optimizer = dspy.BetterTogether(
        metric=exact_match,
        p=teleprompter,
        f=dspy.BootstrapFewShot(metric=exact_match, max_bootstrapped_demos=1, max_labeled_demos=0, max_rounds=1),
    )
    result = optimizer.compile(student, trainset=train, valset=val, strategy="p -> f", seed=0, num_threads=1)
    assert result.flag_compilation_error_occurred is False
    by_strategy = {c["strategy"]: c["program"] for c in result.candidate_programs}
    assert set(by_strategy) == {"", "p", "p -> f"}
    greater = by_strategy["p"]
    instruction = greater.predict.signature.instructions
    assert instruction == greater.greater_results["predict"]["best_instruction"] or \
        instruction == greater.greater_results["predict"]["target_selection"]["chosen"]
    # GReaTer scored its candidates on the predictor's own LM (set by set_lm), as BetterTogether expects.
    assert greater.greater_results["predict"]["target_selection"]["target_lm"] == "predictor.lm"
    chained = by_strategy["p -> f"]
    assert chained.predict.signature.instructions == instruction and len(chained.predict.demos) == 1
    assert student.predict.signature.instructions != instruction  # the student itself was left alone


def test_get_params_is_plain_json(teleprompter):
    params = teleprompter.get_params()
    back = json.loads(json.dumps(params))
    assert back["config"]["num_steps"] == 1
    assert back["metric"] == "exact_match"
    assert back["model"]["name_or_path"] is None
    # MLflow autolog updates the returned dict with the compile arguments: that must not touch the optimizer.
    params["config"]["num_steps"] = 99
    params["trainset"] = ["..."]
    assert teleprompter.config.num_steps == 1 and "trainset" not in teleprompter.get_params()


def test_get_params_names_callables_and_objects():
    from dspy_greater.engine.extractor import Extractor

    tp = GReaTerTeleprompter(metric=lambda example, prediction, trace=None: True,
                             extractor=Extractor("choice", "\nTherefore, the answer (Yes or No) is", ("Yes", "No")),
                             device_map={"model": "cpu"}, progress=False)
    back = json.loads(json.dumps(tp.get_params()))
    assert back["metric"] == "<lambda>"
    assert back["extractor"] == {"kind": "choice", "text": "\nTherefore, the answer (Yes or No) is",
                                 "choices": ["Yes", "No"]}
    assert back["model"]["device_map"] == {"model": "cpu"}
