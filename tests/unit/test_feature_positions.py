"""distill.feature_positions: the feature terms compare every token (the default) or only the position the
classification head reads; the cached and online teachers give the same losses either way."""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForSequenceClassification

from flexkd.cache import CacheSpec, IndexedCollate, cached_distillation_loss
from flexkd.config import parse_config
from flexkd.errors import ConfigError
from flexkd.losses import build_objective, flexkd_feature_loss
from flexkd.tasks import ClassificationTask, head_mask, head_position
from flexkd.train import distillation_loss
from flexkd.data.tokenize import PadCollator
from tests.unit.test_cache import UNITS, _cache, bert, classification_data, classification_mask

REPO = Path(__file__).resolve().parents[2]


def first_token(batch):
    return head_mask(batch["attention_mask"], "first")


def test_head_mask_marks_one_position_per_row_on_either_padding_side():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    assert head_mask(right, "first").nonzero().tolist() == [[0, 0], [1, 0], [2, 0]]
    assert head_mask(right, "last").nonzero().tolist() == [[0, 2], [1, 1], [2, 3]]
    left = right.flip(1)
    assert head_mask(left, "first").nonzero().tolist() == [[0, 1], [1, 2], [2, 0]]
    assert head_mask(left, "last").nonzero().tolist() == [[0, 3], [1, 3], [2, 3]]
    with pytest.raises(ConfigError, match="non-pad token in every row"):
        head_mask(torch.tensor([[1, 1], [0, 0]]), "first")


def test_head_position_follows_the_model_family():
    assert head_position(bert(8, 0)) == "first"  # [CLS] feeds the pooler
    llama = LlamaForSequenceClassification(LlamaConfig(vocab_size=40, hidden_size=8, intermediate_size=16,
                                                       num_hidden_layers=1, num_attention_heads=2, pad_token_id=0))
    assert head_position(llama) == "last"  # the last non-pad token feeds the score head

    class MeanPooled:
        config = type("Config", (), {"model_type": "modernbert"})()

    with pytest.raises(ConfigError, match="modernbert.*distill.feature_positions: tokens"):
        head_position(MeanPooled())


@pytest.mark.parametrize("method", ["projector", "cka", "flexkd"])
def test_head_positions_read_from_the_cache_give_the_online_losses(tmp_path, method):
    """The cache holds every token; the head position is taken among them at distill time."""
    teacher, student, data = bert(16, 0), bert(8, 1), classification_data()
    cache = _cache(tmp_path, teacher, data, classification_mask, CacheSpec(columns=list(range(16)), d_teacher=16, generation=False))
    args = dict(alpha=0.5, temperature=2.0, feature_weight=0.7, student_hidden=8, teacher_hidden=16,
                selected_units=UNITS if method == "flexkd" else None)
    online, cached = build_objective(method, **args), build_objective(method, **args)
    cached.load_state_dict(online.state_dict())  # the projector's initial map
    online_fn = distillation_loss(student, teacher, online, first_token)
    cached_fn = cached_distillation_loss(cache, cached, classification_mask, compare_mask=first_token)
    order = [0, 5, 9, 13, 2, 7]
    loss_online, terms_online = online_fn(student, PadCollator(0)([data[i] for i in order]))
    indexed = IndexedCollate.index(data)
    loss_cached, terms_cached = cached_fn(student, IndexedCollate(PadCollator(0))([indexed[i] for i in order]))
    assert set(terms_online) == set(terms_cached)
    for name in terms_online:
        assert torch.allclose(terms_online[name], terms_cached[name], atol=1e-5), name
    assert torch.allclose(loss_online, loss_cached, atol=1e-5)


def test_head_positions_compare_the_cls_rows_only():
    teacher, student, data = bert(16, 0), bert(8, 1), classification_data()
    batch = PadCollator(0)(data[:7])
    objective = build_objective("flexkd", alpha=0.5, temperature=2.0, feature_weight=1.0, student_hidden=8,
                                teacher_hidden=16, selected_units=UNITS)
    _, terms = distillation_loss(student, teacher, objective, first_token)(student, batch)
    with torch.no_grad():
        hs = student(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states[-1]
        ht = teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states[-1]
    expected = flexkd_feature_loss(hs[:, 0, :], ht[:, 0, UNITS])
    assert torch.allclose(terms["feature/flexkd"], expected, atol=1e-6)
    every_token = distillation_loss(student, teacher, objective, classification_mask)(student, batch)[1]
    assert not torch.allclose(every_token["feature/flexkd"], expected, atol=1e-3)  # the default compares more rows


def _params(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def test_the_task_compares_every_token_unless_asked_for_the_head():
    raw = _params("params.yaml")
    task = ClassificationTask(parse_config(raw))
    assert task.compare_mask(bert(8, 0)) == task.feature_mask  # the default: unchanged behaviour
    raw["distill"]["feature_positions"] = "head"
    mask = ClassificationTask(parse_config(raw)).compare_mask(bert(8, 0))
    batch = PadCollator(0)(classification_data()[:3])
    assert mask(batch).sum() == 3 and mask(batch)[:, 0].all()


def test_generation_refuses_head_positions_naming_the_key():
    raw = _params("profiles/alpaca.yaml")
    raw["distill"]["feature_positions"] = "head"
    with pytest.raises(ConfigError, match="distill.feature_positions.*set it to tokens"):
        parse_config(raw)
