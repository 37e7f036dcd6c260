"""Stage 4b (optional, augment.enabled): teacher-labelled copies of the training texts for the students.

Copies of the training split's longer texts with words replaced by their nearest training-split words in the
teacher's input-embedding space, labelled by the tuned teacher (flexkd/augment.py). Writes
data/augmented/<task>/train.jsonl and meta.json; disabled: only a meta.json that says so. The teacher cache and
the distill runs read the training split plus these rows; the teacher and relevance scoring read the split alone.
"""

from __future__ import annotations

from prefect import flow

from flows.common import load_params, paths_for, preflight, run_cli


@flow(name="flexkd-augment", log_prints=True)
def augment_flow(params: str | None = None, sync: bool = False) -> dict:
    if sync:  # a worker with only the code and the DVC remote: pull the inputs, run under dvc repro, push
        from flows.storage import run_synced

        return run_synced("augment", params)
    from flexkd import tracking
    from flexkd.augment import META_FILE, run_stage
    from flexkd.tasks import task_for
    from flexkd.train import set_threads

    cfg = load_params(params)
    paths = paths_for(cfg)
    if not cfg.augment.enabled:
        return run_stage(cfg, paths, None)
    preflight(cfg, tuned_teacher=True)  # wrong sizes, plans or tokenizers: before any model is loaded
    task = task_for(cfg)
    set_threads()
    tracking.setup(paths.root, cfg.project.experiment)
    tracking.check_reachable()
    with tracking.stage_run("augment", project_root=paths.root, experiment=cfg.project.experiment,
                            params={"augment": cfg.augment.model_dump(), "runtime": task.runtime.describe()}):
        out = run_stage(cfg, paths, task, log=tracking.log_metrics)
        tracking.log_artifact(paths.augmented / META_FILE, "augment")
    return out


if __name__ == "__main__":
    run_cli(augment_flow, "Write teacher-labelled augmented copies of the training texts for the students.")
