"""The distillation set-up of one (student, method): what the distill stage trains and the speed benchmark times.

:func:`build_distill` makes every decision once: the student's unit order (a pruned student's unit i is teacher
unit sorted(S)[i]), the pruning calibration batches, the vocabulary and width checks, the objective with every
``distill`` knob (alpha and feature weight per student, the logit loss and its beta / skew, Barlow's off-diagonal
weight, the generation top-k), and whether the teacher's outputs come from the teacher cache or from the teacher
running online in each step. Models are placed by the runtime: the student on its device in float32 (trained
under autocast), the teacher frozen in the runtime's teacher dtype; the student is built from the teacher's
float32 weights before the teacher is cast.

``flows/distill.py`` trains the returned set-up; ``benchmarks/speed.py`` times its steps: one code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from flexkd.config import FlexKDConfig, TrainConfig
from flexkd.errors import ConfigError, ProvenanceError
from flexkd.runtime import Runtime

TEACHER_SOURCES = ("auto", "online", "cache")


@dataclass
class DistillSetup:
    student_name: str
    method: str
    model: nn.Module  # the student, on the runtime's device
    objective: nn.Module  # DistillObjective (its projector, if any, is trained too: ``extra``)
    loss_fn: Callable  # loss_fn(module, batch) -> (loss, terms)
    train_data: list  # features (indexed into the cache when the teacher is cached)
    collate: Callable  # for train_data
    eval_collate: Callable  # for plain features (validation, test)
    units: list[int]  # teacher units paired with student units 0..k-1
    teacher_outputs: str  # "cache" | "online" | "none"
    alpha: float | None  # the built-in methods' weights (None for a composed method: its weights are its own)
    beta: float | None
    settings: TrainConfig  # distill.train with this student's lr
    params: dict[str, Any]  # what the run depends on (MLflow params, fingerprint)
    runtime: Runtime
    teacher: nn.Module | None = None  # the frozen teacher when it runs online
    cache: Any = None  # the TeacherCache when it serves the method
    pruning: dict | None = None
    tokenizer: Any = None
    provenance: dict[str, Any] = field(default_factory=dict)  # hashes of teacher, data, index, cache files

    @property
    def extra(self) -> nn.Module | None:
        """The objective when it has parameters of its own (the projector): trained with the student."""
        return self.objective if any(True for _ in self.objective.parameters()) else None


def open_cache(cfg: FlexKDConfig, cache_dir: Path, train, method: str, units: list[int], *, teacher_hash: str,
               data_fp: str, index_hash: str, required: bool = True, intermediate_layers: bool = False):
    """The teacher cache when it is enabled and can serve ``method`` (else None: the teacher runs online; so with
    ``intermediate_layers``, which the cache, holding the last layer only, cannot serve).

    A cache made from other inputs (teacher, data, relevance index, tokenisation, temperature, top-k) or a
    corrupted one is refused with a ProvenanceError, never silently replaced by the online teacher.
    """
    from flexkd.cache import TeacherCache, cache_enabled, features_hash

    spec = cfg.distill.method(method)
    if not spec.needs_teacher:
        return None
    if intermediate_layers:
        print(f"{method} compares intermediate layers (distill.flexkd_layers: matched), which the teacher cache does "
              "not hold: the teacher runs online")
        return None
    if not cache_enabled(cache_dir):
        if not required:
            return None
        raise ProvenanceError(f"{cache_dir}: teacher_cache.enabled is true but the cache was not built; "
                              "run the teacher_cache stage (dvc repro does it)")
    cache = TeacherCache.load(cache_dir)
    cache.verify(teacher_weights_hash=teacher_hash, data_fingerprint=data_fp, relevance_index_hash=index_hash,
                 features_hash=features_hash(train), temperature=cfg.distill.temperature if cache.generation else None,
                 top_k=cfg.distill.teacher_top_k if cache.generation else None)
    needed = (None if spec.teacher_units is None else units if spec.teacher_units == "selected"
              else list(range(cache.meta["d_teacher"])))  # the teacher units the method's terms compare
    if not cache.serves(needed):
        print(f"teacher cache holds {cache.width} of {cache.meta['d_teacher']} teacher units; {method} compares all of them, "
              "so it runs the teacher online (teacher_cache.features: full serves it)")
        return None
    return cache


def method_settings(cfg: FlexKDConfig, student: str, method: str) -> dict[str, float | None]:
    """lr, alpha, temperature and beta of one (student, method): students.<s>.per_method.<m>, else the student's
    own key, else distill's (beta: 0 for a built-in method without a feature term). alpha and beta weigh the
    built-in methods' terms; a composed method's weights are its own (distill.composed_methods): None here."""
    dcfg, scfg = cfg.distill, cfg.student(student)
    own = scfg.per_method.get(method)
    weights = scfg.feature_weight or dcfg.feature_weight
    builtin = method not in dcfg.composed_methods

    def pick(key, student_value, default):
        value = getattr(own, key) if own is not None else None
        return value if value is not None else (student_value if student_value is not None else default)

    return {"lr": pick("lr", scfg.lr, dcfg.train.lr), "alpha": pick("alpha", scfg.alpha, dcfg.alpha) if builtin else None,
            "temperature": pick("temperature", None, dcfg.temperature),
            "beta": pick("feature_weight", None, getattr(weights, method, 0.0)) if builtin else None}


def stage_params(cfg: FlexKDConfig, student: str, method: str) -> dict[str, Any]:
    """The settings one distill run depends on (logged to MLflow; part of its checkpoint fingerprint)."""
    dcfg, scfg = cfg.distill, cfg.student(student)
    student_dump = scfg.model_dump()
    student_dump["per_method"] = {method: student_dump["per_method"][method]} if method in scfg.per_method else {}
    # distill without composed_methods: a run depends on its own method's terms only (added below when composed)
    params = {"student_name": student, "method": method, "distill": dcfg.model_dump(exclude={"composed_methods"}),
              "student": student_dump, **method_settings(cfg, student, method), "seed": cfg.project.seed,
              "runtime": cfg.runtime_fingerprint()}
    if method in dcfg.composed_methods:
        params["terms"] = dict(dcfg.composed_methods[method])
    if cfg.data.is_generation:
        params["generation"] = cfg.generation.model_dump()
    if cfg.augment.enabled:  # the students' extra rows (stage augment)
        params["augment"] = cfg.augment.model_dump()
    return params


def method_objective(cfg: FlexKDConfig, student: str, method: str, *, student_hidden: int, teacher_hidden: int,
                     selected_units: list[int] | None = None, shared_vocab: int | None = None,
                     layer_pairs: list[tuple[int, int]] | None = None):
    """The DistillObjective of one (student, method) from params: the method's terms (built-in or
    ``distill.composed_methods``), weighted with the student's settings (``method_settings``), each term built with
    distill's settings. ``selected_units`` reach the terms that compare selected teacher units (flexkd)."""
    from flexkd.losses import build_objective

    dcfg, settings, spec = cfg.distill, method_settings(cfg, student, method), cfg.distill.method(method)
    return build_objective(
        spec, alpha=_given(settings["alpha"], 0.0), temperature=settings["temperature"],
        feature_weight=_given(settings["beta"], 0.0), flexkd_kind=dcfg.flexkd_loss,
        barlow_lambda_off=dcfg.barlow_lambda_off, student_hidden=student_hidden, teacher_hidden=teacher_hidden,
        selected_units=selected_units if spec.reads_selected_units else None, logit_loss=dcfg.logit_loss,
        jsd_beta=dcfg.jsd_beta, skew_alpha=dcfg.skew_alpha, shared_vocab=shared_vocab,
        teacher_top_k=dcfg.teacher_top_k, layer_pairs=layer_pairs,
    )


def _given(value, default):
    return default if value is None else value


def build_distill(cfg: FlexKDConfig, paths, student: str, method: str, *, runtime: Runtime | None = None,
                  teacher_source: str = "auto", task=None, train=None, seed: int | None = None) -> DistillSetup:
    """Everything one distill run trains, from the project's artifacts.

    ``paths``: the project's directories (``teacher``, ``relevance``, ``prepared``, ``teacher_cache``; see
    ``flows.common.Paths``). ``teacher_source``: auto (the cache when ``teacher_cache.enabled`` and it serves the
    method, else online), online, or cache (the cache if it serves the method). ``train``: the tokenised
    training split when the caller has it already. ``seed``: the student's init seed (default project.seed).
    """
    from flexkd.augment import student_train_features
    from flexkd.cache import IndexedCollate, cached_distillation_loss
    from flexkd.data.prepare import split_fingerprint
    from flexkd.models import hidden_size, load_tokenizer
    from flexkd.provenance import weights_hash
    from flexkd.tasks import task_for
    from flexkd.train import distillation_loss

    spec = _check_request(cfg, student, method, teacher_source)
    task = task or task_for(cfg)
    runtime = runtime or task.runtime
    dcfg, scfg = cfg.distill, cfg.student(student)
    params = stage_params(cfg, student, method)
    settings = dcfg.train.model_copy(update={"lr": params["lr"]})

    data_fp = split_fingerprint(paths.prepared)
    teacher_hash = weights_hash(paths.teacher)
    tokenizer = load_tokenizer(str(paths.teacher))
    teacher = task.load_model(str(paths.teacher))
    index, units = _relevance_units(cfg, paths, scfg, teacher_hash=teacher_hash, data_fp=data_fp)

    collate = task.collate(tokenizer)
    train = train if train is not None else student_train_features(cfg, paths, task, tokenizer)
    model, pruning = _build_student(task, teacher, student, scfg, units, train, collate, runtime,
                                    seed=cfg.project.seed if seed is None else seed)

    objective_args = dict(student_hidden=hidden_size(model), shared_vocab=len(tokenizer) if task.is_generation else None)
    layer_pairs = None
    if spec.reads_selected_units and dcfg.flexkd_layers == "matched":  # student layer i <-> teacher layer [i]
        from flexkd.tasks import teacher_layers_for

        layer_pairs = [(i + 1, t + 1) for i, t in enumerate(teacher_layers_for(teacher, scfg))]  # 0: embeddings
    objective_args["layer_pairs"] = layer_pairs
    cache = None
    if teacher_source == "cache" or (teacher_source == "auto" and cfg.teacher_cache.enabled):
        cache = open_cache(cfg, Path(paths.teacher_cache), train, method, units, teacher_hash=teacher_hash,
                           data_fp=data_fp, index_hash=index.content_hash(), required=teacher_source == "auto",
                           intermediate_layers=layer_pairs is not None)
    if cache is None:  # the teacher runs online, inside every step
        objective = method_objective(cfg, student, method, teacher_hidden=hidden_size(teacher), selected_units=units,
                                     **objective_args)
        online = teacher if objective.needs_teacher else None
        if online is not None:
            runtime.frozen(online)
        loss_fn = distillation_loss(model, online, objective, task.compare_mask(model))
        train_data, train_collate = train, collate
        outputs = "online" if online is not None else "none"
    else:  # the same objective over the cached columns: Flex-KD's pairing is remapped into the cache
        objective = method_objective(cfg, student, method, teacher_hidden=cache.width if cache.width else hidden_size(teacher),
                                     selected_units=cache.positions(units) if spec.reads_selected_units else None,
                                     **objective_args)
        loss_fn = cached_distillation_loss(cache, objective, task.feature_mask,
                                           vocab=len(tokenizer) if task.is_generation else None,
                                           compare_mask=task.compare_mask(model))
        train_data, train_collate = IndexedCollate.index(train), IndexedCollate(collate)
        online, outputs = None, "cache"
    objective.to(runtime.device)
    provenance = {"data_fingerprint": data_fp, "teacher_weights_hash": teacher_hash,
                  "relevance_index_hash": index.content_hash(), "cache_files": cache.meta["files"] if cache is not None else None}
    return DistillSetup(
        student_name=student, method=method, model=model, objective=objective, loss_fn=loss_fn, train_data=train_data,
        collate=train_collate, eval_collate=collate, units=units, teacher_outputs=outputs, alpha=params["alpha"],
        beta=params["beta"], settings=settings, params=params, runtime=runtime, teacher=online, cache=cache,
        pruning=pruning, tokenizer=tokenizer, provenance=provenance,
    )


def _check_request(cfg: FlexKDConfig, student: str, method: str, teacher_source: str):
    """The method's spec (built-in or composed), if the method is known, the student defined and the teacher
    source valid; else an error naming what is not."""
    spec = cfg.distill.method(method)  # ConfigError naming the valid methods
    if student not in cfg.students:
        raise ConfigError(f"student {student!r} is not defined under students ({sorted(cfg.students)})")
    if teacher_source not in TEACHER_SOURCES:
        raise ValueError(f"teacher_source {teacher_source!r}: one of {TEACHER_SOURCES}")
    return spec


def _relevance_units(cfg: FlexKDConfig, paths, scfg, *, teacher_hash: str, data_fp: str):
    """The relevance index, verified against the teacher, the data, the method and the student's k, and the teacher
    units in the order the student's units 0..k-1 pair with them."""
    from flexkd.relevance import RelevanceIndex

    index = RelevanceIndex.load(Path(paths.relevance) / "index.json")
    index.verify(teacher_weights_hash=teacher_hash, data_fingerprint=data_fp, method=cfg.relevance.method, k=scfg.hidden_size)
    # A pruned student's unit i is teacher unit sorted(S)[i]: pair them in that order.
    return index, sorted(index.indices) if scfg.init == "prune" else list(index.indices)


def _build_student(task, teacher: nn.Module, student: str, scfg, units: list[int], train, collate, runtime: Runtime,
                   *, seed: int) -> tuple[nn.Module, dict | None]:
    """The student (and what pruning kept, if it was pruned), on the runtime's device in float32, checked against
    the teacher (vocabulary) and its config (hidden size). The teacher moves to the device first."""
    from flexkd.models import hidden_size

    # the student comes from the teacher's float32 weights (a pruned one is a slice of them), on the device
    teacher.to(runtime.device)
    calibration = ([runtime.to_device(collate(train[i : i + 16])) for i in range(0, min(len(train), 128), 16)]
                   if scfg.init == "prune" else None)  # activation importance for pruning only
    model, pruning = task.build_student(teacher, scfg, seed=seed, selected_units=units, calibration=calibration)
    del calibration
    if model.config.vocab_size != teacher.config.vocab_size and not task.is_generation:
        raise ConfigError(
            f"student vocabulary ({model.config.vocab_size}) differs from the teacher's ({teacher.config.vocab_size}): "
            "they must share the tokenizer"
        )
    if hidden_size(model) != scfg.hidden_size:
        raise ConfigError(f"students.{student}: the model's hidden size {hidden_size(model)} is not hidden_size {scfg.hidden_size}")
    model.to(runtime.device, dtype=torch.float32)
    return model, pruning
