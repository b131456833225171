"""Key/value caches the optimizer model keeps between forward passes.

Two kinds:

- :class:`Prefix`: the beginnings that the sequences of one search step share (the inputs and the
  instruction up to the edited position), run once by :meth:`OptimizerLM.prefill
  <dspy_greater.engine.model.OptimizerLM.prefill>` and continued by the gradient pass and every
  finalist's scoring. Its rows are kept in forward batches (:class:`_PrefixChunk`).
- :class:`ContextStore`: each example's inputs (the part of a prefix before the instruction), which
  are the same in every step, run once and kept across steps in a least-recently-used store of
  bounded size (:class:`_ContextState` per example).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dspy_greater.engine.layout import Sequence

#: One layer's cached keys and values.
KeyValues = tuple[torch.Tensor, torch.Tensor]


@dataclass
class _PrefixChunk:
    """The cached prefixes of one forward batch (rows right-padded to a common width)."""

    layers: list[KeyValues]
    mask: torch.Tensor
    lengths: list[int]


@dataclass(frozen=True)
class _ContextState:
    """One example's inputs run once: its key/value cache (batch of one) and last hidden state."""

    layers: list[KeyValues]
    last_hidden: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers) + self.last_hidden.nbytes


@dataclass
class Prefix:
    """Token prefixes run once and kept as a key/value cache (see ``OptimizerLM.prefill``).

    Attributes:
        ids: Each row's prefix ids.
        next_logprobs: Log-probabilities of the token after each prefix, ``[rows, vocab]`` on CPU.
        instruction_logprob: Per row, the summed log-probability of the instruction tokens inside
            the prefix (the fluency term's constant part).
    """

    ids: list[list[int]]
    next_logprobs: torch.Tensor
    instruction_logprob: list[float]
    chunks: list[_PrefixChunk]
    batch_size: int

    def covers(self, seqs: list[Sequence], rows: list[int] | None = None) -> bool:
        """Whether each sequence starts with its prefix (``rows[i]`` for sequence ``i``; by default
        one prefix per sequence, in order), and so may continue its cache."""
        rows = list(range(len(self.ids))) if rows is None else rows
        return len(seqs) == len(rows) and all(
            0 <= r < len(self.ids) and s.ids[: len(self.ids[r])] == self.ids[r] and len(self.ids[r]) <= s.answer_start - 1
            for s, r in zip(seqs, rows))

    def gather(self, rows: list[int]) -> _PrefixChunk:
        """One forward batch continuing these prefix rows, in this order (a row may repeat)."""
        where = [(c, i) for c, chunk in enumerate(self.chunks) for i in range(len(chunk.lengths))]
        picked = [where[r] for r in rows]
        whole = self.chunks[picked[0][0]]
        if picked == [(picked[0][0], i) for i in range(len(whole.lengths))]:
            return whole  # one chunk, all its rows in order: its tensors as they are (a forward never writes into them)
        width = max(self.chunks[c].mask.shape[1] for c, _ in picked)
        parts, order = [], []
        for c, chunk in enumerate(self.chunks):
            mine = [n for n, (cc, _) in enumerate(picked) if cc == c]
            if not mine:
                continue
            index = torch.tensor([picked[n][1] for n in mine], device=chunk.mask.device)
            gap = width - chunk.mask.shape[1]  # the padding sits between prefix and tail: masked out
            parts.append(([(F.pad(k[index], (0, 0, 0, gap)), F.pad(v[index], (0, 0, 0, gap))) for k, v in chunk.layers],
                          F.pad(chunk.mask[index], (0, gap))))
            order += mine
        if len(parts) == 1:
            layers, mask = parts[0]
        else:
            back = torch.tensor(order).argsort().to(parts[0][1].device)
            layers = [(torch.cat([p[0][n][0] for p in parts])[back], torch.cat([p[0][n][1] for p in parts])[back])
                      for n in range(len(parts[0][0]))]
            mask = torch.cat([p[1] for p in parts])[back]
        return _PrefixChunk(layers, mask, [self.chunks[c].lengths[i] for c, i in picked])


class ContextStore:
    """Examples' inputs run once, kept across calls up to a memory budget (least recently used go first).

    Args:
        capacity_bytes: Memory the kept states may take; ``0`` keeps none.
    """

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.entries: OrderedDict[tuple[int, ...], _ContextState] = OrderedDict()
        self.nbytes = 0

    def states(
        self, contexts: list[tuple[int, ...]], run: Callable[[list[tuple[int, ...]]], list[_ContextState]],
        batch_size: int,
    ) -> list[_ContextState]:
        """Each context's state: from the store, or run now (``run`` takes up to ``batch_size`` contexts
        at a time) and stored."""
        found = {c: self.entries[c] for c in contexts if c in self.entries}
        for c in found:
            self.entries.move_to_end(c)
        missing = [c for c in dict.fromkeys(contexts) if c not in found]
        for start in range(0, len(missing), batch_size):
            batch = missing[start : start + batch_size]
            for context, state in zip(batch, run(batch)):
                found[context] = state
                self.add(context, state)
        return [found[c] for c in contexts]

    def add(self, context: tuple[int, ...], state: _ContextState) -> None:
        """Keep ``state``, dropping the least recently used states while over budget (one larger than
        the whole budget is not kept)."""
        if state.nbytes > self.capacity_bytes:
            return
        self.entries[context] = state
        self.nbytes += state.nbytes
        while self.nbytes > self.capacity_bytes:
            _, dropped = self.entries.popitem(last=False)
            self.nbytes -= dropped.nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0


def context_state(layers: list[KeyValues], hidden: torch.Tensor, row: int, length: int) -> _ContextState:
    """Row ``row`` of a right-padded forward batch, its first ``length`` positions, as a stored state
    (copied, so that the batch's tensors can be freed)."""
    own = [(k[row : row + 1, :, :length].clone(), v[row : row + 1, :, :length].clone()) for k, v in layers]
    return _ContextState(own, hidden[row, length - 1].clone())


def stacked(states: list[_ContextState], width: int, *, left_padded: bool) -> list[KeyValues]:
    """The states' key/value layers as one batch, each row padded to ``width`` positions."""
    def padded(tensor: torch.Tensor) -> torch.Tensor:
        gap = width - tensor.shape[-2]
        return F.pad(tensor, (0, 0, gap, 0) if left_padded else (0, 0, 0, gap))
    return [tuple(torch.cat([padded(state.layers[i][kv]) for state in states]) for kv in (0, 1))
            for i in range(len(states[0].layers))]
