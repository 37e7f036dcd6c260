"""Shared test set-up: offline, a fresh Prefect home, the local datasets mirror, tiny random models."""

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
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="flexkd-prefect-"))
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("FLEXKD_PIPELINE_RUN_ID", None)

REPO = Path(__file__).resolve().parents[1]


def datasets_dir() -> Path | None:
    for candidate in (os.environ.get("FLEXKD_DATA_DIR"), REPO.parent / "shared" / "datasets"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = datasets_dir()
    if found is None:
        pytest.skip("the local datasets mirror (../shared/datasets or FLEXKD_DATA_DIR) is not here")
    return found
