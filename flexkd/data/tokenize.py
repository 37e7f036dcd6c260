"""Tokenise prepared records once; pad each batch only to its own longest row (dynamic padding)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def tokenize_classification(records: Sequence[dict], tokenizer, max_length: int) -> list[dict]:
    """Records ``{"text", ["text_pair"], "label"}`` → features with input_ids, attention_mask, [token_type_ids], labels."""
    texts = [r["text"] for r in records]
    pairs = [r["text_pair"] for r in records] if records and "text_pair" in records[0] else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False)
    features = []
    for i, record in enumerate(records):
        row = {key: encoded[key][i] for key in encoded.keys()}
        row["labels"] = int(record["label"])
        features.append(row)
    return features


def tokenized_split(prepared_dir: Path, split: str, tokenizer, max_length: int, limit: int | None = None) -> list[dict]:
    """Features of one prepared split (first ``limit`` rows if given), ready for PadCollator."""
    from flexkd.data.prepare import load_split

    records = load_split(Path(prepared_dir) / f"{split}.jsonl")
    if limit is not None:
        records = records[:limit]
    return tokenize_classification(records, tokenizer, max_length)


class PadCollator:
    """Stack features into tensors, right-padding token fields to the batch's longest sequence."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else 0)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        batch: dict[str, torch.Tensor] = {}
        for key in features[0]:
            if key == "labels" and not isinstance(features[0][key], list):
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
                continue
            pad = self.pad_token_id if key == "input_ids" else (-100 if key == "labels" else 0)
            batch[key] = torch.tensor([list(f[key]) + [pad] * (longest - len(f[key])) for f in features], dtype=torch.long)
        return batch
