"""Task data: the packaged BIG-Bench Hard files and user task files, as ``dspy.Example`` lists.

Files are read with the standard library (``json``, ``csv``); a ``datasets.Dataset`` works too.
BBH files are ``{"examples": [{"input", "target"}]}``; their ``input``/``target`` columns map to
the ``question``/``answer`` fields by default.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import random
import re
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    import dspy

__all__ = ["bbh_tasks", "bbh_path", "bbh_rows", "load_examples", "load_fields", "split_examples", "Splits", "BBH_DIR"]

BBH_DIR = pathlib.Path(__file__).resolve().parent / "data" / "bbh"

_INPUT_FALLBACKS = ("input", "question")
_OUTPUT_FALLBACKS = ("target", "answer", "output", "label")
_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv")


def bbh_tasks() -> list[str]:
    """Names of the packaged BBH task files, sorted."""
    return sorted(p.stem for p in BBH_DIR.glob("*.json"))


def bbh_path(task: str) -> pathlib.Path:
    """Path of a packaged BBH task file; ``ValueError`` listing the tasks if unknown."""
    name = str(task)
    if name.endswith(".json"):
        name = name[: -len(".json")]
    path = BBH_DIR / f"{name}.json"
    if "/" in name or os.sep in name or not path.is_file():
        raise ValueError(
            f"unknown BBH task {task!r}; packaged tasks: {', '.join(bbh_tasks())}"
        )
    return path


def bbh_rows(task: str) -> list[tuple[str, str]]:
    """A packaged BBH task's ``(input, target)`` pairs, read without DSPy (the engine's GPU check
    runs where DSPy is not installed)."""
    return [(str(row["input"]), str(row["target"])) for row in json.loads(bbh_path(task).read_text())["examples"]]


def load_examples(
    source: str | os.PathLike | Any,
    *,
    input_field: str = "question",
    output_field: str = "answer",
    input_key: str | None = None,
    output_key: str | None = None,
    split: str = "train",
) -> list[dspy.Example]:
    """Load labelled examples as ``dspy.Example(input_field=..., output_field=...)``.

    ``source`` is a packaged BBH task name (see :func:`bbh_tasks`), a path to a ``.json``
    (BBH's ``{"examples": [...]}`` or a list of records), ``.jsonl``, ``.csv`` or ``.tsv`` file,
    or an already loaded ``datasets.Dataset`` / ``DatasetDict``. ``split`` names a
    ``DatasetDict``'s split; a local file has one, ``"train"``, or a slice of it (``"train[:50]"``).

    ``input_key`` / ``output_key`` name the columns to read; by default the column named like
    the field, else ``input``/``question`` and ``target``/``answer``/``output``/``label``.
    Values are converted to ``str``; a missing value raises ``ValueError`` naming the row.
    Only the two fields are kept; the examples have ``input_field`` as their input.
    """
    import dspy

    ds = _load_dataset(source, split)
    columns = list(ds.column_names)
    in_col = _pick_column(columns, input_key, input_field, _INPUT_FALLBACKS, "input", source)
    out_col = _pick_column(columns, output_key, output_field, _OUTPUT_FALLBACKS, "output", source)
    if in_col == out_col:
        raise ValueError(f"input and output both map to column {in_col!r} in {source!r}")
    if input_field == output_field:
        raise ValueError(f"input_field and output_field are both {input_field!r}")

    examples = []
    for i, (x, y) in enumerate(zip(ds[in_col], ds[out_col])):
        if x is None or y is None or not _to_str(y).strip():
            missing = in_col if x is None else out_col
            raise ValueError(f"row {i} of {source!r} has no value in column {missing!r}")
        examples.append(
            dspy.Example(**{input_field: _to_str(x), output_field: _to_str(y)}).with_inputs(input_field)
        )
    return examples


def load_fields(source: str | os.PathLike, inputs: Sequence[str], outputs: Sequence[str]) -> list[dspy.Example]:
    """Examples with the given input and output fields, each read from the column of the same name.

    ``source`` is a task file as for :func:`load_examples`. Values become ``str``; a row with a
    missing or empty value raises ``ValueError`` naming the row and the column.
    """
    import dspy

    ds = _load_dataset(source, "train")
    columns = list(ds.column_names)
    missing = [f for f in [*inputs, *outputs] if f not in columns]
    if missing:
        raise ValueError(f"{str(source)!r} has no column {', '.join(repr(f) for f in missing)} (its columns: "
                         f"{', '.join(columns)}); name the signature's fields like the file's columns")
    examples = []
    for i, row in enumerate(ds):
        for name in [*inputs, *outputs]:
            if row[name] is None or not _to_str(row[name]).strip():
                raise ValueError(f"row {i} of {str(source)!r} has no value in column {name!r}")
        examples.append(dspy.Example(**{f: _to_str(row[f]) for f in [*inputs, *outputs]}).with_inputs(*inputs))
    return examples


class Splits(list):
    """The splits (a ``list`` of example lists, so ``train, dev = split_examples(...)`` works),
    plus ``indices``: for each split, the positions of its examples in the input list, and
    ``seed`` / ``requested`` sizes for the record."""

    def __init__(self, splits: Iterable[list], indices: list[list[int]], seed: int,
                 requested: Sequence[int | None]):
        super().__init__(splits)
        self.indices = indices
        self.seed = seed
        self.requested = tuple(requested)

    def as_dict(self) -> dict:
        """Plain data for logs and results: seed, requested and actual sizes, indices."""
        return {
            "seed": self.seed,
            "requested": list(self.requested),
            "sizes": [len(s) for s in self],
            "indices": [list(ix) for ix in self.indices],
        }


def split_examples(examples: Sequence[Any], sizes: Sequence[int | None], seed: int) -> Splits:
    """Shuffle with ``random.Random(seed)`` and cut consecutive slices of the given sizes.

    A size of ``None`` takes all the remaining rows. When there are too few rows, the later
    splits are truncated (possibly empty); rows are never repeated across splits. Returns a
    :class:`Splits` (a list of lists with ``.indices`` into ``examples``).
    """
    if isinstance(sizes, int):
        raise TypeError("sizes must be a sequence of sizes, e.g. [50, 50]")
    for s in sizes:
        if s is not None and (not isinstance(s, int) or isinstance(s, bool) or s < 0):
            raise ValueError(f"split sizes must be non-negative integers or None; got {s!r}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    splits, indices, start = [], [], 0
    for s in sizes:
        stop = len(order) if s is None else min(start + s, len(order))
        ix = order[start:stop]
        indices.append(ix)
        splits.append([examples[i] for i in ix])
        start = stop
    return Splits(splits, indices, seed, sizes)


# ---------------------------------------------------------------------- helpers


def _load_dataset(source: Any, split: str) -> "_Table":
    """The rows of ``source`` (a task name, a local file or a ``datasets`` object) as a ``_Table``."""
    if hasattr(source, "column_names"):  # a datasets.Dataset / DatasetDict; needs no import of datasets
        if isinstance(source, dict):  # a DatasetDict
            if split not in source:
                raise ValueError(f"no split {split!r} in the DatasetDict; its splits: {', '.join(source)}")
            source = source[split]
        return _Table(list(source.column_names), source.to_list())
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"cannot load examples from a {type(source).__name__}")

    path = pathlib.Path(source)
    if not path.is_file():
        if path.suffix.lower() in _SUFFIXES or len(path.parts) > 1:
            raise FileNotFoundError(f"no such task file: {str(source)!r}")
        path = bbh_path(str(source))  # raises, listing the packaged tasks
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"unsupported task file type {suffix or '(none)'!r} for {str(source)!r}; "
                         f"use one of {', '.join(_SUFFIXES)}")
    rows = _read_rows(path, suffix)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return _Table(columns, _slice(rows, split, source))


class _Table:
    """Column names and rows (dicts; a missing cell reads as ``None``)."""

    def __init__(self, column_names: list[str], rows: list[dict]):
        self.column_names = column_names
        self.rows = [{c: row.get(c) for c in column_names} for row in rows]

    def __getitem__(self, column: str) -> list:
        return [row[column] for row in self.rows]

    def __iter__(self):
        return iter(self.rows)


def _read_rows(path: pathlib.Path, suffix: str) -> list[dict]:
    if suffix in (".csv", ".tsv"):
        # Every cell as written ("007", "2.50"); an empty cell is ""; quoted cells may span lines.
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            if not reader.fieldnames:
                raise ValueError(f"task file {str(path)!r} is empty")
            return [{k: v for k, v in row.items() if k is not None} for row in reader]
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if suffix == ".json" and text.lstrip()[:1] in ("{", "[") else None
    except json.JSONDecodeError:
        data = None  # JSON lines in a .json file
    if data is None:
        data = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"line {number} of {str(path)!r} is not JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("examples"), list):
        data = data["examples"]  # BBH's {"examples": [...]}
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise ValueError(f"{str(path)!r} must hold a list of records (objects), one per example, or "
                         f"BBH's {{\"examples\": [...]}}")
    return data


def _slice(rows: list, split: str, source: Any) -> list:
    """``rows`` for ``split``: ``"train"`` (all of a local file) or a slice of it, ``"train[10:50]"``."""
    match = re.fullmatch(r"train(?:\[(-?\d*):(-?\d*)\])?", split.replace(" ", ""))
    if match is None:
        raise ValueError(f"a local file has one split, 'train'; got split={split!r} for {str(source)!r} "
                         f"(a slice such as 'train[:50]' works too)")
    start, stop = (int(x) if x else None for x in match.groups())
    return rows[start:stop]


def _pick_column(columns, key, field, fallbacks, role, source) -> str:
    if key is not None:
        if key not in columns:
            raise ValueError(f"{role} column {key!r} not found in {source!r}; columns: {columns}")
        return key
    for c in (field, *fallbacks):
        if c in columns:
            return c
    raise ValueError(
        f"cannot tell which column of {source!r} holds the {role}; columns: {columns}; "
        f"pass {role}_key="
    )


def _to_str(x: Any) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)
