"""A DSPy adapter that runs a predictor on a target LM in the layout GReaTer optimized it in.

DSPy's ``ChatAdapter`` asks the LM to answer inside ``[[ ## field ## ]]`` markers; small models
cannot follow them and fail with ``AdapterParseError``. ``GReaTerAdapter`` instead sends what the
optimizer model saw: the inputs, then the instruction, in one user turn; the LM reasons freely;
then the answer extractor ("Therefore, the final answer (Yes or No) is") asks for the answer,
which is parsed leniently into the output field's type. Two LM calls per prediction: the
reasoning, then a short answer.

Chat LMs get chat messages: ``[user: inputs \n\n instruction]``, then for the answer
``[..., assistant: reasoning, user: extractor]``. Text-completion LMs (``lm.model_type == "text"``,
e.g. :class:`~dspy_greater.targets.plain_text.PlainTextLM` for a base model without a chat template) get
``lm(prompt=...)`` with the optimizer's plain-text layout, verbatim::

    reasoning call:  prompt = inputs + "\n\n" + instruction + "\n\nAnswer:"
    answer call:     prompt + reasoning + extractor text

(demos, if any, come first as complete blocks separated by blank lines). A stock
``dspy.LM(..., model_type="text")`` appends DSPy's ``"BEGIN RESPONSE:"`` to every prompt; use
``PlainTextLM`` to send the layout unchanged.
"""

from __future__ import annotations

import logging
import re
import types
import typing
from typing import Any

import dspy
from dspy.adapters.base import Adapter
from dspy.utils.exceptions import AdapterParseError

from dspy_greater.engine.extractor import OPTION_LINE, Extractor, dash_options, derive_extractor
from dspy_greater.engine.text import PLAIN_ANSWER_CUE, REASONING_FIELDS, SEPARATOR, format_inputs

logger = logging.getLogger(__name__)

_DEFAULT_REASONING_TOKENS = 256
_TOKEN_LIMIT_KEYS = ("max_tokens", "max_completion_tokens")
_LEADING_PAREN_LETTER = re.compile(r"^[\s*_`\"']*\(\s*[A-Za-z]\s*\)")
_BARE_LETTER_LINE = re.compile(r"^[\s*_`\"']*[A-Za-z][.)]?[\s*_`\"'.]*$")
_NUMBER = re.compile(r"[+\-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][+-]?\d+)?|[+\-\u2212]?\.\d+")


# The predictor attribute (and key of its saved state) that carries the optimized extractor.
EXTRACTOR_STATE = "greater_extractor"


def keep_extractor(predictor: dspy.Predict, spec: dict) -> None:
    """Keep an extractor (``{"field", "kind", "text", "choices"}``) on ``predictor`` through ``save``/``load``.

    ``save()`` writes each predictor's ``dump_state()``; ``load()`` gives every key of it that DSPy
    does not handle itself to the fresh predictor as an attribute. So the extractor is added to this
    predictor's saved state, and a program loaded from the file has it as ``predictor.greater_extractor``,
    where :meth:`GReaTerAdapter.from_program` finds it.
    """
    setattr(predictor, EXTRACTOR_STATE, {k: spec[k] for k in ("field", "kind", "text", "choices")})
    predictor.dump_state = types.MethodType(_dump_state_with_extractor, predictor)


def _dump_state_with_extractor(self, *args, **kwargs) -> dict:
    state = type(self).dump_state(self, *args, **kwargs)
    state[EXTRACTOR_STATE] = dict(getattr(self, EXTRACTOR_STATE))
    return state


def answer_fields(signature: type[dspy.Signature]) -> list[str]:
    """Output fields other than the reasoning slot."""
    return [name for name in signature.output_fields if name not in REASONING_FIELDS]


def extractor_for_field(signature: type[dspy.Signature], name: str, inputs_text: str | None = None) -> Extractor:
    """An extractor derived from an output field's type (used when no labels are known).

    A ``str`` field whose inputs list options (``(A) ...`` lines, or the same ``- option`` lines as
    BBH's navigate/web_of_lies) gets a closed extractor over those options, as the optimizer
    derives from labels and inputs; otherwise a free-text extractor.
    """
    field = signature.output_fields[name]
    annotation = field.annotation
    desc = (field.json_schema_extra or {}).get("desc")
    if typing.get_origin(annotation) is typing.Literal:
        values = [str(v) for v in typing.get_args(annotation)]
        return derive_extractor(name, desc, values, [])
    if annotation is bool:
        return derive_extractor(name, desc, ["True", "False"], [])
    if annotation is int:
        return derive_extractor(name, desc, ["0", "1"], [])
    if annotation is str and inputs_text:
        letters = sorted({m.group(1) for m in OPTION_LINE.finditer(inputs_text)})
        if len(letters) >= 2:
            return derive_extractor(name, desc, [f"({c})" for c in letters], [inputs_text])
        options = dash_options([inputs_text])
        if options:
            return derive_extractor(name, desc, list(options), [inputs_text])
    return derive_extractor(name, desc, ["free text"], [])


def _coerce(value: str | None, annotation) -> Any:
    """The parsed label as the field's type; ``ValueError`` when it does not convert."""
    if value is None:
        return None
    if typing.get_origin(annotation) is typing.Literal:
        for option in typing.get_args(annotation):
            if str(option).casefold() == value.strip().casefold():
                return option
        raise ValueError(f"{value!r} is not one of {list(typing.get_args(annotation))}")
    if annotation is bool:
        folded = value.strip().casefold()
        if folded in ("true", "yes", "valid"):
            return True
        if folded in ("false", "no", "invalid"):
            return False
        raise ValueError(f"{value!r} is not a boolean")
    if annotation is int:
        return int(value)
    if annotation is float:
        match = _NUMBER.search(value)
        if match is None:
            raise ValueError(f"{value!r} holds no number")
        return float(match.group(0).replace(",", "").replace("\u2212", "-"))
    return value


class GReaTerAdapter(Adapter):
    """Run predictors in GReaTer's layout: inputs + instruction; free reasoning; extractor; answer.

    Args:
        extractors: Extractor per output field name, or per ``(field, instruction)`` (as found by
            ``GReaTerTeleprompter``; see :meth:`from_program`). Fields without one get an extractor
            derived from their type.
        max_reasoning_tokens: Token limit of the reasoning call. ``None`` (the default): the LM's own
            ``max_tokens`` (e.g. ``dspy.LM(..., max_tokens=64)``), else 256. A ``max_tokens`` in the
            predictor's config (``lm_kwargs``) takes precedence over both.
        answer_tokens: Token limit of the answer call.
        separator: Text between the inputs and the instruction (the optimizer layout's).

    Text-completion LMs (``model_type == "text"``) are sent plain-text prompts instead of chat
    messages; see the module docstring.
    """

    def __init__(
        self,
        extractors: dict[str, Extractor] | None = None,
        *,
        max_reasoning_tokens: int | None = None,
        answer_tokens: int = 16,
        separator: str = SEPARATOR,
        callbacks=None,
    ):
        super().__init__(callbacks=callbacks)
        self.extractors = dict(extractors or {})
        self.max_reasoning_tokens = max_reasoning_tokens
        self.answer_tokens = answer_tokens
        self.separator = separator

    @classmethod
    def from_program(cls, program: dspy.Module, **kwargs) -> GReaTerAdapter:
        """An adapter using the extractors a ``GReaTerTeleprompter`` found for ``program``.

        Reads each predictor's saved extractor (present after ``compile`` and after
        ``program.save(...)`` / ``program.load(...)``), else the program's ``greater_results``.
        Each extractor is kept under its output field and the predictor's instruction, so two
        predictors with the same output field name keep their own; the field name alone falls
        back to the first predictor's. Each predictor keeps its extractor in its saved state, so
        a loaded program saved again still carries it.
        """
        predictors = dict(program.named_predictors())
        specs = [(name, getattr(p, EXTRACTOR_STATE, None)) for name, p in predictors.items()]
        specs += [(name, result.get("extractor"))
                  for name, result in (getattr(program, "greater_results", None) or {}).items()]
        extractors: dict = {}
        seen: set[str] = set()  # a predictor's own extractor comes first; its greater_results entry is a repeat
        for name, spec in specs:
            if not spec or name in seen:
                continue
            seen.add(name)
            found = Extractor(spec["kind"], spec["text"], tuple(spec["choices"]))
            extractors.setdefault(spec["field"], found)
            if name in predictors:
                extractors[(spec["field"], predictors[name].signature.instructions)] = found
                keep_extractor(predictors[name], spec)  # DSPy's load() restores the attribute, not the saving
        return cls(extractors, **kwargs)

    def extractor(self, signature: type[dspy.Signature], name: str, inputs: dict[str, Any] | None = None) -> Extractor:
        """The extractor for output field ``name``: the given one (for this instruction, else for the
        field), else derived from the field's type (and, for ``str`` fields, from options listed
        in ``inputs``)."""
        for key in ((name, signature.instructions), name):
            if key in self.extractors:
                return self.extractors[key]
        text = "\n".join(str(inputs[k]) for k in signature.input_fields if k in inputs) if inputs else None
        return extractor_for_field(signature, name, text)

    # -- formatting and parsing ----------------------------------------------------------------------

    def format(self, signature, demos, inputs) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        for demo in demos:
            if all(k in demo for k in signature.input_fields) and all(k in demo for k in answer_fields(signature)):
                messages.append({"role": "user", "content": self._user_content(signature, demo)})
                messages.append({"role": "assistant", "content": self._demo_answer(signature, demo)})
        messages.append({"role": "user", "content": self._user_content(signature, inputs)})
        return messages

    def format_text(self, signature, demos, inputs) -> str:
        """The reasoning call's prompt for a text-completion LM: the optimizer's plain-text layout
        (``inputs \n\n instruction \n\n Answer:``), after one complete block per usable demo."""
        blocks = []
        for demo in demos:
            if all(k in demo for k in signature.input_fields) and all(k in demo for k in answer_fields(signature)):
                blocks.append(self._text_prompt(signature, demo) + self._text_demo_answer(signature, demo))
        return SEPARATOR.join([*blocks, self._text_prompt(signature, inputs)])

    def _text_prompt(self, signature, values) -> str:
        return f"{self._user_content(signature, values)}{PLAIN_ANSWER_CUE}"

    def _text_demo_answer(self, signature, demo) -> str:
        reasoning = next((str(demo[k]).strip() for k in REASONING_FIELDS if k in demo and demo[k]), "")
        text = f" {reasoning}" if reasoning else ""
        for name in answer_fields(signature):
            ext = self.extractor(signature, name, demo)
            answer = ext.target(demo[name]) if ext.accepts(demo[name]) else " " + str(demo[name])
            text += f"{ext.text}{answer}"
        return text

    def _user_content(self, signature, values) -> str:
        return f"{format_inputs(signature.input_fields, values)}{self.separator}{signature.instructions}".strip()

    def _demo_answer(self, signature, demo) -> str:
        reasoning = next((str(demo[k]) for k in REASONING_FIELDS if k in demo and demo[k]), "")
        parts = [reasoning] if reasoning else []
        for name in answer_fields(signature):
            ext = self.extractor(signature, name, demo)
            parts.append(f"{ext.text.strip()}{ext.target(demo[name]) if ext.accepts(demo[name]) else ' ' + str(demo[name])}")
        return "\n".join(parts)

    def parse(self, signature, completion: str) -> dict[str, Any]:
        """Parse a single completion holding reasoning and, at its end, the answer(s)."""
        values: dict[str, Any] = {}
        for name in answer_fields(signature):
            ext = self.extractor(signature, name)
            label = _label_near_end(ext, completion)
            if label is None:
                raise AdapterParseError(adapter_name="GReaTerAdapter", signature=signature, lm_response=completion,
                                        message=f"No answer for {name!r} found in the completion "
                                                f"(expected {_expected(ext)}).")
            values[name] = _coerced(signature, name, label, completion)
        for name in REASONING_FIELDS:
            if name in signature.output_fields:
                values[name] = completion.strip()
        return values

    # -- the LM calls ----------------------------------------------------------------------------------

    def __call__(self, lm, lm_kwargs, signature, demos, inputs) -> list[dict[str, Any]]:
        text_mode = is_text_lm(lm)
        request, kwargs = self._reasoning_request(lm, lm_kwargs, signature, demos, inputs)
        outputs = lm(prompt=request, **kwargs) if text_mode else lm(messages=request, **kwargs)
        results = []
        for output in outputs:
            reasoning = _text(output)
            replies = {}
            for name, follow_up, answer_kwargs in self._answer_requests(signature, inputs, request, kwargs, reasoning):
                reply = lm(prompt=follow_up, **answer_kwargs) if text_mode else lm(messages=follow_up, **answer_kwargs)
                replies[name] = _text(reply[0])
            results.append(self._values(signature, inputs, reasoning, replies))
        return results

    async def acall(self, lm, lm_kwargs, signature, demos, inputs) -> list[dict[str, Any]]:
        text_mode = is_text_lm(lm)
        request, kwargs = self._reasoning_request(lm, lm_kwargs, signature, demos, inputs)
        outputs = await (lm.acall(prompt=request, **kwargs) if text_mode else lm.acall(messages=request, **kwargs))
        results = []
        for output in outputs:
            reasoning = _text(output)
            replies = {}
            for name, follow_up, answer_kwargs in self._answer_requests(signature, inputs, request, kwargs, reasoning):
                call = (lm.acall(prompt=follow_up, **answer_kwargs) if text_mode
                        else lm.acall(messages=follow_up, **answer_kwargs))
                replies[name] = _text((await call)[0])
            results.append(self._values(signature, inputs, reasoning, replies))
        return results

    def _reasoning_request(self, lm, lm_kwargs, signature, demos, inputs):
        """(the reasoning call's messages, or its prompt for a text LM; its keyword arguments)"""
        text_mode = is_text_lm(lm)
        if text_mode and not getattr(lm, "sends_prompt_verbatim", False):
            _warn_once(lm)
        messages = (self.format_text if text_mode else self.format)(signature, demos, inputs)
        kwargs = {k: v for k, v in lm_kwargs.items() if k not in ("tools", "tool_choice", "parallel_tool_calls")}
        if not any(kwargs.get(k) for k in _TOKEN_LIMIT_KEYS):
            lm_own = getattr(lm, "kwargs", None) or {}
            if self.max_reasoning_tokens is not None:
                kwargs["max_tokens"] = self.max_reasoning_tokens
            elif not any(lm_own.get(k) for k in _TOKEN_LIMIT_KEYS):
                kwargs["max_tokens"] = _DEFAULT_REASONING_TOKENS
            # else: the LM's own limit applies (dspy.LM merges its kwargs under these)
        return messages, kwargs

    def _answer_requests(self, signature, inputs, request, kwargs, reasoning: str):
        """(field, the answer call's messages or prompt, its keyword arguments) per answer field.

        ``request`` is the reasoning call's messages (chat) or prompt (text). A text prompt is
        continued verbatim: prompt + reasoning + extractor, as the optimizer scored it.
        """
        answer_kwargs = {k: v for k, v in kwargs.items() if k != "max_completion_tokens"}
        answer_kwargs.update(max_tokens=self.answer_tokens, n=1)
        for name in answer_fields(signature):
            ext = self.extractor(signature, name, inputs)
            if isinstance(request, str):
                follow_up = f"{request}{reasoning}{ext.text}"
            else:
                follow_up = [*request, {"role": "assistant", "content": reasoning.strip() or "..."},
                             {"role": "user", "content": ext.text.strip()}]
            yield name, follow_up, answer_kwargs

    def _values(self, signature, inputs, reasoning: str, replies: dict[str, str]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in REASONING_FIELDS:
            if name in signature.output_fields:
                values[name] = reasoning.strip()
        for name in answer_fields(signature):
            ext = self.extractor(signature, name, inputs)
            reply = replies[name]
            label = _label_of_reply(ext, reply) or _label_near_end(ext, f"{reasoning}\n{reply}")
            if label is None:
                raise AdapterParseError(adapter_name="GReaTerAdapter", signature=signature,
                                        lm_response=f"{reasoning}\n---\n{reply}",
                                        message=f"The target LM's answer for {name!r} could not be parsed "
                                                f"(expected {_expected(ext)}; the answer call replied {reply!r}).")
            values[name] = _coerced(signature, name, label, f"{reasoning}\n---\n{reply}")
        return values


def is_text_lm(lm) -> bool:
    """Whether ``lm`` takes plain-text prompts (``model_type == "text"``, e.g. ``PlainTextLM``)."""
    return getattr(lm, "model_type", None) == "text"


_WARNED_MODELS: set[str] = set()


def _warn_once(lm) -> None:
    model = str(getattr(lm, "model", lm))
    if model not in _WARNED_MODELS:
        _WARNED_MODELS.add(model)
        logger.warning("%s is a text-completion LM that may change the prompt (dspy.LM(model_type='text') appends "
                       "'BEGIN RESPONSE:'); use dspy_greater.targets.plain_text.PlainTextLM to send the optimizer's layout "
                       "verbatim.", model)


def _expected(ext: Extractor) -> str:
    if ext.closed:
        return "one of " + ", ".join(ext.choices)
    return "an integer" if ext.kind == "integer" else "a non-empty answer"


def _coerced(signature, name: str, label: str, response: str) -> Any:
    try:
        return _coerce(label, signature.output_fields[name].annotation)
    except ValueError as error:
        raise AdapterParseError(adapter_name="GReaTerAdapter", signature=signature, lm_response=response,
                                message=f"The answer {label!r} for {name!r} does not convert to the field's type: {error}"
                                ) from None


def _text(output) -> str:
    if isinstance(output, dict):
        return output.get("text") or ""
    return output or ""


def _label_of_reply(ext: Extractor, reply: str) -> str | None:
    """The label in the answer call's reply: "answer is X" first for free text, else its start."""
    if ext.kind == "text":
        return _marked_label(ext, reply) or ext.label_of(reply)
    return ext.label_of(reply)


def _marked_label(ext: Extractor, text: str) -> str | None:
    """The answer after the last echo of the extractor prompt, else the last "answer is X" /
    "answer: X" in ``text`` that parses. The prompt's own hint ("(Yes or No)", "(one of (A), (B))")
    is ignored, so an echoed prompt does not read as its first option."""
    prompt = ext.text.strip().rstrip("(").strip()
    if prompt:
        at = text.casefold().rfind(prompt.casefold())
        if at >= 0:
            label = ext.label_of(text[at + len(prompt):])
            if label is not None:
                return label
    hint = re.search(r"\(.*\)", prompt)
    if hint:
        text = re.sub(r"[ \t]*" + re.escape(hint.group(0)) + r"[ \t]*", " ", text, flags=re.IGNORECASE)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        lowered = line.casefold()
        for marker in ("answer is", "answer:", "answer"):
            if marker in lowered:
                label = ext.label_of(line[lowered.rindex(marker) + len(marker):])
                if label is not None:
                    return label
    return None


def _label_near_end(ext: Extractor, text: str) -> str | None:
    """The last parseable answer in ``text``: "answer is X" from the end; else, for an integer, the
    last line's; for a choice, the last line that starts with one; for a letter, the last line that
    starts with "(X)" or is a bare letter (so that "A man ..." does not read as option A)."""
    label = _marked_label(ext, text)
    if label is not None or ext.kind == "text":
        return label
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if ext.kind == "integer":
        return ext.label_of(lines[-1]) if lines else None
    for line in reversed(lines):
        if ext.kind == "letter" and not (_LEADING_PAREN_LETTER.match(line) or _BARE_LETTER_LINE.match(line)):
            continue
        label = ext.label_of(line)
        if label is not None:
            return label
    return None
