"""Stage 1: validate the raw data with its Great Expectations suite; stop the pipeline on failure.

Writes data/validated/<task>/: validation_report.json/.md, the raw snapshot raw/<split>.jsonl (the rows this run
read, from the local files or the Hub: DVC-tracked and pushed with the run, and what the prepare stage reads) and
sources.json (where they came from, with hashes and rows). The report is written and logged to MLflow whether the
data passes or not; on failure the stage exits non-zero, so DVC stops before any training.
"""

from __future__ import annotations

from prefect import flow

from flows.common import load_params, paths_for, run_cli, write_json


@flow(name="flexkd-validate", log_prints=True)
def validate_flow(params: str | None = None, sync: bool = False) -> dict:
    if sync:  # a worker with only the code and the DVC remote: pull the inputs, run under dvc repro, push
        from flows.storage import run_synced

        return run_synced("validate", params)
    from flexkd import resources, tracking
    from flexkd.data.raw_splits import describe_sources, write_snapshot
    from flexkd.data.validation import raise_for_failures
    from flexkd.tasks import task_for

    cfg = load_params(params)
    paths = paths_for(cfg)
    task = task_for(cfg)
    tracking.setup(paths.root, cfg.project.experiment)
    tracking.check_reachable()
    with tracking.stage_run(
        "validate", project_root=paths.root, experiment=cfg.project.experiment,
        params={"data": cfg.data.model_dump(), "validation": cfg.validation.model_dump()},
    ):
        with resources.compute():
            splits = task.load_raw()
            report = task.validate(splits)
        json_path, md_path = report.save(paths.validated)
        sources = describe_sources(cfg.data, splits)
        sources["snapshot"] = write_snapshot(splits, paths.validated)
        write_json(paths.validated / "sources.json", sources)
        for path in (json_path, md_path, paths.validated / "sources.json"):
            tracking.log_artifact(path, "validation")
        tracking.log_metrics({"validation/success": float(report.success), "validation/failures": float(len(report.failures))})
        print(f"validation {'passed' if report.success else 'FAILED'}: report at {md_path}")
        raise_for_failures(report)
    return sources


if __name__ == "__main__":
    run_cli(validate_flow, "Validate the raw data of the task (Great Expectations).")
