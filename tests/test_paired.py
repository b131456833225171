"""benchmarks/paired.py: the paired bootstrap the benchmark reports use."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "paired.py"
_spec = importlib.util.spec_from_file_location("paired_under_test", _PATH)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
paired_difference = _module.paired_difference


def test_paired_difference_counts_disagreements_and_brackets_the_difference():
    golds = ["Yes"] * 10 + ["No"] * 10
    a = ["yes"] * 10 + ["No"] * 6 + ["Yes"] * 4   # 16 right
    b = ["Yes"] * 8 + ["No"] * 2 + ["No"] * 10     # 18 right
    d = paired_difference(golds, a, b)
    assert d["difference"] == pytest.approx(16 / 20 - 18 / 20)
    assert (d["a_only"], d["b_only"]) == (2, 4)
    assert d["low"] < d["difference"] < d["high"] and -1 <= d["low"] and d["high"] <= 1
    assert paired_difference(golds, a, b) == d  # seeded
    # Equal answers: no disagreement, an interval of width zero, whatever the accuracy.
    same = paired_difference(golds, a, a)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0, "a_only": 0, "b_only": 0}
    with pytest.raises(ValueError, match="gold labels"):
        paired_difference(golds, a, b[:-1])
