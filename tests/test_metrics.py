"""Metrics against hand-computed values; model costs on models small enough to count by hand."""

from __future__ import annotations

import logging
import math
import time

import pytest
import torch
from torch import nn

from kdcli.metrics import (
    classification_metrics,
    confusion_matrix,
    count_flops,
    count_params,
    latency_policy,
    measure_latencies,
    measure_latency_ms,
    model_size_bytes,
    profile_model,
    time_models,
)

# 4 samples, 3 classes. Argmax preds [0, 0, 1, 1] against targets [0, 1, 2, 1].
LOGITS = torch.tensor(
    [
        [3.0, 1.0, 0.0],
        [2.0, 1.0, 0.0],
        [0.0, 2.0, 1.0],
        [0.0, 3.0, 1.0],
    ]
)
TARGETS = torch.tensor([0, 1, 2, 1])


def test_top1_and_types():
    m = classification_metrics(LOGITS, TARGETS)
    assert set(m) == {"top1", "top5", "macro_f1"}
    assert type(m["top1"]) is float and type(m["macro_f1"]) is float
    assert m["top1"] == pytest.approx(50.0)  # samples 0 and 3


@pytest.mark.parametrize("num_classes", [2, 5])
def test_top5_is_none_with_five_classes_or_fewer(num_classes):
    # The top 5 of 5 classes hold every class: random logits scored 100 % top-5.
    logits = torch.randn(20, num_classes)
    m = classification_metrics(logits, torch.randint(0, num_classes, (20,)))
    assert m["top5"] is None
    assert classification_metrics(logits[:0], torch.zeros(0))["top5"] is None


def test_ties_are_broken_by_argmax_everywhere():
    # bf16-rounded logits tie often; topk's first column and argmax pick different classes on
    # a tie, so a model compared with itself read 89 % agreement and top-1 disagreed with the
    # confusion matrix (built from argmax).
    torch.manual_seed(0)
    logits = torch.randn(2000, 10).round()  # integers in a narrow range: many tied maxima
    targets = torch.randint(0, 10, (2000,))
    tied = (logits == logits.max(dim=1, keepdim=True).values).sum(dim=1) > 1
    assert tied.float().mean() > 0.1
    m = classification_metrics(logits, targets, teacher_logits=logits)
    assert m["agreement"] == 100.0
    preds = logits.argmax(dim=1)
    assert m["top1"] == pytest.approx(preds.eq(targets).float().mean().item() * 100)
    cm = confusion_matrix(preds, targets, 10)
    assert m["top1"] == pytest.approx(cm.diagonal().sum().item() / 2000 * 100)
    assert m["top5"] >= m["top1"]


def test_top5_counts_an_argmax_tied_out_of_the_top5():
    # Tied classes: topk(5) may leave out class 0, which argmax (the prediction) picks.
    logits = next(torch.zeros(1, c) for c in range(6, 64)
                  if 0 not in torch.zeros(1, c).topk(5, dim=1).indices)
    m = classification_metrics(logits, torch.tensor([0]))
    assert m["top1"] == 100.0 and m["top5"] == 100.0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_logits_give_nan_metrics_and_a_warning(bad, caplog):
    # An all-NaN row's argmax is class 0: the metrics looked plausible and hid the overflow.
    logits = torch.randn(8, 10)
    logits[3, 2] = bad
    targets = torch.zeros(8, dtype=torch.long)
    with caplog.at_level(logging.WARNING, logger="kdcli.metrics"):
        m = classification_metrics(logits, targets, teacher_logits=torch.randn(8, 10),
                                   name="student resnet8")
    assert all(math.isnan(m[k]) for k in ("top1", "top5", "macro_f1", "agreement"))
    assert "student resnet8: 1 of 8 rows of logits are not finite" in caplog.text
    nan_teacher = torch.full((8, 10), math.nan)
    m = classification_metrics(torch.randn(8, 10), targets, teacher_logits=nan_teacher)
    assert math.isnan(m["agreement"]) and not math.isnan(m["top1"])


def test_top5_uses_five_when_more_classes():
    # Ranking 6 > 5 > 4 > 3 > 2 > 1 > 0: class 2 is in the top 5, class 1 is not.
    logits = torch.arange(7.0).repeat(2, 1)
    m = classification_metrics(logits, torch.tensor([2, 1]))
    assert m["top1"] == pytest.approx(0.0)
    assert m["top5"] == pytest.approx(50.0)


def test_macro_f1_hand_computed():
    # class 0: tp=1 fp=1 fn=0 -> 2/3; class 1: tp=1 fp=1 fn=1 -> 1/2; class 2: tp=0 -> 0.
    expected = (2 / 3 + 1 / 2 + 0) / 3 * 100  # 38.888...
    assert classification_metrics(LOGITS, TARGETS)["macro_f1"] == pytest.approx(expected)


def test_macro_f1_absent_class_follows_sklearn_default():
    # preds [0, 2, 2, 1], targets [0, 0, 1, 1], 4 classes. Class 2 is only predicted (F1 = 0,
    # counted); class 3 is in neither, so sklearn's default labels leave it out of the mean.
    # f1_score([0, 0, 1, 1], [0, 2, 2, 1], average="macro", zero_division=0) == 4/9.
    logits = torch.tensor(
        [
            [5.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 5.0, 0.0],
            [0.0, 0.0, 5.0, 0.0],
            [0.0, 5.0, 0.0, 0.0],
        ]
    )
    m = classification_metrics(logits, torch.tensor([0, 0, 1, 1]))
    assert m["macro_f1"] == pytest.approx(400 / 9)  # 44.44, not 33.33 (class 3 counted as 0)
    assert m["top1"] == pytest.approx(50.0)


def test_agreement_with_teacher():
    teacher = torch.tensor(
        [
            [9.0, 0.0, 0.0],  # 0: agrees with student pred 0
            [0.0, 9.0, 0.0],  # 1: student says 0
            [0.0, 0.0, 9.0],  # 2: student says 1
            [0.0, 0.0, 9.0],  # 2: student says 1
        ]
    )
    m = classification_metrics(LOGITS, TARGETS, teacher_logits=teacher)
    assert m["agreement"] == pytest.approx(25.0)
    assert classification_metrics(LOGITS, TARGETS, teacher_logits=LOGITS)["agreement"] == 100.0


def test_shares_are_exact_ratios_of_counts():
    # 45 of 200 right read 22.499999403953552 (a float32 mean) in metrics CSVs and report.json.
    targets = torch.zeros(200, dtype=torch.long)
    logits = torch.zeros(200, 10)
    logits[:45, 0] = 1.0  # 45 right at top-1 (the rest predict class 1)
    logits[45:, 1] = 1.0
    logits[45:51, 0] = 0.5  # 6 more among the top 5
    logits[45:51, 2:5] = 0.6
    teacher = torch.zeros(200, 10)
    teacher[:153, 1] = 1.0  # agrees with the student on 153 - 45 = 108 rows
    m = classification_metrics(logits, targets, teacher_logits=teacher)
    assert (m["top1"], m["top5"], m["agreement"]) == (22.5, 25.5, 54.0)


def test_perfect_predictions():
    m = classification_metrics(torch.eye(6) * 4, torch.arange(6))
    assert m == pytest.approx({"top1": 100.0, "top5": 100.0, "macro_f1": 100.0})


def test_confusion_matrix_rows_true_cols_pred():
    cm = confusion_matrix(torch.tensor([0, 0, 1, 1]), TARGETS, num_classes=3)
    assert cm.dtype == torch.int64
    expected = torch.tensor(
        [
            [1, 0, 0],  # true 0 -> pred 0
            [1, 1, 0],  # true 1 -> pred 0 once, pred 1 once
            [0, 1, 0],  # true 2 -> pred 1
        ]
    )
    assert torch.equal(cm, expected)
    assert int(cm.sum()) == 4


def test_count_params_linear():
    assert count_params(nn.Linear(10, 5)) == 55


def test_count_flops_linear_is_two_macs():
    assert count_flops(nn.Linear(10, 5), (10,)) == 100


def test_count_flops_restores_modes():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout())
    model.train()
    model[1].eval()  # e.g. frozen BatchNorm statistics inside a training model
    count_flops(model, (4,))
    assert model.training and model[0].training and model[2].training
    assert not model[1].training

    model.eval()
    count_flops(model, (4,))
    assert not any(m.training for m in model.modules())


def test_model_size_grows_with_params():
    small, big = model_size_bytes(nn.Linear(10, 5)), model_size_bytes(nn.Linear(100, 50))
    assert 0 < small < big
    assert big >= 5050 * 4  # holds at least its fp32 weights


def test_latency_leaves_caller_model_untouched():
    model = nn.Linear(10, 5).double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ms = measure_latency_ms(model, (10,), warmup=1, iters=3)
    assert ms > 0
    assert model.training
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_profile_model_keys():
    profile = profile_model(nn.Linear(10, 5), (10,))
    # No latency: it is timed under the load check (time_models), not beside the costs.
    assert set(profile) == {"params", "flops", "macs", "size_bytes"}
    # A multiply-add is 2 FLOPs; papers often quote MACs as "FLOPs", hence both.
    assert profile["params"] == 55 and profile["flops"] == 100 and profile["macs"] == 50
    assert profile["size_bytes"] > 0


def test_latency_is_timed_with_the_asked_threads_and_restores_the_count(monkeypatch):
    # Timed with torch's thread count as the run left it, the same model got another latency on
    # a GPU run (threads never set) or under torchrun (one thread per rank) than on the CPU.
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    before = torch.get_num_threads()
    measure_latency_ms(Probe(), (4,), warmup=1, iters=2, threads=1)
    assert seen == [1, 1, 1] and torch.get_num_threads() == before
    seen.clear()
    monkeypatch.setattr("kdcli.device.usable_cores", lambda: 3)
    measure_latency_ms(Probe(), (4,), warmup=0, iters=2)
    assert seen == [3, 3] and torch.get_num_threads() == before


def test_several_models_are_timed_in_turn_with_the_order_rotating():
    # Timed one after the other, a teacher and its student could see different machines (clock
    # or neighbours changing between them), and the report's latency speedup with them.
    calls = []

    class Probe(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    ms = measure_latencies([Probe("t"), Probe("s")], (4,), warmup=1, iters=3,
                           threads=1).median_ms
    assert len(ms) == 2 and all(m > 0 for m in ms)
    assert calls == ["t", "s", "t", "s", "s", "t", "t", "s"]  # warm-up, then rotating turns


def test_latencies_give_each_models_fastest_call_beside_its_median():
    # The speed-up divides the fastest calls: medians of a teacher and a student on a busy
    # machine swung a speed-up from 2.9x to 12.4x across reports of one pair.
    delays = iter([0.0, 0.0] + [0.012, 0.002, 0.012])  # warm-up, then the timed calls

    class Probe(nn.Module):
        def forward(self, x):
            time.sleep(next(delays))
            return x

    timed = measure_latencies([Probe()], (4,), warmup=2, iters=3, threads=1)
    assert timed.threads == 1
    assert 2 <= timed.min_ms[0] < 8 <= timed.median_ms[0]


@pytest.mark.parametrize("load, threads, busy", [(1.0, 1, True), (0.3, 3, False),
                                                 (None, 3, False)])
def test_latency_policy_takes_one_thread_on_a_busy_machine(monkeypatch, caplog, load, threads,
                                                          busy):
    # The one policy kd train's report, kd eval and kd export time under; None: /proc/stat
    # unreadable, so no busy check.
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    monkeypatch.setattr("kdcli.device.usable_cores", lambda: 3)
    monkeypatch.setattr("kdcli.device.machine_load", lambda: (load, 3))
    with caplog.at_level(logging.WARNING, logger="kdcli.metrics"):
        timed, policy = time_models([Probe(), Probe()], (4,), warmup=1, iters=2)
    assert set(seen) == {threads} and timed.threads == threads
    assert policy.record() == {"threads": threads, "other_load": load, "cpus": 3, "busy": busy}
    assert ("the machine is busy (other processes used 1.0 of 3 CPUs)" in caplog.text) == busy
    assert policy.describe() == (
        "1 thread, on a busy machine: other processes used 1.0 of 3 CPUs" if busy
        else "3 threads")
    assert latency_policy() == policy
