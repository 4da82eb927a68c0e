"""Stage 2: run the teacher(s) once over the data and store the logits (the soft-label cache).

The cache key holds each teacher's entry key and weights checksum plus the dataset and cache
settings, so a retrained teacher or changed data can never be served stale soft labels.
Several teachers are combined into one set of soft labels: a weighted mean of their logits
(`cache.teacher_weights`, equal by default).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from kdcli import distributed, engine, softlabels
from kdcli.data.loader import BatchLoader
from kdcli.data.transforms import CropFlip, ViewTable, build_augment
from kdcli.errors import ConfigError, CorruptArtifact
from kdcli.stages import teacher as teacher_stage
from kdcli.stages.common import (
    NOT_NEEDED,
    REUSED,
    TRAINED,
    Context,
    build_context,
    dataset_inputs,
    reuse_if_valid,
    weights_id,
)
from kdcli.store import Entry

log = logging.getLogger(__name__)

SPLITS = ("train", "test")


def combine_weights(ctx: Context, n: int) -> list[float]:
    weights = ctx.cfg.cache.get("teacher_weights")
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n or min(weights) < 0 or sum(weights) <= 0:
        raise ConfigError(f"cache.teacher_weights={weights} must be {n} non-negative numbers "
                          "(one per teacher), not all zero")
    return [w / sum(weights) for w in weights]


def check_settings(ctx: Context, num_teachers: int) -> None:
    """The cache settings, checked from the config alone: run before any stage trains, so a bad
    setting does not wait for the teacher's training to be reported."""
    combine_weights(ctx, num_teachers)
    num_views(ctx)
    softlabels.choose_storage(ctx.dataset.num_classes, str(ctx.cfg.cache.storage),
                              int(ctx.cfg.cache.topk))


def entry_for(ctx: Context, teachers: list[dict[str, Any]]) -> Entry:
    inputs = {
        "format": softlabels.VERSION,
        "teachers": [{"key": t["entry"].key, "weights": weights_id(t["meta"])}
                     for t in teachers],
        "combine": combine_weights(ctx, len(teachers)),
        "dataset": dataset_inputs(ctx),
        "storage": ctx.cfg.cache.storage, "topk": int(ctx.cfg.cache.topk),
        "precision": ctx.runtime.precision, "views": num_views(ctx), "seed": int(ctx.cfg.seed),
    }
    name = "+".join(t["ctx"].choice("teacher") for t in teachers)
    return ctx.store.entry("cache", name, inputs)


def num_views(ctx: Context) -> int:
    k = int(ctx.cfg.cache.get("views") or 0)
    if k < 0:
        raise ConfigError(f"cache.views={k} must be >= 0")
    if not k:
        return 0
    augment = build_augment(ctx.cfg.dataset.augment)
    if augment is None:
        raise ConfigError("cache.views > 0 caches augmented views, but dataset.augment=none")
    if not isinstance(augment, CropFlip):
        raise ConfigError(f"cache.views > 0 replays crop offsets and flips: use dataset.augment="
                          f"crop_flip or flip, not {ctx.cfg.dataset.augment}")
    return k


def view_table(ctx: Context) -> ViewTable | None:
    """The K views of every training sample, drawn from the run seed (None for K=0)."""
    k = num_views(ctx)
    if k == 0:
        return None
    augment = build_augment(ctx.cfg.dataset.augment)
    return ViewTable.sample(augment, len(ctx.dataset.train), k, int(ctx.cfg.seed) + 7_777)


def split_loader(ctx: Context, split: str, views: ViewTable | None) -> BatchLoader:
    """Unshuffled loader over a split; for train with views, one that replays view v."""
    return ctx.loader(split, int(ctx.cfg.cache.batch_size), train=False,
                      views=views if split == "train" else None)


def predict_split(model, ctx: Context, split: str, views: ViewTable | None) -> torch.Tensor:
    """Teacher logits (N, V, C): every view of the train split, or the clean images (V=1)."""
    loader = split_loader(ctx, split, views)
    if split != "train" or views is None:
        return engine.predict(model, loader, ctx.runtime)[0][:, None]
    per_view = [engine.predict(model, loader, ctx.runtime, view=v)[0] for v in range(views.k)]
    return torch.stack(per_view, dim=1)


def ensemble(logits: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return sum(w * x for w, x in zip(weights, logits, strict=True))


def run(ctx: Context, teachers: list[dict[str, Any]]) -> dict[str, Any]:
    """Builds or reuses the cache for `teachers` (teacher stage results). Under torchrun rank 0
    builds it while the other ranks wait; then every rank reads the same entry."""
    entry = entry_for(ctx, teachers)
    status, meta = distributed.on_main(lambda: _build(ctx, teachers, entry))
    return {"status": status, "entry": entry, "meta": meta}


def _build(ctx: Context, teachers: list[dict[str, Any]], entry: Entry
           ) -> tuple[str, dict[str, Any]]:
    with entry.lock():
        meta = reuse_if_valid(entry)
        if meta is not None:
            log.info("cache: reusing %s", entry.path)
            return REUSED, meta
        t0 = time.perf_counter()
        weights = combine_weights(ctx, len(teachers))
        views = view_table(ctx)
        per_split: dict[str, list[torch.Tensor]] = {s: [] for s in SPLITS}
        for t in teachers:  # one teacher in memory at a time
            # Its pass over every split and view is the stage's work: compiled under
            # device.compile.
            model = engine.compiled_as_set(teacher_stage.frozen(t), t["ctx"].runtime)
            for split in SPLITS:
                per_split[split].append(predict_split(model, ctx, split, views))
            del model
        headers = {}
        for split in SPLITS:
            extras = views.arrays() if split == "train" and views is not None else None
            headers[split] = softlabels.write(
                entry.file(f"{split}.kdsl"), ensemble(per_split[split], weights),
                storage=ctx.cfg.cache.storage, topk=int(ctx.cfg.cache.topk),
                info={"entry": entry.key, "split": split, "augment": ctx.cfg.dataset.augment},
                extras=extras)
        train_header = headers["train"]
        # Teacher passes over every split and view, per second of the whole stage.
        images = sum(len(x) * x.shape[1] for parts in per_split.values() for x in parts)
        rate = images / (time.perf_counter() - t0)
        meta = entry.finish([f"{s}.kdsl" for s in SPLITS], {
            "bytes_per_sample": train_header["data_bytes"] / train_header["num_samples"],
            "num_samples": train_header["num_samples"], "storage": train_header["storage"],
            "topk": train_header["topk"], "format_version": softlabels.VERSION,
            "teachers": [t["ctx"].choice("teacher") for t in teachers], "weights": weights,
            "views": train_header["views"] if views is not None else 0, "images_per_s": rate,
        })
        log.info("cache: wrote %d train soft labels (%.0f bytes/sample) to %s; %.0f img/s",
                 train_header["num_samples"], meta["bytes_per_sample"], entry.path, rate)
        return TRAINED, meta


def check(ctx: Context, teachers: list[dict[str, Any]], cache: dict[str, Any], samples: int
          ) -> float:
    """Replays `samples` random cached (sample, view) pairs through the teacher(s) and compares
    with the cached logits; raises CorruptArtifact on a mismatch. Returns the max abs error."""
    labels = open_split(cache, "train")
    views = ViewTable.from_arrays(labels.arrays) if "view_offsets" in labels.arrays else None
    gen = torch.Generator().manual_seed(int(ctx.cfg.seed) + 1)
    index = torch.randperm(labels.num_samples, generator=gen)[:samples].sort().values
    view = (torch.randint(views.k, (len(index),), generator=gen) if views is not None
            else torch.zeros(len(index), dtype=torch.long))
    cached = torch.stack([labels.logits(index[i:i + 1], int(view[i]))[0]
                          for i in range(len(index))])
    ds = ctx.dataset
    images = ds.train.take(index).to(ctx.runtime.device)
    if views is not None:
        images = build_augment(ctx.cfg.dataset.augment).apply(images, views.select(index, view))
    mean = torch.tensor(ds.mean, device=images.device).view(1, -1, 1, 1) * 255
    std = torch.tensor(ds.std, device=images.device).view(1, -1, 1, 1) * 255
    x = ((images.float() - mean) / std).contiguous(memory_format=ctx.runtime.memory_format)
    weights = combine_weights(ctx, len(teachers))
    live = []
    for t in teachers:
        with torch.inference_mode(), ctx.runtime.autocast():
            live.append(teacher_stage.frozen(t)(x).float().cpu())
    error = float((ensemble(live, weights) - cached).abs().max())
    # float16 storage and autocast leave small differences; a wrong view leaves large ones.
    tolerance = 0.05 * float(cached.abs().max()) + 0.05
    if error > tolerance:
        raise CorruptArtifact(f"soft-label cache {labels.path} does not match its teacher on "
                              f"replayed views (max |error| {error:.3g} > {tolerance:.3g})")
    log.info("cache: %d replayed views match the teacher (max |error| %.3g)", len(index), error)
    return error


def open_split(cache: dict[str, Any], split: str) -> softlabels.SoftLabels:
    """Opens one split of a cache stage result (checksum verified)."""
    path = cache["entry"].file(f"{split}.kdsl")
    labels = softlabels.open(path)
    if labels.header["info"].get("entry") != cache["entry"].key:
        raise CorruptArtifact(f"soft-label cache {path} belongs to another store entry")
    return labels


def require(ctx: Context, teachers: list[dict[str, Any]]) -> dict[str, Any]:
    """The stored cache for `teachers`, without building one (for `kd student`)."""
    entry = entry_for(ctx, teachers)
    meta = distributed.on_main(lambda: reuse_if_valid(entry))  # may set a damaged one aside
    if meta is None:
        raise ConfigError(f"no soft-label cache for teacher={entry.path.name.rsplit('-', 1)[0]} "
                          f"in store {ctx.store.root}; run `kd cache` (or `kd train`) first")
    return {"status": REUSED, "entry": entry, "meta": meta}


# Why a student of each mode but "cache" reads no soft-label cache (kdcli.stages.student).
_NO_CACHE = {"online": "it runs the teacher online", "none": "it reads no teacher"}


def main(cfg) -> dict[str, Any]:
    """`kd cache`: stage 2 alone (needs the stage-1 teacher(s) in the store). For a loss that
    reads no cached logits (a feature loss, `loss=ce`) it builds nothing, as `kd train` does:
    a full teacher pass would write a cache nothing reads."""
    from kdcli.stages import student as student_stage  # it imports this module

    ctx = build_context(cfg)
    mode = student_stage.mode_of(student_stage.build_loss(ctx))
    if mode in _NO_CACHE:
        log.info("cache: not needed for loss=%s (%s); nothing to do", ctx.choice("loss"),
                 _NO_CACHE[mode])
        return {"status": NOT_NEEDED}
    check_settings(ctx, len(teacher_stage.contexts(ctx)))
    teachers = teacher_stage.require_all(ctx)
    result = run(ctx, teachers)
    if int(ctx.cfg.cache.get("check") or 0) > 0:
        distributed.on_main(lambda: check(ctx, teachers, result, int(ctx.cfg.cache.check)))
    return result
