"""The flows' own logic: paths agree with dvc.yaml, the teacher-quality gate, the comparison table."""

from pathlib import Path

import pytest
import yaml

from flexkd.config import load_config
from flexkd.errors import FlexKDError
from flows.common import paths_for, write_json
from flows.distill import check_teacher_beats_ft
from flows.evaluate import best_student, comparison_table

REPO = Path(__file__).resolve().parents[2]


def test_dvc_yaml_outputs_are_the_flows_paths():
    cfg = load_config(REPO / "params.yaml")
    paths = paths_for(cfg, REPO)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]

    def outs(stage):
        found = []
        for out in stages[stage].get("outs", []) + stages[stage].get("metrics", []):
            name = next(iter(out)) if isinstance(out, dict) else out
            found.append(name.replace("${data.task}", cfg.data.task).replace("${project.runs_dir}", cfg.project.runs_dir))
        return found

    rel = lambda p: str(p.relative_to(REPO))  # noqa: E731
    assert outs("validate") == [rel(paths.validated)]
    assert outs("prepare") == [rel(paths.prepared)]
    assert outs("finetune_teacher") == [rel(paths.teacher), rel(paths.teacher_metrics)]
    assert outs("relevance") == [rel(paths.relevance)]
    assert outs("teacher_cache") == [rel(paths.teacher_cache)]
    assert rel(paths.teacher_cache).replace("sst2", "${data.task}") in stages["distill"]["deps"]
    distill = stages["distill"]
    assert distill["matrix"] == {"student": "${distill.students}", "method": "${distill.methods}"}
    fill = lambda t: (t.replace("${data.task}", "sst2").replace("${project.runs_dir}", "runs")  # noqa: E731
                      .replace("${item.student}", "pruned").replace("${item.method}", "flexkd"))
    assert fill(next(iter(distill["outs"]))) == rel(paths.student("pruned", "flexkd"))
    assert fill(next(iter(distill["metrics"][0]))) == rel(paths.distill_metrics("pruned", "flexkd"))
    assert rel(paths.evaluation) in outs("evaluate") and rel(paths.comparison) in outs("evaluate")
    assert outs("register") == [rel(paths.registry)]


@pytest.fixture()
def gate(tmp_path):
    cfg = load_config(REPO / "params.yaml")
    paths = paths_for(cfg, tmp_path)
    write_json(paths.teacher / "flexkd_teacher.json", {"validation": {"accuracy": 0.70}})
    write_json(paths.distill_metrics("random", "ft"), {"validation": {"accuracy": 0.75}})
    return cfg, paths


def test_weak_teacher_warns_before_distilling(gate, capsys):
    cfg, paths = gate
    with pytest.warns(UserWarning, match="does not beat the ft student"):
        check_teacher_beats_ft(cfg, paths, "random", "flexkd")
    assert "WARNING" in capsys.readouterr().out
    check_teacher_beats_ft(cfg, paths, "random", "ft")  # ft itself is never gated
    check_teacher_beats_ft(cfg, paths, "pruned", "kd")  # another student set-up: its own ft has not run


def test_weak_teacher_stops_when_asked(gate):
    cfg, paths = gate
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"require_better_than_ft": True})})
    with pytest.raises(FlexKDError, match="require_better_than_ft"):
        check_teacher_beats_ft(cfg, paths, "random", "kd")


def test_strong_teacher_passes(gate):
    cfg, paths = gate
    write_json(paths.teacher / "flexkd_teacher.json", {"validation": {"accuracy": 0.9}})
    check_teacher_beats_ft(cfg, paths, "random", "flexkd")


def test_comparison_table_lists_teacher_and_each_method():
    row = {"accuracy": 0.8, "macro_f1": 0.79, "mcc": 0.6, "parameters": 1000, "train_seconds": 12.0}
    evaluation = {
        "task": "sst2", "primary_metric": "accuracy", "test_rows": 10, "warnings": ["weak teacher"],
        "teacher": {**row, "accuracy": 0.9, "finetuned": True},
        "students": {
            "random/ft": {**row, "student": "random", "method": "ft", "init": "random"},
            "pruned/flexkd": {**row, "accuracy": 0.85, "student": "pruned", "method": "flexkd", "init": "prune"},
            "pruned/kd": {**row, "accuracy": 0.85, "student": "pruned", "method": "kd", "init": "prune"},
        },
    }
    table = comparison_table(evaluation, ["random/ft", "pruned/flexkd", "pruned/kd"])
    assert "| teacher | fine-tuned | - | 0.9000 |" in table
    assert "| student | random (random) | ft | 0.8000 | 0.7900 | 0.6000 | 1,000 | 12 |" in table
    assert "| **student** | **pruned** (prune) | **flexkd** | 0.8500 |" in table  # tie: first in order wins
    assert "| student | pruned (prune) | kd | 0.8500 |" in table
    assert "WARNING: weak teacher" in table
    assert best_student(evaluation, ["pruned/kd", "pruned/flexkd"]) == "pruned/kd"


def test_generation_table_reports_rouge():
    evaluation = {
        "task": "alpaca", "primary_metric": "rougeL", "test_rows": 5,
        "teacher": {"rougeL": 30.0, "parameters": 10, "finetuned": False},
        "students": {"pruned/kd": {"rougeL": 20.5, "rougeL_std": 0.5, "parameters": 5, "student": "pruned",
                                   "method": "kd", "init": "prune", "train_seconds": 3}},
    }
    table = comparison_table(evaluation)
    assert "ROUGE-L" in table and "ROUGE-L std" in table and "accuracy" not in table
    assert "| teacher | as given | - | 30.0000 |" in table
