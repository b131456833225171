"""A DSPy adapter that runs a predictor on a target LM in the layout GReaTer optimized it in.

DSPy's ``ChatAdapter`` asks the LM to answer inside ``[[ ## field ## ]]`` markers; small models
cannot follow them and fail with ``AdapterParseError``. ``GReaTerAdapter`` instead sends what the
optimizer model saw: the inputs, then the instruction, in one user turn; the LM reasons freely;
then the answer extractor ("Therefore, the final answer (Yes or No) is") asks for the answer,
which is parsed leniently into the output field's type. Two LM calls per prediction: the
reasoning, then a short answer.
"""

from __future__ import annotations

import typing
from typing import Any

import dspy
from dspy.adapters.base import Adapter
from dspy.utils.exceptions import AdapterParseError

from dspy_greater.extractor import Extractor, derive_extractor

REASONING_FIELDS = ("reasoning", "rationale")


def format_inputs(names: typing.Sequence[str], values: dict[str, Any]) -> str:
    """The inputs as one text: the value alone for one input field, else ``Name: value`` lines."""
    names = list(names)
    if len(names) == 1:
        return str(values[names[0]])
    return "\n".join(f"{name.replace('_', ' ').strip().capitalize()}: {values[name]}" for name in names)


def answer_fields(signature: type[dspy.Signature]) -> list[str]:
    """Output fields other than the reasoning slot."""
    return [name for name in signature.output_fields if name not in REASONING_FIELDS]


def extractor_for_field(signature: type[dspy.Signature], name: str) -> Extractor:
    """An extractor derived from an output field's type alone (used when no labels are known)."""
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
    return derive_extractor(name, desc, ["free text"], [])


def _coerce(value: str | None, annotation) -> Any:
    if value is None:
        return None
    if annotation is bool:
        return value.strip().casefold() in ("true", "yes", "valid")
    if annotation is int:
        return int(value)
    if annotation is float:
        return float(value)
    return value


class GReaTerAdapter(Adapter):
    """Run predictors in GReaTer's layout: inputs + instruction; free reasoning; extractor; answer.

    Args:
        extractors: Extractor per output field name (as found by ``GReaTerTeleprompter``; see
            :meth:`from_program`). Fields without one get an extractor derived from their type.
        max_reasoning_tokens: Token limit of the reasoning call (``max_tokens`` in ``lm_kwargs``
            takes precedence).
        answer_tokens: Token limit of the answer call.
        separator: Text between the inputs and the instruction (the optimizer layout's).
    """

    def __init__(
        self,
        extractors: dict[str, Extractor] | None = None,
        *,
        max_reasoning_tokens: int = 256,
        answer_tokens: int = 16,
        separator: str = "\n\n",
        callbacks=None,
    ):
        super().__init__(callbacks=callbacks)
        self.extractors = dict(extractors or {})
        self.max_reasoning_tokens = max_reasoning_tokens
        self.answer_tokens = answer_tokens
        self.separator = separator

    @classmethod
    def from_program(cls, program: dspy.Module, **kwargs) -> GReaTerAdapter:
        """An adapter using the extractors a ``GReaTerTeleprompter`` found for ``program``."""
        extractors = {}
        for result in (getattr(program, "greater_results", None) or {}).values():
            spec = result.get("extractor")
            if spec:
                extractors[spec["field"]] = Extractor(spec["kind"], spec["text"], tuple(spec["choices"]))
        return cls(extractors, **kwargs)

    def extractor(self, signature: type[dspy.Signature], name: str) -> Extractor:
        return self.extractors.get(name) or extractor_for_field(signature, name)

    # -- formatting and parsing ----------------------------------------------------------------------

    def format(self, signature, demos, inputs) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        for demo in demos:
            if all(k in demo for k in signature.input_fields) and all(k in demo for k in answer_fields(signature)):
                messages.append({"role": "user", "content": self._user_content(signature, demo)})
                messages.append({"role": "assistant", "content": self._demo_answer(signature, demo)})
        messages.append({"role": "user", "content": self._user_content(signature, inputs)})
        return messages

    def _user_content(self, signature, values) -> str:
        return f"{format_inputs(signature.input_fields, values)}{self.separator}{signature.instructions}".strip()

    def _demo_answer(self, signature, demo) -> str:
        reasoning = next((str(demo[k]) for k in REASONING_FIELDS if k in demo and demo[k]), "")
        parts = [reasoning] if reasoning else []
        for name in answer_fields(signature):
            ext = self.extractor(signature, name)
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
                                        message=f"No answer for {name!r} found in the completion.")
            values[name] = _coerce(label, signature.output_fields[name].annotation)
        for name in REASONING_FIELDS:
            if name in signature.output_fields:
                values[name] = completion.strip()
        return values

    # -- the LM calls ----------------------------------------------------------------------------------

    def __call__(self, lm, lm_kwargs, signature, demos, inputs) -> list[dict[str, Any]]:
        messages = self.format(signature, demos, inputs)
        kwargs = {k: v for k, v in lm_kwargs.items() if k not in ("tools", "tool_choice", "parallel_tool_calls")}
        kwargs.setdefault("max_tokens", self.max_reasoning_tokens)
        outputs = lm(messages=messages, **kwargs)
        return [self._answer(lm, kwargs, signature, messages, _text(output)) for output in outputs]

    def _answer(self, lm, kwargs, signature, messages, reasoning: str) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in REASONING_FIELDS:
            if name in signature.output_fields:
                values[name] = reasoning.strip()
        answer_kwargs = {**kwargs, "max_tokens": self.answer_tokens, "n": 1}
        for name in answer_fields(signature):
            ext = self.extractor(signature, name)
            follow_up = [*messages, {"role": "assistant", "content": reasoning.strip() or "..."},
                         {"role": "user", "content": ext.text.strip()}]
            reply = _text(lm(messages=follow_up, **answer_kwargs)[0])
            label = ext.label_of(reply) or _label_near_end(ext, f"{reasoning}\n{reply}")
            if label is None:
                raise AdapterParseError(adapter_name="GReaTerAdapter", signature=signature,
                                        lm_response=f"{reasoning}\n---\n{reply}",
                                        message=f"The target LM's answer for {name!r} could not be parsed.")
            values[name] = _coerce(label, signature.output_fields[name].annotation)
        return values


def _text(output) -> str:
    if isinstance(output, dict):
        return output.get("text") or ""
    return output or ""


def _label_near_end(ext: Extractor, text: str) -> str | None:
    """The last parseable answer in ``text``: tries each line from the end, then "answer is X"."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        lowered = line.casefold()
        for marker in ("answer is", "answer:", "answer"):
            if marker in lowered:
                label = ext.label_of(line[lowered.rindex(marker) + len(marker):])
                if label is not None:
                    return label
    if lines and ext.kind != "text":
        return ext.label_of(lines[-1])
    return None
