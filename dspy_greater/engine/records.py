"""Plain data of a search: its examples, evaluations, step records, run state and result."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field


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

    def to_dict(self) -> dict:
        """Accuracy, mean answer loss and the predictions, as plain data."""
        return {"accuracy": self.accuracy, "mean_loss": self.mean_loss, "predictions": list(self.predictions)}


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
    """What a run carries from step to step (and what a checkpoint holds, with the random states)."""

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

    @classmethod
    def from_run(cls, state: _RunState, text: Callable[[list[int]], str], **outcome) -> SearchResult:
        """The result of a run that ends in ``state``; ``text`` decodes instructions, ``outcome`` gives
        ``stopped_reason``, ``seconds`` and ``resumed_at_step``."""
        # Highest (accuracy, -loss) first; ties keep the order found, so the earliest best wins.
        ranked = sorted(state.seen.items(), key=lambda kv: kv[1].key(), reverse=True)
        return cls(
            initial_instruction=text(state.initial),
            best_instruction=text(list(ranked[0][0])),
            final_instruction=state.trace[-1].instruction if state.trace else text(state.initial),
            initial_heldout=state.seen[tuple(state.initial)].to_dict(),
            best_heldout=ranked[0][1].to_dict(),
            top_instructions=[{"instruction": text(list(ids)), **ev.to_dict()} for ids, ev in ranked[:10]],
            trace=state.trace,
            **outcome,
        )

