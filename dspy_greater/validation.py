"""Input checks for ``GReaTerTeleprompter``: they run before the optimizer model loads, and each error names the fix."""

from __future__ import annotations

import difflib
import logging
import re
import typing

import dspy
from dspy.adapters.chat_adapter import field_header_pattern

from dspy_greater.engine.text import REASONING_FIELDS
from dspy_greater.engine.extractor import Extractor
from dspy_greater.engine.config import GreaterConfig

logger = logging.getLogger(__name__)

SCALAR_TYPES = (str, int, float, bool)


def build_config(config, overrides: dict) -> GreaterConfig:
    """``config`` (a ``GreaterConfig``, a dict or ``None``) with ``overrides``; an unknown option names the closest one."""
    if config is not None and not isinstance(config, (GreaterConfig, dict)):
        raise TypeError(f"config must be a GreaterConfig or a dict, got {type(config).__name__}.")
    base = dict(vars(config)) if isinstance(config, GreaterConfig) else dict(config or {})
    merged = {**base, **overrides}
    known = GreaterConfig.field_names()
    for key in merged:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"Unknown GReaTer option {key!r}.{hint} Valid options: {', '.join(sorted(known))}.")
    return GreaterConfig(**merged)


def check_examples(examples, what: str, inputs: tuple[str, ...], outputs: list[str]) -> list:
    """``examples`` as a list, after checking each is a ``dspy.Example`` with text ``inputs`` and non-empty ``outputs``."""
    if examples is None or isinstance(examples, (str, bytes)) or not hasattr(examples, "__len__"):
        raise TypeError(f"{what} must be a list of dspy.Example, got {type(examples).__name__}.")
    if len(examples) == 0:
        raise ValueError(f"{what} is empty; GReaTer needs labelled examples (the paper uses 50).")
    for i, example in enumerate(examples):
        if not isinstance(example, dspy.Example):
            raise TypeError(f"{what}[{i}] is a {type(example).__name__}, not a dspy.Example.")
        if example._input_keys is None:
            raise ValueError(
                f"{what}[{i}] has no input fields marked; call .with_inputs("
                f"{', '.join(repr(k) for k in inputs) or 'the names of its input fields'}) on it."
            )
        for key in [*inputs, *outputs]:
            role = "input" if key in inputs else "label"
            if key not in example or example[key] is None:
                raise ValueError(f"{what}[{i}] has no {role} {key!r}; every example needs {', '.join([*inputs, *outputs])}.")
            if not isinstance(example[key], SCALAR_TYPES):
                raise TypeError(
                    f"{what}[{i}].{key} is a {type(example[key]).__name__}; GReaTer handles text values only. "
                    "Convert it to str."
                )
            if role == "label" and not str(example[key]).strip():
                raise ValueError(f"{what}[{i}] has an empty label {key!r} ({example[key]!r}); the search scores how "
                                 "likely the label is, so give it a non-empty label or drop the example.")
    return list(examples)


def check_instruction(text: str, what: str) -> None:
    """Refuse an instruction holding DSPy's ``[[ ## field ## ]]`` markers.

    ChatAdapter shows the instruction to the target LM inside the prompt whose reply structure those
    markers define and splits the reply at them; a marker inside the instruction is
    indistinguishable from the adapter's own.
    """
    marker = field_header_pattern.search(text)
    if marker:
        raise ValueError(
            f"{what} contains DSPy's field marker {marker.group(0)!r}. ChatAdapter frames the prompt and splits the "
            "target LM's reply at these markers, so one inside the instruction invites a reply the adapter cannot "
            f"parse. Remove it and name the field in plain words (e.g. `{marker.group(1)}`)."
        )


_TOOL_LINE = re.compile(r"^\(\d+\) [^\n]*?(?:, whose description is|\. It takes arguments)", re.MULTILINE)


def _mentions(annotation, classes: tuple) -> bool:
    """Whether a type annotation is, or is built from, one of ``classes`` (``list[dspy.Tool]``, ``History | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, classes):
        return True
    return any(_mentions(arg, classes) for arg in typing.get_args(annotation))


def unsupported_reason(signature) -> str | None:
    """Why GReaTer cannot optimize a predictor with this signature (``None``: it can)."""
    kept = " Its instruction is kept as it is."
    if "trajectory" in signature.input_fields or _TOOL_LINE.search(signature.instructions or ""):
        what = "a `trajectory` input" if "trajectory" in signature.input_fields else "an instruction listing tools"
        return (f"it is a tool-using (ReAct-style) predictor ({what}); GReaTer optimizes a predictor that answers "
                f"in one call, not a trajectory of tool calls.{kept}")
    for name, info in signature.fields.items():
        if _mentions(info.annotation, (dspy.Tool, dspy.ToolCalls)):
            return f"its field {name!r} holds tools ({info.annotation!r}); GReaTer handles text fields only.{kept}"
        if _mentions(info.annotation, (dspy.History,)):
            return (f"its field {name!r} is a dspy.History (conversation turns); GReaTer handles text fields only."
                    f"{kept}")
    for name in [*signature.input_fields, *(k for k in signature.output_fields if k not in REASONING_FIELDS)]:
        annotation = signature.fields[name].annotation
        if not is_text_type(annotation):
            return (f"its field {name!r} has type {annotation!r}; GReaTer handles text fields only (str, int, float, "
                    f"bool or Literal).{kept}")
    return None


def check_label_space(extractor: Extractor, output: str, named_sets) -> None:
    """Refuse a label the extractor's answer space cannot express (its loss would be meaningless).

    ``named_sets``: ``[("trainset", examples), ("valset", examples or None)]``; the error names the
    set and the example's index in it.
    """
    for what, examples in named_sets:
        for i, e in enumerate(examples or []):
            if not extractor.accepts(e[output]):
                allowed = ", ".join(extractor.choices) or f"{extractor.kind} answers"
                raise ValueError(
                    f"{what}[{i}]: label {e[output]!r} for {output!r} is outside the answer space ({allowed}); fix the "
                    "label or pass extractor=... to set the answer space."
                )


def is_text_type(annotation) -> bool:
    """Whether a field type is one GReaTer can show as text: a scalar or a ``Literal``."""
    if annotation in SCALAR_TYPES:
        return True
    return typing.get_origin(annotation) is typing.Literal
