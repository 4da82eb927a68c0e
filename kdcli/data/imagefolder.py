"""Image-folder datasets, the ImageNet layout: `root/train/<class>/*.jpg`, `root/val/<class>/*`.

Like CIFAR, the images are decoded once into uint8 NCHW tensors held in memory: each image is
resized so its shorter side is `resize` pixels and centre-cropped to `image_size` (the standard
evaluation transform, so evaluation needs no transform of its own); train-time augmentation
(`random_resized_crop`, `crop_flip`, `flip`) then runs on whole batches of these tensors.
Memory is `3 * image_size^2` bytes per image: 150 KB at 224 px, 1.5 GB per 10,000 images.

Decoding is the slow part, so the decoded arrays are cached on disk (`cache_dir`, see
`kdcli.data.decoded`), keyed by the file list (relative path, size, mtime of every image) and
the decode settings: a re-run maps them in seconds, and an added, removed or edited image gives
a new key.

An unreadable image does not stop decoding: every image is tried, and one DataError then lists
the unreadable ones (the first `LIST_UNREADABLE`, each with its reason), so a folder with a batch
of truncated downloads is fixed in one go, not one file per run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from kdcli.data import decoded
from kdcli.data.datasets import Dataset, Split
from kdcli.data.decoded import SPLITS
from kdcli.errors import DataError

log = logging.getLogger(__name__)

# torchvision's ImageFolder extensions; matched case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Bump when decoding changes (resampling, crop rule): old caches go stale.
CACHE_VERSION = 1
# How many unreadable images the error lists by name; the rest are counted.
LIST_UNREADABLE = 20


def image_folder(
    root: str,
    image_size: int = 224,
    resize: int | None = None,
    train_dir: str = "train",
    test_dir: str = "val",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    cache_dir: str | None = None,
    workers: int | None = None,
    name: str = "imagefolder",
    **_: object,
) -> Dataset:
    """Loads `root/<train_dir>/<class>/*` and `root/<test_dir>/<class>/*` as a `Dataset`.

    Args:
        root: Folder holding the two split folders.
        image_size: Side of the stored square images (what the models see).
        resize: Shorter side before the centre crop; None = round(image_size / 0.875)
            (256 for 224, ImageNet's evaluation ratio). `resize=image_size` keeps the whole
            centre square.
        train_dir, test_dir: Split folder names under `root`.
        mean, std: Per-channel normalisation on the [0, 1] scale (ImageNet's by default).
        cache_dir: Where decoded arrays are cached; None = decode on every run.
        workers: Decoding threads (None = min(8, CPUs)).

    Raises:
        DataError: missing root or split folder, no classes, an empty class, class folders
            that differ between the splits, unreadable images (every one tried; the first
            LIST_UNREADABLE named with their reasons).
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"image folder not found: {base} (looked in {base.resolve()}; set "
                        f"dataset.loader.root to a folder holding {train_dir}/<class>/<images> "
                        f"and {test_dir}/<class>/<images>)")
    size = int(image_size)
    short = shorter_side(size, resize)
    if size < 1 or short < size:
        raise DataError(f"image folder: need 1 <= image_size <= resize, got image_size={size}, "
                        f"resize={short}")
    check_split_folders(base, train_dir, test_dir)
    folders = dict(zip(SPLITS, (base / train_dir, base / test_dir), strict=True))
    skipped: list[str] = []
    listed = {split: scan_split(folder, base, skipped) for split, folder in folders.items()}
    if skipped:
        log.warning("image folder %s: skipped %d file(s) that are not images in a class folder "
                    "(%s): %s", base, len(skipped), ", ".join(IMG_EXTENSIONS),
                    _few(skipped, sort=False))
    classes = listed["train"][0]
    if listed["test"][0] != classes:
        train, test = set(classes), set(listed["test"][0])
        raise DataError(
            f"image folder {base}: class folders differ between {train_dir}/ and {test_dir}/ "
            f"(only in {train_dir}: {_few(train - test)}; "
            f"only in {test_dir}: {_few(test - train)})")
    files = {split: listed[split][1] for split in SPLITS}

    cached = decoded.folder(cache_dir, "imagefolder", cache_key(base, files, size, short))
    labels = {split: np.array([label for _, label in files[split]], dtype=np.int64)
              for split in SPLITS}
    hit = decoded.load(cached, labels) if cached is not None else None
    splits, source_side = (hit[0], hit[1].get("source_side")) if hit is not None else (None, None)
    if splits is None:
        t0 = time.perf_counter()
        n = sum(len(f) for f in files.values())
        threads = int(workers) if workers else min(8, os.cpu_count() or 1)
        log.info("image folder %s: decoding %d images (%d classes) to %dpx (resize %d, centre "
                 "crop), %d thread(s)", base, n, len(classes), size, short, threads)
        images, unreadable, sides = {}, [], []
        for split in SPLITS:
            images[split], failed = decode_images(base, files[split], size, short, threads, sides)
            unreadable += failed
        source_side = int(np.median(sides)) if sides else None
        if unreadable:
            raise DataError(unreadable_error(base, unreadable, n))
        splits = {split: Split(torch.from_numpy(images[split]), torch.from_numpy(labels[split]))
                  for split in SPLITS}
        log.info("image folder: decoded %d images in %.1fs", n, time.perf_counter() - t0)
        if cached is not None:
            decoded.write(cached, splits, {"root": str(base), "classes": classes,
                                           "image_size": size, "resize": short,
                                           "source_side": source_side,
                                           "version": CACHE_VERSION})
    warn_if_upscaled(base, size, source_side)
    return Dataset(name, splits["train"], splits["test"], classes,
                   tuple(float(m) for m in mean), tuple(float(s) for s in std))


# Names other datasets give their split folders: a missing split folder's error suggests the
# key that points kd at one of these when it is there.
SPLIT_NAMES = {"train_dir": ("train", "training", "trn"),
               "test_dir": ("val", "test", "valid", "validation", "testing", "eval")}


def check_split_folders(base: Path, train_dir: str, test_dir: str) -> None:
    """Both split folders exist under `base`; if not, the error lists the folders found and says
    what to set: `dataset.loader.test_dir=test` for a `train/` + `test/` layout, or, for one
    folder of class folders, how to make the two splits (kd does not split one folder)."""
    wanted = {"train_dir": train_dir, "test_dir": test_dir}
    missing = [key for key, name in wanted.items() if not (base / name).is_dir()]
    if not missing:
        return
    found = sorted(d.name for d in os.scandir(base) if d.is_dir() and not d.name.startswith("."))
    if len(missing) == 2 and any(_holds_images(base / d) for d in found):
        raise DataError(
            f"image folder {base}: holds class folders ({_few(found)}), not the two split "
            f"folders kd reads, {train_dir}/<class>/<images> to train on and "
            f"{test_dir}/<class>/<images> to test on (kd does not split one folder): move some "
            f"images of each class to {base / test_dir}/<class>/ and the rest to "
            f"{base / train_dir}/<class>/, or set dataset.loader.train_dir / test_dir")
    key = missing[0]
    name = wanted[key]
    spare = [d for d in found if d not in wanted.values()]
    guess = next((d for d in spare if d.lower() in SPLIT_NAMES[key]), None)
    hint = (f"; set dataset.loader.{key}={guess}" if guess
            else f"; set dataset.loader.{key}= to one of them" if spare else "")
    raise DataError(f"image folder {base}: no {name}/ folder (expected "
                    f"{base / name}/<class>/<images>; folders found: {_few(found)}){hint}")


def _holds_images(folder: Path) -> bool:
    """Whether `folder` has image files directly in it (a class folder, not a split folder)."""
    return any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in os.scandir(folder))


def warn_if_upscaled(base: Path, size: int, source_side: int | None) -> None:
    """Warns (on every load, the cached one too) when `image_size` is larger than the shorter
    side of most images (their median): they are enlarged, which adds no detail but costs
    decoding time, memory (3 * image_size^2 bytes each) and compute in every model. 64 px
    images at the default 224 px made a run 5x slower than at dataset.image_size=64."""
    if source_side is not None and size > source_side:
        log.warning("image folder %s: most images are smaller than dataset.image_size=%d "
                    "(median shorter side %d px) and are upscaled to it, which adds no detail "
                    "but costs time and memory; set dataset.image_size=%d to train at their "
                    "own size", base, size, source_side, source_side)


def scan_split(folder: Path, base: Path, skipped: list[str]
               ) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted folder names) and `(path relative to base, label)` of every image
    of split folder `folder` (there: `check_split_folders`). Files it does not read (directly
    in `folder`, or without an image extension) are appended to `skipped`, relative to base;
    hidden ones (.DS_Store) are left out of it."""
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir()
                     and not d.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {folder}: no class folders (expected "
                        f"{folder}/<class>/<images>)")
    skipped += sorted(os.path.relpath(e.path, base) for e in os.scandir(folder)
                      if not e.is_dir() and not e.name.startswith("."))
    files: list[tuple[str, int]] = []
    empty = []
    for label, cls in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(folder / cls, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if f.startswith("."):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), base)
                (found if f.lower().endswith(IMG_EXTENSIONS) else skipped).append(rel)
        if not found:
            empty.append(cls)
        files += [(path, label) for path in found]
    if empty:
        raise DataError(f"image folder {folder}: no images ({', '.join(IMG_EXTENSIONS)}) in "
                        f"class folder(s) {_few(empty)}")
    return classes, files


def _few(names: Sequence[str] | set[str], limit: int = 5, sort: bool = True) -> str:
    names = sorted(names) if sort else list(names)
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def shorter_side(image_size: int, resize: int | None) -> int:
    """The side an image's shorter side is resized to before the centre crop: `resize`, or
    ImageNet's evaluation ratio (256 for 224) when None."""
    return int(resize) if resize is not None else round(int(image_size) / 0.875)


class UnreadableImage(DataError):
    """An image PIL cannot decode: `path` and PIL's `reason` (without the path, which PIL's
    "cannot identify image file '<path>'" repeats)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason.replace(f" {str(path)!r}", "")
        super().__init__(f"cannot read image {path}: {self.reason}")


def decode(path: Path, size: int, short: int, sides: list[int] | None = None) -> np.ndarray:
    """One image as uint8 HWC: shorter side resized to `short`, centre crop `size` x `size`.
    `sides`: the source image's shorter side is appended to it (to tell upscaling).

    Raises:
        UnreadableImage: PIL cannot open or decode it, or it is a floating-point image.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            if sides is not None:
                sides.append(min(w, h))
            scale = short / min(w, h)
            out_w, out_h = max(short, round(w * scale)), max(short, round(h * scale))
            # JPEG: let libjpeg decode at a reduced scale (>= the target size); much faster
            # for large photos, and the resize below still sets the exact size.
            img.draft("RGB", (out_w, out_h))
            img = _eight_bit(img).convert("RGB")
            if img.size != (out_w, out_h):
                img = img.resize((out_w, out_h), Image.Resampling.BILINEAR)
            left, top = (out_w - size) // 2, (out_h - size) // 2
            return np.asarray(img.crop((left, top, left + size, top + size)))
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a damaged file
        raise UnreadableImage(path, f"{type(exc).__name__}: {exc}") from exc


def _eight_bit(img):
    """16- and 32-bit integer greyscale (16-bit PNG, TIFF) scaled to 8 bits: Pillow's convert
    clips them at 255, and a 16-bit image came out solid white. Float images have no agreed
    range: refused."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        scaled = np.rint(np.asarray(img, dtype=np.float64) / 257.0)  # 65535 -> 255
        return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        raise ValueError("a floating-point image (mode F) has no fixed range: save it as 8- or "
                         "16-bit")
    return img


def decode_images(base: Path, files: list[tuple[str, int]], size: int, short: int,
                  threads: int, sides: list[int] | None = None
                  ) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """A split's images as uint8 (N, 3, size, size), decoded in parallel threads (PIL releases
    the GIL while decoding), and `(path relative to base, reason)` of each that could not be
    read (its slot in the array left unset). The split's first such image is logged when met:
    decoding a large folder takes a while, and it goes on to find the others. Each image's
    source shorter side is appended to `sides`."""
    images = np.empty((len(files), 3, size, size), dtype=np.uint8)

    def one(i: int) -> tuple[str, str] | None:
        try:
            images[i] = decode(base / files[i][0], size, short, sides).transpose(2, 0, 1)
        except UnreadableImage as exc:
            return files[i][0], exc.reason
        return None

    unreadable: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for failed in pool.map(one, range(len(files))):
            if failed is not None:
                if not unreadable:
                    log.warning("image folder %s: cannot read %s (%s); decoding goes on, to "
                                "list every unreadable image", base, *failed)
                unreadable.append(failed)
    return images, unreadable


def unreadable_error(base: Path, unreadable: list[tuple[str, str]], total: int) -> str:
    """The error for the images that could not be read: the first LIST_UNREADABLE by path, each
    with its reason, then how many more."""
    shown = [f"  {base / rel}: {reason}" for rel, reason in unreadable[:LIST_UNREADABLE]]
    more = len(unreadable) - len(shown)
    return "\n".join([
        f"image folder {base}: cannot read {len(unreadable)} of {total} images; repair, replace "
        f"or delete them, then run again:", *shown,
        *([f"  and {more} more"] if more else [])])


def cache_key(base: Path, files: dict[str, list[tuple[str, int]]], size: int, short: int
              ) -> str:
    """Hash of the decode settings and every image's path, label, size and mtime."""
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "image_size": size,
                                   "resize": short}).encode())
    for split in SPLITS:
        h.update(f"\0{split}\0".encode())
        for rel, label in files[split]:
            st = os.stat(base / rel)
            h.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]
