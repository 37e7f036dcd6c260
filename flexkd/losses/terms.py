"""Loss terms: the registry of named terms that methods sum (flexkd/losses/methods.py; ``distill.composed_methods``).

A term is a subclass of one of the kinds below, registered under the name params.yaml uses. A new term is one
class and its registration, here (or in a module that flexkd/losses/__init__.py imports: terms register when
imported, and params are checked against the registry), for example::

    @register_term
    class SelectedMSE(SelectedUnitsTerm):
        \"\"\"``selected_mse``: MSE between student unit i and the selected teacher unit S[i].\"\"\"

        name = "selected_mse"

        def compare(self, hs, ht_selected):
            return F.mse_loss(hs, ht_selected)

The kinds, by what a term reads in a step:

- ``LossTerm``: the student's logits and the labels (``ce``);
- ``LogitTerm``: also the teacher's logits (``kd``);
- ``FeatureTerm``: student and teacher hidden-state rows at the compared positions, over all teacher units
  (``projector``, ``cka``); ``SelectedUnitsTerm``: over the relevance-selected units, student unit i with teacher
  unit S[i] (``flexkd``).

A term is built for a run from its ``TermContext`` (``build``). Its class flags tell the objective, the teacher
cache and the distill set-up what it needs: teacher logits, teacher hidden states, which teacher units. It returns
its value unweighted: the objective multiplies it by the method's weight and the term's own ``scale`` (kd: tau^2),
and logs it under ``log_key``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from flexkd.errors import ConfigError
from flexkd.losses.divergences import (
    LOGIT_LOSSES,
    check_unit_interval,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
)
from flexkd.losses.features import (
    CKA_MIN_ROWS,
    FLEXKD_KINDS,
    FLEXKD_MIN_ROWS,
    PROJECTOR_MIN_ROWS,
    cka_loss,
    flexkd_feature_loss,
    projector_loss,
)
from flexkd.losses.task import masked_rows, response_mask, response_nll, task_ce
from flexkd.losses.vocab import align_vocab, sparsify_teacher_logits


@dataclass(frozen=True)
class TermContext:
    """What a run's terms are built from: the models' hidden sizes, the relevance selection, the distill settings."""

    student_hidden: int
    teacher_hidden: int
    selected_units: torch.Tensor | None = None  # k = d_S teacher units, checked; set when a term reads them
    temperature: float = 2.0
    logit_loss: str = "forward_kl"
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    shared_vocab: int | None = None
    teacher_top_k: int | None = None
    flexkd_kind: str = "pearson"
    barlow_lambda_off: float = 5e-3


class TermInputs:
    """What the terms read in one step, in float32: the student's and teacher's logits and hidden states, the
    labels and the feature mask (B, T) of the compared positions.

    ``student_hidden`` / ``teacher_hidden`` are (B, T, d) tensors, or lists of them (matched layer pairs).
    ``feature_rows`` gives, per (student, teacher) pair, the rows (N, d_S) and (N, d_T) at the masked positions,
    the teacher's detached; computed once per step however many feature terms read them.
    """

    def __init__(self, method: str, d_student: int, d_teacher: int, *, student_logits, labels, student_hidden=None,
                 feature_mask=None, teacher_logits=None, teacher_hidden=None):
        self.method, self.d_student, self.d_teacher = method, d_student, d_teacher
        self.student_logits, self.labels = student_logits, labels
        self.student_hidden, self.teacher_hidden = student_hidden, teacher_hidden
        self.feature_mask, self._teacher_logits = feature_mask, teacher_logits
        self._rows: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def teacher_logits(self) -> torch.Tensor:
        """The teacher's logits, detached; ConfigError when the step has none."""
        if self._teacher_logits is None:
            raise ConfigError(f"method {self.method!r} needs teacher_logits; none given")
        return self._teacher_logits.detach()

    def feature_rows(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(hs (N, d_S), ht (N, d_T)) per compared layer pair; ConfigError when hidden states or sizes are missing
        or wrong."""
        if self._rows is None:
            if self.student_hidden is None or self.teacher_hidden is None or self.feature_mask is None:
                raise ConfigError(
                    f"method {self.method!r} needs student_hidden, teacher_hidden and feature_mask; got "
                    f"student_hidden={'set' if self.student_hidden is not None else None}, "
                    f"teacher_hidden={'set' if self.teacher_hidden is not None else None}, "
                    f"feature_mask={'set' if self.feature_mask is not None else None}"
                )
            pairs = (list(zip(self.student_hidden, self.teacher_hidden)) if isinstance(self.student_hidden, (list, tuple))
                     else [(self.student_hidden, self.teacher_hidden)])  # several: matched layers
            self._rows = [self._rows_of(sh, th) for sh, th in pairs]
        return self._rows

    def _rows_of(self, student_hidden, teacher_hidden) -> tuple[torch.Tensor, torch.Tensor]:
        if student_hidden.shape[-1] != self.d_student or teacher_hidden.shape[-1] != self.d_teacher:
            raise ConfigError(
                f"method {self.method!r} was built for d_S={self.d_student}, d_T={self.d_teacher} but "
                f"got student hidden {tuple(student_hidden.shape)} and teacher hidden "
                f"{tuple(teacher_hidden.shape)}"
            )
        if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
            raise ConfigError(
                f"student hidden {tuple(student_hidden.shape)} and teacher hidden {tuple(teacher_hidden.shape)} "
                "must share (B, T)"
            )
        return masked_rows(student_hidden, self.feature_mask), masked_rows(teacher_hidden.detach(), self.feature_mask)


# --------------------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------------------


class LossTerm(nn.Module):
    """A named loss term that reads the student's logits and the labels; returns the term unweighted.

    Class flags say what the term needs: ``needs_teacher_logits``, ``needs_teacher_hidden`` and ``teacher_units``,
    the teacher hidden units it compares (``"all"`` d_T, ``"selected"`` the relevance index's k = d_S, or None).
    """

    name: ClassVar[str]
    needs_teacher_logits: ClassVar[bool] = False
    needs_teacher_hidden: ClassVar[bool] = False
    teacher_units: ClassVar[Literal["all", "selected"] | None] = None

    @classmethod
    def build(cls, context: TermContext) -> LossTerm:
        """The term for one run; a term with settings or sizes reads them from ``context``."""
        return cls()

    @property
    def scale(self) -> float:
        """A factor of the term's own, applied with the method's weight (1; kd: tau^2)."""
        return 1.0

    @property
    def log_key(self) -> str:
        """The name the term is logged under (``train/<log_key>`` in MLflow)."""
        return self.name

    def evaluate(self, inputs: TermInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The term's value in one step, unweighted, and any further values to log."""
        return self(inputs.student_logits, inputs.labels), {}


LOSS_TERMS: dict[str, type[LossTerm]] = {}
_TERM_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_term(term: type[LossTerm]) -> type[LossTerm]:
    """Class decorator: register ``term`` under ``term.name``, the name methods and params.yaml use.

    Names are lower-case letters, digits and '_'. A name taken by another class is refused; the same class
    registered again (its module imported again) replaces itself.
    """
    name = getattr(term, "name", None)
    if not (isinstance(term, type) and issubclass(term, LossTerm)):
        raise ConfigError(f"register_term: {term!r} is not a LossTerm subclass")
    if not isinstance(name, str) or not _TERM_NAME.match(name):
        raise ConfigError(f"register_term: {term.__qualname__}.name must be lower-case letters, digits and '_', got {name!r}")
    taken = LOSS_TERMS.get(name)
    if taken is not None and (taken.__module__, taken.__qualname__) != (term.__module__, term.__qualname__):
        raise ConfigError(f"register_term: the name {name!r} is taken by {taken.__module__}.{taken.__qualname__}")
    LOSS_TERMS[name] = term
    return term


def reads_teacher(terms) -> bool:
    """Whether any of these terms (classes or built instances) reads the teacher's logits or hidden states."""
    return any(t.needs_teacher_logits or t.needs_teacher_hidden for t in terms)


def reads_teacher_hidden(terms) -> bool:
    """Whether any of these terms (classes or built instances) reads the teacher's hidden states."""
    return any(t.needs_teacher_hidden for t in terms)


def get_loss_term(name: str) -> type[LossTerm]:
    """The registered loss-term class called ``name``; ConfigError listing the valid names otherwise."""
    try:
        return LOSS_TERMS[name]
    except KeyError:
        raise ConfigError(f"unknown loss term {name!r}; valid names: {', '.join(LOSS_TERMS)}") from None


# --------------------------------------------------------------------------------------------------------------
# The kinds of term
# --------------------------------------------------------------------------------------------------------------


class LogitTerm(LossTerm):
    """A term that compares the student's logits with the teacher's: forward(student_logits, teacher_logits, labels)."""

    needs_teacher_logits = True

    def evaluate(self, inputs: TermInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self(inputs.student_logits, inputs.teacher_logits, inputs.labels), {}


class FeatureTerm(LossTerm):
    """A feature term: forward(hs (N, d_S), ht (N, d_T)) -> scalar, over all teacher units; logged as
    ``feature/<name>``, averaged over the layer pairs when the objective compares several.

    ``min_rows``: the fewest feature positions N the term is defined on; below it the term is 0 (still in the
    graph) and ``feature/<name>_skipped`` reports 1.0 (else 0.0, on every step, so that every rank all-reduces the
    same keys; averaged over ranks it reads as the share of the global batch whose term was skipped).
    """

    needs_teacher_hidden = True
    teacher_units = "all"
    min_rows: ClassVar[int] = 2

    @property
    def log_key(self) -> str:
        return f"feature/{self.name}"

    def evaluate(self, inputs: TermInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values, skipped = [], False
        for hs, ht in inputs.feature_rows():
            values.append(self(hs, ht))
            skipped = skipped or hs.shape[0] < self.min_rows
        value = torch.stack(values).mean()
        return value, {f"{self.log_key}_skipped": torch.tensor(float(skipped), device=value.device)}


class SelectedUnitsTerm(FeatureTerm):
    """A feature term over the relevance-selected teacher units: student unit i against teacher unit
    ``selected_units[i]`` (k = d_S). Subclasses define ``compare(hs (N, d_S), ht_selected (N, d_S))``."""

    teacher_units = "selected"

    def __init__(self, selected_units: torch.Tensor):
        super().__init__()
        # A buffer, not a parameter: moves with .to(device), never trained, not saved in state dicts.
        self.register_buffer("selected_units", torch.as_tensor(selected_units, dtype=torch.long), persistent=False)

    @classmethod
    def build(cls, context: TermContext) -> SelectedUnitsTerm:
        return cls(context.selected_units)

    def forward(self, hs, ht) -> torch.Tensor:
        return self.compare(hs, ht[:, self.selected_units])

    def compare(self, hs: torch.Tensor, ht_selected: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__qualname__} must define compare(hs, ht_selected)")


# --------------------------------------------------------------------------------------------------------------
# The built-in terms (names as in params.yaml)
# --------------------------------------------------------------------------------------------------------------


@register_term
class TaskLoss(LossTerm):
    """``ce``: cross-entropy on labels (B, C) logits, or next-token NLL on response tokens for (B, T, V); logged
    as ``task``."""

    name = "ce"

    @property
    def log_key(self) -> str:
        return "task"

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if student_logits.dim() == 3:
            return response_nll(student_logits, labels)
        return task_ce(student_logits, labels)


@register_term
class LogitKD(LogitTerm):
    """``kd``: a logit divergence at temperature tau; token-level over response positions for (B, T, V).

    ``kind``: ``forward_kl`` (Hinton, default), ``reverse_kl``, ``jsd`` (GKD, weight ``beta``; 0 is forward KL
    and 1 reverse KL, as in TRL: see ``generalized_jsd``),
    ``skew_forward_kl`` / ``skew_reverse_kl`` (DistiLLM, skew ``skew_alpha``). Logits are first passed
    through ``align_vocab`` (``shared_vocab``: the tokenizer's ``len()``, else the smaller width). Weighted with
    tau^2 on top of the method's weight (``scale``), as Hinton's KD is.
    """

    name = "kd"

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
        self.beta = check_unit_interval("kd", "jsd beta", beta)
        self.skew_alpha = check_unit_interval("kd", "skew alpha", skew_alpha)
        if shared_vocab is not None and int(shared_vocab) < 1:
            raise ConfigError(f"kd: shared_vocab must be >= 1, got {shared_vocab}")
        self.shared_vocab = None if shared_vocab is None else int(shared_vocab)

    @classmethod
    def build(cls, context: TermContext) -> LogitKD:
        return cls(temperature=context.temperature, kind=context.logit_loss, beta=context.jsd_beta,
                   skew_alpha=context.skew_alpha, shared_vocab=context.shared_vocab, top_k=context.teacher_top_k)

    @property
    def scale(self) -> float:
        return self.temperature**2

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


@register_term
class ProjectorLoss(FeatureTerm):
    """``projector``: learned nn.Linear(d_S, d_T) with bias, MSE over all teacher units; discarded after training."""

    name = "projector"
    min_rows = PROJECTOR_MIN_ROWS

    def __init__(self, student_hidden: int, teacher_hidden: int):
        super().__init__()
        self.projector = nn.Linear(student_hidden, teacher_hidden, bias=True)

    @classmethod
    def build(cls, context: TermContext) -> ProjectorLoss:
        return cls(context.student_hidden, context.teacher_hidden)

    def forward(self, hs, ht) -> torch.Tensor:
        return projector_loss(self.projector, hs, ht)


@register_term
class CKALoss(FeatureTerm):
    """``cka``: 1 - linear CKA over all teacher units (parameter-free)."""

    name = "cka"
    min_rows = CKA_MIN_ROWS

    def forward(self, hs, ht) -> torch.Tensor:
        return cka_loss(hs, ht)


@register_term
class FlexKDLoss(SelectedUnitsTerm):
    """``flexkd``: student unit i against teacher unit selected_units[i]; no parameters."""

    name = "flexkd"
    min_rows = FLEXKD_MIN_ROWS

    def __init__(self, selected_units: torch.Tensor, kind: str = "pearson", lambda_off: float = 5e-3):
        if kind not in FLEXKD_KINDS:
            raise ConfigError(f"flexkd: unknown kind {kind!r}; valid kinds: {', '.join(FLEXKD_KINDS)}")
        super().__init__(selected_units)
        self.kind = kind
        self.lambda_off = float(lambda_off)

    @classmethod
    def build(cls, context: TermContext) -> FlexKDLoss:
        return cls(context.selected_units, kind=context.flexkd_kind, lambda_off=context.barlow_lambda_off)

    def compare(self, hs, ht_selected) -> torch.Tensor:
        return flexkd_feature_loss(hs, ht_selected, kind=self.kind, lambda_off=self.lambda_off)
