"""Generation of the optimizer model's reasoning: what our wrapper saves over a plain ``model.generate``.

Six navigate prompts (seed 0, the layout the search uses, "Let's think step by step."), greedy, on
CPU with two threads, in float32 and bfloat16. Each way is timed three times after a warm-up:

- ``plain``: ``model.generate`` on the left-padded prompts, as Hugging Face runs it;
- ``ours``: ``OptimizerLM.generate`` (contiguous input to the output layer);
- ``ours-stored-inputs``: the same with each prompt's inputs taken from the store kept across steps
  (``context_lengths=``; the store is filled by the warm-up, as by a search's first step).

Whether each way produced the same tokens as ``plain`` is recorded; in float32 they must (the script
stops otherwise), in bfloat16 the stored inputs' cache (computed in another batch) may round
differently and change a token.

    python benchmarks/generation.py                 # writes benchmarks/results/generation.json
    python benchmarks/generation.py --tokens 48 --output benchmarks/results/generation_48tokens_amd.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

import torch

from dspy_greater.data import load_examples, split_examples
from dspy_greater.engine.layout import GreaterLayout
from dspy_greater.models.loading import ModelSpec, load_optimizer_model
from dspy_greater.engine.model import OptimizerLM
from speed import machine

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ROWS = 6
REPEATS = 3


def plain_generate(lm: OptimizerLM, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    ids, mask = lm._padded(prompts, left=True)
    width = ids.shape[1]
    with torch.no_grad():
        out = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, pad_token_id=lm.pad_id,
                                eos_token_id=sorted(lm.stop_ids), do_sample=False, temperature=None, top_p=None, top_k=None)
    return [lm._finish_row(row, None) for row in out[:, width:].tolist()]


def measure(dtype: str, tokens: int) -> dict:
    model, tokenizer = load_optimizer_model(ModelSpec(dtype=dtype))
    lm = OptimizerLM(model, tokenizer, batch_size=ROWS)
    layout = GreaterLayout(tokenizer)
    train = split_examples(load_examples("navigate"), [ROWS], seed=0)[0]
    prompts = [layout.prompt(e.question, layout.encode("Let's think step by step.")) for e in train]
    ids, lengths = [p.ids for p in prompts], [p.instruction_start for p in prompts]
    ways = {
        "plain": lambda: plain_generate(lm, ids, tokens),
        "ours": lambda: lm.generate(ids, max_new_tokens=tokens),
        "ours-stored-inputs": lambda: lm.generate(ids, max_new_tokens=tokens, context_lengths=lengths),
    }
    report, outputs = {}, {}
    for name, run in ways.items():
        outputs[name] = run()  # warm-up (and, for the last way, fills the store)
        seconds = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            assert run() == outputs[name]
            seconds.append(round(time.perf_counter() - started, 3))
        same = outputs[name] == outputs["plain"]
        report[name] = {"seconds": seconds, "median": statistics.median(seconds), "same_tokens_as_plain": same}
        print(f"{dtype} {name}: {seconds}, same tokens as plain: {same}", flush=True)
        if dtype == "float32" and not same:
            raise SystemExit(f"float32: {name} generated other tokens than model.generate")
    report["tokens_per_row"] = [len(o) for o in outputs["plain"]]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=pathlib.Path, default=RESULTS / "generation.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"machine": machine(), "rows": ROWS, "tokens": args.tokens, "threads": args.threads, "load_average_before": os.getloadavg(),
              "dtypes": {dtype: measure(dtype, args.tokens) for dtype in ("float32", "bfloat16")}}
    report["load_average_after"] = os.getloadavg()
    args.output.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
