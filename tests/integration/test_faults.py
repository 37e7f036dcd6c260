"""Faults on a real project: kill -9 in the middle of a distill run, an MLflow server that does not answer, and
one that goes away after training.

One tiny project is built once, in one process: prepare, finetune_teacher, relevance and teacher_cache on a tiny
random BERT and 240 real SST-2 rows (one student set-up, methods ft and flexkd, a checkpoint after every step),
then distill ft, then distill flexkd with the MLflow server "going away" after training (the call that logs the
model raises a connection error). That flexkd run trained to the end without interruption: its student, left on
disk, is the reference weights. Each test works on a copy of the project. The stage commands run as real
processes (``python -m flows.<stage>``) against one shared Prefect API, so that each does not start a server of
its own (and a killed process leaves none behind).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.project import env_for, make_project, run, save_tiny_bert, tiny_params

pytestmark = pytest.mark.slow

STEPS = 30  # 240 training rows, batch 16, 2 epochs
KILL_SEED = int(os.environ.get("FLEXKD_KILL_SEED", "20251129"))  # the step to kill at is drawn from this seed
STUDENT = "runs/students/sst2/random/flexkd"

BUILD = r"""
import json
from mlflow.exceptions import MlflowException
from flexkd import tracking
from flexkd.errors import FlexKDError
from flows.validate import validate_flow
from flows.prepare import prepare_flow
from flows.finetune_teacher import finetune_teacher_flow
from flows.relevance import relevance_flow
from flows.teacher_cache import teacher_cache_flow
from flows.distill import distill_flow

validate_flow.fn(); prepare_flow.fn(); finetune_teacher_flow.fn(); relevance_flow.fn(); teacher_cache_flow.fn()
distill_flow.fn(student="random", method="ft")

def server_gone(*args, **kwargs):  # the tracking server went away after training, before the model was logged
    raise MlflowException("API request to http://mlflow.internal:5000/api/2.0/mlflow/logged-models failed with "
                          "exception ConnectionError: [Errno 111] Connection refused")

tracking.log_classifier_model = server_gone
try:
    distill_flow.fn(student="random", method="flexkd")
except FlexKDError as err:
    print("DISTILL FAILED " + json.dumps(str(err)))
"""


@pytest.fixture(scope="module")
def prefect_api():
    """One Prefect API for every stage process of this module (as the pipeline flow gives its stages)."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    started = not server.running
    server.start()
    yield server.api_url
    if started:
        server.stop()


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_dir):
    """The built project and what the flexkd run that lost MLflow after training said."""
    root = tmp_path_factory.mktemp("faults")
    teacher = save_tiny_bert(root / "teacher", hidden=32, layers=2)
    params = tiny_params(data_dir, teacher)
    params["teacher"]["finetune"].update(eval_every=15, checkpoint_every=15)
    params["distill"].update(students=["random"], methods=["ft", "flexkd"])
    params["distill"]["train"].update(epochs=2, checkpoint_every=1, eval_every=10, log_every=5)
    project = make_project(root / "base", params)
    built = run([sys.executable, "-c", BUILD], project, env=env_for(project, OMP_NUM_THREADS="1"))
    failure = next((line for line in built.stdout.splitlines() if line.startswith("DISTILL FAILED ")), None)
    assert failure, "the flexkd run did not fail when MLflow went away:\n" + built.stdout[-3000:] + built.stderr[-3000:]
    return project, json.loads(failure.split(" ", 2)[2])


def _copy(base_project: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base_project, tmp_path / "project", symlinks=True))


def _env(root: Path, prefect_api: str, **extra) -> dict:
    return env_for(root, OMP_NUM_THREADS="1", PREFECT_API_URL=prefect_api, **extra)


def _checkpoint_step(root: Path) -> int | None:
    for state in (root / ".flexkd/work").glob("distill-random-flexkd-*/checkpoint/state.json"):
        try:
            return json.loads(state.read_text())["step"]
        except (OSError, ValueError):  # being swapped in right now
            return None
    return None


def test_kill_9_mid_distill_then_rerun_resumes_to_the_same_weights(base, prefect_api, tmp_path):
    base_project, _ = base
    reference = json.loads((base_project / STUDENT / "flexkd_student.json").read_text())
    assert reference["resumed_from"] is None and reference["steps"] == STEPS  # trained in one go
    root = _copy(base_project, tmp_path)
    shutil.rmtree(root / STUDENT)  # start the flexkd run afresh: no student, no scratch checkpoints
    (root / "metrics/distill/random/flexkd.json").unlink()
    for scratch in (root / ".flexkd/work").glob("distill-random-flexkd-*"):
        shutil.rmtree(scratch)

    target = random.Random(KILL_SEED).randint(3, STEPS - 6)
    command = [sys.executable, "-m", "flows.distill", "--student", "random", "--method", "flexkd"]
    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen(command, cwd=root, env=_env(root, prefect_api), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    killed_after = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            step = _checkpoint_step(root)
            if step is not None and step >= target:
                os.killpg(process.pid, signal.SIGKILL)  # the process group this test started: the run, nothing else
                killed_after = step
                break
            time.sleep(0.005)
    finally:
        if process.poll() is None and killed_after is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
    log_tail = (tmp_path / "killed.log").read_text()[-3000:]
    assert killed_after is not None, f"the run ended before step {target}:\n{log_tail}"
    assert process.returncode == -signal.SIGKILL
    resumable = _checkpoint_step(root)  # the last checkpoint that was complete when the process died
    assert resumable is not None and target <= resumable < STEPS, (target, killed_after, resumable)
    assert not (root / STUDENT).exists()  # it never finished

    # whatever the kill left half-written is never read; plant one more that claims to be further along
    scratch = next((root / ".flexkd/work").glob("distill-random-flexkd-*"))
    left_over = sorted(p.name for p in scratch.glob(".checkpoint.tmp-*"))
    planted = scratch / ".checkpoint.tmp-deadbeef"
    (planted / "model").mkdir(parents=True)
    (planted / "state.json").write_text(json.dumps({"step": STEPS - 1}))
    (planted / "model" / "model.safetensors").write_bytes(b"\0" * 64)

    completed = run(command, root, env=_env(root, prefect_api))
    info = json.loads((root / STUDENT / "flexkd_student.json").read_text())
    assert info["resumed_from"] == resumable > 0, (info["resumed_from"], resumable, left_over)
    assert info["steps"] == STEPS and info["model_uri"]
    assert info["weights_hash"] == reference["weights_hash"], "the resumed run ended with other weights"
    reference_bytes = (base_project / STUDENT / "model.safetensors").read_bytes()
    assert (root / STUDENT / "model.safetensors").read_bytes() == reference_bytes
    assert "validation accuracy" in completed.stdout + completed.stderr


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_unreachable_mlflow_fails_fast_before_any_stage(base, prefect_api, tmp_path, monkeypatch):
    import flexkd.launch
    from flexkd.errors import FlexKDError
    from flows.distill import distill_flow

    base_project, _ = base
    root = _copy(base_project, tmp_path)
    uri = f"http://127.0.0.1:{_closed_port()}"
    before = _snapshot(root)
    began = time.monotonic()
    completed = run([sys.executable, "-m", "flows.pipeline"], root,
                    env=_env(root, prefect_api, MLFLOW_TRACKING_URI=uri), check=False, timeout=120)
    seconds = time.monotonic() - began
    assert completed.returncode == 1, completed.stdout[-3000:] + completed.stderr[-3000:]
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"flexkd: pipeline failed: MLflow tracking server at {uri} is unreachable"), last
    assert seconds < 30, f"the pipeline took {seconds:.0f}s to fail"

    # a stage on its own (python -m flows.distill, a deployment) fails the same way, before loading anything
    monkeypatch.setenv("FLEXKD_PROJECT_ROOT", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(flexkd.launch, "run_training", lambda *a, **k: pytest.fail("training started"))
    began = time.monotonic()
    with pytest.raises(FlexKDError, match=f"MLflow tracking server at {uri} is unreachable"):
        distill_flow.fn(student="random", method="flexkd")
    assert time.monotonic() - began < 30
    # nothing ran: no dvc repro (no dvc.lock, no stage output), no scratch checkpoint, no student, params as they were
    assert _snapshot(root) == before


def test_a_finished_student_outlives_mlflow_and_publish_registers_it(base, prefect_api, tmp_path):
    import mlflow

    from flexkd.provenance import weights_hash

    base_project, failure = base
    root = _copy(base_project, tmp_path)
    assert f"the trained student is saved in {base_project / STUDENT}" in failure and "flows.publish" in failure
    student = root / STUDENT
    info = json.loads((student / "flexkd_student.json").read_text())
    assert info["model_uri"] is None and info["weights_hash"] == weights_hash(student) and info["steps"] == STEPS
    assert (student / "tokenizer.json").exists() and (root / "metrics/distill/random/flexkd.json").exists()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    assert client.get_run(info["run_id"]).info.status == "FAILED"

    published = run([sys.executable, "-m", "flows.publish"], root, env=_env(root, prefect_api))
    assert "published random/flexkd" in published.stdout + published.stderr
    after = json.loads((student / "flexkd_student.json").read_text())
    assert after["model_uri"].startswith("models:/") and after["run_id"] == info["run_id"]  # into its own run
    run_info = client.get_run(info["run_id"])
    assert run_info.data.tags["flexkd.published_later"] == "true"
    assert "best_validation/accuracy" in run_info.data.metrics
    registry = json.loads((root / "reports/registry.json").read_text())
    assert registry["alias"] == "champion" and registry["best"] in ("random/ft", "random/flexkd")
    version = client.get_model_version_by_alias("flexkd-sst2", "champion")
    assert str(version.version) == str(registry["version"])
    evaluation = json.loads((root / "metrics/evaluation.json").read_text())
    assert evaluation["students"]["random/flexkd"]["model_uri"] == after["model_uri"]
