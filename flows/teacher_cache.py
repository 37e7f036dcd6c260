"""Stage 5a (optional, teacher_cache.enabled): run the tuned teacher once over the training split and store what
distillation reads, so that the distill runs do not run the teacher in every step.

Stores the teacher's last hidden state at the compared positions restricted to the relevance-selected units
(d_S per position, not d_T; all units when projector or cka are trained, see teacher_cache.features), and its
logits (classification: all classes; generation: top-k per response position plus a tail logit). Writes
data/teacher_cache/<task>/ (memory-mappable .npy arrays + meta.json with provenance and file hashes). Disabled:
writes only a meta.json that says so, and the distill runs use the teacher online.
"""

from __future__ import annotations

from prefect import flow

from flows.common import load_params, paths_for, preflight, run_cli


@flow(name="flexkd-teacher-cache", log_prints=True)
def teacher_cache_flow(params: str | None = None, sync: bool = False) -> dict:
    if sync:  # a worker with only the code and the DVC remote: pull the inputs, run under dvc repro, push
        from flows.storage import run_synced

        return run_synced("teacher_cache", params)
    from flexkd import stages, tracking
    from flexkd.tasks import task_for
    from flexkd.train import set_threads

    cfg = load_params(params)
    paths = paths_for(cfg)
    if not cfg.teacher_cache.enabled:
        return stages.teacher_cache(cfg, paths, None)
    preflight(cfg, tuned_teacher=True)  # wrong sizes, plans or tokenizers: before any model is loaded
    task = task_for(cfg)
    set_threads()
    tracking.setup(paths.root, cfg.project.experiment)
    tracking.check_reachable()
    with tracking.stage_run("teacher_cache", project_root=paths.root, experiment=cfg.project.experiment,
                            params={"teacher_cache": cfg.teacher_cache.model_dump(),
                                    "teacher_top_k": cfg.distill.teacher_top_k, "temperature": cfg.distill.temperature,
                                    "runtime": task.runtime.describe()}):
        out = stages.teacher_cache(cfg, paths, task, log=tracking.log_metrics)
        tracking.log_artifact(paths.teacher_cache / "meta.json", "teacher_cache")
    return out


if __name__ == "__main__":
    run_cli(teacher_cache_flow, "Run the teacher once over the training split and cache what distillation reads.")
