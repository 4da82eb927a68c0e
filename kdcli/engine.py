"""The one training and evaluation loop.

Everything that could branch inside the loop (precision, memory format, where teacher logits
come from) is decided before it: the loop calls `runtime.autocast()`, a scaler that is a no-op
unless fp16, and a `teacher` callable. The loop never calls `.item()` per step: running sums stay
on the device and are read once per epoch, so a GPU is never stalled waiting for the host.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kdcli import checkpoint
from kdcli.data.loader import Batch, BatchLoader
from kdcli.device import Runtime
from kdcli.errors import TrainingDiverged
from kdcli.losses.base import DistillationLoss, Outputs
from kdcli.models.features import FeatureTap
from kdcli.progress import Progress

log = logging.getLogger(__name__)

TeacherFn = Callable[[Batch], Outputs | None]


def no_teacher(batch: Batch) -> None:
    return None


@dataclass
class FitResult:
    history: list[dict[str, float]]
    resumed_from: int | None  # epoch the run resumed after, None for a fresh start
    best_top1: float
    train_time_s: float
    images_per_s: float = 0.0
    extra: dict = field(default_factory=dict)


@torch.inference_mode()
def predict(model: nn.Module, loader: BatchLoader, runtime: Runtime, view: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and labels for every sample of the loader, in order (`view`: which
    cached view a view-replaying loader shows)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in loader.epoch(0, view=view):
        with runtime.autocast():
            out = model(batch.images)
        logits.append(out.float())
        labels.append(batch.labels)
    model.train(was_training)
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


def scale_lr(optimizer: torch.optim.Optimizer, scheduler, factor: float) -> None:
    """Multiplies the learning rate, now and for the rest of the schedule."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    cols: list[str] = []
    for row in history:
        cols += [c for c in row if c not in cols]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(history)
    checkpoint.atomic_write_text(path, buf.getvalue())


def fit(
    *,
    model: nn.Module,
    train_loader: BatchLoader,
    val_loader: BatchLoader | None,
    loss_fn: DistillationLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    runtime: Runtime,
    epochs: int,
    out_dir: Path,
    teacher: TeacherFn = no_teacher,
    label: str = "train",
    checkpoint_extra: dict | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    student_taps: FeatureTap | None = None,
    nan_retries: int = 0,
    nan_lr_factor: float = 0.5,
    on_row: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Trains `model` for `epochs`, resuming from `out_dir/last.pt` when present.

    Writes `out_dir/last.pt` (full state, every epoch), `out_dir/best.pt` (weights with the best
    val/top1) and `out_dir/metrics.csv`. `student_taps` adds the named feature maps to the
    student's Outputs for feature losses; the loss's own state (e.g. a FitNets adapter) is saved
    and restored with the model. Raises TrainingDiverged on a non-finite loss, leaving the last
    good checkpoint in place, unless `nan_retries` allows going back to that checkpoint with
    the learning rate times `nan_lr_factor`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    scaler = runtime.grad_scaler()
    history: list[dict[str, float]] = []
    start_epoch, best_top1, resumed_from, elapsed = 0, -1.0, None, 0.0

    def snapshot(epoch: int) -> dict:
        """Everything a resumed run needs, as saved to last.pt."""
        state = {
            "model": model.state_dict(), "loss": loss_fn.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "best_top1": best_top1, "history": history,
            "train_time_s": elapsed, "rng_cpu": torch.get_rng_state(),
            **(checkpoint_extra or {}),
        }
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        return state

    def restore(state: dict) -> None:
        model.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and "rng_cuda" in state:
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    if last_path.exists():
        state = checkpoint.load(last_path)
        restore(state)
        start_epoch, best_top1 = state["epoch"] + 1, state["best_top1"]
        history, elapsed = list(state["history"]), state["train_time_s"]
        resumed_from = state["epoch"]
        log.info("%s: resuming from %s after epoch %d/%d", label, last_path, state["epoch"] + 1,
                 epochs)
    # Kept only when a divergence may be retried before the first checkpoint exists.
    initial = copy.deepcopy(snapshot(-1)) if nan_retries and not last_path.exists() else None

    step_model = torch.compile(model) if runtime.compile else model

    def forward(images: torch.Tensor) -> Outputs:
        return Outputs(step_model(images))

    if student_taps is not None:
        def forward(images: torch.Tensor) -> Outputs:  # noqa: F811 - chosen once, before the loop
            return Outputs(step_model(images), student_taps.pop())

    steps_per_epoch = len(train_loader)
    images = 0
    epoch = start_epoch
    with Progress(label) as bar:
        while epoch < epochs:
            t0 = time.perf_counter()
            model.train()
            loss_fn.train()
            sums: dict[str, torch.Tensor] = {}
            correct = torch.zeros((), device=runtime.device)
            first_bad = torch.full((), -1, device=runtime.device)
            seen = 0
            task = bar.start_epoch(epoch, epochs, steps_per_epoch)
            for step, batch in enumerate(train_loader.epoch(epoch)):
                with runtime.autocast():
                    student = forward(batch.images)
                    terms = loss_fn(student, teacher(batch), batch.labels)
                loss = terms["loss"]
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                # Device-side bookkeeping only; read once at the end of the epoch.
                bad = ~torch.isfinite(loss.detach())
                first_bad = torch.where(bad & (first_bad < 0), step, first_bad)
                n = len(batch.labels)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0) + v.detach().float() * n
                correct += (student.logits.detach().argmax(-1) == batch.labels).sum()
                seen += n
                bar.advance(task)
            bad_step = int(first_bad)
            if bad_step >= 0:
                where = f"{label}: loss became NaN/inf at epoch {epoch + 1}, step {bad_step + 1}"
                if nan_retries <= 0:
                    kept = last_path if last_path.exists() else "(none yet)"
                    raise TrainingDiverged(
                        f"{where}; the last good checkpoint is kept: {kept}; lower the learning "
                        "rate (or set trainer.nan_retries) or use precision fp32")
                nan_retries -= 1
                state = checkpoint.load(last_path) if last_path.exists() else initial
                restore(state)
                scale_lr(optimizer, scheduler, nan_lr_factor)
                epoch = state["epoch"] + 1
                log.warning("%s; retrying from epoch %d with the learning rate x%g "
                            "(%d retries left)", where, epoch + 1, nan_lr_factor, nan_retries)
                continue
            epoch_time = time.perf_counter() - t0
            elapsed += epoch_time
            images += seen
            row: dict[str, float] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
            row.update({f"train/{k}": float(v) / seen for k, v in sums.items()})
            row["train/top1"] = 100.0 * float(correct) / seen
            if val_loader is not None:
                from kdcli.metrics import classification_metrics

                logits, labels = predict(model, val_loader, runtime)
                row["val/top1"] = classification_metrics(logits, labels)["top1"]
            row["time_s"] = epoch_time
            row["images_per_s"] = seen / epoch_time
            history.append(row)
            if on_row is not None:
                on_row(row)
            top1 = row.get("val/top1", row["train/top1"])
            if top1 > best_top1:
                best_top1 = top1
                checkpoint.save({"model": model.state_dict(), "epoch": epoch, "val_top1": top1,
                                 **(checkpoint_extra or {})}, best_path)
            checkpoint.save(snapshot(epoch), last_path)
            _write_history(out_dir / "metrics.csv", history)
            bar.end_epoch(task, row)
            log.info("%s epoch %d/%d  loss %.4f  train/top1 %.2f%s  %.0f img/s", label,
                     epoch + 1, epochs, row["train/loss"], row["train/top1"],
                     f"  val/top1 {row['val/top1']:.2f}" if "val/top1" in row else "",
                     row["images_per_s"])
            if on_epoch_end is not None:
                on_epoch_end(epoch)
            epoch += 1
    rate = (sum(r["images_per_s"] * r["time_s"] for r in history) / elapsed) if elapsed else 0.0
    return FitResult(history, resumed_from, best_top1, elapsed, rate)


