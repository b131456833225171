"""``dspy-greater``: the demo, and optimizing an instruction for a task file."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm must not reach for the network
# Spinning OpenMP threads slow every op many times over when another process shares the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _summary_rows(label: str, instruction: str, golds, preds) -> dict:
    from dspy_greater.metrics import summarize

    return {"when": label, "instruction": instruction, **summarize(golds, preds)}


def _print_table(rows: list[dict]) -> None:
    print()
    print(f"{'':8} {'accuracy':>9} {'majority':>9} {'balanced':>9}  predictions")
    for row in rows:
        print(f"{row['when']:8} {row['accuracy']:9.3f} {row['majority_rate']:9.3f} "
              f"{row['balanced_accuracy']:9.3f}  {row['pred_distribution']}")
    print()


def run_demo(args: argparse.Namespace) -> dict:
    """Optimize a ChainOfThought program's instruction on a BBH task and report before/after."""
    if args.target:
        from dspy_greater.server import LlamaCppServer

        with LlamaCppServer(None if args.target == "smollm2" else args.target) as server:
            kind = "plain-text completions: the GGUF has no chat template" if server.plain_text else "chat"
            print(f"Target LM: {server.alias} served by llama.cpp at {server.api_base} ({kind})")
            return _run_demo(args, server)
    return _run_demo(args, None)


def _run_demo(args: argparse.Namespace, server) -> dict:
    import contextlib

    import dspy

    from dspy_greater.adapter import GReaTerAdapter

    from dspy_greater import GReaTerTeleprompter
    from dspy_greater.data import load_examples, split_examples
    from dspy_greater.metrics import evaluate_program, exact_match

    started = time.perf_counter()
    examples = load_examples(args.task) if args.file is None else load_examples(
        args.file, input_key=args.input_key, output_key=args.output_key)
    train, val, test = split_examples(examples, [args.train, args.val, args.test], seed=args.seed)
    print(f"Task {args.task if args.file is None else args.file}: {len(train)} train / {len(val)} held-out / "
          f"{len(test)} test examples (seed {args.seed}).")
    program = dspy.ChainOfThought("question -> answer")
    if args.instruction:
        program.predict.signature = program.predict.signature.with_instructions(args.instruction)
    teleprompter = GReaTerTeleprompter(
        metric=exact_match, model=args.model, num_steps=args.steps, seed=args.seed, progress=not args.quiet,
        num_threads=args.threads, dtype=args.dtype, device=args.device,
    )
    target = dspy.context(lm=server.lm(max_tokens=args.target_tokens), adapter=GReaTerAdapter(
        max_reasoning_tokens=args.target_tokens)) if server else contextlib.nullcontext()
    print("Scoring the initial instruction on the test examples with the optimizer model ...", flush=True)
    preds, golds = teleprompter.optimizer_predictions(program, test)
    before = _summary_rows("before", program.predict.signature.instructions, golds, preds)
    with target:
        if server:
            print("... and on the target LM ...", flush=True)
            before["target"] = evaluate_program(program, test, threads=args.threads)
        optimized = teleprompter.compile(program, trainset=train, valset=val)
        preds, golds = teleprompter.optimizer_predictions(optimized, test)
        after = _summary_rows("after", optimized.predict.signature.instructions, golds, preds)
        if server:
            after["target"] = evaluate_program(optimized, test, threads=args.threads)
            calls = len(dspy.settings.lm.history)
    elapsed = time.perf_counter() - started

    start = optimized.greater_results["predict"]["initial_instruction"]
    print(f"\nInitial instruction:   {before['instruction']!r}")
    if start != before["instruction"]:
        print(f"Search started from:   {start!r}")
    print(f"Optimized instruction: {after['instruction']!r}")
    print(f"\nOptimizer model's answers on {len(test)} held-out test examples "
          "(balanced = mean recall per label; a model that always gives one label scores 1/#labels):")
    _print_table([before, after])
    if server:
        b, a = before["target"], after["target"]
        print(f"Target LM ({server.alias}) on the same test examples: accuracy before {b['accuracy']:.3f}, after "
              f"{a['accuracy']:.3f}; balanced accuracy {b['balanced_accuracy']:.3f} -> {a['balanced_accuracy']:.3f} "
              f"(majority rate {b['majority_rate']:.3f}); {calls} target-LM calls in all.")
        selection = optimized.greater_results["predict"].get("target_selection")
        if selection:
            print(f"Target-aware selection on {len(val)} held-out examples: {selection['scores']}")
    print(f"Total time {elapsed / 60:.1f} min.")
    model = teleprompter._lm.model
    report = {"task": args.task, "seed": args.seed, "steps": args.steps,
              "model": {"name": getattr(model.config, "_name_or_path", None), "dtype": str(model.dtype).removeprefix("torch."),
                        "device": str(model.device)},
              "before": before, "after": after,
              "seconds": elapsed, "search": optimized.greater_results}
    if args.output:
        path = pathlib.Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"Report written to {path}")
    if args.save_program:
        optimized.save(args.save_program)
        print(f"Optimized program saved to {args.save_program}")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspy-greater", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="optimize an instruction on a BBH task (or a task file) and report before/after")
    demo.add_argument("--task", default="navigate", help="packaged BBH task (default: navigate)")
    demo.add_argument("--file", default=None, help="a .json/.jsonl/.csv task file instead of a packaged task")
    demo.add_argument("--input-key", default=None, help="column holding the question (task files)")
    demo.add_argument("--output-key", default=None, help="column holding the answer (task files)")
    demo.add_argument("--model", default=None, help="optimizer model: hub id, folder or .gguf (default: embedded SmolLM2-135M)")
    demo.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                      help="optimizer model dtype (auto: float32 on CPU, bfloat16/float16 on CUDA); bfloat16 is "
                           "faster on CPUs with AMX or AVX-512-BF16 (benchmarks/README.md)")
    demo.add_argument("--device", default=None, help="optimizer model device, e.g. cuda (default: cuda if available)")
    demo.add_argument("--train", type=int, default=24)
    demo.add_argument("--val", type=int, default=12)
    demo.add_argument("--test", type=int, default=40)
    demo.add_argument("--steps", type=int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--instruction", default=None, help="initial instruction (default: the program's own)")
    demo.add_argument("--output", default=None, help="write a JSON report here")
    demo.add_argument("--save-program", default=None, help="save the optimized DSPy program (JSON) here")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument("--target", default=None,
                      help="also evaluate on a target LM served by llama.cpp: 'smollm2', 'gemma3-270m' or a .gguf path")
    demo.add_argument("--target-tokens", type=int, default=128, help="reasoning token limit on the target LM")
    demo.add_argument("--threads", type=int, default=2, help="threads for target-LM evaluation")
    demo.set_defaults(func=run_demo)

    from dspy_greater.server import add_serve_subcommand

    add_serve_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as exc:
        print(f"dspy-greater: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
