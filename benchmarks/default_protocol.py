"""Choosing the default search: one configuration over the protocol's 15 runs, and their pooled gains.

The protocol (benchmarks/README.md, section 5): the five transfer tasks x seeds 0-2; per seed 24
train / 12 held-out / every remaining row as test; ``dspy.ChainOfThought("question -> answer")``
with DSPy's generated instruction, compiled by ``GReaTerTeleprompter`` with the configuration;
answers scored by the embedded SmolLM2-135M in GReaTer's layout (``optimizer_predictions``) at
the default's 48 reasoning tokens.

    python benchmarks/default_protocol.py run --config default          # resumable, one file a run
    python benchmarks/default_protocol.py summary --configs default default+keep_current=false
    python benchmarks/default_protocol.py transfer --config default    # the runs' instructions on Gemma-3-270M
    python benchmarks/default_protocol.py mistakes     # how often a teacher-forced answer counts as right

``run`` writes ``results/protocol/<config>/<task>_seed<k>.json`` (skipped when present) and caches
the baselines' answers per task and row in ``results/protocol/baselines/<task>.json``: the
program's own instruction, zero-shot CoT ("Let's think step by step.") and the reasoning start
without search. A row's answer does not depend on the split, so each baseline is scored once per
task. ``summary`` pools the runs: per configuration the share of runs whose returned instruction
differs from the program's and from the search's start, the mean test gain over the unoptimized
program in accuracy and balanced accuracy with 95% bootstrap intervals (rows resampled; runs and
rows resampled), the same for the two baselines, each system's mean accuracy and balanced
accuracy, and compile times; it writes
``results/protocol/summary.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import sys
import time

from quality import config_spec, parse_config

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "results" / "protocol"
TASKS = ("movie_recommendation", "object_counting", "tracking_shuffled_objects_five_objects", "hyperbaton",
         "causal_judgement")
SEEDS = (0, 1, 2)
SPLIT = (24, 12)
ZERO_SHOT_COT = "Let's think step by step."


def _rows(task: str) -> list:
    """The task's rows, less any whose label lies outside the answer space its labels define (BBH's
    movie_recommendation has one: a movie title where a letter belongs)."""
    from dspy_greater.data import load_examples
    from dspy_greater.engine.extractor import derive_extractor

    rows = load_examples(task)
    extractor = derive_extractor("answer", None, [r.answer for r in rows], [r.question for r in rows])
    return [r for r in rows if extractor.accepts(r.answer)]


@functools.cache
def _extractor(task: str):
    from dspy_greater.engine.extractor import derive_extractor

    rows = _rows(task)
    return derive_extractor("answer", None, [r.answer for r in rows], [r.question for r in rows])


def _canonical(task: str, answer: str) -> str:
    """``answer`` as the scorer reports a gold label (the extractor derived from all of the task's rows)."""
    return _extractor(task).canonical(answer)


def _splits(task: str, seed: int):
    from dspy_greater.data import split_examples

    return split_examples(_rows(task), [*SPLIT, None], seed=seed)


def _teleprompter(model, tokenizer, config):
    from dspy_greater import GReaTerTeleprompter
    from dspy_greater.metrics import exact_match

    return GReaTerTeleprompter(metric=exact_match, config=config, progress=False).use_loaded_model(model, tokenizer)


def _program(instruction: str | None = None):
    import dspy

    program = dspy.ChainOfThought("question -> answer")
    if instruction is not None:
        program.predict.signature = program.predict.signature.with_instructions(instruction)
    return program


def _baselines(task: str, scorer) -> dict:
    """``{instruction: {question: answer}}`` for the three baselines on every row of ``task`` (cached)."""
    from dspy_greater.start import reasoning_instruction

    path = OUT / "baselines" / f"{task}.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    rows = _rows(task)
    for instruction in (_program().predict.signature.instructions, ZERO_SHOT_COT, reasoning_instruction("answer")):
        if instruction not in cached:
            print(f"  scoring {instruction!r} on all {len(rows)} rows of {task} ...", flush=True)
            predictions, _ = scorer.optimizer_predictions(_program(instruction), rows)
            cached[instruction] = {row.question: p for row, p in zip(rows, predictions)}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cached))
    return cached


def run(args) -> None:
    import torch

    from dspy_greater.models.loading import load_optimizer_model
    from dspy_greater.engine.config import GreaterConfig

    torch.set_num_threads(args.threads)
    model, tokenizer = load_optimizer_model()
    scorer = _teleprompter(model, tokenizer, GreaterConfig())  # scores every instruction at 48 tokens
    base, overrides = parse_config(args.config)
    config = GreaterConfig.faithful(**overrides) if base == "faithful" else GreaterConfig(**overrides)
    folder = OUT / args.config
    folder.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        baselines = _baselines(task, scorer)
        for seed in args.seeds:
            path = folder / f"{task}_seed{seed}.json"
            if path.exists():
                continue
            train, val, test = _splits(task, seed)
            print(f"== {args.config}: {task} seed {seed} ({len(train)}/{len(val)}/{len(test)}) ...", flush=True)
            load_start = os.getloadavg()
            started = time.perf_counter()
            optimized = _teleprompter(model, tokenizer, GreaterConfig(**{**vars(config), "seed": seed})).compile(
                _program(), trainset=train, valset=val)
            seconds = time.perf_counter() - started
            result = optimized.greater_results["predict"]
            returned = optimized.predict.signature.instructions
            if returned in baselines:  # a row's answer does not depend on the split: reuse the cached one
                after = [baselines[returned][e.question] for e in test]
                labels = [_canonical(task, e.answer) for e in test]
            else:
                after, labels = scorer.optimizer_predictions(optimized, test)
            report = {
                "task": task, "seed": seed, "config": args.config, "settings": vars(config), "splits": [len(train),
                len(val), len(test)], "compile_seconds": round(seconds, 1), "load_average": [load_start,
                os.getloadavg()], "program_instruction": result["program_instruction"],
                "start": result["initial_instruction"], "returned": optimized.predict.signature.instructions,
                "heldout": {"start": result["initial_heldout"]["accuracy"], "best": result["best_heldout"]["accuracy"],
                            "program": (result.get("program_heldout") or {}).get("accuracy")},
                "labels": labels, "after": after,
                "finalist_mistake_rates": [[f["mistake_rate"] for f in step["finalists"]] for step in result["trace"]],
                "baselines": {name: [baselines[instruction][e.question] for e in test] for name, instruction in
                              (("program", result["program_instruction"]), ("cot", ZERO_SHOT_COT),
                               ("start", result["initial_instruction"])) if instruction in baselines},
                "command": " ".join(["python", "benchmarks/default_protocol.py", *sys.argv[1:]]),
            }
            path.write_text(json.dumps(report, indent=1))
            print(f"   {seconds / 60:.1f} min; returned {report['returned']!r}", flush=True)


def transfer(args) -> None:
    """Score each run's returned instruction, and the baselines, on another model family's target.

    The target (a GGUF served by llama.cpp, Gemma-3-270M by default) runs the program through
    ``GReaTerAdapter`` with the task's extractor, greedy, ``--target-tokens`` of reasoning. Answers
    are cached per task and instruction in ``results/protocol/transfer_<target>/<task>.json``; each
    run's record goes to ``results/protocol/<config>@<target>/`` in the runs' own format, so
    ``summary --configs <config>@<target>`` pools the transfer like the runs themselves.
    """
    import dspy

    from dspy_greater.metrics import exact_match
    from dspy_greater.targets.adapter import GReaTerAdapter
    from dspy_greater.targets.llama_cpp import LlamaCppServer

    runs = [json.loads(p.read_text()) for p in sorted((OUT / args.config).glob("*_seed*.json"))]
    folder = OUT / f"{args.config}@{args.target}"
    folder.mkdir(parents=True, exist_ok=True)
    with LlamaCppServer(args.target, n_threads=args.threads) as server:
        lm = server.lm(max_tokens=args.target_tokens, cache=True)
        for run in runs:
            task, seed = run["task"], run["seed"]
            path = folder / f"{task}_seed{seed}.json"
            if path.exists() and set(args.systems) <= set(json.loads(path.read_text())["baselines"]):
                continue
            test = _splits(task, seed)[2]
            cache_path = OUT / f"transfer_{args.target}" / f"{task}.json"
            cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
            adapter = GReaTerAdapter({"answer": _extractor(task)}, max_reasoning_tokens=args.target_tokens)
            named = {"after": run["returned"], "program": run["program_instruction"], "cot": ZERO_SHOT_COT,
                     "start": run["start"]}
            named = {name: named[name] for name in ("after", "program", *args.systems)}
            for instruction in dict.fromkeys(named.values()):
                answers = cache.setdefault(instruction, {})
                todo = [e for e in test if e.question not in answers]
                if todo:
                    print(f"  {task} seed {seed}: {len(todo)} rows on {args.target} under {instruction!r} ...", flush=True)
                    with dspy.context(lm=lm, adapter=adapter):
                        result = dspy.Evaluate(devset=todo, metric=exact_match, num_threads=1, display_progress=False,
                                               provide_traceback=False, max_errors=len(todo) + 1)(_program(instruction))
                    for example, prediction, _ in result.results:
                        answer = None if prediction is None else prediction.get("answer")
                        answers[example.question] = None if answer is None else str(answer)
                    cache_path.parent.mkdir(parents=True, exist_ok=True)
                    cache_path.write_text(json.dumps(cache))
            pick = lambda name: [cache[named[name]][e.question] for e in test]  # noqa: E731
            report = {**{k: run[k] for k in ("task", "seed", "config", "settings", "splits", "compile_seconds",
                                             "program_instruction", "start", "returned")},
                      "target": f"{server.alias} (llama.cpp, GReaTerAdapter, {args.target_tokens} reasoning tokens)",
                      "labels": [_canonical(task, e.answer) for e in test], "after": pick("after"),
                      "baselines": {name: pick(name) for name in named if name != "after"},
                      "command": " ".join(["python", "benchmarks/default_protocol.py", *sys.argv[1:]])}
            path.write_text(json.dumps(report, indent=1))
            print(f"  {task} seed {seed}: done", flush=True)


def mistakes(args) -> None:
    """Share of training examples whose teacher-forced answer counts as right, under the reasoning start
    and its 48-token reasoning, by the paper's rule (every answer token the vocabulary's argmax) and
    among the choices (``mistakes_over="choices"``): seed 0's 24 training examples of each task."""
    import torch

    from dspy_greater.engine.config import GreaterConfig
    from dspy_greater.engine.layout import GreaterLayout
    from dspy_greater.engine.model import OptimizerLM
    from dspy_greater.engine.search import GreaterSearch, SearchExample
    from dspy_greater.models.loading import load_optimizer_model
    from dspy_greater.start import reasoning_instruction

    torch.set_num_threads(args.threads)
    model, tokenizer = load_optimizer_model()
    lm, layout = OptimizerLM(model, tokenizer), GreaterLayout(tokenizer)
    report = {}
    for task in TASKS:
        search = GreaterSearch(lm, layout, _extractor(task), GreaterConfig())
        examples = [SearchExample(e.question, _canonical(task, e.answer)) for e in _splits(task, 0)[0]]
        instruction = layout.encode_instruction(reasoning_instruction("answer"))
        seqs = search.sequences(instruction, examples, search.reasoning(instruction, examples))
        choices = search.choice_first_tokens()
        temperature = search.config.answer_temperature
        by_rule = {"vocabulary": lm.score(seqs, answer_temperature=temperature),
                   "choices": lm.score(seqs, answer_temperature=temperature, correct_among=choices)}
        report[task] = {rule: sum(s.correct for s in scores) / len(scores) for rule, scores in by_rule.items()}
        print(f"{task}: right by the vocabulary's argmax {report[task]['vocabulary']:.2f}, among the choices "
              f"{report[task]['choices']:.2f}", flush=True)
    path = OUT / "mistake_rules.json"
    path.write_text(json.dumps({"command": " ".join(["python", "benchmarks/default_protocol.py", *sys.argv[1:]]),
                                "right_share": report}, indent=1))


def pooled_gain(runs: list[dict], system: str, measure, resamples: int = 1000, seed: int = 0) -> dict:
    """Mean over runs of ``measure(system) - measure(program)``, with two bootstrap 95% intervals:
    rows resampled within each run, and runs resampled as well."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def gain(run, rows=None):
        labels, before, after = run["labels"], run["baselines"]["program"], _answers(run, system)
        if rows is not None:
            labels, before, after = ([x[i] for i in rows] for x in (labels, before, after))
        return measure(labels, after) - measure(labels, before)

    point = statistics.mean(gain(r) for r in runs)
    by_rows, by_runs = [], []
    for _ in range(resamples):
        by_rows.append(statistics.mean(gain(r, rng.integers(0, len(r["labels"]), len(r["labels"]))) for r in runs))
        drawn = [runs[i] for i in rng.integers(0, len(runs), len(runs))]
        by_runs.append(statistics.mean(gain(r, rng.integers(0, len(r["labels"]), len(r["labels"]))) for r in drawn))
    interval = lambda xs: [float(np.percentile(xs, 2.5)), float(np.percentile(xs, 97.5))]  # noqa: E731
    return {"gain": point, "rows_95": interval(by_rows), "runs_95": interval(by_runs)}


def _answers(run: dict, system: str) -> list:
    return run["after"] if system == "after" else run["baselines"][system]


def summary(args) -> None:
    from dspy_greater.metrics import accuracy, balanced_accuracy, majority_rate

    table = {}
    for config in args.configs:
        runs = [json.loads(p.read_text()) for p in sorted((OUT / config).glob("*_seed*.json"))]
        runs = [r for r in runs if args.seeds is None or r["seed"] in args.seeds]
        if not runs:
            print(f"{config}: no runs yet")
            continue
        times = [r["compile_seconds"] for r in runs]
        scored = [system for system in ("cot", "start") if all(system in r["baselines"] for r in runs)]
        table[config] = {
            "runs": len(runs),
            "differs_from_program": sum(r["returned"] != r["program_instruction"] for r in runs),
            "differs_from_start": sum(r["returned"] != r["start"] for r in runs),
            "compile_minutes": {"median": statistics.median(times) / 60, "max": max(times) / 60},
            "majority_rate": statistics.mean(majority_rate(r["labels"]) for r in runs),
            "means": {system: {name: statistics.mean(measure(r["labels"], _answers(r, system)) for r in runs)
                               for name, measure in (("accuracy", accuracy), ("balanced", balanced_accuracy))}
                      for system in ("program", *scored, "after")},
            **{f"{system}_{name}": pooled_gain(runs, system, measure)
               for system in ("after", *scored)
               for name, measure in (("accuracy", accuracy), ("balanced", balanced_accuracy))},
            "returned": {f"{r['task']} seed {r['seed']}": r["returned"] for r in runs},
        }
    path = pathlib.Path(args.output)
    path.write_text(json.dumps(table, indent=1))
    def fmt(g):
        return "not scored" if g is None else f"{g['gain']:+.3f} [{g['runs_95'][0]:+.3f}, {g['runs_95'][1]:+.3f}]"
    print("| configuration | runs | differs from program / start | balanced gain | accuracy gain | CoT balanced | "
          "start balanced | compile min (median / max) |")
    print("|---|---|---|---|---|---|---|---|")
    for config, row in table.items():
        print(f"| `{config}` | {row['runs']} | {row['differs_from_program']} / {row['differs_from_start']} | "
              f"{fmt(row['after_balanced'])} | {fmt(row['after_accuracy'])} | {fmt(row.get('cot_balanced'))} | "
              f"{fmt(row.get('start_balanced'))} | {row['compile_minutes']['median']:.1f} / "
              f"{row['compile_minutes']['max']:.1f} |")
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="compile and score one configuration's runs")
    r.add_argument("--config", default="default", type=config_spec,
                   help="a quality.py configuration name, e.g. default or default+keep_current=false")
    r.add_argument("--tasks", nargs="+", default=list(TASKS))
    r.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    r.add_argument("--threads", type=int, default=2)
    t = sub.add_parser("transfer", help="score a configuration's returned instructions on another target")
    t.add_argument("--config", default="default", type=config_spec)
    t.add_argument("--target", default="gemma3-270m", help="a GGUF llama.cpp serves: gemma3-270m or a path")
    t.add_argument("--target-tokens", type=int, default=48, help="reasoning token limit on the target")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--systems", nargs="*", default=["cot", "start"], choices=["cot", "start"],
                   help="baselines to score beside the program's and the returned instructions")
    m = sub.add_parser("mistakes", help="the two mistake rules on the reasoning start's teacher-forced answers")
    m.add_argument("--threads", type=int, default=2)
    s = sub.add_parser("summary", help="pool the runs of some configurations")
    s.add_argument("--configs", nargs="+", default=["default"])
    s.add_argument("--seeds", nargs="+", type=int, default=None, help="pool only these seeds (screening: 0)")
    s.add_argument("--output", default=str(OUT / "summary.json"))
    args = p.parse_args()
    {"run": run, "transfer": transfer, "mistakes": mistakes, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main()
