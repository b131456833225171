"""Memory of a search step: gradient checkpointing in the one-hot gradient pass, and the estimate
the search checks before its first step.

1. ``gradient_checkpointing=True`` gives the gradient (and the kept gradients, and the search's
   choice) it gives without, and leaves the model as it was.
2. :func:`estimate_step_memory` on random-weight Llama shapes (a tiny one, and Llama-3-8B's on the
   meta device), :func:`check_step_memory` against a faked CUDA device, and the search's check.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dspy_greater.data import load_examples
from dspy_greater.engine import memory
from dspy_greater.engine.config import GreaterConfig
from dspy_greater.engine.extractor import derive_extractor
from dspy_greater.engine.memory import MemoryEstimate, check_search_memory, check_step_memory, estimate_step_memory
from dspy_greater.engine.search import GreaterSearch, SearchExample

ANSWER_TEMPERATURE = 0.2
GIB = 2**30


# ---------------------------------------------------------------------------------------------
# 1. Gradient checkpointing changes nothing but the memory
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def navigate():
    """The navigate task's extractor and its examples, shortest questions first (cheap on CPU)."""
    rows = sorted(load_examples("navigate"), key=lambda e: (len(e.question), e.question))
    extractor = derive_extractor("answer", None, [e.answer for e in rows], [e.question for e in rows])
    return extractor, [SearchExample(e.question, extractor.canonical(e.answer)) for e in rows]


@pytest.fixture(scope="module")
def seqs(layout, navigate):
    """Three full sequences of different lengths with a fixed reasoning, and their instruction."""
    extractor, examples = navigate
    instruction = layout.encode("Answer the question carefully.")
    reasoning = layout.encode("Let me count the steps carefully.")
    built = [layout.full(ex.inputs_text, instruction, reasoning, layout.encode(extractor.text),
                         layout.encode(extractor.target(ex.label))) for ex in examples[:3]]
    return instruction, built


def _model_state(model: torch.nn.Module) -> tuple:
    """Everything turning checkpointing on touches: modes, checkpointing flags, forward hooks."""
    modules = tuple((name, m.training, m.__dict__.get("gradient_checkpointing"),
                     "_gradient_checkpointing_func" in m.__dict__, len(m._forward_hooks))
                    for name, m in model.named_modules())
    return modules, tuple(sorted(k for k in model.__dict__ if k.startswith("_require_grads_hook")))


def _assert_left_as_it_was(model: torch.nn.Module, before: tuple) -> None:
    assert _model_state(model) == before
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _counting_decoder_layer_calls(model: torch.nn.Module) -> tuple[list, torch.nn.Module]:
    """Counts calls of the first decoder layer's MLP (recomputation runs it again; module hooks
    would not see the recomputation, so its ``forward`` is wrapped on the instance)."""
    mlp = model.base_model.layers[0].mlp
    calls, plain = [], type(mlp).forward
    mlp.forward = lambda *args, **kwargs: (calls.append(1), plain(mlp, *args, **kwargs))[1]
    return calls, mlp


@pytest.mark.slow
@pytest.mark.parametrize("with_prefix", [False, True])
def test_checkpointed_gradient_equals_the_plain_one(lm, layout, seqs, with_prefix):
    """Same loss, gradient, per-sequence scores and kept gradients, with each layer recomputed in the
    backward pass (the checkpointed pass runs whole sequences even when given the prefix cache)."""
    instruction, built = seqs
    position = len(instruction) - 2
    candidates = [instruction[position], *layout.encode(" quickly slowly now then")]
    prefix = lm.prefill([s.ids[: s.instruction_start + position] for s in built],
                        [s.instruction_start for s in built]) if with_prefix else None
    before = _model_state(lm.model)
    results = {}
    calls, mlp = _counting_decoder_layer_calls(lm.model)
    try:
        for checkpointing in (False, True):
            scores, kept = [], []
            calls.clear()
            loss, grad = lm.one_hot_gradient(built, position, candidates, answer_temperature=ANSWER_TEMPERATURE,
                                             fluency_weight=0.2, scores_out=scores, prefix=prefix, kept_out=kept,
                                             gradient_checkpointing=checkpointing)
            results[checkpointing] = loss, grad, scores, kept, len(calls)
    finally:
        del mlp.forward
    _assert_left_as_it_was(lm.model, before)
    (loss, grad, scores, kept, plain_calls), (c_loss, c_grad, c_scores, c_kept, c_calls) = results[False], results[True]
    assert c_calls == 2 * plain_calls  # each layer ran again in the backward pass
    assert c_loss == pytest.approx(loss, abs=2e-4)
    assert torch.allclose(c_grad, grad, rtol=1e-3, atol=2e-4)
    assert c_grad.argsort().tolist() == grad.argsort().tolist()
    for a, b in zip(c_scores, scores):
        assert a.correct == b.correct
        assert a.answer_loss == pytest.approx(b.answer_loss, abs=2e-4)
        assert a.fluency == pytest.approx(b.fluency, abs=2e-4)
    for a, b in zip(c_kept, kept):
        assert a.start == b.start
        assert torch.allclose(a.embedding_grads, b.embedding_grads, rtol=1e-3, atol=2e-4)


@pytest.mark.slow
def test_kept_gradients_of_a_checkpointed_pass_give_the_next_position(lm, layout, seqs):
    """Gradients kept by a checkpointed pass serve the next position without a pass, as they do without."""
    instruction, built = seqs
    kwargs = dict(answer_temperature=ANSWER_TEMPERATURE, fluency_weight=0.2, gradient_checkpointing=True)

    def prefix_at(position):
        return lm.prefill([s.ids[: s.instruction_start + position] for s in built], [s.instruction_start for s in built])

    kept = []
    lm.one_hot_gradient(built, 1, [instruction[1], *layout.encode(" read")], prefix=prefix_at(1), kept_out=kept, **kwargs)
    candidates = [instruction[2], *layout.encode(" quickly slowly now then")]
    fresh_loss, fresh_grad = lm.one_hot_gradient(built, 2, candidates, prefix=prefix_at(2), **kwargs)
    loss, grad = lm.one_hot_gradient(built, 2, candidates, prefix=prefix_at(2), kept=kept, **kwargs)
    assert loss == pytest.approx(fresh_loss, abs=2e-4)
    assert torch.allclose(grad, fresh_grad, rtol=1e-3, atol=2e-4)


@pytest.mark.slow
def test_the_model_is_restored_when_the_pass_fails(lm, layout, seqs, monkeypatch):
    instruction, built = seqs
    before = _model_state(lm.model)

    def broken(hidden):
        assert any(m.training for m in lm.model.modules())  # inside the checkpointed pass
        raise RuntimeError("broken output layer")

    monkeypatch.setattr(lm, "_logits", broken)
    with pytest.raises(RuntimeError, match="broken output layer"):
        lm.one_hot_gradient(built, 1, [instruction[1]], answer_temperature=ANSWER_TEMPERATURE, fluency_weight=0.2,
                            gradient_checkpointing=True)
    _assert_left_as_it_was(lm.model, before)


@pytest.mark.slow
def test_one_step_search_with_checkpointing_picks_the_same_token(lm, layout, navigate):
    extractor, examples = navigate
    settings = dict(num_steps=1, batch_size=3, max_reasoning_tokens=8, eval_every=1, seed=0)
    results, reasoning = {}, {}
    for checkpointing in (False, True):
        search = GreaterSearch(lm, layout, extractor, GreaterConfig(**settings, gradient_checkpointing=checkpointing))
        search._reasoning.update(reasoning)  # greedy reasoning: the second run would generate the same again
        results[checkpointing] = search.run("Think step by step.", examples[:3], examples[3:5])
        reasoning = dict(search._reasoning)
    plain, checkpointed = results[False].trace[0], results[True].trace[0]
    assert results[True].stopped_reason == "completed"
    assert checkpointed.chosen == plain.chosen
    assert [f["token"] for f in checkpointed.finalists] == [f["token"] for f in plain.finalists]
    for a, b in zip(checkpointed.finalists, plain.finalists):
        assert a["gradient"] == pytest.approx(b["gradient"], rel=1e-3, abs=2e-4)
    assert checkpointed.loss == pytest.approx(plain.loss, abs=2e-4)
    assert results[True].best_instruction == results[False].best_instruction


@pytest.mark.slow
def test_gradient_checkpointing_is_a_flag_and_not_part_of_a_checkpoint_fingerprint(lm, layout, navigate):
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        GreaterConfig(gradient_checkpointing="yes")
    extractor, examples = navigate
    stamps = [GreaterSearch(lm, layout, extractor, GreaterConfig(gradient_checkpointing=flag))._fingerprint(
        "Think.", examples[:2], examples[2:3]) for flag in (False, True)]
    assert stamps[0] == stamps[1]  # a run may resume with checkpointing switched on


# ---------------------------------------------------------------------------------------------
# 2. The estimate, and the check before the first step
# ---------------------------------------------------------------------------------------------


def _llama(**shape) -> LlamaForCausalLM:
    config = LlamaConfig(**{**dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2), **shape})
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_estimate_of_a_tiny_llama_scales_with_batch_and_tokens():
    model = _llama()

    def estimate(tokens=100, batch=2, checkpointing=False, store=16):
        return estimate_step_memory(model, sequence_tokens=tokens, batch=batch, gradient_checkpointing=checkpointing,
                                    inputs_store_mb=store)

    plain = estimate()
    assert plain.weights == sum(p.numel() for p in model.parameters()) * 4  # float32
    assert min(plain.weights, plain.gradient_pass, plain.generation_cache, plain.inputs_store) > 0
    assert plain.inputs_store == 16 * 2**20
    assert plain.peak == plain.weights + max(plain.gradient_pass, plain.generation_cache) + plain.inputs_store
    assert estimate(checkpointing=True).gradient_pass < plain.gradient_pass
    for checkpointing in (False, True):
        base = estimate(checkpointing=checkpointing)
        for grown in (estimate(batch=6, checkpointing=checkpointing), estimate(tokens=300, checkpointing=checkpointing)):
            assert grown.gradient_pass == 3 * base.gradient_pass
            assert grown.generation_cache == 3 * base.generation_cache
            assert (grown.weights, grown.inputs_store) == (base.weights, base.inputs_store)
    half = estimate_step_memory(model.to(torch.bfloat16), sequence_tokens=100, batch=2, gradient_checkpointing=False,
                                inputs_store_mb=16)
    assert (half.weights, half.gradient_pass) == (plain.weights // 2, plain.gradient_pass // 2)


def test_llama_3_8b_with_1024_reasoning_tokens_fits_80_gb_with_checkpointing():
    """Llama-3-8B's shape in bfloat16 (built on the meta device: no memory), ~1300-token sequences
    (1024 reasoning tokens), 8 sequences per forward pass, the default 512 MB inputs store. Without
    checkpointing the estimate is close to an 80 GB card's usable memory (not asserted either way;
    the figures: ``benchmarks/scale.py fit``)."""
    with torch.device("meta"):
        model = _llama(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256).to(torch.bfloat16)
    assert next(model.parameters()).is_meta
    estimates = {flag: estimate_step_memory(model, sequence_tokens=1300, batch=8, gradient_checkpointing=flag,
                                            inputs_store_mb=512) for flag in (False, True)}
    assert 14.5 * GIB < estimates[True].weights < 15.5 * GIB  # 8.0 billion bfloat16 parameters
    assert estimates[True].peak < 80 * GIB
    assert estimates[True].gradient_pass < estimates[False].gradient_pass / 5


def _fake_cuda(monkeypatch, free: int, *, initialized: bool = False, reserved: int = 0, allocated: int = 0) -> None:
    """torch.cuda answers as a device with ``free`` bytes (no GPU needed: only these are called)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)


STEP = MemoryEstimate(weights=10 * GIB, gradient_pass=4 * GIB, generation_cache=1 * GIB, inputs_store=GIB // 2)


def test_check_raises_when_the_free_memory_is_too_small(monkeypatch):
    _fake_cuda(monkeypatch, 2 * GIB)
    with pytest.raises(MemoryError, match="gradient_checkpointing=True") as raised:
        check_step_memory(STEP, torch.device("cuda"))
    assert "14.5 GiB" in str(raised.value) and "2.0 GiB free" in str(raised.value)
    _fake_cuda(monkeypatch, 5 * GIB)
    check_step_memory(STEP, torch.device("cuda"))  # 4.5 GiB beside the weights


def test_check_counts_memory_torch_holds_unused_as_free(monkeypatch):
    _fake_cuda(monkeypatch, 2 * GIB, initialized=True, reserved=12 * GIB, allocated=9 * GIB)
    check_step_memory(STEP, torch.device("cuda"))  # 2 + 3 GiB free


def test_nothing_is_checked_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: pytest.fail("asked a CPU for CUDA memory"))
    check_step_memory(STEP, torch.device("cpu"))
    check_step_memory(MemoryEstimate(10**15, 10**15, 10**15, 10**15), torch.device("cpu"))


@pytest.mark.slow
def test_search_checks_its_steps_memory_before_any_work(lm, layout, navigate, monkeypatch, caplog):
    """The search estimates a step of its longest sequence, logs it, and on a device that cannot
    hold it even with one sequence per forward pass stops before any work. When one sequence fits but
    ``model_batch_size`` do not, it warns and starts (the out-of-memory backoff halves the batch)."""
    extractor, examples = navigate
    train, heldout = examples[:4], examples[4:6]
    search = GreaterSearch(lm, layout, extractor, GreaterConfig(num_steps=1, batch_size=3, max_reasoning_tokens=8))
    caplog.set_level(logging.INFO, logger="dspy_greater")
    monkeypatch.setattr(lm, "device", torch.device("cuda"))
    _fake_cuda(monkeypatch, 80 * GIB)
    step = check_search_memory(search, "Think step by step.", [*train, *heldout])
    longest = max(len(layout.full(ex.inputs_text, [], [], search.extractor_ids, search.answer_ids(ex.label)).ids)
                  for ex in [*train, *heldout])
    assert step == estimate_step_memory(lm.model, sequence_tokens=longest + 48 + 8, batch=lm.batch_size,
                                        gradient_checkpointing=False, inputs_store_mb=lm.context_cache_bytes / 2**20)
    assert any(r.levelno == logging.INFO and "search step" in r.getMessage() for r in caplog.records)

    per_sequence = max(step.gradient_pass, step.generation_cache) // lm.batch_size
    caplog.clear()
    _fake_cuda(monkeypatch, step.inputs_store + 2 * per_sequence)
    check_search_memory(search, "Think step by step.", [*train, *heldout])
    assert any(r.levelno == logging.WARNING and "gradient_checkpointing" in r.getMessage() for r in caplog.records)

    _fake_cuda(monkeypatch, step.inputs_store)
    monkeypatch.setattr(search, "evaluate", lambda *a, **k: pytest.fail("work started before the check"))
    with pytest.raises(MemoryError, match="gradient_checkpointing"):
        search.run("Think step by step.", train, heldout)
    monkeypatch.setattr(memory, "check_step_memory", lambda *a: pytest.fail("checked a split model"))
    monkeypatch.setattr(lm.model, "hf_device_map", {"model.layers.0": 0, "model.layers.1": 1}, raising=False)
    check_search_memory(search, "Think step by step.", [*train, *heldout])  # only logged
