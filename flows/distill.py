"""Stage 5 (one run per student set-up and method): distill a student from the tuned teacher.

Methods: ft (task only), kd (logits), projector, cka, flexkd (logits + that feature term), or one of
distill.composed_methods (its loss terms with their weights; flexkd/losses/methods.py). Flex-KD pairs
student unit i with teacher unit S[i] of the relevance index, which must match the teacher and data.
Students: random init, loaded from a path, or pruned from the teacher to the selected units (then unit i
starts as teacher unit S[i], S ascending). Writes runs/students/<task>/<student>/<method>/ (save_pretrained +
flexkd_student.json) and metrics/distill/<student>/<method>.json; logs every loss term per step and the
student as an MLflow model.
"""

from __future__ import annotations

from prefect import flow

from flows.common import load_params, paths_for, preflight, read_json, run_cli, write_json


def check_teacher_beats_ft(cfg, paths, student: str, method: str) -> None:
    """Before distilling from the teacher, compare it with the ft student (run first) on the validation split.

    A teacher that does not beat a student trained without it makes every distillation run a waste: warn loudly,
    or stop when teacher.require_better_than_ft is set.
    """
    import warnings

    from flexkd.errors import FlexKDError

    ft_metrics = paths.distill_metrics(student, "ft")
    teacher_info = paths.teacher / "flexkd_teacher.json"
    if not cfg.distill.method(method).needs_teacher or not ft_metrics.exists() or not teacher_info.exists():
        return
    from flexkd.tasks import task_for

    metric = task_for(cfg).selection_metric
    teacher_score = read_json(teacher_info)["validation"][metric]
    ft_score = read_json(ft_metrics)["validation"][metric]
    if teacher_score > ft_score:
        return
    message = (f"the teacher (validation {metric} {teacher_score:.4f}) does not beat the ft student ({ft_score:.4f}); "
               f"distilling {method} from it wastes the run. Tune the teacher longer (teacher.finetune.*) or pick a stronger one.")
    if cfg.teacher.require_better_than_ft:
        raise FlexKDError(message + " Stopping: teacher.require_better_than_ft is true.")
    banner = "!" * 100
    print(f"\n{banner}\nWARNING: {message}\n{banner}\n")
    warnings.warn(message, stacklevel=1)


@flow(name="flexkd-distill", log_prints=True)
def distill_flow(student: str, method: str, params: str | None = None, sync: bool = False) -> dict:
    if sync:  # a worker with only the code and the DVC remote: pull the inputs, run under dvc repro, push
        from flows.storage import run_synced

        return run_synced("distill", params, student=student, method=method)
    from flexkd import stages, tracking
    from flexkd.distill import stage_params
    from flexkd.errors import ConfigError, FlexKDError
    from flexkd.tasks import task_for
    from flexkd.train import set_threads

    cfg = load_params(params)
    if method not in cfg.distill.method_names:
        raise ConfigError(f"--method {method!r}: unknown; valid: {cfg.distill.method_names}")
    if method not in cfg.distill.methods:
        raise ConfigError(f"--method {method!r} is not in distill.methods {cfg.distill.methods}")
    if student not in cfg.distill.students:
        raise ConfigError(f"--student {student!r} is not in distill.students {cfg.distill.students}")
    paths = paths_for(cfg)
    preflight(cfg, tuned_teacher=True)  # device, k <= d_T, prune plan, student tokenizer: before any model is loaded
    check_teacher_beats_ft(cfg, paths, student, method)
    task = task_for(cfg)
    set_threads()
    tracking.setup(paths.root, cfg.project.experiment)
    tracking.check_reachable()
    params_logged = {**stage_params(cfg, student, method), "runtime": task.runtime.describe()}
    with tracking.stage_run(f"distill-{student}", project_root=paths.root, experiment=cfg.project.experiment,
                            params=params_logged, tags={"flexkd.method": method, "flexkd.student": student},
                            run_name=f"distill-{student}-{method}") as run:
        out = stages.distill(cfg, paths, task, student, method, log=tracking.log_metrics, run_id=run.info.run_id,
                             on_setup=lambda setup: tracking.set_tags({"flexkd.teacher_outputs": setup.teacher_outputs}))
        summary, out_dir = out["summary"], out["out_dir"]
        try:
            tracking.log_metrics({f"best_validation/{k}": v for k, v in out["scores"].items()})
            summary["model_uri"] = task.log_model(tracking, out_dir, paths.prepared, name=f"{student}-{method}")
        except Exception as err:  # noqa: BLE001 - whatever MLflow raised, say where the student is
            message = (f"{student}/{method}: the trained student is saved in {out_dir}, but logging it to MLflow failed "
                       f"({type(err).__name__}: {err}); once the tracking server answers, `python -m flows.publish` "
                       "logs it and registers the best student")
            print(f"\nflexkd: {message}\n")
            raise FlexKDError(message) from err
        write_json(out_dir / "flexkd_student.json", summary)
    return summary


if __name__ == "__main__":
    run_cli(distill_flow, "Distill one student.", method=True)
