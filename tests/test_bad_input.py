"""Every kind of bad input fails with a clear message before the model loads or a step runs."""

import dspy
import pytest

import dspy_greater.teleprompter as tp_module
from dspy_greater import GReaTerTeleprompter
from dspy_greater.models.loading import ModelNotFoundError
from dspy_greater.metrics import exact_match


def _example(question="Take 1 step. Do you return?", answer="No"):
    return dspy.Example(question=question, answer=answer).with_inputs("question")


@pytest.fixture
def tp(no_model):
    return GReaTerTeleprompter(metric=exact_match, progress=False)


def test_empty_trainset(tp):
    with pytest.raises(ValueError, match="trainset is empty"):
        tp.compile(dspy.ChainOfThought("question -> answer"), trainset=[])


def test_trainset_not_a_list(tp):
    with pytest.raises(TypeError, match="list of dspy.Example"):
        tp.compile(dspy.ChainOfThought("question -> answer"), trainset="navigate")


def test_example_without_with_inputs(tp):
    bare = dspy.Example(question="Is it?", answer="Yes")
    with pytest.raises(ValueError, match=r"with_inputs\('question'\)"):
        tp.compile(dspy.ChainOfThought("question -> answer"), trainset=[_example(), bare])


def test_label_missing_output_field(tp):
    unlabeled = dspy.Example(question="Is it?").with_inputs("question")
    with pytest.raises(ValueError, match=r"trainset\[1\] has no label 'answer'"):
        tp.compile(dspy.ChainOfThought("question -> answer"), trainset=[_example(), unlabeled])


def test_input_missing(tp):
    wrong = dspy.Example(query="Is it?", answer="Yes").with_inputs("query")
    with pytest.raises(ValueError, match="has no input 'question'"):
        tp.compile(dspy.ChainOfThought("question -> answer"), trainset=[wrong])


def test_valset_checked_too(tp):
    with pytest.raises(ValueError, match=r"valset\[0\] has no label 'answer'"):
        tp.compile(dspy.ChainOfThought("question -> answer"), trainset=[_example()],
                   valset=[dspy.Example(question="Is it?").with_inputs("question")])


def test_empty_valset_means_none_with_a_warning(tp, caplog):
    # BetterTogether hands valset=[] when the trainset is too small to split; that is "no valset".
    with pytest.raises(AssertionError, match="loaded"), caplog.at_level("WARNING", logger="dspy_greater"):
        tp.compile(dspy.ChainOfThought("question -> answer"), trainset=[_example()], valset=[])
    assert "valset is empty" in caplog.text and "held-out part of trainset" in caplog.text


def _examples(n, start=0):
    return [_example(f"Take {i} steps. Do you return?", "Yes" if i % 2 else "No") for i in range(start, start + n)]


@pytest.mark.parametrize("trainset, valset, expected", [
    (5, 0, "only 5 training examples and no valset, so the instruction is chosen on the training examples themselves"),
    (24, 12, "chosen on 12 held-out examples (valset); one example moves their accuracy by 0.083"),
    (40, 0, "chosen on 10 held-out examples (a quarter of trainset)"),
    (24, 30, None),
])
def test_few_heldout_examples_are_warned_about_before_the_model_loads(tp, caplog, trainset, valset, expected):
    with pytest.raises(AssertionError, match="loaded"), caplog.at_level("WARNING", logger="dspy_greater"):
        tp.compile(dspy.ChainOfThought("question -> answer"), trainset=_examples(trainset),
                   valset=_examples(valset, start=100) or None)
    if expected:
        assert expected in caplog.text and ("Pass a valset of 30 or more" in caplog.text or "or a valset" in caplog.text)
    else:
        assert "held-out examples" not in caplog.text and "training examples themselves" not in caplog.text


@pytest.mark.parametrize("lm, valset, expected", [
    (None, 12, "no target LM is configured; configure one with dspy.configure(lm=...)"),
    (dspy.LM("openai/never-called"), None, "no valset was given; pass valset=..."),
])
def test_an_unused_metric_is_said_once_before_the_model_loads(tp, caplog, lm, valset, expected):
    with pytest.raises(AssertionError, match="loaded"), caplog.at_level("WARNING", logger="dspy_greater"), \
            dspy.context(lm=lm):
        tp.compile(dspy.ChainOfThought("question -> answer"), trainset=_examples(40),
                   valset=_examples(valset, start=100) if valset else None)
    assert caplog.text.count("the metric is not used") == 1 and expected in caplog.text


def test_a_used_metric_is_not_warned_about(tp, caplog):
    with pytest.raises(AssertionError, match="loaded"), caplog.at_level("WARNING", logger="dspy_greater"), \
            dspy.context(lm=dspy.LM("openai/never-called")):
        tp.compile(dspy.ChainOfThought("question -> answer"), trainset=_examples(40), valset=_examples(30, 100))
    assert "metric is not used" not in caplog.text


def test_non_text_field_type(tp):
    class Counting(dspy.Signature):
        """Count the items."""

        items: list[str] = dspy.InputField()
        answer: str = dspy.OutputField()

    example = dspy.Example(items=["a", "b"], answer="2").with_inputs("items")
    with pytest.raises(TypeError, match="Field 'items' has type .*text fields only"):
        tp.compile(dspy.ChainOfThought(Counting), trainset=[example])


def test_non_text_value(tp):
    example = dspy.Example(question={"nested": 1}, answer="Yes").with_inputs("question")
    with pytest.raises(TypeError, match=r"trainset\[0\].question is a dict.*Convert it to str"):
        tp.compile(dspy.ChainOfThought("question -> answer"), trainset=[example])


def test_label_outside_answer_space(tp):
    data = [_example(answer="Yes"), _example(answer="No")]
    val = [_example(answer="Maybe")]
    with pytest.raises(ValueError, match="'Maybe'.*outside the answer space"):
        tp.compile(dspy.ChainOfThought("question -> answer"), trainset=data, valset=val)


def test_bad_valset_label_is_named_by_its_own_set_and_index(tp):
    with pytest.raises(ValueError, match=r"^valset\[0\]: label 'Maybe'") as error:
        tp.compile(dspy.ChainOfThought("question -> answer"), trainset=_examples(12), valset=[_example(answer="Maybe")])
    assert "12" not in str(error.value).split(":")[0]


def test_metric_not_callable():
    with pytest.raises(TypeError, match="metric must be callable"):
        GReaTerTeleprompter(metric="exact_match")


def test_model_path_missing(tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(ModelNotFoundError, match="nowhere"):
        GReaTerTeleprompter(metric=exact_match, model=str(missing))


def test_unknown_config_key():
    with pytest.raises(TypeError, match="Unknown GReaTer option 'num_step'. Did you mean 'num_steps'"):
        GReaTerTeleprompter(metric=exact_match, num_step=3)


def test_unknown_key_in_config_dict():
    with pytest.raises(TypeError, match="Unknown GReaTer option 'topq'"):
        GReaTerTeleprompter(metric=exact_match, config={"topq": 6})


def test_bad_config_value():
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        GReaTerTeleprompter(metric=exact_match, num_steps=0)


def test_empty_initial_instruction():
    with pytest.raises(ValueError, match="initial_instruction is empty"):
        GReaTerTeleprompter(metric=exact_match, initial_instruction="   ")


class TwoSteps(dspy.Module):
    def __init__(self):
        super().__init__()
        self.draft = dspy.Predict("question -> draft")
        self.answer = dspy.Predict("question, draft -> answer")

    def forward(self, question):
        return self.answer(question=question, draft=self.draft(question=question).draft)


def test_several_predictors_without_target_lm_are_skipped(tp):
    """Without a target LM, neither predictor can get labelled examples: both are skipped, nothing loads."""
    student = TwoSteps()
    optimized = tp.compile(student, trainset=[_example(), _example(answer="Yes")])
    results = optimized.greater_results
    assert list(results) == ["draft", "answer"]
    assert results["draft"]["skipped"] and "'draft' is not a label in trainset" in results["draft"]["reason"]
    assert "no target LM is configured" in results["draft"]["reason"]
    assert results["answer"]["skipped"] and "'draft' are not all in the trainset examples" in results["answer"]["reason"]
    assert "no target LM is configured" in results["answer"]["reason"]
    assert optimized.answer.signature.instructions == student.answer.signature.instructions
    assert optimized is not student and not hasattr(student, "greater_results")


def test_several_predictors_need_all_labels_or_none(tp):
    with pytest.raises(ValueError, match=r"trainset\[1\] has no label 'answer', but other examples have one"):
        tp.compile(TwoSteps(), trainset=[_example(), dspy.Example(question="Is it?").with_inputs("question")])


def test_several_predictors_refuse_one_initial_instruction(no_model):
    tp = GReaTerTeleprompter(metric=exact_match, initial_instruction="Think.", progress=False)
    with pytest.raises(ValueError, match="initial_instruction sets one predictor's.*has 2 \\(draft, answer\\)"):
        tp.compile(TwoSteps(), trainset=[_example()])


def test_tool_history_and_non_text_predictors_are_skipped_in_a_program(tp):
    """ReAct's predictors, a dspy.History input and a list output are skipped with the reason; nothing loads."""

    def lookup(city: str) -> str:
        """Weather in a city."""
        return "sunny"

    class Chat(dspy.Signature):
        """Answer in the conversation."""

        question: str = dspy.InputField()
        history: dspy.History = dspy.InputField()
        answer: str = dspy.OutputField()

    class Agent(dspy.Module):
        def __init__(self):
            super().__init__()
            self.agent = dspy.ReAct("question -> answer", tools=[lookup])
            self.chat = dspy.Predict(Chat)
            self.items = dspy.Predict("question -> items: list[str]")

    optimized = tp.compile(Agent(), trainset=[_example(), _example(answer="Yes")])
    results = optimized.greater_results
    assert list(results) == ["agent.react", "agent.extract.predict", "chat", "items"]
    assert all(r["skipped"] for r in results.values())
    assert "tool-using (ReAct-style)" in results["agent.react"]["reason"]
    assert "tool-using (ReAct-style) predictor (a `trajectory` input)" in results["agent.extract.predict"]["reason"]
    assert "'history' is a dspy.History" in results["chat"]["reason"]
    assert "'items' has type list[str]" in results["items"]["reason"]


def test_single_history_predictor_still_raises(tp):
    class Chat(dspy.Signature):
        question: str = dspy.InputField()
        history: dspy.History = dspy.InputField()
        answer: str = dspy.OutputField()

    with pytest.raises(TypeError, match="Field 'history' has type .*text fields only"):
        tp.compile(dspy.Predict(Chat), trainset=[_example()])


def test_instruction_too_long_for_context(optimizer, monkeypatch):
    def refuse_run(*args, **kwargs):
        raise AssertionError("a search step ran before the context check")

    monkeypatch.setattr(tp_module.GreaterSearch, "run", refuse_run)
    tp = GReaTerTeleprompter(metric=exact_match, initial_instruction="think " * 9000, progress=False)
    tp.use_loaded_model(*optimizer)
    with pytest.raises(ValueError, match="more than the optimizer model's context of 8192"):
        tp.compile(dspy.ChainOfThought("question -> answer"), trainset=[_example(), _example(answer="Yes")])


def test_num_threads_follows_dspys_setting_unless_given():
    assert GReaTerTeleprompter(metric=exact_match).num_threads is None
    with dspy.context(num_threads=3):
        assert GReaTerTeleprompter(metric=exact_match)._threads() == 3
        assert GReaTerTeleprompter(metric=exact_match, num_threads=1)._threads() == 1
