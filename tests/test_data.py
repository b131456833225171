import json

import dspy
import pytest

from dspy_greater.data import Splits, bbh_path, bbh_tasks, load_examples, split_examples


def test_bbh_tasks_and_license_are_packaged():
    tasks = bbh_tasks()
    assert len(tasks) == 20
    assert "date_understanding" in tasks and "word_sorting" in tasks
    assert tasks == sorted(tasks)
    path = bbh_path("navigate")
    assert path.is_file() and path.name == "navigate.json"
    assert bbh_path("navigate.json") == path
    assert (path.parent / "LICENSE").read_text().startswith("MIT License")


def test_unknown_task_lists_available_tasks():
    with pytest.raises(ValueError) as e:
        bbh_path("sports_understandingg")
    assert "sports_understandingg" in str(e.value) and "date_understanding" in str(e.value)
    with pytest.raises(ValueError, match="packaged tasks"):
        load_examples("no_such_task")
    with pytest.raises(FileNotFoundError):
        load_examples("/nonexistent/dir/file.jsonl")


def test_load_packaged_task():
    ex = load_examples("date_understanding")
    raw = json.loads(bbh_path("date_understanding").read_text())["examples"]
    assert len(ex) == len(raw) == 250
    assert isinstance(ex[0], dspy.Example)
    assert ex[0].question == raw[0]["input"] and ex[0].answer == raw[0]["target"]
    assert set(ex[0].inputs().keys()) == {"question"}
    assert set(ex[0].labels().keys()) == {"answer"}
    assert [e.answer for e in ex] == [r["target"] for r in raw]


def test_load_packaged_task_with_other_field_names_and_slice():
    ex = load_examples("object_counting", input_field="problem", output_field="count",
                       split="train[:5]")
    assert len(ex) == 5
    assert set(ex[0].keys()) == {"problem", "count"}
    assert set(ex[0].inputs().keys()) == {"problem"}
    assert ex[0].count == "8"


def test_load_bbh_style_json_file_path(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"canary": "x", "examples": [
        {"input": "1+1", "target": "2"}, {"input": "2+2", "target": "4"}]}))
    ex = load_examples(p)
    assert [(e.question, e.answer) for e in ex] == [("1+1", "2"), ("2+2", "4")]


def test_load_jsonl_with_keys_and_non_string_values(tmp_path):
    p = tmp_path / "rows.jsonl"
    rows = [{"q": "how many?", "gold": 3, "extra": "ignored"},
            {"q": "and now?", "gold": -1, "extra": "x"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ex = load_examples(p, input_key="q", output_key="gold")
    assert [(e.question, e.answer) for e in ex] == [("how many?", "3"), ("and now?", "-1")]
    assert set(ex[0].keys()) == {"question", "answer"}
    with pytest.raises(ValueError, match="columns"):
        load_examples(p)  # no column names the output
    with pytest.raises(ValueError, match="nope"):
        load_examples(p, input_key="nope", output_key="gold")


def test_load_json_list_of_records(tmp_path):
    p = tmp_path / "list.json"
    p.write_text(json.dumps([{"question": "a?", "answer": "Yes"}, {"question": "b?", "answer": "No"}]))
    ex = load_examples(p)
    assert [e.answer for e in ex] == ["Yes", "No"]


def test_load_csv_keeps_cells_as_text(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text('question,answer\n"What is 1+1, exactly?",002\nhalf,0.50\n"two\nlines",x\n')
    ex = load_examples(str(p))
    assert [(e.question, e.answer) for e in ex] == [("What is 1+1, exactly?", "002"), ("half", "0.50"),
                                                   ("two\nlines", "x")]
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nfine,Yes\nmissing,\n")
    with pytest.raises(ValueError, match="row 1"):
        load_examples(bad)


def test_load_tsv_and_unsupported_suffix(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_text("input\ttarget\nx, y\t(A)\n")
    ex = load_examples(p)
    assert (ex[0].question, ex[0].answer) == ("x, y", "(A)")
    q = tmp_path / "t.txt"
    q.write_text("hello")
    with pytest.raises(ValueError, match="unsupported"):
        load_examples(q)


def test_load_slices_json_lines_and_bad_files(tmp_path):
    p = tmp_path / "lines.json"  # JSON lines in a .json file
    p.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": str(i)}) for i in range(5)))
    assert [e.answer for e in load_examples(p, split="train[1:3]")] == ["1", "2"]
    assert [e.answer for e in load_examples(p, split="train[-1:]")] == ["4"]
    with pytest.raises(ValueError, match="one split, 'train'"):
        load_examples(p, split="test")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        load_examples(bad)
    scalar = tmp_path / "scalar.json"
    scalar.write_text("[1, 2]")
    with pytest.raises(ValueError, match="list of records"):
        load_examples(scalar)


def test_load_from_datasets_object():
    datasets = pytest.importorskip("datasets")  # an optional dependency (in the dev extra)

    ds = datasets.Dataset.from_dict({"input": ["a", "b"], "target": ["(A)", "(B)"]})
    ex = load_examples(ds)
    assert [e.answer for e in ex] == ["(A)", "(B)"]
    ex = load_examples(datasets.DatasetDict({"test": ds}), split="test")
    assert len(ex) == 2


def test_split_examples_seeded_and_reproducible():
    items = list(range(30))
    a = split_examples(items, [10, 5], seed=0)
    b = split_examples(items, [10, 5], seed=0)
    c = split_examples(items, [10, 5], seed=1)
    assert isinstance(a, Splits) and isinstance(a, list)
    assert a == b and a.indices == b.indices
    assert a != c
    train, dev = a
    assert len(train) == 10 and len(dev) == 5
    assert not set(train) & set(dev)
    assert train != items[:10]  # shuffled
    assert [items[i] for i in a.indices[0]] == train
    # consecutive slices of one permutation: a longer first split extends the shorter one
    longer = split_examples(items, [15], seed=0)
    assert longer[0] == train + dev
    assert a.as_dict()["sizes"] == [10, 5] and a.as_dict()["seed"] == 0
    json.dumps(a.as_dict())


def test_split_examples_truncates_and_rest():
    items = list("abcdefg")
    s = split_examples(items, [5, 5, 5], seed=3)
    assert [len(x) for x in s] == [5, 2, 0]
    assert sorted(s[0] + s[1]) == items
    r = split_examples(items, [2, None], seed=3)
    assert [len(x) for x in r] == [2, 5]
    with pytest.raises(ValueError):
        split_examples(items, [-1], seed=0)
    with pytest.raises(TypeError):
        split_examples(items, 5, seed=0)


def test_split_real_examples():
    ex = load_examples("navigate")
    train, dev = split_examples(ex, [50, 50], seed=42)
    again = split_examples(load_examples("navigate"), [50, 50], seed=42)
    assert [e.question for e in train] == [e.question for e in again[0]]
    assert len({e.question for e in train} & {e.question for e in dev}) <= 1  # BBH has near-duplicates
