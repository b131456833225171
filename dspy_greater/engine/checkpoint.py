"""Atomic JSON checkpoints of a search, so an interrupted run resumes where it stopped.

A checkpoint is plain JSON (no pickle): the search state after the last completed step, the
states of the search's random generators and a fingerprint of everything that must match for a
resume to be exact (data, configuration, model, layout, initial instruction). Files are replaced
atomically, so a crash while writing leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import random
import tempfile
from typing import Any

import torch

from dspy_greater.engine.records import Evaluation, StepRecord, _RunState

FORMAT = "dspy_greater.engine.checkpoint/1"


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk belongs to a different run."""


def fingerprint(parts: dict[str, Any]) -> str:
    """A stable hash of JSON-serialisable ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def save(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike, expected_fingerprint: str) -> dict[str, Any] | None:
    """The state saved at ``path``; ``None`` when there is no file yet.

    Raises:
        CheckpointMismatchError: The file is not a dspy_greater checkpoint, or was written for
            other data, settings, model or initial instruction.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointMismatchError(
            f"{path} is not a readable dspy_greater checkpoint ({exc}); delete it to start afresh.") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path} is not a {FORMAT} file; delete it or choose another checkpoint path.")
    if state.get("fingerprint") != expected_fingerprint:
        raise CheckpointMismatchError(
            f"The checkpoint {path} was written for a different run (other examples, settings, optimizer model "
            "or initial instruction). Delete it to start afresh, or pass another checkpoint directory.")
    return state


def save_run(
    path: str | os.PathLike, stamp: str, state: _RunState, reasoning: dict[tuple[str, tuple[int, ...]], list[int]],
    rng: random.Random, sampling_rng: torch.Generator, elapsed: float,
) -> None:
    """Save a run after its last completed step: its state, the reasoning generated so far (keyed by
    ``(inputs_text, instruction ids)``), the states of its random generators and ``elapsed`` seconds."""
    version, internal, gauss = rng.getstate()
    save(path, {
        "fingerprint": stamp,
        "next_step": state.next_step,
        "position": state.position,
        "instruction": state.instruction,
        "initial": state.initial,
        "seen": [{"ids": list(ids), "predictions": ev.predictions, "labels": ev.labels, "mean_loss": ev.mean_loss}
                 for ids, ev in state.seen.items()],
        "trace": [dataclasses.asdict(r) for r in state.trace],
        "reasoning": [[text, list(ids), out] for (text, ids), out in reasoning.items()],
        "python_rng": [version, list(internal), gauss],
        "torch_rng": sampling_rng.get_state().tolist(),
        "elapsed": elapsed,
    })


def restore_run(
    saved: dict[str, Any], rng: random.Random, sampling_rng: torch.Generator
) -> tuple[_RunState, dict[tuple[str, tuple[int, ...]], list[int]]]:
    """The run state and reasoning of a checkpoint from :func:`load`; ``rng`` and ``sampling_rng``
    are set to their saved states."""
    version, internal, gauss = saved["python_rng"]
    rng.setstate((version, tuple(internal), gauss))
    sampling_rng.set_state(torch.tensor(saved["torch_rng"], dtype=torch.uint8))
    state = _RunState(
        instruction=saved["instruction"],
        initial=saved["initial"],
        seen={tuple(e["ids"]): Evaluation(e["predictions"], e["labels"], e["mean_loss"]) for e in saved["seen"]},
        position=saved["position"],
        next_step=saved["next_step"],
        trace=[StepRecord(**r) for r in saved["trace"]],
        elapsed=saved["elapsed"],
    )
    return state, {(text, tuple(ids)): out for text, ids, out in saved["reasoning"]}
