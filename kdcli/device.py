"""Reads the `device` config once and answers every device question the engine has.

Precision, channels_last and compile are decided here, before any loop runs, so the training
loop body has no branches for them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

import torch

from kdcli import distributed
from kdcli.errors import ConfigError

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


DATA_PLACEMENTS = ("auto", "device", "host")
# `device.compile`: true = torch.compile's default mode; or a mode by name. reduce-overhead
# replays CUDA graphs: for small models on a GPU, where launching kernels takes the time.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# `device.data=auto` keeps a split (or a soft-label cache) on the GPU when it takes at most
# this share of its memory and leaves at least KEEP_FREE of it free for the models: a
# quarter each, at most half of the GPU for data, whatever is placed first.
RESIDENT_SHARE = 0.25
KEEP_FREE = 0.5


@dataclass
class Runtime:
    device: torch.device
    precision: str
    channels_last: bool
    compile: bool
    data: str = "auto"  # where training images live: auto, device or host
    compile_mode: str = "default"  # torch.compile's mode, when `compile`
    _told: set = field(default_factory=set, repr=False, compare=False)

    @property
    def amp_dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling; a disabled scaler is a no-op with the same interface.
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Moves a model to the device and memory format."""
        return model.to(self.device, memory_format=self.memory_format)

    def data_on_device(self, nbytes: int, what: str = "the split") -> bool:
        """Whether a loader should copy `nbytes` of images to the device once (True), or keep
        them on the host and copy a batch at a time (False). On the CPU they are the same
        memory; on a GPU `auto` keeps data resident up to RESIDENT_SHARE of its memory."""
        if self.data == "host":
            return False
        if self.data == "device" or self.device.type != "cuda":
            return True
        total = torch.cuda.get_device_properties(self.device).total_memory
        free, _ = torch.cuda.mem_get_info(self.device)
        # What torch's allocator holds without using is free for this purpose.
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if nbytes <= min(RESIDENT_SHARE * total, free - KEEP_FREE * total):
            return True
        if what not in self._told:
            self._told.add(what)
            log.info("%s: %.1f GiB stay in host memory, batches are copied to the GPU as they "
                     "are drawn (on the GPU it would take more than %d%% of its %.0f GiB, or "
                     "leave less than %d%% free; device.data=device to force)", what,
                     nbytes / 2**30, RESIDENT_SHARE * 100, total / 2**30, KEEP_FREE * 100)
        return False

    def describe(self) -> str:
        name = str(self.device)
        if self.device.type == "cuda":
            name += f" ({torch.cuda.get_device_name(self.device)})"
        return (f"{name}, {self.precision}" + (", channels_last" if self.channels_last else "")
                + (f", torch.compile ({self.compile_mode})" if self.compile else ""))


def resolve(cfg) -> Runtime:
    """Builds the Runtime from the `device` config node (type, index, precision, ...)."""
    kind = cfg.type
    if kind not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device.type={kind!r} is not valid; choose one of auto, cpu, cuda")
    if cfg.precision not in (*_DTYPES, "auto"):
        raise ConfigError(f"device.precision={cfg.precision!r} is not valid; "
                          f"choose one of auto, {', '.join(_DTYPES)}")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device.type=cuda but no CUDA device is visible; use device=cpu")
        # Under torchrun each rank takes the GPU of its local rank.
        count = torch.cuda.device_count()
        if distributed.launched():
            index = distributed.local_rank()
            if index >= count:
                raise ConfigError(f"torchrun rank LOCAL_RANK={index} has no GPU of its own: this "
                                  f"process sees {count} GPU(s); start at most {count} "
                                  "processes per machine (--nproc_per_node)")
        else:
            index = int(cfg.index or 0)
            if index >= count:
                raise ConfigError(f"device.index={index} but only {count} GPU(s) are visible")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        # Autotuned kernels, unless `deterministic=true` (seed_everything ran first and asked
        # torch for deterministic algorithms).
        torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
    else:
        device = torch.device("cpu")
    precision = cfg.precision if cfg.precision != "auto" else _fast_precision(device)
    if device.type == "cpu" and precision == "fp16":
        raise ConfigError("device.precision=fp16 is for CUDA; on CPU use bf16 or fp32")
    if device.type == "cuda":
        if precision == "bf16" and not _gpu_has_fast_bf16(device):
            log.warning("%s has no bf16 tensor cores (compute capability %d.%d < 8.0): bf16 "
                        "runs emulated and slow there; device=cuda_fp16 is faster",
                        torch.cuda.get_device_name(device),
                        *torch.cuda.get_device_capability(device))
        # TF32 matmuls and convolutions (10-bit mantissa) under mixed precision, where they are
        # free speed; precision=fp32 means fp32 (the safe setting a diverged run is pointed to).
        # Set both ways: the jobs of one `-m` sweep share this process.
        tf32 = precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    channels_last = cfg.channels_last
    if channels_last == "auto":
        channels_last = precision != "fp32"
    threads = cfg.get("threads")
    if device.type == "cpu":
        torch.set_num_threads(int(threads) if threads else default_threads())
        if not threads:
            _warn_if_busy(torch.get_num_threads())
    data = cfg.get("data") or "auto"
    if data not in DATA_PLACEMENTS:
        raise ConfigError(f"device.data={data!r} is not valid; choose one of "
                          f"{', '.join(DATA_PLACEMENTS)}")
    compiles, mode = compile_setting(cfg.get("compile", False))
    return Runtime(device, precision, bool(channels_last), compiles, data, mode)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` (in host memory) on `device`: to a GPU from pinned memory, without waiting."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def compile_setting(value) -> tuple[bool, str]:
    """`device.compile` (false, true or a mode name) as (compile, torch.compile mode)."""
    if isinstance(value, bool):
        return value, "default"
    if value in COMPILE_MODES:
        return True, str(value)
    raise ConfigError(f"device.compile={value!r} is not valid; choose true, false or a "
                      f"torch.compile mode: {', '.join(COMPILE_MODES)}")


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (a
    container limited to 2 CPUs on a 64-core host reports 64 from os.cpu_count())."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


# Cores' worth of other processes' CPU use above which a machine counts as busy for timing.
BUSY_CORES = 0.5


def machine_load(window_s: float = 0.25) -> tuple[float | None, int]:
    """How busy the machine is besides this process, and :func:`usable_cores`.

    The load is the cores' worth of CPU time used on this process's CPUs (its affinity) over
    `window_s` while this process sleeps: other processes' work alone, read from /proc/stat
    (Linux); None where that cannot be read (then no busy check). Not the load average: it
    holds this run's own training of the last minute, so a quiet machine read as busy right
    after training. What kdcli.metrics.latency_policy checks before `kd train`'s report, `kd
    eval` and `kd export` time models: multi-threaded PyTorch waits for its slowest thread,
    and a core another process takes stalls it (0.85 and 10 ms for the same model with 2
    threads under two busy loops on 2 cores).
    """
    import time

    before = _cpu_jiffies()
    if before is None:
        return None, usable_cores()
    time.sleep(window_s)
    after = _cpu_jiffies()
    if after is None:
        return None, usable_cores()
    busy = after[0] - before[0]
    total = after[1] - before[1]
    cpus = after[2]
    load = cpus * busy / total if total > 0 else 0.0
    return round(load, 2), usable_cores()


def _cpu_jiffies() -> tuple[int, int, int] | None:
    """(busy, total) jiffies summed over this process's CPUs in /proc/stat, and their count;
    None where /proc/stat or the affinity cannot be read."""
    try:
        mine = os.sched_getaffinity(0)
        with open("/proc/stat") as fh:
            lines = [line.split() for line in fh if line.startswith("cpu")
                     and line[3:4].isdigit()]
    except (AttributeError, OSError):
        return None
    busy = total = count = 0
    for fields in lines:
        if int(fields[0][3:]) not in mine:
            continue
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        ticks = [int(x) for x in fields[1:9]]
        idle = ticks[3] + ticks[4]
        busy += sum(ticks) - idle
        total += sum(ticks)
        count += 1
    return (busy, total, count) if count else None


def is_busy(load: float | None, cpus: int) -> bool:
    """Other processes used more than BUSY_CORES of this process's CPUs (see machine_load)."""
    return load is not None and load > BUSY_CORES


_busy_checked = False  # once per process: a sweep's jobs share it


def _warn_if_busy(threads: int) -> None:
    """Warns when other processes keep this machine's cores busy as training starts with
    `threads` threads (default: one per usable core): each step then waits for its slowest
    thread, which a busy core stalls for whole time slices. A review measured 3-40x slower
    epochs with 2 threads than with 1 on a 2-core machine running another job. Not switched
    by itself: the other job may end in a minute, and one thread would then halve the speed."""
    global _busy_checked
    if _busy_checked or threads < 2:
        return
    _busy_checked = True
    load, cpus = machine_load(window_s=0.1)  # a hint, not a measurement: kept short
    if is_busy(load, cpus):
        log.warning("the machine is busy (other processes used %.1f of %d CPUs): training with "
                    "%d threads, each step waits for the slowest, which can make epochs several "
                    "times slower; if their img/s is low, set device.threads=1", load, cpus,
                    threads)


def default_threads() -> int:
    """One intra-op thread per usable core, split between the ranks sharing this machine under
    torchrun. More threads than cores only adds contention (small CIFAR kernels suffer most)."""
    return max(1, usable_cores() // distributed.local_world_size())


def _fast_precision(device: torch.device) -> str:
    """bf16 where the hardware runs it fast: CUDA with bf16 support, or CPUs with bf16 matrix
    instructions (AMX or AVX512-BF16); fp32 elsewhere, where bf16 would be emulated and slow."""
    if device.type == "cuda":
        return "bf16" if _gpu_has_fast_bf16(device) else "fp16"
    return "bf16" if _cpu_flags() & {"amx_bf16", "avx512_bf16"} else "fp32"


def _gpu_has_fast_bf16(device: torch.device) -> bool:
    """bf16 tensor cores: compute capability 8.0 (Ampere) and newer. Not
    torch.cuda.is_bf16_supported(), which also says yes where bf16 is only emulated (T4, V100)."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seeds torch (CPU and CUDA); `deterministic` makes kernels bit-reproducible."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # Set both ways: the jobs of one `-m` sweep share this process.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        if "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.cuda.is_initialized():
            # cuBLAS reads it once, when CUDA starts: here an earlier job of a `-m` sweep.
            log.warning("deterministic=true after CUDA started in this process: cuBLAS keeps "
                        "its workspace and may not be bit-reproducible; start kd with "
                        "CUBLAS_WORKSPACE_CONFIG=:4096:8 set")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
