"""Stage 7: register the best student as flexkd-<task> in the MLflow model registry.

The best student is the one the evaluate stage chose on the validation split (``selection`` in
metrics/evaluation.json; the test split is reported, never used to choose). It gets the alias ``champion``
when it beats the current champion on the same validation data (same fingerprint, same metric), else
``challenger``, with the reason. The version's tags say how it was chosen (split, metric, value, validation
fingerprint); a model card (teacher, data, method, validation and test metrics, selected units) goes with it.
Writes reports/registry.json.
"""

from __future__ import annotations

from prefect import flow

from flows.common import load_params, paths_for, read_json, run_cli, write_json


@flow(name="flexkd-register", log_prints=True)
def register_flow(params: str | None = None, sync: bool = False) -> dict:
    if sync:  # a worker with only the code and the DVC remote: pull the inputs, run under dvc repro, push
        from flows.storage import run_synced

        return run_synced("register", params)
    from flexkd import tracking
    from flexkd.errors import FlexKDError
    from flexkd.evaluate import TEST_METRICS as METRICS  # the test metrics the card and tags carry
    from flexkd.relevance import RelevanceIndex
    from flexkd.selection import Selection, selection_label, validation_fingerprint

    cfg = load_params(params)
    paths = paths_for(cfg)
    tracking.setup(paths.root, cfg.project.experiment)
    tracking.check_reachable()
    evaluation = read_json(paths.evaluation)
    primary = evaluation["primary_metric"]
    students = evaluation["students"]
    chosen = evaluation.get("selection") or {}
    if chosen.get("split") != "validation" or chosen.get("best") not in students:
        raise FlexKDError(f"{paths.evaluation} records no student chosen on the validation split (written by an older "
                          "evaluate stage?); rerun the evaluate stage (dvc repro does it)")
    fingerprint_now = validation_fingerprint(paths.prepared)
    if chosen["validation_fingerprint"] != fingerprint_now:
        raise FlexKDError(f"{paths.evaluation} was chosen on other validation data than {paths.prepared} holds now; "
                          "rerun the evaluate stage (dvc repro does it)")
    key = chosen["best"]
    best = students[key]
    selection = Selection(key=key, metric=chosen["metric"], value=float(chosen["value"]),
                          validation_fingerprint=fingerprint_now)
    student_name, method = best["student"], best["method"]
    if not cfg.register_.enabled:
        result = {"registered": False, "best": key, "selection": selection.as_tags()}
        write_json(paths.registry, result)
        return result
    with tracking.stage_run("register", project_root=paths.root, experiment=cfg.project.experiment,
                            params={"best_student": student_name, "best_method": method, "primary_metric": primary,
                                    **{f"selection.{k}": v for k, v in selection.as_tags().items()}}):
        teacher_info = read_json(paths.teacher / "flexkd_teacher.json")
        student_info = read_json(paths.student(student_name, method) / "flexkd_student.json")
        manifest = read_json(paths.prepared / "manifest.json")
        index = RelevanceIndex.load(paths.relevance / "index.json")
        card = tracking.model_card(
            task=cfg.data.task,
            teacher={"spec": teacher_info["spec"], "weights_hash": teacher_info["weights_hash"],
                     "validation": {k: v for k, v in evaluation["teacher"].get("validation", {}).items() if k != "neg_loss"},
                     "test": {k: v for k, v in evaluation["teacher"].items() if k in METRICS},
                     "parameters": evaluation["teacher"]["parameters"]},
            student={"name": student_name, **cfg.student(student_name).model_dump(exclude_none=True),
                     "parameters": best["parameters"], "weights_hash": student_info["weights_hash"],
                     **({"pruning": {k: student_info["pruning"][k] for k in ("layers", "parameter_ratio")}}
                        if "pruning" in student_info else {})},
            data={"prepared": str(paths.prepared.relative_to(paths.root)), "rows": manifest["rows"],
                  "fingerprint": manifest["fingerprint"], "sources": manifest["sources"]},
            method=method, loss_weights=loss_weights(cfg, method, student_info),
            metrics={"validation": {k: v for k, v in best["validation"].items() if k != "neg_loss"},
                     "test": {k: v for k, v in best.items() if k in METRICS}},
            selection_note=(f"Chosen among {len(students)} students on the validation split "
                            f"({evaluation.get('validation_rows', '?')} rows) by {selection_label(selection.metric)}; "
                            f"the test split ({evaluation['test_rows']} rows) is reported only, never used to choose."),
            selected_units=(sorted(index.indices) if student_info["init"] == "prune"
                            else index.indices if cfg.distill.method(method).reads_selected_units else None),
            task_format=cfg.data.format,
            relevance={"method": index.method, "n_examples": index.n_examples, "k": index.k, "d_teacher": index.d_teacher},
        )
        result = tracking.register_student(
            cfg.data.task, model_uri=best["model_uri"], run_id=best["run_id"], selection=selection, model_card_md=card,
            test_metrics={k: v for k, v in best.items() if k in METRICS},
            tags={"method": method, "student": student_name, "teacher": teacher_info["spec"],
                  "data_fingerprint": manifest["fingerprint"]},
        )
        result.update(best=key, best_student=student_name, best_method=method, primary_metric=primary,
                      selection=selection.as_tags(), test={k: v for k, v in best.items() if k in METRICS})
        write_json(paths.registry, result)
        print(f"registered {result['name']} version {result['version']} ({key}, chosen on validation: "
              f"{selection.metric} {selection.value:.4f}) as {result['alias']}: {result['reason']}")
    return result


def loss_weights(cfg, method: str, student_info: dict) -> dict:
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


if __name__ == "__main__":
    run_cli(register_flow, "Register the best student in the MLflow model registry.")
