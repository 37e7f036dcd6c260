"""benchmarks/teacher.py: the teacher recipe at several learning rates, picked on validation, test reported."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.integration.project import save_tiny_bert, tiny_params


def test_the_sweep_picks_the_lr_best_on_validation_and_reports_test_for_each(tmp_path, data_dir):
    from benchmarks import teacher
    from benchmarks.run import render_tuning

    teacher_dir = save_tiny_bert(tmp_path / "teacher_init")
    params = tiny_params(data_dir, teacher_dir)
    params["teacher"]["finetune"].update(epochs=3, patience=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    argv = ["--params", str(tmp_path / "params.yaml"), "--lrs", "1e-5", "3e-3", "--set", "teacher.finetune.eval_every=3",
            "--work-dir", str(tmp_path / "work"), "--output", str(tmp_path / "teacher.json")]
    assert teacher.main(argv) == 0
    result = json.loads((tmp_path / "teacher.json").read_text())
    rows = result["rows"]
    assert [r["lr"] for r in rows] == [1e-5, 3e-3] and result["eval_every"] == 3 and result["patience"] == 1
    for row in rows:
        assert 0.0 <= row["validation"] <= 1.0 and 0.0 <= row["test"] <= 1.0
        assert 0 < row["steps_run"] <= row["steps"] and row["best_step"] <= row["steps_run"]
        if row["steps_run"] < row["steps"]:  # ended before its budget: patience said why
            assert "no better validation" in row["stopped_early"]
    assert any(row["stopped_early"] for row in rows)  # lr 1e-5 hardly moves: patience 1 ends it
    assert result["pick"] == max(rows, key=lambda r: r["validation"])  # validation decides, never test
    records = json.loads((tmp_path / "work" / "records" / "lr0.003.json").read_text())
    assert records["params"]["teacher"]["finetune"]["lr"] == 3e-3
    assert not (tmp_path / "work" / "lr0.003").exists()  # the weights are not kept
    text = "\n".join(render_tuning({"teacher_sweep": {"sst2": result}}))
    assert "## Teacher ceiling" in text and f"Pick: lr {result['pick']['lr']:g}" in text
    # a rerun reuses the records: nothing trains again
    assert teacher.main(argv) == 0
    assert json.loads((tmp_path / "teacher.json").read_text())["rows"] == rows


def test_a_profile_without_teacher_fine_tuning_is_refused(tmp_path, data_dir):
    from benchmarks import teacher

    params = tiny_params(data_dir, save_tiny_bert(tmp_path / "teacher_init"))
    params["teacher"]["finetune"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit, match="teacher.finetune.enabled is false"):
        teacher.main(["--params", str(tmp_path / "params.yaml"), "--lrs", "1e-4", "--work-dir", str(tmp_path / "w")])
