"""The task losses and the positions they are computed over.

``task_ce``: classification logits (B, C) against integer labels. ``response_nll``: causal-LM logits (B, T, V)
against labels (B, T) where -100 (``IGNORE_INDEX``) marks tokens that carry no loss (prompt, padding).
``response_mask`` and ``masked_rows`` pick the positions token-level and feature losses compare.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexkd.errors import ConfigError

IGNORE_INDEX = -100


def masked_rows(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows of ``hidden`` (B, T, d) at the positions where ``mask`` (B, T) is true, as an (N, d) matrix."""
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ConfigError(
            f"masked_rows: hidden must be (B, T, d) and mask (B, T); got hidden {tuple(hidden.shape)} "
            f"and mask {tuple(mask.shape)}"
        )
    return hidden[mask.bool()]


def task_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of classification logits (B, C) against integer labels (B,)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ConfigError(
            f"task_ce: logits must be (B, C) and labels (B,); got logits {tuple(logits.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    return F.cross_entropy(logits.float(), labels.long())


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions t whose *next* token is a response token (labels[:, t+1] != -100).

    These are the positions whose logits predict the response: the rows of token-level losses (NLL, KD).
    """
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over response tokens: logits[:, :-1] predict labels[:, 1:]; -100 is ignored.

    A batch with no response token gives 0 (still connected to the graph), not NaN.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ConfigError(
            f"response_nll: logits must be (B, T, V) and labels (B, T); got logits {tuple(logits.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:].long()
    if not bool((shifted_labels != IGNORE_INDEX).any()):
        return shifted_logits.sum() * 0.0
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
