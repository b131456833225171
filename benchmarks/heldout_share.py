"""Does a larger held-out share buy a better instruction? The default configuration compiled with the
same examples cut into training and held-out sets in several ways, scored on the same test examples.

The examples are the first train + held-out rows of one seeded shuffle of the task (the same rows for
every cut of the same total), the test examples every row after them (up to ``--test``):

    python benchmarks/heldout_share.py --task navigate --seed 0 --shares 24/12 18/18 12/24

Reports, per cut, the compile time, the held-out accuracy before and after, the test accuracy
(balanced accuracy and majority rate beside it) under the initial and the returned instruction,
and each cut's test accuracy against the first cut's on the same examples (paired bootstrap).
"""

from __future__ import annotations

import json
import pathlib
import time

from compile_runs import parser, setup

HERE = pathlib.Path(__file__).parent


def parse_share(text: str) -> tuple[int, int]:
    train, _, heldout = text.partition("/")
    return int(train), int(heldout)


def main() -> None:
    p = parser(__doc__, train=24, val=12, test=1000, steps=10, threads=2)
    p.add_argument("--shares", nargs="+", default=["24/12", "18/18", "12/24"], help="train/held-out cuts")
    args = p.parse_args()
    shares = [parse_share(s) for s in args.shares]
    if len({t + v for t, v in shares}) != 1:
        p.error(f"--shares must cut the same number of examples: {args.shares}")
    args.train, args.val = shares[0]

    from dspy_greater import GReaTerTeleprompter
    from dspy_greater.data import load_examples, split_examples
    from dspy_greater.metrics import exact_match, summarize
    from paired import paired_difference
    from dspy_greater.engine.config import GreaterConfig

    import dspy

    _, _, test, model, tokenizer, report = setup(args, "benchmarks/heldout_share.py")
    report["shares"] = {}
    program = dspy.ChainOfThought("question -> answer")
    rows = load_examples(args.task)
    before = None
    after = {}
    for train_size, heldout_size in shares:
        train, heldout, share_test = split_examples(rows, [train_size, heldout_size, args.test], seed=args.seed)
        assert [ex.toDict() for ex in share_test] == [ex.toDict() for ex in test], "the test rows moved"
        config = GreaterConfig(num_steps=args.steps, max_reasoning_tokens=args.reasoning_tokens, seed=args.seed)
        tp = GReaTerTeleprompter(metric=exact_match, config=config, progress=False)
        tp.use_loaded_model(model, tokenizer)
        if before is None:
            before, labels = tp.optimizer_predictions(program, test)
        name = f"{train_size}/{heldout_size}"
        print(f"== {name}: compiling ...", flush=True)
        started = time.perf_counter()
        optimized = tp.compile(program, trainset=train, valset=heldout)
        seconds = time.perf_counter() - started
        result = optimized.greater_results["predict"]
        after[name], _ = tp.optimizer_predictions(optimized, test)
        entry = {
            "train": train_size, "heldout": heldout_size, "compile_seconds": round(seconds, 1),
            "best_instruction": result["best_instruction"],
            "heldout_before": result["initial_heldout"]["accuracy"], "heldout_best": result["best_heldout"]["accuracy"],
            "test_before": summarize(labels, before), "test_after": summarize(labels, after[name]),
        }
        report["shares"][name] = entry
        print(f"   {seconds / 60:.1f} min; held-out {entry['heldout_before']:.3f} -> {entry['heldout_best']:.3f}; "
              f"test {entry['test_before']['accuracy']:.3f} -> {entry['test_after']['accuracy']:.3f} "
              f"(balanced {entry['test_after']['balanced_accuracy']:.3f}, majority "
              f"{entry['test_after']['majority_rate']:.3f}); {entry['best_instruction']!r}", flush=True)
    first = args.shares[0]
    report["differences"] = {f"{name} - {first}": paired_difference(labels, after[name], after[first])
                             for name in args.shares[1:]}
    for pair, d in report["differences"].items():
        print(f"   test accuracy after, {pair}: {d['difference']:+.3f} (95% {d['low']:+.3f} to {d['high']:+.3f})")
    path = pathlib.Path(args.output) if args.output else HERE / "results" / f"heldout_share_{args.task}_seed{args.seed}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
