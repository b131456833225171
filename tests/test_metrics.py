import dspy
import pytest

from dspy_greater.metrics import (
    accuracy,
    balanced_accuracy,
    evaluate_program,
    exact_match,
    majority_rate,
    normalize_answer,
    summarize,
)


def test_normalize_answer():
    assert normalize_answer("(a)") == normalize_answer("(A)") == normalize_answer("A") == "a"
    assert normalize_answer(" B. ") == "b"
    assert normalize_answer("  Yes ") == normalize_answer("yes.") == "yes"
    assert normalize_answer("apple   banana") == "apple banana"
    assert normalize_answer(12) == "12"
    assert normalize_answer(None) is None
    assert normalize_answer("(AB)") == "(ab)"


def test_accuracy():
    assert accuracy(["(A)", "(B)", "Yes", "3"], ["A", "(c)", "yes", "3"]) == 0.75
    assert accuracy([], []) == 0.0
    assert accuracy(["Yes"], [None]) == 0.0
    with pytest.raises(ValueError):
        accuracy(["a"], [])


def test_majority_rate():
    assert majority_rate(["Yes", "No", "yes", "Yes"]) == 0.75
    assert majority_rate(["(A)"]) == 1.0
    assert majority_rate([]) == 0.0


def test_balanced_accuracy():
    golds = ["No"] * 8 + ["Yes"] * 2
    always_no = ["No"] * 10
    assert accuracy(golds, always_no) == 0.8
    assert balanced_accuracy(golds, always_no) == 0.5
    preds = ["No"] * 6 + ["Yes"] * 2 + ["Yes", "No"]
    # recall No = 6/8, recall Yes = 1/2
    assert balanced_accuracy(golds, preds) == pytest.approx((6 / 8 + 1 / 2) / 2)
    assert balanced_accuracy([], []) == 0.0
    assert balanced_accuracy(["(A)", "(B)", "(C)"], ["A", "B", "C"]) == 1.0


def test_summarize():
    golds = ["(A)", "(A)", "(B)", "(C)"]
    preds = ["(A)", "(B)", "(B)", None]
    s = summarize(golds, preds)
    assert s == {
        "n": 4,
        "accuracy": 0.5,
        "balanced_accuracy": pytest.approx((1 / 2 + 1 + 0) / 3),
        "majority_rate": 0.5,
        "pred_distribution": {"(A)": 1, "(B)": 2, None: 1},
    }
    assert type(s["pred_distribution"]) is dict
    assert list(s["pred_distribution"])[0] == "(B)"  # most common first


def test_exact_match_metric():
    ex = dspy.Example(question="q", answer="(B)").with_inputs("question")
    assert exact_match(ex, dspy.Prediction(answer="B")) is True
    assert exact_match(ex, dspy.Prediction(answer=" (b) ")) is True
    assert exact_match(ex, dspy.Prediction(answer="(C)")) is False
    assert exact_match(ex, dspy.Prediction(reasoning="x")) is False
    assert exact_match(ex, {"answer": "b"}, trace=[]) is True
    two = dspy.Example(question="q", answer="Yes", count="3").with_inputs("question")
    assert exact_match(two, dspy.Prediction(answer="yes", count="3")) is True
    assert exact_match(two, dspy.Prediction(answer="yes", count="4")) is False
    with pytest.raises(ValueError):
        exact_match(dspy.Example(question="q").with_inputs("question"), dspy.Prediction(answer="x"))


def test_exact_match_with_dspy_evaluate():
    class Fixed(dspy.Module):
        def forward(self, question):
            return dspy.Prediction(answer={"q1": "(a)", "q2": "No", "q3": "7"}[question])

    devset = [
        dspy.Example(question="q1", answer="(A)").with_inputs("question"),
        dspy.Example(question="q2", answer="Yes").with_inputs("question"),
        dspy.Example(question="q3", answer="7").with_inputs("question"),
    ]
    result = dspy.Evaluate(devset=devset, metric=exact_match, num_threads=1,
                           display_progress=False)(Fixed())
    assert result.score == pytest.approx(200 / 3, abs=0.01)
    assert [bool(score) for _, _, score in result.results] == [True, False, True]


def test_evaluate_program_summarizes_answers_and_counts_unparsed():
    examples = [dspy.Example(question=f"q{i}", answer=a).with_inputs("question") for i, a in enumerate(["Yes", "No", "No"])]
    program = dspy.Predict("question -> answer")
    lm = dspy.utils.DummyLM({"q0": {"answer": "Yes"}, "q1": {"answer": "Yes"}, "q2": "no field markers here"})
    with dspy.context(lm=lm):
        row = evaluate_program(program, examples, threads=1)
    assert row["n"] == 3 and row["unparsed"] == 1
    assert row["accuracy"] == pytest.approx(1 / 3)
    assert row["majority_rate"] == pytest.approx(2 / 3)
    assert row["pred_distribution"] == {"Yes": 2, None: 1}
