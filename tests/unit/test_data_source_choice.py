"""Data anywhere: ``data.source: auto`` takes the local files when they are there, else the Hub dataset, and a run
that can reach neither stops at once with one error that names both places and the remedy."""

from __future__ import annotations

import http.server
import socket
import threading
from pathlib import Path

import pytest
import yaml

from flexkd.config import parse_config
from flexkd.data.raw_splits import describe_sources, load_raw_splits, resolve_source
from flexkd.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def _data(**update) -> "DataConfig":  # noqa: F821
    raw = yaml.safe_load((REPO / "profiles" / "cola.yaml").read_text())
    raw["data"].update(update)
    return parse_config(raw).data


@pytest.fixture()
def no_mirror(tmp_path, monkeypatch):
    """A working directory with no ../shared/datasets and no FLEXKD_DATA_DIR: a user's clone elsewhere."""
    work = tmp_path / "clone"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("FLEXKD_DATA_DIR", raising=False)
    import flexkd

    monkeypatch.setattr(flexkd, "__file__", str(work / "flexkd" / "__init__.py"))  # the repo's own ../shared too
    return work


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def fake_hub(monkeypatch):
    """A loopback server standing in for the Hub's API: 200 for nyu-mll/glue, 404 for anything else."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.path)
            self.send_response(200 if self.path == "/api/datasets/nyu-mll/glue" else 404)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    yield seen
    server.shutdown()


def test_auto_takes_the_local_files_when_they_are_there(data_dir, monkeypatch):
    monkeypatch.setenv("FLEXKD_DATA_DIR", str(data_dir))
    data = resolve_source(_data())
    assert data.source == "local" and data.columns.text == 3  # the local column positions
    splits = load_raw_splits(_data())
    assert len(splits["train"]) == 300 and len(splits["test"]) == 200
    sources = describe_sources(_data(), splits)
    assert sources["source"] == "local" and sources["train"]["file"].endswith("glue/CoLA/train.tsv")


def test_auto_falls_back_to_the_hub_with_its_own_columns(no_mirror, fake_hub):
    data = resolve_source(_data())
    assert data.source == "hub" and data.hub_id == "nyu-mll/glue" and data.hub_config == "cola"
    assert (data.columns.text, data.columns.label) == ("sentence", "label")  # hub_columns, not the local positions
    assert fake_hub == ["/api/datasets/nyu-mll/glue"]


def test_hub_rows_are_read_through_datasets_with_the_hub_columns_and_revision(no_mirror, fake_hub, monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, name=None, *, split, revision=None):
        calls.append((path, name, split, revision))
        n = 4 if split == "train" else 2
        return datasets.Dataset.from_dict({"sentence": [f"{split} sentence {i}" for i in range(n)],
                                           "label": [i % 2 for i in range(n)], "idx": list(range(n))})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = _data(hub_revision="refs/convert/parquet")
    splits = load_raw_splits(data)
    assert calls == [("nyu-mll/glue", "cola", "train", "refs/convert/parquet"),
                     ("nyu-mll/glue", "cola", "validation", "refs/convert/parquet")]
    assert splits["train"]["text"].tolist()[0] == "train sentence 0" and splits["test"]["label"].tolist() == [0, 1]
    assert splits["train"]["source_file"].iloc[0] == "hf://nyu-mll/glue/train"
    sources = describe_sources(data, splits)
    assert sources["source"] == "hub" and sources["test"]["split"] == "validation" and sources["train"]["rows"] == 4


def test_neither_source_is_one_error_naming_both_places_and_the_remedy(no_mirror, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_free_port()}")  # nothing listens: no network
    with pytest.raises(DataError) as err:
        resolve_source(_data())
    message = str(err.value)
    assert "neither source can be reached" in message
    assert "glue/CoLA/train.tsv" in message and "nyu-mll/glue" in message and "unreachable" in message
    assert "data.data_dir" in message and "FLEXKD_DATA_DIR" in message


def test_a_missing_hub_dataset_is_named(no_mirror, fake_hub):
    with pytest.raises(DataError, match=r"no such dataset on the Hub \(check data.hub_id\)"):
        resolve_source(_data(hub_id="someone/missing"))


def test_offline_mode_without_the_dataset_in_the_cache_is_the_same_one_error(no_mirror, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load_raw_splits(_data(hub_id="flexkd-test/not-cached"))
    message = str(err.value)
    assert "neither source can be reached" in message and "flexkd-test/not-cached" in message
    assert "offline mode is on" in message and "data.data_dir" in message


def test_explicit_sources_are_not_second_guessed(no_mirror, data_dir):
    local = _data(source="local", data_dir=str(data_dir))
    assert resolve_source(local).source == "local"
    # a data_dir param names a place: auto keeps to it, and a missing directory is named instead of replaced
    assert resolve_source(_data(data_dir=str(no_mirror / "elsewhere"))).source == "local"
    with pytest.raises(DataError, match="data directory not found"):
        load_raw_splits(_data(data_dir=str(no_mirror / "elsewhere")))
    with pytest.raises(DataError, match="data directory not found"):
        load_raw_splits(_data(source="local"))
    assert resolve_source(_data(source="hub")).source == "hub"  # loading it is what fails, naming the Hub


def test_every_shipped_profile_names_a_local_file_and_a_hub_dataset():
    for path in sorted((REPO / "profiles").glob("*.yaml")):
        data = parse_config(yaml.safe_load(path.read_text())).data
        assert data.hub_id, path.name
        if path.stem != "gpu-dolly":  # a Hub-only set-up for a GPU machine with network
            assert data.source == "auto" and data.train_file, path.name
