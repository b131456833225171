"""How much accelerator memory a search step needs, estimated from the model's shape before the first step.

The largest step is the gradient pass: every layer keeps its activations for the backward pass
over a whole batch of sequences (inputs, instruction, reasoning, extractor, answer). Generation
keeps a KV cache of the same length, and the inputs store keeps each example's KV cache across
steps. With gradient checkpointing, a layer keeps only its input and recomputes the rest during
the backward pass.

:func:`check_search_memory` runs before a search's first step: it logs the estimate for the
search's longest sequence, and raises (:func:`check_step_memory`) when a CUDA device cannot hold it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Values a decoder layer keeps per token for its backward pass, in units of the hidden size (norm
# outputs, queries, attention output and projection inputs, residuals) and of the MLP's
# intermediate size (gate, up, their product, the down projection's input).
_KEPT_PER_HIDDEN = 10
_KEPT_PER_INTERMEDIATE = 4
_GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a search step needs on the model's device, by part."""

    weights: int
    gradient_pass: int
    generation_cache: int
    inputs_store: int

    @property
    def peak(self) -> int:
        """The weights, the larger of the gradient pass and generation, and the inputs store."""
        return self.weights + max(self.gradient_pass, self.generation_cache) + self.inputs_store

    def describe(self) -> str:
        return (f"{self.peak / _GIB:.1f} GiB (weights {self.weights / _GIB:.1f}, gradient pass "
                f"{self.gradient_pass / _GIB:.1f}, generation cache {self.generation_cache / _GIB:.1f}, inputs store "
                f"{self.inputs_store / _GIB:.1f})")


def estimate_step_memory(model: torch.nn.Module, *, sequence_tokens: int, batch: int, gradient_checkpointing: bool,
                         inputs_store_mb: float) -> MemoryEstimate:
    """Estimate one step's memory for ``batch`` sequences of ``sequence_tokens`` tokens each.

    Args:
        model: A Hugging Face causal LM (its config gives the shapes; its parameters the weights).
        sequence_tokens: The longest sequence of a step: inputs, instruction, reasoning and answer.
        batch: Sequences per forward (``GreaterConfig.model_batch_size``).
        gradient_checkpointing: Whether layers recompute their activations in the backward pass.
        inputs_store_mb: The inputs store's budget (``GreaterConfig.inputs_cache_mb``).
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    width = model.get_input_embeddings().weight.element_size()  # activations: the embeddings' dtype
    hidden, layers = config.hidden_size, config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    tokens = sequence_tokens * batch
    per_layer = tokens * (_KEPT_PER_HIDDEN * hidden + _KEPT_PER_INTERMEDIATE * intermediate) * width
    if gradient_checkpointing:
        gradient_pass = layers * tokens * hidden * width + per_layer  # layer inputs, and one layer recomputed
    else:
        gradient_pass = layers * per_layer
    generation_cache = 2 * layers * kv_heads * head_dim * tokens * width
    return MemoryEstimate(weights, gradient_pass, generation_cache, int(inputs_store_mb * 2**20))


def check_step_memory(estimate: MemoryEstimate, device: torch.device) -> None:
    """Raise before the first step when a CUDA device cannot hold the step, naming the knobs to turn.

    The weights are already on the device, so the rest of the estimate is compared with the free memory.
    """
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if torch.cuda.is_initialized():  # blocks torch's allocator holds but does not use are free to the step
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    needed = estimate.peak - estimate.weights
    if needed > free:
        raise MemoryError(
            f"A search step needs about {estimate.describe()}, and {device} has {free / _GIB:.1f} GiB free beside "
            "the weights. Turn on gradient_checkpointing=True, or lower model_batch_size, max_reasoning_tokens or "
            "inputs_cache_mb, or split the model over devices with device_map='auto'."
        )


def check_search_memory(search, initial_instruction: str, examples: list) -> MemoryEstimate:
    """Estimate, log and check the memory of a search's steps before the first one.

    The longest sequence a step holds is the longest example's frame, extractor and answer, the
    instruction at its longest (``max_instruction_tokens``, or the initial one if longer) and the
    reasoning at its bound. When the device cannot hold a step of ``model_batch_size`` sequences
    per forward pass but can hold one of a single sequence, a warning says so and the search starts
    anyway (its out-of-memory backoff halves the batch); when not even that fits, :func:`check_step_memory`
    raises. A model split over several devices is only logged (the estimate is for one device).

    Args:
        search: The :class:`~dspy_greater.engine.search.GreaterSearch` about to run.
        initial_instruction: The instruction it starts from.
        examples: Every example its steps may hold (training and held-out).
    """
    cfg, lm, layout = search.config, search.lm, search.layout
    frame = max((len(layout.full(ex.inputs_text, [], [], search.extractor_ids, search.answer_ids(ex.label)).ids)
                for ex in examples), default=0)
    tokens = frame + max(len(layout.encode_instruction(initial_instruction)), cfg.max_instruction_tokens) \
        + cfg.max_reasoning_tokens

    def estimate(batch: int) -> MemoryEstimate:
        return estimate_step_memory(lm.model, sequence_tokens=tokens, batch=batch,
                                    gradient_checkpointing=cfg.gradient_checkpointing,
                                    inputs_store_mb=lm.context_cache_bytes / 2**20)

    step = estimate(lm.batch_size)
    logger.info("A search step runs up to %d sequences of up to %d tokens per forward pass%s: about %s.",
                lm.batch_size, tokens, " with gradient checkpointing" if cfg.gradient_checkpointing else "",
                step.describe())
    if len(set((getattr(lm.model, "hf_device_map", None) or {}).values())) > 1:
        return step
    try:
        check_step_memory(step, lm.device)
    except MemoryError as exc:
        if lm.batch_size == 1:
            raise
        check_step_memory(estimate(1), lm.device)
        logger.warning("%s Starting anyway: on running out of memory a step is retried with half as many "
                       "sequences per forward pass.", exc)
    return step
