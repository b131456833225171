"""The arithmetic behind benchmarks/pooled_gain.py: runs found in quality.py reports, paired counts
read in either order, and the pooled mean with its intervals. Hand-written reports; no model."""

import importlib.util
import json
import pathlib

import pytest

POOLED = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "pooled_gain.py"
REGENERATE = 'default+finalist_scoring="regenerate"+model_batch_size=24'


@pytest.fixture
def pooled_gain(monkeypatch):
    monkeypatch.syspath_prepend(str(POOLED.parent))  # it imports compare.py's bootstrap, as when run as a script
    spec = importlib.util.spec_from_file_location("pooled_gain_under_test", POOLED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config(before, after, n=100, heldout=(0.25, 0.5)):
    return {"test_before": {"accuracy": before, "n": n}, "test_after": {"accuracy": after, "n": n},
            "heldout_before": heldout[0], "heldout_best": heldout[1]}


def report(tmp_path, name, differences, *, wrapped=None):
    run = {"task": "navigate", "seed": 3, "splits": [24, 12, 100],
           "configs": {"default": config(0.4, 0.45), REGENERATE: config(0.4, 0.5, heldout=(0.5, 0.5)),
                       "faithful": config(0.4, 0.42, heldout=(0.25, 0.75))},
           "after_differences": differences}
    other = {"task": "navigate", "seed": 3, "configs": {"default+eval_every=1": config(0.4, 0.4)}, "after_differences": {}}
    body = {wrapped: {"a": other, "b": run}} if wrapped else run  # "tasks" or "runs": several runs in one file
    path = tmp_path / name
    path.write_text(json.dumps(body))
    return path


@pytest.mark.parametrize("wrapped", [None, "tasks", "runs"])
def test_paired_counts_are_read_in_either_order(pooled_gain, tmp_path, wrapped):
    path = report(tmp_path, "a.json", {
        f"default - {REGENERATE}": {"a_only": 2, "b_only": 7},
        "faithful - default": {"a_only": 4, "b_only": 7},  # stored the other way round
        f"{REGENERATE} - faithful": {"a_only": 9, "b_only": 1},
    }, wrapped=wrapped)
    run = pooled_gain.comparable_run(path)
    assert run["gains"] == pytest.approx({"default": 0.05, "regenerate": 0.1, "faithful": 0.02})
    assert run["pairs"]["default - faithful"] == {"a_only": 7, "b_only": 4, "n": 100, "difference": 0.03}
    assert run["pairs"]["regenerate - faithful"]["difference"] == pytest.approx(0.08)
    assert run["pairs"]["default - regenerate"]["difference"] == pytest.approx(-0.05)
    assert run["heldout_gains"] == pytest.approx({"default": 0.25, "regenerate": 0.0, "faithful": 0.5})


def test_heldout_gains_are_set_beside_test_gains(pooled_gain):
    runs = [{"heldout_examples": 12, "heldout_gains": {"default": 0.25, "faithful": 0.0},
             "gains": {"default": -0.02, "faithful": 0.04}},
            {"heldout_examples": 12, "heldout_gains": {"default": 0.5, "faithful": 0.25},
             "gains": {"default": 0.1, "faithful": 0.0}}]
    s = pooled_gain.heldout_versus_test(runs)
    assert s["compiles"] == 4 and s["heldout_examples"] == [12]
    assert s["mean_heldout_gain"] == pytest.approx(0.25) and s["mean_test_gain"] == pytest.approx(0.03)
    assert s["heldout_rose"] == 3 and s["test_rose_too"] == 1 and s["test_fell"] == 1  # the 0.25 -> 0.0 one is neither
    assert s["mean_heldout_gain_where_it_rose"] == pytest.approx(1 / 3)
    assert s["mean_test_gain_where_it_rose"] == pytest.approx(0.08 / 3)
    assert s["mean_heldout_gain_by_config"] == pytest.approx({"default": 0.375, "faithful": 0.125})


def test_pooled_mean_and_intervals(pooled_gain):
    pairs = [{"a_only": 10, "b_only": 0, "n": 100, "difference": 0.1},
             {"a_only": 0, "b_only": 0, "n": 100, "difference": 0.0},
             {"a_only": 0, "b_only": 4, "n": 50, "difference": -0.08}]
    s = pooled_gain.pooled(pairs, resamples=500, seed=0)
    assert s["mean_difference"] == pytest.approx(0.02 / 3)
    assert s["runs_at_least"] == 2 and s["runs"] == 3
    for low, high in (s["examples_interval"], s["runs_interval"]):
        assert low < s["mean_difference"] < high
    # resampling whole runs adds the spread between them: its interval is the wider one
    assert s["runs_interval"][1] - s["runs_interval"][0] > s["examples_interval"][1] - s["examples_interval"][0]


def test_a_report_without_the_three_configurations_is_named(pooled_gain, tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"task": "navigate", "seed": 0, "configs": {"default": config(0.4, 0.4)},
                                "after_differences": {}}))
    with pytest.raises(SystemExit, match="b.json: no run with the default, regenerate and faithful"):
        pooled_gain.comparable_run(path)
