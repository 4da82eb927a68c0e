"""The decoded-image cache (kdcli.data.decoded) behind the CIFAR-10 JPEG pack loader."""

from __future__ import annotations

import io
import itertools
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from kdcli import distributed
from kdcli.data import datasets, decoded
from kdcli.data.datasets import cifar10
from kdcli.stages.common import load_dataset
from tests.conftest import forbid_gathering_views, mapped_files

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def write_pack(root: Path, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict:
    """A JPEG pack as the real one: per split an npz with `jpeg` (all JPEG files back to back,
    uint8), `offsets` (int64, n + 1), `labels` and `classes`. Returns the pixels PIL decodes."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = {}
    for split, n in (("train", n_train), ("test", n_test)):
        blobs, decoded_images = [], []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
            blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
            with Image.open(io.BytesIO(buf.getvalue())) as img:
                decoded_images.append(np.asarray(img.convert("RGB")).transpose(2, 0, 1))
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        labels = rng.integers(0, 10, n).astype(np.int64)
        np.savez(root / f"{split}.npz", jpeg=np.concatenate(blobs), offsets=offsets,
                 labels=labels, classes=np.array(CLASSES))
        pixels[split] = (np.stack(decoded_images), labels)
    return pixels


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the JPEG decoder (one per split decoded)."""
    calls: list[int] = []
    real = datasets._decode_jpegs

    def counting(blob: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
        calls.append(len(offsets) - 1)
        return real(blob, offsets)

    monkeypatch.setattr(datasets, "_decode_jpegs", counting)
    return calls


def no_decoding(*args: object) -> None:
    raise AssertionError("decoded although the cache is valid")



def test_pack_is_decoded_once_then_mapped_from_the_cache(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = tmp_path / "cifar", tmp_path / "cache"
    pixels = write_pack(root)
    plain = cifar10(str(root))
    assert np.array_equal(plain.train.images.numpy(), pixels["train"][0])
    assert plain.test.labels.tolist() == pixels["test"][1].tolist()

    first = cifar10(str(root), cache_dir=str(cache))
    (entry,) = cache.glob("cifar10-*")
    assert not list(cache.glob(".*")), "temp folder left behind"
    assert sorted(p.name for p in entry.iterdir()) == [
        "meta.json", "test_images.npy", "test_labels.npy", "train_images.npy", "train_labels.npy"]
    assert first.fingerprint() == plain.fingerprint() and first.classes == CLASSES

    with monkeypatch.context() as m:
        m.setattr(datasets, "_decode_jpegs", no_decoding)
        again = cifar10(str(root), name="full", cache_dir=str(cache))
    assert again.name == "full" and again.classes == CLASSES  # classes from meta.json
    for split in ("train", "test"):
        assert torch.equal(getattr(again, split).images, getattr(plain, split).images)
        assert torch.equal(getattr(again, split).labels, getattr(plain, split).labels)
    # The images are the file itself, mapped (pages shared with every process mapping it)...
    images = again.train.images
    if os.path.exists("/proc/self/maps"):
        assert str(entry / "train_images.npy") in mapped_files(images.data_ptr())
    # ...copy-on-write: writing to the tensor leaves the cache as it was.
    images[0] = 0
    assert np.array_equal(np.load(entry / "train_images.npy")[0], pixels["train"][0][0])


def test_a_changed_pack_gets_a_new_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = tmp_path / "cifar", tmp_path / "cache"
    write_pack(root)
    calls = count_decodes(monkeypatch)
    cifar10(str(root), cache_dir=str(cache))
    cifar10(str(root), cache_dir=str(cache))
    assert calls == [12, 5]  # the second load came from the cache

    # Same bytes, another mtime: a new key (the key reads no pack, only its size and mtime).
    os.utime(root / "test.npz", ns=(1, 10**18))
    cifar10(str(root), cache_dir=str(cache))
    assert calls == [12, 5] * 2 and len(list(cache.glob("cifar10-*"))) == 2

    # Rewritten with other images (another size): decoded again, and those images are loaded.
    pixels = write_pack(root, n_train=7, seed=1)
    changed = cifar10(str(root), cache_dir=str(cache))
    assert calls == [12, 5] * 2 + [7, 5] and len(list(cache.glob("cifar10-*"))) == 3
    assert np.array_equal(changed.train.images.numpy(), pixels["train"][0])
    monkeypatch.setattr(datasets, "_decode_jpegs", no_decoding)
    assert torch.equal(cifar10(str(root), cache_dir=str(cache)).train.images,
                       changed.train.images)


def test_a_damaged_cache_is_decoded_again_with_a_warning(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    root, cache = tmp_path / "cifar", tmp_path / "cache"
    pixels = write_pack(root)
    cifar10(str(root), cache_dir=str(cache))
    (entry,) = cache.glob("cifar10-*")
    npy = entry / "train_images.npy"
    npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2])  # truncated
    with caplog.at_level(logging.WARNING):
        repaired = cifar10(str(root), cache_dir=str(cache))
    assert np.array_equal(repaired.train.images.numpy(), pixels["train"][0])
    (warning,) = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"cifar10: decoded cache {entry} is unreadable (")
    assert warning.endswith("); decoding again")
    # Rewritten whole, in the same place.
    assert np.load(entry / "train_images.npy").shape == (12, 3, 32, 32)
    assert not list(cache.glob(".*"))


@pytest.mark.parametrize("cache_dir", [None, ""])
def test_no_cache_dir_never_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   cache_dir: str | None) -> None:
    root = tmp_path / "cifar"
    write_pack(root)
    monkeypatch.chdir(tmp_path)  # a relative path would land here
    before = sorted(tmp_path.rglob("*"))
    calls = count_decodes(monkeypatch)
    cifar10(str(root), cache_dir=cache_dir)
    cifar10(str(root), cache_dir=cache_dir)
    assert calls == [12, 5, 12, 5]  # decoded on every call
    assert sorted(tmp_path.rglob("*")) == before


def test_a_disk_that_refuses_costs_a_warning_not_the_run(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    root = tmp_path / "cifar"
    pixels = write_pack(root)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        ds = cifar10(str(root), cache_dir=str(blocker))
    assert np.array_equal(ds.test.images.numpy(), pixels["test"][0])
    (warning,) = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"cifar10: cannot cache decoded images in {blocker} (")


def test_write_leaves_the_first_finished_copy(tmp_path: Path) -> None:
    # Two processes decoding the same data both write; the second rename finds the first's
    # finished copy, keeps it and removes its own temp folder.
    path = decoded.folder(str(tmp_path), "cifar10", "k")
    assert path == tmp_path / "cifar10-k" and decoded.folder(None, "cifar10", "k") is None
    splits = {s: datasets.Split(torch.full((2, 3, 4, 4), v, dtype=torch.uint8), torch.arange(2))
              for s, v in (("train", 1), ("test", 2))}
    decoded.write(path, splits, {"classes": ["a", "b"]})
    later = {s: datasets.Split(torch.full((2, 3, 4, 4), 9, dtype=torch.uint8), torch.arange(2))
             for s in ("train", "test")}
    decoded.write(path, later, {"classes": ["a", "b"]})
    assert [p.name for p in tmp_path.iterdir()] == ["cifar10-k"]
    loaded, meta = decoded.load(path)
    assert loaded["train"].images.unique().tolist() == [1]
    assert meta == {"classes": ["a", "b"], "counts": {"train": 2, "test": 2},
                    "created": meta["created"]}
    # Labels that disagree with the inputs' make the cache stale: None, and it is removed.
    assert decoded.load(path, {"train": np.array([1, 0]), "test": np.array([0, 1])}) is None
    assert not list(tmp_path.iterdir())


def test_a_load_marks_the_cache_used_except_read_only(tmp_path: Path) -> None:
    # `kd store prune --older-than` ages a decoded cache from its last use: meta.json's mtime.
    path = tmp_path / "cifar10-k"
    splits = {s: datasets.Split(torch.zeros((2, 3, 4, 4), dtype=torch.uint8), torch.arange(2))
              for s in ("train", "test")}
    decoded.write(path, splits, {})
    meta = path / "meta.json"
    old = meta.stat().st_mtime - 30 * 86400
    os.utime(meta, (old, old))
    with decoded.read_only():  # `kd export` writes nothing outside its own folders
        assert decoded.load(path) is not None
    assert meta.stat().st_mtime == old
    assert decoded.load(path) is not None
    assert meta.stat().st_mtime > old + 29 * 86400


def test_a_view_is_written_as_the_copy_of_its_rows(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A view (rows of a base, as subsample and hold_out give) is written a chunk at a time,
    # never gathered whole, into exactly the files np.save writes for the copy of its rows.
    monkeypatch.setattr(datasets, "CHUNK_ROWS", 2)
    base = torch.randint(0, 256, (9, 3, 4, 4), dtype=torch.uint8)
    whole = datasets.Split(base, torch.arange(9))
    views = {"train": whole.select(torch.tensor([7, 2, 4, 8, 0])),
             "test": whole.select(torch.tensor([1]))}
    copies = {s: datasets.Split(v.images.contiguous(), v.labels) for s, v in views.items()}
    with monkeypatch.context() as patch:
        forbid_gathering_views(patch)
        decoded.write(tmp_path / "views", views, {})
    decoded.write(tmp_path / "copies", copies, {})
    for name in ("train_images.npy", "test_images.npy", "train_labels.npy", "meta.json"):
        assert ((tmp_path / "views" / name).read_bytes()
                == (tmp_path / "copies" / name).read_bytes())
    loaded, _ = decoded.load(tmp_path / "views")
    assert torch.equal(loaded["train"].images, base[[7, 2, 4, 8, 0]])


def test_under_torchrun_rank0_decodes_first_and_the_others_load_its_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    root = tmp_path / "cifar"
    write_pack(root)
    node = OmegaConf.create({"name": "cifar10", "loader": {
        "_target_": "kdcli.data.datasets.cifar10", "root": str(root),
        "cache_dir": str(tmp_path / "cache")}})
    # Two ranks replayed in one process, waiting on a shared key-value store as in torchrun.
    store = dist.HashStore()
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", lambda: store)
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "_on_main_calls", itertools.count())
    monkeypatch.setattr(distributed, "is_main", lambda: True)
    calls = count_decodes(monkeypatch)
    main = load_dataset(node)
    assert calls == [12, 5]
    assert store.check(["kd/on_main/0"])  # the other ranks were let go only now
    monkeypatch.setattr(distributed, "_on_main_calls", itertools.count())
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    monkeypatch.setattr(datasets, "_decode_jpegs", no_decoding)
    other = load_dataset(node)
    assert other.fingerprint() == main.fingerprint() and other.name == "cifar10"
