"""`kd report` and the multirun summary callback; TensorBoard event files of a run.

One real sweep (module fixture) in a subprocess; the other `kd report` checks call the verb
in-process through the CLI's own `run_plain`, which is what `kd report` runs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdcli import compare
from kdcli.cli import run_plain
from kdcli.compare import MISSING, SummaryCallback, collect, to_markdown
from tests.conftest import SMOKE, TINY, kd, read_report


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-job smoke sweep over the temperature, baseline on, TensorBoard on; returns the
    sweep folder (its summary is written by the callback, not by the test)."""
    root = tmp_path_factory.mktemp("compare")
    kd("train", "-m", *SMOKE, "loss.temperature=2,4", "logging.tensorboard=true",
       f"store={root / 'store'}", f"hydra.sweep.dir={root / 'multi'}", cwd=root)
    return root / "multi"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_multirun_writes_summary_automatically(sweep: Path) -> None:
    rows = _rows(sweep / "summary.csv")
    assert [r["loss.temperature"] for r in rows] == ["2", "4"]
    assert [r["run"] for r in rows] == ["0", "1"]
    # Only what varies is a column: not experiment, device, store or logging.tensorboard.
    header = list(rows[0])
    assert header[0] == "loss.temperature"
    assert not {"experiment", "device", "store", "logging.tensorboard"} & set(header)
    for row, job in zip(rows, ("0", "1"), strict=True):
        report = read_report(sweep / job)
        assert float(row["student/top1"]) == pytest.approx(report["student"]["top1"])
        assert float(row["baseline/top1"]) == pytest.approx(report["baseline"]["top1"])
        assert float(row["gain/top1"]) == pytest.approx(
            report["student"]["top1"] - report["baseline"]["top1"])
        assert float(row["teacher/top1"]) == pytest.approx(report["teacher"]["top1"])
        assert int(row["student/params"]) == report["student"]["params"]
        assert float(row["wall_time_s"]) == pytest.approx(report["wall_time_s"])
    md = (sweep / "summary.md").read_text()
    best = max(float(r["student/top1"]) for r in rows)
    assert f"**{best:.2f}**" in md
    assert md.count("| `") == 2  # one table row per run


def test_a_failed_job_does_not_end_the_sweep_and_is_listed(tmp_path: Path, capsys) -> None:
    # A kd error in one job used to exit the whole sweep there: later jobs never ran and no
    # summary was written. Now every job runs, the failed one is listed, and kd exits 1.
    sweep = tmp_path / "multi"
    proc = kd("train", "-m", *TINY, "loss.temperature=0,4", f"store={tmp_path / 'store'}",
              f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "error: 1 of 2 job(s) of the sweep failed (the others ran" in proc.stderr
    assert f"{sweep / '0'}: loss=hinton: ValueError: loss.temperature must be > 0" in proc.stderr
    error = json.loads((sweep / "0" / "failed.json").read_text())["error"]
    assert "loss.temperature must be > 0, got 0" in error
    assert read_report(sweep / "1")["student"]["top1"] >= 0
    rows = _rows(sweep / "summary.csv")
    assert [(r["run"], r["loss.temperature"], r["error"]) for r in rows] == [
        ("0", "0", error), ("1", "4", "")]
    assert rows[0]["student/top1"] == "" and float(rows[1]["student/top1"]) >= 0
    md = (sweep / "summary.md").read_text()
    assert f"2 run(s), 1 failed, in `{sweep}`." in md and f"| `0` | {error} |" in md
    # kd report reads the same folder the same way.
    assert run_plain("report", compare.main, [str(sweep), "--out", str(tmp_path)]) == 0
    assert _rows(tmp_path / "summary.csv") == rows


def test_report_gives_same_rows_for_multirun_and_job_dirs(sweep: Path, tmp_path: Path) -> None:
    whole = kd("report", str(sweep), "--out", str(tmp_path / "whole"), cwd=tmp_path)
    assert "loss.temperature" in whole.stdout and "student top-1" in whole.stdout
    assert compare.main([str(sweep / "0"), str(sweep / "1"), "--out", str(tmp_path / "jobs")]) == 0
    auto = (sweep / "summary.csv").read_text()
    assert (tmp_path / "whole" / "summary.csv").read_text() == auto
    assert (tmp_path / "jobs" / "summary.csv").read_text() == auto
    # The same table; only the title differs, naming the paths given.
    def table(md: Path) -> list[str]:
        return [line for line in md.read_text().splitlines() if line.startswith("|")]

    assert table(tmp_path / "jobs" / "summary.md") == table(sweep / "summary.md")


def test_report_on_parent_folder_skips_store(sweep: Path) -> None:
    # The sweep's parent also holds the store; the report still finds exactly the 2 jobs,
    # named relative to their common parent.
    summary = compare.collect([sweep.parent], sort="top1")
    assert sorted(r.run for r in summary.rows) == ["0", "1"]


def test_report_nonexistent_path_fails_in_one_line(tmp_path: Path, capsys) -> None:
    assert run_plain("report", compare.main, ["/nonexistent/kd-runs"]) == 1
    assert "/nonexistent/kd-runs" in _one_line_error(capsys.readouterr().err)


def test_report_out_that_is_a_file_fails_in_one_line(sweep: Path, tmp_path: Path,
                                                     capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    assert run_plain("report", compare.main, [str(sweep), "--out", str(afile)]) == 1
    assert str(afile) in _one_line_error(capsys.readouterr().err)  # was a traceback
    assert afile.read_text() == "mine\n"


def test_report_folder_without_runs_fails(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    # A report.json inside a store or hidden folder is not a run.
    for skipped in ("store", ".hidden"):
        (empty / skipped / "x").mkdir(parents=True)
        (empty / skipped / "x" / "report.json").write_text("{}")
    assert run_plain("report", compare.main, [str(empty)]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "no runs" in line and str(empty) in line
    assert not (empty / "summary.csv").exists()


def test_tensorboard_events_per_trained_stage(sweep: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = sweep / "0"
    dirs = {p.name: p for p in (run / "tensorboard").iterdir()}
    teacher = [name for name in dirs if name.startswith("teacher")]
    assert len(teacher) == 1 and {"student", "baseline"} <= set(dirs)
    for name, stage in ((teacher[0], "teacher"), ("student", "student"),
                        ("baseline", "baseline")):
        acc = EventAccumulator(str(dirs[name]))
        acc.Reload()
        assert {"val/top1", "train/loss", "lr"} <= set(acc.Tags()["scalars"])
        events = acc.Scalars("val/top1")
        history = _rows(run / "metrics" / f"{stage}.csv")
        assert [e.step for e in events] == [int(r["epoch"]) for r in history] == [1, 2]
        assert [e.value for e in events] == pytest.approx(
            [float(r["val/top1"]) for r in history], abs=1e-4)
    # The second job reused teacher and baseline: only the stage it trained is logged.
    assert [p.name for p in (sweep / "1" / "tensorboard").iterdir()] == ["student"]


# --------------------------------------------------------------------------- no subprocess


def _fake_run(path: Path, overrides: list[str], top1: float | None, baseline: float = 50.0,
              speedup: float | None = 2.0, choices: dict | None = None,
              config: dict | None = None, saved: dict | None = None) -> None:
    """A finished run's folder. `choices`: the options its config picked (`.hydra/hydra.yaml`),
    `config`: its composed config (`.hydra/config.yaml`), `saved`: report.json's copy of it."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if choices is not None:
        (path / ".hydra" / "hydra.yaml").write_text(OmegaConf.to_yaml(
            {"hydra": {"runtime": {"choices": choices}}}))
    if config is not None:
        (path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(config))
    student = {"top1": top1, "agreement": 80.0, "params": 1000, "latency_ms": 0.5}
    (path / "report.json").write_text(json.dumps({
        "student": student, "baseline": {"top1": baseline}, "teacher": {"top1": 70.0},
        "compression": {"latency_speedup": speedup}, "wall_time_s": 12.0,
        **({"config": saved} if saved is not None else {})}))


def test_collect_columns_missing_overrides_and_sort(tmp_path: Path) -> None:
    _fake_run(tmp_path / "a", ["experiment=smoke", "loss=dkd", "store=/s", "hydra.run.dir=x"],
              60.0)
    _fake_run(tmp_path / "b", ["experiment=smoke", "loss=dist", "loss.beta=2", "store=/t"],
              65.0)
    _fake_run(tmp_path / "c", ["experiment=smoke", "loss=dist", "hydra.run.dir=y"], None)
    summary = collect([tmp_path], sort="top1")
    assert summary.keys == ["loss", "loss.beta"]
    assert [r.run for r in summary.rows] == ["b", "a", "c"]  # best first, no value last
    assert [r.overrides["loss.beta"] for r in summary.rows] == ["2", MISSING, MISSING]
    assert summary.rows[0].metrics["gain/top1"] == pytest.approx(15.0)
    assert summary.rows[2].metrics["gain/top1"] is None
    md = to_markdown(summary)
    assert "**65.00**" in md and "**60.00**" not in md


def test_a_setting_a_run_got_from_its_config_shows_its_value(tmp_path: Path) -> None:
    # Two smoke runs and one with teacher=resnet8 student=resnet8 read `-`, `-`, `resnet8`
    # under teacher and student: `-` reads as "the default" (resnet20), which hid that the
    # smoke preset had picked tiny_cnn-wide. Each run now shows what its config gave it.
    smoke = {"experiment": "smoke", "teacher": "tiny_cnn-wide", "student": "tiny_cnn",
             "hydra/sweeper": "basic"}
    config = {"loss": {"temperature": 4.0, "kd_weight": 0.5}, "teacher": {"width": 32}}
    _fake_run(tmp_path / "a", ["experiment=smoke"], 60.0, choices=smoke, config=config)
    _fake_run(tmp_path / "b", ["experiment=smoke", "loss.temperature=2"], 61.0, choices=smoke,
              config={**config, "loss": {"temperature": 2.0, "kd_weight": 0.5}})
    _fake_run(tmp_path / "c", ["teacher=resnet8", "student=resnet8", "loss.kd_weight=0.9"],
              62.0, choices={"experiment": None, "teacher": "resnet8", "student": "resnet8"},
              config=config)
    # A run whose .hydra/ kept only its overrides: report.json's config, else nothing.
    _fake_run(tmp_path / "d", ["loss.kd_weight=0.7"], 63.0, saved={
        "loss": {"kd_weight": 0.5, "temperature": 8.0}, "student": {"width": 16}})
    _fake_run(tmp_path / "e", ["loss.kd_weight=0.7"], 64.0)
    summary = collect([tmp_path])
    assert summary.keys == ["experiment", "loss.temperature", "teacher", "student",
                            "loss.kd_weight"]
    assert [list(r.overrides.values()) for r in summary.rows] == [
        ["smoke", "4", "tiny_cnn-wide", "tiny_cnn", "0.5"],  # 4.0 as typed beside the 2
        ["smoke", "2", "tiny_cnn-wide", "tiny_cnn", "0.5"],
        [MISSING, "4", "resnet8", "resnet8", "0.9"],  # no experiment picked
        [MISSING, "8", MISSING, MISSING, "0.7"],
        [MISSING, MISSING, MISSING, MISSING, "0.7"]]
    assert "a run that did not set one shows the value its config gave it" in to_markdown(summary)


def test_long_floats_of_a_search_are_rounded_for_people_not_for_programs(tmp_path: Path
                                                                         ) -> None:
    drawn = "4.841694527491273"  # as an Optuna trial's override holds it
    _fake_run(tmp_path / "0", [f"loss.temperature={drawn}", "optimizer.lr=0.05"], 60.0)
    _fake_run(tmp_path / "1", ["loss.temperature=2.5", "optimizer.lr=0.0123456789"], 61.0)
    summary = collect([tmp_path])
    md = to_markdown(summary)
    assert "| 4.842 | 0.05 |" in md and "| 2.5 | 0.01235 |" in md and drawn not in md
    assert compare.to_table(summary).columns[0]._cells == ["4.842", "2.5"]
    assert f"{drawn},0.05," in compare.to_csv(summary)  # exact, for programs


def test_summary_shows_the_in_run_speedup_and_says_why(tmp_path: Path) -> None:
    # Absolute latencies of runs timed at different moments differ for the same student
    # (0.28 vs 0.54 ms); the teacher/student speed-up, timed in turn in each run, compares.
    _fake_run(tmp_path / "a", ["loss=dkd"], 60.0, speedup=1.2)
    _fake_run(tmp_path / "b", ["loss=dist"], 65.0, speedup=None)
    _fake_run(tmp_path / "c", ["loss=mse"], 62.0, speedup=1.75)
    summary = collect([tmp_path], sort="speedup")  # fastest first, unknown last
    assert [r.metrics["compression/latency_speedup"] for r in summary.rows] == [1.75, 1.2, None]
    md = to_markdown(summary)
    assert "| speed-up |" in md and "| 1.8× |" in md
    assert "compare runs by the speed-up" in md
    assert "compression/latency_speedup" in compare.to_csv(summary).splitlines()[0]


def test_callback_never_fails_the_sweep(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                        ) -> None:
    callback = SummaryCallback()
    for sweep_dir in (tmp_path / "empty", tmp_path / "missing"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}}))
    assert "Could not write the sweep summary" in caplog.text  # the missing folder
    assert not (tmp_path / "empty" / "summary.csv").exists()


def test_outputs_set_aside_by_a_later_run_are_not_runs_of_the_sweep(tmp_path: Path) -> None:
    # A job folder whose new run has not finished holds only the earlier run's outputs, moved
    # into earlier-<time>/: comparing the sweep must not list them as one of its jobs.
    for folder in ("multi/0/earlier-20261124-010203", "multi/1", "multi/earlier-baseline"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "report.json").write_text("{}")
    multi = tmp_path / "multi"
    assert compare.find_runs([multi]) == [(multi / "1").resolve(),
                                          (multi / "earlier-baseline").resolve()]  # a user's


def test_report_warns_of_a_path_without_runs_and_names_the_paths_given(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A `kd eval` folder among the paths was left out without a word, and the title named
    # their common parent, which the user had not given.
    _fake_run(tmp_path / "day" / "a", ["loss=dkd"], 60.0)
    (tmp_path / "day" / "evaluated" / ".hydra").mkdir(parents=True)
    a, evaluated = str(tmp_path / "day" / "a"), str(tmp_path / "day" / "evaluated")
    assert run_plain("report", compare.main, [a, evaluated, "--out", str(tmp_path)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{evaluated}: no report.json under it, skipped"]
    md = (tmp_path / "summary.md").read_text()
    assert f"1 run(s) in `{a}`." in md
    assert f"under `{tmp_path / 'day'}`" not in md
    summary = collect([tmp_path / "day" / "a"])
    assert compare.to_table(summary).title == f"1 run(s) in {tmp_path / 'day' / 'a'}"


def test_report_warns_of_a_train_run_that_did_not_finish(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A sweep's job cut off by Ctrl-C keeps .hydra/ and train.log only: `kd report` left it out
    # of the table without a word. A `kd teacher` folder never writes a report: not warned of.
    _fake_run(tmp_path / "sweep" / "0", ["loss.temperature=2"], 60.0)
    cut = tmp_path / "sweep" / "1"
    (cut / ".hydra").mkdir(parents=True)
    (cut / ".hydra" / "overrides.yaml").write_text("- loss.temperature=8\n")
    (cut / "train.log").write_text("teacher epoch 1/40\n")
    teacher_only = tmp_path / "sweep" / "teacher-run"
    (teacher_only / ".hydra").mkdir(parents=True)
    (teacher_only / ".hydra" / "overrides.yaml").write_text("[]\n")
    (teacher_only / "teacher.log").write_text("")
    assert run_plain("report", compare.main, [str(tmp_path / "sweep"), "--out",
                                              str(tmp_path)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{cut}: a kd train run that did not finish (no report.json: "
                        "interrupted, or still running), skipped"]
    assert "1 run(s)" in (tmp_path / "summary.md").read_text()


def test_summary_names_what_the_baselines_started_from(tmp_path: Path) -> None:
    # The gain was explained as "student top-1 − baseline (from scratch) top-1" also for runs
    # whose baseline started from the teacher's weights (student.init=from_teacher).
    def set_init(run: str, init: str) -> None:
        path = tmp_path / run / "report.json"
        report = json.loads(path.read_text())
        report["baseline"]["init"] = init
        path.write_text(json.dumps(report))

    _fake_run(tmp_path / "a", ["loss.temperature=2"], 60.0)
    _fake_run(tmp_path / "b", ["loss.temperature=8"], 61.0)
    assert "gain = student top-1 − baseline (from scratch) top-1" in to_markdown(
        collect([tmp_path]))
    for run in ("a", "b"):
        set_init(run, "student.init=from_teacher (resnet20)")
    summary = collect([tmp_path])
    assert "gain = student top-1 − baseline (teacher init) top-1" in to_markdown(summary)
    assert "baseline (teacher init)" in str(compare.to_table(summary).caption)
    set_init("b", "scratch")
    assert ("gain = student top-1 − baseline (each run's own start: teacher init, from "
            "scratch) top-1") in to_markdown(collect([tmp_path]))
