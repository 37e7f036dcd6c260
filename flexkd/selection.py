"""Choosing among trained students, on the validation split only, and the comparison table that shows the choice.

The test split is reported and never used to choose: checkpoints are selected on validation during training
(``flexkd.train``), and the student that the register stage puts in the model registry is the one with the best
*validation* score that its distill run recorded (``flexkd_student.json`` -> ``validation``). Test metrics stand
beside it in the table and the model card, for the report.

The selection metric is the task's (``Task.selection_metric``): the primary metric for classification
(``evaluate.primary_metric``: accuracy, macro-F1 or MCC on the validation split) and ``neg_loss`` for generation
(minus the validation NLL of the response tokens, what the checkpoints were selected on; ROUGE-L would need
generation over the validation split).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

SELECTION_SPLIT = "validation"

INIT_NAMES = {"random": "random init", "prune": "pruned from the teacher", "path": "loaded from a checkpoint"}


@dataclass(frozen=True)
class Selection:
    """How a student was chosen: on which split, by which metric, the value, and the validation data's fingerprint."""

    key: str
    metric: str
    value: float
    validation_fingerprint: str
    split: str = SELECTION_SPLIT

    def as_tags(self) -> dict[str, str]:
        """Model-version tags that say how the version was chosen."""
        return {"selection_split": self.split, "selection_metric": self.metric, "selection_value": repr(float(self.value)),
                "validation_fingerprint": self.validation_fingerprint, "selected_student": self.key}


def validation_fingerprint(prepared_dir: str | os.PathLike) -> str:
    """sha256 over the prepared validation split (and the label map, which gives its labels their meaning).

    Two students' validation scores are comparable exactly when this fingerprint is the same."""
    prepared_dir = Path(prepared_dir)
    digest = hashlib.sha256()
    for name in ("validation.jsonl", "label_map.json"):
        path = prepared_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
        elif name == "validation.jsonl":
            from flexkd.errors import DataError

            raise DataError(f"{path}: prepared validation split not found (run the prepare stage)")
    return digest.hexdigest()


def best_by_validation(students: dict[str, dict], order: list[str], metric: str) -> str | None:
    """The key of the student with the highest ``validation[metric]``; ties go to the first in ``order``.

    ``students`` maps ``"<student>/<method>"`` to an entry with a ``validation`` dict (from the distill run).
    A student without that validation score is an error: it could not have been compared fairly."""
    from flexkd.errors import FlexKDError

    keys = [k for k in order if k in students]
    missing = [k for k in keys if metric not in (students[k].get("validation") or {})]
    if missing:
        raise FlexKDError(
            f"students {missing} have no validation {metric!r} recorded by their distill run, so the best student "
            "cannot be chosen on validation; rerun their distill stages (dvc repro does it)"
        )
    return max(keys, key=lambda k: students[k]["validation"][metric]) if keys else None


def _columns(evaluation: dict) -> tuple:
    if evaluation["primary_metric"] == "rougeL":
        columns = (("ROUGE-L", "rougeL"),)
        present = {k for m in evaluation["students"].values() for k in m}
        return columns + tuple(c for c in (("ROUGE-L std", "rougeL_std"), ("ROUGE-L greedy", "rougeL_greedy"),
                                           ("NLL", "nll"), ("perplexity", "perplexity")) if c[1] in present)
    return (("accuracy", "accuracy"), ("macro-F1", "macro_f1"), ("MCC", "mcc"))


def selection_label(metric: str) -> str:
    return {"neg_loss": "validation NLL", "macro_f1": "validation macro-F1", "mcc": "validation MCC"}.get(metric, f"validation {metric}")


def selection_value_text(metric: str, value: float | None) -> str:
    if value is None:
        return ""
    return f"{-value:.4f}" if metric == "neg_loss" else f"{value:.4f}"  # NLL reads better than its negation


def comparison_table(evaluation: dict, order: list[str] | None = None) -> str:
    """Markdown: the teacher, then one row per student (set-up and method): the validation score the choice is
    made on, then the test metrics (reported only); the validation pick in bold and marked."""
    columns = _columns(evaluation)
    students = evaluation["students"]
    order = order or list(students)
    selection = evaluation.get("selection") or {}
    metric = selection.get("metric", evaluation["primary_metric"])
    best = selection.get("best")
    lines = [
        f"# {evaluation['task']}: teacher and students",
        "",
        f"Chosen on the validation split ({evaluation.get('validation_rows', '?')} rows) by {selection_label(metric)}; "
        f"test split ({evaluation['test_rows']} rows) reported only, never used to choose.",
        "",
        f"| model | student | method | {selection_label(metric)} | " + " | ".join(f"test {name}" for name, _ in columns)
        + " | parameters | train time (s) |",
        "|---|---|---|---:|" + "---:|" * (len(columns) + 2),
    ]

    def cells(m):
        validation = selection_value_text(metric, (m.get("validation") or {}).get(metric))
        values = [f"{m[key]:.4f}" if key in m else "" for _, key in columns]
        return f"{validation} | " + " | ".join(values) + f" | {m['parameters']:,} | {m.get('train_seconds', 0):.0f} |"

    teacher = evaluation["teacher"]
    lines.append(f"| teacher | {'fine-tuned' if teacher.get('finetuned') else 'as given'} | - | " + cells(teacher))
    for key in order:
        m = students[key]
        bold = (lambda x: f"**{x}**") if key == best else (lambda x: x)
        init = INIT_NAMES.get(m.get("init", ""), m.get("init", ""))
        mark = " (chosen)" if key == best else ""
        lines.append(f"| {bold('student')}{mark} | {bold(m['student'])}: {init} | {bold(m['method'])} | " + cells(m))
    lines += ["", f"Chosen on validation: {best or 'none'}. Test metrics are for the report only."]
    if evaluation.get("warnings"):
        lines += [""] + [f"> WARNING: {w}" for w in evaluation["warnings"]]
    return "\n".join(lines) + "\n"
