"""`kd store` / `kd store prune`: the listing of a real store, and pruning that never removes
what it was not asked to, nor an entry another process holds.

One `kd train` builds the store for the whole module; each test works on its own copy of it,
with hand-made damaged and incomplete entries added (what killed runs and `Entry.invalidate`
leave), so tests can prune without affecting each other.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kdcli import cli, storecmd
from kdcli.report import format_bytes
from tests.conftest import TINY, kd, read_report

INCOMPLETE_KEY = "0123456789abcdef"
DECODED_KEY = "aa" * 12  # decoded-image caches have 24-hex keys
# Holds a FileLock on argv[1] (the Entry's own lock path) until killed; announces through argv[2].
HOLDER = textwrap.dedent("""
    import sys, time
    from filelock import FileLock
    lock = FileLock(sys.argv[1])
    lock.acquire()
    open(sys.argv[2], "w").write("held")
    time.sleep(600)
""")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A module-wide folder with `store/` from one real `kd train` and that run's report."""
    root = tmp_path_factory.mktemp("storecmd")
    kd("train", *TINY, "baseline=true", f"store={root / 'store'}",
       f"hydra.run.dir={root / 'run'}", cwd=root)
    return root


@pytest.fixture
def store(built: Path, tmp_path: Path) -> Path:
    """This test's copy of the built store, plus an incomplete teacher, a set-aside cache, a
    decoded-image cache and two leftovers of decoding (a killed write, a damaged cache)."""
    path = tmp_path / "store"
    shutil.copytree(built / "store", path)
    incomplete = path / "teacher" / f"tiny_cnn-{INCOMPLETE_KEY}"
    incomplete.mkdir()
    (incomplete / "last.pt").write_bytes(b"x" * 10_000)
    cache = next((path / "cache").glob("*-*[0-9a-f]"))
    shutil.copytree(cache, cache.with_name(f"{cache.name}.corrupt-20260101120000"))
    decoded = path / "datasets" / f"cifar10-{DECODED_KEY}"
    decoded.mkdir(parents=True)
    (decoded / "train_images.npy").write_bytes(b"i" * 50_000)
    (decoded / "meta.json").write_text("{}")
    killed = path / "datasets" / f".cifar10-{DECODED_KEY}.k3j2h1.tmp"
    killed.mkdir()
    (killed / "train_images.npy").write_bytes(b"i" * 20_000)
    old = time.time() - 3 * 86400  # written to days ago: not a live write
    os.utime(killed / "train_images.npy", (old, old))
    os.utime(killed, (old, old))
    (path / "datasets" / f".cifar10-{DECODED_KEY}.4242.damaged").mkdir()
    return path


def store_cmd(*argv: str) -> tuple[int, str, str]:
    """`kd store ARGV` in this process (through the dispatcher's plain-verb runner)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.run_plain("store", storecmd.main, list(argv))
    return code, out.getvalue(), err.getvalue()


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def du(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def rows(out: str) -> list[list[str]]:
    """The table's body rows, as cells."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines()
            if line.startswith("│")]


def test_list_shows_each_entry_with_status_size_and_totals(built: Path, store: Path) -> None:
    code, out, err = store_cmd(str(store))
    assert code == 0, err
    table = rows(out)
    report = read_report(built / "run")
    for label, entry in report["store"].items():
        stage, folder = label.split("-")[0], Path(entry).name
        name, key = folder.rsplit("-", 1)
        assert [stage, name, key, "complete", format_bytes(du(store / stage / folder))] in [
            r[:5] for r in table], (label, out)
    incomplete = store / "teacher" / f"tiny_cnn-{INCOMPLETE_KEY}"
    assert ["teacher", "tiny_cnn", INCOMPLETE_KEY, "incomplete", format_bytes(du(incomplete)),
            "—"] == next(r[:6] for r in table if r[2] == INCOMPLETE_KEY)
    cache_key = Path(report["store"]["cache"]).name.rsplit("-", 1)[1]
    assert [r[3] for r in table if r[0] == "cache" and r[2] == cache_key] == [
        "complete", "damaged"]
    assert sorted(r[3] for r in table if r[0] == "datasets") == [
        "complete", "damaged", "incomplete"]
    # A total per stage and one for the store, in the pipeline's stage order.
    teacher_total = next(r for r in table if r[0] == "teacher total")
    assert teacher_total[1] == "2 entries"
    assert teacher_total[4] == format_bytes(du(store / "teacher"))
    assert table[-1][:2] == ["total", "9 entries"]
    assert table[-1][4] == format_bytes(du(store))
    stages = [r[0] for r in table if not r[0].endswith("total")]
    assert stages == sorted(stages, key=storecmd.STAGES.index)
    assert store_cmd("list", str(store))[1] == out


def test_store_path_defaults_to_kd_store_then_kd_store_env(store: Path, tmp_path: Path,
                                                          monkeypatch) -> None:
    monkeypatch.delenv("KD_STORE", raising=False)
    monkeypatch.chdir(store.parent)
    (store.parent / "store").rename(store.parent / "kd-store")
    assert "tiny_cnn" in store_cmd()[1]  # ./kd-store, as `kd train` would use it
    monkeypatch.chdir(tmp_path.parent)
    monkeypatch.setenv("KD_STORE", str(store.parent / "kd-store"))
    assert "tiny_cnn" in store_cmd("list")[1]


def test_a_path_that_is_not_a_store_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert store_cmd(str(tmp_path / "mine")) == (
        1, "", f"error: {tmp_path / 'mine'} is not a kd store (none of the stage folders "
               "teacher, cache, student, baseline, pretrain, datasets in it)\n")
    code, _, err = store_cmd("prune", "--damaged", str(tmp_path / "nowhere"))
    assert (code, err) == (1, f"error: no store at {tmp_path / 'nowhere'} (kd train creates "
                              "it; give PATH or set KD_STORE)\n")
    assert files(tmp_path) == {"mine/notes.txt": b"mine"}


def test_prune_without_a_selector_refuses_and_removes_nothing(store: Path) -> None:
    before = files(store)
    code, out, err = store_cmd("prune", str(store), "--stage", "teacher", "--yes")
    assert (code, out) == (2, "")
    assert err == ("error: kd store prune needs a selector: --damaged, --incomplete, "
                   "--older-than DAYS (narrowed by --stage S); add --yes to remove\n")
    assert files(store) == before


def test_dry_run_lists_what_would_go_and_removes_nothing(store: Path) -> None:
    before = files(store)
    code, out, err = store_cmd("prune", str(store), "--damaged", "--incomplete")
    assert code == 0, err
    assert out.count("would remove ") == 4 + 1  # 2 damaged, 2 incomplete; the summary line
    assert "would remove 4 of 9 entries, would free" in out and "add --yes" in out
    assert files(store) == before


def test_prune_damaged_removes_only_the_damaged(store: Path) -> None:
    damaged = [*store.glob("cache/*.corrupt-*"), *store.glob("datasets/.*.damaged")]
    freed = sum(map(du, damaged))
    before = {k: v for k, v in files(store).items() if not k.startswith("cache/") or
              ".corrupt-" not in k}
    code, out, err = store_cmd("prune", str(store), "--damaged", "--yes")
    assert code == 0, err
    assert f"removed 2 of 9 entries, freed {format_bytes(freed)}" in out
    assert not any(p.exists() for p in damaged)
    assert files(store) == before  # everything else, the incomplete entries included
    assert not list(store.rglob(".*.removing-*"))
    assert sorted(r[3] for r in rows(store_cmd(str(store))[1]) if r[0] != "total"
                  and not r[0].endswith(" total")) == ["complete"] * 5 + ["incomplete"] * 2


def test_incomplete_entries_go_only_with_their_flag(store: Path) -> None:
    incomplete = store / "teacher" / f"tiny_cnn-{INCOMPLETE_KEY}"
    Path(f"{incomplete}.lock").touch()
    code, out, _ = store_cmd("prune", str(store), "--older-than", "0", "--yes")
    assert code == 0 and incomplete.is_dir()
    assert {p.name for p in (store / "teacher").iterdir()
            if not p.name.endswith(".lock")} == {incomplete.name}
    # Complete entries gone; their (empty) lock files stay, a waiting process may hold them.
    assert all(p.name.endswith(".lock") for p in (store / "student").iterdir())
    code, out, _ = store_cmd("prune", str(store), "--incomplete", "--stage", "teacher", "--yes")
    assert code == 0 and "removed 1 of 2 entries" in out
    assert not incomplete.exists()
    assert all(p.name.endswith(".lock") for p in (store / "teacher").iterdir())
    assert [p.name for p in (store / "datasets").iterdir()] == [
        f".cifar10-{DECODED_KEY}.k3j2h1.tmp"]  # another stage: kept


def test_older_than_keeps_recent_entries(store: Path) -> None:
    # The decoding leftover written 3 days ago is incomplete: not selected without its flag.
    code, out, _ = store_cmd("prune", str(store), "--older-than", "1", "--yes")
    assert (code, out) == (0, f"nothing to prune in {store.resolve()} (of 9 entries)\n")
    code, out, _ = store_cmd("prune", str(store), "--older-than", "1", "--incomplete", "--yes")
    assert "removed datasets/.cifar10-" in out and "removed 1 of 9 entries" in out


def test_older_than_goes_by_last_use_so_entries_a_run_reuses_stay(
        built: Path, store: Path, tmp_path: Path) -> None:
    # A teacher built long ago that every run still reuses is not old: age is the time since a
    # run last built or reused the entry (meta.json's mtime), not since it was built.
    report = read_report(built / "run")
    entries = [Path(p.replace(str(built / "store"), str(store)))
               for p in report["store"].values()]
    assert len(entries) == 4  # teacher, cache, student, baseline
    created = {e: json.loads((e / "meta.json").read_text())["created"] for e in entries}
    old = time.time() - 10 * 86400
    for entry in entries:
        os.utime(entry / "meta.json", (old, old))
    code, out, _ = store_cmd("prune", str(store), "--older-than", "5")
    assert code == 0 and "removed" not in out
    picked = set(re.findall(r"^would remove (\S+) \(", out, re.M))
    assert picked == {f"{e.parent.name}/{e.name}" for e in entries}, out
    table = rows(store_cmd(str(store))[1])
    keys = {e.name.rsplit("-", 1)[1] for e in entries}
    assert {r[6] for r in table if r[2] in keys and r[3] == "complete"} == {
        time.strftime("%Y-%m-%d %H:%M", time.localtime(old))}

    run = tmp_path / "again"
    kd("train", *TINY, "baseline=true", f"store={store}", f"hydra.run.dir={run}",
       cwd=tmp_path)
    assert set(read_report(run)["stages"].values()) == {"reused"}
    code, out, _ = store_cmd("prune", str(store), "--older-than", "5", "--yes")
    assert code == 0 and (code, out) == (0, f"nothing to prune in {store.resolve()} "
                                             "(of 9 entries)\n")
    assert all(e.is_dir() for e in entries)
    # Reuse marks the entry, not its contents: the checksums and "created" still hold.
    for entry in entries:
        meta = json.loads((entry / "meta.json").read_text())
        assert meta["created"] == created[entry]
        assert time.time() - (entry / "meta.json").stat().st_mtime < 600


def test_an_entry_another_process_holds_is_skipped(store: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = next(p for p in (store / "teacher").iterdir()
                   if p.is_dir() and (p / "meta.json").exists())
    marker = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, f"{teacher}.lock", str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        before = files(teacher)
        args = ("prune", str(store), "--older-than", "0", "--stage", "teacher")
        for yes in ((), ("--yes",)):
            if yes:  # removal's own lock (timeout 0) must stop it, not just the listing's probe
                monkeypatch.setattr(storecmd, "in_use", lambda item: False)
            code, out, err = store_cmd(*args, *yes)
            assert code == 0, err
            assert re.search(rf"skipped teacher/{teacher.name} \(complete, .*\): in use by "
                             r"another process", out), out
            assert files(teacher) == before
        assert "1 skipped (in use)" in out
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.undo()
    code, out, _ = store_cmd(*args, "--yes")
    assert f"removed teacher/{teacher.name}" in out
    assert not teacher.exists() and Path(f"{teacher}.lock").stat().st_size == 0


def test_a_recent_decoding_leftover_may_be_a_live_write(store: Path) -> None:
    live = store / "datasets" / f".cifar10-{DECODED_KEY}.zz9.tmp"
    live.mkdir()
    (live / "train_images.npy").write_bytes(b"i")
    code, out, _ = store_cmd("prune", str(store), "--incomplete", "--stage", "datasets",
                             "--yes")
    assert code == 0 and live.exists()
    assert "may be a live write" in out
    assert not (store / "datasets" / f".cifar10-{DECODED_KEY}.k3j2h1.tmp").exists()


def test_train_after_pruning_the_teacher_retrains_it_and_reuses_the_rest(
        built: Path, store: Path, tmp_path: Path) -> None:
    teacher = next((store / "teacher").glob("tiny_cnn-wide-*[0-9a-f]"))
    code, out, _ = store_cmd("prune", str(store), "--older-than", "0", "--stage", "teacher",
                             "--yes")
    assert code == 0 and f"removed teacher/{teacher.name} (complete" in out
    assert not teacher.exists()
    run = tmp_path / "again"
    kd("train", *TINY, "baseline=true", f"store={store}", f"hydra.run.dir={run}",
       cwd=tmp_path)
    report, first = read_report(run), read_report(built / "run")
    assert report["stages"]["teacher"] == "trained"
    assert report["store"]["teacher-tiny_cnn-wide"] == str(teacher)  # its entry, rebuilt
    assert json.loads((teacher / "meta.json").read_text())["key"] == teacher.name.rsplit("-")[-1]
    # The baseline does not depend on the teacher: reused. The cache is keyed by the sha256 of
    # the teacher's weights, which a retrain on the CPU need not reproduce bit for bit, so the
    # cache and student are reused or rebuilt accordingly.
    assert report["stages"]["baseline"] == "reused"
    assert report["store"]["baseline"] == first["store"]["baseline"].replace(
        str(built / "store"), str(store))
    same = (Path(report["store"]["cache"]).name == Path(first["store"]["cache"]).name)
    assert report["stages"]["cache"] == ("reused" if same else "trained")


def test_a_pruned_teacher_retrained_bit_for_bit_keeps_its_cache(tmp_path: Path) -> None:
    # README: the cache and student built from a pruned teacher are rebuilt "unless the retrained
    # weights match bit for bit". They did match (deterministic=true), but the cache was keyed
    # by the sha256 of the whole last.pt, whose epoch timings differ run to run.
    store, args = tmp_path / "store", [*TINY, "deterministic=true"]
    kd("train", *args, f"store={store}", f"hydra.run.dir={tmp_path / 'first'}", cwd=tmp_path)
    code, out, _ = store_cmd("prune", str(store), "--older-than", "0", "--stage", "teacher",
                             "--yes")
    assert code == 0 and "removed teacher/" in out
    kd("train", *args, f"store={store}", f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    first, again = read_report(tmp_path / "first"), read_report(tmp_path / "again")
    assert again["stages"] == {"teacher": "trained", "cache": "reused", "student": "reused"}
    assert again["store"]["cache"] == first["store"]["cache"]


def test_kd_store_through_the_console_script(store: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # a pipe: the wide table
    proc = subprocess.run([sys.executable, "-m", "kdcli.cli", "store", "prune", str(store)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: kd store prune needs")
    proc = subprocess.run([sys.executable, "-m", "kdcli.cli", "store", str(store)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "teacher total" in proc.stdout
