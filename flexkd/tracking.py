"""MLflow tracking for the pipeline: runs, per-term metrics, datasets, artifacts, models, registry and aliases.

MLflow is the one tracker. Every stage runs in its own process (``python -m flows.<stage>``) and opens one
run with :func:`stage_run`; all stage runs of one pipeline nest under a shared *pipeline* parent run whose id
travels between processes in ``FLEXKD_PIPELINE_RUN_ID`` or the file ``<project>/.flexkd/pipeline_run_id``.

Students are logged as MLflow pyfunc models ("models from code": a small generated module that needs only
mlflow, torch, transformers and pandas, not flexkd): classifiers with :func:`log_classifier_model` (text ->
label, score), generators with :func:`log_generator_model` (prompt -> text), and registered as ``flexkd-<task>`` with the aliases
``champion`` (best so far) and ``challenger`` (the latest one that did not beat it).

mlflow is imported inside the functions (it takes ~1.5 s), so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import math
import os
import posixpath
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from flexkd import resources
from flexkd.errors import FlexKDError
from flexkd.provenance import atomic_write_text

PIPELINE_RUN_ENV = "FLEXKD_PIPELINE_RUN_ID"
PIPELINE_RUN_FILE = Path(".flexkd") / "pipeline_run_id"
CHAMPION = "champion"
CHALLENGER = "challenger"
# MLflow 3 opens an experiment in its GenAI view (traces, judges) unless the experiment says it is model training
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# MLflow's limits (mlflow.utils.validation); kept here so that this module imports without mlflow.
_MAX_KEY = 250
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_MAX_REGISTRY_TAG_VALUE = 5000  # registry allows more; a model card belongs in the description
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
        tags["mlflow.note.content"] = _truncate(description, _MAX_TAG_VALUE)  # the run's description in the UI
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


# --------------------------------------------------------------------------------------------- helpers
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
            flat[sanitize_key(name)] = _truncate(str(value), _MAX_PARAM_VALUE)
    return flat


def _truncate(text: str, limit: int) -> str:
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


def _active_run_id(run_id: str | None = None) -> str:
    if run_id:
        return run_id
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise FlexKDError("no active MLflow run: call this inside flexkd.tracking.stage_run(...)")
    return run.info.run_id


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
    from mlflow.entities import Param

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
        all_tags: dict[str, str] = {"flexkd.stage": stage, **_git_tags(project_root)}
        extra = dict(tags or {})
        method = method if method is not None else extra.pop("method", None)
        if method is not None:
            all_tags["flexkd.method"] = str(method)
        all_tags.update({str(k): _truncate(str(v), _MAX_TAG_VALUE) for k, v in extra.items()})

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
            client = mlflow.MlflowClient()
            flat = list(flatten_params(params or {}).items())
            for start in range(0, len(flat), _MAX_PARAMS_PER_BATCH):
                chunk = flat[start : start + _MAX_PARAMS_PER_BATCH]
                client.log_batch(run_id, params=[Param(k, v) for k, v in chunk])
            lock = Path(project_root) / "dvc.lock"
            if lock.is_file():
                client.log_artifact(run_id, str(lock), artifact_path="provenance")
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
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


# ------------------------------------------------------------------------------------ metrics & artifacts
@resources.phase("mlflow")
def log_metrics(metrics: Mapping[str, float], step: int | None = None, *, run_id: str | None = None) -> None:
    """Log each metric under its own key (sanitised: ``train/feature/flexkd`` stays as it is) in one batch."""
    import mlflow
    from mlflow.entities import Metric

    run_id = _active_run_id(run_id)
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
    run_id = _active_run_id(run_id)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def log_metrics_to_run(run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    """:func:`log_metrics` into another (possibly finished) run, e.g. test scores into a distill run."""
    log_metrics(metrics, step, run_id=run_id)


@resources.phase("mlflow")
def log_artifact(path: str | Path, artifact_path: str | None = None, *, run_id: str | None = None) -> None:
    """Log a file (or a directory's files) to the active run."""
    import mlflow

    run_id = _active_run_id(run_id)
    path = Path(path)
    client = mlflow.MlflowClient()
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path=artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)


@resources.phase("mlflow")
def log_dataset(path_or_df, *, name: str, context: str, targets: str | None = "label"):
    """Record a dataset as an input of the active run (``context``: training / validation / test).

    Accepts a JSONL path (read with pandas; the path becomes the dataset source) or a DataFrame.
    Columns holding lists or dicts are stringified for the schema and digest.
    """
    import mlflow
    import mlflow.data
    import pandas as pd

    _active_run_id()
    source = None
    if isinstance(path_or_df, pd.DataFrame):
        df = path_or_df
    else:
        path = Path(path_or_df)
        if not path.is_file():
            raise FlexKDError(f"{path}: dataset file not found")
        df = pd.read_json(path, lines=path.suffix.lower() in (".jsonl", ".ndjson"))
        source = str(path.resolve())
    nested = [c for c in df.columns if df[c].map(lambda v: isinstance(v, (list, dict, tuple))).any()]
    if nested:
        df = df.assign(**{c: df[c].map(str) for c in nested})
    with warnings.catch_warnings():
        # a local path resolves to two equivalent LocalArtifactDatasetSource entries; MLflow warns about it
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        dataset = mlflow.data.from_pandas(
            df, source=source, targets=targets if targets in df.columns else None, name=name
        )
        mlflow.log_input(dataset, context=context)
    return dataset


# --------------------------------------------------------------------------------------------- models
# The pyfunc model lives in this source text: it is written to a file and logged as "model from code", so a
# model loads with mlflow + torch + transformers + pandas alone (no flexkd on the serving side).
_MODEL_SOURCE = '''
"""Text classifier served by MLflow pyfunc: a save_pretrained checkpoint -> label names and probabilities."""

import mlflow
import pandas as pd


class TextClassifierModel(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with "text" (and optionally "text_pair"). Output: "label" (name) and "score"."""

    batch_size = 32

    def load_context(self, context):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        checkpoint = context.artifacts["checkpoint"]
        config = dict(context.model_config or {})
        self.max_length = int(config.get("max_length", 512))
        label_map = config.get("label_map") or {}
        self.id2label = {int(i): str(name) for name, i in label_map.items()}
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.model = AutoModelForSequenceClassification.from_pretrained(checkpoint).to(self.device).eval()
        if not self.id2label:
            self.id2label = {int(i): str(n) for i, n in self.model.config.id2label.items()}

    def predict(self, context, model_input, params=None):
        import torch

        if isinstance(model_input, pd.DataFrame):
            frame = model_input
        elif isinstance(model_input, dict):
            frame = pd.DataFrame(model_input)
        else:
            frame = pd.DataFrame({"text": list(model_input)})
        texts = [str(t) for t in frame["text"].tolist()]
        pairs = None
        if "text_pair" in frame.columns:
            pairs = [None if v is None or v != v else str(v) for v in frame["text_pair"].tolist()]
            if all(p is None for p in pairs):
                pairs = None
        labels, scores = [], []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start : start + self.batch_size]
            pair_batch = pairs[start : start + self.batch_size] if pairs is not None else None
            encoded = self.tokenizer(
                batch, pair_batch, truncation=True, max_length=self.max_length, padding=True,
                return_tensors="pt",
            ).to(self.device)
            with torch.no_grad():
                probs = torch.softmax(self.model(**encoded).logits.float(), dim=-1)
            best, index = probs.max(dim=-1)
            labels += [self.id2label.get(int(i), str(int(i))) for i in index.tolist()]
            scores += [float(p) for p in best.tolist()]
        return pd.DataFrame({"label": labels, "score": scores})
'''


_GENERATOR_SOURCE = '''
"""Text generator served by MLflow pyfunc: a save_pretrained causal LM -> greedy continuations of prompts."""

import re

import mlflow
import pandas as pd

_FIELD = re.compile(r"\\{(instruction|input)\\}")


class TextGeneratorModel(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with "prompt" (instruction, or the document for summarization) and optionally
    "input". Output: "text", the greedy continuation (new tokens only, special tokens skipped, stripped).

    Prompts are formatted as in training: a chat template (one user message, generation prompt added) or the
    plain Alpaca template from ``model_config``; tokenised without special tokens (the plain template gets the
    tokenizer's BOS in front when the tokenizer puts one there), cut from the left to ``max_prompt_tokens``
    (a leading BOS kept), left padded. ``params={"max_new_tokens": n}`` overrides the logged default.
    """

    batch_size = 8

    def load_context(self, context):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        checkpoint = context.artifacts["checkpoint"]
        config = dict(context.model_config or {})
        self.task = str(config.get("task", "instruction"))
        self.max_new_tokens = int(config.get("max_new_tokens", 64))
        self.max_prompt_tokens = int(config.get("max_prompt_tokens", 512))
        self.use_chat_template = bool(config.get("use_chat_template", False))
        self.summary_instruction = str(config.get("summary_instruction") or "{document}")
        self.template = str(config["template"])
        self.template_with_input = str(config["template_with_input"])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint).to(self.device).eval()
        tok = self.tokenizer
        if tok.eos_token_id is not None:
            self.eos_ids = [int(tok.eos_token_id)]
        else:
            eos = getattr(self.model.generation_config, "eos_token_id", None)
            self.eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        pad = tok.pad_token_id if tok.pad_token_id is not None else (self.eos_ids[0] if self.eos_ids else None)
        if pad is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        self.pad_id = int(pad)
        self.bos_id = None if tok.bos_token_id is None else int(tok.bos_token_id)
        self.plain_prefix = []
        if self.bos_id is not None:  # LLaMA-style tokenizers put BOS first; GPT-2 / BERT-style ones do not
            ids = tok("a", add_special_tokens=True)["input_ids"]
            if ids and ids[0] == self.bos_id:
                self.plain_prefix = [self.bos_id]

    def format_prompt(self, prompt, extra=""):
        """The templated prompt text, as flexkd's PromptFormatter builds it in training."""
        instruction = prompt
        if self.task == "summarization":
            if "{document}" in self.summary_instruction:
                instruction = self.summary_instruction.replace("{document}", prompt)
            else:
                instruction = self.summary_instruction + "\\n\\n" + prompt
        if self.use_chat_template:
            content = instruction + ("\\n\\n" + extra if extra else "")
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        values = {"instruction": instruction, "input": extra}
        return _FIELD.sub(lambda m: values[m.group(1)], self.template_with_input if extra else self.template)

    def prompt_ids(self, prompt, extra=""):
        ids = list(self.tokenizer(self.format_prompt(prompt, extra), add_special_tokens=False)["input_ids"])
        if not self.use_chat_template:
            ids = self.plain_prefix + ids
        limit = self.max_prompt_tokens
        if len(ids) > limit:
            if self.bos_id is not None and ids[0] == self.bos_id and limit > 1:
                ids = [ids[0]] + ids[len(ids) - (limit - 1):]
            else:
                ids = ids[len(ids) - limit:]
        if not ids:
            ids = [self.bos_id if self.bos_id is not None else self.pad_id]
        return ids

    def predict(self, context, model_input, params=None):
        import torch

        if isinstance(model_input, pd.DataFrame):
            frame = model_input
        elif isinstance(model_input, dict):
            frame = pd.DataFrame(model_input)
        else:
            frame = pd.DataFrame({"prompt": list(model_input)})
        max_new_tokens = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
        prompts = ["" if p is None or p != p else str(p) for p in frame["prompt"].tolist()]
        extras = [""] * len(prompts)
        if "input" in frame.columns:
            extras = ["" if v is None or v != v else str(v) for v in frame["input"].tolist()]
        encoded = [self.prompt_ids(p, x) for p, x in zip(prompts, extras)]
        texts = []
        with torch.no_grad():
            for start in range(0, len(encoded), self.batch_size):
                chunk = encoded[start : start + self.batch_size]
                width = max(len(ids) for ids in chunk)
                input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, ids in enumerate(chunk):  # left padding: every prompt ends at the last column
                    input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, width - len(ids):] = 1
                generated = self.model.generate(
                    input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                    pad_token_id=self.pad_id, eos_token_id=self.eos_ids or None,
                )
                for row in generated[:, width:].tolist():
                    cut = next((i for i, token in enumerate(row) if token in self.eos_ids), len(row))
                    texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return pd.DataFrame({"text": texts})
'''

_GENERATED_MODELS = {  # class name -> (module file stem, source)
    "TextClassifierModel": ("flexkd_text_classifier", "_MODEL_SOURCE"),
    "TextGeneratorModel": ("flexkd_text_generator", "_GENERATOR_SOURCE"),
}


def __getattr__(name: str):
    # ``flexkd.tracking.TextClassifierModel`` / ``TextGeneratorModel`` for direct use (tests, notebooks)
    # without importing mlflow when this module is imported.
    if name in _GENERATED_MODELS:
        module, source = _GENERATED_MODELS[name]
        namespace: dict[str, Any] = {"__name__": module}
        exec(compile(globals()[source], f"{module}.py", "exec"), namespace)  # noqa: S102
        globals()[name] = namespace[name]
        return namespace[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _pinned(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{distribution}=={version(distribution).split('+')[0]}"
    except PackageNotFoundError:
        return distribution


def model_requirements() -> list[str]:
    """Pinned pip requirements of the served model (the versions installed here; local tags like +cpu cut)."""
    return [
        _pinned(d)
        for d in ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pandas", "numpy")
    ]


@resources.phase("mlflow")
def _log_code_model(
    checkpoint_dir: str | Path,
    *,
    artifact_path: str,
    class_name: str,
    model_config: Mapping[str, Any],
    signature,
    input_example,
) -> str:
    """Log one of the generated pyfunc modules ("model from code") with the checkpoint as the artifact
    ``checkpoint``, ``model_config`` and the pinned requirements, into the active run; return the model URI."""
    import mlflow
    import mlflow.pyfunc

    run_id = _active_run_id()
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "config.json").is_file():
        raise FlexKDError(f"{checkpoint_dir}: not a save_pretrained checkpoint (no config.json)")
    module, source = _GENERATED_MODELS[class_name]
    with tempfile.TemporaryDirectory() as tmp:
        # The checkpoint is logged under the fixed name "checkpoint" (the model card's load path relies on it);
        # hard links where possible, so no weights are copied twice.
        staged = Path(tmp) / "checkpoint"
        shutil.copytree(checkpoint_dir, staged, copy_function=_link_or_copy)
        code = Path(tmp) / f"{module}.py"
        code.write_text(globals()[source] + f"\nmlflow.models.set_model({class_name}())\n")
        info = mlflow.pyfunc.log_model(
            name=artifact_path,
            python_model=str(code),
            artifacts={"checkpoint": str(staged)},
            model_config=dict(model_config),
            pip_requirements=model_requirements(),
            signature=signature,
            input_example=input_example,
        )
    if info.run_id and info.run_id != run_id:  # pragma: no cover - defensive
        raise FlexKDError(f"model logged to run {info.run_id}, expected {run_id}")
    return info.model_uri


def log_classifier_model(
    checkpoint_dir: str | Path,
    *,
    artifact_path: str = "model",
    label_map: Mapping[str, int],
    max_length: int,
    input_example_texts: list[str],
    text_pair: bool = False,
) -> str:
    """Log a ``save_pretrained`` classifier (model + tokenizer) as an MLflow pyfunc model; return its URI.

    The URI is the LoggedModel's ``models:/m-...`` URI, which ``mlflow.register_model`` and
    ``mlflow.pyfunc.load_model`` accept. ``artifact_path`` is the model's name within the run.
    """
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = [ColSpec("string", "text")]
    if text_pair:
        inputs.append(ColSpec("string", "text_pair", required=False))
    signature = ModelSignature(
        inputs=Schema(inputs), outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")])
    )
    return _log_code_model(
        checkpoint_dir,
        artifact_path=artifact_path,
        class_name="TextClassifierModel",
        model_config={"label_map": {str(k): int(v) for k, v in label_map.items()}, "max_length": int(max_length)},
        signature=signature,
        input_example=pd.DataFrame({"text": list(input_example_texts)}),
    )


def _prompt_templates() -> dict[str, str]:
    """The plain (Alpaca) prompt templates of ``flexkd.data.generation`` with ``{instruction}`` / ``{input}``
    fields, and its default summary instruction: copied as values into the logged model's config, so the
    served model formats prompts exactly as training did without importing flexkd."""
    from flexkd.data import generation as g

    return {
        "template": f"{g.ALPACA_HEADER}### Instruction:\n{{instruction}}\n\n### Response:\n",
        "template_with_input": (
            f"{g.ALPACA_HEADER_WITH_INPUT}### Instruction:\n{{instruction}}\n\n### Input:\n{{input}}\n\n"
            "### Response:\n"
        ),
        "default_summary_instruction": g.DEFAULT_SUMMARY_INSTRUCTION,
    }


def log_generator_model(
    checkpoint_dir: str | Path,
    *,
    artifact_path: str = "model",
    max_new_tokens: int,
    max_prompt_tokens: int,
    use_chat_template: bool,
    summary_instruction: str | None,
    task: str,
    input_example_prompts: list[str],
) -> str:
    """Log a ``save_pretrained`` causal LM (model + tokenizer) as an MLflow pyfunc text generator; return its URI.

    ``predict`` takes a DataFrame with ``prompt`` (the instruction; the document for ``task="summarization"``)
    and optionally ``input``, and returns a DataFrame with ``text``: the greedy continuation (left padded,
    stopped at EOS, new tokens only). Prompts are formatted as training formatted them
    (``flexkd.data.generation.PromptFormatter``): the tokenizer's chat template when ``use_chat_template``,
    else the Alpaca template; for summarization ``summary_instruction`` (None: the default one) with
    ``{document}`` replaced by the prompt. The prompt keeps its last ``max_prompt_tokens`` tokens;
    ``params={"max_new_tokens": n}`` overrides ``max_new_tokens`` per call. The model needs no flexkd.
    """
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    if task not in ("instruction", "summarization"):
        raise FlexKDError(f"task must be 'instruction' or 'summarization', got {task!r}")
    for name, value in (("max_new_tokens", max_new_tokens), ("max_prompt_tokens", max_prompt_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FlexKDError(f"{name} must be an int >= 1, got {value!r}")
    checkpoint_dir = Path(checkpoint_dir)
    if use_chat_template:
        from transformers import AutoTokenizer

        if not getattr(AutoTokenizer.from_pretrained(checkpoint_dir), "chat_template", None):
            raise FlexKDError(f"{checkpoint_dir}: use_chat_template=True but the tokenizer has no chat template")
    templates = _prompt_templates()
    if summary_instruction is None:
        summary_instruction = templates["default_summary_instruction"]
    model_config = {
        "task": task,
        "max_new_tokens": int(max_new_tokens),
        "max_prompt_tokens": int(max_prompt_tokens),
        "use_chat_template": bool(use_chat_template),
        "summary_instruction": str(summary_instruction),
        "template": templates["template"],
        "template_with_input": templates["template_with_input"],
    }
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "input", required=False)]),
        outputs=Schema([ColSpec("string", "text")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", int(max_new_tokens))]),
    )
    return _log_code_model(
        checkpoint_dir,
        artifact_path=artifact_path,
        class_name="TextGeneratorModel",
        model_config=model_config,
        signature=signature,
        input_example=pd.DataFrame({"prompt": list(input_example_prompts)}),
    )


@resources.phase("mlflow")
def log_text_table(df, artifact_file: str, *, run_id: str | None = None) -> None:
    """Log a DataFrame (e.g. prompt / reference / teacher / student samples) as an MLflow table artifact
    (``mlflow.load_table`` / the UI's artifact view) to ``run_id`` or the active run.

    ``artifact_file`` is run-relative and ends in ``.json`` (or ``.parquet``). Lists and tuples in a cell
    are joined with `` || ``, dicts become JSON, None / NaN become ``""``. As in MLflow, logging to an
    existing table file appends the rows.
    """
    import json

    import mlflow
    import pandas as pd

    run_id = _active_run_id(run_id)
    if not str(artifact_file).endswith((".json", ".parquet")):
        raise FlexKDError(f"table artifact {artifact_file!r} must end in .json or .parquet")
    if not isinstance(df, pd.DataFrame):
        df = pd.DataFrame(df)

    def cell(value):
        if isinstance(value, (list, tuple)):
            return " || ".join(str(v) for v in value)
        if isinstance(value, dict):
            return json.dumps(value, ensure_ascii=False, default=str)
        if value is None or (isinstance(value, float) and value != value):
            return ""
        return value

    table = df.reset_index(drop=True).copy()
    for column in table.columns:
        if pd.api.types.is_object_dtype(table[column]) or pd.api.types.is_string_dtype(table[column]):
            table[column] = table[column].astype(object).map(cell)
    mlflow.MlflowClient().log_table(run_id, table, str(artifact_file))


# --------------------------------------------------------------------------------------------- registry
def registered_name(task: str) -> str:
    return f"flexkd-{task}"


@resources.phase("mlflow")
def register_student(
    task: str,
    *,
    model_uri: str,
    run_id: str,
    selection,
    model_card_md: str,
    tags: Mapping[str, Any] | None = None,
    test_metrics: Mapping[str, float] | None = None,
    higher_is_better: bool = True,
) -> dict:
    """Register a student as a new version of ``flexkd-<task>`` and move the aliases.

    ``selection`` (a :class:`flexkd.selection.Selection`) says how the student was chosen: on the validation
    split, by which metric, its value and the validation data's fingerprint. The version gets those as tags
    (``selection_split``, ``selection_metric``, ``selection_value``, ``validation_fingerprint``), the test
    metrics as ``test_<name>`` tags (reported, never compared), ``tags``, and the model card as its description
    and as ``model_card.md`` in the run.

    It takes ``champion`` when there is none, or when the champion was chosen on the same validation data
    (fingerprint) by the same metric and this one is strictly better there. Otherwise it becomes ``challenger``,
    and ``reason`` in the result (and the version's ``alias_reason`` tag) says why: scores on other validation
    data, or by another metric, say nothing about which student is better.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    name = registered_name(task)
    client = mlflow.MlflowClient()
    try:
        client.create_registered_model(name, description=f"Flex-KD students for the task {task!r}.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise

    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    alias, reason, previous_version, previous_value = _compare_with_champion(champion, selection, higher_is_better)

    version_tags = {**selection.as_tags(), "higher_is_better": str(bool(higher_is_better)).lower(), "run_id": run_id,
                    "task": task, "alias_reason": _truncate(reason, _MAX_REGISTRY_TAG_VALUE)}
    version_tags.update({f"test_{k}": repr(float(v)) for k, v in (test_metrics or {}).items()})
    version_tags.update({str(k): _truncate(str(v), _MAX_REGISTRY_TAG_VALUE) for k, v in (tags or {}).items()})
    client.log_text(run_id, model_card_md, "model_card.md")
    mv = mlflow.register_model(model_uri, name, tags=version_tags)
    version = str(mv.version)
    client.update_model_version(name, version, description=model_card_md)
    client.set_registered_model_alias(name, alias, version)
    return {
        "name": name,
        "version": version,
        "alias": alias,
        "reason": reason,
        "previous_champion": previous_version,
        "previous_value": previous_value,
    }


def _compare_with_champion(champion, selection, higher_is_better: bool) -> tuple[str, str, str | None, float | None]:
    """(alias, reason, champion version, champion's selection value) for a new version chosen by ``selection``."""
    if champion is None:
        return CHAMPION, "the first version chosen on validation: no champion yet", None, None
    version, ctags = str(champion.version), champion.tags or {}
    value = None
    with contextlib.suppress(KeyError, TypeError, ValueError):
        value = float(ctags["selection_value"])
    if ctags.get("selection_split") != selection.split or value is None or math.isnan(value):
        return CHALLENGER, (
            f"the champion (version {version}) records no {selection.split} score (registered before selection moved "
            "to the validation split), so the two cannot be compared; move the alias by hand once you have compared "
            "them on the same data"), version, None
    if ctags.get("selection_metric") != selection.metric:
        return CHALLENGER, (
            f"the champion (version {version}) was chosen by {ctags.get('selection_metric')}, this one by "
            f"{selection.metric}: not comparable (evaluate.primary_metric changed)"), version, value
    if ctags.get("validation_fingerprint") != selection.validation_fingerprint:
        return CHALLENGER, (
            f"the champion (version {version}) was chosen on other validation data (fingerprint "
            f"{str(ctags.get('validation_fingerprint'))[:12]} vs {selection.validation_fingerprint[:12]}): scores on "
            "different data do not say which student is better"), version, value
    better = selection.value > value if higher_is_better else selection.value < value
    if better:
        return CHAMPION, (f"beats the champion (version {version}) on the same validation data: {selection.metric} "
                          f"{selection.value:.4f} vs {value:.4f}"), version, value
    return CHALLENGER, (f"does not beat the champion (version {version}) on the same validation data: {selection.metric} "
                        f"{selection.value:.4f} vs {value:.4f}"), version, value


# ------------------------------------------------------------------------------------------- model card
def _compact_ranges(units: list[int], limit: int = 40) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0-2, 5, 7-8``; at most ``limit`` ranges shown."""
    values = sorted(set(int(u) for u in units))
    ranges: list[str] = []
    start = prev = None
    for value in values + [None]:
        if start is None:
            start = prev = value
        elif value is not None and value == prev + 1:
            prev = value
        else:
            ranges.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = value
    shown = ", ".join(ranges[:limit])
    if len(ranges) > limit:
        shown += f", ... ({len(ranges) - limit} more ranges)"
    return shown


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


_METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "mcc": "MCC", "rougeL": "ROUGE-L",
                 "rougeL_std": "ROUGE-L std", "rougeL_greedy": "ROUGE-L greedy", "loss": "NLL", "neg_loss": "-NLL",
                 "nll": "NLL (teacher-forced)", "perplexity": "perplexity"}


def _metric_name(key: str) -> str:
    return _METRIC_NAMES.get(str(key), str(key))


def _kv_lines(items: Mapping[str, Any], first: list[tuple[str, str]]) -> list[str]:
    """Bullet lines: the known keys in ``first`` (with labels) then any others, skipping missing ones."""
    lines, seen = [], set()
    for key, label in first:
        if key in items and items[key] is not None:
            lines.append(f"- **{label}**: {_fmt(items[key])}")
            seen.add(key)
    for key, value in items.items():
        if key not in seen and value is not None:
            lines.append(f"- **{key}**: {_fmt(value)}")
    return lines


_TASK_FORMATS = ("classification", "instruction", "summarization")
_USE = {
    "classification": "Text classification",
    "instruction": "Instruction following (text generation)",
    "summarization": "Summarization (text generation)",
}


def model_card(
    *,
    task: str,
    teacher: Mapping[str, Any],
    student: Mapping[str, Any],
    data: Mapping[str, Any],
    method: str,
    metrics: Mapping[str, Any],
    selected_units: list[int] | None,
    relevance: Mapping[str, Any] | None,
    loss_weights: Mapping[str, float] | None = None,
    task_format: str = "classification",
    selection_note: str | None = None,
) -> str:
    """Markdown model card of a registered student.

    ``metrics`` maps a split name to its scores (``{"validation": {...}, "test": {...}}``), each rendered as one
    line that names the split; ``selection_note`` says above them how the student was chosen.

    ``task_format``: ``classification`` (default; metrics as given, loading with
    ``AutoModelForSequenceClassification``, pyfunc input ``text``) or ``instruction`` / ``summarization``
    (a generation student: ``metrics`` rendered as the ROUGE-L table, loading with ``AutoModelForCausalLM``,
    pyfunc input ``prompt`` and output ``text``).

    The dicts are rendered as bullet lists: known keys first with readable labels (teacher: id/spec,
    hash/weights_hash, parameters, metric, score, test; student: architecture, parameters, hidden_size,
    num_layers, num_heads, weights_hash; data: files/prepared/sources, rows, fingerprint; relevance: path,
    hash), then any other keys as they are; nested dicts render as ``k=v, ...``. ``loss_weights`` (or ``student["loss_weights"]``)
    goes under Method.
    """
    if task_format not in _TASK_FORMATS:
        raise FlexKDError(f"task_format must be one of {_TASK_FORMATS}, got {task_format!r}")
    generation = task_format != "classification"
    student = dict(student)
    loss_weights = loss_weights if loss_weights is not None else student.pop("loss_weights", None)
    student.pop("loss_weights", None)
    name = registered_name(task)
    lines = [
        f"# {name}: Flex-KD student for `{task}`",
        "",
        "## Intended use",
        f"{_USE[task_format]} for the task `{task}`: a small student distilled from a fine-tuned teacher with "
        f"the `{method}` method. Use it where the teacher is too large or slow; check the metrics below on "
        "data like yours first. Not evaluated outside the data described here.",
        "",
        "## Teacher",
        *_kv_lines(teacher, [("id", "Model"), ("spec", "Model"), ("hash", "Weights hash"),
                             ("weights_hash", "Weights hash"), ("parameters", "Parameters"),
                             ("num_parameters", "Parameters"), ("metric", "Metric"), ("score", "Score"),
                             ("validation", "Validation scores"), ("test", "Test scores")]),
        "",
        "## Student",
        *_kv_lines(student, [("architecture", "Architecture"), ("num_parameters", "Parameters"),
                             ("parameters", "Parameters"), ("hidden_size", "Hidden size"),
                             ("num_layers", "Layers"), ("num_heads", "Attention heads"),
                             ("weights_hash", "Weights hash")]),
        "",
        "## Data",
        *_kv_lines(data, [("files", "Files"), ("prepared", "Prepared data"), ("sources", "Sources"),
                          ("rows", "Rows"), ("fingerprint", "Fingerprint")]),
        "",
        "## Method",
        f"- **Method**: `{method}`",
    ]
    if loss_weights:
        lines.append(f"- **Loss weights**: {_fmt(loss_weights)}")
    lines += ["", "## Metrics", ""]
    if selection_note:
        lines += [selection_note, ""]
    if generation:
        lines += ["ROUGE-L F-measure (best over each example's references, Porter stemming), averaged, in points "
                  "(x 100); greedy decoding unless stated otherwise. Validation NLL: mean negative log-likelihood "
                  "per response token.", ""]
    # bullet lists, one per split: they render in every Markdown viewer (the registry's included)
    for split, values in metrics.items():
        if isinstance(values, Mapping):
            shown = ", ".join(f"{_metric_name(k)} {_fmt(v)}" for k, v in values.items())
            lines.append(f"- **{split} split**: {shown or 'none'}")
        else:
            lines.append(f"- **{_metric_name(split)}**: {_fmt(values)}")
    lines += ["", "## Selected teacher units"]
    if selected_units:
        lines.append(f"- **Count**: {len(selected_units)}")
        lines.append(f"- **Units**: {_compact_ranges(list(selected_units))}")
    else:
        lines.append("- none (this method does not select teacher units)")
    if relevance:
        lines += _kv_lines(relevance, [("path", "Relevance index"), ("hash", "Index hash")])
    pyfunc_call = (
        'model.predict(pd.DataFrame({"prompt": ["an example"]}))  # -> column text; '
        'params={"max_new_tokens": n} to change the length'
        if generation
        else 'model.predict(pd.DataFrame({"text": ["an example"]}))  # -> columns label, score'
    )
    auto_class = "AutoModelForCausalLM" if generation else "AutoModelForSequenceClassification"
    lines += [
        "",
        "## How to load",
        "```python",
        "import mlflow.pyfunc, pandas as pd",
        f'model = mlflow.pyfunc.load_model("models:/{name}@champion")',
        pyfunc_call,
        "```",
        "Or plain transformers, from the model's `checkpoint` artifact:",
        "```python",
        "import mlflow",
        f"from transformers import {auto_class}, AutoTokenizer",
        f'path = mlflow.artifacts.download_artifacts("models:/{name}@champion") + "/artifacts/checkpoint"',
        f"model = {auto_class}.from_pretrained(path)",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "```",
    ]
    if generation:
        lines.append(
            "The pyfunc model formats prompts as training did (the tokenizer's chat template, or the Alpaca "
            "template; for summarization the summary instruction around the document) and decodes greedily; "
            "with plain transformers, format the prompt the same way."
        )
    lines.append("")
    return "\n".join(lines)
