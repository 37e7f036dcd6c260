"""The objective of one method: its registered terms, each times its weight, summed; built from the distill settings.

    L = sum over the method's terms of weight * scale * term          (scale: tau^2 for kd, else 1)

which for the built-in methods is docs/METHOD.md's L = (1 - alpha) * L_task + alpha * tau^2 * KD(tau) + beta * L_feat.
Terms are computed in float32 whatever precision the forward passes ran in, and logged unweighted, each under its
own key (``task``, ``kd``, ``feature/<name>``, ``feature/<name>_skipped``) beside ``total``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from flexkd.errors import ConfigError
from flexkd.losses.divergences import LOGIT_LOSSES
from flexkd.losses.methods import Method, get_method
from flexkd.losses.terms import (FeatureTerm, LossTerm, TermContext, TermInputs, get_loss_term, reads_teacher,
                                 reads_teacher_hidden)


def _check_selected_units(method: str, selected_units, student_hidden: int, teacher_hidden: int) -> torch.Tensor:
    if selected_units is None:
        raise ConfigError(
            f"method {method!r} needs selected_units from the relevance stage (a relevance index with "
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


def _feature_term_before_the_registry(module, state_dict, prefix, *_):
    """State dicts written before the term registry hold the one feature term under ``feature_term.``: renamed to
    ``terms.<name>.`` so that a checkpoint of that time (the projector's weights) still resumes."""
    old = prefix + "feature_term."
    features = [name for name, term in module.terms.items() if isinstance(term, FeatureTerm)]
    if len(features) == 1:
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[f"{prefix}terms.{features[0]}.{key[len(old):]}"] = state_dict.pop(key)


class DistillObjective(nn.Module):
    """The sum of one method's terms, each times its weight and the term's ``scale``.

    ``terms`` (an nn.ModuleDict by term name) holds the built terms; a term with parameters (the projector) is
    trained with the student: pass ``objective.parameters()`` to the optimizer alongside the student's.
    ``forward`` returns ``(total, terms)``; ``terms`` holds every term unweighted and detached under its
    ``log_key``, the terms' further values (``feature/<name>_skipped``) and ``total``, for logging.
    ``layer_pairs``: (student, teacher) indices into the models' hidden_states tuples whose states the feature
    terms compare (averaged over the pairs); None: the last hidden states only.
    """

    def __init__(
        self,
        method: str,
        terms: Sequence[tuple[LossTerm, float]],
        *,
        student_hidden: int,
        teacher_hidden: int,
        layer_pairs: list[tuple[int, int]] | None = None,
    ):
        super().__init__()
        if not terms:
            raise ConfigError(f"method {method!r} has no loss terms")
        self.method = method
        self.terms = nn.ModuleDict({term.name: term for term, _ in terms})
        self.weights = {term.name: float(weight) for term, weight in terms}
        self.layer_pairs = [(int(a), int(b)) for a, b in layer_pairs] if layer_pairs else None
        self.student_hidden = int(student_hidden)
        self.teacher_hidden = int(teacher_hidden)
        self.register_load_state_dict_pre_hook(_feature_term_before_the_registry)

    @property
    def needs_teacher(self) -> bool:
        return reads_teacher(self.terms.values())

    @property
    def needs_teacher_hidden(self) -> bool:
        return reads_teacher_hidden(self.terms.values())

    def extra_repr(self) -> str:
        return f"method={self.method!r}, weights={self.weights}"

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
            inputs = TermInputs(self.method, self.student_hidden, self.teacher_hidden,
                                student_logits=full(student_logits), labels=labels, student_hidden=full(student_hidden),
                                feature_mask=feature_mask, teacher_logits=full(teacher_logits),
                                teacher_hidden=full(teacher_hidden))
            return self._sum(inputs)

    def _sum(self, inputs: TermInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logged: dict[str, torch.Tensor] = {}
        total = None
        for name, term in self.terms.items():
            value, extra = term.evaluate(inputs)
            logged[term.log_key] = value
            logged.update(extra)
            weighted = (self.weights[name] * term.scale) * value
            total = weighted if total is None else total + weighted
        logged["total"] = total
        return total, {key: value.detach() for key, value in logged.items()}


def _check_settings(*, alpha, temperature, feature_weight, student_hidden, teacher_hidden, logit_loss) -> None:
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


def build_objective(
    method: str | Method,
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
    """The objective of one method: a built-in one by name (``ft``, ``kd``, ``projector``, ``cka``, ``flexkd``; see
    docs/METHOD.md) or any ``Method`` (``FlexKDConfig.distill.method(name)`` for one of params' composed methods).

    ``alpha`` and ``feature_weight`` resolve the built-in methods' weights (``ft``: the task alone, alpha
    ignored). A method whose terms compare selected teacher units (``flexkd``) needs ``selected_units`` (k = d_S
    teacher unit indices, all < d_T). ``logit_loss`` picks the KD divergence (``LOGIT_LOSSES``) with ``jsd_beta`` /
    ``skew_alpha``; ``shared_vocab`` (``len(tokenizer)``) is the width logits are truncated to when teacher and
    student pad their vocabularies differently (default: the smaller width). ``layer_pairs`` apply to the
    feature terms (None without any).
    """
    spec = method if isinstance(method, Method) else get_method(method)
    _check_settings(alpha=alpha, temperature=temperature, feature_weight=feature_weight, student_hidden=student_hidden,
                    teacher_hidden=teacher_hidden, logit_loss=logit_loss)
    weights = spec.resolve(alpha=alpha, feature_weight=feature_weight)
    negative = {name: w for name, w in weights.items() if not w >= 0}
    if negative:
        raise ConfigError(f"method {spec.name!r}: loss weights must be >= 0, got {negative}")
    units = None
    if spec.reads_selected_units:
        if student_hidden > teacher_hidden:
            raise ConfigError(
                f"relevance: Flex-KD selects k = d_S = {student_hidden} teacher units but the teacher has only "
                f"d_T = {teacher_hidden}"
            )
        units = _check_selected_units(spec.name, selected_units, student_hidden, teacher_hidden)
    context = TermContext(
        student_hidden=student_hidden, teacher_hidden=teacher_hidden, selected_units=units, temperature=temperature,
        logit_loss=logit_loss, jsd_beta=jsd_beta, skew_alpha=skew_alpha, shared_vocab=shared_vocab,
        teacher_top_k=teacher_top_k, flexkd_kind=flexkd_kind, barlow_lambda_off=barlow_lambda_off,
    )
    terms = [(get_loss_term(name).build(context), weight) for name, weight in weights.items()]
    return DistillObjective(spec.name, terms, student_hidden=student_hidden, teacher_hidden=teacher_hidden,
                            layer_pairs=layer_pairs if spec.needs_teacher_hidden else None)
