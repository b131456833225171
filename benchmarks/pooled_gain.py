"""Pool quality.py runs: is the default's test gain at least the faithful run's, over tasks and seeds?

Each quality report compares configurations on one task and seeded split; one run's 95% interval
is about +-0.1, wider than the gains. This reads several reports, takes from each the run that has
the default, the regenerate setting and the faithful protocol, and pools the paired differences of
their test accuracies after compiling (the same examples and starting instruction, so the
difference of the gains):

- per run: the gains and the paired difference (quality.py reports its interval);
- pooled: the mean of the runs' differences, with two bootstrap 95% intervals: "examples"
  resamples each run's test examples (the test-sample noise alone, splits held fixed) and "runs"
  resamples the runs as well (also the noise of which split and task a run drew), the one to read
  when asking whether a configuration gains less in general.

A run's per-example differences are rebuilt from its counts (examples only one of the two gets
right); the rest agree and count 0.

    python benchmarks/pooled_gain.py benchmarks/results/quality_seed1_navigate.json ... \
        --output benchmarks/results/pooled_gain.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

import numpy as np

from compare import bootstrap_mean_ci
from compile_runs import report_runs

BASELINE = "faithful"


def short_name(config: str) -> str | None:
    """``default``, ``regenerate`` or ``faithful`` for the configurations pooled here, else None."""
    if config in ("default", "faithful"):
        return config
    fields = config.split("+")
    if fields[0] == "default" and fields[1:2] == ['finalist_scoring="regenerate"'] and all(
            f.startswith("model_batch_size=") for f in fields[2:]):
        return "regenerate"  # the model batch size changes the cost, not the instruction
    return None


def comparable_run(path: pathlib.Path) -> dict:
    """The run in ``path`` with the default, regenerate and faithful configurations, summarized."""
    for run in report_runs(json.loads(path.read_text())):
        names = {s: c for c in run["configs"] if (s := short_name(c))}
        if len(names) < 3:
            continue
        gains = {s: run["configs"][c]["test_after"]["accuracy"] - run["configs"][c]["test_before"]["accuracy"]
                 for s, c in names.items()}
        heldout_gains = {s: run["configs"][c]["heldout_best"] - run["configs"][c]["heldout_before"]
                         for s, c in names.items()}
        n = run["configs"][names["default"]]["test_after"]["n"]
        pairs = {}
        for a, b in (("default", BASELINE), ("regenerate", BASELINE), ("default", "regenerate")):
            key = f"{names[a]} - {names[b]}"
            flipped = key not in run["after_differences"]
            d = run["after_differences"][f"{names[b]} - {names[a]}" if flipped else key]
            a_only, b_only = (d["b_only"], d["a_only"]) if flipped else (d["a_only"], d["b_only"])
            pairs[f"{a} - {b}"] = {"a_only": a_only, "b_only": b_only, "n": n,
                                   "difference": (a_only - b_only) / n}
        return {"file": str(path), "task": run["task"], "seed": run["seed"], "n": n, "gains": gains,
                "heldout_gains": heldout_gains, "heldout_examples": run["splits"][1], "pairs": pairs}
    raise SystemExit(f"{path}: no run with the default, regenerate and faithful configurations; "
                     "pass a quality.py report that compiled or reused all three")


def deltas(pair: dict) -> np.ndarray:
    """Per-example differences (+1, -1 or 0) of a pair, rebuilt from its counts."""
    a, b, n = pair["a_only"], pair["b_only"], pair["n"]
    return np.array([1] * a + [-1] * b + [0] * (n - a - b))


def pooled(pairs: list[dict], *, resamples: int, seed: int) -> dict:
    """Mean of the runs' differences with example-level and run-level bootstrap 95% intervals."""
    rng = np.random.default_rng(seed)
    per_run = [deltas(p) for p in pairs]
    mean, *examples = bootstrap_mean_ci(per_run, rng, resamples)
    _, *runs = bootstrap_mean_ci(per_run, rng, resamples, resample_groups=True)
    return {
        "mean_difference": mean,
        "examples_interval": examples,
        "runs_interval": runs,
        "runs_at_least": sum(p["difference"] >= 0 for p in pairs),
        "runs": len(pairs),
    }


def heldout_versus_test(runs: list[dict]) -> dict:
    """How the chosen instruction's held-out gain (the accuracy the search chose it on) compares with
    its test gain, over every run and configuration, and over those whose held-out accuracy rose."""
    pairs = [(r["heldout_gains"][c], r["gains"][c]) for r in runs for c in r["gains"]]
    rose = [(h, t) for h, t in pairs if h > 0]
    return {
        "heldout_examples": sorted({r["heldout_examples"] for r in runs}),
        "compiles": len(pairs),
        "mean_heldout_gain": statistics.fmean(h for h, _ in pairs),
        "mean_test_gain": statistics.fmean(t for _, t in pairs),
        "heldout_rose": len(rose),
        "mean_heldout_gain_where_it_rose": statistics.fmean(h for h, _ in rose) if rose else None,
        "mean_test_gain_where_it_rose": statistics.fmean(t for _, t in rose) if rose else None,
        "test_rose_too": sum(t > 0 for _, t in rose),
        "test_fell": sum(t < 0 for _, t in rose),
        "mean_heldout_gain_by_config": {c: statistics.fmean(r["heldout_gains"][c] for r in runs) for c in runs[0]["gains"]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=pathlib.Path, help="quality.py JSON reports")
    ap.add_argument("--resamples", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=pathlib.Path)
    args = ap.parse_args()

    runs = [comparable_run(p) for p in args.reports]
    summary = {name: pooled([r["pairs"][name] for r in runs], resamples=args.resamples, seed=args.seed)
               for name in runs[0]["pairs"]}
    mean_gains = {c: statistics.fmean(r["gains"][c] for r in runs) for c in ("default", "regenerate", BASELINE)}

    print("| task, seed | n | gain default / regenerate / faithful | default - faithful | regenerate - faithful |")
    print("|---|---|---|---|---|")
    for r in runs:
        g, p = r["gains"], r["pairs"]
        print(f"| {r['task']}, {r['seed']} | {r['n']} | {g['default']:+.3f} / {g['regenerate']:+.3f} / "
              f"{g[BASELINE]:+.3f} | {p['default - faithful']['difference']:+.3f} | "
              f"{p['regenerate - faithful']['difference']:+.3f} |")
    print(f"\nmean gains over {len(runs)} runs: " + ", ".join(f"{c} {v:+.3f}" for c, v in mean_gains.items()))
    for name, s in summary.items():
        print(f"{name}: mean {s['mean_difference']:+.3f}, 95% examples [{s['examples_interval'][0]:+.3f}, "
              f"{s['examples_interval'][1]:+.3f}], runs [{s['runs_interval'][0]:+.3f}, {s['runs_interval'][1]:+.3f}], "
              f">= 0 in {s['runs_at_least']} of {s['runs']}")
    chosen = heldout_versus_test(runs)
    print(f"held-out ({'/'.join(map(str, chosen['heldout_examples']))} examples) against test, {chosen['compiles']} "
          f"compiles: mean gains {chosen['mean_heldout_gain']:+.3f} / {chosen['mean_test_gain']:+.3f}; where the "
          f"held-out accuracy rose ({chosen['heldout_rose']}): {chosen['mean_heldout_gain_where_it_rose']:+.3f} / "
          f"{chosen['mean_test_gain_where_it_rose']:+.3f}, test rose in {chosen['test_rose_too']}, fell in "
          f"{chosen['test_fell']}; mean held-out gains " + ", ".join(
              f"{c} {v:+.3f}" for c, v in chosen["mean_heldout_gain_by_config"].items()))
    if args.output:
        args.output.write_text(json.dumps({"command": "python benchmarks/pooled_gain.py " + " ".join(
            str(p) for p in args.reports), "runs": runs, "mean_gains": mean_gains, "pooled": summary,
            "heldout_versus_test": chosen}, indent=1) + "\n")


if __name__ == "__main__":
    main()
