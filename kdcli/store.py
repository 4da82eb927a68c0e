"""The content-addressed store of stage outputs, shared by every run that points at it.

An entry's key is a hash of everything that determines its output (for a teacher: model,
dataset content, optimizer, schedule, epochs, seed, precision, ...). Runs that agree on those
share the entry, so a sweep over loss settings trains its teacher once. Layout:

    <root>/<stage>/<name>-<key>/      files of the stage (checkpoints, logits, metrics.csv)
    <root>/<stage>/<name>-<key>/meta.json   written last: the entry is complete when it exists;
                                            its mtime is when a run last built or reused it
    <root>/<stage>/<name>-<key>.lock  held while a process builds or checks the entry

`meta.json` records the key inputs and a sha256 of every file, so a damaged or altered entry
is detected on reuse instead of silently trusted.

kd's own code is covered by the stages' version number, installed packages (torch, timm, ...)
are taken as fixed, but a `_target_` naming the user's own code (`mymodels.tiny_mlp`) is only
text in a config: `user_code` adds a sha256 of its source file and of the user's files it
imports, so editing any of them gives a new key.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from kdcli.checkpoint import atomic_write_text, sha256_file
from kdcli.errors import ConfigError, CorruptArtifact

log = logging.getLogger(__name__)

META = "meta.json"


def user_code(*nodes: Any) -> dict[str, str]:
    """The sha256 of the source file of each module of the user's own that a `_target_` in
    `nodes` (plain dicts and lists, at any depth) names, and of every file of the user's those
    import, directly or not, by module name; {} when every target is kd's, the standard
    library's or an installed package's (under site-packages).

    The first file is the one defining the target: for `mypkg.models.net`, the module `net`
    was defined in (mypkg/models.py, or wherever `mypkg.models` imported it from). The files it
    imports are found from its source (`_imported_files`), not from `sys.modules`, so a key
    does not depend on what else the process has loaded; a file importing none of the user's
    gives the one-entry dict it always did, so existing keys stay. Not hashed: data files the
    code reads, modules imported by a name in a string (`importlib.import_module`), and the
    `__init__.py` of a package holding a hashed file unless an import names the package. A
    target that cannot be imported is skipped here; `kdcli.schema` reports it before any stage
    runs.
    """
    found: dict[str, Path] = {}
    for target in sorted(set(_targets(nodes))):
        module = _defining_module(target)
        source = getattr(module, "__file__", None)
        if source and _is_users(Path(source)):
            found[module.__name__] = Path(source)
    seen = {path.resolve() for path in found.values()}
    for name, path in list(found.items()):
        found.update(_imported_files(name, path, seen))
    return {name: sha256_file(path) for name, path in sorted(found.items())}


def _imported_files(name: str, source: Path, seen: set[Path]) -> dict[str, Path]:
    """The user's .py files that module `name` (file `source`) imports, directly or not, by
    module name; files in `seen` (which this extends) are not visited again, so cycles end.

    Every `import` statement counts, also those inside functions and `if TYPE_CHECKING:`: an
    edit there may change what is built. Names are resolved without importing anything
    (`_spec`); one that resolves to no file, or to one not the user's, is skipped."""
    found = {}
    for module in sorted(_imported_names(name, source)):
        spec = _spec(module)
        origin = getattr(spec, "origin", None)
        if not (origin and spec.has_location and origin.endswith(".py")):
            continue  # a built-in, an extension module, a namespace package
        path = Path(origin)
        if path.resolve() in seen or not _is_users(path):
            continue
        seen.add(path.resolve())
        found[module] = path
        found.update(_imported_files(module, path, seen))
    return found


def _imported_names(name: str, source: Path) -> set[str]:
    """The absolute names of the modules that the import statements of module `name` (file
    `source`) may load; for `from a import b`, `b` may be a module (`a.b`) or a name in `a`."""
    try:
        tree = ast.parse(source.read_bytes(), str(source))
    except (OSError, SyntaxError, ValueError):  # instantiate reports it; its own hash still counts
        return set()
    package = name if source.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                try:
                    base = importlib.util.resolve_name("." * node.level + base, package)
                except (ImportError, ValueError):  # beyond the top-level package
                    continue
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def _spec(name: str) -> importlib.machinery.ModuleSpec | None:
    """Where Python would find module `name`, or None; found without importing it or its
    packages (`importlib.util.find_spec` of `a.b` runs `a/__init__.py`), since an import inside
    a function or an `if TYPE_CHECKING:` block may never run when the target is built."""
    parent, _, _ = name.rpartition(".")
    try:
        if not parent:
            return importlib.util.find_spec(name)
        outer = _spec(parent)
        if outer is None or outer.submodule_search_locations is None:
            return None  # `a` is a module, not a package: `a.b` names something inside it
        if outer.has_location and not _is_users(Path(outer.origin)):
            return None  # an installed package's or the standard library's submodule
        where = list(outer.submodule_search_locations)
        return importlib.machinery.PathFinder.find_spec(name, where)
    except Exception:  # a name no finder understands: not a file that can be hashed
        return None


def _targets(value: Any) -> Iterable[str]:
    if isinstance(value, dict):
        if isinstance(value.get("_target_"), str):
            yield value["_target_"]
        for v in value.values():
            yield from _targets(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _targets(v)


def _defining_module(target: str) -> Any:
    """The module that defines `target` (not one re-exporting it), or None if not importable."""
    import inspect

    from hydra._internal.utils import _locate  # what instantiate itself uses

    try:
        obj = _locate(target)
    except Exception:  # reported by kdcli.schema; the key cannot matter for a run that fails
        return None
    module = inspect.getmodule(obj)
    if module is None:  # an object without __module__ (an instance): the module it is found in
        parts = target.split(".")
        names = (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
        module = next((sys.modules[n] for n in names if n in sys.modules), None)
    return module


def _is_users(source: Path) -> bool:
    """True for a source file outside kd, the standard library and installed packages."""
    import kdcli

    source = source.resolve()
    if {"site-packages", "dist-packages"} & set(source.parts):
        return False
    fixed = [Path(kdcli.__file__).parent] + [Path(sysconfig.get_paths()[k])
                                             for k in ("stdlib", "platstdlib")]
    return not any(source.is_relative_to(d.resolve()) for d in fixed)


def key_of(inputs: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able dict (sorted keys)."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _found(folder: Path, name: str, key: str) -> Path:
    """`folder / name`, unless only another name holds key `key` there (`<other>-<key>`, a
    complete entry first): the key alone says what an entry holds, and its name, the model's
    for a person reading the store, has changed (an inline `_target_` named after its option
    before); matching by name would orphan the entry and train it again."""
    preferred = folder / name
    if preferred.is_dir() or not folder.is_dir():
        return preferred
    others = [p for p in folder.glob(f"*-{key}") if p.is_dir()]
    others.sort(key=lambda p: (not (p / META).exists(), p.name))
    return others[0] if others else preferred


class Entry:
    """One stage output in the store."""

    def __init__(self, root: Path, stage: str, name: str, inputs: dict[str, Any]) -> None:
        self.stage = stage
        self.inputs = inputs
        self.key = key_of(inputs)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        self.path = _found(Path(root) / stage, f"{safe}-{self.key}", self.key)
        self._lock = FileLock(str(self.path) + ".lock")

    @contextlib.contextmanager
    def lock(self, poll_log_s: float = 30.0) -> Iterator[None]:
        """Exclusive lock across processes; waits (logging who it waits for) if another holds it.

        filelock's OS-level locks are released by the kernel when their holder dies, so a
        killed run never leaves a lock that blocks the next one.

        A store kd cannot write to (a team's store mounted read-only) has no lock to take:
        a finished entry is reused as it is, since nobody can change it through this mount;
        one that would have to be built is refused, naming the store.
        """
        if not _writable(self.path.parent):
            if not self.complete:
                raise ConfigError(
                    f"store {self.path.parent.parent} is read-only: kd cannot build "
                    f"{self.stage} {self.path.name} there; set store= to a folder kd can write "
                    "(a read-only store's finished entries are reused as they are)")
            log.info("%s %s: the store is read-only; reusing the finished entry without its "
                     "lock", self.stage, self.path.name)
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        waited = False
        while True:
            try:
                self._lock.acquire(timeout=poll_log_s)
                break
            except Timeout:
                if not waited:
                    log.info("%s %s is being built by another process; waiting", self.stage,
                             self.path.name)
                waited = True
        try:
            self._remove_temp_files()
            yield
        finally:
            self._lock.release()

    def _remove_temp_files(self) -> None:
        """Deletes what a writer killed mid-write left (`atomic_write`'s `.<name>.*.tmp`):
        every write into an entry happens under its lock, so with the lock held none is live."""
        if not self.path.is_dir():
            return
        for tmp in self.path.rglob(".*.tmp"):
            if tmp.is_file():
                with contextlib.suppress(OSError):
                    tmp.unlink()
                    log.info("%s %s: removed %s, left by an interrupted write", self.stage,
                             self.path.name, tmp.relative_to(self.path))

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def complete(self) -> bool:
        return (self.path / META).exists()

    @property
    def started(self) -> bool:
        return self.path.exists() and any(self.path.iterdir())

    def meta(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / META).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CorruptArtifact(
                f"store entry {self.path} has an unreadable {META}: {exc}") from exc

    def verify(self) -> dict[str, Any]:
        """Checks every file against the sha256 recorded at completion; returns the meta."""
        meta = self.meta()
        if meta.get("key") != self.key:
            # A folder copied or renamed by hand: intact files, but another config's outputs.
            raise CorruptArtifact(f"store entry {self.path} holds the outputs of key "
                                  f"{meta.get('key')}, not {self.key}")
        for name, digest in meta.get("files", {}).items():
            f = self.path / name
            if not f.exists():
                raise CorruptArtifact(f"store entry file missing: {f}")
            if sha256_file(f) != digest:
                raise CorruptArtifact(f"store entry file {f} does not match its checksum")
        return meta

    def mark_used(self) -> None:
        """Sets meta.json's mtime to now: `kd store prune --older-than` goes by when an entry
        was last built or reused, so a teacher every run reuses is not pruned for its age.
        Best effort: a read-only store is still reused."""
        mark_used(self.path / META)

    def finish(self, files: list[str], info: dict[str, Any]) -> dict[str, Any]:
        """Marks the entry complete: records inputs, file checksums and `info` in meta.json.

        The entry's files become read-only first, as git's objects are: run folders hard-link
        them (`stages.common.publish`), so a write through a run's `checkpoints/best.pt` would
        change the entry and every other run linking it; now it fails instead (for anyone but
        root). Files kd replaces (meta.json, a resumed `last.pt`) are renamed over, which a
        read-only file does not stop."""
        for name in os.listdir(self.path):
            if name != META and (self.path / name).is_file():
                _read_only(self.path / name)
        meta = {
            "stage": self.stage,
            "key": self.key,
            "inputs": self.inputs,
            "files": {f: sha256_file(self.path / f) for f in files},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pid": os.getpid(),
            **info,
        }
        from kdcli.report import to_jsonable  # NaN metrics as null: strict JSON

        atomic_write_text(self.path / META,
                          json.dumps(to_jsonable(meta), indent=2, allow_nan=False))
        return meta

    def invalidate(self) -> None:
        """Sets a damaged entry aside (`<dir>.corrupt-<time>`) so it is rebuilt from scratch:
        none of its files, a checkpoint to resume from included, can be trusted."""
        if self.path.exists():
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d%H%M%S')}")
            os.replace(self.path, aside)


def _writable(folder: Path) -> bool:
    """Whether this process may create files in `folder`, or in its nearest existing parent
    (access(2): permissions, and a filesystem mounted read-only, for root too)."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return os.access(folder, os.W_OK)


def _read_only(path: Path) -> None:
    with contextlib.suppress(OSError):  # a store on a filesystem without modes (some mounts)
        os.chmod(path, path.stat().st_mode & ~0o222)


def mark_used(meta: Path) -> None:
    """Sets `meta`'s mtime to now (see `Entry.mark_used`); decoded-image caches do the same."""
    with contextlib.suppress(OSError):  # read-only or shared store: reuse must not fail on it
        os.utime(meta)


class Store:
    """Entries under one root folder."""

    def __init__(self, root: str | Path) -> None:
        # Path('') is the current directory: entries would land among the user's own files.
        if not str(root).strip():
            raise ConfigError(f"store={str(root)!r} is empty (store='' or KD_STORE set but "
                              "empty); unset KD_STORE or set store=PATH")
        self.root = Path(root).expanduser().resolve()

    def entry(self, stage: str, name: str, inputs: dict[str, Any]) -> Entry:
        return Entry(self.root, stage, name, inputs)
