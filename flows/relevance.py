"""Stage 4: score the tuned teacher's last-layer hidden units by task relevance and select k = d_S of them.

Writes data/relevance/<task>/index.json (the RelevanceIndex: scores, selected units, provenance) and
scores.png. The index is tied to the teacher's weights hash and the prepared data's fingerprint; the distill
stage refuses an index that does not match its inputs.
"""

from __future__ import annotations

from prefect import flow

from flows.common import load_params, paths_for, preflight, run_cli


@flow(name="flexkd-relevance", log_prints=True)
def relevance_flow(params: str | None = None, sync: bool = False) -> dict:
    if sync:  # a worker with only the code and the DVC remote: pull the inputs, run under dvc repro, push
        from flows.storage import run_synced

        return run_synced("relevance", params)
    from flexkd import stages, tracking
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
        out = stages.select_units(cfg, paths, task, log=tracking.log_metrics)
        tracking.log_artifact(out["index_path"], "relevance")
        tracking.log_artifact(out["plot_path"], "relevance")
    return {"k": out["index"].k, "n_examples": out["n_examples"]}


if __name__ == "__main__":
    run_cli(relevance_flow, "Score teacher units and select the student's k.")
