"""What each predictor of a program needs before any model work: its fields, its answer format,
where its labels come from, or why it is left as it is.

One place derives a predictor's task for programs of any size. The one rule that depends on the
size: a program with a single predictor must be optimizable (anything that prevents it is an error
naming the fix), while in a program with several, a predictor that cannot be optimized is skipped
with its reason and the others go on.
"""

from __future__ import annotations

import logging
import typing
from dataclasses import dataclass

import dspy

from dspy_greater.chat_layout import ChatAdapterLayout
from dspy_greater.data import split_examples
from dspy_greater.engine.extractor import Extractor, derive_extractor
from dspy_greater.engine.search import SearchExample
from dspy_greater.engine.text import REASONING_FIELDS, format_inputs
from dspy_greater.start import PROGRAM_INSTRUCTION
from dspy_greater.validation import (check_examples, check_instruction, check_label_space, is_text_type,
                                     unsupported_reason)

logger = logging.getLogger(__name__)
# Fewer held-out examples than this get a warning: one example then moves the held-out accuracy by more
# than three points, so the chosen instruction's held-out gain overstates its gain on new examples.
RELIABLE_HELDOUT = 30


@dataclass(frozen=True)
class PredictorTask:
    """One predictor's task as the search sees it (derived from its signature and the data)."""

    name: str
    input_fields: tuple[str, ...]
    output_field: str
    instruction: str
    extractor: Extractor
    signature: typing.Any = None  # the predictor's signature (the chat_adapter layout formats it)

    def inputs_text(self, example: dspy.Example) -> str:
        """The example's inputs as one text, as :class:`GReaTerAdapter` formats them."""
        return format_inputs(self.input_fields, example)

    def search_inputs(self, example: dspy.Example, layout=None) -> str:
        """The inputs text the search uses in ``layout``: ChatAdapter's user message in the chat_adapter layout."""
        if isinstance(layout, ChatAdapterLayout):
            return layout.inputs_text({f: example[f] for f in self.input_fields})
        return self.inputs_text(example)

    def search_example(self, example: dspy.Example, layout=None) -> SearchExample:
        return SearchExample(self.search_inputs(example, layout), self.extractor.canonical(example[self.output_field]))


@dataclass(frozen=True)
class Plan:
    """One predictor of the program, as found before any model work.

    Attributes:
        name: The predictor's name in ``named_predictors()``.
        signature: Its signature.
        output: The output field it is optimized for.
        gold: Its output field is a label of every trainset example (else labels come from program runs).
        inputs_given: Every trainset example holds all its inputs (else they come from program runs).
        extractor: The answer format, derived from the gold labels (``None``: from the runs' outputs).
        skip: Why it cannot be optimized at all (``None``: it can).
    """

    name: str
    signature: typing.Any
    output: str
    gold: bool = False
    inputs_given: bool = False
    extractor: Extractor | None = None
    skip: str | None = None

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(self.signature.input_fields)

    @property
    def instruction(self) -> str:
        return self.signature.instructions

    @property
    def from_trainset(self) -> bool:
        """Whether its examples are the trainset's own (gold labels and every input given)."""
        return self.gold and self.inputs_given

    def task(self, instruction: str, examples: list | None = None) -> PredictorTask:
        """The search's task at ``instruction``; without a gold extractor, the answer format is derived
        from ``examples`` (the labelled examples the program runs produced)."""
        extractor = self.extractor
        if extractor is None:
            desc = _description(self.signature, self.output)
            extractor = derive_extractor(self.output, desc, [e[self.output] for e in examples or []],
                                         [format_inputs(self.inputs, e) for e in examples or []])
        return PredictorTask(self.name, self.inputs, self.output, instruction, extractor, self.signature)


def plan_program(program, trainset, valset, *, extractor=None, initial_instruction: str | None = None) -> list[Plan]:
    """Check the program and the data, and plan each predictor (raises on anything a user must fix)."""
    if not isinstance(program, dspy.Module):
        raise TypeError(f"student must be a dspy.Module (e.g. dspy.ChainOfThought('question -> answer')), "
                        f"got {type(program).__name__}.")
    predictors = program.named_predictors()
    if not predictors:
        raise ValueError(f"The program ({type(program).__name__}) has no predictors to optimize; give it a "
                         "dspy.Predict or dspy.ChainOfThought.")
    if len(predictors) > 1 and initial_instruction not in (None, PROGRAM_INSTRUCTION):
        raise ValueError(
            f"initial_instruction sets one predictor's starting instruction, but this program has {len(predictors)} "
            f"({', '.join(n for n, _ in predictors)}). Set each predictor's instruction on the program instead "
            "(predictor.signature = predictor.signature.with_instructions(text)) and leave initial_instruction unset."
        )
    if len(predictors) == 1:
        name, predictor = predictors[0]
        own_instruction = initial_instruction in (None, PROGRAM_INSTRUCTION)
        return [plan_single(name, predictor.signature, trainset, valset, extractor, own_instruction)]
    check_examples(trainset, "trainset", (), [])
    if valset is not None:
        check_examples(valset, "valset", (), [])
    return [plan_in_program(name, p.signature, trainset, valset, extractor) for name, p in predictors]


def plan_single(name: str, signature, trainset, valset, extractor=None, check_own_instruction: bool = True) -> Plan:
    """The plan of a program's only predictor: its fields, labels and inputs must all be usable."""
    if check_own_instruction:
        check_instruction(signature.instructions, f"The instruction of predictor {name!r}")
    inputs = tuple(signature.input_fields)
    outputs = _answer_fields(signature)
    for field_name in [*inputs, *outputs]:
        annotation = signature.fields[field_name].annotation
        if not is_text_type(annotation):
            raise TypeError(
                f"Field {field_name!r} has type {annotation!r}; GReaTer handles text fields only "
                "(str, int, float, bool or Literal). Convert the field to str or leave this predictor out."
            )
    if not outputs:
        raise ValueError("The predictor's signature has no output field to optimize for.")
    reason = unsupported_reason(signature)
    if reason is not None:
        raise ValueError(f"Predictor {name!r} cannot be optimized: {reason}")
    output = outputs[0]
    examples = check_examples(trainset, "trainset", inputs, outputs)
    if valset is not None:
        check_examples(valset, "valset", inputs, outputs)
    found = derive_extractor(output, _description(signature, output), [e[output] for e in examples],
                             [format_inputs(inputs, e) for e in examples], override=extractor)
    check_label_space(found, output, [("trainset", examples), ("valset", valset)])
    return Plan(name, signature, output, gold=True, inputs_given=True, extractor=found)


def plan_in_program(name: str, signature, trainset, valset, extractor=None) -> Plan:
    """The plan of one of several predictors: skipped with a reason when its signature cannot be optimized."""
    outputs = _answer_fields(signature)
    reason = unsupported_reason(signature)
    if reason is None and not outputs:
        reason = "its signature has no output field to optimize for."
    if reason is not None:
        return Plan(name, signature, outputs[0] if outputs else "", skip=reason)
    check_instruction(signature.instructions, f"The instruction of predictor {name!r}")
    inputs = tuple(signature.input_fields)
    output = outputs[0]
    labelled = [output in e.labels() for e in trainset]
    if any(labelled) and not all(labelled):
        missing = labelled.index(False)
        raise ValueError(
            f"trainset[{missing}] has no label {output!r}, but other examples have one. Predictor {name!r} is "
            f"optimized for the gold {output!r} labels when every example has one, else for the outputs of "
            "successful program runs; give every example the label or none."
        )
    inputs_given = all(f in e.inputs() for e in trainset for f in inputs)
    if not all(labelled):
        return Plan(name, signature, output, gold=False, inputs_given=inputs_given)
    given = inputs if inputs_given else ()
    check_examples(trainset, "trainset", given, outputs)
    if valset is not None:
        check_examples(valset, "valset", given, outputs)
    texts = [format_inputs([f for f in inputs if f in e], e) for e in trainset]
    found = derive_extractor(output, _description(signature, output), [e[output] for e in trainset], texts,
                             override=extractor)
    check_label_space(found, output, [("trainset", trainset), ("valset", valset)])
    return Plan(name, signature, output, gold=True, inputs_given=inputs_given, extractor=found)


def why_not(plan: Plan, target_ready: bool, has_metric: bool) -> str | None:
    """Why ``plan``'s predictor cannot be optimized in this setting (``None``: it can)."""
    if plan.skip is not None:
        return plan.skip
    if plan.from_trainset:
        return None
    no_target = "no target LM is configured (dspy.configure(lm=...) or program.set_lm(...) for every predictor)"
    if not plan.gold:
        if not target_ready:
            return (f"its output {plan.output!r} is not a label in trainset, so its labels must come from runs of "
                    f"the program on the target LM that pass the metric, and {no_target}.")
        if not has_metric:
            return (f"its output {plan.output!r} is not a label in trainset, so its labels must come from runs of "
                    "the program that pass the metric, and no metric was given.")
        return None
    if not target_ready:
        return (f"its inputs {', '.join(repr(f) for f in plan.inputs)} are not all in the trainset examples (they "
                f"come from earlier predictors), so the program must run on the target LM to produce them, and "
                f"{no_target}.")
    return None


def _answer_fields(signature) -> list[str]:
    return [k for k in signature.output_fields if k not in REASONING_FIELDS]


def _description(signature, field: str) -> str | None:
    return (signature.fields[field].json_schema_extra or {}).get("desc")


def deduplicated(examples: list, task: PredictorTask) -> list:
    """``examples`` with exact repeats (same inputs and label) dropped, with a warning; examples with the same
    inputs but different labels are kept, with a warning (no instruction can get all of them right)."""
    first: dict[SearchExample, int] = {}
    labels: dict[str, dict[str, int]] = {}
    kept, repeats = [], []
    for i, example in enumerate(examples):
        key = task.search_example(example)
        if key in first:
            repeats.append(f"[{i}] repeats [{first[key]}]")
            continue
        first[key] = i
        labels.setdefault(key.inputs_text, {})[key.label] = i
        kept.append(example)
    if repeats:
        logger.warning("trainset holds %d exact duplicate example(s) (%s); each is used once.",
                       len(repeats), ", ".join(repeats[:5]) + (", ..." if len(repeats) > 5 else ""))
    conflicts = [by_label for by_label in labels.values() if len(by_label) > 1]
    for by_label in conflicts[:5]:
        logger.warning("trainset examples %s have the same inputs but different labels (%s); all are kept, so no "
                       "instruction can get them all right and the loss pulls both ways. Fix the labels or drop one.",
                       ", ".join(f"[{i}]" for i in by_label.values()), ", ".join(repr(k) for k in by_label))
    return kept


def predictor_task(program, examples, predictor_name: str | None = None, extractor=None) -> PredictorTask:
    """The search's task for one of ``program``'s predictors on ``examples`` (checked as for a compile)."""
    if not isinstance(program, dspy.Module):
        raise TypeError(f"program must be a dspy.Module, got {type(program).__name__}.")
    predictors = dict(program.named_predictors())
    if predictor_name is None:
        if len(predictors) != 1:
            raise ValueError(f"The program has {len(predictors)} predictors ({', '.join(predictors)}); "
                             "name the one to use with predictor=...")
        predictor_name = next(iter(predictors))
    if predictor_name not in predictors:
        raise ValueError(f"The program has no predictor {predictor_name!r}; its predictors: "
                         f"{', '.join(predictors)}.")
    signature = predictors[predictor_name].signature
    return plan_single(predictor_name, signature, examples, None, extractor).task(signature.instructions)


def split_heldout(trainset: list, valset: list | None, name: str, seed: int) -> tuple[list, list]:
    """(train, held-out): ``valset`` as given, else a seeded quarter of ``trainset`` (all of it
    below 8 examples); warns when the held-out examples are too few to choose on reliably."""
    if valset:
        train, heldout = list(trainset), list(valset)
    elif len(trainset) < 8:
        logger.warning("GReaTer [%s]: only %d training examples and no valset, so the instruction is chosen on the "
                       "training examples themselves. Pass 8 or more (a quarter is then held out) or a valset.",
                       name, len(trainset))
        return list(trainset), list(trainset)
    else:
        heldout, train = split_examples(trainset, [max(2, len(trainset) // 4), None], seed)
    if len(heldout) < RELIABLE_HELDOUT:
        logger.warning(
            "GReaTer [%s]: the instruction is chosen on %d held-out examples (%s); one example moves their accuracy "
            "by %.3f, so the chosen instruction's held-out gain overstates its gain on new examples. Pass a valset "
            "of %d or more examples for a more reliable choice.",
            name, len(heldout), "valset" if valset else "a quarter of trainset", 1 / len(heldout), RELIABLE_HELDOUT)
    return train, heldout


class ContextTooLong(ValueError):
    """An example or the instruction does not fit the optimizer model's context."""


def check_context(search, initial: str, task: PredictorTask, named_sets) -> None:
    """Fail before any step when an example's sequence cannot fit the optimizer model's context.

    ``named_sets``: ``[("trainset", examples), ("valset", examples)]``, so the error names the example.
    """
    limit = getattr(search.lm.model.config, "max_position_embeddings", None)
    if not limit:
        return
    config = search.config
    instruction = search.layout.encode_instruction(initial)
    room = config.max_reasoning_tokens + len(search.extractor_ids) + 16
    room += max(len(instruction), config.max_instruction_tokens)
    bare = len(search.layout.prompt("", []).ids)
    if bare + room > limit:  # not even empty inputs fit: the instruction or the reasoning budget is too long
        raise ContextTooLong(
            f"The instruction ({len(instruction)} tokens), reasoning ({config.max_reasoning_tokens}) and answer "
            f"alone need {bare + room} tokens, more than the optimizer model's context of {limit}. Shorten the "
            "instruction, lower max_reasoning_tokens, or use a model with a longer context."
        )
    lengths = [(len(search.layout.prompt(task.search_inputs(e, search.layout), []).ids), f"{what}[{i}]")
               for what, examples in named_sets for i, e in enumerate(examples)]
    too_long = [(n, where) for n, where in lengths if n + room > limit]
    if too_long:
        longest, where = max(too_long)
        others = f" ({len(too_long) - 1} more examples are too long too)" if len(too_long) > 1 else ""
        raise ContextTooLong(
            f"{where} is too long for the optimizer model: its inputs take {longest} tokens, and with the "
            f"instruction ({len(instruction)}), reasoning ({config.max_reasoning_tokens}) and answer it needs "
            f"{longest + room} tokens, more than the optimizer model's context of {limit}{others}. Shorten its "
            "inputs (or drop it) or the instruction, lower max_reasoning_tokens, or use an optimizer model with a "
            "longer context."
        )
