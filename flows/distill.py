"""Stage 5 (one run per student set-up and method): distill a student from the tuned teacher.

Methods: ft (task only), kd (logits), projector, cka, flexkd (logits + that feature term). Flex-KD pairs
student unit i with teacher unit S[i] of the relevance index, which must match the teacher and data.
Students: random init, loaded from a path, or pruned from the teacher to the selected units (then unit i
starts as teacher unit S[i], S ascending). Writes runs/students/<task>/<student>/<method>/ (save_pretrained +
flexkd_student.json) and metrics/distill/<student>/<method>.json; logs every loss term per step and the
student as an MLflow model.
"""

from __future__ import annotations

from prefect import flow

from flows.common import fingerprint, load_params, paths_for, preflight, read_json, run_cli, write_json


def check_teacher_beats_ft(cfg, paths, student: str, method: str) -> None:
    """Before distilling from the teacher, compare it with the ft student (run first) on the validation split.

    A teacher that does not beat a student trained without it makes every distillation run a waste: warn loudly,
    or stop when teacher.require_better_than_ft is set.
    """
    import warnings

    from flexkd.errors import FlexKDError

    ft_metrics = paths.distill_metrics(student, "ft")
    teacher_info = paths.teacher / "flexkd_teacher.json"
    if method == "ft" or not ft_metrics.exists() or not teacher_info.exists():
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


def open_cache(cfg, paths, train, method: str, units: list[int], *, teacher_hash: str, data_fp: str, index_hash: str):
    """The teacher cache when it is enabled and can serve ``method`` (else None: the teacher runs online).

    A cache made from other inputs (teacher, data, relevance index, tokenisation, temperature, top-k) or a
    corrupted one is refused with a ProvenanceError, never silently replaced by the online teacher.
    """
    from flexkd.cache import TeacherCache, cache_enabled, features_hash

    if method == "ft" or not cfg.teacher_cache.enabled:
        return None
    if not cache_enabled(paths.teacher_cache):
        from flexkd.errors import ProvenanceError

        raise ProvenanceError(f"{paths.teacher_cache}: teacher_cache.enabled is true but the cache was not built; "
                              "run the teacher_cache stage (dvc repro does it)")
    cache = TeacherCache.load(paths.teacher_cache)
    cache.verify(teacher_weights_hash=teacher_hash, data_fingerprint=data_fp, relevance_index_hash=index_hash,
                 features_hash=features_hash(train), temperature=cfg.distill.temperature if cache.generation else None,
                 top_k=cfg.distill.teacher_top_k if cache.generation else None)
    needed = {"flexkd": units, "kd": None}.get(method, list(range(cache.meta["d_teacher"])))
    if not cache.serves(needed):
        print(f"teacher cache holds {cache.width} of {cache.meta['d_teacher']} teacher units; {method} compares all of them, "
              "so it runs the teacher online (teacher_cache.features: full serves it)")
        return None
    return cache


@flow(name="flexkd-distill", log_prints=True)
def distill_flow(student: str, method: str, params: str | None = None) -> dict:
    from flexkd import resources, tracking
    from flexkd.cache import IndexedCollate, cached_distillation_loss
    from flexkd.config import METHODS
    from flexkd.data.prepare import split_fingerprint
    from flexkd.errors import ConfigError, FlexKDError
    from flexkd.launch import run_training
    from flexkd.losses import build_objective
    from flexkd.models import count_parameters, hidden_size, load_tokenizer, save_checkpoint
    from flexkd.provenance import weights_hash
    from flexkd.relevance import RelevanceIndex
    from flexkd.tasks import task_for
    from flexkd.train import distillation_loss, set_threads

    cfg = load_params(params)
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: unknown; valid: {list(METHODS)}")
    if method not in cfg.distill.methods:
        raise ConfigError(f"--method {method!r} is not in distill.methods {cfg.distill.methods}")
    if student not in cfg.distill.students:
        raise ConfigError(f"--student {student!r} is not in distill.students {cfg.distill.students}")
    paths = paths_for(cfg)
    preflight(cfg, tuned_teacher=True)  # k <= d_T, prune plan, student tokenizer: before any model is loaded
    check_teacher_beats_ft(cfg, paths, student, method)
    task = task_for(cfg)
    set_threads()
    tracking.setup(paths.root, cfg.project.experiment)
    tracking.check_reachable()
    dcfg, scfg = cfg.distill, cfg.student(student)
    alpha = scfg.alpha if scfg.alpha is not None else dcfg.alpha
    train_settings = dcfg.train.model_copy(update={"lr": scfg.lr}) if scfg.lr is not None else dcfg.train
    weights = scfg.feature_weight or dcfg.feature_weight
    stage_params = {"student_name": student, "method": method, "distill": dcfg.model_dump(), "student": scfg.model_dump(),
                    "alpha": alpha, "beta": getattr(weights, method, 0.0), "lr": train_settings.lr, "seed": cfg.project.seed}
    if task.is_generation:
        stage_params["generation"] = cfg.generation.model_dump()
    with tracking.stage_run(f"distill-{student}", project_root=paths.root, experiment=cfg.project.experiment,
                            params=stage_params, tags={"flexkd.method": method, "flexkd.student": student},
                            run_name=f"distill-{student}-{method}") as run:
        data_fp = split_fingerprint(paths.prepared)
        teacher_hash = weights_hash(paths.teacher)
        tokenizer = load_tokenizer(str(paths.teacher))
        teacher = task.load_model(str(paths.teacher))
        index = RelevanceIndex.load(paths.relevance / "index.json")
        index.verify(teacher_weights_hash=teacher_hash, data_fingerprint=data_fp, method=cfg.relevance.method, k=scfg.hidden_size)
        # A pruned student's unit i is teacher unit sorted(S)[i]: pair them in that order.
        units = sorted(index.indices) if scfg.init == "prune" else list(index.indices)

        collate = task.collate(tokenizer)
        train = task.features(paths.prepared, "train", tokenizer)
        validation = task.features(paths.prepared, "validation", tokenizer)
        calibration = ([collate(train[i : i + 16]) for i in range(0, min(len(train), 128), 16)]
                       if scfg.init == "prune" else None)  # activation importance for pruning only
        model, pruning = task.build_student(teacher, scfg, seed=cfg.project.seed, selected_units=units, calibration=calibration)
        if model.config.vocab_size != teacher.config.vocab_size and not task.is_generation:
            raise ConfigError(
                f"student vocabulary ({model.config.vocab_size}) differs from the teacher's ({teacher.config.vocab_size}): "
                "they must share the tokenizer"
            )
        if hidden_size(model) != scfg.hidden_size:
            raise ConfigError(f"students.{student}: the model's hidden size {hidden_size(model)} is not hidden_size {scfg.hidden_size}")
        objective_args = dict(
            alpha=alpha, temperature=dcfg.temperature, feature_weight=getattr(weights, method, 0.0),
            flexkd_kind=dcfg.flexkd_loss, barlow_lambda_off=dcfg.barlow_lambda_off, student_hidden=hidden_size(model),
            logit_loss=dcfg.logit_loss, jsd_beta=dcfg.jsd_beta, skew_alpha=dcfg.skew_alpha,
            shared_vocab=len(tokenizer) if task.is_generation else None, teacher_top_k=dcfg.teacher_top_k,
        )
        cache = open_cache(cfg, paths, train, method, units, teacher_hash=teacher_hash, data_fp=data_fp,
                           index_hash=index.content_hash())
        if cache is None:  # the teacher runs online, inside every step
            objective = build_objective(method, teacher_hidden=hidden_size(teacher),
                                        selected_units=units if method == "flexkd" else None, **objective_args)
            loss_fn = distillation_loss(model, teacher if objective.needs_teacher else None, objective, task.feature_mask)
            train_data, train_collate = train, collate
        else:  # the same objective over the cached columns: Flex-KD's pairing is remapped into the cache
            objective = build_objective(method, teacher_hidden=cache.width if cache.width else hidden_size(teacher),
                                        selected_units=cache.positions(units) if method == "flexkd" else None, **objective_args)
            loss_fn = cached_distillation_loss(cache, objective, task.feature_mask,
                                               vocab=len(tokenizer) if task.is_generation else None)
            train_data, train_collate = IndexedCollate.index(train), IndexedCollate(collate)
            del teacher  # not needed any more: its outputs come from the cache
        summary_cache = {"teacher_outputs": "cache" if cache is not None else ("online" if objective.needs_teacher else "none"),
                         "teacher_cache_bytes": cache.meta["bytes"] if cache is not None else None}
        tracking.set_tags({"flexkd.teacher_outputs": summary_cache["teacher_outputs"]})
        run_fp = fingerprint("distill", stage_params, data_fp, teacher_hash, index.content_hash(),
                             cache.meta["files"] if cache is not None else None)
        metric = task.selection_metric
        with resources.compute():
            result = run_training(  # train_loop, under accelerate launch when num_processes > 1
                model=model,
                loss_fn=loss_fn,
                extra=objective if any(True for _ in objective.parameters()) else None,
                train_data=train_data, collate=train_collate, settings=train_settings, seed=cfg.project.seed,
                work_dir=paths.scratch(f"distill-{student}-{method}", run_fp), fingerprint=run_fp,
                evaluate=lambda m: task.validation_scores(m, validation, collate),
                select_metric=metric, log=tracking.log_metrics, desc=f"distill {student}/{method}",
            )
        scores = task.validation_scores(model, validation, collate)
        out_dir = save_checkpoint(model, tokenizer, paths.student(student, method))  # on disk before any MLflow call
        summary = {
            "student": student, "method": method, "init": scfg.init, "run_id": run.info.run_id,
            "parameters": count_parameters(model), "train_seconds": round(result.state.train_seconds, 2),
            "steps": result.total_steps, "best_step": result.state.best_step, "resumed_from": result.resumed_from,
            "validation": scores, "alpha": alpha, "beta": getattr(weights, method, 0.0),
            "weights_hash": weights_hash(out_dir), "teacher_weights_hash": teacher_hash,
            "relevance_index_hash": index.content_hash(), "data_fingerprint": data_fp,
        }
        summary.update(summary_cache)
        if pruning is not None:
            summary["pruning"] = pruning
        summary["model_uri"] = None  # the student is complete on disk first: an MLflow failure now loses nothing
        write_json(out_dir / "flexkd_student.json", summary)
        write_json(paths.distill_metrics(student, method), {
            "validation": scores, "train_seconds": summary["train_seconds"], "parameters": summary["parameters"],
            "steps": summary["steps"], "teacher_outputs": summary["teacher_outputs"],
        })
        try:
            tracking.log_metrics({f"best_validation/{k}": v for k, v in scores.items()})
            summary["model_uri"] = task.log_model(tracking, out_dir, paths.prepared, name=f"{student}-{method}")
        except Exception as err:  # noqa: BLE001 - whatever MLflow raised, say where the student is
            message = (f"{student}/{method}: the trained student is saved in {out_dir}, but logging it to MLflow failed "
                       f"({type(err).__name__}: {err}); once the tracking server answers, `python -m flows.publish` "
                       "logs it and registers the best student")
            print(f"\nflexkd: {message}\n")
            raise FlexKDError(message) from err
        write_json(out_dir / "flexkd_student.json", summary)
        print(f"{student}/{method}: validation {metric} {scores[metric]:.4f} in {summary['train_seconds']:.0f}s of training")
    return summary


if __name__ == "__main__":
    run_cli(distill_flow, "Distill one student.", method=True)
