"""The work of each model stage, without orchestration: what the Prefect flows run inside their MLflow runs.

Each function takes the params (``FlexKDConfig``), the project's :class:`flexkd.project.Paths`, the task
(``flexkd.tasks.task_for``: it carries the runtime, so models and batches go to ``runtime.device``) and an
optional ``log`` callback for metrics (the flows pass ``tracking.log_metrics``). They read and write the same
files as the pipeline's stages, so the flows (``flows/``), the device check (``benchmarks/device_check.py``) and
the runtime benchmark (``benchmarks/runtime.py``) all run one code path, and none of them needs Prefect, MLflow
or DVC to do it.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from flexkd.config import FlexKDConfig
from flexkd.project import Paths, fingerprint, read_json, write_json

Log = Callable[[dict], None]


def _no_log(_metrics: dict, *args, **kwargs) -> None:
    return None


def finetune_teacher(cfg: FlexKDConfig, paths: Paths, task, *, log: Log | None = None) -> dict:
    """Stage finetune_teacher: tune ``teacher.model`` on the training split, keep the checkpoint best on
    validation, save it to ``paths.teacher`` (plus flexkd_teacher.json) and its timing to ``paths.teacher_metrics``."""
    from flexkd import resources
    from flexkd.data.prepare import split_fingerprint
    from flexkd.launch import run_training
    from flexkd.models import count_parameters, load_tokenizer, save_checkpoint
    from flexkd.provenance import weights_hash
    from flexkd.train import task_loss

    log = log or _no_log
    teacher_cfg = cfg.teacher
    data_fp = split_fingerprint(paths.prepared)
    tokenizer = load_tokenizer(teacher_cfg.model, trust_remote_code=teacher_cfg.trust_remote_code)
    model = task.load_model(teacher_cfg.model, paths.prepared).to(task.runtime.device)
    collate = task.collate(tokenizer)
    validation = task.features(paths.prepared, "validation", tokenizer)
    metric = task.selection_metric
    summary = {"spec": teacher_cfg.model, "parameters": count_parameters(model), "data_fingerprint": data_fp,
               "finetuned": teacher_cfg.finetune.enabled, "selection_metric": metric}
    timing: dict[str, Any] = {"train_seconds": 0.0, "resumed_from": None}
    check = teacher_cfg.quality.check != "off"
    base = (task.validation_scores(model, validation, collate)  # what fine-tuning must improve (generation)
            if check and task.is_generation and teacher_cfg.finetune.enabled else None)
    if teacher_cfg.finetune.enabled:
        train = task.features(paths.prepared, "train", tokenizer)
        run_fp = fingerprint("finetune_teacher", teacher_cfg.model_dump(), cfg.generation.model_dump(),
                             cfg.project.seed, data_fp, cfg.runtime_fingerprint())
        with resources.compute():
            result = run_training(  # train_loop, under accelerate launch when num_processes > 1
                model=model, loss_fn=task_loss(model), train_data=train, collate=collate,
                settings=teacher_cfg.finetune, seed=cfg.project.seed, work_dir=paths.scratch("teacher", run_fp),
                fingerprint=run_fp, evaluate=lambda m: task.validation_scores(m, validation, collate),
                select_metric=metric, log=log, desc="teacher", runtime=task.runtime,
            )
        summary.update(best_step=result.state.best_step, steps=result.total_steps, steps_run=result.state.step,
                       stopped_early=result.state.stopped_early)
        timing = {"train_seconds": round(result.state.train_seconds, 2), "resumed_from": result.resumed_from,
                  "epochs": teacher_cfg.finetune.epochs}
    scores, quality = task.score_teacher(model, validation, collate, paths.prepared, check=check, base_scores=base)
    log({f"best_validation/{k}": v for k, v in scores.items()})
    save_checkpoint(model, tokenizer, paths.teacher)
    summary.update(validation=scores, weights_hash=weights_hash(paths.teacher))
    if quality is not None:
        summary["quality"] = quality
        log({"teacher_quality/problems": float(len(quality["problems"]))})
    write_json(paths.teacher / "flexkd_teacher.json", summary)
    write_json(paths.teacher_metrics, {"validation": scores, "parameters": summary["parameters"], **timing,
                                       **({"quality": quality} if quality is not None else {})})
    print(f"teacher validation {metric}: {scores[metric]:.4f}")
    if quality and quality["problems"]:
        report_weak_teacher(quality["problems"], stop=teacher_cfg.quality.check == "stop")
    return {**summary, "timing": timing}


def report_weak_teacher(problems: list[str], *, stop: bool) -> None:
    """Say loudly, before any student trains, that the teacher is not worth distilling (and stop, if asked to).
    The teacher is saved either way: the report, the run and the checkpoint show what went wrong."""
    import warnings

    from flexkd.errors import FlexKDError

    message = ("the fine-tuned teacher is weak on validation: " + "; ".join(problems) + ". Distilling from it wastes "
               "the students' runs: train it longer or on more data (teacher.finetune.*, data.max_train), or pick "
               "a stronger teacher")
    if stop:
        raise FlexKDError(message + " (teacher.quality.check is stop)")
    banner = "!" * 100
    print(f"\n{banner}\nWARNING: {message}\n{banner}\n")
    warnings.warn(message, stacklevel=2)


def select_units(cfg: FlexKDConfig, paths: Paths, task, *, log: Log | None = None, plot: bool = True) -> dict:
    """Stage relevance: score the tuned teacher's last-layer units on the training split, select k = d_S and write
    the RelevanceIndex (``paths.relevance/index.json``; ``scores.png`` with ``plot``)."""
    from flexkd import resources
    from flexkd.data.prepare import split_fingerprint
    from flexkd.errors import ProvenanceError
    from flexkd.models import load_tokenizer
    from flexkd.provenance import weights_hash
    from flexkd.relevance import RelevanceIndex, plot_scores, score_units

    log = log or _no_log
    teacher_info = read_json(paths.teacher / "flexkd_teacher.json")
    teacher_hash = weights_hash(paths.teacher)
    if teacher_hash != teacher_info["weights_hash"]:
        raise ProvenanceError(f"{paths.teacher}: weights do not match the hash recorded at fine-tuning; rerun finetune_teacher")
    data_fp = split_fingerprint(paths.prepared)
    tokenizer = load_tokenizer(str(paths.teacher))
    teacher = task.load_model(str(paths.teacher))
    # on the device in the teacher's inference dtype; its parameters keep requires_grad (the scores are
    # gradients with respect to its hidden states)
    teacher.to(task.runtime.device, dtype=task.runtime.teacher_dtype)
    collate = task.collate(tokenizer)
    rcfg = cfg.relevance
    if rcfg.method == "random":  # the control: k units drawn at random, seeded
        import torch

        from flexkd.models import hidden_size

        generator = torch.Generator().manual_seed(cfg.project.seed)
        scores, n_examples = torch.rand(hidden_size(teacher), generator=generator, dtype=torch.float64), 0
    else:
        features = task.features(paths.prepared, "train", tokenizer, limit=rcfg.n_examples)
        batches = (collate(features[i : i + rcfg.batch_size]) for i in range(0, len(features), rcfg.batch_size))
        with resources.compute():
            scores, n_examples = score_units(teacher, batches, method=rcfg.method, max_examples=rcfg.n_examples,
                                             task=task.relevance_task)
    index = RelevanceIndex.from_scores(scores, cfg.k, method=rcfg.method, n_examples=n_examples,
                                       teacher=teacher_info["spec"], teacher_weights_hash=teacher_hash,
                                       data_fingerprint=data_fp, order=rcfg.order)
    index_path = index.save(paths.relevance / "index.json")
    plot_path = plot_scores(index, paths.relevance / "scores.png") if plot else None
    selected_share = float(scores[index.selected].sum() / scores.sum())
    log({"relevance/n_examples": n_examples, "relevance/selected_score_share": selected_share})
    print(f"selected {index.k} of {index.d_teacher} teacher units ({selected_share:.1%} of the total score)")
    return {"index": index, "index_path": index_path, "plot_path": plot_path, "n_examples": n_examples,
            "selected_share": selected_share}


def cache_provenance(paths: Paths, index, train_features) -> dict:
    """What a cache must match to be used: teacher weights, prepared data, relevance index, tokenised inputs."""
    from flexkd.cache import features_hash
    from flexkd.data.prepare import split_fingerprint
    from flexkd.provenance import weights_hash

    return {
        "teacher_weights_hash": weights_hash(paths.teacher),
        "data_fingerprint": split_fingerprint(paths.prepared),
        "relevance_index_hash": index.content_hash(),
        "features_hash": features_hash(train_features),
    }


def teacher_cache(cfg: FlexKDConfig, paths: Paths, task, *, log: Log | None = None) -> dict:
    """Stage teacher_cache: run the tuned teacher once over the training split and store what distillation reads
    (``paths.teacher_cache``); with ``teacher_cache.enabled`` false, only a meta.json that says so."""
    from flexkd import resources
    from flexkd.augment import student_train_features
    from flexkd.cache import CacheSpec, build_cache, cache_columns, write_disabled
    from flexkd.models import hidden_size, load_tokenizer
    from flexkd.relevance import RelevanceIndex

    log = log or _no_log
    ccfg = cfg.teacher_cache
    if not ccfg.enabled:
        write_disabled(paths.teacher_cache)
        print("teacher_cache.enabled is false: distillation runs the teacher online")
        return {"enabled": False}
    tokenizer = load_tokenizer(str(paths.teacher))
    teacher = task.runtime.frozen(task.load_model(str(paths.teacher)))  # on the device, in the teacher dtype
    train = student_train_features(cfg, paths, task, tokenizer)  # the training split (+ augmented rows)
    index = RelevanceIndex.load(paths.relevance / "index.json")
    provenance = cache_provenance(paths, index, train)
    index.verify(teacher_weights_hash=provenance["teacher_weights_hash"], data_fingerprint=provenance["data_fingerprint"])
    d_teacher = hidden_size(teacher)
    spec = CacheSpec(
        columns=cache_columns(ccfg.features, index.indices, d_teacher, [cfg.distill.method(m) for m in cfg.distill.methods]),
        d_teacher=d_teacher, generation=task.is_generation, dtype=ccfg.dtype,
        top_k=cfg.distill.teacher_top_k if task.is_generation else None,
        temperature=cfg.distill.temperature, vocab=len(tokenizer) if task.is_generation else None,
    )
    began = time.perf_counter()
    with resources.compute():
        meta = build_cache(teacher, train, task.collate(tokenizer), task.feature_mask, paths.teacher_cache, spec,
                           provenance=provenance, batch_size=ccfg.batch_size)
    seconds = time.perf_counter() - began
    log({"teacher_cache/seconds": seconds, "teacher_cache/bytes": meta["bytes"],
         "teacher_cache/full_width_bytes": meta["full_width_bytes"], "teacher_cache/positions": meta["n_positions"],
         "teacher_cache/columns": len(spec.columns)})
    print(f"teacher cache: {meta['n_examples']} examples, {meta['n_positions']} positions, {len(spec.columns)} of "
          f"{d_teacher} units, {meta['bytes'] / 2**20:.1f} MiB (full width: {meta['full_width_bytes'] / 2**20:.1f} MiB) "
          f"in {seconds:.0f}s")
    return {"enabled": True, "bytes": meta["bytes"], "full_width_bytes": meta["full_width_bytes"], "seconds": seconds}


def distill(cfg: FlexKDConfig, paths: Paths, task, student: str, method: str, *, log: Log | None = None,
            run_id: str | None = None, on_setup: Callable | None = None) -> dict:
    """Stage distill (one student set-up and method): build the set-up (:func:`flexkd.distill.build_distill`),
    train it, keep the checkpoint best on validation, save the student to ``paths.student(student, method)``
    (plus flexkd_student.json, with ``model_uri`` None until the caller logs the model) and its metrics to
    ``paths.distill_metrics``. ``on_setup(setup)`` is called once the set-up is built (the flow tags its run)."""
    from flexkd import resources
    from flexkd.distill import build_distill
    from flexkd.launch import run_training
    from flexkd.models import count_parameters, save_checkpoint
    from flexkd.provenance import weights_hash

    log = log or _no_log
    setup = build_distill(cfg, paths, student, method, task=task)  # the library's one set-up (flexkd.distill)
    if on_setup is not None:
        on_setup(setup)
    model, provenance = setup.model, setup.provenance
    validation = task.features(paths.prepared, "validation", setup.tokenizer)
    run_fp = fingerprint("distill", setup.params, provenance["data_fingerprint"], provenance["teacher_weights_hash"],
                         provenance["relevance_index_hash"], provenance["cache_files"])
    metric = task.selection_metric
    with resources.compute():
        result = run_training(  # train_loop, under accelerate launch when num_processes > 1
            model=model, loss_fn=setup.loss_fn, extra=setup.extra, train_data=setup.train_data,
            collate=setup.collate, settings=setup.settings, seed=cfg.project.seed,
            work_dir=paths.scratch(f"distill-{student}-{method}", run_fp), fingerprint=run_fp,
            evaluate=lambda m: task.validation_scores(m, validation, setup.eval_collate),
            select_metric=metric, log=log, desc=f"distill {student}/{method}", runtime=task.runtime,
        )
    scores = task.validation_scores(model, validation, setup.eval_collate)
    tokenizer, vocabulary = setup.tokenizer, None
    if cfg.student(student).vocabulary == "train":  # cut to the training split's tokens: scored as it is saved
        from flexkd.vocabulary import prune_vocabulary

        model, tokenizer, vocabulary = prune_vocabulary(model, setup.tokenizer, setup.train_data,
                                                        key=f"students.{student}.vocabulary")
        vocabulary["validation_before"] = scores
        scores = task.validation_scores(model, task.features(paths.prepared, "validation", tokenizer), task.collate(tokenizer))
    out_dir = save_checkpoint(model, tokenizer, paths.student(student, method))  # on disk before any MLflow call
    summary = {
        "student": student, "method": method, "init": cfg.student(student).init, "run_id": run_id,
        "parameters": count_parameters(model), "train_seconds": round(result.state.train_seconds, 2),
        "steps": result.total_steps, "best_step": result.state.best_step, "resumed_from": result.resumed_from,
        "steps_run": result.state.step, "stopped_early": result.state.stopped_early,
        "validation": scores, "alpha": setup.alpha, "beta": setup.beta, "lr": setup.settings.lr,
        "temperature": setup.params["temperature"], "weights_hash": weights_hash(out_dir),
        "teacher_weights_hash": provenance["teacher_weights_hash"],
        "relevance_index_hash": provenance["relevance_index_hash"], "data_fingerprint": provenance["data_fingerprint"],
        "teacher_outputs": setup.teacher_outputs,
        "teacher_cache_bytes": setup.cache.meta["bytes"] if setup.cache is not None else None,
        "runtime": task.runtime.describe(),
    }
    if setup.pruning is not None:  # its parameter ratio: of the student as saved (after a vocabulary cut)
        summary["pruning"] = {**setup.pruning, "parameter_ratio": summary["parameters"] / setup.pruning["teacher"]["parameters"]}
    if vocabulary is not None:
        summary["vocabulary"] = vocabulary
    summary["model_uri"] = None  # the student is complete on disk first: an MLflow failure later loses nothing
    write_json(out_dir / "flexkd_student.json", summary)
    write_json(paths.distill_metrics(student, method), {
        "validation": scores, "train_seconds": summary["train_seconds"], "parameters": summary["parameters"],
        "steps": summary["steps"], "teacher_outputs": summary["teacher_outputs"], "epochs": setup.settings.epochs,
    })
    print(f"{student}/{method}: validation {metric} {scores[metric]:.4f} in {summary['train_seconds']:.0f}s of training")
    return {"summary": summary, "setup": setup, "out_dir": out_dir, "scores": scores}
