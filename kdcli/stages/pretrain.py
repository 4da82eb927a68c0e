"""Optional stage before distillation: pretrain the student on `pretrain.dataset`.

"Pretrained distillation" (e.g. Turc et al. 2019, "Well-Read Students Learn Better"): the
student first learns from hard labels on a pretraining set (possibly larger, possibly with
other classes), then is distilled starting from those weights. Layers whose shapes differ
(a classifier over other classes) start fresh. Reused by key like every stage.

The pretraining set is loaded by `prepare`, before any stage runs (as the main dataset is), so
missing data fails the run before the teacher trains rather than after it.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdcli.errors import ConfigError, DataError
from kdcli.losses.ce import CrossEntropy
from kdcli.stages.common import Context, load_dataset, recompose, train_entry, train_inputs

log = logging.getLogger(__name__)


def enabled(ctx: Context) -> bool:
    node = ctx.cfg.get("pretrain")
    return bool(node and node.get("dataset") and int(node.get("epochs") or 0) > 0)


def dataset_overrides(cfg: DictConfig) -> list[str]:
    """The overrides that compose the pretraining set in place of the main dataset: its option
    and, with `pretrain.root`, its loader's root (quoted: a path may hold `,` or `=`)."""
    node = cfg.pretrain
    overrides = [f"dataset={node.dataset}"]
    if node.get("root") is not None:
        root = str(node.root).replace("'", "\\'")
        overrides.append(f"dataset.loader.root='{root}'")
    return overrides


def prepare(ctx: Context) -> Context | None:
    """The run's context on the pretraining set, loaded now; None when not configured. A load
    that fails (no data at the root, wrong class count) names the pretraining set and the key
    that points it elsewhere, `pretrain.root`: the loader's own text names the main dataset's
    `dataset.loader.root`, which does not reach this set."""
    if not enabled(ctx):
        return None
    name = str(ctx.cfg.pretrain.dataset)
    cfg = recompose(dataset_overrides(ctx.cfg), ("dataset",))
    try:
        dataset = load_dataset(cfg.dataset, int(cfg.seed))
    except (ConfigError, DataError) as exc:
        message = str(exc).replace("set dataset.loader.root", "set pretrain.root")
        raise type(exc)(f"pretrain.dataset={name}: {message}") from exc
    return ctx.variant(cfg, {"dataset": name}, dataset)


def run(ctx: Context, pctx: Context | None) -> dict[str, Any] | None:
    """Pretrains (or reuses) the student on `pctx`, the pretraining set `prepare` loaded; None
    when not configured."""
    if pctx is None:
        return None
    name = str(ctx.cfg.pretrain.dataset)
    images = image_counts(pctx)
    budget = OmegaConf.create({"epochs": int(ctx.cfg.pretrain.epochs),
                               "batch_size": int(ctx.cfg.trainer.student.batch_size)})
    inputs = train_inputs(pctx, "student", "optimizer", "scheduler", budget)
    entry = ctx.store.entry("pretrain", f"{ctx.choice('student')}-{name}", inputs)
    result = train_entry(pctx, entry, role="student", loss_fn=CrossEntropy(),
                         optimizer="optimizer", scheduler="scheduler", budget=budget,
                         label="pretrain")
    return {**result, "images": images}


def image_counts(pctx: Context) -> dict[str, int | None]:
    """Logs and returns the pretraining set's sizes: an experiment preset's `dataset.*` sizes
    (`experiment=smoke`: 512 train / 256 test) apply to it too, which a review's "1 epoch of
    CIFAR-10" did not show."""
    ds = pctx.dataset
    counts = {"train_size": len(ds.train), "val_size": len(ds.val) if ds.val is not None else None,
              "test_size": len(ds.test)}
    held = f", {counts['val_size']} validation" if counts["val_size"] else ""
    log.info("pretrain: %s, %d train%s / %d test images", ds.name, counts["train_size"], held,
             counts["test_size"])
    return counts
