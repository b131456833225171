"""Interleaved A/B of a step's finalist scoring: batches in order against batches grouped by length.

"in order" scores each finalist on its own (one forward batch of the step's examples, padded to
the longest), as the search did before forward batches were grouped by length; "grouped" is the
current code (`GreaterSearch._score_finalists`: every finalist in one call, batches of similar
length). Both compute the same scores; the two alternate at each position and repeat, so a drift
in this machine's speed hits both alike.

    .venv/bin/python benchmarks/finalist_batches.py --reasoning-tokens 128 --output benchmarks/results/finalist_batches_128.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import speed


def in_order(self, seqs, prefix, prefix_rows=None):
    """``OptimizerLM._batches`` without the grouping: consecutive chunks of the model batch size."""
    rows = list(range(len(seqs))) if prefix_rows is None else list(prefix_rows)
    for start in range(0, len(seqs), self.batch_size):
        group = list(range(start, min(start + self.batch_size, len(seqs))))
        picked = [rows[i] for i in group]
        tails = [seqs[i].ids[len(prefix.ids[rows[i]]) :] if prefix is not None else seqs[i].ids for i in group]
        yield group, [seqs[i] for i in group], prefix.gather(picked) if prefix is not None else None, tails, picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    speed.shared_arguments(parser, reasoning_tokens=128)
    parser.add_argument("--examples", type=int, default=6, help="the first this many of the speed benchmark's 8 rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=pathlib.Path)
    args = parser.parse_args()

    from dspy_greater.engine.model import OptimizerLM
    from dspy_greater.engine.config import GreaterConfig
    from dspy_greater.engine.search import GreaterSearch

    load_before = speed.load_average()
    lm, layout, extractor, examples, _, _ = speed._setup(args, rows=8)
    batch = examples[: args.examples]
    search = GreaterSearch(lm, layout, extractor, GreaterConfig(max_reasoning_tokens=args.reasoning_tokens))
    instruction = layout.encode_instruction(speed.INITIAL_INSTRUCTION)
    reasoning = search.reasoning(instruction, batch)
    finalists = layout.encode(" quickly now then")
    grouped = OptimizerLM._batches
    seconds = {"in_order": [], "grouped": []}
    scores = {}
    for _ in range(args.repeats):
        for position in range(1, min(4, len(instruction))):
            prefix = search.prefix(instruction, position, batch)
            for name, batches in (("in_order", in_order), ("grouped", grouped)):
                OptimizerLM._batches = batches
                started = time.perf_counter()
                result = search._score_finalists(instruction, position, finalists, batch, reasoning, prefix)
                seconds[name].append(time.perf_counter() - started)
                scores.setdefault((position, name), [[s.answer_loss for s in f] for f in result])
    OptimizerLM._batches = grouped
    largest_gap = max(abs(a - b) for position in range(1, min(4, len(instruction)))
                      for fa, fb in zip(scores[position, "in_order"], scores[position, "grouped"]) for a, b in zip(fa, fb))
    prefix = search.prefix(instruction, 1, batch)
    report = {
        "machine": speed.machine(),
        "threads": args.threads,
        "task": args.task,
        "examples": args.examples,
        "reasoning_tokens": args.reasoning_tokens,
        "finalists": len(finalists),
        "tail_lengths": [len(s.ids) - len(p) for s, p in zip(search.sequences(instruction, batch, reasoning), prefix.ids)],
        "seconds": {k: [round(v, 3) for v in vals] for k, vals in seconds.items()},
        "mean_seconds": {k: round(statistics.mean(v), 3) for k, v in seconds.items()},
        "largest_answer_loss_difference": largest_gap,
        "load_average_before": load_before,
        "load_average_after": speed.load_average(),
    }
    print(json.dumps({k: report[k] for k in ("tail_lengths", "mean_seconds", "largest_answer_loss_difference")}))
    if args.output:
        args.output.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
