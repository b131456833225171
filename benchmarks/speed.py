"""Time per search step: ours (default), ours in the paper's cost protocol, and the authors' library.

Every system optimizes the same instruction on the same rows of one BBH task with SmolLM2-135M on
CPU, for the same number of steps and the same reasoning length. Each runs in its own process (so
peak RSS is its own); the authors' ``greaterprompt`` 1.1.4 runs in its own virtualenv
(``benchmarks/greaterprompt_env.sh``). After the runs, one common scorer (ours) measures every
system's final prompt(s): mean cross-entropy of the gold answer after the model's own reasoning
(temperature 1) and accuracy, on the optimized rows.

    python benchmarks/speed.py                      # side by side: writes benchmarks/results/speed_<task>.json
    python benchmarks/speed.py --scaling            # time per step vs examples and instruction length (PNG)

Measure on a quiet machine: another busy process on the 2 cores makes every op many times slower.
The load average before and after each system is recorded with its figures.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
GREATERPROMPT_PYTHON = HERE / ".venv-greaterprompt" / "bin" / "python"
INITIAL_INSTRUCTION = "Let's think step by step."
HELDOUT = 4  # rows after the optimized ones, for the search's own held-out check (not timed)
# ours: defaults (a minibatch per step, finalists teacher-forced, current token kept unless beaten);
# ours-bf16: the same in bfloat16; ours-paper-protocol: every example every step and the token
# always replaced, as in the paper, with our speed-ups; ours-faithful-cost: the paper's protocol and
# cost (reasoning regenerated for every finalist, no prefix cache); greaterprompt: the authors' library.
SYSTEMS = ("ours", "ours-bf16", "ours-paper-protocol", "ours-faithful-cost", "greaterprompt")
# A longer instruction to cut to 10, 20 and 40 tokens for the scaling runs.
LONG_INSTRUCTION = (
    "Read the instructions one by one and keep track of your position on a grid with two numbers. "
    "Turning changes the direction you face; steps move you along that direction. At the end, say "
    "whether both numbers are zero again, and answer with one word only."
)


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- workers (run in their own processes) -------------------------------------------------------------


def _setup(args, dtype: str = "auto"):
    import torch

    from dspy_greater.data import load_examples, split_examples
    from dspy_greater.extractor import derive_extractor
    from dspy_greater.layout import GreaterLayout
    from dspy_greater.loading import ModelSpec, load_optimizer_model
    from dspy_greater.model import OptimizerLM
    from dspy_greater.search import SearchExample

    torch.set_num_threads(args.threads)
    model, tokenizer = load_optimizer_model(ModelSpec(dtype=dtype))
    lm = OptimizerLM(model.eval(), tokenizer, batch_size=8)
    layout = GreaterLayout(tokenizer)
    rows = load_examples(args.task)
    split = split_examples(rows, [args.examples, HELDOUT], args.seed)
    examples, heldout = ([SearchExample(e.question, e.answer) for e in part] for part in split)
    extractor = derive_extractor("answer", None, [e.answer for e in rows], [e.question for e in rows])
    return lm, layout, extractor, examples, heldout, list(split.indices[0])


def _initial_instruction(layout, tokens: int | None) -> str:
    if not tokens:
        return INITIAL_INSTRUCTION
    return layout.decode(layout.encode(LONG_INSTRUCTION)[:tokens]).strip()


def worker_ours(args) -> dict:
    from dspy_greater.search import GreaterConfig, GreaterSearch

    lm, layout, extractor, examples, heldout, indices = _setup(args, "bfloat16" if args.system == "ours-bf16" else "auto")
    common = dict(num_steps=args.steps, max_reasoning_tokens=args.reasoning_tokens, eval_every=args.steps,
                  seed=args.seed)
    if args.system in ("ours", "ours-bf16"):
        config = GreaterConfig(**common, **({"batch_size": None} if args.full_batch else {}))
    elif args.system == "ours-paper-protocol":
        config = GreaterConfig(**common, batch_size=None, keep_current=False)
    elif args.system == "ours-faithful-cost":
        config = GreaterConfig.faithful(**common, prefix_cache=False)
    else:
        raise ValueError(args.system)
    initial = _initial_instruction(layout, args.instruction_tokens)
    search = GreaterSearch(lm, layout, extractor, config)
    started = time.perf_counter()
    # Held-out rows of their own: scoring them must not pre-generate the training rows' reasoning.
    result = search.run(initial, examples, heldout)
    steps = []
    for record in result.trace:
        seconds = {k: round(v, 3) for k, v in record.seconds.items() if k != "heldout"}
        steps.append({"seconds": round(sum(seconds.values()), 3), "breakdown": seconds, "loss": record.loss,
                      "instruction": record.instruction})
    return {
        "system": args.system,
        "config": {k: v for k, v in vars(config).items()},
        "initial_instruction": initial,
        "instruction_tokens": len(layout.encode(initial)),
        "row_indices": indices,
        "extractor": extractor.text,
        "steps": steps,
        "run_seconds": round(time.perf_counter() - started, 2),
        "final_prompts": [result.final_instruction] * len(examples),
        "reasoning_tokens_generated": sum(len(r) for r in search._reasoning.values()),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def worker_score(args) -> dict:
    """Common scorer: each example under its own final prompt (one prompt for ours)."""
    from dspy_greater.search import GreaterConfig, GreaterSearch

    lm, layout, extractor, examples, _, _ = _setup(args)
    prompts = json.loads(pathlib.Path(args.prompts).read_text())
    search = GreaterSearch(lm, layout, extractor, GreaterConfig(
        max_reasoning_tokens=args.reasoning_tokens, answer_temperature=1.0))
    losses, correct = [], []
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    for prompt, rows in groups.items():
        evaluation = search.evaluate(layout.encode(prompt), [examples[i] for i in rows])
        losses.append(evaluation.mean_loss * len(rows))
        correct.append(evaluation.accuracy * len(rows))
    return {"mean_answer_loss": sum(losses) / len(prompts), "accuracy": sum(correct) / len(prompts),
            "distinct_prompts": len(groups)}


# -- orchestration ------------------------------------------------------------------------------------


def _run_worker(argv: list[str], python: str = sys.executable) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        path = out.name
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([python, *argv, "--output", path], check=True, env=env)
    data = json.loads(pathlib.Path(path).read_text())
    os.unlink(path)
    return data


def _base_argv(args) -> list[str]:
    return ["--task", args.task, "--examples", str(args.examples), "--seed", str(args.seed),
            "--threads", str(args.threads)]


def run_system(args, system: str) -> dict:
    load_before = load_average()
    if system == "greaterprompt":
        if not GREATERPROMPT_PYTHON.exists():
            raise SystemExit(f"{GREATERPROMPT_PYTHON} is missing: run benchmarks/greaterprompt_env.sh first.")
        from dspy_greater.data import load_examples
        from dspy_greater.extractor import derive_extractor

        rows = load_examples(args.task)
        extractor = derive_extractor("answer", None, [e.answer for e in rows], [e.question for e in rows])
        raw = _run_worker([str(HERE / "greaterprompt_runner.py"), *_base_argv(args), "--rounds", str(args.steps),
                           "--max-new-tokens", str(args.reasoning_tokens), "--min-new-tokens",
                           str(args.reasoning_tokens), "--init-prompt", INITIAL_INSTRUCTION,
                           "--extractor", extractor.text], python=str(GREATERPROMPT_PYTHON))
        steps = [{"seconds": round(s, 3), "breakdown": {k: round(v, 3) for k, v in d["phases"].items()},
                  "loss": loss} for s, d, loss in zip(raw["round_seconds"], raw["rounds_detail"], raw["mean_round_loss"])]
        questions = [ex.question for ex in _rows_for(args)]
        finals = {q: ast.literal_eval(v[-1][0]) for q, v in raw["final_prompts"].items()}
        data = {"system": system, "steps": steps, "row_indices": raw["row_indices"], "peak_rss_mb": raw["peak_rss_mb"],
                "final_prompts": [finals[q] for q in questions], "raw": raw}
    else:
        data = _run_worker([__file__, "--worker", system, *_base_argv(args), "--steps", str(args.steps),
                            "--reasoning-tokens", str(args.reasoning_tokens)])
    data["load_average_before"], data["load_average_after"] = load_before, load_average()
    data["threads"] = args.threads
    return data


def _rows_for(args):
    from dspy_greater.data import load_examples, split_examples

    return split_examples(load_examples(args.task), [args.examples], args.seed)[0]


def common_score(args, prompts: list[str]) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    try:
        return _run_worker([__file__, "--worker", "score", *_base_argv(args), "--reasoning-tokens",
                            str(args.reasoning_tokens), "--prompts", f.name])
    finally:
        os.unlink(f.name)


def side_by_side(args, previous: dict | None = None) -> dict:
    report = previous or {"task": args.task, "examples": args.examples, "steps": args.steps, "seed": args.seed,
              "reasoning_tokens": args.reasoning_tokens, "threads": args.threads, "machine": machine(),
              "command": " ".join(["python", "benchmarks/speed.py", *sys.argv[1:]]), "systems": {}}
    if "initial_prompt_score" not in report:
        report["initial_prompt_score"] = common_score(args, [INITIAL_INSTRUCTION] * args.examples)
    report.setdefault("commands", []).append(" ".join(["python", "benchmarks/speed.py", *sys.argv[1:]]))
    for system in args.systems:
        print(f"== {system} ...", flush=True)
        data = run_system(args, system)
        data["final_score"] = common_score(args, data["final_prompts"])
        step_seconds = [s["seconds"] for s in data["steps"]]
        data["mean_step_seconds"] = sum(step_seconds) / len(step_seconds)
        report["systems"][system] = data
        print(f"   {data['mean_step_seconds']:.2f} s/step, final loss {data['final_score']['mean_answer_loss']:.3f}",
              flush=True)
    print(markdown_table(report))
    return report


def markdown_table(report: dict) -> str:
    lines = ["| system | examples per step | s/step (mean) | breakdown (s, mean per step) | peak RSS MB | "
             "answer loss after | accuracy after | load avg before/after |", "|---|---|---|---|---|---|---|---|"]
    base = report["systems"].get("greaterprompt", {}).get("mean_step_seconds")
    for name, data in report["systems"].items():
        phases: dict[str, float] = {}
        for step in data["steps"]:
            for k, v in step["breakdown"].items():
                phases[k] = phases.get(k, 0.0) + v / len(data["steps"])
        per_step = min(data.get("config", {}).get("batch_size") or report["examples"], report["examples"])
        speedup = f" ({base / data['mean_step_seconds']:.1f}x)" if base and name != "greaterprompt" else ""
        lines.append(
            f"| {name} | {per_step} | {data['mean_step_seconds']:.2f}{speedup} | "
            + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
            + f" | {data['peak_rss_mb']:.0f} | {data['final_score']['mean_answer_loss']:.3f} | "
            f"{data['final_score']['accuracy']:.3f} | {data['load_average_before'][0]} / {data['load_average_after'][0]} |")
    initial = report["initial_prompt_score"]
    lines.append(f"\nInitial prompt: answer loss {initial['mean_answer_loss']:.3f}, accuracy {initial['accuracy']:.3f}.")
    return "\n".join(lines)


def scaling(args) -> dict:
    """Per-step time (all examples every step, 2 steps) against examples and instruction length."""
    grid = [(n, 10) for n in (8, 16, 32, 50)] + [(8, t) for t in (20, 40)]
    points = []
    for n, tokens in grid:
        print(f"== {n} examples, {tokens}-token instruction ...", flush=True)
        load_before = load_average()
        data = _run_worker([__file__, "--worker", "ours", "--task", args.task, "--examples", str(n), "--seed",
                            str(args.seed), "--threads", str(args.threads), "--steps", str(args.steps),
                            "--reasoning-tokens", str(args.reasoning_tokens), "--instruction-tokens", str(tokens),
                            "--full-batch"])
        seconds = [s["seconds"] for s in data["steps"]]
        phases = {k: sum(s["breakdown"].get(k, 0.0) for s in data["steps"]) / len(seconds)
                  for k in data["steps"][0]["breakdown"]}
        points.append({"examples": n, "instruction_tokens": data["instruction_tokens"], "step_seconds": seconds,
                       "mean_phase_seconds": phases, "reasoning_tokens_generated": data["reasoning_tokens_generated"],
                       "mean_step_seconds": sum(seconds) / len(seconds), "peak_rss_mb": data["peak_rss_mb"],
                       "load_average_before": load_before, "load_average_after": load_average()})
        print(f"   {points[-1]['mean_step_seconds']:.2f} s/step", flush=True)
    report = {"task": args.task, "steps": args.steps, "reasoning_tokens": args.reasoning_tokens, "threads": args.threads,
              "machine": machine(), "command": " ".join(["python", "benchmarks/speed.py", *sys.argv[1:]]),
              "points": points}
    plot_scaling(report, RESULTS / f"scaling_{args.task}.png")
    return report


def plot_scaling(report: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    by_examples = [p for p in report["points"] if p["instruction_tokens"] <= 10]
    by_length = [p for p in report["points"] if p["examples"] == 8]
    for ax, points, x, title in ((left, by_examples, "examples", "10-token instruction"),
                                 (right, by_length, "instruction_tokens", "8 examples")):
        xs = [p[x] for p in points]
        ax.plot(xs, [p["mean_step_seconds"] for p in points], "o-", label="whole step")
        ax.plot(xs, [p["mean_step_seconds"] - p["mean_phase_seconds"].get("generate", 0.0) for p in points], "s--",
                label="without generation (its length varies with the reasoning)")
        ax.set(xlabel=x.replace("_", " ") + (" per step" if x == "examples" else ""), ylabel="seconds per step",
               title=title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"dspy_greater step time, SmolLM2-135M, {report['task']}, {report['reasoning_tokens']} reasoning "
                 f"tokens, CPU {report['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="navigate")
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--reasoning-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--scaling", action="store_true", help="time per step vs examples and instruction length")
    parser.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/...)")
    parser.add_argument("--update", action="store_true",
                        help="add or replace the given systems in an existing side-by-side JSON with the same settings")
    # Worker-only options.
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--instruction-tokens", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--full-batch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.system = args.worker
        data = worker_score(args) if args.worker == "score" else worker_ours(args)
        pathlib.Path(args.output).write_text(json.dumps(data, indent=1))
        return
    RESULTS.mkdir(exist_ok=True)
    default = RESULTS / (f"scaling_{args.task}.json" if args.scaling else f"speed_{args.task}.json")
    path = pathlib.Path(args.output) if args.output else default
    previous = json.loads(path.read_text()) if args.update and path.exists() else None
    if previous and [previous[k] for k in ("task", "examples", "steps", "seed", "reasoning_tokens", "threads")] != [
            args.task, args.examples, args.steps, args.seed, args.reasoning_tokens, args.threads]:
        raise SystemExit(f"--update: {path} was measured with other settings; run without --update.")
    report = scaling(args) if args.scaling else side_by_side(args, previous)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
