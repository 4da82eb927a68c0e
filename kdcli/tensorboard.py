"""Optional TensorBoard logs: one scalar per metric per epoch (``logging.tensorboard=true``).

The engine hands every finished epoch's history row (``{"epoch": 3, "lr": ..., "train/loss":
..., "val/top1": ...}``) to a callback; :func:`epoch_callback` returns one that writes the row to
``<run dir>/tensorboard/<stage>/``, so ``tensorboard --logdir <run dir>/tensorboard`` shows the
stages side by side. Only epochs trained in this run are logged: a stage reused from the store
has its curves in ``metrics/<stage>.csv`` and in the run that trained it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kdcli.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["EpochWriter", "epoch_callback"]

TENSORBOARD_DIR = "tensorboard"


class EpochWriter:
    """Writes each history row as scalars at step ``row["epoch"]`` (1-based, as in metrics.csv).

    The event file is opened on the first row, so a stage with nothing left to train leaves no
    empty file. A failing write (disk full) is logged once and turns the writer off: a log is
    never worth losing a training run over.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer: Any = None
        self._failed = False

    def __call__(self, row: Mapping[str, float]) -> None:
        if self._failed:
            return
        try:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.log_dir))
            step = int(row["epoch"])
            for key, value in row.items():
                if key != "epoch" and _is_number(value):
                    self._writer.add_scalar(key, float(value), global_step=step)
            self._writer.flush()  # readable at once, and kept if the run is killed
        except Exception as exc:  # noqa: BLE001
            self._failed = True
            log.warning("TensorBoard logging to %s stopped: %s", self.log_dir, exc)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def stage_dir(run_dir: Path, stage: str) -> Path:
    """``<run_dir>/tensorboard/<stage>``; a label such as "teacher resnet20" becomes
    ``teacher-resnet20``."""
    return Path(run_dir) / TENSORBOARD_DIR / re.sub(r"[\s/\\]+", "-", stage.strip())


def epoch_callback(run_dir: Path, stage: str, enabled: bool
                   ) -> Callable[[dict[str, float]], None] | None:
    """The per-epoch callback for `stage` (the engine's `on_row`), or None when disabled.

    Raises ConfigError at once, before any training, if enabled without the tensorboard package.
    """
    if not enabled:
        return None
    try:
        import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
    except ImportError as exc:
        raise ConfigError("logging.tensorboard=true needs the tensorboard package: "
                          "pip install -e '.[tensorboard]' in the kd repository") from exc
    return EpochWriter(stage_dir(run_dir, stage))
