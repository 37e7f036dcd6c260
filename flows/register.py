"""Stage 7: register the best student as flexkd-<task> in the MLflow model registry.

The best by the primary test metric gets alias ``champion`` if it beats the current champion, else
``challenger`` only. A model card (teacher, data, method, metrics, selected units) goes with the version.
Writes reports/registry.json.
"""

from __future__ import annotations

from prefect import flow

from flows.common import load_params, paths_for, read_json, run_cli, write_json


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
    # Ties go to the method listed first in distill.methods (the order of the comparison table).
    method = max((m for m in cfg.distill.methods if m in students), key=lambda m: students[m][primary])
    best = students[method]
    if not cfg.register_.enabled:
        result = {"registered": False, "best_method": method, primary: best[primary]}
        write_json(paths.registry, result)
        return result
    with tracking.stage_run("register", project_root=paths.root, experiment=cfg.project.experiment,
                            params={"best_method": method, "primary_metric": primary}):
        teacher_info = read_json(paths.teacher / "flexkd_teacher.json")
        student_info = read_json(paths.student(method) / "flexkd_student.json")
        manifest = read_json(paths.prepared / "manifest.json")
        index = RelevanceIndex.load(paths.relevance / "index.json")
        weights = {"alpha": cfg.distill.alpha, "temperature": cfg.distill.temperature}
        if method in ("projector", "cka", "flexkd"):
            weights["beta"] = getattr(cfg.distill.feature_weight, method)
        if method == "flexkd":
            weights["flexkd_loss"] = cfg.distill.flexkd_loss
        card = tracking.model_card(
            task=cfg.data.task,
            teacher={"spec": teacher_info["spec"], "weights_hash": teacher_info["weights_hash"],
                     "test": {k: evaluation["teacher"][k] for k in ("accuracy", "macro_f1", "mcc")},
                     "parameters": evaluation["teacher"]["parameters"]},
            student={**cfg.student.model_dump(), "parameters": best["parameters"], "weights_hash": student_info["weights_hash"]},
            data={"prepared": str(paths.prepared.relative_to(paths.root)), "rows": manifest["rows"],
                  "fingerprint": manifest["fingerprint"], "sources": manifest["sources"]},
            method=method, loss_weights=weights,
            metrics={k: best[k] for k in ("accuracy", "macro_f1", "mcc")},
            selected_units=index.indices if method == "flexkd" else None,
            relevance={"method": index.method, "n_examples": index.n_examples, "k": index.k, "d_teacher": index.d_teacher},
        )
        result = tracking.register_student(
            cfg.data.task, model_uri=best["model_uri"], run_id=best["run_id"], metric_name=f"test_{primary}",
            metric_value=best[primary], model_card_md=card,
            tags={"method": method, "teacher": teacher_info["spec"], "data_fingerprint": manifest["fingerprint"]},
        )
        result.update(best_method=method, primary_metric=primary, value=best[primary])
        write_json(paths.registry, result)
        print(f"registered {result['name']} version {result['version']} ({method}, {primary} {best[primary]:.4f}) "
              f"as {result['alias']}")
    return result


if __name__ == "__main__":
    run_cli(register_flow, "Register the best student in the MLflow model registry.")
