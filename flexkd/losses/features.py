"""Feature losses between student rows hs (N, d_S) and teacher rows ht (N, d_T): hidden states at the compared
positions (padding masked out), one row per position.

``flexkd_feature_loss`` (Flex-KD: the selected teacher units, k = d_S, unit to unit; ``FLEXKD_KINDS``),
``cka_loss`` (1 - linear CKA over all teacher units), ``projector_loss`` (MSE through a learned d_S -> d_T map).
Each needs a least number of rows (``*_MIN_ROWS``); with fewer the loss is 0, still connected to the graph.
Computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flexkd.errors import ConfigError

FLEXKD_KINDS = ("pearson", "barlow", "mse")
# The fewest rows each loss is defined on: standardising (Flex-KD) and centring (CKA) need two, an MSE one.
FLEXKD_MIN_ROWS = 2
CKA_MIN_ROWS = 2
PROJECTOR_MIN_ROWS = 1


def _standardise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Columns of x (N, d) to zero mean and unit (biased) variance; eps keeps constant columns finite."""
    x = x.float()
    centred = x - x.mean(dim=0, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(dim=0, keepdim=True) + eps)


def _no_feature_rows(hs: torch.Tensor) -> torch.Tensor:
    """0 connected to the graph (backward works and gives zero gradients) for a batch too small for a feature term.

    A one-row shard under DDP, or a batch whose response positions were all truncated, must not stop the run; the
    KD terms return 0 in the same case. The objective reports the skip (``feature/<name>_skipped``).
    """
    return hs.float().sum() * 0.0


def flexkd_feature_loss(
    hs: torch.Tensor,
    ht: torch.Tensor,
    kind: str = "pearson",
    lambda_off: float = 5e-3,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Flex-KD feature loss between student rows hs (N, d_S) and the selected teacher columns ht (N, d_S).

    Columns are standardised over the N rows; C = hs_hat^T ht_hat / N (d_S x d_S).
    ``pearson``: mean_i (1 - C_ii);
    ``barlow``: (1 / d_S) * [sum_i (1 - C_ii)^2 + lambda_off * sum_{i != j} C_ij^2], i.e. the Barlow Twins loss
    divided by d_S: the diagonal part is a mean over units like ``pearson`` (so the two are on the same scale
    under the same ``feature_weight``, about 1 at initialisation whatever d_S), and the off-diagonal sum is
    divided by the same d_S so that ``lambda_off`` keeps its Barlow Twins meaning relative to the diagonal;
    ``mse``: mean squared difference of the standardised columns. Invariant to per-unit scale and shift.
    Fewer than 2 rows cannot be standardised: the loss is then 0 (``_no_feature_rows``).
    """
    if hs.dim() != 2 or hs.shape != ht.shape:
        raise ConfigError(
            f"flexkd_feature_loss: student rows {tuple(hs.shape)} and selected teacher rows {tuple(ht.shape)} "
            "must both be (N, d_S) with the same shape (one teacher unit per student unit: k = d_S)"
        )
    if kind not in FLEXKD_KINDS:
        raise ConfigError(f"flexkd_feature_loss: unknown kind {kind!r}; valid kinds: {', '.join(FLEXKD_KINDS)}")
    n, d = hs.shape
    if n < FLEXKD_MIN_ROWS:
        return _no_feature_rows(hs)
    hs_hat = _standardise(hs, eps)
    ht_hat = _standardise(ht, eps)
    if kind == "mse":
        return (hs_hat - ht_hat).pow(2).mean()
    c = hs_hat.T @ ht_hat / n
    diag = torch.diagonal(c)
    if kind == "pearson":
        return (1.0 - diag).mean()
    off_diagonal = c.pow(2).sum() - diag.pow(2).sum()
    return (1.0 - diag).pow(2).mean() + lambda_off * off_diagonal / d


def cka_loss(hs: torch.Tensor, ht: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """1 - linear CKA between hs (N, d_S) and ht (N, d_T) (columns centred); d_S and d_T may differ.

    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F). Invariant to isotropic scale and orthogonal transforms.
    Fewer than 2 rows leave nothing once centred (N = 1 would give a constant 1, N = 0 NaN): the loss is then 0.
    """
    if hs.dim() != 2 or ht.dim() != 2 or hs.shape[0] != ht.shape[0]:
        raise ConfigError(
            f"cka_loss: student rows {tuple(hs.shape)} and teacher rows {tuple(ht.shape)} must be (N, d_S) and "
            "(N, d_T) with the same N"
        )
    if hs.shape[0] < CKA_MIN_ROWS:
        return _no_feature_rows(hs)
    x = hs.float() - hs.float().mean(dim=0, keepdim=True)
    y = ht.float() - ht.float().mean(dim=0, keepdim=True)
    # Normalise first so the fourth powers below stay in range (CKA is scale invariant).
    x = x / (x.norm() + eps)
    y = y / (y.norm() + eps)
    cross = (y.T @ x).pow(2).sum()
    self_x = (x.T @ x).norm()
    self_y = (y.T @ y).norm()
    return 1.0 - cross / (self_x * self_y + eps)


def projector_loss(projector: nn.Linear, hs: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
    """MSE(projector(hs), ht) over all teacher units: hs (N, d_S), ht (N, d_T), projector d_S -> d_T.

    One row is enough; N = 0 (a mean over nothing, NaN) gives 0 through the projector, so that its weight and bias
    get zero gradients rather than none (the all-reduce of the projector's gradients needs them on every rank).
    """
    if hs.dim() != 2 or ht.dim() != 2 or hs.shape[0] != ht.shape[0]:
        raise ConfigError(
            f"projector_loss: student rows {tuple(hs.shape)} and teacher rows {tuple(ht.shape)} must be "
            "(N, d_S) and (N, d_T) with the same N"
        )
    if hs.shape[1] != projector.in_features or ht.shape[1] != projector.out_features:
        raise ConfigError(
            f"projector_loss: projector maps {projector.in_features} -> {projector.out_features} units but "
            f"student rows are {tuple(hs.shape)} and teacher rows {tuple(ht.shape)}"
        )
    if hs.shape[0] < PROJECTOR_MIN_ROWS:
        return projector(hs.to(projector.weight.dtype)).float().sum() * 0.0
    return F.mse_loss(projector(hs.to(projector.weight.dtype)).float(), ht.float())
