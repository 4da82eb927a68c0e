"""Stage 3: train the student from the soft-label cache plus hard labels.

Two modes, chosen by the loss:
- cache (any loss that reads only logits): no teacher is built or held in memory; teacher
  logits for each batch are looked up in the cache by sample index.
- online (a loss that reads feature maps, e.g. FitNets, attention transfer): the stored
  teacher is loaded, frozen, and run on every batch with hooks on the named layers.

The from-scratch baseline (same student, same budget, hard labels
only) is trained by `run_baseline` and keyed without loss or teacher, so a sweep over loss
settings trains it once.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kdcli.data.loader import Batch
from kdcli.engine import no_teacher
from kdcli.errors import ConfigError
from kdcli.losses.base import DistillationLoss, Outputs
from kdcli.losses.ce import CrossEntropy
from kdcli.models.features import FeatureTap
from kdcli.stages import cache as cache_stage
from kdcli.stages import teacher as teacher_stage
from kdcli.stages.common import (
    Context,
    build,
    build_context,
    build_model,
    container,
    load_weights,
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
    return loss


class CachedTeacher:
    """Serves teacher logits for a batch from the cache, held on the training device."""

    def __init__(self, cache: dict[str, Any], device: torch.device) -> None:
        labels = cache_stage.open_split(cache, "train")
        self.logits = labels.all_logits().to(device)

    def __call__(self, batch: Batch) -> Outputs:
        return Outputs(self.logits[batch.index])


class OnlineTeacher:
    """The stored teacher, frozen, run on each batch; returns logits and tapped features."""

    def __init__(self, ctx: Context, teacher: dict[str, Any], layers: list[str]) -> None:
        model = load_weights(build_model(ctx, "teacher"), teacher["entry"].file("last.pt"))
        self.model = model.eval().requires_grad_(False)
        self.taps = FeatureTap(self.model, layers, role=f"teacher={ctx.choice('teacher')}")

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Outputs:
        return Outputs(self.model(batch.images), self.taps.pop())


def mode_of(loss: DistillationLoss) -> str:
    """"online" when the loss reads teacher features, "cache" when logits suffice."""
    if not loss.needs_teacher:
        return "none"
    return "online" if loss.needs_features else "cache"


def run(ctx: Context, cache: dict[str, Any], teacher: dict[str, Any]) -> dict[str, Any]:
    """Distils the student, from `cache` or, for feature losses, from the live `teacher`."""
    loss = build_loss(ctx)
    mode = mode_of(loss)
    inputs = train_inputs(ctx, "student", "optimizer", "scheduler", "student")
    inputs["loss"] = container(ctx.cfg.loss)
    if mode == "online":
        inputs["teacher_weights"] = teacher["meta"]["files"]["last.pt"]
        source: Any = OnlineTeacher(ctx, teacher, list(loss.teacher_layers))
        log.info("student: online teacher (loss=%s reads teacher features %s)",
                 ctx.choice("loss"), ", ".join(loss.teacher_layers))
    elif mode == "cache":
        inputs["cache"] = cache["entry"].key
        source = CachedTeacher(cache, ctx.runtime.device)
        log.info("student: teacher logits from the soft-label cache (no teacher in memory)")
    else:
        source = no_teacher
    entry = ctx.store.entry("student", ctx.choice("student"), inputs)
    result = train_entry(ctx, entry, role="student", loss_fn=loss, optimizer="optimizer",
                         scheduler="scheduler", trainer="student", label="student",
                         teacher=source)
    return {**result, "mode": mode}


def run_baseline(ctx: Context) -> dict[str, Any]:
    """The same student trained from scratch on hard labels, same optimizer and budget."""
    inputs = train_inputs(ctx, "student", "optimizer", "scheduler", "student")
    entry = ctx.store.entry("baseline", ctx.choice("student"), inputs)
    return train_entry(ctx, entry, role="student", loss_fn=CrossEntropy(), optimizer="optimizer",
                       scheduler="scheduler", trainer="student", label="baseline")


def main(cfg) -> dict[str, Any]:
    """`kd student`: stage 3 alone (needs the stage-2 cache in the store)."""
    ctx = build_context(cfg)
    teacher = teacher_stage.require(ctx)
    result = run(ctx, cache_stage.require(ctx, teacher), teacher)
    publish(result["entry"], ctx.run_dir, "student")
    return result
