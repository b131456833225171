"""The search's hyper-parameters: :class:`GreaterConfig`, with the paper's protocol as :meth:`GreaterConfig.faithful`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class GreaterConfig:
    """Hyper-parameters of the search. Defaults are our fast CPU setting; the paper's value is
    given for each where it differs, and :meth:`faithful` returns the paper's protocol.

    Where the default step deviates from the authors' research code, and the switch that restores
    their behaviour (all set by :meth:`faithful`):

    - a random minibatch of examples per step instead of all of them: ``batch_size=None``;
    - finalists scored on the current reasoning, not each on its own regenerated reasoning:
      ``finalist_scoring="regenerate"``;
    - the current token excluded from the finalists, instead of an ordinary candidate that can
      be one (and win): ``current_competes=True``;
    - no early acceptance of a sentence end: ``sentence_end_accept=True``;
    - growth past the end puts the most likely proposal at the new position, instead of a
      placeholder the next step replaces: ``growth_token="!"``;
    - the gradient's fluency term includes the edited token's own log-probability, where the
      authors' code scores the old token there: ``edited_fluency=False``;
    - reasoning bounded at 48 tokens instead of 1024: ``max_reasoning_tokens=1024``;
    - the held-out check every 5 steps, instead of a dev-set pick from a logged top-10 (code
      not published): ``eval_every=1``;
    - a prefix key/value cache (same results up to float rounding): ``prefix_cache=False`` for
      the authors' cost.

    Kept from the paper in every mode: the proposal rules (top-k, intersections, banned tokens),
    the loss (answer cross-entropy at temperature 0.2 plus 0.2 x fluency) and the finalist score.
    Not reproduced on purpose: the prompt re-tokenized from its decoded text with positions left
    to drift (here an edit whose text re-encodes differently continues from the re-encoded ids,
    so the ids scored are the text shipped), and the other quirks listed in the design notes.

    Attributes:
        num_steps: Optimization steps (one instruction position each). Paper: ~100-125.
        batch_size: Training examples used per step, drawn at random; ``None`` uses all of them
            every step. Paper: all (50).
        topk: Top-k next tokens per example when proposing. Paper: 11 (README), 40 (scripts).
        intersect_q: Random example subsets whose top-k sets are intersected; the candidates are
            the union of those intersections. Paper: 6.
        intersect_size: Examples per intersected subset. Paper: 5.
        min_candidates: Fewer surviving candidates than this makes ``topk`` grow. Paper: 6.
        topk_growth: How much ``topk`` grows per retry. Paper: 2.
        num_finalists: Candidates with the most negative gradient that are actually scored. Paper: 3.
        fluency_weight: Weight of the instruction's own NLL in the gradient loss. Paper: 0.2.
        score_fluency_weight: Weight of the instruction NLL in the finalist score. Paper: 0.02.
        answer_temperature: Logits are divided by this in the answer loss (sharpens it). Paper: 0.2.
        max_reasoning_tokens: Length bound of the generated reasoning. Paper: 1024.
        reasoning_temperature: 0 is greedy (paper's research code); the authors' library samples at 0.2.
            Sampled reasoning is drawn from a generator seeded with ``seed``.
        finalist_scoring: ``"regenerate"`` regenerates the reasoning under every finalist before
            scoring it (paper); ``"teacher_forced"`` scores finalists on the current reasoning and
            regenerates only for the winner, which the next step needs anyway.
        keep_current: Also score the current token and keep it if no finalist beats it. Off, as in
            the paper: the best finalist always replaces it (chosen by the protocol in
            benchmarks/README.md, section 5).
        current_competes: The current token is an ordinary candidate: it is a finalist when its
            gradient ranks among the ``num_finalists`` best, and then can win (paper). Otherwise
            the finalists are other tokens (and ``keep_current`` decides whether it is scored).
        sentence_end_accept: A finalist whose text contains "." at a position past half the
            initial instruction's length is accepted at once, unscored against the others (paper).
        growth_token: How the instruction grows past its end. ``None``: the most likely proposal
            holds the new position while the gradient ranks all of them. A text (one token, e.g.
            "!"): that placeholder is appended and competes like any current token (paper).
        edited_fluency: Whether the gradient's fluency term includes the edited token's own
            log-probability (a direct pull towards readable tokens). ``False``: the old token is
            scored there, so the term sees only a candidate's effect on the tokens after it (paper).
        finalist_key: How finalists (and the current token) are ranked. ``"score"`` (paper): mistake
            rate + ``score_fluency_weight`` x instruction NLL, ties broken by the answer loss. With
            a few examples per step the mistake rate moves in coarse steps, so the fluency term
            decides nearly every comparison and the current (fluent) token is almost never beaten.
            ``"loss"``: mistake rate first, then answer loss + ``score_fluency_weight`` x
            instruction NLL, so a token that makes the gold answers more likely without adding a
            mistake wins.
        mistakes_over: What a finalist's mistake rate counts. ``"vocabulary"`` (paper): an answer is
            right when each of its tokens is the model's most likely token of the whole vocabulary
            there. ``"choices"``: for a closed answer space whose choices start with different
            tokens, when the gold answer's first token is the most likely of the choices' (the
            answer the held-out check reads); other answer spaces count as ``"vocabulary"``. After
            short reasoning a small model rarely puts an answer token first at all, so the paper's
            count is then all mistakes and only the fluency term tells finalists apart.
        max_instruction_tokens: The instruction stops growing at this length (then wraps to 0).
        eval_every: Score the instruction on the held-out examples every this many steps (and at
            the end); the best held-out instruction is returned. Paper: picked offline from a top-10.
        allowed_tokens: ``"words"`` allows ASCII letters and spaces plus "." and "," (paper);
            ``"whole_words"`` those, where each new token is a whole word: space-led (or "." and
            ","), or at the first position a token the tokenizer also holds as a space-led word;
            never a piece glued onto the word before (no "ermat", no "ermatys"). ``"ascii"`` any
            printable ASCII; ``"all"`` every non-special token.
        model_batch_size: Sequences per forward pass or generation batch (memory knob). Halved
            automatically, and the step retried, when a step runs out of memory.
        checkpoint_every: With a checkpoint file, rewrite it every this many steps (and at the end).
        prefix_cache: Run each example's inputs and the instruction up to the edited position
            once per step, and reuse that key/value cache for the proposals, the gradient and every
            finalist's scoring. Same results (to float rounding), for less compute per step.
        reuse_gradients: With ``prefix_cache`` and ``keep_current``, keep each example's gradient
            pass for the later positions of the same instruction: its backward pass already holds
            them (see :class:`~dspy_greater.engine.gradient.KeptGradient`), so after a step that kept the
            current token the next gradient runs only for examples not yet seen under it. Same
            results up to float rounding.
        inputs_cache_mb: With ``prefix_cache``, memory for the examples' inputs' key/value caches
            kept across steps, so a step runs only the instruction part of each prefix (least
            recently used dropped first; ``0`` keeps none). Like ``model_batch_size``, it is given
            to the :class:`~dspy_greater.engine.model.OptimizerLM` the teleprompter builds.
        answer_tokens: Tokens generated after the extractor when free-form answers are evaluated.
        seed: Seed of the search's own random generators (the examples drawn per step, the
            intersected subsets, sampled reasoning); the search never touches the global random state.
        gradient_checkpointing: The gradient pass keeps only each decoder layer's input and
            recomputes the layer's activations in its backward pass (transformers' activation
            checkpointing): far less memory for long reasoning, for about one more forward pass. The
            pass then runs whole sequences, without the ``prefix_cache`` (a recomputed layer would
            extend the cache twice); ``reuse_gradients`` still applies. The search estimates a step's
            memory before its first step and stops early when a CUDA device cannot hold it even at one
            sequence per forward pass. Paper: n/a (memory only; same gradient). Not part of a
            checkpoint file's fingerprint, so an interrupted run may resume with it switched on.
    """

    num_steps: int = 10
    batch_size: int | None = 6
    topk: int = 11
    intersect_q: int = 6
    intersect_size: int = 5
    min_candidates: int = 6
    topk_growth: int = 2
    num_finalists: int = 3
    fluency_weight: float = 0.2
    score_fluency_weight: float = 0.02
    answer_temperature: float = 0.2
    max_reasoning_tokens: int = 48
    reasoning_temperature: float = 0.0
    finalist_scoring: str = "teacher_forced"
    keep_current: bool = False
    current_competes: bool = False
    sentence_end_accept: bool = False
    growth_token: str | None = None
    edited_fluency: bool = True
    finalist_key: str = "score"
    mistakes_over: str = "vocabulary"
    max_instruction_tokens: int = 48
    eval_every: int = 5
    allowed_tokens: str = "words"
    model_batch_size: int = 8
    prefix_cache: bool = True
    reuse_gradients: bool = True
    inputs_cache_mb: float = 512
    checkpoint_every: int = 1
    answer_tokens: int = 8
    seed: int = 0
    gradient_checkpointing: bool = False

    def __post_init__(self):
        self.validate()

    @classmethod
    def faithful(cls, **overrides) -> GreaterConfig:
        """The paper's protocol step for step (expensive: all examples every step, long reasoning
        regenerated under every finalist)."""
        paper = dict(
            num_steps=100, batch_size=None, max_reasoning_tokens=1024, finalist_scoring="regenerate",
            keep_current=False, current_competes=True, sentence_end_accept=True, growth_token="!",
            edited_fluency=False, eval_every=1,
        )
        return cls(**{**paper, **overrides})

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def validate(self) -> None:
        positive = ["num_steps", "topk", "intersect_q", "intersect_size", "min_candidates", "num_finalists",
                    "max_reasoning_tokens", "max_instruction_tokens", "eval_every", "model_batch_size", "checkpoint_every",
                    "answer_tokens"]
        for name in [*positive, "topk_growth"]:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GreaterConfig.{name} must be a positive integer, got {value!r}.")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"GreaterConfig.batch_size must be a positive integer or None, got {self.batch_size!r}.")
        if isinstance(self.inputs_cache_mb, bool) or not isinstance(self.inputs_cache_mb, (int, float)) or not (
                0 <= self.inputs_cache_mb < math.inf):
            raise ValueError(f"GreaterConfig.inputs_cache_mb must be a number of megabytes >= 0 (0 turns the "
                             f"store off), got {self.inputs_cache_mb!r}.")
        for name in ("fluency_weight", "score_fluency_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"GreaterConfig.{name} must be >= 0 (the paper uses 0.2 and 0.02).")
        if self.answer_temperature <= 0:
            raise ValueError("GreaterConfig.answer_temperature must be > 0 (the paper uses 0.2).")
        if self.reasoning_temperature < 0:
            raise ValueError("GreaterConfig.reasoning_temperature must be >= 0 (0 is greedy decoding).")
        if self.finalist_scoring not in ("regenerate", "teacher_forced"):
            raise ValueError(f"GreaterConfig.finalist_scoring must be 'regenerate' or 'teacher_forced', "
                             f"got {self.finalist_scoring!r}.")
        if self.mistakes_over not in ("vocabulary", "choices"):
            raise ValueError(f"GreaterConfig.mistakes_over must be 'vocabulary' or 'choices', got {self.mistakes_over!r}.")
        if self.finalist_key not in ("score", "loss"):
            raise ValueError(f"GreaterConfig.finalist_key must be 'score' or 'loss', got {self.finalist_key!r}.")
        if self.growth_token is not None and (not isinstance(self.growth_token, str) or not self.growth_token):
            raise ValueError(f"GreaterConfig.growth_token must be None or a non-empty text, got {self.growth_token!r}.")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"GreaterConfig.gradient_checkpointing must be True or False, got {self.gradient_checkpointing!r}.")
        if self.allowed_tokens not in ("words", "whole_words", "ascii", "all"):
            raise ValueError("GreaterConfig.allowed_tokens must be 'words', 'whole_words', 'ascii' or 'all', "
                             f"got {self.allowed_tokens!r}.")
