"""Stage 2: run the teacher once over the data and store its logits (the soft-label cache).

The cache key is the teacher's weights checksum plus the dataset and cache settings, so a
retrained teacher or changed data can never be served stale soft labels.
"""

from __future__ import annotations

import logging
from typing import Any

from kdcli import engine, softlabels
from kdcli.errors import CorruptArtifact
from kdcli.stages import teacher as teacher_stage
from kdcli.stages.common import (
    REUSED,
    TRAINED,
    Context,
    build_context,
    build_model,
    dataset_inputs,
    load_weights,
    reuse_if_valid,
)
from kdcli.store import Entry

log = logging.getLogger(__name__)

SPLITS = ("train", "test")


def entry_for(ctx: Context, teacher: dict[str, Any]) -> Entry:
    inputs = {
        "format": softlabels.VERSION,
        "teacher": teacher["entry"].key,
        "teacher_weights": teacher["meta"]["files"]["last.pt"],
        "dataset": dataset_inputs(ctx),
        "storage": ctx.cfg.cache.storage, "topk": int(ctx.cfg.cache.topk),
        "precision": ctx.runtime.precision,
    }
    return ctx.store.entry("cache", ctx.choice("teacher"), inputs)


def run(ctx: Context, teacher: dict[str, Any]) -> dict[str, Any]:
    """Builds or reuses the cache for `teacher` (a teacher stage result)."""
    entry = entry_for(ctx, teacher)
    with entry.lock():
        meta = reuse_if_valid(entry)
        if meta is not None:
            log.info("cache: reusing %s", entry.path)
            return {"status": REUSED, "entry": entry, "meta": meta}
        model = load_weights(build_model(ctx, "teacher"), teacher["entry"].file("last.pt"))
        headers = {}
        for split in SPLITS:
            loader = ctx.loader(split, int(ctx.cfg.cache.batch_size), train=False)
            logits, _ = engine.predict(model, loader, ctx.runtime)
            headers[split] = softlabels.write(
                entry.file(f"{split}.kdsl"), logits, storage=ctx.cfg.cache.storage,
                topk=int(ctx.cfg.cache.topk),
                info={"teacher": teacher["entry"].key, "split": split})
        train_header = headers["train"]
        meta = entry.finish([f"{s}.kdsl" for s in SPLITS], {
            "bytes_per_sample": train_header["data_bytes"] / train_header["num_samples"],
            "num_samples": train_header["num_samples"], "storage": train_header["storage"],
            "topk": train_header["topk"], "format_version": softlabels.VERSION,
        })
        log.info("cache: wrote %d train soft labels (%.0f bytes/sample) to %s",
                 train_header["num_samples"], meta["bytes_per_sample"], entry.path)
        return {"status": TRAINED, "entry": entry, "meta": meta}


def open_split(cache: dict[str, Any], split: str) -> softlabels.SoftLabels:
    """Opens one split of a cache stage result (checksum verified)."""
    path = cache["entry"].file(f"{split}.kdsl")
    labels = softlabels.open(path)
    if labels.header["info"].get("teacher") != cache["entry"].inputs["teacher"]:
        raise CorruptArtifact(f"soft-label cache {path} was written for another teacher")
    return labels


def require(ctx: Context, teacher: dict[str, Any]) -> dict[str, Any]:
    """The stored cache for `teacher`, without building one (for `kd student`)."""
    entry = entry_for(ctx, teacher)
    meta = reuse_if_valid(entry)
    if meta is None:
        from kdcli.errors import ConfigError

        raise ConfigError(f"no soft-label cache for teacher={ctx.choice('teacher')} in store "
                          f"{ctx.store.root}; run `kd cache` (or `kd train`) first")
    return {"status": REUSED, "entry": entry, "meta": meta}


def main(cfg) -> dict[str, Any]:
    """`kd cache`: stage 2 alone (needs the stage-1 teacher in the store)."""
    ctx = build_context(cfg)
    return run(ctx, teacher_stage.require(ctx))
