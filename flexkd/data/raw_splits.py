"""From the ``data`` params to raw splits: the one place that turns configuration into data frames.

Which source a run reads (local files or the Hugging Face Hub), loading it, the held-out test split, the raw
snapshot the validate stage stores (and prepare reads back), and the settings and row filter that validation and
prepare take from the params. The per-format steps that call these are the task adapters in ``flexkd.tasks``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from flexkd.config import DataConfig, ValidationConfig
from flexkd.data.sources import ColumnMap, load_hub, load_table, resolve_data_dir
from flexkd.data.validation import ValidationSettings
from flexkd.errors import DataError
from flexkd.provenance import sha256_file


def column_map(data: DataConfig) -> ColumnMap:
    return ColumnMap(text=data.columns.text, label=data.columns.label, text_pair=data.columns.text_pair)


_RESOLVED: dict[str, DataConfig] = {}


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def local_problem(data: DataConfig) -> str | None:
    """None when the local files are there; else what is missing, in words."""
    try:
        root = resolve_data_dir(data.data_dir)
    except DataError as err:
        return str(err)
    for key in ("train_file", "test_file"):
        name = getattr(data, key)
        if name and not (root / name).is_file():
            return f"data.{key} {root / name} does not exist"
    return None


def neither_source_error(data: DataConfig, local: str | None, hub: str | None) -> DataError:
    """The one error for a run that can reach neither the local files nor the Hub dataset: both places, and how to
    point at a local copy."""
    files = " and ".join(f for f in (data.train_file, data.test_file) if f) or "the data files"
    places = [f"the local files ({local})" if data.train_file else "no local files (data.train_file is not set)"]
    places.append(f"the Hugging Face Hub dataset {data.hub_id!r} ({hub})" if data.hub_id else
                  "no Hub dataset (data.hub_id is not set)")
    return DataError(
        f"no data for the task {data.task!r}: neither source can be reached: {places[0]}; {places[1]}. To use a local "
        f"copy, put {files} under a folder and set the param data.data_dir (or the env var FLEXKD_DATA_DIR) to it"
        + (f"; or give this machine network access to the Hub ({_hub_endpoint()}), without HF_HUB_OFFLINE set"
           if data.hub_id else "") + "."
    )


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_problem(hub_id: str, timeout_s: float = 5.0) -> str | None:
    """None when the Hub answers for ``hub_id`` within ``timeout_s``; else why not, in words.

    One request, no retries: the ``datasets`` library retries an unreachable Hub for half a minute before it
    fails, and a run with no network should stop in seconds."""
    import urllib.error
    import urllib.request

    url = f"{_hub_endpoint()}/api/datasets/{hub_id}"
    request = urllib.request.Request(url, method="GET", headers={"User-Agent": "flexkd"})
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return None
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return f"{url} answered {err.code}: a gated or private dataset; set HF_TOKEN"
        if err.code == 404:
            return f"{url} answered 404: no such dataset on the Hub (check data.hub_id)"
        return f"{url} answered {err.code}"
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return f"{url} is unreachable: {reason}"


def resolve_source(data: DataConfig) -> DataConfig:
    """``data`` with ``source`` decided (``local`` or ``hub``) and, for the Hub, ``columns`` = ``hub_columns``.

    ``auto`` with the param ``data.data_dir`` set means the files there. Otherwise it takes the local files when
    they are all there (``FLEXKD_DATA_DIR``, else ``../shared/datasets``), else the Hub dataset when ``hub_id`` is
    set and the Hub answers (or offline mode is on: then the local HF cache decides); otherwise one DataError
    names both places.
    The choice is made once per process and data config, so that every stage step sees the same source."""
    key = "\0".join([data.model_dump_json(), os.getcwd(), *(os.environ.get(k, "") for k in (
        "FLEXKD_DATA_DIR", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))])
    if key in _RESOLVED:
        return _RESOLVED[key]
    source = data.source
    if source == "auto" and data.data_dir and data.train_file:
        source = "local"  # the param names a place: its files are meant, and a missing one is named, not replaced
    if source == "auto":
        local = local_problem(data) if data.train_file else "data.train_file is not set"
        if local is None:
            source = "local"
        elif not data.hub_id:
            raise neither_source_error(data, local, None)
        else:
            hub = None if _offline() else hub_problem(data.hub_id)
            if hub is not None:
                raise neither_source_error(data, local, hub)
            source = "hub"
            print(f"data: the local files are not here ({local}); using the Hub dataset {data.hub_id}")
    update: dict = {"source": source}
    if source == "hub" and data.hub_columns is not None:
        update["columns"] = data.hub_columns
    resolved = data.model_copy(update=update)
    _RESOLVED[key] = resolved
    return resolved


def source_files(data: DataConfig) -> dict[str, Path]:
    """The local raw files of the train and test splits (source: local; test only when a test file is set)."""
    root = resolve_data_dir(data.data_dir)
    files = {"train": root / data.train_file}
    if data.test_file:
        files["test"] = root / data.test_file
    return files


def hold_out_test(splits: dict[str, pd.DataFrame], data: DataConfig, seed: int, keys: list[str]) -> dict[str, pd.DataFrame]:
    """When there is no test file: move ``data.test_size`` rows of train (seeded) into a test split.

    Rows whose ``keys`` (the text columns) repeat in train are held out or kept together, so the two splits
    share no text.
    """
    if "test" in splits and not data.test_size:
        return splits
    if not data.test_size:
        raise ValueError("no test split: set data.test_file or data.test_size")
    import numpy as np

    train = splits["train"]
    groups = train[keys].astype(str).agg("\u241f".join, axis=1)
    unique = groups.drop_duplicates()
    n_test = data.test_size if isinstance(data.test_size, int) else int(round(len(unique) * data.test_size))
    if not 0 < n_test < len(unique):
        from flexkd.errors import ConfigError

        raise ConfigError(f"data.test_size={data.test_size}: {n_test} of {len(unique)} distinct training rows cannot be held out")
    rng = np.random.default_rng(seed)
    test_keys = set(unique.iloc[np.sort(rng.choice(len(unique), size=n_test, replace=False))])
    is_test = groups.isin(test_keys)
    return {"train": train[~is_test].reset_index(drop=True), "test": train[is_test].reset_index(drop=True)}


def load_raw_splits(data: DataConfig) -> dict[str, pd.DataFrame]:
    """``{"train": df, "test": df}`` with columns text, label[, text_pair], source_file, source_row."""
    chosen_by_auto = data.source == "auto"
    data = resolve_source(data)
    columns = column_map(data)
    if data.source == "hub":
        names = {"train": data.hub_train_split, **({} if data.test_size else {"test": data.hub_test_split})}
        try:
            return {split: load_hub(data.hub_id, columns=columns, split=name, config=data.hub_config,
                                    revision=data.hub_revision) for split, name in names.items()}
        except DataError as err:
            if chosen_by_auto:
                raise neither_source_error(data, local_problem(data) if data.train_file else None, str(err)) from err
            raise
    splits = {
        split: load_table(path, columns=columns, fmt=data.file_format, header=data.header)
        for split, path in source_files(data).items()
    }
    return splits


def describe_sources(data: DataConfig, splits: dict[str, pd.DataFrame]) -> dict:
    """What the raw data was: file, sha256 and rows per split (hub: dataset id and split)."""
    data = resolve_source(data)
    out: dict = {"test_size": data.test_size} if data.test_size else {}
    out["source"] = data.source
    if data.source == "hub":
        for split, name in (("train", data.hub_train_split), ("test", data.hub_test_split)):
            held_out = split == "test" and data.test_size
            out[split] = {"hub_id": data.hub_id, "config": data.hub_config, "revision": data.hub_revision,
                          "rows": len(splits[split]),
                          "split": f"{data.hub_train_split} (held out)" if held_out else name}
        return out
    for split, path in source_files(data).items():
        out[split] = {"file": str(path), "sha256": sha256_file(path), "rows": len(splits[split])}
    if "test" not in out:
        out["test"] = {"held_out_from": "train", "rows": len(splits["test"])}
    return out


# ------------------------------------------------------------------------------------------ the raw snapshot
SNAPSHOT = "raw"  # under data/validated/<task>/: the rows the run read, one JSON object per line and split


def _plain(value):
    """A cell as JSON: numpy scalars as Python numbers, missing as null, lists (references) kept."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy scalars and arrays
        return _plain(value.tolist())
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value


def write_snapshot(splits: dict[str, pd.DataFrame], directory: Path) -> dict[str, dict]:
    """Store the raw splits a run read (whatever the source: local files or the Hub) as
    ``<directory>/raw/<split>.jsonl``, DVC-tracked with the validate stage's outputs, so that ``dvc pull`` brings
    back exactly these rows and the prepare stage reads them instead of the source. Returns, per split, the
    file (relative to ``directory``), its sha256 and its rows."""
    import json

    from flexkd.provenance import atomic_dir

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for split, frame in splits.items():
            columns = list(frame.columns)
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as handle:
                for row in frame.itertuples(index=False, name=None):
                    record = {column: _plain(value) for column, value in zip(columns, row)}
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    target = atomic_dir(Path(directory) / SNAPSHOT, write)  # the whole snapshot, or the previous one
    return {split: {"file": f"{SNAPSHOT}/{split}.jsonl", "sha256": sha256_file(target / f"{split}.jsonl"),
                    "rows": len(frame)} for split, frame in splits.items()}


def read_snapshot(directory: Path) -> dict[str, pd.DataFrame]:
    """The raw splits stored by :func:`write_snapshot` (``directory`` is data/validated/<task>), each frame
    carrying ``attrs["source_sha256"]``: the source files' hashes from ``sources.json``, so that a prepared
    manifest names them even where the source files are not (a pulled clone, another worker)."""
    import json

    from flexkd.project import read_json

    directory = Path(directory)
    sources_path = directory / "sources.json"
    if not sources_path.is_file() or "snapshot" not in (sources := read_json(sources_path)):
        raise DataError(f"{directory}: no raw snapshot (sources.json with a `snapshot` entry) - run the validate "
                        "stage (`dvc repro validate`) or fetch a finished run's outputs (`make pull`)")
    hashes = {entry["file"]: entry["sha256"] for entry in sources.values()
              if isinstance(entry, dict) and "file" in entry and "sha256" in entry}
    splits = {}
    for split, entry in sources["snapshot"].items():
        path = directory / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise DataError(f"{path}: the raw snapshot is {'missing' if not path.is_file() else 'not the one sources.json names'}"
                            " - run `dvc checkout` (or `make pull`) to restore it, or `dvc repro validate` to take it again")
        with open(path, encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        frame = pd.DataFrame.from_records(records) if records else pd.DataFrame()
        frame.attrs["source_sha256"] = dict(hashes)
        splits[split] = frame
    return splits


def snapshot_staleness(data: DataConfig, directory: Path) -> str | None:
    """Why the raw snapshot in ``directory`` no longer matches the local source files, or None.

    DVC cannot see the source (it lives outside the checkout, or on the Hub), so the pipeline asks this before
    ``dvc repro`` and reruns the validate stage when a local file it read has changed. Where the recorded source
    is not here (a pulled clone, a worker without the data), the snapshot stands: that is what it is for. A Hub
    source is pinned by ``data.hub_revision`` (a params change reruns the stage)."""
    from flexkd.project import read_json

    sources_path = Path(directory) / "sources.json"
    if not sources_path.is_file():
        return None
    recorded = read_json(sources_path)
    if recorded.get("source") != "local" or "snapshot" not in recorded:
        return None
    try:
        files = source_files(data)
    except (DataError, OSError):
        return None
    for split, path in files.items():
        entry = recorded.get(split) or {}
        if "sha256" in entry and path.is_file() and sha256_file(path) != entry["sha256"]:
            return f"{path} changed since the raw snapshot was taken (sha256 {entry['sha256'][:12]}...)"
    return None


def validation_settings(data: DataConfig, validation: ValidationConfig) -> ValidationSettings:
    return ValidationSettings(
        allowed_labels=list(data.labels) if data.labels is not None else None,
        min_chars=validation.min_chars,
        max_chars=validation.max_chars,
        max_duplicate_rate=validation.max_duplicate_rate,
        check_overlap=validation.check_overlap,
        sample_rows=validation.sample_rows,
        require_text_pair=data.columns.text_pair is not None,
        max_invalid_rate=validation.max_invalid_rate,
    )


def drop_invalid_rows(frame: pd.DataFrame, text_columns: list[str], min_chars: int, max_chars: int) -> tuple[pd.DataFrame, list[int]]:
    """Rows whose text columns are missing, blank or out of bounds (what validation tolerated under
    ``max_invalid_rate``) are dropped; returns the kept frame and the dropped rows' source line numbers."""
    bad = pd.Series(False, index=frame.index)
    for column in text_columns:
        if column not in frame.columns:
            continue
        values = frame[column]
        text = values.where(values.notna(), "").astype(str)
        stripped_len = text.str.strip().str.len()
        bad |= values.isna() | (stripped_len == 0) | (stripped_len < min_chars) | (text.str.len() > max_chars)
    dropped = [int(r) for r in frame.loc[bad, "source_row"]] if "source_row" in frame.columns else []
    return frame[~bad].reset_index(drop=True), dropped
