"""The GReaTer search on token ids: propose -> reason -> gradient -> select -> advance.

Knows nothing about DSPy. One :class:`GreaterSearch` optimizes one instruction for one task,
given examples as ``(inputs_text, label)`` pairs, a layout and an answer extractor. Each step edits
one position of the instruction:

1. propose: candidate tokens for the position, from the optimizer model's next-token
   distributions after each example's inputs and the instruction so far;
2. reason: the model's reasoning for each example under the current instruction;
3. gradient: the one-hot gradient of the answer loss (after that reasoning) over the candidates;
4. select: the candidates with the most negative gradient are scored for real, the best one wins;

then the position advances (to the next token, growing past the end or wrapping after a sentence).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator

import torch

from dspy_greater.engine import checkpoint as checkpoint_io
from dspy_greater.engine import memory
from dspy_greater.engine.config import GreaterConfig
from dspy_greater.engine.extractor import Extractor
from dspy_greater.engine.gradient import KeptGradient
from dspy_greater.engine.kv_cache import Prefix
from dspy_greater.engine.layout import GreaterLayout, Sequence
from dspy_greater.engine.losses import SequenceScore
from dspy_greater.engine.model import OptimizerLM
from dspy_greater.engine.proposals import candidates_from_logprobs, intersect_candidates
from dspy_greater.engine.reasoning import ReasoningCache
from dspy_greater.engine.records import Evaluation, SearchExample, SearchResult, StepRecord, _RunState

# Also importable from here: the records, and the helpers other layers use.
__all__ = [
    "Evaluation", "GreaterSearch", "SearchExample", "SearchResult", "StepRecord", "intersect_candidates",
    "is_out_of_memory",
]

logger = logging.getLogger(__name__)

_SENTENCE_END = (".", "!", "?")


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
        #: Draws sampled reasoning (``reasoning_temperature > 0``); :meth:`run` reseeds it from the config.
        self.sampling_rng = torch.Generator().manual_seed(config.seed)
        self._answer_ids: dict[str, list[int]] = {}
        self._reasoner = ReasoningCache(lm, layout, config, self.sampling_rng)
        self._reasoning = self._reasoner.stored  # (inputs_text, instruction ids) -> reasoning ids
        self._kept_gradients: dict[tuple[SearchExample, tuple[int, ...]], KeptGradient] = {}
        self._growth_id = None
        if config.growth_token is not None:
            ids = layout.encode(config.growth_token)
            if len(ids) != 1:
                raise ValueError(f"GreaterConfig.growth_token {config.growth_token!r} is {len(ids)} tokens for this "
                                 "model's tokenizer; give a text that is one token (e.g. '!').")
            self._growth_id = ids[0]

    # -- building blocks ---------------------------------------------------------------------------

    def choice_first_tokens(self) -> list[int] | None:
        """The first answer token of each choice of a closed answer space, when they all differ
        (then the model's answer among the choices is read from one position); else ``None``."""
        tokens = [self.answer_ids(c)[0] if self.answer_ids(c) else None for c in self.extractor.choices]
        return tokens if tokens and None not in tokens and len(set(tokens)) == len(tokens) else None

    def answer_ids(self, label: str) -> list[int]:
        if label not in self._answer_ids:
            self._answer_ids[label] = self.layout.encode(self.extractor.target(label))
        return self._answer_ids[label]

    def reasoning(
        self, instruction: list[int], examples: list[SearchExample], pool: list[SearchExample] = ()
    ) -> list[list[int]]:
        """The optimizer model's reasoning for each example under ``instruction`` (kept; ``pool``: see
        :meth:`ReasoningCache.under_each <dspy_greater.engine.reasoning.ReasoningCache.under_each>`)."""
        return self.reasoning_under_each([instruction], examples, pool)[0]

    def reasoning_under_each(
        self, instructions: list[list[int]], examples: list[SearchExample], pool: list[SearchExample] = ()
    ) -> list[list[list[int]]]:
        """:meth:`reasoning` for several instructions, with whatever is missing generated in one call."""
        return self._reasoner.under_each(instructions, examples, pool)

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

        Returns the candidates of the proposal rule (:func:`~dspy_greater.engine.proposals.candidates_from_logprobs`),
        most likely first, then the current token when ``position`` holds one.
        """
        if prefix is not None and self.layout.proposals_share_prefix:
            logprobs = prefix.next_logprobs
        else:
            contexts = [self.layout.proposal_context(ex.inputs_text, instruction[:position]) for ex in examples]
            if self.config.prefix_cache:  # each example's inputs come from the store kept across steps
                logprobs = self.lm.prefill(contexts, [len(c) - position for c in contexts]).next_logprobs
            else:
                logprobs = self.lm.next_token_logprobs(contexts)
        allowed = self.lm.position_token_mask(self.config.allowed_tokens, first=position == 0).clone()
        if position > 0:
            allowed[instruction[position - 1]] = False  # no token twice in a row
        current = instruction[position] if position < len(instruction) else None
        return candidates_from_logprobs(logprobs, allowed, current, self.config, rng)

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
        first_tokens = self.choice_first_tokens()
        # One forward pass gives the answer loss and, at the first answer position, the prediction;
        # the inputs' cache comes from the store (position 0: the prefix is the inputs alone).
        prefix = self.prefix(instruction, 0, examples) if self.config.prefix_cache else None
        scores = self.lm.score(self.sequences(instruction, examples, reasoning), answer_temperature=self.config.answer_temperature,
                               prefix=prefix, choices=first_tokens)
        if first_tokens is not None:
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
        memory.check_search_memory(self, initial_instruction, [*train, *heldout])  # raises if a step cannot fit
        rng = random.Random(cfg.seed)
        self.sampling_rng.manual_seed(cfg.seed)
        state = self._start(initial_instruction, heldout, saved, rng)
        resumed_at = state.next_step if saved is not None else None
        if saved is not None:
            logger.info("Resuming the GReaTer search from %s after step %d.", checkpoint, state.next_step)
        model_batch_size = self.lm.batch_size
        stopped_reason = "completed"
        try:
            for step in range(state.next_step, cfg.num_steps):
                record = self._step_with_backoff(step, state.instruction, state.position, train, rng, len(state.initial))
                state.instruction = record.pop("instruction_ids")
                record = StepRecord(**record)
                state.position = self._advance(state.instruction, state.position)
                if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.num_steps:
                    self._check_heldout(state, record, heldout)
                state.trace.append(record)
                state.next_step = step + 1
                if checkpoint is not None and (state.next_step % cfg.checkpoint_every == 0 or state.next_step == cfg.num_steps):
                    checkpoint_io.save_run(checkpoint, stamp, state, self._reasoning, rng, self.sampling_rng,
                                           state.elapsed + time.perf_counter() - started)
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
        return SearchResult.from_run(state, self.layout.instruction_text, stopped_reason=stopped_reason,
                                     seconds=state.elapsed + time.perf_counter() - started, resumed_at_step=resumed_at)

    def _start(self, initial_instruction: str, heldout: list[SearchExample], saved: dict | None,
               rng: random.Random) -> _RunState:
        """The state a run starts from: a checkpoint's (with its random states and reasoning), or the
        initial instruction scored on the held-out examples."""
        if saved is not None:
            state, reasoning = checkpoint_io.restore_run(saved, rng, self.sampling_rng)
            self._reasoning.update(reasoning)
            return state
        instruction = self.layout.encode_instruction(initial_instruction)
        if not instruction:
            raise ValueError("The initial instruction is empty; give at least one word.")
        return _RunState(instruction=instruction, initial=instruction,
                         seen={tuple(instruction): self.evaluate(instruction, heldout)})

    def _check_heldout(self, state: _RunState, record: StepRecord, heldout: list[SearchExample]) -> None:
        """Score the step's instruction on the held-out examples (once per instruction) into ``record``."""
        started = time.perf_counter()
        key = tuple(state.instruction)
        evaluation = state.seen.get(key) or self.evaluate(state.instruction, heldout)
        state.seen[key] = evaluation
        record.seconds["heldout"] = time.perf_counter() - started
        record.heldout_accuracy, record.heldout_loss = evaluation.accuracy, evaluation.mean_loss

    def _fingerprint(self, initial_instruction: str, train: list[SearchExample], heldout: list[SearchExample]) -> str:
        """What a checkpoint must match to be resumed by this run."""
        settings = {k: v for k, v in dataclasses.asdict(self.config).items()
                    if k not in ("num_steps", "checkpoint_every", "gradient_checkpointing")}
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

    def _step_with_backoff(self, step: int, instruction: list[int], position: int, train, rng: random.Random,
                           initial_length: int) -> dict:
        """One step; on out-of-memory, halve the model batch size and redo the step from the same random states."""
        state, sampling_state = rng.getstate(), self.sampling_rng.get_state()
        while True:
            try:
                return self._step(step, instruction, position, train, rng, initial_length)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are retried
                if not is_out_of_memory(exc) or self.lm.batch_size <= 1:
                    raise
                self.lm.batch_size = max(1, self.lm.batch_size // 2)
                self.lm.clear_context_cache()
                rng.setstate(state)
                self.sampling_rng.set_state(sampling_state)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                logger.warning("Out of memory at step %d; retrying with %d sequences per forward pass.",
                               step, self.lm.batch_size)

    # -- one step: propose -> reason -> gradient -> select ----------------------------------------------

    def _step(self, step: int, instruction: list[int], position: int, train: list[SearchExample], rng: random.Random,
              initial_length: int) -> dict:
        """One step at ``position``: the fields of its :class:`StepRecord`, and ``instruction_ids``,
        the instruction it leaves."""
        cfg = self.config
        seconds: dict[str, float] = {}
        batch = train if cfg.batch_size is None or cfg.batch_size >= len(train) else rng.sample(train, cfg.batch_size)
        with _timed(seconds, "propose"):
            prefix = self.prefix(instruction, position, batch) if cfg.prefix_cache else None
            instruction, candidates = self._candidates(instruction, position, batch, rng, prefix)
        current = instruction[position]
        with _timed(seconds, "generate"):
            reasoning = self.reasoning(instruction, batch, pool=train)
        with _timed(seconds, "gradient"):
            loss, grad, current_scores = self._gradient(instruction, position, candidates, batch, reasoning, prefix)
        with _timed(seconds, "select"):  # with any finalist's regenerated reasoning
            grad = _finite_gradient(step, loss, grad)
            finalists = self._finalists(candidates, grad, current, position, initial_length)
            challengers = [t for t in finalists if t != current]
            by_token = dict(zip(challengers, self._score_finalists(instruction, position, challengers, batch,
                                                                   reasoning, prefix)))
            by_token[current] = current_scores  # from the gradient pass (its reasoning is the current one)
            scored = [{"token": self.lm.token_texts[token], "token_id": token,
                       "gradient": float(grad[candidates.index(token)]), **self._summarize_scores(by_token[token])}
                      for token in finalists]
            winner = pick_winner(step, scored, cfg)
            instruction = self._round_trip(_with_token(instruction, position, winner["token_id"]))
        return dict(
            step=step,
            position=position,
            candidates=[self.lm.token_texts[c] for c in candidates],
            finalists=scored,
            chosen=winner["token"],
            changed=winner["token_id"] != current,
            loss=loss,
            instruction=self.layout.instruction_text(instruction),
            seconds=seconds,
            instruction_ids=instruction,
        )

    def _candidates(self, instruction: list[int], position: int, batch: list[SearchExample], rng: random.Random,
                    prefix: Prefix | None) -> tuple[list[int], list[int]]:
        """The step's instruction and candidates, the position's current token last. Past the end the
        instruction grows by one token that holds the new position during the step: the placeholder
        ``growth_token``, or else the most likely proposal (still ranked with all the others)."""
        candidates = self.propose(instruction, position, batch, rng, prefix)
        if position < len(instruction):
            return instruction, candidates
        if self._growth_id is not None:
            return [*instruction, self._growth_id], [*candidates, self._growth_id]
        return [*instruction, candidates[0]], [*candidates[1:], candidates[0]]

    def _gradient(self, instruction: list[int], position: int, candidates: list[int], batch: list[SearchExample],
                  reasoning: list[list[int]], prefix: Prefix | None) -> tuple[float, torch.Tensor, list[SequenceScore]]:
        """The loss, its one-hot gradient over ``candidates`` and the current instruction's scores,
        all from one pass.

        A kept token leaves the instruction and its reasoning as they are: the gradient at the next
        position is then already known for the examples this step runs (``reuse_gradients``).
        """
        cfg = self.config
        key = tuple(instruction)
        reuse = cfg.reuse_gradients and cfg.keep_current and prefix is not None
        current_scores: list[SequenceScore] = []
        kept_out: list[KeptGradient] = []
        loss, grad = self.lm.one_hot_gradient(
            self.sequences(instruction, batch, reasoning), position, candidates,
            answer_temperature=cfg.answer_temperature, fluency_weight=cfg.fluency_weight,
            scores_out=current_scores, prefix=prefix,
            kept=[self._kept_gradients.get((ex, key)) for ex in batch] if reuse else None,
            kept_out=kept_out if reuse else None, edited_fluency=cfg.edited_fluency,
            gradient_checkpointing=cfg.gradient_checkpointing, correct_among=self._correct_among(),
        )
        if reuse:
            self._kept_gradients = {k: g for k, g in self._kept_gradients.items() if k[1] == key}
            self._kept_gradients.update({(ex, key): g for ex, g in zip(batch, kept_out)})
        return loss, grad, current_scores

    def _finalists(self, candidates: list[int], grad: torch.Tensor, current: int, position: int,
                   initial_length: int) -> list[int]:
        """The candidates scored for real: those with the most negative gradient, by the step rules."""
        cfg = self.config
        ranked = [candidates[i] for i in torch.argsort(grad).tolist() if cfg.current_competes or candidates[i] != current]
        finalists = ranked[: cfg.num_finalists]
        if cfg.sentence_end_accept and position > initial_length / 2:
            ending = next((t for t in finalists if "." in self.layout.decode([t])), None)
            if ending is not None:  # ends the sentence: accepted without comparing it to the others
                finalists = [ending]
        if cfg.keep_current and current not in finalists:
            finalists = [*finalists, current]
        return finalists

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
        scores = self.lm.score(seqs, answer_temperature=self.config.answer_temperature, prefix=prefix, prefix_rows=rows,
                               correct_among=self._correct_among())
        n = len(examples)
        return [scores[k * n : (k + 1) * n] for k in range(len(finalists))]

    def _correct_among(self) -> list[int] | None:
        """The tokens a finalist's answers are judged correct among (``GreaterConfig.mistakes_over``)."""
        return self.choice_first_tokens() if self.config.mistakes_over == "choices" else None

    def _round_trip(self, instruction: list[int]) -> list[int]:
        """The ids of the instruction's text: an edit whose decoded text re-encodes differently (a
        token that merges with its neighbour) continues from the re-encoded ids, so that the ids
        scored are the text the target gets."""
        again = self.layout.encode_instruction(self.layout.instruction_text(instruction))
        return again if again else instruction

    def _advance(self, instruction: list[int], position: int) -> int:
        """Next position: the following token; past the end grow, or wrap after a full sentence."""
        position += 1
        if position < len(instruction):
            return position
        ends_sentence = self.layout.decode(instruction).rstrip().endswith(_SENTENCE_END)
        if ends_sentence or len(instruction) >= self.config.max_instruction_tokens:
            return 0
        return position


@contextlib.contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Records in ``seconds[phase]`` how long its block takes."""
    started = time.perf_counter()
    yield
    seconds[phase] = time.perf_counter() - started


def pick_winner(step: int, scored: list[dict], config: GreaterConfig) -> dict:
    """The best finalist with a finite score (see :func:`finalist_rank`)."""
    finite = [s for s in scored if math.isfinite(s["score"]) and math.isfinite(s["answer_loss"])]
    if not finite:
        raise FloatingPointError(f"Step {step}: every finalist scored NaN or infinity; the optimizer model's "
                                 "outputs are not finite (try dtype='float32').")
    if len(finite) < len(scored):
        logger.warning("Step %d: skipping finalists with a non-finite score: %s", step,
                       [s["token"] for s in scored if s not in finite])
    return min(finite, key=lambda s: finalist_rank(s, config))


def finalist_rank(scored: dict, config: GreaterConfig) -> tuple[float, float]:
    """A scored finalist's rank, lower is better (see ``GreaterConfig.finalist_key``)."""
    if config.finalist_key == "loss":
        return (scored["mistake_rate"], scored["answer_loss"] + config.score_fluency_weight * scored["fluency"])
    return (scored["score"], scored["answer_loss"])


def _finite_gradient(step: int, loss: float, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` with any non-finite entry set to +inf, so that its candidate ranks last."""
    if math.isfinite(loss) and torch.isfinite(grad).all():
        return grad
    logger.warning("Step %d: the loss (%s) or part of its gradient is not finite; candidates with a "
                   "non-finite gradient are ranked last.", step, loss)
    return torch.nan_to_num(grad, nan=math.inf, posinf=math.inf, neginf=math.inf)


def _with_token(instruction: list[int], position: int, token: int) -> list[int]:
    """``instruction`` with ``token`` at ``position``."""
    return [*instruction[:position], token, *instruction[position + 1 :]]


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an accelerator or host out-of-memory error."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
