"""`kd report PATH...`: finished runs side by side, one row per run.

A PATH is a run folder (it holds ``report.json``), a multirun folder (its numbered jobs) or any
folder with runs somewhere below it (``store`` folders and hidden folders are skipped). Each row
shows the run's command-line overrides that differ between the runs compared, then the
student's top-1 and agreement, the baseline (the student trained on hard labels from the same
start: from scratch, the teacher's weights or pretraining) and what distillation gained over it,
the teacher, the student's size and latency, the latency speed-up over the teacher (timed in
turn within the run, so it compares across runs where the absolute latencies do not), and the
wall time. The table is printed, and
written as ``summary.csv`` (for machines) and ``summary.md`` (best student top-1 in bold).

``SummaryCallback`` writes the same summary into the sweep folder at the end of every multirun
(``kd train -m ...``), registered under ``hydra.callbacks`` in ``configs/kd.yaml``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from kdcli import distributed
from kdcli.checkpoint import atomic_write_text
from kdcli.errors import KDError
from kdcli.report import _duration, baseline_start, format_count
from kdcli.runfolder import EARLIER, FAILED, REPORT, holds_a_run

log = logging.getLogger(__name__)

__all__ = ["NoRunsFound", "Summary", "SummaryCallback", "collect", "find_runs", "main",
           "summarize", "write_summary"]

OVERRIDES = Path(".hydra") / "overrides.yaml"
# What the run's config gave each setting: the options picked (hydra.runtime.choices) and the
# composed config, both written into the run folder when it starts.
HYDRA_CFG, RUN_CFG = Path(".hydra") / "hydra.yaml", Path(".hydra") / "config.yaml"
SUMMARY_CSV, SUMMARY_MD = "summary.csv", "summary.md"
MISSING = "-"  # a setting a run has no value for (no option of an optional group picked)
_DASH = "—"  # a metric a run did not produce (e.g. baseline=false)
# Folders that never hold runs: the content-addressed store, and hidden ones (.hydra, .git).
_SKIP_DIRS = {"store", "kd-store"}


class NoRunsFound(KDError):
    """None of the paths holds a finished run (a ``report.json``) or a failed sweep job."""


# --------------------------------------------------------------------------- columns


def _pct(x: float | None) -> str:
    return _DASH if x is None else f"{x:.2f}"


def _gain(x: float | None) -> str:
    return _DASH if x is None else f"{x:+.2f}"


def _count(x: float | None) -> str:
    return _DASH if x is None else format_count(x)


def _time(x: float | None) -> str:
    return _DASH if x is None else _duration(x)


@dataclass(frozen=True)
class Metric:
    """One metric column: its CSV name, its header for people, how to read and show it."""

    key: str
    title: str
    read: Callable[[Mapping[str, Any]], float | None]
    show: Callable[[float | None], str]
    higher_is_better: bool = True


def _value(report: Mapping[str, Any], block: str | None, key: str) -> float | None:
    """``report[block][key]`` (or ``report[key]``) if it is a finite number, else None."""
    node = report.get(block) if block else report
    value = node.get(key) if isinstance(node, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _gain_of(report: Mapping[str, Any]) -> float | None:
    student, baseline = _value(report, "student", "top1"), _value(report, "baseline", "top1")
    return None if student is None or baseline is None else student - baseline


METRICS = (
    Metric("student/top1", "student top-1 %", lambda r: _value(r, "student", "top1"), _pct),
    Metric("student/agreement", "agreement %", lambda r: _value(r, "student", "agreement"),
           _pct),
    Metric("baseline/top1", "baseline top-1 %", lambda r: _value(r, "baseline", "top1"), _pct),
    Metric("gain/top1", "gain", _gain_of, _gain),
    Metric("teacher/top1", "teacher top-1 %", lambda r: _value(r, "teacher", "top1"), _pct),
    Metric("student/params", "params", lambda r: _value(r, "student", "params"), _count,
           higher_is_better=False),
    Metric("student/latency_ms", "latency ms", lambda r: _value(r, "student", "latency_ms"),
           lambda x: _DASH if x is None else f"{x:.2f}", higher_is_better=False),
    # Teacher / student latency, the two timed in turn in one session: unlike the absolute
    # latencies of runs timed at different moments, comparable between rows.
    Metric("compression/latency_speedup", "speed-up",
           lambda r: _value(r, "compression", "latency_speedup"),
           lambda x: _DASH if x is None else f"{x:.1f}×"),
    Metric("wall_time_s", "wall time", lambda r: _value(r, None, "wall_time_s"), _time,
           higher_is_better=False),
)
BEST = "student/top1"  # the column whose best value is marked
LATENCY_NOTE = ("latency: the student's, batch 1 on the CPU; each run timed it in its own "
                "session under that moment's machine load, so compare runs by the speed-up "
                "(teacher / student latency, the two timed in turn in one session).")
# `--sort` names: short aliases of the metric columns, or "run" for path order (the default).
SORT_KEYS = {"run": None, "top1": "student/top1", "agreement": "student/agreement",
             "baseline": "baseline/top1", "gain": "gain/top1", "teacher": "teacher/top1",
             "params": "student/params", "latency": "student/latency_ms",
             "speedup": "compression/latency_speedup",
             "wall_time": "wall_time_s"}


# --------------------------------------------------------------------------- data


@dataclass
class Row:
    run: str  # path relative to the summary's base folder
    path: Path
    overrides: dict[str, str]
    metrics: dict[str, float | None]
    error: str | None = None  # a sweep job that failed: its one-line error (failed.json)


@dataclass
class Summary:
    base: Path  # the runs' common parent
    keys: list[str]  # the override keys whose values differ between runs
    rows: list[Row]
    paths: list[str] = field(default_factory=list)  # those given that hold the runs
    # What the runs' baselines started from (kdcli.report.baseline_start), in run order.
    starts: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.error is not None]

    def best(self) -> float | None:
        values = [r.metrics[BEST] for r in self.rows if r.metrics[BEST] is not None]
        return max(values) if values else None


def _natural(name: str) -> list[Any]:
    """Sort key putting job 10 after job 9: ``"10" -> ["", 10, ""]``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _folders_under(root: Path, holds: Callable[[Path], bool]) -> list[Path]:
    """The folders under `root` (itself included) that `holds`, in natural order, without
    looking inside them (a run's own folders hold no other runs). Hidden folders, stores and
    the earlier-<time>/ folders of runs set aside by later ones (kdcli.runfolder) are skipped."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        if holds(Path(dirpath)):
            found.append(Path(dirpath))
            dirnames[:] = []
            continue
        dirnames[:] = sorted((d for d in dirnames if not d.startswith(".")
                              and d not in _SKIP_DIRS and not EARLIER.fullmatch(d)),
                             key=_natural)
    return found


def _runs_under(root: Path) -> list[Path]:
    return _folders_under(root, holds_a_run)


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """Every run folder under `paths`, absolute, in argument order then path order."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise KDError(f"no such file or directory: {', '.join(missing)}")
    runs: dict[Path, None] = {}
    empty = []
    for given in map(Path, paths):
        path = given
        if path.is_file():
            if path.name != REPORT:
                raise KDError(f"{path} is a file; give run folders, multirun folders or "
                              f"folders holding runs")
            path = path.parent
        found = _runs_under(path)
        if not found:
            empty.append(given)
        for run in found:
            runs.setdefault(run.resolve(), None)
    if not runs:
        raise NoRunsFound(f"no runs ({REPORT}) found under {', '.join(map(str, paths))}")
    for path in empty:  # the table would just lack it (a `kd eval` folder, say)
        log.warning("%s: no %s under it, skipped", path, REPORT)
    # A `kd train` that started but never wrote its report or failed.json (a sweep's job cut
    # off by Ctrl-C or a time limit) would be missing from the table without a word.
    for given in map(Path, paths):
        for run in _folders_under(given, _unfinished) if given.is_dir() else []:
            log.warning("%s: a kd train run that did not finish (no %s: interrupted, or still "
                        "running), skipped", run, REPORT)
    return list(runs)


def _unfinished(folder: Path) -> bool:
    """A `kd train` run folder (its `.hydra/` and `train.log`) with neither a report nor a
    failed.json; a `kd teacher`/`kd eval` folder, which never writes a report, is not one."""
    return ((folder / OVERRIDES).is_file() and (folder / "train.log").is_file()
            and not holds_a_run(folder))


def read_overrides(run: Path) -> dict[str, str]:
    """``{key: value}`` of the run's command-line overrides, without the ones that only say
    where it wrote (``hydra.*``, ``store``). Values stay as typed, e.g. ``"[resnet56,vgg8]"``."""
    path = run / OVERRIDES
    if not path.is_file():
        return {}
    try:
        items = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError) as exc:
        log.warning("Ignoring the unreadable overrides of %s: %s", run, exc)
        return {}
    out: dict[str, str] = {}
    for item in items if isinstance(items, list) else []:
        key, sep, value = str(item).partition("=")
        deleted = key.startswith("~")
        key = key.lstrip("~+")
        if key in ("store", "hydra") or key.startswith(("hydra.", "hydra/")):
            continue
        out[key] = "(deleted)" if deleted else value if sep else ""
    return out


_ABSENT = object()  # a key the config does not hold (None is a value: null)


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def _show_value(value: Any) -> str:
    """A config value as it would be typed on the command line (`[resnet56,vgg8]`, `null`, `4`
    for the float 4.0: a column read `4.0` for a run that kept the default beside `2` and `8`
    typed by the others)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip() \
            .replace(", ", ",").replace(": ", ":")
    return "null" if value is None else str(value).lower() if isinstance(value, bool) \
        else str(value)


def effective_values(run: Path, keys: Sequence[str], report: Mapping[str, Any] | None
                     ) -> dict[str, str]:
    """What the run's config gave each of `keys` (`teacher`, `loss.temperature`): the option a
    preset or default picked (`.hydra/hydra.yaml`), else the value in its composed config
    (`.hydra/config.yaml`, else report.json's copy); MISSING for a group no option was picked
    for (`experiment`) and for what neither file holds (a run from before they were kept)."""
    hydra = _load_yaml(run / HYDRA_CFG)
    choices = (((hydra or {}).get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    config = _load_yaml(run / RUN_CFG)
    if not isinstance(config, dict):
        config = (report or {}).get("config")
    found = {}
    for key in keys:
        if key in choices:
            found[key] = MISSING if choices[key] is None else _show_value(choices[key])
            continue
        node: Any = config
        for part in key.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if isinstance(node, dict):  # a group's node, its option unknown: the model's name
            node = ((report or {}).get(key) or {}).get("name", _ABSENT)
        found[key] = MISSING if node is _ABSENT else _show_value(node)
    return found


def _read_report(run: Path) -> dict[str, Any] | None:
    try:
        report = json.loads((run / REPORT).read_text())
    except (OSError, ValueError) as exc:
        log.warning("Skipping %s: unreadable %s: %s", run, REPORT, exc)
        return None
    return report if isinstance(report, dict) else None


def _read_failure(run: Path) -> str | None:
    """The error of a failed sweep job (its failed.json), None for a finished run (a report
    newer than any failed.json)."""
    failed, report = run / FAILED, run / REPORT
    if not failed.is_file() or (report.is_file()
                                and report.stat().st_mtime > failed.stat().st_mtime):
        return None
    try:
        return str(json.loads((run / FAILED).read_text())["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return "failed (unreadable failed.json)"


def _common_parent(runs: list[Path]) -> Path:
    if len(runs) == 1:
        return runs[0].parent
    base = Path(os.path.commonpath(runs))
    return base.parent if base in runs else base


def collect(paths: Sequence[Path], sort: str | None = None) -> Summary:
    """Reads every run under `paths` into a Summary; `sort` is a key of SORT_KEYS."""
    found = find_runs(paths)
    errors = {run: e for run in found if (e := _read_failure(run)) is not None}
    reports = {run: r for run in found if run not in errors
               and (r := _read_report(run)) is not None}
    if not reports and not errors:
        raise NoRunsFound(f"no readable {REPORT} under {', '.join(map(str, paths))}")
    runs = [run for run in found if run in reports or run in errors]
    base = _common_parent(runs)
    overrides = {run: read_overrides(run) for run in runs}
    keys: list[str] = []
    for o in overrides.values():
        keys += [k for k in o if k not in keys]
    # A column for each setting the command lines differ on; a run that did not set it shows
    # the value its config gave it (a preset's, the default), not a blank that reads "default".
    keys = [k for k in keys if len({o.get(k, MISSING) for o in overrides.values()}) > 1]
    effective = {run: effective_values(run, [k for k in keys if k not in overrides[run]],
                                       reports.get(run)) for run in runs}
    rows = [Row(run=run.relative_to(base).as_posix(), path=run,
                overrides={k: overrides[run].get(k, effective[run].get(k, MISSING)) for k in keys},
                metrics={m.key: m.read(reports.get(run, {})) for m in METRICS},
                error=errors.get(run))
            for run in runs]
    column = SORT_KEYS.get(sort) if sort else None
    if sort and sort not in SORT_KEYS:
        raise KDError(f"unknown sort key {sort!r}; choose one of {', '.join(SORT_KEYS)}")
    if column is not None:
        sign = -1 if next(m for m in METRICS if m.key == column).higher_is_better else 1
        # Runs without the value go last, in path order.
        rows.sort(key=lambda r: (r.metrics[column] is None, sign * (r.metrics[column] or 0)))
    # The paths given that hold these runs (the others were warned of as skipped).
    folders = [Path(p).resolve().parent if Path(p).is_file() else Path(p).resolve()
               for p in paths]
    given = [str(p) for p, folder in zip(paths, folders, strict=True)
             if any(run.is_relative_to(folder) for run in runs)]
    starts = list(dict.fromkeys(baseline_start(reports[run]) for run in runs
                                if run in reports and isinstance(reports[run].get("baseline"),
                                                                 Mapping)))
    return Summary(base, keys, rows, given, starts)


# --------------------------------------------------------------------------- output


def to_csv(summary: Summary) -> str:
    """One line per run; metrics as plain numbers, an empty cell where a run has none."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    failed = bool(summary.failed)
    writer.writerow([*summary.keys, *(m.key for m in METRICS), "run",
                     *(["error"] if failed else [])])
    for row in summary.rows:
        writer.writerow([*row.overrides.values(),
                         *("" if row.metrics[m.key] is None else row.metrics[m.key]
                           for m in METRICS), row.run, *([row.error or ""] if failed else [])])
    return buf.getvalue()


_FLOAT = re.compile(r"(?<![\w.])[-+]?\d*\.\d+(?:[eE][-+]?\d+)?(?![\w.])")


def round_floats(text: str) -> str:
    """`text` with each float of more than 6 significant digits at 4: what an Optuna search
    draws (`loss.temperature=4.841694527491273` reads 4.842); values as people type them
    (`0.05`, `1e-4`) are left alone. For display only: summary.csv and optimization_results.yaml
    keep the exact values the trials ran with."""
    def short(match: re.Match[str]) -> str:
        digits = re.sub(r"[eE].*", "", match[0]).replace(".", "").lstrip("+-0")
        return f"{float(match[0]):.4g}" if len(digits) > 6 else match[0]

    return _FLOAT.sub(short, text)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(summary: Summary) -> str:
    """A Markdown table of the runs, the best student top-1 in bold."""
    best = summary.best()
    failed = bool(summary.failed)
    header = [*summary.keys, *(m.title for m in METRICS), "run", *(["failed"] if failed else [])]
    align = [*("---" for _ in summary.keys), *("---:" for _ in METRICS), "---",
             *(["---"] if failed else [])]
    lines = [
        "# Run comparison",
        "",
        f"{_count_runs(summary, '`')}. Override columns show only the settings whose "
        "command-line values differ between runs; a run that did not set one shows the value "
        f"its config gave it (a preset's or the default; {MISSING}: none). Accuracies in %; "
        f"{_gain_note(summary)}; {LATENCY_NOTE} Best student top-1 in bold.",
        "",
        "| " + " | ".join(map(_md_cell, header)) + " |",
        "| " + " | ".join(align) + " |",
    ]
    for row in summary.rows:
        cells = [round_floats(v) for v in row.overrides.values()]
        for m in METRICS:
            text = m.show(row.metrics[m.key])
            if m.key == BEST and best is not None and row.metrics[m.key] == best:
                text = f"**{text}**"
            cells.append(text)
        cells.append(f"`{row.run}`")
        if failed:
            cells.append(row.error or "")
        lines.append("| " + " | ".join(map(_md_cell, cells)) + " |")
    return "\n".join(lines) + "\n"


def _gain_note(summary: Summary) -> str:
    """What the gain subtracts, naming the baselines' start: "(from scratch)", "(teacher
    init)", or each run's own when they differ (the student.init / pretrain.dataset columns)."""
    if len(summary.starts) == 1:
        start = summary.starts[0]
    elif summary.starts:
        start = f"each run's own start: {', '.join(summary.starts)}"
    else:
        start = "from scratch"
    return f"gain = student top-1 − baseline ({start}) top-1"


def _count_runs(summary: Summary, quote: str = "") -> str:
    """`3 run(s), 1 failed, in A, B`: the paths given, not their common parent (which the user
    may not have named); none when there are too many to read in a title."""
    failed = len(summary.failed)
    text = f"{len(summary.rows)} run(s)" + (f", {failed} failed" if failed else "")
    if not summary.paths or len(summary.paths) > 3:
        return text
    where = ", ".join(f"{quote}{p}{quote}" for p in summary.paths)
    return f"{text}{',' if failed else ''} in {where}"


def to_table(summary: Summary) -> Table:
    best = summary.best()
    failed = bool(summary.failed)
    table = Table(title=_count_runs(summary),
                  caption=f"{_gain_note(summary)} (points); {LATENCY_NOTE}")
    for key in summary.keys:
        table.add_column(key, style="cyan")
    for m in METRICS:
        table.add_column(m.title, justify="right")
    table.add_column("run", style="dim")
    if failed:
        table.add_column("failed", style="red")
    for row in summary.rows:
        cells = []
        for m in METRICS:
            text = m.show(row.metrics[m.key])
            if m.key == BEST and best is not None and row.metrics[m.key] == best:
                text = f"[bold green]{text}[/]"
            cells.append(text)
        table.add_row(*map(round_floats, row.overrides.values()), *cells, row.run,
                      *([row.error or ""] if failed else []))
    return table


def write_summary(summary: Summary, out_dir: Path) -> tuple[Path, Path]:
    """Writes ``summary.csv`` and ``summary.md`` into `out_dir` (atomically); returns both."""
    csv_path, md_path = Path(out_dir) / SUMMARY_CSV, Path(out_dir) / SUMMARY_MD
    atomic_write_text(csv_path, to_csv(summary))
    atomic_write_text(md_path, to_markdown(summary))
    return csv_path, md_path


def _console() -> Console:
    # Off a terminal (a log file, CI) rich would squeeze the table into 80 columns.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=200 if wide else None)


def summarize(paths: Sequence[Path], out_dir: Path | None = None, sort: str | None = None,
              console: Console | None = None, named: Sequence[Path] | None = None) -> Summary:
    """Collects the runs under `paths`, prints the table and writes the summary files.

    `out_dir` defaults to the single folder given, else the current directory. The title
    names `named` if given (a sweep's folder, for its jobs), else the paths holding the runs.
    """
    summary = collect(paths, sort)
    if named is not None:
        summary.paths = [str(p) for p in named]
    if out_dir is None:
        out_dir = Path(paths[0]) if len(paths) == 1 and Path(paths[0]).is_dir() else Path.cwd()
    (console or _console()).print(to_table(summary))
    csv_path, md_path = write_summary(summary, out_dir)
    log.info("Wrote %s and %s", md_path, csv_path.name)
    return summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kd report",
        description="Compare finished runs: one row per run, the overrides that differ between "
                    "them, student/baseline/teacher top-1, size, latency and its speed-up "
                    "over the teacher, wall time. Writes "
                    "summary.csv and summary.md.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="a run folder, a multirun folder, or any folder holding runs")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="where to write summary.csv/.md (default: the single PATH if it "
                             "is a folder, else the current directory)")
    parser.add_argument("--sort", choices=list(SORT_KEYS), default="run",
                        help="order rows by this column, best first (default: run path)")
    args = parser.parse_args(argv)
    summarize(args.paths, out_dir=args.out, sort=args.sort)
    return 0


class SummaryCallback(Callback):
    """Hydra callback: at the end of a multirun, writes the summary into the sweep folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if distributed.launched():
            # Under torchrun every rank ran the sweep; rank 0 wrote the jobs and summarises.
            # Another rank's Hydra may have named its own sweep folder from its clock: once its
            # job folders are gone (distributed.shared_run_dir), only Hydra's files are left.
            main_dir = Path(distributed.broadcast(str(sweep_dir)))
            if not distributed.is_main():
                if (sweep_dir.resolve() != main_dir.resolve()
                        and distributed.holds_only_hydra_files(sweep_dir, ("multirun.yaml",))):
                    shutil.rmtree(sweep_dir, ignore_errors=True)
                return
        note_failures_of_other_processes(config)
        from kdcli.cli import SWEEP_JOBS

        # This sweep's jobs only: not the folders an earlier, larger sweep left there.
        jobs = [Path(job) for job in SWEEP_JOBS if Path(job).exists()] or [sweep_dir]
        try:
            summarize(jobs, out_dir=sweep_dir, named=[sweep_dir])
        except NoRunsFound:
            # Only `kd train` writes report.json; a `kd teacher -m` sweep has nothing to compare.
            log.info("No %s under %s: no sweep summary written", REPORT, sweep_dir)
        except Exception as exc:  # noqa: BLE001 - a summary must never fail a finished sweep
            log.warning("Could not write the sweep summary in %s: %s", sweep_dir, exc)


BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def note_failures_of_other_processes(config: DictConfig) -> None:
    """Adds the sweep's jobs that ran in other processes (a Slurm or local submitit launcher)
    to `cli.SWEEP_JOBS` / `cli.FAILED_JOBS`, from their folders: a job writes `.hydra/` when
    it starts and `failed.json` when it fails. Only folders started by this sweep count (after
    its `multirun.yaml`), not the job folders an earlier, larger sweep left there. With Hydra's
    own launcher every job ran in this process and was counted already."""
    from kdcli import cli

    if OmegaConf.select(config, "hydra.launcher._target_") == BASIC_LAUNCHER:
        return
    sweep_dir = Path(str(config.hydra.sweep.dir))
    started = sweep_dir / "multirun.yaml"
    since = started.stat().st_mtime - 2 if started.is_file() else 0.0  # 2 s: clock grain
    counted = {Path(folder).resolve() for folder in cli.SWEEP_JOBS}  # failed ones included
    for job in _job_folders(sweep_dir):
        if job.resolve() in counted or (job / OVERRIDES).stat().st_mtime < since:
            continue
        cli.SWEEP_JOBS.append(str(job))
        if (job / FAILED).is_file():
            cli.FAILED_JOBS.append((str(job), _read_failure(job) or "failed"))


def _job_folders(sweep_dir: Path) -> list[Path]:
    """Folders under `sweep_dir` where a job started (they hold `.hydra/overrides.yaml`)."""
    return _folders_under(sweep_dir, lambda folder: folder != sweep_dir
                          and (folder / OVERRIDES).is_file())
