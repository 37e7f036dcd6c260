"""Two workers that share only the DVC remote run two stages of one pipeline, as the docker and kubernetes stage
deployments do (``sync: true``): the second worker gets the first one's outputs from the remote, never recomputes
them, and its stage gives what one working copy gives. A worker that cannot reach the remote stops before compute."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from tests.integration.project import make_project, run, save_tiny_bert, tiny_params

pytestmark = pytest.mark.slow


def _lock_outs(root, stage: str) -> dict:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for out in lock["stages"][stage]["outs"]}


def test_two_workers_sharing_only_the_remote_run_two_stages_of_one_pipeline(tmp_path, data_dir):
    from flexkd.provenance import weights_hash

    teacher = save_tiny_bert(tmp_path / "teacher", hidden=32, layers=2)
    first = make_project(tmp_path / "worker-a", tiny_params(data_dir, teacher))
    second = tmp_path / "worker-b"
    run(["git", "clone", "-q", str(first), str(second)], tmp_path)  # the code, nothing else
    dvc = [sys.executable, "-m", "dvc"]

    # a worker whose remote cannot be reached fails before any compute, naming the remote
    (tmp_path / "a-file").write_text("not a directory")
    run([*dvc, "remote", "add", "-d", "shared", str(tmp_path / "a-file" / "remote")], second)
    stopped = run([sys.executable, "-m", "flows.prepare", "--sync"], second, check=False, timeout=600)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert "DVC remote 'shared'" in stopped.stderr and "cannot be reached" in stopped.stderr
    assert "Running stage" not in stopped.stdout + stopped.stderr and not (second / "data").exists()

    remote = tmp_path / "storage"
    for worker in (first, second):
        run([*dvc, "remote", "add", "-d", "-f", "shared", str(remote)], worker)

    # worker A: the prepare stage (and validate before it, nobody pushed it yet); outputs and run cache pushed
    a = run([sys.executable, "-m", "flows.prepare", "--sync"], first, timeout=900)
    a_text = a.stdout + a.stderr
    assert "Running stage 'validate'" in a_text and "Running stage 'prepare'" in a_text
    assert (remote / "runs").is_dir()  # the run cache travels with the outputs

    # worker B: the teacher stage; validate and prepare come from the remote, only the teacher trains here
    b = run([sys.executable, "-m", "flows.finetune_teacher", "--sync"], second, timeout=900)
    b_text = b.stdout + b.stderr
    for stage in ("validate", "prepare"):
        assert f"Stage '{stage}' is cached - skipping run" in b_text, b_text[-3000:]
        assert f"Running stage '{stage}'" not in b_text
    assert "Running stage 'finetune_teacher'" in b_text
    for stage in ("validate", "prepare"):
        assert _lock_outs(second, stage) == _lock_outs(first, stage)
    snapshot = json.loads((second / "data/validated/sst2/sources.json").read_text())["snapshot"]
    assert snapshot["train"]["rows"] > 0 and (second / "data/validated/sst2/raw/train.jsonl").is_file()

    # one working copy: A trains the teacher itself (no run cache): the same teacher as B's
    run([*dvc, "repro", "--no-run-cache", "finetune_teacher"], first, timeout=900)
    assert weights_hash(first / "runs/teacher/sst2") == weights_hash(second / "runs/teacher/sst2")
    metrics = [json.loads((w / "metrics/teacher.json").read_text()) for w in (first, second)]
    assert metrics[0]["validation"] == metrics[1]["validation"] and metrics[0]["parameters"] == metrics[1]["parameters"]

    # and B's teacher is on the remote: a third clone gets it without training
    third = tmp_path / "worker-c"
    run(["git", "clone", "-q", str(first), str(third)], tmp_path)
    run([*dvc, "remote", "add", "-d", "shared", str(remote)], third)
    c = run([*dvc, "repro", "--pull", "finetune_teacher"], third, timeout=600)
    assert "Running stage" not in c.stdout + c.stderr
    assert weights_hash(third / "runs/teacher/sst2") == weights_hash(second / "runs/teacher/sst2")
