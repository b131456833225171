"""The search's loss terms on one sequence: answer cross-entropy, correctness and instruction fluency.

Scoring (:meth:`OptimizerLM.score <dspy_greater.engine.model.OptimizerLM.score>`) and the one-hot
gradient (:mod:`dspy_greater.engine.gradient`) read them from the same kind of forward pass, so
both compute them here, from logits at the positions the terms need only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dspy_greater.engine.kv_cache import Prefix
from dspy_greater.engine.layout import Sequence


@dataclass(frozen=True)
class SequenceScore:
    """How well one sequence's answer span is predicted.

    Attributes:
        answer_loss: Mean cross-entropy of the answer tokens (logits divided by the temperature).
        correct: Whether every answer token is the model's argmax (or, given ``choices``, whether
            the gold answer's first token has the largest logit among the choices' first tokens).
        fluency: Mean negative log-likelihood of the instruction tokens.
        choice_logits: Logits at the first answer position of the tokens passed to
            ``OptimizerLM.score`` as ``choices`` (empty without them).
    """

    answer_loss: float
    correct: bool
    fluency: float
    choice_logits: tuple[float, ...] = ()


def fluency_count(seq: Sequence) -> int:
    """How many instruction tokens the fluency term averages over (each has a token before it)."""
    return seq.instruction_end - max(seq.instruction_start, 1)


def span_terms(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    hidden: torch.Tensor,
    seqs: list[Sequence],
    temperature: float,
    *,
    prefix: Prefix | None = None,
    rows: list[int] | None = None,
    edited: tuple[int, Callable] | None = None,
    choices: list[int] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[bool]]:
    """Answer loss, fluency and correctness per row, from logits at the needed positions only.

    Args:
        logits_of: The model's output layer (hidden states to float logits).
        device: Where the model's inputs go.
        hidden: Last hidden states of a forward batch. Without ``prefix`` they cover whole
            sequences; with it, what follows each cached prefix (row ``i`` of this batch is row
            ``rows[i]`` of the prefix), and the instruction tokens inside the prefix contribute
            their cached log-likelihood.
        edited: ``(position, logprob_fn)`` replaces the log-probability of the instruction token
            at ``position`` (offset within the instruction) by ``logprob_fn(logprobs_there)``; the
            one-hot path mixes candidates there. With a prefix, that token must be the first one
            after it.
        choices: The first tokens of a closed answer space's choices: an answer is then correct
            when its first token beats the other choices' (the answer the model would pick among
            them), not the whole vocabulary.
    """
    answer_losses, fluencies, correct = [], [], []
    for row, seq in enumerate(seqs):
        offset = len(prefix.ids[rows[row]]) if prefix is not None else 0
        first = max(seq.instruction_start, 1, offset + 1)
        answer_pos = torch.arange(seq.answer_start - 1, seq.answer_end - 1, device=device) - offset
        instr_pos = torch.arange(first - 1, seq.instruction_end - 1, device=device) - offset
        logits = logits_of(hidden[row, torch.cat([answer_pos, instr_pos])])
        n_answer = len(answer_pos)
        answer_targets = torch.tensor(seq.ids[seq.answer_start : seq.answer_end], device=device)
        answer_logits = logits[:n_answer]
        answer_losses.append(F.cross_entropy(answer_logits / temperature, answer_targets))
        if choices:
            among = answer_logits[0, torch.tensor(choices, device=device)]
            correct.append(choices[int(among.argmax())] == int(answer_targets[0]))
        else:
            correct.append(bool((answer_logits.argmax(-1) == answer_targets).all()))
        instr_targets = torch.tensor(seq.ids[first : seq.instruction_end], dtype=torch.long, device=device)
        logprobs = torch.log_softmax(logits[n_answer:], dim=-1)
        token_logprobs = logprobs.gather(1, instr_targets[:, None]).squeeze(1)
        edited_index = seq.instruction_start + edited[0] if edited is not None else -1
        if prefix is None and first <= edited_index < seq.instruction_end:
            local = edited_index - first
            token_logprobs = torch.cat(
                [token_logprobs[:local], edited[1](logprobs[local])[None], token_logprobs[local + 1 :]])
        pieces = [token_logprobs]
        if prefix is not None:
            next_logprobs = prefix.next_logprobs[rows[row]].to(device)
            at_edit = edited[1](next_logprobs) if edited is not None else next_logprobs[seq.ids[offset]]
            pieces += [at_edit.reshape(1), torch.tensor([prefix.instruction_logprob[rows[row]]], device=device)]
        count = fluency_count(seq)
        fluencies.append(-torch.cat(pieces).sum() / count if count else torch.zeros((), device=device))
    return answer_losses, fluencies, correct
