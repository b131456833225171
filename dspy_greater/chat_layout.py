"""The ``"chat_adapter"`` layout: the sequences DSPy's ``ChatAdapter`` (and its subclasses) send and parse.

It renders DSPy's own adapter, so it lives on the DSPy side; the engine sees it as any other layout
(:class:`~dspy_greater.engine.layout.GreaterLayout`'s interface).
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from typing import Any

import dspy
from dspy.adapters.chat_adapter import field_header_pattern
from transformers import PreTrainedTokenizerBase

from dspy_greater.engine.layout import SENTINEL, GreaterLayout
from dspy_greater.engine.text import REASONING_FIELDS, SEPARATOR

logger = logging.getLogger(__name__)

#: Layout names accepted by ``GReaTerTeleprompter(layout=...)`` (``"auto"`` picks one of the others).
LAYOUTS = ("auto", "greater", "chat_adapter")


class ChatAdapterLayout(GreaterLayout):
    """DSPy's ``ChatAdapter`` messages, rendered through the optimizer tokenizer's chat template.

    The sequence is exactly what a chat target sees and writes when the program runs with
    ``ChatAdapter``::

        [system: field descriptions, structure, "... your objective is: \n        <instruction>"]
        [user:   "[[ ## question ## ]]\n<inputs> ... Respond with the corresponding output fields ..."]
        [assistant: "[[ ## reasoning ## ]]\n" <reasoning> "\n\n[[ ## answer ## ]]\n" <label>]

    Messages come from ``adapter.format(signature, demos=[], inputs)`` at run time (nothing is
    copied from DSPy's templates). The instruction's place is found by rendering a sentinel
    instruction and splitting, as in :class:`GreaterLayout`; ChatAdapter indents every
    instruction line by 8 spaces, so the instruction's ids are those of its rendered (indented)
    text and :meth:`instruction_text` undoes the indent. The reasoning is generated after the
    reasoning marker and ends before the next ``[[ ##`` marker; the extractor is the answer
    field's marker and the answer is the label. A signature without a reasoning field before the
    scored output (``dspy.Predict``) has no reasoning: the reply starts with the answer marker.

    ``JSONAdapter`` and ``XMLAdapter`` (both ChatAdapter subclasses) are laid out the same way with
    their own system and user messages and replies; the reasoning then ends at the text that
    separates it from the answer (``",`` in JSON, ``</reasoning>`` in XML).

    A template that refuses a system message gets it merged into the user turn (system text, a
    blank line, user text); a tokenizer without a chat template gets the prompt DSPy sends a
    text-completion model (messages joined by blank lines, then ``BEGIN RESPONSE:``), a newline
    and the reply.

    Proposals: the instruction sits in the system message *before* the inputs, so its next-token
    distribution there never sees the example. Proposals are read instead from the paper's
    context, ``[user: inputs \n\n instruction-prefix]``, with the inputs as ChatAdapter writes
    them (their ``[[ ## field ## ]]`` sections, without the output-format reminder), so they stay
    conditioned on the task; gradients and scores use the ChatAdapter sequence. The search's
    prefix cache then serves the gradient and the scoring, and the proposals get a forward pass
    of their own (``proposals_share_prefix = False``).

    Args:
        tokenizer: The optimizer model's tokenizer.
        signature: The predictor's signature (its instruction is replaced by the search's).
        output_field: The output field whose value is the label; default: the first output field
            that is not ``reasoning``/``rationale``.
        adapter: A ``dspy.ChatAdapter`` or a subclass: ``JSONAdapter`` (reply ``{"reasoning": "...",
            "answer": "<label>`` ..., text answers only) and ``XMLAdapter`` (``<reasoning>...</reasoning>
            <answer><label>``) are modelled from their own ``format_assistant_message_content``;
            default ``ChatAdapter()``.
        separator: Between the inputs and the instruction prefix in the proposals' context.
    """

    name = "chat_adapter"
    proposals_share_prefix = False

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        signature: Any,
        output_field: str | None = None,
        adapter: Any = None,
        separator: str = SEPARATOR,
    ):
        super().__init__(tokenizer, separator)
        adapter = dspy.ChatAdapter() if adapter is None else adapter
        if not isinstance(adapter, dspy.ChatAdapter):
            raise TypeError(f"ChatAdapterLayout needs a dspy.ChatAdapter, got {type(adapter).__name__}.")
        self.adapter = adapter
        self.signature = signature
        outputs = list(signature.output_fields)
        if output_field is None:
            output_field = next((k for k in outputs if k not in REASONING_FIELDS), None)
        if output_field not in outputs:
            raise ValueError(f"The signature has no output field {output_field!r} to score (outputs: {outputs}).")
        self.output_field = output_field
        reasoning = next((k for k in outputs[: outputs.index(output_field)] if k in REASONING_FIELDS), None)
        self.reasons = reasoning is not None
        self._paper = GreaterLayout(tokenizer, separator)  # the proposals' context

        self._base = signature.with_instructions(SENTINEL)
        messages = adapter.format(self._base, demos=[], inputs={})
        if messages[0]["role"] != "system" or SENTINEL not in messages[0]["content"]:
            raise ValueError(f"{type(adapter).__name__}.format did not put the instruction in a system message.")
        self._system = messages[0]["content"]
        # The user message for no inputs: the output-format reminder that ends every user message.
        self._user_tail = messages[1]["content"] if len(messages) > 1 and messages[1]["role"] == "user" else ""

        description = adapter.format_task_description(self._base)
        self._task_head = description.split(SENTINEL)[0]
        two_lines = adapter.format_task_description(signature.with_instructions(f"{SENTINEL}\n{SENTINEL}"))
        self._line_joiner = two_lines.split(SENTINEL)[1]  # "\n" + 8 spaces in DSPy 3.4

        values = {k: f"GREATERVALUE{i}END" for i, k in enumerate(outputs)}
        reply = adapter.format_assistant_message_content(signature, values)
        answer_at = reply.index(values[output_field])
        if self.reasons:
            start = reply.index(values[reasoning])
            self.opening = reply[:start]  # "[[ ## reasoning ## ]]\n"
            self.extractor_text = reply[start + len(values[reasoning]) : answer_at]  # "\n\n[[ ## answer ## ]]\n"
        else:
            self.opening, self.extractor_text = "", reply[:answer_at]  # "[[ ## answer ## ]]\n"
        if field_header_pattern.search(self.extractor_text):
            self.stop_strings = ("[[ ##",)  # any next field marker ends the reasoning
        else:
            # JSONAdapter ('",\n  "answer": "') or XMLAdapter ('\n</reasoning>\n\n<answer>\n'): the reasoning
            # ends where the text between the two values begins.
            if reply.lstrip().startswith("{") and not _is_str_field(signature.output_fields[output_field].annotation):
                raise TypeError(f"{type(adapter).__name__} writes the non-text field {output_field!r} as a bare JSON "
                                "value; only text (str / Literal) answers are modelled in its replies.")
            closing = self.extractor_text.strip().split("\n")[0]
            if self.reasons and not closing:
                raise TypeError(f"{type(adapter).__name__} puts nothing between the reasoning and the answer; "
                                "cannot tell where the reasoning ends.")
            self.stop_strings = (closing,) if self.reasons else ()
        self.system_role = self.has_chat_template and self._template_keeps_system()

    # -- texts ---------------------------------------------------------------------------------------

    def inputs_text(self, values: dict) -> str:
        """The user message ChatAdapter writes for these input values (the search's ``inputs_text``)."""
        content = self.adapter.format(self._base, demos=[], inputs=dict(values))[-1]["content"]
        if not isinstance(content, str):
            raise TypeError("ChatAdapter formatted these inputs into a multi-part message; GReaTer handles text only.")
        return content

    def messages(self, inputs_text: str, instruction: str) -> list[dict]:
        """The chat messages for one example and instruction, as ChatAdapter formats them."""
        return [{"role": "system", "content": self._system.replace(SENTINEL, instruction)},
                {"role": "user", "content": inputs_text}]

    def encode_instruction(self, text: str) -> list[int]:
        """Ids of the instruction as ChatAdapter renders it (every line after the first indented)."""
        rendered = self.adapter.format_task_description(self.signature.with_instructions(text))
        if not rendered.startswith(self._task_head):
            raise ValueError("ChatAdapter rendered this instruction unexpectedly; cannot locate its tokens.")
        return self.encode(rendered[len(self._task_head) :])

    def instruction_text(self, ids: list[int]) -> str:
        """The instruction as text, with ChatAdapter's line indent removed."""
        return self.decode(ids).replace(self._line_joiner, "\n").strip()

    def search_extractor(self, extractor):
        """The task's extractor with the answer field's marker as its text (the label follows it)."""
        return dataclasses.replace(extractor, text=self.extractor_text)

    # -- sequences -----------------------------------------------------------------------------------

    def _template_keeps_system(self) -> bool:
        probe = [{"role": "system", "content": SENTINEL}, {"role": "user", "content": "x"}]
        try:
            text = self.tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - templates raise their own errors for an unsupported role
            return False
        return SENTINEL in text

    def frame(self, inputs_text: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the instruction (the reply's opening marker included)."""
        cached = self._context_cache.get(inputs_text)
        if cached is not None:
            return cached
        system, user = (m["content"] for m in self.messages(inputs_text, SENTINEL))
        if self.has_chat_template:
            turns = ([{"role": "system", "content": system}, {"role": "user", "content": user}] if self.system_role
                     else [{"role": "user", "content": f"{system}\n\n{user}" if user else system}])
            text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n\n".join([system, *([user] if user else []), "BEGIN RESPONSE:"]) + "\n"
        before, after = text.split(SENTINEL)
        framed = (self.encode_start(before), self.encode(after + self.opening))
        self._context_cache[inputs_text] = framed
        return framed

    def finish_reasoning(self, ids: list[int]) -> list[int]:
        """Generated reasoning cut before the first ``[[ ##`` marker, trailing whitespace dropped."""
        text = self.decode(ids)
        cut = min([i for i in (text.find(s) for s in self.stop_strings) if i >= 0], default=len(text))
        keep = text[:cut].rstrip()
        if keep == text:
            return ids
        for k in range(len(ids), -1, -1):
            piece = self.decode(ids[:k])
            if piece == keep:
                return list(ids[:k])
            if len(piece) < len(keep):
                break
        return self.encode(keep)  # a token straddled the cut: re-encode the kept text

    def proposal_context(self, inputs_text: str, instruction_prefix: list[int]) -> list[int]:
        """``[user: inputs \n\n instruction-prefix]``: the paper's context, with ChatAdapter's input sections."""
        block = inputs_text
        if self._user_tail and block.endswith(self._user_tail):
            block = block[: -len(self._user_tail)].rstrip()
        return [*self._paper.frame(block)[0], *instruction_prefix]


def make_layout(name: str, tokenizer: PreTrainedTokenizerBase, *, signature: Any = None,
                output_field: str | None = None, adapter: Any = None) -> GreaterLayout:
    """The layout called ``name`` (``"greater"`` or ``"chat_adapter"``) for one predictor."""
    if name == "greater":
        return GreaterLayout(tokenizer)
    if name == "chat_adapter":
        if signature is None:
            raise ValueError("The chat_adapter layout needs the predictor's signature.")
        return ChatAdapterLayout(tokenizer, signature, output_field=output_field, adapter=adapter)
    raise ValueError(f"Unknown layout {name!r}; expected 'greater' or 'chat_adapter'.")


def _is_str_field(annotation: Any) -> bool:
    """Whether a field's values are JSON strings: ``str`` or a ``Literal`` of strings."""
    if annotation is str:
        return True
    return typing.get_origin(annotation) is typing.Literal and all(isinstance(a, str) for a in typing.get_args(annotation))


def choose_layout(option: str, tokenizer: PreTrainedTokenizerBase, signature: Any, output_field: str, *,
                  extractor_given: bool = False) -> tuple[GreaterLayout, dict]:
    """The layout to search one predictor in, from ``layout=`` and the adapter the program will run with.

    ``"auto"``: ``dspy.settings.adapter`` decides. A ``ChatAdapter`` -> the chat_adapter layout
    with that adapter (``JSONAdapter`` and ``XMLAdapter`` included: their own messages and replies;
    an adapter whose replies cannot be modelled, such as ``JSONAdapter`` with a non-text answer,
    gets a plain ``ChatAdapter``'s, the nearest ones); ``GReaTerAdapter``, another adapter, or
    none -> the paper's layout (what ``GReaTerAdapter`` replays on small targets; set
    ``layout="chat_adapter"`` for a program that will run with DSPy's default ``ChatAdapter``).

    Returns:
        ``(layout, {"name", "adapter", "reason"})``.
    """
    adapter = dspy.settings.adapter
    configured = type(adapter).__name__ if adapter is not None else None
    if option == "greater" or (option == "auto" and not isinstance(adapter, dspy.ChatAdapter)):
        why = ("layout='greater'" if option == "greater" else
               "auto: no adapter configured" if adapter is None else f"auto: the configured adapter is {configured}")
        return GreaterLayout(tokenizer), {"name": "greater", "adapter": configured, "reason": why}
    why = "layout='chat_adapter'" if option == "chat_adapter" else f"auto: the configured adapter is {configured}"
    chat = adapter if isinstance(adapter, dspy.ChatAdapter) else None
    try:
        layout = make_layout("chat_adapter", tokenizer, signature=signature, output_field=output_field, adapter=chat)
    except TypeError as error:  # e.g. JSONAdapter with a non-text answer: model ChatAdapter's replies instead
        layout = make_layout("chat_adapter", tokenizer, signature=signature, output_field=output_field)
        why += f" ({error} ChatAdapter's replies are modelled instead.)"
    if extractor_given:
        logger.warning("The chat_adapter layout scores the label right after ChatAdapter's answer marker %r; "
                       "the extractor option is not used in it.", layout.extractor_text)
    return layout, {"name": "chat_adapter", "adapter": type(layout.adapter).__name__, "reason": why}
