"""Losses against hand computations on 2x3 logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcli.losses.base import Outputs
from kdcli.losses.ce import CrossEntropy
from kdcli.losses.hinton import HintonKD

STUDENT = [[1.0, 2.0, 0.5], [-1.0, 0.0, 3.0]]
TEACHER = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]
TARGETS = [1, 2]


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def manual_hinton(student, teacher, targets, temperature, ce_weight, kd_weight):
    """Hinton KD written out with math: batch-mean KL(p_t || p_s) * T^2 plus CE."""
    kl_sum, ce_sum = 0.0, 0.0
    for s, t, y in zip(student, teacher, targets, strict=True):
        p_s = _softmax([v / temperature for v in s])
        p_t = _softmax([v / temperature for v in t])
        kl_sum += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
        ce_sum += -math.log(_softmax(s)[y])
    n = len(student)
    kd = kl_sum / n * temperature**2
    ce = ce_sum / n
    return ce_weight * ce + kd_weight * kd, ce, kd


def run(loss, student=STUDENT, teacher=TEACHER, targets=TARGETS):
    s = torch.tensor(student, requires_grad=True)
    t = torch.tensor(teacher, requires_grad=True)
    out = loss(Outputs(s), Outputs(t), torch.tensor(targets))
    return out, s, t


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_hinton_matches_manual_formula(temperature):
    out, _, _ = run(HintonKD(temperature=temperature, ce_weight=0.3, kd_weight=0.7))
    total, ce, kd = manual_hinton(STUDENT, TEACHER, TARGETS, temperature, 0.3, 0.7)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out["loss"].item() == pytest.approx(total, rel=1e-5)


def test_hinton_closed_form_value():
    # Student uniform over 3 classes; teacher at T=2 sees softmax(log([1,2,1])) = [1/4, 1/2, 1/4].
    # KL = 2 * 1/4 * ln(3/4) + 1/2 * ln(3/2) = 1/2 * ln(9/8); times T^2 = 4 -> 2 ln(9/8).
    # CE of a uniform row is ln 3.
    teacher = [[2 * math.log(v) for v in (1, 2, 1)], [2 * math.log(v) for v in (2, 1, 1)]]
    out, _, _ = run(HintonKD(temperature=2.0, ce_weight=1.0, kd_weight=1.0),
                    student=[[0.0, 0.0, 0.0]] * 2, teacher=teacher, targets=[0, 2])
    assert out["kd"].item() == pytest.approx(2 * math.log(9 / 8), rel=1e-5)
    assert out["ce"].item() == pytest.approx(math.log(3), rel=1e-6)
    assert out["loss"].item() == pytest.approx(math.log(3) + 2 * math.log(9 / 8), rel=1e-5)


def test_kd_term_zero_when_student_equals_teacher():
    out, _, _ = run(HintonKD(temperature=4.0), teacher=STUDENT)
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-7)
    assert out["loss"].item() == pytest.approx(out["ce"].item(), abs=1e-6)


def test_t_squared_factor():
    # Same softmax(t/T) and softmax(s/T) at T=1 and T=2 when the logits are doubled: the KL is
    # identical, so the kd term at T=2 is exactly 4x the one at T=1.
    doubled_s = [[2 * v for v in row] for row in STUDENT]
    doubled_t = [[2 * v for v in row] for row in TEACHER]
    at1, _, _ = run(HintonKD(temperature=1.0))
    at2, _, _ = run(HintonKD(temperature=2.0), student=doubled_s, teacher=doubled_t)
    assert at2["kd"].item() == pytest.approx(4 * at1["kd"].item(), rel=1e-5)
    _, _, manual_kd = manual_hinton(STUDENT, TEACHER, TARGETS, 2.0, 1.0, 1.0)
    assert run(HintonKD(temperature=2.0))[0]["kd"].item() == pytest.approx(manual_kd, rel=1e-5)


def test_gradients_reach_student_only():
    out, s, t = run(HintonKD(temperature=4.0, ce_weight=0.5, kd_weight=0.5))
    out["loss"].backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    # Each row of a softmax-based loss gradient sums to zero over classes.
    torch.testing.assert_close(s.grad.sum(-1), torch.zeros(2), atol=1e-6, rtol=0)


def test_kd_gradient_matches_formula():
    # d/ds [T^2 * KL(p_t || softmax(s/T))] / N = T * (p_s - p_t) / N
    temperature = 2.0
    out, s, _ = run(HintonKD(temperature=temperature, ce_weight=0.0, kd_weight=1.0))
    out["loss"].backward()
    p_s = torch.tensor([_softmax([v / temperature for v in r]) for r in STUDENT])
    p_t = torch.tensor([_softmax([v / temperature for v in r]) for r in TEACHER])
    torch.testing.assert_close(s.grad, temperature * (p_s - p_t) / 2, atol=1e-6, rtol=1e-5)


def test_weights_isolate_terms():
    _, ce, kd = manual_hinton(STUDENT, TEACHER, TARGETS, 4.0, 1.0, 1.0)
    only_kd, _, _ = run(HintonKD(temperature=4.0, ce_weight=0.0, kd_weight=1.0))
    only_ce, _, _ = run(HintonKD(temperature=4.0, ce_weight=1.0, kd_weight=0.0))
    assert only_kd["loss"].item() == pytest.approx(kd, rel=1e-5)
    assert only_ce["loss"].item() == pytest.approx(ce, rel=1e-5)
    # The unweighted terms are still reported for logging.
    assert only_kd["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert only_ce["kd"].item() == pytest.approx(kd, rel=1e-5)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_nonpositive_temperature_raises(temperature):
    with pytest.raises(ValueError, match="temperature"):
        HintonKD(temperature=temperature)


def test_hinton_needs_teacher():
    assert HintonKD.needs_teacher is True
    assert HintonKD().needs_features is False


def test_cross_entropy_equals_functional():
    s = torch.tensor(STUDENT)
    y = torch.tensor(TARGETS)
    out = CrossEntropy()(Outputs(s), None, y)
    torch.testing.assert_close(out["loss"], F.cross_entropy(s, y))
    assert out["ce"].item() == pytest.approx(
        (-math.log(_softmax(STUDENT[0])[1]) - math.log(_softmax(STUDENT[1])[2])) / 2, rel=1e-6)
    assert CrossEntropy.needs_teacher is False
    assert CrossEntropy().needs_teacher is False


def test_cross_entropy_label_smoothing():
    s = torch.tensor(STUDENT)
    y = torch.tensor(TARGETS)
    out = CrossEntropy(label_smoothing=0.1)(Outputs(s), None, y)
    torch.testing.assert_close(out["loss"], F.cross_entropy(s, y, label_smoothing=0.1))
