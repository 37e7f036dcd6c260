"""Stage 5 (one run per method): distill a student from the tuned teacher.

Methods: ft (task only), kd (logits), projector, cka, flexkd (logits + that feature term). Flex-KD pairs
student unit i with teacher unit S[i] of the relevance index, which must match the teacher and data.
Writes runs/students/<task>/<method>/ (save_pretrained + flexkd_student.json) and metrics/distill/<method>.json;
logs every loss term per step and the student as an MLflow model.
"""

from __future__ import annotations

from prefect import flow

from flows.common import fingerprint, load_params, paths_for, read_json, run_cli, write_json


def check_teacher_beats_ft(cfg, paths, method: str) -> None:
    """Before distilling from the teacher, compare it with the ft student (run first) on the validation split.

    A teacher that does not beat a student trained without it makes every distillation run a waste: warn loudly,
    or stop when teacher.require_better_than_ft is set.
    """
    import warnings

    from flexkd.errors import FlexKDError

    ft_metrics = paths.distill_metrics("ft")
    teacher_info = paths.teacher / "flexkd_teacher.json"
    if method == "ft" or not ft_metrics.exists() or not teacher_info.exists():
        return
    metric = cfg.evaluate.primary_metric
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
def distill_flow(method: str, params: str | None = None) -> dict:
    from flexkd import tracking
    from flexkd.config import METHODS
    from flexkd.data.prepare import load_label_map, load_split, split_fingerprint
    from flexkd.data.task import tokenized_split
    from flexkd.data.tokenize import PadCollator
    from flexkd.errors import ConfigError
    from flexkd.evaluate import evaluate_classifier
    from flexkd.losses import build_objective
    from flexkd.models import build_student_classifier, count_parameters, hidden_size, load_classifier, load_tokenizer, save_checkpoint
    from flexkd.provenance import weights_hash
    from flexkd.relevance import RelevanceIndex
    from flexkd.train import distillation_loss, set_threads, train_loop

    cfg = load_params(params)
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: unknown; valid: {list(METHODS)}")
    if method not in cfg.distill.methods:
        raise ConfigError(f"--method {method!r} is not in distill.methods {cfg.distill.methods}")
    paths = paths_for(cfg)
    check_teacher_beats_ft(cfg, paths, method)
    set_threads()
    tracking.setup(paths.root, cfg.project.experiment)
    tracking.check_reachable()
    dcfg, scfg = cfg.distill, cfg.student
    stage_params = {"method": method, "distill": dcfg.model_dump(), "student": scfg.model_dump(), "seed": cfg.project.seed}
    with tracking.stage_run(f"distill-{method}", project_root=paths.root, experiment=cfg.project.experiment,
                            params=stage_params, tags={"flexkd.method": method}) as run:
        label_map = load_label_map(paths.prepared)
        data_fp = split_fingerprint(paths.prepared)
        teacher_hash = weights_hash(paths.teacher)
        tokenizer = load_tokenizer(str(paths.teacher))
        teacher = load_classifier(str(paths.teacher))
        index = RelevanceIndex.load(paths.relevance / "index.json")
        index.verify(teacher_weights_hash=teacher_hash, data_fingerprint=data_fp,
                     method=cfg.relevance.method, k=scfg.hidden_size)

        if scfg.init == "path":
            student = load_classifier(scfg.path, label_map=label_map)
        else:
            student = build_student_classifier(
                teacher, num_layers=scfg.num_layers, hidden_size=scfg.hidden_size, num_heads=scfg.num_heads,
                intermediate_size=scfg.intermediate_size, seed=cfg.project.seed,
            )
        if student.config.vocab_size != teacher.config.vocab_size:
            raise ConfigError(
                f"student vocabulary ({student.config.vocab_size}) differs from the teacher's ({teacher.config.vocab_size}): "
                "they must share the tokenizer"
            )
        objective = build_objective(
            method, alpha=dcfg.alpha, temperature=dcfg.temperature,
            feature_weight=getattr(dcfg.feature_weight, method, 0.0), flexkd_kind=dcfg.flexkd_loss,
            barlow_lambda_off=dcfg.barlow_lambda_off, student_hidden=hidden_size(student),
            teacher_hidden=hidden_size(teacher), selected_units=index.selected if method == "flexkd" else None,
        )
        collate = PadCollator(tokenizer.pad_token_id)
        train = tokenized_split(paths.prepared, "train", tokenizer, cfg.teacher.max_length)
        validation = tokenized_split(paths.prepared, "validation", tokenizer, cfg.teacher.max_length)
        run_fp = fingerprint("distill", stage_params, data_fp, teacher_hash, index.content_hash())
        metric = cfg.evaluate.primary_metric
        result = train_loop(
            model=student, loss_fn=distillation_loss(student, teacher if objective.needs_teacher else None, objective),
            extra=objective if any(True for _ in objective.parameters()) else None,
            train_data=train, collate=collate, settings=dcfg.train, seed=cfg.project.seed,
            work_dir=paths.scratch(f"distill-{method}", run_fp), fingerprint=run_fp,
            evaluate=lambda m: evaluate_classifier(m, validation, collate, cfg.evaluate.batch_size),
            select_metric=metric, log=tracking.log_metrics, desc=f"distill {method}",
        )
        scores = evaluate_classifier(student, validation, collate, cfg.evaluate.batch_size)
        tracking.log_metrics({f"best_validation/{k}": v for k, v in scores.items()})
        save_checkpoint(student, tokenizer, paths.student(method))
        summary = {
            "method": method, "run_id": run.info.run_id, "parameters": count_parameters(student),
            "train_seconds": round(result.state.train_seconds, 2), "steps": result.total_steps,
            "best_step": result.state.best_step, "resumed_from": result.resumed_from, "validation": scores,
            "weights_hash": weights_hash(paths.student(method)), "teacher_weights_hash": teacher_hash,
            "relevance_index_hash": index.content_hash(), "data_fingerprint": data_fp,
        }
        examples = [r["text"] for r in load_split(paths.prepared / "validation.jsonl")[:3]]
        summary["model_uri"] = tracking.log_classifier_model(
            paths.student(method), label_map=label_map, max_length=cfg.teacher.max_length, input_example_texts=examples,
        )
        write_json(paths.student(method) / "flexkd_student.json", summary)
        write_json(paths.distill_metrics(method), {"validation": scores, "train_seconds": summary["train_seconds"],
                                                   "parameters": summary["parameters"], "steps": summary["steps"]})
        print(f"{method}: validation {metric} {scores[metric]:.4f} in {summary['train_seconds']:.0f}s of training")
    return summary


if __name__ == "__main__":
    run_cli(distill_flow, "Distill one student.", method=True)
