"""Stage 7: register the best student as flexkd-<task> in the MLflow model registry.

The best student is the one the evaluate stage chose on the validation split (``selection`` in
metrics/evaluation.json; the test split is reported, never used to choose). It gets the alias ``champion``
when it beats the current champion on the same validation data (same fingerprint, same metric), else
``challenger``, with the reason. The version's tags say how it was chosen (split, metric, value, validation
fingerprint); a model card (teacher, data, method, validation and test metrics, selected units) goes with it.
Writes reports/registry.json.
"""

from __future__ import annotations

from prefect import flow

from flows.common import load_params, paths_for, run_cli


@flow(name="flexkd-register", log_prints=True)
def register_flow(params: str | None = None, sync: bool = False) -> dict:
    if sync:  # a worker with only the code and the DVC remote: pull the inputs, run under dvc repro, push
        from flows.storage import run_synced

        return run_synced("register", params)
    from flexkd.champion import register_champion

    cfg = load_params(params)
    return register_champion(cfg, paths_for(cfg))


if __name__ == "__main__":
    run_cli(register_flow, "Register the best student in the MLflow model registry.")
