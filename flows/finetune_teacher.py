"""Stage 3: fine-tune the teacher on the task; keep the checkpoint that scores best on the validation split.

Classification: cross-entropy on labels, selected by the primary metric. Generation: next-token NLL on the
response tokens only, selected by validation NLL. Writes runs/teacher/<task>/ (a save_pretrained directory
plus flexkd_teacher.json: the spec it came from, its weights hash, validation scores). With
teacher.finetune.enabled false, the teacher is saved as given (e.g. an instruction-tuned LLM).
"""

from __future__ import annotations

from prefect import flow

from flows.common import fingerprint, load_params, paths_for, preflight, run_cli, write_json


@flow(name="flexkd-finetune-teacher", log_prints=True)
def finetune_teacher_flow(params: str | None = None) -> dict:
    from flexkd import resources, tracking
    from flexkd.data.prepare import split_fingerprint
    from flexkd.models import count_parameters, load_tokenizer, save_checkpoint
    from flexkd.provenance import weights_hash
    from flexkd.tasks import task_for
    from flexkd.launch import run_training
    from flexkd.train import set_threads, task_loss

    cfg = load_params(params)
    paths = paths_for(cfg)
    preflight(cfg)  # wrong sizes, plans or tokenizers: before any model is loaded
    task = task_for(cfg)
    set_threads()
    tracking.setup(paths.root, cfg.project.experiment)
    tracking.check_reachable()
    teacher_cfg = cfg.teacher
    with tracking.stage_run("finetune_teacher", project_root=paths.root, experiment=cfg.project.experiment,
                            params={"teacher": teacher_cfg.model_dump(), "seed": cfg.project.seed,
                                    "runtime": task.runtime.describe()}):
        data_fp = split_fingerprint(paths.prepared)
        tokenizer = load_tokenizer(teacher_cfg.model, trust_remote_code=teacher_cfg.trust_remote_code)
        model = task.load_model(teacher_cfg.model, paths.prepared).to(task.runtime.device)
        collate = task.collate(tokenizer)
        validation = task.features(paths.prepared, "validation", tokenizer)
        metric = task.selection_metric
        summary = {"spec": teacher_cfg.model, "parameters": count_parameters(model), "data_fingerprint": data_fp,
                   "finetuned": teacher_cfg.finetune.enabled, "selection_metric": metric}
        if teacher_cfg.finetune.enabled:
            train = task.features(paths.prepared, "train", tokenizer)
            run_fp = fingerprint("finetune_teacher", teacher_cfg.model_dump(), cfg.generation.model_dump(),
                                 cfg.project.seed, data_fp, cfg.runtime_fingerprint())
            with resources.compute():
                result = run_training(  # train_loop, under accelerate launch when num_processes > 1
                    model=model, loss_fn=task_loss(model), train_data=train, collate=collate,
                    settings=teacher_cfg.finetune, seed=cfg.project.seed, work_dir=paths.scratch("teacher", run_fp),
                    fingerprint=run_fp, evaluate=lambda m: task.validation_scores(m, validation, collate),
                    select_metric=metric, log=tracking.log_metrics, desc="teacher", runtime=task.runtime,
                )
            summary.update(best_step=result.state.best_step, steps=result.total_steps)
            timing = {"train_seconds": round(result.state.train_seconds, 2), "resumed_from": result.resumed_from}
        else:
            timing = {"train_seconds": 0.0, "resumed_from": None}
        scores = task.validation_scores(model, validation, collate)
        tracking.log_metrics({f"best_validation/{k}": v for k, v in scores.items()})
        save_checkpoint(model, tokenizer, paths.teacher)
        summary.update(validation=scores, weights_hash=weights_hash(paths.teacher))
        write_json(paths.teacher / "flexkd_teacher.json", summary)
        write_json(paths.teacher_metrics, {"validation": scores, "parameters": summary["parameters"], **timing})
        print(f"teacher validation {metric}: {scores[metric]:.4f}")
    return summary


if __name__ == "__main__":
    run_cli(finetune_teacher_flow, "Fine-tune the teacher on the task.")
