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
    columns = column_map(data)
    if data.source == "hub":
        splits = {"train": load_hub(data.hub_id, columns=columns, split=data.hub_train_split, config=data.hub_config)}
        if not data.test_size:
            splits["test"] = load_hub(data.hub_id, columns=columns, split=data.hub_test_split, config=data.hub_config)
        return splits
    splits = {
        split: load_table(path, columns=columns, fmt=data.file_format, header=data.header)
        for split, path in source_files(data).items()
    }
    return splits


def describe_sources(data: DataConfig, splits: dict[str, pd.DataFrame]) -> dict:
    """What the raw data was: file, sha256 and rows per split (hub: dataset id and split)."""
    out: dict = {"test_size": data.test_size} if data.test_size else {}
    if data.source == "hub":
        for split, name in (("train", data.hub_train_split), ("test", data.hub_test_split)):
            held_out = split == "test" and data.test_size
            out[split] = {"hub_id": data.hub_id, "config": data.hub_config, "rows": len(splits[split]),
                          "split": f"{data.hub_train_split} (held out)" if held_out else name}
        return out
    for split, path in source_files(data).items():
        out[split] = {"file": str(path), "sha256": sha256_file(path), "rows": len(splits[split])}
    if "test" not in out:
        out["test"] = {"held_out_from": "train", "rows": len(splits["test"])}
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


def tokenized_split(prepared_dir: Path, split: str, tokenizer, max_length: int, limit: int | None = None) -> list[dict]:
    """Features of one prepared split (first ``limit`` rows if given), ready for PadCollator."""
    from flexkd.data.prepare import load_split
    from flexkd.data.tokenize import tokenize_classification

    records = load_split(Path(prepared_dir) / f"{split}.jsonl")
    if limit is not None:
        records = records[:limit]
    return tokenize_classification(records, tokenizer, max_length)
