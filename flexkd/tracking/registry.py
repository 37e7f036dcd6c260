"""The MLflow model registry: students registered as versions of ``flexkd-<task>``, and the aliases.

``champion`` is the best student so far, ``challenger`` the latest one that did not beat it (or could not be
compared with it: chosen on other validation data or by another metric). mlflow is imported inside the
functions, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping

from flexkd import resources
from flexkd.tracking.runs import truncate

CHAMPION = "champion"
CHALLENGER = "challenger"
_MAX_REGISTRY_TAG_VALUE = 5000  # registry allows more; a model card belongs in the description


def registered_name(task: str) -> str:
    """The registered model of a task's students: ``flexkd-<task>``."""
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
                    "task": task, "alias_reason": truncate(reason, _MAX_REGISTRY_TAG_VALUE)}
    version_tags.update({f"test_{k}": repr(float(v)) for k, v in (test_metrics or {}).items()})
    version_tags.update({str(k): truncate(str(v), _MAX_REGISTRY_TAG_VALUE) for k, v in (tags or {}).items()})
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
