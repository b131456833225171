"""GReaTerTeleprompter.compile end to end on the real embedded model and real DSPy programs."""

import json

import dspy
import pytest

from dspy_greater import GReaTerTeleprompter
from dspy_greater.data import load_examples, split_examples
from dspy_greater.metrics import exact_match

SMALL = dict(num_steps=2, batch_size=3, max_reasoning_tokens=12, eval_every=1, keep_current=False, progress=False)


@pytest.fixture(scope="module")
def navigate():
    train, val = split_examples(load_examples("navigate"), [5, 3], seed=1)
    return train, val


@pytest.fixture(scope="module")
def teleprompter(optimizer):
    # The model fixture is loaded once per session; hand it to the teleprompter to skip a reload.
    tp = GReaTerTeleprompter(metric=exact_match, **SMALL)
    tp.use_loaded_model(*optimizer)
    return tp


@pytest.fixture(scope="module")
def compiled(teleprompter, navigate):
    train, val = navigate
    student = dspy.ChainOfThought("question -> answer")
    before = json.dumps(student.dump_state(), sort_keys=True)
    optimized = teleprompter.compile(student, trainset=train, valset=val)
    return student, before, optimized


def test_compile_changes_the_copy_not_the_student(compiled):
    student, before, optimized = compiled
    assert json.dumps(student.dump_state(), sort_keys=True) == before
    assert not hasattr(student, "greater_results")
    result = optimized.greater_results["predict"]
    assert optimized.predict.signature.instructions == result["best_instruction"]
    # keep_current=False always replaces the token, so the search really edited the instruction.
    assert result["final_instruction"] != result["initial_instruction"]
    assert all(step["changed"] for step in result["trace"])
    assert [step["position"] for step in result["trace"]] == [0, 1]
    seen = [result["initial_heldout"]["accuracy"]] + [s["heldout_accuracy"] for s in result["trace"]]
    assert result["best_heldout"]["accuracy"] == max(seen)


def test_results_are_plain_json_data(compiled):
    _, _, optimized = compiled
    text = json.dumps(optimized.greater_results)
    back = json.loads(text)
    trace = back["predict"]["trace"]
    assert len(trace) == 2
    assert {"position", "candidates", "chosen", "loss", "instruction", "seconds", "finalists"} <= set(trace[0])
    assert back["predict"]["extractor"]["kind"] == "choice"
    # The results are not parameters: they must not leak into the saved program.
    assert [name for name, _ in optimized.named_predictors()] == ["predict"]


def test_score_and_candidates_sit_where_dspys_optimizers_put_them(compiled, tmp_path):
    _, _, optimized = compiled
    result = optimized.greater_results["predict"]
    candidates = optimized.candidate_programs
    assert candidates and all(set(c) == {"predictor", "instruction", "score", "scored_on"} for c in candidates)
    assert [c["score"] for c in candidates] == sorted((c["score"] for c in candidates), reverse=True)
    assert optimized.score == 100 * result["best_heldout"]["accuracy"]  # no target LM: held-out, in percent
    json.dumps(candidates)
    assert [name for name, _ in optimized.named_predictors()] == ["predict"]  # nothing leaks into parameters


def test_the_inputs_store_budget_reaches_the_model_and_the_compile_uses_it(optimizer, teleprompter, compiled):
    assert teleprompter._lm.context_cache_bytes == 512 * 2**20
    assert teleprompter._lm._contexts  # the compile's steps stored their examples' inputs
    off = GReaTerTeleprompter(metric=exact_match, inputs_cache_mb=0, **SMALL).use_loaded_model(*optimizer)
    assert off._lm.context_cache_bytes == 0


def test_save_load_round_trip(compiled, tmp_path):
    _, _, optimized = compiled
    path = tmp_path / "program.json"
    optimized.save(str(path))
    fresh = dspy.ChainOfThought("question -> answer")
    fresh.load(str(path))
    assert fresh.predict.signature.instructions == optimized.predict.signature.instructions
    assert "greater_results" not in path.read_text()


def test_optimized_program_runs_on_its_target_lm(compiled, navigate):
    _, _, optimized = compiled
    lm = dspy.utils.DummyLM([{"reasoning": "Steps cancel out.", "answer": "Yes"}])
    with dspy.context(lm=lm):
        prediction = optimized(question=navigate[1][0].question)
    assert prediction.answer == "Yes"
    prompt = lm.history[-1]["messages"][0]["content"]
    assert optimized.predict.signature.instructions in prompt


def test_predict_program_keeps_its_signature(teleprompter, navigate):
    train, val = navigate
    student = dspy.Predict("question -> answer")
    optimized = teleprompter.compile(student, trainset=train, valset=val)
    assert list(optimized.signature.output_fields) == ["answer"]  # no reasoning field added
    assert optimized.signature.instructions == optimized.greater_results["self"]["best_instruction"]


def test_optimizer_predictions_report_labels(teleprompter, navigate):
    _, val = navigate
    preds, golds = teleprompter.optimizer_predictions(dspy.ChainOfThought("question -> answer"), val)
    assert len(preds) == len(golds) == len(val)
    assert set(preds) <= {"Yes", "No"}
    assert golds == [e.answer for e in val]


def test_compile_on_an_integer_task(teleprompter):
    train, val = split_examples(load_examples("multistep_arithmetic_two"), [4, 2], seed=0)
    optimized = teleprompter.compile(dspy.ChainOfThought("question -> answer"), trainset=train, valset=val)
    result = optimized.greater_results["predict"]
    assert result["extractor"]["kind"] == "integer"
    assert len(result["trace"]) == 2


def test_ctrl_c_returns_the_best_program_and_the_checkpoint_resumes(teleprompter, navigate, compiled, tmp_path):
    """A KeyboardInterrupt in the main thread right after the first step, as Ctrl-C raises it there.

    Raised from a log handler (synchronously) rather than by signalling: the suite's earlier tests must
    not be able to change whether it lands.
    """
    import logging

    train, val = navigate

    class InterruptAfterFirstStep(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("step 0 "):
                raise KeyboardInterrupt

    log = logging.getLogger("dspy_greater.teleprompter")
    handler, level, disabled = InterruptAfterFirstStep(), log.level, log.disabled
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    # A library's logging.config.dictConfig (disable_existing_loggers) or logging.disable may have
    # silenced this logger earlier in the suite.
    log.disabled = False
    previous_disable = logging.root.manager.disable
    logging.disable(logging.NOTSET)
    try:
        interrupted = teleprompter.compile(dspy.ChainOfThought("question -> answer"), trainset=train, valset=val,
                                           checkpoint_dir=tmp_path)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.disabled = disabled
        logging.disable(previous_disable)
    first = interrupted.greater_results["predict"]
    assert first["stopped_reason"] == "interrupted" and len(first["trace"]) == 1
    assert interrupted.predict.signature.instructions == first["best_instruction"]
    assert json.loads((tmp_path / "predict.json").read_text())["next_step"] == 1

    resumed = teleprompter.compile(dspy.ChainOfThought("question -> answer"), trainset=train, valset=val,
                                   checkpoint_dir=tmp_path)
    result = resumed.greater_results["predict"]
    uninterrupted = compiled[2].greater_results["predict"]
    assert result["resumed_at_step"] == 1 and result["stopped_reason"] == "completed"
    assert [s["instruction"] for s in result["trace"]] == [s["instruction"] for s in uninterrupted["trace"]]
    assert result["best_instruction"] == uninterrupted["best_instruction"]


class _RecordingLM(dspy.BaseLM):
    """A target that replies with ``replies`` in turn and records the messages it was sent."""

    def __init__(self, *replies):
        super().__init__(model="recording", cache=False)
        self.replies, self.sent = replies, []

    def forward(self, prompt=None, messages=None, **kwargs):
        from litellm import ModelResponse
        self.sent.append(json.dumps(messages))
        text = self.replies[(len(self.sent) - 1) % len(self.replies)]
        return ModelResponse(choices=[{"message": {"role": "assistant", "content": text}}], model=self.model,
                             usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})


@pytest.mark.parametrize("task, signature, reply", [
    ("object_counting", "question -> answer", "7"),  # the labels add "(an integer)"; a str field alone does not
    ("movie_recommendation", "question -> answer", "(B)"),  # the labels' options (A)-(E), not one question's (A)-(D)
])
def test_a_saved_and_loaded_program_sends_the_same_prompts(tiny_teleprompter, tmp_path, task, signature, reply):
    from dspy_greater.targets.adapter import GReaTerAdapter, extractor_for_field

    examples = load_examples(task)
    train, val, test = examples[:6], examples[6:8], examples[8:11]
    optimized = tiny_teleprompter(target_candidates=0).compile(dspy.ChainOfThought(signature), trainset=train,
                                                               valset=val)
    optimized.save(str(tmp_path / "program.json"))
    loaded = dspy.ChainOfThought(signature)
    loaded.load(str(tmp_path / "program.json"))
    GReaTerAdapter.from_program(loaded)
    loaded.save(str(tmp_path / "again.json"))  # a loaded program saved again keeps its extractor
    reloaded = dspy.ChainOfThought(signature)
    reloaded.load(str(tmp_path / "again.json"))

    sent = []
    for program in (optimized, loaded, reloaded):
        lm = _RecordingLM("Counting them one by one.", reply)
        with dspy.context(lm=lm, adapter=GReaTerAdapter.from_program(program)):
            answers = [program(**e.inputs()).answer for e in test]
        sent.append((lm.sent, answers))
    assert sent[0] == sent[1] == sent[2] and len(sent[0][0]) == 2 * len(test)
    # Without the saved extractor some answer prompts would differ: the field's type and one question's options
    # are not what the labels say.
    kept = GReaTerAdapter.from_program(loaded).extractor(loaded.predict.signature, "answer")
    assert any(extractor_for_field(loaded.predict.signature, "answer", e.question).text != kept.text for e in test)


def test_a_target_that_never_parses_is_warned_about(tiny_teleprompter, navigate, caplog):
    train, val = navigate
    lm = _RecordingLM("I am not sure what to say here.")
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()), caplog.at_level("WARNING", logger="dspy_greater"):
        optimized = tiny_teleprompter(layout="greater").compile(dspy.ChainOfThought("question -> answer"),
                                                                trainset=train, valset=val)
    selection = optimized.greater_results["predict"]["target_selection"]
    assert set(selection["scores"].values()) == {0.0} and len(selection["unparsed"]) == len(selection["scores"])
    assert caplog.text.count("every instruction scored 0 on the target LM recording") == 1
    assert "GReaTerAdapter for small models" in caplog.text
    assert selection["calls"] == selection["estimated_calls"] == len(lm.sent)  # ChatAdapter, then JSONAdapter


def test_no_parseable_held_out_answer_is_warned_about(tiny_teleprompter, caplog):
    examples = load_examples("object_counting")
    with caplog.at_level("WARNING", logger="dspy_greater"):
        optimized = tiny_teleprompter(layout="chat_adapter", answer_tokens=1).compile(
            dspy.ChainOfThought("question -> answer"), trainset=examples[:4], valset=examples[4:6])
    result = optimized.greater_results["predict"]
    assert result["initial_instruction"] == result["program_instruction"]  # the reasoning start is GReaTer's layout's
    assert all(p is None for p in result["initial_heldout"]["predictions"])
    assert "gave no answer that parses on any held-out example in the chat_adapter layout" in caplog.text


PAPER_START = "Use proper logical reasoning and think step by step. Finally give the actual correct answer."
DSPY_GENERATED = "Given the fields `question`, produce the fields `answer`."


def test_which_instructions_dspy_generated():
    from dspy_greater.start import is_generated_instruction, reasoning_instruction

    assert is_generated_instruction(dspy.ChainOfThought("question -> answer").predict.signature)
    assert is_generated_instruction(dspy.Predict("context, question -> answer").signature)
    assert not is_generated_instruction(dspy.Predict(dspy.Signature("question -> answer", "Answer Yes or No.")).signature)
    assert reasoning_instruction("answer") == PAPER_START
    assert reasoning_instruction("sorted_words").endswith("give the actual correct sorted words.")


def test_a_generated_instruction_starts_the_search_from_reasoning(tiny_teleprompter, navigate):
    train, val = navigate
    optimized = tiny_teleprompter(target_candidates=0).compile(dspy.ChainOfThought("question -> answer"),
                                                               trainset=train, valset=val)
    result = optimized.greater_results["predict"]
    assert result["initial_instruction"] == PAPER_START and result["program_instruction"] == DSPY_GENERATED
    # The program's own instruction is the baseline: it is returned when it scored above every searched one.
    own, best = result["program_heldout"], result["best_heldout"]
    beaten = (own["accuracy"], -own["mean_loss"]) > (best["accuracy"], -best["mean_loss"])
    assert optimized.predict.signature.instructions == (DSPY_GENERATED if beaten else result["best_instruction"])


@pytest.mark.parametrize("initial_instruction, program_instruction, start", [
    ("program", None, DSPY_GENERATED),  # the documented value that keeps the program's own text
    (None, "Answer Yes or No.", "Answer Yes or No."),  # a user-written instruction is the start as it is
    ("Think it through.", None, "Think it through."),  # an explicit start overrides
])
def test_other_starts(tiny_teleprompter, navigate, initial_instruction, program_instruction, start):
    train, val = navigate
    program = dspy.ChainOfThought("question -> answer")
    if program_instruction:
        program.predict.signature = program.predict.signature.with_instructions(program_instruction)
    tp = tiny_teleprompter(target_candidates=0, initial_instruction=initial_instruction, num_steps=1)
    result = tp.compile(program, trainset=train, valset=val).greater_results["predict"]
    assert result["initial_instruction"] == start
    assert result["program_instruction"] == (program_instruction or DSPY_GENERATED)


def test_messages_reach_the_user_as_dspys_own_do(tiny_teleprompter, navigate, capsys):
    train, val = navigate

    def compile_and_read(**options):
        tiny_teleprompter(target_candidates=0, **options).compile(dspy.ChainOfThought("question -> answer"),
                                                                  trainset=train, valset=val)
        return capsys.readouterr().err

    capsys.readouterr()
    shown = compile_and_read(progress=True)
    assert "INFO dspy_greater.teleprompter: GReaTer [predict]: 'Use proper" in shown  # DSPy's format, on stderr
    assert "INFO dspy_greater" not in compile_and_read(progress=False)
    dspy.disable_logging()
    try:
        assert "dspy_greater" not in compile_and_read(progress=True)
    finally:
        dspy.enable_logging()


def test_a_teacher_is_not_used_and_says_so(tiny_teleprompter, navigate, caplog):
    train, val = navigate
    with caplog.at_level("WARNING", logger="dspy_greater"):
        tiny_teleprompter(target_candidates=0).compile(dspy.ChainOfThought("question -> answer"), trainset=train,
                                                      valset=val, teacher=dspy.ChainOfThought("question -> answer"))
    assert "teacher is not used" in caplog.text


def test_on_step_sees_every_step_as_plain_data(tiny_teleprompter, navigate):
    train, val = navigate
    seen = []
    tiny_teleprompter(target_candidates=0, num_steps=2, on_step=lambda name, record: seen.append((name, record))).compile(
        dspy.ChainOfThought("question -> answer"), trainset=train, valset=val)
    assert [(name, record["step"]) for name, record in seen] == [("predict", 0), ("predict", 1)]
    json.dumps(seen)
    with pytest.raises(TypeError, match="on_step must be callable"):
        GReaTerTeleprompter(metric=exact_match, on_step="print")


def test_progress_false_shows_no_weight_loading_bar(navigate, capsys):
    train, _ = navigate
    tp = GReaTerTeleprompter(metric=exact_match, progress=False)
    capsys.readouterr()
    tp._optimizer_lm()  # loads the embedded model (from its dequantized cache)
    captured = capsys.readouterr()
    assert "Loading weights" not in captured.err + captured.out
