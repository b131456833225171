"""GReaTerAdapter: parsing unit tests on recorded outputs of the tiny model, and live runs of DSPy
programs on the real SmolLM2-135M-Instruct served by llama.cpp on 127.0.0.1.

The recorded outputs below are real: SmolLM2-135M-Instruct (Q4_1 GGUF, llama-cpp-python 0.3.36,
temperature 0) answering BBH questions through ``GReaTerAdapter`` with ``dspy.ChainOfThought``
("question -> answer", DSPy's default instruction). Each record holds the reasoning call's output
and the reply to the extractor prompt (the second call).
"""

import asyncio
import re
import typing

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError

from dspy_greater.targets.adapter import GReaTerAdapter
from dspy_greater.data import load_examples
from dspy_greater.engine.extractor import Extractor, derive_extractor

INSTRUCTION = "Given the fields `question`, produce the fields `answer`."
YES_NO = Extractor("choice", "\nTherefore, the final answer (Yes or No) is", ("Yes", "No"))
A_B = Extractor("letter", "\nTherefore, the final answer (one of (A), (B)) is (", ("(A)", "(B)"))
A_TO_F = Extractor("letter", "\nTherefore, the final answer (one of (A) to (F)) is (",
                   ("(A)", "(B)", "(C)", "(D)", "(E)", "(F)"))
INTEGER = Extractor("integer", "\nTherefore, the final answer (an integer) is")
TRUE_FALSE = Extractor("choice", "\nTherefore, the final answer (True or False) is", ("True", "False"))

NAVIGATE_Q = (
    "If you follow these instructions, do you return to the starting point? Always face forward. "
    "Take 1 step backward. Take 9 steps left. Take 2 steps backward. Take 6 steps forward. Take 4 steps "
    "forward. Take 4 steps backward. Take 3 steps right.\nOptions:\n- Yes\n- No"
)
HYPERBATON_Q = (
    "Which sentence has the correct adjective order:\nOptions:\n(A) midsize old grey Brazilian sweater\n"
    "(B) midsize grey Brazilian old sweater"
)

# (id, annotation of `answer`, extractor given to the adapter, reasoning output, answer-call reply, parsed answer)
RECORDED = [
    ("navigate-1", str, YES_NO, 'No\nThe answer is "No".', "No", "No"),
    ("navigate-2", str, YES_NO,
     'Yes\n```python\n# Question: What is the answer to this question?\n'
     'print(f"The answer to this question is {answer_to_this_question}")', "No", "No"),
    ("navigate-3", str, YES_NO, "No\n```python\n# Your code here\n```", "No", "No"),
    ("navigate-4", str, YES_NO, "No\n", "No", "No"),
    ("navigate-literal", typing.Literal["Yes", "No"], None, "Yes\nNo", "No", "No"),
    ("hyperbaton-1", str, A_B, "(A) midsize grey old grey Brazilian sweater",
     "(B) midsale old grey Brazilian sweater", "(B)"),
    ("hyperbaton-2", str, A_B, "(A) rubber gray walking Mexican midsize cat", "(B) midsize gray cat", "(B)"),
    ("date-1", str, A_TO_F, "(C) 12/04/1937\nThe answer is (D).", "(C) 12/04/1937\nThe", "(C)"),
    ("date-2", str, A_TO_F, "(C) 12/03/1987\nThe answer is (D).", "(C) 12/03/1987\nThe", "(C)"),
    ("counting-1", str, INTEGER, "The answer is: 12", "The answer is: 12", "12"),
    ("counting-2", int, None,
     "To solve this problem, we need to break it down into manageable parts. We have a fruit list with three "
     "fruits: an apple, a banana, and a strawberry.\n\nFirst, let's calculate the total number of fruits in the "
     "given list by multiplying each fruit by its corresponding value (the number of apples, bananas, grapes, "
     "rimes, peaches, plum, nectarine, and blackberry).\n\n1. Apples: 3 * 4 = 12\n2. Bananas: 6 * 5 = 30\n"
     "3. Strawberries: 9 * 7 = 63\n4. Grapes: 8 * 6 = 48\n5. Roses: 10 * 5 = 50\n6. Primes: 2 * 2 = 4\n"
     "7. Nectarines: 1 * 2 = 2\n8. Nectarins: 3 * 2 = 6\n9. Blackberries: 1 * 1 = 1\n"
     "10. Nectarines and Nectarins: 5 * 1 = 5\n11. Nectarins and Nectarin: 7 * 1 = 7\n",
     "The final answer is 10.", 10),
    ("counting-3", int, None,
     "To solve this problem, you need to find the total number of objects in your fridge and chair.\n\n"
     "The fridge has 3 items: a chair (2 objects), a microwave (1 object) with a glass lid (one item), and a "
     "single item that is both a chair and a microwave.", "The final answer is 1.", 1),
    ("boolean-1", bool, None,
     "The field `answer` is created by concatenating the fields `question`, `answer`.",
     "The final answer is `True`.", True),
    ("boolean-2", bool, None, "True and not False is:\nFalse", "True", True),
]

# What the same model wrote for navigate questions under DSPy's ChatAdapter and its JSONAdapter fallback.
CHAT_ADAPTER_OUTPUTS = [
    "The answer is:\n- Yes",
    '{\n  "reasoning": {\n    "answer": "10"\n  }\n}',
    '{\n  "reasoning": {\n    "answer": "2018-04-30"\n  },\n"action_options": [\n  {\n    "type": "response",\n'
    '    "body": "You can\'t do that!"\n  }\n]}',
]


class ScriptedLM:
    """Stands in for a ``dspy.LM`` in unit tests: replies with scripted texts, records each request."""

    def __init__(self, replies, **kwargs):
        self.replies = list(replies)
        self.kwargs = kwargs
        self.requests: list[tuple[list[dict], dict]] = []

    def __call__(self, messages=None, **kwargs):
        self.requests.append((messages, kwargs))
        return [self.replies.pop(0)]

    async def acall(self, messages=None, **kwargs):
        return self(messages=messages, **kwargs)


def cot_signature(annotation=str):
    """The signature ``dspy.ChainOfThought`` gives its predictor (reasoning, then ``answer``)."""
    class QA(dspy.Signature):
        question: str = dspy.InputField()
        answer: annotation = dspy.OutputField()

    return dspy.ChainOfThought(QA).predict.signature


def run_adapter(adapter, signature, question, replies, **lm_kwargs):
    lm = ScriptedLM(replies, **lm_kwargs)
    outputs = adapter(lm, {}, signature, [], {"question": question})
    return outputs, lm


# -- unit tests on recorded outputs (no server) ---------------------------------------------------------


@pytest.mark.parametrize("record", RECORDED, ids=[r[0] for r in RECORDED])
def test_recorded_two_call_outputs_parse(record):
    _, annotation, extractor, reasoning, reply, expected = record
    adapter = GReaTerAdapter({"answer": extractor} if extractor else None)
    outputs, lm = run_adapter(adapter, cot_signature(annotation), "question text", [reasoning, reply])
    assert len(lm.requests) == 2
    assert outputs == [{"reasoning": reasoning.strip(), "answer": expected}]
    assert type(outputs[0]["answer"]) is type(expected)


@pytest.mark.parametrize("record", RECORDED, ids=[r[0] for r in RECORDED])
def test_recorded_outputs_parse_as_one_completion(record):
    """``parse`` reads reasoning + extractor prompt + answer (the optimizer's layout) in one text."""
    _, annotation, extractor, reasoning, reply, expected = record
    adapter = GReaTerAdapter({"answer": extractor} if extractor else None)
    signature = cot_signature(annotation)
    prompt = adapter.extractor(signature, "answer").text.rstrip("(").rstrip()
    completion = f"{reasoning.rstrip()}{prompt} {reply}"
    values = adapter.parse(signature, completion)
    assert values["answer"] == expected and type(values["answer"]) is type(expected)
    assert values["reasoning"] == completion.strip()


def test_without_extractors_the_options_in_the_inputs_close_the_answer_space():
    # The recorded navigate replies to a plain "Therefore, the final answer is" (free-text extractor):
    # without the options, the adapter returned them verbatim ('The final answer is "No').
    adapter = GReaTerAdapter()
    signature = cot_signature()
    assert adapter.extractor(signature, "answer", {"question": NAVIGATE_Q}) == YES_NO
    assert adapter.extractor(signature, "answer", {"question": HYPERBATON_Q}) == A_B
    outputs, lm = run_adapter(adapter, signature, NAVIGATE_Q, ['No\nThe answer is "No".', 'The final answer is "No".'])
    assert outputs[0]["answer"] == "No"
    assert lm.requests[1][0][-1]["content"] == YES_NO.text.strip()
    # No options in the inputs: free text, but "answer is X" is preferred over the whole line.
    outputs, _ = run_adapter(adapter, signature, "How many legs has a cat?", ["Four.", 'The final answer is "4".'])
    assert outputs[0]["answer"] == "4"


def test_an_echoed_extractor_prompt_does_not_read_as_its_first_option():
    reply = "Therefore, the final answer (Yes or No) is No."
    outputs, _ = run_adapter(GReaTerAdapter({"answer": YES_NO}), cot_signature(), NAVIGATE_Q, ["Let me think.", reply])
    assert outputs[0]["answer"] == "No"
    values = GReaTerAdapter({"answer": A_B}).parse(cot_signature(), "the final answer (one of (A), (B)) is B.")
    assert values["answer"] == "(B)"


def test_letter_fallback_does_not_take_a_sentence_for_an_option():
    with pytest.raises(AdapterParseError):
        GReaTerAdapter({"answer": A_B}).parse(cot_signature(), "A sweater is old.\nBrazilian ones are grey.")


@pytest.mark.parametrize("extractor, expected", [(YES_NO, "one of Yes, No"), (INTEGER, "an integer"),
                                                  (A_TO_F, "one of (A), (B), (C), (D), (E), (F)")])
def test_garbage_raises_adapter_parse_error_with_a_clear_message(extractor, expected):
    garbage = "```python\n# Your code here\n```"
    adapter = GReaTerAdapter({"answer": extractor})
    with pytest.raises(AdapterParseError) as caught:
        run_adapter(adapter, cot_signature(), "question text", ["lorem ipsum dolor sit amet", garbage])
    message = str(caught.value)
    assert "The target LM's answer for 'answer' could not be parsed" in message
    assert f"expected {expected}" in message
    assert "lorem ipsum dolor sit amet" in message and "# Your code here" in message  # both calls' texts
    with pytest.raises(AdapterParseError, match=re.escape(f"No answer for 'answer' found in the completion (expected {expected})")):
        adapter.parse(cot_signature(), "lorem ipsum dolor sit amet")


def test_types_are_coerced():
    signature = cot_signature(float)
    outputs, _ = run_adapter(GReaTerAdapter(), signature, "How far?", ["Some steps.", "The answer is 3.5 meters."])
    assert outputs[0]["answer"] == 3.5
    with pytest.raises(AdapterParseError, match="does not convert to the field's type"):
        run_adapter(GReaTerAdapter(), signature, "How far?", ["Some steps.", "far away"])
    literal = cot_signature(typing.Literal["Yes", "No"])
    outputs, _ = run_adapter(GReaTerAdapter(), literal, NAVIGATE_Q, ["Hmm.", "yes."])
    assert outputs[0]["answer"] == "Yes"  # the Literal's own value, not the raw "yes"
    numbers = cot_signature(typing.Literal[1, 2, 3])
    outputs, _ = run_adapter(GReaTerAdapter(), numbers, "Pick one.", ["Hmm.", "2"])
    assert outputs[0]["answer"] == 2 and isinstance(outputs[0]["answer"], int)
    outputs, _ = run_adapter(GReaTerAdapter(), cot_signature(bool), "Is it?", ["Hmm.", "False, because"])
    assert outputs[0]["answer"] is False


def test_two_lm_calls_per_prediction_in_the_optimizer_layout():
    adapter = GReaTerAdapter({"answer": YES_NO})
    signature = cot_signature().with_instructions("Think step by step.")
    outputs, lm = run_adapter(adapter, signature, NAVIGATE_Q, ["No\n", "No"], max_tokens=64)
    assert outputs == [{"reasoning": "No", "answer": "No"}]
    (first, first_kwargs), (second, second_kwargs) = lm.requests
    assert first == [{"role": "user", "content": f"{NAVIGATE_Q}\n\nThink step by step."}]
    assert second == [*first, {"role": "assistant", "content": "No"},
                      {"role": "user", "content": "Therefore, the final answer (Yes or No) is"}]
    assert "max_tokens" not in first_kwargs  # the LM's own max_tokens=64 applies
    assert second_kwargs == {"max_tokens": 16, "n": 1}


@pytest.mark.parametrize("lm_kwargs, adapter_kwargs, call_kwargs, expected", [
    ({}, {}, {}, 256),  # nothing set anywhere: the adapter's default
    ({"max_tokens": 64}, {}, {}, None),  # the LM's own limit (dspy.LM merges it in): not overridden
    ({"max_tokens": 64}, {"max_reasoning_tokens": 100}, {}, 100),  # set on the adapter explicitly
    ({"max_tokens": 64}, {"max_reasoning_tokens": 100}, {"max_tokens": 5}, 5),  # the predictor's config wins
])
def test_reasoning_token_limit_precedence(lm_kwargs, adapter_kwargs, call_kwargs, expected):
    lm = ScriptedLM(["No", "No"], **lm_kwargs)
    GReaTerAdapter({"answer": YES_NO}, **adapter_kwargs)(lm, call_kwargs, cot_signature(), [], {"question": "q"})
    assert lm.requests[0][1].get("max_tokens") == expected


def test_async_path_also_makes_two_calls():
    lm = ScriptedLM(["No\n", "No"])
    outputs = asyncio.run(GReaTerAdapter({"answer": YES_NO}).acall(lm, {}, cot_signature(), [], {"question": NAVIGATE_Q}))
    assert outputs == [{"reasoning": "No", "answer": "No"}] and len(lm.requests) == 2


def test_from_program_reads_the_teleprompters_extractors():
    program = dspy.ChainOfThought("question -> answer")
    program.greater_results = {"predict": {"best_instruction": "x", "extractor": {
        "field": "answer", "kind": "letter", "text": A_B.text, "choices": ["(A)", "(B)"]}}}
    adapter = GReaTerAdapter.from_program(program, answer_tokens=4)
    assert adapter.extractor(program.predict.signature, "answer") == A_B and adapter.answer_tokens == 4
    outputs, lm = run_adapter(adapter, program.predict.signature, HYPERBATON_Q, ["(A) midsize", "B) because"])
    assert outputs[0]["answer"] == "(B)"
    assert lm.requests[1][0][-1]["content"] == A_B.text.strip()
    assert GReaTerAdapter.from_program(dspy.ChainOfThought("question -> answer")).extractors == {}


def test_two_predictors_with_the_same_output_field_keep_their_own_extractors():
    class TwoAnswers(dspy.Module):
        def __init__(self):
            super().__init__()
            self.first = dspy.Predict(dspy.Signature("question -> answer", "Answer Yes or No."))
            self.second = dspy.Predict(dspy.Signature("question -> answer", "Answer (A) or (B)."))

    program = TwoAnswers()
    program.greater_results = {
        "first": {"extractor": {"field": "answer", "kind": "choice", "text": YES_NO.text, "choices": ["Yes", "No"]}},
        "second": {"extractor": {"field": "answer", "kind": "letter", "text": A_B.text, "choices": ["(A)", "(B)"]}},
    }
    adapter = GReaTerAdapter.from_program(program)
    assert adapter.extractor(program.first.signature, "answer").text == YES_NO.text
    assert adapter.extractor(program.second.signature, "answer").text == A_B.text
    # Another predictor's "answer" falls back to the first one found.
    assert adapter.extractor(dspy.Signature("question -> answer", "Other."), "answer").text == YES_NO.text


def test_demos_are_formatted_as_earlier_turns():
    adapter = GReaTerAdapter({"answer": YES_NO})
    demo = {"question": "Go 1 step and back.", "reasoning": "I return.", "answer": "Yes"}
    messages = adapter.format(cot_signature(), [demo], {"question": NAVIGATE_Q})
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == "I return.\nTherefore, the final answer (Yes or No) is Yes"


def test_chat_adapters_fail_on_the_tiny_models_recorded_outputs():
    signature = cot_signature()
    for text in CHAT_ADAPTER_OUTPUTS:
        with pytest.raises(AdapterParseError):
            dspy.ChatAdapter().parse(signature, text)
        with pytest.raises(AdapterParseError):
            dspy.JSONAdapter().parse(signature, text)


# -- live: the real llama.cpp server ---------------------------------------------------------------------

llama_cpp = pytest.importorskip("llama_cpp")
from dspy_greater.targets.llama_cpp import LlamaCppServer  # noqa: E402


@pytest.fixture(scope="module")
def server():
    with LlamaCppServer(n_threads=1) as running:  # one decode thread: the cores are shared
        yield running


@pytest.fixture()
def lm(server):
    return server.lm(max_tokens=64, cache=False)  # no cache: every call reaches the server


def _task(name, n):
    examples = load_examples(name)
    extractor = derive_extractor("answer", None, [e.answer for e in examples], [e.question for e in examples])
    return examples[:n], extractor


def _completion_tokens(lm, start=0):
    return [entry["usage"]["completion_tokens"] for entry in lm.history[start:]]


def test_chain_of_thought_on_navigate_answers_yes_or_no(lm):
    examples, extractor = _task("navigate", 3)
    assert extractor == YES_NO
    program = dspy.ChainOfThought("question -> answer")
    with dspy.context(lm=lm, adapter=GReaTerAdapter({"answer": extractor})):
        predictions = [program(**e.inputs()) for e in examples]
    assert [p.answer for p in predictions] and all(p.answer in ("Yes", "No") for p in predictions)
    assert all(isinstance(p.reasoning, str) for p in predictions)
    assert len(lm.history) == 2 * len(examples)  # reasoning, then the answer, per prediction
    for i, example in enumerate(examples):
        reasoning_call, answer_call = lm.history[2 * i], lm.history[2 * i + 1]
        assert reasoning_call["messages"][-1]["content"] == f"{example.question}\n\n{INSTRUCTION}"
        assert answer_call["messages"][-1]["content"] == YES_NO.text.strip()
    assert max(_completion_tokens(lm)[1::2]) <= 16


def test_without_extractors_navigate_still_answers_yes_or_no(lm):
    examples, _ = _task("navigate", 5)
    program = dspy.ChainOfThought("question -> answer")
    with dspy.context(lm=lm, adapter=GReaTerAdapter()):
        answers = [program(**e.inputs()).answer for e in examples[3:5]]
    assert all(a in ("Yes", "No") for a in answers) and len(lm.history) == 4


def test_a_target_run_without_greater_adapter_is_warned_about_once(lm, tiny_teleprompter, caplog):
    """``dspy.configure(lm=...)`` alone: the search uses GReaTer's layout, the target DSPy's ChatAdapter. The
    mismatch is said once, with the fix, and the call estimate covers ChatAdapter's JSONAdapter retries."""
    examples, _ = _task("navigate", 5)
    with dspy.context(lm=lm), caplog.at_level("WARNING", logger="dspy_greater"):
        optimized = tiny_teleprompter().compile(dspy.ChainOfThought("question -> answer"), trainset=examples[:3],
                                                valset=examples[3:])
    selection = optimized.greater_results["predict"]["target_selection"]
    assert optimized.greater_results["predict"]["layout"]["name"] == "greater"
    assert caplog.text.count("the target LM runs the program with ChatAdapter (no adapter is configured)") == 1
    assert "dspy.configure(adapter=GReaTerAdapter())" in caplog.text and "layout='chat_adapter'" in caplog.text
    assert selection["estimated_calls"] == 2 * 2 * len(selection["candidates"]) >= selection["calls"] > 0


def test_letter_tasks_parse_into_their_options(lm):
    program = dspy.ChainOfThought("question -> answer")
    hyperbaton, extractor = _task("hyperbaton", 2)
    with dspy.context(lm=lm, adapter=GReaTerAdapter()):  # options read from the "(A) ..." lines
        answers = [program(**e.inputs()).answer for e in hyperbaton]
    assert extractor == A_B and all(a in ("(A)", "(B)") for a in answers)
    dates, extractor = _task("date_understanding", 1)
    with dspy.context(lm=lm, adapter=GReaTerAdapter({"answer": extractor})):
        answer = program(**dates[0].inputs()).answer
    assert answer in extractor.choices and len(extractor.choices) >= 5


def test_integer_task_gets_ints_within_the_lms_token_limit(lm):
    examples, _ = _task("object_counting", 2)
    program = dspy.ChainOfThought("question -> answer: int")
    with dspy.context(lm=lm, adapter=GReaTerAdapter()):
        answers = [program(**e.inputs()).answer for e in examples]
    assert all(isinstance(a, int) and not isinstance(a, bool) for a in answers)
    tokens = _completion_tokens(lm)
    assert max(tokens[0::2]) <= 64 and max(tokens[1::2]) <= 16  # dspy.LM(max_tokens=64) reached llama.cpp


def test_bool_and_literal_outputs_are_coerced(lm):
    class Judge(dspy.Signature):
        question: str = dspy.InputField()
        answer: bool = dspy.OutputField()

    class Navigate(dspy.Signature):
        question: str = dspy.InputField()
        answer: typing.Literal["Yes", "No"] = dspy.OutputField()

    with dspy.context(lm=lm, adapter=GReaTerAdapter()):
        booleans = [dspy.ChainOfThought(Judge)(**e.inputs()).answer for e in load_examples("boolean_expressions")[:2]]
        literal = dspy.ChainOfThought(Navigate)(**load_examples("navigate")[4].inputs()).answer
    assert all(type(b) is bool for b in booleans)
    assert literal in ("Yes", "No")


def test_async_program_on_the_server(lm):
    program = dspy.ChainOfThought("question -> answer")
    with dspy.context(lm=lm, adapter=GReaTerAdapter({"answer": YES_NO})):
        prediction = asyncio.run(program.acall(question=NAVIGATE_Q))
    assert prediction.answer in ("Yes", "No") and len(lm.history) == 2
