"""What every stage flow shares: where the project is, the params, the paths of each stage's outputs.

Paths live here and nowhere else; dvc.yaml names the same paths (a test checks that they agree).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from flexkd.config import EXECUTION_ONLY_KEYS, FlexKDConfig, load_config


def project_root() -> Path:
    """The project directory: $FLEXKD_PROJECT_ROOT, else the current directory (dvc runs stages from the root)."""
    return Path(os.environ.get("FLEXKD_PROJECT_ROOT", os.getcwd())).resolve()


@dataclass(frozen=True)
class Paths:
    root: Path
    task: str
    runs_dir: str
    work_dir: str

    @property
    def validated(self) -> Path:
        return self.root / "data" / "validated" / self.task

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared" / self.task

    @property
    def relevance(self) -> Path:
        return self.root / "data" / "relevance" / self.task

    @property
    def teacher(self) -> Path:
        return self.root / self.runs_dir / "teacher" / self.task

    @property
    def teacher_cache(self) -> Path:
        """The teacher-feature cache of the training split (stage teacher_cache; disabled: only a meta.json)."""
        return self.root / "data" / "teacher_cache" / self.task

    @property
    def teacher_metrics(self) -> Path:
        """Timing of the teacher stage: a DVC metric, kept out of the teacher directory so that a rerun on the
        same inputs leaves that directory byte-identical (and later stages up to date)."""
        return self.root / "metrics" / "teacher.json"

    def student(self, student: str, method: str) -> Path:
        return self.root / self.runs_dir / "students" / self.task / student / method

    def distill_metrics(self, student: str, method: str) -> Path:
        return self.root / "metrics" / "distill" / student / f"{method}.json"

    @property
    def evaluation(self) -> Path:
        return self.root / "metrics" / "evaluation.json"

    @property
    def comparison(self) -> Path:
        return self.root / "reports" / "comparison.md"

    @property
    def registry(self) -> Path:
        return self.root / "reports" / "registry.json"

    def scratch(self, stage: str, fingerprint: str) -> Path:
        """Resumable checkpoints of one stage for one set of inputs (not a DVC output: survives a failed stage)."""
        return self.root / self.work_dir / f"{stage}-{fingerprint[:16]}"


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


def fingerprint(*parts) -> str:
    """A stable hash of JSON-able parts (configs as dicts, file hashes, names).

    Keys that only say how training is executed (``EXECUTION_ONLY_KEYS``: num_processes, distributed) are left
    out at any depth, so that a checkpoint resumes under another process count."""

    def essential(value):
        if isinstance(value, dict):
            return {k: essential(v) for k, v in value.items() if k not in EXECUTION_ONLY_KEYS}
        if isinstance(value, (list, tuple)):
            return [essential(v) for v in value]
        return value

    blob = json.dumps(essential(list(parts)), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def cli(description: str, method: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=None, help="params file (default: params.yaml in the project root)")
    if method:
        parser.add_argument("--student", required=True, help="a student set-up named under `students` in params")
        parser.add_argument("--method", required=True, help="distillation method: ft, kd, projector, cka or flexkd")
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
    kwargs = {"params": args.params}
    if method:
        kwargs.update(student=args.student, method=args.method)
    try:
        ensure_api()
        flow_fn(**kwargs)
    except FlexKDError as err:
        print(f"\nflexkd: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
