"""Shared set-up of the benchmarks that compile one program several ways on the same seeded splits."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def report_runs(report: dict) -> list[dict]:
    """The runs in a report: a single run, ``{"tasks": {...}}`` (quality.py with several tasks) or
    ``{"runs": {...}}`` (several reports gathered into one file)."""
    runs = report.get("tasks") or report.get("runs")
    if runs is None:
        return [report]
    return list(runs.values()) if isinstance(runs, dict) else list(runs)


def parser(doc: str, *, train: int, val: int, test: int, steps: int, threads: int) -> argparse.ArgumentParser:
    """Arguments every compile benchmark takes (task, split sizes, steps, reasoning length, seed, threads)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--task", default="navigate")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--train", type=int, default=train)
    p.add_argument("--val", type=int, default=val)
    p.add_argument("--test", type=int, default=test)
    p.add_argument("--reasoning-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=threads)
    p.add_argument("--output", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the optimizer model's dtype")
    return p


def setup(args: argparse.Namespace, script: str):
    """``(train, val, test, model, tokenizer, report)``: the seeded splits, the embedded model, and the
    report's common header (settings, load average, the command)."""
    import torch

    from dspy_greater.data import load_examples, split_examples
    from dspy_greater.models.loading import ModelSpec, load_optimizer_model

    torch.set_num_threads(args.threads)
    train, val, test = split_examples(load_examples(args.task), [args.train, args.val, args.test], seed=args.seed)
    model, tokenizer = load_optimizer_model(ModelSpec(dtype=args.dtype))
    report = {"task": args.task, "dtype": args.dtype, "steps": args.steps, "splits": [len(train), len(val), len(test)], "seed": args.seed,
              "reasoning_tokens": args.reasoning_tokens, "threads": args.threads,
              "load_average_start": os.getloadavg(), "command": " ".join(["python", script, *sys.argv[1:]])}
    return train, val, test, model, tokenizer, report
