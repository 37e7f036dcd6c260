"""The device check (benchmarks/device_check.py) on the CPU with tiny models, as a bare GPU image would run it:
MLflow, Prefect, DVC, Great Expectations, datasets and rouge-score cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.device_check import NOT_NEEDED, falls

REPO = Path(__file__).resolve().parents[2]
BLOCKED = (*NOT_NEEDED, "datasets", "rouge_score")

# sys.modules[name] = None makes `import name` fail and importlib.util.find_spec(name) answer None, as for a
# package that is not installed
SITECUSTOMIZE = f"import sys\nfor _name in {BLOCKED!r}:\n    sys.modules[_name] = None\n"


def test_device_check_runs_the_real_path_on_the_cpu_without_the_orchestration_packages(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{REPO}", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "device_check.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.device_check", "--device", "cpu", "--tiny",
                           "--output", str(out), "--work-dir", str(tmp_path / "work")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "ROUGE-L without Porter stemming" in done.stderr  # rouge-score really was out of reach
    result = json.loads(out.read_text())
    assert result["passed"] and result["imported_but_not_needed"] == []
    path = result["path"]
    assert all(path["checks"].values()), path["checks"]
    assert path["watch"]["modules_on_device"] > 1000 and path["watch"]["modules_off_device"] == 0
    assert set(path["students"]) == {"kd", "projector", "flexkd"}
    assert set(path["losses"]) == {"teacher", "pruned/kd", "pruned/projector", "pruned/flexkd"}
    for block in [path["teacher"], *path["students"].values()]:
        assert 0.0 <= block["test"]["rougeL"] <= 100.0
    speed = result["throughput"]
    for name in ("teacher/library", "teacher/bare", "student/library", "student/bare"):
        assert speed[name]["tokens_per_second"] > 0 and speed[name]["mfu"] is None  # no known peak for a CPU
    assert speed["teacher_library_over_bare"] > 0 and speed["student_library_over_bare"] > 0
    assert "| teacher/library |" in done.stdout and "device check passed" in done.stdout


def test_device_check_refuses_a_device_the_machine_lacks(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.device_check", "--device", "cuda:7", "--tiny",
                           "--output", str(tmp_path / "x.json")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "runtime.device: 'cuda:7' is not on this machine" in done.stderr


def test_a_loss_curve_falls_when_its_last_third_is_below_its_first():
    assert falls([3.0, 2.9, 2.5, 2.4, 2.0, 1.9])
    assert not falls([2.0, 2.1, 2.0, 2.2, 2.3, 2.4])
    assert not falls([1.0])
