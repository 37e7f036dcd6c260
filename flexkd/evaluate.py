"""Metrics and batched prediction."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "mcc")
# generation: ROUGE-L of generated responses, and the teacher-forced NLL (per response token) with its perplexity,
# which shows partial learning where greedy ROUGE-L of a weak student is still near zero
GENERATION_METRICS = ("rougeL", "rougeL_std", "rougeL_greedy", "nll", "perplexity")
TEST_METRICS = CLASSIFICATION_METRICS + GENERATION_METRICS  # what the evaluate stage reports on the test split


def classification_metrics(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """Accuracy, macro-F1 and Matthews correlation (all in [0, 1] except MCC in [-1, 1])."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.shape != predictions.shape or labels.size == 0:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} must be the same non-empty shape")
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, predictions)),
    }


def classifier_quality(labels: Sequence[int], predictions: Sequence[int], names: dict[int, str], *,
                       min_gain_over_majority: float, min_class_recall: float) -> dict:
    """What a teacher's validation predictions say about it, before any student learns from it: its accuracy
    against always answering the majority class, and each class's recall. ``problems`` names what fails, in words."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    classes = sorted(names)
    counts = {c: int((labels == c).sum()) for c in classes}
    majority = max(classes, key=lambda c: counts[c])
    majority_rate = counts[majority] / max(len(labels), 1)
    accuracy = float((labels == predictions).mean()) if len(labels) else 0.0
    recall = {names[c]: (float((predictions[labels == c] == c).mean()) if counts[c] else None) for c in classes}
    problems = []
    if accuracy < majority_rate + min_gain_over_majority:
        problems.append(f"validation accuracy {accuracy:.4f} does not beat always answering the majority class "
                        f"{names[majority]!r} ({majority_rate:.4f}) by {min_gain_over_majority:.2f}")
    low = {n: r for n, r in recall.items() if r is not None and r < min_class_recall}
    if low:
        problems.append("it rarely or never predicts " + ", ".join(f"{n!r} (recall {r:.2f})" for n, r in low.items())
                        + f" (teacher.quality.min_class_recall {min_class_recall:.2f})")
    return {"accuracy": accuracy, "majority_class": names[majority], "majority_rate": majority_rate,
            "recall": recall, "problems": problems}


def generator_quality(base_loss: float | None, tuned_loss: float) -> dict:
    """A tuned generator must lower the validation NLL of the model it started from (``base_loss``: None when
    the teacher was not fine-tuned, nothing to compare)."""
    problems = []
    if base_loss is not None and not tuned_loss < base_loss:
        problems.append(f"fine-tuning did not lower the validation NLL ({base_loss:.4f} before, {tuned_loss:.4f} after)")
    return {"base_loss": base_loss, "loss": tuned_loss, "problems": problems}


@torch.no_grad()
def predict_logits(model, features: Sequence[dict], collate: Callable, batch_size: int, runtime=None) -> torch.Tensor:
    """Logits of every row, in the rows' order. Batches hold rows of similar length (less padding) and go to
    ``runtime``'s device under its autocast (default: the model's device, no autocast)."""
    from flexkd.runtime import Runtime
    from flexkd.tasks import length_sorted_batches

    runtime = runtime or Runtime(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    out: torch.Tensor | None = None
    for ids in length_sorted_batches(features, batch_size):
        batch = collate([features[i] for i in ids])
        batch.pop("labels", None)
        with runtime.autocast():
            logits = model(**runtime.to_device(batch)).logits.float().cpu()
        if out is None:
            out = torch.empty((len(features), *logits.shape[1:]), dtype=torch.float32)
        out[torch.tensor(ids)] = logits
    model.train(was_training)
    if out is None:
        raise ValueError("predict_logits: no rows")
    return out


def evaluate_classifier(model, features: Sequence[dict], collate: Callable, batch_size: int = 128,
                        runtime=None) -> dict[str, float]:
    logits = predict_logits(model, features, collate, batch_size, runtime=runtime)
    labels = [f["labels"] for f in features]
    return classification_metrics(labels, logits.argmax(-1).tolist())
