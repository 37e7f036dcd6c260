"""Golden-value and behaviour tests of the token-level logit terms for generation (flexkd.losses): reverse KL,
GKD's generalised JSD, DistiLLM's skew KLs, vocabulary alignment and the causal-LM objective. Expected numbers
come from explicit numpy loops or hand computation, never from the function under test."""

import math

import pytest
import torch

from flexkd.errors import ConfigError
from flexkd.losses import (
    LOGIT_LOSSES,
    LogitKD,
    align_vocab,
    build_objective,
    check_vocab_compatible,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
)

FUNCTIONS = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
}

# B = 2, T = 2, V = 3; the mask drops position (1, 0).
STUDENT = torch.tensor([[[0.5, -1.0, 2.0], [1.0, 0.0, 0.0]], [[3.0, 3.0, 3.0], [-2.0, 0.3, 1.2]]])
TEACHER = torch.tensor([[[1.5, 0.0, -0.5], [0.2, 0.2, 2.0]], [[0.0, 1.0, 5.0], [0.7, -0.4, 0.1]]])
MASK = torch.tensor([[True, True], [False, True]])


# ---------------------------------------------------------------- independent numpy reference (explicit loops)


def _softmax(row, tau):
    z = [x / tau for x in row]
    top = max(z)
    e = [math.exp(x - top) for x in z]
    return [x / sum(e) for x in e]


def _kl_np(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _divergence_np(kind, p_s, p_t, beta=0.5, alpha=0.1):
    if kind == "forward_kl":
        return _kl_np(p_t, p_s)
    if kind == "reverse_kl":
        return _kl_np(p_s, p_t)
    if kind == "jsd":
        # TRL's GKDTrainer.generalized_jsd_loss: beta = 0 is forward KL, beta = 1 reverse KL.
        if beta == 0:
            return _kl_np(p_t, p_s)
        if beta == 1:
            return _kl_np(p_s, p_t)
        m = [beta * t + (1 - beta) * s for s, t in zip(p_s, p_t)]
        return beta * _kl_np(p_t, m) + (1 - beta) * _kl_np(p_s, m)
    if kind == "skew_forward_kl":
        return _kl_np(p_t, [alpha * t + (1 - alpha) * s for s, t in zip(p_s, p_t)])
    return _kl_np(p_s, [alpha * s + (1 - alpha) * t for s, t in zip(p_s, p_t)])


def _reference(kind, student, teacher, tau, mask=None, **kwargs):
    student, teacher = student.double().numpy(), teacher.double().numpy()
    values = []
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if mask is not None and not bool(mask[b, t]):
                continue
            p_s = _softmax(list(student[b, t]), tau)
            p_t = _softmax(list(teacher[b, t]), tau)
            values.append(_divergence_np(kind, p_s, p_t, **kwargs))
    return sum(values) / len(values)


def _call(kind, student, teacher, tau, mask=None, beta=0.5, alpha=0.1):
    if kind == "jsd":
        return generalized_jsd(student, teacher, tau, mask, beta=beta)
    if kind.startswith("skew"):
        return FUNCTIONS[kind](student, teacher, tau, mask, alpha=alpha)
    return FUNCTIONS[kind](student, teacher, tau, mask)


# ---------------------------------------------------------------- pure functions


def test_hand_values_on_two_token_distributions():
    # p_S = (1/2, 1/2), p_T = (3/4, 1/4) at tau = 1.
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    assert reverse_kl(student, teacher, 1.0).item() == pytest.approx(0.5 * math.log(4.0 / 3.0), abs=1e-6)
    # m = (5/8, 3/8): KL(p_T || m) = .75 ln 1.2 + .25 ln(2/3); KL(p_S || m) = .5 ln .8 + .5 ln(4/3)
    jsd = 0.5 * (0.75 * math.log(1.2) + 0.25 * math.log(2 / 3)) + 0.5 * (0.5 * math.log(0.8) + 0.5 * math.log(4 / 3))
    assert generalized_jsd(student, teacher, 1.0).item() == pytest.approx(jsd, abs=1e-6)
    assert jsd == pytest.approx(0.0338216, abs=1e-6)
    # skew forward, alpha = 0.5: m = (5/8, 3/8) again -> KL(p_T || m)
    assert skew_forward_kl(student, teacher, 1.0, alpha=0.5).item() == pytest.approx(
        0.75 * math.log(1.2) + 0.25 * math.log(2 / 3), abs=1e-6
    )


@pytest.mark.parametrize("kind", LOGIT_LOSSES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_each_variant_matches_numpy_loops_over_masked_positions(kind, tau):
    expected = _reference(kind, STUDENT, TEACHER, tau, MASK)
    assert _call(kind, STUDENT, TEACHER, tau, MASK).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # Non-default weights.
    expected = _reference(kind, STUDENT, TEACHER, tau, MASK, beta=0.2, alpha=0.3)
    got = _call(kind, STUDENT, TEACHER, tau, MASK, beta=0.2, alpha=0.3)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kind", LOGIT_LOSSES)
def test_zero_when_equal_and_temperature_scales_logits(kind):
    assert _call(kind, STUDENT, STUDENT.clone(), 3.0, MASK).item() == pytest.approx(0.0, abs=1e-7)
    # tau divides both sides: f(s, t, tau) == f(s / tau, t / tau, 1); higher tau flattens -> smaller value.
    at_two = _call(kind, STUDENT, TEACHER, 2.0, MASK).item()
    assert at_two == pytest.approx(_call(kind, STUDENT / 2, TEACHER / 2, 1.0, MASK).item(), rel=1e-5)
    assert at_two != pytest.approx(_call(kind, STUDENT, TEACHER, 1.0, MASK).item(), rel=1e-3)
    assert _call(kind, STUDENT, TEACHER, 100.0, MASK).item() < 1e-3 * _call(kind, STUDENT, TEACHER, 1.0, MASK).item()


@pytest.mark.parametrize("kind", LOGIT_LOSSES)
def test_masked_positions_do_not_matter_and_no_rows_gives_zero(kind):
    base = _call(kind, STUDENT, TEACHER, 2.0, MASK).item()
    s2, t2 = STUDENT.clone(), TEACHER.clone()
    s2[~MASK] = 100.0
    t2[~MASK] = -100.0
    assert _call(kind, s2, t2, 2.0, MASK).item() == pytest.approx(base, rel=1e-6)
    student = STUDENT.clone().requires_grad_()
    empty = _call(kind, student, TEACHER, 2.0, torch.zeros(2, 2, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad


def _kl_by_hand(p_rows, q_rows):
    """Mean over rows of sum_v p log(p / q), written out."""
    total = 0.0
    for p, q in zip(p_rows, q_rows):
        total += sum(p[v] * math.log(p[v] / q[v]) for v in range(len(p)))
    return total / len(p_rows)


def _endpoint_case(shape):
    """Seeded logits (B, C) without mask, or (B, T, V) with a mask and the labels whose response rows it is."""
    g = torch.Generator().manual_seed(11)
    if shape == "BC":
        return torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g) * 2, None, None
    labels = torch.tensor([[-100, 5, 1, 0], [-100, -100, 2, -100]])
    mask = torch.tensor([[True, True, True, False], [False, True, False, False]])  # == response_mask(labels)
    return torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g) * 2, mask, labels


def _probability_rows(student, teacher, mask, tau):
    student, teacher = student.double(), teacher.double()
    if mask is not None:
        student, teacher = student[mask], teacher[mask]
    return [_softmax(r.tolist(), tau) for r in student], [_softmax(r.tolist(), tau) for r in teacher]


@pytest.mark.parametrize("shape", ["BC", "BTV"])
def test_jsd_endpoints_are_forward_and_reverse_kl(shape):
    # TRL's convention: beta = 0 is KL(p_T || p_S), beta = 1 is KL(p_S || p_T) (the mixture formula would be 0).
    student, teacher, mask, labels = _endpoint_case(shape)
    p_s, p_t = _probability_rows(student, teacher, mask, 2.0)
    forward, reverse = _kl_by_hand(p_t, p_s), _kl_by_hand(p_s, p_t)
    assert forward > 0.1 and reverse > 0.1 and forward != pytest.approx(reverse, rel=1e-2)
    assert generalized_jsd(student, teacher, 2.0, mask, beta=0.0).item() == pytest.approx(forward, rel=1e-5)
    assert generalized_jsd(student, teacher, 2.0, mask, beta=1.0).item() == pytest.approx(reverse, rel=1e-5)
    # The KD term (what jsd_beta configures) takes the same path; for (B, T, V) its rows are the response rows.
    if labels is None:
        labels = torch.zeros(student.shape[0], dtype=torch.long)
    for beta, expected in ((0.0, forward), (1.0, reverse)):
        assert LogitKD(temperature=2.0, kind="jsd", beta=beta)(student, teacher, labels).item() == pytest.approx(
            expected, rel=1e-5
        )


@pytest.mark.parametrize("shape", ["BC", "BTV"])
def test_jsd_near_the_endpoints_tends_to_the_endpoint_kl_scaled_by_beta(shape):
    # TRL's endpoints are not the limits of the value itself: JSD_beta ~ beta KL(p_T || p_S) as beta -> 0 and
    # ~ (1 - beta) KL(p_S || p_T) as beta -> 1 (GKD's sense of "forward / reverse KL"). The value jumps at the
    # endpoints by a factor 1 / beta; the direction (the normalised value) is continuous.
    student, teacher, mask, _ = _endpoint_case(shape)
    at_0 = generalized_jsd(student, teacher, 2.0, mask, beta=0.0).item()
    at_1 = generalized_jsd(student, teacher, 2.0, mask, beta=1.0).item()
    # The first-order correction is O(beta): rel 1e-4 at 1e-6 also checks that float32 keeps the digits there.
    for eps, rel in ((1e-6, 1e-4), (1e-4, 1e-3)):
        near_0 = generalized_jsd(student, teacher, 2.0, mask, beta=eps).item()
        near_1 = generalized_jsd(student, teacher, 2.0, mask, beta=1.0 - eps).item()
        assert near_0 / eps == pytest.approx(at_0, rel=rel)
        assert near_1 / eps == pytest.approx(at_1, rel=rel)
        assert near_0 < 1e-3 * at_0 and near_1 < 1e-3 * at_1


@pytest.mark.parametrize("shape", ["BC", "BTV"])
@pytest.mark.parametrize("beta,reference", [(0.0, forward_kl), (1.0, reverse_kl)])
def test_jsd_gradients_at_the_endpoints_are_those_of_the_kl(shape, beta, reference):
    student, teacher, mask, _ = _endpoint_case(shape)
    student = student.clone().requires_grad_()
    generalized_jsd(student, teacher, 2.0, mask, beta=beta).backward()
    grad = student.grad.clone()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 1e-3
    student.grad = None
    reference(student, teacher, 2.0, mask).backward()
    assert torch.allclose(grad, student.grad, rtol=1e-5, atol=1e-8)


def test_jsd_symmetry():
    half = generalized_jsd(STUDENT, TEACHER, 1.0, MASK, beta=0.5).item()
    assert half > 0
    assert generalized_jsd(TEACHER, STUDENT, 1.0, MASK, beta=0.5).item() == pytest.approx(half, rel=1e-6)
    # Swapping the roles maps beta to 1 - beta, endpoints included (forward KL of one is reverse KL of the other).
    for beta in (0.0, 0.2, 1.0):
        assert generalized_jsd(TEACHER, STUDENT, 1.0, MASK, beta=beta).item() == pytest.approx(
            generalized_jsd(STUDENT, TEACHER, 1.0, MASK, beta=1.0 - beta).item(), rel=1e-6
        )
    # JSD at beta = 0.5 is bounded by ln 2.
    assert half <= math.log(2.0)
    with pytest.raises(ConfigError, match="beta"):
        generalized_jsd(STUDENT, TEACHER, 1.0, beta=1.5)


def test_skew_kl_limits_equal_plain_kl():
    assert skew_forward_kl(STUDENT, TEACHER, 2.0, MASK, alpha=0.0).item() == pytest.approx(
        forward_kl(STUDENT, TEACHER, 2.0, MASK).item(), rel=1e-6
    )
    assert skew_reverse_kl(STUDENT, TEACHER, 2.0, MASK, alpha=0.0).item() == pytest.approx(
        reverse_kl(STUDENT, TEACHER, 2.0, MASK).item(), rel=1e-6
    )
    for fn in (skew_forward_kl, skew_reverse_kl):
        assert fn(STUDENT, TEACHER, 2.0, MASK, alpha=1.0).item() == pytest.approx(0.0, abs=1e-7)
        # Skewing bounds the divergence: smaller than the plain KL.
        assert fn(STUDENT, TEACHER, 2.0, MASK, alpha=0.1).item() < fn(STUDENT, TEACHER, 2.0, MASK, alpha=0.0).item()
        with pytest.raises(ConfigError, match="alpha"):
            fn(STUDENT, TEACHER, 2.0, alpha=-0.1)


@pytest.mark.parametrize("kind", LOGIT_LOSSES)
def test_bf16_inputs_computed_in_float32_and_extreme_logits_finite(kind):
    value = _call(kind, STUDENT.bfloat16(), TEACHER.bfloat16(), 2.0, MASK)
    assert value.dtype == torch.float32
    expected = _reference(kind, STUDENT.bfloat16().float(), TEACHER.bfloat16().float(), 2.0, MASK)
    assert value.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    student = torch.tensor([[80.0, -80.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[-80.0, 80.0, 0.0]])
    out = _call(kind, student, teacher, 1.0)
    out.backward()
    assert math.isfinite(out.item()) and torch.isfinite(student.grad).all()


# ---------------------------------------------------------------- vocabulary alignment


def test_align_vocab_truncates_padding_rows_and_refuses_mismatch():
    student = torch.randn(2, 3, 10)
    teacher = torch.randn(2, 3, 16)
    s, t = align_vocab(student, teacher)
    assert s.shape == t.shape == (2, 3, 10) and torch.equal(t, teacher[..., :10])
    s, t = align_vocab(student, teacher, shared_vocab=7)
    assert s.shape == t.shape == (2, 3, 7) and torch.equal(s, student[..., :7])
    s, t = align_vocab(student, teacher, student_vocab=9, teacher_vocab=9)
    assert s.shape[-1] == t.shape[-1] == 9
    same_s, same_t = align_vocab(student, student)
    assert same_s is student and same_t is student
    with pytest.raises(ConfigError, match=r"shared vocabulary size 12.*student width 10.*teacher width 16"):
        align_vocab(student, teacher, shared_vocab=12)
    with pytest.raises(ConfigError, match=r"student vocabulary \(9\).*teacher vocabulary \(11\)"):
        align_vocab(student, teacher, student_vocab=9, teacher_vocab=11)
    with pytest.raises(ConfigError, match="leading dims"):
        align_vocab(student, torch.randn(2, 4, 16))


class _FakeTokenizer:
    def __init__(self, vocab):
        self.vocab = dict(vocab)

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)


def test_check_vocab_compatible():
    vocab = {"a": 0, "b": 1, "c": 2}
    assert check_vocab_compatible(_FakeTokenizer(vocab), _FakeTokenizer(vocab)) == 3
    with pytest.raises(ConfigError, match=r"teacher vocabulary 3 tokens, student vocabulary 4 tokens.*'d'"):
        check_vocab_compatible(_FakeTokenizer(vocab), _FakeTokenizer({**vocab, "d": 3}))
    with pytest.raises(ConfigError, match=r"'a': teacher 0 / student 1"):
        check_vocab_compatible(_FakeTokenizer(vocab), _FakeTokenizer({"a": 1, "b": 0, "c": 2}))


def test_kd_term_aligns_vocab_before_computing():
    labels = torch.tensor([[-100, 1, 2], [-100, -100, 0]])
    student = torch.randn(2, 3, 5)
    teacher = torch.randn(2, 3, 8)
    term = LogitKD(temperature=2.0, kind="reverse_kl")
    mask = torch.tensor([[True, True, False], [False, True, False]])
    expected = _reference("reverse_kl", student, teacher[..., :5], 2.0, mask)
    assert term(student, teacher, labels).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match=r"shared vocabulary size 6.*student width 5.*teacher width 8"):
        LogitKD(kind="jsd", shared_vocab=6)(student, teacher, labels)


def test_unknown_kind_is_refused_with_valid_names():
    names = "forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl"
    with pytest.raises(ConfigError, match=names):
        LogitKD(kind="tvd")
    with pytest.raises(ConfigError, match=names):
        build_objective("kd", student_hidden=2, teacher_hidden=2, logit_loss="symmetric_kl")
    with pytest.raises(ConfigError, match="beta"):
        build_objective("kd", student_hidden=2, teacher_hidden=2, logit_loss="jsd", jsd_beta=2.0)


# ---------------------------------------------------------------- the objective on causal-LM logits

LABELS = torch.tensor([[-100, -100, 3, 1], [-100, 2, 0, -100]])  # -100 on prompt and padding
RESPONSE_ROWS = torch.tensor([[False, True, True, False], [True, True, False, False]])


def _lm_batch(seed=0, vocab=4):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 4, vocab, generator=g, requires_grad=True)
    teacher = torch.randn(2, 4, vocab, generator=g, requires_grad=True)
    return student, teacher


def _nll_np(student, labels):
    s = student.detach().double().numpy()
    losses = []
    for b in range(s.shape[0]):
        for t in range(s.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            p = _softmax(list(s[b, t]), 1.0)
            losses.append(-math.log(p[target]))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("kind", LOGIT_LOSSES)
def test_objective_composes_nll_and_tau2_kd_over_response_positions(kind):
    student, teacher = _lm_batch()
    objective = build_objective(
        "kd", alpha=0.4, temperature=2.0, student_hidden=2, teacher_hidden=2,
        logit_loss=kind, jsd_beta=0.3, skew_alpha=0.2,
    )
    total, terms = objective(student_logits=student, teacher_logits=teacher, labels=LABELS)
    nll = _nll_np(student, LABELS)
    kd = _reference(kind, student.detach(), teacher.detach(), 2.0, RESPONSE_ROWS, beta=0.3, alpha=0.2)
    assert terms["task"].item() == pytest.approx(nll, rel=1e-5)
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-5, abs=1e-7)
    assert total.item() == pytest.approx(0.6 * nll + 0.4 * 4.0 * kd, rel=1e-5)

    # Prompt (and last) positions carry no loss: changing their logits changes nothing.
    s2, t2 = student.detach().clone(), teacher.detach().clone()
    s2[~RESPONSE_ROWS] = torch.tensor([50.0, -50.0, 3.0, 0.0])
    t2[~RESPONSE_ROWS] = torch.tensor([-50.0, 50.0, 0.0, 7.0])
    total2, _ = objective(student_logits=s2, teacher_logits=t2, labels=LABELS)
    assert total2.item() == pytest.approx(total.item(), rel=1e-6)

    # Gradients reach the student logits (response rows only), never the teacher.
    total.backward()
    assert teacher.grad is None
    assert student.grad[RESPONSE_ROWS].abs().sum() > 0
    assert student.grad[~RESPONSE_ROWS].abs().sum() == 0


def test_objective_truncates_padded_teacher_vocab():
    student, _ = _lm_batch(vocab=4)
    _, teacher = _lm_batch(seed=1, vocab=8)
    objective = build_objective("kd", alpha=1.0, temperature=1.0, student_hidden=2, teacher_hidden=2, shared_vocab=4)
    _, terms = objective(student_logits=student, teacher_logits=teacher, labels=LABELS)
    expected = _reference("forward_kl", student.detach(), teacher.detach()[..., :4], 1.0, RESPONSE_ROWS)
    assert terms["kd"].item() == pytest.approx(expected, rel=1e-5)
