"""Tokenise prepared classification records once; pad each batch only to its own longest row (dynamic padding).

``PadCollator`` is the project's one collator: classification batches use it as it is, and the generation
collators (``flexkd.data.generation.tokenize``) are its right- and left-padding forms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
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
    """Stack tokenised rows into a batch, padding token lists to the batch's longest row.

    Token lists become long tensors: ``input_ids`` padded with ``pad_token_id`` (None: 0), ``labels`` with -100 (no
    loss), any other list (attention_mask, token_type_ids) with 0; on the right, or on the left with ``left=True``
    (prompts for ``generate``: every prompt then ends at the last position). Integer fields (a class label,
    ``prompt_len``) become a long tensor; anything else (strings, reference lists) is passed through as a list.

    Why not transformers' DataCollatorWithPadding / DataCollatorForSeq2Seq: on the same rows they build the same
    tensors (tests/unit/test_data_collate.py), but they pad through ``tokenizer.pad``, which refuses a tokenizer
    without a pad token. Causal LMs such as GPT-2 and Llama have none; the generation collators pad them with the
    end token without changing the tokenizer (it is saved with every checkpoint). They also need a tokenizer object
    (tests and benchmarks collate rows of ids alone) and cannot pass a string field through.
    """

    def __init__(self, pad_token_id: int | None = 0, *, left: bool = False):
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else 0)
        self.left = bool(left)

    def __call__(self, features: list[dict]) -> dict:
        if not features:
            raise ValueError("cannot collate an empty batch")
        longest = max(len(f["input_ids"]) for f in features)
        batch: dict = {}
        for key in features[0]:
            values = [f[key] for f in features]
            if isinstance(values[0], (list, tuple)):
                pad = self.pad_token_id if key == "input_ids" else (-100 if key == "labels" else 0)
                rows = []
                for value in values:
                    filler = [pad] * (longest - len(value))
                    rows.append(filler + list(value) if self.left else list(value) + filler)
                batch[key] = torch.tensor(rows, dtype=torch.long)
            elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
                batch[key] = torch.tensor([int(v) for v in values], dtype=torch.long)
            else:
                batch[key] = values  # strings, references: passed through as a list
        return batch
