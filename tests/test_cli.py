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
    captured = capsys.readouterr()
    assert "Optimized instruction:" in captured.out and "balanced" in captured.out
    assert "it/s" not in captured.out + captured.err and "%|" not in captured.err  # --quiet: no progress bar


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


def _two_field_csv(path, rows=14):
    """navigate's questions cut into a `context` (the first sentence) and a `question` (the rest)."""
    import csv

    from dspy_greater.data import load_examples

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["context", "question", "answer"])
        for example in load_examples("navigate")[:rows]:
            first, _, rest = example.question.partition(". ")
            writer.writerow([first + ".", rest, example.answer])


def test_optimize_a_csv_with_two_input_fields(tmp_path, capsys):
    import dspy

    data, saved = tmp_path / "task.csv", tmp_path / "optimized.json"
    _two_field_csv(data)
    assert main(["optimize", str(data), "--signature", "context, question -> answer", "--steps", "1",
                 "--batch-size", "3", "--reasoning-tokens", "8", "--val", "3", "--test", "3", "--quiet",
                 "--save", str(saved), "--checkpoint-dir", str(tmp_path / "checkpoints")]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "it/s" not in out + captured.err and "%|" not in captured.err  # --quiet: no progress bar
    assert "8 train / 3 held-out / 3 test rows" in out
    assert "Initial instruction:   'Given the fields `context`, `question`, produce the fields `answer`.'" in out
    assert "Optimized instruction:" in out and "balanced" in out
    loaded = dspy.ChainOfThought("context, question -> answer")
    loaded.load(str(saved))
    assert loaded.predict.greater_extractor["kind"] == "choice"  # the extractor travels with the program
    assert (tmp_path / "checkpoints" / "predict.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--signature", "context, question -> answer, verdict"], "--signature must have one output field"),
    (["--signature", "passage -> answer"], "has no column 'passage'"),
    (["--signature", "this is not a signature"], "--signature 'this is not a signature' is not a DSPy signature"),
    (["--signature", "context, question -> answer", "--steps", "0"], "--steps must be a positive integer"),
    (["--signature", "context, question -> answer", "--reasoning-tokens", "-3"], "--reasoning-tokens must be"),
    (["--signature", "context, question -> answer", "--device", "tpu"], "--device 'tpu': "),
    (["--signature", "context, question -> answer", "--model", "./no/such/model"], "--model './no/such/model': "),
])
def test_optimize_bad_input_is_one_clear_line(tmp_path, capsys, argv, message):
    data = tmp_path / "task.csv"
    _two_field_csv(data, rows=4)
    assert main(["optimize", str(data), *argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dspy-greater: error:") and message in err[0]


def test_version_and_help_load_neither_torch_nor_dspy(capsys):
    import subprocess
    import sys

    from dspy_greater import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"dspy-greater {__version__}"
    probe = ("import sys; from dspy_greater.cli import build_parser; build_parser().format_help(); "
             "print(sorted(m for m in ('torch', 'dspy', 'transformers') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    for command in ("demo", "optimize"):
        parser = __import__("dspy_greater.cli", fromlist=["build_parser"]).build_parser()
        sub = parser._subparsers._group_actions[0].choices[command]
        assert all(action.help for action in sub._actions), command  # every option has help text
