"""Logit divergences between student and teacher at temperature tau (the ``kind`` of the ``kd`` term).

``forward_kl`` (Hinton), ``reverse_kl`` (MiniLLM-style, token level), ``generalized_jsd`` (GKD), ``skew_forward_kl`` /
``skew_reverse_kl`` (DistiLLM); ``LOGIT_LOSSES`` are their names in params.yaml (``distill.logit_loss``). All take
temperature tau on both sides and are *not* multiplied by tau^2 (the objective does that). Rows: the batch for
(B, C) logits; for (B, T, V) logits the positions a (B, T) mask selects. Computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flexkd.errors import ConfigError


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


def check_unit_interval(name: str, key: str, value: float) -> float:
    """``value`` as a float; ConfigError naming ``name`` and ``key`` unless it lies in [0, 1]."""
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
    beta = check_unit_interval("jsd", "beta", beta)
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
    alpha = check_unit_interval("skew_forward_kl", "alpha", alpha)
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
    alpha = check_unit_interval("skew_reverse_kl", "alpha", alpha)
    rows = _kd_log_probs("skew_reverse_kl", student_logits, teacher_logits, temperature, mask)
    if rows is None:
        return _empty(student_logits)
    log_p_s, log_p_t = rows
    return _kl_to_mixture(log_p_s, log_p_t, alpha).mean()


LOGIT_LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")
