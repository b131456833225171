"""``dspy-greater``: the demo, optimizing a program for your own task file, and serving a GGUF model."""

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


def _print_instructions(initial: str, start: str, optimized: str) -> None:
    print(f"\nInitial instruction:   {initial!r}")
    if start != initial:
        print(f"Search started from:   {start!r}")
    print(f"Optimized instruction: {optimized!r}")


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
        from dspy_greater.targets.llama_cpp import LlamaCppServer

        with LlamaCppServer(None if args.target == "smollm2" else args.target) as server:
            kind = "plain-text completions: the GGUF has no chat template" if server.plain_text else "chat"
            print(f"Target LM: {server.alias} served by llama.cpp at {server.api_base} ({kind})")
            return _run_demo(args, server)
    return _run_demo(args, None)


def _run_demo(args: argparse.Namespace, server) -> dict:
    import contextlib

    import dspy

    from dspy_greater.targets.adapter import GReaTerAdapter

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

    _print_instructions(before["instruction"], optimized.greater_results["predict"]["initial_instruction"],
                        after["instruction"])
    print(f"\nOptimizer model's answers on {len(test)} test examples, none used to choose "
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
    model = teleprompter.optimizer_model
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


class _CommandLineError(ValueError):
    """Bad command-line input, already worded in terms of the flags."""


def run_optimize(args: argparse.Namespace) -> dict:
    """Optimize a program built from ``--signature`` on a task file; report before/after on a held-out split."""
    import dspy

    from dspy_greater import GReaTerTeleprompter
    from dspy_greater.data import load_fields, split_examples
    from dspy_greater.metrics import exact_match
    from dspy_greater.engine.config import GreaterConfig

    try:
        signature = dspy.Signature(args.signature)
    except Exception as error:  # noqa: BLE001 - DSPy's parser raises several kinds
        raise _CommandLineError(f"--signature {args.signature!r} is not a DSPy signature such as "
                                f"'context, question -> answer' ({error})") from None
    if args.instruction:
        signature = signature.with_instructions(args.instruction)
    inputs, outputs = list(signature.input_fields), list(signature.output_fields)
    if len(outputs) != 1:
        raise _CommandLineError(f"--signature must have one output field, got {len(outputs)} ({', '.join(outputs)}).")
    try:
        examples = load_fields(args.file, inputs, outputs)
    except ValueError as error:
        raise _CommandLineError(f"{error} (--signature {args.signature!r})") from None
    test_n = args.test if args.test is not None else max(1, len(examples) // 5)
    val_n = args.val if args.val is not None else max(1, len(examples) // 5)
    test, val, train = split_examples(examples, [test_n, val_n, None], seed=args.seed)
    if not train:
        raise _CommandLineError(f"{args.file} has {len(examples)} rows, all taken by --test {test_n} and --val {val_n}; "
                                "lower them or add rows.")
    print(f"{args.file}: {len(train)} train / {len(val)} held-out / {len(test)} test rows (seed {args.seed}).")
    program = dspy.ChainOfThought(signature) if args.program == "cot" else dspy.Predict(signature)
    overrides = {k: v for k, v in (("num_steps", args.steps), ("batch_size", args.batch_size),
                                   ("max_reasoning_tokens", args.reasoning_tokens), ("seed", args.seed)) if v is not None}
    try:
        config = GreaterConfig.faithful(**overrides) if args.faithful else GreaterConfig(**overrides)
        teleprompter = GReaTerTeleprompter(metric=exact_match, config=config, model=args.model, dtype=args.dtype,
                                           device=args.device, layout=args.layout, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as error:
        raise _CommandLineError(_in_flag_terms(error, args)) from None
    before, golds = teleprompter.optimizer_predictions(program, test)
    optimized = teleprompter.compile(program, trainset=train, valset=val, checkpoint_dir=args.checkpoint_dir)
    after, _ = teleprompter.optimizer_predictions(optimized, test)
    name, predictor = optimized.named_predictors()[0]
    rows = [_summary_rows("before", signature.instructions, golds, before),
            _summary_rows("after", predictor.signature.instructions, golds, after)]
    _print_instructions(rows[0]["instruction"], optimized.greater_results[name]["initial_instruction"],
                        rows[1]["instruction"])
    print(f"\nThe optimizer model's answers on {len(test)} test rows:")
    _print_table(rows)
    if args.save:
        optimized.save(args.save)
        print(f"Optimized program saved to {args.save} (load it with program.load(...); run it with "
              "dspy.configure(adapter=GReaTerAdapter.from_program(program)) in GReaTer's layout)")
    return {"before": rows[0], "after": rows[1], "search": optimized.greater_results}


# The GreaterConfig fields the optimize command sets, by the flag that sets them.
_CONFIG_FLAGS = {"num_steps": "--steps", "batch_size": "--batch-size", "max_reasoning_tokens": "--reasoning-tokens",
                 "seed": "--seed"}


def _in_flag_terms(error: Exception, args: argparse.Namespace) -> str:
    """An error from the options the flags were turned into, said in terms of the flags."""
    message = str(error)
    for field, flag in _CONFIG_FLAGS.items():
        message = message.replace(f"GreaterConfig.{field}", flag)
    if isinstance(error, FileNotFoundError):
        return f"--model {args.model!r}: {message}" if args.model else message
    if "device" in message and args.device is not None:
        return f"--device {args.device!r}: {message}"
    return message


def _add_optimize_subcommand(sub) -> None:
    opt = sub.add_parser("optimize", help="optimize a DSPy program's instruction on your own task file",
                         description="Build dspy.ChainOfThought (or dspy.Predict) from --signature, optimize its "
                                     "instruction on the rows of FILE, and report the optimizer model's accuracy on "
                                     "a held-out test split before and after.")
    opt.add_argument("file", help="a .json, .jsonl, .csv or .tsv file, one labelled example per row, with a column "
                                  "for each field of the signature")
    opt.add_argument("--signature", required=True,
                     help="the program's DSPy signature, e.g. 'context, question -> answer' (one output field)")
    opt.add_argument("--instruction", default=None,
                     help="the program's instruction (default: DSPy's for the signature; the search then starts "
                          "from a reasoning instruction)")
    opt.add_argument("--program", choices=["cot", "predict"], default="cot",
                     help="dspy.ChainOfThought (cot, default) or dspy.Predict")
    opt.add_argument("--steps", type=int, default=None, help="search steps (default: GreaterConfig's)")
    opt.add_argument("--batch-size", type=int, default=None, help="training examples per step (default: GreaterConfig's)")
    opt.add_argument("--reasoning-tokens", type=int, default=None,
                     help="length bound of the optimizer model's reasoning (default: GreaterConfig's)")
    opt.add_argument("--faithful", action="store_true",
                     help="the paper's protocol (GreaterConfig.faithful(): slow, hours per task on a CPU)")
    opt.add_argument("--layout", choices=["auto", "greater", "chat_adapter"], default="auto",
                     help="where the instruction sits in what the optimizer model sees (see the docs)")
    opt.add_argument("--model", default=None,
                     help="optimizer model: hub id, folder or .gguf (default: the embedded SmolLM2-135M)")
    opt.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="optimizer model dtype (auto: float32 on CPU, bfloat16/float16 on CUDA)")
    opt.add_argument("--device", default=None, help="optimizer model device, e.g. cuda (default: cuda if available)")
    opt.add_argument("--val", type=int, default=None, help="held-out rows the instruction is chosen on (default: a fifth)")
    opt.add_argument("--test", type=int, default=None, help="test rows for before/after (default: a fifth)")
    opt.add_argument("--seed", type=int, default=0, help="seed of the split and the search")
    opt.add_argument("--checkpoint-dir", default=None, help="write a checkpoint here after every step; rerun to resume")
    opt.add_argument("--save", default=None, help="save the optimized program (DSPy JSON) here")
    opt.add_argument("--quiet", action="store_true", help="no progress bars or progress messages")
    opt.set_defaults(func=run_optimize)


def build_parser() -> argparse.ArgumentParser:
    from dspy_greater import __version__

    parser = argparse.ArgumentParser(prog="dspy-greater", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="optimize an instruction on a BBH task (or a task file) and report before/after")
    demo.add_argument("--task", default="navigate", help="packaged BBH task (default: navigate)")
    demo.add_argument("--file", default=None, help="a .json/.jsonl/.csv task file instead of a packaged task")
    demo.add_argument("--input-key", default=None, help="column holding the question (task files)")
    demo.add_argument("--output-key", default=None, help="column holding the answer (task files)")
    demo.add_argument("--model", default=None, help="optimizer model: hub id, folder or .gguf (default: embedded SmolLM2-135M)")
    demo.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                      help="optimizer model dtype (auto: float32 on CPU, bfloat16/float16 on CUDA); bfloat16 pays "
                           "off on CPUs with AMX or AVX-512-BF16")
    demo.add_argument("--device", default=None, help="optimizer model device, e.g. cuda (default: cuda if available)")
    demo.add_argument("--train", type=int, default=24, help="training rows (default: 24)")
    demo.add_argument("--val", type=int, default=30, help="held-out rows the instruction is chosen on (default: 30)")
    demo.add_argument("--test", type=int, default=100, help="test rows for before/after (default: 100)")
    demo.add_argument("--steps", type=int, default=10, help="search steps (default: 10)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the split and the search (default: 0)")
    demo.add_argument("--instruction", default=None, help="initial instruction (default: the program's own)")
    demo.add_argument("--output", default=None, help="write a JSON report here")
    demo.add_argument("--save-program", default=None, help="save the optimized DSPy program (JSON) here")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument("--target", default=None,
                      help="also evaluate on a target LM served by llama.cpp: 'smollm2', 'gemma3-270m' or a .gguf path")
    demo.add_argument("--target-tokens", type=int, default=128, help="reasoning token limit on the target LM")
    demo.add_argument("--threads", type=int, default=2, help="threads for target-LM evaluation")
    demo.set_defaults(func=run_demo)
    _add_optimize_subcommand(sub)

    from dspy_greater.targets.serve import add_serve_subcommand

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
