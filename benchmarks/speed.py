"""Step-time ratios on the project's own artifacts (tuned teacher, relevance index, teacher cache, prepared data).

Every configuration runs the same batches, interleaved round by round, so a noisy machine slows them alike; the
numbers reported are ratios of medians, never absolute speeds.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path


def distill_step_times(root: Path, *, student: str | None = None, rounds: int = 12, warmup: int = 2,
                       methods: list[str] | None = None) -> dict:
    """Median seconds of one optimizer step per (method, teacher source) and ratios to a plain student step.

    ``ft`` is the plain student step (task loss only). Each other method is timed with the teacher online and,
    where the project's teacher cache serves it, with the cache. Every configuration is the distill stage's own
    set-up (:func:`flexkd.distill.build_distill`: models, objective, teacher source, collation, runtime), stepped
    as ``train_loop`` steps it. ``flexkd_term_share``: the Flex-KD term's own forward + backward (on a real
    batch's hidden states) over the whole flexkd step. ``padding``: real and padded tokens of one epoch of the
    training split with and without length-grouped batches.
    """
    from flexkd.augment import student_train_features
    from flexkd.cache import cache_enabled
    from flexkd.config import load_config
    from flexkd.distill import build_distill
    from flexkd.models import load_tokenizer
    from flexkd.runtime import batches as epoch_batches, padding_stats, row_lengths
    from flexkd.tasks import task_for
    from flexkd.train import param_groups, set_threads
    from flows.common import paths_for

    cfg = load_config(root / "params.yaml")
    paths = paths_for(cfg, root)
    task = task_for(cfg)
    runtime = task.runtime
    set_threads()
    student = student or cfg.distill.students[0]
    settings = cfg.distill.train
    tokenizer = load_tokenizer(str(paths.teacher))
    train = student_train_features(cfg, paths, task, tokenizer)  # what the students train on
    lengths = row_lengths(train)
    batch_size = settings.batch_size
    order = epoch_batches(len(train), batch_size, cfg.project.seed, 0, lengths if runtime.group_by_length else None)
    batches = [order[i % len(order)] for i in range(rounds + warmup)]
    methods = methods or list(cfg.distill.methods)
    has_cache = cache_enabled(paths.teacher_cache)

    configs = {}
    for method in methods:
        uses_teacher = cfg.distill.method(method).needs_teacher  # ft: one source, no teacher
        for source in (["online"] + (["cache"] if has_cache else []) if uses_teacher else ["online"]):
            setup = build_distill(cfg, paths, student, method, teacher_source=source, task=task, train=train)
            if source == "cache" and setup.teacher_outputs != "cache":
                continue  # the cache does not serve this method (it would run the teacher online again)
            modules = [setup.model] + ([setup.extra] if setup.extra is not None else [])
            optimizer = runtime.optimizer(param_groups(modules, settings.weight_decay), lr=1e-5)
            configs[f"{method}/{source}"] = (setup, optimizer)

    times: dict[str, list[float]] = {name: [] for name in configs}
    term_times: list[float] = []
    for step, ids in enumerate(batches):
        for name, (setup, optimizer) in configs.items():
            batch = runtime.to_device(setup.collate([setup.train_data[i] for i in ids]))
            runtime.synchronize()
            began = time.perf_counter()
            with runtime.autocast():
                loss, _ = setup.loss_fn(setup.model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            runtime.synchronize()
            if step >= warmup:
                times[name].append(time.perf_counter() - began)
        if "flexkd/online" in configs and step >= warmup:
            setup = configs["flexkd/online"][0]
            term_times.append(_flexkd_term_seconds(setup, runtime.to_device(setup.collate([train[i] for i in ids])),
                                                   task.feature_mask))
    median = {name: statistics.median(values) for name, values in times.items()}
    plain = median.get("ft/online")
    grouped = epoch_batches(len(train), batch_size, cfg.project.seed, 0, lengths)
    in_order = epoch_batches(len(train), batch_size, cfg.project.seed, 0, None)
    result = {
        "student": student, "batch_size": batch_size, "rounds": rounds, "median_step_seconds": median,
        "ratio_to_plain_step": {name: value / plain for name, value in median.items()} if plain else {},
        "runtime": runtime.describe(),
        "padding": {"grouped": padding_stats(grouped, lengths), "ungrouped": padding_stats(in_order, lengths)},
    }
    cached = {name.split("/")[0]: setup.cache for name, (setup, _) in configs.items() if setup.cache is not None}
    if cached:
        cache = next(iter(cached.values()))
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
    runtime = task.runtime
    teacher = task.load_model(str(paths.teacher)).to(runtime.device, dtype=runtime.teacher_dtype)  # as the stage does
    collate = task.collate(tokenizer)
    train = task.features(paths.prepared, "train", tokenizer, limit=batch_size * (n_batches + 1))
    batches = [runtime.to_device(collate(train[i : i + batch_size])) for i in range(0, len(train), batch_size)]

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
            runtime.synchronize()
            began = time.perf_counter()
            fn(batch)
            runtime.synchronize()
            seconds[name] += time.perf_counter() - began
    return {"batches": len(batches) - 1, "batch_size": batch_size, "seconds": seconds,
            "ratio": seconds["relevance"] / seconds["plain"]}


def cache_sizes(root: Path) -> dict:
    """Bytes of the teacher cache with the selected units only and with every teacher unit (built in a temp dir)."""
    import tempfile

    from flexkd.augment import student_train_features
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
    teacher = task.runtime.frozen(task.load_model(str(paths.teacher)))  # as the teacher_cache stage does
    train = student_train_features(cfg, paths, task, tokenizer)  # what the students train on
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


def _flexkd_term_seconds(setup, batch, feature_mask) -> float:
    """Forward + backward of the Flex-KD term alone, on one batch's real student and teacher hidden states."""
    from flexkd.losses import masked_rows

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with setup.runtime.inference():
        hs = setup.model(**inputs, output_hidden_states=True).hidden_states[-1].float()
        ht = setup.teacher(**inputs, output_hidden_states=True).hidden_states[-1].float()
    mask = feature_mask(batch)
    hs_rows = masked_rows(hs, mask).detach().requires_grad_(True)
    ht_rows = masked_rows(ht, mask)
    setup.runtime.synchronize()
    began = time.perf_counter()
    setup.objective.terms["flexkd"](hs_rows, ht_rows).backward()
    setup.runtime.synchronize()
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
