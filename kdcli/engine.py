"""The one training and evaluation loop.

Everything that could branch inside the loop (precision, memory format, compile, where teacher
logits come from, data parallelism) is decided before it, in `TrainStep`: the loop calls
`runtime.autocast()`, a scaler that is a no-op unless fp16, and a `teacher` callable. The loop
never calls `.item()` per step: each step's loss terms stay on the device and are read once per
epoch, so a GPU is never stalled waiting for the host. `fit` = `train_epoch` per epoch plus
evaluation, checkpoints and metrics; the speed benchmark times `train_epoch` itself.
"""

from __future__ import annotations

import copy
import csv
import functools
import io
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcli import checkpoint, distributed
from kdcli.data.loader import Batch, BatchLoader
from kdcli.device import Runtime
from kdcli.errors import KDError, TrainingDiverged
from kdcli.losses.base import DistillationLoss, Outputs
from kdcli.models.features import FeatureTap
from kdcli.progress import Progress

log = logging.getLogger(__name__)

TeacherFn = Callable[[Batch], Outputs | None]


def no_teacher(batch: Batch) -> None:
    return None


def compiled(module: nn.Module, mode: str = "default") -> nn.Module:
    """`torch.compile(module, mode=mode)`, with compiled code that checks the module's forward
    hooks.

    By default dynamo does not guard on hooks when it reuses compiled code, and the CIFAR
    ResNets (teacher and student) share one class: a model compiled earlier in the process
    without hooks (the teacher stage's, the baseline's) lent its code to a student with feature
    taps, whose taps then stayed empty. The guard is switched on before the first compile here,
    and code compiled before that (without it) is dropped.
    """
    config = torch._dynamo.config
    if getattr(config, "skip_nnmodule_hook_guards", False):
        config.skip_nnmodule_hook_guards = False
        torch._dynamo.reset()
    return torch.compile(module, mode=mode)


def compiled_as_set(module: nn.Module, runtime: Runtime) -> nn.Module:
    """`module` compiled (`compiled`, in the runtime's mode) when `device.compile` is on, else
    itself."""
    return compiled(module, runtime.compile_mode) if runtime.compile else module


@dataclass
class FitResult:
    history: list[dict[str, float]]
    resumed_from: int | None  # epoch the run resumed after, None for a fresh start
    best_top1: float
    train_time_s: float
    images_per_s: float = 0.0
    extra: dict = field(default_factory=dict)


# Rows of logits gathered on the device before one copy to host memory: a few MB, so a GPU never
# holds a whole split's (5 GB for ImageNet's training set) and waits for the host once per chunk,
# not once per batch; no pinned memory is held beyond torch's own staging.
FLUSH_ROWS = 16_384


@torch.inference_mode()
def predict(model: nn.Module, loader: BatchLoader, runtime: Runtime, view: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and labels for every sample of the loader, in order (`view`: which
    cached view a view-replaying loader shows)."""
    was_training = model.training
    model.eval()
    logits: torch.Tensor | None = None  # (N, C) in host memory, filled a chunk at a time
    pending: list[torch.Tensor] = []  # batches not yet copied there
    labels = []
    done = flushed = 0
    for batch in loader.epoch(0, view=view):
        with runtime.autocast():
            # A copy: a CUDA-graph model (device.compile=reduce-overhead) overwrites its output
            # on the next call.
            out = model(batch.images).to(torch.float32, copy=True)
        if logits is None:
            logits = torch.empty((loader.num_samples, *out.shape[1:]), dtype=torch.float32)
        pending.append(out)
        labels.append(batch.labels)
        done += len(out)
        if done - flushed >= FLUSH_ROWS:
            flushed = _flush(pending, logits, flushed)
    if pending:
        _flush(pending, logits, flushed)
    model.train(was_training)
    if logits is None:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return logits[:done], torch.cat(labels).cpu()


def _flush(pending: list[torch.Tensor], logits: torch.Tensor, at: int) -> int:
    """Copies the pending batches into `logits` from row `at` (from a GPU: waits for it to
    compute them); returns the next free row."""
    chunk = torch.cat(pending) if len(pending) > 1 else pending[0]
    logits[at:at + len(chunk)].copy_(chunk)
    pending.clear()
    return at + len(chunk)


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


class TrainStep:
    """One optimisation step on a batch: forward under autocast, loss, backward, optimizer and
    scheduler step. Everything that could branch (compile, feature taps, data parallelism, loss
    scaling) is decided here, once, so `__call__` is straight-line code.
    """

    def __init__(self, *, model: nn.Module, loss_fn: DistillationLoss,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 runtime: Runtime, teacher: TeacherFn = no_teacher,
                 student_taps: FeatureTap | None = None,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        self.model, self.loss_fn, self.teacher = model, loss_fn, teacher
        self.optimizer, self.scheduler, self.runtime = optimizer, scheduler, runtime
        self.scaler = scaler if scaler is not None else runtime.grad_scaler()
        if self.scaler.is_enabled():
            # fp16: the scaler skips the first optimizer step(s) while it finds its scale, and
            # the scheduler's first step then warns of a wrong call order that is not one.
            warnings.filterwarnings("ignore", category=UserWarning,
                                    message=r"Detected call of `lr_scheduler\.step\(\)` before")
        net = distributed.wrap(model, runtime.device)  # DDP averages gradients in backward
        net = compiled_as_set(net, runtime)
        if student_taps is None:
            self.forward = lambda images: Outputs(net(images))
        else:
            self.forward = lambda images: Outputs(net(images), student_taps.pop())
        # A loss may own parameters (a FitNets adapter): outside DDP, averaged by hand.
        self.sync_loss_grads = distributed.gradient_averager(list(loss_fn.parameters()))

    def train(self) -> None:
        self.model.train()
        self.loss_fn.train()

    def __call__(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Returns the loss terms and the student's logits (both still on the device)."""
        with self.runtime.autocast():
            student = self.forward(batch.images)
            terms = self.loss_fn(student, self.teacher(batch), batch.labels)
        self.scaler.scale(terms["loss"]).backward()
        self.sync_loss_grads()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return terms, student.logits


@dataclass
class EpochStats:
    """One training epoch, summed over all ranks."""

    terms: dict[str, float]  # mean of each loss term per sample
    top1: float
    images: int
    time_s: float
    bad_step: int  # first step whose loss was NaN/inf on any rank, -1 if none

    @property
    def images_per_s(self) -> float:
        return self.images / self.time_s if self.time_s > 0 else 0.0


def train_epoch(step: TrainStep, loader: BatchLoader, epoch: int,
                advance: Callable[[], None] = lambda: None) -> EpochStats:
    """One pass over `loader`, timed from the first batch drawn to the last result read.

    Per step, the loss terms and the count of correct predictions are stacked into one small
    tensor on the device; they are summed and read once, after the loop (no host sync per step).
    """
    t0 = time.perf_counter()
    step.train()
    records: list[torch.Tensor] = []
    sizes: list[int] = []
    names: list[str] = []
    for batch in loader.epoch(epoch):
        terms, logits = step(batch)
        correct = (logits.detach().argmax(-1) == batch.labels).sum(dtype=torch.float32)
        records.append(torch.stack([*(v.detach().float() for v in terms.values()), correct]))
        sizes.append(len(batch.labels))
        names = list(terms)
        advance()
    if not records:
        raise KDError(f"the training split has {len(loader.labels)} samples, fewer than one "
                      f"batch ({loader.batch_size} per rank); lower the batch size")
    table = torch.stack(records).double()  # (steps, terms + correct)
    n = torch.tensor(sizes, dtype=torch.float64, device=table.device)
    never = len(records)
    steps = torch.arange(never, device=table.device)
    first_bad = torch.where(torch.isfinite(table[:, 0]), never, steps).min().reshape(1)
    # This rank's sums (terms weighted by batch size, correct, images), then all ranks': one
    # collective each, once per epoch.
    totals = torch.cat([(table[:, :-1] * n[:, None]).sum(0), table[:, -1:].sum(0), n.sum()[None]])
    distributed.all_reduce_(totals)
    bad_step = int(distributed.all_reduce_(first_bad, "min"))
    totals = totals.tolist()
    seen = totals[-1]
    return EpochStats(
        terms={k: v / seen for k, v in zip(names, totals[:-2], strict=True)},
        top1=100.0 * totals[-2] / seen, images=int(seen), time_s=time.perf_counter() - t0,
        bad_step=bad_step if bad_step < never else -1)


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
    val_split: str = "val",
) -> FitResult:
    """Trains `model` for `epochs`, resuming from `out_dir/last.pt` when present.

    Writes `out_dir/last.pt` (full state, every epoch), `out_dir/best.pt` (weights with the best
    val/top1) and `out_dir/metrics.csv`. `val/top1` is measured on `val_loader`, whose split
    `val_split` names in each row and in best.pt (kd evaluates on the test split when the
    dataset has no validation split). `student_taps` adds the named feature maps to the
    student's Outputs for feature losses; the loss's own state (e.g. a FitNets adapter) is saved
    and restored with the model. Raises TrainingDiverged on a non-finite loss, leaving the last
    good checkpoint in place, unless `nan_retries` allows going back to that checkpoint with
    the learning rate times `nan_lr_factor`.

    Under torchrun every rank calls `fit` with its shard of the data (see `kdcli.distributed`);
    rank 0 alone evaluates, logs and writes, and the metrics it records cover all ranks.
    """
    main = distributed.is_main()
    if main:
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
        if runtime.device.type == "cuda":
            # This run's GPU alone: a resume may see other GPUs, or fewer. Under torchrun every
            # rank draws the same stream (same seed, same ops), so rank 0's state serves all.
            state["rng_cuda"] = torch.cuda.get_rng_state(runtime.device)
        return state

    def restore(state: dict) -> None:
        model.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        rng_cuda = state.get("rng_cuda")
        if isinstance(rng_cuda, (list, tuple)):  # older kd: one state per visible GPU
            index = runtime.device.index or 0
            rng_cuda = rng_cuda[index] if index < len(rng_cuda) else None
        if runtime.device.type == "cuda" and rng_cuda is not None:
            torch.cuda.set_rng_state(rng_cuda, runtime.device)

    resume = distributed.broadcast(last_path.exists())  # rank 0 decides for every rank
    if resume:
        state = checkpoint.load(last_path)
        restore(state)
        start_epoch, best_top1 = state["epoch"] + 1, state["best_top1"]
        history, elapsed = list(state["history"]), state["train_time_s"]
        resumed_from = state["epoch"]
        log.info("%s: resuming from %s after epoch %d/%d", label, last_path, state["epoch"] + 1,
                 epochs)
    # Kept only when a divergence may be retried before the first checkpoint exists.
    initial = copy.deepcopy(snapshot(-1)) if nan_retries and not resume else None

    step = TrainStep(model=model, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
                     runtime=runtime, teacher=teacher, student_taps=student_taps, scaler=scaler)
    if runtime.compile:
        log.info("%s: torch.compile on, mode %s (the first steps wait for the compiler)", label,
                 runtime.compile_mode)
    if distributed.active():
        world = distributed.world_size()
        log.info("%s: data parallel over %d ranks, %d images per rank and step (global batch "
                 "%d), %d steps per epoch", label, world, train_loader.batch_size,
                 train_loader.batch_size * world, len(train_loader))

    def finish_epoch(epoch: int, row: dict[str, float], stats: EpochStats, bar: Progress,
                     task: Any) -> tuple[dict[str, float], float]:
        """Rank 0: evaluate, checkpoint, log. Every rank gets the row and the best top-1;
        under torchrun the others wait on the store (distributed.on_main), not inside a
        collective, so evaluation and slow checkpoint writes have no time limit, and a
        failure here stops every rank."""
        nonlocal best_top1
        if val_loader is not None:
            from kdcli.metrics import classification_metrics

            logits, labels = predict(model, val_loader, runtime)
            row["val/top1"] = classification_metrics(logits, labels, name=label)["top1"]
            row["val_split"] = val_split  # not a number: TensorBoard skips it, the CSV keeps it
        row.update(time_s=stats.time_s, images_per_s=stats.images_per_s)
        history.append(row)
        if on_row is not None:
            on_row(row)
        top1 = row.get("val/top1", row["train/top1"])
        # A NaN top-1 (non-finite logits) is never better, but until an epoch scores, the
        # latest one stands as best.pt: the stage's outputs must include one.
        if top1 > best_top1 or (best_top1 < 0 and not math.isfinite(top1)):
            best_top1 = top1 if math.isfinite(top1) else best_top1
            chosen_on = val_split if "val/top1" in row else "train"
            checkpoint.save({"model": model.state_dict(), "epoch": epoch, "val_top1": top1,
                             "val_split": chosen_on, **(checkpoint_extra or {})}, best_path)
        checkpoint.save(snapshot(epoch), last_path)
        _write_history(out_dir / "metrics.csv", history)
        bar.end_epoch(task, row)
        log.info("%s epoch %d/%d  loss %.4f  train/top1 %.2f%s  %.0f img/s", label,
                 epoch + 1, epochs, row["train/loss"], row["train/top1"],
                 f"  val/top1 {row['val/top1']:.2f} ({val_split})" if "val/top1" in row else "",
                 row["images_per_s"])
        return row, best_top1

    epoch = start_epoch
    with Progress(label, enabled=main) as bar:
        while epoch < epochs:
            task = bar.start_epoch(epoch, epochs, len(train_loader))
            loss_fn.start_epoch(epoch, epochs)
            # The rate the epoch trained at from its first step: read after it, a per-step
            # schedule's last epoch read 0.0 (cosine), as if it had not trained.
            lr = optimizer.param_groups[0]["lr"]
            stats = train_epoch(step, train_loader, epoch, lambda: bar.advance(task))  # noqa: B023
            if stats.bad_step >= 0:
                where = (f"{label}: loss became NaN/inf at epoch {epoch + 1}, "
                         f"step {stats.bad_step + 1}")
                if nan_retries <= 0:
                    kept = (f"the last good checkpoint is kept: {last_path}"
                            if last_path.exists()
                            else "no epoch finished, so there is no checkpoint yet")
                    # fp32 is the way out of a mixed-precision overflow, not of an fp32 run's.
                    fp32 = "" if runtime.precision == "fp32" else " or use precision fp32"
                    raise TrainingDiverged(
                        f"{where}; {kept}; lower the learning rate (or set "
                        f"trainer.nan_retries){fp32}")
                nan_retries -= 1
                state = checkpoint.load(last_path) if last_path.exists() else initial
                restore(state)
                scale_lr(optimizer, scheduler, nan_lr_factor)
                epoch = state["epoch"] + 1
                log.warning("%s; retrying from epoch %d with the learning rate x%g "
                            "(%d retries left)", where, epoch + 1, nan_lr_factor, nan_retries)
                continue
            elapsed += stats.time_s
            row: dict[str, float] = {"epoch": epoch + 1, "lr": lr}
            row.update({f"train/{k}": v for k, v in stats.terms.items()})
            row["train/top1"] = stats.top1
            done, best_top1 = distributed.on_main(
                functools.partial(finish_epoch, epoch, row, stats, bar, task))
            if not main:
                history.append(done)
            if on_epoch_end is not None:
                on_epoch_end(epoch)
            epoch += 1
    distributed.check_in_sync([model, loss_fn], label)
    rate = (sum(r["images_per_s"] * r["time_s"] for r in history) / elapsed) if elapsed else 0.0
    return FitResult(history, resumed_from, best_top1, elapsed, rate)
