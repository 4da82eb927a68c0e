"""engine.fit's checkpoint state: what a resume restores, on the device the run uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdcli import checkpoint, engine
from kdcli.errors import TrainingDiverged
from kdcli.losses.ce import CrossEntropy
from tests.test_speed import setup


def fit(tmp_path: Path, epochs: int) -> engine.FitResult:
    step, loader = setup(torch.device("cpu"))
    return engine.fit(model=step.model, train_loader=loader, val_loader=None,
                      loss_fn=CrossEntropy(), optimizer=step.optimizer, scheduler=step.scheduler,
                      runtime=step.runtime, epochs=epochs, out_dir=tmp_path)


def test_cpu_run_on_a_gpu_host_keeps_no_gpu_rng_and_resumes_old_checkpoints(tmp_path,
                                                                           monkeypatch):
    # kd saved every visible GPU's RNG state whenever CUDA was available, even for CPU runs, and
    # restored them all: a resume that saw fewer GPUs died with an IndexError.
    def no_gpu_rng(*args, **kwargs):
        raise AssertionError("a CPU run must not read or set GPU RNG state")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, no_gpu_rng)
    first = fit(tmp_path, epochs=1)
    assert first.resumed_from is None
    state = checkpoint.load(tmp_path / "last.pt")
    assert "rng_cuda" not in state
    # A last.pt from older kd: one CUDA RNG state per GPU of the machine that wrote it.
    state["rng_cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8
    checkpoint.save(state, tmp_path / "last.pt")
    resumed = fit(tmp_path, epochs=2)
    assert resumed.resumed_from == 0 and len(resumed.history) == 2


def test_history_rows_carry_timing_after_the_metrics(tmp_path):
    rows = fit(tmp_path, epochs=2).history
    assert [r["epoch"] for r in rows] == [1, 2]
    assert list(rows[0])[-2:] == ["time_s", "images_per_s"]
    assert rows[0]["images_per_s"] == pytest.approx(64 / rows[0]["time_s"])
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0].endswith("time_s,images_per_s")


class NaNLoss(CrossEntropy):
    def forward(self, student, teacher, targets):
        out = super().forward(student, teacher, targets)
        return {**out, "loss": out["loss"] * float("nan")}


@pytest.mark.parametrize("precision, advice", [("fp32", False), ("bf16", True)])
def test_nan_advice_names_fp32_only_for_mixed_precision(tmp_path, precision, advice):
    # An fp32 run was told to "use precision fp32".
    step, loader = setup(torch.device("cpu"), precision=precision, loss=NaNLoss())
    with pytest.raises(TrainingDiverged) as err:
        engine.fit(model=step.model, train_loader=loader, val_loader=None, loss_fn=step.loss_fn,
                   optimizer=step.optimizer, scheduler=step.scheduler, runtime=step.runtime,
                   epochs=1, out_dir=tmp_path)
    assert "loss became NaN/inf at epoch 1, step 1" in str(err.value)
    assert ("or use precision fp32" in str(err.value)) is advice
