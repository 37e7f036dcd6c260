"""Stage 4: score the tuned teacher's last-layer hidden units by task relevance and select k = d_S of them.

Writes data/relevance/<task>/index.json (the RelevanceIndex: scores, selected units, provenance) and
scores.png. The index is tied to the teacher's weights hash and the prepared data's fingerprint; the distill
stage refuses an index that does not match its inputs.
"""

from __future__ import annotations

from prefect import flow

from flows.common import load_params, paths_for, preflight, read_json, run_cli


@flow(name="flexkd-relevance", log_prints=True)
def relevance_flow(params: str | None = None) -> dict:
    from flexkd import resources, tracking
    from flexkd.data.prepare import split_fingerprint
    from flexkd.errors import ProvenanceError
    from flexkd.models import load_tokenizer
    from flexkd.provenance import weights_hash
    from flexkd.relevance import RelevanceIndex, plot_scores, score_units
    from flexkd.tasks import task_for
    from flexkd.train import set_threads

    cfg = load_params(params)
    paths = paths_for(cfg)
    preflight(cfg, tuned_teacher=True)  # wrong sizes, plans or tokenizers: before any model is loaded
    task = task_for(cfg)
    set_threads()
    tracking.setup(paths.root, cfg.project.experiment)
    with tracking.stage_run("relevance", project_root=paths.root, experiment=cfg.project.experiment,
                            params={"relevance": cfg.relevance.model_dump(), "k": cfg.k,
                                    "runtime": task.runtime.describe()}):
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
        features = task.features(paths.prepared, "train", tokenizer, limit=cfg.relevance.n_examples)
        batches = (collate(features[i : i + cfg.relevance.batch_size]) for i in range(0, len(features), cfg.relevance.batch_size))
        with resources.compute():
            scores, n_examples = score_units(teacher, batches, method=cfg.relevance.method,
                                             max_examples=cfg.relevance.n_examples, task=task.relevance_task)
        index = RelevanceIndex.from_scores(
            scores, cfg.k, method=cfg.relevance.method, n_examples=n_examples,
            teacher=teacher_info["spec"], teacher_weights_hash=teacher_hash, data_fingerprint=data_fp, order=cfg.relevance.order,
        )
        index_path = index.save(paths.relevance / "index.json")
        plot_path = plot_scores(index, paths.relevance / "scores.png")
        tracking.log_artifact(index_path, "relevance")
        tracking.log_artifact(plot_path, "relevance")
        selected_share = float(scores[index.selected].sum() / scores.sum())
        tracking.log_metrics({"relevance/n_examples": n_examples, "relevance/selected_score_share": selected_share})
        print(f"selected {index.k} of {index.d_teacher} teacher units ({selected_share:.1%} of the total score)")
    return {"k": index.k, "n_examples": n_examples}


if __name__ == "__main__":
    run_cli(relevance_flow, "Score teacher units and select the student's k.")
