"""What a stage process spends: seconds of real work (``compute``), of the other named phases, and peak memory.

``make run``'s wall time minus the compute seconds of every stage is the orchestration overhead; benchmarks
report it as a ratio and split it into the phases counted here (``preflight``, ``mlflow``: every call into the
tracking server, also those inside a training loop) and what the stage runs can tell apart around them: process
start-up (Python, imports, the Prefect flow run), in-stage rest (loading and saving models and data), and DVC
between stages. Phases nest exclusively: a ``mlflow`` block inside ``compute`` pauses the compute clock.
``stage_run`` logs these as ``resources/*`` metrics of each stage's MLflow run.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections import defaultdict
from contextlib import AbstractContextManager, contextmanager
from typing import Iterator

_seconds: dict[str, float] = defaultdict(float)
_local = threading.local()
_IMPORTED = time.time()  # process_age's fallback


def _stack() -> list[list]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the block's wall time under ``name``; the enclosing phase's clock pauses meanwhile.

    Also a decorator (``@resources.phase("mlflow")``)."""
    stack = _stack()
    now = time.perf_counter()
    if stack:
        outer = stack[-1]
        _seconds[outer[0]] += now - outer[1]
    stack.append([name, now])
    try:
        yield
    finally:
        now = time.perf_counter()
        own, started = stack.pop()
        _seconds[own] += now - started
        if stack:
            stack[-1][1] = now


def compute() -> AbstractContextManager[None]:
    """Count the block's wall time as compute (training, scoring, caching, evaluation, validation)."""
    return phase("compute")


def seconds(name: str) -> float:
    """Seconds spent so far in phase ``name`` by this process (blocks still open not counted)."""
    return _seconds.get(name, 0.0)


def compute_seconds() -> float:
    return seconds("compute")


def process_age() -> float:
    """Seconds since this process started (the interpreter's start, before any import)."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - no psutil or no permission: the age since this module was imported
        return time.time() - _IMPORTED



def peak_rss_mb() -> float:
    """Peak resident memory of this process or any child it waited for (accelerate ranks), in MiB."""
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * scale
