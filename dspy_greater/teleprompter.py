"""DSPy side: ``GReaTerTeleprompter`` checks input (:mod:`validation`), runs the search per predictor, writes back.

Knows nothing about torch internals: the optimizer model is loaded through :mod:`loading` and
driven through :class:`~dspy_greater.engine.search.GreaterSearch`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import logging
import os
import pathlib
import random
import threading
import typing
from dataclasses import dataclass, replace

import dspy
import numpy as np
import torch
from dspy.teleprompt import Teleprompter
from dspy.utils.exceptions import AdapterParseError
from dspy.utils.logging_utils import configure_dspy_loggers
from tqdm.auto import tqdm

from dspy_greater.engine.text import REASONING_FIELDS, format_inputs
from dspy_greater.targets.adapter import GReaTerAdapter, keep_extractor
from dspy_greater.data import split_examples
from dspy_greater.engine.extractor import Extractor, derive_extractor
from dspy_greater.targets.generation import CompletionServerGenerator, check_generation_server, server_address
from dspy_greater.chat_layout import LAYOUTS, ChatAdapterLayout, make_layout
from dspy_greater.engine.layout import GreaterLayout
from dspy_greater.models.loading import ModelSpec, load_optimizer_model, validate_model_spec
from dspy_greater.engine.model import OptimizerLM
from dspy_greater.engine.config import GreaterConfig
from dspy_greater.engine.search import GreaterSearch, SearchExample, SearchResult, _eval_dict
from dspy_greater.start import PROGRAM_INSTRUCTION, is_generated_instruction, reasoning_instruction
from dspy_greater.validation import (SCALAR_TYPES, build_config, check_examples, check_instruction, check_label_space,
                                     deduplicated, is_text_type, unsupported_reason)

logger = logging.getLogger(__name__)
# This package's messages reach the user the way DSPy's own do (same stream, format and INFO level), and
# dspy.disable_logging() silences them too.
configure_dspy_loggers("dspy_greater")
# Fewer held-out examples than this get a warning (benchmarks/README.md, section 2: on 12, the held-out gain
# overstated the test gain about tenfold).
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


class _ContextTooLong(ValueError):
    """An example or the instruction does not fit the optimizer model's context."""


@dataclass
class _Plan:
    """What one predictor of a multi-predictor program needs (found before any model work)."""

    name: str
    inputs: tuple[str, ...]
    output: str
    instruction: str
    gold: bool = False  # its output field is a label of every trainset example
    inputs_given: bool = False  # every trainset example holds all its inputs
    extractor: Extractor | None = None  # derived from the gold labels
    skip: str | None = None  # why it cannot be optimized at all


class _Run:
    """One run of the program on one example: its prediction, trace and whether it passed the metric."""

    __slots__ = ("prediction", "trace", "calls", "error", "passed")

    def __init__(self, prediction, trace, calls, error):
        self.prediction, self.trace, self.calls, self.error, self.passed = prediction, trace, calls, error, False


class _Runs:
    """Runs of the program on a set of examples, turned into labelled examples for one predictor."""

    def __init__(self, runs: list[tuple[dspy.Example, _Run]]):
        self.runs = runs

    def examples(self, plan: _Plan) -> list[dspy.Example]:
        """Gold labels: the predictor's inputs in each run (its last call) with the example's label.
        Otherwise: every call of the predictor in the runs that passed the metric (inputs -> its output)."""
        found = []
        for example, run in self.runs:
            calls = [(inputs, outputs) for name, inputs, outputs in run.calls if name == plan.name]
            if not calls:
                continue
            if plan.gold:
                pairs = [(calls[-1][0], example[plan.output])]
            elif run.passed:
                pairs = [(inputs, getattr(outputs, "get", lambda _: None)(plan.output)) for inputs, outputs in calls]
            else:
                continue
            for inputs, label in pairs:
                if not isinstance(label, SCALAR_TYPES) or not str(label).strip():
                    continue
                if any(not isinstance(inputs.get(f), SCALAR_TYPES) for f in plan.inputs):
                    continue
                found.append(dspy.Example({f: inputs[f] for f in plan.inputs}, **{plan.output: label})
                             .with_inputs(*plan.inputs))
        return found

    def summary(self, plan: _Plan) -> dict:
        errors = [run.error for _, run in self.runs if run.error]
        return {"runs": len(self.runs), "passed": sum(run.passed for _, run in self.runs),
                "reached": sum(any(name == plan.name for name, _, _ in run.calls) for _, run in self.runs),
                "errors": len(errors), "first_error": errors[0] if errors else None,
                "examples": len(self.examples(plan))}


class GReaTerTeleprompter(Teleprompter):
    """Optimizes each predictor's instruction with GReaTer's gradient-over-reasoning token search.

    The search runs on a small local optimizer model in PyTorch; the returned program keeps its
    own target LM and gets the optimized instruction.

    Args:
        metric: ``metric(example, prediction, trace=None)``; scores programs on the target LM.
        model: Optimizer model: a Hugging Face hub id, a local folder, a ``.gguf`` file, a
            :class:`ModelSpec`, or ``None`` for the embedded SmolLM2-135M-Instruct.
        config: A :class:`GreaterConfig` (or a dict of its fields); keyword arguments override it.
        extractor: Answer extractor text or :class:`Extractor`; derived from the signature and
            labels when ``None``.
        initial_instruction: Where the search starts. ``None`` (default): in GReaTer's layout, a
            predictor whose instruction DSPy generated from its signature starts from the paper's
            reasoning instruction ("Use proper logical reasoning and think step by step. Finally
            give the actual correct answer."), since under DSPy's generated text a small optimizer
            model answers at once and leaves no reasoning to take a gradient through; any other
            predictor starts from its own instruction. ``"program"``: every predictor starts from
            its own instruction. Any other text: start from it (one predictor only). Either way the
            program's own instruction is the baseline: compile never returns an instruction that
            scored below it on the held-out (or target) examples.
        dtype, device, device_map, cache_dir, trust_remote_code: Model loading options (see
            :class:`ModelSpec`); ignored when ``model`` is a ``ModelSpec``.
        progress: Show a tqdm progress bar.
        target_candidates: How many of the best distinct instructions found by the search (plus the
            initial one) are scored on ``valset`` on the target LM with ``metric``; the best wins.
            The target LM is the predictor's own (``program.set_lm(lm)``) when it has one, else
            ``dspy.settings.lm``; with neither, or without ``valset``, nothing is scored. 0 skips
            this and trusts the optimizer model's held-out score.
        num_threads: Threads for ``dspy.Evaluate`` on the target LM; ``None`` (default) uses
            ``dspy.settings.num_threads`` (``dspy.configure(num_threads=...)``).
        layout: Where the instruction sits in the sequences the optimizer model sees. ``"greater"``:
            the paper's layout (inputs, instruction; reasoning, extractor, answer), which
            ``GReaTerAdapter`` replays on a target. ``"chat_adapter"``: exactly what DSPy's
            ``ChatAdapter`` sends (system message ending with the instruction, the inputs in
            ``[[ ## field ## ]]`` sections, reply ``[[ ## reasoning ## ]]`` ... ``[[ ## answer ## ]]``
            label), for programs that run with ChatAdapter on strong targets. ``"auto"`` (default)
            follows ``dspy.settings.adapter`` at compile time: a ChatAdapter (or JSONAdapter /
            XMLAdapter, whose prompt is ChatAdapter's) -> ``"chat_adapter"``; ``GReaTerAdapter``,
            another adapter or none -> ``"greater"``.
        generation_server: Generate the optimizer model's reasoning on an OpenAI-compatible
            completion server that serves the same weights (a URL such as
            ``"http://127.0.0.1:8000/v1"`` or a :class:`~dspy_greater.targets.llama_cpp.LlamaCppServer`);
            the gradient and scoring stay in PyTorch. Worth it with vLLM on a GPU; on a CPU
            llama-cpp-python's one-request-at-a-time server is no faster than PyTorch (see
            ``benchmarks/README.md``). ``None`` (default) generates in PyTorch.
        generation_model: The model name on that server (default: the first it lists).
        on_step: Called after every search step with the predictor's name and the step's record as
            plain data (position, candidates, finalists with their scores, chosen token, loss,
            instruction, seconds, held-out accuracy when checked): a hook for monitoring.
        **config_overrides: Any :class:`GreaterConfig` field, e.g. ``num_steps=20``.
    """

    def __init__(
        self,
        metric: typing.Callable | None = None,
        *,
        model: str | ModelSpec | None = None,
        config: GreaterConfig | dict | None = None,
        extractor: str | Extractor | None = None,
        initial_instruction: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        device_map: str | dict | None = None,
        cache_dir: str | None = None,
        trust_remote_code: bool = False,
        progress: bool = True,
        target_candidates: int = 4,
        num_threads: int | None = None,
        layout: str = "auto",
        generation_server=None,
        generation_model: str | None = None,
        on_step: typing.Callable[[str, dict], None] | None = None,
        **config_overrides,
    ):
        super().__init__()
        if generation_server is not None:
            server_address(generation_server)  # a bad value fails here, not after the model has loaded
        self.generation_server = generation_server
        self.generation_model = generation_model
        if on_step is not None and not callable(on_step):
            raise TypeError(f"on_step must be callable as on_step(predictor_name, record), got {type(on_step).__name__}.")
        self.on_step = on_step
        if not isinstance(layout, str) or layout not in LAYOUTS:
            close = difflib.get_close_matches(str(layout), LAYOUTS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"layout must be one of {', '.join(repr(x) for x in LAYOUTS)}, got {layout!r}.{hint}")
        self.layout = layout
        if metric is not None and not callable(metric):
            raise TypeError(
                f"metric must be callable as metric(example, prediction, trace=None), got {type(metric).__name__}; "
                "pass a function such as dspy_greater.metrics.exact_match."
            )
        self.metric = metric
        self.config = build_config(config, config_overrides)
        if isinstance(model, ModelSpec):
            self.model_spec = model
        else:
            self.model_spec = ModelSpec(
                name_or_path=None if model is None else str(model), dtype=dtype, device=device,
                device_map=device_map, cache_dir=cache_dir, trust_remote_code=trust_remote_code,
            )
        validate_model_spec(self.model_spec)
        if extractor is not None and not isinstance(extractor, (str, Extractor)):
            raise TypeError("extractor must be a str, an Extractor or None.")
        if initial_instruction is not None and not str(initial_instruction).strip():
            raise ValueError("initial_instruction is empty; pass None to start from the predictor's instruction.")
        if initial_instruction is not None:
            check_instruction(str(initial_instruction), "initial_instruction")
        self.extractor = extractor
        self.initial_instruction = initial_instruction
        self.progress = progress
        if not isinstance(target_candidates, int) or target_candidates < 0:
            raise ValueError(f"target_candidates must be a non-negative integer, got {target_candidates!r}.")
        self.target_candidates = target_candidates
        self.num_threads = num_threads
        self._lm: OptimizerLM | None = None
        self._warned: set[str] = set()  # warnings given once per compile

    # -- public API ----------------------------------------------------------------------------------

    def compile(
        self,
        student: dspy.Module,
        *,
        trainset: list,
        teacher=None,
        valset: list | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
    ) -> dspy.Module:
        """Optimize ``student``'s instructions; return an optimized copy (``student`` is untouched).

        Args:
            student: A program with one or more ``dspy.Predict`` / ``dspy.ChainOfThought`` predictors.
                Several predictors are optimized in turn, in ``named_predictors()`` order (see
                "Programs with several predictors" below).
            trainset: Labelled ``dspy.Example``s with ``with_inputs`` set. Exact repeats (same inputs,
                same canonical label) are used once; examples with the same inputs but different
                labels are all kept; both are logged as warnings. ``valset`` is used as given.
            teacher: Unused (accepted for DSPy compatibility).
            valset: Held-out examples; the best instruction is chosen on them. Defaults to a
                seeded quarter of ``trainset`` (or all of it when it is tiny); an empty list counts
                as ``None`` (with a warning), as DSPy's ``BetterTogether`` passes one for tiny trainsets.
            checkpoint_dir: Folder for one JSON checkpoint per predictor (``<name>.json``), written
                after every step. Calling ``compile`` again with the same folder and inputs resumes
                where the last run stopped. Ctrl-C returns the best program so far and keeps it.

        Returns:
            A deep copy of ``student`` with the optimized instructions and a plain-data
            ``greater_results`` attribute: per predictor name, the search result as a dict, or
            ``{"skipped": True, "reason": ...}`` for a predictor that was left as it was.

        Programs with several predictors: a predictor whose output field is a label of the trainset
        examples (usually the last) is optimized for those gold labels; any other predictor gets
        its labels from runs of the (current) program on the target LM whose result passes
        ``metric``: each call of the predictor in such a run becomes an example (its inputs -> its
        output). A predictor whose inputs are produced by earlier predictors gets them from such
        runs too. Without a target LM (``dspy.settings.lm`` or ``program.set_lm``), or when no run
        passes, that predictor is skipped; tool-using (ReAct-style), ``dspy.History`` and non-text
        predictors are skipped too. Each predictor's final instruction is chosen on ``valset`` with
        the whole program's ``metric`` on the target LM (the other predictors at their current
        instructions) when one is available, else on the optimizer model's held-out score.
        """
        if teacher is not None:
            logger.warning("GReaTer: teacher is not used (GReaTer searches the student's instructions on its optimizer "
                           "model); leave it unset.")
        with _info_logs(self.progress):
            return self._compile(student, trainset, valset, checkpoint_dir)

    def _compile(self, student, trainset, valset, checkpoint_dir) -> dspy.Module:
        if valset is not None and hasattr(valset, "__len__") and not isinstance(valset, (str, bytes)) and not len(valset):
            # BetterTogether passes valset=[] when the trainset is too small to split.
            logger.warning("valset is empty; treating it as None (choosing on a held-out part of trainset).")
            valset = None
        self._warned: set[str] = set()
        if isinstance(student, dspy.Module) and len(student.named_predictors()) > 1:
            return self._compile_several(student, trainset, valset, checkpoint_dir)
        name, predictor, task = self._prepare(student, trainset, valset)
        train, heldout = self._split(deduplicated(trainset, task), valset, task)
        select = self._selects_on_target(valset, _target_lm(predictor)[0] is not None)
        results, chosen = self._optimize(student, task, train, heldout, valset if select else None, checkpoint_dir,
                                         [("trainset", list(trainset)), ("valset", list(valset or []))])
        program = _with_instruction(student, name, chosen)
        program.greater_results = {name: results}
        _keep_extractors(program)
        _attach_scores(program)
        return program

    def _optimize(self, program, task: PredictorTask, train, heldout, selection_valset, checkpoint_dir,
                  named_sets) -> tuple[dict, str]:
        """Search one predictor's instruction; with ``selection_valset``, choose among the best on the target LM.

        ``program`` is the program the candidates are scored in (for several predictors: the others
        at their current instructions). Returns (the result as plain data, the chosen instruction).
        """
        name = task.name
        self._seed()
        search = self._search(task)
        initial = self._start(task, search.layout.name)
        self._check_context(search, initial, task, named_sets)
        bar = tqdm(total=self.config.num_steps, desc=f"GReaTer [{name}]", disable=not self.progress)

        def on_step(record):
            bar.update(1)
            bar.set_postfix(loss=f"{record.loss:.3f}", pos=record.position)
            logger.info("step %d pos %d chose %r: %s", record.step, record.position, record.chosen, record.instruction)
            if self.on_step is not None:
                self.on_step(name, dataclasses.asdict(record))

        try:
            checkpoint = pathlib.Path(checkpoint_dir) / f"{_safe_name(name)}.json" if checkpoint_dir is not None else None
            result = search.run(initial, [task.search_example(e, search.layout) for e in train],
                                [task.search_example(e, search.layout) for e in heldout], progress=on_step,
                                checkpoint=checkpoint)
        finally:
            bar.close()
        results = _result_dict(result, task)
        results["extractor"]["text"] = search.extractor.text  # the layout's own (ChatAdapter's answer marker)
        results["layout"] = dict(getattr(search, "layout_info", None) or {"name": search.layout.name})
        answers = [p for entry in result.top_instructions for p in entry["predictions"]]
        if answers and all(p is None for p in answers):
            logger.warning(
                "GReaTer [%s]: the optimizer model gave no answer that parses on any held-out example in the %s layout "
                "(its replies do not follow that format), so the held-out check cannot tell the instructions apart. "
                "Use a larger optimizer model (model=...), or layout='greater' with GReaTerAdapter on the target.",
                name, results["layout"]["name"])
        chosen = result.best_instruction
        results["program_instruction"] = task.instruction
        if initial != task.instruction and result.trace:  # the program's own text is the baseline to beat
            own = search.evaluate(search.layout.encode_instruction(task.instruction),
                                  [task.search_example(e, search.layout) for e in heldout or train])
            results["program_heldout"] = _eval_dict(own)
            if own.key() > (result.best_heldout["accuracy"], -result.best_heldout["mean_loss"]):
                chosen = task.instruction
        if result.stopped_reason == "interrupted":
            logger.warning("Interrupted: returning the best instruction found so far, without target-LM selection.")
        elif selection_valset:
            results["target_selection"] = self._select_on_target(program, name, task, result, selection_valset,
                                                                 results["layout"]["name"])
            chosen = results["target_selection"]["chosen"]
        logger.info("GReaTer [%s]: %r -> %r (held-out accuracy on the optimizer model %.3f -> %.3f)", name,
                    result.initial_instruction, result.best_instruction,
                    result.initial_heldout["accuracy"], result.best_heldout["accuracy"])
        return results, chosen

    # -- several predictors ------------------------------------------------------------------------------

    def _compile_several(self, student, trainset, valset, checkpoint_dir) -> dspy.Module:
        predictors = student.named_predictors()
        names = [n for n, _ in predictors]
        if self.initial_instruction not in (None, PROGRAM_INSTRUCTION):
            raise ValueError(
                f"initial_instruction sets one predictor's starting instruction, but this program has {len(names)} "
                f"({', '.join(names)}). Set each predictor's instruction on the program instead "
                "(predictor.signature = predictor.signature.with_instructions(text)) and leave initial_instruction unset."
            )
        check_examples(trainset, "trainset", (), [])
        if valset is not None:
            check_examples(valset, "valset", (), [])
        plans = [self._plan(n, p, trainset, valset) for n, p in predictors]  # every input check before any work
        target_ready = all(_target_lm(p)[0] is not None for _, p in predictors)
        instructions = {n: p.signature.instructions for n, p in predictors}
        extractors = {plan.output: plan.extractor for plan in plans if plan.extractor is not None}
        runs_cache: dict[tuple, dict[str, _Runs]] = {}
        results: dict[str, dict] = {}
        stopped = None  # after Ctrl-C, the remaining predictors are left as they are
        for plan in plans:
            reason = stopped or plan.skip or self._why_not(plan, target_ready)
            if reason is None:
                try:
                    with dspy.context(adapter=_adapter_with(extractors)):
                        outcome = self._optimize_in_program(student, plan, instructions, trainset, valset, target_ready,
                                                            checkpoint_dir, runs_cache)
                except KeyboardInterrupt:
                    stopped = outcome = "the compile was interrupted (Ctrl-C) before this predictor was done."
                if isinstance(outcome, tuple):
                    entry, chosen, task = outcome
                    results[plan.name] = entry
                    instructions[plan.name] = chosen
                    extractors.setdefault(task.output_field, task.extractor)
                    if entry.get("stopped_reason") == "interrupted":
                        stopped = "the compile was interrupted (Ctrl-C) while an earlier predictor was optimized."
                    continue
                reason = outcome
            logger.warning("GReaTer: predictor %r skipped: %s", plan.name, reason)
            results[plan.name] = {"skipped": True, "reason": reason, "instruction": instructions[plan.name]}
        program = student.deepcopy()
        for n, p in program.named_predictors():
            p.signature = p.signature.with_instructions(instructions[n])
        program.greater_results = results
        _keep_extractors(program)
        _attach_scores(program)
        done = [n for n in names if not results[n].get("skipped")]
        logger.info("GReaTer: optimized %d of %d predictors (%s)%s.", len(done), len(names), ", ".join(done) or "none",
                    "" if len(done) == len(names) else
                    "; skipped: " + ", ".join(n for n in names if results[n].get("skipped")))
        return program

    def _plan(self, name, predictor, trainset, valset) -> _Plan:
        """What one predictor of a multi-predictor program needs; raises on bad data, skips unsupported predictors."""
        signature = predictor.signature
        inputs = tuple(signature.input_fields)
        outputs = [k for k in signature.output_fields if k not in REASONING_FIELDS]
        reason = unsupported_reason(signature)
        if reason is None and not outputs:
            reason = "its signature has no output field to optimize for."
        if reason is not None:
            return _Plan(name, inputs, outputs[0] if outputs else "", signature.instructions, skip=reason)
        check_instruction(signature.instructions, f"The instruction of predictor {name!r}")
        output = outputs[0]
        labelled = [output in e.labels() for e in trainset]
        inputs_given = all(f in e.inputs() for e in trainset for f in inputs)
        plan = _Plan(name, inputs, output, signature.instructions, gold=all(labelled), inputs_given=inputs_given)
        if any(labelled) and not plan.gold:
            missing = labelled.index(False)
            raise ValueError(
                f"trainset[{missing}] has no label {output!r}, but other examples have one. Predictor {name!r} is "
                f"optimized for the gold {output!r} labels when every example has one, else for the outputs of "
                "successful program runs; give every example the label or none."
            )
        if not plan.gold:
            return plan
        given = inputs if inputs_given else ()
        check_examples(trainset, "trainset", given, outputs)
        if valset is not None:
            check_examples(valset, "valset", given, outputs)
        desc = (signature.fields[output].json_schema_extra or {}).get("desc")
        texts = [format_inputs([f for f in inputs if f in e], e) for e in trainset]
        extractor = derive_extractor(output, desc, [e[output] for e in trainset], texts, override=self.extractor)
        check_label_space(extractor, output, [("trainset", trainset), ("valset", valset)])
        plan.extractor = extractor
        return plan

    def _why_not(self, plan: _Plan, target_ready: bool) -> str | None:
        """Why ``plan``'s predictor cannot be optimized in this setting (``None``: it can)."""
        if plan.gold and plan.inputs_given:
            return None
        no_target = ("no target LM is configured (dspy.configure(lm=...) or program.set_lm(...) for every "
                     "predictor)")
        if not plan.gold:
            if not target_ready:
                return (f"its output {plan.output!r} is not a label in trainset, so its labels must come from runs of "
                        f"the program on the target LM that pass the metric, and {no_target}.")
            if self.metric is None:
                return (f"its output {plan.output!r} is not a label in trainset, so its labels must come from runs of "
                        "the program that pass the metric, and no metric was given.")
            return None
        if not target_ready:
            return (f"its inputs {', '.join(repr(f) for f in plan.inputs)} are not all in the trainset examples (they "
                    f"come from earlier predictors), so the program must run on the target LM to produce them, and "
                    f"{no_target}.")
        return None

    def _optimize_in_program(self, student, plan: _Plan, instructions, trainset, valset, target_ready, checkpoint_dir,
                             runs_cache):
        """Optimize one predictor of a multi-predictor program: (entry, chosen instruction, task), or a skip reason."""
        working = _program_with(student, instructions)
        entry_extra: dict = {"labels": "gold" if plan.gold else "traces"}
        if plan.gold and plan.inputs_given:
            train, heldout_given = list(trainset), list(valset or [])
        else:
            key = tuple(sorted(instructions.items()))
            if key not in runs_cache:
                runs_cache[key] = {"trainset": self._run_program(working, trainset)}
                if valset:
                    runs_cache[key]["valset"] = self._run_program(working, valset)
            runs = runs_cache[key]
            train = runs["trainset"].examples(plan)
            heldout_given = runs["valset"].examples(plan) if "valset" in runs else []
            entry_extra["program_runs"] = {what: r.summary(plan) for what, r in runs.items()}
            if not train:
                summary = runs["trainset"].summary(plan)
                why = ("no run of the program passed the metric" if not plan.gold
                       else "no run of the program reached this predictor")
                detail = f"{summary['runs']} runs on trainset, {summary['passed']} passed the metric, " \
                         f"{summary['reached']} reached this predictor, {summary['errors']} raised"
                if summary["first_error"]:
                    detail += f" (first error: {summary['first_error']})"
                return f"{why}, so it has no labelled examples ({detail})."
        extractor = plan.extractor
        if extractor is None:  # labels from the runs: derive the answer format from them
            signature = dict(student.named_predictors())[plan.name].signature
            desc = (signature.fields[plan.output].json_schema_extra or {}).get("desc")
            seen = [*train, *heldout_given]
            extractor = derive_extractor(plan.output, desc, [e[plan.output] for e in seen],
                                         [format_inputs(plan.inputs, e) for e in seen])
        task = PredictorTask(plan.name, plan.inputs, plan.output, instructions[plan.name], extractor,
                             dict(student.named_predictors())[plan.name].signature)
        train = deduplicated(train, task)
        train, heldout = self._split(train, heldout_given or None, task)
        select = self._selects_on_target(valset, target_ready)
        try:
            entry, chosen = self._optimize(working, task, train, heldout, valset if select else None, checkpoint_dir,
                                           [(f"{plan.name} train", train), (f"{plan.name} held-out", heldout)])
        except _ContextTooLong as exc:
            return str(exc)
        entry.update(entry_extra, examples={"train": len(train), "heldout": len(heldout)})
        return entry, chosen, task

    def _run_program(self, program, examples) -> _Runs:
        """Run ``program`` on ``examples`` on its target LM, recording each run's trace and whether it passed ``metric``."""
        names = {id(p): n for n, p in program.named_predictors()}
        metric = self.metric

        def traced(**inputs):
            with dspy.context(trace=[]):
                try:
                    prediction, error = program(**inputs), None
                except Exception as exc:  # a failing run is data here, not a reason to stop
                    prediction, error = None, f"{type(exc).__name__}: {exc}"
                trace = list(dspy.settings.trace)
            return _Run(prediction, trace, [(names.get(id(p)), dict(i), o) for p, i, o in trace], error)

        def passes(example, run, trace=None):
            if not isinstance(run, _Run) or run.prediction is None or metric is None:
                return False
            try:
                score = metric(example, run.prediction, run.trace)
                run.passed = bool(getattr(score, "score", score))  # a dspy.Prediction(score=..., feedback=...) too
            except Exception as exc:
                run.error = f"the metric raised {type(exc).__name__}: {exc}"
                run.passed = False
            return run.passed

        logger.info("Running the program on %d examples on the target LM to collect traces.", len(examples))
        evaluate = dspy.Evaluate(devset=list(examples), metric=passes, num_threads=self._threads(),
                                 display_progress=self.progress, provide_traceback=False, max_errors=len(examples) + 1)
        outcome = evaluate(traced)
        runs = [(example, run) for example, run, _ in outcome.results if isinstance(run, _Run)]
        return _Runs(runs)

    def _threads(self) -> int:
        """Threads for target-LM evaluation: ``num_threads``, else DSPy's configured number."""
        return self.num_threads if self.num_threads is not None else dspy.settings.num_threads

    def _selects_on_target(self, valset, target_ready: bool) -> bool:
        """Whether the instructions are chosen on the target LM; says once why a given metric goes unused."""
        if not self.target_candidates or self.metric is None:
            return False
        why = None
        if not target_ready:
            why = ("no target LM is configured; configure one with dspy.configure(lm=...) or program.set_lm(...) to "
                   "choose among the best instructions with it")
        elif not valset:
            why = "no valset was given; pass valset=... to choose among the best instructions on the target LM with it"
        if why is not None and "metric" not in self._warned:
            self._warned.add("metric")
            logger.warning("GReaTer: the metric is not used: %s. The instruction is chosen on the optimizer model's "
                           "held-out accuracy instead.", why)
        return why is None

    def _warn_layout_mismatch(self, layout_name: str, adapter) -> None:
        """Warn once when the target runs the program with an adapter other than the one the search modelled."""
        runs_greater = isinstance(adapter, GReaTerAdapter)
        if (layout_name == "greater") == runs_greater or "adapter" in self._warned:
            return
        self._warned.add("adapter")
        running = type(adapter).__name__ if adapter is not None else "ChatAdapter (no adapter is configured)"
        if layout_name == "greater":
            logger.warning(
                "GReaTer: the search optimized the instruction in GReaTer's layout, but the target LM runs the program "
                "with %s, whose prompt and reply format differ (small targets often cannot reply in it, and every "
                "candidate then scores 0). Either run the program with the layout it was optimized in: "
                "dspy.configure(adapter=GReaTerAdapter()) before compile and GReaTerAdapter.from_program(optimized) "
                "after; or optimize for ChatAdapter with layout='chat_adapter'.", running)
        else:
            logger.warning(
                "GReaTer: the search optimized the instruction in ChatAdapter's layout, but the target LM runs the "
                "program with GReaTerAdapter. Use layout='greater' (or 'auto') with GReaTerAdapter, or configure "
                "ChatAdapter for the target.")

    def _select_on_target(self, student, name: str, task: PredictorTask, result: SearchResult, valset,
                          layout_name: str = "greater") -> dict:
        """Score the best distinct instructions on ``valset`` on the target LM; never loses the search result.

        An answer the adapter cannot parse counts as wrong; an LM failure (server down, timeout)
        puts the candidate under ``errors`` instead of giving it a score.

        The target LM is the predictor's own ``lm`` when set (``program.set_lm(...)``), else
        ``dspy.settings.lm``; ``target_lm`` in the result says which (``"predictor.lm"`` or
        ``"dspy.settings.lm"``) and ``target_model`` names its model. Every candidate runs on that
        same LM object, so its history counts the calls.
        """
        ordered = [result.best_instruction, *(t["instruction"] for t in result.top_instructions), result.initial_instruction]
        candidates = list(dict.fromkeys(ordered))[: self.target_candidates]
        if task.instruction not in candidates:
            candidates.append(task.instruction)  # the program's own instruction, the baseline, is always measured
        predictor = dict(student.named_predictors())[name]
        lm, source = _target_lm(predictor)
        adapter = dspy.settings.adapter
        if isinstance(adapter, GReaTerAdapter) and task.output_field not in adapter.extractors:
            adapter = copy.copy(adapter)  # score in the search's own answer format
            adapter.extractors = {**adapter.extractors, task.output_field: task.extractor}
        self._warn_layout_mismatch(layout_name, adapter)
        estimate = len(candidates) * len(valset) * _calls_per_prediction(adapter) * len(student.named_predictors())
        model = str(getattr(lm, "model", type(lm).__name__))
        logger.info("Scoring %d instructions on %d valset examples on the target LM %s (%s): at most %d calls.",
                    len(candidates), len(valset), model, source, estimate)
        history_before = len(getattr(lm, "history", []))
        metric_failures: list[Exception] = []  # dspy.Evaluate would score a raising metric 0 silently
        evaluate = dspy.Evaluate(devset=list(valset), metric=_recording_failures(self.metric, metric_failures),
                                 num_threads=self._threads(), display_progress=self.progress,
                                 provide_traceback=False, max_errors=len(valset) + 1)
        scores, errors, unparsed, target_down = {}, {}, {}, None
        for text in candidates:
            if target_down:
                errors[text] = f"skipped: {target_down}"
                continue
            failures: list[Exception] = []
            metric_failures.clear()
            candidate = _with_instruction(student, name, text)
            _share_lms(candidate, student)  # the deep copy copied the LMs: every candidate uses the same objects
            run = _recording_failures(candidate, failures)
            try:
                with dspy.context(adapter=adapter):
                    outcome = evaluate(run)
            except Exception as exc:  # a failing target must not lose the search result
                errors[text] = f"{type(exc).__name__}: {exc}"
                continue
            lm_failures = [e for e in failures if not isinstance(e, AdapterParseError)]
            if lm_failures:
                errors[text] = (f"{len(lm_failures)} of {len(valset)} examples failed on the target LM: "
                                f"{type(lm_failures[0]).__name__}: {lm_failures[0]}")
                logger.warning("Target-LM evaluation failed for %r: %s", text, errors[text])
                if len(lm_failures) == len(valset):
                    target_down = "the target LM failed on every example of the previous candidate"
                continue
            if metric_failures:
                errors[text] = (f"the metric raised on {len(metric_failures)} of {len(valset)} examples: "
                                f"{type(metric_failures[0]).__name__}: {metric_failures[0]}")
                logger.warning("Target-LM selection: %s for %r; this candidate gets no score.", errors[text], text)
                if len(metric_failures) == len(valset):
                    target_down = "the metric raised on every example of the previous candidate"
                continue
            scores[text] = float(outcome.score)
            if failures:
                unparsed[text] = len(failures)
        history = getattr(lm, "history", [])[history_before:]
        tokens = sum(int((entry.get("usage") or {}).get("total_tokens") or 0) for entry in history)
        if scores and not any(scores.values()) and len(unparsed) == len(scores) and "unparsed" not in self._warned:
            self._warned.add("unparsed")
            logger.warning("GReaTer: every instruction scored 0 on the target LM %s and its replies could not be parsed "
                           "with %s, so the target cannot tell them apart. Run the target with an adapter it can "
                           "follow (GReaTerAdapter for small models) or a stronger target LM.", model,
                           type(adapter).__name__ if adapter is not None else "ChatAdapter")
        chosen = max(scores, key=lambda t: (scores[t], -candidates.index(t))) if scores else result.best_instruction
        baseline = scores.get(task.instruction)
        logger.info("Target LM %s (%s): baseline %s, chosen %.1f (%d calls, %d tokens).", model, source,
                    "n/a" if baseline is None else f"{baseline:.1f}", scores.get(chosen, float("nan")),
                    len(history), tokens)
        return {"candidates": candidates, "scores": scores, "errors": errors, "unparsed": unparsed,
                "chosen": chosen, "baseline": baseline, "estimated_calls": estimate, "calls": len(history),
                "tokens": tokens, "target_lm": source, "target_model": model}

    def optimizer_predictions(self, program: dspy.Module, examples: list,
                              predictor: str | None = None) -> tuple[list[str | None], list[str]]:
        """The optimizer model's answers on ``examples`` under ``program``'s current instruction.

        Runs in the search's layout (inputs, instruction, reasoning, extractor). Returns
        ``(predictions, gold labels)``, both canonical labels. For a program with several
        predictors, name one (``predictor="..."``); ``examples`` must carry its inputs and labels.
        """
        _, predictor, task = self._prepare(program, examples, None, predictor)
        search = self._search(task)
        evaluation = search.evaluate(
            search.layout.encode_instruction(predictor.signature.instructions),
            [task.search_example(e, search.layout) for e in examples],
        )
        return evaluation.predictions, evaluation.labels

    def use_loaded_model(self, model, tokenizer) -> GReaTerTeleprompter:
        """Use an already loaded Hugging Face causal LM and tokenizer as the optimizer model."""
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("The tokenizer has neither a pad token nor an eos token, and batching needs one; set "
                                 "tokenizer.pad_token to one of its tokens (e.g. tokenizer.pad_token = '<pad>' if it "
                                 "has it) before use_loaded_model.")
            tokenizer.pad_token = tokenizer.eos_token
            logger.info("Tokenizer has no pad token; using its eos token %r as pad token.", tokenizer.eos_token)
        model.requires_grad_(False)
        self._lm = OptimizerLM(model.eval(), tokenizer, batch_size=self.config.model_batch_size,
                               context_cache_mb=self.config.inputs_cache_mb, generator=self._generator(tokenizer))
        return self

    def get_params(self) -> dict:
        """Hyper-parameters as plain JSON data (a fresh dict on every call).

        MLflow's DSPy autolog records this and updates the returned dict with the compile
        arguments, so it must be a copy. Callables appear as their names; other objects as ``str``.
        """
        params = {"metric": self.metric, "config": vars(self.config), "model": vars(self.model_spec),
                  "target_candidates": self.target_candidates, "num_threads": self.num_threads,
                  "extractor": vars(self.extractor) if isinstance(self.extractor, Extractor) else self.extractor,
                  "initial_instruction": self.initial_instruction, "progress": self.progress, "layout": self.layout,
                  "generation_server": None if self.generation_server is None else server_address(self.generation_server)[0],
                  "generation_model": self.generation_model}
        return _plain(params)

    # -- steps -----------------------------------------------------------------------------------------

    def _prepare(self, program, trainset, valset, predictor_name: str | None = None):
        """Validate everything that can be checked without the model; derive the predictor's task."""
        if not isinstance(program, dspy.Module):
            raise TypeError(f"student must be a dspy.Module (e.g. dspy.ChainOfThought('question -> answer')), "
                            f"got {type(program).__name__}.")
        predictors = program.named_predictors()
        if not predictors:
            raise ValueError(f"The program ({type(program).__name__}) has no predictors to optimize; give it a "
                             "dspy.Predict or dspy.ChainOfThought.")
        if predictor_name is not None:
            if predictor_name not in dict(predictors):
                raise ValueError(f"The program has no predictor {predictor_name!r}; its predictors: "
                                 f"{', '.join(n for n, _ in predictors)}.")
            name, predictor = predictor_name, dict(predictors)[predictor_name]
        elif len(predictors) != 1:
            raise ValueError(f"The program has {len(predictors)} predictors ({', '.join(n for n, _ in predictors)}); "
                             "name the one to use with predictor=...")
        else:
            name, predictor = predictors[0]
        signature = predictor.signature
        if self.initial_instruction in (None, PROGRAM_INSTRUCTION):
            check_instruction(signature.instructions, f"The instruction of predictor {name!r}")
        inputs = tuple(signature.input_fields)
        outputs = [k for k in signature.output_fields if k not in REASONING_FIELDS]
        for field_name in [*inputs, *outputs]:
            annotation = signature.fields[field_name].annotation
            if not is_text_type(annotation):
                raise TypeError(
                    f"Field {field_name!r} has type {annotation!r}; GReaTer handles text fields only "
                    "(str, int, float, bool or Literal). Convert the field to str or leave this predictor out."
                )
        if not outputs:
            raise ValueError("The predictor's signature has no output field to optimize for.")
        output = outputs[0]
        examples = check_examples(trainset, "trainset", inputs, outputs)
        if valset is not None:
            check_examples(valset, "valset", inputs, outputs)
        labels = [e[output] for e in examples]
        field_info = signature.fields[output]
        desc = (field_info.json_schema_extra or {}).get("desc")
        task = PredictorTask(name, inputs, output, signature.instructions, None, signature)  # type: ignore[arg-type]
        extractor = derive_extractor(output, desc, labels, [task.inputs_text(e) for e in examples],
                                     override=self.extractor)
        task = replace(task, extractor=extractor)
        check_label_space(extractor, output, [("trainset", examples), ("valset", valset)])
        return name, predictor, task

    def _split(self, trainset, valset, task):
        """(train, held-out): ``valset`` as given, else a seeded quarter of ``trainset`` (all of it
        below 8 examples); warns when the held-out examples are too few to choose on reliably."""
        if valset:
            train, heldout = list(trainset), list(valset)
        elif len(trainset) < 8:
            train = heldout = list(trainset)
            logger.warning("GReaTer [%s]: only %d training examples and no valset, so the instruction is chosen on the "
                           "training examples themselves. Pass 8 or more (a quarter is then held out) or a valset.",
                           task.name, len(train))
            return train, heldout
        else:
            heldout, train = split_examples(trainset, [max(2, len(trainset) // 4), None], self.config.seed)
        if len(heldout) < RELIABLE_HELDOUT:
            logger.warning(
                "GReaTer [%s]: the instruction is chosen on %d held-out examples (%s); one example moves their accuracy "
                "by %.3f, so the chosen instruction's held-out gain overstates its gain on new examples. Pass a valset "
                "of %d or more examples for a more reliable choice.",
                task.name, len(heldout), "valset" if valset else "a quarter of trainset", 1 / len(heldout),
                RELIABLE_HELDOUT)
        return train, heldout

    def _seed(self):
        random.seed(self.config.seed)
        np.random.seed(self.config.seed)
        torch.manual_seed(self.config.seed)

    def _optimizer_lm(self) -> OptimizerLM:
        if self._lm is None:
            served = None
            if self.generation_server is not None:  # a server that is down fails now, not after the model loads
                served = check_generation_server(self.generation_server, self.generation_model)
            with _weight_loading_bars(self.progress):
                model, tokenizer = load_optimizer_model(self.model_spec)
            self._lm = OptimizerLM(model, tokenizer, batch_size=self.config.model_batch_size,
                                   context_cache_mb=self.config.inputs_cache_mb,
                                   generator=self._generator(tokenizer, served))
        return self._lm

    def _generator(self, tokenizer, served: str | None = None) -> CompletionServerGenerator | None:
        """The server generator, or None; ``served`` is the model name already checked on the server."""
        if self.generation_server is None:
            return None
        return CompletionServerGenerator(self.generation_server, tokenizer, model=served or self.generation_model)

    def _search(self, task: PredictorTask) -> GreaterSearch:
        lm = self._optimizer_lm()
        layout, info = self._layout(task, lm.tokenizer)
        search = GreaterSearch(lm, layout, task.extractor, self.config)
        search.layout_info = info
        return search

    def _layout(self, task: PredictorTask, tokenizer) -> tuple[GreaterLayout, dict]:
        """The layout to search in, from ``layout=`` and the adapter the program will run with.

        ``"auto"``: ``dspy.settings.adapter`` decides. A ``ChatAdapter`` -> the chat_adapter layout
        with that adapter (``JSONAdapter`` and ``XMLAdapter`` included: their own messages and replies;
        an adapter whose replies cannot be modelled, such as ``JSONAdapter`` with a non-text answer,
        gets a plain ``ChatAdapter``'s, the nearest ones); ``GReaTerAdapter``, another adapter,
        or none -> the paper's layout (none: this package's default pipeline, and what
        ``GReaTerAdapter`` replays on small targets; set ``layout="chat_adapter"`` for a program
        that will run with DSPy's default ``ChatAdapter``).
        """
        adapter = dspy.settings.adapter
        configured = type(adapter).__name__ if adapter is not None else None
        if self.layout == "greater" or (self.layout == "auto" and not isinstance(adapter, dspy.ChatAdapter)):
            why = ("layout='greater'" if self.layout == "greater" else
                   "auto: no adapter configured" if adapter is None else f"auto: the configured adapter is {configured}")
            return GreaterLayout(tokenizer), {"name": "greater", "adapter": configured, "reason": why}
        why = "layout='chat_adapter'" if self.layout == "chat_adapter" else f"auto: the configured adapter is {configured}"
        chat = adapter if isinstance(adapter, dspy.ChatAdapter) else None
        try:
            layout = make_layout("chat_adapter", tokenizer, signature=task.signature, output_field=task.output_field,
                                 adapter=chat)
        except TypeError as error:  # e.g. JSONAdapter with a non-text answer: model ChatAdapter's replies instead
            layout = make_layout("chat_adapter", tokenizer, signature=task.signature, output_field=task.output_field)
            why += f" ({error} ChatAdapter's replies are modelled instead.)"
        if self.extractor is not None:
            logger.warning("The chat_adapter layout scores the label right after ChatAdapter's answer marker %r; "
                           "the extractor option is not used in it.", layout.extractor_text)
        logger.info("GReaTer [%s]: searching in the chat_adapter layout (%s).", task.name, why)
        return layout, {"name": "chat_adapter", "adapter": type(layout.adapter).__name__, "reason": why}

    def _start(self, task: PredictorTask, layout_name: str) -> str:
        """The instruction the search starts from (see ``initial_instruction``)."""
        if self.initial_instruction not in (None, PROGRAM_INSTRUCTION):
            return self.initial_instruction
        if self.initial_instruction is None and layout_name == "greater" and is_generated_instruction(task.signature):
            start = reasoning_instruction(task.output_field)
            logger.info("GReaTer [%s]: the instruction is DSPy's generated one; the search starts from %r, and the "
                        "program's own instruction is the baseline.", task.name, start)
            return start
        return task.instruction

    def _check_context(self, search: GreaterSearch, initial: str, task: PredictorTask, named_sets) -> None:
        """Fail before any step when an example's sequence cannot fit the model's context.

        ``named_sets``: ``[("trainset", examples), ("valset", examples)]``, so the error names the example.
        """
        limit = getattr(search.lm.model.config, "max_position_embeddings", None)
        if not limit:
            return
        instruction = search.layout.encode_instruction(initial)
        room = self.config.max_reasoning_tokens + len(search.extractor_ids) + 16
        room += max(len(instruction), self.config.max_instruction_tokens)
        bare = len(search.layout.prompt("", []).ids)
        if bare + room > limit:  # not even empty inputs fit: the instruction or the reasoning budget is too long
            raise _ContextTooLong(
                f"The instruction ({len(instruction)} tokens), reasoning ({self.config.max_reasoning_tokens}) and answer "
                f"alone need {bare + room} tokens, more than the optimizer model's context of {limit}. Shorten the "
                "instruction, lower max_reasoning_tokens, or use a model with a longer context."
            )
        lengths = [(len(search.layout.prompt(task.search_inputs(e, search.layout), []).ids), f"{what}[{i}]")
                   for what, examples in named_sets for i, e in enumerate(examples)]
        too_long = [(n, where) for n, where in lengths if n + room > limit]
        if too_long:
            longest, where = max(too_long)
            others = f" ({len(too_long) - 1} more examples are too long too)" if len(too_long) > 1 else ""
            raise _ContextTooLong(
                f"{where} is too long for the optimizer model: its inputs take {longest} tokens, and with the "
                f"instruction ({len(instruction)}), reasoning ({self.config.max_reasoning_tokens}) and answer it needs "
                f"{longest + room} tokens, more than the optimizer model's context of {limit}{others}. Shorten its "
                "inputs (or drop it) or the instruction, lower max_reasoning_tokens, or use an optimizer model with a "
                "longer context."
            )


# -- helpers -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _weight_loading_bars(shown: bool):
    """transformers' weight-loading progress bars: shown with ``progress=True`` only."""
    from transformers.utils import logging as hf_logging

    was_shown = hf_logging.is_progress_bar_enabled()
    if not shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_shown and not shown:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _info_logs(shown: bool):
    """This package's INFO messages while compiling: shown with ``progress=True``, else warnings only."""
    package = logging.getLogger("dspy_greater")
    level = package.level
    if not shown:
        package.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        package.setLevel(level)


def _calls_per_prediction(adapter) -> int:
    """The most target-LM calls one prediction costs under ``adapter`` (``None``: DSPy's default ChatAdapter)."""
    if isinstance(adapter, GReaTerAdapter):
        return 2  # the reasoning, then the answer
    if adapter is None or (isinstance(adapter, dspy.ChatAdapter) and not isinstance(adapter, dspy.JSONAdapter)
                           and adapter.use_json_adapter_fallback):
        return 2  # a reply ChatAdapter cannot parse is asked again through JSONAdapter
    return 1


def _adapter_with(extractors: dict[str, Extractor]):
    """The configured adapter; a ``GReaTerAdapter`` also gets ``extractors`` for fields it has none for."""
    adapter = dspy.settings.adapter
    if isinstance(adapter, GReaTerAdapter):
        missing = {k: v for k, v in extractors.items() if k not in adapter.extractors}
        if missing:
            adapter = copy.copy(adapter)
            adapter.extractors = {**missing, **adapter.extractors}
    return adapter


def _attach_scores(program: dspy.Module) -> None:
    """``score`` and ``candidate_programs`` where DSPy's optimizers put them, as plain data on one scale
    (percent: target-LM scores from ``dspy.Evaluate``, else held-out accuracy on the optimizer model).

    ``candidate_programs`` lists each scored instruction as ``{"predictor", "instruction", "score",
    "scored_on"}``, best first; programs themselves are not attached (they would join the returned
    program's parameters and its saved state).
    """
    candidates = []
    for name, result in program.greater_results.items():
        if result.get("skipped"):
            continue
        selection = result.get("target_selection") or {}
        if selection.get("scores"):
            scored = [(text, score, "target") for text, score in selection["scores"].items()]
        else:
            scored = [(t["instruction"], 100 * t["accuracy"], "held-out") for t in result["top_instructions"]]
            if result.get("program_heldout"):
                scored.append((result["program_instruction"], 100 * result["program_heldout"]["accuracy"], "held-out"))
        candidates += [{"predictor": name, "instruction": text, "score": score, "scored_on": where}
                       for text, score, where in scored]
    candidates.sort(key=lambda c: -c["score"])
    program.candidate_programs = candidates
    chosen = {n: p.signature.instructions for n, p in program.named_predictors()}
    mine = [c["score"] for c in candidates if chosen.get(c["predictor"]) == c["instruction"]]
    program.score = mine[-1] if mine else None


def _keep_extractors(program: dspy.Module) -> None:
    """Store each optimized predictor's extractor in its saved state, so a saved and loaded program
    replays the prompts ``GReaTerAdapter.from_program`` builds for the compiled one."""
    predictors = dict(program.named_predictors())
    for name, result in program.greater_results.items():
        if result.get("extractor") and name in predictors:
            keep_extractor(predictors[name], result["extractor"])


def _share_lms(program: dspy.Module, original: dspy.Module) -> None:
    """Point ``program``'s predictors (a deep copy of ``original``) back at ``original``'s own LM objects."""
    originals = dict(original.named_predictors())
    for name, predictor in program.named_predictors():
        lm = getattr(originals.get(name), "lm", None)
        if lm is not None:
            predictor.lm = lm


def _program_with(student: dspy.Module, instructions: dict[str, str]) -> dspy.Module:
    """A working copy of ``student`` with ``instructions``, running on ``student``'s own LM objects."""
    program = student.deepcopy()
    for name, predictor in program.named_predictors():
        predictor.signature = predictor.signature.with_instructions(instructions[name])
    _share_lms(program, student)
    return program


def _plain(value):
    """``value`` as JSON data: containers copied, callables by name, anything else non-scalar as ``str``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if callable(value):
        return getattr(value, "__name__", None) or type(value).__name__
    return str(value)


def _recording_failures(function, failures: list[Exception]):
    """Wrap a program or metric so exceptions are recorded (``dspy.Evaluate`` keeps only a score of 0)."""
    lock = threading.Lock()

    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            with lock:
                failures.append(exc)
            raise

    run.__name__ = getattr(function, "__name__", "run")  # dspy.Evaluate names the metric's column by it
    return run


def _target_lm(predictor) -> tuple[object | None, str]:
    """The LM a predictor runs on and where it comes from: its own ``lm``, else ``dspy.settings.lm``."""
    own = getattr(predictor, "lm", None)
    if own is not None:
        return own, "predictor.lm"
    return dspy.settings.lm, "dspy.settings.lm"


def _with_instruction(program: dspy.Module, name: str, instruction: str) -> dspy.Module:
    copy = program.deepcopy()
    predictor = dict(copy.named_predictors())[name]
    predictor.signature = predictor.signature.with_instructions(instruction)
    return copy


def _result_dict(result: SearchResult, task: PredictorTask) -> dict:
    data = result.to_dict()
    data["extractor"] = {"field": task.output_field, "kind": task.extractor.kind, "text": task.extractor.text, "choices": list(task.extractor.choices)}
    return data


def _safe_name(name: str) -> str:
    """A predictor name as a file name (``"steps[0].predict"`` -> ``"steps_0_.predict"``)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "predictor"
