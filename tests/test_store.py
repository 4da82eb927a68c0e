"""The content-addressed store: keys, completion, verification and the cross-process lock."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import kdcli.configs
from kdcli.errors import ConfigError, CorruptArtifact
from kdcli.store import Entry, Store, key_of, user_code
from tests.conftest import SMOKE

INPUTS = {"model": "resnet20", "epochs": 3, "optimizer": {"lr": 0.1, "momentum": 0.9}}

# A child process that takes an entry's lock, announces it through a marker file, waits for the
# parent's go file, then holds the lock `hold` more seconds (timed from the parent's signal).
# kdcli.checkpoint is stubbed in the child only to skip its torch import (~2 s on 2 cores): the
# lock code under test is the real Entry.lock, which needs nothing from it.
HOLDER = textwrap.dedent("""
    import os, sys, time, types
    stub = types.ModuleType("kdcli.checkpoint")
    stub.__getattr__ = lambda name: None
    sys.modules["kdcli.checkpoint"] = stub
    from kdcli.store import Store
    root, seed, marker, go, hold = sys.argv[1:6]
    entry = Store(root).entry("teacher", "resnet20", {"seed": int(seed)})
    with entry.lock():
        open(marker, "w").write("held")
        while not os.path.exists(go):
            time.sleep(0.01)
        time.sleep(float(hold))
""")


def test_key_is_stable_across_dict_order():
    reordered = {"optimizer": {"momentum": 0.9, "lr": 0.1}, "epochs": 3, "model": "resnet20"}
    assert key_of(INPUTS) == key_of(reordered)
    assert len(key_of(INPUTS)) == 16
    blob = json.dumps(INPUTS, sort_keys=True, separators=(",", ":"))
    assert key_of(INPUTS) == hashlib.sha256(blob.encode()).hexdigest()[:16]


@pytest.mark.parametrize("change", [
    {"epochs": 4}, {"model": "resnet32"}, {"optimizer": {"lr": 0.05, "momentum": 0.9}},
    {"seed": 1},
])
def test_key_differs_for_different_inputs(change):
    assert key_of({**INPUTS, **change}) != key_of(INPUTS)


def test_users_own_target_is_keyed_by_its_source_file(tmp_path, monkeypatch):
    """A `_target_` of the user's own enters the key as the sha256 of the file defining it:
    for a target re-exported by a package, the module it was defined in (mypkg/models.py)."""
    (tmp_path / "keyed_usermodels.py").write_text("def net(num_classes=10):\n    return None\n")
    (tmp_path / "keyed_pkg").mkdir()
    (tmp_path / "keyed_pkg" / "__init__.py").write_text("from keyed_pkg.models import net\n")
    (tmp_path / "keyed_pkg" / "models.py").write_text("def net(num_classes=10):\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    node = {"_target_": "torch.optim.SGD", "inner": [{"_target_": "keyed_usermodels.net"}]}
    assert user_code(node, {"_target_": "keyed_pkg.net"}) == {
        "keyed_usermodels": digest(tmp_path / "keyed_usermodels.py"),
        "keyed_pkg.models": digest(tmp_path / "keyed_pkg" / "models.py")}
    (tmp_path / "keyed_usermodels.py").write_text("def net(num_classes=10):\n    return 2\n")
    assert user_code(node)["keyed_usermodels"] == digest(tmp_path / "keyed_usermodels.py")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# One way each for net.py to import blocks.py: absolute, relative, a submodule named in a
# from-import, and imports that never run when the target is built (in a function, for typing).
# `from pkg import blocks` also hashes pkg/__init__.py: `blocks` might have been a name in it.
IMPORT_FORMS = [
    ("import {pkg}.blocks\nWIDTH = {pkg}.blocks.WIDTH", False),
    ("import {pkg}.blocks as b", False),
    ("from {pkg}.blocks import WIDTH", False),
    ("from {pkg} import blocks", True),
    ("from .blocks import WIDTH", False),
    ("from . import blocks", True),
    ("def width():\n    from .blocks import WIDTH\n    return WIDTH", False),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from {pkg}.blocks import WIDTH",
     False),
]


@pytest.mark.parametrize("form", range(len(IMPORT_FORMS)))
def test_user_files_a_target_imports_are_in_its_key(tmp_path, monkeypatch, form):
    """The user's files that the defining file imports, directly or not, are hashed with it: an
    edit of a helper module is a new key, not a teacher trained on the old code reused. A file
    of the user's that it does not import is not, nor are kd, torch and the standard library."""
    pkg = f"imported_forms{form}"  # a name per case: sys.modules keeps a module once imported
    folder = tmp_path / pkg
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "net.py").write_text(
        "import torch\nfrom kdcli.models.small import tiny_cnn\n"
        + IMPORT_FORMS[form][0].format(pkg=pkg) + "\ndef net(num_classes=10):\n    return None\n")
    (folder / "blocks.py").write_text("import os\nfrom .third import DEPTH\nWIDTH = 8\n")
    (folder / "third.py").write_text("DEPTH = 2\n")
    (folder / "unrelated.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    node = {"_target_": f"{pkg}.net.net"}

    code = user_code(node)
    expected = {f"{pkg}.{name}": _digest(folder / f"{name}.py")
                for name in ("blocks", "net", "third")}
    if IMPORT_FORMS[form][1]:
        expected[pkg] = _digest(folder / "__init__.py")
    assert code == expected
    assert list(code) == sorted(code)
    (folder / "unrelated.py").write_text("X = 2\n")
    assert user_code(node) == code
    (folder / "blocks.py").write_text("import os\nfrom .third import DEPTH\nWIDTH = 16\n")
    edited = user_code(node)
    assert edited[f"{pkg}.blocks"] != code[f"{pkg}.blocks"]
    (folder / "third.py").write_text("DEPTH = 3\n")
    assert user_code(node)[f"{pkg}.third"] != edited[f"{pkg}.third"]


def test_a_single_file_target_keeps_the_key_it_had(tmp_path, monkeypatch):
    """A file of the user's that imports only kd, torch, the standard library and names that
    resolve to nothing is hashed alone, under its module name, as before imports were followed:
    the literal key was computed with kd before that change, so such users' entries are reused."""
    (tmp_path / "pinned_single.py").write_text(
        '"""One file: it imports the standard library, torch and kd, and a name that resolves to '
        'nothing."""\n'
        "from __future__ import annotations\n"
        "import os.path\n"
        "from collections import OrderedDict\n"
        "from torch import nn\n"
        "from kdcli.models.small import tiny_cnn\n"
        "try:\n"
        "    import no_such_module_anywhere\n"
        "except ImportError:\n"
        "    pass\n"
        "def net(num_classes=10, **_):\n"
        "    return tiny_cnn(num_classes=num_classes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    node = {"_target_": "pinned_single.net", "num_classes": 10}
    code = user_code(node)
    assert code == {"pinned_single": _digest(tmp_path / "pinned_single.py")}
    assert key_of({"model": node, "code": code}) == "ded63688b647d394"


def test_imports_are_found_without_running_them(tmp_path, monkeypatch):
    """Imports are read from the source, not taken from sys.modules: an import that never runs
    (typing only, here of a package whose __init__ raises) is followed without running it, and a
    module of the user's loaded for another target (the student's) is not in this one's key."""
    (tmp_path / "unrun_net.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from unrun_pkg.types import T\n"
        "def net(num_classes=10):\n    return None\n")
    (tmp_path / "unrun_pkg").mkdir()
    (tmp_path / "unrun_pkg" / "__init__.py").write_text("raise RuntimeError('not to be run')\n")
    (tmp_path / "unrun_pkg" / "types.py").write_text("T = int\n")
    (tmp_path / "unrun_other.py").write_text("def net(num_classes=10):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    teacher = {"_target_": "unrun_net.net"}

    expected = {"unrun_net": _digest(tmp_path / "unrun_net.py"),
                "unrun_pkg.types": _digest(tmp_path / "unrun_pkg" / "types.py")}
    assert user_code(teacher) == expected
    assert "unrun_pkg" not in sys.modules
    assert user_code({"_target_": "unrun_other.net"}) == {
        "unrun_other": _digest(tmp_path / "unrun_other.py")}
    assert user_code(teacher) == expected


def test_an_import_cycle_of_user_files_ends(tmp_path, monkeypatch):
    (tmp_path / "cycle_a.py").write_text(
        "import cycle_a\nfrom cycle_b import f\ndef net(num_classes=10):\n    return f()\n")
    (tmp_path / "cycle_b.py").write_text(
        "def f():\n    from cycle_a import net\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert user_code({"_target_": "cycle_a.net"}) == {
        "cycle_a": _digest(tmp_path / "cycle_a.py"), "cycle_b": _digest(tmp_path / "cycle_b.py")}


def test_shipped_configs_name_no_user_code():
    """kd's, torch's and the standard library's targets add no "code" field: the keys of every
    shipped config stay what they were before user code was hashed (their entries are reused)."""
    from omegaconf import OmegaConf

    nodes = [OmegaConf.to_container(OmegaConf.load(path), resolve=False)
             for path in sorted(Path(kdcli.configs.__file__).parent.rglob("*.yaml"))]
    assert sum(json.dumps(n).count('"_target_"') for n in nodes) > 20
    assert user_code(*nodes, {"_target_": "collections.OrderedDict"}) == {}


def test_meta_is_strict_json_with_nan_metrics_as_null(tmp_path):
    # A model with non-finite test logits has NaN metrics: meta.json held a bare NaN, which
    # strict JSON parsers (jq, JSON.parse) reject.
    entry = Store(tmp_path).entry("student", "s", INPUTS)
    entry.path.mkdir(parents=True)
    (entry.path / "f").write_text("x")
    entry.finish(["f"], {"metrics": {"top1": float("nan"), "top5": float("inf")}})
    assert json.loads((entry.path / "meta.json").read_text(), parse_constant=pytest.fail
                      )["metrics"] == {"top1": None, "top5": None}
    assert entry.verify()["metrics"]["top1"] is None


def test_entry_path_has_stage_name_and_key(tmp_path):
    entry = Store(tmp_path).entry("teacher", "resnet/20 x", INPUTS)
    assert entry.key == key_of(INPUTS)
    assert entry.path == tmp_path.resolve() / "teacher" / f"resnet_20_x-{entry.key}"
    assert entry.file("last.pt") == entry.path / "last.pt"
    assert not entry.complete and not entry.started


def test_same_inputs_same_entry(tmp_path):
    store = Store(tmp_path)
    a = store.entry("teacher", "resnet20", INPUTS)
    b = store.entry("teacher", "resnet20", dict(reversed(list(INPUTS.items()))))
    assert a.path == b.path


@pytest.mark.parametrize("root", ["", "  "])
def test_empty_store_path_is_refused(root):
    # Path('') is the cwd: entries landed among the user's files.
    with pytest.raises(ConfigError, match="is empty .*unset KD_STORE or set store=PATH"):
        Store(root)


@pytest.mark.parametrize("how", ["store=''", "KD_STORE="])
def test_empty_store_on_the_command_line_writes_nothing(tmp_path, how):
    # `${oc.env:KD_STORE,kd-store}` gives '' when the variable is set but empty.
    env = {k: v for k, v in os.environ.items() if k != "KD_STORE"}
    env["HYDRA_FULL_ERROR"] = "0"
    args = [*SMOKE, f"hydra.run.dir={tmp_path / 'run'}"]
    if how == "KD_STORE=":
        env["KD_STORE"] = ""
    else:
        args.append(how)
    proc = subprocess.run([sys.executable, "-m", "kdcli.cli", "teacher", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert proc.stderr == ("error: store='' is empty (store='' or KD_STORE set but empty); "
                           "unset KD_STORE or set store=PATH\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert not (tmp_path / "run" / "checkpoints").exists()


def _filled_entry(tmp_path):
    entry = Store(tmp_path).entry("cache", "resnet20", INPUTS)
    entry.path.mkdir(parents=True)
    entry.file("train.kdsl").write_bytes(b"abc")
    entry.file("test.kdsl").write_bytes(b"")
    return entry


def test_finish_writes_meta_with_checksums(tmp_path):
    entry = _filled_entry(tmp_path)
    assert entry.started and not entry.complete
    meta = entry.finish(["train.kdsl", "test.kdsl"], {"num_samples": 5})
    assert entry.complete
    on_disk = json.loads(entry.file("meta.json").read_text())
    assert on_disk == meta
    assert on_disk["files"] == {
        "train.kdsl": hashlib.sha256(b"abc").hexdigest(),
        "test.kdsl": hashlib.sha256(b"").hexdigest(),
    }
    assert on_disk["key"] == entry.key and on_disk["stage"] == "cache"
    assert on_disk["inputs"] == INPUTS and on_disk["num_samples"] == 5
    assert entry.verify() == on_disk


def test_finished_files_are_read_only_and_links_to_them_too(tmp_path):
    # Run folders hard-link an entry's files: a write through a run's checkpoints/ would change
    # the entry and every run linking it. Read-only, the write fails (for anyone but root).
    entry = _filled_entry(tmp_path)
    entry.file("last.pt.sha256").write_text("x\n")
    entry.finish(["train.kdsl", "test.kdsl"], {})
    for name in ("train.kdsl", "test.kdsl", "last.pt.sha256"):
        assert entry.file(name).stat().st_mode & 0o777 == 0o444, name
    assert entry.file("meta.json").stat().st_mode & 0o200  # kd renames it over, marks its use
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    os.link(entry.file("train.kdsl"), run / "train.kdsl")
    assert not (run / "train.kdsl").stat().st_mode & 0o222
    if os.geteuid() != 0:  # root writes through any mode
        with pytest.raises(PermissionError):
            (run / "train.kdsl").write_bytes(b"changed")
    # Read-only files do not stop kd from setting a damaged entry aside or pruning it.
    entry.invalidate()
    (aside,) = [p for p in entry.path.parent.iterdir() if ".corrupt-" in p.name]
    shutil.rmtree(aside)
    assert not aside.exists()


def test_a_read_only_store_reuses_finished_entries_and_refuses_to_build(tmp_path, monkeypatch):
    # A team's store mounted read-only (checked by hand on a `mount -o remount,bind,ro`; here
    # the access check is what says so): no lock file can be created there.
    import kdcli.store as store_module
    from kdcli.stages.common import reuse_if_valid

    done = _filled_entry(tmp_path)
    done.finish(["train.kdsl"], {})
    todo = Store(tmp_path).entry("cache", "resnet8", {**INPUTS, "model": "resnet8"})
    monkeypatch.setattr(store_module, "_writable", lambda folder: False)
    with done.lock():
        assert reuse_if_valid(done)["key"] == done.key
    assert not Path(f"{done.path}.lock").exists()
    with pytest.raises(ConfigError, match=rf"^store {tmp_path} is read-only: kd cannot build "
                                          rf"cache {todo.path.name} there; set store="):
        with todo.lock():
            pass
    assert not todo.path.exists()
    # A damaged entry there can be neither set aside nor rebuilt: one error saying both.
    done.file("train.kdsl").chmod(0o644)
    done.file("train.kdsl").write_bytes(b"abd")

    def refuse(*args):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(store_module.os, "replace", refuse)
    with pytest.raises(CorruptArtifact, match=r"does not match its checksum; cannot set it aside "
                                              r"to rebuild it \(Read-only file system\)"):
        reuse_if_valid(done)


def test_verify_detects_modified_file(tmp_path):
    entry = _filled_entry(tmp_path)
    entry.finish(["train.kdsl"], {})
    entry.file("train.kdsl").chmod(0o644)  # as a bit flip on disk would not ask
    entry.file("train.kdsl").write_bytes(b"abd")
    with pytest.raises(CorruptArtifact, match="checksum"):
        entry.verify()


def test_verify_detects_missing_file(tmp_path):
    entry = _filled_entry(tmp_path)
    entry.finish(["train.kdsl", "test.kdsl"], {})
    entry.file("test.kdsl").unlink()
    with pytest.raises(CorruptArtifact, match="missing"):
        entry.verify()


def test_unreadable_meta(tmp_path):
    entry = _filled_entry(tmp_path)
    entry.file("meta.json").write_text("{not json")
    with pytest.raises(CorruptArtifact, match="meta.json"):
        entry.verify()


def test_invalidate_sets_the_whole_entry_aside(tmp_path):
    entry = _filled_entry(tmp_path)
    entry.finish(["train.kdsl"], {})
    entry.invalidate()
    assert not entry.complete
    # Nothing of a damaged entry is reused (not even a checkpoint to resume from), but the
    # files are kept beside it for inspection.
    assert not entry.path.exists()
    (aside,) = entry.path.parent.glob(f"{entry.path.name}.corrupt-*")
    assert (aside / "train.kdsl").exists()
    entry.invalidate()  # idempotent
    with pytest.raises(CorruptArtifact):
        entry.meta()


@dataclass
class Holder:
    proc: subprocess.Popen
    marker: Path
    go: Path
    entry: Entry

    def wait_until_held(self) -> None:
        deadline = time.monotonic() + 60
        while not self.marker.exists():
            assert self.proc.poll() is None, "lock holder exited early"
            assert time.monotonic() < deadline, "lock holder never took the lock"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def holders(tmp_path_factory):
    """Two child processes, each holding the lock of its own entry (seed 0 and seed 1)."""
    tmp = tmp_path_factory.mktemp("locks")
    out = []
    for seed, hold in ((0, 2.0), (1, 600.0)):
        marker, go = tmp / f"held-{seed}", tmp / f"go-{seed}"
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp / "store"), str(seed),
                                 str(marker), str(go), str(hold)])
        entry = Store(tmp / "store").entry("teacher", "resnet20", {"seed": seed})
        out.append(Holder(proc, marker, go, entry))
    yield out
    for h in out:
        h.proc.kill()
        h.proc.wait()


def _acquire_within(entry, timeout_s: float) -> float:
    """Seconds to take `entry.lock()` in a helper thread; fails rather than hanging."""
    took: list[float] = []

    def take() -> None:
        start = time.monotonic()
        with entry.lock(poll_log_s=0.2):
            took.append(time.monotonic() - start)

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert took, f"lock not acquired within {timeout_s} s"
    return took[0]


def test_lock_excludes_another_process(holders):
    holder = holders[0]
    holder.wait_until_held()
    holder.go.touch()  # the holder releases 2 s from now
    waited = _acquire_within(holder.entry, timeout_s=20)
    assert waited >= 1.0
    # We got the lock only once the other process let go of it.
    assert holder.proc.wait(timeout=10) == 0


def test_lock_of_killed_holder_is_released(holders):
    holder = holders[1]
    holder.wait_until_held()
    os.kill(holder.proc.pid, signal.SIGKILL)
    assert holder.proc.wait(timeout=10) == -signal.SIGKILL
    assert _acquire_within(holder.entry, timeout_s=5) < 1.0


def test_taking_the_lock_removes_temp_files_of_a_killed_writer(tmp_path):
    entry = Store(tmp_path).entry("student", "resnet8", INPUTS)
    (entry.path / "tb").mkdir(parents=True)
    left = [entry.path / ".last.pt.k3j2h1.tmp", entry.path / "tb" / ".events.x9.tmp"]
    for path in left:
        path.write_bytes(b"half a checkpoint")
    kept = [entry.path / "last.pt", entry.path / "notes.tmp"]  # not atomic_write's pattern
    for path in kept:
        path.write_bytes(b"whole")
    with entry.lock():
        assert not any(p.exists() for p in left)
        assert all(p.read_bytes() == b"whole" for p in kept)


def test_a_model_whose_target_is_overridden_is_named_after_it(tmp_path, monkeypatch):
    """`student._target_=mymodels.tiny_mlp` trains an MLP, not the option's tiny_cnn: its name
    (report title, log, store entry folder `student/<name>-<key>`) is the target's. A model whose
    `_target_` is its option's own keeps the option's name, so its entries are reused; this
    holds for an option of a user's config dir built on a shipped one through its defaults."""
    from kdcli.stages import teacher as teacher_stage
    from kdcli.stages.common import Context
    from tests.test_schema import composed

    (tmp_path / "named_models.py").write_text("def tiny_mlp(num_classes=10, **_):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "mynet.yaml").write_text("defaults: [tiny_cnn, _self_]\nwidth: 8\n")
    user_dir = f"hydra.searchpath=[file://{tmp_path}]"

    def names(*overrides: str) -> tuple[str, str, str]:
        with composed(*SMOKE, *overrides) as cfg:
            ctx = Context(cfg, None, None, None, tmp_path)
            return ctx.choice("student"), ctx.choice("teacher"), ctx.selected("student")

    assert names() == ("tiny_cnn", "tiny_cnn-wide", "student=tiny_cnn")
    assert names("student._target_=named_models.tiny_mlp") == (
        "tiny_mlp", "tiny_cnn-wide", "student._target_=named_models.tiny_mlp")
    assert names("teacher._target_=named_models.tiny_mlp")[:2] == ("tiny_cnn", "tiny_mlp")
    assert names("student._target_=kdcli.models.small.tiny_cnn")[0] == "tiny_cnn"  # its own
    assert names("student=mynet", user_dir)[0] == "mynet"
    assert names("student=mynet", user_dir, "student._target_=named_models.tiny_mlp")[0] == \
        "tiny_mlp"
    with composed(*SMOKE, "teacher=[tiny_cnn-wide,tiny_cnn]") as cfg:
        ctx = Context(cfg, None, None, None, tmp_path)
        assert [c.choice("teacher") for c in teacher_stage.contexts(ctx)] == [
            "tiny_cnn-wide", "tiny_cnn"]


def test_an_entry_is_found_by_its_key_under_another_name(tmp_path):
    # Names are for people (the model's): a rename (an inline _target_ was named after its
    # option, now after its target) must not orphan an entry and train it again.
    store = Store(tmp_path)
    old = store.entry("student", "resnet8", INPUTS)
    old.path.mkdir(parents=True)
    (old.path / "last.pt").write_bytes(b"w")
    old.finish(["last.pt"], {})
    again = store.entry("student", "small_net", INPUTS)
    assert again.path == old.path and again.complete and again.verify()["key"] == old.key
    # Another key is another entry, under the name given; and a name's own folder comes first.
    other = store.entry("student", "small_net", {**INPUTS, "epochs": 99})
    assert other.path.name == f"small_net-{other.key}" and not other.started
    own = tmp_path.resolve() / "student" / f"small_net-{old.key}"
    own.mkdir()
    assert store.entry("student", "small_net", INPUTS).path == own
    # A set-aside (damaged) entry is not found.
    old.invalidate()
    own.rmdir()
    assert store.entry("student", "small_net", INPUTS).path == own
