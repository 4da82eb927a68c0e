"""Checkpoint files: written atomically, read back with `weights_only=True`.

A checkpoint is a dict of tensors, numbers, strings and state dicts, nothing a pickle could
execute. `save` writes to a temporary file in the same folder, fsyncs and renames, so a
reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from kdcli.errors import CorruptArtifact

FORMAT = 1


@functools.cache
def _new_file_mode() -> int:
    """The mode `open()` gives a new file under this process's umask (read once: os.umask can
    only be read by setting it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Any) -> None:
    """Calls `write(fileobj)` on a temp file beside `path`, then fsyncs and renames it. The
    file gets the mode a plain `open()` would give it (mkstemp's are private, 0600: a shared
    machine's other users could not read an exported model or a report)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fchmod(fh.fileno(), _new_file_mode())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno and exc.filename is None:
            # A failed write() (disk full, file size limit) names no file: say which one.
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def save(obj: dict, path: Path) -> None:
    """Saves a checkpoint dict atomically, stamped with the format version, with its sha256 in
    a `<name>.sha256` file beside it: torch's zip reader does not notice flipped bits inside a
    tensor, the checksum does."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **obj}, buf)
    data = buf.getvalue()
    atomic_write(path, lambda fh: fh.write(data))
    atomic_write_text(_sidecar(path), hashlib.sha256(data).hexdigest() + "\n")


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """The sha256 of a model's weights: each tensor's name, dtype, shape and bytes, in name
    order. Unlike the digest of the checkpoint file, which also holds the epochs' timings, it
    is the same for a bit-identical retrain (`deterministic=true`, a pruned teacher trained
    again), so what is keyed by it (the cache, a feature-loss student) is reused."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(state[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Loads a checkpoint with `weights_only=True`; a damaged file raises CorruptArtifact."""
    path = Path(path)
    if not path.exists():
        raise CorruptArtifact(f"checkpoint not found: {path}")
    sidecar = _sidecar(path)
    if sidecar.exists() and sidecar.read_text().strip() != sha256_file(path):
        raise CorruptArtifact(f"checkpoint {path} fails its checksum ({sidecar.name}): damaged "
                              f"or only half replaced (if you replaced it on purpose, delete "
                              f"{sidecar})")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, bit flips, foreign pickle, not a torch file
        raise CorruptArtifact(f"checkpoint {path} is unreadable: {_why_unreadable(path, exc)}"
                              ) from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CorruptArtifact(f"checkpoint {path} is not a kd checkpoint of format {FORMAT}")
    return obj


def _why_unreadable(path: Path, exc: Exception) -> str:
    """What a file `torch.load(weights_only=True)` refused is, in kd's words. torch's own text
    advises loading with `weights_only=False`, which would let the file run code (README, Trust
    model), so it is not passed on."""
    if isinstance(exc, OSError):  # a folder, no permission: the system's word is the reason
        return exc.strerror or type(exc).__name__
    with open(path, "rb") as fh:
        head = fh.read(8)
    from kdcli.softlabels import MAGIC  # softlabels owns the cache format (and imports this)

    if not head:
        return "the file is empty"
    if head.startswith(MAGIC):
        return "it is a kd soft-label cache (.kdsl), not a checkpoint"
    if head.startswith(b"PK"):
        kind = "a zip archive"
    elif head.startswith(b"\x80"):
        if "magic number" in str(exc):  # PyTorch's old format opens with its own magic number
            return "a pickle, not a PyTorch checkpoint"
        kind = "a pickle (PyTorch's old format)"
    else:
        return "not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        return (f"{kind} holding Python objects{f' ({found.group(1)})' if found else ''} "
                "beyond tensors, numbers, strings and containers, which kd does not unpickle")
    return (f"{kind} PyTorch cannot read: truncated, damaged or not a PyTorch checkpoint "
            f"({type(exc).__name__})")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
