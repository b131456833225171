"""Torch side of the optimizer model: proposals, generation, answer loss and the one-hot gradient.

Sequences are right-padded for forward passes (causal attention makes the padding invisible to
real tokens) and left-padded for generation. Logits are computed only at the positions a loss or
proposal needs, never over the whole sequence.

Within one search step every sequence of an example shares its beginning: the inputs and the
instruction up to the edited position. :meth:`OptimizerLM.prefill` runs that prefix once, returns
the next-token distribution the proposals need, and keeps its key/value cache, so the gradient pass
and every finalist's scoring only run the rest of the sequence. An example's inputs (the part of
the prefix before the instruction) are the same in every step, so their cache is also kept across
steps, in a least-recently-used store of bounded size, and a step only runs the instruction part.
The caches are in :mod:`~dspy_greater.engine.kv_cache`, the loss terms in
:mod:`~dspy_greater.engine.losses` and the one-hot gradient in :mod:`~dspy_greater.engine.gradient`.
"""

from __future__ import annotations

import functools

import inspect
import itertools
from collections.abc import Callable

import torch
from transformers import DynamicCache, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from dspy_greater.engine import gradient
from dspy_greater.engine.gradient import KeptGradient
from dspy_greater.engine.kv_cache import ContextStore, Prefix, _ContextState, _PrefixChunk, context_state, stacked
from dspy_greater.engine.layout import Sequence
from dspy_greater.engine.losses import SequenceScore, span_terms
from dspy_greater.engine.sampling import DEFAULT_TOP_K, LocalSampler
from dspy_greater.engine.vocabulary import allowed_tokens, position_tokens, token_texts

__all__ = ["KeptGradient", "OptimizerLM", "Prefix", "SequenceScore"]


class OptimizerLM:
    """A causal LM and its tokenizer, with the operations the search needs.

    Args:
        model: A Hugging Face causal LM (weights frozen; gradients flow to inputs only).
        tokenizer: Its tokenizer; must have a pad token.
        batch_size: Sequences per forward pass or generation batch.
        generator: Generates instead of ``model.generate`` when set, e.g. a
            :class:`~dspy_greater.targets.generation.CompletionServerGenerator` serving the same weights;
            called as ``generator(prompts, max_new_tokens=, temperature=, top_p=)``.
        context_cache_mb: Memory (on the model's device) for the inputs' key/value caches kept
            across :meth:`prefill` calls; least recently used entries go first. ``0`` turns it off.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 8,
        generator: Callable[..., list[list[int]]] | None = None,
        context_cache_mb: float = 512,
    ):
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token.")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.generator = generator
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {i for i in [*eos, tokenizer.eos_token_id] if i is not None}
        self._softcap = getattr(model.config, "final_logit_softcapping", None)
        self._masks: dict[str | tuple[str, bool], torch.Tensor] = {}
        #: The inputs' key/value caches kept across :meth:`prefill` and :meth:`generate` calls.
        self.contexts = ContextStore(int(context_cache_mb * 2**20))
        forward_args = inspect.signature(model.base_model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"  # renamed in transformers 5
        windows = [getattr(layer, "sliding_window", None) for layer in DynamicCache(config=model.config).layers]
        #: The smallest sliding (or chunked) attention window of the model's layers; ``None`` if all attend fully.
        self.attention_window: int | None = min((w for w in windows if w), default=None)

    @property
    def embedding_matrix(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    @property
    def vocab_size(self) -> int:
        return self.embedding_matrix.shape[0]

    def allowed_token_mask(self, mode: str) -> torch.Tensor:
        """Boolean mask over the vocabulary of tokens the search may place in an instruction (see
        :func:`~dspy_greater.engine.vocabulary.allowed_tokens` for the modes). Computed once per mode."""
        if mode not in self._masks:
            self._masks[mode] = allowed_tokens(self.tokenizer, mode, self.token_texts)
        return self._masks[mode]

    @functools.cached_property
    def token_texts(self) -> list[str]:
        """Each token's text as it reads inside a text (:func:`~dspy_greater.engine.vocabulary.token_texts`)."""
        return token_texts(self.tokenizer)

    def position_token_mask(self, mode: str, *, first: bool) -> torch.Tensor:
        """:meth:`allowed_token_mask` narrowed for an instruction's first position or a later one
        (see :func:`~dspy_greater.engine.vocabulary.position_tokens`). Computed once per case."""
        key = (mode, first)
        if key not in self._masks:
            self._masks[key] = position_tokens(self.allowed_token_mask(mode), self.token_texts, mode, first=first)
        return self._masks[key]

    # -- forward helpers -------------------------------------------------------------------------

    def _padded(self, seqs: list[list[int]], *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, attention mask)`` of a batch, padded on the right (forward passes) or the left (generation)."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            cols = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[row, cols] = torch.tensor(seq, dtype=torch.long)
            mask[row, cols] = 1
        return ids.to(self.device), mask.to(self.device)

    def _cache_fits(self, slots: int) -> bool:
        """Whether a batch whose cache spans ``slots`` positions may be built from kept caches.

        A sliding-window layer's cache keeps only its last ``window - 1`` positions, and it measures
        the window in cache slots, padding included; kept caches (prefixes, stored inputs) are
        exact only while the whole batch stays inside the window, so past it the plain forward runs.
        """
        return self.attention_window is None or slots < self.attention_window

    def _usable_prefix(self, prefix: Prefix | None, seqs: list[Sequence], rows: list[int] | None = None) -> Prefix | None:
        """``prefix``, or ``None`` when continuing it would outgrow an attention window."""
        if prefix is None or self.attention_window is None or not seqs:
            return prefix
        rows = list(range(len(seqs))) if rows is None else rows
        slots = max(c.mask.shape[1] for c in prefix.chunks) + max(len(s.ids) - len(prefix.ids[r]) for s, r in zip(seqs, rows))
        return prefix if self._cache_fits(slots) else None

    def _run_cached(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list]:
        """``(last hidden states, key/value layers)`` of a fresh forward pass."""
        out = self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        return out.last_hidden_state, [(layer.keys, layer.values) for layer in cache.layers]

    def _hidden(self, mask: torch.Tensor, *, ids=None, embeds=None, prefix: _PrefixChunk | None = None) -> torch.Tensor:
        """Last hidden states; with ``prefix`` the rows continue its cached prefixes."""
        return self._forward(mask, ids=ids, embeds=embeds, prefix=prefix)[0]

    def _forward(self, mask: torch.Tensor, *, ids=None, embeds=None, prefix: _PrefixChunk | None = None):
        """``(last hidden states, key/value layers)``; the layers are ``None`` without ``prefix``."""
        if prefix is None:
            out = self.model.base_model(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, use_cache=False)
            return out.last_hidden_state, None
        width = mask.shape[1]
        offsets = torch.tensor(prefix.lengths, device=self.device)[:, None]
        positions = offsets + torch.arange(width, device=self.device)[None, :]
        # A fresh cache object over the same tensors: appending concatenates, the prefix stays intact.
        cache = DynamicCache(ddp_cache_data=prefix.layers, config=self.model.config)
        out = self.model.base_model(
            input_ids=ids, inputs_embeds=embeds, attention_mask=torch.cat([prefix.mask, mask], dim=1),
            position_ids=positions, use_cache=True, **{self._cache_arg: cache},
        )
        return out.last_hidden_state, [(layer.keys, layer.values) for layer in cache.layers]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _chunks(self, items: list) -> list[list]:
        return [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]

    # -- proposals -------------------------------------------------------------------------------

    @torch.no_grad()
    def next_token_logprobs(self, seqs: list[list[int]]) -> torch.Tensor:
        """Log-probabilities of the token after each sequence, shape ``[len(seqs), vocab]`` on CPU."""
        rows = []
        for chunk in self._chunks(seqs):
            ids, mask = self._padded(chunk)
            hidden = self._hidden(mask, ids=ids)
            last = torch.tensor([len(s) - 1 for s in chunk], device=self.device)
            picked = hidden[torch.arange(len(chunk), device=self.device), last]
            rows.append(torch.log_softmax(self._logits(picked), dim=-1).cpu())
        return torch.cat(rows)

    @torch.no_grad()
    def prefill(self, prefixes: list[list[int]], instruction_starts: list[int]) -> Prefix:
        """Run each prefix once; keep its cache, next-token distribution and instruction log-likelihood.

        The part of each prefix before its instruction is taken from (or added to) the store of
        inputs kept across calls (see ``context_cache_mb``), so only the instruction part runs.

        Args:
            prefixes: Token ids, each non-empty (a sequence's beginning up to the edited position).
            instruction_starts: Index of the first instruction token within each prefix.
        """
        if any(not p for p in prefixes):
            raise ValueError("Every prefix must hold at least one token.")
        reuse = (self.context_cache_bytes > 0 and all(start >= 1 for start in instruction_starts)
                 and self._cache_fits(max(instruction_starts) + max(len(p) - n for p, n in zip(prefixes, instruction_starts))))
        next_rows, instruction_logprob, chunks = [], [], []
        for chunk, starts in zip(self._chunks(prefixes), self._chunks(instruction_starts)):
            if reuse:
                hidden_rows, prefix_chunk = self._prefill_after_contexts(chunk, starts)
            else:
                ids, mask = self._padded(chunk)
                hidden, layers = self._run_cached(ids, mask)
                prefix_chunk = _PrefixChunk(layers, mask, [len(p) for p in chunk])
                hidden_rows = [hidden[row, max(start, 1) - 1 : len(prefix)]
                               for row, (prefix, start) in enumerate(zip(chunk, starts))]
            chunks.append(prefix_chunk)
            for prefix, start, hidden in zip(chunk, starts, hidden_rows):
                # hidden[i] predicts prefix[first + i]: the instruction tokens, then the edited position.
                logprobs = torch.log_softmax(self._logits(hidden), dim=-1)
                next_rows.append(logprobs[-1].cpu())
                targets = torch.tensor(prefix[max(start, 1) :], dtype=torch.long, device=self.device)
                inside = logprobs[:-1].gather(1, targets[:, None]).sum() if len(targets) else torch.zeros(())
                instruction_logprob.append(float(inside))
        return Prefix([list(p) for p in prefixes], torch.stack(next_rows), instruction_logprob, chunks, self.batch_size)

    def _prefill_after_contexts(self, chunk: list[list[int]], starts: list[int]) -> tuple[list[torch.Tensor], _PrefixChunk]:
        """One prefill batch whose inputs (``prefix[:start]``, each non-empty) come from the store."""
        contexts = [tuple(prefix[:start]) for prefix, start in zip(chunk, starts)]
        states = self._context_states(contexts)
        width = max(len(c) for c in contexts)
        layers = stacked(states, width, left_padded=False)
        mask = torch.zeros((len(chunk), width), dtype=torch.long, device=self.device)
        for row, context in enumerate(contexts):
            mask[row, : len(context)] = 1
        inputs = _PrefixChunk(layers, mask, [len(c) for c in contexts])
        tails = [prefix[start:] for prefix, start in zip(chunk, starts)]
        if not any(tails):
            return [state.last_hidden[None] for state in states], inputs
        ids, tail_mask = self._padded([t or [self.pad_id] for t in tails])
        tail_mask[[row for row, t in enumerate(tails) if not t]] = 0
        hidden, layers = self._forward(tail_mask, ids=ids, prefix=inputs)
        rows = [torch.cat([state.last_hidden[None], hidden[row, : len(t)]]) for row, (state, t) in enumerate(zip(states, tails))]
        return rows, _PrefixChunk(layers, torch.cat([mask, tail_mask], dim=1), [len(p) for p in chunk])

    def _context_states(self, contexts: list[tuple[int, ...]]) -> list[_ContextState]:
        """Each context's cache and last hidden state: from the store, or run now (batched) and stored."""
        return self.contexts.states(contexts, self._run_contexts, self.batch_size)

    def _run_contexts(self, batch: list[tuple[int, ...]]) -> list[_ContextState]:
        hidden, layers = self._run_cached(*self._padded([list(c) for c in batch]))
        return [context_state(layers, hidden, row, len(context)) for row, context in enumerate(batch)]

    @property
    def context_cache_bytes(self) -> int:
        """Memory the inputs' caches kept across calls may take (``0``: none are kept)."""
        return self.contexts.capacity_bytes

    @context_cache_bytes.setter
    def context_cache_bytes(self, value: int) -> None:
        self.contexts.capacity_bytes = value

    @property
    def _contexts(self):
        """The stored inputs' states by their token ids (``contexts.entries``)."""
        return self.contexts.entries

    def clear_context_cache(self) -> None:
        """Drop the inputs' caches kept across :meth:`prefill` calls (e.g. to free memory)."""
        self.contexts.clear()

    # -- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_strings: list[str] | None = None,
        context_lengths: list[int] | None = None,
        rng: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Continue each prompt; returns the new tokens up to (not including) the first stop token.

        ``temperature == 0`` is greedy decoding. With ``stop_strings``, a row also stops once its
        text contains one of them; its tokens then end with the token that completed the first
        one (the caller cuts the text).

        Args:
            context_lengths: Per prompt, how many leading tokens are an example's inputs (as in
                :meth:`prefill`). Their key/value cache then comes from the store kept across calls
                (and is added to it), for every batch whose prompts are equally long after them.
            rng: Draws the sampled tokens when ``temperature > 0`` (at the temperature, the model's
                top-k and ``top_p``); a generator seeded with 0 when not given. Torch's global
                random state is never used. A ``generator`` server samples on its own.
        """
        if self.generator is not None:
            rows = self.generator(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
            return [self._finish_row(row, stop_strings) for row in rows]
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if temperature > 0:
            top_k = getattr(self.model.generation_config, "top_k", None)
            sampler = LocalSampler(rng if rng is not None else torch.Generator().manual_seed(0), temperature=temperature,
                                   top_k=DEFAULT_TOP_K if top_k is None else top_k, top_p=top_p)
            sampling["logits_processor"] = LogitsProcessorList([sampler])
        stops = {"stop_strings": list(stop_strings), "tokenizer": self.tokenizer} if stop_strings else {}
        lengths = self._chunks(context_lengths) if context_lengths is not None else itertools.repeat(None)
        results: list[list[int]] = []
        # generate() hands the output layer a strided view of the last position; on CPU a bfloat16
        # matmul on it copies the whole output matrix per row, so the view is made contiguous first.
        hook = self.model.get_output_embeddings().register_forward_pre_hook(
            lambda module, args: (args[0].contiguous(), *args[1:]))
        try:
            for chunk, chunk_lengths in zip(self._chunks(prompts), lengths):
                ids, mask = self._padded(chunk, left=True)
                out = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=self.pad_id,
                    eos_token_id=sorted(self.stop_ids) or None, **stops,
                    **self._stored_generation_cache(chunk, chunk_lengths, max_new_tokens), **sampling,
                )
                results.extend(self._finish_row(row, stop_strings) for row in out[:, ids.shape[1] :].tolist())
        finally:
            hook.remove()
        return results

    def _stored_generation_cache(self, chunk: list[list[int]], context_lengths: list[int] | None, max_new_tokens: int) -> dict:
        """``{cache argument: ...}`` holding the stored inputs of a left-padded generation batch, or
        ``{}`` when there is no store, the inputs do not end in the same column (or end the prompts),
        or the batch would outgrow an attention window."""
        if not context_lengths or not self.context_cache_bytes or min(context_lengths) < 1:
            return {}
        if not self._cache_fits(max(len(p) for p in chunk) + max_new_tokens):
            return {}
        after = {len(p) - n for p, n in zip(chunk, context_lengths)}
        if len(after) != 1 or min(after) < 1:  # generate() must have at least one new token to prefill
            return {}
        contexts = [tuple(p[:n]) for p, n in zip(chunk, context_lengths)]
        layers = stacked(self._context_states(contexts), max(context_lengths), left_padded=True)
        return {self._cache_arg: DynamicCache(ddp_cache_data=layers, config=self.model.config)}

    def _finish_row(self, row: list[int], stop_strings: list[str] | None) -> list[int]:
        """A generated row up to (not including) its first stop token, then cut at a stop string."""
        row = row[: next((i for i, tok in enumerate(row) if tok in self.stop_ids), len(row))]
        return self._cut_at_stop_string(row, stop_strings) if stop_strings else row

    def _cut_at_stop_string(self, row: list[int], stop_strings: list[str]) -> list[int]:
        """``row`` up to and including the token that completes its first stop string (all of it if none)."""
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        if not any(s in decode(row) for s in stop_strings):
            return row
        end = len(row)
        while end > 1 and any(s in decode(row[: end - 1]) for s in stop_strings):
            end -= 1
        return row[:end]

    # -- losses ----------------------------------------------------------------------------------

    def _batches(self, seqs: list[Sequence], prefix: Prefix | None, prefix_rows: list[int] | None = None):
        """``(indices, chunk, prefix_chunk, tails, rows)`` per forward batch: which sequences, the
        sequences, the cached prefixes they continue (``None`` without ``prefix``), the part of each
        that runs, and their prefix rows (``prefix_rows[i]`` for sequence ``i``; by default ``i``).

        Sequences are grouped by the length of what runs, longest first, so that little of a batch
        is padding: a batch takes up to ``batch_size`` sequences, and one shorter than 90% of the
        batch's longest starts a new batch once the batch spans 256 tokens (narrower matrix products
        cost more than the padding they save).
        """
        rows = list(range(len(seqs))) if prefix_rows is None else list(prefix_rows)
        if prefix is not None and not prefix.covers(seqs, rows):
            raise ValueError("These sequences do not start with the cached prefixes (one each, in order, unless prefix_rows says which).")
        tails = [s.ids[len(prefix.ids[r]) :] if prefix is not None else s.ids for s, r in zip(seqs, rows)]
        groups, group = [], []
        for i in sorted(range(len(seqs)), key=lambda i: -len(tails[i])):
            longest = len(tails[group[0]]) if group else 0
            if group and (len(group) == self.batch_size
                          or (len(tails[i]) < 0.9 * longest and len(group) * longest >= 256)):
                groups.append(group)
                group = []
            group.append(i)
        groups += [group] if group else []
        for group in groups:
            picked = [rows[i] for i in group]
            yield (group, [seqs[i] for i in group], prefix.gather(picked) if prefix is not None else None,
                   [tails[i] for i in group], picked)

    @torch.no_grad()
    def score(
        self, seqs: list[Sequence], *, answer_temperature: float, prefix: Prefix | None = None,
        prefix_rows: list[int] | None = None, choices: list[int] | None = None,
        correct_among: list[int] | None = None,
    ) -> list[SequenceScore]:
        """Teacher-forced answer loss, correctness and instruction fluency for each sequence.

        Args:
            prefix: Cached prefixes the sequences start with, from :meth:`prefill`.
            prefix_rows: Which prefix each sequence continues (several may share one, e.g. the
                finalists of a step); by default one per sequence, in order.
            choices: Token ids whose logits at the first answer position each score should carry
                (what the model would answer there, read from the same forward pass).
            correct_among: Judge correctness among these first answer tokens only
                (:func:`~dspy_greater.engine.losses.span_terms`' ``choices``).
        """
        prefix = self._usable_prefix(prefix, seqs, prefix_rows)
        scores: list[SequenceScore | None] = [None] * len(seqs)
        for indices, chunk, prefix_chunk, tails, rows in self._batches(seqs, prefix, prefix_rows):
            ids, mask = self._padded(tails)
            hidden = self._hidden(mask, ids=ids, prefix=prefix_chunk)
            losses, fluencies, correct = span_terms(self._logits, self.device, hidden, chunk, answer_temperature,
                                                    prefix=prefix, rows=rows, choices=correct_among)
            picked = [()] * len(chunk)
            if choices:
                offsets = prefix_chunk.lengths if prefix_chunk else [0] * len(chunk)
                at = torch.tensor([s.answer_start - 1 - n for s, n in zip(chunk, offsets)], device=self.device)
                logits = self._logits(hidden[torch.arange(len(chunk), device=self.device), at])
                picked = [tuple(row) for row in logits[:, torch.tensor(choices, device=self.device)].tolist()]
            for i, a, f, c, p in zip(indices, losses, fluencies, correct, picked):
                scores[i] = SequenceScore(float(a), c, float(f), p)
        return scores

    # Loss and its gradient w.r.t. a one-hot vector over candidate tokens at one instruction position, with this
    # model as its first argument: see gradient.one_hot_gradient.
    one_hot_gradient = gradient.one_hot_gradient
