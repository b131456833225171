"""Hostile input: each kind either fails early with a message naming the problem and the fix, or has
a documented safe behaviour that the test asserts (issue 6, item 4).

| input                                       | behaviour                                                       |
|---------------------------------------------|-----------------------------------------------------------------|
| duplicated examples in trainset             | used once, warning naming the repeats                          |
| same inputs, different labels               | all kept, warning naming them (no instruction gets both right) |
| inputs longer than the model's context      | error naming trainset[i]/valset[i], before any generation      |
| non-ASCII inputs and labels                 | works end to end                                                |
| instruction with ``[[ ## field ## ]]``      | error before the model loads                                    |
| instruction with newlines                   | works, the text round-trips                                     |
| metric raising during target selection      | candidate under ``errors`` (no score), search result kept       |
| target LM answering garbage                 | unparsed answers count as wrong, a program comes back           |
| base model without a chat template          | plain-text layout, compiles                                     |
| tokenizer without a pad token               | ``use_loaded_model`` uses eos (error without eos); OptimizerLM errors |
| NaN loss                                    | NaN gradient ranked last, warned; a NaN finalist never wins     |
| empty label / whitespace-only input         | error naming the example / works                                |
| trainset of one example                     | works (it is also the held-out set)                             |
| labels 3 and "3" in one trainset            | same canonical label, integer extractor                        |
| trust_remote_code, pickled weights          | off unless asked; a .bin-only folder is refused before loading |

Model work is tiny (1 step, 1-3 examples, 4-token reasoning); DummyLM serves only as a target LM.
"""

import copy
import json
import logging
import math
import types

import dspy
import pytest
from dspy.utils import DummyLM

from dspy_greater import GReaTerTeleprompter
from dspy_greater.targets.adapter import GReaTerAdapter
from dspy_greater.engine.extractor import derive_extractor
from dspy_greater.engine.layout import GreaterLayout
from dspy_greater.models.loading import ModelNotFoundError, ModelSpec, gemma3_270m_path, load_optimizer_model, validate_model_spec
from dspy_greater.metrics import exact_match
from dspy_greater.engine.model import OptimizerLM, SequenceScore
from dspy_greater.engine.config import GreaterConfig
from dspy_greater.engine.search import GreaterSearch, SearchExample

TINY = dict(num_steps=1, batch_size=3, max_reasoning_tokens=4, num_finalists=2, eval_every=1, progress=False,
            num_threads=1)


def _ex(question, answer):
    return dspy.Example(question=question, answer=answer).with_inputs("question")


def _tp(optimizer, **overrides):
    return GReaTerTeleprompter(metric=exact_match, **{**TINY, **overrides}).use_loaded_model(*optimizer)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _compile_recording(tp, program, **kwargs):
    """Compile for real; also return what the search was given, and the warnings logged."""
    seen = {}
    real_run = GreaterSearch.run

    def recording_run(self, initial, train, heldout, **kw):
        seen.update(initial=initial, train=train, heldout=heldout, search=self)
        seen["result"] = real_run(self, initial, train, heldout, **kw)
        return seen["result"]

    handler, log = _Records(), logging.getLogger("dspy_greater")
    log.addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(GreaterSearch, "run", recording_run)
            program = tp.compile(program, **kwargs)
    finally:
        log.removeHandler(handler)
    return program, types.SimpleNamespace(**seen, warnings=handler.messages)


@pytest.fixture
def no_model_work(monkeypatch):
    """Fails the test if the search starts or the model generates."""
    monkeypatch.setattr(GreaterSearch, "run", lambda *a, **k: pytest.fail("the search started"))
    monkeypatch.setattr(OptimizerLM, "generate", lambda *a, **k: pytest.fail("the model generated"))


# ---------------------------------------------------------------------------------------------
# 1-2. Duplicated and contradictory examples (one real compile)
# ---------------------------------------------------------------------------------------------

A = "Take 1 step forward. Take 1 step back. Do you return to the start?"
B = "Take 2 steps left. Do you return to the start?"
C = "Turn around twice. Do you return to the start?"


@pytest.fixture(scope="module")
def repeated(optimizer):
    trainset = [_ex(A, "Yes"), _ex(B, "No"), _ex(A, "Yes"), _ex(B, "Yes"), _ex(C, "Yes"), _ex(A, "yes")]
    program, seen = _compile_recording(_tp(optimizer), dspy.ChainOfThought("question -> answer"), trainset=trainset)
    return program, seen


def test_duplicated_examples_are_used_once_with_a_warning(repeated):
    program, seen = repeated
    # [2] and [5] repeat [0] ("yes" and "Yes" are the same canonical label).
    assert any("2 exact duplicate" in w and "[2] repeats [0]" in w and "[5] repeats [0]" in w for w in seen.warnings)
    assert [(e.inputs_text, e.label) for e in seen.train] == [(A, "Yes"), (B, "No"), (B, "Yes"), (C, "Yes")]
    assert seen.heldout == seen.train  # no valset and < 8 examples: the deduplicated examples are the held-out set
    assert len(program.greater_results["predict"]["initial_heldout"]["predictions"]) == 4


def test_contradictory_examples_are_kept_with_a_warning(repeated):
    _, seen = repeated
    conflict = [w for w in seen.warnings if "same inputs but different labels" in w]
    assert len(conflict) == 1 and "[1], [3]" in conflict[0] and "'No', 'Yes'" in conflict[0]
    assert "Fix the labels or drop one" in conflict[0]
    labels_of_b = [e.label for e in seen.train if e.inputs_text == B]
    assert labels_of_b == ["No", "Yes"]
    # At most one of the two can be right, whatever the instruction.
    result = seen.result
    assert result.best_heldout["accuracy"] <= 3 / 4


# ---------------------------------------------------------------------------------------------
# 3. Inputs longer than the optimizer model's context
# ---------------------------------------------------------------------------------------------


def test_input_longer_than_the_context_names_the_example(optimizer, no_model_work):
    tp = _tp(optimizer)
    huge = "Take one step forward. " * 2000  # ~10k tokens; SmolLM2's context is 8192
    program = dspy.ChainOfThought("question -> answer")
    with pytest.raises(ValueError, match=r"^trainset\[1\] is too long for the optimizer model.*context of 8192.*"
                                         r"Shorten its inputs.*longer context"):
        tp.compile(program, trainset=[_ex(A, "Yes"), _ex(huge, "No"), _ex(B, "No")])
    with pytest.raises(ValueError, match=r"^valset\[0\] is too long.*1 more examples are too long too"):
        tp.compile(program, trainset=[_ex(A, "Yes"), _ex(huge + "?", "No")], valset=[_ex(huge + huge, "Yes")])


# ---------------------------------------------------------------------------------------------
# 4. Non-ASCII text
# ---------------------------------------------------------------------------------------------


def test_non_ascii_inputs_and_labels_work_end_to_end(optimizer):
    trainset = [_ex("¿Cuál es la capital de Japón? 🗾", "東京"), _ex("Quelle boisson ? ☕ café ou thé", "café"),
                _ex("Emoji for a smile? 😀 or 😢", "😀")]
    program, seen = _compile_recording(_tp(optimizer), dspy.ChainOfThought("question -> answer"), trainset=trainset)
    result = program.greater_results["predict"]
    assert result["extractor"]["kind"] == "text"
    assert [e.label for e in seen.train] == ["東京", "café", "😀"]
    assert [seen.search.layout.decode(seen.search.answer_ids(e.label)).strip() for e in seen.train] == ["東京", "café", "😀"]
    assert len(result["trace"]) == 1 and math.isfinite(result["trace"][0]["loss"])
    assert json.loads(json.dumps(program.greater_results, ensure_ascii=False))["predict"]["extractor"]["kind"] == "text"
    # The optimized program runs on a target LM and returns the non-ASCII answer unchanged.
    with dspy.context(lm=DummyLM({"": {"reasoning": "首都。", "answer": "東京"}})):
        assert program(question=trainset[0].question).answer == "東京"


# ---------------------------------------------------------------------------------------------
# 5-6. Instructions with DSPy field markers, or with newlines
# ---------------------------------------------------------------------------------------------


def test_instruction_with_a_field_marker_is_refused_before_the_model_loads(no_model):
    with pytest.raises(ValueError, match=r"initial_instruction contains DSPy's field marker '\[\[ ## answer ## \]\]'"
                                         r".*Remove it and name the field in plain words"):
        GReaTerTeleprompter(metric=exact_match, initial_instruction="Think, then write [[ ## answer ## ]] and Yes or No.")

    class Marked(dspy.Signature):
        """Reply with [[ ## answer ## ]] followed by Yes or No."""

        question: str = dspy.InputField()
        answer: str = dspy.OutputField()

    tp = GReaTerTeleprompter(metric=exact_match, progress=False)
    with pytest.raises(ValueError, match=r"instruction of predictor 'predict' contains DSPy's field marker"):
        tp.compile(dspy.ChainOfThought(Marked), trainset=[_ex(A, "Yes")])
    # Brackets that are not a marker are fine (the check is DSPy's own header pattern).
    GReaTerTeleprompter(metric=exact_match, initial_instruction="Answer [Yes] or [No]; ## is a comment.")


def test_instruction_with_newlines_round_trips(optimizer, layout):
    text = "Read the question.\nThink it through.\n\nAnswer Yes or No."
    assert layout.instruction_text(layout.encode(text)) == text
    tp = _tp(optimizer, initial_instruction=text)
    program, _ = _compile_recording(tp, dspy.ChainOfThought("question -> answer"),
                                    trainset=[_ex(A, "Yes"), _ex(B, "No")])
    result = program.greater_results["predict"]
    assert result["initial_instruction"] == text
    # One step edits position 0 only: the rest of the text, newlines included, is intact.
    assert result["final_instruction"].endswith(" the question.\nThink it through.\n\nAnswer Yes or No.")
    assert program.predict.signature.instructions == result["best_instruction"]
    assert "\n\n" in program.predict.signature.instructions
    # GReaTerAdapter sends it verbatim, after the inputs, as the optimizer model saw it.
    messages = GReaTerAdapter().format(program.predict.signature, [], {"question": A})
    assert messages[-1]["content"] == f"{A}\n\n{result['best_instruction']}"
    # ChatAdapter (DSPy's own formatting) indents every line of an instruction by 8 spaces.
    lm = DummyLM({"": {"reasoning": "r", "answer": "Yes"}})
    with dspy.context(lm=lm):
        assert program(question=A).answer == "Yes"
    system = lm.history[-1]["messages"][0]["content"]
    assert all(f"\n        {line}" in system for line in result["best_instruction"].splitlines())


# ---------------------------------------------------------------------------------------------
# 7-8. Target-aware selection: a raising metric, a target answering garbage
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def searched(optimizer):
    """One real search (keep_current=False, so the edited instruction differs from the initial one)."""
    train, val = [_ex(A, "Yes"), _ex(B, "No"), _ex(C, "Yes")], [_ex(B + " Then stop.", "No"), _ex(A + " Now.", "Yes")]
    _, seen = _compile_recording(_tp(optimizer, keep_current=False), dspy.ChainOfThought("question -> answer"),
                                 trainset=train, valset=val)
    return types.SimpleNamespace(train=train, val=val, result=seen.result)


def _select(optimizer, searched, target, metric=exact_match):
    """Compile again, reusing the search's result: only the selection on the target LM runs."""
    tp = GReaTerTeleprompter(metric=metric, **{**TINY, "target_candidates": 3}).use_loaded_model(*optimizer)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GreaterSearch, "run", lambda self, *a, **k: searched.result)
        with dspy.context(lm=target):
            program = tp.compile(dspy.ChainOfThought("question -> answer"), trainset=searched.train, valset=searched.val)
    return program, program.greater_results["predict"]["target_selection"]


def test_a_metric_raising_during_selection_is_recorded_and_the_search_result_kept(optimizer, searched):
    def broken(example, prediction, trace=None):
        raise RuntimeError("metric bug")

    target = DummyLM({"": {"reasoning": "r", "answer": "Yes"}})
    program, selection = _select(optimizer, searched, target, broken)
    first, *rest = selection["candidates"]
    assert len(selection["candidates"]) >= 2
    assert selection["scores"] == {} and selection["baseline"] is None
    assert selection["errors"][first] == "the metric raised on 2 of 2 examples: RuntimeError: metric bug"
    assert all(selection["errors"][t].startswith("skipped: the metric raised on every example") for t in rest)
    assert selection["chosen"] == searched.result.best_instruction == program.predict.signature.instructions

    def raises_on_one(example, prediction, trace=None):
        if example.question == searched.val[0].question:
            raise KeyError("answer")
        return exact_match(example, prediction, trace)

    program, selection = _select(optimizer, searched, DummyLM({"": {"reasoning": "r", "answer": "Yes"}}), raises_on_one)
    assert selection["scores"] == {}  # a score over part of the valset would not be comparable
    assert all(selection["errors"][t] == "the metric raised on 1 of 2 examples: KeyError: 'answer'"
               for t in selection["candidates"])
    assert program.predict.signature.instructions == searched.result.best_instruction


@pytest.mark.parametrize("garbage, unparsed", [({"nonsense": "purple monkey dishwasher"}, True),
                                               ({"reasoning": "zzz", "answer": "purple monkey"}, False)])
def test_a_target_answering_garbage_scores_zero_and_a_program_comes_back(optimizer, searched, garbage, unparsed):
    program, selection = _select(optimizer, searched, DummyLM({"": garbage}))
    candidates = selection["candidates"]
    assert selection["errors"] == {}
    assert selection["scores"] == {t: 0.0 for t in candidates}
    assert selection["unparsed"] == ({t: len(searched.val) for t in candidates} if unparsed else {})
    assert selection["chosen"] == candidates[0] == searched.result.best_instruction  # ties keep the search's order
    assert isinstance(program, dspy.ChainOfThought)
    assert program.predict.signature.instructions == selection["chosen"]


# ---------------------------------------------------------------------------------------------
# 9. A base model without a chat template (Gemma-3-270M)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_base_model_without_chat_template_compiles_in_the_plain_layout():
    model, tokenizer = load_optimizer_model(ModelSpec(str(gemma3_270m_path())))
    assert not tokenizer.chat_template
    layout = GreaterLayout(tokenizer)
    assert not layout.has_chat_template
    prompt = layout.prompt("Is it?", layout.encode("Answer."))
    assert prompt.ids[0] == tokenizer.bos_token_id
    assert layout.decode(prompt.ids) == "<bos>Is it?\n\nAnswer.\n\nAnswer:"

    tp = GReaTerTeleprompter(metric=exact_match, **{**TINY, "batch_size": 2}).use_loaded_model(model, tokenizer)
    program, seen = _compile_recording(tp, dspy.Predict("question -> answer"), trainset=[_ex(A, "Yes"), _ex(B, "No")])
    assert not seen.search.layout.has_chat_template
    result = program.greater_results["self"]
    assert len(result["trace"]) == 1 and math.isfinite(result["trace"][0]["loss"])
    assert result["stopped_reason"] == "completed"
    assert program.signature.instructions == result["best_instruction"]
    del model, tp, seen


# ---------------------------------------------------------------------------------------------
# 10. A tokenizer without a pad token
# ---------------------------------------------------------------------------------------------


def test_tokenizer_without_pad_token(optimizer):
    model, shared = optimizer
    tokenizer = copy.deepcopy(shared)  # the session's tokenizer stays as it is
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token; set tokenizer.pad_token = tokenizer.eos_token"):
        OptimizerLM(model, tokenizer)

    tp = GReaTerTeleprompter(metric=exact_match, progress=False).use_loaded_model(model, tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token
    assert tp._optimizer_lm().pad_id == tokenizer.eos_token_id

    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token.*set tokenizer.pad_token"):
        GReaTerTeleprompter(metric=exact_match, progress=False).use_loaded_model(model, tokenizer)
    assert shared.pad_token is not None and shared.eos_token is not None


# ---------------------------------------------------------------------------------------------
# 11. NaN loss
# ---------------------------------------------------------------------------------------------


def _nan_search(lm, layout):
    examples = [SearchExample(A, "Yes"), SearchExample(B, "No")]
    extractor = derive_extractor("answer", None, ["Yes", "No"], [A, B])
    config = GreaterConfig(num_steps=1, batch_size=2, max_reasoning_tokens=4, num_finalists=2, eval_every=1)
    return GreaterSearch(lm, layout, extractor, config), examples


def test_nan_gradient_once_does_not_crash_and_a_finite_candidate_wins(lm, layout, monkeypatch):
    """The gradient pass returns NaN (loss and gradient) once: the finalists are still scored on
    their own forward passes, and the winner has a finite score. The step's recorded loss is NaN,
    silently (no warning): see the report of issue 6 item 4."""
    real = OptimizerLM.one_hot_gradient
    calls = []

    def nan_once(self, *args, **kwargs):
        loss, grad = real(self, *args, **kwargs)
        calls.append(loss)
        return (math.nan, grad * math.nan) if len(calls) == 1 else (loss, grad)

    monkeypatch.setattr(OptimizerLM, "one_hot_gradient", nan_once)
    search, examples = _nan_search(lm, layout)
    result = search.run("Think carefully.", examples, examples)
    step = result.trace[0]
    winner = next(f for f in step.finalists if f["token"] == step.chosen)
    assert math.isfinite(winner["score"]) and math.isfinite(winner["answer_loss"])
    assert math.isfinite(result.best_heldout["mean_loss"])
    print("recorded step loss:", step.loss)


def test_nan_finalist_score_is_never_chosen(lm, layout, monkeypatch):
    real = OptimizerLM.score
    poisoned = []

    def nan_for_first_finalist(self, seqs, *, prefix=None, prefix_rows=None, **options):
        scores = real(self, seqs, prefix=prefix, prefix_rows=prefix_rows, **options)
        if prefix_rows is not None and not poisoned:  # a step's finalists, all in one call: poison the first
            poisoned.append(True)
            first = len(prefix.ids)
            return [SequenceScore(math.nan, False, math.nan)] * first + scores[first:]
        return scores

    monkeypatch.setattr(OptimizerLM, "score", nan_for_first_finalist)
    search, examples = _nan_search(lm, layout)
    result = search.run("Think carefully.", examples, examples)
    step = result.trace[0]
    assert poisoned and any(math.isnan(f["score"]) for f in step.finalists)
    winner = next(f for f in step.finalists if f["token"] == step.chosen)
    assert math.isfinite(winner["score"]), f"the NaN finalist {winner['token']!r} won: {step.finalists}"


# ---------------------------------------------------------------------------------------------
# 12-14. Empty label, whitespace-only input, one example, labels of mixed types
# ---------------------------------------------------------------------------------------------


def test_empty_label_is_refused_naming_the_example(no_model):
    tp = GReaTerTeleprompter(metric=exact_match, progress=False)
    program = dspy.ChainOfThought("question -> answer")
    for label in ("", "   "):
        with pytest.raises(ValueError, match=r"trainset\[1\] has an empty label 'answer'.*non-empty label or drop"):
            tp.compile(program, trainset=[_ex(A, "Yes"), _ex(B, label)])
    with pytest.raises(ValueError, match=r"valset\[0\] has an empty label"):
        tp.compile(program, trainset=[_ex(A, "Yes")], valset=[_ex(B, "")])


def test_whitespace_only_input_is_accepted(optimizer):
    """An empty input is legitimate (e.g. an empty context field); it is formatted as is."""
    program, seen = _compile_recording(_tp(optimizer), dspy.ChainOfThought("question -> answer"),
                                       trainset=[_ex(A, "Yes"), _ex("   ", "No")])
    assert [e.inputs_text for e in seen.train] == [A, "   "]
    result = program.greater_results["predict"]
    assert len(result["initial_heldout"]["predictions"]) == 2
    assert set(result["initial_heldout"]["predictions"]) <= {"Yes", "No"}
    assert math.isfinite(result["trace"][0]["loss"])


def test_a_single_example_is_enough(optimizer):
    """With one example and no valset, that example is the training and the held-out set."""
    program, seen = _compile_recording(_tp(optimizer), dspy.ChainOfThought("question -> answer"),
                                       trainset=[_ex(A, "Yes")])
    assert seen.train == seen.heldout == [SearchExample(A, "Yes")]
    result = program.greater_results["predict"]
    assert len(result["trace"]) == 1 and len(result["initial_heldout"]["predictions"]) == 1
    assert program.predict.signature.instructions == result["best_instruction"]


def test_labels_of_mixed_types(optimizer):
    """3 and "3" are the same label (integer extractor); the metric on the target agrees."""
    trainset = [_ex("What is 1 + 2?", 3), _ex("What is 6 - 3?", "3"), _ex("What is 2 + 5?", 7)]
    valset = [_ex("What is 0 + 3?", 3), _ex("What is 9 - 6?", "3")]
    tp = GReaTerTeleprompter(metric=exact_match, **{**TINY, "target_candidates": 1}).use_loaded_model(*optimizer)
    with dspy.context(lm=DummyLM({"": {"reasoning": "r", "answer": "3"}})):
        program, seen = _compile_recording(tp, dspy.ChainOfThought("question -> answer"), trainset=trainset,
                                           valset=valset)
    result = program.greater_results["predict"]
    assert result["extractor"]["kind"] == "integer"
    assert [e.label for e in seen.train] == ["3", "3", "7"] and [e.label for e in seen.heldout] == ["3", "3"]
    selection = result["target_selection"]
    assert selection["errors"] == {} and selection["scores"] == {t: 100.0 for t in selection["candidates"]}


# ---------------------------------------------------------------------------------------------
# 15. trust_remote_code and pickled weights
# ---------------------------------------------------------------------------------------------


def test_trust_remote_code_is_off_unless_asked(tmp_path, monkeypatch):
    import transformers

    assert ModelSpec().trust_remote_code is False
    assert GReaTerTeleprompter(metric=exact_match).model_spec.trust_remote_code is False
    assert GReaTerTeleprompter(metric=exact_match, trust_remote_code=True).model_spec.trust_remote_code is True

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    calls = []

    class Stop(Exception):
        pass

    def tokenizer(path, **kwargs):
        calls.append(("tokenizer", kwargs))
        return types.SimpleNamespace()

    def model(path, **kwargs):
        calls.append(("model", kwargs))
        raise Stop

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    for asked in (False, True):
        calls.clear()
        spec = ModelSpec(str(folder)) if not asked else ModelSpec(str(folder), trust_remote_code=True)
        with pytest.raises(Stop):
            load_optimizer_model(spec)
        assert [kind for kind, _ in calls] == ["tokenizer", "model"]
        assert all(kwargs["trust_remote_code"] is asked for _, kwargs in calls)
        assert calls[1][1]["use_safetensors"] is True  # never falls back to pickled weights


@pytest.mark.parametrize("files", [["pytorch_model.bin"], ["config.json", "pytorch_model.bin"],
                                   ["config.json", "model.pt", "tokenizer.json"]])
def test_pickled_weights_are_refused_before_loading(tmp_path, monkeypatch, files):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("loading started"))
    for name in files:
        (tmp_path / name).write_text("{}" if name.endswith(".json") else "not really a pickle")
    with pytest.raises(ModelNotFoundError, match=r"no safetensors weights, only pickled ones .*never loads.*"
                                                 r"Convert them to safetensors"):
        validate_model_spec(ModelSpec(str(tmp_path)))
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        GReaTerTeleprompter(metric=exact_match, model=str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_optimizer_model(ModelSpec(str(tmp_path)))
