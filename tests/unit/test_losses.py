"""Golden-value and behaviour tests of flexkd.losses. Expected numbers are hand-computed or come from an
independent numpy formula, never from the function under test."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from flexkd import config
from flexkd.errors import ConfigError
from flexkd.losses import (
    BUILTIN_METHODS,
    LOSS_TERMS,
    METHODS,
    FeatureTerm,
    build_objective,
    cka_loss,
    flexkd_feature_loss,
    forward_kl,
    get_loss_term,
    masked_rows,
    projector_loss,
    response_nll,
    task_ce,
)

# Two columns, N = 4. Column 0: corr([1,2,3,4], [1,3,2,4]) = 0.8; column 1: corr([1,2,3,4], [4,3,2,1]) = -1.
# Cross terms: C_01 = corr(hs0, ht1) = -1, C_10 = corr(hs1, ht0) = 0.8.
HS = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
HT = torch.tensor([[1.0, 4.0], [3.0, 3.0], [2.0, 2.0], [4.0, 1.0]])


# ---------------------------------------------------------------- small pure functions


def test_masked_rows_picks_true_positions_in_order():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]])
    assert masked_rows(hidden, mask).tolist() == [[0.0, 1.0], [4.0, 5.0], [8.0, 9.0]]
    with pytest.raises(ConfigError, match=r"\(2, 3, 2\).*\(3, 2\)"):
        masked_rows(hidden, torch.ones(3, 2))


def test_task_ce_golden():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    labels = torch.tensor([0, 1])
    # ln 2 and -ln(1/4) = ln 4; mean = 1.5 ln 2
    assert task_ce(logits, labels).item() == pytest.approx(1.5 * math.log(2.0), abs=1e-6)


def test_response_nll_golden_shifted_and_ignoring_minus_100():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    # logits[0] predicts label 0: ln 2; logits[1] predicts label 1: ln 4; logits[2] predicts nothing.
    assert response_nll(logits, labels).item() == pytest.approx(1.5 * math.log(2.0), abs=1e-6)
    no_response = response_nll(logits.requires_grad_(), torch.full((1, 3), -100))
    assert no_response.item() == 0.0 and no_response.requires_grad


def test_forward_kl_zero_when_equal_and_hand_value():
    logits = torch.randn(4, 5)
    assert forward_kl(logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-7)
    # p_T = (3/4, 1/4), p_S = (1/2, 1/2) at tau = 2 (teacher logits scaled by tau).
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[2.0 * math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.130812...
    assert forward_kl(student, teacher, 2.0).item() == pytest.approx(expected, abs=1e-6)
    # The expectation is under the teacher: swapping the roles gives KL(p_S || p_T) = 0.5 ln(4/3) = 0.143841...
    swapped = forward_kl(teacher, student, 2.0).item()
    assert swapped == pytest.approx(0.5 * math.log(4.0 / 3.0), abs=1e-6)
    assert swapped != pytest.approx(expected, abs=1e-3)


def _np_kl(student, teacher, tau):
    def log_softmax(x):
        x = x / tau
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lt, ls = log_softmax(teacher), log_softmax(student)
    return float((np.exp(lt) * (lt - ls)).sum(-1).mean())


def test_forward_kl_matches_numpy_and_mask_selects_rows():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    expected = _np_kl(s.numpy()[mask.numpy()], t.numpy()[mask.numpy()], 3.0)
    assert forward_kl(s, t, 3.0, mask).item() == pytest.approx(expected, rel=1e-5)
    expected_all = _np_kl(s.reshape(-1, 7).numpy(), t.reshape(-1, 7).numpy(), 1.0)
    assert forward_kl(s, t, 1.0).item() == pytest.approx(expected_all, rel=1e-5)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 100.0
    t2[~mask] = -100.0
    assert forward_kl(s2, t2, 3.0, mask).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match=r"\(2, 4, 7\).*\(2, 4, 8\)"):
        forward_kl(s, torch.randn(2, 4, 8), 1.0)


# ---------------------------------------------------------------- Flex-KD feature loss


def test_flexkd_pearson_barlow_mse_golden():
    assert flexkd_feature_loss(HS, HT, "pearson").item() == pytest.approx((0.2 + 2.0) / 2, abs=1e-4)
    # diag: (0.2^2 + 2^2) / 2 = 2.02; off-diagonal: ((-1)^2 + 0.8^2) / 2 = 0.82 (both divided by d_S = 2)
    assert flexkd_feature_loss(HS, HT, "barlow", lambda_off=0.01).item() == pytest.approx(2.0282, abs=1e-4)
    assert flexkd_feature_loss(HS, HT, "barlow", lambda_off=0.0).item() == pytest.approx(2.02, abs=1e-4)
    # mse of standardised columns = 2 - 2 r per column: 0.4 and 4.0
    assert flexkd_feature_loss(HS, HT, "mse").item() == pytest.approx(2.2, abs=1e-4)


def _np_flexkd(hs, ht, kind, lambda_off, eps=1e-5):
    def std(x):
        x = x - x.mean(0)
        return x / np.sqrt((x**2).mean(0) + eps)

    a, b = std(hs.astype(np.float64)), std(ht.astype(np.float64))
    c = a.T @ b / len(a)
    d = np.diag(c)
    if kind == "pearson":
        return (1 - d).mean()
    if kind == "barlow":
        return ((1 - d) ** 2).mean() + lambda_off * ((c**2).sum() - (d**2).sum()) / len(d)
    return ((a - b) ** 2).mean()


@pytest.mark.parametrize("kind", ["pearson", "barlow", "mse"])
def test_flexkd_matches_numpy_on_random(kind):
    g = torch.Generator().manual_seed(1)
    hs, ht = torch.randn(20, 6, generator=g), torch.randn(20, 6, generator=g) * 3 + 1
    expected = _np_flexkd(hs.numpy(), ht.numpy(), kind, 5e-3)
    assert flexkd_feature_loss(hs, ht, kind).item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kind", ["pearson", "barlow", "mse"])
def test_flexkd_zero_for_per_unit_affine_and_scale_invariant(kind):
    g = torch.Generator().manual_seed(2)
    ht = torch.randn(64, 5, generator=g)
    scale = torch.tensor([0.5, 1.0, 2.0, 7.0, 0.3])
    shift = torch.tensor([1.0, -2.0, 0.0, 3.0, 10.0])
    hs = ht * scale + shift
    assert flexkd_feature_loss(hs, ht, kind, lambda_off=0.0).item() == pytest.approx(0.0, abs=1e-4)
    other = torch.randn(64, 5, generator=g)
    base = flexkd_feature_loss(other, ht, kind).item()
    assert flexkd_feature_loss(other * scale, ht, kind).item() == pytest.approx(base, rel=1e-3, abs=1e-5)
    assert flexkd_feature_loss(other, ht * scale + shift, kind).item() == pytest.approx(base, rel=1e-3, abs=1e-5)


def test_barlow_golden_three_units():
    # d_S = 3 (with d_S = 2, dividing the off-diagonal by d_S or by d_S (d_S - 1) would agree). Every student
    # column is [1, 2, 3, 4]; teacher columns [1, 2, 3, 4], [4, 3, 2, 1], [1, 3, 2, 4] correlate with it 1, -1, 0.8,
    # so every row of C is (1, -1, 0.8).
    hs = torch.tensor([[1.0] * 3, [2.0] * 3, [3.0] * 3, [4.0] * 3])
    ht = torch.tensor([[1.0, 4.0, 1.0], [2.0, 3.0, 3.0], [3.0, 2.0, 2.0], [4.0, 1.0, 4.0]])
    diagonal = (0.0 + 4.0 + 0.04) / 3  # mean_i (1 - C_ii)^2 = 1.346667
    off_diagonal = 2 * (1.0 + 1.0 + 0.64) / 3  # each column j holds C_ij^2 for the 2 rows i != j: 1.76
    assert flexkd_feature_loss(hs, ht, "barlow", lambda_off=0.5).item() == pytest.approx(
        diagonal + 0.5 * off_diagonal, abs=1e-4
    )  # 2.226667
    assert flexkd_feature_loss(hs, ht, "pearson").item() == pytest.approx((0.0 + 2.0 + 0.2) / 3, abs=1e-4)


@pytest.mark.parametrize("d_s", [16, 64, 256])
def test_barlow_on_the_scale_of_pearson_at_initialisation(d_s):
    # What the README offers as a drop-in must weigh about the same under one feature_weight, whatever d_S.
    g = torch.Generator().manual_seed(d_s)
    hs, ht = torch.randn(200, d_s, generator=g), torch.randn(200, d_s, generator=g) * 2 + 1
    pearson = flexkd_feature_loss(hs, ht, "pearson").item()
    barlow = flexkd_feature_loss(hs, ht, "barlow").item()
    assert 0.1 <= barlow / pearson <= 10.0, (d_s, pearson, barlow)


def test_flexkd_refuses_bad_shapes_and_kind():
    with pytest.raises(ConfigError, match=r"\(4, 2\).*\(4, 3\)"):
        flexkd_feature_loss(torch.randn(4, 2), torch.randn(4, 3))
    with pytest.raises(ConfigError, match="pearson"):
        flexkd_feature_loss(HS, HT, kind="cosine")


@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("loss", ["pearson", "barlow", "mse", "cka"])
def test_too_few_feature_rows_give_zero_with_a_working_backward(loss, n):
    # Standardising (Flex-KD) or centring (CKA) needs N >= 2 rows; a one-row DDP shard must not stop the run.
    hs = torch.randn(n, 3, requires_grad=True)
    ht = torch.randn(n, 3)
    value = cka_loss(hs, ht) if loss == "cka" else flexkd_feature_loss(hs, ht, loss)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert hs.grad is not None and torch.equal(hs.grad, torch.zeros_like(hs))


def test_projector_loss_on_no_rows_is_zero_with_zero_gradients():
    projector = nn.Linear(2, 3)
    value = projector_loss(projector, torch.randn(0, 2), torch.randn(0, 3))
    assert value.item() == 0.0
    value.backward()
    # Zero gradients, not None: every rank all-reduces the projector's gradients.
    assert all(p.grad is not None and not p.grad.any() for p in projector.parameters())
    one = projector_loss(projector, torch.ones(1, 2), torch.zeros(1, 3))  # one row is a valid MSE
    assert one.item() == pytest.approx(projector(torch.ones(1, 2)).pow(2).mean().item())


# ---------------------------------------------------------------- CKA and projector


def _np_cka(x, y):
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return 1 - np.trace(k @ l) / np.sqrt(np.trace(k @ k) * np.trace(l @ l))


def test_cka_matches_gram_formula_and_invariances():
    g = torch.Generator().manual_seed(3)
    hs, ht = torch.randn(12, 3, generator=g), torch.randn(12, 5, generator=g)
    expected = _np_cka(hs.double().numpy(), ht.double().numpy())
    assert cka_loss(hs, ht).item() == pytest.approx(expected, abs=1e-5)
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    assert cka_loss(hs * 10.0, ht @ rotation * 0.01).item() == pytest.approx(expected, abs=1e-5)
    assert cka_loss(ht @ rotation, ht).item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ConfigError, match=r"\(12, 3\).*\(11, 5\)"):
        cka_loss(hs, ht[:11])


def test_projector_loss_golden():
    projector = nn.Linear(1, 2)
    with torch.no_grad():
        projector.weight.copy_(torch.tensor([[1.0], [2.0]]))
        projector.bias.copy_(torch.tensor([0.0, 1.0]))
    hs = torch.tensor([[1.0], [2.0]])
    ht = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    # projected [[1, 3], [2, 5]]; squared errors 0, 4, 0, 9 -> 13 / 4
    assert projector_loss(projector, hs, ht).item() == pytest.approx(3.25)
    with pytest.raises(ConfigError, match="1 -> 2"):
        projector_loss(projector, torch.randn(2, 3), ht)


# ---------------------------------------------------------------- registry and objective


FEATURE_METHODS = ("projector", "cka", "flexkd")


def test_registry_names_and_flags():
    # Each term is registered under its own name; the built-in feature terms are exactly the built-in methods that
    # weigh a feature term, whose weights params.yaml takes (distill.feature_weight.<method>).
    for name, term in LOSS_TERMS.items():
        assert term.name == name and get_loss_term(name) is term
    features = {name for name, term in LOSS_TERMS.items()
                if issubclass(term, FeatureTerm) and term.__module__ == "flexkd.losses.terms"}
    weighted = {method for method, weights in BUILTIN_METHODS.items() if "feature_weight" in weights.values()}
    assert features == weighted == set(FEATURE_METHODS) == set(config.FeatureWeights.model_fields)
    assert not LOSS_TERMS["ce"].needs_teacher_logits and not LOSS_TERMS["ce"].needs_teacher_hidden
    assert LOSS_TERMS["kd"].needs_teacher_logits and not LOSS_TERMS["kd"].needs_teacher_hidden
    for name in ("projector", "cka", "flexkd"):
        assert LOSS_TERMS[name].needs_teacher_hidden
    with pytest.raises(ConfigError, match="ce, kd, projector, cka, flexkd"):
        get_loss_term("mse_logits")


D_S, D_T, B, T, C = 3, 5, 2, 4, 3
UNITS = torch.tensor([0, 2, 4])


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        student_logits=torch.randn(B, C, generator=g, requires_grad=True),
        student_hidden=torch.randn(B, T, D_S, generator=g, requires_grad=True),
        labels=torch.tensor([0, 2]),
        feature_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool),
        teacher_logits=torch.randn(B, C, generator=g, requires_grad=True),
        teacher_hidden=torch.randn(B, T, D_T, generator=g, requires_grad=True),
    )


def _objective(method, **kwargs):
    return build_objective(
        method, student_hidden=D_S, teacher_hidden=D_T, selected_units=UNITS if method == "flexkd" else None, **kwargs
    )


def _feature_by_hand(method, objective, hs, ht):
    if method == "projector":
        return projector_loss(objective.terms["projector"].projector, hs, ht).item()
    if method == "cka":
        return cka_loss(hs, ht).item()
    return flexkd_feature_loss(hs, ht[:, UNITS], "pearson").item()


@pytest.mark.parametrize(
    "method,keys",
    [
        ("ft", {"task", "total"}),
        ("kd", {"task", "kd", "total"}),
        ("projector", {"task", "kd", "feature/projector", "feature/projector_skipped", "total"}),
        ("cka", {"task", "kd", "feature/cka", "feature/cka_skipped", "total"}),
        ("flexkd", {"task", "kd", "feature/flexkd", "feature/flexkd_skipped", "total"}),
    ],
)
def test_objective_terms_per_method(method, keys):
    objective = _objective(method, alpha=0.3, temperature=3.0, feature_weight=0.7)
    assert objective.needs_teacher == (method != "ft")
    assert objective.needs_teacher_hidden == (method in ("projector", "cka", "flexkd"))
    batch = _batch()
    total, terms = objective(**batch)
    assert set(terms) == keys
    # The total, from the pure functions: (1 - alpha) task + alpha tau^2 kd + beta feat (ft: the task alone).
    task = task_ce(batch["student_logits"], batch["labels"]).item()
    expected = task
    if method != "ft":
        expected = 0.7 * task + 0.3 * 9.0 * forward_kl(batch["student_logits"], batch["teacher_logits"], 3.0).item()
    if method in FEATURE_METHODS:
        mask = batch["feature_mask"]
        hs, ht = batch["student_hidden"][mask], batch["teacher_hidden"][mask]
        expected += 0.7 * _feature_by_hand(method, objective, hs, ht)
        assert terms[f"feature/{method}_skipped"].item() == 0.0
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert terms["total"].item() == pytest.approx(expected, rel=1e-6)


def _formula_before_the_registry(method, batch, projector, alpha, tau, beta):
    """The built-in methods' objective as flexkd/losses.py computed it before the term registry, in its order:
    (1 - alpha) task + alpha tau^2 kd (ft: the task alone), then + beta times the feature term."""
    total = task_ce(batch["student_logits"], batch["labels"])
    if method != "ft":
        kd = forward_kl(batch["student_logits"], batch["teacher_logits"].detach(), tau)
        total = (1.0 - alpha) * total + alpha * tau**2 * kd
    if method in FEATURE_METHODS:
        mask = batch["feature_mask"]
        hs, ht = masked_rows(batch["student_hidden"], mask), masked_rows(batch["teacher_hidden"].detach(), mask)
        feature = (projector_loss(projector, hs, ht) if method == "projector" else cka_loss(hs, ht) if method == "cka"
                   else flexkd_feature_loss(hs, ht[:, UNITS], "pearson", 5e-3))
        total = total + beta * torch.stack([feature]).mean()
    return total


@pytest.mark.parametrize("method", METHODS)
def test_each_built_in_method_is_its_formula_bit_for_bit(method):
    # The sum of the method's weighted terms gives exactly the bits of the formula: the total and every gradient.
    alpha, tau, beta = 0.3, 3.0, 0.7
    objective = _objective(method, alpha=alpha, temperature=tau, feature_weight=beta)
    projector = copy.deepcopy(objective.terms["projector"].projector) if method == "projector" else None
    batch, reference = _batch(), _batch()
    total, terms = objective(**batch)
    expected = _formula_before_the_registry(method, reference, projector, alpha, tau, beta)
    assert torch.equal(total, expected) and torch.equal(terms["total"], expected.detach())
    total.backward()
    expected.backward()
    for key in ("student_logits", "student_hidden"):
        assert (batch[key].grad is None and reference[key].grad is None) or torch.equal(batch[key].grad,
                                                                                        reference[key].grad), key
    if projector is not None:
        for got, want in zip(objective.parameters(), projector.parameters(), strict=True):
            assert torch.equal(got.grad, want.grad)


@pytest.mark.parametrize("method", config.DistillConfig().methods)
def test_every_method_params_yaml_accepts_builds_its_terms(method):
    # flexkd.config validates distill.methods; each of its methods must build here, with the terms it names.
    assert method in METHODS
    objective = _objective(method)
    expected = ["ce"] if method == "ft" else ["ce", "kd"] + ([method] if method in FEATURE_METHODS else [])
    assert list(objective.terms) == expected
    assert all(type(term) is get_loss_term(name) for name, term in objective.terms.items())
    # ... and nothing the config refuses is built.
    with pytest.raises(ValueError, match="unknown method"):
        config.DistillConfig(methods=[method + "_x"])
    with pytest.raises(ConfigError, match="unknown distillation method"):
        _objective(method + "_x")


@pytest.mark.parametrize("method", ["projector", "cka", "flexkd"])
@pytest.mark.parametrize("positions", [0, 1])
def test_too_few_feature_positions_contribute_zero_and_are_reported(method, positions):
    # A one-row shard under DDP (or a batch with no response position) must not stop the run: the feature term
    # adds 0, backward works, and the step says it skipped the term. The projector's MSE is defined on one row.
    objective = _objective(method, alpha=0.3, temperature=3.0, feature_weight=0.7)
    batch = _batch()
    batch["feature_mask"] = torch.zeros(B, T, dtype=torch.bool)
    batch["feature_mask"][1, 2] = positions == 1
    total, terms = objective(**batch)
    skipped = positions < objective.terms[method].min_rows
    assert terms[f"feature/{method}_skipped"].item() == float(skipped)
    assert skipped == (method != "projector" or positions == 0)
    task = task_ce(batch["student_logits"], batch["labels"]).item()
    kd = forward_kl(batch["student_logits"], batch["teacher_logits"], 3.0).item()
    if skipped:
        assert terms[f"feature/{method}"].item() == 0.0
        assert total.item() == pytest.approx(0.7 * task + 0.3 * 9.0 * kd, rel=1e-6)
    total.backward()
    assert batch["student_logits"].grad.abs().sum() > 0
    assert batch["student_hidden"].grad is not None
    if skipped:
        assert not batch["student_hidden"].grad.any()
        assert all(p.grad is not None and not p.grad.any() for p in objective.parameters())


def test_objective_formula_and_unweighted_terms():
    batch = _batch()
    objective = _objective("flexkd", alpha=0.3, temperature=4.0, feature_weight=2.5)
    total, terms = objective(**batch)
    mask = batch["feature_mask"]
    task = task_ce(batch["student_logits"], batch["labels"]).item()
    kd = forward_kl(batch["student_logits"], batch["teacher_logits"], 4.0).item()
    feat = flexkd_feature_loss(
        batch["student_hidden"][mask], batch["teacher_hidden"][mask][:, UNITS], "pearson"
    ).item()
    assert terms["task"].item() == pytest.approx(task, rel=1e-6)
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-6)
    assert terms["feature/flexkd"].item() == pytest.approx(feat, rel=1e-6)
    assert total.item() == pytest.approx(0.7 * task + 0.3 * 16.0 * kd + 2.5 * feat, rel=1e-6)
    ft_total, _ = _objective("ft", alpha=0.9)(**batch)
    assert ft_total.item() == pytest.approx(task, rel=1e-6)  # alpha ignored for ft


@pytest.mark.parametrize("method", ["projector", "cka", "flexkd"])
def test_masked_positions_do_not_change_the_loss(method):
    objective = _objective(method)
    batch = _batch()
    total, _ = objective(**batch)
    changed = _batch()
    pad = ~changed["feature_mask"]
    with torch.no_grad():
        changed["student_hidden"][pad] = 1e3
        changed["teacher_hidden"][pad] = -1e3
    total_changed, _ = objective(**changed)
    assert total_changed.item() == pytest.approx(total.item(), rel=1e-6)


@pytest.mark.parametrize("method", ["projector", "cka", "flexkd"])
def test_gradients_reach_student_and_projector_not_teacher(method):
    objective = _objective(method)
    batch = _batch()
    total, _ = objective(**batch)
    total.backward()
    assert batch["student_hidden"].grad is not None and batch["student_hidden"].grad.abs().sum() > 0
    assert batch["student_logits"].grad.abs().sum() > 0
    assert batch["teacher_hidden"].grad is None and batch["teacher_logits"].grad is None
    params = list(objective.parameters())
    if method == "projector":
        assert len(params) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    else:
        assert params == []


def test_a_projector_checkpoint_from_before_the_registry_still_loads():
    # Before the term registry the objective held its feature term as ``feature_term``: a resumable checkpoint of
    # that time holds the projector under feature_term.projector.*, and must resume.
    objective = _objective("projector")
    assert list(objective.state_dict()) == ["terms.projector.projector.weight", "terms.projector.projector.bias"]
    old = {"feature_term.projector.weight": torch.randn(D_T, D_S), "feature_term.projector.bias": torch.randn(D_T)}
    objective.load_state_dict(dict(old))  # strict: every key found
    assert torch.equal(objective.terms["projector"].projector.weight, old["feature_term.projector.weight"])
    assert torch.equal(objective.terms["projector"].projector.bias, old["feature_term.projector.bias"])
    with pytest.raises(RuntimeError, match="Unexpected key"):
        _objective("cka").load_state_dict({"feature_term.projector.weight": torch.zeros(1)})


def test_build_objective_refusals():
    with pytest.raises(ConfigError, match="ft, kd, projector, cka, flexkd"):
        build_objective("fitnet", student_hidden=D_S, teacher_hidden=D_T, selected_units=None)
    with pytest.raises(ConfigError, match="relevance"):
        build_objective("flexkd", student_hidden=D_S, teacher_hidden=D_T, selected_units=None)
    with pytest.raises(ConfigError, match=r"relevance.*k=2.*d_S=3"):
        build_objective("flexkd", student_hidden=D_S, teacher_hidden=D_T, selected_units=torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match=r"relevance.*d_T=5"):
        build_objective("flexkd", student_hidden=D_S, teacher_hidden=D_T, selected_units=torch.tensor([0, 1, 5]))
    with pytest.raises(ConfigError, match="kind"):
        build_objective("flexkd", student_hidden=D_S, teacher_hidden=D_T, selected_units=UNITS, flexkd_kind="l1")
    objective = _objective("kd")
    batch = _batch()
    batch["teacher_logits"] = None
    with pytest.raises(ConfigError, match="teacher_logits"):
        objective(**batch)
    batch = _batch()
    batch["teacher_hidden"] = torch.randn(B, T, D_T + 1)
    with pytest.raises(ConfigError, match=r"d_T=5.*\(2, 4, 6\)"):
        _objective("cka")(**batch)


def test_objective_causal_lm_path():
    g = torch.Generator().manual_seed(5)
    student = torch.randn(2, 4, 7, generator=g, requires_grad=True)
    teacher = torch.randn(2, 4, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4], [-100, 1, 2, -100]])
    objective = _objective("kd", alpha=1.0, temperature=1.0)
    _, terms = objective(student_logits=student, teacher_logits=teacher, labels=labels)
    rows = torch.tensor([[False, True, True, False], [True, True, False, False]])  # predict a response token
    assert terms["kd"].item() == pytest.approx(_np_kl(student.detach().numpy()[rows], teacher.numpy()[rows], 1.0), rel=1e-5)
    assert terms["task"].item() == pytest.approx(response_nll(student, labels).item())


def test_matched_layers_average_the_feature_term_over_the_pairs():
    first, second = _batch(0), _batch(1)
    objective = _objective("flexkd", alpha=0.3, feature_weight=2.0, layer_pairs=[(1, 2), (2, 4)])
    assert objective.layer_pairs == [(1, 2), (2, 4)]
    total, terms = objective(**{**first, "student_hidden": [first["student_hidden"], second["student_hidden"]],
                                "teacher_hidden": [first["teacher_hidden"], second["teacher_hidden"]]})
    mask = first["feature_mask"]
    per_pair = [flexkd_feature_loss(b["student_hidden"][mask], b["teacher_hidden"][mask][:, UNITS], "pearson").item()
                for b in (first, second)]
    assert terms["feature/flexkd"].item() == pytest.approx(sum(per_pair) / 2, rel=1e-6)
    last_only, _ = _objective("flexkd", alpha=0.3, feature_weight=2.0)(**first)
    assert total.item() == pytest.approx(last_only.item() + 2.0 * (sum(per_pair) / 2 - per_pair[0]), rel=1e-5)
    assert _objective("kd", layer_pairs=[(1, 2)]).layer_pairs is None  # no feature term: nothing to match


def test_matched_layers_pair_each_student_layer_with_its_teacher_layer_and_run_the_teacher_online(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from flexkd.config import StudentConfig
    from flexkd.tasks import teacher_layers_for
    from flexkd.train import distillation_loss

    teacher = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=D_T, num_hidden_layers=6,
                                                       num_attention_heads=1, intermediate_size=16, num_labels=C))
    student = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=D_S, num_hidden_layers=3,
                                                       num_attention_heads=1, intermediate_size=16, num_labels=C))
    scfg = StudentConfig(num_layers=3, hidden_size=D_S, num_heads=1, intermediate_size=16)
    assert teacher_layers_for(teacher, scfg) == [0, 2, 5]  # evenly spaced, first and last kept
    assert teacher_layers_for(teacher, scfg.model_copy(update={"prune_layers": [1, 3, 4]})) == [1, 3, 4]
    pairs = [(i + 1, t + 1) for i, t in enumerate(teacher_layers_for(teacher, scfg))]
    seen = {}

    class Spy(nn.Module):  # the objective, recording what the step hands it
        def __init__(self, inner):
            super().__init__()
            self.inner, self.needs_teacher, self.needs_teacher_hidden = inner, True, True
            self.layer_pairs = inner.layer_pairs

        def forward(self, **kwargs):
            seen.update(kwargs)
            return self.inner(**kwargs)

    spy = Spy(_objective("flexkd", layer_pairs=pairs))
    batch = {"input_ids": torch.randint(0, 50, (B, T)), "attention_mask": torch.ones(B, T, dtype=torch.long),
             "labels": torch.tensor([0, 1])}
    loss, terms = distillation_loss(student, teacher, spy)(student, batch)
    assert len(seen["student_hidden"]) == 3 and len(seen["teacher_hidden"]) == 3
    with torch.no_grad():
        t_states = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True).hidden_states
    for got, (_, t) in zip(seen["teacher_hidden"], pairs):
        assert torch.equal(got, t_states[t])
    assert torch.isfinite(loss) and "feature/flexkd" in terms
