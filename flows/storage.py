"""A run's artifacts between machines: the DVC remote, checked before any compute and pushed after, and stage runs
synced through it so that the stages of one pipeline can run on different workers.

Not a flow: the pipeline flow and every stage flow call it. Three things travel through the default remote:

- the outputs of every stage (raw snapshot, prepared data, teacher, relevance index, teacher cache, students),
  by content hash, as ``dvc push`` / ``dvc pull`` move them;
- DVC's run cache: for each stage run, its command, dependency hashes and output hashes. A worker that has only
  the code and the remote (no ``dvc.lock`` of the run, no data) reproduces a stage with ``dvc repro --pull``:
  every upstream stage whose dependencies match a pushed run is restored from the remote instead of recomputed,
  and only the stage itself runs;
- nothing else: no shared disk, no lock file carried by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flows.common import load_params, paths_for, project_root

STAGES = ("validate", "prepare", "finetune_teacher", "relevance", "augment", "teacher_cache", "distill", "evaluate", "register")


def dvc(*args: str) -> list[str]:
    """A ``dvc`` command line with this interpreter (the venv's DVC, whichever ``dvc`` is first on PATH)."""
    return [sys.executable, "-m", "dvc", *args]


def dvc_remote(root: Path) -> dict | None:
    """The project's default DVC remote, checked before any compute: {"name", "url"}; None when none is set.

    A local remote (the default, ``.dvc/config``: a directory beside the checkout) is created on first use; any
    remote is asked whether its root exists, so that a worker that cannot reach it (missing credentials, no
    network, a path it cannot write) fails now, naming the remote, and not after hours of training."""
    from dvc.repo import Repo

    from flexkd.errors import ConfigError

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            return None
        try:
            remote = repo.cloud.get_remote(name)
            url = repo.config["remote"][name]["url"]
            if remote.fs.protocol in ("local", "file"):
                Path(remote.path).mkdir(parents=True, exist_ok=True)
                if not os.access(remote.path, os.W_OK):
                    raise PermissionError(f"{remote.path} is not writable")
            else:
                remote.fs.exists(remote.path)
        except Exception as err:  # noqa: BLE001 - whatever the storage said, name the remote and the way out
            raise ConfigError(
                f"DVC remote {name!r} ({repo.config['remote'].get(name, {}).get('url')}) cannot be reached: "
                f"{type(err).__name__}: {err}. Fix its url or credentials (`dvc remote modify`, credentials from the "
                "environment), or set another default remote (`dvc remote default`)."
            ) from None
    return {"name": name, "url": url}


def push_outputs(root: Path, remote: dict, targets: list[str] | None = None) -> None:
    """``dvc push --run-cache``: the outputs (of ``targets`` and their upstream stages, default all) and the run
    cache, so that another clone can ``dvc pull`` the run and another worker can restore its stages."""
    where = f"DVC remote {remote['name']!r} ({remote['url']})"
    print(f"pushing {'the outputs of ' + ', '.join(targets) if targets else 'the run' + chr(39) + 's outputs'} to {where}")
    command = dvc("push", "--run-cache", "--remote", remote["name"], *(["--with-deps", *targets] if targets else []))
    completed = subprocess.run(command, cwd=root)
    if completed.returncode != 0:
        raise RuntimeError(f"dvc push to {where} failed with exit status {completed.returncode}; the run itself is "
                           "complete: rerun `make push` once the remote is reachable")
    push_git_tracked_outputs(root, remote["name"], targets)


def push_git_tracked_outputs(root: Path, remote: str, targets: list[str] | None = None) -> int:
    """Push the objects of the ``cache: false`` outputs (metrics, reports: kept in git) of the stages pushed.

    ``dvc push`` leaves them out, but a run-cache entry names them: without them on the remote, a worker could not
    restore the stage (DVC would run it again). Their objects are in the local cache: DVC copies them there when
    it records the stage run. Returns how many objects were sent."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        if targets:
            stages = {stage for target in targets for stage in repo.stage.collect(target, with_deps=True)}
        else:
            stages = set(repo.index.stages)
        objects = {out.hash_info for stage in stages for out in stage.outs
                   if not out.use_cache and out.hash_info and out.hash_info.value
                   and repo.cache.local.exists(out.hash_info.value)}
        if not objects:
            return 0
        result = repo.cloud.push(objects, remote=remote)
        if result.failed:
            raise RuntimeError(f"dvc push to {remote!r}: {len(result.failed)} metrics/report objects failed to upload")
        return len(result.transferred)


def stage_env(root: Path, **extra: str) -> dict:
    """The environment of the stage processes that ``dvc repro`` starts: this project, this interpreter, and this
    process's Prefect API (instead of each stage starting a temporary server)."""
    from flows.server import api_url_for_children

    env = dict(os.environ, FLEXKD_PROJECT_ROOT=str(root), FLEXKD_PYTHON=sys.executable, **extra)
    api = api_url_for_children()
    if api:
        env["PREFECT_API_URL"] = api
    return env


def run_dvc(command: list[str], root: Path, env: dict) -> int:
    """Run a ``dvc`` command that starts stages; it (and every stage under it) stops when this process is killed."""
    from flows.server import die_with_parent

    print("running:", " ".join(command[2:]))
    return subprocess.run(command, cwd=root, env=env, preexec_fn=die_with_parent).returncode


def stale_snapshot(cfg, paths) -> str | None:
    """Why the validate stage must run again although DVC sees nothing changed (a local source file changed)."""
    from flexkd.data.raw_splits import snapshot_staleness

    reason = snapshot_staleness(cfg.data, paths.validated)
    if reason:
        print(f"data: {reason}; the validate stage runs again to take a new snapshot")
    return reason


def dvc_stage(stage: str, student: str | None = None, method: str | None = None) -> str:
    """The dvc.yaml stage a stage flow runs: its name, or ``distill@<student>-<method>`` for the matrix."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
    return f"distill@{student}-{method}" if stage == "distill" else stage


def run_synced(stage: str, params: str | None = None, student: str | None = None, method: str | None = None) -> dict:
    """Run one stage as a worker with only the code and the remote: check the remote (before any compute), pull
    what the stage needs (``dvc repro --pull``: upstream stages restored from the remote's run cache, or computed
    here if nobody pushed them), run the stage (its flow, under ``dvc repro``), push its outputs and run cache.

    ``dvc repro`` reads ``params.yaml``, so a stage run synced through the remote takes no other params file."""
    from flexkd.errors import ConfigError

    root = project_root()
    if params and Path(params).resolve() != (root / "params.yaml").resolve():
        raise ConfigError(f"params={params!r}: a stage synced through the DVC remote runs under `dvc repro`, which "
                          f"reads {root / 'params.yaml'}; write the parameters there (or run without sync)")
    cfg = load_params(None)
    target = dvc_stage(stage, student, method)
    if stage == "distill" and (student not in cfg.distill.students or method not in cfg.distill.methods):
        raise ConfigError(f"distill: {target} is not a stage of this pipeline (distill.students "
                          f"{cfg.distill.students}, distill.methods {cfg.distill.methods} in params.yaml)")
    remote = dvc_remote(root)
    if remote is None:
        raise ConfigError("sync: no default DVC remote is set, so this worker cannot receive the stage's inputs "
                          "or hand on its outputs; add one (`dvc remote add -d NAME URL`) or run without sync")
    force = ["--force", "--single-item"] if stage == "validate" and stale_snapshot(cfg, paths_for(cfg, root)) else []
    print(f"stage {target}: inputs from DVC remote {remote['name']!r} ({remote['url']}), outputs back to it")
    status = run_dvc(dvc("repro", "--pull", *force, target), root, stage_env(root))
    if status != 0:
        raise RuntimeError(f"dvc repro {target} failed with exit status {status}; see the stage output above")
    push_outputs(root, remote, [target])
    return {"stage": target, "remote": remote}


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.storage push|pull`` (``make push`` / ``make pull``): the default remote checked first."""
    import argparse

    from flexkd.errors import FlexKDError

    parser = argparse.ArgumentParser(description="Send this checkout's run to the default DVC remote, or fetch it.")
    parser.add_argument("action", choices=["push", "pull"],
                        help="push: every stage's outputs, their metrics and the run cache; pull: the outputs "
                             "dvc.lock names (commit dvc.lock after a run so that other clones pull that run)")
    args = parser.parse_args(argv)
    root = project_root()
    try:
        remote = dvc_remote(root)
        if remote is None:
            raise FlexKDError("no default DVC remote is set: `dvc remote add -d NAME URL` (README: Share a run)")
        if args.action == "push":
            push_outputs(root, remote)
            return 0
        print(f"pulling the run dvc.lock names from DVC remote {remote['name']!r} ({remote['url']})")
        return subprocess.run(dvc("pull", "--remote", remote["name"]), cwd=root).returncode
    except (FlexKDError, RuntimeError) as err:
        print(f"flexkd: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
