"""Do the prompts a speed run ends on hold up beyond its 8 rows?

``speed.py`` compares systems on the few rows they optimize. This takes the prompts one of its
reports ended on (the initial prompt, each of ours, and each distinct per-question prompt of
greaterprompt) and scores every one with the optimizer model on the task's rows the speed run did
not use (neither its optimized rows nor its held-out ones): the same layout, extractor and
reasoning length, greedy reasoning, the gold answer's cross-entropy at temperature 1. Accuracy is
reported beside the majority-class rate and balanced accuracy, and each prompt against the initial
one as a paired difference with a bootstrap 95% interval.

    python benchmarks/prompt_test.py benchmarks/results/speed_navigate_10steps_amd_bf16.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from speed import HELDOUT, INITIAL_INSTRUCTION, _setup, common_scorer, machine


def report_prompts(report: dict) -> dict[str, list[str]]:
    """Each distinct prompt of the report, with the systems that ended on it (the initial one first)."""
    found: dict[str, list[str]] = {INITIAL_INSTRUCTION: ["initial"]}
    for name, system in report["systems"].items():
        for prompt in dict.fromkeys(system["final_prompts"]):
            found.setdefault(prompt, [])
            if name not in found[prompt]:
                found[prompt].append(name)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=pathlib.Path, help="a speed.py side-by-side JSON")
    ap.add_argument("--prompt", action="append", default=None,
                    help="score only this one of the report's prompts (repeatable; the initial prompt always)")
    ap.add_argument("--output", type=pathlib.Path)
    args = ap.parse_args()
    report = json.loads(args.report.read_text())
    prompts = report_prompts(report)
    unknown = [p for p in args.prompt or [] if p not in prompts]
    if unknown:
        raise SystemExit(f"--prompt {unknown[0]!r} is not one of the report's prompts: {list(prompts)}")
    if args.prompt:
        prompts = {p: s for p, s in prompts.items() if p == INITIAL_INSTRUCTION or p in args.prompt}

    from dspy_greater.metrics import summarize
    from paired import paired_difference

    setting = argparse.Namespace(**{k: report[k] for k in ("task", "examples", "seed", "threads")})
    lm, layout, extractor, rows, _, indices = _setup(setting, outside=True)

    scorer = common_scorer(lm, layout, extractor, report["reasoning_tokens"])
    golds = [r.label for r in rows]
    results, predictions = {}, {}
    for prompt, systems in prompts.items():
        started = time.perf_counter()
        evaluation = scorer.evaluate(layout.encode(prompt), rows)
        predictions[prompt] = evaluation.predictions
        results[prompt] = {"systems": systems, **summarize(golds, evaluation.predictions),
                           "mean_answer_loss": evaluation.mean_loss, "seconds": round(time.perf_counter() - started, 1)}
    for prompt in results:
        results[prompt]["versus_initial"] = paired_difference(golds, predictions[prompt], predictions[INITIAL_INSTRUCTION])

    print(f"{report['task']}, {len(rows)} rows outside the speed run's {report['examples']} + {HELDOUT}, "
          f"{report['reasoning_tokens']}-token reasoning")
    print("| prompt | ended on by | accuracy | balanced | majority rate | answers | answer loss | vs initial (95%) |")
    print("|---|---|---|---|---|---|---|---|")
    for prompt, r in results.items():
        d = r["versus_initial"]
        print(f"| {prompt} | {', '.join(r['systems'])} | {r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} | "
              f"{r['majority_rate']:.3f} | {', '.join(f'{k} {v}' for k, v in r['pred_distribution'].items())} | "
              f"{r['mean_answer_loss']:.3f} | {d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] |")
    if args.output:
        args.output.write_text(json.dumps({
            "command": " ".join(["python", "benchmarks/prompt_test.py", *sys.argv[1:]]), "report": str(args.report),
            "task": report["task"], "rows": len(rows), "row_indices": indices,
            "reasoning_tokens": report["reasoning_tokens"], "machine": machine(), "prompts": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
