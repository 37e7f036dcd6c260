"""The raw snapshot: the validate stage stores the rows a run read, prepare reads them back, and the result is
the same prepared data as from the source itself, also where the source files are gone (a pulled clone)."""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import pytest
import yaml

from flexkd.config import parse_config
from flexkd.data.raw_splits import describe_sources, read_snapshot, snapshot_staleness, write_snapshot
from flexkd.errors import DataError
from flexkd.tasks import task_for

REPO = Path(__file__).resolve().parents[2]


def _cfg(profile: str, data_dir: Path, **data):
    raw = yaml.safe_load((REPO / profile).read_text())
    raw["data"].update(data_dir=str(data_dir), **data)
    return parse_config(raw)


def _take(cfg, directory: Path) -> dict:
    """What the validate stage does with the rows it read."""
    task = task_for(cfg)
    splits = task.load_raw()
    sources = describe_sources(cfg.data, splits)
    sources["snapshot"] = write_snapshot(splits, directory)
    (directory / "sources.json").write_text(json.dumps(sources))
    return splits


def _same_dirs(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.mark.parametrize("profile, dataset, data", [
    ("params.yaml", "glue", {"max_train": 200, "validation_size": 40, "max_test": 60}),
    ("profiles/cola.yaml", "glue", {"max_train": 200, "validation_size": 40}),
    ("profiles/alpaca.yaml", "alpaca_5k", {"max_train": 40, "validation_size": 10, "max_test": 20, "test_size": 30}),
])
def test_prepare_from_the_snapshot_equals_prepare_from_the_source_even_without_it(tmp_path, data_dir, profile, dataset, data):
    source = tmp_path / "source"
    shutil.copytree(data_dir, source)
    cfg = _cfg(profile, source, **data)
    task = task_for(cfg)
    validated = tmp_path / "validated"
    splits = _take(cfg, validated)
    task.prepare(splits, tmp_path / "from-source")

    shutil.rmtree(source)  # a clone that pulled the run: the snapshot alone
    task.prepare(read_snapshot(validated), tmp_path / "from-snapshot")
    _same_dirs(tmp_path / "from-source", tmp_path / "from-snapshot")
    manifest = json.loads((tmp_path / "from-snapshot" / "manifest.json").read_text())
    assert manifest["sources"]["train"][0].get("sha256") or cfg.data.is_generation  # the source's hash, kept


def test_snapshot_keeps_missing_cells_labels_and_reference_lists(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"text": ["a", None, "c"], "label": ["pos", "neg", "pos"], "source_row": [2, 3, 4],
                          "references": [["x", "y"], ["z"], []]})
    (tmp_path / "v").mkdir()
    entry = write_snapshot({"train": frame}, tmp_path / "v")
    (tmp_path / "v" / "sources.json").write_text(json.dumps({"source": "hub", "snapshot": entry}))
    back = read_snapshot(tmp_path / "v")["train"]
    assert list(back.columns) == list(frame.columns) and back["text"].isna().tolist() == [False, True, False]
    assert back["label"].tolist() == ["pos", "neg", "pos"] and back["source_row"].tolist() == [2, 3, 4]
    assert back["references"].tolist() == [["x", "y"], ["z"], []]


def test_a_missing_or_altered_snapshot_is_refused_with_the_remedy(tmp_path, data_dir):
    cfg = _cfg("params.yaml", data_dir, max_train=200, validation_size=40, max_test=60)
    with pytest.raises(DataError, match="no raw snapshot.*dvc repro validate"):
        read_snapshot(tmp_path / "nothing")
    validated = tmp_path / "validated"
    _take(cfg, validated)
    with open(validated / "raw" / "test.jsonl", "a") as handle:
        handle.write('{"text": "an extra row", "label": 1}\n')
    with pytest.raises(DataError, match=r"test\.jsonl.*not the one sources\.json names.*dvc checkout"):
        read_snapshot(validated)


def test_a_changed_local_source_makes_the_snapshot_stale_a_missing_one_does_not(tmp_path, data_dir):
    source = tmp_path / "source"
    shutil.copytree(data_dir, source)
    cfg = _cfg("params.yaml", source, max_train=200, validation_size=40, max_test=60)
    validated = tmp_path / "validated"
    _take(cfg, validated)
    assert snapshot_staleness(cfg.data, validated) is None
    test_file = source / cfg.data.test_file
    test_file.write_text(test_file.read_text() + "one more review , and a fine one .\t1\n")
    reason = snapshot_staleness(cfg.data, validated)
    assert reason and str(test_file) in reason and "changed" in reason
    shutil.rmtree(source)  # not here at all: the snapshot stands
    assert snapshot_staleness(cfg.data, validated) is None
    assert snapshot_staleness(cfg.data, tmp_path / "never-validated") is None
