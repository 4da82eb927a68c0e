"""Image-folder datasets (root/train/<class>/*.jpg, root/val/<class>/*.jpg) and RandomResizedCrop.

The folders are real JPEG files written from the embedded CIFAR-10 subset.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from kdcli.data import imagefolder
from kdcli.data.datasets import cifar10_subset
from kdcli.data.imagefolder import image_folder
from kdcli.data.transforms import CropFlip, RandomResizedCrop, ViewTable, build_augment
from kdcli.errors import ConfigError, DataError
from kdcli.stages import cache as cache_stage
from kdcli.stages.common import build_context, build_model
from tests.conftest import SMOKE, TINY, kd, read_report


def write_image_folder(root: Path, train_per_class: int, val_per_class: int) -> list[str]:
    """CIFAR-10 subset images as JPEG files in the ImageNet layout; returns the class names."""
    ds = cifar10_subset()
    for split, data, per_class in (("train", ds.train, train_per_class),
                                   ("val", ds.test, val_per_class)):
        counts = [0] * ds.num_classes
        for img, label in zip(data.images, data.labels.tolist(), strict=True):
            if counts[label] == per_class:
                continue
            counts[label] += 1
            folder = root / split / ds.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(
                folder / f"{counts[label]:04d}.jpg", quality=95)
    return ds.classes


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder") / "data"
    write_image_folder(root, train_per_class=8, val_per_class=3)
    return root


def _compose(tmp: Path, *overrides: str):
    with initialize_config_module(config_module="kdcli.configs", version_base="1.3"):
        return compose(config_name="kd_train", overrides=[
            *SMOKE, "dataset=imagefolder", f"store={tmp / 'store'}", *overrides])


# --- loading ------------------------------------------------------------------------------


def test_loads_the_layout_as_uint8_nchw(folder: Path) -> None:
    ds = image_folder(str(folder), image_size=32, resize=32)
    ref = cifar10_subset()
    assert ds.classes == sorted(ref.classes)  # folder names, sorted (as torchvision)
    assert ds.train.images.shape == (80, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.test.images.shape == (30, 3, 32, 32)
    assert torch.bincount(ds.train.labels).tolist() == [8] * 10
    assert ds.mean == imagefolder.IMAGENET_MEAN and ds.std == imagefolder.IMAGENET_STD
    # The first train image of the first class is CIFAR's first airplane, JPEG-compressed.
    first = ref.train.images[ref.train.labels == ref.classes.index(ds.classes[0])][0]
    assert (ds.train.images[0].float() - first.float()).abs().mean() < 6


def test_resize_then_centre_crop(tmp_path: Path) -> None:
    # 60x30 PNG whose pixel value is its column: a 30px centre crop keeps columns 15..44.
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        cols = np.tile(np.arange(60, dtype=np.uint8), (30, 1))
        Image.fromarray(np.stack([cols] * 3, -1)).save(tmp_path / split / "a" / "x.png")
    ds = image_folder(str(tmp_path), image_size=30, resize=30)
    assert ds.train.images[0, 0, 7].tolist() == list(range(15, 45))
    small = image_folder(str(tmp_path), image_size=12, resize=15)  # 60x30 -> 30x15, crop 12
    assert small.train.images.shape == (1, 3, 12, 12)
    assert small.train.images[0, 0, 0, 0] == pytest.approx(2 * 9 + 0.5, abs=2)


def test_upscaling_small_images_is_warned_on_every_load(folder: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    # 64 px images were upscaled to the default 224 px without a word: a run 5x slower, a
    # decoded cache 12x larger, and no detail gained.
    def warnings(image_size: int) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="kdcli.data.imagefolder"):
            image_folder(str(folder), image_size=image_size, cache_dir=str(tmp_path))
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    expected = [f"image folder {folder}: most images are smaller than dataset.image_size=48 "
                "(median shorter side 32 px) and are upscaled to it, which adds no detail but "
                "costs time and memory; set dataset.image_size=32 to train at their own size"]
    assert warnings(48) == expected
    assert warnings(48) == expected  # from the decoded cache
    assert warnings(32) == []


def test_skipped_files_are_counted_in_one_warning(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    # An image directly in train/ (in no class folder) and a notes.txt were skipped silently.
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / split / "cat" / "a.jpg")
    Image.new("RGB", (8, 8)).save(root / "train" / "stray.jpg")
    (root / "train" / "cat" / "notes.txt").write_text("where these came from")
    (root / "val" / "cat" / "b.gif").write_bytes(b"GIF89a")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"")  # hidden: expected, not listed
    with caplog.at_level("WARNING", logger="kdcli.data.imagefolder"):
        ds = image_folder(str(root), image_size=8)
    assert len(ds.train) == len(ds.test) == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"image folder {root}: skipped 3 file(s) that are not images in a class folder "
        f"({', '.join(imagefolder.IMG_EXTENSIONS)}): train/stray.jpg, train/cat/notes.txt, "
        "val/cat/b.gif"]


def test_sixteen_bit_images_are_scaled_to_eight_bits_and_float_ones_refused(tmp_path: Path
                                                                          ) -> None:
    # Pillow's convert("RGB") clips 16-bit greyscale at 255: the image came out solid white.
    ramp = np.tile(np.linspace(0, 65535, 16).round().astype(np.uint16), (16, 1))
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # 16-bit, as Pillow reads it
    out = imagefolder.decode(path, size=16, short=16)
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    assert out[0, :, 0].tolist() == np.rint(ramp[0] / 257).astype(int).tolist()
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DataError, match="float.tif.*floating-point image"):
        imagefolder.decode(tmp_path / "float.tif", size=16, short=16)


def test_decoded_cache_is_reused_and_follows_the_files(folder: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    write_image_folder(data, train_per_class=2, val_per_class=1)
    cache = tmp_path / "cache"
    first = image_folder(str(data), image_size=32, resize=32, cache_dir=str(cache))
    (entry,) = cache.glob("imagefolder-*")
    assert not list(cache.glob(".*")), "temp folder left behind"

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(imagefolder, "decode", no_decoding)
        again = image_folder(str(data), image_size=32, resize=32, cache_dir=str(cache))
    assert torch.equal(again.train.images, first.train.images)
    assert again.fingerprint() == first.fingerprint()

    # An edited image (new mtime and content) gives a new key: decoded again, cached apart.
    edited = next((data / "train").rglob("*.jpg"))
    Image.new("RGB", (32, 32), (255, 0, 0)).save(edited)
    os.utime(edited, ns=(1, 10**18))
    changed = image_folder(str(data), image_size=32, resize=32, cache_dir=str(cache))
    assert len(list(cache.glob("imagefolder-*"))) == 2
    assert changed.fingerprint() != first.fingerprint()

    # A damaged cache is ignored and rewritten, not fatal.
    (current,) = [p for p in cache.glob("imagefolder-*") if p != entry]
    (current / "train_images.npy").write_bytes(b"garbage")
    repaired = image_folder(str(data), image_size=32, resize=32, cache_dir=str(cache))
    assert torch.equal(repaired.train.images, changed.train.images)
    assert np.load(current / "train_images.npy").shape == (20, 3, 32, 32)


@pytest.mark.parametrize(("breakage", "message"), [
    ("missing_root", "image folder not found: {root}"),
    ("no_val", "no val/ folder \\(expected {root}/val/<class>/<images>; folders found: train\\)$"),
    # A train/ + test/ layout: the error names the key that points kd at test/.
    ("test_not_val", "no val/ folder .*folders found: test, train\\); set "
                     "dataset.loader.test_dir=test$"),
    ("other_name", "no val/ folder .*folders found: holdout, train\\); set "
                   "dataset.loader.test_dir= to one of them$"),
    # One folder of class folders: kd needs two splits, and says how to make them.
    ("flat", "image folder {root}: holds class folders \\(cat, dog\\), not the two split "
             "folders kd reads, .*kd does not split one folder\\): move some images of each "
             "class to {root}/val/<class>/ and the rest to {root}/train/<class>/"),
    ("no_classes", "no class folders"),
    ("empty_class", "no images .* in class folder\\(s\\) zebra"),
    ("class_mismatch", "only in train: zebra; only in val: none"),
    ("unreadable", "cannot read 1 of 3 images; .*\\n  {root}/train/cat/broken.jpg: "
                   "UnidentifiedImageError"),
])
def test_errors_name_the_problem(tmp_path: Path, breakage: str, message: str) -> None:
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / split / "cat" / "a.jpg")
    if breakage == "missing_root":
        root = tmp_path / "nowhere"
    elif breakage == "no_val":
        for f in (root / "val" / "cat").iterdir():
            f.unlink()
        (root / "val" / "cat").rmdir()
        (root / "val").rmdir()
    elif breakage in ("test_not_val", "other_name"):
        (root / "val").rename(root / ("test" if breakage == "test_not_val" else "holdout"))
    elif breakage == "flat":
        for split in ("train", "val"):
            (root / split / "cat" / "a.jpg").rename(root / split / "a.jpg")
            (root / split / "cat").rmdir()
        (root / "train").rename(root / "cat")
        (root / "val").rename(root / "dog")
    elif breakage == "no_classes":
        (root / "val" / "cat" / "a.jpg").rename(root / "val" / "a.jpg")
        (root / "val" / "cat").rmdir()
    elif breakage == "empty_class":
        (root / "train" / "zebra").mkdir()
        (root / "train" / "zebra" / "notes.txt").write_text("not an image")
    elif breakage == "class_mismatch":
        (root / "train" / "zebra").mkdir()
        Image.new("RGB", (8, 8)).save(root / "train" / "zebra" / "z.png")
    elif breakage == "unreadable":
        (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=message.format(root=re.escape(str(root)))):
        image_folder(str(root), image_size=8)


def test_every_unreadable_image_is_listed_in_one_error(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Decoding stopped at the first unreadable image: a folder with many bad downloads took
    # one run per file to clean up. Now every image is tried and one error lists them.
    root = tmp_path / "data"
    write_image_folder(root, train_per_class=2, val_per_class=1)  # 30 good images
    good = (root / "train" / "cat" / "0001.jpg").read_bytes()
    broken = {"train/bird/garbage.jpg": b"not an image at all",
              "train/cat/empty.png": b"",
              "train/dog/truncated.jpg": good[:len(good) // 2],
              "val/cat/garbage.jpg": b"\xff\xd8 not really a jpeg",
              "val/ship/text.webp": b"hello"}
    for rel, data in broken.items():
        (root / rel).write_bytes(data)
    tried = []
    decode = imagefolder.decode
    monkeypatch.setattr(imagefolder, "decode", lambda path, *a: tried.append(path) or decode(
        path, *a))
    monkeypatch.setattr(imagefolder, "LIST_UNREADABLE", 4, raising=False)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        image_folder(str(root), image_size=16, resize=16, cache_dir=str(cache))
    assert len(tried) == 35  # both splits, to the last image
    lines = str(err.value).splitlines()
    assert lines[0] == (f"image folder {root}: cannot read 5 of 35 images; repair, replace or "
                        f"delete them, then run again:")
    # The first four in file order (train, then val), each with PIL's reason; then a count.
    listed = [line.split(": ", 1) for line in lines[1:5]]
    assert [path for path, _ in listed] == [f"  {root / rel}" for rel in list(broken)[:4]]
    assert [reason.split(":")[0] for _, reason in listed] == [
        "UnidentifiedImageError", "UnidentifiedImageError", "OSError",
        "UnidentifiedImageError"]
    assert "truncated" in listed[2][1]
    assert lines[5:] == ["  and 1 more"]
    assert not cache.exists() or not list(cache.glob("imagefolder-*"))  # nothing cached


def test_root_is_required(tmp_path: Path) -> None:
    cfg = _compose(tmp_path)
    with pytest.raises(ConfigError, match="dataset.loader.root"):
        build_context(cfg, run_dir=tmp_path / "run")


@pytest.mark.parametrize(("student", "size", "stock_stem"), [
    ("resnet18", 224, True), ("mobilenet_v3_small", 224, True), ("resnet18", 64, False)])
def test_torchvision_models_at_imagenet_size(tmp_path: Path, student: str, size: int,
                                             stock_stem: bool) -> None:
    data = tmp_path / "data"
    write_image_folder(data, train_per_class=1, val_per_class=1)
    cfg = _compose(tmp_path, f"dataset.loader.root={data}", f"dataset.image_size={size}",
                   f"student={student}")
    ctx = build_context(cfg, run_dir=tmp_path / "run")
    assert ctx.dataset.image_shape == (3, size, size) and ctx.dataset.num_classes == 10
    model = build_model(ctx, "student")  # probes a 224px batch and checks the class count
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert (first_conv.stride == (2, 2)) is stock_stem
    assert list(Path(tmp_path / "store" / "datasets").glob("imagefolder-*/meta.json"))


# --- RandomResizedCrop -----------------------------------------------------------------------


def _images(n: int = 6, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_whole_image_box_is_the_identity_and_flip_mirrors() -> None:
    x, g = _images(), torch.Generator().manual_seed(1)
    same = RandomResizedCrop(scale=(1, 1), ratio=(1, 1), flip=False)(x, g)
    assert same.dtype == torch.uint8 and torch.equal(same, x)
    aug = RandomResizedCrop(scale=(1, 1), ratio=(1, 1), flip=True)
    params = aug.sample(len(x), g)
    out = aug.apply(x, params)
    expected = torch.where(params.flips[:, None, None, None], x.flip(-1), x)
    assert params.flips.any() and not params.flips.all()
    assert torch.equal(out, expected)


def test_box_sizes_follow_scale_and_ratio_and_fall_back_to_the_whole_image() -> None:
    g = torch.Generator().manual_seed(0)
    quarter = RandomResizedCrop(scale=(0.25, 0.25), ratio=(1, 1))
    boxes = quarter.boxes(quarter.sample(100, g), 16, 16)
    assert torch.allclose(boxes[:, 2:], torch.full((100, 2), 0.5))
    assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] <= 0.5).all()
    # An aspect ratio of 4 at full area never fits: every sample takes the whole image.
    wide = RandomResizedCrop(scale=(1, 1), ratio=(4, 4))
    assert torch.equal(wide.boxes(wide.sample(5, g), 16, 16),
                       torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 5))
    # Default settings: areas in [0.08, 1] of the image, ratios in [3/4, 4/3].
    default = RandomResizedCrop()
    b = default.boxes(default.sample(1000, g), 32, 32)
    area, ratio = b[:, 2] * b[:, 3], b[:, 2] / b[:, 3]
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 1 + 1e-6
    assert ratio.min() >= 0.75 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4


def test_crop_of_a_quarter_upsamples_that_quarter() -> None:
    # A box over the top-left (bottom-right) quarter reads only those pixels, plus the
    # neighbouring column that bilinear sampling at the box edge touches.
    aug = RandomResizedCrop(scale=(0.25, 0.25), ratio=(1, 1), flip=False)
    params = aug.sample(1, torch.Generator().manual_seed(0))
    x = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    x[..., 9:] = 200
    x[..., 9:, :] = 200
    params.position[:] = 0.0
    assert aug.apply(x, params).max() == 0
    x = torch.full((1, 3, 16, 16), 200, dtype=torch.uint8)
    x[..., :7] = 0
    x[..., :7, :] = 0
    params.position[:] = 1.0
    assert (aug.apply(x, params) == 200).all()


def test_random_resized_crop_is_deterministic_per_generator() -> None:
    x = _images(8, 24)
    a = build_augment("random_resized_crop")
    assert isinstance(a, RandomResizedCrop)
    out1 = a(x, torch.Generator().manual_seed(3))
    out2 = a(x, torch.Generator().manual_seed(3))
    assert torch.equal(out1, out2) and out1.shape == x.shape
    assert not torch.equal(out1, a(x, torch.Generator().manual_seed(4)))


def test_cached_views_need_a_replayable_augmentation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="crop_flip or flip"):
        ViewTable.sample(RandomResizedCrop(), 4, 2, seed=0)
    assert ViewTable.sample(CropFlip(), 4, 2, seed=0).k == 2
    # Refused when the cache key is computed, before a teacher is trained.
    with initialize_config_module(config_module="kdcli.configs", version_base="1.3"):
        cfg = compose(config_name="kd_train", overrides=[
            *SMOKE, "cache.views=2", "dataset.augment=random_resized_crop",
            f"store={tmp_path / 'store'}"])
    ctx = build_context(cfg, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="dataset.augment=crop_flip or flip"):
        cache_stage.num_views(ctx)


# --- end to end ------------------------------------------------------------------------------


def test_kd_train_on_an_image_folder(folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    kd("train", *SMOKE, "dataset=imagefolder", f"dataset.loader.root={folder}",
       "dataset.image_size=32", f"store={tmp_path / 'store'}", f"hydra.run.dir={run}",
       cwd=tmp_path)
    report = read_report(run)
    assert report["dataset"]["name"] == "imagefolder"
    assert report["dataset"]["num_classes"] == 10 and report["dataset"]["image_size"] == 32
    assert report["dataset"]["train_size"] == 80 and report["dataset"]["test_size"] == 30
    assert 0 <= report["student"]["top1"] <= 100
    assert list((tmp_path / "store" / "datasets").glob("imagefolder-*/meta.json"))


def test_pretraining_on_an_image_folder_through_pretrain_root(folder: Path,
                                                             tmp_path: Path) -> None:
    # dataset.loader.root names the main dataset's folder and never reached the pretraining
    # set, so pretrain.dataset=imagefolder could not be used at all.
    # The log and the report give the pretraining set's image counts, and the report says the
    # baseline started from the pretrained weights, not "from scratch".
    run = tmp_path / "run"
    proc = kd("train", *TINY, "baseline=true", "pretrain.dataset=imagefolder",
              f"pretrain.root={folder}", "pretrain.epochs=1", f"store={tmp_path / 'store'}",
              f"hydra.run.dir={run}", cwd=tmp_path)
    report = read_report(run)
    assert report["stages"]["pretrain"] == "trained"
    assert report["dataset"]["name"] == "cifar10_subset"  # the main dataset is untouched
    assert list((tmp_path / "store" / "datasets").glob("imagefolder-*/meta.json"))
    assert "pretrain: imagefolder, 80 train / 30 test images" in proc.stdout + proc.stderr
    assert report["pretrain"]["train_size"] == 80 and report["pretrain"]["test_size"] == 30
    assert report["baseline"]["init"] == "student init from pretraining"
    md = (run / "report.md").read_text()
    assert "Pretraining: **imagefolder**, 80 train, 30 test images, 1 epoch," in md
    assert "| baseline (pretrained on imagefolder) |" in md
    assert "| pretrain.dataset | imagefolder |" in md and "from scratch" not in md


@pytest.mark.parametrize("augment", [RandomResizedCrop(), CropFlip(2)],
                         ids=["RandomResizedCrop", "CropFlip"])
def test_augmentation_computes_on_the_images_device(augment):
    # The loader keeps an epoch's parameters in (pinned) host memory; `apply` must copy them to
    # the batch's device and compute there. RandomResizedCrop built its boxes and affine matrix
    # on the CPU, then copied the matrix with a blocking copy: a GPU sync every step. Images on
    # the meta device stand in for a GPU; every op `apply` runs must give results there.
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class HostOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.found: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(t, torch.Tensor) and t.device.type == "cpu"
                   for t in tree_leaves(out)):
                self.found.append(str(func))
            return out

    images = torch.zeros(4, 3, 16, 16, dtype=torch.uint8, device="meta")
    params = augment.sample(4, torch.Generator().manual_seed(0))
    with HostOps() as host:
        out = augment.apply(images, params)
    assert host.found == []
    assert (out.device.type, out.shape, out.dtype) == ("meta", images.shape, torch.uint8)
