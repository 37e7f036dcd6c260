"""Stage 2: write the prepared splits (train / validation / test) and the label map under data/prepared/<task>/."""

from __future__ import annotations

from prefect import flow

from flows.common import load_params, paths_for, run_cli


@flow(name="flexkd-prepare", log_prints=True)
def prepare_flow(params: str | None = None) -> dict:
    from flexkd import tracking
    from flexkd.data.prepare import prepare_classification
    from flexkd.data.sources import build_label_map
    from flexkd.data.task import load_raw_splits

    cfg = load_params(params)
    paths = paths_for(cfg)
    tracking.setup(paths.root, cfg.project.experiment)
    with tracking.stage_run("prepare", project_root=paths.root, experiment=cfg.project.experiment, params={"data": cfg.data.model_dump(), "seed": cfg.project.seed}):
        splits = load_raw_splits(cfg.data)
        label_map = build_label_map(splits["train"]["label"], cfg.data.labels)
        manifest = prepare_classification(
            splits["train"], splits["test"], paths.prepared,
            label_map=label_map, validation_size=cfg.data.validation_size,
            max_train=cfg.data.max_train, max_test=cfg.data.max_test, seed=cfg.project.seed,
        )
        for split in ("train", "validation", "test"):
            tracking.log_dataset(paths.prepared / f"{split}.jsonl", name=f"{cfg.data.task}-{split}",
                                 context={"train": "training", "validation": "validation", "test": "test"}[split])
        tracking.log_artifact(paths.prepared / "manifest.json", "data")
        tracking.log_artifact(paths.prepared / "label_map.json", "data")
        print(f"prepared {cfg.data.task}: " + ", ".join(f"{s} {n} rows" for s, n in manifest["rows"].items()))
    return manifest


if __name__ == "__main__":
    run_cli(prepare_flow, "Prepare train/validation/test splits.")
