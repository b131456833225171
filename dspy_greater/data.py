"""Task data: the packaged BIG-Bench Hard files and user task files, as ``dspy.Example`` lists.

Files load through ``datasets.load_dataset`` with its local builders (``json``, ``csv``), so
nothing here touches the Hugging Face hub. BBH files are ``{"examples": [{"input", "target"}]}``;
their ``input``/``target`` columns map to the ``question``/``answer`` fields by default.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import random
from typing import Any, Iterable, Sequence

import dspy

__all__ = ["bbh_tasks", "bbh_path", "load_examples", "load_fields", "split_examples", "Splits", "BBH_DIR"]

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
    or an already loaded ``datasets.Dataset`` / ``DatasetDict``. ``split`` is passed to
    ``datasets`` (so ``"train[:50]"`` works; local files only have ``"train"``).

    ``input_key`` / ``output_key`` name the columns to read; by default the column named like
    the field, else ``input``/``question`` and ``target``/``answer``/``output``/``label``.
    Values are converted to ``str``; a missing value raises ``ValueError`` naming the row.
    Only the two fields are kept; the examples have ``input_field`` as their input.
    """
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


def _load_dataset(source: Any, split: str):
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # reading a local file needs no progress bar
    try:
        return _read(datasets, source, split)
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _read(datasets, source: Any, split: str):

    if isinstance(source, datasets.DatasetDict):
        return source[split]
    if isinstance(source, datasets.Dataset):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"cannot load examples from a {type(source).__name__}")

    path = pathlib.Path(source)
    if not path.is_file():
        if path.suffix.lower() in _SUFFIXES or len(path.parts) > 1:
            raise FileNotFoundError(f"no such task file: {str(source)!r}")
        path = bbh_path(str(source))  # raises, listing the packaged tasks

    suffix = path.suffix.lower()
    if suffix == ".json":
        kwargs = {"field": "examples"} if _has_examples_field(path) else {}
        return datasets.load_dataset("json", data_files=str(path), split=split, **kwargs)
    if suffix == ".jsonl":
        return datasets.load_dataset("json", data_files=str(path), split=split)
    if suffix in (".csv", ".tsv"):
        # Every column as a string: cells stay as written ("007", "2.50"), empty cells are "".
        delimiter = "\t" if suffix == ".tsv" else ","
        with open(path, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
        if not header:
            raise ValueError(f"task file {str(source)!r} is empty")
        features = datasets.Features({name: datasets.Value("string") for name in header})
        return datasets.load_dataset(
            "csv", data_files=str(path), split=split, delimiter=delimiter,
            features=features, keep_default_na=False,
        )
    raise ValueError(
        f"unsupported task file type {suffix or '(none)'!r} for {str(source)!r}; "
        f"use one of {', '.join(_SUFFIXES)}"
    )


def _has_examples_field(path: pathlib.Path) -> bool:
    """Whether a .json file is a single object with an ``examples`` list (BBH's format)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        if head != "{":
            return False
        f.seek(0)
        try:
            data = json.load(f)
        except json.JSONDecodeError:  # JSON lines in a .json file
            return False
    return isinstance(data, dict) and isinstance(data.get("examples"), list)


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
