"""The GReaTer search on token ids: propose -> reason -> gradient -> select -> advance.

Knows nothing about DSPy. One :class:`GreaterSearch` optimizes one instruction for one task,
given examples as ``(inputs_text, label)`` pairs, a layout and an answer extractor.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dspy_greater.engine import checkpoint as checkpoint_io
from dspy_greater.engine.extractor import Extractor
from dspy_greater.engine.config import GreaterConfig
from dspy_greater.engine.layout import GreaterLayout, Sequence
from dspy_greater.engine.model import KeptGradient, OptimizerLM, Prefix, SequenceScore

logger = logging.getLogger(__name__)

_SENTENCE_END = (".", "!", "?")


@dataclass(frozen=True)
class SearchExample:
    """One training or held-out example as the search sees it."""

    inputs_text: str
    label: str


@dataclass
class Evaluation:
    """The optimizer model's answers for one instruction on some examples."""

    predictions: list[str | None]
    labels: list[str]
    mean_loss: float

    @property
    def accuracy(self) -> float:
        return sum(p == g for p, g in zip(self.predictions, self.labels)) / max(len(self.labels), 1)

    def key(self) -> tuple[float, float]:
        """Higher is better: accuracy first, then lower answer loss."""
        return (self.accuracy, -self.mean_loss)


@dataclass
class StepRecord:
    """What one step did; plain data."""

    step: int
    position: int
    candidates: list[str]
    finalists: list[dict]
    chosen: str
    changed: bool
    loss: float
    instruction: str
    seconds: dict[str, float]
    heldout_accuracy: float | None = None
    heldout_loss: float | None = None


@dataclass
class _RunState:
    """What a run carries from step to step (and what a checkpoint holds)."""

    instruction: list[int]
    initial: list[int]
    seen: dict[tuple[int, ...], Evaluation]
    position: int = 0
    next_step: int = 0
    trace: list[StepRecord] = field(default_factory=list)
    elapsed: float = 0.0


@dataclass
class SearchResult:
    """The outcome of a search; ``to_dict()`` is JSON-serialisable."""

    initial_instruction: str
    best_instruction: str
    final_instruction: str
    initial_heldout: dict
    best_heldout: dict
    top_instructions: list[dict] = field(default_factory=list)
    trace: list[StepRecord] = field(default_factory=list)
    stopped_reason: str = "completed"
    seconds: float = 0.0
    resumed_at_step: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def intersect_candidates(
    topk_sets: list[set[int]], *, q: int, subset_size: int, rng: random.Random
) -> set[int]:
    """Union over ``q`` random subsets of examples of the intersection of their top-k sets."""
    union: set[int] = set()
    size = min(subset_size, len(topk_sets))
    for _ in range(q):
        union |= set.intersection(*rng.sample(topk_sets, size))
    return union


class GreaterSearch:
    """Gradient-over-reasoning search for one instruction.

    Args:
        lm: The optimizer model.
        layout: Builds token sequences.
        extractor: The answer extractor for this task.
        config: Hyper-parameters.
    """

    def __init__(self, lm: OptimizerLM, layout: GreaterLayout, extractor: Extractor, config: GreaterConfig):
        self.lm = lm
        self.layout = layout
        self.extractor = layout.search_extractor(extractor)  # the layout may write its own (ChatAdapter's marker)
        self.config = config
        self.extractor_ids = layout.encode(self.extractor.text)
        self._answer_ids: dict[str, list[int]] = {}
        self._reasoning: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        self._kept_gradients: dict[tuple[SearchExample, tuple[int, ...]], KeptGradient] = {}
        self._allowed = lm.allowed_token_mask(config.allowed_tokens)
        self._growth_id = None
        if config.growth_token is not None:
            ids = layout.encode(config.growth_token)
            if len(ids) != 1:
                raise ValueError(f"GreaterConfig.growth_token {config.growth_token!r} is {len(ids)} tokens for this "
                                 "model's tokenizer; give a text that is one token (e.g. '!').")
            self._growth_id = ids[0]

    # -- building blocks ---------------------------------------------------------------------------

    def answer_ids(self, label: str) -> list[int]:
        if label not in self._answer_ids:
            self._answer_ids[label] = self.layout.encode(self.extractor.target(label))
        return self._answer_ids[label]

    def reasoning(
        self, instruction: list[int], examples: list[SearchExample], pool: list[SearchExample] = ()
    ) -> list[list[int]]:
        """The optimizer model's reasoning for each example under ``instruction`` (cached).

        Args:
            pool: Examples that later steps may need. When a generation batch has room left (it runs
                up to the model batch size), it is filled with pool examples that have no reasoning
                under ``instruction`` yet: a token costs one read of the weights whether for 6 rows
                or 8, so they come at a fraction of what a batch of their own costs later. Not done
                with a generation server (``lm.generator``), which serves one request at a time.
        """
        return self.reasoning_under_each([instruction], examples, pool)[0]

    def reasoning_under_each(
        self, instructions: list[list[int]], examples: list[SearchExample], pool: list[SearchExample] = ()
    ) -> list[list[list[int]]]:
        """:meth:`reasoning` for several instructions, with whatever is missing generated in one call
        (a generation batch may hold rows of different instructions)."""
        if not self.layout.reasons:  # the layout answers right away (a ChatAdapter reply without reasoning)
            return [[[] for _ in examples] for _ in instructions]

        keys = [tuple(i) for i in instructions]

        def lacking(group: list[SearchExample]) -> list[tuple[tuple[int, ...], SearchExample]]:
            return [(key, ex) for key in dict.fromkeys(keys) for ex in dict.fromkeys(group)
                    if (ex.inputs_text, key) not in self._reasoning]

        missing = lacking(examples)
        if missing:
            room = 0 if self.lm.generator is not None else -len(missing) % self.lm.batch_size
            missing += [pair for pair in lacking(pool) if pair not in missing][:room]
            prompts = [self.layout.prompt(ex.inputs_text, list(key)) for key, ex in missing]
            stops = {"stop_strings": list(self.layout.stop_strings)} if self.layout.stop_strings else {}
            stored = {"context_lengths": [p.instruction_start for p in prompts]} if self.config.prefix_cache else {}
            outputs = self.lm.generate(
                [p.ids for p in prompts], max_new_tokens=self.config.max_reasoning_tokens,
                temperature=self.config.reasoning_temperature, **stops, **stored,
            )
            for (key, ex), out in zip(missing, outputs):
                self._reasoning[(ex.inputs_text, key)] = self.layout.finish_reasoning(out)
        return [[self._reasoning[(ex.inputs_text, key)] for ex in examples] for key in keys]

    def sequences(self, instruction: list[int], examples: list[SearchExample], reasoning: list[list[int]]) -> list[Sequence]:
        return [
            self.layout.full(ex.inputs_text, instruction, r, self.extractor_ids, self.answer_ids(ex.label))
            for ex, r in zip(examples, reasoning)
        ]

    def prefix(self, instruction: list[int], position: int, examples: list[SearchExample]) -> Prefix:
        """Each example's sequence up to the edited position, run once and cached."""
        before = [self.layout.frame(ex.inputs_text)[0] for ex in examples]
        return self.lm.prefill([b + instruction[:position] for b in before], [len(b) for b in before])

    def propose(
        self,
        instruction: list[int],
        position: int,
        examples: list[SearchExample],
        rng: random.Random,
        prefix: Prefix | None = None,
    ) -> list[int]:
        """Candidate tokens for ``position``, conditioned on each example's inputs.

        Args:
            prefix: The examples' cached prefixes up to ``position`` (their next-token
                distributions are the proposals' when the layout proposes from the scoring prefix);
                otherwise the layout's ``proposal_context`` is run here (its inputs from the store
                with ``prefix_cache``).

        Returns candidates ordered by summed log-probability over the examples (most likely first).
        """
        if prefix is not None and self.layout.proposals_share_prefix:
            logprobs = prefix.next_logprobs
        else:
            contexts = [self.layout.proposal_context(ex.inputs_text, instruction[:position]) for ex in examples]
            if self.config.prefix_cache:  # each example's inputs come from the store kept across steps
                logprobs = self.lm.prefill(contexts, [len(c) - position for c in contexts]).next_logprobs
            else:
                logprobs = self.lm.next_token_logprobs(contexts)
        allowed = self._allowed.clone()
        if position > 0:
            allowed[instruction[position - 1]] = False
        else:
            allowed &= ~self.lm.leading_space_mask()
        width = min(len(allowed), logprobs.shape[1])
        logprobs = logprobs[:, :width].masked_fill(~allowed[:width], -math.inf)
        current = instruction[position] if position < len(instruction) else None
        k = self.config.topk
        while True:
            top = logprobs.topk(min(k, int(allowed.sum())), dim=-1).indices.tolist()
            found = intersect_candidates(
                [set(row) for row in top], q=self.config.intersect_q, subset_size=self.config.intersect_size, rng=rng
            )
            found.discard(current)
            if len(found) >= self.config.min_candidates or k >= int(allowed.sum()):
                break
            k += self.config.topk_growth
        total = logprobs.sum(0)
        ordered = sorted(found, key=lambda t: -float(total[t]))
        return ordered + ([current] if current is not None else [])

    def _score_finalists(
        self, instruction: list[int], position: int, finalists: list[int], examples: list[SearchExample],
        reasoning: list[list[int]], prefix: Prefix | None,
    ) -> list[list[SequenceScore]]:
        """Each finalist token's per-example scores at ``position``, teacher-forced on ``reasoning``
        (or on its own reasoning with ``finalist_scoring="regenerate"``), all in one scoring call
        whose batches group sequences of equal length across finalists."""
        trials = [_with_token(instruction, position, token) for token in finalists]
        if self.config.finalist_scoring == "regenerate":  # one generation call for all the finalists
            owns = self.reasoning_under_each(trials, examples)
        else:
            owns = [reasoning] * len(trials)
        seqs = [seq for trial, own in zip(trials, owns) for seq in self.sequences(trial, examples, own)]
        rows = list(range(len(examples))) * len(finalists)  # every finalist continues each example's prefix
        scores = self.lm.score(seqs, answer_temperature=self.config.answer_temperature, prefix=prefix, prefix_rows=rows)
        n = len(examples)
        return [scores[k * n : (k + 1) * n] for k in range(len(finalists))]

    def _summarize_scores(self, scores: list[SequenceScore]) -> dict:
        n = len(scores)
        mistakes = sum(not s.correct for s in scores) / n
        fluency = sum(s.fluency for s in scores) / n
        return {
            "mistake_rate": mistakes,
            "answer_loss": sum(s.answer_loss for s in scores) / n,
            "fluency": fluency,
            "score": mistakes + self.config.score_fluency_weight * fluency,
        }

    def evaluate(self, instruction: list[int], examples: list[SearchExample]) -> Evaluation:
        """The optimizer model's predicted label for each example, and the mean gold-answer loss."""
        if not examples:
            return Evaluation([], [], math.nan)
        reasoning = self.reasoning(instruction, examples)
        choices = list(self.extractor.choices)
        first_tokens = [self.answer_ids(c)[0] if self.answer_ids(c) else None for c in choices]
        by_first_token = bool(choices) and None not in first_tokens and len(set(first_tokens)) == len(first_tokens)
        # One forward pass gives the answer loss and, at the first answer position, the prediction;
        # the inputs' cache comes from the store (position 0: the prefix is the inputs alone).
        prefix = self.prefix(instruction, 0, examples) if self.config.prefix_cache else None
        scores = self.lm.score(self.sequences(instruction, examples, reasoning), answer_temperature=self.config.answer_temperature,
                               prefix=prefix, choices=first_tokens if by_first_token else None)
        if by_first_token:
            predictions = [choices[max(range(len(choices)), key=s.choice_logits.__getitem__)] for s in scores]
        else:
            contexts = [self.layout.prompt(ex.inputs_text, instruction).ids + r + self.extractor_ids
                        for ex, r in zip(examples, reasoning)]
            outputs = self.lm.generate(contexts, max_new_tokens=self.config.answer_tokens)
            predictions = [self.extractor.label_of(self.layout.tokenizer.decode(o)) for o in outputs]
        return Evaluation(predictions, [ex.label for ex in examples], self._summarize_scores(scores)["answer_loss"])

    # -- the loop ----------------------------------------------------------------------------------

    def run(
        self,
        initial_instruction: str,
        train: list[SearchExample],
        heldout: list[SearchExample],
        *,
        progress: Callable[[StepRecord], None] | None = None,
        checkpoint: str | os.PathLike | None = None,
    ) -> SearchResult:
        """Optimize ``initial_instruction`` on ``train``; keep the best instruction on ``heldout``.

        Args:
            progress: Called with each step's record.
            checkpoint: A JSON file. When it exists (from an earlier, interrupted run with the same
                data, settings, model and instruction), the search resumes after its last step and
                ends where an uninterrupted run ends (the same instructions; losses equal up to
                float rounding, as gradients kept in memory are computed afresh); it is rewritten every
                ``config.checkpoint_every`` steps and kept at the end.
        """
        cfg = self.config
        started = time.perf_counter()
        heldout = heldout or train
        stamp = self._fingerprint(initial_instruction, train, heldout)
        saved = checkpoint_io.load(checkpoint, stamp) if checkpoint is not None else None
        rng = random.Random(cfg.seed)
        torch.manual_seed(cfg.seed)  # sampled reasoning (reasoning_temperature > 0) is reproducible too
        if saved is not None:
            state = self._restore(saved, rng)
            logger.info("Resuming the GReaTer search from %s after step %d.", checkpoint, state.next_step)
        else:
            instruction = self.layout.encode_instruction(initial_instruction)
            if not instruction:
                raise ValueError("The initial instruction is empty; give at least one word.")
            state = _RunState(instruction=instruction, initial=instruction,
                              seen={tuple(instruction): self.evaluate(instruction, heldout)})
        resumed_at = state.next_step if saved is not None else None
        model_batch_size = self.lm.batch_size
        stopped_reason = "completed"
        try:
            for step in range(state.next_step, cfg.num_steps):
                record = self._step_with_backoff(step, state.instruction, state.position, train, rng, len(state.initial))
                state.instruction = record.pop("instruction_ids")
                record = StepRecord(**record)
                state.position = self._advance(state.instruction, state.position)
                if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.num_steps:
                    t0 = time.perf_counter()
                    key = tuple(state.instruction)
                    evaluation = state.seen.get(key) or self.evaluate(state.instruction, heldout)
                    state.seen[key] = evaluation
                    record.seconds["heldout"] = time.perf_counter() - t0
                    record.heldout_accuracy, record.heldout_loss = evaluation.accuracy, evaluation.mean_loss
                state.trace.append(record)
                state.next_step = step + 1
                if checkpoint is not None and (state.next_step % cfg.checkpoint_every == 0 or state.next_step == cfg.num_steps):
                    self._save(checkpoint, stamp, state, rng, state.elapsed + time.perf_counter() - started)
                if progress:
                    progress(record)
        except KeyboardInterrupt:
            stopped_reason = "interrupted"
            logger.warning("GReaTer search interrupted; returning the best instruction found so far%s.",
                           f" (checkpoint: {checkpoint})" if checkpoint is not None else "")
        except Exception as exc:
            if not state.trace:
                raise  # nothing found yet: the caller should see the error itself
            stopped_reason = f"error: {type(exc).__name__}: {exc}"
            logger.exception("GReaTer search failed at step %d; returning the best instruction found so far.",
                             len(state.trace))
        finally:
            self.lm.batch_size = model_batch_size  # an out-of-memory backoff lasts for this run only
        return self._result(state, stopped_reason, state.elapsed + time.perf_counter() - started, resumed_at)

    def _result(self, state: _RunState, stopped_reason: str, seconds: float, resumed_at: int | None) -> SearchResult:
        # Highest (accuracy, -loss) first; ties keep the order found, so the earliest best wins.
        ranked = sorted(state.seen.items(), key=lambda kv: kv[1].key(), reverse=True)
        text = self.layout.instruction_text
        return SearchResult(
            initial_instruction=text(state.initial),
            best_instruction=text(list(ranked[0][0])),
            final_instruction=state.trace[-1].instruction if state.trace else text(state.initial),
            initial_heldout=_eval_dict(state.seen[tuple(state.initial)]),
            best_heldout=_eval_dict(ranked[0][1]),
            top_instructions=[{"instruction": text(list(ids)), **_eval_dict(ev)} for ids, ev in ranked[:10]],
            trace=state.trace,
            stopped_reason=stopped_reason,
            seconds=seconds,
            resumed_at_step=resumed_at,
        )

    # -- checkpoints -------------------------------------------------------------------------------

    def _fingerprint(self, initial_instruction: str, train: list[SearchExample], heldout: list[SearchExample]) -> str:
        settings = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in ("num_steps", "checkpoint_every")}
        return checkpoint_io.fingerprint({
            "initial_instruction": initial_instruction,
            "train": [dataclasses.astuple(ex) for ex in train],
            "heldout": [dataclasses.astuple(ex) for ex in heldout],
            "extractor": [self.extractor.kind, self.extractor.text, list(self.extractor.choices)],
            "config": settings,
            "model": getattr(self.lm.model.config, "_name_or_path", type(self.lm.model).__name__),
            "vocab_size": self.lm.vocab_size,
            "layout": [self.layout.name, self.layout.separator,
                       *([type(self.layout.adapter).__name__] if hasattr(self.layout, "adapter") else [])],
        })

    def _save(self, path, stamp: str, state: _RunState, rng: random.Random, elapsed: float) -> None:
        checkpoint_io.save(path, {
            "fingerprint": stamp,
            "next_step": state.next_step,
            "position": state.position,
            "instruction": state.instruction,
            "initial": state.initial,
            "seen": [{"ids": list(ids), "predictions": ev.predictions, "labels": ev.labels, "mean_loss": ev.mean_loss}
                     for ids, ev in state.seen.items()],
            "trace": [dataclasses.asdict(r) for r in state.trace],
            "reasoning": [[text, list(ids), out] for (text, ids), out in self._reasoning.items()],
            "python_rng": [rng.getstate()[0], list(rng.getstate()[1]), rng.getstate()[2]],
            "torch_rng": torch.get_rng_state().tolist(),
            "elapsed": elapsed,
        })

    def _restore(self, saved: dict, rng: random.Random) -> _RunState:
        version, internal, gauss = saved["python_rng"]
        rng.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(torch.tensor(saved["torch_rng"], dtype=torch.uint8))
        for text, ids, out in saved["reasoning"]:
            self._reasoning[(text, tuple(ids))] = out
        return _RunState(
            instruction=saved["instruction"],
            initial=saved["initial"],
            seen={tuple(e["ids"]): Evaluation(e["predictions"], e["labels"], e["mean_loss"]) for e in saved["seen"]},
            position=saved["position"],
            next_step=saved["next_step"],
            trace=[StepRecord(**r) for r in saved["trace"]],
            elapsed=saved["elapsed"],
        )

    def _step_with_backoff(self, step: int, instruction: list[int], position: int, train, rng: random.Random,
                           initial_length: int) -> dict:
        """One step; on out-of-memory, halve the model batch size and redo the step from the same RNG state."""
        state, torch_state = rng.getstate(), torch.get_rng_state()
        while True:
            try:
                return self._step(step, instruction, position, train, rng, initial_length)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are retried
                if not is_out_of_memory(exc) or self.lm.batch_size <= 1:
                    raise
                self.lm.batch_size = max(1, self.lm.batch_size // 2)
                self.lm.clear_context_cache()
                rng.setstate(state)
                torch.set_rng_state(torch_state)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                logger.warning("Out of memory at step %d; retrying with %d sequences per forward pass.",
                               step, self.lm.batch_size)

    def _step(self, step: int, instruction: list[int], position: int, train: list[SearchExample], rng: random.Random,
              initial_length: int) -> dict:
        cfg = self.config
        seconds: dict[str, float] = {}
        batch = train if cfg.batch_size is None or cfg.batch_size >= len(train) else rng.sample(train, cfg.batch_size)

        t0 = time.perf_counter()
        prefix = self.prefix(instruction, position, batch) if cfg.prefix_cache else None
        candidates = self.propose(instruction, position, batch, rng, prefix)
        if position == len(instruction) and cfg.growth_token is not None:  # growing: a placeholder to replace
            instruction = [*instruction, self._growth_id]
            candidates = [*candidates, self._growth_id]
        elif position == len(instruction):
            # Growing: the most likely proposal holds the new position while the gradient ranks all.
            instruction = [*instruction, candidates[0]]
            candidates = [*candidates[1:], candidates[0]]
        current = instruction[position]
        seconds["propose"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        reasoning = self.reasoning(instruction, batch, pool=train)
        seconds["generate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        seqs = self.sequences(instruction, batch, reasoning)
        current_scores: list[SequenceScore] = []
        key = tuple(instruction)
        # A kept token leaves the instruction and its reasoning as they are: the gradient at the next
        # position is then already known for the examples this step runs.
        reuse = cfg.reuse_gradients and cfg.keep_current and prefix is not None
        kept_out: list[KeptGradient] = []
        loss, grad = self.lm.one_hot_gradient(
            seqs, position, candidates, answer_temperature=cfg.answer_temperature, fluency_weight=cfg.fluency_weight,
            scores_out=current_scores, prefix=prefix,
            kept=[self._kept_gradients.get((ex, key)) for ex in batch] if reuse else None,
            kept_out=kept_out if reuse else None, edited_fluency=cfg.edited_fluency,
        )
        if reuse:
            self._kept_gradients = {k: g for k, g in self._kept_gradients.items() if k[1] == key}
            self._kept_gradients.update({(ex, key): g for ex, g in zip(batch, kept_out)})
        seconds["gradient"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if not math.isfinite(loss) or not torch.isfinite(grad).all():
            logger.warning("Step %d: the loss (%s) or part of its gradient is not finite; candidates with a "
                           "non-finite gradient are ranked last.", step, loss)
            grad = torch.nan_to_num(grad, nan=math.inf, posinf=math.inf, neginf=math.inf)
        ranked = [candidates[i] for i in torch.argsort(grad).tolist() if cfg.current_competes or candidates[i] != current]
        finalists = ranked[: cfg.num_finalists]
        if cfg.sentence_end_accept and position > initial_length / 2:
            ending = next((t for t in finalists if "." in self.layout.decode([t])), None)
            if ending is not None:  # ends the sentence: accepted without comparing it to the others
                finalists = [ending]
        if cfg.keep_current and current not in finalists:
            finalists = [*finalists, current]
        challengers = [t for t in finalists if t != current]
        by_token = dict(zip(challengers, self._score_finalists(instruction, position, challengers, batch, reasoning,
                                                               prefix)))
        by_token[current] = current_scores  # from the gradient pass (its reasoning is the current one)
        finalist_scores = [by_token[t] for t in finalists]
        scored = [{"token": self.layout.decode([token]), "token_id": token,
                   "gradient": float(grad[candidates.index(token)]), **self._summarize_scores(scores)}
                  for token, scores in zip(finalists, finalist_scores)]
        finite = [s for s in scored if math.isfinite(s["score"]) and math.isfinite(s["answer_loss"])]
        if not finite:
            raise FloatingPointError(f"Step {step}: every finalist scored NaN or infinity; the optimizer model's "
                                     "outputs are not finite (try dtype='float32').")
        if len(finite) < len(scored):
            logger.warning("Step %d: skipping finalists with a non-finite score: %s", step,
                           [s["token"] for s in scored if s not in finite])
        winner = min(finite, key=self._finalist_rank)
        instruction = self._round_trip(_with_token(instruction, position, winner["token_id"]))
        seconds["select"] = time.perf_counter() - t0  # with any finalist's regenerated reasoning
        return dict(
            step=step,
            position=position,
            candidates=[self.layout.decode([c]) for c in candidates],
            finalists=scored,
            chosen=winner["token"],
            changed=winner["token_id"] != current,
            loss=loss,
            instruction=self.layout.instruction_text(instruction),
            seconds=seconds,
            instruction_ids=instruction,
        )

    def _round_trip(self, instruction: list[int]) -> list[int]:
        """The ids of the instruction's text: an edit whose decoded text re-encodes differently (a
        token that merges with its neighbour) continues from the re-encoded ids, so that the ids
        scored are the text the target gets."""
        again = self.layout.encode_instruction(self.layout.instruction_text(instruction))
        return again if again else instruction

    def _finalist_rank(self, scored: dict) -> tuple[float, float]:
        """Lower is better (see ``GreaterConfig.finalist_key``)."""
        if self.config.finalist_key == "loss":
            return (scored["mistake_rate"], scored["answer_loss"] + self.config.score_fluency_weight * scored["fluency"])
        return (scored["score"], scored["answer_loss"])

    def _advance(self, instruction: list[int], position: int) -> int:
        """Next position: the following token; past the end grow, or wrap after a full sentence."""
        position += 1
        if position < len(instruction):
            return position
        ends_sentence = self.layout.decode(instruction).rstrip().endswith(_SENTENCE_END)
        if ends_sentence or len(instruction) >= self.config.max_instruction_tokens:
            return 0
        return position


def _with_token(instruction: list[int], position: int, token: int) -> list[int]:
    """``instruction`` with ``token`` at ``position``."""
    return [*instruction[:position], token, *instruction[position + 1 :]]


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an accelerator or host out-of-memory error."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _eval_dict(evaluation: Evaluation) -> dict:
    return {"accuracy": evaluation.accuracy, "mean_loss": evaluation.mean_loss, "predictions": list(evaluation.predictions)}
