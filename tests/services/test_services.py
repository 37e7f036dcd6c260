"""The production set-up, end to end: the README's deploy walkthrough on a tiny project, then the servers' view.

Runs README.md's ``deploy-walkthrough`` block (see tests/services/walkthrough.py) in a throwaway project made with
tests/integration/project.py (tiny random models, a few hundred real SST-2 rows): a Prefect server and an MLflow
tracking server (SQLite backend, artifact store) on loopback ports, a process work pool, the ``process``
deployments of the real prefect.yaml, a worker, and a run of ``flexkd-pipeline/process`` with a profile and
overrides. Then checks the flow runs on the Prefect server, the runs, artifacts and registered model on the MLflow
server, and opens the MLflow UI in headless Chromium (Debian's ``chromium``, driven by Playwright) to see the
student, its alias and its metrics, saving screenshots in $FLEXKD_CI_ARTIFACTS (default tests/services/artifacts).

Every process started here is stopped by PID at the end, whatever happens. Takes 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.project import env_for, git_commit, make_project, save_tiny_bert, tiny_params
from tests.services.walkthrough import Runner, extract

pytestmark = [pytest.mark.services, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("FLEXKD_CHROMIUM", "/usr/bin/chromium"))
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
TIME_BUDGET_S = float(os.environ.get("FLEXKD_SERVICES_TIMEOUT", "420"))
PROFILE = "tiny"
OVERRIDES = {"distill.students": ["pruned"], "distill.methods": ["ft", "flexkd"]}
EXPERIMENT = "flexkd-test"
MODEL = "flexkd-sst2"


def artifacts_dir() -> Path:
    path = Path(os.environ.get("FLEXKD_CI_ARTIFACTS") or REPO / "tests" / "services" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(method: str, url: str, payload: dict | None = None):
    import urllib.request

    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, data_dir):
    """The walkthrough, run to its end on a tiny project; yields what the checks need; stops every process."""
    base = tmp_path_factory.mktemp("services")
    project = base / "project"
    teacher = save_tiny_bert(base / "teacher", hidden=32, layers=2)
    params = tiny_params(data_dir, teacher)
    make_project(project, params)
    shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")  # the real deployments
    (project / "profiles").mkdir()
    (project / "profiles" / f"{PROFILE}.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit(project, "deployments and a tiny profile")

    logs = artifacts_dir() / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    env = env_for(project)
    env.update(
        PREFECT_HOME=str(base / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_PORT=str(free_port()),
        MLFLOW_PORT=str(free_port()),
        FLEXKD_SERVER_DIR=str(base / "servers"),
        FLEXKD_PROJECT_ROOT=str(project),
        FLEXKD_PROFILE=PROFILE,
        FLEXKD_OVERRIDES=json.dumps(OVERRIDES),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    runner = Runner(cwd=project, env=env, logs=logs, deadline=time.monotonic() + TIME_BUDGET_S)
    steps = extract((REPO / "README.md").read_text(encoding="utf-8"))
    began = time.monotonic()
    try:
        for step in steps:
            runner.run(step)
            dead = runner.dead_services()
            if dead:
                raise AssertionError(runner.report(step, f"a service exited: {dead[0].step.command}", "", ""))
        walkthrough_s = time.monotonic() - began
        (artifacts_dir() / "walkthrough-timings.json").write_text(json.dumps(
            {"total_s": round(walkthrough_s, 1), "steps": [[c, round(s, 1)] for c, s in runner.timings]}, indent=2))
        yield {"project": project, "env": runner.env, "servers": base / "servers", "runner": runner}
    finally:
        runner.stop_all()


def test_walkthrough_pipeline_run_completed_on_the_prefect_server(deployed):
    api = deployed["env"]["PREFECT_API_URL"]
    deployments = http_json("POST", f"{api}/deployments/filter", {})
    names = {(d["name"], d["work_pool_name"]) for d in deployments}
    assert ("process", "flexkd-process") in names
    flows = {f["id"]: f["name"] for f in http_json("POST", f"{api}/flows/filter", {})}
    deployed_flows = {flows[d["flow_id"]] for d in deployments}
    assert {"flexkd-pipeline", "flexkd-validate", "flexkd-distill", "flexkd-register"} <= deployed_flows

    runs = http_json("POST", f"{api}/flow_runs/filter", {})
    by_flow: dict[str, list[dict]] = {}
    for run in runs:
        by_flow.setdefault(flows.get(run["flow_id"], "?"), []).append(run)
    pipeline = by_flow["flexkd-pipeline"]
    assert len(pipeline) == 1 and pipeline[0]["state_type"] == "COMPLETED", pipeline
    assert pipeline[0]["parameters"] == {"profile": PROFILE, "overrides": OVERRIDES}
    # dvc repro ran each stage's flow, reporting to the same server
    for stage in ("flexkd-validate", "flexkd-prepare", "flexkd-finetune-teacher", "flexkd-relevance",
                  "flexkd-evaluate", "flexkd-register"):
        assert [r["state_type"] for r in by_flow.get(stage, [])] == ["COMPLETED"], stage
    assert sorted(r["state_type"] for r in by_flow["flexkd-distill"]) == ["COMPLETED", "COMPLETED"]


def test_profile_and_overrides_were_applied_to_params(deployed):
    params = yaml.safe_load((deployed["project"] / "params.yaml").read_text())
    assert params["distill"]["students"] == ["pruned"] and params["distill"]["methods"] == ["ft", "flexkd"]
    assert not (deployed["project"] / "mlflow.db").exists(), "tracking went to the project's SQLite, not the server"


def test_mlflow_server_holds_the_runs_artifacts_and_the_registered_model(deployed):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=deployed["env"]["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None and experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    pipeline = [r for r in runs if r.data.tags.get("flexkd.kind") == "pipeline"]
    assert len(pipeline) == 1 and pipeline[0].info.status == "FINISHED"
    recorded = pipeline[0].data.params
    assert recorded["pipeline.profile"] == PROFILE
    assert json.loads(recorded["pipeline.overrides"]) == OVERRIDES
    assert json.loads(recorded["override.distill.methods"]) == ["ft", "flexkd"]
    stages = {r.data.tags.get("flexkd.stage") for r in runs if r.data.tags.get("mlflow.parentRunId") == pipeline[0].info.run_id}
    assert {"validate", "prepare", "finetune_teacher", "relevance", "evaluate", "register"} <= stages
    distill = {(r.data.tags.get("flexkd.student"), r.data.tags.get("flexkd.method")) for r in runs
               if (r.data.tags.get("flexkd.stage") or "").startswith("distill")}
    assert distill == {("pruned", "ft"), ("pruned", "flexkd")}

    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.tags["student"] == "pruned" and version.tags["method"] in ("ft", "flexkd")
    assert version.description.startswith("# ")
    # the artifacts went through the server into its artifact store
    relevance = next(r for r in runs if r.data.tags.get("flexkd.stage") == "relevance")
    assert {"relevance/index.json", "relevance/scores.png"} <= {
        a.path for a in client.list_artifacts(relevance.info.run_id, "relevance")}
    stored = list((deployed["servers"] / "mlartifacts").rglob("index.json"))
    assert stored, f"no artifact under {deployed['servers'] / 'mlartifacts'}"


def _browser(playwright):
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"],
    )


def _wait_for_text(page, needles: list[str], timeout_s: float = 60) -> str:
    end = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < end:
        text = page.inner_text("body")
        if all(needle in text for needle in needles):
            return text
        page.wait_for_timeout(500)
    missing = [n for n in needles if n not in text]
    raise AssertionError(f"{page.url}: {missing} not shown; the page reads:\n{text[:3000]}")


def _show(page, locator) -> None:
    """Scroll the first match into the middle of the view (MLflow's pages scroll inside a container)."""
    try:
        locator.first.scroll_into_view_if_needed(timeout=5000)
        locator.first.evaluate("e => e.scrollIntoView({block: 'center'})")
        page.wait_for_timeout(300)
    except Exception:  # noqa: BLE001 - a screenshot of the top of the page is still a screenshot
        pass


def _close_assistant(page) -> None:
    """Fold MLflow's assistant side panel, if shown, so that the page gets the width."""
    try:
        panel = page.get_by_text("MLflow Assistant", exact=False)
        if panel.count():
            page.locator("button[aria-label*='lose']").last.click(timeout=2000)
            page.wait_for_timeout(300)
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def test_mlflow_ui_shows_the_registered_student_alias_and_metrics(deployed):
    if not CHROMIUM.exists():
        message = f"headless Chromium not found at {CHROMIUM} (Debian package `chromium`; .ci/run installs it)"
        if IN_CI:
            pytest.fail(message + " - CI must have it")
        pytest.skip(message)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        message = "the Python package playwright is not installed (requirements.txt pins it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    import mlflow

    from flexkd import tracking

    ui = deployed["env"]["MLFLOW_TRACKING_URI"].rstrip("/")
    client = mlflow.MlflowClient(tracking_uri=ui)
    version = client.get_model_version_by_alias(MODEL, "champion")
    run = client.get_run(version.tags["run_id"])
    method = version.tags["method"]
    accuracy = run.data.metrics["test/accuracy"]
    out = artifacts_dir()
    shots = ["mlflow-model-version.png", "mlflow-model-version-metrics.png", "mlflow-student-run.png",
             "mlflow-experiment.png"]
    for name in shots:
        (out / name).unlink(missing_ok=True)
    with sync_playwright() as playwright:
        browser = _browser(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            # the model version: its alias, the student (tags, model card) and the card's metrics table
            page.goto(f"{ui}/#/models/{MODEL}/versions/{version.version}", wait_until="domcontentloaded")
            text = _wait_for_text(page, [MODEL, f"Version {version.version}", "champion", "Student", "pruned",
                                         "Metrics", "accuracy"])
            assert f"`{method}` method" in text or f"{method} method" in text, text[:2000]
            # the card's metrics render as lines that name their split (a Markdown table was flattened here)
            assert "validation split: accuracy" in text and "test split: accuracy" in text, text[:3000]
            _close_assistant(page)
            page.screenshot(path=str(out / shots[0]))
            _show(page, page.get_by_role("heading", name="Metrics"))
            page.screenshot(path=str(out / shots[1]))
            # the student's run: its test metrics, to the last digit
            page.goto(f"{ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}", wait_until="domcontentloaded")
            _wait_for_text(page, ["test/accuracy", repr(accuracy), "flexkd.student", "pruned", f"{MODEL}"])
            _close_assistant(page)
            _show(page, page.get_by_text("test/accuracy", exact=True))
            page.screenshot(path=str(out / shots[2]))
            # the experiment opens in the model-training view (runs and their metrics), not MLflow's GenAI view
            # the link the pipeline prints (MLflow 3.17 opens an experiment in its GenAI view unless asked otherwise)
            page.goto(tracking.experiment_url(run.info.experiment_id, ui), wait_until="domcontentloaded")
            text = _wait_for_text(page, ["pipeline-", "Run Name", "matching runs"])
            assert "Evaluation runs" not in text, text[:2000]
            _close_assistant(page)
            # the stage runs nest under the pipeline run: unfold it (the + before its name) to see them
            page.locator("button[data-component-id*='runnamecellrenderer']").first.click(timeout=10_000)
            _wait_for_text(page, ["distill-pruned-flexkd", "distill-pruned-ft", "finetune_teacher"])
            page.screenshot(path=str(out / shots[3]))
        finally:
            browser.close()
    for name in shots:
        assert (out / name).stat().st_size > 10_000, name
    print(f"screenshots: {out}", file=sys.stderr)
