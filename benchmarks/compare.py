"""GReaTer against DSPy's own optimizers on BBH: same small target LM, same program, seeded splits, CIs.

    python benchmarks/compare.py                                   # 5 transfer tasks, 50/100/100, 3 seeds
    python benchmarks/compare.py --tasks navigate --seeds 0 --train 20 --dev 20 --test 40 --small
    python benchmarks/compare.py --small --jobs 2                  # two worker processes (one core each)
    python benchmarks/compare.py --report-only                     # rebuild the table and plot from the JSONs

Every method optimizes (or not) the same program, ``dspy.ChainOfThought("question -> answer")``,
which runs on the same target LM (a GGUF served by llama.cpp on 127.0.0.1; default the embedded
SmolLM2-135M-Instruct) through the same ``GReaTerAdapter`` (tiny targets cannot follow
``ChatAdapter``'s ``[[ ## field ## ]]`` markers) with one answer extractor per task, derived from
the training labels. Methods:

* ``unoptimized``: ChainOfThought's own instruction ("Given the fields `question`, produce the fields `answer`.").
* ``zero_shot_cot``: the instruction "Let's think step by step." (Kojima et al.). Both baselines
  reason before answering (the adapter always asks for free reasoning first); they differ only in
  the instruction text. Every optimizer starts from the unoptimized program.
* ``greater``: ``GReaTerTeleprompter`` (embedded SmolLM2-135M in PyTorch as optimizer model,
  final pick among its best instructions on the dev split on the target).
* ``copro``, ``miprov2`` (0 demos: instruction only), ``gepa``, ``simba`` (``max_demos=0``: rules
  appended to the instruction only): DSPy 3.4's optimizers, with a chat ``dspy.LM`` on a llama.cpp
  server as prompt/reflection model (default the same SmolLM2-135M GGUF, so "same small model").
  Their proposer prompts run with DSPy's default adapter (ChatAdapter, with its JSON fallback): they
  are DSPy's own prompts; a proposer reply that cannot be parsed is their failure, recorded.

One JSON per (task, seed, method) under ``benchmarks/results/compare/<task>/seed<k>/`` is written as
soon as the method finishes (or fails: then with its error; a progress bar on stderr counts the
(task, seed, method) runs); a rerun skips finished ones
(``--retry-failed`` reruns failures). The split indices are in ``splits.json`` beside them. DSPy's
LM cache is on. At the end (or with ``--report-only``) the per-task and average table
(``compare.md``), ``compare_summary.json`` and a plot (``compare.png``) are written to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pathlib
import sys
import time
import traceback
from collections import Counter

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch threads must not spin on shared cores
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import numpy as np  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT_DIR = RESULTS / "compare"
TRANSFER_TASKS = ["movie_recommendation", "object_counting", "tracking_shuffled_objects_five_objects",
                  "hyperbaton", "causal_judgement"]
METHODS = ["unoptimized", "zero_shot_cot", "greater", "copro", "miprov2", "gepa", "simba"]
BASELINE = "zero_shot_cot"
COT_INSTRUCTION = "Let's think step by step."
BOOTSTRAP = 2000


# ------------------------------------------------------------------------------------------ the program


def make_program(adapter):
    """``dspy.ChainOfThought("question -> answer")`` inside a module whose forward runs it with ``adapter``.

    The adapter is scoped to the program's own calls, so the optimizers' proposer prompts keep DSPy's
    default adapter. The only predictor is ``cot.predict``.
    """
    import dspy

    class CoTProgram(dspy.Module):
        def __init__(self):
            super().__init__()
            self.cot = dspy.ChainOfThought("question -> answer")

        def forward(self, question):
            with dspy.context(adapter=adapter):
                return self.cot(question=question)

    return CoTProgram()


def instruction_of(program) -> str:
    return program.cot.predict.signature.instructions


def with_instruction(program, text: str):
    new = program.deepcopy()
    new.cot.predict.signature = new.cot.predict.signature.with_instructions(text)
    return new


# ------------------------------------------------------------------------------------------ counting calls


class CallCounter:
    """A DSPy callback counting LM calls by role (``lm._compare_role``; copies of an LM keep it)."""

    def __init__(self):
        from dspy.utils.callback import BaseCallback

        counts = Counter()

        class _Callback(BaseCallback):
            def on_lm_start(self, call_id, instance, inputs):
                counts[getattr(instance, "_compare_role", "other")] += 1

        self.counts = counts
        self.callback = _Callback()

    def snapshot(self) -> Counter:
        return Counter(self.counts)

    def since(self, before: Counter) -> dict:
        return {k: self.counts[k] - before.get(k, 0) for k in self.counts if self.counts[k] - before.get(k, 0)}


# ------------------------------------------------------------------------------------------ metrics


def gepa_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    """Exact match with textual feedback for GEPA's reflection."""
    import dspy

    from dspy_greater.metrics import exact_match

    ok = exact_match(gold, pred)
    got = getattr(pred, "answer", None) if pred is not None else None
    feedback = (f"Correct: the answer is {gold.answer}." if ok else
                f"Wrong: the answer given was {got!r}; the correct answer is {gold.answer!r}.")
    return dspy.Prediction(score=float(ok), feedback=feedback)


def evaluate(program, examples) -> dict:
    """Per-example answers and correctness on ``examples`` (an unparseable answer is ``None``, wrong)."""
    import dspy

    from dspy_greater.metrics import exact_match, summarize

    result = dspy.Evaluate(devset=list(examples), metric=exact_match, num_threads=1, display_progress=False,
                           provide_traceback=False, max_errors=len(examples) + 1)(program)
    answers = [(p.get("answer") if p is not None else None) for _, p, _ in result.results]
    answers = [None if a is None else str(a) for a in answers]
    correct = [bool(s) for _, _, s in result.results]
    row = summarize([e.answer for e in examples], answers)
    row["unparsed"] = sum(a is None for a in answers)
    row["answers"] = answers
    row["correct"] = correct
    return row


def bootstrap_mean_ci(groups: list[np.ndarray], rng: np.random.Generator, n: int = BOOTSTRAP, *,
                      resample_groups: bool = False) -> tuple[float, float, float]:
    """Mean of the group means, and a 95% percentile CI resampling examples within each group.

    With ``resample_groups`` each draw also picks the groups with replacement, so the interval
    carries the spread between groups (which task or seed a run drew) as well as within them.
    """
    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not groups:
        return float("nan"), float("nan"), float("nan")
    point = float(np.mean([g.mean() for g in groups]))
    if resample_groups:
        stats = np.array([np.mean([groups[j][rng.integers(0, len(groups[j]), len(groups[j]))].mean()
                                   for j in rng.integers(0, len(groups), len(groups))]) for _ in range(n)])
    else:
        stats = np.zeros(n)
        for g in groups:
            idx = rng.integers(0, len(g), size=(n, len(g)))
            stats += g[idx].mean(axis=1)
        stats /= len(groups)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return point, float(lo), float(hi)


# ------------------------------------------------------------------------------------------ methods


def run_method(method: str, args, program, train, dev, target, proposer, counter: CallCounter) -> tuple:
    """(optimized program, details dict) for one method."""
    from dspy_greater.metrics import exact_match

    details: dict = {}
    if method == "unoptimized":
        return program, details
    if method == "zero_shot_cot":
        return with_instruction(program, COT_INSTRUCTION), details
    if method == "greater":
        from dspy_greater import GReaTerTeleprompter

        tp = GReaTerTeleprompter(metric=exact_match, num_steps=args.greater_steps,
                                 batch_size=min(args.greater_batch, len(train)), seed=args.seed_value,
                                 max_reasoning_tokens=args.greater_reasoning_tokens,
                                 target_candidates=args.greater_target_candidates, num_threads=1,
                                 progress=sys.stderr.isatty(),  # its per-step bar, in a terminal only
                                 model=args.optimizer_model, dtype=args.optimizer_dtype, device=args.optimizer_device,
                                 device_map=args.optimizer_device_map,
                                 layout="chat_adapter" if args.adapter == "chat" else "greater")
        optimized = tp.compile(program, trainset=train, valset=dev)
        res = optimized.greater_results["cot.predict"]
        details = {"best_instruction_optimizer_model": res.get("best_instruction"),
                   "target_selection": res.get("target_selection"),
                   "extractor": res.get("extractor"),
                   "initial_heldout": res.get("initial_heldout"), "best_heldout": res.get("best_heldout")}
        return optimized, details
    if method == "copro":
        from dspy.teleprompt import COPRO

        tp = COPRO(prompt_model=proposer, metric=exact_match, breadth=args.copro_breadth, depth=args.copro_depth,
                   init_temperature=1.0)
        optimized = tp.compile(program.deepcopy(), trainset=train,
                               eval_kwargs={"num_threads": 1, "display_progress": False})
        return optimized, details
    if method == "miprov2":
        from dspy.teleprompt import MIPROv2

        tp = MIPROv2(metric=exact_match, prompt_model=proposer, task_model=target, auto=None,
                     num_candidates=args.mipro_candidates, max_bootstrapped_demos=0, max_labeled_demos=0,
                     num_threads=1, seed=args.seed_value, verbose=False)
        optimized = tp.compile(program.deepcopy(), trainset=train, valset=dev, num_trials=args.mipro_trials,
                               minibatch=False, view_data_batch_size=min(10, len(train)))
        details["demos"] = sum(len(p.demos) for _, p in optimized.named_predictors())
        return optimized, details
    if method == "gepa":
        from dspy.teleprompt import GEPA

        tp = GEPA(metric=gepa_metric, reflection_lm=proposer, max_metric_calls=args.gepa_metric_calls,
                  reflection_minibatch_size=min(3, len(train)), num_threads=1, seed=args.seed_value,
                  track_stats=False, use_merge=False)
        optimized = tp.compile(program.deepcopy(), trainset=train, valset=dev)
        return optimized, details
    if method == "simba":
        from dspy.teleprompt import SIMBA

        tp = SIMBA(metric=exact_match, bsize=min(args.simba_bsize, len(train)), num_candidates=args.simba_candidates,
                   max_steps=args.simba_steps, max_demos=0, prompt_model=proposer, num_threads=1)
        optimized = tp.compile(program.deepcopy(), trainset=train, seed=args.seed_value)
        details["demos"] = sum(len(p.demos) for _, p in optimized.named_predictors())
        return optimized, details
    raise ValueError(f"unknown method {method!r}")


# ------------------------------------------------------------------------------------------ one task


def task_label(task: str) -> str:
    return pathlib.Path(task).stem if task.endswith((".json", ".jsonl", ".csv", ".tsv")) else task


def run_task_seed(task: str, seed: int, args, target, proposer, counter: CallCounter, bar=None) -> None:
    """Run (or skip, when its JSON is there) every method on one task and seed; ``bar`` advances per method."""
    import dspy

    from dspy_greater.targets.adapter import GReaTerAdapter
    from dspy_greater.engine.text import format_inputs
    from dspy_greater.data import load_examples, split_examples
    from dspy_greater.engine.extractor import derive_extractor

    label = task_label(task)
    folder = OUT_DIR / label / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    splits = split_examples(load_examples(task), [args.train, args.dev, args.test], seed=seed)
    train, dev, test = splits
    split_record = {"task": task, **splits.as_dict()}
    split_file = folder / "splits.json"
    if split_file.exists():
        old = json.loads(split_file.read_text())
        if old.get("indices") != split_record["indices"]:
            raise SystemExit(f"{split_file} holds other splits (other sizes?); use another --out or remove it")
    split_file.write_text(json.dumps(split_record))
    extractor = derive_extractor("answer", None, [e.answer for e in train], [format_inputs(["question"], e) for e in train])
    if args.adapter == "chat":
        adapter = dspy.ChatAdapter()
    else:
        adapter = GReaTerAdapter({"answer": extractor}, max_reasoning_tokens=args.target_tokens)
    args.seed_value = seed

    for method in args.methods:
        if bar is not None:
            bar.set_postfix_str(f"{label} seed {seed} {method}")
        path = folder / f"{method}.json"
        if path.exists():
            old = json.loads(path.read_text())
            if str(old.get("target")).split(" (")[0] != args.target_name.split(" (")[0]:  # the model, not the client
                raise SystemExit(f"{path} was run on target {old.get('target')!r}, not {args.target_name!r}: "
                                 f"give each target its own --out folder (the default does so).")
            if is_done(task, seed, method, args.retry_failed):
                print(f"[{label} seed {seed}] {method}: done before ({old.get('status')}), skipped", flush=True)
                if bar is not None:
                    bar.update(1)
                continue
        print(f"[{label} seed {seed}] {method}: optimizing ({len(train)} train / {len(dev)} dev / {len(test)} test) ...",
              flush=True)
        record = {"task": label, "task_source": task, "seed": seed, "method": method,
                  "splits": {"sizes": [len(train), len(dev), len(test)], "file": os.path.relpath(split_file, HERE.parent)},
                  "target": args.target_name, "proposer": args.proposer_name, "adapter": type(adapter).__name__,
                  "extractor": extractor.text, "target_tokens": args.target_tokens,
                  "settings": {k: v for k, v in vars(args).items() if k not in ("methods", "tasks", "seeds", "pairs")},
                  "load_average_start": os.getloadavg()}
        program = make_program(adapter)
        logged = _ErrorLog()
        logging.getLogger().addHandler(logged)
        before = counter.snapshot()
        t0 = time.perf_counter()
        try:
            optimized, details = run_method(method, args, program, train, dev, target, proposer, counter)
            record["optimizer_seconds"] = time.perf_counter() - t0
            record["optimizer_calls"] = counter.since(before)
            record["details"] = details
            record["instruction"] = instruction_of(optimized)
            record["demos"] = sum(len(p.demos) for _, p in optimized.named_predictors())
            print(f"[{label} seed {seed}] {method}: {record['optimizer_seconds']:.0f} s; instruction "
                  f"{record['instruction'][:120]!r}; evaluating on test ...", flush=True)
            before = counter.snapshot()
            t1 = time.perf_counter()
            row = evaluate(optimized, test)
            record["eval_seconds"] = time.perf_counter() - t1
            record["eval_calls"] = counter.since(before)
            record["test"] = row
            record["status"] = "ok"
            print(f"[{label} seed {seed}] {method}: test accuracy {row['accuracy']:.3f} (balanced "
                  f"{row['balanced_accuracy']:.3f}, majority {row['majority_rate']:.3f}); answers "
                  f"{dict(list(row['pred_distribution'].items())[:5])}", flush=True)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a failing optimizer is a result, not a crash
            record["optimizer_seconds"] = time.perf_counter() - t0
            record["optimizer_calls"] = counter.since(before)
            record["status"] = "failed"
            record["error"] = f"{type(exc).__name__}: {exc}"[:4000]
            record["traceback"] = traceback.format_exc()[-6000:]
            print(f"[{label} seed {seed}] {method}: FAILED after {record['optimizer_seconds']:.0f} s: "
                  f"{record['error'][:300]}", flush=True)
        logging.getLogger().removeHandler(logged)
        # Errors the optimizers caught and logged (SIMBA's failed strategies, examples that failed to run):
        # a method can "succeed" while returning its input program unchanged.
        record["logged_errors"] = {"count": len(logged.messages), "first": logged.messages[:5]}
        record["load_average_end"] = os.getloadavg()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        tmp.replace(path)
        if bar is not None:
            bar.update(1)


class _ErrorLog(logging.Handler):
    """Collects ERROR log records (one line each, cut) while one method runs."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record):
        with contextlib.suppress(Exception):
            self.messages.append(f"{record.name}: {' '.join(record.getMessage().split())[:300]}")


# ------------------------------------------------------------------------------------------ report


def load_records() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(OUT_DIR.glob("*/seed*/*.json")) if p.name != "splits.json"]


def fmt_ci(point, lo, hi, signed=False) -> str:
    if point != point:
        return "-"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(point)} [{f.format(lo)}, {f.format(hi)}]"


def report(args) -> None:
    records = load_records()
    if not records:
        print("no results yet")
        return
    rng = np.random.default_rng(0)
    tasks = sorted({r["task"] for r in records})
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    by = {(r["task"], r["seed"], r["method"]): r for r in records}
    summary: dict = {"tasks": {}, "average": {}}
    lines = ["# Comparison with DSPy's optimizers", "",
             "Test accuracy with a 95% bootstrap CI (examples resampled within each seed; seeds and tasks averaged), "
             "the paired differences against zero-shot CoT and against the unoptimized program (where every optimizer "
             "starts) on the same test examples with their CIs, majority-class rate "
             "of the test labels, balanced accuracy, optimizer wall time and target-LM calls during optimization "
             "(mean per seed). Written by `benchmarks/compare.py`.", "",
             f"Target LM: {', '.join(sorted({str(r.get('target')).split(' (')[0] for r in records}))}; text "
             f"optimizers' prompt/reflection LM: {', '.join(sorted({str(r.get('proposer')).split(' (')[0] for r in records}))}.",
             ""]

    def rows_for(keys_tasks):
        out = {}
        for m in methods:
            start_groups = []
            acc_groups, diff_groups, bal, maj, secs, calls, dist, errors, seeds = [], [], [], [], [], [], Counter(), [], 0
            for t in keys_tasks:
                for (tt, s, mm), r in by.items():
                    if tt != t or mm != m:
                        continue
                    if r.get("status") != "ok":
                        errors.append(f"{t} seed {s}: {' '.join(r.get('error', '').split())[:160]}")
                        continue
                    seeds += 1
                    c = np.array(r["test"]["correct"], dtype=float)
                    acc_groups.append(c)
                    base = by.get((t, s, BASELINE))
                    if base and base.get("status") == "ok" and len(base["test"]["correct"]) == len(c):
                        diff_groups.append(c - np.array(base["test"]["correct"], dtype=float))
                    start = by.get((t, s, "unoptimized"))
                    if start and start.get("status") == "ok" and len(start["test"]["correct"]) == len(c):
                        start_groups.append(c - np.array(start["test"]["correct"], dtype=float))
                    bal.append(r["test"]["balanced_accuracy"])
                    maj.append(r["test"]["majority_rate"])
                    secs.append(r.get("optimizer_seconds", 0.0) - r.get("paused_seconds", 0.0))  # SIGSTOPped time
                    calls.append((r.get("optimizer_calls") or {}).get("target", 0))
                    dist.update({str(k): v for k, v in r["test"]["pred_distribution"].items()})
            out[m] = {"runs": seeds, "accuracy": bootstrap_mean_ci(acc_groups, rng),
                      "diff_vs_zero_shot_cot": bootstrap_mean_ci(diff_groups, rng) if diff_groups else (float("nan"),) * 3,
                      "diff_vs_unoptimized": bootstrap_mean_ci(start_groups, rng) if start_groups else (float("nan"),) * 3,
                      "balanced_accuracy": float(np.mean(bal)) if bal else float("nan"),
                      "majority_rate": float(np.mean(maj)) if maj else float("nan"),
                      "optimizer_seconds": float(np.mean(secs)) if secs else float("nan"),
                      "optimizer_target_calls": float(np.mean(calls)) if calls else float("nan"),
                      "answers": dict(dist.most_common(6)), "errors": errors}
        return out

    def table(rows, with_instruction_task=None):
        out = ["| method | runs | test accuracy [95% CI] | vs zero-shot CoT [95% CI] | vs unoptimized (the optimizers' start) [95% CI] | majority rate | balanced acc. | "
               "optimizer time (s) | target calls (optimizer) | answers (test) |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for m, v in rows.items():
            if not v["runs"] and not v["errors"]:
                continue  # not run (yet) on these tasks
            if not v["runs"]:
                out.append(f"| {m} | 0 | failed | - | - | - | - | - | - | {'; '.join(v['errors'])[:300].replace('|', '/')} |")
                continue
            dist = ", ".join(f"{k}: {n}" for k, n in v["answers"].items())
            out.append(f"| {m} | {v['runs']} | {fmt_ci(*v['accuracy'])} | "
                       f"{'-' if m == BASELINE else fmt_ci(*v['diff_vs_zero_shot_cot'], signed=True)} | "
                       f"{'-' if m == 'unoptimized' else fmt_ci(*v['diff_vs_unoptimized'], signed=True)} | "
                       f"{v['majority_rate']:.3f} | {v['balanced_accuracy']:.3f} | {v['optimizer_seconds']:.0f} | "
                       f"{v['optimizer_target_calls']:.0f} | {dist.replace('|', '/')} |")
        return out

    for t in tasks:
        rows = rows_for([t])
        summary["tasks"][t] = rows
        seeds = sorted({s for (tt, s, _) in by if tt == t})
        sizes = next((r["splits"]["sizes"] for r in records if r["task"] == t), None)
        lines += [f"## {t}", "", f"Seeds {seeds}; train/dev/test sizes {sizes}.", ""] + table(rows) + [""]
        lines += ["Final instructions (seed " + str(seeds[0]) + "):", ""]
        for m in methods:
            r = by.get((t, seeds[0], m))
            if r is None:
                continue
            text = r.get("instruction") if r.get("status") == "ok" else f"FAILED: {r.get('error', '')[:300]}"
            start = (by.get((t, seeds[0], "unoptimized")) or {}).get("instruction")
            note = ""
            if m not in ("unoptimized", "zero_shot_cot") and r.get("status") == "ok" and text == start:
                note = " (unchanged: the starting instruction)"
            if (r.get("logged_errors") or {}).get("count"):
                note += f" ({r['logged_errors']['count']} errors caught and logged by the optimizer)"
            lines.append(f"- {m}: `{' '.join((text or '').replace('`', chr(39)).split())[:400]}`{note}")
        lines.append("")
    if len(tasks) > 1:
        rows = rows_for(tasks)
        summary["average"] = rows
        lines += ["## Average over tasks", "",
                  "Each (task, seed) run counts once; `runs` says how many are in a row: a method with fewer runs "
                  "than the baselines is averaged over fewer tasks (the others failed or were not run), so compare "
                  "rows with equal `runs` only.", ""] + table(rows) + [""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compare.md").write_text("\n".join(lines))
    (RESULTS / "compare_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\n".join(lines))
    plot(summary, tasks, methods)


def plot(summary, tasks, methods) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return
    panels = tasks + (["average"] if len(tasks) > 1 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 + 2.6 * len(panels), 3.8), squeeze=False)
    for ax, t in zip(axes[0], panels):
        rows = summary["average"] if t == "average" else summary["tasks"][t]
        xs = np.arange(len(methods))
        for i, m in enumerate(methods):
            v = rows.get(m)
            if not v or (not v["runs"] and not v["errors"]):
                ax.text(i, 0.02, "not run", rotation=90, ha="center", va="bottom", fontsize=8, color="grey")
                continue
            if not v["runs"]:
                ax.text(i, 0.02, "failed", rotation=90, ha="center", va="bottom", fontsize=8, color="red")
                continue
            p, lo, hi = v["accuracy"]
            ax.errorbar(i, p, yerr=[[p - lo], [hi - p]], fmt="o", capsize=3, color="C0" if m != "greater" else "C3")
            most = max(r["runs"] for r in rows.values())
            if v["runs"] < most:  # the others failed: this point averages fewer tasks/seeds
                ax.text(i, min(hi + 0.03, 0.95), f"{v['runs']}/{most} ran", ha="center", fontsize=7, color="red")
            ax.plot([i - 0.35, i + 0.35], [v["majority_rate"]] * 2, color="grey", lw=1, ls="--")
        ax.set_xticks(xs)
        ax.set_xticklabels(methods, rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(t, fontsize=9)
        ax.set_ylabel("test accuracy (95% CI); dashed: majority rate", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "compare.png", dpi=120)
    print(f"plot written to {RESULTS / 'compare.png'}")


# ------------------------------------------------------------------------------------------ main


def default_out(args) -> pathlib.Path:
    """Where a target's results go unless ``--out`` says otherwise: one folder per target LM."""
    name = args.target_model or args.target
    if name == "smollm2" and args.adapter == "greater":
        return RESULTS
    stem = pathlib.Path(name).stem if name.endswith(".gguf") else name
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem)
    return RESULTS / "targets" / (slug + ("" if args.adapter == "greater" else f"-{args.adapter}-adapter"))


def is_done(task: str, seed: int, method: str, retry_failed: bool) -> bool:
    """Whether a run's JSON is there (and, with ``retry_failed``, records a success)."""
    path = OUT_DIR / task_label(task) / f"seed{seed}" / f"{method}.json"
    return path.exists() and (not retry_failed or json.loads(path.read_text()).get("status") == "ok")


def run_workers(args, pairs: list[tuple[str, int]]) -> None:
    """Run ``pairs`` in ``args.jobs`` worker processes (this script again, each on a round-robin share).

    Each worker starts its own llama.cpp servers and writes the usual per-run JSONs, so a stopped
    run continues like a single-process one; DSPy's disk cache is shared. Ctrl-C or SIGTERM stops
    every worker (their servers exit with them).
    """
    import signal
    import subprocess

    from tqdm import tqdm

    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    own, skip = [], False  # this command's arguments without its own --jobs/--out
    for arg in sys.argv[1:]:
        if not skip and arg.split("=")[0] not in ("--jobs", "--out"):
            own.append(arg)
        skip = arg in ("--jobs", "--out")
    shares = [pairs[i::args.jobs] for i in range(min(args.jobs, len(pairs)))]
    workers = []
    for i, share in enumerate(shares):
        command = [sys.executable, str(pathlib.Path(__file__).resolve()), *own, "--jobs", "1", "--out", str(RESULTS),
                   "--pairs", *(f"{task}@{seed}" for task, seed in share)]
        log = open(logs / f"worker{i}.log", "w")
        workers.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))
        print(f"worker {i}: {', '.join(f'{task_label(t)} seed {s}' for t, s in share)}; log {log.name}", flush=True)

    def finished() -> int:
        return sum(is_done(t, s, m, args.retry_failed) for t, s in pairs for m in args.methods)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    started = time.perf_counter()
    try:
        with tqdm(total=len(pairs) * len(args.methods), desc="compare", unit="run", file=sys.stderr) as bar:
            while any(process.poll() is None for process, _ in workers):
                time.sleep(5)
                bar.update(finished() - bar.n)
            bar.update(finished() - bar.n)
    except KeyboardInterrupt:
        for process, _ in workers:
            process.terminate()
        for process, _ in workers:
            process.wait()
        raise SystemExit("stopped; finished runs are kept, and the same command continues with the rest")
    finally:
        for _, log in workers:
            log.close()
    failed = [i for i, (process, _) in enumerate(workers) if process.returncode != 0]
    if failed:
        raise SystemExit(f"worker(s) {failed} exited with an error; see {logs}/worker<i>.log")
    print(f"all runs done in {(time.perf_counter() - started) / 60:.1f} min ({len(workers)} workers)", flush=True)


def main() -> None:
    global RESULTS, OUT_DIR
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=TRANSFER_TASKS, help="packaged BBH task names or task files")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--train", type=int, default=50)
    p.add_argument("--dev", type=int, default=100)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--target", default="smollm2", help="GGUF served by llama.cpp: smollm2 (embedded), gemma3-270m or a path")
    p.add_argument("--proposer", default="smollm2", help="GGUF for the text optimizers' prompt/reflection LM")
    p.add_argument("--target-model", default=None,
                   help="any litellm model as target instead of a local GGUF, e.g. openai/<model> on a vLLM server")
    p.add_argument("--proposer-model", default=None, help="any litellm model as prompt/reflection LM")
    p.add_argument("--api-base", default=None, help="base URL for --target-model/--proposer-model (vLLM, ...)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--adapter", choices=("greater", "chat"), default="greater",
                   help="greater: GReaTerAdapter (tiny targets); chat: DSPy's ChatAdapter (1B+ instruct targets)")
    p.add_argument("--optimizer-model", default=None,
                   help="GReaTer's optimizer model (hub id, folder or .gguf; default the embedded SmolLM2-135M)")
    p.add_argument("--optimizer-dtype", default="auto")
    p.add_argument("--optimizer-device", default=None, help="e.g. cuda")
    p.add_argument("--optimizer-device-map", default=None,
                   help="accelerate device map for GReaTer's optimizer model, e.g. auto (shards it over the GPUs)")
    p.add_argument("--target-tokens", type=int, default=128, help="reasoning token limit on the target")
    p.add_argument("--proposer-tokens", type=int, default=512)
    p.add_argument("--greater-steps", type=int, default=20)
    p.add_argument("--greater-batch", type=int, default=8)
    p.add_argument("--greater-reasoning-tokens", type=int, default=96)
    p.add_argument("--greater-target-candidates", type=int, default=4)
    p.add_argument("--copro-breadth", type=int, default=6)
    p.add_argument("--copro-depth", type=int, default=2)
    p.add_argument("--mipro-candidates", type=int, default=6)
    p.add_argument("--mipro-trials", type=int, default=10)
    p.add_argument("--gepa-metric-calls", type=int, default=400)
    p.add_argument("--simba-bsize", type=int, default=16)
    p.add_argument("--simba-candidates", type=int, default=4)
    p.add_argument("--simba-steps", type=int, default=4)
    p.add_argument("--small", action="store_true",
                   help="the tiny CPU budget: 4 GReaTer steps on 6, 48-token target reasoning, COPRO 3x1, MIPROv2 "
                        "3 candidates x 3 trials, GEPA 60 metric calls, SIMBA 1 step of 2 candidates on 8")
    p.add_argument("--retry-failed", action="store_true", help="rerun methods whose JSON records a failure")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plot from the JSONs")
    p.add_argument("--threads", type=int, default=1, help="torch threads for GReaTer; llama.cpp threads")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes, each with its own llama.cpp servers and its share of the (task, seed) "
                        "pairs (logs in <out>/logs/); on 2 cores: --jobs 2 --threads 1")
    p.add_argument("--pairs", nargs="+", default=None, help=argparse.SUPPRESS)  # task@seed: one worker's share
    p.add_argument("--out", default=None,
                   help="results folder (per-run JSONs go to <out>/compare/); default benchmarks/results for the "
                        "embedded SmolLM2 target, benchmarks/results/targets/<target> for any other")
    args = p.parse_args()
    RESULTS = pathlib.Path(args.out).resolve() if args.out else default_out(args)
    OUT_DIR = RESULTS / "compare"
    if args.small:
        for k, v in dict(target_tokens=48, greater_steps=4, greater_batch=6, greater_reasoning_tokens=48,
                         greater_target_candidates=3, copro_breadth=3, copro_depth=1, mipro_candidates=3,
                         mipro_trials=3, gepa_metric_calls=60, simba_bsize=8, simba_candidates=2,
                         simba_steps=1, proposer_tokens=256).items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    if args.jobs < 1 or args.threads < 1:
        raise SystemExit("--jobs and --threads must be at least 1")
    if args.report_only:
        report(args)
        return
    pairs = ([(task, int(seed)) for task, seed in (pair.rsplit("@", 1) for pair in args.pairs)] if args.pairs
             else [(task, seed) for task in args.tasks for seed in args.seeds])
    pairs = [pair for pair in pairs if not all(is_done(*pair, method, args.retry_failed) for method in args.methods)]
    if not pairs:
        print(f"every requested run already has its JSON under {OUT_DIR}; rebuilding the report", flush=True)
        if args.pairs is None:
            report(args)
        return
    if args.jobs > 1 and len(pairs) > 1:
        run_workers(args, pairs)
        report(args)
        return

    import dspy
    import torch

    from dspy_greater.targets.llama_cpp import LlamaCppServer

    torch.set_num_threads(args.threads)
    for name in ("dspy.clients.lm", "dspy.teleprompt", "dspy.evaluate", "optuna", "gepa", "LiteLLM", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    counter = CallCounter()
    dspy.configure(callbacks=[counter.callback])
    print(f"compare.py: {', '.join(f'{task_label(t)} seed {s}' for t, s in pairs)}; methods {args.methods}; splits "
          f"{args.train}/{args.dev}/{args.test}; command: python {' '.join(sys.argv)}", flush=True)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        def serve(name):
            return stack.enter_context(LlamaCppServer(None if name == "smollm2" else name, n_threads=args.threads))

        client = {k: v for k, v in (("api_base", args.api_base), ("api_key", args.api_key)) if v}
        servers = {}
        if args.target_model:
            limit = 1024 if args.adapter == "chat" else args.target_tokens  # ChatAdapter's reply holds the answer too
            target = dspy.LM(args.target_model, temperature=0.0, max_tokens=limit, cache=True, **client)
            args.target_name = args.target_model
        else:
            servers[args.target] = serve(args.target)
            target = servers[args.target].lm(max_tokens=args.target_tokens, cache=True)
            args.target_name = f"{servers[args.target].alias} (llama.cpp, {type(target).__name__})"
        if args.proposer_model:
            proposer = dspy.LM(args.proposer_model, temperature=0.0, max_tokens=args.proposer_tokens, cache=True,
                               **client)
            args.proposer_name = args.proposer_model
        else:
            if args.proposer not in servers:
                servers[args.proposer] = serve(args.proposer)
            proposer = servers[args.proposer].lm(max_tokens=args.proposer_tokens, cache=True, model_type="chat")
            args.proposer_name = f"{servers[args.proposer].alias} (llama.cpp, chat dspy.LM)"
        target._compare_role, proposer._compare_role = "target", "proposer"
        dspy.configure(lm=target)
        from tqdm import tqdm

        with tqdm(total=len(pairs) * len(args.methods), desc="compare", unit="run", file=sys.stderr) as bar:
            for task, seed in pairs:
                run_task_seed(task, seed, args, target, proposer, counter, bar)
    print(f"all runs done in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    if args.pairs is None:  # a worker leaves the report to its parent
        report(args)


if __name__ == "__main__":
    main()
