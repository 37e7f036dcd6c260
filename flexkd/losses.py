"""Loss terms for teacher fine-tuning and distillation, and the objective that composes them.

Every term is a small pure function (tested with golden values) wrapped in a registered ``LossTerm`` whose
name is the one ``params.yaml`` uses (``LOSS_TERMS``). ``build_objective`` composes them per method:

    L = (1 - alpha) * L_task + alpha * tau^2 * KD(tau) + beta * L_feat          (docs/METHOD.md, stage 4)

Logit terms (``LOGIT_LOSSES``, the ``kind`` of the ``kd`` term): ``forward_kl`` (Hinton), ``reverse_kl``
(MiniLLM-style, token level), ``jsd`` (GKD's generalised JSD), ``skew_forward_kl`` / ``skew_reverse_kl``
(DistiLLM). All take temperature tau on both sides and are *not* multiplied by tau^2 (the objective does that).
Teacher and student must share the tokenizer; ``align_vocab`` truncates logits that differ only by padding rows.

Shapes: classification logits are (B, C); causal-LM logits are (B, T, V) with labels (B, T) where -100 marks
tokens that carry no loss (prompt, padding). Hidden states are (B, T, d). Losses are computed in float32
whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from flexkd.errors import ConfigError

IGNORE_INDEX = -100
METHODS = ("ft", "kd", "projector", "cka", "flexkd")
FLEXKD_KINDS = ("pearson", "barlow", "mse")


# --------------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------------


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


def _kd_log_probs(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Validated float32 log-softmax rows (N, V) of student and teacher at temperature tau; None if N = 0."""
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"{name}: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape (teacher and student must share the vocabulary "
            "or label set)"
        )
    if not temperature > 0:
        raise ConfigError(f"{name}: temperature must be > 0, got {temperature}")
    s = student_logits.float()
    t = teacher_logits.float()
    if mask is not None:
        if s.dim() != 3 or mask.shape != s.shape[:2]:
            raise ConfigError(
                f"{name}: a mask needs (B, T, V) logits and a (B, T) mask; got logits {tuple(s.shape)} "
                f"and mask {tuple(mask.shape)}"
            )
        s, t = s[mask.bool()], t[mask.bool()]
    s = s.reshape(-1, s.shape[-1])
    t = t.reshape(-1, t.shape[-1])
    if s.shape[0] == 0:
        return None
    return F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) from log-probabilities (N, V) -> (N,)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight * p + (1 - weight) * q) from log-probabilities, with logsumexp (exact at weight 0 and 1)."""
    if weight == 0.0:
        return log_q
    if weight == 1.0:
        return log_p
    return torch.logsumexp(torch.stack([log_p + math.log(weight), log_q + math.log(1.0 - weight)]), dim=0)


def _kl_to_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-row KL(p || weight * p + (1 - weight) * q)."""
    return _kl(log_p, _log_mixture(log_p, log_q, weight))


def _check_unit_interval(name: str, key: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}: {key} must be in [0, 1], got {value}")
    return float(value)


def _empty(student_logits: torch.Tensor) -> torch.Tensor:
    return student_logits.float().sum() * 0.0


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p_T^tau || p_S^tau), mean over rows. Not multiplied by tau^2 (the objective does that).

    Rows: the batch for (B, C) logits; for (B, T, V) logits the positions where ``mask`` (B, T) is true
    (all positions when ``mask`` is None). No row selected gives 0.
    """
    rows = _kd_log_probs("forward_kl", student_logits, teacher_logits, temperature, mask)
    if rows is None:
        return _empty(student_logits)
    log_p_s, log_p_t = rows
    return _kl(log_p_t, log_p_s).mean()


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p_S^tau || p_T^tau), mean over rows (MiniLLM-style objective at token level; mode seeking).

    Rows and masking as in ``forward_kl``; not multiplied by tau^2. No row selected gives 0.
    """
    rows = _kd_log_probs("reverse_kl", student_logits, teacher_logits, temperature, mask)
    if rows is None:
        return _empty(student_logits)
    log_p_s, log_p_t = rows
    return _kl(log_p_s, log_p_t).mean()


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
    beta: float = 0.5,
) -> torch.Tensor:
    """GKD's generalised Jensen-Shannon divergence, mean over rows (Agarwal et al. 2024; TRL GKDTrainer).

    Convention of TRL's ``GKDTrainer.generalized_jsd_loss`` (trl/experimental/gkd/gkd_trainer.py), endpoints
    included::

        beta = 0:      KL(p_T || p_S)                                   (forward KL, = ``forward_kl``)
        beta = 1:      KL(p_S || p_T)                                   (reverse KL, = ``reverse_kl``)
        0 < beta < 1:  m = beta * p_T + (1 - beta) * p_S
                       JSD_beta = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)

    with p_T, p_S at temperature tau and m formed in log space (logsumexp). beta = 0.5 is the symmetric JSD.
    The endpoints are special cases because the mixture formula itself vanishes there (m becomes p_S or p_T),
    which would silently turn the KD term off. Beware that the value is therefore *not* continuous at the
    endpoints: for small beta, JSD_beta ~ beta * KL(p_T || p_S), and near 1, JSD_beta ~ (1 - beta) *
    KL(p_S || p_T), so the endpoints are the limits of JSD_beta / beta and JSD_beta / (1 - beta) (the sense
    in which GKD calls them forward and reverse KL), and moving beta from 1e-3 to 0 scales the term by ~1000.
    Rows and masking as in ``forward_kl``; not multiplied by tau^2.
    """
    beta = _check_unit_interval("jsd", "beta", beta)
    rows = _kd_log_probs("jsd", student_logits, teacher_logits, temperature, mask)
    if rows is None:
        return _empty(student_logits)
    log_p_s, log_p_t = rows
    if beta == 0.0:
        return _kl(log_p_t, log_p_s).mean()
    if beta == 1.0:
        return _kl(log_p_s, log_p_t).mean()
    # KL(p || m) = -sum p (log m - log p), with log m - log p formed directly rather than as a difference of two
    # logs: near an endpoint m is almost p_S (or p_T) and the difference would lose float32's digits.
    log_ratio = log_p_t - log_p_s
    log_m_over_s = torch.logaddexp(log_ratio + math.log(beta), log_ratio.new_tensor(math.log1p(-beta)))
    log_m_over_t = torch.logaddexp(math.log1p(-beta) - log_ratio, log_ratio.new_tensor(math.log(beta)))
    kl_t = -(log_p_t.exp() * log_m_over_t).sum(-1)
    kl_s = -(log_p_s.exp() * log_m_over_s).sum(-1)
    return (beta * kl_t + (1.0 - beta) * kl_s).mean()


def skew_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
    alpha: float = 0.1,
) -> torch.Tensor:
    """DistiLLM's skew forward KL: KL(p_T || alpha * p_T + (1 - alpha) * p_S), mean over rows.

    alpha = 0 gives ``forward_kl``. Mixture formed in log space; not multiplied by tau^2.
    """
    alpha = _check_unit_interval("skew_forward_kl", "alpha", alpha)
    rows = _kd_log_probs("skew_forward_kl", student_logits, teacher_logits, temperature, mask)
    if rows is None:
        return _empty(student_logits)
    log_p_s, log_p_t = rows
    return _kl_to_mixture(log_p_t, log_p_s, alpha).mean()


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
    alpha: float = 0.1,
) -> torch.Tensor:
    """DistiLLM's skew reverse KL: KL(p_S || alpha * p_S + (1 - alpha) * p_T), mean over rows.

    alpha = 0 gives ``reverse_kl``. Mixture formed in log space; not multiplied by tau^2.
    """
    alpha = _check_unit_interval("skew_reverse_kl", "alpha", alpha)
    rows = _kd_log_probs("skew_reverse_kl", student_logits, teacher_logits, temperature, mask)
    if rows is None:
        return _empty(student_logits)
    log_p_s, log_p_t = rows
    return _kl_to_mixture(log_p_s, log_p_t, alpha).mean()


LOGIT_LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")


def align_vocab(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    student_vocab: int | None = None,
    teacher_vocab: int | None = None,
    shared_vocab: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate student and teacher logits (..., V) to the shared vocabulary; refuse any other mismatch.

    Teacher and student must share the tokenizer; their logit widths may differ only by padding rows
    (embedding matrices padded to a multiple of 8, 64, ...). The shared size is ``shared_vocab`` (the
    tokenizer's real vocabulary, ``len(tokenizer)``) when given, else the common value of ``student_vocab`` /
    ``teacher_vocab`` (each model's real vocabulary) when given, else the smaller width. ConfigError when
    the leading dims differ, when ``student_vocab`` and ``teacher_vocab`` differ (different vocabularies,
    not padding), or when the shared size exceeds either width. Returns views (gradients flow).
    """
    s_width, t_width = int(student_logits.shape[-1]), int(teacher_logits.shape[-1])
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ConfigError(
            f"align_vocab: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in leading dims (only the vocabulary width may differ)"
        )
    if student_vocab is not None and teacher_vocab is not None and int(student_vocab) != int(teacher_vocab):
        raise ConfigError(
            f"align_vocab: student vocabulary ({student_vocab}) and teacher vocabulary ({teacher_vocab}) differ; "
            "teacher and student must share the tokenizer (logit widths may differ only by padding rows)"
        )
    for who, vocab, width in (("student", student_vocab, s_width), ("teacher", teacher_vocab, t_width)):
        if vocab is not None and not 1 <= int(vocab) <= width:
            raise ConfigError(
                f"align_vocab: {who} vocabulary size {vocab} does not fit its logit width {width} "
                f"(student width {s_width}, teacher width {t_width})"
            )
    if shared_vocab is not None:
        shared = int(shared_vocab)
        for who, vocab in (("student", student_vocab), ("teacher", teacher_vocab)):
            if vocab is not None and int(vocab) != shared:
                raise ConfigError(
                    f"align_vocab: shared vocabulary {shared} differs from the {who} vocabulary {vocab}"
                )
    elif student_vocab is not None or teacher_vocab is not None:
        shared = int(student_vocab if student_vocab is not None else teacher_vocab)
    else:
        shared = min(s_width, t_width)
    if not 1 <= shared <= min(s_width, t_width):
        raise ConfigError(
            f"align_vocab: shared vocabulary size {shared} does not fit the logits: student width {s_width}, "
            f"teacher width {t_width} (widths may exceed the shared vocabulary only by padding rows; "
            "teacher and student must share the tokenizer)"
        )
    if s_width == shared and t_width == shared:
        return student_logits, teacher_logits
    return student_logits[..., :shared], teacher_logits[..., :shared]


def sparse_teacher_parts(
    teacher_logits: torch.Tensor, top_k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's k largest logits (..., k), their token ids (..., k) and one tail logit (...,).

    The tail logit f is chosen so that the V - k other tokens, each given logit f, carry at temperature tau
    exactly the probability mass they carry in the full distribution: (V - k) exp(f / tau) = sum exp(z_j / tau)
    over those tokens. ``densify_teacher_logits`` turns the parts back into (..., V) logits whose tempered
    softmax equals the teacher's on the top k tokens and spreads the rest evenly. This is what the teacher
    cache stores for generation (k + k + 1 numbers per position instead of V).
    """
    if top_k < 1:
        raise ConfigError(f"distill.teacher_top_k must be >= 1, got {top_k}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    z = teacher_logits.float() / temperature
    vocab = z.shape[-1]
    k = min(int(top_k), vocab)
    values, indices = z.topk(k, dim=-1)
    if k == vocab:
        return values * temperature, indices, torch.full(z.shape[:-1], float("-inf"), device=z.device)
    lse_all = torch.logsumexp(z, dim=-1)
    lse_top = torch.logsumexp(values, dim=-1)
    # log of the tail mass's share of the normaliser, kept finite when the top k hold (almost) all the mass
    tail_share = torch.clamp(-torch.expm1(lse_top - lse_all), min=1e-30)
    lse_rest = lse_all + torch.log(tail_share)
    fill = (lse_rest - math.log(vocab - k)) * temperature
    return values * temperature, indices, fill


def densify_teacher_logits(values: torch.Tensor, indices: torch.Tensor, fill: torch.Tensor, vocab: int) -> torch.Tensor:
    """(..., vocab) logits: ``values`` at ``indices``, ``fill`` everywhere else (see ``sparse_teacher_parts``)."""
    dense = fill.float().unsqueeze(-1).expand(*fill.shape, int(vocab)).clone()
    return dense.scatter_(-1, indices.long(), values.float())


def sparsify_teacher_logits(teacher_logits: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """The teacher's (..., V) logits reduced to their top k plus an evenly spread tail (same shape)."""
    values, indices, fill = sparse_teacher_parts(teacher_logits, top_k, temperature)
    return densify_teacher_logits(values, indices, fill, teacher_logits.shape[-1])


def check_vocab_compatible(teacher_tokenizer, student_tokenizer) -> int:
    """Refuse (ConfigError) tokenizers whose vocabularies differ; return the shared size ``len(tokenizer)``.

    Compares ``len()`` and the full ``get_vocab()`` token -> id maps (added tokens included); the message
    names both sizes and a few differing tokens.
    """
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    t_len, s_len = len(teacher_tokenizer), len(student_tokenizer)
    if t_len == s_len and t_vocab == s_vocab:
        return t_len
    differing = sorted(
        token for token in set(t_vocab) | set(s_vocab) if t_vocab.get(token) != s_vocab.get(token)
    )
    sample = ", ".join(
        f"{token!r}: teacher {t_vocab.get(token)} / student {s_vocab.get(token)}" for token in differing[:5]
    )
    raise ConfigError(
        f"teacher and student tokenizers differ: teacher vocabulary {t_len} tokens, student vocabulary "
        f"{s_len} tokens, {len(differing)} tokens map to different ids (e.g. {sample or 'none'}); logit "
        "distillation needs a shared tokenizer"
    )


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
    if n < FlexKDLoss.min_rows:
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
    if hs.shape[0] < CKALoss.min_rows:
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
    if hs.shape[0] < ProjectorLoss.min_rows:
        return projector(hs.to(projector.weight.dtype)).float().sum() * 0.0
    return F.mse_loss(projector(hs.to(projector.weight.dtype)).float(), ht.float())


# --------------------------------------------------------------------------------------------------------------
# Registered terms (names as in params.yaml)
# --------------------------------------------------------------------------------------------------------------


class LossTerm(nn.Module):
    """A named loss term. Flags say which teacher outputs it needs. Returns the term unweighted."""

    name: ClassVar[str]
    needs_teacher_logits: ClassVar[bool] = False
    needs_teacher_hidden: ClassVar[bool] = False


class TaskLoss(LossTerm):
    """``ce``: cross-entropy on labels (B, C) logits, or next-token NLL on response tokens for (B, T, V)."""

    name = "ce"

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if student_logits.dim() == 3:
            return response_nll(student_logits, labels)
        return task_ce(student_logits, labels)


class LogitKD(LossTerm):
    """``kd``: a logit divergence at temperature tau; token-level over response positions for (B, T, V).

    ``kind``: ``forward_kl`` (Hinton, default), ``reverse_kl``, ``jsd`` (GKD, weight ``beta``; 0 is forward KL
    and 1 reverse KL, as in TRL: see ``generalized_jsd``),
    ``skew_forward_kl`` / ``skew_reverse_kl`` (DistiLLM, skew ``skew_alpha``). Logits are first passed
    through ``align_vocab`` (``shared_vocab``: the tokenizer's ``len()``, else the smaller width).
    """

    name = "kd"
    needs_teacher_logits = True

    def __init__(
        self,
        temperature: float = 2.0,
        kind: str = "forward_kl",
        beta: float = 0.5,
        skew_alpha: float = 0.1,
        shared_vocab: int | None = None,
        top_k: int | None = None,
    ):
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"kd: temperature must be > 0, got {temperature}")
        if top_k is not None and int(top_k) < 1:
            raise ConfigError(f"kd: distill.teacher_top_k must be >= 1, got {top_k}")
        self.top_k = None if top_k is None else int(top_k)
        if kind not in LOGIT_LOSSES:
            raise ConfigError(f"kd: unknown logit loss {kind!r}; valid names: {', '.join(LOGIT_LOSSES)}")
        self.temperature = float(temperature)
        self.kind = kind
        self.beta = _check_unit_interval("kd", "jsd beta", beta)
        self.skew_alpha = _check_unit_interval("kd", "skew alpha", skew_alpha)
        if shared_vocab is not None and int(shared_vocab) < 1:
            raise ConfigError(f"kd: shared_vocab must be >= 1, got {shared_vocab}")
        self.shared_vocab = None if shared_vocab is None else int(shared_vocab)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, temperature={self.temperature}, beta={self.beta}, skew_alpha={self.skew_alpha}, "
            f"shared_vocab={self.shared_vocab}, top_k={self.top_k}"
        )

    def forward(self, student_logits, teacher_logits, labels) -> torch.Tensor:
        student_logits, teacher_logits = align_vocab(
            student_logits, teacher_logits, shared_vocab=self.shared_vocab
        )
        mask = response_mask(labels) if student_logits.dim() == 3 else None
        tau = self.temperature
        if self.top_k is not None and teacher_logits.dim() == 3:
            # Generation: the target is the teacher's top k tokens with the rest of its mass spread evenly
            # (what the teacher cache stores); idempotent, so cached (already sparse) logits pass unchanged.
            teacher_logits = sparsify_teacher_logits(teacher_logits, self.top_k, tau)
        if self.kind == "forward_kl":
            return forward_kl(student_logits, teacher_logits, tau, mask)
        if self.kind == "reverse_kl":
            return reverse_kl(student_logits, teacher_logits, tau, mask)
        if self.kind == "jsd":
            return generalized_jsd(student_logits, teacher_logits, tau, mask, beta=self.beta)
        if self.kind == "skew_forward_kl":
            return skew_forward_kl(student_logits, teacher_logits, tau, mask, alpha=self.skew_alpha)
        return skew_reverse_kl(student_logits, teacher_logits, tau, mask, alpha=self.skew_alpha)


class FeatureTerm(LossTerm):
    """A feature term: forward(hs (N, d_S), ht (N, d_T)) -> scalar.

    ``min_rows``: the fewest feature positions N the term is defined on; below it the term is 0 (still in the
    graph) and the objective reports it as skipped.
    """

    needs_teacher_hidden = True
    min_rows: ClassVar[int] = 2


class ProjectorLoss(FeatureTerm):
    """``projector``: learned nn.Linear(d_S, d_T) with bias, MSE over all teacher units; discarded after training."""

    name = "projector"
    min_rows = 1

    def __init__(self, student_hidden: int, teacher_hidden: int):
        super().__init__()
        self.projector = nn.Linear(student_hidden, teacher_hidden, bias=True)

    def forward(self, hs, ht) -> torch.Tensor:
        return projector_loss(self.projector, hs, ht)


class CKALoss(FeatureTerm):
    """``cka``: 1 - linear CKA over all teacher units (parameter-free)."""

    name = "cka"

    def forward(self, hs, ht) -> torch.Tensor:
        return cka_loss(hs, ht)


class FlexKDLoss(FeatureTerm):
    """``flexkd``: student unit i against teacher unit selected_units[i]; no parameters."""

    name = "flexkd"

    def __init__(self, selected_units: torch.Tensor, kind: str = "pearson", lambda_off: float = 5e-3):
        super().__init__()
        if kind not in FLEXKD_KINDS:
            raise ConfigError(f"flexkd: unknown kind {kind!r}; valid kinds: {', '.join(FLEXKD_KINDS)}")
        self.kind = kind
        self.lambda_off = float(lambda_off)
        # A buffer, not a parameter: moves with .to(device), never trained, not saved in state dicts.
        self.register_buffer("selected_units", torch.as_tensor(selected_units, dtype=torch.long), persistent=False)

    def forward(self, hs, ht) -> torch.Tensor:
        return flexkd_feature_loss(hs, ht[:, self.selected_units], kind=self.kind, lambda_off=self.lambda_off)


LOSS_TERMS: dict[str, type[LossTerm]] = {
    term.name: term for term in (TaskLoss, LogitKD, ProjectorLoss, CKALoss, FlexKDLoss)
}


def get_loss_term(name: str) -> type[LossTerm]:
    """The registered loss-term class called ``name``; ConfigError listing the valid names otherwise."""
    try:
        return LOSS_TERMS[name]
    except KeyError:
        raise ConfigError(f"unknown loss term {name!r}; valid names: {', '.join(LOSS_TERMS)}") from None


# --------------------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------------------


def _check_selected_units(selected_units, student_hidden: int, teacher_hidden: int) -> torch.Tensor:
    if selected_units is None:
        raise ConfigError(
            "method 'flexkd' needs selected_units from the relevance stage (a relevance index with "
            f"k = d_S = {student_hidden}); none given"
        )
    units = torch.as_tensor(selected_units)
    if units.dim() != 1 or units.is_floating_point() or units.is_complex():
        raise ConfigError(
            f"relevance: selected_units must be a 1-D integer tensor, got dtype {units.dtype} shape {tuple(units.shape)}"
        )
    units = units.long()
    if units.numel() != student_hidden:
        raise ConfigError(
            f"relevance: the index selects k={units.numel()} teacher units but the student hidden size is "
            f"d_S={student_hidden}; Flex-KD needs k = d_S (rerun the relevance stage with k={student_hidden})"
        )
    if units.numel() and (int(units.min()) < 0 or int(units.max()) >= teacher_hidden):
        raise ConfigError(
            f"relevance: selected units must lie in [0, d_T={teacher_hidden}); got min {int(units.min())}, "
            f"max {int(units.max())} (index built for another teacher?)"
        )
    if units.unique().numel() != units.numel():
        raise ConfigError("relevance: selected_units contains repeated teacher units")
    return units


class DistillObjective(nn.Module):
    """L = (1 - alpha) * L_task + alpha * tau^2 * KD(tau) + beta * L_feat for one method.

    Holds the registered terms; for ``projector`` it owns the nn.Linear, so pass ``objective.parameters()`` to
    the optimizer alongside the student's. ``forward`` returns ``(total, terms)``; ``terms`` holds every term
    unweighted and detached (keys ``task``, ``kd``, ``feature/<name>``, ``total``) for logging. Feature methods
    add ``feature/<name>_skipped``: 1.0 when the batch had fewer feature positions than the term needs
    (``FeatureTerm.min_rows``; e.g. a one-row shard under DDP), so that the term contributed 0, else 0.0. The key
    is there on every step so that every rank all-reduces the same keys; averaged over ranks it reads as the
    share of the global batch whose term was skipped.
    """

    def __init__(
        self,
        method: str,
        task_term: TaskLoss,
        kd_term: LogitKD | None,
        feature_term: FeatureTerm | None,
        *,
        alpha: float,
        temperature: float,
        feature_weight: float,
        student_hidden: int,
        teacher_hidden: int,
        layer_pairs: list[tuple[int, int]] | None = None,
    ):
        super().__init__()
        self.method = method
        # (student, teacher) indices into the models' hidden_states tuples whose states the feature term compares
        # (averaged over the pairs); None: the last hidden states only
        self.layer_pairs = [(int(a), int(b)) for a, b in layer_pairs] if layer_pairs else None
        self.task_term = task_term
        self.kd_term = kd_term
        self.feature_term = feature_term
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.feature_weight = float(feature_weight)
        self.student_hidden = int(student_hidden)
        self.teacher_hidden = int(teacher_hidden)

    @property
    def needs_teacher(self) -> bool:
        return self.kd_term is not None or self.feature_term is not None

    @property
    def needs_teacher_hidden(self) -> bool:
        return self.feature_term is not None

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, alpha={self.alpha}, temperature={self.temperature}, "
            f"feature_weight={self.feature_weight}"
        )

    def forward(
        self,
        *,
        student_logits: torch.Tensor,
        labels: torch.Tensor,
        student_hidden: torch.Tensor | None = None,
        feature_mask: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        teacher_hidden: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # The loss is formed in float32 whatever precision the forward passes ran in (autocast off; bf16 or fp16
        # logits and hidden states upcast): softmaxes, KL, correlations and their sums lose too much in 16 bits.
        def full(t):
            if isinstance(t, (list, tuple)):
                return [full(x) for x in t]
            return t.float() if t is not None and t.is_floating_point() else t

        with torch.autocast(device_type=student_logits.device.type, enabled=False):
            return self._forward(student_logits=full(student_logits), labels=labels, student_hidden=full(student_hidden),
                                 feature_mask=feature_mask, teacher_logits=full(teacher_logits),
                                 teacher_hidden=full(teacher_hidden))

    def _forward(self, *, student_logits, labels, student_hidden, feature_mask, teacher_logits, teacher_hidden):
        terms: dict[str, torch.Tensor] = {}
        task = self.task_term(student_logits, labels)
        terms["task"] = task
        if self.kd_term is None:
            total = task
        else:
            if teacher_logits is None:
                raise ConfigError(f"method {self.method!r} needs teacher_logits; none given")
            kd = self.kd_term(student_logits, teacher_logits.detach(), labels)
            terms["kd"] = kd
            total = (1.0 - self.alpha) * task + self.alpha * self.temperature**2 * kd
        if self.feature_term is not None:
            if student_hidden is None or teacher_hidden is None or feature_mask is None:
                raise ConfigError(
                    f"method {self.method!r} needs student_hidden, teacher_hidden and feature_mask; got "
                    f"student_hidden={'set' if student_hidden is not None else None}, "
                    f"teacher_hidden={'set' if teacher_hidden is not None else None}, "
                    f"feature_mask={'set' if feature_mask is not None else None}"
                )
            pairs = (list(zip(student_hidden, teacher_hidden)) if isinstance(student_hidden, (list, tuple))
                     else [(student_hidden, teacher_hidden)])  # several: matched layers, averaged
            features, skipped = [], False
            for sh, th in pairs:
                feature, rows = self._feature(sh, th, feature_mask)
                features.append(feature)
                skipped = skipped or rows < self.feature_term.min_rows
            feature = torch.stack(features).mean()
            terms[f"feature/{self.feature_term.name}"] = feature
            terms[f"feature/{self.feature_term.name}_skipped"] = torch.tensor(float(skipped), device=feature.device)
            total = total + self.feature_weight * feature
        terms["total"] = total
        return total, {name: value.detach() for name, value in terms.items()}

    def _feature(self, student_hidden, teacher_hidden, feature_mask) -> tuple[torch.Tensor, int]:
        """The feature term of one (student, teacher) pair of hidden states, and the rows it compared."""
        if student_hidden.shape[-1] != self.student_hidden or teacher_hidden.shape[-1] != self.teacher_hidden:
            raise ConfigError(
                f"method {self.method!r} was built for d_S={self.student_hidden}, d_T={self.teacher_hidden} but "
                f"got student hidden {tuple(student_hidden.shape)} and teacher hidden "
                f"{tuple(teacher_hidden.shape)}"
            )
        if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
            raise ConfigError(
                f"student hidden {tuple(student_hidden.shape)} and teacher hidden {tuple(teacher_hidden.shape)} "
                "must share (B, T)"
            )
        hs = masked_rows(student_hidden, feature_mask)
        ht = masked_rows(teacher_hidden.detach(), feature_mask)
        return self.feature_term(hs, ht), hs.shape[0]


def build_objective(
    method: str,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    feature_weight: float = 1.0,
    flexkd_kind: str = "pearson",
    barlow_lambda_off: float = 5e-3,
    student_hidden: int,
    teacher_hidden: int,
    selected_units: torch.Tensor | None = None,
    logit_loss: str = "forward_kl",
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    shared_vocab: int | None = None,
    teacher_top_k: int | None = None,
    layer_pairs: list[tuple[int, int]] | None = None,
) -> DistillObjective:
    """The objective of one method (``ft``, ``kd``, ``projector``, ``cka``, ``flexkd``); see docs/METHOD.md.

    ``ft``: task only (alpha ignored, no teacher). ``kd``: task + logit KD. ``projector`` / ``cka`` / ``flexkd``:
    task + logit KD + ``feature_weight`` * that feature term. ``flexkd`` needs ``selected_units`` (k = d_S
    teacher unit indices, all < d_T). ``logit_loss`` picks the KD divergence (``LOGIT_LOSSES``) with
    ``jsd_beta`` / ``skew_alpha``; ``shared_vocab`` (``len(tokenizer)``) is the width logits are truncated to
    when teacher and student pad their vocabularies differently (default: the smaller width).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown distillation method {method!r}; valid methods: {', '.join(METHODS)}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if feature_weight < 0:
        raise ConfigError(f"feature_weight must be >= 0, got {feature_weight}")
    if student_hidden < 1 or teacher_hidden < 1:
        raise ConfigError(f"student_hidden and teacher_hidden must be >= 1, got {student_hidden}, {teacher_hidden}")
    if logit_loss not in LOGIT_LOSSES:
        raise ConfigError(f"unknown logit_loss {logit_loss!r}; valid names: {', '.join(LOGIT_LOSSES)}")
    if method == "flexkd" and student_hidden > teacher_hidden:
        raise ConfigError(
            f"relevance: Flex-KD selects k = d_S = {student_hidden} teacher units but the teacher has only "
            f"d_T = {teacher_hidden}"
        )

    task_term = get_loss_term("ce")()
    kd_term = (
        None
        if method == "ft"
        else get_loss_term("kd")(
            temperature=temperature, kind=logit_loss, beta=jsd_beta, skew_alpha=skew_alpha, shared_vocab=shared_vocab,
            top_k=teacher_top_k,
        )
    )
    feature_term: FeatureTerm | None = None
    if method == "projector":
        feature_term = get_loss_term("projector")(student_hidden, teacher_hidden)
    elif method == "cka":
        feature_term = get_loss_term("cka")()
    elif method == "flexkd":
        units = _check_selected_units(selected_units, student_hidden, teacher_hidden)
        feature_term = get_loss_term("flexkd")(units, kind=flexkd_kind, lambda_off=barlow_lambda_off)
    return DistillObjective(
        method,
        task_term,
        kd_term,
        feature_term,
        alpha=0.0 if method == "ft" else alpha,
        temperature=temperature,
        feature_weight=feature_weight if feature_term is not None else 0.0,
        student_hidden=student_hidden,
        teacher_hidden=teacher_hidden,
        layer_pairs=layer_pairs if feature_term is not None else None,
    )
