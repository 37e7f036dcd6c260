"""The whole pipeline as one Prefect flow: a fresh MLflow pipeline run, then ``dvc repro``.

DVC decides what is stale and runs each stale stage's flow (validate → prepare → finetune_teacher → relevance →
augment → teacher_cache → distill@<student>-<method> → evaluate → register); every stage's MLflow run nests under
this pipeline's run. This is what ``make run`` calls and what the Prefect deployments (``prefect.yaml``) run on work pools.

Two parameters change ``params.yaml`` before anything runs, so that a deployment run can pick its set-up:

- ``profile``: copy ``profiles/<profile>.yaml`` over ``params.yaml`` (what ``make profile`` does); an unknown
  name is refused with the list of profiles;
- ``overrides``: dotted keys, e.g. ``{"distill.train.epochs": 1, "distill.methods": ["ft", "flexkd"]}``, set in
  ``params.yaml`` (after the profile, comments kept) the way ``dvc exp run -S`` does.

The result is validated by :func:`flexkd.config.parse_config` before ``params.yaml`` is written: a wrong key or
value stops the run with a message naming the key, and leaves ``params.yaml`` as it was. Both are recorded as
params of the MLflow pipeline run (``pipeline.profile``, ``pipeline.overrides`` and one ``override.<key>`` each).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Mapping

from prefect import flow

from flexkd.overrides import apply_profile_and_overrides, parse_set
from flows.common import load_params, paths_for, preflight, project_root
from flows.storage import dvc, dvc_remote, push_outputs, run_dvc, stage_env, stale_snapshot


def _log_choice(run_id: str, profile: str | None, overrides: Mapping[str, Any] | None) -> None:
    import mlflow
    from mlflow.entities import Param

    from flexkd import tracking

    values = {"pipeline.profile": profile or "none",
              "pipeline.overrides": json.dumps(dict(overrides or {}), sort_keys=True, default=str)}
    for key, value in (overrides or {}).items():
        values[f"override.{key}"] = value if isinstance(value, str) else json.dumps(value, default=str)
    params = [Param(key, value) for key, value in tracking.flatten_params(values).items()]
    mlflow.MlflowClient().log_batch(run_id, params=params)


def describe_run(cfg, *, profile, overrides, commit, dirty, targets) -> str:
    """The pipeline run's description in the MLflow UI: what was run, on what, from which code."""
    students = ", ".join(f"{n} ({cfg.student(n).init}, {cfg.student(n).num_layers}x{cfg.student(n).hidden_size})"
                         for n in cfg.distill.students)
    lines = [
        f"flexkd pipeline (`dvc repro`{' ' + ' '.join(targets) if targets else ''}) on the task **{cfg.data.task}** "
        f"({cfg.data.format}), seed {cfg.project.seed}, profile {profile or 'none (params.yaml as committed)'}.",
        f"Teacher {cfg.teacher.model}; students {students}; methods {', '.join(cfg.distill.methods)}.",
        f"Chosen on the validation split by {cfg.evaluate.primary_metric if not cfg.data.is_generation else 'validation NLL'}; "
        "the test split is reported only.",
        f"Code: commit {commit[:12] if commit else 'unknown (not a git checkout)'}{' with uncommitted changes' if dirty else ''}.",
    ]
    if overrides:
        lines.append("Overrides: " + ", ".join(f"`{k}={json.dumps(v, default=str)}`" for k, v in overrides.items()) + ".")
    return "\n\n".join(lines)


# ----------------------------------------------------------------------------------------------- the flow
@flow(name="flexkd-pipeline", log_prints=True)
def pipeline_flow(
    targets: list[str] | None = None,
    force: bool = False,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    push: bool = True,
) -> dict:
    """Run the pipeline (``dvc repro``) on ``params.yaml``, after applying ``profile`` and ``overrides``.

    Args:
        targets: dvc stages to reproduce (default: all).
        force: rerun every stage even if nothing changed.
        profile: a name under ``profiles/`` copied over ``params.yaml`` first (``sst2``, ``alpaca``, ...).
        overrides: dotted keys set in ``params.yaml``, e.g. ``{"distill.train.epochs": 1}``.
        push: check the default DVC remote before any compute and ``dvc push`` the outputs after the run.
    """
    from flexkd import resources, tracking

    if apply_profile_and_overrides(project_root(), profile, overrides):
        print(f"params.yaml: profile={profile or '-'} overrides={json.dumps(overrides or {}, default=str)}")
    cfg = load_params()  # a wrong param stops here, before any stage runs
    paths = paths_for(cfg)
    # missing data, k > d_T, a prune plan the teacher cannot fit, a foreign tokenizer stop here too; the raw files
    # only where no raw snapshot was taken yet (a pulled run needs no source unless its data params change)
    preflight(cfg, data=not (paths.validated / "sources.json").is_file())
    remote = dvc_remote(paths.root) if push else None  # unreachable storage stops the run before any compute
    tracking.setup(paths.root, cfg.project.experiment)
    tracking.check_reachable()
    commit, dirty = tracking.git_state(paths.root)
    name = tracking.pipeline_run_name(task=cfg.data.task, seed=cfg.project.seed, profile=profile, commit=commit, dirty=dirty)
    parent = tracking.start_pipeline_run(paths.root, cfg.project.experiment, name, description=describe_run(
        cfg, profile=profile, overrides=overrides, commit=commit, dirty=dirty, targets=targets))
    _log_choice(parent, profile, overrides)
    # the stages run with this interpreter (flows/stage.sh), whichever `python` is first on PATH
    env = stage_env(paths.root, FLEXKD_PIPELINE_RUN_ID=parent)
    commands = [dvc("repro", *(["--force"] if force else []), *(targets or []))]
    if not force and stale_snapshot(cfg, paths):  # DVC cannot see a source outside the checkout
        commands.insert(0, dvc("repro", "--force", "--single-item", "validate"))
    setup_seconds, began = resources.process_age(), time.perf_counter()
    status = 0
    for command in commands:
        status = run_dvc(command, paths.root, env)
        if status != 0:
            break
    # for the overhead split: this process up to `dvc repro` (interpreter, imports, the temporary Prefect server,
    # pre-flight, MLflow set-up), and `dvc repro` itself (the stage processes plus DVC's own work between them)
    tracking.log_metrics({"resources/pipeline_setup_seconds": setup_seconds,
                          "resources/dvc_repro_seconds": time.perf_counter() - began}, run_id=parent)
    tracking.end_pipeline_run(parent, "FINISHED" if status == 0 else "FAILED")
    if status != 0:
        raise RuntimeError(f"dvc repro failed with exit status {status}; see the stage output above")
    if paths.comparison.exists():
        print(paths.comparison.read_text())
    if remote is not None:
        push_outputs(paths.root, remote)
    elif push:
        print("no default DVC remote is set (.dvc/config): the run's outputs stay in this checkout's cache")
    experiment = tracking.experiment_url(mlflow_experiment_id(cfg.project.experiment))
    local = " (start the UI with `make ui`)" if tracking.ui_base() == tracking.UI_DEFAULT else ""
    print(f"MLflow runs of {cfg.project.experiment}: {experiment}{local}")
    return {"pipeline_run_id": parent, "comparison": str(paths.comparison), "experiment_url": experiment}


def mlflow_experiment_id(name: str) -> str:
    import mlflow

    return mlflow.MlflowClient().get_experiment_by_name(name).experiment_id


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the whole pipeline (dvc repro inside a Prefect flow).")
    parser.add_argument("targets", nargs="*", help="dvc stages to reproduce (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun every stage even if nothing changed")
    parser.add_argument("--profile", default=None, help="copy profiles/<PROFILE>.yaml over params.yaml first")
    parser.add_argument("--no-push", action="store_true", help="do not dvc push the outputs to the default remote")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="set a dotted param in params.yaml first, e.g. --set distill.train.epochs=1 (repeatable)")
    args = parser.parse_args()
    try:
        from flows.server import ensure_api

        ensure_api()  # the temporary Prefect server (no PREFECT_API_URL) dies with this process, stages reuse it
        pipeline_flow(targets=args.targets or None, force=args.force, profile=args.profile,
                      overrides=parse_set(args.overrides) or None, push=not args.no_push)
    except Exception as err:  # noqa: BLE001
        print(f"\nflexkd: pipeline failed: {err}", file=sys.stderr)
        sys.exit(1)
