import math

import pytest
import torch

from flexkd.data.tokenize import PadCollator
from flexkd.evaluate import classification_metrics, predict_logits


def test_metrics_golden_values():
    labels = [0, 0, 1, 1, 1, 0]
    preds = [0, 1, 1, 1, 0, 0]
    m = classification_metrics(labels, preds)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class: class 0 P=2/3 R=2/3 F1=2/3; class 1 likewise -> macro-F1 2/3
    assert m["macro_f1"] == pytest.approx(2 / 3)
    tp, tn, fp, fn = 2, 2, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert m["mcc"] == pytest.approx(mcc)


def test_metrics_three_classes_and_errors():
    m = classification_metrics([0, 1, 2, 2], [0, 1, 2, 1])
    assert m["accuracy"] == pytest.approx(0.75)
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0])


def test_collator_pads_dynamically_and_masks():
    collate = PadCollator(pad_token_id=7)
    batch = collate([
        {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 1},
        {"input_ids": [4], "attention_mask": [1], "labels": 0},
    ])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]


def test_predict_logits_batches_like_one_pass():
    torch.manual_seed(0)
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=16, num_labels=3))
    feats = [{"input_ids": [1] + [5 + i % 7] * (1 + i % 5), "attention_mask": [1] * (2 + i % 5), "labels": i % 3} for i in range(9)]
    collate = PadCollator(0)
    a = predict_logits(model, feats, collate, batch_size=2)
    b = torch.cat([predict_logits(model, [f], collate, batch_size=1) for f in feats])
    assert torch.allclose(a, b, atol=1e-5)
