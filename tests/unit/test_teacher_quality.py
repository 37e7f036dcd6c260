"""The teacher-quality check right after the teacher stage, before any student trains: a teacher that does not
beat the majority class, or never predicts a class, is reported (or stops the run) in minutes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml

from flexkd.evaluate import classifier_quality, generator_quality

REPO = Path(__file__).resolve().parents[2]
NAMES = {0: "negative", 1: "positive", 2: "neutral"}


def test_a_majority_class_teacher_fails_both_checks_naming_the_classes():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    quality = classifier_quality(labels, [0] * 100, NAMES, min_gain_over_majority=0.02, min_class_recall=0.05)
    assert quality["majority_class"] == "negative" and quality["majority_rate"] == 0.5 and quality["accuracy"] == 0.5
    assert quality["recall"] == {"negative": 1.0, "positive": 0.0, "neutral": 0.0}
    beat, recall = quality["problems"]
    assert "does not beat always answering the majority class 'negative' (0.5000) by 0.02" in beat
    assert "'positive' (recall 0.00)" in recall and "'neutral' (recall 0.00)" in recall and "negative" not in recall


def test_a_useful_teacher_passes_and_the_thresholds_are_the_params():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    predictions = [0] * 45 + [1] * 5 + [1] * 27 + [0] * 3 + [2] * 15 + [0] * 5
    quality = classifier_quality(labels, predictions, NAMES, min_gain_over_majority=0.02, min_class_recall=0.05)
    assert quality["problems"] == [] and quality["accuracy"] == pytest.approx(0.87)
    strict = classifier_quality(labels, predictions, NAMES, min_gain_over_majority=0.5, min_class_recall=0.8)
    assert len(strict["problems"]) == 2 and "'neutral' (recall 0.75)" in strict["problems"][1]


def test_a_generator_must_lower_the_validation_nll_it_started_from():
    assert generator_quality(3.2, 2.5)["problems"] == []
    assert "did not lower the validation NLL (2.5000 before, 2.6000 after)" in generator_quality(2.5, 2.6)["problems"][0]
    assert generator_quality(None, 9.0)["problems"] == []  # not fine-tuned: nothing to compare with


def _stage(tmp_path: Path, data_dir: Path, check: str):
    """The teacher stage (no fine-tuning) on a tiny teacher whose head always answers 'positive'."""
    import torch

    from flexkd.config import parse_config
    from flexkd.project import Paths
    from flexkd.tasks import task_for
    from tests.integration.project import save_tiny_bert

    teacher = save_tiny_bert(tmp_path / "teacher")
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(teacher)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([-20.0, 20.0]))
    model.save_pretrained(teacher)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(data_dir=str(data_dir), max_train=120, validation_size=60, max_test=40)
    raw["teacher"].update(model=str(teacher), max_length=32)
    raw["teacher"]["finetune"]["enabled"] = False
    raw["teacher"]["quality"]["check"] = check
    cfg = parse_config(raw)
    paths = Paths(tmp_path / "project", cfg.data.task, cfg.project.runs_dir, cfg.project.work_dir)
    task = task_for(cfg)
    task.prepare(task.load_raw(), paths.prepared)
    return cfg, paths, task


def test_the_teacher_stage_stops_before_any_student_when_asked(tmp_path, data_dir):
    from flexkd import stages
    from flexkd.errors import FlexKDError

    cfg, paths, task = _stage(tmp_path, data_dir, "stop")
    with pytest.raises(FlexKDError, match=r"teacher is weak on validation: .*majority class.*'0' \(recall 0\.00\).*"
                                          r"teacher\.quality\.check is stop"):
        stages.finetune_teacher(cfg, paths, task)
    quality = json.loads((paths.teacher / "flexkd_teacher.json").read_text())["quality"]  # kept for the post-mortem
    assert quality["recall"]["1"] == 1.0 and len(quality["problems"]) == 2


def test_the_teacher_stage_warns_by_default_and_records_it(tmp_path, data_dir):
    from flexkd import stages

    cfg, paths, task = _stage(tmp_path, data_dir, "warn")
    logged = []
    with pytest.warns(UserWarning, match="teacher is weak on validation"):
        stages.finetune_teacher(cfg, paths, task, log=lambda metrics, *a, **k: logged.append(metrics))
    assert {"teacher_quality/problems": 2.0} in logged
    assert len(json.loads(paths.teacher_metrics.read_text())["quality"]["problems"]) == 2

    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(
        update={"quality": cfg.teacher.quality.model_copy(update={"check": "off"})})})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stages.finetune_teacher(cfg, paths, task)
    assert "quality" not in json.loads((paths.teacher / "flexkd_teacher.json").read_text())
