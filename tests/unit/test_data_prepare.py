"""Preparing train / validation / test: determinism, dedupe, no leakage into validation, stratification, ids."""

from __future__ import annotations

import json
from collections import Counter

import pandas as pd
import pytest

from flexkd.data import (
    ColumnMap,
    build_label_map,
    load_label_map,
    load_split,
    load_table,
    prepare_classification,
    split_fingerprint,
)
from flexkd.errors import ConfigError, DataError
from flexkd.provenance import sha256_file

FILES = ("train.jsonl", "validation.jsonl", "test.jsonl", "label_map.json", "manifest.json")


def _table(texts, labels, file="raw.tsv", pairs=None) -> pd.DataFrame:
    frame = pd.DataFrame({"text": texts, "label": labels})
    if pairs is not None:
        frame["text_pair"] = pairs
    frame["source_file"] = file
    frame["source_row"] = range(2, len(frame) + 2)
    return frame


@pytest.fixture
def imbalanced(tmp_path) -> tuple[pd.DataFrame, pd.DataFrame]:
    # 300 "pos", 100 "neg" (string labels), plus 20 exact duplicates of earlier rows.
    texts = [f"sentence number {i}" for i in range(400)]
    labels = ["pos" if i % 4 else "neg" for i in range(400)]
    texts += texts[:20]
    labels += labels[:20]
    train = _table(texts, labels, file=str(tmp_path / "train.tsv"))
    test = _table([f"test sentence {i}" for i in range(80)], ["pos" if i % 2 else "neg" for i in range(80)])
    return train, test


def _prepare(train, test, out, **overrides):
    kwargs = dict(
        label_map=build_label_map(train["label"]), validation_size=0.25, max_train=None, max_test=None, seed=13
    )
    kwargs.update(overrides)
    return prepare_classification(train, test, out, **kwargs)


def test_same_inputs_and_seed_give_byte_identical_files(tmp_path, imbalanced):
    train, test = imbalanced
    _prepare(train, test, tmp_path / "a", max_train=200, max_test=50)
    _prepare(train, test, tmp_path / "b", max_train=200, max_test=50)
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    _prepare(train, test, tmp_path / "c", seed=14, max_train=200, max_test=50)
    assert (tmp_path / "a" / "validation.jsonl").read_bytes() != (tmp_path / "c" / "validation.jsonl").read_bytes()
    assert split_fingerprint(tmp_path / "a") == split_fingerprint(tmp_path / "b") != split_fingerprint(tmp_path / "c")


def test_dedupe_no_overlap_and_stratified_validation(tmp_path, imbalanced):
    train, test = imbalanced
    manifest = _prepare(train, test, tmp_path)
    rows = {split: load_split(tmp_path / f"{split}.jsonl") for split in ("train", "validation", "test")}
    assert manifest["dropped_duplicate_train_rows"] == 20
    assert manifest["rows"] == {"train": 300, "validation": 100, "test": 80}
    train_texts = [r["text"] for r in rows["train"]]
    assert len(train_texts) == len(set(train_texts))
    assert not set(train_texts) & {r["text"] for r in rows["validation"]}
    label_map = load_label_map(tmp_path)
    assert label_map == {"neg": 0, "pos": 1}
    # 25% neg in the raw data: exactly 25 of 100 validation rows with largest-remainder allocation.
    assert Counter(r["label"] for r in rows["validation"]) == {1: 75, 0: 25}
    assert manifest["label_distribution"]["validation"] == {"neg": 25, "pos": 75}
    assert manifest["label_distribution"]["train"] == {"neg": 75, "pos": 225}


def test_records_map_labels_to_ids_and_keep_source_rows(tmp_path, imbalanced):
    train, test = imbalanced
    _prepare(train, test, tmp_path, validation_size=40)
    first = train.drop_duplicates("text", keep="first")  # duplicates keep their first occurrence
    by_text = dict(zip(first["text"], zip(first["label"], first["source_row"])))
    for record in load_split(tmp_path / "train.jsonl"):
        raw_label, raw_row = by_text[record["text"]]
        assert record["label"] == {"neg": 0, "pos": 1}[raw_label]
        assert record["source_row"] == raw_row
        assert set(record) == {"text", "label", "source_row"}
    label_file = json.loads((tmp_path / "label_map.json").read_text())
    assert label_file == {"label_to_id": {"neg": 0, "pos": 1}, "id_to_label": {"0": "neg", "1": "pos"}}


def test_subsampling_is_stratified(tmp_path, imbalanced):
    train, test = imbalanced
    manifest = _prepare(train, test, tmp_path, validation_size=100, max_train=100, max_test=20)
    assert manifest["rows"] == {"train": 100, "validation": 100, "test": 20}
    assert manifest["label_distribution"]["train"] == {"neg": 25, "pos": 75}
    assert manifest["label_distribution"]["test"] == {"neg": 10, "pos": 10}


def test_manifest_hashes_and_sources(tmp_path, imbalanced):
    train, test = imbalanced
    manifest = _prepare(train, test, tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest
    for split in ("train", "validation", "test"):
        assert manifest["sha256"][split] == sha256_file(tmp_path / "out" / f"{split}.jsonl")
    assert manifest["seed"] == 13 and manifest["fingerprint"] == split_fingerprint(tmp_path / "out")
    assert manifest["sources"]["train"] == [{"path": str(tmp_path / "train.tsv")}]  # not a real file: no hash


def test_sentence_pairs_keep_text_pair_and_dedupe_on_both(tmp_path):
    train = _table(
        ["p1", "p1", "p1", "p2", "p3", "p4"],
        [0, 1, 1, 2, 0, 1],
        pairs=["h1", "h2", "h2", "h1", "h3", "h4"],  # row 3 duplicates row 2; rows 1/2 share the premise only
    )
    test = _table(["t1", "t2"], [0, 2], pairs=["u1", "u2"])
    manifest = _prepare(train, test, tmp_path, label_map={"0": 0, "1": 1, "2": 2}, validation_size=0)
    assert manifest["dropped_duplicate_train_rows"] == 1
    records = load_split(tmp_path / "train.jsonl")
    assert [(r["text"], r["text_pair"], r["label"]) for r in records] == [
        ("p1", "h1", 0), ("p1", "h2", 1), ("p2", "h1", 2), ("p3", "h3", 0), ("p4", "h4", 1)
    ]


def test_unknown_label_and_bad_sizes(tmp_path, imbalanced):
    train, test = imbalanced
    with pytest.raises(DataError, match=r"label 'neg'.*not in the label map"):
        _prepare(train, test, tmp_path / "x", label_map={"pos": 0, "other": 1})
    with pytest.raises(ConfigError, match="validation_size"):
        _prepare(train, test, tmp_path / "y", validation_size=400)
    with pytest.raises(ConfigError, match="validation_size"):
        _prepare(train, test, tmp_path / "z", validation_size=1.5)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="train.jsonl: prepared split not found"):
        load_split(tmp_path / "train.jsonl")
    with pytest.raises(DataError, match="label_map.json: label map not found"):
        load_label_map(tmp_path)
    with pytest.raises(DataError, match="missing"):
        split_fingerprint(tmp_path)


def test_real_sst2_sample(tmp_path, data_dir):
    columns = ColumnMap("sentence", "label")
    train = load_table(data_dir / "glue" / "SST-2" / "train.tsv", columns=columns).head(600)
    test = load_table(data_dir / "glue" / "SST-2" / "dev.tsv", columns=columns)
    manifest = _prepare(train, test, tmp_path, validation_size=100, max_train=300, max_test=200)
    assert manifest["rows"] == {"train": 300, "validation": 100, "test": 200}
    assert manifest["sources"]["test"][0]["sha256"] == sha256_file(data_dir / "glue" / "SST-2" / "dev.tsv")
    first = load_split(tmp_path / "test.jsonl")[0]
    raw_line = (data_dir / "glue" / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[first["source_row"] - 1]
    assert raw_line.split("\t")[0] == first["text"]


def _phrase_tree(n_sentences: int) -> pd.DataFrame:
    """SST-2-like rows: each sentence of 6 words with every run of its words as a row, all of the sentence's label."""
    texts, labels = [], []
    for s in range(n_sentences):
        words = [f"s{s}w{j}" for j in range(6)] if s % 3 else ["the", "film", f"s{s}", "is", "very", "good"]
        for i in range(6):
            for j in range(i + 1, 7):
                texts.append(" ".join(words[i:j]))
                labels.append("pos" if s % 2 else "neg")
    return _table(texts, labels)


def _span_of(text: str, other: str) -> bool:
    return f" {text} " in f" {other} "


def test_whole_texts_hold_out_sentences_and_drop_their_phrases_from_train(tmp_path):
    train = _phrase_tree(12)
    test = _table([f"test sentence {i}" for i in range(10)], ["pos" if i % 2 else "neg" for i in range(10)])
    deduped = train.drop_duplicates(subset=["text"])
    manifest = _prepare(train, test, tmp_path / "w", validation_size=4, validation_from="whole_texts")
    train_rows, val_rows = load_split(tmp_path / "w" / "train.jsonl"), load_split(tmp_path / "w" / "validation.jsonl")
    val_texts = [r["text"] for r in val_rows]
    # validation: whole sentences (no other row contains them), two of each label
    assert len(val_texts) == 4 and all(len(t.split()) == 6 for t in val_texts)
    assert Counter(r["label"] for r in val_rows) == Counter({0: 2, 1: 2})
    # nothing in train is a phrase of a validation sentence, and no validation sentence is inside a training row
    assert not any(_span_of(t["text"], v) or _span_of(v, t["text"]) for t in train_rows for v in val_texts)
    # what was dropped is exactly those phrases; every other row stays
    assert manifest["validation_from"] == "whole_texts"
    assert manifest["rows"]["train"] + 4 + manifest["dropped_validation_span_rows"] == len(deduped)
    assert manifest["dropped_validation_span_rows"] == sum(
        any(_span_of(t, v) for v in val_texts) for t in deduped["text"] if t not in val_texts)
    # random rows (the default) leave most validation rows inside a training sentence: the leak whole_texts closes
    _prepare(train, test, tmp_path / "r", validation_size=40)
    rows_val = [r["text"] for r in load_split(tmp_path / "r" / "validation.jsonl")]
    rows_train = [r["text"] for r in load_split(tmp_path / "r" / "train.jsonl")]
    assert sum(any(_span_of(v, t) for t in rows_train) for v in rows_val) > 20
    # the same seed draws the same split
    _prepare(train, test, tmp_path / "w2", validation_size=4, validation_from="whole_texts")
    assert (tmp_path / "w" / "validation.jsonl").read_bytes() == (tmp_path / "w2" / "validation.jsonl").read_bytes()


def test_whole_texts_refuse_a_label_with_too_few_whole_texts(tmp_path):
    train = _phrase_tree(6)  # 3 whole sentences of each label
    test = _table(["a test", "b test"], ["pos", "neg"])
    with pytest.raises(ConfigError, match=r"label 'neg' has 3 texts that no other training row contains, and "
                                          r"data.validation_size asks for 4 of them; lower data.validation_size"):
        _prepare(train, test, tmp_path, validation_size=8, validation_from="whole_texts")
    assert not (tmp_path / "train.jsonl").exists()  # nothing half-written
