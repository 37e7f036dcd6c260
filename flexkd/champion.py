"""The evaluate and register stages' work: score every model on test, choose on validation, register the choice.

``evaluate_models`` scores the teacher and every student on the held-out test split, warns when the teacher does
not beat an ft student, chooses the best student on the validation split only (the scores its distill run
recorded: :mod:`flexkd.selection`) and writes metrics/evaluation.json and reports/comparison.md, all inside the
``evaluate`` MLflow run. ``register_champion`` registers that student as ``flexkd-<task>`` with its model card
and the alias ``champion`` or ``challenger`` (:func:`flexkd.tracking.register_student`), inside the ``register``
run. The stage flows (``flows/evaluate.py``, ``flows/register.py``) and ``python -m flows.publish`` call these.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from flexkd.config import FlexKDConfig
from flexkd.evaluate import TEST_METRICS
from flexkd.project import Paths, read_json, write_json


def _score_all(cfg: FlexKDConfig, paths: Paths, task, tracking) -> tuple[dict, dict]:
    """Test scores of the teacher and every student (logged to the evaluate run and to each student's run), and
    the generated outputs by model name (generation; None for classification)."""
    from flexkd import resources
    from flexkd.data.prepare import load_split
    from flexkd.models import count_parameters, load_tokenizer

    tokenizer = load_tokenizer(str(paths.teacher))
    outputs: dict[str, list[str] | None] = {}

    def score(directory, name):
        model = task.load_model(str(directory)).to(task.runtime.device)  # evaluated under the runtime's autocast
        own = tokenizer if Path(directory) == Path(paths.teacher) else load_tokenizer(str(directory))  # as deployed
        with resources.compute():
            scores, predictions = task.test_scores(model, own, paths.prepared)
        outputs[name] = predictions
        return {**scores, "parameters": count_parameters(model)}

    teacher_info = read_json(paths.teacher / "flexkd_teacher.json")
    teacher_timing = read_json(paths.teacher_metrics) if paths.teacher_metrics.exists() else {}
    test_rows = len(load_split(paths.prepared / "test.jsonl"))
    validation_rows = len(load_split(paths.prepared / "validation.jsonl"))
    if task.is_generation and cfg.generation.eval_max_examples:
        test_rows = min(test_rows, cfg.generation.eval_max_examples)
    evaluation = {
        "task": cfg.data.task, "format": cfg.data.format, "primary_metric": cfg.evaluate.primary_metric,
        "test_rows": test_rows, "validation_rows": validation_rows,
        "teacher": {**score(paths.teacher, "teacher"), "train_seconds": teacher_timing.get("train_seconds", 0.0),
                    "validation": teacher_info.get("validation", {}),
                    "finetuned": teacher_info["finetuned"], "spec": teacher_info["spec"]},
        "students": {}, "warnings": [],
    }
    metric_keys = [k for k in TEST_METRICS if k in evaluation["teacher"]]
    tracking.log_metrics({f"test/teacher/{k}": evaluation["teacher"][k] for k in metric_keys})
    for student in cfg.distill.students:
        for method in cfg.distill.methods:
            key = f"{student}/{method}"
            info = read_json(paths.student(student, method) / "flexkd_student.json")
            metrics = {**score(paths.student(student, method), key), "student": student, "method": method,
                       "init": info["init"], "train_seconds": info["train_seconds"], "run_id": info["run_id"],
                       "validation": info["validation"], "model_uri": info["model_uri"]}
            evaluation["students"][key] = metrics
            tracking.log_metrics({f"test/{student}/{method}/{k}": metrics[k] for k in metric_keys})
            tracking.log_metrics_to_run(info["run_id"], {f"test/{k}": metrics[k] for k in metric_keys})
    for problem in (teacher_info.get("quality") or {}).get("problems", []):  # found by the teacher stage
        evaluation["warnings"].append(f"teacher: {problem}")
    return evaluation, {"tokenizer": tokenizer, "outputs": outputs}


def _warn_weak_teacher(cfg: FlexKDConfig, task, evaluation: dict) -> None:
    """Warn loudly (or stop, with teacher.require_better_than_ft) when the teacher does not beat an ft student on
    validation: distilling from it wastes the run."""
    from flexkd.errors import FlexKDError
    from flexkd.selection import selection_label, selection_value_text

    for student in cfg.distill.students:
        ft = evaluation["students"].get(f"{student}/ft")
        if ft is None:
            continue
        metric = task.selection_metric  # compared on validation, like every other decision
        t, f = evaluation["teacher"]["validation"].get(metric), ft["validation"][metric]
        if t is not None and t <= f:
            message = (f"the teacher ({selection_label(metric)} {selection_value_text(metric, t)}) does not beat "
                       f"the ft student of '{student}' ({selection_value_text(metric, f)}): distilling from it wastes "
                       "the run; tune the teacher longer (teacher.finetune.*) or pick a stronger one")
            evaluation["warnings"].append(message)
            banner = "!" * 100
            print(f"\n{banner}\nWARNING: {message}\n{banner}\n")
            warnings.warn(message, stacklevel=1)
            if cfg.teacher.require_better_than_ft:
                raise FlexKDError(message + " (teacher.require_better_than_ft is true)")


def evaluate_models(cfg: FlexKDConfig, paths: Paths) -> dict:
    """The evaluate stage under its MLflow run (see the module docstring); returns metrics/evaluation.json's dict."""
    from flexkd import tracking
    from flexkd.data.prepare import load_split
    from flexkd.selection import best_by_validation, comparison_table, validation_fingerprint
    from flexkd.tasks import task_for
    from flexkd.train import set_threads

    task = task_for(cfg)
    set_threads()
    tracking.setup(paths.root, cfg.project.experiment)
    order = [f"{s}/{m}" for s in cfg.distill.students for m in cfg.distill.methods]
    with tracking.stage_run("evaluate", project_root=paths.root, experiment=cfg.project.experiment,
                            params={"evaluate": cfg.evaluate.model_dump(), "students": order,
                                    "runtime": task.runtime.describe()}):
        evaluation, produced = _score_all(cfg, paths, task, tracking)
        _warn_weak_teacher(cfg, task, evaluation)
        if task.is_generation:
            from flexkd.generate import sample_table

            records = load_split(paths.prepared / "test.jsonl")[: evaluation["test_rows"]]
            formatter = task.formatter(produced["tokenizer"])
            table = sample_table(records, {k: v for k, v in produced["outputs"].items() if v is not None},
                                 n=cfg.generation.sample_rows, formatter_prompt=formatter.prompt)
            tracking.log_text_table(table, "samples/test_samples.json")

        # the choice: validation only (what the distill runs recorded); test is reported, never used to choose
        metric = task.selection_metric
        best = best_by_validation(evaluation["students"], order, metric)
        evaluation["selection"] = {"split": "validation", "metric": metric, "best": best,
                                   "value": evaluation["students"][best]["validation"][metric],
                                   "validation_fingerprint": validation_fingerprint(paths.prepared)}
        write_json(paths.evaluation, evaluation)
        paths.comparison.parent.mkdir(parents=True, exist_ok=True)
        paths.comparison.write_text(comparison_table(evaluation, order), encoding="utf-8")
        tracking.log_artifact(paths.comparison, "reports")
        tracking.log_artifact(paths.evaluation, "reports")
        print(paths.comparison.read_text())
    return evaluation


def chosen_student(paths: Paths, evaluation: dict):
    """The :class:`flexkd.selection.Selection` the evaluate stage recorded, checked against today's validation
    data: an evaluation without a validation choice, or chosen on other validation data, is refused."""
    from flexkd.errors import FlexKDError
    from flexkd.selection import Selection, validation_fingerprint

    chosen = evaluation.get("selection") or {}
    if chosen.get("split") != "validation" or chosen.get("best") not in evaluation["students"]:
        raise FlexKDError(f"{paths.evaluation} records no student chosen on the validation split (written by an older "
                          "evaluate stage?); rerun the evaluate stage (dvc repro does it)")
    fingerprint_now = validation_fingerprint(paths.prepared)
    if chosen["validation_fingerprint"] != fingerprint_now:
        raise FlexKDError(f"{paths.evaluation} was chosen on other validation data than {paths.prepared} holds now; "
                          "rerun the evaluate stage (dvc repro does it)")
    return Selection(key=chosen["best"], metric=chosen["metric"], value=float(chosen["value"]),
                     validation_fingerprint=fingerprint_now)


def loss_weights(cfg: FlexKDConfig, method: str, student_info: dict) -> dict:
    """The model card's loss weights of the student's method, from its terms: a built-in method's alpha and beta
    (as the run used them), a composed method's term weights; the logit term's and Flex-KD term's settings."""
    from flexkd.losses.methods import FEATURE_WEIGHT

    spec = cfg.distill.method(method)
    terms = spec.terms
    if method in cfg.distill.composed_methods:
        weights = dict(spec.weights)
    elif not spec.needs_teacher:  # the task loss alone (ft)
        weights = {"task": 1.0}
    else:
        weights = {"alpha": student_info["alpha"]}
    if any(term.needs_teacher_logits for term in terms.values()):
        weights.update(temperature=cfg.distill.temperature, logit_loss=cfg.distill.logit_loss)
    if FEATURE_WEIGHT in spec.weights.values():
        weights["beta"] = student_info["beta"]
    if "flexkd" in terms:
        weights["flexkd_loss"] = cfg.distill.flexkd_loss
    return weights


def champion_card(cfg: FlexKDConfig, paths: Paths, evaluation: dict, selection) -> str:
    """The chosen student's model card (teacher, data, method, validation and test metrics, selected units)."""
    from flexkd import tracking
    from flexkd.relevance import RelevanceIndex
    from flexkd.selection import selection_label

    best = evaluation["students"][selection.key]
    student_name, method = best["student"], best["method"]
    teacher_info = read_json(paths.teacher / "flexkd_teacher.json")
    student_info = read_json(paths.student(student_name, method) / "flexkd_student.json")
    manifest = read_json(paths.prepared / "manifest.json")
    index = RelevanceIndex.load(paths.relevance / "index.json")
    return tracking.model_card(
        task=cfg.data.task,
        teacher={"spec": teacher_info["spec"], "weights_hash": teacher_info["weights_hash"],
                 "validation": {k: v for k, v in evaluation["teacher"].get("validation", {}).items() if k != "neg_loss"},
                 "test": {k: v for k, v in evaluation["teacher"].items() if k in TEST_METRICS},
                 "parameters": evaluation["teacher"]["parameters"]},
        student={"name": student_name, **cfg.student(student_name).model_dump(exclude_none=True),
                 "parameters": best["parameters"], "weights_hash": student_info["weights_hash"],
                 **({"pruning": {k: student_info["pruning"][k] for k in ("layers", "parameter_ratio")}}
                    if "pruning" in student_info else {}),
                 **({"vocabulary_kept": "{tokens_kept} of {tokens_before} tokens (those of the training split)".format(
                     **student_info["vocabulary"])} if "vocabulary" in student_info else {})},
        data={"prepared": str(paths.prepared.relative_to(paths.root)), "rows": manifest["rows"],
              "fingerprint": manifest["fingerprint"], "sources": manifest["sources"]},
        method=method, loss_weights=loss_weights(cfg, method, student_info),
        metrics={"validation": {k: v for k, v in best["validation"].items() if k != "neg_loss"},
                 "test": {k: v for k, v in best.items() if k in TEST_METRICS}},
        selection_note=(f"Chosen among {len(evaluation['students'])} students on the validation split "
                        f"({evaluation.get('validation_rows', '?')} rows) by {selection_label(selection.metric)}; "
                        f"the test split ({evaluation['test_rows']} rows) is reported only, never used to choose."),
        selected_units=(sorted(index.indices) if student_info["init"] == "prune"
                        else index.indices if cfg.distill.method(method).reads_selected_units else None),
        task_format=cfg.data.format,
        relevance={"method": index.method, "n_examples": index.n_examples, "k": index.k, "d_teacher": index.d_teacher},
    )


def register_champion(cfg: FlexKDConfig, paths: Paths) -> dict:
    """The register stage under its MLflow run (see the module docstring); returns reports/registry.json's dict."""
    from flexkd import tracking

    tracking.setup(paths.root, cfg.project.experiment)
    tracking.check_reachable()
    evaluation = read_json(paths.evaluation)
    selection = chosen_student(paths, evaluation)
    key = selection.key
    best = evaluation["students"][key]
    student_name, method, primary = best["student"], best["method"], evaluation["primary_metric"]
    if not cfg.register_.enabled:
        result = {"registered": False, "best": key, "selection": selection.as_tags()}
        write_json(paths.registry, result)
        return result
    with tracking.stage_run("register", project_root=paths.root, experiment=cfg.project.experiment,
                            params={"best_student": student_name, "best_method": method, "primary_metric": primary,
                                    **{f"selection.{k}": v for k, v in selection.as_tags().items()}}):
        teacher_info = read_json(paths.teacher / "flexkd_teacher.json")
        manifest = read_json(paths.prepared / "manifest.json")
        card = champion_card(cfg, paths, evaluation, selection)
        test = {k: v for k, v in best.items() if k in TEST_METRICS}
        result = tracking.register_student(
            cfg.data.task, model_uri=best["model_uri"], run_id=best["run_id"], selection=selection, model_card_md=card,
            test_metrics=test,
            tags={"method": method, "student": student_name, "teacher": teacher_info["spec"],
                  "data_fingerprint": manifest["fingerprint"]},
        )
        result.update(best=key, best_student=student_name, best_method=method, primary_metric=primary,
                      selection=selection.as_tags(), test=test)
        write_json(paths.registry, result)
        print(f"registered {result['name']} version {result['version']} ({key}, chosen on validation: "
              f"{selection.metric} {selection.value:.4f}) as {result['alias']}: {result['reason']}")
    return result
