"""Choosing among the search's best instructions on the target LM, with the user's metric."""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, field

import dspy
from dspy.utils.callback import BaseCallback
from dspy.utils.exceptions import AdapterParseError
from dspy.utils.usage_tracker import UsageTracker

from dspy_greater.engine.search import SearchResult
from dspy_greater.planning import PredictorTask
from dspy_greater.results import TargetSelection
from dspy_greater.targets.adapter import GReaTerAdapter

logger = logging.getLogger(__name__)


@dataclass
class Warnings:
    """Warnings given once per compile (a program with several predictors would repeat them)."""

    given: set[str] = field(default_factory=set)

    def once(self, key: str, message: str, *args) -> None:
        if key not in self.given:
            self.given.add(key)
            logger.warning(message, *args)


@dataclass(frozen=True)
class TargetSetting:
    """How target-LM selection runs: the metric, how many instructions, threads, progress, layout."""

    metric: object
    candidates: int
    num_threads: int
    progress: bool
    layout_name: str = "greater"


def selects_on_target(metric, candidates: int, valset, target_ready: bool, warnings: Warnings) -> bool:
    """Whether the instructions are chosen on the target LM; says once why a given metric goes unused."""
    if not candidates or metric is None:
        return False
    why = None
    if not target_ready:
        why = ("no target LM is configured; configure one with dspy.configure(lm=...) or program.set_lm(...) to "
               "choose among the best instructions with it")
    elif not valset:
        why = "no valset was given; pass valset=... to choose among the best instructions on the target LM with it"
    if why is not None:
        warnings.once("metric", "GReaTer: the metric is not used: %s. The instruction is chosen on the optimizer "
                      "model's held-out accuracy instead.", why)
    return why is None


def select_on_target(program: dspy.Module, name: str, task: PredictorTask, result: SearchResult, valset: list,
                     setting: TargetSetting, warnings: Warnings) -> TargetSelection:
    """Score the best distinct instructions on ``valset`` on the target LM; never loses the search result.

    An answer the adapter cannot parse counts as wrong; an LM failure (server down, timeout)
    puts the candidate under ``errors`` instead of giving it a score. The target LM is the
    predictor's own ``lm`` when set (``program.set_lm(...)``), else ``dspy.settings.lm``; every
    candidate runs on that same LM object (the other predictors at their current instructions).
    """
    ordered = [result.best_instruction, *(t["instruction"] for t in result.top_instructions), result.initial_instruction]
    candidates = list(dict.fromkeys(ordered))[: setting.candidates]
    if task.instruction not in candidates:
        candidates.append(task.instruction)  # the program's own instruction, the baseline, is always measured
    lm, source = target_lm(dict(program.named_predictors())[name])
    adapter = adapter_with({task.output_field: task.extractor})  # scores in the search's answer format
    warn_layout_mismatch(setting.layout_name, adapter, warnings)
    estimate = len(candidates) * len(valset) * calls_per_prediction(adapter) * len(program.named_predictors())
    model = str(getattr(lm, "model", type(lm).__name__))
    logger.info("Scoring %d instructions on %d valset examples on the target LM %s (%s): at most %d calls.",
                len(candidates), len(valset), model, source, estimate)
    calls, usage = _CallCounter(), _SharedUsage()
    with dspy.context(usage_tracker=usage, callbacks=[*(dspy.settings.callbacks or []), calls]):
        scores, errors, unparsed = _score_candidates(program, name, candidates, valset, adapter, setting)
    tokens = sum(int(total.get("total_tokens") or 0) for total in usage.get_total_tokens().values())
    if scores and not any(scores.values()) and len(unparsed) == len(scores):
        warnings.once("unparsed", "GReaTer: every instruction scored 0 on the target LM %s and its replies could not "
                      "be parsed with %s, so the target cannot tell them apart. Run the target with an adapter it can "
                      "follow (GReaTerAdapter for small models) or a stronger target LM.", model,
                      type(adapter).__name__ if adapter is not None else "ChatAdapter")
    chosen = max(scores, key=lambda t: (scores[t], -candidates.index(t))) if scores else result.best_instruction
    baseline = scores.get(task.instruction)
    logger.info("Target LM %s (%s): baseline %s, chosen %.1f (%d calls, %d tokens).", model, source,
                "n/a" if baseline is None else f"{baseline:.1f}", scores.get(chosen, float("nan")), calls.count, tokens)
    return TargetSelection(tuple(candidates), scores, errors, unparsed, chosen, baseline, estimate, calls.count, tokens,
                           source, model)


def _score_candidates(program, name: str, candidates: list[str], valset: list, adapter,
                      setting: TargetSetting) -> tuple[dict, dict, dict]:
    """(scores, errors, unparsed) of the candidate instructions on ``valset``; a target that fails on
    every example of one candidate is not asked again."""
    metric_failures: list[Exception] = []  # dspy.Evaluate would score a raising metric 0 silently
    evaluate = dspy.Evaluate(devset=list(valset), metric=recording_failures(setting.metric, metric_failures),
                             num_threads=setting.num_threads, display_progress=setting.progress,
                             provide_traceback=False, max_errors=len(valset) + 1)
    scores, errors, unparsed, target_down = {}, {}, {}, None
    for text in candidates:
        if target_down:
            errors[text] = f"skipped: {target_down}"
            continue
        failures: list[Exception] = []
        metric_failures.clear()
        run = recording_failures(with_instruction(program, name, text), failures)
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
    return scores, errors, unparsed


class _SharedUsage(UsageTracker):
    """DSPy's usage tracker, one for every thread: ``dspy.Evaluate`` gives each worker thread a copy of
    the tracker in effect, which would keep the usage of its calls (those that failed to parse too)
    from this one."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()

    def __deepcopy__(self, memo):
        return self

    def add_usage(self, lm: str, usage_entry: dict) -> None:
        with self._lock:
            super().add_usage(lm, usage_entry)


class _CallCounter(BaseCallback):
    """Counts the target-LM calls that returned (in every thread ``dspy.Evaluate`` runs; cache hits too)."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def on_lm_end(self, call_id, outputs, exception=None):
        if exception is None:
            with self._lock:
                self.count += 1


def adapter_with(extractors: dict):
    """The configured adapter; a ``GReaTerAdapter`` also gets ``extractors`` for fields it has none for."""
    adapter = dspy.settings.adapter
    if isinstance(adapter, GReaTerAdapter):
        missing = {k: v for k, v in extractors.items() if k not in adapter.extractors}
        if missing:
            adapter = copy.copy(adapter)
            adapter.extractors = {**missing, **adapter.extractors}
    return adapter


def warn_layout_mismatch(layout_name: str, adapter, warnings: Warnings) -> None:
    """Warn once when the target runs the program with an adapter other than the one the search modelled."""
    if (layout_name == "greater") == isinstance(adapter, GReaTerAdapter):
        return
    running = type(adapter).__name__ if adapter is not None else "ChatAdapter (no adapter is configured)"
    if layout_name == "greater":
        warnings.once(
            "adapter", "GReaTer: the search optimized the instruction in GReaTer's layout, but the target LM runs "
            "the program with %s, whose prompt and reply format differ (small targets often cannot reply in it, and "
            "every candidate then scores 0). Either run the program with the layout it was optimized in: "
            "dspy.configure(adapter=GReaTerAdapter()) before compile and GReaTerAdapter.from_program(optimized) "
            "after; or optimize for ChatAdapter with layout='chat_adapter'.", running)
    else:
        warnings.once(
            "adapter", "GReaTer: the search optimized the instruction in ChatAdapter's layout, but the target LM runs "
            "the program with GReaTerAdapter. Use layout='greater' (or 'auto') with GReaTerAdapter, or configure "
            "ChatAdapter for the target.")


def calls_per_prediction(adapter) -> int:
    """The most target-LM calls one prediction costs under ``adapter`` (``None``: DSPy's default ChatAdapter)."""
    if isinstance(adapter, GReaTerAdapter):
        return 2  # the reasoning, then the answer
    if adapter is None or (isinstance(adapter, dspy.ChatAdapter) and not isinstance(adapter, dspy.JSONAdapter)
                           and adapter.use_json_adapter_fallback):
        return 2  # a reply ChatAdapter cannot parse is asked again through JSONAdapter
    return 1


def target_lm(predictor) -> tuple[object | None, str]:
    """The LM a predictor runs on and where it comes from: its own ``lm``, else ``dspy.settings.lm``."""
    own = getattr(predictor, "lm", None)
    if own is not None:
        return own, "predictor.lm"
    return dspy.settings.lm, "dspy.settings.lm"


def program_with(program: dspy.Module, instructions: dict[str, str], share_lms: bool = True) -> dspy.Module:
    """A deep copy of ``program`` with ``instructions`` (by predictor name); with ``share_lms``, on
    ``program``'s own LM objects rather than copies of them."""
    copied = program.deepcopy()
    originals = dict(program.named_predictors())
    for name, predictor in copied.named_predictors():
        if name in instructions:
            predictor.signature = predictor.signature.with_instructions(instructions[name])
        lm = getattr(originals[name], "lm", None)
        if share_lms and lm is not None:  # the deep copy copied the LMs: share the originals (their history, their cache)
            predictor.lm = lm
    return copied


def with_instruction(program: dspy.Module, name: str, instruction: str) -> dspy.Module:
    """A copy of ``program`` with predictor ``name`` at ``instruction`` (see :func:`program_with`)."""
    return program_with(program, {name: instruction})


def recording_failures(function, failures: list[Exception]):
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
