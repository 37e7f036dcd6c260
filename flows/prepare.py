"""Stage 2: write the prepared splits (train / validation / test) and the label map under data/prepared/<task>/,
from the raw snapshot the validate stage took (data/validated/<task>/raw), not from the source again."""

from __future__ import annotations

from prefect import flow

from flows.common import load_params, paths_for, run_cli


@flow(name="flexkd-prepare", log_prints=True)
def prepare_flow(params: str | None = None, sync: bool = False) -> dict:
    if sync:  # a worker with only the code and the DVC remote: pull the inputs, run under dvc repro, push
        from flows.storage import run_synced

        return run_synced("prepare", params)
    from flexkd import resources, tracking
    from flexkd.data.raw_splits import read_snapshot
    from flexkd.tasks import task_for

    cfg = load_params(params)
    paths = paths_for(cfg)
    tracking.setup(paths.root, cfg.project.experiment)
    with tracking.stage_run("prepare", project_root=paths.root, experiment=cfg.project.experiment, params={"data": cfg.data.model_dump(), "seed": cfg.project.seed}):
        task = task_for(cfg)
        with resources.compute():
            manifest = task.prepare(read_snapshot(paths.validated), paths.prepared)
        targets = None if task.is_generation else "label"
        for split in ("train", "validation", "test"):
            tracking.log_dataset(paths.prepared / f"{split}.jsonl", name=f"{cfg.data.task}-{split}", targets=targets,
                                 context={"train": "training", "validation": "validation", "test": "test"}[split])
        for name in ("manifest.json", "label_map.json"):
            if (paths.prepared / name).exists():
                tracking.log_artifact(paths.prepared / name, "data")
        print(f"prepared {cfg.data.task}: " + ", ".join(f"{s} {n} rows" for s, n in manifest["rows"].items()))
    return manifest


if __name__ == "__main__":
    run_cli(prepare_flow, "Prepare train/validation/test splits.")
