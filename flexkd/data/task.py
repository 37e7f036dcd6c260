"""From the ``data`` params to raw splits: the one place that turns configuration into data frames."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from flexkd.config import DataConfig, ValidationConfig
from flexkd.data.sources import ColumnMap, load_hub, load_table, resolve_data_dir
from flexkd.data.validation import ValidationSettings
from flexkd.provenance import sha256_file


def column_map(data: DataConfig) -> ColumnMap:
    return ColumnMap(text=data.columns.text, label=data.columns.label, text_pair=data.columns.text_pair)


def source_files(data: DataConfig) -> dict[str, Path]:
    """The local raw files of the train and test splits (source: local)."""
    root = resolve_data_dir(data.data_dir)
    return {"train": root / data.train_file, "test": root / data.test_file}


def load_raw_splits(data: DataConfig) -> dict[str, pd.DataFrame]:
    """``{"train": df, "test": df}`` with columns text, label[, text_pair], source_file, source_row."""
    columns = column_map(data)
    if data.source == "hub":
        return {
            "train": load_hub(data.hub_id, columns=columns, split=data.hub_train_split, config=data.hub_config),
            "test": load_hub(data.hub_id, columns=columns, split=data.hub_test_split, config=data.hub_config),
        }
    return {
        split: load_table(path, columns=columns, fmt=data.file_format, header=data.header)
        for split, path in source_files(data).items()
    }


def describe_sources(data: DataConfig, splits: dict[str, pd.DataFrame]) -> dict:
    """What the raw data was: file, sha256 and rows per split (hub: dataset id and split)."""
    out = {}
    if data.source == "hub":
        for split, name in (("train", data.hub_train_split), ("test", data.hub_test_split)):
            out[split] = {"hub_id": data.hub_id, "config": data.hub_config, "split": name, "rows": len(splits[split])}
        return out
    for split, path in source_files(data).items():
        out[split] = {"file": str(path), "sha256": sha256_file(path), "rows": len(splits[split])}
    return out


def validation_settings(data: DataConfig, validation: ValidationConfig) -> ValidationSettings:
    return ValidationSettings(
        allowed_labels=list(data.labels) if data.labels is not None else None,
        min_chars=validation.min_chars,
        max_chars=validation.max_chars,
        max_duplicate_rate=validation.max_duplicate_rate,
        check_overlap=validation.check_overlap,
        sample_rows=validation.sample_rows,
        require_text_pair=data.columns.text_pair is not None,
    )


def tokenized_split(prepared_dir: Path, split: str, tokenizer, max_length: int, limit: int | None = None) -> list[dict]:
    """Features of one prepared split (first ``limit`` rows if given), ready for PadCollator."""
    from flexkd.data.prepare import load_split
    from flexkd.data.tokenize import tokenize_classification

    records = load_split(Path(prepared_dir) / f"{split}.jsonl")
    if limit is not None:
        records = records[:limit]
    return tokenize_classification(records, tokenizer, max_length)
