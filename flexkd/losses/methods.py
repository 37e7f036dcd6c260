"""Distillation methods: a name and the registered loss terms it sums, each with its weight.

The built-in methods are docs/METHOD.md's; their weights name the distill settings they come from, so that
``distill.methods: [ft, kd, projector, cka, flexkd]`` means what it always has::

    ft         ce
    kd         (1 - alpha) ce + alpha kd
    projector  (1 - alpha) ce + alpha kd + feature_weight projector          (cka and flexkd alike)

``alpha`` and ``feature_weight`` are those of the student and method (``flexkd.distill.method_settings``). A method
of one's own is a mapping under ``distill.composed_methods`` in params.yaml, its weights numbers::

    composed_methods:
      kd_flexkd_cka: {ce: 0.5, kd: 0.5, flexkd: 0.1, cka: 0.05}

Terms are summed in the order listed; kd is also multiplied by tau^2 (Hinton) in every method. Every question
about a method (does it need the teacher, its hidden states, all of its units or the selected ones?) is asked of
its terms' flags (flexkd/losses/terms.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

from flexkd.errors import ConfigError
from flexkd.losses.terms import LOSS_TERMS, LossTerm, get_loss_term, reads_teacher, reads_teacher_hidden

ALPHA = "alpha"
TASK_SHARE = "1 - alpha"
FEATURE_WEIGHT = "feature_weight"

BUILTIN_METHODS: dict[str, dict[str, float | str]] = {
    "ft": {"ce": 1.0},
    "kd": {"ce": TASK_SHARE, "kd": ALPHA},
    "projector": {"ce": TASK_SHARE, "kd": ALPHA, "projector": FEATURE_WEIGHT},
    "cka": {"ce": TASK_SHARE, "kd": ALPHA, "cka": FEATURE_WEIGHT},
    "flexkd": {"ce": TASK_SHARE, "kd": ALPHA, "flexkd": FEATURE_WEIGHT},
}
METHODS = tuple(BUILTIN_METHODS)
_METHOD_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Method:
    """A distillation method: term name -> weight, in the order the terms are summed.

    A weight is a number, or (built-in methods) the setting it comes from: ``alpha``, ``1 - alpha`` or
    ``feature_weight``. The properties answer from the terms' flags.
    """

    name: str
    weights: Mapping[str, float | str]

    @property
    def terms(self) -> dict[str, type[LossTerm]]:
        """The registered term classes, by name (ConfigError for a name not registered)."""
        return {name: get_loss_term(name) for name in self.weights}

    @property
    def needs_teacher(self) -> bool:
        return reads_teacher(self.terms.values())

    @property
    def needs_teacher_hidden(self) -> bool:
        return reads_teacher_hidden(self.terms.values())

    @property
    def teacher_units(self) -> str | None:
        """Teacher hidden units the method compares: ``"all"``, ``"selected"`` (only the relevance-selected ones)
        or None (no hidden states)."""
        kinds = {t.teacher_units for t in self.terms.values()}
        return "all" if "all" in kinds else "selected" if "selected" in kinds else None

    @property
    def reads_selected_units(self) -> bool:
        """True when a term pairs student units with the relevance-selected teacher units (needs k = d_S)."""
        return any(t.teacher_units == "selected" for t in self.terms.values())

    @property
    def settings(self) -> tuple[str, ...]:
        """The per-method settings the method reads, of lr, alpha, temperature, feature_weight (what tuning varies)."""
        symbols = {w for w in self.weights.values() if isinstance(w, str)}
        return tuple(s for s, used in (("lr", True), ("alpha", bool({ALPHA, TASK_SHARE} & symbols)),
                                       ("temperature", any(t.needs_teacher_logits for t in self.terms.values())),
                                       ("feature_weight", FEATURE_WEIGHT in symbols)) if used)

    def resolve(self, *, alpha: float, feature_weight: float) -> dict[str, float]:
        """The weights as numbers, given the method's alpha and feature weight."""
        values = {ALPHA: float(alpha), TASK_SHARE: 1.0 - float(alpha), FEATURE_WEIGHT: float(feature_weight)}
        return {name: values[w] if isinstance(w, str) else float(w) for name, w in self.weights.items()}


def get_method(name: str, composed: Mapping[str, Mapping[str, float]] | None = None) -> Method:
    """The built-in method ``name``, else the one ``composed`` (``distill.composed_methods``) defines.

    ConfigError, listing the valid names, for any other name.
    """
    if name in BUILTIN_METHODS:
        return Method(name, BUILTIN_METHODS[name])
    if composed and name in composed:
        return Method(name, dict(composed[name]))
    valid = ", ".join([*BUILTIN_METHODS, *(composed or {})])
    raise ConfigError(f"unknown distillation method {name!r}; valid methods: {valid} (or define it under "
                      "distill.composed_methods)")


def composed_method_problems(name: str, weights: Mapping[str, object]) -> list[str]:
    """What is wrong with the method ``name`` defined under ``distill.composed_methods``, in plain words (each
    names the parameter and the remedy); empty when it is valid."""
    key = f"distill.composed_methods.{name}"
    if name in BUILTIN_METHODS:
        return [f"{key}: {name!r} is a built-in method; give yours another name"]
    if not _METHOD_NAME.match(name):
        return [f"{key}: method names may hold letters, digits, '-' and '_' only"]
    if not weights:
        return [f"{key}: a method needs at least one loss term with its weight, e.g. {{ce: 0.5, kd: 0.5}}"]
    problems = []
    for term, weight in weights.items():
        if term not in LOSS_TERMS:
            problems.append(f"{key}.{term}: unknown loss term; registered terms: {', '.join(LOSS_TERMS)} (a new term "
                            "is a class registered with @register_term, see flexkd/losses/terms.py)")
        elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            problems.append(f"{key}.{term}: the weight must be a number >= 0, got {weight!r}")
        elif weight < 0:
            problems.append(f"{key}.{term}: the weight {weight} is negative; loss weights must be >= 0 (0 logs the "
                            "term without training on it)")
    return problems
