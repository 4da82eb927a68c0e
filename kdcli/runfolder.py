"""A run folder that already holds an earlier run: its outputs are set aside, not mixed in.

A run started in a folder that holds a finished or failed run (`hydra.run.dir=` given twice, a
sweep run again into its folder) would otherwise mix the two: the earlier baseline's
checkpoints and learning curve in the new report, an export of a student that is no longer the
one trained, a failed job listed with the metrics of the run before it. Nothing is deleted:
the earlier outputs, its `.hydra/` config included (so `kd export` still reads it), move into
`earlier-<time>/` inside the folder. The log stays and is appended to.

Folders of stage-by-stage runs (`kd teacher`, then `kd student` into the same folder) hold no
report or failure of their own and are left alone: the stages' outputs belong together.

Two runs started into one folder at the same time cannot be told apart that way: each would set
aside, overwrite and report the other's files. So a run holds the folder's lock (`.kd.lock`)
while it writes there (kdcli.callbacks: a run's before Hydra opens its log there, a sweep job's
first thing in the job, whatever process its launcher runs it in), and a second one fails at
once, before it has touched anything. It is an OS-level lock (filelock): the kernel
releases it when its holder dies, so a killed run never blocks the next. The file stays, naming
its last holder (removing a lock file breaks the lock for processes that opened it already); it
is hidden, and neither an output nor a sign of a run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kdcli.errors import KDError

if TYPE_CHECKING:
    from filelock import FileLock

log = logging.getLogger(__name__)

LOCK = ".kd.lock"  # held by the process writing the folder

REPORT = "report.json"
FAILED = "failed.json"  # written into a failed sweep job's folder
# What a run writes into its folder, its log aside.
OUTPUTS = (".hydra", "checkpoints", "metrics", "plots", "tensorboard", REPORT, "report.md",
           "export", FAILED, "eval.json", "summary.md", "summary.csv")
# The folders the earlier outputs go to: `earlier-20261124-031500`, `...+` if taken.
EARLIER = re.compile(r"earlier-\d{8}-\d{6}\+*")


def holds_a_run(folder: Path) -> bool:
    return (folder / REPORT).is_file() or (folder / FAILED).is_file()


def set_aside_earlier_run(folder: Path) -> Path | None:
    """Moves an earlier run's outputs in `folder` into `folder/earlier-<time>/`; returns that
    folder, or None when `folder` holds no finished or failed run."""
    if not holds_a_run(folder):
        return None
    found = [folder / name for name in OUTPUTS if (folder / name).exists()]
    newest = max(p.stat().st_mtime for p in found)
    dest = folder / f"earlier-{time.strftime('%Y%m%d-%H%M%S', time.localtime(newest))}"
    while dest.exists():
        dest = dest.with_name(dest.name + "+")
    dest.mkdir()
    for path in found:
        path.rename(dest / path.name)
    log.warning("%s held the outputs of an earlier run (%s): moved to %s", folder,
                ", ".join(p.name for p in found), dest)
    return dest


class FolderInUse(KDError):
    """Another process holds the run folder's lock."""


def lock(folder: Path, key: str = "hydra.run.dir") -> FileLock:
    """Takes `folder`'s lock for this process, or raises FolderInUse at once when another
    process holds it (`key` is the setting that named the folder, for the message). The caller
    keeps the returned lock referenced (filelock releases a lock it garbage-collects) and
    releases it when the run ends.
    """
    from filelock import FileLock, Timeout  # not at import time: `kd --help` stays fast

    path = folder / LOCK
    # Probed first, on a read-only descriptor: filelock before 3.30 opens the file with O_TRUNC
    # on every attempt, a failed one too, so a second run erased the holder's line (and wrote
    # into the folder it must not touch) before it found the lock taken.
    try:
        taken = held_elsewhere(path)
    except OSError:  # an unreadable lock file: filelock decides
        taken = False
    if taken:
        raise _in_use(folder, path, key)
    held = FileLock(str(path))
    try:
        held.acquire(timeout=0)
    except Timeout:  # taken since the probe
        raise _in_use(folder, path, key) from None
    with contextlib.suppress(OSError):  # who holds it, for the message above; not needed
        path.write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
    return held


def held_elsewhere(path: Path) -> bool:
    """Whether another process holds the lock file `path`'s flock (filelock's own mechanism on
    Unix), probed on a read-only descriptor: the file is neither created nor written, and a
    process that wants the lock meanwhile just retries. False when there is no such file;
    another OSError (an unreadable file) is raised. The run-folder lock and `kd store` use it."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the flock if it was taken
    return False


def _in_use(folder: Path, path: Path, key: str) -> FolderInUse:
    return FolderInUse(
        f"run folder {folder} is in use: another kd process{_holder(path)} is writing to it; "
        f"wait for that run to end, or give this one a folder of its own ({key}=...)")


def _holder(path: Path) -> str:
    """` (pid N on HOST)` as the holder wrote it into the lock file, or "" if not (yet)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return ""
    return f" ({text})" if text.startswith("pid ") and "\n" not in text else ""
