"""`kd store [list] [PATH]` and `kd store prune ...`: see what the store holds, and remove some.

The store (kdcli/store.py) only grows: every config gets its own entry, and nothing else ever
deletes one. This verb lists each entry (stage, name, key, status, size, when built and last
used) with totals, and prunes the ones selected, without breaking a run that is using the store:

- an entry is removed only while its own lock (`<entry>.lock`, the one `Entry.lock` takes) is
  held by this process, taken without waiting: an entry a run is building or reusing is skipped
  and named;
- an incomplete entry (no meta.json: a run killed or still running) is work a rerun resumes, so
  it goes only with `--incomplete`;
- an entry is first renamed to a hidden name inside its stage folder, then deleted: a crash
  midway leaves a hidden `.<entry>.removing-<pid>` folder (listed as damaged), never a
  half-deleted folder under the entry's own name that a run would take for its outputs.

Decoded-image caches (`<store>/datasets/<loader>-<key>/`, kdcli/data/decoded.py) have no lock:
a run maps their files, and a removed file stays readable to a process that has it mapped. A
cache being written lives in a hidden temp folder until it is complete; one written to in the
last `BUSY_S` seconds is taken for a live write and kept.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kdcli.errors import ConfigError, KDError
from kdcli.report import format_bytes
from kdcli.runfolder import held_elsewhere
from kdcli.store import META, Store

DEFAULT_STORE = "kd-store"  # configs/kd.yaml: store: ${oc.env:KD_STORE,kd-store}
DATASETS = "datasets"  # decoded-image caches (kdcli/data/decoded.py), not Entry folders
# The store's folders (Store.entry callers, decoded.folder), in the pipeline's order.
STAGES = ("teacher", "cache", "student", "baseline", "pretrain", DATASETS)
COMPLETE, INCOMPLETE, DAMAGED = "complete", "incomplete", "damaged"
SELECTORS = "--damaged, --incomplete, --older-than DAYS"
# A decoded-image temp folder written to this recently may be a live write: never pruned.
BUSY_S = 600

_KEY = r"[0-9a-f]{16,64}"
ENTRY = re.compile(rf"^(?P<name>.+)-(?P<key>{_KEY})$")
CORRUPT = re.compile(rf"^(?P<name>.+)-(?P<key>{_KEY})\.corrupt-\d+$")  # Entry.invalidate
# This module's own leftover of a removal cut short (rename done, rmtree not finished).
REMOVING = re.compile(rf"^\.(?P<name>.+)-(?P<key>{_KEY})\.removing-\d+$")
# kdcli/data/decoded.py: a cache being written (`.<folder>.<random>.tmp`), one set aside.
DECODE_TMP = re.compile(rf"^\.(?P<name>.+)-(?P<key>{_KEY})\..+\.tmp$")
DECODE_DAMAGED = re.compile(rf"^\.(?P<name>.+)-(?P<key>{_KEY})\.\d+\.damaged$")


class NotAStore(KDError):
    """The path given holds no kd store."""


@dataclass
class Item:
    """One folder of the store: an entry, a set-aside one, or a decoded-image cache."""

    stage: str
    name: str
    key: str
    status: str
    path: Path
    lock: Path | None  # the entry's lock file; None for what has none (decoded, set aside)
    size: int  # bytes on disk
    freed: int  # bytes removing it frees: files not also hard-linked from a run folder
    created: float | None  # meta.json "created"
    used: float  # when a run last built or reused it (meta.json's mtime), else last wrote to it


# --------------------------------------------------------------------------- reading


def resolve_root(path: str | None) -> Path:
    """PATH, else $KD_STORE, else `kd-store`: the store `kd train` run here would use."""
    given = path if path is not None else os.environ.get("KD_STORE", DEFAULT_STORE)
    return Store(given).root  # refuses an empty path, as `kd train` does


def scan(root: Path) -> list[Item]:
    """Every entry under `root`, in stage order; NotAStore when `root` is not a store (an empty
    folder is an empty store: `store=` pointed at a new folder)."""
    if not root.exists():
        raise NotAStore(f"no store at {root} (kd train creates it; give PATH or set KD_STORE)")
    if not root.is_dir():
        raise NotAStore(f"{root} is not a kd store (a file, not a folder)")
    # Only kd's stage folders: a folder of one's own that happens to sit in the store (or a
    # PATH that is not a store at all) is never listed, so never pruned.
    stages = [root / s for s in STAGES if (root / s).is_dir()]
    if not stages and any(root.iterdir()):
        raise NotAStore(f"{root} is not a kd store (none of the stage folders "
                        f"{', '.join(STAGES)} in it)")
    # By name and key; an entry before its set-aside copies (`<entry>.corrupt-<time>`).
    return [item for d in stages
            for item in sorted(_items(d), key=lambda i: (i.name, i.key, i.path.name))]


def _items(stage_dir: Path) -> Iterator[Item]:
    stage = stage_dir.name
    for path in stage_dir.iterdir():
        if not path.is_dir() or path.is_symlink():
            continue
        if m := ENTRY.match(path.name):
            status = COMPLETE if (path / META).is_file() else INCOMPLETE
            lock = None if stage == DATASETS else Path(f"{path}.lock")
        elif m := CORRUPT.match(path.name) or REMOVING.match(path.name):
            status, lock = DAMAGED, None
        elif stage == DATASETS and (m := DECODE_TMP.match(path.name)):
            status, lock = INCOMPLETE, None
        elif stage == DATASETS and (m := DECODE_DAMAGED.match(path.name)):
            status, lock = DAMAGED, None
        else:
            continue
        size, freed, modified = _du(path)
        complete = status == COMPLETE
        yield Item(stage, m["name"], m["key"], status, path, lock, size, freed,
                   _created(path) if complete else None,
                   _mtime(path / META, modified) if complete else modified)


def _du(folder: Path) -> tuple[int, int, float]:
    """Bytes on disk, bytes only this folder links to, newest mtime (the folder's own if empty)."""
    size = freed = 0
    newest = folder.stat().st_mtime
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # removed meanwhile
                st = os.lstat(os.path.join(dirpath, name))
                size += st.st_blocks * 512
                freed += st.st_blocks * 512 if st.st_nlink <= 1 else 0
                newest = max(newest, st.st_mtime)
    return size, freed, newest


def _created(entry: Path) -> float | None:
    """meta.json's "created" as a timestamp; None where it has none (decoded-image caches
    written before kd recorded it)."""
    import json

    try:
        text = json.loads((entry / META).read_text()).get("created")
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _mtime(path: Path, default: float) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile
        return default


def in_use(item: Item) -> bool:
    """True if another process holds the entry's lock (probed without writing the lock file:
    `runfolder.held_elsewhere`)."""
    if item.lock is None:
        return item.status == INCOMPLETE and time.time() - item.used < BUSY_S
    return held_elsewhere(item.lock)


# --------------------------------------------------------------------------- list


def _when(t: float | None) -> str:
    return "—" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def to_table(root: Path, items: list[Item]) -> Table:
    table = Table(title=f"store {root}: {_entries(len(items))}, {format_bytes(_total(items))}")
    for title in ("stage", "name", "key", "status"):
        table.add_column(title, style="cyan" if title == "stage" else None)
    table.add_column("size", justify="right")
    table.add_column("created", justify="right")
    table.add_column("last used", justify="right")
    style = {COMPLETE: "green", INCOMPLETE: "yellow", DAMAGED: "red"}
    stage = None
    for item in items:
        if stage is not None and item.stage != stage:
            _stage_total(table, stage, items)
        stage = item.stage
        table.add_row(item.stage, item.name, item.key,
                      f"[{style[item.status]}]{item.status}[/]", format_bytes(item.size),
                      _when(item.created), _when(item.used))
    if stage is not None:
        _stage_total(table, stage, items)
    table.add_section()
    table.add_row("total", _entries(len(items)), "", "", format_bytes(_total(items)), "", "")
    return table


def _stage_total(table: Table, stage: str, items: list[Item]) -> None:
    mine = [i for i in items if i.stage == stage]
    table.add_row(f"[bold]{stage} total[/]", _entries(len(mine)), "", "",
                  f"[bold]{format_bytes(_total(mine))}[/]", "", "", end_section=True)


def _entries(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def _total(items: Iterable[Item]) -> int:
    return sum(i.size for i in items)


def _console() -> Console:
    # Off a terminal (a pipe, a test) rich would squeeze the table into 80 columns.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=200 if wide else None)


# --------------------------------------------------------------------------- prune


def select(items: list[Item], args: argparse.Namespace, now: float) -> list[Item]:
    """The entries the flags pick. Each flag narrows: --damaged/--incomplete pick those
    statuses (both: either); without them, complete and damaged entries (never incomplete
    ones: resumable work); --older-than keeps those no run has built or reused (an incomplete
    or damaged one: written to) for over DAYS days; --stage keeps that stage."""
    statuses = {s for s, on in ((DAMAGED, args.damaged), (INCOMPLETE, args.incomplete)) if on}
    statuses = statuses or {COMPLETE, DAMAGED}
    chosen = [i for i in items if i.status in statuses]
    if args.older_than is not None:
        chosen = [i for i in chosen if now - i.used > args.older_than * 86400]
    if args.stage:
        chosen = [i for i in chosen if i.stage in args.stage]
    return chosen


def remove(item: Item) -> bool:
    """Removes `item` under its lock; False if another process holds it. The lock file stays
    (empty): a process already waiting on it holds the old file open, and with the name gone a
    later one would lock a new file, two holders at once (filelock before 4 does not check for
    that), so it is not worth the few bytes."""
    from filelock import FileLock, Timeout

    if item.lock is None:
        if in_use(item):
            return False
        _delete(item.path)
        return True
    lock = FileLock(str(item.lock))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    try:
        if item.path.exists():
            _delete(item.path)
    finally:
        lock.release()
    return True


def _delete(path: Path) -> None:
    """Renames `path` to a hidden name beside it, then deletes that: never half a folder
    under a name a run would read as an entry."""
    aside = path.with_name(f".{path.name}.removing-{os.getpid()}")
    if path.name.startswith("."):  # already hidden (a temp or set-aside folder)
        aside = path
    else:
        os.rename(path, aside)
    shutil.rmtree(aside)


def prune(root: Path, items: list[Item], args: argparse.Namespace, out: Console) -> int:
    chosen = select(items, args, time.time())
    if not chosen:
        out.print(f"nothing to prune in {root} (of {_entries(len(items))})", highlight=False)
        return 0
    verb = "removed" if args.yes else "would remove"
    done, skipped = [], []
    for item in chosen:
        what = f"{item.stage}/{item.path.name} ({item.status}, {format_bytes(item.size)})"
        if in_use(item) or (args.yes and not remove(item)):
            skipped.append(item)
            why = ("in use by another process (its lock is held)" if item.lock
                   else "written to in the last few minutes: may be a live write")
            out.print(f"skipped {what}: {why}", highlight=False)
            continue
        done.append(item)
        out.print(f"{verb} {what}", highlight=False)
    freed, linked = sum(i.freed for i in done), sum(i.size - i.freed for i in done)
    also = (f" ({format_bytes(linked)} more stays linked from run folders' checkpoints/)"
            if linked else "")
    out.print(f"{verb} {len(done)} of {_entries(len(items))}, "
              f"{'freed' if args.yes else 'would free'} {format_bytes(freed)}{also}"
              + (f"; {len(skipped)} skipped (in use)" if skipped else ""), highlight=False)
    if not args.yes and done:
        out.print("dry run: add --yes to remove them", highlight=False)
    return 0


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    action = argv[0] if argv and argv[0] in ("list", "prune") else "list"
    rest = argv[1:] if argv and argv[0] in ("list", "prune") else argv
    p = argparse.ArgumentParser(
        prog=f"kd store {action}",
        description="List the store's entries: stage, name, key, status (complete; incomplete: "
                    "started, no meta.json, a rerun resumes it; damaged: set aside), size, "
                    "totals." if action == "list" else
                    "Remove the entries the flags select (each flag narrows the selection). "
                    "Without --yes, only shows what would go. An entry another process holds "
                    "is skipped.")
    p.add_argument("path", nargs="?", default=None, metavar="PATH",
                   help="the store (default: $KD_STORE, else kd-store, as kd train uses)")
    if action == "prune":
        p.add_argument("--damaged", action="store_true",
                       help="entries set aside as damaged (<entry>.corrupt-<time>)")
        p.add_argument("--incomplete", action="store_true",
                       help="started but unfinished entries (no meta.json); a rerun would "
                            "resume them, so they are removed only with this flag")
        p.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                       help="not built or reused by a run (incomplete or damaged: not "
                            "written to) for over DAYS days")
        p.add_argument("--stage", action="append", default=None, metavar="S",
                       help="only this stage folder (teacher, cache, student, baseline, "
                            "pretrain, datasets); repeatable")
        p.add_argument("--yes", action="store_true", help="remove (default: a dry run)")
    args = p.parse_args(rest)
    args.action = action
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.action == "prune":
        if not (args.damaged or args.incomplete or args.older_than is not None):
            sys.stderr.write(f"error: kd store prune needs a selector: {SELECTORS} "
                             "(narrowed by --stage S); add --yes to remove\n")
            return 2
        if args.older_than is not None and args.older_than < 0:
            sys.stderr.write("error: --older-than DAYS must be >= 0\n")
            return 2
    try:
        root = resolve_root(args.path)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    items = scan(root)
    out = _console()
    if args.action == "prune":
        return prune(root, items, args, out)
    if not items:
        out.print(f"store {root} is empty", highlight=False)
        return 0
    out.print(to_table(root, items))
    return 0
