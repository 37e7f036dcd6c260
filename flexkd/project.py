"""The project's layout on disk and the small helpers every stage shares: where each stage's outputs live,
the fingerprint of a stage's inputs, JSON files written atomically.

Paths live here and nowhere else; dvc.yaml names the same paths (a test checks that they agree).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flexkd.config import EXECUTION_ONLY_KEYS
from flexkd.provenance import atomic_write_text, sha256_bytes


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
    def augmented(self) -> Path:
        """The students' teacher-labelled extra training rows (stage augment; disabled: only a meta.json)."""
        return self.root / "data" / "augmented" / self.task

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

    return sha256_bytes(json.dumps(essential(list(parts)), sort_keys=True, default=str))


def write_json(path: Path, payload: dict) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
