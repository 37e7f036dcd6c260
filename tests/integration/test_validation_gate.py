"""Bad data stops the pipeline at the validate stage, before any training, with a report naming the rows."""

from __future__ import annotations

import json
import sys

import pytest

from tests.integration.project import make_project, run, save_tiny_bert, tiny_params

pytestmark = pytest.mark.slow


def test_bad_rows_stop_dvc_repro_before_training(tmp_path, data_dir):
    raw = tmp_path / "raw"
    raw.mkdir()
    train = ["sentence\tlabel"] + [f"a perfectly fine sentence number {i}\t{i % 2}" for i in range(60)]
    train[5] = "   \t1"                      # line 6: whitespace-only text
    train[9] = "an unlabeled thought\t7"     # line 10: label outside {0, 1}
    (raw / "train.tsv").write_text("\n".join(train) + "\n")
    test = ["sentence\tlabel", "a perfectly fine sentence number 3\t1", "something new\t0"]  # line 2 overlaps train
    (raw / "test.tsv").write_text("\n".join(test) + "\n")

    teacher = save_tiny_bert(tmp_path / "teacher")
    params = tiny_params(raw, teacher)
    params["data"].update(train_file="train.tsv", test_file="test.tsv", validation_size=5, max_test=None)
    root = make_project(tmp_path / "project", params)

    completed = run([sys.executable, "-m", "dvc", "repro"], root, check=False)
    assert completed.returncode != 0
    output = completed.stdout + completed.stderr
    assert "ValidationFailed" in output and "train.tsv" in output

    report = json.loads((root / "data/validated/sst2/validation_report.json").read_text())
    assert report["success"] is False
    failed = {(f["split"], f["expectation"], f["column"]): f for f in report["failures"]}
    rows = {key: [s["row"] for s in f["samples"]] for key, f in failed.items()}
    assert any(split == "train" and column == "label" and 10 in rows[(split, exp, column)] for split, exp, column in rows)
    assert any(split == "train" and column == "text" and 6 in rows[(split, exp, column)] for split, exp, column in rows)
    assert any(split == "test" and column == "text" and 2 in rows[(split, exp, column)] for split, exp, column in rows)
    assert (root / "data/validated/sst2/validation_report.md").exists()
    # nothing downstream ran
    assert not (root / "data/prepared").exists() and not (root / "runs").exists()

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("flexkd-test").experiment_id])
    validate = [r for r in runs if r.data.tags.get("flexkd.stage") == "validate"][0]
    assert validate.info.status == "FAILED"
    assert "validation/validation_report.md" in {a.path for a in client.list_artifacts(validate.info.run_id, "validation")}
