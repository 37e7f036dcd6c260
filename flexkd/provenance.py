"""Content hashes that tie artifacts to what they were made from, and atomic writes of files and directories.

The one place for both: every module that hashes a file, a directory's files or a JSON payload, or writes a file
or a directory so that a reader never sees it half-written, calls these."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes | str) -> str:
    """Hex sha256 of bytes (a str is hashed as its UTF-8 encoding)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def file_manifest(directory: str | Path, pattern: str = "**/*", exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """``{path relative to directory: sha256}`` of the files matching ``pattern``, sorted by path; ``exclude``
    names files (by name) that are left out, such as the manifest itself."""
    directory = Path(directory)
    return {
        str(path.relative_to(directory)): sha256_file(path)
        for path in sorted(directory.glob(pattern))
        if path.is_file() and path.name not in exclude
    }


def sha256_files(paths) -> str:
    """One hash over several files: their names (not directories) and contents, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def weights_hash(checkpoint_dir: str | Path) -> str:
    """Hash of a ``save_pretrained`` directory's weights (every ``*.safetensors`` file, sorted by name)."""
    checkpoint_dir = Path(checkpoint_dir)
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        files = sorted(checkpoint_dir.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"{checkpoint_dir}: no *.safetensors (or *.gguf) weights to hash")
    return sha256_files(files)


def tensor_state_hash(state_dict) -> str:
    """Hash of an in-memory state dict (names, dtypes, shapes and values), independent of file layout."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(json.dumps(list(tensor.shape)).encode())
        digest.update(tensor.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return digest.hexdigest()


def recover_dir(target: str | Path) -> Path | None:
    """Put back the previous version of an ``atomic_dir`` target when a crash hit between its two renames.

    ``atomic_dir`` moves the old directory aside, then renames the new one into place; a process killed between
    the two leaves no ``target`` but a complete ``.<name>.old-*``. Returns the restored path, or None.
    """
    target = Path(target)
    if target.exists():
        return None
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not olds:
        return None
    os.replace(olds[0], target)
    return target


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    """Write a text file atomically: a temp file in the same folder (unique to this writer), then ``os.replace``.

    A reader sees the old file or the new one, never a partial one; a failed write leaves no temp file behind.
    ``fsync`` also flushes the data to disk before the rename (for files a crash must not lose)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"  # mode from the umask, as open() gives
    try:
        with open(tmp, "x", encoding="utf-8", newline="") as handle:  # the text as given: "\n" stays LF everywhere
            handle.write(text)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_dir(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Fill a directory atomically: ``write`` fills a sibling temp directory, which is then renamed into place.

    A reader (or a run that crashed half-way) sees the old directory or the new one, never a half-written one;
    temp directories start with a dot and are never read.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    write(tmp)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
