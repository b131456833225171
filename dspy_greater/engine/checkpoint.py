"""Atomic JSON checkpoints of a search, so an interrupted run resumes where it stopped.

A checkpoint is plain JSON (no pickle): the search state after the last completed step, the
random-number states and a fingerprint of everything that must match for a resume to be exact
(data, configuration, model, layout, initial instruction). Files are replaced atomically, so a
crash while writing leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any

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
