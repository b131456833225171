"""How instruction, inputs, reasoning, extractor and answer become one token sequence.

The "greater" layout follows the paper: one user turn holding the example's inputs and then the
instruction (so the optimizer model's proposals for the instruction are conditioned on the task),
then the assistant turn holding the model's own reasoning, the answer extractor and the answer.

Every piece is tokenized on its own and the ids are concatenated, so the instruction is a plain
list of token ids that the search edits one position at a time, and spans are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from dspy_greater.formats import PLAIN_ANSWER_CUE, SEPARATOR

_SENTINEL = "\u2063GREATER_INSTRUCTION\u2063"


@dataclass(frozen=True)
class Sequence:
    """One token sequence with the spans the search needs.

    Attributes:
        ids: All token ids.
        instruction_start: Index of the first instruction token.
        instruction_end: Index one past the last instruction token.
        answer_start: Index of the first scored answer token (== len(ids) when there is no answer).
    """

    ids: list[int]
    instruction_start: int
    instruction_end: int
    answer_start: int

    @property
    def answer_end(self) -> int:
        return len(self.ids)


class GreaterLayout:
    """The paper's layout: ``[user: inputs \\n\\n instruction] [assistant: reasoning extractor answer]``.

    Uses the tokenizer's chat template when it has one; a base model without a template gets a
    plain-text frame (``inputs \\n\\n instruction \\n\\n Answer:``).

    Args:
        tokenizer: The optimizer model's tokenizer.
        separator: Text between the inputs and the instruction.
    """

    name = "greater"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, separator: str = SEPARATOR):
        self.tokenizer = tokenizer
        self.separator = separator
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._context_cache: dict[str, tuple[list[int], list[int]]] = {}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` alone, without special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def instruction_text(self, ids: list[int]) -> str:
        """The instruction as text (DSPy strips instructions, so surrounding spaces are dropped)."""
        return self.decode(ids).strip()

    def frame(self, inputs_text: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the instruction for one example's inputs."""
        cached = self._context_cache.get(inputs_text)
        if cached is not None:
            return cached
        if self.has_chat_template:
            content = f"{inputs_text}{self.separator}{_SENTINEL}"
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            before, after = text.split(_SENTINEL)
        else:
            before, after = f"{inputs_text}{self.separator}", PLAIN_ANSWER_CUE
        bos = self.tokenizer.bos_token
        before_ids = self.encode(before)
        if not self.has_chat_template and bos and self.tokenizer.bos_token_id is not None:
            before_ids = [self.tokenizer.bos_token_id, *before_ids]
        framed = (before_ids, self.encode(after))
        self._context_cache[inputs_text] = framed
        return framed

    def prompt(self, inputs_text: str, instruction: list[int]) -> Sequence:
        """The sequence a generation of reasoning starts from."""
        before, after = self.frame(inputs_text)
        ids = [*before, *instruction, *after]
        return Sequence(ids, len(before), len(before) + len(instruction), len(ids))

    def full(
        self,
        inputs_text: str,
        instruction: list[int],
        reasoning: list[int],
        extractor: list[int],
        answer: list[int],
    ) -> Sequence:
        """Prompt + reasoning + extractor + answer; the answer tokens are the scored span."""
        head = self.prompt(inputs_text, instruction)
        body = [*head.ids, *reasoning, *extractor]
        return Sequence([*body, *answer], head.instruction_start, head.instruction_end, len(body))
