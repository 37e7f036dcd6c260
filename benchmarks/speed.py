"""Step-time ratios on the project's own artifacts (tuned teacher, relevance index, teacher cache, prepared data).

Every configuration runs the same batches, interleaved round by round, so a noisy machine slows them alike; the
numbers reported are ratios of medians, never absolute speeds.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def distill_step_times(root: Path, *, student: str | None = None, rounds: int = 12, warmup: int = 2,
                       methods: list[str] | None = None) -> dict:
    """Median seconds of one optimizer step per (method, teacher source) and ratios to a plain student step.

    ``ft`` is the plain student step (task loss only). Each other method is timed with the teacher online and,
    where the project's teacher cache serves it, with the cache. ``flexkd_term_share``: the Flex-KD term's own
    forward + backward (on a real batch's hidden states) over the whole flexkd step.
    """
    from flexkd.cache import IndexedCollate, TeacherCache, cache_enabled, cached_distillation_loss
    from flexkd.config import load_config
    from flexkd.losses import build_objective
    from flexkd.models import hidden_size, load_tokenizer
    from flexkd.relevance import RelevanceIndex
    from flexkd.tasks import task_for
    from flexkd.train import _param_groups, distillation_loss, set_threads
    from flows.common import paths_for

    cfg = load_config(root / "params.yaml")
    paths = paths_for(cfg, root)
    task = task_for(cfg)
    set_threads()
    student = student or cfg.distill.students[0]
    scfg = cfg.student(student)
    dcfg = cfg.distill
    tokenizer = load_tokenizer(str(paths.teacher))
    teacher = task.load_model(str(paths.teacher))
    index = RelevanceIndex.load(paths.relevance / "index.json")
    units = sorted(index.indices) if scfg.init == "prune" else list(index.indices)
    train = task.features(paths.prepared, "train", tokenizer)
    collate = task.collate(tokenizer)
    cache = TeacherCache.load(paths.teacher_cache) if cache_enabled(paths.teacher_cache) else None
    batch_size = dcfg.train.batch_size
    batches = [list(range(i, i + batch_size)) for i in range(0, batch_size * (rounds + warmup), batch_size)]
    batches = [[i % len(train) for i in b] for b in batches]
    indexed = IndexedCollate.index(train)
    methods = methods or list(dcfg.methods)
    weights = scfg.feature_weight or dcfg.feature_weight

    def objective_for(method, width, selected):
        return build_objective(
            method, alpha=dcfg.alpha, temperature=dcfg.temperature, feature_weight=getattr(weights, method, 0.0),
            flexkd_kind=dcfg.flexkd_loss, student_hidden=scfg.hidden_size, teacher_hidden=width,
            selected_units=selected if method == "flexkd" else None, logit_loss=dcfg.logit_loss,
            shared_vocab=len(tokenizer) if task.is_generation else None, teacher_top_k=dcfg.teacher_top_k,
        )

    configs = {}
    for method in methods:
        sources = ["online"] if method == "ft" else ["online"] + (["cache"] if cache is not None and cache.serves(
            units if method == "flexkd" else (None if method == "kd" else range(hidden_size(teacher)))) else [])
        for source in sources:
            model, _ = task.build_student(teacher, scfg, seed=cfg.project.seed, selected_units=units)
            if source == "online":
                objective = objective_for(method, hidden_size(teacher), units)
                loss_fn = distillation_loss(model, teacher if objective.needs_teacher else None, objective, task.feature_mask)
                make = lambda ids: collate([train[i] for i in ids])  # noqa: E731
            else:
                objective = objective_for(method, cache.width, cache.positions(units))
                loss_fn = cached_distillation_loss(cache, objective, task.feature_mask,
                                                   vocab=len(tokenizer) if task.is_generation else None)
                indexed_collate = IndexedCollate(collate)
                make = lambda ids, c=indexed_collate: c([indexed[i] for i in ids])  # noqa: E731
            modules = [model] + ([objective] if any(True for _ in objective.parameters()) else [])
            optimizer = torch.optim.AdamW(_param_groups(modules, 0.01), lr=1e-5)
            configs[f"{method}/{source}"] = (model, loss_fn, optimizer, make, objective)

    times: dict[str, list[float]] = {name: [] for name in configs}
    term_times: list[float] = []
    for step, ids in enumerate(batches):
        for name, (model, loss_fn, optimizer, make, objective) in configs.items():
            batch = make(ids)
            began = time.perf_counter()
            loss, _ = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= warmup:
                times[name].append(time.perf_counter() - began)
        if "flexkd/online" in configs and step >= warmup:
            term_times.append(_flexkd_term_seconds(configs["flexkd/online"], teacher, collate([train[i] for i in ids]),
                                                   task.feature_mask))
    median = {name: statistics.median(values) for name, values in times.items()}
    plain = median.get("ft/online")
    result = {
        "student": student, "batch_size": batch_size, "rounds": rounds, "median_step_seconds": median,
        "ratio_to_plain_step": {name: value / plain for name, value in median.items()} if plain else {},
    }
    if cache is not None:
        result["cached_over_online"] = {m: median[f"{m}/cache"] / median[f"{m}/online"]
                                        for m in methods if f"{m}/cache" in median}
        result["cache_bytes"], result["cache_full_width_bytes"] = cache.meta["bytes"], cache.meta["full_width_bytes"]
        result["cache_columns"] = cache.width
    if term_times and "flexkd/online" in median:
        result["flexkd_term_seconds"] = statistics.median(term_times)
        result["flexkd_term_share"] = result["flexkd_term_seconds"] / median["flexkd/online"]
    return result


def relevance_time_ratio(root: Path, *, n_batches: int = 8, batch_size: int | None = None) -> dict:
    """Relevance scoring vs. a plain teacher forward + backward (parameter gradients) over the same batches."""
    import torch.nn.functional as F

    from flexkd.config import load_config
    from flexkd.losses import response_nll
    from flexkd.models import load_tokenizer
    from flexkd.relevance import score_units
    from flexkd.tasks import task_for
    from flexkd.train import set_threads
    from flows.common import paths_for

    cfg = load_config(root / "params.yaml")
    paths = paths_for(cfg, root)
    task = task_for(cfg)
    set_threads()
    batch_size = batch_size or cfg.relevance.batch_size
    tokenizer = load_tokenizer(str(paths.teacher))
    teacher = task.load_model(str(paths.teacher))
    collate = task.collate(tokenizer)
    train = task.features(paths.prepared, "train", tokenizer, limit=batch_size * (n_batches + 1))
    batches = [collate(train[i : i + batch_size]) for i in range(0, len(train), batch_size)]

    def plain(batch):
        teacher.zero_grad(set_to_none=True)
        logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss = F.cross_entropy(logits, batch["labels"]) if logits.dim() == 2 else response_nll(logits, batch["labels"])
        loss.backward()

    def relevance(batch):
        score_units(teacher, [batch], method=cfg.relevance.method, max_examples=10**9, task=task.relevance_task)

    plain(batches[0]), relevance(batches[0])  # warm-up
    seconds = {"relevance": 0.0, "plain": 0.0}
    for batch in batches[1:]:
        for name, fn in (("plain", plain), ("relevance", relevance)):
            began = time.perf_counter()
            fn(batch)
            seconds[name] += time.perf_counter() - began
    return {"batches": len(batches) - 1, "batch_size": batch_size, "seconds": seconds,
            "ratio": seconds["relevance"] / seconds["plain"]}


def cache_sizes(root: Path) -> dict:
    """Bytes of the teacher cache with the selected units only and with every teacher unit (built in a temp dir)."""
    import tempfile

    from flexkd.cache import CacheSpec, build_cache, features_hash
    from flexkd.config import load_config
    from flexkd.models import hidden_size, load_tokenizer
    from flexkd.relevance import RelevanceIndex
    from flexkd.tasks import task_for
    from flows.common import paths_for

    cfg = load_config(root / "params.yaml")
    paths = paths_for(cfg, root)
    task = task_for(cfg)
    tokenizer = load_tokenizer(str(paths.teacher))
    teacher = task.load_model(str(paths.teacher))
    train = task.features(paths.prepared, "train", tokenizer)
    index = RelevanceIndex.load(paths.relevance / "index.json")
    d_teacher = hidden_size(teacher)
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, columns in (("selected", sorted(index.indices)), ("full", list(range(d_teacher)))):
            spec = CacheSpec(columns=columns, d_teacher=d_teacher, generation=task.is_generation, dtype=cfg.teacher_cache.dtype,
                             top_k=cfg.distill.teacher_top_k if task.is_generation else None,
                             temperature=cfg.distill.temperature, vocab=len(tokenizer) if task.is_generation else None)
            began = time.perf_counter()
            meta = build_cache(teacher, train, task.collate(tokenizer), task.feature_mask, Path(tmp) / mode, spec,
                               provenance={"features_hash": features_hash(train)}, batch_size=cfg.teacher_cache.batch_size,
                               progress=False)
            sizes[mode] = {"bytes": meta["bytes"], "columns": len(columns), "positions": meta["n_positions"],
                           "seconds": time.perf_counter() - began}
    sizes["selected_over_full"] = sizes["selected"]["bytes"] / sizes["full"]["bytes"]
    return sizes


def _flexkd_term_seconds(config, teacher, batch, feature_mask) -> float:
    """Forward + backward of the Flex-KD term alone, on one batch's real student and teacher hidden states."""
    from flexkd.losses import masked_rows

    model, _, _, _, objective = config
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        hs = model(**inputs, output_hidden_states=True).hidden_states[-1]
        ht = teacher(**inputs, output_hidden_states=True).hidden_states[-1]
    mask = feature_mask(batch)
    hs_rows = masked_rows(hs, mask).detach().requires_grad_(True)
    ht_rows = masked_rows(ht, mask)
    began = time.perf_counter()
    objective.feature_term(hs_rows, ht_rows).backward()
    return time.perf_counter() - began


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Distill step-time ratios on this project's artifacts.")
    parser.add_argument("--root", default=".", type=Path)
    parser.add_argument("--student", default=None)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    print(json.dumps(distill_step_times(args.root.resolve(), student=args.student, rounds=args.rounds), indent=1))
