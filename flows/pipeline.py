"""The whole pipeline as one Prefect flow: a fresh MLflow pipeline run, then ``dvc repro``.

DVC decides what is stale and runs each stale stage's flow (validate → prepare → finetune_teacher → relevance →
distill@<method> → evaluate → register); every stage's MLflow run nests under this pipeline's run. This is
what ``make run`` calls and what the Prefect deployments run on work pools.
"""

from __future__ import annotations

import os
import subprocess
import sys

from prefect import flow

from flows.common import load_params, paths_for


def _prefect_api_for_children() -> str | None:
    """Let the stage processes talk to this process's Prefect API instead of each starting a temporary server."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    try:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        return server.api_url if server.running else None
    except Exception:  # noqa: BLE001 - an optimisation only; children fall back to their own server
        return None


@flow(name="flexkd-pipeline", log_prints=True)
def pipeline_flow(targets: list[str] | None = None, force: bool = False) -> dict:
    from flexkd import tracking

    cfg = load_params()  # a wrong param stops here, before any stage runs
    paths = paths_for(cfg)
    tracking.setup(paths.root, cfg.project.experiment)
    tracking.check_reachable()
    parent = tracking.start_pipeline_run(paths.root, cfg.project.experiment)
    env = dict(os.environ, FLEXKD_PIPELINE_RUN_ID=parent, FLEXKD_PROJECT_ROOT=str(paths.root))
    api = _prefect_api_for_children()
    if api:
        env["PREFECT_API_URL"] = api
    command = [sys.executable, "-m", "dvc", "repro", *(["--force"] if force else []), *(targets or [])]
    print("running:", " ".join(command[2:]))
    completed = subprocess.run(command, cwd=paths.root, env=env)
    tracking.end_pipeline_run(parent, "FINISHED" if completed.returncode == 0 else "FAILED")
    if completed.returncode != 0:
        raise RuntimeError(f"dvc repro failed with exit status {completed.returncode}; see the stage output above")
    if paths.comparison.exists():
        print(paths.comparison.read_text())
    return {"pipeline_run_id": parent, "comparison": str(paths.comparison)}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the whole pipeline (dvc repro inside a Prefect flow).")
    parser.add_argument("targets", nargs="*", help="dvc stages to reproduce (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun every stage even if nothing changed")
    args = parser.parse_args()
    try:
        pipeline_flow(targets=args.targets or None, force=args.force)
    except Exception as err:  # noqa: BLE001
        print(f"\nflexkd: pipeline failed: {err}", file=sys.stderr)
        sys.exit(1)
