"""The model card of a registered student: Markdown, the model version's description and ``model_card.md``.

:func:`model_card` puts the card together from its sections (intended use, teacher, student, data, method,
metrics, selected teacher units, how to load), each built by its own helper below.
"""

from __future__ import annotations

from typing import Any, Mapping

from flexkd.errors import FlexKDError
from flexkd.tracking.registry import registered_name

_TASK_FORMATS = ("classification", "instruction", "summarization")
_USE = {
    "classification": "Text classification",
    "instruction": "Instruction following (text generation)",
    "summarization": "Summarization (text generation)",
}
_METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "mcc": "MCC", "rougeL": "ROUGE-L",
                 "rougeL_std": "ROUGE-L std", "rougeL_greedy": "ROUGE-L greedy", "loss": "NLL", "neg_loss": "-NLL",
                 "nll": "NLL (teacher-forced)", "perplexity": "perplexity"}


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
    (a generation student: a note on ROUGE-L and NLL above the metrics, loading with ``AutoModelForCausalLM``,
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
        *_title_and_use(name, task, task_format, method),
        *_models_and_data(teacher, student, data),
        *_method_section(method, loss_weights),
        *_metrics_section(metrics, selection_note, generation),
        *_units_section(selected_units, relevance),
        *_loading_section(name, generation),
    ]
    return "\n".join(lines)


def _title_and_use(name: str, task: str, task_format: str, method: str) -> list[str]:
    """The title and what the student is for."""
    return [
        f"# {name}: Flex-KD student for `{task}`",
        "",
        "## Intended use",
        f"{_USE[task_format]} for the task `{task}`: a small student distilled from a fine-tuned teacher with "
        f"the `{method}` method. Use it where the teacher is too large or slow; check the metrics below on "
        "data like yours first. Not evaluated outside the data described here.",
        "",
    ]


def _models_and_data(teacher: Mapping[str, Any], student: Mapping[str, Any], data: Mapping[str, Any]) -> list[str]:
    """The Teacher, Student and Data sections: bullet lists, known keys first."""
    return [
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
    ]


def _method_section(method: str, loss_weights: Mapping[str, float] | None) -> list[str]:
    """The Method section: the method and its loss weights, if any."""
    lines = ["## Method", f"- **Method**: `{method}`"]
    if loss_weights:
        lines.append(f"- **Loss weights**: {_fmt(loss_weights)}")
    return lines + [""]


def _metrics_section(metrics: Mapping[str, Any], selection_note: str | None, generation: bool) -> list[str]:
    """The Metrics section: how the student was chosen, what the generation metrics mean, one line per split."""
    lines = ["## Metrics", ""]
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
    return lines + [""]


def _units_section(selected_units: list[int] | None, relevance: Mapping[str, Any] | None) -> list[str]:
    """The Selected teacher units section: how many, which (as ranges), and the relevance index they came from."""
    lines = ["## Selected teacher units"]
    if selected_units:
        lines.append(f"- **Count**: {len(selected_units)}")
        lines.append(f"- **Units**: {_compact_ranges(list(selected_units))}")
    else:
        lines.append("- none (this method does not select teacher units)")
    if relevance:
        lines += _kv_lines(relevance, [("path", "Relevance index"), ("hash", "Index hash")])
    return lines + [""]


def _loading_section(name: str, generation: bool) -> list[str]:
    """The How to load section: the champion as a pyfunc model, or its checkpoint with plain transformers."""
    pyfunc_call = (
        'model.predict(pd.DataFrame({"prompt": ["an example"]}))  # -> column text; '
        'params={"max_new_tokens": n} to change the length'
        if generation
        else 'model.predict(pd.DataFrame({"text": ["an example"]}))  # -> columns label, score'
    )
    auto_class = "AutoModelForCausalLM" if generation else "AutoModelForSequenceClassification"
    lines = [
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
    return lines + [""]


# ------------------------------------------------------------------------------------------ formatting
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


def _fmt(value: Any) -> str:
    """A value as the card shows it: floats to 4 places, ints with thousands separators, lists and dicts inline."""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def _metric_name(key: str) -> str:
    """A metric's readable name (``macro_f1`` -> ``macro-F1``); unknown keys as they are."""
    return _METRIC_NAMES.get(str(key), str(key))


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
