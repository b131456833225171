"""How long does the optimizer model reason under an instruction, before any search?

GReaTer takes its gradient through the reasoning the optimizer model writes after the instruction.
This generates that reasoning greedily for a task's first training rows (the seeded split the
compile benchmarks use, the search's default layout) under each instruction given, and reports the
lengths in tokens and a few of the texts.

    python benchmarks/reasoning_length.py --task navigate \\
        --instruction "Given the fields \\`question\\`, produce the fields \\`answer\\`." \\
        --instruction "Let's think step by step."
"""

from __future__ import annotations

import json
import pathlib
import statistics

from compile_runs import parser, setup


def main() -> None:
    p = parser(__doc__, train=24, val=0, test=0, steps=0, threads=2)
    p.add_argument("--instruction", action="append", required=True, help="an instruction to start from (repeatable)")
    p.set_defaults(reasoning_tokens=128)  # the cap while measuring
    args = p.parse_args()

    from dspy_greater.engine.layout import GreaterLayout
    from dspy_greater.engine.model import OptimizerLM

    train, _, _, model, tokenizer, report = setup(args, "benchmarks/reasoning_length.py")
    lm = OptimizerLM(model, tokenizer, batch_size=8)
    layout = GreaterLayout(tokenizer)
    report["instructions"] = {}
    for instruction in args.instruction:
        prompts = [layout.prompt(row.question, layout.encode_instruction(instruction)).ids for row in train]
        rows = lm.generate(prompts, max_new_tokens=args.reasoning_tokens)
        lengths = [len(r) for r in rows]
        entry = {
            "lengths": lengths, "median": statistics.median(lengths),
            "at_most_16": sum(n <= 16 for n in lengths), "over_48": sum(n > 48 for n in lengths),
            "at_cap": sum(n >= args.reasoning_tokens for n in lengths),
            "examples": [tokenizer.decode(r) for r in rows[:3]],
        }
        report["instructions"][instruction] = entry
        print(f"{instruction!r}: {len(rows)} rows, median {entry['median']} tokens, <= 16: {entry['at_most_16']}, "
              f"> 48: {entry['over_48']}, at the {args.reasoning_tokens}-token cap: {entry['at_cap']}; "
              f"first: {entry['examples'][0][:80]!r}", flush=True)
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
