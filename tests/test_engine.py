"""engine.fit's checkpoint state: what a resume restores, on the device the run uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

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


def test_history_lr_is_the_rate_each_epoch_started_at(tmp_path):
    # Read after the epoch, a per-step schedule's last epoch showed lr 0.0 in metrics.csv
    # (cosine), as if it had not trained. 4 steps per epoch, the rate falling linearly to 0.
    step, loader = setup(torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(step.optimizer, lambda s: 1 - s / 8)
    rows = engine.fit(model=step.model, train_loader=loader, val_loader=None,
                      loss_fn=CrossEntropy(), optimizer=step.optimizer, scheduler=scheduler,
                      runtime=step.runtime, epochs=2, out_dir=tmp_path).history
    assert [r["lr"] for r in rows] == pytest.approx([0.01, 0.005])


class EpochRecorder(CrossEntropy):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.calls.append((epoch, epochs))


def test_fit_tells_the_loss_each_epoch_also_after_a_resume(tmp_path):
    # DKD's warmup weights its term by the epoch: a resumed run must continue the ramp.
    for epochs, expected in ((2, [(0, 2), (1, 2)]), (3, [(2, 3)])):
        step, loader = setup(torch.device("cpu"))
        loss = EpochRecorder()
        result = engine.fit(model=step.model, train_loader=loader, val_loader=None, loss_fn=loss,
                            optimizer=step.optimizer, scheduler=step.scheduler,
                            runtime=step.runtime, epochs=epochs, out_dir=tmp_path)
        assert loss.calls == expected
    assert result.resumed_from == 1


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


class NaNFromEpoch(CrossEntropy):
    """NaN from epoch `first` (0-based) on."""

    def __init__(self, first: int) -> None:
        super().__init__()
        self.first, self.epoch = first, 0

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.epoch = epoch

    def forward(self, student, teacher, targets):
        out = super().forward(student, teacher, targets)
        return {**out, "loss": out["loss"] * float("nan")} if self.epoch >= self.first else out


@pytest.mark.parametrize("first, says", [
    (0, "no epoch finished, so there is no checkpoint yet;"),
    (1, "the last good checkpoint is kept: {out}/last.pt;"),
])
def test_nan_error_says_whether_a_checkpoint_is_kept(tmp_path, first, says):
    # It said "the last good checkpoint is kept: (none yet)" when no epoch had finished.
    step, loader = setup(torch.device("cpu"), loss=NaNFromEpoch(first))
    with pytest.raises(TrainingDiverged) as err:
        engine.fit(model=step.model, train_loader=loader, val_loader=None, loss_fn=step.loss_fn,
                   optimizer=step.optimizer, scheduler=step.scheduler, runtime=step.runtime,
                   epochs=2, out_dir=tmp_path)
    assert f"at epoch {first + 1}, step 1; {says.format(out=tmp_path)}" in str(err.value)


def test_compiled_model_keeps_its_feature_taps_after_a_hookless_compile_of_its_class(
        monkeypatch):
    # Dynamo's default reuses code compiled for a model of the same class without checking
    # hooks: the teacher stage's (or baseline's) compiled ResNet lent its code to the FitNets
    # student, whose taps stayed empty (seen on an H100 with device.compile=true).
    import functools

    from kdcli.models.features import FeatureTap

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))

    def model() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))

    x = torch.randn(2, 3, 8, 8)
    # dynamo's default, restored after (not by monkeypatch: its undo deletes the setting from
    # dynamo's config module, and every later compile in the process fails)
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
        plain = engine.compiled(model())
        plain(x)
        tapped_model = model()
        taps = FeatureTap(tapped_model, ["1"])
        tapped = engine.compiled(tapped_model)
        for _ in range(2):  # interleaved with the hookless one, as the benchmark runs them
            tapped(x)
            assert list(taps.pop()) == ["1"]
            plain(x)
            assert taps.pop() == {}
    torch._dynamo.reset()


def test_fp16_skipped_first_step_does_not_warn_of_the_scheduler_order():
    # The GradScaler skips an optimizer step whose gradients overflowed (the first ones, while
    # it finds its scale); torch's scheduler then warned every fp16 run of a wrong call order.
    import warnings

    step, loader = setup(torch.device("cpu"), "fp16")
    with torch.no_grad():
        next(step.model.parameters()).fill_(float("inf"))  # this step's gradients overflow
    scale = step.scaler.get_scale()
    with warnings.catch_warnings(record=True) as seen:
        step(next(iter(loader.epoch(0))))
    assert step.scaler.get_scale() < scale  # the optimizer step was skipped
    assert not [w for w in seen if "lr_scheduler.step()" in str(w.message)]


def test_nan_logits_at_eval_time_still_leave_a_best_checkpoint(tmp_path):
    # The test top-1 of non-finite logits is NaN (kdcli.metrics), which is never > the best so
    # far: without a rule for it, no best.pt was written and the stage could not finish.
    step, loader = setup(torch.device("cpu"))
    step.model.register_forward_hook(
        lambda module, args, out: out if module.training else out * float("nan"))
    result = engine.fit(model=step.model, train_loader=loader, val_loader=loader,
                        loss_fn=CrossEntropy(), optimizer=step.optimizer,
                        scheduler=step.scheduler, runtime=step.runtime, epochs=2,
                        out_dir=tmp_path)
    assert all(r["val/top1"] != r["val/top1"] for r in result.history)  # NaN
    assert checkpoint.load(tmp_path / "best.pt")["epoch"] == 1  # the latest, none scored
