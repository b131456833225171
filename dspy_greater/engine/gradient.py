"""The one-hot gradient: how the loss at one instruction position changes with the token placed there.

The instruction token at the edited position is replaced by ``one_hot @ E[candidates]`` (a
one-hot vector over candidate tokens times their input embeddings), so the loss equals the
token-id loss while one backward pass ranks every candidate at once.
:meth:`OptimizerLM.one_hot_gradient <dspy_greater.engine.model.OptimizerLM.one_hot_gradient>`
runs :func:`one_hot_gradient` with the model's forward helpers.

With gradient checkpointing (:func:`checkpointed_layers`) the pass keeps only each decoder layer's
input and recomputes the layer during the backward pass: the same gradient for less memory.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dspy_greater.engine.kv_cache import Prefix, _PrefixChunk
from dspy_greater.engine.layout import Sequence
from dspy_greater.engine.losses import SequenceScore, fluency_count, span_terms


@dataclass(frozen=True)
class KeptGradient:
    """One sequence's gradient pass, kept to give its gradient at later positions of the same instruction.

    A sequence's loss depends on the instruction token at offset ``q`` in two ways: through that
    token's input embedding (every later position) and through the fluency term's log-probability of
    the token itself. The backward pass at an earlier position already computes the first part's
    gradient for every later position; the second needs only the next-token distribution before
    ``q``, which the prefix of the step at ``q`` holds. So while the instruction and its reasoning
    stay the same, the gradient at ``q`` needs no new forward or backward pass.

    Attributes:
        score: The sequence's score (the same at every position).
        start: Instruction offset of ``embedding_grads[0]``.
        embedding_grads: d(sequence loss)/d(input embedding) at instruction offsets ``start`` on,
            shape ``[k, hidden]``.
    """

    score: SequenceScore
    start: int
    embedding_grads: torch.Tensor

    def covers(self, position: int) -> bool:
        return self.start <= position < self.start + len(self.embedding_grads)


def one_hot_gradient(
    lm,
    seqs: list[Sequence],
    position: int,
    candidates: list[int],
    *,
    answer_temperature: float,
    fluency_weight: float,
    scores_out: list[SequenceScore] | None = None,
    prefix: Prefix | None = None,
    kept: list[KeptGradient | None] | None = None,
    kept_out: list[KeptGradient] | None = None,
    edited_fluency: bool = True,
    gradient_checkpointing: bool = False,
    correct_among: list[int] | None = None,
) -> tuple[float, torch.Tensor]:
    """Loss and its gradient w.r.t. a one-hot vector over candidate tokens at one instruction position.

    The instruction token at ``position`` (offset within the instruction) must be one of the
    candidates; its embedding is replaced by ``one_hot @ E[candidates]``, so the loss equals the
    token-id loss while the gradient ranks every candidate at once.

    Args:
        lm: The :class:`~dspy_greater.engine.model.OptimizerLM` whose forward helpers run the passes.
        scores_out: If given, receives each sequence's :class:`SequenceScore` from the same
            forward pass (the current instruction's score comes for free with its gradient).
        prefix: Cached prefixes ending right before ``position`` (from ``OptimizerLM.prefill``); only
            the rest of each sequence is then run forward and backward.
        kept: Per sequence, a :class:`KeptGradient` from an earlier position of the same
            sequence, or ``None``. Sequences whose kept gradient covers ``position`` are not run
            again (this needs ``prefix``: its next-token distributions give their fluency part).
        kept_out: If given, receives one :class:`KeptGradient` per sequence, in order.
        edited_fluency: Whether the fluency term's own entry at ``position`` (the edited token's
            log-probability after its prefix) reaches the gradient. ``False`` keeps its value
            (the current token's) but not its gradient, as the authors' code scores the old token
            there: the fluency term then ranks candidates only by their effect on later tokens.
        gradient_checkpointing: Recompute each decoder layer's activations in the backward pass
            instead of keeping them (:func:`checkpointed_layers`). A recomputed layer would append to
            the prefix's key/value cache a second time, so the sequences then run whole, without the
            cache; ``prefix`` still gives the next-token distributions that ``kept`` gradients need.
        correct_among: Judge the ``scores_out`` correctness among these first answer tokens only.

    Returns:
        The mean loss over sequences, and the gradient (shape ``[len(candidates)]``, on CPU).
    """
    current = _current_token(seqs, position, candidates, prefix)
    reused = [i for i, k in enumerate(kept or []) if k is not None and k.covers(position)]
    if reused and prefix is None:
        raise ValueError("Kept gradients need the prefix of this position (its next-token distributions).")
    run = sorted(set(range(len(seqs))) - set(reused))
    one_hot = _OneHotPass(lm, position, candidates, current, len(seqs), answer_temperature=answer_temperature,
                          fluency_weight=fluency_weight, edited_fluency=edited_fluency, correct_among=correct_among)
    with checkpointed_layers(lm.model) if gradient_checkpointing and run else contextlib.nullcontext():
        one_hot.run([seqs[i] for i in run], run, None if gradient_checkpointing else prefix, keep=kept_out is not None)
    grad = one_hot.gradient() if run else torch.zeros(len(candidates), device=lm.device)
    if reused:
        grad = grad + one_hot.from_kept(seqs, reused, kept, prefix, torch.zeros_like(grad)) / len(seqs)
    if scores_out is not None:
        scores_out += [one_hot.scores[i] for i in range(len(seqs))]
    if kept_out is not None:
        kept_out += [one_hot.kept[i] for i in range(len(seqs))]
    return one_hot.total, grad.cpu()


_CHECKPOINT_ATTRIBUTES = ("gradient_checkpointing", "_gradient_checkpointing_func")
_INPUT_GRAD_HOOKS = ("_require_grads_hooks", "_require_grads_hook")


@contextlib.contextmanager
def checkpointed_layers(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s decoder layers recompute their activations in the backward pass.

    Turns on transformers' activation checkpointing (non-reentrant ``torch.utils.checkpoint``). Its
    layers checkpoint only in training mode, so the decoder-layer modules alone (not their submodules:
    dropout and attention stay in eval mode) are put in training mode; they then compute what they
    compute in eval mode. The model is left exactly as it was on the way out, also on an exception:
    its modes, its checkpointing flags, and no input-gradient hook added by the switch.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no decoder layers that transformers can checkpoint; "
                         "set GreaterConfig.gradient_checkpointing=False.")
    flagged = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    saved = [(m, {k: m.__dict__[k] for k in _CHECKPOINT_ATTRIBUTES if k in m.__dict__}) for m in flagged]
    hooks = {k: model.__dict__[k] for k in _INPUT_GRAD_HOOKS if k in model.__dict__}
    modes = [m.training for m in layers]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the older name, where the newer one is missing
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in layers:
            layer.training = True
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.training = mode
        for module, attributes in saved:
            for name in _CHECKPOINT_ATTRIBUTES:
                if name in attributes:
                    setattr(module, name, attributes[name])
                else:
                    module.__dict__.pop(name, None)
        _restore_input_grad_hooks(model, hooks)


def _restore_input_grad_hooks(model: torch.nn.Module, hooks: dict) -> None:
    """Remove the input-embedding hooks that turning checkpointing on added, and put back any from before."""
    before = {id(h) for h in hooks.get("_require_grads_hooks", [])} | {id(hooks.get("_require_grads_hook"))}
    added = [*model.__dict__.get("_require_grads_hooks", []), model.__dict__.get("_require_grads_hook")]
    for hook in added:
        if hook is not None and id(hook) not in before:
            hook.remove()
    for name in _INPUT_GRAD_HOOKS:
        if name in hooks:
            setattr(model, name, hooks[name])
        else:
            model.__dict__.pop(name, None)


def _current_token(seqs: list[Sequence], position: int, candidates: list[int], prefix: Prefix | None) -> int:
    """The token all sequences hold at ``position``, checked to be a candidate and to follow ``prefix``."""
    current = {s.ids[s.instruction_start + position] for s in seqs}
    if len(current) != 1 or next(iter(current)) not in candidates:
        raise ValueError("All sequences must hold the same current token, and it must be a candidate.")
    if prefix is not None and any(len(p) != s.instruction_start + position for s, p in zip(seqs, prefix.ids)):
        raise ValueError("The cached prefixes must end right before the edited position.")
    return next(iter(current))


class _OneHotPass:
    """The loss of ``n`` sequences at one position as a function of the one-hot vector, and what
    its passes found per sequence (``scores``, ``kept``; keyed by sequence index).

    ``total`` sums each sequence's loss divided by ``n``: the mean over all of them once every
    sequence is run or taken from a kept gradient.
    """

    def __init__(self, lm, position: int, candidates: list[int], current: int, n: int, *,
                 answer_temperature: float, fluency_weight: float, edited_fluency: bool,
                 correct_among: list[int] | None = None):
        self.lm = lm
        self.position = position
        self.n = n
        self.answer_temperature = answer_temperature
        self.fluency_weight = fluency_weight
        self.edited_fluency = edited_fluency
        self.correct_among = correct_among
        self.cand = torch.tensor(candidates, device=lm.device)
        self.one_hot = torch.zeros(len(candidates), device=lm.device, dtype=lm.embedding_matrix.dtype)
        self.one_hot[candidates.index(current)] = 1.0
        self.one_hot.requires_grad_(True)
        # The embedding module (not its raw weight) applies any scaling the architecture uses (Gemma).
        self.candidate_rows = lm.model.get_input_embeddings()(self.cand).detach()
        self.total = 0.0
        self.scores: dict[int, SequenceScore] = {}
        self.kept: dict[int, KeptGradient] = {}

    def mixed_logprob(self, logprobs: torch.Tensor) -> torch.Tensor:
        """The fluency term's entry at the edited position: candidates' log-probabilities mixed by the one-hot."""
        value = self.one_hot @ logprobs[self.cand].to(self.one_hot.dtype)
        return value if self.edited_fluency else value.detach()

    def run(self, seqs: list[Sequence], indices: list[int], prefix: Prefix | None, *, keep: bool) -> None:
        """Forward and backward passes for ``seqs`` (sequence ``indices[i]`` is ``seqs[i]``; its prefix row)."""
        usable = self.lm._usable_prefix(prefix, seqs, indices)
        for _, chunk, prefix_chunk, tails, rows in self.lm._batches(seqs, usable, indices):
            self._batch(chunk, tails, rows, usable, prefix_chunk, keep=keep)

    def _batch(self, chunk: list[Sequence], tails: list[list[int]], rows: list[int], prefix: Prefix | None,
               prefix_chunk: _PrefixChunk | None, *, keep: bool) -> None:
        lm, position, n = self.lm, self.position, self.n
        ids, mask = lm._padded(tails)
        embeds = lm.model.get_input_embeddings()(ids).detach().requires_grad_(keep)
        index = torch.arange(len(chunk), device=lm.device)
        offsets = prefix_chunk.lengths if prefix_chunk else [0] * len(chunk)
        cols = [s.instruction_start + position - n_prefix for s, n_prefix in zip(chunk, offsets)]
        mixed = (self.one_hot @ self.candidate_rows).expand(len(chunk), -1)
        hidden = lm._hidden(mask, embeds=embeds.index_put((index, torch.tensor(cols, device=lm.device)), mixed),
                            prefix=prefix_chunk)
        losses, fluencies, correct = span_terms(lm._logits, lm.device, hidden, chunk, self.answer_temperature,
                                                prefix=prefix, rows=rows, edited=(position, self.mixed_logprob),
                                                choices=self.correct_among)
        loss = sum(a + self.fluency_weight * f for a, f in zip(losses, fluencies)) / n
        loss.backward()
        self.total += float(loss.detach())
        for local, (i, seq) in enumerate(zip(rows, chunk)):
            self.scores[i] = SequenceScore(float(losses[local].detach()), correct[local], float(fluencies[local].detach()))
            if keep:
                later = slice(cols[local] + 1, cols[local] + seq.instruction_end - seq.instruction_start - position)
                # The backward pass saw each sequence's loss divided by n.
                self.kept[i] = KeptGradient(self.scores[i], position + 1, embeds.grad[local, later].float() * n)

    def gradient(self) -> torch.Tensor:
        """The gradient the passes so far accumulated on the one-hot vector."""
        return self.one_hot.grad.detach().float()

    def from_kept(self, seqs: list[Sequence], reused: list[int], kept: list[KeptGradient | None], prefix: Prefix,
                  into: torch.Tensor) -> torch.Tensor:
        """The summed gradient of the ``reused`` sequences, read from their kept gradients (added to ``into``)."""
        for i in reused:
            k = kept[i]
            into += self.candidate_rows.float() @ k.embedding_grads[self.position - k.start]
            if self.edited_fluency:  # log p(candidate | prefix): the fluency term's own part
                into -= (self.fluency_weight * prefix.next_logprobs[i].to(self.lm.device)[self.cand]
                         / fluency_count(seqs[i]))
            self.total += (k.score.answer_loss + self.fluency_weight * k.score.fluency) / self.n
            self.scores[i], self.kept[i] = k.score, k
        return into
