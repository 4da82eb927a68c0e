"""Stage 3: train the student from the soft-label cache plus hard labels.

No teacher is built or held in memory here: teacher logits for each batch are looked up in
the cache by sample index. The from-scratch baseline (same student, same budget, hard labels
only) is trained by `run_baseline` and keyed without loss or teacher, so a sweep over loss
settings trains it once.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kdcli.data.loader import Batch
from kdcli.errors import ConfigError
from kdcli.losses.base import DistillationLoss, Outputs
from kdcli.losses.ce import CrossEntropy
from kdcli.stages import cache as cache_stage
from kdcli.stages.common import (
    Context,
    build,
    build_context,
    container,
    publish,
    train_entry,
    train_inputs,
)

log = logging.getLogger(__name__)


def build_loss(ctx: Context) -> DistillationLoss:
    loss = build(ctx.cfg.loss, f"loss={ctx.choice('loss')}")
    if not isinstance(loss, DistillationLoss):
        raise ConfigError(f"loss={ctx.choice('loss')} must build a "
                          f"kdcli.losses.base.DistillationLoss, got {type(loss).__name__}")
    if loss.needs_features:
        raise ConfigError(f"loss={ctx.choice('loss')} needs teacher features (online teacher), "
                          "which this version of the student stage does not run yet")
    return loss


class CachedTeacher:
    """Serves teacher logits for a batch from the cache, held on the training device."""

    def __init__(self, cache: dict[str, Any], device: torch.device) -> None:
        labels = cache_stage.open_split(cache, "train")
        self.logits = labels.all_logits().to(device)

    def __call__(self, batch: Batch) -> Outputs:
        return Outputs(self.logits[batch.index])


def run(ctx: Context, cache: dict[str, Any]) -> dict[str, Any]:
    """Distils the student from `cache` (a cache stage result)."""
    loss = build_loss(ctx)
    inputs = train_inputs(ctx, "student", "optimizer", "scheduler", "student")
    inputs["loss"] = container(ctx.cfg.loss)
    inputs["cache"] = cache["entry"].key
    entry = ctx.store.entry("student", ctx.choice("student"), inputs)
    teacher = CachedTeacher(cache, ctx.runtime.device) if loss.needs_teacher else None
    log.info("student: teacher logits from the soft-label cache (no teacher in memory)")
    kwargs = {"teacher": teacher} if teacher is not None else {}
    return train_entry(ctx, entry, role="student", loss_fn=loss, optimizer="optimizer",
                       scheduler="scheduler", trainer="student", label="student", **kwargs)


def run_baseline(ctx: Context) -> dict[str, Any]:
    """The same student trained from scratch on hard labels, same optimizer and budget."""
    inputs = train_inputs(ctx, "student", "optimizer", "scheduler", "student")
    entry = ctx.store.entry("baseline", ctx.choice("student"), inputs)
    return train_entry(ctx, entry, role="student", loss_fn=CrossEntropy(), optimizer="optimizer",
                       scheduler="scheduler", trainer="student", label="baseline")


def main(cfg) -> dict[str, Any]:
    """`kd student`: stage 3 alone (needs the stage-2 cache in the store)."""
    ctx = build_context(cfg)
    result = run(ctx, cache_stage.require(ctx))
    publish(result["entry"], ctx.run_dir, "student")
    return result
