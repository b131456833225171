"""Where the search starts: the predictor's own instruction, or one that asks for reasoning.

GReaTer takes its gradient *through the optimizer model's reasoning*. Under the instruction DSPy
writes for a signature ("Given the fields `question`, produce the fields `answer`.") a small model
answers at once, so there is no reasoning to take a gradient through. The paper starts from an
instruction that asks for reasoning; for a predictor whose instruction DSPy generated, the search
in GReaTer's layout starts from that instruction, worded for the predictor's output field. The
program's own instruction stays the baseline the result must not fall below.
"""

from __future__ import annotations

import re

# ``initial_instruction=PROGRAM_INSTRUCTION`` starts every predictor from its own instruction.
PROGRAM_INSTRUCTION = "program"

_REASONING_START = "Use proper logical reasoning and think step by step. Finally give the actual correct {what}."


def is_generated_instruction(signature, reasoning_fields: tuple[str, ...] = ("reasoning", "rationale")) -> bool:
    """Whether ``signature``'s instruction is the one DSPy writes when none is given.

    ``dspy.ChainOfThought`` adds a reasoning output field but keeps the instruction generated for
    the signature without it, so both forms count.
    """
    inputs = ", ".join(f"`{name}`" for name in signature.input_fields)
    outputs = list(signature.output_fields)
    answers = [name for name in outputs if name not in reasoning_fields]
    text = (signature.instructions or "").strip()
    return any(text == f"Given the fields {inputs}, produce the fields {', '.join(f'`{n}`' for n in fields)}."
               for fields in (outputs, answers))


def reasoning_instruction(output_field: str) -> str:
    """The paper's starting instruction, asking for the predictor's output field by name."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", output_field)
    words = re.sub(r"[_\-\s]+", " ", words).strip().lower() or "answer"
    return _REASONING_START.format(what=words)
