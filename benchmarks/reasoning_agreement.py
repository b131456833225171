"""How much of the current reasoning does a finalist's own reasoning repeat?

Scoring a finalist on its own reasoning (``finalist_scoring="regenerate"``) means generating it.
If a one-token edit of the instruction left the greedy reasoning mostly as it was, that generation
could be checked against the current reasoning in one forward pass and only the rest generated
(exact for greedy decoding). This runs the regenerate search on the speed benchmark's rows and, for
every finalist and example, counts the leading tokens its own reasoning shares with the current one.

    python benchmarks/reasoning_agreement.py --steps 10 --output benchmarks/results/reasoning_agreement.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import statistics
import time

import speed


def shared_lead(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` have in common."""
    return len(os.path.commonprefix([a, b]))  # element-wise on any sequences, not only paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    speed.shared_arguments(parser, reasoning_tokens=48)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", type=pathlib.Path)
    args = parser.parse_args()

    from dspy_greater.engine.config import GreaterConfig
    from dspy_greater.engine.search import GreaterSearch, _with_token

    load_before = speed.load_average()
    lm, layout, extractor, examples, heldout, indices = speed._setup(args)
    config = GreaterConfig(num_steps=args.steps, max_reasoning_tokens=args.reasoning_tokens, eval_every=args.steps,
                           finalist_scoring="regenerate", seed=args.seed)
    search = GreaterSearch(lm, layout, extractor, config)
    pairs = []
    score_finalists = search._score_finalists

    def recording(instruction, position, finalists, batch, reasoning, prefix):
        owns = search.reasoning_under_each([_with_token(instruction, position, t) for t in finalists], batch)
        for token, own in zip(finalists, owns):
            pairs.extend({"position": position, "token": layout.decode([token]), "current_tokens": len(current),
                          "own_tokens": len(mine), "shared_lead": shared_lead(current, mine)}
                         for current, mine in zip(reasoning, own))
        return score_finalists(instruction, position, finalists, batch, reasoning, prefix)

    search._score_finalists = recording
    started = time.perf_counter()
    result = search.run(speed.INITIAL_INSTRUCTION, examples, heldout)
    leads = [p["shared_lead"] for p in pairs]
    report = {
        "machine": speed.machine(),
        "threads": args.threads,
        "task": args.task,
        "row_indices": indices,
        "reasoning_tokens": args.reasoning_tokens,
        "steps": args.steps,
        "final_instruction": result.final_instruction,
        "run_seconds": round(time.perf_counter() - started, 1),
        "pairs": len(pairs),
        "identical": sum(p["shared_lead"] == p["current_tokens"] == p["own_tokens"] for p in pairs),
        "mean_shared_lead": round(statistics.mean(leads), 2),
        "median_shared_lead": statistics.median(leads),
        "mean_own_tokens": round(statistics.mean(p["own_tokens"] for p in pairs), 2),
        "shared_lead_by_8": {f"{k}-{k + 7}" if k < args.reasoning_tokens else "all": n for k, n in
                             sorted(collections.Counter(min(n // 8 * 8, args.reasoning_tokens) for n in leads).items())},
        "load_average_before": load_before,
        "load_average_after": speed.load_average(),
        "finalist_pairs": pairs,
    }
    print(json.dumps({k: v for k, v in report.items() if k not in ("finalist_pairs", "machine")}))
    if args.output:
        args.output.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
