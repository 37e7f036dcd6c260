"""Log finished students that never reached MLflow, then register the best: the command for after an MLflow outage.

The distill stage writes each student to disk (``runs/students/<task>/<student>/<method>/``: the
``save_pretrained`` checkpoint and ``flexkd_student.json``) before it talks to MLflow after training. If the
tracking server goes away then, the stage fails, but the student stays there with ``"model_uri": null``. Once
the server answers again, ``python -m flows.publish``:

1. logs each such student as an MLflow model: into its distill run when the tracking store still has that run,
   else into a new run ``publish-<student>-<method>``; its weights are checked against the hash recorded at
   training first (a changed or corrupted student is refused, never published);
2. records the model URI (and the run) in its ``flexkd_student.json``;
3. when every student of ``distill.students`` x ``distill.methods`` is on disk, runs the evaluate and register
   stages, so the best student is registered as ``flexkd-<task>`` exactly as at the end of ``dvc repro``
   (``--no-register`` stops after step 2).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.common import load_params, paths_for, read_json, write_json


def log_student(cfg, paths, task, student: str, method: str, info: dict, directory: Path) -> dict:
    """Log one on-disk student as an MLflow model; return what changes in its flexkd_student.json."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from flexkd import tracking

    run_id = info.get("run_id")
    try:
        run = mlflow.MlflowClient().get_run(run_id) if run_id else None
    except MlflowException:
        run = None
    best = {f"best_validation/{k}": v for k, v in (info.get("validation") or {}).items()}
    tags = {"flexkd.published_later": "true"}
    if run is not None and run.info.lifecycle_stage == "active":  # the distill run: metrics and model together
        with mlflow.start_run(run_id=run_id):
            tracking.log_metrics(best)
            tracking.set_tags(tags)
            return {"model_uri": task.log_model(tracking, directory, paths.prepared, name=f"{student}-{method}")}
    with tracking.stage_run("publish", project_root=paths.root, experiment=cfg.project.experiment,
                            params={"student_name": student, "method": method, "original_run_id": run_id},
                            tags={"flexkd.method": method, "flexkd.student": student, **tags},
                            run_name=f"publish-{student}-{method}") as new:
        tracking.log_metrics(best)
        uri = task.log_model(tracking, directory, paths.prepared, name=f"{student}-{method}")
    return {"model_uri": uri, "run_id": new.info.run_id, "original_run_id": run_id}


@flow(name="flexkd-publish", log_prints=True)
def publish_flow(params: str | None = None, register: bool = True) -> dict:
    """Log the on-disk students that lack an MLflow model; then evaluate and register (see the module docstring)."""
    from flexkd import tracking
    from flexkd.errors import FlexKDError, ProvenanceError
    from flexkd.provenance import weights_hash
    from flexkd.tasks import task_for

    cfg = load_params(params)
    paths = paths_for(cfg)
    task = task_for(cfg)
    tracking.setup(paths.root, cfg.project.experiment)  # an unreachable server fails here, naming the URI
    published, missing = [], []
    for student in cfg.distill.students:
        for method in cfg.distill.methods:
            directory = paths.student(student, method)
            info_path = directory / "flexkd_student.json"
            if not info_path.is_file():
                missing.append(f"{student}/{method}")
                continue
            info = read_json(info_path)
            if info.get("model_uri"):
                continue
            found = weights_hash(directory)
            if found != info["weights_hash"]:
                raise ProvenanceError(f"{directory}: the weights do not match the hash recorded when the student was "
                                      "trained; not published (rerun its distill stage)")
            info.update(log_student(cfg, paths, task, student, method, info, directory))
            write_json(info_path, info)
            published.append(f"{student}/{method}")
            print(f"published {student}/{method} from {directory} as {info['model_uri']}")
    result = {"published": published, "missing": missing, "registered": None}
    if not published:
        print("every student on disk already has its MLflow model")
    if not register:
        return result
    if missing:
        raise FlexKDError(
            f"published {published or 'nothing'}; not registering: evaluate compares every student of "
            f"distill.students x distill.methods, and {missing} never finished training (run `dvc repro`, which "
            "resumes them, or `python -m flows.publish --no-register`)"
        )
    from flexkd.champion import evaluate_models, register_champion  # the evaluate and register stages' work

    evaluate_models(cfg, paths)
    result["registered"] = register_champion(cfg, paths)
    return result


if __name__ == "__main__":
    import argparse
    import sys

    from flexkd.errors import FlexKDError

    parser = argparse.ArgumentParser(description="Log on-disk students that lack an MLflow model; then evaluate "
                                                 "and register the best.")
    parser.add_argument("--params", default=None, help="params file (default: params.yaml in the project root)")
    parser.add_argument("--no-register", action="store_true", help="only log the models; skip evaluate and register")
    args = parser.parse_args()
    try:
        publish_flow(params=args.params, register=not args.no_register)
    except FlexKDError as err:
        print(f"\nflexkd: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
