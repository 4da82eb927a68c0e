"""Hydra callbacks (registered under ``hydra.callbacks`` in ``configs/kd.yaml``) for what fails
outside kd's jobs, where Hydra would print a traceback: kd reports it in its own one line.

``OutputDirCallback`` makes the run or sweep folder before Hydra does. ``OptunaCallback`` lets an
Optuna search whose every trial failed end with kd's list of failed jobs.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kdcli.cli import FAILED_JOBS, os_error_line

__all__ = ["OptunaCallback", "OutputDirCallback"]

log = logging.getLogger("kdcli")

OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"


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


class OptunaCallback(Callback):
    """When every trial of an Optuna search failed, the plugin still asks Optuna for the best
    trial and ends in its "No trials are completed yet" traceback. Hydra takes a sweeper only
    from the hydra_plugins package, so kd wraps the plugin's `sweep` rather than subclass it."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if OmegaConf.select(config, "hydra.sweeper._target_") != OPTUNA_SWEEPER:
            return
        from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

        if not hasattr(OptunaSweeper.sweep, "__wrapped__"):  # once per process
            OptunaSweeper.sweep = without_best_trial_error(OptunaSweeper.sweep)


def without_best_trial_error(sweep):
    """Wraps the Optuna sweeper's `sweep`: when every job it launched failed, the ValueError of
    the missing best trial ends the search like a finished one (summary, then kd's exit 1)."""

    @functools.wraps(sweep)
    def wrapper(self, arguments):
        try:
            return sweep(self, arguments)
        except ValueError:
            config = getattr(self.sweeper, "config", None)
            if config is not None:  # jobs run in other processes (a submitit launcher)
                from kdcli.compare import note_failures_of_other_processes

                note_failures_of_other_processes(config)
            launched = getattr(self.sweeper, "job_idx", 0)  # jobs the plugin has started
            if not launched or len(FAILED_JOBS) != launched:
                raise
            log.error("Every trial of the Optuna search failed: no best parameters, no "
                      "optimization_results.yaml")
            return None

    return wrapper
