"""Reading raw files: every format, header or positions, labels, and one clear DataError per kind of bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexkd.data import ColumnMap, build_label_map, load_hub, load_table, resolve_data_dir
from flexkd.errors import DataError


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- formats
def test_tsv_with_header_keeps_bare_quotes_and_counts_header_line(tmp_path):
    path = _write(tmp_path / "train.tsv", 'sentence\tlabel\na "quoted" word \t0\nsecond\t1\n\nafter blank\t1\n')
    frame = load_table(path, columns=ColumnMap("sentence", "label"))
    assert list(frame.columns) == ["text", "label", "source_file", "source_row"]
    assert frame["text"].tolist() == ['a "quoted" word ', "second", "after blank"]
    assert frame["label"].tolist() == [0, 1, 1]
    assert frame["source_row"].tolist() == [2, 3, 5]  # the blank line 4 still counts
    assert set(frame["source_file"]) == {str(path)}


def test_tsv_without_header_by_position_like_cola(tmp_path):
    path = _write(
        tmp_path / "cola.tsv",
        "gj04\t1\t\tOur friends won't buy this analysis.\n"
        "gj04\t0\t*\tOne more pseudo generalization or I'm giving up.\n",
    )
    frame = load_table(path, columns=ColumnMap(text=3, label=1), header=False)
    assert frame["text"].tolist() == ["Our friends won't buy this analysis.", "One more pseudo generalization or I'm giving up."]
    assert frame["label"].tolist() == [1, 0]
    assert frame["source_row"].tolist() == [1, 2]


def test_csv_with_quoted_commas_and_sentence_pairs(tmp_path):
    path = _write(
        tmp_path / "pairs.csv",
        'premise,hypothesis,gold\n"A man, a plan.","A canal, Panama",entailment\n'
        '"He said ""hi""",Nobody spoke,contradiction\n',
    )
    frame = load_table(path, columns=ColumnMap("premise", "gold", text_pair="hypothesis"))
    assert frame["text"].tolist() == ["A man, a plan.", 'He said "hi"']
    assert frame["text_pair"].tolist() == ["A canal, Panama", "Nobody spoke"]
    assert frame["label"].tolist() == ["entailment", "contradiction"]
    assert frame["source_row"].tolist() == [2, 3]


def test_jsonl_records(tmp_path):
    lines = [json.dumps({"sentence": "good film", "label": "pos"}), "", json.dumps({"sentence": "bad", "label": "neg"})]
    path = _write(tmp_path / "data.jsonl", "\n".join(lines) + "\n")
    frame = load_table(path, columns=ColumnMap("sentence", "label"))
    assert frame["text"].tolist() == ["good film", "bad"]
    assert frame["label"].tolist() == ["pos", "neg"]
    assert frame["source_row"].tolist() == [1, 3]  # jsonl rows are file lines


@pytest.mark.parametrize("wrap", [False, True], ids=["list", "data-object"])
def test_json_list_and_data_object(tmp_path, wrap):
    records = [{"t": "one", "y": 2}, {"t": "two", "y": 10}, {"t": "three", "y": 2}]
    payload = {"data": records} if wrap else records
    path = _write(tmp_path / "data.json", json.dumps(payload, indent=1))
    frame = load_table(path, columns=ColumnMap("t", "y"))
    assert frame["text"].tolist() == ["one", "two", "three"]
    assert frame["label"].tolist() == [2, 10, 2]
    assert frame["source_row"].tolist() == [1, 2, 3]


def test_explicit_format_overrides_extension(tmp_path):
    path = _write(tmp_path / "data.txt", "text\tlabel\nhello\t1\n")
    assert load_table(path, columns=ColumnMap("text", "label"), fmt="tsv")["text"].tolist() == ["hello"]
    with pytest.raises(DataError, match="cannot infer the format"):
        load_table(path, columns=ColumnMap("text", "label"))


# --------------------------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.tsv: file not found"):
        load_table(tmp_path / "nope.tsv", columns=ColumnMap("sentence", "label"))


def test_empty_file(tmp_path):
    path = _write(tmp_path / "empty.tsv", "\n  \n")
    with pytest.raises(DataError, match=r"empty\.tsv: file is empty"):
        load_table(path, columns=ColumnMap("sentence", "label"))
    header_only = _write(tmp_path / "header.tsv", "sentence\tlabel\n")
    with pytest.raises(DataError, match="no data rows"):
        load_table(header_only, columns=ColumnMap("sentence", "label"))


def test_non_utf8_names_line_and_offset(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes("sentence\tlabel\nfine\t1\ncaf\xe9 noir\t0\n".encode("latin-1"))
    with pytest.raises(DataError) as err:
        load_table(path, columns=ColumnMap("sentence", "label"))
    message = str(err.value)
    assert str(path) in message and "UTF-8" in message
    assert "line 3, column 4" in message and "byte offset 25" in message


def test_missing_column_lists_found_columns(tmp_path):
    path = _write(tmp_path / "train.tsv", "sentence\ttarget\nhello\t1\n")
    with pytest.raises(DataError) as err:
        load_table(path, columns=ColumnMap("sentence", "label"))
    message = str(err.value)
    assert str(path) in message and "'label'" in message and "['sentence', 'target']" in message


def test_tsv_read_as_csv_points_at_the_delimiter(tmp_path):
    path = _write(tmp_path / "train.csv", "sentence\tlabel\nhello\t1\n")
    with pytest.raises(DataError, match=r"columns found: \['sentence\\tlabel'\].*delimiter"):
        load_table(path, columns=ColumnMap("sentence", "label"))


def test_position_out_of_range(tmp_path):
    path = _write(tmp_path / "cola.tsv", "a\t1\ttext\n")
    with pytest.raises(DataError, match=r"column position 3 \(for text\) does not exist; the file has 3"):
        load_table(path, columns=ColumnMap(3, 1), header=False)


def test_row_with_wrong_field_count_names_line(tmp_path):
    path = _write(tmp_path / "train.tsv", "sentence\tlabel\nok\t1\nstray\ttab\t0\n")
    with pytest.raises(DataError, match=r"train\.tsv: line 3 has 3 field\(s\), expected 2"):
        load_table(path, columns=ColumnMap("sentence", "label"))


def test_bad_json_line_named(tmp_path):
    path = _write(tmp_path / "data.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0\n')
    with pytest.raises(DataError, match=r"data\.jsonl: invalid JSON on line 2"):
        load_table(path, columns=ColumnMap("text", "label"))
    whole = _write(tmp_path / "data.json", '[\n {"text": "a", "label": 1},\n {"text": "b" "label": 0}\n]')
    with pytest.raises(DataError, match=r"data\.json: invalid JSON on line 3"):
        load_table(whole, columns=ColumnMap("text", "label"))


def test_json_record_without_field_named(tmp_path):
    path = _write(tmp_path / "data.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"line 2 has no field 'label'"):
        load_table(path, columns=ColumnMap("text", "label"))


def test_hub_offline_is_a_data_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load_hub("flexkd-test/does-not-exist", columns=ColumnMap("sentence", "label"), split="train")
    assert "flexkd-test/does-not-exist" in str(err.value) and "offline" in str(err.value)


# --------------------------------------------------------------------------------------------- labels, dirs
def test_label_map_int_and_string_labels():
    assert build_label_map([10, 2, 1, 2]) == {"1": 0, "2": 1, "10": 2}
    assert build_label_map(["neutral", "entailment", "contradiction"]) == {
        "contradiction": 0,
        "entailment": 1,
        "neutral": 2,
    }
    assert build_label_map([1, 0], declared=["1", "0"]) == {"1": 0, "0": 1}
    assert build_label_map(["a", "b"], declared=["a", "b", "c"]) == {"a": 0, "b": 1, "c": 2}


def test_label_map_errors():
    with pytest.raises(DataError, match=r"\['maybe'\].*not declared"):
        build_label_map(["yes", "maybe"], declared=["yes", "no"])
    with pytest.raises(DataError, match="at least 2 classes"):
        build_label_map([1, 1, 1])
    with pytest.raises(DataError, match="duplicates"):
        build_label_map([0, 1], declared=[0, 1, "1"])


def test_resolve_data_dir_order(tmp_path, monkeypatch):
    configured = tmp_path / "configured"
    configured.mkdir()
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    monkeypatch.setenv("FLEXKD_DATA_DIR", str(env_dir))
    assert resolve_data_dir(str(configured)) == configured.resolve()
    assert resolve_data_dir() == env_dir.resolve()
    monkeypatch.delenv("FLEXKD_DATA_DIR")
    work = tmp_path / "repo"
    work.mkdir()
    (tmp_path / "shared" / "datasets").mkdir(parents=True)
    monkeypatch.chdir(work)
    assert resolve_data_dir() == (tmp_path / "shared" / "datasets").resolve()
    with pytest.raises(DataError, match=r"data\.data_dir.*FLEXKD_DATA_DIR"):
        resolve_data_dir(str(tmp_path / "missing"))


def test_real_glue_files(data_dir):
    sst = load_table(data_dir / "glue" / "SST-2" / "dev.tsv", columns=ColumnMap("sentence", "label"))
    assert len(sst) == 300 and set(sst["label"]) == {0, 1}
    assert sst["source_row"].iloc[0] == 2
    cola = load_table(data_dir / "glue" / "CoLA" / "dev.tsv", columns=ColumnMap(3, 1), header=False)
    assert len(cola) == 200 and set(cola["label"]) == {0, 1}
    assert build_label_map(cola["label"]) == {"0": 0, "1": 1}
