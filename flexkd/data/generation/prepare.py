"""Turn validated raw generation tables into the prepared dataset: train / validation / test jsonl and a manifest.

Same inputs and seed give byte-identical files, so DVC sees no change when nothing changed. Read the splits back
with ``flexkd.data.load_split``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from flexkd.data.generation.sources import check_task
from flexkd.data.prepare import (
    MANIFEST_FILE,
    SPLITS,
    manifest_sources,
    split_fingerprint,
    split_path,
    validation_count,
    write_json,
)
from flexkd.errors import ConfigError, DataError
from flexkd.provenance import sha256_file


def _records(frame: pd.DataFrame) -> list[dict]:
    return [
        {
            "prompt": prompt,
            "input": "" if extra is None else extra,
            "response": response,
            "references": list(references),
            "source_row": int(row),
        }
        for prompt, extra, response, references, row in zip(
            frame["prompt"], frame["input"], frame["response"], frame["references"], frame["source_row"]
        )
    ]


def _write_records(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _pick(n_rows: int, count: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.permutation(n_rows)[:count])


def _subsample(frame: pd.DataFrame, limit: int | None, rng: np.random.Generator, name: str) -> pd.DataFrame:
    if limit is None or limit >= len(frame):
        return frame
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"{name} must be an int >= 1 or null, got {limit!r}")
    return frame.iloc[_pick(len(frame), limit, rng)].reset_index(drop=True)


def _require_columns(frame: pd.DataFrame, name: str) -> None:
    missing = [c for c in ("prompt", "input", "response", "references", "source_row") if c not in frame.columns]
    if missing:
        raise DataError(f"{name} table lacks column(s) {missing} (load it with load_generation_table)")


def prepare_generation(
    train: pd.DataFrame,
    test: pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    task: Literal["instruction", "summarization"],
    validation_size: int | float,
    max_train: int | None,
    max_test: int | None,
    seed: int,
) -> dict:
    """Drop duplicate (prompt, input) train rows, hold out a seeded validation split, subsample, and write
    ``train/validation/test.jsonl`` (records ``prompt, input, response, references, source_row``) and
    ``manifest.json`` into ``out_dir``. Rows keep their raw-file order. Same inputs and seed → byte-identical files.
    Returns the manifest."""
    task = check_task(task)
    _require_columns(train, "train")
    _require_columns(test, "test")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    deduped = train.drop_duplicates(subset=["prompt", "input"], keep="first").reset_index(drop=True)
    dropped = len(train) - len(deduped)
    n_val = validation_count(validation_size, len(deduped))
    is_val = np.zeros(len(deduped), dtype=bool)
    is_val[_pick(len(deduped), n_val, rng)] = True
    splits = {
        "train": deduped[~is_val].reset_index(drop=True),
        "validation": deduped[is_val].reset_index(drop=True),
        "test": test.reset_index(drop=True),
    }
    splits["train"] = _subsample(splits["train"], max_train, rng, "max_train")
    splits["test"] = _subsample(splits["test"], max_test, rng, "max_test")

    manifest = {
        "format": "generation",
        "task": task,
        "rows": {},
        "sha256": {},
        "references_per_row": {},
        "seed": seed,
        "validation_size": validation_size,
        "max_train": max_train,
        "max_test": max_test,
        "dropped_duplicate_train_rows": dropped,
        "sources": {"train": manifest_sources([train]), "test": manifest_sources([test])},
    }
    for split in SPLITS:
        records = _records(splits[split])
        path = split_path(out_dir, split)
        _write_records(path, records)
        counts = [len(r["references"]) for r in records]
        manifest["rows"][split] = len(records)
        manifest["sha256"][split] = sha256_file(path)
        manifest["references_per_row"][split] = {"min": min(counts), "max": max(counts)} if counts else None
    manifest["fingerprint"] = split_fingerprint(out_dir)
    write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest
