"""What every stage flow shares: where the project is, the params, the paths of each stage's outputs.

Paths live here and nowhere else; dvc.yaml names the same paths (a test checks that they agree).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from flexkd.config import FlexKDConfig, load_config
from flexkd.project import Paths, fingerprint, read_json, write_json  # noqa: F401 - the flows' names for them


def project_root() -> Path:
    """The project directory: $FLEXKD_PROJECT_ROOT, else the current directory (dvc runs stages from the root)."""
    return Path(os.environ.get("FLEXKD_PROJECT_ROOT", os.getcwd())).resolve()


def paths_for(cfg: FlexKDConfig, root: Path | None = None) -> Paths:
    return Paths(root or project_root(), cfg.data.task, cfg.project.runs_dir, cfg.project.work_dir)


def load_params(params: str | None = None) -> FlexKDConfig:
    return load_config(Path(params) if params else project_root() / "params.yaml")


def preflight(cfg: FlexKDConfig, *, data: bool = False, tuned_teacher: bool = False) -> None:
    """The checks of :mod:`flexkd.preflight` (data files, teacher and student sizes, tokenizers), before any
    compute. ``data``: also the raw data files; ``tuned_teacher``: check against the fine-tuned teacher when it
    is there (stages after finetune_teacher), else ``teacher.model``."""
    from flexkd import resources
    from flexkd.preflight import check, describe

    with resources.phase("preflight"):
        tuned = paths_for(cfg).teacher
        use_tuned = tuned_teacher and (tuned / "config.json").is_file()
        notes = check(cfg, data=data, teacher=str(tuned) if use_tuned else None)
    print(describe(notes))


def cli(description: str, method: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=None, help="params file (default: params.yaml in the project root)")
    parser.add_argument("--sync", action="store_true",
                        help="run as a worker that shares only the DVC remote: check it, pull the stage's inputs "
                             "(upstream stages restored from the remote's run cache), run the stage under dvc repro, "
                             "push its outputs")
    if method:
        parser.add_argument("--student", required=True, help="a student set-up named under `students` in params")
        parser.add_argument("--method", required=True, help="distillation method: ft, kd, projector, cka, flexkd or one of distill.composed_methods")
    return parser.parse_args()


def run_cli(flow_fn, description: str, method: bool = False) -> None:
    """Entry point of ``python -m flows.<stage>``: a clear one-line error, exit status 1, on expected failures.

    Without ``PREFECT_API_URL`` (a stage run by a bare ``dvc repro``), the temporary Prefect server is started
    by :func:`flows.server.ensure_api`, as a child that cannot outlive this process even when it is killed."""
    import sys

    from flexkd.errors import FlexKDError
    from flows.server import die_with_parent, ensure_api

    die_with_parent()  # killed `dvc repro` or pipeline: this stage stops too, its Prefect server with it
    args = cli(description, method)
    kwargs = {"params": args.params, **({"sync": True} if args.sync else {})}
    if method:
        kwargs.update(student=args.student, method=args.method)
    try:
        ensure_api()
        flow_fn(**kwargs)
    except FlexKDError as err:
        print(f"\nflexkd: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
