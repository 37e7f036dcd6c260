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


def cache_provenance(paths, index, train_features) -> dict:
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


@flow(name="flexkd-teacher-cache", log_prints=True)
def teacher_cache_flow(params: str | None = None) -> dict:
    import time

    from flexkd import resources, tracking
    from flexkd.cache import CacheSpec, build_cache, cache_columns, write_disabled
    from flexkd.models import hidden_size, load_tokenizer
    from flexkd.relevance import RelevanceIndex
    from flexkd.tasks import task_for
    from flexkd.train import set_threads

    cfg = load_params(params)
    paths = paths_for(cfg)
    ccfg = cfg.teacher_cache
    if not ccfg.enabled:
        write_disabled(paths.teacher_cache)
        print("teacher_cache.enabled is false: distillation runs the teacher online")
        return {"enabled": False}
    preflight(cfg, tuned_teacher=True)  # wrong sizes, plans or tokenizers: before any model is loaded
    task = task_for(cfg)
    set_threads()
    tracking.setup(paths.root, cfg.project.experiment)
    tracking.check_reachable()
    with tracking.stage_run("teacher_cache", project_root=paths.root, experiment=cfg.project.experiment,
                            params={"teacher_cache": ccfg.model_dump(), "teacher_top_k": cfg.distill.teacher_top_k,
                                    "temperature": cfg.distill.temperature, "runtime": task.runtime.describe()}):
        tokenizer = load_tokenizer(str(paths.teacher))
        teacher = task.runtime.frozen(task.load_model(str(paths.teacher)))  # on the device, in the teacher dtype
        train = task.features(paths.prepared, "train", tokenizer)
        index = RelevanceIndex.load(paths.relevance / "index.json")
        provenance = cache_provenance(paths, index, train)
        index.verify(teacher_weights_hash=provenance["teacher_weights_hash"], data_fingerprint=provenance["data_fingerprint"])
        d_teacher = hidden_size(teacher)
        spec = CacheSpec(
            columns=cache_columns(ccfg.features, index.indices, d_teacher, cfg.distill.methods),
            d_teacher=d_teacher, generation=task.is_generation, dtype=ccfg.dtype,
            top_k=cfg.distill.teacher_top_k if task.is_generation else None,
            temperature=cfg.distill.temperature, vocab=len(tokenizer) if task.is_generation else None,
        )
        began = time.perf_counter()
        with resources.compute():
            meta = build_cache(teacher, train, task.collate(tokenizer), task.feature_mask, paths.teacher_cache, spec,
                               provenance=provenance, batch_size=ccfg.batch_size)
        seconds = time.perf_counter() - began
        tracking.log_metrics({"teacher_cache/seconds": seconds, "teacher_cache/bytes": meta["bytes"],
                              "teacher_cache/full_width_bytes": meta["full_width_bytes"],
                              "teacher_cache/positions": meta["n_positions"], "teacher_cache/columns": len(spec.columns)})
        tracking.log_artifact(paths.teacher_cache / "meta.json", "teacher_cache")
        print(f"teacher cache: {meta['n_examples']} examples, {meta['n_positions']} positions, {len(spec.columns)} of "
              f"{d_teacher} units, {meta['bytes'] / 2**20:.1f} MiB (full width: {meta['full_width_bytes'] / 2**20:.1f} MiB) "
              f"in {seconds:.0f}s")
    return {"enabled": True, "bytes": meta["bytes"], "full_width_bytes": meta["full_width_bytes"], "seconds": seconds}


if __name__ == "__main__":
    run_cli(teacher_cache_flow, "Run the teacher once over the training split and cache what distillation reads.")
