"""A two-predictor program: a plan step, then an answer step, optimized predictor by predictor.

    python examples/two_step.py                      # navigate, SmolLM2 target via llama.cpp, small settings
    python examples/two_step.py --task web_of_lies --steps 2 --test 20

The program::

    plan  = dspy.ChainOfThought("question -> plan")            # step 1: a short plan
    solve = dspy.ChainOfThought("question, plan -> answer")    # step 2: the answer

The target LM is SmolLM2-135M-Instruct served by llama.cpp (``LlamaCppServer``), run through
``GReaTerAdapter`` (tiny models cannot follow DSPy's field markers). ``GReaTerTeleprompter``
optimizes ``plan.predict`` first: the trainset has no gold plans, so the program runs on the
target LM and each run whose final answer passes the metric gives one labelled example (the
question -> the plan it produced). Then ``solve.predict``, for the gold answers, with its
``plan`` input taken from the runs of the program with the new step-1 instruction. Each
predictor's final instruction is chosen on the held-out split with the whole program's metric on
the target. The program is then evaluated on the test split before and after: accuracy,
majority-class rate (always answering the most common gold label) and balanced accuracy (mean
recall per gold label; a constant answer scores 1/#labels).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch threads must not spin on shared cores
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402

from dspy_greater import GReaTerTeleprompter  # noqa: E402
from dspy_greater.targets.adapter import GReaTerAdapter  # noqa: E402
from dspy_greater.data import load_examples, split_examples  # noqa: E402
from dspy_greater.metrics import evaluate_program, exact_match  # noqa: E402
from dspy_greater.targets.llama_cpp import LlamaCppServer  # noqa: E402


class PlanThenAnswer(dspy.Module):
    """Step 1 writes a short plan for the question; step 2 answers the question following it."""

    def __init__(self):
        super().__init__()
        self.plan = dspy.ChainOfThought("question -> plan")
        self.solve = dspy.ChainOfThought("question, plan -> answer")

    def forward(self, question):
        plan = self.plan(question=question).plan
        return self.solve(question=question, plan=plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="navigate", help="packaged BBH task (default: navigate)")
    parser.add_argument("--train", type=int, default=6)
    parser.add_argument("--val", type=int, default=4, help="held-out examples; the final choices are made on them")
    parser.add_argument("--test", type=int, default=12)
    parser.add_argument("--steps", type=int, default=1, help="search steps per predictor on the optimizer model")
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--reasoning-tokens", type=int, default=16, help="optimizer model's reasoning length")
    parser.add_argument("--target-tokens", type=int, default=32, help="reasoning token limit on the target")
    parser.add_argument("--target-candidates", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="threads for the target LM's runs")
    parser.add_argument("--output", default=None, help="write a JSON report here")
    args = parser.parse_args()
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)  # truncated replies are expected here
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    train, val, test = split_examples(load_examples(args.task), [args.train, args.val, args.test], seed=args.seed)
    print(f"Task {args.task}: {len(train)} train / {len(val)} held-out / {len(test)} test examples (seed {args.seed}).")
    program = PlanThenAnswer()
    teleprompter = GReaTerTeleprompter(metric=exact_match, num_steps=args.steps, batch_size=args.batch_size,
                                       max_reasoning_tokens=args.reasoning_tokens, eval_every=1, seed=args.seed,
                                       target_candidates=args.target_candidates, num_threads=args.threads)

    with LlamaCppServer(n_threads=1) as server:  # SmolLM2-135M-Instruct, a chat model
        target = server.lm(max_tokens=args.target_tokens, cache=False)
        print(f"Target LM: {server.alias} served by llama.cpp at {server.api_base}")
        with dspy.context(lm=target, adapter=GReaTerAdapter(max_reasoning_tokens=args.target_tokens)):
            t0 = time.perf_counter()
            optimized = teleprompter.compile(program, trainset=train, valset=val)
            compile_seconds = time.perf_counter() - t0
            compile_calls = len(target.history)
            adapter = GReaTerAdapter.from_program(optimized, max_reasoning_tokens=args.target_tokens)
            t0 = time.perf_counter()
            rows = {"before": evaluate_program(program, test, adapter=adapter, threads=args.threads),
                    "after": evaluate_program(optimized, test, adapter=adapter, threads=args.threads)}
            eval_seconds = time.perf_counter() - t0
        calls = len(target.history)

    print()
    for name, result in optimized.greater_results.items():
        before = dict(program.named_predictors())[name].signature.instructions
        after = dict(optimized.named_predictors())[name].signature.instructions
        print(f"[{name}]")
        if result.get("skipped"):
            print(f"  skipped: {result['reason']}")
            continue
        runs = result.get("program_runs", {}).get("trainset")
        source = "gold labels" if result["labels"] == "gold" else "outputs of program runs that passed the metric"
        print(f"  labels: {source}; {result['examples']['train']} train / {result['examples']['heldout']} held-out "
              f"examples" + (f" ({runs['passed']} of {runs['runs']} train runs passed)" if runs else ""))
        print(f"  initial: {before!r}")
        print(f"  search's best: {result['best_instruction']!r}")
        print(f"  kept: {after!r}")
        selection = result.get("target_selection")
        if selection:
            scores = {text[:50]: round(score, 1) for text, score in selection["scores"].items()}
            print(f"  whole-program score on the {len(val)} held-out examples: {scores}")
    print(f"\nTest split, {len(test)} examples, on the target LM ({server.alias}):")
    print(f"{'when':<7} {'accuracy':>8} {'majority':>8} {'balanced':>8}  {'unparsed':>8}  answers")
    for when, row in rows.items():
        print(f"{when:<7} {row['accuracy']:8.3f} {row['majority_rate']:8.3f} {row['balanced_accuracy']:8.3f}  "
              f"{row['unparsed']:>8}  {row['pred_distribution']}")
    elapsed = time.perf_counter() - started
    print(f"\n{calls} target calls ({compile_calls} during the compile). Time: compile {compile_seconds / 60:.1f} min, "
          f"test evaluation {eval_seconds / 60:.1f} min, {elapsed / 60:.1f} min in all.")

    if args.output:
        path = pathlib.Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        report = {"args": vars(args), "rows": rows, "results": optimized.greater_results, "calls": calls,
                  "seconds": {"compile": compile_seconds, "test_eval": eval_seconds, "total": elapsed}}
        path.write_text(json.dumps(report, indent=2, default=str))
        print(f"Report written to {path}")


if __name__ == "__main__":
    main()
