"""Stage 6: score the teacher and every student on the held-out test split; write the comparison report.

The best student is chosen here on the validation split only (the score its distill run recorded:
``flexkd.selection``); the test metrics are reported beside it and never used to choose.

Classification: accuracy, macro-F1, MCC. Generation: ROUGE-L (greedy; mean ± std over sampling seeds when
generation.seeds is set) of generated responses against every reference, plus a sample table of prompt /
reference / teacher / student outputs logged to MLflow. Writes metrics/evaluation.json (DVC metrics) and
reports/comparison.md (one row per model: student set-up, method, metrics, parameters, train time). Warns
loudly when the teacher does not beat an ft student (teacher.require_better_than_ft turns it into a stop).
"""

from __future__ import annotations

from prefect import flow

from flows.common import load_params, paths_for, run_cli


@flow(name="flexkd-evaluate", log_prints=True)
def evaluate_flow(params: str | None = None, sync: bool = False) -> dict:
    if sync:  # a worker with only the code and the DVC remote: pull the inputs, run under dvc repro, push
        from flows.storage import run_synced

        return run_synced("evaluate", params)
    from flexkd.champion import evaluate_models

    cfg = load_params(params)
    return evaluate_models(cfg, paths_for(cfg))


if __name__ == "__main__":
    run_cli(evaluate_flow, "Evaluate the teacher and every student on the test split.")
