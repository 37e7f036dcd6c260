"""MLflow tracking for the pipeline: runs, per-term metrics, datasets, artifacts, models, registry and aliases.

MLflow is the one tracker. Every stage runs in its own process (``python -m flows.<stage>``) and opens one
run with :func:`stage_run`; all stage runs of one pipeline nest under a shared *pipeline* parent run whose id
travels between processes in ``FLEXKD_PIPELINE_RUN_ID`` or the file ``<project>/.flexkd/pipeline_run_id``.

Students are logged as MLflow pyfunc models ("models from code": a module of :mod:`flexkd.tracking.serving`
that needs only mlflow, torch, transformers and pandas, not flexkd): classifiers with
:func:`log_classifier_model` (text -> label, score), generators with :func:`log_generator_model`
(prompt -> text), and registered as ``flexkd-<task>`` with the aliases ``champion`` (best so far) and
``challenger`` (the latest one that did not beat it).

The modules, each imported here for ``from flexkd import tracking; tracking.stage_run(...)``:

- :mod:`~flexkd.tracking.runs`: the tracking store and its reachability, UI links, the pipeline parent run,
  stage runs, params, metrics and tags;
- :mod:`~flexkd.tracking.artifacts`: files, dataset inputs and sample tables logged to a run;
- :mod:`~flexkd.tracking.models`: students logged as pyfunc models, and their pip requirements;
- :mod:`~flexkd.tracking.serving`: the pyfunc models themselves (``TextClassifierModel``,
  ``TextGeneratorModel``), plain modules that import no flexkd;
- :mod:`~flexkd.tracking.registry`: registered models, versions and the champion / challenger aliases;
- :mod:`~flexkd.tracking.cards`: the model card of a registered student.

mlflow is imported inside the functions (it takes ~1.5 s), so importing this package is cheap.
"""

from __future__ import annotations

import importlib

from flexkd.tracking.artifacts import log_artifact, log_dataset, log_text_table
from flexkd.tracking.cards import model_card
from flexkd.tracking.models import log_classifier_model, log_generator_model, model_requirements
from flexkd.tracking.registry import CHALLENGER, CHAMPION, register_student, registered_name
from flexkd.tracking.runs import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    PIPELINE_RUN_ENV,
    PIPELINE_RUN_FILE,
    UI_DEFAULT,
    check_reachable,
    end_pipeline_run,
    experiment_url,
    flatten_params,
    git_state,
    log_metrics,
    log_metrics_to_run,
    model_version_url,
    pipeline_run_id,
    pipeline_run_name,
    sanitize_key,
    set_tags,
    setup,
    stage_run,
    start_pipeline_run,
    tracking_uri,
    ui_base,
)

__all__ = [
    "CHALLENGER", "CHAMPION", "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "PIPELINE_RUN_ENV", "PIPELINE_RUN_FILE",
    "UI_DEFAULT", "TextClassifierModel", "TextGeneratorModel",
    "check_reachable", "end_pipeline_run", "experiment_url", "flatten_params", "git_state", "log_artifact",
    "log_classifier_model", "log_dataset", "log_generator_model", "log_metrics", "log_metrics_to_run",
    "log_text_table", "model_card", "model_requirements", "model_version_url", "pipeline_run_id",
    "pipeline_run_name", "register_student", "registered_name", "sanitize_key", "set_tags", "setup", "stage_run",
    "start_pipeline_run", "tracking_uri", "ui_base",
]

_SERVED = {"TextClassifierModel": "text_classifier", "TextGeneratorModel": "text_generator"}


def __getattr__(name: str):
    """``tracking.TextClassifierModel`` / ``TextGeneratorModel`` (tests, notebooks): their modules import mlflow,
    so they are imported on first use, not with this package."""
    if name in _SERVED:
        return getattr(importlib.import_module(f"flexkd.tracking.serving.{_SERVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
