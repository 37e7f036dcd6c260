"""MLflow runs: the tracking store, the pipeline parent run, stage runs and what they log (params, metrics, tags).

MLflow is the one tracker. Every stage runs in its own process (``python -m flows.<stage>``) and opens one
run with :func:`stage_run`; all stage runs of one pipeline nest under a shared *pipeline* parent run whose id
travels between processes in ``FLEXKD_PIPELINE_RUN_ID`` or the file ``<project>/.flexkd/pipeline_run_id``.

Also the keys and values MLflow accepts (:func:`sanitize_key`, :func:`flatten_params`, :func:`truncate`) and
:func:`active_run_id`, which the other modules of :mod:`flexkd.tracking` use to find the run they log to.
mlflow is imported inside the functions (it takes ~1.5 s), so importing this module is cheap.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from flexkd import resources
from flexkd.errors import FlexKDError
from flexkd.provenance import atomic_write_text

PIPELINE_RUN_ENV = "FLEXKD_PIPELINE_RUN_ID"
PIPELINE_RUN_FILE = Path(".flexkd") / "pipeline_run_id"
# MLflow 3 opens an experiment in its GenAI view (traces, judges) unless the experiment says it is model training
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# MLflow's limits (mlflow.utils.validation); kept here so that this module imports without mlflow.
_MAX_KEY = 250
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")

_current_uri: str | None = None
_reachable_uris: set[str] = set()  # http(s) servers that answered check_reachable in this process


# --------------------------------------------------------------------------------------------------- setup
def tracking_uri(project_root: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store in the project: ``sqlite:///<abs root>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{Path(project_root).resolve() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):]
    if path in ("", ":memory:"):
        return None
    # sqlite:////abs/path -> "/abs/path"; sqlite:///rel/path -> "rel/path"
    return Path(path).resolve()


@resources.phase("mlflow")
def setup(project_root: str | Path, experiment: str) -> str:
    """Point MLflow at the project's tracking store and experiment (created if missing); return the URI.

    For a SQLite store, new experiments keep their artifacts next to the database (``<db dir>/mlartifacts``)
    instead of MLflow's default ``./mlruns`` under whatever directory the process happens to run in.
    """
    global _current_uri
    import mlflow

    uri = tracking_uri(project_root)
    if uri.lower().startswith(("http://", "https://")) and uri not in _reachable_uris:
        check_reachable(uri=uri)  # fail fast: MLflow's own retries of the calls below take minutes
        _reachable_uris.add(uri)
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    _current_uri = uri
    client = mlflow.MlflowClient()
    if client.get_experiment_by_name(experiment) is None:
        location = None
        if db is not None:
            location = (db.parent / "mlartifacts" / sanitize_key(experiment).replace("/", "_")).as_uri()
        try:
            client.create_experiment(experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except mlflow.exceptions.MlflowException:
            if client.get_experiment_by_name(experiment) is None:  # not a lost race with another process
                raise
    found = client.get_experiment_by_name(experiment)
    if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # also an experiment made by an older flexkd
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(experiment)
    return uri


UI_DEFAULT = "http://127.0.0.1:5000"  # where `make ui` serves a local (SQLite) store


def ui_base(uri: str | None = None) -> str:
    """The MLflow UI's address for a tracking URI: the server itself, or `make ui`'s for a local store."""
    uri = uri or _current_uri or ""
    return uri.rstrip("/") if uri.lower().startswith(("http://", "https://")) else UI_DEFAULT


def experiment_url(experiment_id: str, uri: str | None = None) -> str:
    """The experiment's runs in MLflow's model-training view.

    MLflow 3.17's UI opens an experiment in its GenAI view (traces, prompts) unless the link asks for the
    model-training one, whatever the experiment's kind tag says; flexkd's runs and metrics are in the latter.
    """
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def model_version_url(name: str, version: str | int, uri: str | None = None) -> str:
    return f"{ui_base(uri)}/#/models/{name}/versions/{version}?workflowType=machine_learning"


def check_reachable(timeout_s: float = 10, *, uri: str | None = None) -> None:
    """Fail fast when an http(s) tracking server does not answer; a no-op for SQLite and file stores.

    Tries ``GET <uri>/health`` first; if the server answers but has no such route (a proxy, a path prefix),
    falls back to one ``search_experiments`` call with retries off and a short timeout.
    """
    import urllib.error
    import urllib.request

    if uri is None:
        if _current_uri is not None:
            uri = _current_uri
        else:
            import mlflow

            uri = mlflow.get_tracking_uri()
    if not uri.lower().startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
    except urllib.error.HTTPError:
        pass  # it answered: check with a real API call below
    except (urllib.error.URLError, OSError) as exc:
        raise FlexKDError(f"MLflow tracking server at {uri} is unreachable: {exc}") from exc

    import mlflow

    overrides = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(math.ceil(timeout_s)))),
    }
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        raise FlexKDError(f"MLflow tracking server at {uri} is unreachable: {exc}") from exc
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -------------------------------------------------------------------------------- keys, values, the run
def sanitize_key(key: str) -> str:
    """A metric / param key MLflow accepts: bad characters become ``_``, no ``..``, ``//`` or leading ``/``."""
    key = _BAD_KEY_CHARS.sub("_", str(key))
    parts = [part for part in key.split("/") if part not in ("", ".", "..")]
    key = "/".join(parts) or "_"
    if posixpath.normpath(key) != key:  # e.g. "a/./b" forms survived; make it plain
        key = key.replace(".", "_")
    return key[:_MAX_KEY]


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; values as strings truncated to MLflow's param limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name))
        else:
            flat[sanitize_key(name)] = truncate(str(value), _MAX_PARAM_VALUE)
    return flat


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in ``...`` when cut (MLflow refuses longer values)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _git_tags(project_root: str | Path) -> dict[str, str]:
    """Commit and dirty flag of the project's git checkout; empty when not a repo or no commit yet."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=project_root, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    status = git("status", "--porcelain", "--untracked-files=no")
    tags = {"mlflow.source.git.commit": commit, "flexkd.git_commit": commit}
    if status is not None:
        tags["flexkd.git_dirty"] = str(bool(status)).lower()
    return tags


def active_run_id(run_id: str | None = None) -> str:
    """``run_id`` if given, else the active run's id; a :class:`FlexKDError` when there is neither."""
    if run_id:
        return run_id
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise FlexKDError("no active MLflow run: call this inside flexkd.tracking.stage_run(...)")
    return run.info.run_id


# ------------------------------------------------------------------------------------------ pipeline run
def _run_file(project_root: str | Path) -> Path:
    return Path(project_root) / PIPELINE_RUN_FILE


def _write_run_file(project_root: str | Path, run_id: str) -> None:
    atomic_write_text(_run_file(project_root), run_id + "\n")


def _usable_parent(client, run_id: str, experiment_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage == "active" and run.info.experiment_id == experiment_id


def pipeline_run_name(*, task: str, seed: int, profile: str | None = None, commit: str | None = None,
                      dirty: bool = False, how: str = "pipeline") -> str:
    """``pipeline-<profile>-<task>-seed<seed>-<short commit>[-dirty]``: two runs of other set-ups or code differ."""
    parts = [how, *([profile] if profile and profile != task else []), task, f"seed{seed}"]
    if commit:
        parts.append(commit[:7] + ("-dirty" if dirty else ""))
    return "-".join(parts)


def _create_pipeline_run(project_root: str | Path, experiment: str, run_name: str, description: str | None = None) -> str:
    import mlflow

    setup(project_root, experiment)
    client = mlflow.MlflowClient()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    tags = {"flexkd.kind": "pipeline", **_git_tags(project_root)}
    if description:
        tags["mlflow.note.content"] = truncate(description, _MAX_TAG_VALUE)  # the run's description in the UI
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    _write_run_file(project_root, run.info.run_id)
    return run.info.run_id


def pipeline_run_id(project_root: str | Path, experiment: str, *, create: bool = True) -> str | None:
    """Id of the pipeline parent run that the stage runs nest under.

    ``FLEXKD_PIPELINE_RUN_ID`` if set; else the id in ``<project_root>/.flexkd/pipeline_run_id`` if that run
    exists (not deleted) in this tracking store and experiment; else a new run named ``pipeline`` (tag
    ``flexkd.kind=pipeline``) whose id is written to that file. With ``create=False``, None instead.
    """
    env = os.environ.get(PIPELINE_RUN_ENV, "").strip()
    if env:
        return env
    import mlflow

    setup(project_root, experiment)
    client = mlflow.MlflowClient()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    path = _run_file(project_root)
    if path.is_file():
        stored = path.read_text().strip()
        if stored and _usable_parent(client, stored, experiment_id):
            return stored
    if not create:
        return None
    git = _git_tags(project_root)
    name = f"dvc-repro-{git['flexkd.git_commit'][:7]}" if git else "dvc-repro"
    return _create_pipeline_run(project_root, experiment, name, description=(
        "Stages run by `dvc repro` (or one stage on its own) outside the pipeline flow; their runs nest here."))


@resources.phase("mlflow")
def start_pipeline_run(project_root: str | Path, experiment: str, run_name: str = "pipeline",
                       description: str | None = None) -> str:
    """Always create a fresh pipeline parent run (``description``: the run's note in the UI) and record it in
    ``.flexkd/pipeline_run_id``."""
    return _create_pipeline_run(project_root, experiment, run_name, description)


def git_state(project_root: str | Path) -> tuple[str | None, bool]:
    """(commit, dirty) of the project's git checkout; (None, False) outside git."""
    tags = _git_tags(project_root)
    return tags.get("flexkd.git_commit"), tags.get("flexkd.git_dirty") == "true"


@resources.phase("mlflow")
def end_pipeline_run(run_id: str, status: str = "FINISHED") -> None:
    """Mark the pipeline parent run as ended (FINISHED, FAILED or KILLED)."""
    import mlflow

    mlflow.MlflowClient().set_terminated(run_id, status=status)


# ---------------------------------------------------------------------------------------------- stage run
@contextmanager
def stage_run(
    stage: str,
    *,
    project_root: str | Path,
    experiment: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    method: str | None = None,
) -> Iterator[Any]:
    """Open the stage's MLflow run, nested under the pipeline parent; yield the active run.

    Tags ``flexkd.stage`` (and ``flexkd.method`` when ``method`` or ``tags["method"]`` is given), logs
    ``params`` flattened to ``a.b.c`` keys, the git commit and ``dvc.lock`` (under ``provenance/``). On an
    exception the run ends FAILED (KILLED on Ctrl-C) and the exception propagates.
    """
    import mlflow

    # everything the process did before this point (interpreter, imports, the Prefect flow run, config) is
    # start-up, less the pre-flight checks and tracking calls already counted under their own phases
    startup = resources.process_age() - resources.seconds("preflight") - resources.seconds("mlflow")
    began, compute_before = time.perf_counter(), resources.compute_seconds()
    with resources.phase("mlflow"):
        setup(project_root, experiment)
        parent = pipeline_run_id(project_root, experiment)
        active = mlflow.active_run()
        if active is not None and active.info.run_id != parent:
            raise FlexKDError(
                f"stage {stage!r}: another MLflow run ({active.info.run_id}) is active; end it before stage_run"
            )
        all_tags, method = _stage_tags(stage, project_root, tags, method)
        run = mlflow.start_run(
            run_name=run_name or (f"{stage}-{method}" if method else stage),
            nested=True,
            parent_run_id=parent if active is None else None,
            tags=all_tags,
        )
    run_id = run.info.run_id
    status = "FINISHED"
    try:
        with resources.phase("mlflow"):
            _log_params_and_lock(run_id, project_root, params or {})
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        _end_stage_run(run_id, status, startup=startup, began=began, compute_before=compute_before)


def _stage_tags(stage: str, project_root: str | Path, tags: Mapping[str, Any] | None,
                method: str | None) -> tuple[dict[str, str], str | None]:
    """The stage run's tags (``flexkd.stage``, the git commit, ``flexkd.method``, then ``tags`` less ``method``)
    and its method: ``method``, else ``tags["method"]``, else None."""
    all_tags: dict[str, str] = {"flexkd.stage": stage, **_git_tags(project_root)}
    extra = dict(tags or {})
    method = method if method is not None else extra.pop("method", None)
    if method is not None:
        all_tags["flexkd.method"] = str(method)
    all_tags.update({str(k): truncate(str(v), _MAX_TAG_VALUE) for k, v in extra.items()})
    return all_tags, method


def _log_params_and_lock(run_id: str, project_root: str | Path, params: Mapping[str, Any]) -> None:
    """The stage's params, flattened, in batches of MLflow's size, and ``dvc.lock`` (if any) under ``provenance/``."""
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient()
    flat = list(flatten_params(params).items())
    for start in range(0, len(flat), _MAX_PARAMS_PER_BATCH):
        chunk = flat[start : start + _MAX_PARAMS_PER_BATCH]
        client.log_batch(run_id, params=[Param(k, v) for k, v in chunk])
    lock = Path(project_root) / "dvc.lock"
    if lock.is_file():
        client.log_artifact(run_id, str(lock), artifact_path="provenance")


def _end_stage_run(run_id: str, status: str, *, startup: float, began: float, compute_before: float) -> None:
    """Log the stage's ``resources/*`` metrics (never failing the stage over them) and end its run with ``status``."""
    import mlflow

    try:
        log_metrics({"resources/peak_rss_mb": resources.peak_rss_mb(),
                     "resources/compute_seconds": resources.compute_seconds() - compute_before,
                     "resources/stage_seconds": time.perf_counter() - began,
                     # the process as a whole, for the overhead split (benchmarks/quality.py)
                     "resources/startup_seconds": startup,
                     "resources/preflight_seconds": resources.seconds("preflight"),
                     "resources/mlflow_seconds": resources.seconds("mlflow"),
                     "resources/process_seconds": resources.process_age()}, run_id=run_id)
    except Exception:  # noqa: BLE001 - never hide the stage's own outcome behind a metrics failure
        pass
    if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run_id:
        mlflow.end_run(status=status)
    else:  # someone ended or replaced the active run inside the block; still close ours
        mlflow.MlflowClient().set_terminated(run_id, status=status)


# ----------------------------------------------------------------------------------------- metrics & tags
@resources.phase("mlflow")
def log_metrics(metrics: Mapping[str, float], step: int | None = None, *, run_id: str | None = None) -> None:
    """Log each metric under its own key (sanitised: ``train/feature/flexkd`` stays as it is) in one batch."""
    import mlflow
    from mlflow.entities import Metric

    run_id = active_run_id(run_id)
    timestamp = int(time.time() * 1000)
    batch = [Metric(sanitize_key(k), float(v), timestamp, int(step or 0)) for k, v in metrics.items()]
    client = mlflow.MlflowClient()
    for start in range(0, len(batch), _MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch[start : start + _MAX_METRICS_PER_BATCH])


@resources.phase("mlflow")
def set_tags(tags: Mapping[str, Any], *, run_id: str | None = None) -> None:
    """Tag the active run (e.g. where a distill run's teacher outputs came from)."""
    import mlflow

    client = mlflow.MlflowClient()
    run_id = active_run_id(run_id)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def log_metrics_to_run(run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    """:func:`log_metrics` into another (possibly finished) run, e.g. test scores into a distill run."""
    log_metrics(metrics, step, run_id=run_id)
