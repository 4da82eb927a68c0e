"""Data-parallel training over processes started by torchrun (torch.distributed + DDP).

    torchrun --standalone --nproc_per_node=2 -m kdcli.cli train ...

torchrun gives every process RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE. kd joins the
process group once (gloo on CPU, nccl on CUDA). Each rank trains its slice of every global batch
(`trainer.*.batch_size` stays the global batch, so learning rates and schedules mean the same at
any world size), DistributedDataParallel averages the gradients, and epoch metrics are summed
across ranks. Rank 0 alone evaluates and writes: checkpoints, store entries, the soft-label cache,
the report and the log. The other ranks wait for it (`on_main`) and then read what it wrote.

Without torchrun (WORLD_SIZE unset or 1) every helper here is a no-op.
"""

from __future__ import annotations

import atexit
import datetime
import itertools
import logging
import os
import pickle
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from kdcli.errors import KDError

log = logging.getLogger(__name__)

T = TypeVar("T")


class RankFailed(KDError):
    """Rank 0 failed while the other ranks waited for it."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def active() -> bool:
    """True once this process has joined a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else _env_int("WORLD_SIZE", 1)


def rank() -> int:
    return dist.get_rank() if active() else _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def local_world_size() -> int:
    """Ranks on this machine (they share its cores)."""
    return _env_int("LOCAL_WORLD_SIZE", world_size())


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True when torchrun (or another launcher setting WORLD_SIZE) started several ranks."""
    return world_size() > 1


def init(device: torch.device) -> None:
    """Joins the process group torchrun prepared: nccl for CUDA devices, gloo for the CPU."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise KDError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    # KD_DIST_TIMEOUT_S: how long a collective may wait for a slow rank before failing
    # (torch's default, 10 min for NCCL and 30 for gloo, when unset).
    seconds = _env_int("KD_DIST_TIMEOUT_S", 0)
    timeout = {"timeout": datetime.timedelta(seconds=seconds)} if seconds > 0 else {}
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device, **timeout)
    else:
        dist.init_process_group("gloo", **timeout)
    atexit.register(shutdown)
    log.info("data parallel: rank %d of %d (%s backend, device %s)", rank(), world_size(),
             dist.get_backend(), device)


# How long rank 0, at exit, waits for the other ranks to leave before it does (`shutdown`).
LEAVE_TIMEOUT_S = 60.0


def shutdown() -> None:
    """At exit: rank 0 leaves last (`_leave_together`), then the process group is destroyed."""
    if dist.is_available() and dist.is_initialized():
        _leave_together()
        dist.destroy_process_group()


def exit_if_one_of_several(status: int) -> None:
    """Ends the process now, with `status`, when it is one rank of several; else returns.

    For a rank stopped by Ctrl-C or SIGTERM (torchrun stopping its workers, Slurm's time
    limit), whose peers may sit in a collective it will never join: the `shutdown` registered
    at exit would wait for them (NCCL's destroy_process_group flushes pending collectives, gloo's
    joins its work threads), until the launcher's SIGKILL. What else Python does at exit is
    skipped too: the log and stderr are flushed here; file locks go with the process; an
    interrupted atomic write has removed its temp file already. The peers see the connection
    close and fail, or get their own signal.
    """
    if not active():
        return
    logging.shutdown()  # flushes and closes the log file (rank 0's)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _leave_together(timeout_s: float = LEAVE_TIMEOUT_S) -> None:
    """Every rank checks out on the key-value store; rank 0 waits until all have.

    Where rank 0's process hosts the store (ranks started with MASTER_ADDR and MASTER_PORT
    alone, as `srun` does; torchrun of older torch, 2.4), the store ends with it: a rank still
    waiting in `on_main` for rank 0's last result (the report) failed with "Connection reset
    by peer" when rank 0 exited first. Bounded: a rank that was killed never checks out.
    """
    if not active():
        return
    store = dist.distributed_c10d._get_default_store()
    try:
        left = store.add("kd/left", 1)
        pause, deadline = 0.01, time.monotonic() + timeout_s
        while is_main() and left < world_size() and time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(pause * 2, 0.5)
            left = store.add("kd/left", 0)
    except RuntimeError:  # the store is gone already (its host left): nothing to wait for
        pass


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank (pickled; keep it to plain data)."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_on_main_calls = itertools.count()


def on_main(fn: Callable[[], T]) -> T:
    """Runs `fn` on rank 0 alone and returns its result on every rank; the others wait.

    Use it for anything that writes (checkpoints, store entries, the cache, the report) or
    decides for all ranks (reuse or retrain). A failure on rank 0 is raised on every rank,
    so the others stop instead of waiting forever.

    The others wait on the process group's key-value store, not inside a collective, so no
    collective timeout limits how long rank 0 may take: building a large soft-label cache, or
    queueing for a store entry another run holds, can take hours.
    """
    if not active():
        return fn()
    store = dist.distributed_c10d._get_default_store()
    key = f"kd/on_main/{next(_on_main_calls)}"  # every rank makes the same calls in order
    if is_main():
        try:
            result = fn()
        except BaseException as exc:
            store.set(key, pickle.dumps(("error", f"{type(exc).__name__}: {exc}")))
            raise
        store.set(key, pickle.dumps(("ok", result)))
        return result
    pause = 0.01
    while not store.check([key]):
        time.sleep(pause)
        pause = min(pause * 2, 0.5)
    status, payload = pickle.loads(store.get(key))
    if status == "error":
        raise RankFailed(f"rank 0 failed: {payload}")
    return payload


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (`sum`, `min` or `max`) across ranks; the tensor itself when alone."""
    if active():
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model wrapped in DistributedDataParallel when data parallel, else itself."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def gradient_averager(params: list[nn.Parameter]) -> Callable[[], None]:
    """A function that averages the gradients of `params` across ranks (for parameters outside
    the DDP-wrapped model, e.g. a FitNets adapter owned by the loss); a no-op when alone."""
    params = [p for p in params if p.requires_grad]
    if not active() or not params:
        return lambda: None
    for p in params:  # start from rank 0's values
        dist.broadcast(p.data, src=0)
    world = world_size()

    def average() -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    return average


def check_in_sync(modules: list[nn.Module], what: str) -> None:
    """Raises if the parameters of `modules` differ between ranks (a cheap checksum, once per
    stage): gradient averaging that missed a parameter would otherwise go unnoticed."""
    if not active():
        return
    params = [p.detach().double().sum() for m in modules for p in m.parameters()]
    if not params:
        return
    checksum = torch.stack(params).sum().reshape(1)
    lo, hi = all_reduce_(checksum.clone(), "min"), all_reduce_(checksum.clone(), "max")
    if not torch.equal(lo, hi):
        raise KDError(f"{what}: parameters differ between ranks after training "
                      f"(checksums {float(lo):.6g} .. {float(hi):.6g})")


def quiet_other_ranks() -> None:
    """On ranks other than 0: no log file (rank 0 writes the log) and warnings only."""
    if is_main() or not launched():
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.WARNING)


def shared_run_dir(run_dir: Path) -> Path:
    """Rank 0's run folder, on every rank. Each rank's Hydra made its own from the clock; a
    folder of another rank that holds only Hydra's files is removed (needs `quiet_other_ranks`
    first, so its log file is closed)."""
    if not active():
        return run_dir
    main_dir = Path(broadcast(str(run_dir)))
    if not is_main() and run_dir.resolve() != main_dir.resolve() and run_dir.is_dir():
        if holds_only_hydra_files(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
    return main_dir


def holds_only_hydra_files(folder: Path, also: tuple[str, ...] = ()) -> bool:
    """True when `folder` holds nothing but what Hydra writes by itself (`.hydra/`, the log)
    and the names in `also`: the leftovers of a rank whose work rank 0 wrote."""
    logs = {p.name for p in folder.glob("*.log")}
    return {p.name for p in folder.iterdir()} <= {".hydra", *also, *logs}
