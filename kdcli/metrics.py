"""Classification metrics and model cost (params, FLOPs, size, latency).

Accuracy-style metrics are returned in percent (0-100) as plain Python floats so they can go
straight into logs, checkpoints and ``report.json``.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger(__name__)

__all__ = [
    "classification_metrics",
    "confusion_matrix",
    "count_flops",
    "count_params",
    "latency_policy",
    "macro_f1",
    "measure_latencies",
    "measure_latency_ms",
    "model_size_bytes",
    "profile_model",
    "time_calls",
    "time_models",
]


def confusion_matrix(preds: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Counts (true class, predicted class) pairs.

    Args:
        preds: Predicted class indices, shape ``(N,)``.
        targets: True class indices, shape ``(N,)``.
        num_classes: Number of classes ``C``.

    Returns:
        An int64 ``(C, C)`` tensor on the CPU; rows are true classes, columns predictions.
    """
    preds = preds.detach().reshape(-1).long().cpu()
    targets = targets.detach().reshape(-1).long().cpu()
    if preds.shape != targets.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and targets {tuple(targets.shape)} differ")
    # One bincount over flattened (true, pred) pairs beats a Python loop by orders of magnitude.
    flat = targets * num_classes + preds
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def macro_f1(confusion: Tensor) -> float:
    """Macro-averaged F1 in percent, as sklearn's ``f1_score(average="macro", zero_division=0)``.

    Like sklearn's default ``labels=None``, the average runs over the classes that occur in the
    targets or the predictions; a class absent from both is left out rather than counted as 0,
    so a test subset that happens to miss a class is not penalised for it.

    Args:
        confusion: ``(C, C)`` confusion matrix, rows true, columns predicted.
    """
    confusion = confusion.double()
    tp = confusion.diagonal()
    support = confusion.sum(dim=1)  # tp + fn
    predicted = confusion.sum(dim=0)  # tp + fp
    denom = support + predicted  # 2tp + fp + fn
    present = denom > 0
    if not bool(present.any()):
        return 0.0
    # 2tp / (2tp + fp + fn) equals 2PR / (P + R) and is 0 whenever tp == 0 (zero_division=0).
    f1 = 2 * tp[present] / denom[present]
    return float(f1.mean().item() * 100.0)


@torch.no_grad()
def classification_metrics(
    logits: Tensor, targets: Tensor, teacher_logits: Tensor | None = None, *,
    name: str = "model",
) -> dict[str, float | None]:
    """Top-1, top-5, macro-F1 and (optionally) agreement with the teacher, all in percent.

    Every prediction is the row's ``argmax`` (the first of tied maxima), the rule the confusion
    matrix and the teacher's side of the agreement use too: ``topk`` breaks ties differently,
    and bf16 logits tie often enough that a model compared with itself read 89 % agreement.
    A top-5 hit is "target among the 5 largest or the argmax", so top-5 >= top-1 under ties.

    Args:
        logits: Model outputs, shape ``(N, C)``.
        targets: True class indices, shape ``(N,)``.
        teacher_logits: Teacher outputs ``(N, C)``; adds ``agreement``, the share of samples
            whose argmax matches the teacher's.
        name: The model, for the warning about non-finite logits.

    Returns:
        ``{"top1", "top5", "macro_f1"[, "agreement"]}``. ``top5`` is None with 5 classes or
        fewer, where the top 5 hold every class and it would read 100 % for any model. With a
        non-finite logit (an fp16/bf16 overflow at eval time) the metrics are NaN, with a
        warning: the argmax of a NaN row is an arbitrary class, and its plausible-looking
        accuracy would hide the overflow.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), got {tuple(logits.shape)}")
    logits = logits.detach()
    targets = targets.detach().reshape(-1).long().to(logits.device)
    n, num_classes = logits.shape
    if targets.numel() != n:
        raise ValueError(f"{n} logits rows but {targets.numel()} targets")
    if teacher_logits is not None and tuple(teacher_logits.shape) != (n, num_classes):
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} do not match logits "
            f"{(n, num_classes)}"
        )
    has_top5 = num_classes > 5
    if n == 0:
        out: dict[str, float | None] = {"top1": 0.0, "top5": 0.0 if has_top5 else None,
                                        "macro_f1": 0.0}
        if teacher_logits is not None:
            out["agreement"] = 0.0
        return out

    bad = _non_finite_rows(logits)
    bad_teacher = 0 if teacher_logits is None else _non_finite_rows(teacher_logits.detach())
    if bad:
        log.warning("%s: %d of %d rows of logits are not finite (NaN or inf, an overflow?); "
                    "its metrics are NaN", name, bad, n)
        nan = math.nan
        out = {"top1": nan, "top5": nan if has_top5 else None, "macro_f1": nan}
        if teacher_logits is not None:
            out["agreement"] = nan
        return out

    preds = logits.argmax(dim=1)
    correct = preds.eq(targets)
    # Shares are exact ratios of counts in Python floats (float64): a float32 mean read 45 of
    # 200 as 22.499999403953552 in the metrics CSVs and report.json.
    out = {
        "top1": 100.0 * int(correct.sum()) / n,
        "top5": None,
        "macro_f1": macro_f1(confusion_matrix(preds, targets, num_classes)),
    }
    if has_top5:
        in_top5 = logits.topk(5, dim=1).indices.eq(targets.unsqueeze(1)).any(dim=1)
        out["top5"] = 100.0 * int((in_top5 | correct).sum()) / n
    if teacher_logits is not None:
        if bad_teacher:
            log.warning("%s: %d of %d rows of the teacher's logits are not finite; the "
                        "agreement with it is NaN", name, bad_teacher, n)
            out["agreement"] = math.nan
        else:
            teacher_preds = teacher_logits.detach().argmax(dim=1).to(preds.device)
            out["agreement"] = 100.0 * int(preds.eq(teacher_preds).sum()) / n
    return out


def _non_finite_rows(logits: Tensor) -> int:
    """How many rows of ``(N, C)`` logits hold a NaN or an infinity."""
    return int((~torch.isfinite(logits)).any(dim=1).sum().item())


def count_params(model: nn.Module) -> int:
    """Total number of parameters, trainable or not."""
    return sum(p.numel() for p in model.parameters())


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind a ``torch.compile`` wrapper, so costs don't depend on compile."""
    return getattr(model, "_orig_mod", model)


def _example_input(model: nn.Module, input_shape: tuple[int, ...]) -> Tensor:
    """A batch-1 zero input on the model's device and floating dtype."""
    param = next(model.parameters(), None)
    if param is None or not param.is_floating_point():
        return torch.zeros(1, *input_shape)
    return torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on one image (a multiply-add counts as 2).

    Args:
        model: The model; its train/eval mode (per submodule) is restored afterwards.
        input_shape: One sample's shape without the batch dimension, e.g. ``(3, 32, 32)``.
    """
    model = _unwrap(model)
    # Per-module, so a model with frozen (eval) BatchNorm inside a training model comes back as is.
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        x = _example_input(model, input_shape)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        for module, training in modes.items():
            module.training = training


def model_size_bytes(model: nn.Module) -> int:
    """Size in bytes of the model's ``state_dict`` as ``torch.save`` writes it."""
    buffer = io.BytesIO()
    torch.save(_unwrap(model).state_dict(), buffer)
    return buffer.getbuffer().nbytes


def measure_latency_ms(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    warmup: int = 5,
    iters: int = 30,
    device: str | torch.device = "cpu",
    threads: int | None = None,
) -> float:
    """Median batch-1 forward latency in milliseconds, in fp32 on ``device`` (CPU by default).

    The report quotes this as CPU fp32 batch-1 latency: comparable across teacher and student
    and across machines with the same CPU, unlike GPU timings that depend on AMP and batching.
    The model is deep-copied, so the caller's model keeps its device, dtype and mode.

    Args:
        model: The model to time.
        input_shape: One sample's shape without the batch dimension.
        warmup: Untimed forward passes first (allocator, caches, lazy init).
        iters: Timed forward passes; the median resists scheduler noise better than the mean.
        device: Where to time; ``"cpu"`` for the report's numbers.
        threads: CPU threads to time with (restored afterwards); None = :func:`latency_threads`,
            so a model times the same whether the run trained on the CPU, on a GPU or under
            torchrun (which starts each rank with one thread).
    """
    return measure_latencies([model], input_shape, warmup=warmup, iters=iters, device=device,
                             threads=threads).median_ms[0]


@dataclass(frozen=True)
class Latencies:
    """Batch-1 latencies of models timed together, in the order given.

    ``median_ms`` is what the report quotes as each model's latency; ``min_ms``, each model's
    fastest call, is what its speed-ups divide: the call least touched by other processes, so a
    ratio of minima moves least with the machine's load (a teacher/student speed-up read 2.9x
    to 12.4x from medians across reports on a busy machine).
    """

    median_ms: list[float]
    min_ms: list[float]
    threads: int


def measure_latencies(
    models: list[nn.Module],
    input_shape: tuple[int, ...],
    *,
    warmup: int = 5,
    iters: int = 30,
    device: str | torch.device = "cpu",
    threads: int | None = None,
) -> Latencies:
    """Times several models in turn (see :func:`time_calls`), in fp32 at batch 1. Arguments as
    :func:`measure_latency_ms`."""
    device = torch.device(device)
    clones = [copy.deepcopy(_unwrap(m)).to(device=device, dtype=torch.float32).eval()
              for m in models]
    x = torch.zeros(1, *input_shape, device=device, dtype=torch.float32)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def call(clone: nn.Module) -> Callable[[], None]:
        def run() -> None:
            clone(x)
            sync()
        return run

    with torch.inference_mode():
        return time_calls([call(c) for c in clones], warmup=warmup, iters=iters, threads=threads)


def time_calls(calls: list[Callable[[], Any]], *, warmup: int, iters: int,
               threads: int | None = None) -> Latencies:
    """Times each call `iters` times after `warmup` untimed rounds, with `threads` CPU threads
    for PyTorch (restored afterwards; None = :func:`latency_threads`). Each iteration runs every
    call once, the order rotating, so a machine whose speed drifts while they are timed (a
    shared virtual machine, clocks settling after training: the same student read 0.8 and
    2.3 ms here minutes apart) moves them all alike, and their ratio (a speed-up) holds.
    """
    if iters < 1:
        raise ValueError("iters must be >= 1")
    times_ms: list[list[float]] = [[] for _ in calls]
    before = torch.get_num_threads()
    used = threads or latency_threads()
    torch.set_num_threads(used)
    try:
        for _ in range(warmup):
            for fn in calls:
                fn()
        for i in range(iters):
            for k in range(len(calls)):
                j = (i + k) % len(calls)
                start = time.perf_counter()
                calls[j]()
                times_ms[j].append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(before)
    return Latencies(median_ms=[float(statistics.median(t)) for t in times_ms],
                     min_ms=[float(min(t)) for t in times_ms], threads=used)


def latency_threads() -> int:
    """CPU threads latencies are timed with on a quiet machine: one per core this process may
    use (:func:`latency_policy` takes one on a busy machine)."""
    from kdcli.device import usable_cores

    return usable_cores()


@dataclass(frozen=True)
class LatencyPolicy:
    """How this machine's latencies are timed now: `kd train`'s report, `kd eval` and `kd
    export` all time through :func:`latency_policy`, so their figures compare. `other_load` is
    the cores' worth of CPU other processes used (None where it cannot be read), out of
    `cpus`; `busy` when over kdcli.device.BUSY_CORES."""

    threads: int
    busy: bool
    other_load: float | None
    cpus: int

    def record(self) -> dict[str, Any]:
        """What report.json, eval.json and export.json keep beside the latencies."""
        return {"threads": self.threads, "other_load": self.other_load, "cpus": self.cpus,
                "busy": self.busy}

    def describe(self) -> str:
        """The thread count and, when busy, the load: what the logs say next to a latency."""
        threads = f"{self.threads} thread{'' if self.threads == 1 else 's'}"
        if not self.busy:
            return threads
        return (f"{threads}, on a busy machine: other processes used {self.other_load:.1f} of "
                f"{self.cpus} CPUs")


def latency_policy() -> LatencyPolicy:
    """Samples the load of other processes (kdcli.device.machine_load) and picks the threads to
    time with: one on a busy machine, with a warning, else :func:`latency_threads`.

    Multi-threaded PyTorch waits for its slowest thread, which a busy core stalls for a whole
    time slice (0.85 against 10 ms here; `kd eval` read 108 ms where the report's one thread
    read 0.19 ms), while one thread reads as on an idle machine. Speed-ups divide the fastest
    calls (:class:`Latencies`), which the load moves least.
    """
    from kdcli import device  # looked up at call time, so tests can stand in for the probe

    load, cpus = device.machine_load()
    busy = device.is_busy(load, cpus)
    policy = LatencyPolicy(threads=1 if busy else latency_threads(), busy=busy,
                           other_load=load, cpus=cpus)
    if busy:
        log.warning("the machine is busy (other processes used %.1f of %d CPUs): timing latency "
                    "with 1 thread; the figures will be noisy, speed-ups (fastest calls) less so",
                    load, cpus)
    return policy


def time_models(models: list[nn.Module], input_shape: tuple[int, ...], **kwargs: Any
                ) -> tuple[Latencies, LatencyPolicy]:
    """The models' latencies timed under :func:`latency_policy`, and the policy to record with
    them. `kwargs` go to :func:`measure_latencies` (``warmup``, ``iters``)."""
    policy = latency_policy()
    return measure_latencies(models, input_shape, threads=policy.threads, **kwargs), policy


def profile_model(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Parameters, FLOPs and size of a model for the report; its latency is timed apart
    (:func:`time_models`), under the load check every command shares.

    Args:
        model: The model to profile; left unchanged.
        input_shape: One sample's shape without the batch dimension.

    Returns:
        ``{"params", "flops", "macs", "size_bytes"}``. ``flops`` counts a multiply-add as 2;
        ``macs`` (= flops / 2) is what CIFAR KD papers quote as "FLOPs" (resnet20: 40.8M MACs,
        81.6M FLOPs), so a reader comparing with a paper does not see twice the cost.
    """
    flops = count_flops(model, input_shape)
    return {
        "params": count_params(model),
        "flops": flops,
        "macs": flops // 2,
        "size_bytes": model_size_bytes(model),
    }
