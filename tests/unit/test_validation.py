"""The Great Expectations suite catches each kind of bad row and the report points at split, file, column, line,
in plain words: what is wrong for how many rows, where, and what to do, with the validator's check name last."""

from __future__ import annotations

import json
import re
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
from flexkd.data import explanations, validation
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


def _assert_worded(report, failure, *, says: str, rows: str, lines: list[int], fix: str):
    """A failure reads, in the exception, the markdown report and the JSON alike: the plain sentence first (``says``,
    the row count and share ``rows``, the file and its ``lines``), then what to do (naming ``fix``: the setting or
    the change), and only then the validator's check. A user who never heard of Great Expectations can act on it."""
    message, remedy = failure["message"], failure["remedy"]
    assert message.startswith(says), message
    assert rows in message, message
    assert f"{failure['file']} line" in message, message
    where = message[message.index(failure["file"]):]
    for line in lines:
        assert re.search(rf"\b{line}\b", where), (line, message)
    assert fix in remedy, remedy
    assert failure["expectation"] not in message + remedy  # the validator's name is not the explanation
    check = f"(check: {failure['expectation']} on column '{failure['column']}')"

    with pytest.raises(ValidationFailed) as err:
        raise_for_failures(report)
    text = str(err.value)
    start = text.index(f"\n- {message}\n")
    end = text.index(check, start)
    assert fix in text[start:end]  # what to do comes before the check's name

    markdown = report.to_markdown()
    start = markdown.index(f". {message}\n")
    end = markdown.index(f"`{failure['expectation']}` on column '{failure['column']}'", start)
    assert fix in markdown[start:end]

    saved = [f for f in report.to_dict()["failures"] if f["message"] == message]
    assert saved and saved[0]["remedy"] == remedy and saved[0]["check"] == check[len("(check: "):-1]


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
    _assert_worded(report, blank, says="2 train rows (4.76%) have an empty or whitespace-only text: ",
                   rows="2 train rows (4.76%)", lines=[42, 43], fix="validation.max_invalid_rate: 0.048")
    assert "prepare then drops them" in blank["remedy"]
    _assert_worded(report, too_short, says="1 train row (2.38%) has a text shorter than 1 or longer than 2000 "
                   "characters (found: 0)", rows="1 train row", lines=[42], fix="validation.min_chars")


def test_null_text_from_json(tmp_path, clean_test):
    path = tmp_path / "train.jsonl"
    records = [{"sentence": t, "label": y} for t, y in CLEAN[:10]] + [{"sentence": None, "label": 1}]
    records.append({"sentence": "a sentence nobody labelled", "label": None})
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    report = validate_classification({"train": _load(path), "test": clean_test})
    failure, unlabelled = [f for f in report.failures if f["expectation"] == "expect_column_values_to_not_be_null"]
    assert failure["column"] == "text" and _sample_rows(failure) == [11] and failure["samples"][0]["value"] is None
    _assert_worded(report, failure, says="1 train row (8.33%) has no text (a missing field or null): ",
                   rows="1 train row (8.33%)", lines=[11], fix="validation.max_invalid_rate: 0.084")
    # a missing label is not tolerated by max_invalid_rate (the check has no ``mostly``): the words say so
    assert unlabelled["column"] == "label" and _sample_rows(unlabelled) == [12]
    _assert_worded(report, unlabelled, says="1 train row (8.33%) has no label (a missing field or null): ",
                   rows="1 train row (8.33%)", lines=[12], fix="Give those rows their label or remove them")
    assert "validation.max_invalid_rate does not cover labels" in unlabelled["remedy"]


def test_label_outside_allowed_set(tmp_path, clean_test):
    path = _write_tsv(tmp_path / "train.tsv", CLEAN[:20] + [("a sentence with label two", 2), ("another", "pos")])
    report = validate_classification({"train": _load(path), "test": clean_test}, ValidationSettings(allowed_labels=["0", 1]))
    failure = _only_failure(report, "expect_column_values_to_be_in_set")
    assert failure["column"] == "label" and failure["file"] == str(path)
    assert failure["samples"] == [{"row": 22, "value": "2"}, {"row": 23, "value": "pos"}]
    assert failure["kwargs"]["value_set"] == ["0", "1"]
    _assert_worded(report, failure, says="2 train rows (9.09%) have a label outside the allowed set ('2', 'pos'; "
                   "allowed: '0', '1')", rows="2 train rows (9.09%)", lines=[22, 23], fix="data.labels")
    assert "validation.max_invalid_rate does not cover labels" in failure["remedy"]  # no mostly on labels


def test_test_labels_must_be_seen_in_train_without_declared_set(tmp_path):
    train = _load(_write_tsv(tmp_path / "train.tsv", CLEAN[:10]))
    test = _load(_write_tsv(tmp_path / "test.tsv", [("fresh one", 0), ("fresh two", 7)]))
    report = validate_classification({"train": train, "test": test})
    failure = _only_failure(report, "expect_column_values_to_be_in_set", split="test")
    assert failure["samples"] == [{"row": 3, "value": "7"}]
    assert all(f["split"] == "test" for f in report.failures)
    _assert_worded(report, failure, says="1 test row (50.00%) has a label outside the allowed set ('7'; allowed: "
                   "'0', '1')", rows="1 test row", lines=[3], fix="data.labels")


def test_too_long_text(tmp_path, clean_test):
    path = _write_tsv(tmp_path / "train.tsv", CLEAN[:5] + [("x" * 81, 1)])
    report = validate_classification({"train": _load(path), "test": clean_test}, ValidationSettings(max_chars=80))
    failure = _only_failure(report, "expect_column_value_lengths_to_be_between")
    assert _sample_rows(failure) == [7] and failure["kwargs"] == {"min_value": 1, "max_value": 80}
    _assert_worded(report, failure, says="1 train row (16.67%) has a text shorter than 1 or longer than 80 "
                   "characters (found: 81)", rows="1 train row (16.67%)", lines=[7], fix="validation.max_chars")


def test_too_many_duplicates(tmp_path, clean_test):
    rows = CLEAN[:18] + [CLEAN[0], CLEAN[1]]  # 18 unique out of 20 = 10% duplicates
    path = _write_tsv(tmp_path / "train.tsv", rows)
    report = validate_classification({"train": _load(path), "test": clean_test}, ValidationSettings(max_duplicate_rate=0.05))
    failure = _only_failure(report, "expect_column_proportion_of_unique_values_to_be_between")
    assert failure["observed_value"] == pytest.approx(0.9) and failure["unexpected_count"] is None
    assert _sample_rows(failure) == [20, 21]  # the repeats, not the originals
    _assert_worded(report, failure, says="2 train rows (10.00%) repeat an earlier row's text, more than "
                   "validation.max_duplicate_rate (0.05) allows", rows="2 train rows (10.00%)", lines=[20, 21],
                   fix="validation.max_duplicate_rate: 0.101")
    lenient = validate_classification({"train": _load(path), "test": clean_test}, ValidationSettings(max_duplicate_rate=0.2))
    assert lenient.success
    # the suggested setting is enough, not just a direction
    suggested = ValidationSettings(max_duplicate_rate=0.101)
    assert validate_classification({"train": _load(path), "test": clean_test}, suggested).success


def test_train_test_overlap(tmp_path):
    train = _load(_write_tsv(tmp_path / "train.tsv", CLEAN[:25]))
    test_path = _write_tsv(tmp_path / "test.tsv", [("new one", 0), CLEAN[3], ("new two", 1), CLEAN[7]])
    report = validate_classification({"train": train, "test": _load(test_path)})
    failure = _only_failure(report, "expect_column_values_to_not_be_in_set", split="test")
    assert failure["file"] == str(test_path) and failure["column"] == "text"
    assert failure["samples"] == [{"row": 3, "value": CLEAN[3][0]}, {"row": 5, "value": CLEAN[7][0]}]
    assert failure["kwargs"]["value_set"] == "<25 values>"  # big sets are summarised
    _assert_worded(report, failure, says="2 test rows (50.00%) also appear in the training file (same text): ",
                   rows="2 test rows (50.00%)", lines=[3, 5], fix="validation.check_overlap: false")
    assert "Remove those rows from one of the two files" in failure["remedy"]
    # half the rows: more than max_invalid_rate may tolerate (the config keeps it below 0.5), and it says so
    assert "validation.max_invalid_rate: 0.501 (not accepted: it must stay below 0.5" in failure["remedy"]
    assert validate_classification({"train": train, "test": _load(test_path)}, ValidationSettings(check_overlap=False)).success


def test_overlap_message_counts_every_row_and_suggests_a_rate_that_passes(tmp_path):
    """The case of the issue: a 6-class set whose test file repeats 11 training texts out of 2000 (0.55%)."""
    rows = [(f"training sentence number {i}", i % 6) for i in range(200)]
    train = _load(_write_tsv(tmp_path / "train.tsv", rows))
    test_rows = [(f"held out sentence number {i}", i % 6) for i in range(1989)] + rows[:11]
    test_path = _write_tsv(tmp_path / "test.tsv", test_rows)
    settings = ValidationSettings(allowed_labels=list(range(6)))
    report = validate_classification({"train": train, "test": _load(test_path)}, settings)
    failure = _only_failure(report, "expect_column_values_to_not_be_in_set", split="test")
    assert failure["message"] == (
        f"11 test rows (0.55%) also appear in the training file (same text): {test_path} lines "
        "1991, 1992, 1993, 1994, 1995, 1996, 1997, 1998, 1999, 2000 and 1 more."
    )
    assert failure["lines"] == list(range(1991, 2002))  # all of them in the JSON report, not just the samples
    _assert_worded(report, failure, says="11 test rows (0.55%) also appear in the training file",
                   rows="11 test rows (0.55%)", lines=[1991, 2000], fix="validation.max_invalid_rate: 0.006")
    settings.max_invalid_rate = 0.006
    assert validate_classification({"train": train, "test": _load(test_path)}, settings).success


def test_missing_column(tmp_path, clean_test):
    frame = _load(_write_tsv(tmp_path / "train.tsv", CLEAN[:5])).drop(columns=["label"])
    report = validate_classification({"train": frame, "test": clean_test})
    failure = _only_failure(report, "expect_column_to_exist")
    assert failure["column"] == "label" and "columns found: ['text', 'source_file', 'source_row']" in failure["details"]
    assert failure["message"] == (
        "The train data has no 'label' column, so none of its 5 rows can be checked (columns found: 'text', "
        f"'source_file', 'source_row'): {failure['file']}."
    )
    assert "data.columns.label" in failure["remedy"]
    pairs = validate_classification({"train": clean_test}, ValidationSettings(require_text_pair=True))
    missing = _only_failure(pairs, "expect_column_to_exist")
    assert missing["column"] == "text_pair" and "data.columns.text_pair" in missing["remedy"]
    with pytest.raises(ValidationFailed) as err:
        raise_for_failures(pairs)
    text = str(err.value)
    assert text.index("has no 'text_pair' column") < text.index("data.columns.text_pair") < text.index(
        "(check: expect_column_to_exist on column 'text_pair')"
    )


def test_empty_split_fails_row_count(tmp_path):
    train = _load(_write_tsv(tmp_path / "train.tsv", CLEAN[:5]))
    report = validate_classification({"train": train, "test": train.iloc[:0]})
    failure = _only_failure(report, "expect_table_row_count_to_be_between", split="test")
    assert failure["column"] is None and failure["observed_value"] == 0
    assert failure["message"] == "The test split has no rows: <in-memory> holds no data rows."
    assert "data.test_file" in failure["remedy"]
    with pytest.raises(ValidationFailed) as err:
        raise_for_failures(report)
    text = str(err.value)
    assert text.index("- The test split has no rows") < text.index("data.test_file") < text.index(
        "(check: expect_table_row_count_to_be_between on the table)"
    )


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
    assert report.failures[0]["message"].startswith("1 train row (33.33%) has an empty or whitespace-only text_pair")
    assert report.failures[1]["message"] == (
        "1 test row (100.00%) also appears in the training file (same text and text_pair): t.csv line 2."
    )


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
    assert message.startswith("data validation failed: 2 problem(s) in the data\n- 1 train row (9.09%) has ")
    assert f"has a label outside the allowed set ('9'; allowed: '0', '1'): {path} line 12." in message
    assert "(check: expect_column_values_to_be_in_set on column 'label')" in message
    assert "line 12:" in message
    assert all(f["message"] and f["remedy"] and f["check"] for f in saved["failures"])
    assert "### 1. 1 train row (9.09%) has an empty or whitespace-only text" in markdown


def test_real_sst2_sample_passes(data_dir):
    columns = ColumnMap("sentence", "label")
    train = load_table(data_dir / "glue" / "SST-2" / "train.tsv", columns=columns).head(400)
    test = load_table(data_dir / "glue" / "SST-2" / "dev.tsv", columns=columns).head(200)
    report = validate_classification({"train": train, "test": test}, ValidationSettings(allowed_labels=[0, 1]))
    assert report.success, report.to_markdown()


def test_every_expectation_the_suites_use_has_plain_words():
    """No check reaches a user as a bare GX name: both suites, every optional check switched on, use only
    expectation types with words in EXPLANATIONS (adding an expectation without its words fails here), each
    column-specific entry names a column a suite checks that way, and every template fills from a failure's facts."""
    import string

    import great_expectations as gx

    from flexkd.data.generation import validation as generation

    validation.quiet_context()  # GX 1.x builds expectations only with a context
    columns = ("text", "text_pair", "label", validation._PAIR_KEY)
    frame = pd.DataFrame({column: ["x"] for column in columns})
    suite = validation._build_suite(gx, "all", frame, ValidationSettings(require_text_pair=True), ["x"], ["x"])
    used = {(e.expectation_type, validation._display_column(e.configuration.kwargs.get("column")))
            for e in suite.expectations}
    columns = ("prompt", "input", "response", "reference_count", generation._SHORTEST_REF, "prompt_tokens",
               "response_tokens", generation._KEY)
    frame = pd.DataFrame({column: ["x"] for column in columns})
    settings = generation.GenerationValidationSettings(max_prompt_tokens=8, max_response_tokens=8)
    suite = generation._build_generation_suite(gx, "all", frame, settings, ["x"])
    used |= {(e.expectation_type, generation._display(e.configuration.kwargs.get("column")))
             for e in suite.expectations}

    missing = sorted({expectation for expectation, _ in used} - set(explanations.EXPLANATIONS))
    assert not missing, f"expectation types without plain words in EXPLANATIONS: {missing}"
    for expectation, entry in explanations.EXPLANATIONS.items():
        assert None in entry, expectation  # the words for any column
        stale = [column for column in entry if column is not None and (expectation, column) not in used]
        assert not stale, (expectation, stale)

    failure = {"split": "train", "file": "f.tsv", "expectation": "x", "column": "text", "kwargs": {}, "rows": 1,
               "share": 0.1, "rows_total": 10, "lines": [2]}
    fields = set(explanations._facts(failure))
    everything = [w for entry in explanations.EXPLANATIONS.values() for w in entry.values()]
    for words in everything + [explanations._UNKNOWN, explanations._RAISED]:
        for template in (words.what, words.remedy):
            names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
            assert names <= fields, (template, names - fields)


def test_a_check_without_words_still_reports_its_rows():
    """Should a check ever slip past the table (a suite built elsewhere), the gate still names rows and file."""
    failure = {"split": "train", "file": "f.tsv", "expectation": "expect_something_new", "column": "text",
               "kwargs": {}, "rows": 2, "share": 0.2, "rows_total": 10, "lines": [3, 4], "samples": []}
    explanations.describe_failure(failure)
    assert failure["message"].startswith("The train data failed a check without a plain-words description")
    assert "2 train rows (20.00%)" in failure["message"] and "f.tsv lines 3, 4" in failure["message"]
    assert failure["check"] == "expect_something_new on column 'text'"
