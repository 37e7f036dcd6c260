"""The Great Expectations suite catches each kind of bad row and the report points at split, file, column, line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from flexkd.data import (
    ColumnMap,
    ValidationSettings,
    load_table,
    raise_for_failures,
    validate_classification,
)
from flexkd.errors import ValidationFailed


def _write_tsv(path: Path, rows: list[tuple[str, object]]) -> Path:
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
    return path


def _load(path: Path) -> pd.DataFrame:
    return load_table(path, columns=ColumnMap("sentence", "label"))


CLEAN = [(f"a perfectly fine sentence number {i}", i % 2) for i in range(40)]


@pytest.fixture
def clean_test(tmp_path) -> pd.DataFrame:
    return _load(_write_tsv(tmp_path / "test.tsv", [(f"held out sentence {i}", i % 2) for i in range(10)]))


def _only_failure(report, expectation, split="train"):
    found = [f for f in report.failures if f["expectation"] == expectation and f["split"] == split]
    assert found, f"no {expectation} failure in {[(f['split'], f['expectation']) for f in report.failures]}"
    return found[0]


def _sample_rows(failure):
    return [sample["row"] for sample in failure["samples"]]


def test_clean_files_pass(tmp_path, clean_test):
    train = _load(_write_tsv(tmp_path / "train.tsv", CLEAN))
    report = validate_classification({"train": train, "test": clean_test}, ValidationSettings(allowed_labels=[0, 1]))
    assert report.success and report.failures == []
    assert report.statistics["train"]["evaluated"] == report.statistics["train"]["successful"] >= 7
    # the test split also gets the overlap expectation
    assert report.statistics["test"]["evaluated"] == report.statistics["train"]["evaluated"] + 1
    raise_for_failures(report)  # no exception
    assert report.to_markdown().startswith("# Data validation: PASS")


def test_empty_and_whitespace_only_text(tmp_path, clean_test):
    # lines: header=1, CLEAN 2..41, then 42 (empty), 43 (spaces)
    path = _write_tsv(tmp_path / "train.tsv", CLEAN + [("", 0), ("   ", 1)])
    report = validate_classification({"train": _load(path), "test": clean_test})
    assert not report.success
    blank = _only_failure(report, "expect_column_values_to_not_match_regex")
    assert blank["file"] == str(path) and blank["column"] == "text"
    assert _sample_rows(blank) == [42, 43] and blank["unexpected_count"] == 2
    too_short = _only_failure(report, "expect_column_value_lengths_to_be_between")
    assert _sample_rows(too_short) == [42]


def test_null_text_from_json(tmp_path, clean_test):
    path = tmp_path / "train.jsonl"
    records = [{"sentence": t, "label": y} for t, y in CLEAN[:10]] + [{"sentence": None, "label": 1}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    report = validate_classification({"train": _load(path), "test": clean_test})
    failure = _only_failure(report, "expect_column_values_to_not_be_null")
    assert failure["column"] == "text" and _sample_rows(failure) == [11] and failure["samples"][0]["value"] is None


def test_label_outside_allowed_set(tmp_path, clean_test):
    path = _write_tsv(tmp_path / "train.tsv", CLEAN[:20] + [("a sentence with label two", 2), ("another", "pos")])
    report = validate_classification({"train": _load(path), "test": clean_test}, ValidationSettings(allowed_labels=["0", 1]))
    failure = _only_failure(report, "expect_column_values_to_be_in_set")
    assert failure["column"] == "label" and failure["file"] == str(path)
    assert failure["samples"] == [{"row": 22, "value": "2"}, {"row": 23, "value": "pos"}]
    assert failure["kwargs"]["value_set"] == ["0", "1"]


def test_test_labels_must_be_seen_in_train_without_declared_set(tmp_path):
    train = _load(_write_tsv(tmp_path / "train.tsv", CLEAN[:10]))
    test = _load(_write_tsv(tmp_path / "test.tsv", [("fresh one", 0), ("fresh two", 7)]))
    report = validate_classification({"train": train, "test": test})
    failure = _only_failure(report, "expect_column_values_to_be_in_set", split="test")
    assert failure["samples"] == [{"row": 3, "value": "7"}]
    assert all(f["split"] == "test" for f in report.failures)


def test_too_long_text(tmp_path, clean_test):
    path = _write_tsv(tmp_path / "train.tsv", CLEAN[:5] + [("x" * 81, 1)])
    report = validate_classification({"train": _load(path), "test": clean_test}, ValidationSettings(max_chars=80))
    failure = _only_failure(report, "expect_column_value_lengths_to_be_between")
    assert _sample_rows(failure) == [7] and failure["kwargs"] == {"min_value": 1, "max_value": 80}


def test_too_many_duplicates(tmp_path, clean_test):
    rows = CLEAN[:18] + [CLEAN[0], CLEAN[1]]  # 18 unique out of 20 = 10% duplicates
    path = _write_tsv(tmp_path / "train.tsv", rows)
    report = validate_classification({"train": _load(path), "test": clean_test}, ValidationSettings(max_duplicate_rate=0.05))
    failure = _only_failure(report, "expect_column_proportion_of_unique_values_to_be_between")
    assert failure["observed_value"] == pytest.approx(0.9) and failure["unexpected_count"] is None
    assert _sample_rows(failure) == [20, 21]  # the repeats, not the originals
    lenient = validate_classification({"train": _load(path), "test": clean_test}, ValidationSettings(max_duplicate_rate=0.2))
    assert lenient.success


def test_train_test_overlap(tmp_path):
    train = _load(_write_tsv(tmp_path / "train.tsv", CLEAN[:25]))
    test_path = _write_tsv(tmp_path / "test.tsv", [("new one", 0), CLEAN[3], ("new two", 1), CLEAN[7]])
    report = validate_classification({"train": train, "test": _load(test_path)})
    failure = _only_failure(report, "expect_column_values_to_not_be_in_set", split="test")
    assert failure["file"] == str(test_path) and failure["column"] == "text"
    assert failure["samples"] == [{"row": 3, "value": CLEAN[3][0]}, {"row": 5, "value": CLEAN[7][0]}]
    assert failure["kwargs"]["value_set"] == "<25 values>"  # big sets are summarised
    assert validate_classification({"train": train, "test": _load(test_path)}, ValidationSettings(check_overlap=False)).success


def test_missing_column(tmp_path, clean_test):
    frame = _load(_write_tsv(tmp_path / "train.tsv", CLEAN[:5])).drop(columns=["label"])
    report = validate_classification({"train": frame, "test": clean_test})
    failure = _only_failure(report, "expect_column_to_exist")
    assert failure["column"] == "label" and "columns found: ['text', 'source_file', 'source_row']" in failure["details"]
    pairs = validate_classification({"train": clean_test}, ValidationSettings(require_text_pair=True))
    assert _only_failure(pairs, "expect_column_to_exist")["column"] == "text_pair"


def test_empty_split_fails_row_count(tmp_path):
    train = _load(_write_tsv(tmp_path / "train.tsv", CLEAN[:5]))
    report = validate_classification({"train": train, "test": train.iloc[:0]})
    failure = _only_failure(report, "expect_table_row_count_to_be_between", split="test")
    assert failure["column"] is None and failure["observed_value"] == 0
    with pytest.raises(ValidationFailed, match="expect_table_row_count_to_be_between on the table: observed 0"):
        raise_for_failures(report)


def test_sentence_pair_checks(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("a,b,y\nsame,one,0\nsame,two,1\nother, ,1\n", encoding="utf-8")
    train = load_table(path, columns=ColumnMap("a", "y", text_pair="b"))
    test = pd.DataFrame({"text": ["same"], "text_pair": ["two"], "label": [1], "source_file": "t.csv", "source_row": [2]})
    report = validate_classification({"train": train, "test": test}, ValidationSettings(max_duplicate_rate=0.0))
    # premise repeats are fine for pairs; the whitespace hypothesis on line 4 and the leaked pair are not
    assert [(f["split"], f["expectation"], f["column"]) for f in report.failures] == [
        ("train", "expect_column_values_to_not_match_regex", "text_pair"),
        ("test", "expect_column_values_to_not_be_in_set", "text+text_pair"),
    ]
    assert report.failures[0]["samples"] == [{"row": 4, "value": " "}]
    assert report.failures[1]["samples"] == [{"row": 2, "value": {"text": "same", "text_pair": "two"}}]


def test_report_markdown_json_and_exception(tmp_path, clean_test):
    path = _write_tsv(tmp_path / "train.tsv", CLEAN[:10] + [("  ", 9)])
    report = validate_classification({"train": _load(path), "test": clean_test}, ValidationSettings(allowed_labels=[0, 1]))
    json_path, md_path = report.save(tmp_path / "reports")
    assert json_path.name == "validation_report.json" and md_path.name == "validation_report.md"
    saved = json.loads(json_path.read_text())
    assert saved["success"] is False and saved == json.loads(json.dumps(report.to_dict()))
    markdown = md_path.read_text()
    assert markdown.startswith("# Data validation: FAIL")
    assert "## train:" in markdown and "## test:" in markdown
    assert f"`{path}`" in markdown and "| 12 | `\"  \"` |" in markdown
    with pytest.raises(ValidationFailed) as err:
        raise_for_failures(report)
    message = str(err.value)
    assert err.value.report is report
    assert f"[train] {path}: expect_column_values_to_be_in_set on column 'label'" in message
    assert "line 12:" in message


def test_real_sst2_sample_passes():
    configured = os.environ.get("FLEXKD_DATA_DIR")
    data_dir = Path(configured) if configured else Path(__file__).resolve().parents[3] / "shared" / "datasets"
    if not data_dir.is_dir():
        pytest.skip("real datasets not found (set FLEXKD_DATA_DIR)")
    columns = ColumnMap("sentence", "label")
    train = load_table(data_dir / "glue" / "SST-2" / "train.tsv", columns=columns).head(400)
    test = load_table(data_dir / "glue" / "SST-2" / "dev.tsv", columns=columns).head(200)
    report = validate_classification({"train": train, "test": test}, ValidationSettings(allowed_labels=[0, 1]))
    assert report.success, report.to_markdown()
