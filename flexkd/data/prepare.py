"""Turn validated raw tables into the prepared dataset: train / validation / test jsonl, label map, manifest.

Same inputs and seed give byte-identical files, so DVC sees no change when nothing changed.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from flexkd.errors import ConfigError, DataError
from flexkd.provenance import atomic_write_text, sha256_file, sha256_files

SPLITS = ("train", "validation", "test")
LABEL_MAP_FILE = "label_map.json"
MANIFEST_FILE = "manifest.json"


def split_path(out_dir: Path, split: str) -> Path:
    """Where a prepared split lives: ``<out_dir>/<split>.jsonl``."""
    return out_dir / f"{split}.jsonl"


def _allocate(counts: dict, total: int) -> dict:
    """Split ``total`` over groups in proportion to ``counts`` (largest remainder; ties by group order)."""
    size = sum(counts.values())
    exact = {key: total * n / size for key, n in counts.items()}
    alloc = {key: min(int(np.floor(value)), counts[key]) for key, value in exact.items()}
    remaining = total - sum(alloc.values())
    order = sorted(counts, key=lambda key: (-(exact[key] - np.floor(exact[key])), list(counts).index(key)))
    while remaining > 0:
        progressed = False
        for key in order:
            if remaining and alloc[key] < counts[key]:
                alloc[key] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break
    return alloc


def label_groups(labels: pd.Series) -> dict[str, np.ndarray]:
    """The positions of each label's rows, labels in sorted order."""
    return {str(key): np.asarray(positions) for key, positions in
            sorted(labels.groupby(labels, sort=False).indices.items(), key=lambda kv: str(kv[0]))}


def allocate_per_label(groups: dict[str, np.ndarray], n: int) -> dict[str, int]:
    """How many of ``n`` rows each label gets, in proportion to its rows."""
    return _allocate({key: len(pos) for key, pos in groups.items()}, n)


def _stratified_pick(labels: pd.Series, n: int, rng: np.random.Generator) -> np.ndarray:
    """Positions (sorted) of ``n`` rows drawn per label in proportion to the label counts."""
    groups = label_groups(labels)
    alloc = allocate_per_label(groups, n)
    picked = [rng.permutation(groups[key])[: alloc[key]] for key in groups]
    return np.sort(np.concatenate(picked)) if picked else np.array([], dtype=int)


def validation_count(size, n_rows: int) -> int:
    """Rows to hold out for validation: ``size`` rows (int) or that fraction of ``n_rows`` (float), leaving at
    least one training row; ConfigError otherwise."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise ConfigError(f"validation_size must be an int (rows) or a float (fraction), got {size!r}")
    if isinstance(size, float):
        if not 0.0 <= size < 1.0:
            raise ConfigError(f"validation_size as a fraction must be in [0, 1), got {size}")
        count = int(round(size * n_rows))
    else:
        count = size
    if not 0 <= count < n_rows:
        raise ConfigError(
            f"validation_size={size} asks for {count} validation rows but train has {n_rows} rows after "
            f"removing duplicates; it must leave at least one training row"
        )
    return count


def _label_ids(frame: pd.DataFrame, label_map: dict[str, int], split: str) -> list[int]:
    ids = []
    for label, file, row in zip(frame["label"], frame["source_file"], frame["source_row"]):
        key = str(label.item() if hasattr(label, "item") else label)
        if key not in label_map:
            raise DataError(
                f"{file}: line/record {row} ({split}) has label {key!r}, which is not in the label map "
                f"{sorted(label_map)}"
            )
        ids.append(label_map[key])
    return ids


def _write_split(path: Path, frame: pd.DataFrame, ids: list[int]) -> None:
    pairs = list(frame["text_pair"]) if "text_pair" in frame.columns else None
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for i, (text, row) in enumerate(zip(frame["text"], frame["source_row"])):
            record = {"text": text}
            if pairs is not None:
                record["text_pair"] = pairs[i]
            record["label"] = int(ids[i])
            record["source_row"] = int(row)
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_json(path: Path, payload) -> None:
    """A prepared dataset's JSON file (manifest, label map): indented, non-ASCII kept, written atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def manifest_sources(frames: list[pd.DataFrame]) -> list[dict]:
    """The source files of the rows, with their sha256: recorded in the raw snapshot (``attrs``, so the same
    wherever the snapshot was pulled to), else hashed from the file when it is here."""
    known = {k: v for frame in frames for k, v in frame.attrs.get("source_sha256", {}).items()}
    out = []
    for name in sorted({str(f) for frame in frames for f in frame["source_file"].unique()}):
        entry = {"path": name}
        if name in known:
            entry["sha256"] = known[name]
        elif os.path.isfile(name):
            entry["sha256"] = sha256_file(name)
        out.append(entry)
    return out


def _subsample(frame: pd.DataFrame, limit: int | None, rng: np.random.Generator, name: str) -> pd.DataFrame:
    if limit is None or limit >= len(frame):
        return frame
    if limit < 1:
        raise ConfigError(f"{name} must be >= 1 or null, got {limit}")
    keep = _stratified_pick(frame["label"].astype(str), limit, rng)
    return frame.iloc[keep].reset_index(drop=True)


def prepare_classification(
    train: pd.DataFrame,
    test: pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    label_map: dict[str, int],
    validation_size: int | float,
    max_train: int | None,
    max_test: int | None,
    seed: int,
    validation_from: str = "rows",
) -> dict:
    """Dedupe train, hold out a stratified validation split (``validation_from``: random rows, or whole texts with
    their phrases dropped from train, :mod:`flexkd.data.holdout`), subsample, map labels to ids and write
    ``train/validation/test.jsonl``, ``label_map.json`` and ``manifest.json`` into ``out_dir``.

    Rows keep their raw-file order within each split. Returns the manifest.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    key_columns = ["text", "text_pair"] if "text_pair" in train.columns else ["text"]
    deduped = train.drop_duplicates(subset=key_columns, keep="first").reset_index(drop=True)
    dropped = len(train) - len(deduped)

    n_val = validation_count(validation_size, len(deduped))
    spans = np.array([], dtype=int)
    if validation_from == "whole_texts":
        from flexkd.data.holdout import whole_text_holdout

        val_pos, spans = whole_text_holdout(deduped["text"], deduped["label"].astype(str), n_val, rng)
    else:
        val_pos = _stratified_pick(deduped["label"].astype(str), n_val, rng)
    is_val = np.zeros(len(deduped), dtype=bool)
    is_val[val_pos] = True
    is_span = np.zeros(len(deduped), dtype=bool)
    is_span[spans] = True
    splits = {
        "train": deduped[~is_val & ~is_span].reset_index(drop=True),
        "validation": deduped[is_val].reset_index(drop=True),
        "test": test.reset_index(drop=True),
    }
    splits["train"] = _subsample(splits["train"], max_train, rng, "max_train")
    splits["test"] = _subsample(splits["test"], max_test, rng, "max_test")

    id_to_label = {str(i): key for key, i in sorted(label_map.items(), key=lambda kv: kv[1])}
    manifest = {
        "format": "classification",
        "rows": {},
        "sha256": {},
        "label_distribution": {},
        "seed": seed,
        "validation_size": validation_size,
        "max_train": max_train,
        "max_test": max_test,
        "dropped_duplicate_train_rows": dropped,
        **({"validation_from": validation_from, "dropped_validation_span_rows": int(is_span.sum())}
           if validation_from != "rows" else {}),
        "num_labels": len(label_map),
        "sources": {"train": manifest_sources([train]), "test": manifest_sources([test])},
    }
    for split in SPLITS:
        frame = splits[split]
        ids = _label_ids(frame, label_map, split)
        path = split_path(out_dir, split)
        _write_split(path, frame, ids)
        counts = Counter(ids)
        manifest["rows"][split] = len(frame)
        manifest["sha256"][split] = sha256_file(path)
        manifest["label_distribution"][split] = {id_to_label[str(i)]: counts.get(i, 0) for i in sorted(label_map.values())}
    write_json(out_dir / LABEL_MAP_FILE, {"label_to_id": dict(label_map), "id_to_label": id_to_label})
    manifest["fingerprint"] = split_fingerprint(out_dir)
    write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest


def load_split(path: str | os.PathLike) -> list[dict]:
    """Records of one prepared split file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prepared split not found (run the prepare stage)")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: invalid JSON on line {number}: {err.msg}") from None
    return records


def load_label_map(directory: str | os.PathLike) -> dict[str, int]:
    """``label_to_id`` of a prepared dataset directory."""
    path = Path(directory) / LABEL_MAP_FILE
    if not path.is_file():
        raise DataError(f"{path}: label map not found (run the prepare stage)")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        return {str(k): int(v) for k, v in payload["label_to_id"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: not a label map ({type(err).__name__}: {err})") from None


def split_fingerprint(directory: str | os.PathLike) -> str:
    """One sha256 over train/validation/test.jsonl of a prepared dataset directory."""
    directory = Path(directory)
    paths = [split_path(directory, split) for split in SPLITS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"prepared split file(s) missing: {missing}")
    return sha256_files(paths)
