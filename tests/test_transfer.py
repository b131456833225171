"""Transfer to a real target LM: compile with GReaTerTeleprompter while SmolLM2-135M-Instruct is
served by llama.cpp on 127.0.0.1, select among the search's instructions on that target through
``dspy.Evaluate``, evaluate the optimized program on held-out examples, stop the server; and the
target failing during the selection.

The search runs once (module fixture, ~1 min on 2 shared cores). The fault tests reuse its
``SearchResult`` (``GreaterSearch.run`` is patched to return it) so that they exercise only what
they are about: ``compile``'s target-aware selection against a dying or dead target.
"""

import logging
import socket
import types

import dspy
import pytest
import torch

pytest.importorskip("llama_cpp")

from dspy.utils.exceptions import AdapterParseError  # noqa: E402

from dspy_greater import GReaTerTeleprompter  # noqa: E402
from dspy_greater.targets.adapter import GReaTerAdapter  # noqa: E402
from dspy_greater.data import load_examples, split_examples  # noqa: E402
from dspy_greater.metrics import exact_match  # noqa: E402
from dspy_greater.engine.search import GreaterSearch  # noqa: E402
from dspy_greater.targets.llama_cpp import LlamaCppServer  # noqa: E402

# keep_current=False makes every step replace its token, so the search yields instructions other
# than the initial one and the selection has several candidates to compare (with the default the
# two steps may keep the initial instruction and leave a single candidate).
CONFIG = dict(num_steps=2, batch_size=3, max_reasoning_tokens=12, eval_every=1, progress=False,
              target_candidates=3, num_threads=2, keep_current=False)


@pytest.fixture(scope="module")
def splits():
    train, val, test = split_examples(load_examples("navigate"), [5, 4, 4], seed=0)
    return types.SimpleNamespace(train=train, val=val, test=test)


@pytest.fixture(scope="module")
def server():
    with LlamaCppServer(n_threads=1) as running:
        yield running
    assert not running.is_running


def _teleprompter(optimizer, metric=exact_match):
    return GReaTerTeleprompter(metric=metric, **CONFIG).use_loaded_model(*optimizer)


@pytest.fixture(scope="module")
def compiled(optimizer, server, splits):
    """One real compile against the live target; the search's own result is captured for later tests."""
    captured = {}
    run = GreaterSearch.run

    def recording_run(self, *args, **kwargs):
        captured["result"] = run(self, *args, **kwargs)
        return captured["result"]

    lm = server.lm(max_tokens=64, cache=False)
    student = dspy.ChainOfThought("question -> answer")
    # One torch thread: on 2 cores shared with another busy process, two intra-op threads made this
    # search 10x slower (297 s against 31 s measured with one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(GreaterSearch, "run", recording_run)
            with dspy.context(lm=lm, adapter=GReaTerAdapter()):
                optimized = _teleprompter(optimizer).compile(student, trainset=splits.train, valset=splits.val)
    finally:
        torch.set_num_threads(threads)
    return types.SimpleNamespace(optimized=optimized, search=captured["result"], lm=lm, calls=len(lm.history),
                                 student=student)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _compile_reusing_search(optimizer, compiled, splits, lm, metric=exact_match, **settings):
    """compile() with the search replaced by the captured result; returns (program, DSPy's error logs)."""
    collect = _Collect()
    parallel_log = logging.getLogger("dspy.utils.parallelizer")
    parallel_log.addHandler(collect)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(GreaterSearch, "run", lambda self, *args, **kwargs: compiled.search)
            with dspy.context(lm=lm, adapter=GReaTerAdapter(), **settings):
                program = _teleprompter(optimizer, metric).compile(
                    dspy.ChainOfThought("question -> answer"), trainset=splits.train, valset=splits.val)
    finally:
        parallel_log.removeHandler(collect)
    return program, collect.messages


def _dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- the real path ---------------------------------------------------------------------------------------


def test_selection_scores_every_candidate_on_the_target(compiled, splits):
    results = compiled.optimized.greater_results["predict"]
    selection = results["target_selection"]
    own = results["program_instruction"]
    candidates = selection["candidates"]
    # The search's result is kept, and the candidates come from it.
    assert results["best_instruction"] == compiled.search.best_instruction
    assert candidates[0] == compiled.search.best_instruction
    assert own in candidates and len(candidates) == len(set(candidates)) >= 2
    # Every candidate was scored on the target, the program's own instruction being the baseline.
    assert selection["errors"] == {}
    assert set(selection["scores"]) == set(candidates)
    assert all(0.0 <= s <= 100.0 for s in selection["scores"].values())
    assert selection["baseline"] == selection["scores"][own]
    # GReaTerAdapter: two target calls per example; the estimate was exact and the calls were real.
    assert selection["estimated_calls"] == 2 * len(splits.val) * len(candidates)
    assert selection["calls"] == selection["estimated_calls"] == compiled.calls > 0
    assert selection["tokens"] > 0
    assert selection["target_lm"] == "dspy.settings.lm" and selection["target_model"] == compiled.lm.model
    # The chosen instruction is the argmax (ties: the search's order) and the program uses it.
    best = max(selection["scores"].values())
    assert selection["chosen"] == next(c for c in candidates if selection["scores"][c] == best)
    assert compiled.optimized.predict.signature.instructions == selection["chosen"]
    assert compiled.student.predict.signature.instructions == own  # the student is untouched


def test_optimized_program_evaluates_on_the_target(compiled, server, splits):
    lm = server.lm(max_tokens=64, cache=False)
    collect = _Collect()
    logging.getLogger("dspy.utils.parallelizer").addHandler(collect)
    try:
        with dspy.context(lm=lm, adapter=GReaTerAdapter.from_program(compiled.optimized)):
            result = dspy.Evaluate(devset=splits.test, metric=exact_match, num_threads=2)(compiled.optimized)
    finally:
        logging.getLogger("dspy.utils.parallelizer").removeHandler(collect)
    selection = compiled.optimized.greater_results["predict"]["target_selection"]
    print(f"target: baseline {selection['baseline']} -> chosen {selection['scores'][selection['chosen']]} on the "
          f"valset; optimized program {result.score} on {len(splits.test)} test examples; scores {selection['scores']}")
    assert 0.0 <= result.score <= 100.0
    # dspy.Evaluate turns a failed example into an empty Prediction scored 0. Here the only failures
    # allowed are the tiny model's unparseable answers (e.g. "The answer is 1." to a Yes/No question).
    answers = [prediction.get("answer") for _, prediction, _ in result.results]
    parsed = [a for a in answers if a is not None]
    assert all(a in ("Yes", "No") for a in parsed) and parsed
    assert len(collect.messages) == len(answers) - len(parsed)
    assert all("could not be parsed" in message for message in collect.messages)
    # Every example reached the target twice: the reasoning (one user turn ending with the optimized
    # instruction), then the answer (reasoning as the assistant turn, then the extractor prompt).
    reasoning_calls = [entry for entry in lm.history if len(entry["messages"]) == 1]
    answer_calls = [entry for entry in lm.history if len(entry["messages"]) == 3]
    assert len(reasoning_calls) == len(answer_calls) == len(splits.test) == len(lm.history) // 2
    instruction = compiled.optimized.predict.signature.instructions
    assert all(entry["messages"][0]["content"].endswith(f"\n\n{instruction}") for entry in reasoning_calls)
    assert all(entry["messages"][2]["content"] == "Therefore, the final answer (Yes or No) is" for entry in answer_calls)


# -- faults: the target fails during the selection --------------------------------------------------------


@pytest.fixture(scope="module")
def died_mid_selection(optimizer, compiled, splits):
    """The target server is stopped by the metric right after the first scored example."""
    dying = LlamaCppServer(n_threads=1).start()
    try:
        calls = []

        def stop_after_first(example, prediction, trace=None):
            calls.append(prediction)
            dying.stop()  # idempotent: only the first call stops it
            return exact_match(example, prediction, trace)

        lm = dying.lm(max_tokens=64, cache=False)
        program, dspy_errors = _compile_reusing_search(optimizer, compiled, splits, lm, stop_after_first)
        return types.SimpleNamespace(program=program, dspy_errors=dspy_errors, metric_calls=len(calls), lm=lm,
                                     server_running=dying.is_running)
    finally:
        dying.stop()


def test_target_dying_mid_selection_keeps_the_search_result(died_mid_selection, compiled):
    run = died_mid_selection
    assert not run.server_running and run.metric_calls >= 1
    results = run.program.greater_results["predict"]
    selection = results["target_selection"]
    print(f"server stopped mid-selection: {len(run.dspy_errors)} example errors logged by DSPy; selection {selection}")
    assert results["best_instruction"] == compiled.search.best_instruction
    assert selection["chosen"] == compiled.search.best_instruction  # only the first candidate met a live target
    assert run.program.predict.signature.instructions == selection["chosen"]
    # dspy.Evaluate logged one error per failed example (it never raised: 4 examples < max_errors=10).
    assert run.dspy_errors and all(message.startswith("Error for Example(") for message in run.dspy_errors)


def test_target_dying_mid_selection_is_recorded_as_errors(died_mid_selection):
    # dspy.Evaluate swallows per-example errors below max_errors (default 10) and scores them
    # failure_score (0.0 by default): the selection must not record those as real 0.0 scores.
    selection = died_mid_selection.program.greater_results["predict"]["target_selection"]
    candidates = selection["candidates"]
    assert set(candidates[1:]) <= set(selection["errors"])  # evaluated after the server was gone
    assert not set(candidates[1:]) & set(selection["scores"])
    assert selection["baseline"] is None


def test_dead_target_with_raising_evaluate_records_every_error(optimizer, compiled, splits, server):
    """With ``max_errors=1`` dspy.Evaluate raises on a dead target: every candidate's error is recorded."""
    lm = dspy.LM(**{**server.lm_kwargs(api_base=f"http://127.0.0.1:{_dead_port()}/v1", cache=False, num_retries=0)})
    program, dspy_errors = _compile_reusing_search(optimizer, compiled, splits, lm, max_errors=1)
    results = program.greater_results["predict"]
    selection = results["target_selection"]
    print(f"dead target, max_errors=1: selection {selection}")
    assert selection["scores"] == {}
    assert set(selection["errors"]) == set(selection["candidates"])
    assert all(selection["errors"].values())
    assert selection["chosen"] == results["best_instruction"] == compiled.search.best_instruction
    assert selection["baseline"] is None and selection["calls"] == 0
    assert program.predict.signature.instructions == compiled.search.best_instruction
    assert any("Connection" in message or "connect" in message for message in dspy_errors)


class _StubAdapter(GReaTerAdapter):
    """Answers "Yes" without calling the LM, and raises ``error`` for the ``failing`` questions."""

    def __init__(self, failing, error):
        super().__init__()
        self.failing, self.error = set(failing), error

    def __call__(self, lm, lm_kwargs, signature, demos, inputs):
        if inputs["question"] in self.failing:
            raise self.error
        return [{"reasoning": "stub", "answer": "Yes"}]


def _select_with_stub(optimizer, compiled, splits, adapter):
    lm = dspy.LM("openai/never-called", api_base=f"http://127.0.0.1:{_dead_port()}/v1", api_key="x", engine="litellm")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GreaterSearch, "run", lambda self, *args, **kwargs: compiled.search)
        with dspy.context(lm=lm, adapter=adapter):
            program = _teleprompter(optimizer).compile(
                dspy.ChainOfThought("question -> answer"), trainset=splits.train, valset=splits.val)
    return program, program.greater_results["predict"]["target_selection"]


def test_an_unparseable_answer_scores_zero_and_is_not_a_target_error(optimizer, compiled, splits):
    """A weak target's unparseable answer (AdapterParseError) is a wrong answer, not a failing target."""
    signature = dspy.ChainOfThought("question -> answer").predict.signature
    error = AdapterParseError(adapter_name="GReaTerAdapter", signature=signature, lm_response="The answer is 1.",
                              message="The target LM's answer for 'answer' could not be parsed")
    program, selection = _select_with_stub(optimizer, compiled, splits, _StubAdapter([splits.val[0].question], error))
    expected = 100.0 * sum(e.answer == "Yes" for e in splits.val[1:]) / len(splits.val)
    assert selection["errors"] == {}
    assert selection["scores"] == {text: expected for text in selection["candidates"]}
    assert program.predict.signature.instructions == selection["chosen"] == selection["candidates"][0]


def test_a_failing_target_call_is_an_error_not_a_score(optimizer, compiled, splits):
    """One example whose LM call fails (not a parse error) makes that candidate's score unreliable."""
    program, selection = _select_with_stub(
        optimizer, compiled, splits, _StubAdapter([splits.val[0].question], ConnectionError("target went away")))
    assert selection["scores"] == {} and set(selection["errors"]) == set(selection["candidates"])
    assert selection["chosen"] == compiled.search.best_instruction == program.predict.signature.instructions
    assert selection["baseline"] is None
