"""Faults injected on purpose: NaN losses, damaged checkpoints and store entries, kill -9 in
each stage, two runs at once, a stale lock, a full disk."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from kdcli import checkpoint, runfolder, softlabels
from kdcli.errors import CorruptArtifact
from kdcli.stages import cache as cache_stage
from kdcli.stages.common import reuse_if_valid
from kdcli.store import Store
from tests.conftest import SMOKE, TINY, kd, read_report

NO_BASELINE = [*SMOKE, "baseline=false"]


def _entry(store: Path, stage: str) -> Path:
    (entry,) = [p for p in (store / stage).iterdir() if p.is_dir()]
    return entry


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    store = tmp_path / "store"
    # smoke: 512 images / batch 64 = 8 steps per epoch; call 10 is epoch 2, step 3.
    proc = kd("train", *NO_BASELINE, f"store={store}", f"hydra.run.dir={tmp_path / 'run'}",
              cwd=tmp_path, check=False, env={"KD_TEST_NAN_AT": "student:10"})
    assert proc.returncode == 1
    assert "loss became NaN/inf at epoch 2, step 3" in proc.stderr
    assert "Traceback" not in proc.stderr
    entry = _entry(store, "student")
    assert not (entry / "meta.json").exists()
    state = torch.load(entry / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values()
                                       if v.is_floating_point())


def test_nan_retry_goes_back_with_a_lower_learning_rate(tmp_path: Path) -> None:
    kd("train", *NO_BASELINE, "trainer.nan_retries=1", "scheduler=constant",
       f"store={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
       env={"KD_TEST_NAN_AT": "student:10"})
    log = (tmp_path / "run" / "train.log").read_text()
    assert "retrying from epoch 2 with the learning rate x0.5" in log
    with open(tmp_path / "run" / "metrics" / "student.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["lr"]) == float(rows[0]["lr"]) / 2
    assert read_report(tmp_path / "run")["stages"]["student"] == "trained"


def test_damaged_stored_teacher_is_detected_and_rebuilt(tmp_path: Path) -> None:
    store = tmp_path / "store"
    kd("teacher", *SMOKE, f"store={store}", cwd=tmp_path)
    last = _entry(store, "teacher") / "last.pt"
    blob = bytearray(last.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    last.chmod(0o644)  # a finished entry's files are read-only; a bit flip on disk does not ask
    last.write_bytes(bytes(blob))
    kd("teacher", *SMOKE, f"store={store}", f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    log = (tmp_path / "again" / "teacher.log").read_text()
    assert f"store entry file {last} does not match its checksum; rebuilding" in log
    assert "training tiny_cnn-wide" in log
    # Rebuilt: the file loads again and the entry is complete.
    assert (last.parent / "meta.json").exists()
    torch.load(last, weights_only=True)


def test_truncated_checkpoint_of_an_interrupted_stage_is_set_aside(tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = kd("train", *NO_BASELINE, f"store={store}", cwd=tmp_path, check=False,
              env={"KD_TEST_NAN_AT": "teacher:10"})
    assert proc.returncode == 1
    last = _entry(store, "teacher") / "last.pt"
    last.chmod(0o644)
    last.write_bytes(last.read_bytes()[:100])
    kd("train", *NO_BASELINE, f"store={store}", f"hydra.run.dir={tmp_path / 'run'}",
       cwd=tmp_path)
    assert (last.parent / "last.pt.corrupt").exists()
    assert read_report(tmp_path / "run")["stages"]["teacher"] == "trained"
    assert "starting this stage over" in (tmp_path / "run" / "train.log").read_text()


# --- helpers for runs that are killed, run side by side, or run out of disk -------------------


def _start(*args: str, cwd: Path, preexec_fn=None) -> subprocess.Popen:
    """`kd ARGS` in the background (the same environment as conftest.kd)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("KD_STORE", None)
    return subprocess.Popen([sys.executable, "-m", "kdcli.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn)


def _wait_for(proc: subprocess.Popen, folder: Path, pattern: str, never: str) -> None:
    """Waits (10 min at most) until `folder` holds a match of `pattern`, while `proc` runs."""
    deadline = time.monotonic() + 600
    while not list(folder.glob(pattern)):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, never
        time.sleep(0.01)


def _digests(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def _log_time(log: str, pattern: str) -> datetime:
    """Time stamp of the first log line matching `pattern` (Hydra's `[%Y-%m-%d %H:%M:%S,ms]`)."""
    match = re.search(r"^\[([\d-]+ [\d:]+,\d+)\]\[[^]]*\]\[\w+\] - " + pattern, log, re.M)
    assert match, f"no log line matches {pattern!r}"
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")


def _assert_complete_entries_verify(store: Path) -> None:
    """Every entry with a meta.json has exactly the files its checksums promise."""
    for meta_path in store.glob("*/*/meta.json"):
        meta = json.loads(meta_path.read_text())
        for name, digest in meta["files"].items():
            assert checkpoint.sha256_file(meta_path.parent / name) == digest, meta_path.parent


# --- settings wrong on their face: refused before anything trains ---------------------------

# A user's model that takes 10x10 single-channel images, not the dataset's 3x32x32.
_SMALL_INPUT = ("from torch import nn\n"
                "def small_input(num_classes=10, **_):\n"
                "    return nn.Sequential(nn.Flatten(), nn.Linear(100, num_classes))\n")


@pytest.mark.parametrize("verb, overrides, message", [
    ("train", ["optimizer.lr=-1"], "optimizer: ValueError: Invalid learning rate: -1.0"),
    ("train", ["teacher_optimizer.momentum=0"], "teacher_optimizer: ValueError: Nesterov "
     "momentum requires a momentum and zero dampening"),
    ("train", ["scheduler=multistep", "scheduler.gamma=-1"],
     "scheduler: ValueError: gamma must be > 0, got -1.0"),
    ("train", ["student=mlp", "dataset.in_features=100"],
     "student=mlp cannot take dataset cifar10_subset's images (3, 32, 32): MLP expects 100 "
     "input features, got input of shape (2, 3, 32, 32) (3072 features); set "
     "dataset.in_features=3072 (C*H*W), or in_features for a model built outside kd's configs"),
    ("train", ["student._target_=faultmodels.small_input"],
     # torch's own words follow ("mat1 and mat2 shapes cannot be multiplied", per version).
     # Named as the command line set it, not as the smoke preset's tiny_cnn it replaced.
     "student._target_=faultmodels.small_input cannot take dataset cifar10_subset's images "
     "(3, 32, 32): "),
    ("teacher", ["teacher_optimizer.lr=-1"],
     "teacher_optimizer: ValueError: Invalid learning rate: -1.0"),
    ("teacher", ["teacher=mlp", "dataset.in_features=3000"],
     "teacher=mlp cannot take dataset cifar10_subset's images (3, 32, 32): MLP expects 3000 "
     "input features, got input of shape (2, 3, 32, 32) (3072 features); set "
     "dataset.in_features=3072 (C*H*W), or in_features for a model built outside kd's configs"),
    ("student", ["optimizer=adamw", "optimizer.betas=[0.9,1.5]"],
     "optimizer: ValueError: Invalid beta parameter at index 1: 1.5"),
    # A batch larger than the training split: found when the teacher's first epoch had no
    # step, after its store entry (folder and lock) was made, and without naming the key.
    ("train", ["dataset.train_size=100", "trainer.teacher.batch_size=128"],
     "trainer.teacher.batch_size=128 is larger than the training split (100 images): the last "
     "partial batch is dropped, so no step would train; set trainer.teacher.batch_size=100 or "
     "less"),
    ("student", ["dataset.train_size=100", "trainer.student.batch_size=128"],
     "trainer.student.batch_size=128 is larger than the training split (100 images): "),
])
def test_optimizer_and_model_errors_stop_before_anything_trains(
        tmp_path: Path, verb: str, overrides: list[str], message: str) -> None:
    """Torch's own checks on the optimizer and scheduler arguments, and a model that cannot take
    the dataset's images, used to fail only when their stage began: after the teacher trained
    (hours, on a real config), the latter with a traceback. Now one line, before any epoch."""
    (tmp_path / "faultmodels.py").write_text(_SMALL_INPUT)  # `python -m` imports from the cwd
    store, run = tmp_path / "store", tmp_path / "run"
    proc = kd(verb, *NO_BASELINE, *overrides, f"store={store}", f"hydra.run.dir={run}",
              cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {message}") and proc.stderr.count("\n") == 1, \
        proc.stderr
    assert "no trained teacher" not in proc.stderr  # `kd student`: checked before the lookup
    # Nothing trained: no store entry (not even a lock) and no epoch in the log.
    assert [s for s in ("teacher", "cache", "pretrain", "student", "baseline")
            if (store / s).exists()] == []
    log = (run / f"{verb}.log").read_text()
    assert not re.search(r"epoch \d+/\d+", log), log  # an epoch line, or a resume's


# --- two runs at once, a stale lock -----------------------------------------------------------


def test_two_runs_at_once_train_each_stage_once(tmp_path: Path) -> None:
    store = tmp_path / "store"
    # Default run folders: started together, both runs name theirs in the same second; the
    # folder's time carries microseconds, so each gets its own (they used to share one).
    # The teacher trains for a few seconds, so the second run reaches its lock while the first
    # still trains it even when the two start up (imports, data) a second apart on a busy CPU.
    procs = [_start("train", *SMOKE, "trainer.teacher.epochs=6", f"store={store}", cwd=tmp_path)
             for _ in range(2)]
    try:
        errors = [proc.communicate(timeout=1200)[1] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], errors
    runs = sorted(p.parent for p in (tmp_path / "outputs").glob("*/*/report.json"))
    assert len(runs) == 2, runs
    reports = [read_report(run) for run in runs]
    for stage in ("teacher", "cache", "student", "baseline"):
        # One process built the entry; the other waited for its lock, then reused it.
        assert sorted(r["stages"][stage] for r in reports) == ["reused", "trained"], stage
        (entry,) = [p for p in (store / stage).iterdir() if p.is_dir()]
        assert (entry / "meta.json").exists()
        assert {r["store"][stage if stage != "teacher" else "teacher-tiny_cnn-wide"]
                for r in reports} == {str(entry)}
    assert reports[0]["student"]["top1"] == reports[1]["student"]["top1"]
    assert not list(store.rglob("*.tmp")) and not list(store.rglob("*.corrupt*"))
    _assert_complete_entries_verify(store)
    for run in runs:
        torch.load(run / "checkpoints" / "student" / "best.pt", weights_only=True)
    # They really overlapped: the run that reused the teacher had its data loaded (and was at
    # the teacher's lock) before the other had finished training it.
    logs = {r["stages"]["teacher"]: (run / "train.log").read_text()
            for r, run in zip(reports, runs, strict=True)}
    assert _log_time(logs["reused"], "dataset ") < _log_time(logs["trained"],
                                                            "teacher .*: test top-1")


def test_lock_left_by_a_killed_run_does_not_block_the_next(tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = _start("teacher", *SMOKE, f"store={store}", cwd=tmp_path)
    try:
        _wait_for(proc, store / "teacher", "*.lock", "the teacher stage never took its lock")
    finally:
        proc.send_signal(signal.SIGKILL)  # it holds the teacher's lock: it is training
        proc.communicate()
    (lock,) = (store / "teacher").glob("*.lock")
    assert not (store / "teacher" / lock.stem / "meta.json").exists()
    lock.write_text("pid 999999 on a host that is gone\n")  # whatever a stale lock may hold

    kd("teacher", *SMOKE, f"store={store}", f"hydra.run.dir={tmp_path / 'next'}", cwd=tmp_path)
    # Entry.lock logs this after waiting 30 s for a lock it cannot take.
    assert "being built by another process" not in (tmp_path / "next" / "teacher.log").read_text()
    assert (store / "teacher" / lock.stem / "meta.json").exists()


@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
def test_a_run_into_a_folder_another_run_is_writing_stops_at_once(tmp_path: Path,
                                                                   sweep: bool) -> None:
    # Two runs given one folder at the same time mixed their outputs: each set aside, overwrote
    # or reported the other's files. The second now stops before it touches the folder: not
    # even Hydra's log of its own is opened there (teacher.log beside the first run's
    # train.log). This test process holds the lock, as the first run would.
    top = tmp_path / "out"
    run = top / "0" if sweep else top
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("the first run's config\n")
    (run / "report.json").write_text("{}\n")  # a finished run's: set aside if the folder is free
    (run / "train.log").write_text("the first run's log\n")
    held = runfolder.lock(run)
    before = _stats(tmp_path)
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    try:
        proc = kd("teacher", *(["-m"] if sweep else []), *NO_BASELINE,
                  f"store={tmp_path / 'store'}", f"{key}={top}", cwd=tmp_path, check=False)
    finally:
        held.release()
    assert proc.returncode == 1
    assert proc.stderr == (
        f"error: run folder {run} is in use: another kd process (pid {os.getpid()} on "
        f"{socket.gethostname()}) is writing to it; wait for that run to end, or give this one a "
        f"folder of its own ({key}=...)\n")
    if sweep:  # the sweep folder gets Hydra's multirun.yaml, before any job starts
        before[str(Path("out") / "multirun.yaml")] = _stats(tmp_path)["out/multirun.yaml"]
    assert _stats(tmp_path) == before


def _stats(root: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_sweep_jobs_release_their_folder_when_they_end(tmp_path: Path) -> None:
    # The basic launcher runs every job in the sweep's process: a job's lock is released when
    # it ends, failed or not, or the next job into the same folder (one subdir for both here)
    # would be refused by its own sweep. The second sets the first one's outputs aside.
    sweep = tmp_path / "multi"
    proc = kd("train", "-m", "loss.temperature=0,4", *TINY, f"store={tmp_path / 'store'}",
              f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=same", cwd=tmp_path, check=False)
    assert proc.returncode == 1  # the first job failed
    assert "is in use" not in proc.stderr
    assert "error: 1 of 2 job(s) of the sweep failed (the others ran" in proc.stderr
    (earlier,) = (sweep / "same").glob("earlier-*")
    assert "loss.temperature must be > 0" in (earlier / "failed.json").read_text()
    assert read_report(sweep / "same")["config"]["loss"]["temperature"] == 4
    runfolder.lock(sweep / "same").release()  # and free for a later run


def test_run_folder_lock_of_a_killed_run_does_not_block_and_is_no_output(tmp_path: Path
                                                                         ) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from kdcli import runfolder; held = runfolder.lock(Path(sys.argv[1])); print('held', "
         "flush=True); time.sleep(600)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(runfolder.FolderInUse, match=f"pid {holder.pid} on "):
            runfolder.lock(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no clean-up of any kind
        holder.communicate()
    runfolder.lock(tmp_path).release()  # the kernel released the dead process's lock
    # The lock file stays; it is not a run's output, nor a sign of a finished run.
    assert not runfolder.holds_a_run(tmp_path)
    (tmp_path / "report.json").write_text("{}\n")
    aside = runfolder.set_aside_earlier_run(tmp_path)
    assert [p.name for p in aside.iterdir()] == ["report.json"]
    assert (tmp_path / runfolder.LOCK).is_file()



def test_a_run_folder_lock_held_elsewhere_is_not_written_even_by_a_truncating_filelock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # filelock before 3.30 opens the lock file with O_TRUNC before it tries the lock: a second
    # run erased the first one's "pid N on HOST" line, then read the empty file for its message.
    from filelock import FileLock, Timeout

    held = runfolder.lock(tmp_path)
    line = (tmp_path / runfolder.LOCK).read_text()
    try:
        def truncating_acquire(self, timeout=None, **kw):
            Path(self.lock_file).write_text("")
            raise Timeout(self.lock_file)

        monkeypatch.setattr(FileLock, "acquire", truncating_acquire)
        with pytest.raises(runfolder.FolderInUse,
                           match=f"another kd process \\(pid {os.getpid()} on "):
            runfolder.lock(tmp_path)
        assert (tmp_path / runfolder.LOCK).read_text() == line
    finally:
        monkeypatch.undo()
        held.release()

# --- kill -9 in the cache and student stages (the teacher's: test_pipeline) --------------------

# Runs `kd` with one function wrapped so that the process SIGKILLs itself right after a given
# file is written: mid-stage, at a known point, with no clean-up of any kind.
KILL_AFTER = """
import os, signal, sys
from kdcli import checkpoint, softlabels
from kdcli.cli import main

def kill_after(module, name, path_arg, matches):
    original = getattr(module, name)
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if matches(str(args[path_arg])):
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(module, name, wrapper)

where = sys.argv.pop(1)
if where == "cache":  # the train split's soft labels written, the test split's not
    kill_after(softlabels, "write", 0, lambda path: path.endswith("train.kdsl"))
else:  # the student's first epoch checkpointed
    kill_after(checkpoint, "save", 1,
               lambda path: "/student/" in path and path.endswith("/last.pt"))
main()
"""


def _killed_at(where: str, *args: str, cwd: Path) -> None:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    env.pop("KD_STORE", None)
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER, where, "train", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def test_kill_in_cache_and_student_stages_then_bit_flipped_cache(tmp_path: Path) -> None:
    store = tmp_path / "store"
    args = [*NO_BASELINE, f"store={store}"]
    _killed_at("cache", *args, f"hydra.run.dir={tmp_path / 'killed-cache'}", cwd=tmp_path)
    cache_entry = _entry(store, "cache")
    assert (cache_entry / "train.kdsl").exists() and not (cache_entry / "meta.json").exists()

    # The half-built cache is rebuilt, not served; this run dies after the student's
    # first epoch.
    _killed_at("student", *args, f"hydra.run.dir={tmp_path / 'killed-student'}", cwd=tmp_path)
    assert "cache: wrote" in (tmp_path / "killed-student" / "train.log").read_text()
    assert (cache_entry / "meta.json").exists()
    student_entry = _entry(store, "student")
    assert not (student_entry / "meta.json").exists()
    assert torch.load(student_entry / "last.pt", weights_only=True)["epoch"] == 0

    kd("train", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert read_report(tmp_path / "run")["stages"] == {
        "teacher": "reused", "cache": "reused", "student": "resumed"}
    with open(tmp_path / "run" / "metrics" / "student.csv") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2]

    # A bit flipped in the stored soft labels: detected on reuse, the cache is rebuilt (same
    # key, so the student trained from it is still reused).
    train_kdsl = cache_entry / "train.kdsl"
    blob = bytearray(train_kdsl.read_bytes())
    blob[-7] ^= 0x10
    train_kdsl.chmod(0o644)  # read-only since the entry finished
    train_kdsl.write_bytes(bytes(blob))
    kd("train", *args, f"hydra.run.dir={tmp_path / 'flipped'}", cwd=tmp_path)
    assert f"{train_kdsl} does not match its checksum; rebuilding" in \
        (tmp_path / "flipped" / "train.log").read_text()
    assert read_report(tmp_path / "flipped")["stages"] == {
        "teacher": "reused", "cache": "trained", "student": "reused"}
    softlabels.open(train_kdsl)  # intact again


# --- soft labels or a whole entry of another config -------------------------------------------


def test_cache_of_another_entry_is_not_served(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    mine, other = (store.entry("cache", "t", {"seed": s}) for s in (0, 1))
    softlabels.write(other.file("train.kdsl"), torch.randn(8, 10), info={"entry": other.key})
    other.finish(["train.kdsl"], {})
    # Soft labels copied in from another entry, with checksums that match: the header's
    # entry key gives them away.
    mine.path.mkdir(parents=True)
    shutil.copy(other.file("train.kdsl"), mine.file("train.kdsl"))
    mine.finish(["train.kdsl"], {})
    with pytest.raises(CorruptArtifact, match="belongs to another store entry"):
        cache_stage.open_split({"entry": mine}, "train")
    # A whole entry folder copied under another key: not reused, set aside and rebuilt.
    shutil.rmtree(mine.path)
    shutil.copytree(other.path, mine.path)
    with pytest.raises(CorruptArtifact, match=f"holds the outputs of key {other.key}"):
        mine.verify()
    assert reuse_if_valid(mine) is None and not mine.path.exists()
    assert reuse_if_valid(other) is not None


# --- a full disk ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run and its store: what a failing later run must leave byte-identical."""
    root = tmp_path_factory.mktemp("disk")
    kd("train", *NO_BASELINE, f"store={root / 'store'}", f"hydra.run.dir={root / 'run'}",
       cwd=root)
    return root


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_before_the_first_stage_is_one_line(tmp_path: Path) -> None:
    # The run folder's own files come first (.hydra/config.yaml): kd writes them inside its
    # error handling, so even they get the one-line error, not a traceback.
    proc = _start("train", *NO_BASELINE, f"store={tmp_path / 'store'}",
                  f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                  preexec_fn=_file_size_limit(10))
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert err == f"error: {tmp_path / 'run' / '.hydra' / 'config.yaml'}: File too large\n"
    assert not (tmp_path / "store").exists()
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("key, sweep", [("hydra.run.dir", []),
                                        ("hydra.sweep.dir", ["-m", "loss.temperature=2,4"])])
def test_output_folder_that_is_a_file_is_one_line(tmp_path: Path, key: str,
                                                  sweep: list[str]) -> None:
    # Hydra makes the run (sweep) folder itself, outside kd's jobs: it ended in its traceback.
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me\n")
    proc = kd("train", *sweep, *NO_BASELINE, f"store={tmp_path / 'store'}", f"{key}={taken}",
              cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"error: {key}={taken} is a file, not a folder\n"
    assert taken.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("subdir, taken", [("${hydra.job.num}", "0"),
                                           ("a/${hydra.job.num}", "a")])
def test_sweep_job_folder_that_is_a_file_is_one_line(tmp_path: Path, subdir: str, taken: str
                                                     ) -> None:
    # Hydra makes each job's folder just before the job, outside kd's jobs: a file there ended
    # the sweep in Hydra's traceback (FileExistsError, naming no setting).
    sweep = tmp_path / "multi"
    sweep.mkdir()
    (sweep / taken).write_text("keep me\n")
    proc = kd("train", "-m", "loss.temperature=2,4", *NO_BASELINE, f"store={tmp_path / 'store'}",
              f"hydra.sweep.dir={sweep}", f"hydra.sweep.subdir={subdir}", cwd=tmp_path,
              check=False)
    assert proc.returncode == 1
    job = sweep / "0" if taken == "0" else sweep / "a" / "0"
    where = "" if taken == "0" else f": {sweep / taken}"
    assert proc.stderr == (f"error: sweep job folder {job}{where} is a file, not a folder; move "
                           f"it away, or give the sweep another folder (hydra.sweep.dir=...)\n")
    assert (sweep / taken).read_text() == "keep me\n"
    # The sweep ends there: no later job runs, nothing is trained.
    assert sorted(p.name for p in sweep.iterdir()) == sorted([taken, "multirun.yaml"])
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("override, limit, failing", [
    # Teacher and cache reused; the student's first checkpoint (~100 KB) does not fit.
    ("loss.temperature=8", 50_000, r"student/tiny_cnn-[0-9a-f]{16}/best\.pt"),
    # A new cache key: its first soft-label file (~10 KB) does not fit.
    ("cache.storage=full", 8_000, r"cache/tiny_cnn-wide-[0-9a-f]{16}/train\.kdsl"),
])
def test_disk_full_names_the_file_and_damages_nothing(previous: Path, tmp_path: Path,
                                                       override: str, limit: int,
                                                       failing: str) -> None:
    store = previous / "store"
    before = _digests(store, previous / "run")
    entries_before = {p for p in store.glob("*/*") if p.is_dir()}
    proc = _start("train", *NO_BASELINE, override, f"store={store}",
                  f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                  preexec_fn=_file_size_limit(limit))
    try:
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert re.fullmatch(f"error: {re.escape(str(store))}/{failing}: File too large\n", err), err
    after = _digests(store, previous / "run")
    assert {k: v for k, v in after.items() if k in before} == before
    # No temp file left behind, no entry marked complete that is not, nothing half written.
    assert not [p for p in (store, tmp_path) for p in p.rglob("*.tmp")]
    _assert_complete_entries_verify(store)
    (failed,) = {p for p in store.glob("*/*") if p.is_dir()} - entries_before
    assert re.fullmatch(failing.rsplit("/", 1)[0], str(failed.relative_to(store)))
    assert not (failed / "meta.json").exists()
    assert not (tmp_path / "run" / "report.json").exists()


def test_failed_write_names_the_file_and_keeps_the_old_one(tmp_path: Path, monkeypatch) -> None:
    # Every kd file (checkpoints, soft labels, meta.json, reports, plots) goes through this.
    write = checkpoint.atomic_write_text
    target = tmp_path / "report.json"
    target.write_text("old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        write(target, "new")
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(target))
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def _signals_default() -> None:
    """In the child: SIGINT and SIGTERM at their default actions (a process started in the
    background may inherit SIGINT ignored; a terminal's is not)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


RESUME = ("run the same command again to go on (each stage resumes from its last saved epoch "
          "in the store)")


@pytest.mark.parametrize("sig, verb, status, words", [
    (signal.SIGINT, "teacher", 130, "interrupted"),  # Ctrl-C
    # Slurm at the time limit (SIGKILL follows ~30 s later), `kill`, torchrun stopping workers.
    (signal.SIGTERM, "train", 143, "terminated by SIGTERM"),
])
def test_ctrl_c_or_sigterm_is_one_line_and_the_rerun_resumes(
        tmp_path: Path, sig: signal.Signals, verb: str, status: int, words: str) -> None:
    from kdcli import storecmd

    store = tmp_path / "store"
    args = (verb, *NO_BASELINE, "trainer.teacher.epochs=20", "dataset.train_size=128",
            "dataset.test_size=64", f"store={store}")
    proc = _start(*args, f"hydra.run.dir={tmp_path / 'first'}", cwd=tmp_path,
                  preexec_fn=_signals_default)
    stderr = _signal_after_a_teacher_epoch(proc, store, sig)
    assert proc.returncode == status
    assert "Traceback" not in stderr
    line = f"{words}: {RESUME}"
    assert stderr.strip().splitlines()[-1] == line
    # The run's log said nothing of it: it stopped at the last epoch line.
    assert (tmp_path / "first" / f"{verb}.log").read_text().strip().splitlines()[-1].endswith(
        f"[WARNING] - {line}")
    # The teacher's entry: incomplete (resumable), its lock let go, its last epoch loadable.
    (item,) = [i for i in storecmd.scan(store) if i.stage == "teacher"]
    assert item.status == storecmd.INCOMPLETE and not storecmd.in_use(item)
    assert {"epoch", "model"} <= set(torch.load(item.path / "last.pt", weights_only=True))
    kd(*args, f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert "resuming from" in (tmp_path / "again" / f"{verb}.log").read_text()
    assert [i.status for i in storecmd.scan(store) if i.stage == "teacher"] == [
        storecmd.COMPLETE]


def _signal_after_a_teacher_epoch(proc: subprocess.Popen, store: Path, sig: signal.Signals
                                  ) -> str:
    """Sends `sig` to `proc` once a teacher in `store` has saved an epoch; its stderr."""
    try:
        _wait_for(proc, store / "teacher", "*/last.pt", "the teacher never saved an epoch")
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return stderr


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_ends_a_sweep_not_just_its_job(tmp_path: Path, sig: signal.Signals,
                                                         status: int) -> None:
    # Hydra's basic launcher runs the jobs in this process and lets a KeyboardInterrupt (which
    # kd's Terminated is) through: the next job never starts.
    store = tmp_path / "store"
    proc = _start("teacher", "-m", *SMOKE, "trainer.teacher.epochs=20", "dataset.train_size=128",
                  "dataset.test_size=64", f"store={store}", "seed=1,2",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
                  preexec_fn=_signals_default)
    stderr = _signal_after_a_teacher_epoch(proc, store, sig)
    assert proc.returncode == status
    assert "Traceback" not in stderr and "failed" not in stderr
    assert stderr.strip().splitlines()[-1].endswith(RESUME)
    assert [p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()] == ["0"]
    assert (tmp_path / "sweep" / "0" / "teacher.log").read_text().strip().splitlines()[
        -1].endswith(RESUME)
    assert len([p for p in (store / "teacher").iterdir() if p.is_dir()]) == 1


def test_sigterm_handler_is_kds_only_while_it_runs() -> None:
    import threading

    from kdcli import cli

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(cli.Terminated) as err, cli.sigterm_raises():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at once; the sleep is cut short
        assert (cli.interrupted_line(err.value), cli.exit_status(err.value)) == (
            f"terminated by SIGTERM: {RESUME}", 143)
        assert str(err.value) == "SIGTERM"  # what rank 0 hands the other ranks (on_main)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        # kd run from another thread of a program: left as it is (only the main thread may
        # set a handler: signal.signal would raise ValueError).
        seen = []

        def in_thread() -> None:
            with cli.sigterm_raises():
                seen.append(signal.getsignal(signal.SIGTERM))

        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join()
        assert seen == [signal.SIG_DFL]
        # An ignored SIGTERM stays ignored (as Python leaves an ignored SIGINT).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with cli.sigterm_raises():
            os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
