"""Augmentation, the batch loader and the dataset loaders."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from kdcli.data.datasets import Dataset, Split, cifar10, cifar10_subset, subsample
from kdcli.data.loader import BatchLoader
from kdcli.data.transforms import CropFlip, CropFlipParams, build_augment
from kdcli.errors import ConfigError, DataError

CPU = torch.device("cpu")
# mean 0 and std 1/255 leave pixel values unchanged, so a batch can be read back as uint8 values.
IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1 / 255, 1 / 255, 1 / 255)}


def images(n: int, h: int = 5, w: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def constant_split(n: int, size: int = 4) -> Split:
    """Image i is filled with the value i and labelled i."""
    imgs = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size)
    return Split(imgs.contiguous(), torch.arange(n))


# --- batch size against the training split ----------------------------------------------------


def test_batch_that_drops_much_of_a_small_split_is_warned(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    # 352 images at batch 128: 2 steps, 96 images (27 %) left out of every epoch, unnoticed.
    from types import SimpleNamespace

    from kdcli.stages.common import check_batch_size

    def warned(n: int, batch_size: int) -> list[str]:
        caplog.clear()
        ctx = SimpleNamespace(dataset=SimpleNamespace(train=constant_split(n)))
        with caplog.at_level("WARNING", logger="kdcli.stages.common"):
            assert check_batch_size(ctx, "student", batch_size) == n // batch_size
        return [r.getMessage() for r in caplog.records]

    assert warned(352, 128) == [
        "trainer.student.batch_size=128 leaves 96 of the 352 training images (27%) out of each "
        "epoch (2 step(s); the last partial batch is dropped, other images each epoch): lower "
        "trainer.student.batch_size, or set one that divides the split, to train on more of "
        "them"]
    assert warned(352, 88) == []  # divides it
    assert warned(5000, 128) == []  # 8 images, 0.2 %
    with pytest.raises(ConfigError, match="trainer.student.batch_size=128 is larger than"):
        warned(100, 128)
    assert caplog.records == []  # the error alone, not a warning about dropping 100 % first


# --- CropFlip ---------------------------------------------------------------------------------

def test_crop_equals_manual_crop_of_padded_image():
    x = images(3)
    aug = CropFlip(padding=2)
    no_flip = torch.zeros(3, dtype=torch.bool)
    params = CropFlipParams(torch.tensor([[0, 0], [2, 2], [4, 1]]), no_flip)
    out = aug.apply(x, params)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    padded = torch.zeros(3, 3, 9, 10, dtype=torch.uint8)
    padded[:, :, 2:7, 2:8] = x
    for i, (dy, dx) in enumerate(params.offsets.tolist()):
        torch.testing.assert_close(out[i], padded[i, :, dy:dy + 5, dx:dx + 6])
    # Offset (2, 2) is the unshifted image; offset (0, 0) shifts it down-right by 2, zero-filled.
    torch.testing.assert_close(out[1], x[1])
    assert (out[0, :, :2] == 0).all() and (out[0, :, :, :2] == 0).all()
    torch.testing.assert_close(out[0, :, 2:, 2:], x[0, :, :3, :4])


def test_flip_equals_flip_of_crop():
    x = images(2)
    aug = CropFlip(padding=2)
    offsets = torch.tensor([[1, 3], [4, 0]])
    plain = aug.apply(x, CropFlipParams(offsets, torch.tensor([False, False])))
    flipped = aug.apply(x, CropFlipParams(offsets, torch.tensor([True, False])))
    torch.testing.assert_close(flipped[0], plain[0].flip(-1))
    torch.testing.assert_close(flipped[1], plain[1])


def test_no_padding_flip_only():
    x = images(2)
    aug = CropFlip(padding=0)
    params = CropFlipParams(torch.zeros(2, 2, dtype=torch.long), torch.tensor([True, False]))
    out = aug.apply(x, params)
    torch.testing.assert_close(out, torch.stack([x[0].flip(-1), x[1]]))


def test_sample_is_deterministic_and_in_range():
    aug = CropFlip(padding=4)
    a = aug.sample(64, torch.Generator().manual_seed(3))
    b = aug.sample(64, torch.Generator().manual_seed(3))
    c = aug.sample(64, torch.Generator().manual_seed(4))
    assert torch.equal(a.offsets, b.offsets) and torch.equal(a.flips, b.flips)
    assert not torch.equal(a.offsets, c.offsets)
    assert a.offsets.shape == (64, 2)
    assert a.offsets.min() >= 0 and a.offsets.max() <= 8
    assert 0 < a.flips.sum() < 64
    assert not CropFlip(4, flip=False).sample(64, torch.Generator().manual_seed(3)).flips.any()


def test_call_replays_sampled_params():
    x = images(4)
    aug = CropFlip(padding=3)
    out = aug(x, torch.Generator().manual_seed(5))
    params = aug.sample(4, torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, aug.apply(x, params))


def test_augment_presets():
    assert build_augment(None) is None and build_augment("none") is None
    assert build_augment("crop_flip").padding == 4
    assert build_augment("flip").padding == 0
    with pytest.raises(ConfigError, match="crop_flip"):
        build_augment("mixup")


# --- BatchLoader ------------------------------------------------------------------------------

def test_epoch_is_a_permutation():
    loader = BatchLoader(constant_split(50), 8, device=CPU, shuffle=True, seed=1, **IDENTITY)
    batches = list(loader.epoch(0))
    assert [len(b.index) for b in batches] == [8] * 6 + [2]
    assert len(loader) == 7
    index = torch.cat([b.index for b in batches])
    assert sorted(index.tolist()) == list(range(50))
    assert index.tolist() != list(range(50))
    # Images and labels are the rows the index names (image i holds value i).
    for b in batches:
        torch.testing.assert_close(b.labels, b.index)
        torch.testing.assert_close(b.images[:, 0, 0, 0], b.index.float())


@pytest.mark.parametrize("views", [False, True])
def test_host_resident_batches_equal_device_resident_ones(views):
    # resident=False gathers each batch where the images are (host memory, a memory-mapped
    # file) and copies it over; the batches must be exactly the resident path's.
    from kdcli.data.transforms import ViewTable

    split = Split(images(40, 8, 8), torch.arange(40) % 10)
    augment = CropFlip(2)
    table = ViewTable.sample(augment, 40, 3, seed=5) if views else None
    kw = dict(device=CPU, shuffle=True, seed=3, augment=augment, drop_last=True, views=table,
              mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    resident = BatchLoader(split, 8, **kw)
    host = BatchLoader(split, 8, resident=False, **kw)
    assert host.images is split.images  # not copied
    for epoch in (0, 1):
        pairs = list(zip(resident.epoch(epoch), host.epoch(epoch), strict=True))
        assert len(pairs) == 5
        for a, b in pairs:
            assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.images, b.images)
            assert (a.view is None) == (not views) and (not views or torch.equal(a.view, b.view))


def test_no_shuffle_keeps_order():
    loader = BatchLoader(constant_split(10), 4, device=CPU, **IDENTITY)
    assert torch.cat([b.index for b in loader]).tolist() == list(range(10))


@pytest.mark.parametrize("resident", [True, False])
def test_an_in_order_pass_reads_slices_that_equal_the_rows_and_leave_the_split_alone(resident):
    # An unshuffled single-process pass (evaluation, the cache stage) reads each batch as a
    # slice of the images in place: its batches must be the rows a gather gives, with and
    # without replayed views, and writing to a batch must not write to the split.
    from kdcli.data.transforms import ViewTable

    split = Split(images(21, 8, 8), torch.arange(21) % 10)
    before = split.images.clone()
    augment = CropFlip(2)
    table = ViewTable.sample(augment, 21, 2, seed=5)
    kw = dict(device=CPU, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), resident=resident)
    for loader, view in ((BatchLoader(split, 8, **kw), None),
                         (BatchLoader(split, 8, augment=augment, views=table, **kw), 1)):
        batches = list(loader.epoch(0, view=view))
        assert [len(b.index) for b in batches] == [8, 8, 5]
        index = torch.cat([b.index for b in batches])
        assert index.tolist() == list(range(21))
        assert torch.equal(torch.cat([b.labels for b in batches]), split.labels)
        rows = split.images
        if view is not None:
            rows = augment.apply(rows, table.select(index, torch.full((21,), view)))
        expected = loader.normalise(rows)
        assert torch.equal(torch.cat([b.images for b in batches]), expected)
        for b in batches:
            b.images.zero_()
        assert torch.equal(split.images, before)


def test_order_changes_per_epoch_and_replays_per_seed():
    aug = CropFlip(padding=1)
    a = BatchLoader(constant_split(50), 8, device=CPU, shuffle=True, seed=7, augment=aug,
                    **IDENTITY)
    b = BatchLoader(constant_split(50), 8, device=CPU, shuffle=True, seed=7, augment=aug,
                    **IDENTITY)
    other_seed = BatchLoader(constant_split(50), 8, device=CPU, shuffle=True, seed=8, **IDENTITY)
    assert not torch.equal(a.order(0), a.order(1))
    assert not torch.equal(a.order(0), other_seed.order(0))
    # A resumed run (a fresh loader) sees exactly the batches of the same epoch.
    for batch_a, batch_b in zip(a.epoch(3), b.epoch(3), strict=True):
        assert torch.equal(batch_a.index, batch_b.index)
        assert torch.equal(batch_a.images, batch_b.images)


def test_drop_last():
    loader = BatchLoader(constant_split(10), 4, device=CPU, shuffle=True, drop_last=True,
                         **IDENTITY)
    sizes = [len(b.index) for b in loader]
    assert sizes == [4, 4] and len(loader) == 2


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
def test_num_samples_counts_what_an_epoch_yields(drop_last, rank, world):
    loader = BatchLoader(constant_split(23), 4, device=CPU, shuffle=True, drop_last=drop_last,
                         rank=rank, world_size=world, **IDENTITY)
    assert loader.num_samples == sum(len(b.index) for b in loader.epoch(0))


@pytest.mark.parametrize("flush_rows", [5, 16, 1000])
def test_predict_returns_every_samples_logits_and_label_in_order(monkeypatch, flush_rows):
    # One output buffer for the split, filled a chunk of batches at a time (FLUSH_ROWS rows or
    # more, so a GPU waits once per chunk), the last batch partial.
    from kdcli import engine
    from kdcli.device import Runtime

    monkeypatch.setattr(engine, "FLUSH_ROWS", flush_rows)

    split = Split(images(23, 8, 8), torch.arange(23) % 7)
    loader = BatchLoader(split, 8, device=CPU, mean=(0.5,) * 3, std=(0.2,) * 3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5)).train()
    logits, labels = engine.predict(model, loader, Runtime(CPU, "fp32", False, False))
    x = torch.cat([b.images for b in loader.epoch(0)])
    assert model.training  # left as it was
    torch.testing.assert_close(logits, model(x).detach())
    assert logits.dtype == torch.float32 and torch.equal(labels, split.labels)


def test_normalisation():
    mean, std = (0.2, 0.4, 0.6), (0.1, 0.2, 0.3)
    # 0.2 * 255 = 51, 0.4 * 255 = 102, 0.6 * 255 = 153: a mean-valued image normalises to 0.
    img = torch.tensor([51, 102, 153], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    img = img.clone()
    img[1] += torch.tensor([51, 51, 51], dtype=torch.uint8).view(3, 1, 1)  # one std-ish up
    loader = BatchLoader(Split(img, torch.zeros(2, dtype=torch.long)), 2, device=CPU, mean=mean,
                         std=std)
    out = next(iter(loader)).images
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.zeros(3, 4, 4), atol=1e-5, rtol=0)
    # +51 is 2, 1 and 2/3 standard deviations of 25.5, 51 and 76.5.
    expected = torch.tensor([2.0, 1.0, 2 / 3]).view(3, 1, 1).expand(3, 4, 4)
    torch.testing.assert_close(out[1], expected, atol=1e-5, rtol=0)


def test_memory_format():
    split = Split(images(4, 8, 8), torch.zeros(4, dtype=torch.long))
    cl = BatchLoader(split, 4, device=CPU, memory_format=torch.channels_last, **IDENTITY)
    plain = BatchLoader(split, 4, device=CPU, **IDENTITY)
    x_cl, x_plain = next(iter(cl)).images, next(iter(plain)).images
    assert x_cl.is_contiguous(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()
    assert x_plain.is_contiguous()
    torch.testing.assert_close(x_cl, x_plain)


def test_world_size_shards_are_disjoint():
    shards = [BatchLoader(constant_split(20), 3, device=CPU, shuffle=True, seed=2, rank=r,
                          world_size=2, **IDENTITY) for r in range(2)]
    seen = [torch.cat([b.index for b in s.epoch(1)]).tolist() for s in shards]
    assert len(seen[0]) == len(seen[1]) == 10
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(20))
    assert len(shards[0]) == 4  # ceil(10 / 3)


# --- datasets ---------------------------------------------------------------------------------

def test_cifar10_subset():
    ds = cifar10_subset()
    assert ds.train.images.shape == (5000, 3, 32, 32)
    assert ds.test.images.shape == (1000, 3, 32, 32)
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    assert ds.num_classes == 10 and ds.image_shape == (3, 32, 32)
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"
    assert torch.bincount(ds.train.labels).tolist() == [500] * 10
    assert torch.bincount(ds.test.labels).tolist() == [100] * 10


def test_cifar10_missing_root():
    with pytest.raises(DataError, match="/nonexistent"):
        cifar10("/nonexistent")


def write_fake_cifar(folder, per_batch: int = 2) -> dict:
    """torchvision's cifar-10-batches-py layout with `per_batch` random images per file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for i, f in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(per_batch)]
        with open(folder / f, "wb") as fh:
            pickle.dump({"data": data, "labels": labels, "batch_label": f}, fh)
        written[f] = (data, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": names, "num_vis": 3072}, fh)
    return written


@pytest.mark.parametrize("inside", [True, False])
def test_cifar10_batches_layout(tmp_path, inside):
    folder = tmp_path / "cifar-10-batches-py"
    written = write_fake_cifar(folder)
    ds = cifar10(str(tmp_path if inside else folder))
    assert ds.train.images.shape == (10, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.test.images.shape == (2, 3, 32, 32)
    assert ds.train.labels.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert ds.test.labels.tolist() == [5, 6]
    assert ds.classes[3] == "cat" and ds.num_classes == 10
    # Rows are channel-major: pixel (c, y, x) is column c * 1024 + y * 32 + x.
    data, _ = written["data_batch_2"]
    assert ds.train.images[2, 1, 3, 5].item() == data[0, 1024 + 3 * 32 + 5]
    assert ds.test.images[1, 2, 31, 31].item() == written["test_batch"][0][1, 3071]


def test_cifar10_batches_missing_file(tmp_path):
    write_fake_cifar(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        cifar10(str(tmp_path))


def small_dataset() -> Dataset:
    return Dataset("tiny", Split(images(30, 4, 4, seed=1), torch.arange(30) % 3),
                   Split(images(12, 4, 4, seed=2), torch.arange(12) % 3), ["a", "b", "c"])


def test_subsample_sizes():
    ds = small_dataset()
    small = subsample(ds, 10, 5, seed=0)
    assert len(small.train) == 10 and len(small.test) == 5
    assert small.classes == ds.classes
    # Rows are kept whole and in their original order.
    rows = [next(i for i in range(30) if torch.equal(ds.train.images[i], img))
            for img in small.train.images]
    assert rows == sorted(rows)
    assert small.train.labels.tolist() == [r % 3 for r in rows]
    assert torch.equal(subsample(ds, 10, 5, seed=0).train.images, small.train.images)
    untouched = subsample(ds, None, 100)
    assert len(untouched.train) == 30 and len(untouched.test) == 12


# --- Split views: rows of a base tensor (subsample, hold_out), no pixel copied ---------------

def test_a_view_is_its_rows_of_the_base_and_rows_of_rows_compose():
    base = images(30, 4, 4)
    split = Split(base, torch.arange(30) % 3)
    assert split.images is base and split.rows is None and split.nbytes == base.nbytes
    view = split.select(torch.tensor([3, 5, 8, 13, 21, 29]))
    inner = view.select(torch.tensor([1, 4, 5]))  # rows 5, 21 and 29 of the base
    assert view.base is base and inner.base is base  # neither copied the pixels
    assert inner.rows.tolist() == [5, 21, 29] and inner.labels.tolist() == [2, 0, 2]
    assert torch.equal(inner.images, base[[5, 21, 29]])
    assert torch.equal(inner.take(torch.tensor([2, 0])), base[[29, 5]])
    # Its size is its own rows', not the base's (what decides whether it fits on a GPU).
    assert (len(inner), inner.image_shape, inner.nbytes) == (3, (3, 4, 4), 3 * 3 * 4 * 4)
    with pytest.raises(ValueError, match="one per label"):
        Split(base, torch.arange(3), rows=torch.tensor([1, 2]))


def test_a_views_chunks_and_device_copy_are_its_rows(monkeypatch):
    from kdcli.data import datasets

    monkeypatch.setattr(datasets, "CHUNK_ROWS", 4)
    base = images(30, 4, 4)
    whole = Split(base, torch.arange(30))
    rows = torch.arange(29, 0, -3)  # 10 rows, backwards
    view = whole.select(rows)
    chunks = list(view.chunks())
    assert [len(c) for c in chunks] == [4, 4, 2] and all(c.flags.c_contiguous for c in chunks)
    assert np.array_equal(np.concatenate(chunks), base[rows].numpy())
    # A base's chunks are its own memory, not copies.
    assert all(np.shares_memory(c, base.numpy()) for c in whole.chunks())
    gathered = view.gather_to(CPU)
    assert torch.equal(gathered, base[rows]) and gathered.data_ptr() != base.data_ptr()
    assert whole.gather_to(CPU) is base


def test_a_views_fingerprint_is_its_copys(monkeypatch):
    from kdcli.data import datasets

    monkeypatch.setattr(datasets, "CHUNK_ROWS", 4)  # several chunks per split
    ds = small_dataset()
    held = subsample(ds, 20, 7, seed=1)
    copied = Dataset("tiny", *(Split(s.images.contiguous(), s.labels.clone())
                               for s in (held.train, held.test)), ds.classes)
    assert held.train.rows is not None and held.test.rows is not None
    assert held.fingerprint() == copied.fingerprint()
    assert held.test.fingerprint() == copied.test.fingerprint()
    assert held.fingerprint() != ds.fingerprint()


@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("views, world", [(False, 1), (True, 1), (False, 2)])
def test_a_loader_over_a_view_gives_its_copys_batches_without_copying(resident, views, world):
    from kdcli.data.transforms import ViewTable

    base = images(40, 8, 8)
    view = Split(base, torch.arange(40) % 10).select(
        torch.randperm(40, generator=torch.Generator().manual_seed(1))[:27].sort().values)
    copied = Split(view.images.contiguous(), view.labels.clone())
    augment = CropFlip(2)
    table = ViewTable.sample(augment, 27, 3, seed=5) if views else None
    kw = dict(device=CPU, shuffle=True, seed=3, augment=augment, drop_last=True, views=table,
              mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), resident=resident, world_size=world)
    for rank in range(world):
        over_view = BatchLoader(view, 4, rank=rank, **kw)
        assert over_view.images is base  # indexed through the rows, not gathered
        over_copy = BatchLoader(copied, 4, rank=rank, **kw)
        for epoch in (0, 1):
            pairs = list(zip(over_view.epoch(epoch), over_copy.epoch(epoch), strict=True))
            assert len(pairs) == 27 // world // 4
            for a, b in pairs:
                # index: positions in the split (what soft labels are looked up by), not rows
                assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
                assert torch.equal(a.images, b.images)


def test_fingerprint_changes_with_one_pixel():
    a, b = small_dataset(), small_dataset()
    assert a.fingerprint() == b.fingerprint()
    c = small_dataset()
    c.test.images[5, 1, 2, 3] ^= 1
    assert c.fingerprint() != a.fingerprint()
    d = small_dataset()
    d.train.labels[0] = 2
    assert d.fingerprint() != a.fingerprint()


def test_split_fingerprint_is_the_split_alone():
    # report.json records the test split's: it must follow its pixels and labels, and nothing
    # of the train split, which export does not evaluate on.
    a, b = small_dataset(), small_dataset()
    assert a.test.fingerprint() == b.test.fingerprint()
    assert len(a.test.fingerprint()) == 64  # sha256, hex
    e = small_dataset()
    e.train.images[0, 0, 0, 0] ^= 1
    e.train.labels[0] = 2
    assert e.test.fingerprint() == a.test.fingerprint()
    c = small_dataset()
    c.test.images[5, 1, 2, 3] ^= 1
    assert c.test.fingerprint() != a.test.fingerprint()
    d = small_dataset()
    d.test.labels[0] = (d.test.labels[0] + 1) % 3
    assert d.test.fingerprint() != a.test.fingerprint()
    # The same bytes in another shape are another split.
    flat = Split(a.test.images.reshape(len(a.test), 3, -1, 1), a.test.labels)
    assert flat.fingerprint() != a.test.fingerprint()
