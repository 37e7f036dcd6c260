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
