"""The one atomic-write helper and the one hashing helper (flexkd/provenance.py) that every module calls."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from flexkd.provenance import atomic_write_text, file_manifest, sha256_bytes, sha256_file

REPO = Path(__file__).resolve().parents[2]


def test_atomic_write_replaces_whole_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "params.yaml"
    atomic_write_text(target, "a: 1\n")
    atomic_write_text(target, "a: 2\n", fsync=True)
    assert target.read_text() == "a: 2\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["params.yaml"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # the mode open() gives, not mkstemp's 0600


def test_a_failed_write_keeps_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "index.json"
    target.write_text("old\n")
    with pytest.raises(TypeError):  # the write fails after the temp file is opened
        atomic_write_text(target, b"not text")  # type: ignore[arg-type]
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_manifest_hashes_every_file_by_relative_path(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.npy").write_bytes(b"\x00\x01")
    (tmp_path / "b.npy").write_bytes(b"b")
    (tmp_path / "manifest.json").write_text("{}")
    every = file_manifest(tmp_path, exclude=("manifest.json",))
    assert list(every) == ["a/w.npy", "b.npy"]
    assert every["b.npy"] == sha256_file(tmp_path / "b.npy") == sha256_bytes(b"b")
    assert list(file_manifest(tmp_path, "*.npy")) == ["b.npy"]
    assert sha256_bytes("é") == sha256_bytes("é".encode())


def test_no_other_module_writes_a_temp_file_and_renames_it():
    """One helper: a new `os.replace(tmp, ...)` or `hashlib.sha256(...).hexdigest()` outside provenance.py is a copy."""
    sources = subprocess.run(["git", "ls-files", "flexkd", "flows", "benchmarks"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    offenders = []
    for name in sources:
        if not name.endswith(".py") or name == "flexkd/provenance.py":
            continue
        text = (REPO / name).read_text(encoding="utf-8")
        if re.search(r"os\.replace\(\s*tmp", text) or "mkstemp(" in text:
            offenders.append(name)
    assert offenders == []
