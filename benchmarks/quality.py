"""Held-out gain on the optimizer model: our default CPU configuration vs the paper's protocol.

Both compile the same ``dspy.ChainOfThought`` program on the same seeded splits (the demo's: 24
train / 12 held-out / 40 test) with the embedded SmolLM2-135M, for the same number of steps and
reasoning length. "faithful" is ``GreaterConfig.faithful`` (every training example every step,
reasoning regenerated for every finalist, no keep-current, held-out check every step) without our
prefix cache, so its wall time is the paper protocol's cost. Reported per configuration: wall time
of ``compile`` and the optimizer model's test accuracy, majority-class rate and balanced accuracy
before and after, and for each pair of configurations the difference of their test accuracies
after, with a paired bootstrap 95% interval (both start from the same instruction, so that is
the difference of their gains).

    python benchmarks/quality.py --task navigate --steps 10

``--reuse faithful=<earlier report>.json`` takes a configuration's returned instruction
(and compile time) from an earlier report on the same task, train and held-out split, seed,
steps, reasoning length and dtype instead of compiling again; the test split can then be larger
(the splits are consecutive slices of one seeded shuffle, so train and held-out stay the same).
``--instruction TEXT`` starts the program (and so every configuration) from TEXT instead of DSPy's
instruction for the signature.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

from compile_runs import parser, report_runs, setup

HERE = pathlib.Path(__file__).resolve().parent
# default: GreaterConfig(); default-score / default-loss: the same with finalist_key set (paper's
# score vs answer loss at equal mistakes); faithful: the paper's protocol and cost.
CONFIGS = ("default", "default-score", "default-loss", "faithful")
# The instruction DSPy gives ChainOfThought("question -> answer"); reports without "instruction" started from it.
DSPY_INSTRUCTION = "Given the fields `question`, produce the fields `answer`."


def parse_config(name: str) -> tuple[str, dict]:
    """``(base configuration, GreaterConfig overrides)`` of a name like ``default+eval_every=1`` (JSON values)."""
    base, *fields = name.split("+")
    if base not in CONFIGS:
        raise argparse.ArgumentTypeError(f"unknown configuration {base!r}; choose from {', '.join(CONFIGS)}")
    from dspy_greater.engine.config import GreaterConfig

    overrides = {}
    for field in fields:
        key, sep, value = field.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{field!r} in {name!r} is not field=value")
        if key not in GreaterConfig.field_names():
            raise argparse.ArgumentTypeError(f"{key!r} in {name!r} is not a GreaterConfig field")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"the value of {key!r} in {name!r} is not JSON (strings need quotes)") from None
    return base, overrides


def step_summary(record: dict) -> dict:
    """What a step chose and why, from its trace record (finalists with their batch mistake rate and
    answer loss)."""
    keys = ("mistake_rate", "answer_loss", "fluency")
    return {
        "position": record["position"], "chosen": record["chosen"], "changed": record["changed"],
        "heldout_accuracy": record["heldout_accuracy"], "instruction": record["instruction"],
        "finalists": [{"token": f["token"], **{k: round(f[k], 4) for k in keys}} for f in record["finalists"]],
    }


def config_spec(name: str) -> str:
    """argparse type: the name itself, once :func:`parse_config` accepts it."""
    parse_config(name)
    return name


def earlier_entry(path: pathlib.Path, name: str, report: dict) -> dict:
    """``name``'s entry in an earlier report (any layout :func:`compile_runs.report_runs` reads) made
    with the same task, train and held-out split, seed, steps, reasoning length, dtype and starting
    instruction."""
    same = ("task", "seed", "steps", "reasoning_tokens")
    for earlier in report_runs(json.loads(path.read_text())):
        starts_alike = earlier.get("instruction", DSPY_INSTRUCTION) == report["instruction"]
        if (all(earlier[k] == report[k] for k in same) and earlier["splits"][:2] == report["splits"][:2] and starts_alike
                and (earlier.get("dtype") or "float32") == report["dtype"] and name in earlier["configs"]):
            return earlier["configs"][name]
    raise SystemExit(f"{path} has no {name!r} run with task {report['task']}, splits {report['splits'][:2]}, "
                     f"seed {report['seed']}, {report['steps']} steps, {report['reasoning_tokens']} reasoning "
                     f"tokens, dtype {report['dtype']} and starting instruction {report['instruction']!r}; "
                     "compile it instead (drop it from --reuse).")


def main() -> None:
    p = parser(__doc__, train=24, val=12, test=40, steps=10, threads=2)
    p.add_argument("--configs", nargs="+", default=["default", "faithful"], type=config_spec,
                   help=f"{', '.join(CONFIGS)}; a name may add GreaterConfig fields, e.g. default+eval_every=1")
    p.add_argument("--reuse", nargs="+", default=[], metavar="CONFIG=JSON",
                   help="take CONFIG's instruction from an earlier report instead of compiling")
    p.add_argument("--instruction", default=None,
                   help="the program's starting instruction (default: DSPy's own for the signature)")
    args = p.parse_args()
    reuse = dict(item.rsplit("=", 1) for item in args.reuse)  # a configuration name may hold "=" itself
    unknown = set(reuse) - set(args.configs)
    if unknown:
        p.error(f"--reuse names configurations not in --configs: {sorted(unknown)}")

    import dspy

    from dspy_greater import GReaTerTeleprompter
    from dspy_greater.metrics import exact_match, summarize
    from paired import paired_difference
    from dspy_greater.engine.config import GreaterConfig

    train, val, test, model, tokenizer, report = setup(args, "benchmarks/quality.py")
    report["configs"] = {}
    program = dspy.ChainOfThought("question -> answer")
    if args.instruction is not None:
        program.predict.signature = program.predict.signature.with_instructions(args.instruction)
    report["instruction"] = program.predict.signature.instructions
    earlier = {name: earlier_entry(pathlib.Path(path), name, report) for name, path in reuse.items()}
    before = None
    after_predictions = {}
    for name in args.configs:
        base, overrides = parse_config(name)
        common = dict(num_steps=args.steps, max_reasoning_tokens=args.reasoning_tokens, seed=args.seed, **overrides)
        if base == "faithful":
            config = GreaterConfig.faithful(**{"prefix_cache": False, **common})
        else:
            config = GreaterConfig(**common, **({"finalist_key": base.split("-")[1]} if "-" in base else {}))
        tp = GReaTerTeleprompter(metric=exact_match, config=config, progress=False)
        tp.use_loaded_model(model, tokenizer)
        if before is None:  # every configuration starts from the same instruction
            before = tp.optimizer_predictions(program, test)
        if name in earlier:
            print(f"== {name}: instruction from {reuse[name]}", flush=True)
            entry = {k: v for k, v in earlier[name].items() if k not in ("test_before", "test_after", "load_average_end")}
            entry["reused_from"] = reuse[name]
            optimized = program.deepcopy()
            optimized.predict.signature = optimized.predict.signature.with_instructions(entry["best_instruction"])
        else:
            print(f"== {name}: compiling ...", flush=True)
            started = time.perf_counter()
            optimized = tp.compile(program, trainset=train, valset=val)
            result = optimized.greater_results["predict"]
            entry = {
                "config": {k: v for k, v in vars(config).items()},
                "examples_per_step": min(config.batch_size or len(train), len(train)),
                "compile_seconds": round(time.perf_counter() - started, 1),
                "initial_instruction": result["initial_instruction"],
                "best_instruction": result["best_instruction"],
                "heldout_before": result["initial_heldout"]["accuracy"],
                "heldout_best": result["best_heldout"]["accuracy"],
                "steps": [step_summary(record) for record in result["trace"]],
            }
        after_predictions[name], labels = tp.optimizer_predictions(optimized, test)
        entry.update(test_before=summarize(labels, before[0]), test_after=summarize(labels, after_predictions[name]),
                     load_average_end=os.getloadavg())
        report["configs"][name] = entry
        print(f"   {entry['compile_seconds'] / 60:.1f} min; test accuracy {entry['test_before']['accuracy']:.3f} -> "
              f"{entry['test_after']['accuracy']:.3f}, balanced {entry['test_before']['balanced_accuracy']:.3f} -> "
              f"{entry['test_after']['balanced_accuracy']:.3f}, majority {entry['test_after']['majority_rate']:.3f}; "
              f"{entry['best_instruction']!r}", flush=True)
    report["after_differences"] = {
        f"{a} - {b}": paired_difference(labels, after_predictions[a], after_predictions[b])
        for i, a in enumerate(args.configs) for b in args.configs[i + 1 :]
    }
    for pair, d in report["after_differences"].items():
        print(f"   test accuracy after, {pair}: {d['difference']:+.3f} (95% {d['low']:+.3f} to {d['high']:+.3f}; "
              f"right only in the first {d['a_only']}, only in the second {d['b_only']})", flush=True)
    path = pathlib.Path(args.output) if args.output else HERE / "results" / f"quality_{args.task}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
