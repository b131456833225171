"""Cross-family transfer: optimize with SmolLM2-135M, run on Gemma-3-270M (or any litellm model).

    python examples/transfer_gemma.py                     # navigate, small settings, Gemma via llama.cpp
    python examples/transfer_gemma.py --always-replace       # the paper's rule: every step edits a token
    python examples/transfer_gemma.py --task snarks --steps 6 --test 30
    python examples/transfer_gemma.py --target-model openai/gpt-4o-mini --adapter chat

The embedded SmolLM2-135M-Instruct (the optimizer model, PyTorch on CPU) searches an instruction
for a ``dspy.ChainOfThought("question -> answer")`` program on one BBH task. The target LM is set
on the program (``program.set_lm``): by default Gemma-3-270M, a base model from another family,
served by llama.cpp on 127.0.0.1 and reached as a ``PlainTextLM`` (its GGUF has no chat template,
so it gets plain completions in the optimizer's text layout through ``GReaTerAdapter``). The
compile scores the best instructions on the held-out split on that target and keeps the best;
then the program is evaluated on the test split before and after, on the target (and on the
optimizer model for reference), and a table is printed: accuracy, majority-class rate (what
always answering the most common gold label scores) and balanced accuracy (mean recall per gold
label; a constant answer scores 1/#labels).

``--target-model`` points the same code at any litellm model instead (``openai/gpt-4o-mini``, or a
vLLM server with ``--api-base http://host:8000/v1 --api-key ...``). Keep ``--adapter chat`` (DSPy's
ChatAdapter) for strong models; ``--adapter greater`` (the default) is for tiny models that cannot
follow ChatAdapter's field markers.
"""

from __future__ import annotations

import argparse
import contextlib
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
from dspy_greater.metrics import evaluate_program, exact_match, summarize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="navigate", help="packaged BBH task (default: navigate)")
    parser.add_argument("--train", type=int, default=12)
    parser.add_argument("--val", type=int, default=6, help="held-out examples; also used to select on the target")
    parser.add_argument("--test", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4, help="search steps on the optimizer model")
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--always-replace", action="store_true",
                        help="every step replaces its token, as in the paper (default: keep it unless beaten)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", default="gemma3-270m",
                        help="GGUF served by llama.cpp: 'gemma3-270m' (default), 'smollm2' or a .gguf path")
    parser.add_argument("--target-model", default=None,
                        help="any litellm model instead of a local GGUF, e.g. openai/gpt-4o-mini")
    parser.add_argument("--api-base", default=None, help="with --target-model: the server's base URL (vLLM, ...)")
    parser.add_argument("--api-key", default=None, help="with --target-model: its API key")
    parser.add_argument("--adapter", choices=("greater", "chat"), default="greater",
                        help="greater: GReaTerAdapter (tiny models); chat: DSPy's ChatAdapter (strong models)")
    parser.add_argument("--target-tokens", type=int, default=48, help="reasoning token limit on the target")
    parser.add_argument("--target-candidates", type=int, default=3,
                        help="instructions scored on the target with the held-out examples (0: none)")
    parser.add_argument("--threads", type=int, default=1, help="threads for target evaluation")
    parser.add_argument("--cache", action="store_true",
                        help="use DSPy's response cache for target calls (off: every call is measured)")
    parser.add_argument("--output", default=None, help="write a JSON report here")
    args = parser.parse_args()
    # The reasoning is cut at --target-tokens on purpose: DSPy's warning on every truncated reply is noise here.
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)

    started = time.perf_counter()
    train, val, test = split_examples(load_examples(args.task), [args.train, args.val, args.test], seed=args.seed)
    print(f"Task {args.task}: {len(train)} train / {len(val)} held-out / {len(test)} test examples (seed {args.seed}).")

    with contextlib.ExitStack() as stack:
        if args.target_model:
            client = {k: v for k, v in (("api_base", args.api_base), ("api_key", args.api_key)) if v}
            # ChatAdapter's reply holds the reasoning and the answer: give it room.
            limit = 1000 if args.adapter == "chat" else args.target_tokens
            target = dspy.LM(args.target_model, temperature=0.0, max_tokens=limit, cache=args.cache, **client)
            target_name = args.target_model
        else:
            from dspy_greater.targets.llama_cpp import LlamaCppServer

            server = stack.enter_context(LlamaCppServer(None if args.target == "smollm2" else args.target, n_threads=1))
            # A PlainTextLM for a base model such as Gemma (no chat template), a chat dspy.LM otherwise.
            target = server.lm(max_tokens=args.target_tokens, cache=args.cache)
            target_name = f"{server.alias} (llama.cpp, {type(target).__name__})"
        print(f"Target LM: {target_name}")

        def adapter_for(program):
            if args.adapter == "chat":
                return dspy.ChatAdapter()
            return GReaTerAdapter.from_program(program, max_reasoning_tokens=args.target_tokens)

        program = dspy.ChainOfThought("question -> answer")
        program.set_lm(target)  # the program's own target LM; dspy.configure(lm=...) works the same way
        teleprompter = GReaTerTeleprompter(metric=exact_match, num_steps=args.steps, batch_size=args.batch_size,
                                           seed=args.seed, target_candidates=args.target_candidates,
                                           num_threads=args.threads, keep_current=not args.always_replace)

        t0 = time.perf_counter()
        with dspy.context(adapter=adapter_for(program)):
            optimized = teleprompter.compile(program, trainset=train, valset=val)
        compile_seconds = time.perf_counter() - t0
        optimized.set_lm(target)  # the same LM object, so its history counts every target call
        adapter = adapter_for(optimized)  # the search's answer extractor, for both rows

        t0 = time.perf_counter()
        rows = {"before": evaluate_program(program, test, adapter=adapter, threads=args.threads),
                "after": evaluate_program(optimized, test, adapter=adapter, threads=args.threads)}
        target_seconds = time.perf_counter() - t0
        calls, tokens = len(target.history), sum(int((e.get("usage") or {}).get("total_tokens") or 0)
                                                 for e in target.history)

        t0 = time.perf_counter()
        source = {}
        for name, p in (("before", program), ("after", optimized)):
            predictions, golds = teleprompter.optimizer_predictions(p, test)
            source[name] = summarize(golds, predictions)
        optimizer_seconds = time.perf_counter() - t0

    results = optimized.greater_results["predict"]
    selection = results.get("target_selection") or {}
    elapsed = time.perf_counter() - started
    print(f"\nInitial instruction:   {program.predict.signature.instructions!r}")
    print(f"Search's best:         {results['best_instruction']!r}")
    print(f"Kept (after):          {optimized.predict.signature.instructions!r}")
    if selection:
        print(f"Selection on {len(val)} held-out examples on the target ({selection['target_lm']}): "
              f"{ {k[:40]: round(v, 1) for k, v in selection['scores'].items()} }"
              + (f"; errors {selection['errors']}" if selection["errors"] else ""))
    print(f"\nTest split, {len(test)} examples:")
    print(f"{'model':<26} {'when':<7} {'accuracy':>8} {'majority':>8} {'balanced':>8}  {'unparsed':>8}  answers")
    for label, table in ((target_name.split(" (")[0], rows), ("SmolLM2-135M (optimizer)", source)):
        for when in ("before", "after"):
            row = table[when]
            print(f"{label[:26]:<26} {when:<7} {row['accuracy']:8.3f} {row['majority_rate']:8.3f} "
                  f"{row['balanced_accuracy']:8.3f}  {row.get('unparsed', '-'):>8}  {row['pred_distribution']}")
    print(f"\n{calls} target calls ({tokens} tokens). Time: compile {compile_seconds / 60:.1f} min (search + "
          f"selection on the target), target evaluation {target_seconds / 60:.1f} min, optimizer-model "
          f"evaluation {optimizer_seconds / 60:.1f} min; {elapsed / 60:.1f} min in all.")

    if args.output:
        report = {"args": vars(args), "target": target_name, "initial": program.predict.signature.instructions,
                  "best": results["best_instruction"], "kept": optimized.predict.signature.instructions,
                  "target_rows": rows, "optimizer_rows": source, "selection": selection, "calls": calls,
                  "tokens": tokens, "seconds": {"compile": compile_seconds, "target_eval": target_seconds,
                                                "optimizer_eval": optimizer_seconds, "total": elapsed}}
        path = pathlib.Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str))
        print(f"Report written to {path}")


if __name__ == "__main__":
    main()
