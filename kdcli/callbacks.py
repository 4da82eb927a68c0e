"""Hydra callbacks (registered under ``hydra.callbacks`` in ``configs/kd.yaml``) for what fails
outside kd's jobs, where Hydra would print a traceback: kd reports it in its own one line.

``OutputDirCallback`` makes the run or sweep folder before Hydra does.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kdcli.cli import os_error_line

__all__ = ["OutputDirCallback"]


class OutputDirCallback(Callback):
    """Makes `hydra.run.dir` (`hydra.sweep.dir`) before Hydra does: Hydra makes it outside any
    error handling of kd's, so a path that cannot be a folder (a file) ended in a traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        make_output_dir(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        make_output_dir(config, "hydra.sweep.dir")


def make_output_dir(config: DictConfig, key: str) -> None:
    """Makes the folder at `key`, or exits 1 with one line saying why it cannot be made."""
    try:
        path = Path(str(OmegaConf.select(config, key)))
    except Exception:  # noqa: BLE001 - e.g. ${hydra:...} before Hydra set it: Hydra reports it
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        sys.stderr.write(f"error: {output_dir_error(key, path, exc)}\n")
        sys.exit(1)


def output_dir_error(key: str, path: Path, exc: OSError) -> str:
    """The one line for a folder that could not be made; a file in the way is named as such
    (the OSError's own text, `File exists` or `Not a directory`, does not say which path)."""
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "" if blocker == path else f": {blocker}"
        return f"{key}={path}{where} is a file, not a folder"
    return f"{key}={path}: {os_error_line(exc)}"

