"""Text pieces shared by the optimizer's layout and the adapter that replays it on a target LM.

Kept in one light module (no torch, no DSPy) so that the engine's ``GreaterLayout`` and the target
side's ``GReaTerAdapter`` cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Between the example's inputs and the instruction (both layouts).
SEPARATOR = "\n\n"

#: After the instruction, in the plain-text layout used for models without a chat template:
#: ``inputs + SEPARATOR + instruction + PLAIN_ANSWER_CUE``, then the model's reasoning.
PLAIN_ANSWER_CUE = "\n\nAnswer:"

#: Output fields that hold reasoning rather than an answer (``dspy.ChainOfThought`` adds ``reasoning``).
REASONING_FIELDS = ("reasoning", "rationale")


def format_inputs(names: Sequence[str], values: Mapping[str, Any]) -> str:
    """The inputs as one text: the value alone for one input field, else ``Name: value`` lines."""
    names = list(names)
    if len(names) == 1:
        return str(values[names[0]])
    return "\n".join(f"{name.replace('_', ' ').strip().capitalize()}: {values[name]}" for name in names)
