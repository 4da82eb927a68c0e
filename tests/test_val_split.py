"""`dataset.val_size`: a validation split held out of train, so best.pt is not chosen on test.

Without it every epoch is evaluated, and best.pt chosen, on the test split the report then
measures: the figures of best.pt are chosen on the data they are measured on. These tests pin
what the held-out split is (stratified, disjoint, deterministic, after `train_size`), that each
epoch is evaluated on it and best.pt chosen by it, that the cache and the student agree on the
training rows, that the report says which split chose best.pt, and that a run without it keeps
every store key it had, so existing store entries are reused.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

from kdcli import checkpoint, device, engine
from kdcli.data.datasets import Dataset, Split, cifar10_subset, hold_out, subsample
from kdcli.errors import ConfigError
from kdcli.report import write_report
from kdcli.schema import validate
from kdcli.stages import cache as cache_stage
from kdcli.stages import student as student_stage
from kdcli.stages import teacher as teacher_stage
from kdcli.stages.common import Context, build_context, dataset_inputs, load_dataset
from kdcli.stages.pipeline import objective
from kdcli.store import Store
from tests.conftest import SMOKE, TINY, kd, read_report
from tests.test_report import sample_report

# Small enough to train in seconds: 128 train images (val is held out of these), 64 test.
SMALL = ["trainer.teacher.epochs=1", "trainer.student.epochs=1", "dataset.train_size=128",
         "dataset.test_size=64"]


def _config(tmp: Path, *overrides: str) -> DictConfig:
    with initialize_config_module(config_module="kdcli.configs", version_base="1.3"):
        return compose(config_name="kd_train", overrides=[
            *SMOKE, f"store={tmp / 'store'}", *overrides])


def _context(tmp: Path, *overrides: str) -> Context:
    return build_context(_config(tmp, *overrides), run_dir=tmp / "run")


def _rows(images: torch.Tensor) -> list[bytes]:
    return [hashlib.sha256(img.numpy().tobytes()).digest() for img in images]


# --- the split --------------------------------------------------------------------------------

def test_held_out_split_is_stratified_disjoint_and_deterministic(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "dataset.val_size=64")
    held = load_dataset(cfg.dataset, seed=0)
    # Held out of what train_size left (the smoke preset's 512 images), not of all 5,000.
    before = subsample(cifar10_subset(), 512, 256, seed=0)
    assert (len(held.train), len(held.val), len(held.test)) == (448, 64, 256)
    # Views of one base, the loaded train images: rows selected, no pixel copied.
    assert held.val.base is held.train.base and held.train.rows is not None
    assert torch.equal(held.test.images, before.test.images)
    index = {row: i for i, row in enumerate(_rows(before.train.images))}
    assert len(index) == 512  # no duplicate images, so a row's bytes name it
    train_rows = [index[r] for r in _rows(held.train.images)]
    val_rows = [index[r] for r in _rows(held.val.images)]
    assert not set(train_rows) & set(val_rows)
    assert sorted(train_rows + val_rows) == list(range(512))
    # Both keep the train split's order, and every image its label.
    assert train_rows == sorted(train_rows) and val_rows == sorted(val_rows)
    assert held.train.labels.tolist() == before.train.labels[train_rows].tolist()
    assert held.val.labels.tolist() == before.train.labels[val_rows].tolist()
    # Stratified: each class gives its proportional share, rounded one way or the other.
    counts = torch.bincount(before.train.labels, minlength=10).tolist()
    taken = torch.bincount(held.val.labels, minlength=10).tolist()
    for c, k in zip(counts, taken, strict=True):
        assert int(64 * c / 512) <= k <= int(64 * c / 512) + 1
    # Deterministic given the seed; another seed holds out other images.
    again = load_dataset(cfg.dataset, seed=0)
    assert torch.equal(again.val.images, held.val.images)
    assert torch.equal(again.train.images, held.train.images)
    other = hold_out(before, 64, seed=1)
    assert set(_rows(other.val.images)) != set(_rows(held.val.images))


def test_every_class_keeps_a_training_image() -> None:
    # Class 0 has one image, class 1 two: a proportional share would take some of each.
    labels = torch.tensor([0] + [1] * 2 + [2] * 20)
    images = torch.arange(23, dtype=torch.uint8).view(23, 1, 1, 1).expand(23, 3, 2, 2)
    ds = Dataset("d", Split(images.contiguous(), labels), Split(images[:3].contiguous(),
                 labels[:3]), ["a", "b", "c"])
    held = hold_out(ds, 20)
    assert torch.bincount(held.train.labels).tolist() == [1, 1, 1]
    assert torch.bincount(held.val.labels, minlength=3).tolist() == [0, 1, 19]
    assert hold_out(ds, 0) is ds and ds.val is None


@pytest.mark.parametrize("val_size, message", [
    (128, "dataset.val_size=128 would hold out the whole train split (128 images); choose at "
          "most 118, so every class keeps a training image"),
    (119, "dataset.val_size=119 leaves 9 training images for 10 classes; choose at most 118, "
          "so every class keeps a training image"),
])
def test_a_val_size_that_leaves_a_class_without_training_images_is_refused(
        tmp_path: Path, val_size: int, message: str) -> None:
    cfg = _config(tmp_path, *SMALL, f"dataset.val_size={val_size}")
    with pytest.raises(ConfigError) as err:
        load_dataset(cfg.dataset, seed=0)
    assert str(err.value) == message


def test_a_negative_val_size_is_refused_by_the_config_check(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        validate(_config(tmp_path, "dataset.val_size=-1"))
    assert str(err.value) == "config: dataset.val_size: must be null or >= 0, got -1"
    validate(_config(tmp_path, "dataset.val_size=0"))  # 0 = off, e.g. in a sweep


def test_a_too_large_val_size_fails_the_run_before_any_stage(tmp_path: Path) -> None:
    proc = kd("train", *TINY, "dataset.val_size=128", f"store={tmp_path / 'store'}",
              f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.endswith("error: dataset.val_size=128 would hold out the whole train "
                                "split (128 images); choose at most 118, so every class keeps "
                                "a training image\n")
    stages = ("teacher", "cache", "pretrain", "student", "baseline")
    assert [s for s in stages if (tmp_path / "store" / s).exists()] == []


# --- views: the held-out split selects rows, no pixel is copied ---------------------------------

def _hashes_before_views(ds: Dataset) -> dict[str, str]:
    """Dataset.fingerprint and Split.fingerprint as kd computed them when subsample and
    hold_out copied the selected rows: each split's copied images hashed whole."""
    def copy(split: Split) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(split.images.numpy()), split.labels.numpy()

    h = hashlib.blake2b(digest_size=16)
    for split in (ds.train, ds.test):
        images, labels = copy(split)
        h.update(images.data)
        h.update(np.ascontiguousarray(labels).data)
    h.update("\n".join(ds.classes).encode())
    if ds.val is not None:
        images, labels = copy(ds.val)
        h.update(b"\0val\0")
        h.update(images.data)
        h.update(np.ascontiguousarray(labels).data)
    hashes = {"dataset": h.hexdigest()}
    for name in ("train", "val", "test"):
        if getattr(ds, name) is not None:
            images, labels = copy(getattr(ds, name))
            s = hashlib.sha256(f"kd-split\0{images.dtype}\0{images.shape}\n".encode())
            s.update(images.data)
            s.update(np.ascontiguousarray(labels, dtype=np.int64).data)
            hashes[name] = s.hexdigest()
    return hashes


@pytest.mark.parametrize("train_size, val_size", [(None, 600), (4500, 300), (4500, 0)])
def test_views_hash_as_the_copies_they_replaced(train_size: int | None, val_size: int) -> None:
    """Store keys (the dataset fingerprint) and report.json's test fingerprint of a run with
    dataset.val_size or train_size are what they were when the splits were copies, so the
    store entries of earlier such runs are reused."""
    from kdcli.data.datasets import CHUNK_ROWS

    ds = cifar10_subset()
    if train_size is not None:
        ds = subsample(ds, train_size, 700, seed=0)
    ds = hold_out(ds, val_size, seed=0)
    assert ds.train.rows is not None and len(ds.train) > CHUNK_ROWS  # hashed in two chunks
    before = _hashes_before_views(ds)
    assert ds.fingerprint() == before["dataset"]
    for name in ("train", "val", "test"):
        if getattr(ds, name) is not None:
            assert getattr(ds, name).fingerprint() == before[name], name


def test_held_out_splits_keep_the_memory_mapped_images(tmp_path: Path) -> None:
    """subsample then hold_out on a dataset memory-mapped from the decoded-image cache: every
    split reads the mapped file itself (rows of rows), as do the loaders over them, so the
    pages stay shared between torchrun ranks; the pixels are those of the in-memory chain."""
    from kdcli.data import decoded
    from kdcli.data.loader import BatchLoader
    from tests.conftest import mapped_files

    ds = cifar10_subset()
    decoded.write(tmp_path / "cache", {"train": ds.train, "test": ds.test}, {})
    splits, _ = decoded.load(tmp_path / "cache")
    mapped = {name: split.base for name, split in splits.items()}
    assert str(tmp_path / "cache" / "train_images.npy") in mapped_files(
        mapped["train"].data_ptr())
    held = hold_out(subsample(Dataset("m", splits["train"], splits["test"], ds.classes), 4000,
                              500, seed=0), 400, seed=0)
    for name, split in (("train", held.train), ("val", held.val), ("test", held.test)):
        assert split.base is mapped["test" if name == "test" else "train"], name
        assert (split.base.untyped_storage().data_ptr()
                == mapped["test" if name == "test" else "train"].untyped_storage().data_ptr())
    expected = hold_out(subsample(ds, 4000, 500, seed=0), 400, seed=0)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(held, name).images, getattr(expected, name).images), name
        assert torch.equal(getattr(held, name).labels, getattr(expected, name).labels), name
    kw = {"device": torch.device("cpu"), "mean": ds.mean, "std": ds.std, "shuffle": True}
    for resident in (True, False):
        loader = BatchLoader(held.val, 64, resident=resident, **kw)
        assert loader.images is mapped["train"]
        batch = next(iter(loader))
        again = next(iter(BatchLoader(expected.val, 64, resident=resident, **kw)))
        assert torch.equal(batch.index, again.index) and torch.equal(batch.images, again.images)


def test_a_run_with_val_size_never_gathers_a_held_out_split_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every reader of the train, val and test views (the loaders, the cache and its check,
    the fingerprints, the report) goes through their rows: none gathers a view into a copy."""
    from kdcli.stages import pipeline
    from tests.conftest import forbid_gathering_views

    ctx = _context(tmp_path, *SMALL, "dataset.val_size=40", "cache.views=2", "cache.check=8")
    assert all(s.rows is not None for s in (ctx.dataset.train, ctx.dataset.val,
                                            ctx.dataset.test))
    forbid_gathering_views(monkeypatch)
    report = pipeline.run(ctx)
    assert report["best_pt"] == {"split": "val", "images": 40}
    assert report["cache"]["num_samples"] == 88


# --- training ---------------------------------------------------------------------------------

def _split_of(ds: Dataset, labels: torch.Tensor) -> str:
    for name in ("val", "test", "train"):
        split = getattr(ds, name)
        if split is not None and torch.equal(split.labels, labels.cpu()):
            return name
    raise AssertionError("a loader over no split of the dataset")


@pytest.mark.parametrize("overrides, per_epoch", [
    (["dataset.val_size=40"], "val"),
    ([], "test"),  # as before val_size: the test split
])
def test_each_epoch_is_evaluated_and_best_pt_chosen_on_the_val_split(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: list[str],
        per_epoch: str) -> None:
    ctx = _context(tmp_path, *SMALL, "trainer.teacher.epochs=2", *overrides)
    ds = ctx.dataset
    seen: list[str] = []
    real = engine.predict

    def predict(model, loader, runtime, view=None):
        seen.append(_split_of(ds, loader.labels))
        logits, labels = real(model, loader, runtime, view)
        if len(seen) <= 2:  # each epoch's evaluation: all right in epoch 1, all wrong in 2
            logits = torch.nn.functional.one_hot((labels + len(seen) - 1) % 10, 10).float()
        return logits, labels

    monkeypatch.setattr(engine, "predict", predict)
    result = teacher_stage.run(ctx)
    # Two epochs evaluated on the selection split, then the final metrics on the test split.
    assert seen == [per_epoch, per_epoch, "test"]
    best = checkpoint.load(result["entry"].file("best.pt"))
    assert (best["epoch"], best["val_top1"], best["val_split"]) == (0, 100.0, per_epoch)
    with open(result["entry"].file("metrics.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["val_split"], float(r["val/top1"])) for r in rows] == [(per_epoch, 100.0),
                                                                      (per_epoch, 0.0)]
    # The stage's own metrics stay the test split's.
    saved = checkpoint.load(result["entry"].file("test_logits.pt"))
    assert torch.equal(saved["labels"], ds.test.labels)


def test_cache_rows_are_the_training_rows(tmp_path: Path) -> None:
    """The cache covers the reduced train split: row i holds the teacher's logits for the
    training sample with index i, the index the student's loader looks them up by."""
    ctx = _context(tmp_path, *SMALL, "dataset.val_size=40", "cache.views=2")
    assert len(ctx.dataset.train) == 88
    teachers = teacher_stage.run_all(ctx)
    cache = cache_stage.run(ctx, teachers)
    assert cache["meta"]["num_samples"] == 88
    assert cache_stage.open_split(cache, "test").num_samples == 64
    # Every cached (sample, view), replayed through the teacher from the reduced train split.
    cache_stage.check(ctx, teachers, cache, samples=88)
    served = student_stage.CachedTeacher(cache, ctx.runtime)
    loader = ctx.loader("train", 32, train=True, views=served.views)
    assert loader.num_samples == 64  # 88 in whole batches of 32


def test_torchrun_ranks_share_the_reduced_train_split_and_rank0_evaluates_val(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = OmegaConf.create({"seed": 0, "dataset": {"augment": "crop_flip"},
                            "trainer": {"eval_batch_size": 16}})
    runtime = device.resolve(OmegaConf.create({"type": "cpu", "precision": "fp32",
                                               "channels_last": False, "threads": None}))
    labels = torch.arange(40) % 4
    ds = Dataset("d", Split(torch.zeros(40, 3, 4, 4, dtype=torch.uint8), labels),
                 Split(torch.zeros(8, 3, 4, 4, dtype=torch.uint8), labels[:8]), list("abcd"))
    ctx = Context(cfg, runtime, hold_out(ds, 8), Store(tmp_path), tmp_path)
    assert ctx.selection_split == "val"
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, "4")
    monkeypatch.setenv("RANK", "1")
    train = ctx.loader("train", 8, train=True)
    assert (len(train.labels), train.batch_size, train.rank, train.world_size) == (32, 2, 1, 4)
    val = ctx.eval_loader("val")  # whole, as the test split is
    assert (len(val.labels), val.world_size, val.rank) == (8, 1, 0)


def test_torchrun_trains_on_the_rest_of_train_and_chooses_best_pt_on_val(tmp_path: Path) -> None:
    """Two ranks on the CPU: each derives the same split from the seed, they share the 448
    training images (7 global batches of 64), rank 0 evaluates the 64 held out."""
    from tests.test_distributed import TORCHRUN_KD, torchrun_env

    cmd = [*TORCHRUN_KD, "train", *SMOKE, "dataset.val_size=64", "baseline=false",
           "trainer.teacher.epochs=1", "trainer.student.epochs=1", "hydra.run.dir=run",
           "store=store"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=torchrun_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = read_report(tmp_path / "run")
    assert report["best_pt"] == {"split": "val", "images": 64}
    assert report["cache"]["num_samples"] == 448
    log = (tmp_path / "run" / "train.log").read_text()
    for stage in ("teacher tiny_cnn-wide", "student"):
        assert (f"{stage}: data parallel over 2 ranks, 32 images per rank and step (global batch "
                "64), 7 steps per epoch") in log
        assert log.count(f"{stage} epoch 1/1") == 1  # rank 0 alone evaluates and logs
    with open(tmp_path / "run" / "metrics" / "student.csv") as fh:
        assert [r["val_split"] for r in csv.DictReader(fh)] == ["val"]


# --- store keys ---------------------------------------------------------------------------------

def _stage_keys(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The store keys of the teacher, cache, student and baseline, nothing trained or read."""
    monkeypatch.setattr(student_stage, "train_entry", lambda ctx, entry, **_: {"entry": entry})
    monkeypatch.setattr(student_stage, "CachedTeacher", lambda cache, runtime: SimpleNamespace(
        views=None, lookup=SimpleNamespace(storage="full")))
    teacher = teacher_stage.entry_for(ctx)
    teachers = [{"entry": teacher, "meta": {"files": {"last.pt": "0" * 64}}, "ctx": ctx}]
    cache = cache_stage.entry_for(ctx, teachers)
    student = student_stage.run(ctx, {"entry": cache}, teachers)["entry"]
    baseline = student_stage.run_baseline(ctx, teachers)["entry"]
    return {"teacher": teacher.key, "cache": cache.key, "student": student.key,
            "baseline": baseline.key}


def test_without_val_size_every_store_key_is_what_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain, zero = _context(tmp_path), _context(tmp_path, "dataset.val_size=0")
    held = _context(tmp_path, "dataset.val_size=64")
    # The dataset's part of every key, as kd wrote it before val_size existed: the fingerprint
    # hashes train then test (images, labels) then the class names.
    ds = plain.dataset
    h = hashlib.blake2b(digest_size=16)
    for split in (ds.train, ds.test):
        h.update(split.images.numpy().tobytes())
        h.update(split.labels.numpy().tobytes())
    h.update("\n".join(ds.classes).encode())
    before = {"fingerprint": h.hexdigest(), "augment": "crop_flip", "train_size": 512,
              "test_size": 256}
    assert dataset_inputs(plain) == dataset_inputs(zero) == before
    assert plain.dataset.val is None and zero.dataset.val is None
    keys = _stage_keys(plain, monkeypatch)
    assert _stage_keys(zero, monkeypatch) == keys
    # With a validation split every stage trains on other data: each gets a key of its own.
    assert dataset_inputs(held)["val_size"] == 64
    assert dataset_inputs(held)["fingerprint"] != before["fingerprint"]
    held_keys = _stage_keys(held, monkeypatch)
    assert all(held_keys[stage] != keys[stage] for stage in keys)


# --- the report -------------------------------------------------------------------------------

def test_report_says_the_val_split_chose_best_pt(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_report import drawn_figures, write_histories

    figures = drawn_figures(monkeypatch)
    report = {**sample_report(), "best_pt": {"split": "val", "images": 5000}}
    report["dataset"] = {**report["dataset"], "train_size": 45000, "val_size": 5000}
    write_report(report, tmp_path, histories=write_histories(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert ("of each model's final weights (`last.pt`; `best.pt` is the epoch with the best "
            "top-1 on the 5000-image validation split held out of train, so the test split "
            "played no part in choosing it)") in md
    assert "best test top-1" not in md
    assert "45000 train, 5000 validation (held out of train), 1000 test images" in md
    titles = [ax.get_title() for ax in figures["training_curves.png"].axes]
    assert titles == ["Training loss", "Validation top-1 per epoch"]
    assert json.loads((tmp_path / "report.json").read_text())["best_pt"] == {
        "split": "val", "images": 5000}


def test_report_without_val_split_says_the_test_split_chose_best_pt(tmp_path: Path) -> None:
    write_report({**sample_report(), "best_pt": {"split": "test", "images": 1000}}, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert ("`best.pt` is the epoch with the best test top-1, so its figures are chosen on the "
            "test split; `dataset.val_size=N` chooses it on N images held out of train "
            "instead") in md


def test_a_run_with_val_size_end_to_end(tmp_path: Path) -> None:
    run, store = tmp_path / "run", f"store={tmp_path / 'store'}"
    kd("train", *TINY, "dataset.val_size=32", store, f"hydra.run.dir={run}", cwd=tmp_path)
    report = read_report(run)
    assert report["best_pt"] == {"split": "val", "images": 32}
    assert (report["dataset"]["train_size"], report["dataset"]["val_size"],
            report["dataset"]["test_size"]) == (96, 32, 64)
    assert report["cache"]["num_samples"] == 96
    # A sweeper maximises the final student's validation top-1, not its test top-1.
    with open(run / "metrics" / "student.csv") as fh:
        last = list(csv.DictReader(fh))[-1]
    assert report["student"]["val_top1"] == pytest.approx(float(last["val/top1"]))
    assert objective(report) == report["student"]["val_top1"]
    assert objective({**report, "best_pt": {"split": "test", "images": 64}}) == \
        report["student"]["top1"]
    assert "best top-1 on the 32-image validation split held out of train" in (
        run / "report.md").read_text()
    for stage in ("teacher", "student"):
        with open(run / "metrics" / f"{stage}.csv") as fh:
            assert [r["val_split"] for r in csv.DictReader(fh)] == ["val"]
        assert checkpoint.load(run / "checkpoints" / stage / "best.pt")["val_split"] == "val"
    # kd eval on the validation split gives the figure best.pt was chosen by.
    best = run / "checkpoints" / "student" / "best.pt"
    kd("eval", *TINY, "dataset.val_size=32", "split=val", f"checkpoint={best}",
       f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["top1"] == pytest.approx(checkpoint.load(best)["val_top1"])
    proc = kd("eval", *TINY, "split=val", f"checkpoint={best}",
              f"hydra.run.dir={tmp_path / 'eval2'}", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert ("error: dataset cifar10_subset has no val split; set dataset.val_size=N to hold N "
            "images out of train") in proc.stderr
