"""The flows' own logic: paths agree with dvc.yaml, the teacher-quality gate, selection on validation, the table."""

from pathlib import Path

import pytest
import yaml

from flexkd.config import load_config
from flexkd.errors import FlexKDError
from flows.common import paths_for, write_json
from flows.distill import check_teacher_beats_ft
from flexkd.selection import best_by_validation, comparison_table

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
    assert outs("augment") == [rel(paths.augmented)]
    assert outs("teacher_cache") == [rel(paths.teacher_cache)]
    assert rel(paths.augmented).replace("sst2", "${data.task}") in stages["teacher_cache"]["deps"]
    assert rel(paths.augmented).replace("sst2", "${data.task}") in stages["distill"]["deps"]
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


def test_weak_teacher_warns_before_distilling(gate, capsys, recwarn):
    cfg, paths = gate
    with pytest.warns(UserWarning, match="does not beat the ft student"):
        check_teacher_beats_ft(cfg, paths, "random", "flexkd")
    out = capsys.readouterr().out
    assert "WARNING" in out and "0.7000" in out and "0.7500" in out
    recwarn.clear()
    check_teacher_beats_ft(cfg, paths, "random", "ft")  # ft itself is never gated
    check_teacher_beats_ft(cfg, paths, "pruned", "kd")  # another student set-up: its own ft has not run
    assert len(recwarn) == 0 and "WARNING" not in capsys.readouterr().out


def test_weak_teacher_stops_when_asked(gate):
    cfg, paths = gate
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"require_better_than_ft": True})})
    with pytest.raises(FlexKDError, match="require_better_than_ft"):
        check_teacher_beats_ft(cfg, paths, "random", "kd")


def test_strong_teacher_passes(gate, capsys, recwarn):
    cfg, paths = gate
    write_json(paths.teacher / "flexkd_teacher.json", {"validation": {"accuracy": 0.9}})
    check_teacher_beats_ft(cfg, paths, "random", "flexkd")
    assert len(recwarn) == 0 and "WARNING" not in capsys.readouterr().out


def _evaluation():
    row = {"accuracy": 0.8, "macro_f1": 0.79, "mcc": 0.6, "parameters": 1000, "train_seconds": 12.0}
    return {
        "task": "sst2", "primary_metric": "accuracy", "test_rows": 10, "validation_rows": 20, "warnings": ["weak teacher"],
        "teacher": {**row, "accuracy": 0.9, "finetuned": True, "validation": {"accuracy": 0.88}},
        "students": {
            # validation and test disagree: pruned/kd is best on test, pruned/flexkd on validation
            "random/ft": {**row, "student": "random", "method": "ft", "init": "random", "validation": {"accuracy": 0.70}},
            "pruned/flexkd": {**row, "accuracy": 0.81, "student": "pruned", "method": "flexkd", "init": "prune",
                              "validation": {"accuracy": 0.86}},
            "pruned/kd": {**row, "accuracy": 0.85, "student": "pruned", "method": "kd", "init": "prune",
                          "validation": {"accuracy": 0.84}},
        },
    }


def test_the_best_student_is_chosen_on_validation_not_test():
    evaluation = _evaluation()
    order = ["random/ft", "pruned/flexkd", "pruned/kd"]
    assert best_by_validation(evaluation["students"], order, "accuracy") == "pruned/flexkd"
    evaluation["students"]["pruned/kd"]["validation"]["accuracy"] = 0.86  # a tie: the first in params order
    assert best_by_validation(evaluation["students"], order, "accuracy") == "pruned/flexkd"
    assert best_by_validation(evaluation["students"], ["pruned/kd", "pruned/flexkd"], "accuracy") == "pruned/kd"
    del evaluation["students"]["random/ft"]["validation"]
    with pytest.raises(FlexKDError, match=r"random/ft.*no validation 'accuracy'"):
        best_by_validation(evaluation["students"], order, "accuracy")


def test_comparison_table_shows_validation_beside_test_and_marks_the_pick():
    evaluation = _evaluation()
    evaluation["selection"] = {"split": "validation", "metric": "accuracy", "best": "pruned/flexkd"}
    table = comparison_table(evaluation, ["random/ft", "pruned/flexkd", "pruned/kd"])
    assert "validation split (20 rows)" in table and "test split (10 rows) reported only" in table
    assert "| model | student | method | validation accuracy | test accuracy | test macro-F1 | test MCC |" in table
    assert "| teacher | fine-tuned | - | 0.8800 | 0.9000 |" in table
    assert "| student | random: random init | ft | 0.7000 | 0.8000 | 0.7900 | 0.6000 | 1,000 | 12 |" in table
    assert "| **student** (chosen) | **pruned**: pruned from the teacher | **flexkd** | 0.8600 | 0.8100 |" in table
    assert "| student | pruned: pruned from the teacher | kd | 0.8400 | 0.8500 |" in table
    assert "Chosen on validation: pruned/flexkd." in table
    assert "WARNING: weak teacher" in table


def test_generation_table_reports_rouge_and_selects_by_validation_nll():
    evaluation = {
        "task": "alpaca", "primary_metric": "rougeL", "test_rows": 5, "validation_rows": 4,
        "selection": {"split": "validation", "metric": "neg_loss", "best": "pruned/kd"},
        "teacher": {"rougeL": 30.0, "parameters": 10, "finetuned": False, "validation": {"loss": 1.5, "neg_loss": -1.5}},
        "students": {"pruned/kd": {"rougeL": 20.5, "rougeL_std": 0.5, "parameters": 5, "student": "pruned",
                                   "method": "kd", "init": "prune", "train_seconds": 3,
                                   "validation": {"loss": 2.25, "neg_loss": -2.25}}},
    }
    table = comparison_table(evaluation)
    assert "validation NLL | test ROUGE-L | test ROUGE-L std |" in table and "accuracy" not in table
    assert "| teacher | as given | - | 1.5000 | 30.0000 |" in table
    assert "| **pruned**: pruned from the teacher | **kd** | 2.2500 | 20.5000 | 0.5000 |" in table


def test_register_takes_only_a_choice_made_on_todays_validation_data(tmp_path):
    from flexkd.champion import chosen_student
    from flexkd.selection import validation_fingerprint

    cfg = load_config(REPO / "params.yaml")
    paths = paths_for(cfg, tmp_path)
    paths.prepared.mkdir(parents=True)
    (paths.prepared / "validation.jsonl").write_text('{"text": "a", "label": 0}\n')
    evaluation = _evaluation()
    with pytest.raises(FlexKDError, match="no student chosen on the validation split"):
        chosen_student(paths, evaluation)
    evaluation["selection"] = {"split": "validation", "metric": "accuracy", "best": "pruned/flexkd", "value": 0.86,
                               "validation_fingerprint": validation_fingerprint(paths.prepared)}
    chosen = chosen_student(paths, evaluation)
    assert (chosen.key, chosen.metric, chosen.value) == ("pruned/flexkd", "accuracy", 0.86)
    (paths.prepared / "validation.jsonl").write_text('{"text": "b", "label": 1}\n')
    with pytest.raises(FlexKDError, match="chosen on other validation data"):
        chosen_student(paths, evaluation)
    evaluation["selection"]["split"] = "test"
    with pytest.raises(FlexKDError, match="no student chosen on the validation split"):
        chosen_student(paths, evaluation)


def test_the_card_states_the_weights_each_method_trained_with():
    from flexkd.champion import loss_weights

    cfg = load_config(REPO / "params.yaml")
    info = {"alpha": 0.5, "beta": 0.1}
    assert loss_weights(cfg, "ft", info) == {"task": 1.0}
    assert loss_weights(cfg, "kd", info) == {"alpha": 0.5, "temperature": cfg.distill.temperature,
                                              "logit_loss": cfg.distill.logit_loss}
    assert loss_weights(cfg, "flexkd", info)["beta"] == 0.1
    assert loss_weights(cfg, "flexkd", info)["flexkd_loss"] == cfg.distill.flexkd_loss
    assert "flexkd_loss" not in loss_weights(cfg, "cka", info)


def test_no_flow_imports_another_flow():
    """Flows call the library (flexkd/); a flow module that imports another flow module couples two stages."""
    import ast

    flow_modules = {p.stem for p in (REPO / "flows").glob("*.py")
                    if "@flow" in p.read_text(encoding="utf-8")}
    for name in sorted(flow_modules):
        tree = ast.parse((REPO / "flows" / f"{name}.py").read_text(encoding="utf-8"))
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        others = {m.split(".", 1)[1] for m in imported if m.startswith("flows.")} & (flow_modules - {name})
        assert not others, f"flows/{name}.py imports the flow module(s) {sorted(others)}"
