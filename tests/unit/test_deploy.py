"""The deployment set-up without servers: prefect.yaml, the work-pool templates, the compose file, the README
walkthrough and the pipeline flow's profile / overrides parameters."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from flexkd.errors import ConfigError
from flexkd.overrides import apply_profile_and_overrides, available_profiles
from tests.services.walkthrough import extract

REPO = Path(__file__).resolve().parents[2]
POOLS = {"process": ("flexkd-process", "process"), "docker": ("flexkd-docker", "docker"),
         "kubernetes": ("flexkd-kubernetes", "kubernetes")}


def prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def compose() -> dict:
    return yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())


def flow_modules() -> dict[str, str]:
    """flows/<module>.py -> the name of the function decorated with @flow in it."""
    found = {}
    for path in sorted((REPO / "flows").glob("*.py")):
        match = re.search(r"@flow\([^)]*\)\s*\ndef (\w+)\(", path.read_text())
        if match:
            found[f"flows/{path.name}"] = match.group(1)
    return found


# ------------------------------------------------------------------------------------------- prefect.yaml
def test_every_flow_has_a_deployment_on_each_pool():
    deployments = prefect_yaml()["deployments"]
    by_entrypoint: dict[str, dict[str, dict]] = {}
    for deployment in deployments:
        by_entrypoint.setdefault(deployment["entrypoint"], {})[deployment["name"]] = deployment
    expected = {f"{path}:{fn}" for path, fn in flow_modules().items()}
    assert "flows/pipeline.py:pipeline_flow" in expected and "flows/distill.py:distill_flow" in expected
    assert set(by_entrypoint) == expected
    for entrypoint, named in by_entrypoint.items():
        assert set(named) == set(POOLS), entrypoint
        for name, deployment in named.items():
            assert deployment["work_pool"]["name"] == POOLS[name][0], (entrypoint, name)
    assert len(deployments) == 3 * len(expected)


def test_deployment_parameters_are_the_flows_parameters():
    from prefect.flows import load_flow_from_entrypoint

    flows = {}
    for deployment in prefect_yaml()["deployments"]:
        entrypoint = deployment["entrypoint"]
        if entrypoint not in flows:
            flows[entrypoint] = load_flow_from_entrypoint(str(REPO / entrypoint))
        accepted = set(flows[entrypoint].parameters.properties)
        assert set(deployment.get("parameters") or {}) <= accepted, (entrypoint, deployment["name"])
    pipeline = flows["flows/pipeline.py:pipeline_flow"]
    assert {"profile", "overrides", "targets", "force"} <= set(pipeline.parameters.properties)
    assert pipeline.name == "flexkd-pipeline"


def test_pull_step_and_images_agree():
    config = prefect_yaml()
    assert config["pull"] == [{"prefect.deployments.steps.set_working_directory":
                               {"directory": "{{ $FLEXKD_PROJECT_ROOT }}"}}]
    cuda = (REPO / "docker" / "Dockerfile.cuda").read_text()
    assert "FLEXKD_PROJECT_ROOT=/app" in cuda and "WORKDIR /app" in cuda
    pools = config["definitions"]["work_pools"]
    assert pools["docker"]["job_variables"]["env"]["FLEXKD_PROJECT_ROOT"] == "/app"
    assert pools["kubernetes"]["job_variables"]["env"]["FLEXKD_PROJECT_ROOT"] == "/app"


def test_gpu_requests_of_the_docker_and_kubernetes_pools():
    pools = prefect_yaml()["definitions"]["work_pools"]
    docker_vars = pools["docker"]["job_variables"]
    requests = docker_vars["container_create_kwargs"]["device_requests"]
    assert requests == [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
    template = json.loads((REPO / "deploy" / "work-pools" / "docker.json").read_text())
    assert set(docker_vars) <= set(template["variables"]["properties"])  # nothing the worker would drop
    assert template["job_configuration"]["container_create_kwargs"] == "{{ container_create_kwargs }}"

    k8s_vars = pools["kubernetes"]["job_variables"]
    template = json.loads((REPO / "deploy" / "work-pools" / "kubernetes-gpu.json").read_text())
    assert set(k8s_vars) <= set(template["variables"]["properties"])
    assert k8s_vars["gpu_limit"] >= 1
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_limit }}"
    assert template["variables"]["properties"]["gpu_limit"]["type"] == "integer"
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == "{{ datasets_claim }}" and pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/data"


# ------------------------------------------------------------------------------------------- compose.yaml
def test_compose_services_links_ports_and_env_agree():
    spec = compose()
    services = spec["services"]
    assert {"postgres", "mlflow", "prefect-server", "worker", "deployments"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
        for network in service.get("networks", []):
            assert network in spec["networks"], (name, network)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(("/", ".")):
                assert source in spec["volumes"], (name, source)
            elif source.startswith("."):
                assert (REPO / "docker" / source).resolve().exists(), (name, source)

    postgres = services["postgres"]["environment"]
    user, password, default_db = postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"]
    assert "CREATE DATABASE prefect" in (REPO / "docker" / "postgres-init.sql").read_text()
    mlflow_args = dict(arg.split("=", 1) for arg in services["mlflow"]["command"] if arg.startswith("--"))
    backend = urlparse(mlflow_args["--backend-store-uri"])
    assert backend.scheme == "postgresql" and (backend.username, backend.password) == (user, password)
    assert (backend.hostname, backend.port, backend.path) == ("postgres", 5432, f"/{default_db}")
    artifacts_volume = next(v for v in services["mlflow"]["volumes"] if v.endswith(":/mlartifacts"))
    assert mlflow_args["--artifacts-destination"] == "/mlartifacts" and artifacts_volume
    mlflow_port = int(mlflow_args["--port"])
    assert f"{mlflow_port}:{mlflow_port}" in services["mlflow"]["ports"]
    assert f"mlflow:{mlflow_port}" in mlflow_args["--allowed-hosts"].split(",")

    prefect_env = services["prefect-server"]["environment"]
    database = urlparse(prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert database.scheme == "postgresql+asyncpg" and (database.username, database.password) == (user, password)
    assert (database.hostname, database.port, database.path) == ("postgres", 5432, "/prefect")
    command = services["prefect-server"]["command"]
    prefect_port = int(command[command.index("--port") + 1])
    assert f"{prefect_port}:{prefect_port}" in services["prefect-server"]["ports"]

    for name in ("worker", "deployments", "docker-worker"):
        env = services[name]["environment"]
        api, tracking = urlparse(env["PREFECT_API_URL"]), urlparse(env["MLFLOW_TRACKING_URI"])
        assert (api.hostname, api.port, api.path) == ("prefect-server", prefect_port, "/api"), name
        assert (tracking.hostname, tracking.port) == ("mlflow", mlflow_port), name
        assert services[name]["image"] == "flexkd:cuda"
        assert services[name]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.cuda"}
    assert (REPO / "docker" / "Dockerfile.cuda").exists()

    worker = services["worker"]
    assert worker["environment"]["FLEXKD_PROJECT_ROOT"] == "/app"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert worker["command"][-4:] == ["--pool", "flexkd-process", "--type", "process"]


def test_compose_matches_the_docker_deployments():
    spec = compose()
    docker = prefect_yaml()["definitions"]["work_pools"]["docker"]["job_variables"]
    assert docker["image"] == spec["services"]["worker"]["image"]
    for network in docker["networks"]:  # the containers the docker worker starts join compose's network by name
        assert any(n.get("name") == network for n in spec["networks"].values()), network
    for volume in docker["volumes"]:
        name = volume.split(":")[0]
        assert spec["volumes"][name]["name"] == name, name
    assert urlparse(docker["env"]["MLFLOW_TRACKING_URI"]).hostname == "mlflow"
    command = " ".join(spec["services"]["docker-worker"]["command"])
    assert "--base-job-template deploy/work-pools/docker.json" in command and "--name docker" in command


def test_compose_file_follows_the_compose_specification():
    """Schema check everywhere (the compose_spec parser, spec-compliant; YAML merge keys resolved first), so a
    misspelt or misplaced key fails here even where no Docker client with the compose plugin exists."""
    import json

    from compose_spec import PyCompose

    parsed = PyCompose.from_json(json.dumps(compose()))
    assert set(compose()["services"]) <= {name for name in compose()["services"] if name in parsed}
    broken = compose()
    broken["services"]["mlflow"]["portz"] = ["5000:5000"]
    with pytest.raises(ValueError, match="portz"):
        PyCompose.from_json(json.dumps(broken))


def _docker_compose_available() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client on this machine"
    try:
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`docker compose version` did not run: {err}"
    if probe.returncode != 0:
        return f"the docker client has no compose plugin (`docker compose version`: {(probe.stderr.strip().splitlines() or [''])[0][:160]})"
    return None


def test_docker_compose_config_validates():
    reason = _docker_compose_available()
    if reason:
        pytest.skip(reason)
    completed = subprocess.run(
        ["docker", "compose", "-f", str(REPO / "docker" / "compose.yaml"), "config", "--quiet"],
        capture_output=True, text=True, timeout=60, env={"FLEXKD_DATASETS_DIR": "/srv/flexkd/datasets",
                                                          "PATH": "/usr/local/bin:/usr/bin:/bin"},
    )
    assert completed.returncode == 0, completed.stderr


# -------------------------------------------------------------------------------- README walkthrough, Makefile
def test_readme_walkthrough_uses_the_pools_and_deployments_of_prefect_yaml():
    steps = extract((REPO / "README.md").read_text())
    services = [s.command for s in steps if s.background]
    assert any(c.startswith("prefect server start") for c in services)
    assert any(" mlflow server " in f" {c} " and "--backend-store-uri" in c and "--artifacts-destination" in c
               for c in services)
    assert any(c.startswith("prefect worker start --pool flexkd-process") for c in services)
    commands = "\n".join(s.command for s in steps)
    assert "prefect work-pool create flexkd-process --type process" in commands
    assert "prefect --no-prompt deploy --name process" in commands
    run = next(s.command for s in steps if s.command.startswith("prefect deployment run"))
    flow, name = run.split()[3].split("/")
    assert flow == "flexkd-pipeline" and name == "process" and "--watch" in run
    assert "profile=" in run and "overrides=" in run
    for variable in ("PREFECT_PORT", "MLFLOW_PORT", "FLEXKD_SERVER_DIR", "FLEXKD_PROJECT_ROOT", "FLEXKD_PROFILE",
                     "FLEXKD_OVERRIDES"):  # the test substitutes these: each must default, not be fixed
        assert f"{variable}=${{{variable}:-" in commands, variable


def test_walkthrough_extraction_rules():
    readme = ("intro\n<!-- deploy-walkthrough:start -->\n```bash\n# a comment\nexport A=${A:-1}\n\n"
              "server --x \\\n  --y &\nrun it\n```\n<!-- deploy-walkthrough:end -->\n")
    steps = extract(readme)
    assert [(s.command, s.background, s.line) for s in steps] == [
        ("export A=${A:-1}", False, 5), ("server --x --y", True, 7), ("run it", False, 9)]
    with pytest.raises(ValueError, match="exactly one"):
        extract("no markers")


def test_makefile_targets_run_the_walkthrough_commands():
    completed = subprocess.run(["make", "-n", "worker", "deployment-run", "mlflow-server", "PROFILE=sst2"],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    for command in ("prefect work-pool create flexkd-process --type process --overwrite",
                    "prefect --no-prompt deploy --name process", "prefect worker start --pool flexkd-process",
                    "prefect deployment run flexkd-pipeline/process --param profile=sst2",
                    "--backend-store-uri sqlite:///", "--artifacts-destination"):
        assert command in out, command
    assert "FLEXKD_PROJECT_ROOT=" in out and "MLFLOW_TRACKING_URI=http://127.0.0.1:" in out


# ----------------------------------------------------------------------------- profile and overrides (pipeline)
@pytest.fixture()
def project(tmp_path):
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_profile_is_copied_over_params(project):
    assert "sst2" in available_profiles(project) and "alpaca" in available_profiles(project)
    assert apply_profile_and_overrides(project, "alpaca") is True
    assert (project / "params.yaml").read_text() == (REPO / "profiles" / "alpaca.yaml").read_text()
    assert apply_profile_and_overrides(project, "alpaca") is False  # already so: not rewritten


def test_unknown_profile_is_refused_with_the_list(project):
    before = (project / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=r"unknown profile 'nope'.*alpaca.*sst2"):
        apply_profile_and_overrides(project, "nope")
    with pytest.raises(ConfigError, match="unknown profile"):
        apply_profile_and_overrides(project, "../params")
    assert (project / "params.yaml").read_text() == before


def test_overrides_are_set_validated_and_keep_comments(project):
    original = (project / "params.yaml").read_text()
    changed = apply_profile_and_overrides(project, None, {"distill.methods": ["ft", "flexkd"], "data.max_test": None})
    assert changed is True
    text = (project / "params.yaml").read_text()
    params = yaml.safe_load(text)
    assert params["distill"]["methods"] == ["ft", "flexkd"] and params["data"]["max_test"] is None
    assert "methods: [ft, flexkd]" in text
    kept = [line for line in original.splitlines() if line.lstrip().startswith("#")]
    assert kept and all(line in text.splitlines() for line in kept)  # every comment line is still there
    from flexkd.config import load_config

    load_config(project / "params.yaml")


@pytest.mark.parametrize(("overrides", "named"), [
    ({"distill.trian.epochs": 1}, "distill.trian"),
    ({"distill.train.epochs": "many"}, "distill.train.epochs"),
    ({"distill.alpha.x": 1}, "distill.alpha"),
    ({"nosuchgroup.key": 1}, "nosuchgroup"),
    ({"a..b": 1}, "a..b"),
])
def test_bad_overrides_fail_naming_the_key_and_leave_params(project, overrides, named):
    before = (project / "params.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        apply_profile_and_overrides(project, "sst2", overrides)
    assert named in str(err.value)
    assert (project / "params.yaml").read_text() == before


def test_pipeline_flow_stops_on_bad_overrides_before_anything_runs(project, monkeypatch):
    from flows.pipeline import pipeline_flow

    monkeypatch.setenv("FLEXKD_PROJECT_ROOT", str(project))
    before = (project / "params.yaml").read_text()
    with pytest.raises(ConfigError, match="distill.trian"):
        pipeline_flow.fn(overrides={"distill.trian.epochs": 1})
    assert (project / "params.yaml").read_text() == before
    assert not (project / "mlflow.db").exists() and not (project / ".flexkd").exists()


def test_stage_deployments_without_a_shared_disk_sync_through_the_dvc_remote():
    """docker and kubernetes run each flow in its own container or pod: their stage deployments pull inputs from
    and push outputs to the DVC remote; the process pool shares the checkout and runs the stage in place."""
    stages = [d for d in prefect_yaml()["deployments"]
              if not d["entrypoint"].startswith(("flows/pipeline.py", "flows/publish.py"))]
    from flows.storage import STAGES

    assert len(stages) == 3 * len(STAGES) == 3 * 9  # every stage flow, augment included, on the three pools
    for deployment in stages:
        synced = (deployment.get("parameters") or {}).get("sync", False)
        assert synced is (deployment["work_pool"]["name"] != "flexkd-process"), deployment


def test_a_synced_stage_refuses_what_dvc_repro_cannot_run_before_any_compute(tmp_path, monkeypatch):
    import sys

    from flows.storage import dvc_stage, run_synced

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=tmp_path, check=True)
    monkeypatch.setenv("FLEXKD_PROJECT_ROOT", str(tmp_path))
    other = tmp_path / "other.yaml"
    shutil.copy(REPO / "params.yaml", other)
    with pytest.raises(ConfigError, match=r"runs under `dvc repro`, which reads .*params\.yaml"):
        run_synced("prepare", params=str(other))
    with pytest.raises(ConfigError, match=r"distill@tiny-kd is not a stage of this pipeline"):
        run_synced("distill", student="tiny", method="kd")
    with pytest.raises(ConfigError, match=r"no default DVC remote is set.*dvc remote add -d"):
        run_synced("prepare")
    assert dvc_stage("distill", "pruned", "flexkd") == "distill@pruned-flexkd" and dvc_stage("relevance") == "relevance"
    assert not (tmp_path / "data").exists()
