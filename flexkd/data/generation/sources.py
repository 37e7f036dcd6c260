"""Read raw generation data (instruction following, summarization) into one table shape.

Every loader returns a DataFrame with columns ``prompt`` (instruction, or the document for summarization),
``input`` (extra input, ``""`` when none), ``response`` (the training target: the first reference),
``references`` (list of all reference outputs, for scoring), ``source_file`` and ``source_row`` (the line to open
in an editor, or the 1-based record number of a JSON list, as in ``flexkd.data.sources``, whose readers parse the
files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from flexkd.data.sources import ColumnMap, infer_format, json_records, load_delimited, load_hub, read_text
from flexkd.errors import ConfigError, DataError

TASKS = ("instruction", "summarization")
COLUMNS = ("prompt", "input", "response", "references", "source_file", "source_row")


@dataclass(frozen=True)
class GenerationColumns:
    """Which raw field holds what (params ``data.columns``). Names for json/jsonl/hub; names or 0-based positions
    for csv/tsv."""

    prompt: str | int  # instruction (instruction task) or document (summarization; a list of sentences is joined)
    response: str | int  # output / summary: a string, or a list of reference strings
    input: str | int | None = None  # optional extra input (Alpaca "input")


def check_task(task: str) -> str:
    """``task`` when it is one of ``TASKS``; ConfigError otherwise."""
    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
    return task


def _text_field(where: str, key, value, role: str, task: str) -> str | None:
    """Prompt/input value: a string (or None, left for validation); a summarization document may be a list of
    sentences, joined with a space."""
    if value is None or isinstance(value, str):
        return value
    if role == "prompt" and task == "summarization" and isinstance(value, (list, tuple)):
        bad = [i for i, part in enumerate(value) if not isinstance(part, str)]
        if bad:
            raise DataError(
                f"{where}: field {key!r} (for prompt) is a list whose item {bad[0]} is a "
                f"{type(value[bad[0]]).__name__}, expected a list of sentence strings"
            )
        return " ".join(value)
    expected = "a string or a list of sentence strings" if role == "prompt" and task == "summarization" else "a string"
    raise DataError(f"{where}: field {key!r} (for {role}) is a {type(value).__name__}, expected {expected}")


def _references(where: str, key, value) -> list[str]:
    """Response value → list of references: a string becomes ``[string]``; None becomes ``[]`` (left for
    validation to report)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and not isinstance(value, (str, bytes))):
        value = list(value.tolist() if hasattr(value, "tolist") else value)
        bad = [i for i, part in enumerate(value) if not isinstance(part, str)]
        if bad:
            raise DataError(
                f"{where}: field {key!r} (for response) is a list whose item {bad[0]} is a "
                f"{type(value[bad[0]]).__name__}, expected a list of reference strings"
            )
        return value
    raise DataError(
        f"{where}: field {key!r} (for response) is a {type(value).__name__}, expected a string or a list of strings"
    )


def _generation_frame(rows: list[dict], source_file: str | list[str], source_rows: list[int]) -> pd.DataFrame:
    references = [row["references"] for row in rows]
    frame = pd.DataFrame(
        {
            "prompt": pd.Series([row["prompt"] for row in rows], dtype=object),
            "input": pd.Series([row["input"] for row in rows], dtype=object),
            "response": pd.Series([refs[0] if refs else None for refs in references], dtype=object),
            "references": pd.Series(references, dtype=object),
        }
    )
    frame["source_file"] = source_file
    frame["source_row"] = pd.Series(source_rows, dtype="int64")
    return frame


def _normalise_row(where: str, columns: GenerationColumns, task: str, prompt, input_value, response) -> dict:
    input_text = _text_field(where, columns.input, input_value, "input", task) if columns.input is not None else ""
    return {
        "prompt": _text_field(where, columns.prompt, prompt, "prompt", task),
        "input": "" if input_text is None else input_text,
        "references": _references(where, columns.response, response),
    }


def _renamed(err: DataError, roles: dict[str, str]) -> DataError:
    """A DataError from the classification readers, with their role names replaced by ours."""
    message = str(err)
    for old, new in roles.items():
        message = message.replace(f"(for {old})", f"(for {new})")
    return DataError(message)


def _load_json_generation(path: Path, text: str, columns: GenerationColumns, task: str, fmt: str) -> pd.DataFrame:
    entries = json_records(path, text, fmt)
    if not entries:
        raise DataError(f"{path}: no records")
    where_word = "line" if fmt == "jsonl" else "record"
    first_keys = list(entries[0][1]) if isinstance(entries[0][1], dict) else []
    roles = [("prompt", columns.prompt), ("response", columns.response)]
    if columns.input is not None:
        roles.append(("input", columns.input))
    for role, key in roles:
        if not isinstance(key, str):
            raise DataError(f"{path}: column {key!r} (for {role}) must be a field name in {fmt} files")
        if not any(isinstance(rec, dict) and key in rec for _, rec in entries):
            raise DataError(f"{path}: column {key!r} (for {role}) not found; fields found: {first_keys!r}")
    rows, numbers = [], []
    for number, record in entries:
        where = f"{path}: {where_word} {number}"
        if not isinstance(record, dict):
            raise DataError(f"{where} is a {type(record).__name__}, expected a JSON object")
        for role, key in roles:
            if key not in record:
                raise DataError(f"{where} has no field {key!r} (for {role}; fields: {list(record)!r})")
        input_value = record[columns.input] if columns.input is not None else None
        rows.append(_normalise_row(where, columns, task, record[columns.prompt], input_value, record[columns.response]))
        numbers.append(number)
    return _generation_frame(rows, str(path), numbers)


def _load_delimited_generation(
    path: Path, text: str, columns: GenerationColumns, task: str, fmt: str, header: bool
) -> pd.DataFrame:
    # The classification reader does the parsing and line bookkeeping. Its ``label`` role turns all-integer
    # columns into ints, so it gets the prompt (never all integers in practice) and ``text`` gets the response.
    column_map = ColumnMap(text=columns.response, label=columns.prompt, text_pair=columns.input)
    try:
        raw = load_delimited(path, text, column_map, fmt, header)
    except DataError as err:
        raise _renamed(err, {"text": "response", "label": "prompt", "text_pair": "input"}) from None
    rows = []
    for prompt, response, pair, line in zip(
        raw["label"], raw["text"], raw["text_pair"] if "text_pair" in raw else [None] * len(raw), raw["source_row"]
    ):
        prompt = prompt.item() if hasattr(prompt, "item") else prompt
        rows.append(
            _normalise_row(
                f"{path}: line {line}", columns, task, None if prompt is None else str(prompt), pair, response
            )
        )
    return _generation_frame(rows, str(path), [int(v) for v in raw["source_row"]])


def load_generation_table(
    path: str | os.PathLike,
    *,
    columns: GenerationColumns,
    task: Literal["instruction", "summarization"],
    fmt: str | None = None,
    header: bool = True,
) -> pd.DataFrame:
    """Read a local json/jsonl/csv/tsv file into ``prompt, input, response, references, source_file, source_row``.

    The response field may be a string (one reference) or a list of references (SciTLDR); ``response`` is the
    first. For summarization the prompt field is the document; a list of sentences is joined with a space.
    Null prompts/responses and empty reference lists are kept (``validate_generation`` reports them with their
    row); wrong types raise DataError naming the file, line/record and field.
    """
    task = check_task(task)
    path = Path(path)
    fmt = infer_format(path, fmt)
    text = read_text(path)
    if fmt in ("tsv", "csv"):
        return _load_delimited_generation(path, text, columns, task, fmt, header)
    return _load_json_generation(path, text, columns, task, fmt)


def load_generation_hub(
    dataset_id: str,
    *,
    columns: GenerationColumns,
    task: Literal["instruction", "summarization"],
    split: str,
    config: str | None = None,
    revision: str | None = None,
) -> pd.DataFrame:
    """One split of a Hugging Face Hub dataset (network or local HF cache) in the ``load_generation_table`` shape;
    ``source_file`` is ``hf://<dataset_id>/<split>`` and ``source_row`` the 1-based row. DataError when offline."""
    task = check_task(task)
    column_map = ColumnMap(text=columns.prompt, label=columns.response, text_pair=columns.input)
    try:
        raw = load_hub(dataset_id, columns=column_map, split=split, config=config, revision=revision)
    except DataError as err:
        raise _renamed(err, {"text": "prompt", "label": "response", "text_pair": "input"}) from err.__cause__
    source = f"hf://{dataset_id}/{split}"
    pairs = raw["text_pair"] if "text_pair" in raw else [None] * len(raw)
    rows = [
        _normalise_row(f"{source}: row {row}", columns, task, prompt, pair, response)
        for prompt, response, pair, row in zip(raw["text"], raw["label"], pairs, raw["source_row"])
    ]
    return _generation_frame(rows, source, [int(v) for v in raw["source_row"]])
