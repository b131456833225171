"""The arithmetic behind benchmarks/compare.py's committed tables: bootstrap CIs, paired differences,
failed runs, paused time and resumption. Uses hand-written per-run records; no model is loaded."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

COMPARE = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "compare.py"


@pytest.fixture
def compare(tmp_path, monkeypatch):
    """benchmarks/compare.py as a module, writing into ``tmp_path``."""
    spec = importlib.util.spec_from_file_location("compare_under_test", COMPARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    monkeypatch.setattr(module, "OUT_DIR", tmp_path / "compare")
    monkeypatch.setattr(module, "plot", lambda *a: None)
    return module


def write_run(compare, task, seed, method, correct=None, *, instruction="Given the fields.", error=None, **extra):
    folder = compare.OUT_DIR / task / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    record = {"task": task, "seed": seed, "method": method, "target": "tiny (llama.cpp, LM)", "proposer": "tiny",
              "splits": {"sizes": [2, 2, len(correct or [])]}, "status": "failed" if error else "ok", **extra}
    if error:
        record["error"] = error
    else:
        record["instruction"] = instruction
        record["optimizer_seconds"] = extra.get("optimizer_seconds", 10.0)
        record["test"] = {"correct": correct, "balanced_accuracy": 0.5, "majority_rate": 0.6,
                          "pred_distribution": {"Yes": len(correct)}}
    (folder / f"{method}.json").write_text(json.dumps(record))


def test_bootstrap_ci_is_mean_of_group_means_and_covers_it(compare):
    rng = np.random.default_rng(0)
    point, lo, hi = compare.bootstrap_mean_ci([np.array([1, 1, 0, 0]), np.array([1, 1, 1, 1])], rng)
    assert point == pytest.approx(0.75)  # (0.5 + 1.0) / 2, not the pooled 6/8
    assert lo < point < hi <= 1.0
    assert compare.bootstrap_mean_ci([np.zeros(5)], rng) == (0.0, 0.0, 0.0)
    assert all(np.isnan(compare.bootstrap_mean_ci([], rng)))


def test_report_pairs_differences_counts_failures_and_subtracts_pauses(compare):
    for task in ("alpha", "beta"):
        write_run(compare, task, 0, "unoptimized", [1, 0, 0, 0], instruction="start")
        write_run(compare, task, 0, "zero_shot_cot", [0, 0, 0, 0], instruction="Let's think step by step.")
        write_run(compare, task, 0, "copro", error="AdapterParseError: no proposed_instruction")
    write_run(compare, "alpha", 0, "greater", [1, 1, 1, 0], instruction="edited", optimizer_seconds=100.0,
              paused_seconds=40.0)
    write_run(compare, "beta", 0, "greater", [1, 0, 0, 0], instruction="start", optimizer_seconds=30.0)

    compare.report(None)

    summary = json.loads((compare.RESULTS / "compare_summary.json").read_text())
    greater = summary["tasks"]["alpha"]["greater"]
    assert greater["accuracy"][0] == pytest.approx(0.75)
    assert greater["diff_vs_unoptimized"][0] == pytest.approx(0.5)
    assert greater["diff_vs_zero_shot_cot"][0] == pytest.approx(0.75)
    assert greater["optimizer_seconds"] == pytest.approx(60.0)  # 100 s minus the 40 s the process was stopped
    average = summary["average"]
    assert average["greater"]["runs"] == 2
    assert average["greater"]["diff_vs_unoptimized"][0] == pytest.approx(0.25)  # (+0.5 + 0.0) / 2
    assert average["copro"]["runs"] == 0 and len(average["copro"]["errors"]) == 2

    table = (compare.RESULTS / "compare.md").read_text()
    assert "| copro | 0 | failed |" in table
    assert "- greater: `start` (unchanged: the starting instruction)" in table  # beta kept its start
    assert "Target LM: tiny;" in table


def test_is_done_skips_finished_runs_and_retries_failures_only_when_asked(compare):
    write_run(compare, "alpha", 0, "greater", [1, 0])
    write_run(compare, "alpha", 0, "copro", error="AdapterParseError")
    assert compare.is_done("alpha", 0, "greater", retry_failed=True)
    assert compare.is_done("alpha", 0, "copro", retry_failed=False)
    assert not compare.is_done("alpha", 0, "copro", retry_failed=True)
    assert not compare.is_done("alpha", 1, "greater", retry_failed=False)
