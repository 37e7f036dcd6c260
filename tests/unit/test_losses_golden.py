"""The built-in methods compute what they computed before the loss-term registry: the same total, the same logged
terms and the same gradients, on fixed tiny batches (classification and causal LM), for every method and the
settings that change the terms (logit losses, Flex-KD variants, matched layers, too few feature positions).

tests/fixtures/losses_golden.json holds the values written by flexkd/losses.py as it was before the registry
(commit fe5b04b), with ``python -m tests.unit.test_losses_golden --write``. On the machine that wrote them the
values agree bit for bit; the test allows float32 round-off, which another CPU's kernels may differ by in the
last bit. ``test_losses.py`` checks the same formulas against the pure functions, exactly, on any machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from flexkd.losses import build_objective

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "losses_golden.json"
D_S, D_T = 3, 5
UNITS = [4, 0, 2]
BASE = dict(alpha=0.3, temperature=3.0, feature_weight=0.7)

# name: (method, batch, build_objective keyword arguments)
CASES = {
    "ft": ("ft", "classification", BASE),
    "kd": ("kd", "classification", BASE),
    "projector": ("projector", "classification", BASE),
    "cka": ("cka", "classification", BASE),
    "flexkd": ("flexkd", "classification", BASE),
    "kd_alpha_0": ("kd", "classification", {**BASE, "alpha": 0.0}),
    "flexkd_alpha_1": ("flexkd", "classification", {**BASE, "alpha": 1.0, "feature_weight": 2.5}),
    "flexkd_barlow": ("flexkd", "classification", {**BASE, "flexkd_kind": "barlow", "barlow_lambda_off": 0.01}),
    "flexkd_mse": ("flexkd", "classification", {**BASE, "flexkd_kind": "mse"}),
    "kd_reverse_kl": ("kd", "classification", {**BASE, "logit_loss": "reverse_kl"}),
    "kd_jsd": ("kd", "classification", {**BASE, "logit_loss": "jsd", "jsd_beta": 0.3}),
    "kd_skew_forward_kl": ("kd", "classification", {**BASE, "logit_loss": "skew_forward_kl", "skew_alpha": 0.2}),
    "kd_skew_reverse_kl": ("kd", "classification", {**BASE, "logit_loss": "skew_reverse_kl", "skew_alpha": 0.2}),
    "flexkd_matched": ("flexkd", "matched", {**BASE, "layer_pairs": [(1, 2), (2, 4)]}),
    "cka_one_position": ("cka", "one_position", BASE),
    "projector_no_position": ("projector", "no_position", BASE),
    "generation_ft": ("ft", "generation", BASE),
    "generation_kd_top_k": ("kd", "generation", {**BASE, "shared_vocab": 10, "teacher_top_k": 4}),
    "generation_flexkd_jsd": ("flexkd", "generation", {**BASE, "logit_loss": "jsd", "shared_vocab": 10}),
    "generation_projector": ("projector", "generation", {**BASE, "logit_loss": "skew_reverse_kl", "shared_vocab": 10}),
    "generation_cka": ("cka", "generation", {**BASE, "temperature": 1.5, "shared_vocab": 10}),
}


def _batch(kind: str) -> dict:
    g = torch.Generator().manual_seed(7)
    b, t = 2, 5
    if kind == "generation":  # (B, T, V) logits, teacher padded one row wider; the response positions compared
        labels = torch.tensor([[-100, -100, 3, 4, 9], [-100, 1, 2, -100, -100]])
        logits = torch.randn(b, t, 11, generator=g), torch.randn(b, t, 12, generator=g)
        mask = torch.zeros(b, t, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != -100
    else:
        labels = torch.tensor([0, 2])
        logits = torch.randn(b, 3, generator=g), torch.randn(b, 3, generator=g)
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
        if kind == "one_position":
            mask = torch.zeros(b, t, dtype=torch.bool)
            mask[1, 2] = True
        if kind == "no_position":
            mask = torch.zeros(b, t, dtype=torch.bool)
    layers = 2 if kind == "matched" else 1
    student_hidden = [torch.randn(b, t, D_S, generator=g).requires_grad_() for _ in range(layers)]
    teacher_hidden = [torch.randn(b, t, D_T, generator=g) * 2 + 1 for _ in range(layers)]
    return dict(
        student_logits=logits[0].requires_grad_(), labels=labels, feature_mask=mask, teacher_logits=logits[1],
        student_hidden=student_hidden if layers > 1 else student_hidden[0],
        teacher_hidden=teacher_hidden if layers > 1 else teacher_hidden[0],
    )


def _flat(tensor: torch.Tensor) -> list[float]:
    return tensor.detach().reshape(-1).tolist()


def compute(name: str) -> dict:
    """One case: the objective's total, logged terms and the gradients of everything the student trains."""
    method, batch_kind, kwargs = CASES[name]
    torch.manual_seed(0)  # the projector's initial weights
    objective = build_objective(method, student_hidden=D_S, teacher_hidden=D_T,
                                selected_units=torch.tensor(UNITS) if method == "flexkd" else None, **kwargs)
    batch = _batch(batch_kind)
    total, terms = objective(**batch)
    total.backward()
    hidden = batch["student_hidden"] if isinstance(batch["student_hidden"], list) else [batch["student_hidden"]]
    grads = {"student_logits": _flat(batch["student_logits"].grad)}
    grads.update({f"student_hidden/{i}": _flat(h.grad) if h.grad is not None else None for i, h in enumerate(hidden)})
    grads.update({f"objective/{n}": _flat(p.grad) for n, p in objective.named_parameters()})
    return {"total": total.item(), "terms": {k: v.item() for k, v in terms.items()}, "grads": grads,
            "needs_teacher": objective.needs_teacher, "needs_teacher_hidden": objective.needs_teacher_hidden,
            "layer_pairs": [list(p) for p in objective.layer_pairs] if objective.layer_pairs else None}


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_built_in_methods_compute_what_they_computed_before_the_registry(golden, name):
    got, want = compute(name), golden[name]
    assert set(got["terms"]) == set(want["terms"])  # the MLflow metric names of each term
    assert (got["needs_teacher"], got["needs_teacher_hidden"], got["layer_pairs"]) == (
        want["needs_teacher"], want["needs_teacher_hidden"], want["layer_pairs"])
    assert got["total"] == pytest.approx(want["total"], rel=1e-6, abs=1e-7)
    for key, value in want["terms"].items():
        assert got["terms"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    # the objective's own parameters are named differently now (see test_losses.py for the renamed state dict)
    assert len(got["grads"]) == len(want["grads"])
    for (key, value), got_value in zip(want["grads"].items(), got["grads"].values()):
        if value is None:
            assert got_value is None, key
        else:
            assert got_value == pytest.approx(value, rel=1e-5, abs=1e-7), key


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python -m tests.unit.test_losses_golden --write")
    GOLDEN.write_text(json.dumps({name: compute(name) for name in CASES}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
