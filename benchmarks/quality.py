"""Held-out gain on the optimizer model: our default CPU configuration vs the paper's protocol.

Both compile the same ``dspy.ChainOfThought`` program on the same seeded splits (the demo's: 24
train / 12 held-out / 40 test) with the embedded SmolLM2-135M, for the same number of steps and
reasoning length. "faithful" is ``GreaterConfig.faithful`` (every training example every step,
reasoning regenerated for every finalist, no keep-current, held-out check every step) without our
prefix cache, so its wall time is the paper protocol's cost. Reported per configuration: wall time
of ``compile`` and the optimizer model's test accuracy, majority-class rate and balanced accuracy
before and after.

    python benchmarks/quality.py --task navigate --steps 10
"""

from __future__ import annotations

import json
import os
import pathlib
import time

from compile_runs import parser, setup

HERE = pathlib.Path(__file__).resolve().parent
# default: GreaterConfig(); default-score / default-loss: the same with finalist_key set (paper's
# score vs answer loss at equal mistakes); faithful: the paper's protocol and cost.
CONFIGS = ("default", "default-score", "default-loss", "faithful")


def main() -> None:
    p = parser(__doc__, train=24, val=12, test=40, steps=10, threads=2)
    p.add_argument("--configs", nargs="+", default=["default", "faithful"], choices=list(CONFIGS))
    args = p.parse_args()

    import dspy

    from dspy_greater import GReaTerTeleprompter
    from dspy_greater.metrics import exact_match, summarize
    from dspy_greater.search import GreaterConfig

    train, val, test, model, tokenizer, report = setup(args, "benchmarks/quality.py")
    report["configs"] = {}
    for name in args.configs:
        common = dict(num_steps=args.steps, max_reasoning_tokens=args.reasoning_tokens, seed=args.seed)
        if name == "faithful":
            config = GreaterConfig.faithful(**common, prefix_cache=False)
        else:
            config = GreaterConfig(**common, **({"finalist_key": name.split("-")[1]} if "-" in name else {}))
        tp = GReaTerTeleprompter(metric=exact_match, config=config, progress=False)
        tp.use_loaded_model(model, tokenizer)
        program = dspy.ChainOfThought("question -> answer")
        before = tp.optimizer_predictions(program, test)
        print(f"== {name}: compiling ...", flush=True)
        started = time.perf_counter()
        optimized = tp.compile(program, trainset=train, valset=val)
        seconds = time.perf_counter() - started
        after = tp.optimizer_predictions(optimized, test)
        result = optimized.greater_results["predict"]
        entry = {
            "config": {k: v for k, v in vars(config).items()},
            "examples_per_step": min(config.batch_size or len(train), len(train)),
            "compile_seconds": round(seconds, 1),
            "initial_instruction": result["initial_instruction"],
            "best_instruction": result["best_instruction"],
            "test_before": summarize(after[1], before[0]),
            "test_after": summarize(after[1], after[0]),
            "heldout_before": result["initial_heldout"]["accuracy"],
            "heldout_best": result["best_heldout"]["accuracy"],
            "load_average_end": os.getloadavg(),
        }
        report["configs"][name] = entry
        print(f"   {seconds / 60:.1f} min; test accuracy {entry['test_before']['accuracy']:.3f} -> "
              f"{entry['test_after']['accuracy']:.3f}, balanced {entry['test_before']['balanced_accuracy']:.3f} -> "
              f"{entry['test_after']['balanced_accuracy']:.3f}, majority {entry['test_after']['majority_rate']:.3f}; "
              f"{entry['best_instruction']!r}", flush=True)
    path = pathlib.Path(args.output) if args.output else HERE / "results" / f"quality_{args.task}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
