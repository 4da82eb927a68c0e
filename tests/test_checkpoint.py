"""Checkpoints: atomic saves, weights-only loads, damaged and foreign files refused."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

from kdcli import checkpoint
from kdcli.errors import CorruptArtifact


class Arbitrary:
    """Not a tensor, number or string: weights_only unpickling must refuse it."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def sample_state() -> dict:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 7,
            "val_top1": 0.625, "tag": "best", "history": [1.0, 0.5], "ids": torch.arange(5)}


def test_round_trip(tmp_path):
    state = sample_state()
    path = tmp_path / "teacher" / "last.pt"  # parent folder is created
    checkpoint.save(state, path)
    back = checkpoint.load(path)
    assert back["format"] == checkpoint.FORMAT
    assert back["epoch"] == 7 and back["tag"] == "best" and back["val_top1"] == 0.625
    assert back["history"] == [1.0, 0.5]
    torch.testing.assert_close(back["ids"], torch.arange(5))
    assert back["model"].keys() == state["model"].keys()
    for name, value in state["model"].items():
        torch.testing.assert_close(back["model"][name], value)
    mom = back["optimizer"]["state"][0]["momentum_buffer"]
    torch.testing.assert_close(mom, state["optimizer"]["state"][0]["momentum_buffer"])
    assert back["optimizer"]["param_groups"][0]["lr"] == 0.1
    # The loaded state dicts load back into fresh objects.
    model = nn.Linear(3, 2)
    model.load_state_dict(back["model"])
    torch.optim.SGD(model.parameters(), lr=1.0).load_state_dict(back["optimizer"])


def test_saved_file_loads_with_plain_torch_weights_only(tmp_path):
    checkpoint.save(sample_state(), tmp_path / "last.pt")
    obj = torch.load(tmp_path / "last.pt", weights_only=True)
    assert obj["format"] == checkpoint.FORMAT and obj["epoch"] == 7


def test_missing_file(tmp_path):
    with pytest.raises(CorruptArtifact, match="not found"):
        checkpoint.load(tmp_path / "nope.pt")


def test_truncated_file_names_path(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(sample_state(), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptArtifact, match="fails its checksum") as err:
        checkpoint.load(path)
    assert str(path) in str(err.value)
    # Without the checksum file, torch's own reader still refuses it.
    (tmp_path / "last.pt.sha256").unlink()
    with pytest.raises(CorruptArtifact, match="unreadable") as err:
        checkpoint.load(path)
    assert str(path) in str(err.value)


def test_flipped_bit_inside_a_tensor_is_caught_by_the_checksum(tmp_path):
    # torch.load does not notice this one: only the sha256 beside the file does.
    path = tmp_path / "last.pt"
    checkpoint.save({"model": {"w": torch.zeros(4096)}}, path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptArtifact, match="fails its checksum"):
        checkpoint.load(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CorruptArtifact) as err:
        checkpoint.load(path)
    assert str(path) in str(err.value)


def test_arbitrary_pickled_object_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "obj": Arbitrary()}, path)
    with pytest.raises(CorruptArtifact, match="unreadable"):
        checkpoint.load(path)


def test_plain_pickle_refused(tmp_path):
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"format": checkpoint.FORMAT, "obj": Arbitrary()}, protocol=2))
    with pytest.raises(CorruptArtifact):
        checkpoint.load(path)


@pytest.mark.parametrize("obj", [{"epoch": 1}, {"format": checkpoint.FORMAT + 1, "epoch": 1},
                                 [1, 2, 3]])
def test_missing_or_wrong_format_refused(tmp_path, obj):
    path = tmp_path / "foreign.pt"
    torch.save(obj, path)
    with pytest.raises(CorruptArtifact, match="format"):
        checkpoint.load(path)


def test_failed_save_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save({"epoch": 1}, path)
    before = path.read_bytes()
    real_save = torch.save

    def half_save(obj, fh, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        fh.write(buf.getvalue()[:100])
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        checkpoint.save({"epoch": 2}, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert checkpoint.load(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]


def test_save_replaces_old_file(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save({"epoch": 1}, path)
    checkpoint.save({"epoch": 2}, path)
    assert checkpoint.load(path)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]


def test_atomic_write_text_and_sha256(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    checkpoint.atomic_write_text(path, "abc")
    assert path.read_text() == "abc"
    # sha256("abc"), the FIPS 180-2 test vector.
    assert checkpoint.sha256_file(path) == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    assert checkpoint.sha256_file(path, chunk=1) == checkpoint.sha256_file(path)


def test_written_files_get_the_umask_mode_not_mkstemps_private_one(tmp_path):
    # mkstemp makes 0600 files: exported models and reports were unreadable to other users.
    import os

    from kdcli.checkpoint import _new_file_mode, atomic_write_text

    old = os.umask(0o022)
    try:
        _new_file_mode.cache_clear()
        atomic_write_text(tmp_path / "report.json", "{}")
        assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        _new_file_mode.cache_clear()
        atomic_write_text(tmp_path / "report.json", "{}")
        assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
        _new_file_mode.cache_clear()


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "copy"])
def test_published_checkpoints_carry_their_checksum(tmp_path, monkeypatch, links):
    # The run folder's copies had no sidecar: a flipped bit in checkpoints/student/last.pt was
    # exported as the trained model without a word.
    import os

    from kdcli.stages.common import publish
    from kdcli.store import Store

    if not links:
        monkeypatch.setattr(os, "link", lambda src, dst: (_ for _ in ()).throw(OSError("no")))
    entry = Store(tmp_path / "store").entry("student", "s", {"k": 1})
    for name in ("best.pt", "last.pt"):
        checkpoint.save({"model": {"w": torch.arange(4.0)}}, entry.file(name))
    run = tmp_path / "run"
    publish(entry, run, "student")
    copy = run / "checkpoints" / "student" / "last.pt"
    assert (copy.parent / "last.pt.sha256").read_text() == entry.file("last.pt.sha256").read_text()
    checkpoint.load(copy)
    if not links:  # a hard link shares the store's bytes, and the store's sidecar checks them
        data = bytearray(copy.read_bytes())
        data[-30] ^= 0x08
        copy.write_bytes(bytes(data))
        with pytest.raises(CorruptArtifact, match="fails its checksum"):
            checkpoint.load(copy)



def _truncated(path):
    checkpoint.save(sample_state(), path)
    path.write_bytes(path.read_bytes()[:200])
    path.with_name(path.name + ".sha256").unlink()


@pytest.mark.parametrize("make, says", [
    (lambda p: p.write_text("garbage\n"), "not a PyTorch checkpoint (neither a zip archive nor "
                                          "a pickle)"),
    (lambda p: p.write_bytes(b""), "the file is empty"),
    (_truncated, "a zip archive PyTorch cannot read: truncated, damaged"),
    (lambda p: torch.save({"obj": Arbitrary()}, p),
     "holding Python objects (tests.test_checkpoint.Arbitrary) beyond tensors"),
    (lambda p: p.write_bytes(pickle.dumps({"a": 1}, protocol=2)),
     "a pickle, not a PyTorch checkpoint"),
    (lambda p: p.write_bytes(b"KDSOFTLB" + bytes(40)), "a kd soft-label cache (.kdsl), not a "
                                                       "checkpoint"),
    (lambda p: p.mkdir(), "is unreadable: Is a directory"),
])
def test_unreadable_file_says_what_it_is_without_torchs_advice(tmp_path, make, says):
    # torch's own text, cut at 200 characters, advised re-running with weights_only=False:
    # the unsafe load kd's trust model avoids.
    path = tmp_path / "junk.pt"
    make(path)
    with pytest.raises(CorruptArtifact) as err:
        checkpoint.load(path)
    assert str(err.value).startswith(f"checkpoint {path} is unreadable: ")
    assert says in str(err.value)
    assert "weights_only" not in str(err.value)


def test_weights_sha256_keys_the_weights_not_the_file(tmp_path) -> None:
    # The cache was keyed by the sha256 of the teacher's last.pt, which also holds the epochs'
    # timings: a bit-identical retrain got a new cache, and so did every student after it.
    model = nn.Linear(3, 2)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    checkpoint.save({"model": model.state_dict(), "train_time_s": 1.0}, a)
    checkpoint.save({"model": model.state_dict(), "train_time_s": 2.5}, b)
    assert checkpoint.sha256_file(a) != checkpoint.sha256_file(b)
    digest = checkpoint.weights_sha256(checkpoint.load(a)["model"])
    assert digest == checkpoint.weights_sha256(checkpoint.load(b)["model"])
    nudged = {k: v.clone() for k, v in model.state_dict().items()}
    nudged["bias"][0] = torch.nextafter(nudged["bias"][0], torch.tensor(1.0))  # one ulp
    assert checkpoint.weights_sha256(nudged) != digest
    renamed = {f"x.{k}": v for k, v in model.state_dict().items()}
    assert checkpoint.weights_sha256(renamed) != digest
    # Same bytes, other dtype or shape; a 0-d tensor (BatchNorm's num_batches_tracked).
    zeros = checkpoint.weights_sha256({"w": torch.zeros(4, dtype=torch.int32)})
    assert zeros != checkpoint.weights_sha256({"w": torch.zeros(2, dtype=torch.int64)})
    assert zeros != checkpoint.weights_sha256({"w": torch.zeros(2, 2, dtype=torch.int32)})
    assert checkpoint.weights_sha256({"n": torch.tensor(3)}) != checkpoint.weights_sha256(
        {"n": torch.tensor(4)})
