"""benchmarks/prompt_test.py: which prompts a speed report ended on (no model)."""

import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "prompt_test.py"


@pytest.fixture
def prompt_test(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # it imports speed.py, as when run as a script
    spec = importlib.util.spec_from_file_location("prompt_test_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_distinct_prompt_once_with_the_systems_that_ended_on_it(prompt_test):
    initial = prompt_test.INITIAL_INSTRUCTION
    report = {"systems": {
        "ours": {"final_prompts": [initial] * 3},
        "ours-bf16": {"final_prompts": ["Let's think step by Step."] * 3},
        "greaterprompt": {"final_prompts": ["Let's answer this question", initial, "Let's answer this question"]},
    }}
    found = prompt_test.report_prompts(report)
    assert list(found) == [initial, "Let's think step by Step.", "Let's answer this question"]
    assert found[initial] == ["initial", "ours", "greaterprompt"]
    assert found["Let's answer this question"] == ["greaterprompt"]
