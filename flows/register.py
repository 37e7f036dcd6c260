"""Stage 7: register the best student as flexkd-<task> in the MLflow model registry.

The best by the primary test metric gets alias ``champion`` if it beats the current champion, else
``challenger`` only. A model card (teacher, data, method, metrics, selected units) goes with the version.
Writes reports/registry.json.
"""

from __future__ import annotations

from prefect import flow

from flows.common import load_params, paths_for, read_json, run_cli, write_json
from flows.evaluate import best_student


METRICS = ("accuracy", "macro_f1", "mcc", "rougeL", "rougeL_std", "rougeL_greedy")


@flow(name="flexkd-register", log_prints=True)
def register_flow(params: str | None = None) -> dict:
    from flexkd import tracking
    from flexkd.relevance import RelevanceIndex

    cfg = load_params(params)
    paths = paths_for(cfg)
    tracking.setup(paths.root, cfg.project.experiment)
    tracking.check_reachable()
    evaluation = read_json(paths.evaluation)
    primary = evaluation["primary_metric"]
    students = evaluation["students"]
    # Ties go to the first in params order (the order of the comparison table).
    key = best_student(evaluation, [f"{s}/{m}" for s in cfg.distill.students for m in cfg.distill.methods])
    best = students[key]
    student_name, method = best["student"], best["method"]
    if not cfg.register_.enabled:
        result = {"registered": False, "best": key, primary: best[primary]}
        write_json(paths.registry, result)
        return result
    with tracking.stage_run("register", project_root=paths.root, experiment=cfg.project.experiment,
                            params={"best_student": student_name, "best_method": method, "primary_metric": primary}):
        teacher_info = read_json(paths.teacher / "flexkd_teacher.json")
        student_info = read_json(paths.student(student_name, method) / "flexkd_student.json")
        manifest = read_json(paths.prepared / "manifest.json")
        index = RelevanceIndex.load(paths.relevance / "index.json")
        if method == "ft":  # the task loss alone: no teacher term
            weights = {"task": 1.0}
        else:
            weights = {"alpha": student_info["alpha"], "temperature": cfg.distill.temperature,
                       "logit_loss": cfg.distill.logit_loss}
        if method in ("projector", "cka", "flexkd"):
            weights["beta"] = student_info["beta"]
        if method == "flexkd":
            weights["flexkd_loss"] = cfg.distill.flexkd_loss
        card = tracking.model_card(
            task=cfg.data.task,
            teacher={"spec": teacher_info["spec"], "weights_hash": teacher_info["weights_hash"],
                     "test": {k: v for k, v in evaluation["teacher"].items() if k in METRICS},
                     "parameters": evaluation["teacher"]["parameters"]},
            student={"name": student_name, **cfg.student(student_name).model_dump(exclude_none=True),
                     "parameters": best["parameters"], "weights_hash": student_info["weights_hash"],
                     **({"pruning": {k: student_info["pruning"][k] for k in ("layers", "parameter_ratio")}}
                        if "pruning" in student_info else {})},
            data={"prepared": str(paths.prepared.relative_to(paths.root)), "rows": manifest["rows"],
                  "fingerprint": manifest["fingerprint"], "sources": manifest["sources"]},
            method=method, loss_weights=weights,
            metrics={k: v for k, v in best.items() if k in METRICS},
            selected_units=(sorted(index.indices) if student_info["init"] == "prune"
                            else index.indices if method == "flexkd" else None),
            task_format=cfg.data.format,
            relevance={"method": index.method, "n_examples": index.n_examples, "k": index.k, "d_teacher": index.d_teacher},
        )
        result = tracking.register_student(
            cfg.data.task, model_uri=best["model_uri"], run_id=best["run_id"], metric_name=f"test_{primary}",
            metric_value=best[primary], model_card_md=card,
            tags={"method": method, "student": student_name, "teacher": teacher_info["spec"],
                  "data_fingerprint": manifest["fingerprint"]},
        )
        result.update(best=key, best_student=student_name, best_method=method, primary_metric=primary, value=best[primary])
        write_json(paths.registry, result)
        print(f"registered {result['name']} version {result['version']} ({key}, {primary} {best[primary]:.4f}) "
              f"as {result['alias']}")
    return result


if __name__ == "__main__":
    run_cli(register_flow, "Register the best student in the MLflow model registry.")
