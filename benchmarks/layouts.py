"""The chat_adapter layout against the paper's layout, on the optimizer model, same task and seed.

Compiles the same ``dspy.ChainOfThought("question -> answer")`` program twice with the embedded
SmolLM2-135M, once with ``layout="greater"`` and once with ``layout="chat_adapter"``, on the same
seeded splits and settings. Each layout is scored in its own layout (the one the program will run
in): the held-out accuracy the search measured, and the optimizer model's answers on the test
examples before and after (``optimizer_predictions``): accuracy, balanced accuracy, majority-class
rate, answer counts, and the compile's wall time.

    python benchmarks/layouts.py --task navigate --train 12 --val 8 --test 20 --steps 5
"""

from __future__ import annotations

import json
import os
import time

from compile_runs import parser, setup


def main() -> None:
    p = parser(__doc__, train=12, val=8, test=20, steps=5, threads=1)
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--layouts", nargs="+", default=["greater", "chat_adapter"], choices=["greater", "chat_adapter"])
    args = p.parse_args()

    import dspy

    from dspy_greater import GReaTerTeleprompter
    from dspy_greater.metrics import exact_match, summarize

    train, val, test, model, tokenizer, report = setup(args, "benchmarks/layouts.py")
    report.update(eval_every=args.eval_every, layouts={})
    for name in args.layouts:
        tp = GReaTerTeleprompter(metric=exact_match, layout=name, num_steps=args.steps, eval_every=args.eval_every,
                                 max_reasoning_tokens=args.reasoning_tokens, seed=args.seed, progress=False)
        tp.use_loaded_model(model, tokenizer)
        program = dspy.ChainOfThought("question -> answer")
        t0 = time.perf_counter()
        before, golds = tp.optimizer_predictions(program, test)
        seconds_eval_before = time.perf_counter() - t0
        t0 = time.perf_counter()
        optimized = tp.compile(program, trainset=train, valset=val)
        seconds_compile = time.perf_counter() - t0
        t0 = time.perf_counter()
        after, _ = tp.optimizer_predictions(optimized, test)
        seconds_eval_after = time.perf_counter() - t0
        result = optimized.greater_results["predict"]
        report["layouts"][name] = {
            "layout": result["layout"],
            "initial_instruction": result["initial_instruction"],
            "best_instruction": result["best_instruction"],
            "final_instruction": result["final_instruction"],
            "heldout_before": result["initial_heldout"]["accuracy"],
            "heldout_after": result["best_heldout"]["accuracy"],
            "heldout_majority": summarize([e.answer for e in val], [None] * len(val))["majority_rate"],
            "test_before": summarize(golds, before),
            "test_after": summarize(golds, after),
            "seconds_compile": seconds_compile,
            "seconds_test_eval": [seconds_eval_before, seconds_eval_after],
            "step_seconds": [r["seconds"] for r in result["trace"]],
            "trace": [{k: r[k] for k in ("step", "position", "chosen", "changed", "instruction", "heldout_accuracy")}
                      for r in result["trace"]],
            "load_average_end": os.getloadavg(),
        }
        print(json.dumps({name: report["layouts"][name]}, indent=1), flush=True)
    text = json.dumps(report, indent=1)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
