"""``GReaTerTeleprompter``: DSPy's optimizer interface around the GReaTer search engine.

One pipeline for programs of any size: plan every predictor (:mod:`planning`, before the model
loads), then per predictor gather its examples (the trainset, or runs of the program), search its
instruction on the optimizer model (:mod:`engine`), check it against the program's own, choose on
the target LM (:mod:`selection`), and write the chosen instructions into a copy of the program
with the results (:mod:`results`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
import pathlib
import typing

import dspy
from dspy.teleprompt import Teleprompter
from dspy.utils.logging_utils import configure_dspy_loggers
from tqdm.auto import tqdm

from dspy_greater.chat_layout import LAYOUTS, choose_layout
from dspy_greater.engine.config import GreaterConfig
from dspy_greater.engine.extractor import Extractor
from dspy_greater.engine.model import OptimizerLM
from dspy_greater.engine.search import GreaterSearch
from dspy_greater.models.loading import ModelSpec, load_optimizer_model, validate_model_spec
from dspy_greater.planning import (ContextTooLong, Plan, PredictorTask, check_context, deduplicated, plan_program,
                                   predictor_task, split_heldout, why_not)
from dspy_greater.program_runs import Runs, run_program
from dspy_greater.results import PredictorResult, SkippedPredictor, attach
from dspy_greater.selection import (TargetSetting, Warnings, adapter_with, program_with, select_on_target,
                                    selects_on_target, target_lm)
from dspy_greater.start import PROGRAM_INSTRUCTION, is_generated_instruction, reasoning_instruction
from dspy_greater.targets.generation import CompletionServerGenerator, check_generation_server, server_address
from dspy_greater.validation import build_config, check_instruction

logger = logging.getLogger(__name__)
# This package's messages reach the user the way DSPy's own do (same stream, format and INFO level), and
# dspy.disable_logging() silences them too.
configure_dspy_loggers("dspy_greater")
_INTERRUPTED = "the compile was interrupted (Ctrl-C) before this predictor was done."


@dataclasses.dataclass
class _Compile:
    """What one compile call shares between its predictors."""

    student: dspy.Module
    trainset: list
    valset: list | None
    checkpoint_dir: str | os.PathLike | None
    target_ready: bool
    selecting: bool
    single: bool
    warnings: Warnings
    instructions: dict[str, str]  # each predictor's current instruction
    extractors: dict[str, Extractor]  # answer formats by output field, for a GReaTerAdapter on the target
    runs: dict[tuple, dict[str, Runs]] = dataclasses.field(default_factory=dict)


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
            the gradient and scoring stay in PyTorch. Meant for vLLM on a GPU; a server that answers
            one request at a time gains nothing over PyTorch. ``None`` (default) generates in PyTorch.
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
        plans = plan_program(student, trainset, valset, extractor=self.extractor,
                             initial_instruction=self.initial_instruction)  # every input check before any work
        predictors = student.named_predictors()
        warnings = Warnings()
        target_ready = all(target_lm(p)[0] is not None for _, p in predictors)
        run = _Compile(student, list(trainset), None if valset is None else list(valset), checkpoint_dir, target_ready,
                       selects_on_target(self.metric, self.target_candidates, valset, target_ready, warnings), len(plans) == 1, warnings,
                       {n: p.signature.instructions for n, p in predictors},
                       {plan.output: plan.extractor for plan in plans if plan.extractor is not None})
        results: dict[str, PredictorResult | SkippedPredictor] = {}
        stopped = None  # after Ctrl-C, the remaining predictors are left as they are
        for plan in plans:
            reason = stopped or why_not(plan, target_ready, self.metric is not None)
            if reason is None:
                try:
                    with dspy.context(adapter=adapter_with(run.extractors)):
                        outcome = self._optimize(run, plan)
                except KeyboardInterrupt:
                    if run.single:
                        raise
                    stopped = outcome = _INTERRUPTED
                if isinstance(outcome, PredictorResult):
                    results[plan.name] = outcome
                    run.instructions[plan.name] = outcome.instruction
                    if outcome.search.stopped_reason == "interrupted":
                        stopped = "the compile was interrupted (Ctrl-C) while an earlier predictor was optimized."
                    continue
                reason = outcome
            logger.warning("GReaTer: predictor %r skipped: %s", plan.name, reason)
            results[plan.name] = SkippedPredictor(reason, run.instructions[plan.name])
        program = program_with(student, run.instructions, share_lms=False)
        attach(program, results)
        if not run.single:
            done = [n for n, r in results.items() if not r.skipped]
            skipped = [n for n, r in results.items() if r.skipped]
            logger.info("GReaTer: optimized %d of %d predictors (%s)%s.", len(done), len(results),
                        ", ".join(done) or "none", "; skipped: " + ", ".join(skipped) if skipped else "")
        return program

    def _optimize(self, run: _Compile, plan: Plan) -> PredictorResult | str:
        """Search one predictor's instruction and choose the one to keep; a reason when it cannot be done."""
        working = program_with(run.student, run.instructions)  # the others at their current instructions
        examples = self._examples(run, plan, working)
        if isinstance(examples, str):
            return examples
        train, heldout_given, program_runs = examples
        task = plan.task(run.instructions[plan.name], [*train, *heldout_given])
        run.extractors.setdefault(task.output_field, task.extractor)
        train = deduplicated(train, task)
        train, heldout = split_heldout(train, heldout_given or None, task.name, self.config.seed)
        named_sets = ([("trainset", run.trainset), ("valset", run.valset or [])] if plan.from_trainset else
                      [(f"{plan.name} train", train), (f"{plan.name} held-out", heldout)])
        try:
            search, layout_info, result, initial = self._search_instruction(task, train, heldout, named_sets,
                                                                            run.checkpoint_dir)
        except ContextTooLong as exc:
            if run.single:
                raise
            return str(exc)
        chosen, program_heldout = result.best_instruction, None
        if initial != task.instruction and result.trace:  # the program's own text is the baseline to beat
            own = search.evaluate(search.layout.encode_instruction(task.instruction),
                                  [task.search_example(e, search.layout) for e in heldout or train])
            program_heldout = own.to_dict()
            if own.key() > (result.best_heldout["accuracy"], -result.best_heldout["mean_loss"]):
                chosen = task.instruction
        selection = None
        if result.stopped_reason == "interrupted":
            logger.warning("Interrupted: returning the best instruction found so far, without target-LM selection.")
        elif run.selecting:
            setting = TargetSetting(self.metric, self.target_candidates, self._threads(), self.progress,
                                    layout_info["name"])
            selection = select_on_target(working, plan.name, task, result, run.valset, setting, run.warnings)
            chosen = selection.chosen
        logger.info("GReaTer [%s]: %r -> %r (held-out accuracy on the optimizer model %.3f -> %.3f)", plan.name,
                    result.initial_instruction, result.best_instruction,
                    result.initial_heldout["accuracy"], result.best_heldout["accuracy"])
        extractor = {"field": task.output_field, "kind": task.extractor.kind,
                     "text": search.extractor.text,  # the layout's own (ChatAdapter's answer marker)
                     "choices": list(task.extractor.choices)}
        return PredictorResult(result, chosen, task.instruction, extractor, layout_info,
                               "gold" if plan.gold else "traces", {"train": len(train), "heldout": len(heldout)},
                               program_heldout, selection, program_runs)

    def _examples(self, run: _Compile, plan: Plan, working) -> tuple[list, list, dict | None] | str:
        """(train, held-out given, program-run counts) for ``plan``: the trainset and valset as given, or
        what runs of the current program produce; a reason when they produce none."""
        if plan.from_trainset:
            return run.trainset, list(run.valset or []), None
        key = tuple(sorted(run.instructions.items()))
        if key not in run.runs:
            run.runs[key] = {"trainset": self._run_program(working, run.trainset)}
            if run.valset:
                run.runs[key]["valset"] = self._run_program(working, run.valset)
        runs = run.runs[key]
        train = runs["trainset"].examples(plan)
        if not train:
            return runs["trainset"].why_empty(plan)
        heldout = runs["valset"].examples(plan) if "valset" in runs else []
        return train, heldout, {what: r.summary(plan) for what, r in runs.items()}

    def _search_instruction(self, task: PredictorTask, train, heldout, named_sets, checkpoint_dir):
        """Run the search for one predictor: (search, layout info, result, starting instruction)."""
        search, layout_info = self._search(task)
        initial = self._start(task, layout_info["name"])
        check_context(search, initial, task, named_sets)
        bar = tqdm(total=self.config.num_steps, desc=f"GReaTer [{task.name}]", disable=not self.progress)

        def on_step(record):
            bar.update(1)
            bar.set_postfix(loss=f"{record.loss:.3f}", pos=record.position)
            logger.info("step %d pos %d chose %r: %s", record.step, record.position, record.chosen, record.instruction)
            if self.on_step is not None:
                self.on_step(task.name, dataclasses.asdict(record))

        checkpoint = None if checkpoint_dir is None else pathlib.Path(checkpoint_dir) / f"{_safe_name(task.name)}.json"
        try:
            result = search.run(initial, [task.search_example(e, search.layout) for e in train],
                                [task.search_example(e, search.layout) for e in heldout], progress=on_step,
                                checkpoint=checkpoint)
        finally:
            bar.close()
        answers = [p for entry in result.top_instructions for p in entry["predictions"]]
        if answers and all(p is None for p in answers):
            logger.warning(
                "GReaTer [%s]: the optimizer model gave no answer that parses on any held-out example in the %s layout "
                "(its replies do not follow that format), so the held-out check cannot tell the instructions apart. "
                "Use a larger optimizer model (model=...), or layout='greater' with GReaTerAdapter on the target.",
                task.name, layout_info["name"])
        return search, layout_info, result, initial

    def _run_program(self, program, examples) -> Runs:
        return run_program(program, examples, self.metric, num_threads=self._threads(), progress=self.progress)

    def _threads(self) -> int:
        """Threads for target-LM evaluation: ``num_threads``, else DSPy's configured number."""
        return self.num_threads if self.num_threads is not None else dspy.settings.num_threads

    def optimizer_predictions(self, program: dspy.Module, examples: list,
                              predictor: str | None = None) -> tuple[list[str | None], list[str]]:
        """The optimizer model's answers on ``examples`` under ``program``'s current instruction.

        Runs in the search's layout (inputs, instruction, reasoning, extractor). Returns
        ``(predictions, gold labels)``, both canonical labels. For a program with several
        predictors, name one (``predictor="..."``); ``examples`` must carry its inputs and labels.
        """
        task = predictor_task(program, examples, predictor, self.extractor)
        search, _ = self._search(task)
        evaluation = search.evaluate(
            search.layout.encode_instruction(task.instruction),
            [task.search_example(e, search.layout) for e in examples],
        )
        return evaluation.predictions, evaluation.labels

    @property
    def optimizer_model(self):
        """The loaded optimizer model (a ``transformers`` model), or ``None`` before the first compile."""
        return None if self._lm is None else self._lm.model

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

    def _search(self, task: PredictorTask) -> tuple[GreaterSearch, dict]:
        """The search for ``task`` on the optimizer model, in the layout chosen for it, and that layout's info."""
        lm = self._optimizer_lm()
        layout, info = choose_layout(self.layout, lm.tokenizer, task.signature, task.output_field,
                                     extractor_given=self.extractor is not None)
        if info["name"] == "chat_adapter":
            logger.info("GReaTer [%s]: searching in the chat_adapter layout (%s).", task.name, info["reason"])
        return GreaterSearch(lm, layout, task.extractor, self.config), info

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


def _safe_name(name: str) -> str:
    """A predictor name as a file name (``"steps[0].predict"`` -> ``"steps_0_.predict"``)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "predictor"
