"""Stage 3: fine-tune the teacher on the task; keep the checkpoint that scores best on the validation split.

Classification: cross-entropy on labels, selected by the primary metric. Generation: next-token NLL on the
response tokens only, selected by validation NLL. Writes runs/teacher/<task>/ (a save_pretrained directory
plus flexkd_teacher.json: the spec it came from, its weights hash, validation scores). With
teacher.finetune.enabled false, the teacher is saved as given (e.g. an instruction-tuned LLM).
"""

from __future__ import annotations

from prefect import flow

from flows.common import load_params, paths_for, preflight, run_cli


@flow(name="flexkd-finetune-teacher", log_prints=True)
def finetune_teacher_flow(params: str | None = None, sync: bool = False) -> dict:
    if sync:  # a worker with only the code and the DVC remote: pull the inputs, run under dvc repro, push
        from flows.storage import run_synced

        return run_synced("finetune_teacher", params)
    from flexkd import stages, tracking
    from flexkd.tasks import task_for
    from flexkd.train import set_threads

    cfg = load_params(params)
    paths = paths_for(cfg)
    preflight(cfg)  # wrong sizes, plans or tokenizers: before any model is loaded
    task = task_for(cfg)
    set_threads()
    tracking.setup(paths.root, cfg.project.experiment)
    tracking.check_reachable()
    with tracking.stage_run("finetune_teacher", project_root=paths.root, experiment=cfg.project.experiment,
                            params={"teacher": cfg.teacher.model_dump(), "seed": cfg.project.seed,
                                    "runtime": task.runtime.describe()}):
        summary = stages.finetune_teacher(cfg, paths, task, log=tracking.log_metrics)
    summary.pop("timing", None)
    return summary


if __name__ == "__main__":
    run_cli(finetune_teacher_flow, "Fine-tune the teacher on the task.")
