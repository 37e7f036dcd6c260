"""Loss terms for teacher fine-tuning and distillation, and the objective that composes them.

    task.py         the task losses (cross-entropy, response NLL) and the positions losses are computed over
    divergences.py  logit divergences at temperature tau: forward / reverse KL, GKD's JSD, DistiLLM's skew KLs
    vocab.py        teacher and student logits over one vocabulary; the teacher's top-k logits
    features.py     feature losses: Flex-KD's, 1 - CKA, the projector's MSE
    terms.py        the registry of named loss terms (``LOSS_TERMS``, ``register_term``) and the built-in terms
    methods.py      methods: named lists of terms with weights (the five built-in ones, params' composed ones)
    objective.py    the objective that sums a method's weighted terms, built from the distill settings

Every pure function is tested with golden values; every term is registered under the name params.yaml uses.
Shapes: classification logits are (B, C); causal-LM logits are (B, T, V) with labels (B, T) where -100 marks
tokens that carry no loss (prompt, padding). Hidden states are (B, T, d). Losses are computed in float32
whatever the input dtype.
"""

from flexkd.losses.divergences import (
    LOGIT_LOSSES,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
)
from flexkd.losses.features import FLEXKD_KINDS, cka_loss, flexkd_feature_loss, projector_loss
from flexkd.losses.methods import BUILTIN_METHODS, METHODS, Method, get_method
from flexkd.losses.objective import DistillObjective, build_objective
from flexkd.losses.task import IGNORE_INDEX, masked_rows, response_mask, response_nll, task_ce
from flexkd.losses.terms import (
    LOSS_TERMS,
    CKALoss,
    FeatureTerm,
    FlexKDLoss,
    LogitKD,
    LogitTerm,
    LossTerm,
    ProjectorLoss,
    SelectedUnitsTerm,
    TaskLoss,
    TermContext,
    TermInputs,
    get_loss_term,
    register_term,
)
from flexkd.losses.vocab import (
    align_vocab,
    check_vocab_compatible,
    densify_teacher_logits,
    sparse_teacher_parts,
    sparsify_teacher_logits,
)

__all__ = [
    "BUILTIN_METHODS", "FLEXKD_KINDS", "IGNORE_INDEX", "LOGIT_LOSSES", "LOSS_TERMS", "METHODS",
    "CKALoss", "DistillObjective", "FeatureTerm", "FlexKDLoss", "LogitKD", "LogitTerm", "LossTerm", "Method",
    "ProjectorLoss", "SelectedUnitsTerm", "TaskLoss", "TermContext", "TermInputs",
    "align_vocab", "build_objective", "check_vocab_compatible", "cka_loss", "densify_teacher_logits",
    "flexkd_feature_loss", "forward_kl", "generalized_jsd", "get_loss_term", "get_method", "masked_rows",
    "projector_loss", "register_term", "response_mask", "response_nll", "reverse_kl", "skew_forward_kl",
    "skew_reverse_kl", "sparse_teacher_parts", "sparsify_teacher_logits", "task_ce",
]
