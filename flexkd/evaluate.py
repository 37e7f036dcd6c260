"""Metrics and batched prediction."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "mcc")


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


@torch.no_grad()
def predict_logits(model, features: Sequence[dict], collate: Callable, batch_size: int) -> torch.Tensor:
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(features), batch_size):
        batch = collate(list(features[start : start + batch_size]))
        batch.pop("labels", None)
        chunks.append(model(**batch).logits.float())
    model.train(was_training)
    return torch.cat(chunks)


def evaluate_classifier(model, features: Sequence[dict], collate: Callable, batch_size: int = 128) -> dict[str, float]:
    logits = predict_logits(model, features, collate, batch_size)
    labels = [f["labels"] for f in features]
    return classification_metrics(labels, logits.argmax(-1).tolist())
