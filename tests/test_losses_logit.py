"""Logit-only losses (LogitMSE, DKD, DIST, LogitStandardKD) against hand computations on 2x3
logits, and every shipped loss config bound to its target."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import kdcli.configs
from kdcli.losses.base import DistillationLoss, Outputs
from kdcli.losses.dist import DIST
from kdcli.losses.dkd import DKD
from kdcli.losses.hinton import HintonKD
from kdcli.losses.lskd import LogitStandardKD, standardize
from kdcli.losses.mse import LogitMSE

LOSS_YAMLS = sorted((Path(kdcli.configs.__file__).parent / "loss").glob("*.yaml"))

STUDENT = [[1.0, 2.0, 0.5], [-1.0, 0.0, 3.0]]
TEACHER = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]
TARGETS = [1, 2]
# DIST's intra term correlates each class column across the batch; with two samples every
# centred column is (d, -d) and the correlation is just +-1, so its tests use a third sample.
STUDENT3 = [*STUDENT, [0.5, -1.0, 1.0]]
TEACHER3 = [*TEACHER, [0.0, -0.5, 2.5]]
TARGETS3 = [*TARGETS, 0]


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def _ce(student, targets) -> float:
    return sum(-math.log(_softmax(s)[y]) for s, y in zip(student, targets, strict=True)) / len(
        student)


def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    da, db = [v - ma for v in a], [v - mb for v in b]
    cov = sum(x * y for x, y in zip(da, db, strict=True))
    return cov / (math.sqrt(sum(x * x for x in da)) * math.sqrt(sum(y * y for y in db)))


def manual_mse(student, teacher) -> float:
    diffs = [(s - t) ** 2 for rs, rt in zip(student, teacher, strict=True)
             for s, t in zip(rs, rt, strict=True)]
    return sum(diffs) / len(diffs)


def manual_dkd(student, teacher, targets, temperature) -> tuple[float, float]:
    """(TCKD, NCKD): the target class split off as a binary KL, the rest renormalised."""
    tckd, nckd = 0.0, 0.0
    for s, t, y in zip(student, teacher, targets, strict=True):
        p_s = _softmax([v / temperature for v in s])
        p_t = _softmax([v / temperature for v in t])
        tckd += _kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
        # Non-target distribution: drop class y and renormalise (softmax of the other logits).
        q_s = _softmax([v / temperature for c, v in enumerate(s) if c != y])
        q_t = _softmax([v / temperature for c, v in enumerate(t) if c != y])
        nckd += _kl(q_t, q_s)
    n = len(student)
    return tckd / n * temperature**2, nckd / n * temperature**2


def _zscore(row: list[float]) -> list[float]:
    """(v - mean) / std over the row, std with Bessel's correction (divides by C - 1)."""
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / std for v in row]


def manual_lskd(student, teacher, temperature) -> float:
    """Batch-mean KL(softmax(z(t) / T) || softmax(z(s) / T)) times T^2, z the row's z-score."""
    kl = sum(_kl(_softmax([v / temperature for v in _zscore(t)]),
                 _softmax([v / temperature for v in _zscore(s)]))
             for s, t in zip(student, teacher, strict=True))
    return kl / len(student) * temperature**2


def manual_dist(student, teacher, temperature) -> tuple[float, float]:
    """(inter, intra), both times T^2: 1 - mean Pearson over rows, then over columns."""
    y_s = [_softmax([v / temperature for v in r]) for r in student]
    y_t = [_softmax([v / temperature for v in r]) for r in teacher]
    rows = [_pearson(a, b) for a, b in zip(y_s, y_t, strict=True)]
    cols = [_pearson([r[c] for r in y_s], [r[c] for r in y_t]) for c in range(len(y_s[0]))]
    inter = 1 - sum(rows) / len(rows)
    intra = 1 - sum(cols) / len(cols)
    return temperature**2 * inter, temperature**2 * intra


def run(loss, student=STUDENT, teacher=TEACHER, targets=TARGETS):
    s = torch.tensor(student, requires_grad=True)
    t = torch.tensor(teacher, requires_grad=True)
    out = loss(Outputs(s), Outputs(t), torch.tensor(targets))
    return out, s, t


# --- hand computations ----------------------------------------------------------------------

def test_mse_matches_manual_formula():
    out, _, _ = run(LogitMSE(ce_weight=0.3, kd_weight=0.7))
    kd, ce = manual_mse(STUDENT, TEACHER), _ce(STUDENT, TARGETS)
    # Squared differences are 1,1,0.25 and 2.25,0.25,1 -> mean 5.75 / 6 over all 6 elements.
    assert kd == pytest.approx(5.75 / 6)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-6)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.3 * ce + 0.7 * kd, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_dkd_matches_manual_formula(temperature):
    out, _, _ = run(DKD(ce_weight=0.5, alpha=1.5, beta=8.0, temperature=temperature))
    tckd, nckd = manual_dkd(STUDENT, TEACHER, TARGETS, temperature)
    ce = _ce(STUDENT, TARGETS)
    assert out["tckd"].item() == pytest.approx(tckd, rel=1e-5)
    assert out["nckd"].item() == pytest.approx(nckd, rel=1e-5)
    assert out["kd"].item() == pytest.approx(1.5 * tckd + 8.0 * nckd, rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.5 * ce + 1.5 * tckd + 8.0 * nckd, rel=1e-5)


@pytest.mark.parametrize("row", [0, 1])
def test_dkd_decomposes_hinton_kd(row):
    # The paper's Eq. 1, per sample: KD = TCKD + (1 - p_t[y]) * NCKD.
    s, t, y = [STUDENT[row]], [TEACHER[row]], [TARGETS[row]]
    dkd, _, _ = run(DKD(temperature=2.0), student=s, teacher=t, targets=y)
    hinton, _, _ = run(HintonKD(temperature=2.0), student=s, teacher=t, targets=y)
    p_t_target = _softmax([v / 2.0 for v in t[0]])[y[0]]
    recombined = dkd["tckd"] + (1 - p_t_target) * dkd["nckd"]
    assert recombined.item() == pytest.approx(hinton["kd"].item(), rel=1e-5)


def test_dkd_nckd_ignores_the_target_logit():
    # The target class is masked out of NCKD, so moving the student's target logit changes
    # TCKD only.
    moved = [row[:] for row in STUDENT]
    moved[0][TARGETS[0]] += 3.0
    moved[1][TARGETS[1]] -= 2.0
    base, _, _ = run(DKD())
    after, _, _ = run(DKD(), student=moved)
    assert after["nckd"].item() == pytest.approx(base["nckd"].item(), rel=1e-5)
    assert after["tckd"].item() != pytest.approx(base["tckd"].item(), rel=1e-3)


def test_dkd_nckd_drops_the_target_class_at_any_temperature():
    # The official -1000 on the target logit (after / T) stopped removing it once a row's
    # logits / T spanned more than ~1000: at T=0.005, NCKD read 996.6 where it is 0.
    student, teacher, targets = [[10.0, 0.0, 0.0]], [[0.0, 5.0, 5.0]], [0]
    out, _, _ = run(DKD(temperature=0.005), student=student, teacher=teacher, targets=targets)
    assert out["nckd"].item() == pytest.approx(0.0, abs=1e-6)
    _, nckd = manual_dkd([[10.0, 0.0, 1.0]], [[0.0, 5.0, 5.01]], targets, 0.5)
    out, _, _ = run(DKD(temperature=0.5), student=[[10.0, 0.0, 1.0]], teacher=[[0.0, 5.0, 5.01]],
                    targets=targets)
    assert out["nckd"].item() == pytest.approx(nckd, rel=1e-5)


@pytest.mark.parametrize("warmup, epochs, ramps", [
    (4, 10, [0.25, 0.5, 0.75, 1.0, 1.0]),
    (0, 10, [1.0, 1.0]),  # no ramp
    ("auto", 240, [1 / 20, 2 / 20, 3 / 20]),  # the official 20 of 240 epochs
    ("auto", 15, [0.8, 1.0]),  # the same share of a short run: 15 / 12 = 1.25 epochs
])
def test_dkd_warmup_ramps_the_dkd_term_in(warmup, epochs, ramps):
    loss = DKD(warmup_epochs=warmup)
    full, _, _ = run(DKD(warmup_epochs=0))
    for epoch, ramp in enumerate(ramps):
        loss.start_epoch(epoch, epochs)
        out, _, _ = run(loss)
        assert out["kd"].item() == pytest.approx(ramp * full["kd"].item(), rel=1e-6)
        assert out["loss"].item() == pytest.approx(out["ce"].item() + out["kd"].item(), rel=1e-6)
        # The logged terms are the unramped ones; only their weight in the loss ramps.
        assert out["nckd"].item() == pytest.approx(full["nckd"].item(), rel=1e-6)


def test_dkd_warmup_longer_than_the_run_is_reported(caplog):
    with caplog.at_level("WARNING", logger="kdcli.losses.dkd"):
        DKD(warmup_epochs=10).start_epoch(0, 10)  # reaches its full weight in the last epoch
        assert not caplog.text
        DKD(warmup_epochs=20).start_epoch(0, 10)
    assert "loss.warmup_epochs=20 is longer than the run (10 epochs)" in caplog.text
    assert "0.50 of its weight" in caplog.text
    with pytest.raises(ValueError, match="warmup_epochs"):
        DKD(warmup_epochs=-1)


@pytest.mark.parametrize("rank, warns", [("0", True), ("1", False)])
def test_dkd_warmup_warning_comes_from_rank_0_alone(caplog, monkeypatch, rank, warns):
    # Under torchrun every rank builds the loss and starts its epochs: each logged the warning
    # (the other ranks keep their warnings), once per process.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    with caplog.at_level("WARNING", logger="kdcli.losses.dkd"):
        loss = DKD(warmup_epochs=20)
        loss.start_epoch(0, 10)
    assert ("loss.warmup_epochs=20 is longer than the run" in caplog.text) is warns
    assert loss.ramp == pytest.approx(1 / 20)  # every rank ramps the term alike


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dist_matches_manual_formula(temperature):
    out, _, _ = run(DIST(ce_weight=0.5, beta=2.0, gamma=3.0, temperature=temperature),
                    student=STUDENT3, teacher=TEACHER3, targets=TARGETS3)
    inter, intra = manual_dist(STUDENT3, TEACHER3, temperature)
    assert intra > 1e-3 * temperature**2  # a non-degenerate value is being checked
    ce = _ce(STUDENT3, TARGETS3)
    # The implementation's eps=1e-8 in the correlation's denominator is well below rel 1e-4 here.
    assert out["inter"].item() == pytest.approx(inter, rel=1e-4)
    assert out["intra"].item() == pytest.approx(intra, rel=1e-4)
    assert out["kd"].item() == pytest.approx(2.0 * inter + 3.0 * intra, rel=1e-4)
    assert out["loss"].item() == pytest.approx(0.5 * ce + 2.0 * inter + 3.0 * intra, rel=1e-4)


def test_dist_perfectly_anticorrelated_columns():
    # Batch of two with swapped teacher rows: every class column of the teacher is the reverse
    # of the student's, so each column correlation is -1 and intra = T^2 * (1 - (-1)) = 2.
    out, _, _ = run(DIST(temperature=1.0), teacher=[STUDENT[1], STUDENT[0]])
    assert out["intra"].item() == pytest.approx(2.0, rel=1e-5)


# --- logit standardisation (LogitStandardKD) ----------------------------------------------------

def test_standardize_gives_zero_mean_unit_std_rows():
    gen = torch.Generator().manual_seed(0)
    logits = 5 * torch.randn(4, 10, generator=gen) + 3
    z = standardize(logits)
    torch.testing.assert_close(z.mean(dim=1), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.std(dim=1), torch.ones(4))
    # The std divides by C - 1 (torch's default, as the official code): [0, 1, 2] has std 1.
    # Dividing by C would give +-1.2247.
    torch.testing.assert_close(standardize(torch.tensor([[0.0, 1.0, 2.0]])),
                               torch.tensor([[-1.0, 0.0, 1.0]]))


def test_standardize_ignores_shift_and_positive_scale():
    x = torch.tensor(TEACHER3)
    torch.testing.assert_close(standardize(3 * x + 5), standardize(x))
    torch.testing.assert_close(standardize(x / 7 - 2), standardize(x))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_lskd_matches_manual_formula(temperature):
    out, _, _ = run(LogitStandardKD(temperature=temperature, ce_weight=0.5, kd_weight=9.0))
    kd, ce = manual_lskd(STUDENT, TEACHER, temperature), _ce(STUDENT, TARGETS)
    assert kd > 1e-3  # a non-degenerate value is being checked
    # The implementation's eps=1e-7 on the std (here ~1) is well below rel 1e-5.
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.5 * ce + 9.0 * kd, rel=1e-5)


def test_lskd_kd_term_ignores_the_logits_scale_and_shift_hinton_does_not():
    # The method's point: the student matches the teacher's logit relations, not their range.
    scaled = [[3 * v + 5 for v in row] for row in TEACHER]
    lskd, _, _ = run(LogitStandardKD())
    lskd_scaled, _, _ = run(LogitStandardKD(), teacher=scaled)
    assert lskd["kd"].item() > 1e-3
    assert lskd_scaled["kd"].item() == pytest.approx(lskd["kd"].item(), rel=1e-5)
    hinton, _, _ = run(HintonKD(temperature=2.0))
    hinton_scaled, _, _ = run(HintonKD(temperature=2.0), teacher=scaled)
    assert hinton_scaled["kd"].item() != pytest.approx(hinton["kd"].item(), rel=1e-2)
    # Likewise on the student's side (its CE on the raw logits does change).
    student_scaled = [[0.5 * v - 1 for v in row] for row in STUDENT]
    moved, _, _ = run(LogitStandardKD(), student=student_scaled)
    assert moved["kd"].item() == pytest.approx(lskd["kd"].item(), rel=1e-5)
    assert moved["ce"].item() != pytest.approx(lskd["ce"].item(), rel=1e-2)


def test_lskd_zero_when_teacher_is_a_rescaled_student():
    out, _, _ = run(LogitStandardKD(), teacher=[[2 * v - 1 for v in row] for row in STUDENT])
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("student, teacher", [
    ([[1.0, 1.0, 1.0], STUDENT[1]], TEACHER),  # a constant student row
    (STUDENT, [[2.0, 2.0, 2.0], TEACHER[1]]),  # a constant teacher row: a uniform target
    ([[0.0, 0.0, 0.0], STUDENT[1]], [[5.0, 5.0, 5.0], TEACHER[1]]),
])
def test_lskd_constant_row_gives_a_finite_loss_and_gradient(student, teacher):
    # std 0: (z - mean) / std would be 0 / 0; the row standardises to zeros instead.
    assert standardize(torch.tensor([[3.0, 3.0, 3.0]])).tolist() == [[0.0, 0.0, 0.0]]
    out, s, t = run(LogitStandardKD(), student=student, teacher=teacher)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert torch.isfinite(s.grad).all() and t.grad is None


def test_lskd_standardizes_float16_logits_in_float32():
    # Cached teacher logits are float16; z-scores in float16 keep ~3 significant digits.
    x = torch.tensor([[1000.0, 1.0, 0.5], TEACHER[1]])
    z = standardize(x.half())
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, standardize(x.half().float()))
    out, _, _ = run(LogitStandardKD(), teacher=TEACHER)
    half = LogitStandardKD()(Outputs(torch.tensor(STUDENT)), Outputs(torch.tensor(TEACHER).half()),
                             torch.tensor(TARGETS))
    assert half["kd"].dtype == torch.float32
    assert half["kd"].item() == pytest.approx(out["kd"].item(), rel=1e-3)


# --- zero KD when student == teacher --------------------------------------------------------

def test_mse_and_dkd_zero_when_student_equals_teacher():
    mse, _, _ = run(LogitMSE(), teacher=STUDENT)
    assert mse["kd"].item() == 0.0
    dkd, _, _ = run(DKD(), teacher=STUDENT)
    assert dkd["tckd"].item() == 0.0
    assert dkd["nckd"].item() == 0.0
    assert dkd["kd"].item() == 0.0
    assert dkd["loss"].item() == pytest.approx(dkd["ce"].item(), abs=1e-7)


@pytest.mark.parametrize("temperature, tol", [(1.0, 1e-6), (4.0, 1e-4)])
def test_dist_zero_when_student_equals_teacher(temperature, tol):
    # Not exactly 0: the official rho = cov / (std * std + 1e-8) gives 1 - rho ~ 1e-8 / |y - mean|^2
    # (then times T^2), and softening at T=4 leaves centred rows of norm^2 ~ 1e-3 on 3 classes.
    out, _, _ = run(DIST(temperature=temperature), student=STUDENT3, teacher=STUDENT3,
                    targets=TARGETS3)
    assert out["inter"].item() == pytest.approx(0.0, abs=tol)
    assert out["intra"].item() == pytest.approx(0.0, abs=tol)
    assert out["kd"].item() == pytest.approx(0.0, abs=2 * tol)


# --- T^2 factor ----------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda T: DKD(temperature=T), lambda T: DIST(temperature=T)])
def test_t_squared_factor(make):
    # Doubled logits at T=2 give the same softened distributions as T=1, so the kd term is 4x.
    doubled_s = [[2 * v for v in row] for row in STUDENT3]
    doubled_t = [[2 * v for v in row] for row in TEACHER3]
    at1, _, _ = run(make(1.0), student=STUDENT3, teacher=TEACHER3, targets=TARGETS3)
    at2, _, _ = run(make(2.0), student=doubled_s, teacher=doubled_t, targets=TARGETS3)
    assert at2["kd"].item() == pytest.approx(4 * at1["kd"].item(), rel=1e-5)


# --- gradients ------------------------------------------------------------------------------

LOSSES = {
    "mse": lambda: LogitMSE(ce_weight=0.5, kd_weight=0.5),
    "dkd": lambda: DKD(ce_weight=0.5, alpha=1.0, beta=8.0, temperature=4.0),
    "dist": lambda: DIST(ce_weight=0.5, beta=2.0, gamma=2.0, temperature=4.0),
    "lskd": lambda: LogitStandardKD(temperature=2.0, ce_weight=0.5, kd_weight=9.0),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_reach_student_only(name):
    out, s, t = run(LOSSES[name]())
    out["loss"].backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_kd_term_alone_has_student_gradient(name):
    out, s, t = run(LOSSES[name]())
    out["kd"].backward()
    assert t.grad is None
    assert s.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["dkd", "dist", "lskd"])
def test_softmax_losses_are_shift_invariant(name):
    # Each reads the logits only through softmax (lskd through their z-scores, shift-free too),
    # so each row's gradient sums to zero.
    out, s, _ = run(LOSSES[name]())
    out["kd"].backward()
    torch.testing.assert_close(s.grad.sum(-1), torch.zeros(2), atol=1e-6, rtol=0)


def test_mse_gradient_matches_formula():
    # d/ds mean((s - t)^2) = 2 (s - t) / (N * C)
    out, s, _ = run(LogitMSE(ce_weight=0.0, kd_weight=1.0))
    out["loss"].backward()
    expected = 2 * (torch.tensor(STUDENT) - torch.tensor(TEACHER)) / 6
    torch.testing.assert_close(s.grad, expected)


# --- weights, temperature, returned terms ---------------------------------------------------

def test_weights_isolate_terms():
    ce = _ce(STUDENT, TARGETS)
    tckd, nckd = manual_dkd(STUDENT, TEACHER, TARGETS, 4.0)
    assert run(DKD(ce_weight=1.0, alpha=0.0, beta=0.0))[0]["loss"].item() == pytest.approx(
        ce, rel=1e-6)
    assert run(DKD(ce_weight=0.0, alpha=1.0, beta=0.0))[0]["loss"].item() == pytest.approx(
        tckd, rel=1e-5)
    assert run(DKD(ce_weight=0.0, alpha=0.0, beta=1.0))[0]["loss"].item() == pytest.approx(
        nckd, rel=1e-5)
    inter, intra = manual_dist(STUDENT3, TEACHER3, 4.0)
    data = {"student": STUDENT3, "teacher": TEACHER3, "targets": TARGETS3}
    only_inter = run(DIST(ce_weight=0.0, beta=1.0, gamma=0.0, temperature=4.0), **data)[0]
    only_intra = run(DIST(ce_weight=0.0, beta=0.0, gamma=1.0, temperature=4.0), **data)[0]
    assert only_inter["loss"].item() == pytest.approx(inter, rel=1e-4)
    assert only_intra["loss"].item() == pytest.approx(intra, rel=1e-4)
    assert run(LogitMSE(ce_weight=0.0, kd_weight=1.0))[0]["loss"].item() == pytest.approx(
        manual_mse(STUDENT, TEACHER), rel=1e-6)


@pytest.mark.parametrize("cls", [DKD, DIST, LogitStandardKD])
@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_nonpositive_temperature_raises(cls, temperature):
    with pytest.raises(ValueError, match="temperature"):
        cls(temperature=temperature)


@pytest.mark.parametrize("cls, weight", [
    (HintonKD, "ce_weight"), (HintonKD, "kd_weight"), (LogitMSE, "ce_weight"),
    (LogitMSE, "kd_weight"), (DKD, "ce_weight"), (DKD, "alpha"), (DKD, "beta"),
    (DIST, "ce_weight"), (DIST, "beta"), (DIST, "gamma"), (LogitStandardKD, "ce_weight"),
    (LogitStandardKD, "kd_weight"),
])
def test_negative_weight_raises(cls, weight):
    # kd_weight=-1 trained the student away from the teacher without a word.
    with pytest.raises(ValueError, match=rf"^loss\.{weight} must be >= 0, got -1$"):
        cls(**{weight: -1})
    cls(**{weight: 0})  # 0 switches the term off


@pytest.mark.parametrize("name, terms", [
    ("mse", {"loss", "ce", "kd"}),
    ("dkd", {"loss", "ce", "kd", "tckd", "nckd"}),
    ("dist", {"loss", "ce", "kd", "inter", "intra"}),
    ("lskd", {"loss", "ce", "kd"}),
])
def test_returned_terms(name, terms):
    loss = LOSSES[name]()
    out, _, _ = run(loss)
    assert set(out) == terms
    assert all(v.ndim == 0 for v in out.values())
    assert loss.needs_teacher is True and loss.needs_features is False


# --- every shipped loss config binds to its target -------------------------------------------

def test_new_loss_configs_are_shipped():
    assert {"mse.yaml", "dkd.yaml", "dist.yaml", "lskd.yaml"} <= {p.name for p in LOSS_YAMLS}


@pytest.mark.parametrize("path", LOSS_YAMLS, ids=lambda p: p.stem)
def test_loss_config_builds_and_runs(path: Path):
    loss = instantiate(OmegaConf.load(path))
    assert isinstance(loss, DistillationLoss)
    if loss.needs_features:
        pytest.skip(f"{path.stem} reads teacher feature maps; its own tests feed them")
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 10, generator=gen, requires_grad=True)
    teacher = Outputs(torch.randn(4, 10, generator=gen)) if loss.needs_teacher else None
    targets = torch.randint(0, 10, (4,), generator=gen)
    out = loss(Outputs(student), teacher, targets)
    assert out["loss"].ndim == 0
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert torch.isfinite(student.grad).all()
