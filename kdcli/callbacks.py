"""Hydra callbacks (registered under ``hydra.callbacks`` in ``configs/kd.yaml``) for what fails
outside kd's jobs, where Hydra would print a traceback: kd reports it in its own one line.

``OutputDirCallback`` makes the run or sweep folder before Hydra does, and holds the run folder's
lock while the run writes there; each sweep job takes its own folder's lock itself
(`hold_job_folder`, called by kdcli.cli.run_command), in whatever process its launcher runs it.
``OptunaCallback`` lets an Optuna search whose every trial failed end with kd's list of failed
jobs, and shows the best trial's floats rounded.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kdcli import runfolder
from kdcli.cli import FAILED_JOBS, os_error_line

if TYPE_CHECKING:
    from filelock import FileLock

__all__ = ["OptunaCallback", "OutputDirCallback"]

log = logging.getLogger("kdcli")

OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
OPTUNA_LOG = "hydra_plugins.hydra_optuna_sweeper._impl"  # the plugin's logger


class OutputDirCallback(Callback):
    """Makes `hydra.run.dir` (`hydra.sweep.dir`) before Hydra does: Hydra makes it outside any
    error handling of kd's, so a path that cannot be a folder (a file) ended in a traceback.

    Then takes the run folder's lock (kdcli.runfolder) before Hydra opens its log there, so a
    second run into a folder another kd process is writing stops before it touches anything.
    A sweep's jobs lock their folders themselves (`hold_job_folder`); under the basic launcher
    kd makes each job's folder first (`making_job_folders`).
    """

    def __init__(self) -> None:
        self.held: FileLock | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.held = claim(make_output_dir(config, "hydra.run.dir"), "hydra.run.dir")

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        # Not reached when the run exits (kd's errors): the lock goes with the process.
        if self.held is not None:
            self.held.release()
            self.held = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        make_output_dir(config, "hydra.sweep.dir")
        # Hydra makes a job's folder just before the job, with no hook before: kd wraps the
        # basic launcher's (and so the Optuna sweeper's) `run_job` to make it first. Other
        # launchers make it in the job's process, where a file in the way fails that job.
        from hydra._internal.core_plugins import basic_launcher

        if not hasattr(basic_launcher.run_job, "__wrapped__"):  # once per process
            basic_launcher.run_job = making_job_folders(basic_launcher.run_job)


def make_output_dir(config: DictConfig, key: str) -> Path | None:
    """Makes the folder at `key` and returns it, or exits 1 with one line saying why it cannot
    be made; None when `key` does not resolve yet."""
    try:
        path = Path(str(OmegaConf.select(config, key)))
    except Exception:  # noqa: BLE001 - e.g. ${hydra:...} before Hydra set it: Hydra reports it
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        sys.stderr.write(f"error: {output_dir_error(key, path, exc)}\n")
        sys.exit(1)
    return path


def claim(folder: Path | None, key: str) -> FileLock | None:
    """The lock of run folder `folder` (`take_lock`); exits 1 with kd's one line if another
    process holds it (a Hydra callback cannot fail the run by raising: Hydra turns that into a
    warning and goes on)."""
    try:
        return take_lock(folder, key)
    except runfolder.FolderInUse as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(1)


def take_lock(folder: Path | None, key: str) -> FileLock | None:
    """The lock of run folder `folder` (runfolder.lock), held by this process; FolderInUse if
    another process holds it. Under torchrun rank 0 alone takes it, for all ranks (they share
    the folder). None for no folder, another rank, or a folder that cannot be locked (the run's
    first write there then names the problem)."""
    if folder is None or os.environ.get("RANK", "0") != "0":
        return None
    try:
        return runfolder.lock(folder, key)
    except OSError as exc:
        log.warning("cannot lock the run folder %s (%s); going on without the lock", folder,
                    os_error_line(exc))
        return None


def hold_job_folder() -> FileLock | None:
    """The lock of this sweep job's folder, taken by the job itself first thing (the caller,
    kdcli.cli.run_command, releases it when the job ends, also when it raises), in the process
    its launcher runs it in: the sweep's own (Hydra's basic launcher, the Optuna sweeper), a
    submitit one (`submitit_local`, Slurm) or a joblib worker. Not in Hydra's `on_job_start`,
    which runs there too: a callback cannot fail the job (Hydra turns its exceptions into
    warnings and runs the job). Before this, Hydra's `run_job` has made the folder and set up
    the job's logging: kd's hydra/job_logging=kd opens the log file at its first line, and kd
    sets `hydra.output_subdir: null`, so nothing is written there yet (with Hydra's own job
    logging an empty log file may be made there, or another run's opened, without a line).

    A folder another kd process is writing: the job logs nothing there and stops. Under the
    basic launcher kd's one line, exit 1: the sweep ends, as a run does. In another process
    the job fails with FolderInUse, which the launcher hands back to the sweep's process:
    Hydra's sweeper raises it there (after its `Error executing job with overrides: [...]`)
    and kd reports the same line, exit 1 (kdcli.cli.with_kd_errors).
    """
    from kdcli.compare import BASIC_LAUNCHER

    hydra = HydraConfig.get()  # the job's: its folder resolves as Hydra's `run_job` made it
    folder = Path(str(hydra.sweep.dir)) / str(hydra.sweep.subdir)
    try:
        return take_lock(folder, "hydra.sweep.dir")
    except runfolder.FolderInUse as exc:
        close_logs_in(folder)  # submitit logs the job's end there, after the job
        if OmegaConf.select(hydra, "launcher._target_") != BASIC_LAUNCHER:
            raise
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(1)


def close_logs_in(folder: Path) -> None:
    """Closes and drops the root logger's log files in `folder` (Hydra's job log, opened for
    appending): a job refused the folder must not log into the other run's log."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and \
                Path(handler.baseFilename).resolve().parent == folder.resolve():
            root.removeHandler(handler)
            handler.close()


def making_job_folders(run_job):
    """Wraps Hydra's `run_job` for sweep jobs: kd makes the job's folder first. A folder that
    cannot be made (a file in the way) ends the sweep with kd's one line, as the sweep folder's
    own does: Hydra's traceback came from there."""
    signature = inspect.signature(run_job)

    @functools.wraps(run_job)
    def wrapper(*args, **kwargs):
        job = signature.bind(*args, **kwargs).arguments
        folder = job_folder(job["config"], job["job_dir_key"], job.get("job_subdir_key"))
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                sys.stderr.write(f"error: {job_folder_error(folder, exc)}\n")
                sys.exit(1)
        return run_job(*args, **kwargs)

    return wrapper


def job_folder(config: DictConfig, dir_key: str, subdir_key: str | None) -> Path | None:
    """A sweep job's folder, `<dir_key>/<subdir_key>`, resolved as Hydra's `run_job` does (with
    the job's config as HydraConfig); None when it does not resolve (Hydra then reports it)."""
    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg
    try:
        hydra_config.set_config(config)
        folder = Path(str(OmegaConf.select(config, dir_key)))
        if subdir_key is not None:
            folder = folder / str(OmegaConf.select(config, subdir_key))
    except Exception:  # noqa: BLE001 - Hydra's own run_job reports it, as before
        return None
    finally:
        hydra_config.cfg = previous
    return folder


def output_dir_error(key: str, path: Path, exc: OSError) -> str:
    """The one line for a folder that could not be made; a file in the way is named as such
    (the OSError's own text, `File exists` or `Not a directory`, does not say which path)."""
    blocker = file_in_the_way(path)
    if blocker is not None:
        where = "" if blocker == path else f": {blocker}"
        return f"{key}={path}{where} is a file, not a folder"
    return f"{key}={path}: {os_error_line(exc)}"


def job_folder_error(folder: Path, exc: OSError) -> str:
    """`output_dir_error` for a sweep job's folder, which no setting names alone."""
    blocker = file_in_the_way(folder)
    if blocker is None:
        return f"sweep job folder {folder}: {os_error_line(exc)}"
    where = "" if blocker == folder else f": {blocker}"
    return (f"sweep job folder {folder}{where} is a file, not a folder; move it away, or give "
            f"the sweep another folder (hydra.sweep.dir=...)")


def file_in_the_way(path: Path) -> Path | None:
    """The nearest of `path` and its parents that exists, if it is not a folder."""
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    return blocker if blocker is not None and not blocker.is_dir() else None


class OptunaCallback(Callback):
    """When every trial of an Optuna search failed, the plugin still asks Optuna for the best
    trial and ends in its "No trials are completed yet" traceback. Hydra takes a sweeper only
    from the hydra_plugins package, so kd wraps the plugin's `sweep` rather than subclass it.
    Its closing lines (`Best parameters: {'loss.temperature': 4.841694527491273, ...}`) are
    shown with their floats rounded (`RoundedFloats`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if OmegaConf.select(config, "hydra.sweeper._target_") != OPTUNA_SWEEPER:
            return
        from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

        if not hasattr(OptunaSweeper.sweep, "__wrapped__"):  # once per process
            OptunaSweeper.sweep = without_best_trial_error(OptunaSweeper.sweep)
        plugin_log = logging.getLogger(OPTUNA_LOG)
        if not any(isinstance(f, RoundedFloats) for f in plugin_log.filters):
            plugin_log.addFilter(RoundedFloats())


class RoundedFloats(logging.Filter):
    """Rounds the floats of the Optuna plugin's `Best parameters` / `Best value` lines to 4
    significant digits (`kdcli.compare.round_floats`); optimization_results.yaml keeps them
    exact."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Best "):
            from kdcli.compare import round_floats

            record.msg, record.args = round_floats(record.getMessage()), ()
        return True


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
