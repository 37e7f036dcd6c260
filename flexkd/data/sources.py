"""Read raw classification data (local tsv/csv/json/jsonl files, or the Hugging Face Hub) into one table shape.

Every loader returns a DataFrame with columns ``text``, ``label`` (``text_pair`` when mapped), ``source_file``
and ``source_row``. ``source_row`` is the line a user opens in an editor (tsv/csv: counting the header line;
jsonl: the line of the record) or the 1-based record number (json), so that every later error or validation
failure can point at the exact place in the raw file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from flexkd.errors import DataError

FORMATS = ("tsv", "csv", "jsonl", "json")
_EXTENSIONS = {".tsv": "tsv", ".tab": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
_INT_RE = re.compile(r"^[+-]?\d+$")


# --------------------------------------------------------------------------------------------- data dir
def resolve_data_dir(configured: str | os.PathLike | None = None) -> Path:
    """Where the raw datasets live: ``configured`` (param ``data.data_dir``), else env ``FLEXKD_DATA_DIR``,
    else ``../shared/datasets`` from the working directory, else ``../shared/datasets`` from the repo root."""
    import flexkd

    if configured:
        candidates = [("data.data_dir", Path(configured).expanduser())]
    elif os.environ.get("FLEXKD_DATA_DIR"):
        candidates = [("FLEXKD_DATA_DIR", Path(os.environ["FLEXKD_DATA_DIR"]).expanduser())]
    else:
        repo_root = Path(flexkd.__file__).resolve().parents[1]
        candidates = [
            ("working directory", Path.cwd() / ".." / "shared" / "datasets"),
            ("repository root", repo_root / ".." / "shared" / "datasets"),
        ]
    for _, path in candidates:
        if path.is_dir():
            return path.resolve()
    tried = "; ".join(f"{where}: {path}" for where, path in candidates)
    raise DataError(
        f"data directory not found (tried {tried}). Set the param data.data_dir or the env var "
        f"FLEXKD_DATA_DIR to the folder holding the raw datasets."
    )


# --------------------------------------------------------------------------------------------- columns
@dataclass(frozen=True)
class ColumnMap:
    """Which raw column holds what. Strings are header names; ints are 0-based positions (files without header)."""

    text: str | int
    label: str | int
    text_pair: str | int | None = None

    def items(self) -> list[tuple[str, str | int]]:
        out = [("text", self.text), ("label", self.label)]
        if self.text_pair is not None:
            out.append(("text_pair", self.text_pair))
        return out


def infer_format(path: Path, fmt: str | None) -> str:
    """``fmt`` checked against ``FORMATS``, or the format the file's extension names; DataError otherwise."""
    if fmt is not None:
        fmt = fmt.lower().lstrip(".")
        if fmt not in FORMATS:
            raise DataError(f"{path}: unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
        return fmt
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise DataError(
            f"{path}: cannot infer the format from the extension {suffix!r}; "
            f"pass fmt= one of {', '.join(FORMATS)}"
        )
    return _EXTENSIONS[suffix]


def read_text(path: Path) -> str:
    """The file's text (UTF-8, a BOM dropped); DataError for a missing, empty or non-UTF-8 file."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}: not valid UTF-8 at line {line}, column {column} (byte offset {err.start}: "
            f"{raw[err.start:err.start + 1]!r}); re-encode the file as UTF-8"
        ) from None


def _resolve_column(path: Path, role: str, key: str | int, names: list[str], header: bool) -> int:
    if isinstance(key, int) and not isinstance(key, bool):
        if 0 <= key < len(names):
            return key
        raise DataError(
            f"{path}: column position {key} (for {role}) does not exist; the file has {len(names)} "
            f"column(s){': ' + repr(names) if header else ''}"
        )
    if not header:
        raise DataError(
            f"{path}: column {key!r} (for {role}) is a name but the file is read without a header; "
            f"map columns by 0-based position"
        )
    if key in names:
        return names.index(key)
    hint = ""
    if len(names) == 1:
        hint = " (only one column was found: is the delimiter right? tsv files need fmt='tsv')"
    raise DataError(f"{path}: column {key!r} (for {role}) not found; columns found: {names!r}{hint}")


def _label_series(values: list) -> pd.Series:
    """Labels as read: all-integer text labels become ints, anything else stays as it is."""
    if values and all(isinstance(v, str) and _INT_RE.match(v.strip()) for v in values):
        return pd.Series([int(v) for v in values], dtype="int64")
    return pd.Series(values, dtype=object)


def _frame(path: Path, columns: ColumnMap, rows: list[tuple[int, dict]]) -> pd.DataFrame:
    data = {role: [record[role] for _, record in rows] for role, _ in columns.items()}
    frame = pd.DataFrame({role: pd.Series(values, dtype=object) for role, values in data.items()})
    frame["label"] = _label_series(data["label"])
    frame["source_file"] = str(path)
    frame["source_row"] = pd.Series([row for row, _ in rows], dtype="int64")
    return frame


def load_delimited(path: Path, text: str, columns: ColumnMap, fmt: str, header: bool) -> pd.DataFrame:
    """A tsv/csv text (of ``path``) as the ``load_table`` frame; ``source_row`` counts every line, blank ones and
    the header included. The generation loader reads its delimited files through this too."""
    if fmt == "tsv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for fields in reader:
            if fields:  # blank lines are skipped, but still counted in line numbers
                rows.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as err:
        raise DataError(f"{path}: cannot parse line {reader.line_num} as {fmt}: {err}") from None
    if header:
        names = [name.strip() for name in rows[0][1]]
        body = rows[1:]
    else:
        names = [f"column {i}" for i in range(len(rows[0][1]))]
        body = rows
    if not body:
        raise DataError(f"{path}: file has a header line but no data rows")
    positions = [(role, _resolve_column(path, role, key, names, header)) for role, key in columns.items()]
    records: list[tuple[int, dict]] = []
    for line, fields in body:
        if len(fields) != len(names):
            raise DataError(
                f"{path}: line {line} has {len(fields)} field(s), expected {len(names)} "
                f"({'as in the header' if header else 'as in the first line'}); "
                f"{'a stray tab' if fmt == 'tsv' else 'an unquoted comma or quote'} is the usual cause"
            )
        records.append((line, {role: fields[pos] for role, pos in positions}))
    return _frame(path, columns, records)


def json_records(path: Path, text: str, fmt: str) -> list[tuple[int, object]]:
    """``(number, record)`` of a json/jsonl text: the line number (jsonl, blank lines skipped) or the 1-based
    position in the list (json: a list, or an object whose ``data`` is one)."""
    if fmt == "jsonl":
        out = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: invalid JSON on line {number}, column {err.colno}: {err.msg}") from None
        return out
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON on line {err.lineno}, column {err.colno}: {err.msg}") from None
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        payload = payload["data"]
    if not isinstance(payload, list):
        raise DataError(f"{path}: expected a JSON list of records or an object {{\"data\": [...]}}")
    return [(number, record) for number, record in enumerate(payload, start=1)]


def _load_json(path: Path, text: str, columns: ColumnMap, fmt: str) -> pd.DataFrame:
    entries = json_records(path, text, fmt)
    if not entries:
        raise DataError(f"{path}: no records")
    where = "line" if fmt == "jsonl" else "record"
    first_keys = list(entries[0][1]) if isinstance(entries[0][1], dict) else []
    for role, key in columns.items():
        if not isinstance(key, str):
            raise DataError(f"{path}: column {key!r} (for {role}) must be a field name in {fmt} files")
        if not any(isinstance(rec, dict) and key in rec for _, rec in entries):
            raise DataError(f"{path}: column {key!r} (for {role}) not found; fields found: {first_keys!r}")
    records: list[tuple[int, dict]] = []
    for number, record in entries:
        if not isinstance(record, dict):
            raise DataError(f"{path}: {where} {number} is a {type(record).__name__}, expected a JSON object")
        row = {}
        for role, key in columns.items():
            if key not in record:
                raise DataError(f"{path}: {where} {number} has no field {key!r} (fields: {list(record)!r})")
            value = record[key]
            if role != "label" and value is not None and not isinstance(value, str):
                raise DataError(
                    f"{path}: {where} {number}: field {key!r} is a {type(value).__name__}, expected a string"
                )
            row[role] = value
        records.append((number, row))
    frame = _frame(path, columns, records)
    # JSON labels keep their own type (ints stay ints, strings stay strings).
    labels = [rec["label"] for _, rec in records]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        frame["label"] = pd.Series(labels, dtype="int64")
    else:
        frame["label"] = pd.Series(labels, dtype=object)
    return frame


def load_table(
    path: str | os.PathLike, *, columns: ColumnMap, fmt: str | None = None, header: bool = True
) -> pd.DataFrame:
    """Read a local tsv/csv/jsonl/json file into ``text, label[, text_pair], source_file, source_row``.

    TSV is read with quoting off (GLUE files contain bare ``"``); CSV with normal quoting. Without a header,
    ``columns`` holds 0-based positions. Labels are kept as they are (integer text becomes int).
    Raises DataError naming the file and line for anything that cannot be read as configured.
    """
    path = Path(path)
    fmt = infer_format(path, fmt)
    text = read_text(path)
    if fmt in ("tsv", "csv"):
        return load_delimited(path, text, columns, fmt, header)
    return _load_json(path, text, columns, fmt)


def load_hub(dataset_id: str, *, columns: ColumnMap, split: str, config: str | None = None,
             revision: str | None = None) -> pd.DataFrame:
    """Load one split of a Hugging Face Hub dataset (needs network, or the local HF cache) into the same shape
    as ``load_table``; ``source_file`` is ``hf://<dataset_id>/<split>`` and ``source_row`` the 1-based row."""
    try:
        import datasets

        dataset = datasets.load_dataset(dataset_id, config, split=split, revision=revision)
    except Exception as err:  # noqa: BLE001 - every failure becomes one readable DataError
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or os.environ.get(
            "HF_DATASETS_OFFLINE", ""
        ).lower() in ("1", "true", "yes", "on")
        hint = (
            " (offline mode is on: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and the dataset is not in the local "
            "cache; unset it, or use local files via data.data_dir)"
            if offline
            else ""
        )
        name = dataset_id if config is None else f"{dataset_id} (config {config!r})"
        raise DataError(f"cannot load Hub dataset {name}, split {split!r}{hint}: {type(err).__name__}: {err}") from err
    names = list(dataset.column_names)
    source = f"hf://{dataset_id}/{split}"
    selected = {}
    for role, key in columns.items():
        if isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < len(names):
                raise DataError(f"{source}: column position {key} (for {role}) does not exist; columns: {names!r}")
            key = names[key]
        elif key not in names:
            raise DataError(f"{source}: column {key!r} (for {role}) not found; columns found: {names!r}")
        selected[role] = dataset[key]
    frame = pd.DataFrame({role: pd.Series(values, dtype=object) for role, values in selected.items()})
    labels = selected["label"]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        frame["label"] = pd.Series(labels, dtype="int64")
    frame["source_file"] = source
    frame["source_row"] = pd.Series(range(1, len(frame) + 1), dtype="int64")
    return frame


# --------------------------------------------------------------------------------------------- labels
def _normalise_label(label) -> str:
    if hasattr(label, "item") and not isinstance(label, (str, bytes)):
        label = label.item()  # numpy scalars
    return str(label)


def _label_sort_key(key: str):
    if _INT_RE.match(key):
        return (0, int(key), key)
    return (1, 0, key)


def build_label_map(labels, declared: list | None = None) -> dict[str, int]:
    """``{str(label): id}``. In ``declared`` order when given (every seen label must be declared), otherwise
    sorted (integer labels numerically first, then strings). Needs at least two classes."""
    seen: list[str] = []
    seen_set: set[str] = set()
    for label in labels:
        if label is None or (isinstance(label, float) and label != label):
            raise DataError("a label is missing (null/NaN); every row needs a label")
        key = _normalise_label(label)
        if key not in seen_set:
            seen_set.add(key)
            seen.append(key)
    if declared is not None:
        keys = [_normalise_label(label) for label in declared]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise DataError(f"declared labels contain duplicates: {duplicates}")
        unknown = [k for k in seen if k not in keys]
        if unknown:
            raise DataError(f"label(s) {unknown} found in the data but not declared; declared labels: {keys}")
    else:
        keys = sorted(seen, key=_label_sort_key)
    if len(keys) < 2:
        raise DataError(f"a classification task needs at least 2 classes, found {len(keys)}: {keys}")
    return {key: index for index, key in enumerate(keys)}
