"""The `dspy-greater demo` command (README's main job) at tiny settings, with and without a target LM."""

import json

import pytest

from dspy_greater.cli import main

pytestmark = pytest.mark.slow

TINY = ["--train", "6", "--val", "4", "--test", "4", "--steps", "1", "--quiet", "--threads", "1"]


def test_demo_reports_accuracy_beside_majority_and_balanced(tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert main(["demo", *TINY, "--output", str(report_path)]) == 0

    report = json.loads(report_path.read_text())
    for row in (report["before"], report["after"]):
        assert row["n"] == 4
        assert {"accuracy", "balanced_accuracy", "majority_rate", "pred_distribution"} <= set(row)
    assert report["search"]["predict"]["trace"][0]["step"] == 0
    out = capsys.readouterr().out
    assert "Optimized instruction:" in out and "balanced" in out


def test_demo_on_a_llama_cpp_target(tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert main(["demo", *TINY, "--target", "smollm2", "--target-tokens", "16", "--output", str(report_path)]) == 0

    report = json.loads(report_path.read_text())
    for row in (report["before"]["target"], report["after"]["target"]):
        assert row["n"] == 4
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["balanced_accuracy"] <= 1.0
        assert row["unparsed"] <= 4
    out = capsys.readouterr().out
    assert "target-LM calls in all" in out and "majority rate" in out


def test_demo_runs_the_optimizer_model_in_the_dtype_asked_for(tmp_path):
    report_path = tmp_path / "report.json"
    assert main(["demo", *TINY, "--dtype", "bfloat16", "--output", str(report_path)]) == 0

    report = json.loads(report_path.read_text())
    assert report["model"]["dtype"] == "bfloat16" and report["model"]["device"] == "cpu"
    assert report["search"]["predict"]["trace"][0]["step"] == 0


def test_demo_with_an_unknown_task_fails_clearly(capsys):
    assert main(["demo", "--task", "no_such_task", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no_such_task" in err
