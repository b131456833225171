"""Tests for dspy_greater.engine.search: unit tests of the pieces, then short real runs on CPU.

The runs use the embedded SmolLM2-135M on the shortest navigate questions, with tiny settings
(a few examples, 4-16 reasoning tokens, 1-3 finalists): they check the mechanics of the loop
(proposals, positions, growth, wrap, caching, bookkeeping), not that the instruction improves.
"""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch

from dspy_greater.data import load_examples
from dspy_greater.engine.extractor import derive_extractor
from dspy_greater.engine.model import OptimizerLM
from dspy_greater.engine.config import GreaterConfig
from dspy_greater.engine.search import GreaterSearch, SearchExample, SearchResult, finalist_rank, intersect_candidates

# ---------------------------------------------------------------------------------------------
# 1. intersect_candidates (pure)
# ---------------------------------------------------------------------------------------------

SETS = [{1, 2, 3}, {2, 3, 4}, {3, 4, 5}]


def test_intersect_pairs_union_when_all_subsets_drawn():
    # 200 draws of 2 of 3 sets: every pair is drawn (all three with probability 1 - 3 * (2/3)^200).
    union = intersect_candidates(SETS, q=200, subset_size=2, rng=random.Random(0))
    assert union == ({1, 2, 3} & {2, 3, 4}) | ({1, 2, 3} & {3, 4, 5}) | ({2, 3, 4} & {3, 4, 5})
    assert union == {2, 3, 4}


def test_intersect_single_sets_union_is_union_of_all():
    assert intersect_candidates(SETS, q=200, subset_size=1, rng=random.Random(0)) == {1, 2, 3, 4, 5}


def test_intersect_one_draw_is_one_intersection():
    possible = [{2, 3}, {3}, {3, 4}]
    for seed in range(10):
        assert intersect_candidates(SETS, q=1, subset_size=2, rng=random.Random(seed)) in possible


def test_intersect_deterministic_for_seeded_rng():
    sets = [set(random.Random(i).sample(range(30), 12)) for i in range(8)]
    runs = [intersect_candidates(sets, q=3, subset_size=3, rng=random.Random(7)) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    # The rng is what decides: over a few seeds, the draws are not all the same.
    results = {frozenset(intersect_candidates(sets, q=1, subset_size=2, rng=random.Random(s))) for s in range(20)}
    assert len(results) > 1


def test_intersect_subset_size_larger_than_number_of_sets():
    snapshot = [set(s) for s in SETS]
    assert intersect_candidates(SETS, q=1, subset_size=10, rng=random.Random(0)) == {3}
    assert intersect_candidates(SETS, q=5, subset_size=3, rng=random.Random(1)) == {3}
    assert SETS == snapshot  # inputs untouched


# ---------------------------------------------------------------------------------------------
# 5. GreaterConfig (pure)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"num_steps": 0},
        {"num_steps": -3},
        {"topk": 2.5},
        {"num_finalists": 0},
        {"batch_size": 0},
        {"batch_size": "all"},
        {"topk_growth": 0},
        {"answer_temperature": 0.0},
        {"reasoning_temperature": -0.1},
        {"finalist_scoring": "x"},
        {"finalist_scoring": "confirm"},
        {"allowed_tokens": "emoji"},
        {"finalist_key": "accuracy"},
        {"mistakes_over": "labels"},
        {"inputs_cache_mb": -1},
        {"inputs_cache_mb": "lots"},
    ],
)
def test_config_rejects_bad_values(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        GreaterConfig(**bad)


def test_config_defaults_and_batch_size_none_are_valid():
    cfg = GreaterConfig()
    assert (cfg.fluency_weight, cfg.answer_temperature, cfg.num_finalists) == (0.2, 0.2, 3)
    assert cfg.keep_current is False and cfg.current_competes is False  # the best other finalist replaces the token
    assert GreaterConfig(batch_size=None).batch_size is None
    assert "finalist_scoring" in GreaterConfig.field_names()


def test_config_faithful_is_the_papers_protocol():
    cfg = GreaterConfig.faithful()
    assert cfg.batch_size is None
    assert cfg.finalist_scoring == "regenerate"
    assert cfg.max_reasoning_tokens == 1024
    assert cfg.keep_current is False
    assert cfg.reasoning_temperature == 0.0  # greedy, as in the research code
    assert (cfg.fluency_weight, cfg.score_fluency_weight, cfg.answer_temperature) == (0.2, 0.02, 0.2)
    assert (cfg.topk, cfg.intersect_q, cfg.intersect_size, cfg.min_candidates, cfg.num_finalists) == (11, 6, 5, 6, 3)
    # Overrides win, and are validated.
    assert GreaterConfig.faithful(num_steps=5).num_steps == 5
    with pytest.raises(ValueError, match="num_steps"):
        GreaterConfig.faithful(num_steps=0)


# ---------------------------------------------------------------------------------------------
# Model fixtures
# ---------------------------------------------------------------------------------------------


def _task(name: str) -> tuple:
    """The task's extractor and its examples, shortest questions first (cheap on CPU)."""
    examples = load_examples(name)
    extractor = derive_extractor("answer", None, [e.answer for e in examples], [e.question for e in examples])
    examples = sorted(examples, key=lambda e: (len(e.question), e.question))
    return extractor, [SearchExample(e.question, extractor.canonical(e.answer)) for e in examples]


@pytest.fixture(scope="module")
def navigate():
    return _task("navigate")


@pytest.fixture(scope="module")
def object_counting():
    return _task("object_counting")


def _search(lm, layout, extractor, **config) -> GreaterSearch:
    """A search keeping the current token unless a finalist beats it (the rules most tests here
    check), unless ``config`` says otherwise."""
    return GreaterSearch(lm, layout, extractor, GreaterConfig(**{"keep_current": True, **config}))


# ---------------------------------------------------------------------------------------------
# 2. allowed_token_mask on the real tokenizer
# ---------------------------------------------------------------------------------------------


def _ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return ids


@pytest.mark.slow
def test_allowed_token_mask_words(lm, optimizer):
    _, tokenizer = optimizer
    words = lm.allowed_token_mask("words")
    assert words.dtype == torch.bool and words.shape == (len(tokenizer),)
    for text in [" the", ".", ",", "Think", " step", " Answer"]:
        assert words[_ids(tokenizer, text)].all(), text
    for text in ["\n", "\n\n", "1", "7", "é", " café", "!", "\t", "(", "<file_sep>"]:
        assert not words[_ids(tokenizer, text)].any(), text
    for token_id in tokenizer.all_special_ids + [tokenizer.eos_token_id, tokenizer.pad_token_id]:
        assert not words[token_id]
    # Every allowed token is ASCII letters/spaces or exactly "." / ",".
    allowed_texts = tokenizer.batch_decode([[i] for i in words.nonzero().flatten().tolist()])
    assert all(t in (".", ",") or re.fullmatch(r"[A-Za-z ]+", t) for t in allowed_texts)


@pytest.mark.slow
def test_allowed_token_mask_modes_nest(lm, optimizer):
    _, tokenizer = optimizer
    words, ascii_, all_ = (lm.allowed_token_mask(m) for m in ("words", "ascii", "all"))
    assert int(words.sum()) < int(ascii_.sum()) < int(all_.sum())
    assert not (words & ~ascii_).any() and not (ascii_ & ~all_).any()
    digit, newline, accented = (_ids(tokenizer, t)[0] for t in ("1", "\n", "é"))
    assert ascii_[digit] and not ascii_[newline] and not ascii_[accented]
    assert all_[newline] and all_[accented]
    for token_id in tokenizer.all_special_ids:
        assert not all_[token_id]
    assert lm.allowed_token_mask("words") is words  # computed once per mode


@pytest.mark.slow
def test_allowed_token_mask_excludes_every_special_added_token(lm, optimizer):
    _, tokenizer = optimizer
    special = [i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special]
    assert len(special) > 3
    for mode in ("ascii", "all"):
        assert not lm.allowed_token_mask(mode)[special].any(), mode


@pytest.mark.slow
def test_whole_words_mask_keeps_words_and_drops_fragments(lm, optimizer):
    _, tokenizer = optimizer
    words, whole = lm.allowed_token_mask("words"), lm.allowed_token_mask("whole_words")
    assert not (whole & ~words).any()
    for text in ["Use", "Answer", " step", " the", ".", ","]:  # words, space-led words, punctuation
        assert whole[_ids(tokenizer, text)].all(), text
    for text in ["ermat", "ys"]:  # pieces the tokenizer never holds as a space-led word
        assert words[_ids(tokenizer, text)].all() and not whole[_ids(tokenizer, text)].any(), text
    later = lm.position_token_mask("whole_words", first=False)  # no word piece after a word
    assert not later[_ids(tokenizer, "Use")].any() and later[_ids(tokenizer, " step")].all()
    assert later[_ids(tokenizer, ".")].all()
    first = lm.position_token_mask("whole_words", first=True)  # a word, never space-led, starts it
    assert first[_ids(tokenizer, "Use")].all() and not first[_ids(tokenizer, " step")].any()
    assert lm.position_token_mask("whole_words", first=False) is later  # computed once per case


# ---------------------------------------------------------------------------------------------
# 3. Proposals
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_proposals_are_task_conditioned_and_deterministic(lm, layout, navigate, object_counting):
    extractor, nav = navigate
    _, counting = object_counting
    search = _search(lm, layout, extractor, topk=8, intersect_q=1, intersect_size=1, min_candidates=3)
    instruction = layout.encode("Think step by step.")
    # A single example each: position 0 is conditioned only on that example's question.
    on_nav = search.propose(instruction, 0, nav[:1], random.Random(0))
    on_counting = search.propose(instruction, 0, counting[:1], random.Random(0))
    assert on_nav != on_counting
    assert set(on_nav[:-1]) != set(on_counting[:-1])
    again = search.propose(instruction, 0, nav[:1], random.Random(0))
    assert again == on_nav
    # With one example and one draw, the candidates are exactly its top-8 allowed tokens, ordered
    # by log-probability, then the current token. Position 0 takes no leading-space tokens.
    context = layout.frame(nav[0].inputs_text)[0]
    logprobs = lm.next_token_logprobs([context])[0]
    allowed = lm.position_token_mask("words", first=True)
    assert not (allowed & ~lm.allowed_token_mask("words")).any()
    assert not any(layout.decode([t])[:1].isspace() for t in on_nav)
    top8 = logprobs.masked_fill(~allowed, -math.inf).topk(8).indices.tolist()
    assert on_nav[:-1] == [t for t in top8 if t != instruction[0]]
    assert on_nav[-1] == instruction[0]


@pytest.mark.slow
def test_proposals_grow_topk_and_respect_bans(lm, layout, navigate):
    extractor, nav = navigate
    examples = nav[:4]
    instruction = layout.encode("Think step by step.")
    small = _search(lm, layout, extractor, topk=3, intersect_q=2, intersect_size=4, min_candidates=1)
    large = _search(lm, layout, extractor, topk=3, intersect_q=2, intersect_size=4, min_candidates=15)
    for position in (1, 4):
        base = small.propose(instruction, position, examples, random.Random(0))
        grown = large.propose(instruction, position, examples, random.Random(0))
        current, previous = instruction[position], instruction[position - 1]
        for candidates in (base, grown):
            assert candidates[-1] == current
            assert current not in candidates[:-1]
            assert previous not in candidates  # "Think" is not proposed at 1, " step" not at 4
            assert len(set(candidates)) == len(candidates)
            assert all(lm.allowed_token_mask("words")[c] for c in candidates[:-1])
        assert len(grown) >= 15 + 1
        assert len(grown) > len(base)
    # Past the end (growth) there is no current token to append.
    tail = large.propose(instruction, len(instruction), examples, random.Random(0))
    assert len(tail) >= 15 and instruction[-1] not in tail


@pytest.mark.slow
def test_whole_words_proposals_never_glue_onto_the_word_before(lm, layout, navigate):
    extractor, nav = navigate
    instruction = layout.encode("ermat proper logical reasoning and think step by step.")  # after a fragment
    loose = _search(lm, layout, extractor, topk=40, intersect_q=2, intersect_size=4, min_candidates=20)
    whole = _search(lm, layout, extractor, topk=40, intersect_q=2, intersect_size=4, min_candidates=20,
                    allowed_tokens="whole_words")
    texts = lm.token_texts
    pieces = torch.tensor([bool(re.fullmatch(r"[A-Za-z]+", t)) for t in texts])
    mask = lm.allowed_token_mask("whole_words")
    for position in (0, 1):
        glued = [t for t in loose.propose(instruction, position, nav[:4], random.Random(0))[:-1] if pieces[t]]
        candidates = whole.propose(instruction, position, nav[:4], random.Random(0))[:-1]
        assert all(mask[c] for c in candidates)
        if position == 0:  # a whole word starts the instruction; the paper's filter also lets fragments in
            assert all(pieces[c] for c in candidates)
            assert any(not mask[t] for t in glued)
        else:  # after a word, only space-led words or punctuation
            assert glued and not any(pieces[c] for c in candidates)


# ---------------------------------------------------------------------------------------------
# 4. The loop: a short real run; growth; wrap
# ---------------------------------------------------------------------------------------------


def _replay(layout, initial: str, result: SearchResult) -> list[list[int]]:
    """Rebuild the instruction ids step by step from the trace; check each record on the way."""
    ids = layout.encode(initial)
    history = []
    for k, record in enumerate(result.trace):
        assert record.step == k
        winner = min(record.finalists, key=lambda f: (f["score"], f["answer_loss"]))
        assert record.chosen == winner["token"]
        if record.position == len(ids):
            # Growing: the most likely proposal held the new position during the step (as the
            # current token, last candidate); the winner may replace it.
            assert record.changed == (winner["token"] != record.candidates[-1])
            ids = [*ids, winner["token_id"]]
        else:
            current = ids[record.position]
            assert record.candidates[-1] == layout.decode([current])
            assert record.changed == (winner["token_id"] != current)
            ids = [*ids[: record.position], winner["token_id"], *ids[record.position + 1 :]]
        assert record.instruction == layout.instruction_text(ids)
        assert math.isfinite(record.loss) and record.loss > 0
        history.append(ids)
    return history


def _expected_positions(layout, initial: str, history: list[list[int]], max_tokens: int) -> list[int]:
    """Positions the advance rule gives: next token; past the end grow, or wrap after a sentence."""
    positions, position = [0], 0
    for ids in history[:-1]:
        position += 1
        if position >= len(ids):
            ends = layout.decode(ids).rstrip().endswith((".", "!", "?"))
            position = 0 if ends or len(ids) >= max_tokens else position
        positions.append(position)
    return positions


@pytest.fixture(scope="module")
def main_run(lm, layout, navigate):
    """3 steps from a 2-token instruction without a period: positions 0, 1, then 2 (growth)."""
    extractor, nav = navigate
    train, heldout = nav[:6], nav[6:10]
    search = _search(
        lm, layout, extractor, num_steps=3, batch_size=4, max_reasoning_tokens=16, eval_every=1, seed=0
    )
    records = []
    result = search.run("Think carefully", train, heldout, progress=records.append)
    return search, result, records, train, heldout


@pytest.mark.slow
def test_run_trace_and_bookkeeping(layout, main_run):
    search, result, records, train, heldout = main_run
    assert len(result.trace) == 3
    assert records == result.trace  # progress callback saw every record
    assert [r.position for r in result.trace] == [0, 1, 2]
    history = _replay(layout, "Think carefully", result)
    assert _expected_positions(layout, "Think carefully", history, 48) == [0, 1, 2]
    for record in result.trace:
        assert isinstance(record.instruction, str) and record.instruction
        assert {"propose", "generate", "gradient", "select", "heldout"} <= set(record.seconds)
        assert all(v >= 0 for v in record.seconds.values())
        assert 0.0 <= record.heldout_accuracy <= 1.0 and math.isfinite(record.heldout_loss)
        # keep_current: the current token is scored too, after num_finalists challengers.
        assert len(record.finalists) == 3 + 1
        # Challengers are the candidates with the most negative gradient, in that order.
        gradients = [f["gradient"] for f in record.finalists[:-1]]
        assert gradients == sorted(gradients)
        assert all(f["token"] in record.candidates for f in record.finalists)
        assert len(set(record.candidates)) == len(record.candidates)
    assert result.final_instruction == result.trace[-1].instruction
    assert result.initial_instruction == "Think carefully"
    assert result.stopped_reason == "completed" and result.seconds > 0


@pytest.mark.slow
def test_run_grows_past_the_end(layout, main_run):
    _, result, *_ = main_run
    history = _replay(layout, "Think carefully", result)
    assert [len(ids) for ids in history] == [2, 2, 3]
    assert history[2][:2] == history[1]


@pytest.mark.slow
def test_run_result_is_json_and_keeps_the_best(main_run):
    _, result, _, _, heldout = main_run
    data = json.loads(json.dumps(result.to_dict()))
    assert data["trace"][0]["position"] == 0 and len(data["trace"]) == 3
    assert data["best_instruction"] == result.best_instruction
    initial, best = result.initial_heldout, result.best_heldout
    assert best["accuracy"] >= initial["accuracy"]
    assert len(best["predictions"]) == len(heldout)
    assert all(p in ("Yes", "No") for p in best["predictions"])
    # The best is the maximum (accuracy, then lower loss) over everything evaluated.
    evaluated = [(initial["accuracy"], -initial["mean_loss"])] + [
        (r.heldout_accuracy, -r.heldout_loss) for r in result.trace
    ]
    assert (best["accuracy"], -best["mean_loss"]) == max(evaluated)
    tops = result.top_instructions
    assert tops[0]["accuracy"] == best["accuracy"] and tops[0]["instruction"] == result.best_instruction
    keys = [(t["accuracy"], -t["mean_loss"]) for t in tops]
    assert keys == sorted(keys, reverse=True)


@pytest.mark.slow
def test_run_teacher_forced_generates_only_for_the_winner(layout, main_run):
    """teacher_forced scoring reuses the current reasoning: no generation for losing finalists."""
    search, result, _, train, heldout = main_run
    history = _replay(layout, "Think carefully", result)
    visited = {tuple(layout.encode("Think carefully"))} | {tuple(ids) for ids in history}
    instructions = [layout.encode("Think carefully"), *history[:-1]]
    for record, before in zip(result.trace, instructions):
        for finalist in record.finalists[:-1]:  # the last one is the current token (keep_current)
            trial = list(before)
            if record.position == len(trial):
                trial.append(finalist["token_id"])
            else:
                trial[record.position] = finalist["token_id"]
            if tuple(trial) in visited:
                continue
            assert not any((ex.inputs_text, tuple(trial)) in search._reasoning for ex in train + heldout)
    # Every instruction the run stood on has reasoning for the held-out examples.
    for ids in visited:
        assert all((ex.inputs_text, ids) in search._reasoning for ex in heldout)


@pytest.mark.slow
def test_run_wraps_after_a_sentence(lm, layout, navigate):
    extractor, nav = navigate
    search = _search(
        lm, layout, extractor, num_steps=4, batch_size=2, max_reasoning_tokens=4, num_finalists=1,
        eval_every=100, seed=0,
    )
    result = search.run("Be brief.", nav[:2], nav[2:3])
    history = _replay(layout, "Be brief.", result)
    assert _expected_positions(layout, "Be brief.", history, 48) == [r.position for r in result.trace]
    # This deterministic run keeps the final "." at position 2, so it wraps to position 0.
    assert history[2][-1] == layout.encode(".")[0] and len(history[2]) == 3
    assert [r.position for r in result.trace] == [0, 1, 2, 0]
    # Only the last step is evaluated (eval_every larger than num_steps).
    assert [r.heldout_accuracy is None for r in result.trace] == [True, True, True, False]


@pytest.mark.slow
def test_advance_rule(lm, layout, navigate):
    extractor, _ = navigate
    search = _search(lm, layout, extractor, max_instruction_tokens=4)
    sentence = layout.encode("Be exact.")
    assert search._advance(sentence, 0) == 1
    assert search._advance(sentence, 2) == 0  # ends a sentence: wrap
    assert search._advance(layout.encode("Be exact!"), 2) == 0
    open_ended = layout.encode("Be exact")
    assert search._advance(open_ended, 1) == 2  # past the end: grow
    at_max = layout.encode("Be very very exact")
    assert len(at_max) == 4 and search._advance(at_max, 3) == 0  # at the length cap: wrap


def test_finalist_key_decides_between_fluency_and_answer_loss(lm, layout, navigate):
    extractor, _ = navigate
    fluent = {"mistake_rate": 1 / 6, "answer_loss": 2.0, "fluency": 3.0}
    likely = {"mistake_rate": 1 / 6, "answer_loss": 1.5, "fluency": 6.0}  # gold answers likelier, less fluent
    worse = {"mistake_rate": 2 / 6, "answer_loss": 0.1, "fluency": 1.0}
    for entry in (fluent, likely, worse):
        entry["score"] = entry["mistake_rate"] + 0.02 * entry["fluency"]
    by_score = _search(lm, layout, extractor)
    by_loss = _search(lm, layout, extractor, finalist_key="loss")
    assert min([fluent, likely, worse], key=lambda f: finalist_rank(f, by_score.config)) is fluent
    assert min([fluent, likely, worse], key=lambda f: finalist_rank(f, by_loss.config)) is likely  # 1.5 + 0.12 < 2.0 + 0.06
    assert min([worse, likely], key=lambda f: finalist_rank(f, by_loss.config)) is likely  # a new mistake is never traded for loss


def test_mistakes_over_choices_counts_the_answer_the_heldout_check_reads(lm, layout, navigate):
    extractor, nav = navigate
    examples = nav[:6]
    paper = _search(lm, layout, extractor, max_reasoning_tokens=8)
    among = _search(lm, layout, extractor, max_reasoning_tokens=8, mistakes_over="choices")
    choices = among.choice_first_tokens()
    assert choices is not None and len(choices) == 2  # Yes / No start with different tokens
    assert among._correct_among() == choices and paper._correct_among() is None
    instruction = layout.encode_instruction("Think step by step.")
    seqs = among.sequences(instruction, examples, among.reasoning(instruction, examples))
    scores = lm.score(seqs, answer_temperature=0.2, choices=choices, correct_among=choices)
    gold = [among.answer_ids(ex.label)[0] for ex in examples]
    picked = [choices[max(range(2), key=s.choice_logits.__getitem__)] for s in scores]
    assert [s.correct for s in scores] == [p == g for p, g in zip(picked, gold)]
    # The same rule in the gradient pass, whose scores are the current token's.
    from_gradient = []
    lm.one_hot_gradient(seqs, 0, [instruction[0], *layout.encode(" Be")], answer_temperature=0.2,
                        fluency_weight=0.2, scores_out=from_gradient, correct_among=choices)
    assert [s.correct for s in from_gradient] == [s.correct for s in scores]
    # The paper's count: every answer token the whole vocabulary's argmax; never more than among the choices.
    vocabulary = lm.score(seqs, answer_temperature=0.2)
    assert all(s.correct <= c.correct for s, c in zip(vocabulary, scores))
    assert among.evaluate(instruction, examples).predictions == [extractor.choices[choices.index(p)] for p in picked]


# ---------------------------------------------------------------------------------------------
# 6. finalist_scoring="regenerate"
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_regenerate_scoring_generates_reasoning_for_each_finalist(lm, layout, navigate):
    extractor, nav = navigate
    train, heldout = nav[:2], nav[2:3]
    search = _search(
        lm, layout, extractor, num_steps=1, batch_size=None, max_reasoning_tokens=4, num_finalists=2,
        finalist_scoring="regenerate", eval_every=1, seed=0,
    )
    initial = layout.encode("Think carefully")
    result = search.run("Think carefully", train, heldout)
    record = result.trace[0]
    challengers = [f for f in record.finalists if f["token_id"] != initial[0]]
    assert len(challengers) == 2
    for finalist in challengers:
        trial = (finalist["token_id"], *initial[1:])
        cached = [search._reasoning.get((ex.inputs_text, trial)) for ex in train]
        assert all(r is not None and 0 < len(r) <= 4 for r in cached)
    # initial instruction: train + heldout; each challenger: train; final instruction: heldout (if new).
    winner = min(record.finalists, key=lambda f: (f["score"], f["answer_loss"]))
    final = (winner["token_id"], *initial[1:])
    expected = len(train) + len(heldout) + 2 * len(train) + (len(heldout) if record.changed else 0)
    assert len(search._reasoning) == expected
    assert final in {k[1] for k in search._reasoning}


@pytest.mark.slow
def test_failure_after_some_steps_keeps_the_best_result(lm, layout, navigate, monkeypatch):
    extractor, nav = navigate
    search = _search(lm, layout, extractor, num_steps=3, batch_size=2, max_reasoning_tokens=4, num_finalists=1,
                     eval_every=1, seed=0)
    real_step = search._step

    def failing_step(step, *args, **kwargs):
        if step == 1:
            raise RuntimeError("disk full (simulated)")
        return real_step(step, *args, **kwargs)

    monkeypatch.setattr(search, "_step", failing_step)
    result = search.run("Be brief.", nav[:2], nav[2:3])
    assert result.stopped_reason == "error: RuntimeError: disk full (simulated)"
    assert len(result.trace) == 1
    assert result.best_heldout["accuracy"] >= result.initial_heldout["accuracy"]


@pytest.mark.slow
def test_failure_before_any_step_is_raised(lm, layout, navigate, monkeypatch):
    extractor, nav = navigate
    search = _search(lm, layout, extractor, num_steps=2, batch_size=2, max_reasoning_tokens=4, seed=0)

    def broken_step(*args, **kwargs):
        raise RuntimeError("broken")

    monkeypatch.setattr(search, "_step", broken_step)
    with pytest.raises(RuntimeError, match="broken"):
        search.run("Be brief.", nav[:2], nav[2:3])


@pytest.mark.slow
def test_out_of_memory_halves_the_model_batch_and_redoes_the_step(lm, layout, navigate, monkeypatch, caplog):
    """An OOM while the model batch holds more than 2 sequences: the step is redone from the same
    RNG state with smaller batches, so the run ends where an OOM-free run ends."""
    extractor, nav = navigate
    settings = dict(num_steps=2, batch_size=4, max_reasoning_tokens=4, num_finalists=1, eval_every=1, seed=0)
    clean = _search(lm, layout, extractor, **settings).run("Be brief.", nav[:4], nav[4:6])

    search = _search(lm, layout, extractor, **settings)
    real_gradient = lm.one_hot_gradient
    seen_batch_sizes = []

    def gradient_needing_small_batches(*args, **kwargs):
        seen_batch_sizes.append(lm.batch_size)
        if lm.batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_gradient(*args, **kwargs)

    monkeypatch.setattr(lm, "one_hot_gradient", gradient_needing_small_batches)
    before = lm.batch_size
    with caplog.at_level("WARNING", logger="dspy_greater.engine.search"):
        result = search.run("Be brief.", nav[:4], nav[4:6])
    assert result.stopped_reason == "completed"
    assert seen_batch_sizes[:3] == [8, 4, 2] and set(seen_batch_sizes[3:]) == {2}
    assert "retrying with 4 sequences" in caplog.text and "retrying with 2 sequences" in caplog.text
    assert [r.instruction for r in result.trace] == [r.instruction for r in clean.trace]
    assert lm.batch_size == before  # the backoff does not outlive the run


@pytest.mark.slow
def test_generation_batch_room_is_filled_from_the_pool(lm, layout, navigate, monkeypatch):
    """Spare rows of a generation batch take pool examples, whose reasoning is what they get alone."""
    extractor, nav = navigate
    train, instruction = nav[:5], layout.encode("Think carefully")
    batches = []
    generate = lm.generate
    monkeypatch.setattr(lm, "generate", lambda prompts, **kw: batches.append(len(prompts)) or generate(prompts, **kw))
    monkeypatch.setattr(lm, "batch_size", 3)
    search = _search(lm, layout, extractor, max_reasoning_tokens=12)

    first = search.reasoning(instruction, train[:1], pool=train)
    assert batches == [3]  # one row asked for, two more from the pool
    assert {text for text, _ in search._reasoning} == {ex.inputs_text for ex in train[:3]}
    stored = [search._reasoning[(ex.inputs_text, tuple(instruction))] for ex in train[1:3]]
    assert search.reasoning(instruction, train[1:3], pool=train) == stored
    assert batches == [3]  # nothing left to generate
    search.reasoning(instruction, train[3:4], pool=train)
    assert batches == [3, 2]  # the last two pool rows; none is generated twice

    alone = _search(lm, layout, extractor, max_reasoning_tokens=12)
    assert alone.reasoning(instruction, train[:1]) == first  # without a pool: just the row
    assert [alone.reasoning(instruction, [ex])[0] for ex in train[1:]] == search.reasoning(instruction, train[1:])
    assert batches == [3, 2, 1, 1, 1, 1, 1]

    monkeypatch.setattr(lm, "generator", lambda prompts, **kw: [[] for _ in prompts])
    served = _search(lm, layout, extractor, max_reasoning_tokens=12)
    served.reasoning(instruction, train[:1], pool=train)
    assert len(served._reasoning) == 1  # a server answers one request at a time: no spare rows


@pytest.mark.slow
def test_sampled_reasoning_comes_from_the_searchs_own_generator(lm, layout, navigate):
    """With reasoning_temperature > 0 a run draws its reasoning from a generator seeded with
    config.seed: the same seed gives the same run, another seed other reasoning, and torch's global
    random state is left as it was."""
    extractor, nav = navigate
    settings = dict(num_steps=1, batch_size=2, max_reasoning_tokens=6, num_finalists=1, eval_every=1,
                    reasoning_temperature=1.5)
    before = torch.get_rng_state()
    searches = [_search(lm, layout, extractor, **settings, seed=seed) for seed in (5, 5, 6)]
    results = [search.run("Be brief.", nav[:2], nav[2:3]) for search in searches]
    assert torch.equal(torch.get_rng_state(), before)
    assert searches[0]._reasoning == searches[1]._reasoning
    same = [[(r.candidates, r.chosen, r.loss, r.instruction) for r in result.trace] for result in results[:2]]
    assert same[0] == same[1] and results[0].best_heldout == results[1].best_heldout
    assert searches[0]._reasoning != searches[2]._reasoning


@pytest.mark.slow
def test_reasoning_under_several_instructions_is_generated_in_one_call(lm, layout, navigate, monkeypatch):
    """Rows of different instructions share generation batches and get what each gets alone."""
    extractor, nav = navigate
    examples = nav[:3]
    instructions = [layout.encode(text) for text in ("Think carefully", "Think slowly", "Answer carefully")]
    calls = []
    generate = lm.generate
    monkeypatch.setattr(lm, "generate", lambda prompts, **kw: calls.append(len(prompts)) or generate(prompts, **kw))
    together = _search(lm, layout, extractor, max_reasoning_tokens=10)
    both = together.reasoning_under_each(instructions, examples)
    assert calls == [9]
    assert together.reasoning_under_each(instructions[1:], examples) == both[1:] and calls == [9]  # cached
    alone = _search(lm, layout, extractor, max_reasoning_tokens=10)
    assert [alone.reasoning(i, examples) for i in instructions] == both
    assert calls == [9, 3, 3, 3]


@pytest.mark.slow
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_evaluate_reads_predictions_and_loss_from_one_pass(lm, layout, navigate, prefix_cache):
    """Held-out predictions (the likelier answer's first token after the extractor) and the mean
    answer loss come from one scoring pass; they equal a next-token pass plus a full scoring pass."""
    extractor, nav = navigate
    examples, instruction = nav[:5], layout.encode("Think carefully")
    search = _search(lm, layout, extractor, max_reasoning_tokens=12, prefix_cache=prefix_cache)
    evaluation = search.evaluate(instruction, examples)

    reasoning = search.reasoning(instruction, examples)
    contexts = [layout.prompt(ex.inputs_text, instruction).ids + r + search.extractor_ids
                for ex, r in zip(examples, reasoning)]
    choices = list(search.extractor.choices)
    first_tokens = [search.answer_ids(c)[0] for c in choices]
    expected = [choices[i] for i in lm.next_token_logprobs(contexts)[:, first_tokens].argmax(-1).tolist()]
    assert list(evaluation.predictions) == expected
    assert evaluation.labels == [ex.label for ex in examples]
    full = lm.score(search.sequences(instruction, examples, reasoning), answer_temperature=search.config.answer_temperature)
    assert evaluation.mean_loss == pytest.approx(sum(s.answer_loss for s in full) / len(full), abs=1e-4)


@pytest.mark.slow
def test_prefix_cache_changes_nothing_but_the_cost(lm, layout, navigate, main_run):
    """The main run (prefix cache on) again without the cache: same tokens, same losses and scores."""
    extractor, nav = navigate
    _, cached, _, train, heldout = main_run
    search = _search(lm, layout, extractor, num_steps=3, batch_size=4, max_reasoning_tokens=16, eval_every=1,
                     seed=0, prefix_cache=False)
    plain = search.run("Think carefully", train, heldout)
    assert [r.instruction for r in plain.trace] == [r.instruction for r in cached.trace]
    assert [r.candidates for r in plain.trace] == [r.candidates for r in cached.trace]
    for a, b in zip(plain.trace, cached.trace):
        assert a.loss == pytest.approx(b.loss, abs=1e-3)
        assert [f["token"] for f in a.finalists] == [f["token"] for f in b.finalists]
        for fa, fb in zip(a.finalists, b.finalists):
            assert fa["score"] == pytest.approx(fb["score"], abs=1e-3)
            assert fa["answer_loss"] == pytest.approx(fb["answer_loss"], abs=1e-3)


@pytest.mark.slow
def test_kept_gradients_change_nothing_but_the_cost(lm, layout, navigate, monkeypatch):
    """Steps that keep the current token reuse the gradients kept at the earlier position for the
    examples seen there (no new pass for them); the run ends where a run without reuse ends."""
    extractor, nav = navigate
    settings = dict(num_steps=4, batch_size=3, max_reasoning_tokens=8, num_finalists=2, eval_every=4, seed=1)
    reused_rows = []
    original = OptimizerLM.one_hot_gradient

    def counting(self, seqs, position, candidates, **kwargs):
        reused_rows.append(sum(k is not None and k.covers(position) for k in kwargs.get("kept") or []))
        return original(self, seqs, position, candidates, **kwargs)

    monkeypatch.setattr(OptimizerLM, "one_hot_gradient", counting)
    runs = {}
    for reuse in (True, False):
        reused_rows.clear()
        runs[reuse] = _search(lm, layout, extractor, **settings, reuse_gradients=reuse).run(
            "Let's think step by step.", nav[:4], nav[4:6])
        runs[reuse, "rows"] = list(reused_rows)
    kept_steps = [i for i, r in enumerate(runs[True].trace[:-1]) if not r.changed]
    assert kept_steps, "the test wants a step that keeps its token"
    assert all(runs[True, "rows"][i + 1] > 0 for i in kept_steps)  # each at least one row seen before
    assert sum(runs[False, "rows"]) == 0
    assert [r.instruction for r in runs[True].trace] == [r.instruction for r in runs[False].trace]
    assert [r.candidates for r in runs[True].trace] == [r.candidates for r in runs[False].trace]
    for a, b in zip(runs[True].trace, runs[False].trace):
        assert a.loss == pytest.approx(b.loss, abs=1e-3)
        assert [(f["token"], f["mistake_rate"]) for f in a.finalists] == [(f["token"], f["mistake_rate"]) for f in b.finalists]
        for fa, fb in zip(a.finalists, b.finalists):
            assert fa["gradient"] == pytest.approx(fb["gradient"], abs=1e-3)
            assert fa["score"] == pytest.approx(fb["score"], abs=1e-3)


# ---------------------------------------------------------------------------------------------
# 5. Checkpoints: interrupt, resume, end where an uninterrupted run ends
# ---------------------------------------------------------------------------------------------

_RESUME_SETTINGS = dict(num_steps=4, batch_size=2, max_reasoning_tokens=6, num_finalists=2, eval_every=2, seed=3)


@pytest.fixture(scope="module")
def uninterrupted(lm, layout, navigate):
    extractor, nav = navigate
    return _search(lm, layout, extractor, **_RESUME_SETTINGS).run("Think step by step.", nav[:4], nav[4:6])


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_end(lm, layout, navigate, uninterrupted, tmp_path):
    extractor, nav = navigate
    path = tmp_path / "run.json"

    def interrupt_after_second_step(record):
        if record.step == 1:
            raise KeyboardInterrupt

    first = _search(lm, layout, extractor, **_RESUME_SETTINGS).run(
        "Think step by step.", nav[:4], nav[4:6], progress=interrupt_after_second_step, checkpoint=path)
    assert first.stopped_reason == "interrupted" and len(first.trace) == 2
    saved = json.loads(path.read_text())
    assert saved["next_step"] == 2 and saved["format"] == "dspy_greater.engine.checkpoint/1"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave nothing behind

    resumed = _search(lm, layout, extractor, **_RESUME_SETTINGS).run(
        "Think step by step.", nav[:4], nav[4:6], checkpoint=path)  # a fresh search object: nothing in memory
    assert resumed.resumed_at_step == 2 and resumed.stopped_reason == "completed"
    assert [r.instruction for r in resumed.trace] == [r.instruction for r in uninterrupted.trace]
    assert [r.candidates for r in resumed.trace] == [r.candidates for r in uninterrupted.trace]
    # Gradients kept in memory (reuse_gradients) are computed afresh after a resume: float rounding only.
    assert [r.loss for r in resumed.trace] == pytest.approx([r.loss for r in uninterrupted.trace], abs=1e-4)
    assert resumed.best_instruction == uninterrupted.best_instruction
    assert resumed.best_heldout == uninterrupted.best_heldout
    assert resumed.top_instructions == uninterrupted.top_instructions

    # Run again on the finished checkpoint: nothing is recomputed, the same result comes back.
    again = _search(lm, layout, extractor, **_RESUME_SETTINGS).run(
        "Think step by step.", nav[:4], nav[4:6], checkpoint=path)
    assert again.resumed_at_step == 4 and [r.instruction for r in again.trace] == [r.instruction for r in resumed.trace]


@pytest.mark.slow
def test_checkpoint_of_another_run_is_refused_before_any_work(lm, layout, navigate, tmp_path, monkeypatch):
    from dspy_greater.engine.checkpoint import CheckpointMismatchError

    extractor, nav = navigate
    path = tmp_path / "run.json"
    _search(lm, layout, extractor, **{**_RESUME_SETTINGS, "num_steps": 1}).run(
        "Be brief.", nav[:2], nav[2:3], checkpoint=path)
    search = _search(lm, layout, extractor, **{**_RESUME_SETTINGS, "num_steps": 1})
    monkeypatch.setattr(search, "evaluate", lambda *a, **k: pytest.fail("work started before the check"))
    with pytest.raises(CheckpointMismatchError, match="different run"):
        search.run("Be brief.", nav[2:4], nav[2:3], checkpoint=path)  # other training rows
    with pytest.raises(CheckpointMismatchError, match="different run"):
        _search(lm, layout, extractor, **{**_RESUME_SETTINGS, "num_steps": 1, "topk": 5}).run(
            "Be brief.", nav[:2], nav[2:3], checkpoint=path)  # other settings
    path.write_text("{not json")
    with pytest.raises(CheckpointMismatchError, match="not a readable"):
        search.run("Be brief.", nav[:2], nav[2:3], checkpoint=path)


# ---------------------------------------------------------------------------------------------
# 9. The authors' step rules (GreaterConfig.faithful), one step built by hand on the real model
# ---------------------------------------------------------------------------------------------

_FAITHFUL_STEP = dict(batch_size=None, max_reasoning_tokens=6, keep_current=False, seed=0)


def _one_step(search, text, position, examples, initial_length=None):
    ids = search.layout.encode_instruction(text)
    record = search._step(0, ids, position, examples, random.Random(0), initial_length or len(ids))
    return ids, record


def _rank(search, finalist):
    return finalist_rank(finalist, search.config)


def test_faithful_sets_every_step_rule():
    cfg = GreaterConfig.faithful()
    assert (cfg.current_competes, cfg.sentence_end_accept, cfg.growth_token, cfg.edited_fluency) == (True, True, "!", False)
    default = GreaterConfig()
    assert (default.current_competes, default.sentence_end_accept, default.growth_token, default.edited_fluency) == (
        False, False, None, True)
    for switch in ("current_competes", "sentence_end_accept", "growth_token", "edited_fluency"):
        assert switch in GreaterConfig.__doc__.split("Attributes:")[0]  # each deviation is listed with its switch


@pytest.mark.slow
def test_the_current_token_competes_as_a_finalist_and_can_win(lm, layout, navigate):
    extractor, nav = navigate
    examples = nav[:3]
    # Every candidate is a finalist, so the current token is one, and the best of all of them wins.
    search = _search(lm, layout, extractor, current_competes=True, num_finalists=100, **_FAITHFUL_STEP)
    ids, record = _one_step(search, "Think about it step by step", 1, examples)
    current = layout.decode([ids[1]])
    assert current in [f["token"] for f in record["finalists"]]
    best = min(record["finalists"], key=lambda f: _rank(search, f))
    assert record["chosen"] == best["token"] and record["changed"] == (best["token"] != current)
    # Scored like the others: its entry is the current instruction's own score (from the gradient pass).
    own = next(f for f in record["finalists"] if f["token"] == current)
    assert math.isfinite(own["score"]) and own["token_id"] == ids[1]
    # Without the rule the current token is never a finalist, so it can never stay.
    search = _search(lm, layout, extractor, current_competes=False, num_finalists=100, **_FAITHFUL_STEP)
    _, record = _one_step(search, "Think about it step by step", 1, examples)
    assert current not in [f["token"] for f in record["finalists"]] and record["changed"]
    # With a single finalist chosen by gradient, the current token stays exactly when its gradient ranks first.
    search = _search(lm, layout, extractor, current_competes=True, num_finalists=1, **_FAITHFUL_STEP)
    _, record = _one_step(search, "Think about it step by step", 1, examples)
    assert len(record["finalists"]) == 1 and record["chosen"] == record["finalists"][0]["token"]
    assert min(record["finalists"][0]["gradient"], 0) <= 0


@pytest.mark.slow
def test_a_finalist_ending_the_sentence_past_half_the_start_is_accepted_at_once(lm, layout, navigate):
    extractor, nav = navigate
    examples = nav[:3]
    text = "Think about it step by step"  # 6 tokens; the end position (6) is past half of them
    search = _search(lm, layout, extractor, sentence_end_accept=True, growth_token="!", current_competes=True,
                     num_finalists=100, **_FAITHFUL_STEP)
    ids, record = _one_step(search, text, len(layout.encode_instruction(text)), examples)
    assert any("." in c for c in record["candidates"])  # the proposals at a sentence's end hold a period
    assert len(record["finalists"]) == 1 and "." in record["chosen"]  # the first period finalist, unscored against others
    assert record["instruction"].endswith(record["chosen"]) and record["changed"]
    # Before half the start's length the rule does not apply: every finalist is scored.
    ids, record = _one_step(search, text, len(ids), examples, initial_length=2 * len(ids) + 1)
    assert len(record["finalists"]) > 1
    assert record["chosen"] == min(record["finalists"], key=lambda f: _rank(search, f))["token"]


@pytest.mark.slow
def test_growth_appends_the_placeholder_which_competes_like_a_current_token(lm, layout, navigate):
    extractor, nav = navigate
    examples = nav[:3]
    search = _search(lm, layout, extractor, growth_token="!", current_competes=True, num_finalists=100,
                     **_FAITHFUL_STEP)
    ids, record = _one_step(search, "Think carefully", 2, examples)
    assert record["candidates"][-1] == "!"  # the placeholder is the current token of the new position
    assert "!" in [f["token"] for f in record["finalists"]]
    best = min(record["finalists"], key=lambda f: _rank(search, f))
    assert record["chosen"] == best["token"]
    assert len(layout.encode_instruction(record["instruction"])) == len(ids) + 1
    # The default grows with the most likely proposal at the new position instead.
    search = _search(lm, layout, extractor, num_finalists=100, **{**_FAITHFUL_STEP, "keep_current": True})
    _, record = _one_step(search, "Think carefully", 2, examples)
    assert "!" not in record["candidates"]
    with pytest.raises(ValueError, match="one token"):
        _search(lm, layout, extractor, growth_token="step by step")


@pytest.mark.slow
def test_edited_fluency_switch_removes_exactly_the_edited_tokens_own_term(lm, layout, navigate):
    extractor, nav = navigate
    search = _search(lm, layout, extractor, max_reasoning_tokens=6)
    ids = layout.encode_instruction("Think about it step by step")
    examples, position = nav[:3], 2
    seqs = search.sequences(ids, examples, search.reasoning(ids, examples))
    candidates = sorted({ids[position], *range(1000, 1010)})
    grads = {}
    for flag in (True, False):
        _, grads[flag] = lm.one_hot_gradient(seqs, position, candidates, answer_temperature=0.2, fluency_weight=0.2,
                                             edited_fluency=flag)
    contexts = [s.ids[: s.instruction_start + position] for s in seqs]
    logprobs = lm.next_token_logprobs(contexts)[:, candidates]
    counts = torch.tensor([s.instruction_end - max(s.instruction_start, 1) for s in seqs], dtype=torch.float32)
    own_term = -(0.2 * logprobs / counts[:, None]).sum(0) / len(seqs)
    torch.testing.assert_close(grads[True] - grads[False], own_term, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_an_edit_whose_text_re_encodes_differently_continues_from_the_text(lm, layout, navigate):
    extractor, nav = navigate
    search = _search(lm, layout, extractor)
    merged = [*layout.encode_instruction("Think"), *layout.encode_instruction("ing")]  # "Think" + "ing" -> "Thinking"
    again = layout.encode_instruction(layout.instruction_text(merged))
    assert again != merged and search._round_trip(merged) == again
    ok = layout.encode_instruction("Think about it")
    assert search._round_trip(ok) == ok
    # Every instruction a run scores is the encoding of its own text.
    search = _search(lm, layout, extractor, num_steps=3, batch_size=2, max_reasoning_tokens=4, keep_current=False,
                     eval_every=1, seed=1)
    result = search.run("Think about it", nav[:2], nav[2:3])
    for record in result.trace:
        assert layout.instruction_text(layout.encode_instruction(record.instruction)) == record.instruction
