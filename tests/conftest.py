"""Shared test set-up: offline, a fresh Prefect home, real text from the fixtures under tests/, tiny random models.

The suite needs nothing outside the repository: real rows of every dataset the tests read are shipped in
``tests/fixtures/datasets/`` (first rows of the upstream files; sources and licenses in its SOURCE.md), laid out
like the full datasets directory. No test skips for want of data.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # each pytest-xdist worker its own Prefect home (the controller's is inherited): the temporary Prefect
    # servers of two workers never share one SQLite database
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"flexkd-prefect-{os.environ['PYTEST_XDIST_WORKER']}-")
else:
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="flexkd-prefect-"))
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("FLEXKD_PIPELINE_RUN_ID", None)

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DATA = REPO / "tests" / "fixtures" / "datasets"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The fixture datasets directory (real rows, shipped with the repository)."""
    return FIXTURE_DATA
