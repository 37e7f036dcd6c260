"""`python -m benchmarks.run` (what `make benchmark` calls) from start to end on a tiny profile and one seed."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from tests.integration.project import REPO, env_for, run, save_tiny_bert, tiny_params

pytestmark = pytest.mark.slow


def test_benchmark_command_writes_the_report_and_reuses_finished_runs(tmp_path, data_dir):
    teacher = save_tiny_bert(tmp_path / "teacher", hidden=32, layers=2)
    params = tiny_params(data_dir, teacher, **{"distill.students": ["random"], "distill.methods": ["ft", "projector", "flexkd"],
                                                "data.max_train": 120})
    profile = tmp_path / "tiny.yaml"
    profile.write_text(yaml.safe_dump(params, sort_keys=False))
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, "-m", "benchmarks.run", "--profiles", str(profile), "--seeds", "7", "--work-dir", str(work),
               "--rounds", "2", "--output", str(out)]
    run(command, REPO, env=env_for(REPO))

    report = (out / "BENCHMARKS.md").read_text()
    results = json.loads((out / "benchmarks" / "results.json").read_text())
    assert results["machine"]["cores"] and "Machine:" in report
    quality = results["quality"]["tiny"]
    assert quality["quality"]["seeds"] == [7] and set(quality["quality"]["scores"]) == {
        "teacher", "random/ft", "random/projector", "random/flexkd"}
    assert "random" in quality["quality"]["flexkd_minus_projector"]
    best = quality["quality"]["best_student"]  # the evaluate stage's validation pick, over the teacher
    evaluation = quality["records"][0]["evaluation"]
    assert best["picks"] == [evaluation["selection"]["best"]]
    assert best["over_teacher"]["mean"] == pytest.approx(
        evaluation["students"][best["picks"][0]]["accuracy"] / evaluation["teacher"]["accuracy"])
    assert "The student each run picked on validation" in report and "Budget: data.max_train 120" in report
    run_record = quality["runs"][0]
    assert 0 < run_record["compute_seconds"] < run_record["wall_seconds"]
    assert {"validate", "prepare", "finetune_teacher", "relevance", "teacher_cache", "evaluate"} <= set(run_record["stages"])
    assert all(stage["peak_rss_mb"] > 50 for stage in run_record["stages"].values())
    split = run_record["split"]  # where the non-compute seconds went, from each stage process's own clocks
    parts = ("startup", "preflight", "mlflow", "in_stage", "dvc", "pipeline")
    assert sum(split[k] for k in parts) == pytest.approx(run_record["other_seconds"])
    assert split["startup"] > 0 and split["mlflow"] > 0 and split["preflight"] > 0 and split["pipeline"] > 0
    assert split["stage_processes"] == len(run_record["stages"])
    assert set(quality["sanity"]["by_k"]) and results["speed"]["relevance"]["ratio"] > 0
    assert results["speed"]["cache_sizes"]["selected_over_full"] < 1
    for row in ("Relevance scoring vs.", "Distill step time", "Flex-KD term's own", "Teacher cache of the training split",
                "Mean overhead", "Where the other seconds go", "Peak resident memory", "flexkd − projector", "Relevance sanity check"):
        assert row in report, row

    # a second call reuses the finished workspace instead of rerunning the pipeline; a record written before the
    # overhead split existed gets it from the workspace's MLflow runs
    record_path = work / "tiny-seed7" / "benchmark_run.json"
    old = json.loads(record_path.read_text())
    old.pop("pipeline")
    record_path.write_text(json.dumps(old))
    completed = run(command, REPO, env=env_for(REPO))
    assert "finished before with the same params; reused" in completed.stdout + completed.stderr
    again = json.loads((out / "benchmarks" / "results.json").read_text())["quality"]["tiny"]["runs"][0]
    assert again["split"] == pytest.approx(split) and again["wall_seconds"] == run_record["wall_seconds"]

    # --start-from: a profile that changes only the students starts from the finished workspace of the same seed;
    # dvc repro there reruns the student stages and not the teacher (same teacher params, data and code)
    more = {**params, "distill": {**params["distill"], "methods": ["ft", "kd"]}}
    (tmp_path / "tiny-more.yaml").write_text(yaml.safe_dump(more, sort_keys=False))
    started = [sys.executable, "-m", "benchmarks.run", "--profiles", str(tmp_path / "tiny-more.yaml"), "--seeds", "7",
               "--work-dir", str(work), "--speed-from", str(out / "benchmarks" / "results.json"), "--output", str(out),
               "--start-from", "tiny"]
    completed = run(started, REPO, env=env_for(REPO))
    assert "tiny-more-seed7: started from a copy of tiny-seed7" in completed.stdout + completed.stderr
    block = json.loads((out / "benchmarks" / "results.json").read_text())["quality"]["tiny-more"]
    assert set(block["quality"]["scores"]) == {"teacher", "random/ft", "random/kd"}
    assert block["runs"][0]["started_from"] == "tiny-seed7"
    assert "finetune_teacher" not in block["runs"][0]["stages"] and "distill-random-kd" in " ".join(block["runs"][0]["stages"])
    teacher = block["records"][0]["evaluation"]["teacher"]
    assert teacher == quality["records"][0]["evaluation"]["teacher"]  # the same teacher, scored the same
    assert (work / "tiny-seed7" / "benchmark_run.json").exists()  # the source is left as it was
    report = (out / "BENCHMARKS.md").read_text()
    assert "| tiny-more seed 7 (from tiny-seed7) |" in report and "seed 7 from tiny-seed7" in report

    # a source that has not finished is refused before any run, naming it
    refused = run([*started[:-1], "missing"], REPO, env=env_for(REPO), check=False)
    assert refused.returncode == 1 and "--start-from missing" in refused.stderr and "missing-seed7" in refused.stderr
