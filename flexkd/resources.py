"""What a stage process spends: seconds of real work (``compute``) and peak resident memory.

``make run``'s wall time minus the compute seconds of every stage is the orchestration overhead (Prefect, MLflow,
DVC, imports, model loading); benchmarks report it as a ratio. ``stage_run`` logs these as ``resources/*``
metrics of each stage's MLflow run.
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from typing import Iterator

_seconds = {"compute": 0.0}


@contextmanager
def compute() -> Iterator[None]:
    """Count the block's wall time as compute (training, scoring, caching, evaluation, validation)."""
    began = time.perf_counter()
    try:
        yield
    finally:
        _seconds["compute"] += time.perf_counter() - began


def compute_seconds() -> float:
    return _seconds["compute"]


def peak_rss_mb() -> float:
    """Peak resident memory of this process or any child it waited for (accelerate ranks), in MiB."""
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * scale
