"""The search's model operations on the architectures of the optimizer models users pick at 1B-9B.

No such weights can be fetched here, so each architecture is built tiny with random weights and the
embedded tokenizer: Gemma-2 (the paper's Gemma-2-9B: logit soft-capping, alternating sliding-window
layers), Qwen2 (biased attention projections), Qwen3 (query/key norms), Mistral and Phi-3 (fused
projections). Llama is covered by the embedded model and Gemma-3 by its GGUF (tests/test_model.py).
On each, prefixes built on kept input caches, scores over them, the one-hot gradient (with and
without gradient checkpointing) and greedy generation equal the plain forward passes.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from dspy_greater.engine.layout import GreaterLayout
from dspy_greater.engine.model import OptimizerLM
from test_model import ANSWER_TEMPERATURE, _assert_same_prefix, _assert_scores_match_full_forward, _prefix_of

pytestmark = pytest.mark.slow

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048)
ARCHITECTURES = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=4096,
                                                          attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    # A window shorter than the inputs: the kept caches are not used (a sliding layer drops positions).
    "gemma2_window16": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=16,
                                                                   attn_logit_softcapping=50.0,
                                                                   final_logit_softcapping=30.0)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def architecture(request, optimizer):
    """(model, tokenizer) of one tiny random-weight architecture, float32 on the CPU."""
    tokenizer = optimizer[1]
    config_name, model_name, extra = ARCHITECTURES[request.param]
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                 bos_token_id=tokenizer.bos_token_id,
                                                 eos_token_id=tokenizer.eos_token_id, **SMALL, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval().requires_grad_(False)
    return model, tokenizer


def test_kept_caches_scores_and_gradients_equal_plain_passes(architecture):
    model, tokenizer = architecture
    plain_lm = OptimizerLM(model, tokenizer, batch_size=2, context_cache_mb=0)
    stored_lm = OptimizerLM(model, tokenizer, batch_size=2)
    layout = GreaterLayout(tokenizer)
    questions = ["Take one step forward. Turn around. Are you back?",
                 "Take one step forward. Take two steps left. Turn around. Take one step. Are you back?"]
    instruction = layout.encode("Answer the question carefully.")
    reasoning, extractor, answer = (layout.encode(t) for t in ("Let me count.", "\nSo the answer is", " Yes"))
    seqs = [layout.full(q, instruction, reasoning, extractor, answer) for q in questions]
    kwargs = dict(answer_temperature=ANSWER_TEMPERATURE, fluency_weight=0.2)
    for position in (0, 2):
        plain = _prefix_of(plain_lm, seqs, position)
        for _ in range(2):  # the first call stores the inputs, the second reuses them
            prefix = _prefix_of(stored_lm, seqs, position)
            _assert_same_prefix(prefix, plain)
            _assert_scores_match_full_forward(stored_lm, plain_lm, seqs, prefix)
        candidates = [instruction[position], *layout.encode(" Please read")]
        loss, grad = plain_lm.one_hot_gradient(seqs, position, candidates, **kwargs)
        cached_loss, cached_grad = stored_lm.one_hot_gradient(seqs, position, candidates, prefix=prefix, **kwargs)
        checkpointed = plain_lm.one_hot_gradient(seqs, position, candidates, gradient_checkpointing=True, **kwargs)
        assert grad.abs().sum() > 0
        for other_loss, other_grad in ((cached_loss, cached_grad), checkpointed):
            assert other_loss == pytest.approx(loss, abs=2e-4)
            torch.testing.assert_close(other_grad, grad, rtol=1e-3, atol=2e-4)
    assert len(stored_lm._contexts) == (0 if stored_lm.attention_window == 16 else len(questions))
    prompts = [layout.prompt(q, instruction) for q in questions]
    ids, lengths = [p.ids for p in prompts], [p.instruction_start for p in prompts]
    stored = stored_lm.generate(ids, max_new_tokens=6, context_lengths=lengths)
    assert stored == plain_lm.generate(ids, max_new_tokens=6)
