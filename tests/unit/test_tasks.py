"""The task adapters' own logic: held-out test splits, dropping rows that validation tolerated, layer choice."""

from pathlib import Path

import pandas as pd
import pytest
import yaml

from flexkd.config import parse_config
from flexkd.data.raw_splits import drop_invalid_rows, hold_out_test
from flexkd.errors import ConfigError
from flexkd.tasks import ClassificationTask, evenly_spaced_layers, task_for

REPO = Path(__file__).resolve().parents[2]


def cfg(**data):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(data)
    return parse_config(raw)


def frame(texts, labels=None):
    return pd.DataFrame({"text": texts, "label": labels or [i % 2 for i in range(len(texts))],
                         "source_file": "f.tsv", "source_row": list(range(2, len(texts) + 2))})


def test_evenly_spaced_layers_keep_first_and_last():
    assert evenly_spaced_layers(6, 4) == [0, 2, 3, 5]
    assert evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced_layers(6, 1) == [5] and evenly_spaced_layers(6, 6) == list(range(6))
    with pytest.raises(ConfigError, match="num_layers=7"):
        evenly_spaced_layers(6, 7)


def test_hold_out_test_is_seeded_and_shares_no_text():
    c = cfg(test_file=None, test_size=3)
    texts = ["a", "b", "c", "a", "d", "e", "f", "g"]
    first = hold_out_test({"train": frame(texts)}, c.data, seed=1, keys=["text"])
    again = hold_out_test({"train": frame(texts)}, c.data, seed=1, keys=["text"])
    assert first["test"]["text"].tolist() == again["test"]["text"].tolist()
    assert first["test"]["text"].nunique() == 3
    assert not set(first["test"]["text"]) & set(first["train"]["text"])  # both "a" rows go to the same side
    assert len(first["train"]) + len(first["test"]) == len(texts)


def test_drop_invalid_rows_reports_source_lines():
    kept, dropped = drop_invalid_rows(frame(["fine", "  ", None, "x" * 50, "ok"]), ["text"], 1, 20)
    assert kept["text"].tolist() == ["fine", "ok"] and dropped == [3, 4, 5]


def test_prepare_drops_tolerated_rows_and_overlapping_test_rows(tmp_path):
    c = cfg(validation_size=2, max_train=None)
    task = ClassificationTask(c.model_copy(update={"validation": c.validation.model_copy(update={"max_invalid_rate": 0.2})}))
    train = frame(["one", "two", "three", "  ", "four", "five", "six", "seven"])
    test = frame(["two", "nine", "ten"])
    manifest = task.prepare({"train": train, "test": test}, tmp_path)
    assert manifest["dropped_invalid_rows"] == {"train": [5], "test": [2]}
    assert manifest["rows"]["test"] == 2 and manifest["rows"]["train"] + manifest["rows"]["validation"] == 7
    assert task_for(c).relevance_task == "classification"
