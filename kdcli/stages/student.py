"""Stage 3: train the student from the soft-label cache plus hard labels.

Three modes, chosen by the loss:
- cache (any loss that reads only logits): no teacher is built or held in memory; teacher
  logits for each batch are looked up in the cache by sample index.
- online (a loss that reads feature maps, e.g. FitNets, attention transfer): the stored
  teacher is loaded, frozen, and run on every batch with hooks on the named layers.
- none (`loss=ce`): hard labels only, no teacher at all.
Only the cache mode reads (and so needs) the soft-label cache.

The student starts from scratch, from the teacher's weights where names and shapes match
(`student.init=from_teacher`), or from the pretraining stage (`pretrain.dataset`). The
comparison baseline (same student, same start, same budget, hard labels only) is trained by
`run_baseline` and keyed without loss or cache, so a sweep over loss settings trains it once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kdcli import checkpoint, distributed, engine
from kdcli.data.loader import Batch
from kdcli.data.transforms import ViewTable
from kdcli.device import Runtime
from kdcli.engine import no_teacher
from kdcli.errors import ConfigError
from kdcli.losses.base import DistillationLoss, Outputs
from kdcli.losses.ce import CrossEntropy
from kdcli.models.features import FeatureTap
from kdcli.models.transfer import copy_matching
from kdcli.stages import cache as cache_stage
from kdcli.stages import pretrain as pretrain_stage
from kdcli.stages import teacher as teacher_stage
from kdcli.stages.common import (
    Context,
    build,
    build_context,
    check_training,
    container,
    publish,
    train_entry,
    train_inputs,
    weights_id,
    with_code,
)

log = logging.getLogger(__name__)

INIT_MODES = ("scratch", "from_teacher")


def build_loss(ctx: Context) -> DistillationLoss:
    loss = build(ctx.cfg.loss, f"loss={ctx.choice('loss')}")
    if not isinstance(loss, DistillationLoss):
        raise ConfigError(f"loss={ctx.choice('loss')} must build a "
                          f"kdcli.losses.base.DistillationLoss, got {type(loss).__name__}")
    return loss


class CachedTeacher:
    """Serves teacher logits for a batch from the cache, kept at its stored width (float16 or
    top-k) on the training device and widened a batch at a time (`softlabels.Lookup`).

    With cached views, `views` is the table the student's loader must replay, and each
    sample's logits are those of the very view it shows.
    """

    def __init__(self, cache: dict[str, Any], runtime: Runtime) -> None:
        labels = cache_stage.open_split(cache, "train")
        # Like the images: on a GPU unless it would crowd it (device.data), then looked up in
        # the memory-mapped file a batch at a time.
        resident = runtime.data_on_device(labels.data_nbytes, "soft-label cache")
        self.lookup = labels.lookup(runtime.device, resident)
        has_views = "view_offsets" in labels.arrays
        self.views = ViewTable.from_arrays(labels.arrays) if has_views else None

    def __call__(self, batch: Batch) -> Outputs:
        if self.lookup.resident:
            index, view = batch.index, batch.view
        else:
            index, view = batch.host_index, batch.host_view
        return Outputs(self.lookup(index, 0 if view is None else view))


def warn_if_approximate(ctx: Context, source: CachedTeacher, loss: DistillationLoss) -> None:
    """A top-k cache keeps the teacher's top-k probabilities and the total of the rest, spread
    evenly (softlabels.densify): the rest's own spread is lost, which the KL and its gradient
    read, more so the higher the temperature. Says so when the student trains from one."""
    lookup = source.lookup
    if lookup.storage != "topk" or not distributed.is_main():  # once, not from every rank
        return
    temperature = getattr(loss, "temperature", None)
    at = f"at loss.temperature={temperature:g}" if temperature is not None else "as logits"
    log.warning("student: the soft-label cache keeps the top %d of %d teacher logits, the "
                "others averaged; loss=%s reads them %s, so its targets are approximate (the "
                "more so the higher T). cache.storage=full keeps every logit", lookup.k,
                lookup.num_classes, ctx.choice("loss"), at)


class OnlineTeacher:
    """The stored teacher, frozen, run on each batch; returns logits and tapped features."""

    def __init__(self, teacher: dict[str, Any], layers: list[str]) -> None:
        tctx = teacher["ctx"]
        self.model = teacher_stage.frozen(teacher)
        self.taps = FeatureTap(self.model, layers, role=tctx.selected("teacher"))
        # It runs on every step, like the student: compiled with it (device.compile).
        self.forward = engine.compiled_as_set(self.model, tctx.runtime)

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Outputs:
        return Outputs(self.forward(batch.images), self.taps.pop())


def mode_of(loss: DistillationLoss) -> str:
    """"online" when the loss reads teacher features, "cache" when logits suffice."""
    if not loss.needs_teacher:
        return "none"
    return "online" if loss.needs_features else "cache"


def init_mode(ctx: Context, pretraining: bool) -> str:
    """`student.init`, checked; `pretraining`: a pretraining stage sets the start as well."""
    mode = str(ctx.cfg.student.get("init", "scratch"))
    if mode not in INIT_MODES:
        raise ConfigError(f"student.init={mode!r}; choose one of {', '.join(INIT_MODES)}")
    if pretraining and mode == "from_teacher":
        raise ConfigError("student.init=from_teacher and pretrain.dataset both set the "
                          "student's starting weights; choose one")
    return mode


def check_teachers(ctx: Context, mode: str, num_teachers: int) -> None:
    """A live teacher's features come from one model: online mode takes exactly one teacher."""
    if mode == "online" and num_teachers != 1:
        raise ConfigError(f"loss={ctx.choice('loss')} reads teacher features, which needs "
                          f"exactly one teacher (got {num_teachers})")


def preflight(ctx: Context) -> str:
    """The student stage's checks that need only the config, run before any stage trains or
    writes to the store: a bad loss setting, init conflict, cache setting, layer name, optimizer
    or scheduler setting, or a model that cannot take the dataset's images, is reported at once,
    not after hours of teacher training. Returns the student's mode."""
    loss = build_loss(ctx)
    mode = mode_of(loss)
    teachers = teacher_stage.contexts(ctx)
    init_mode(ctx, pretrain_stage.enabled(ctx))
    cache_stage.check_settings(ctx, len(teachers))
    check_teachers(ctx, mode, len(teachers))
    # Every model is built once on the meta device, so a builder that fails (an unreadable
    # `weights=` file, a bad argument) fails now; each is probed on the dataset's images and its
    # optimizer and scheduler are built (the pretraining stage uses the student's), and
    # feature-loss layer names are checked on them.
    student = check_training(ctx, "student", optimizer="optimizer", scheduler="scheduler",
                             budget=ctx.cfg.trainer.student)
    teacher_models = teacher_stage.preflight(ctx)
    if mode == "online":
        for role, model, c, layers in (
                ("student", student, ctx, loss.student_layers),
                ("teacher", teacher_models[0], teachers[0], loss.teacher_layers)):
            FeatureTap(model, list(layers), role=c.selected(role),
                       setting=layer_setting(ctx, role)).remove()
    return mode


def layer_setting(ctx: Context, role: str) -> str | None:
    """The loss setting naming the `role`'s layers (`loss.student_layer`, or `..._layers` for
    several), for the error on a wrong name; None for a loss of the user's with other keys."""
    return next((f"loss.{key}" for key in (f"{role}_layer", f"{role}_layers")
                 if key in ctx.cfg.loss), None)


def initializer(ctx: Context, teachers: list[dict[str, Any]], pretrained: dict[str, Any] | None
                ) -> tuple[Callable[[nn.Module], dict[str, Any]] | None, dict[str, Any]]:
    """How the student starts: the init function and the store-key inputs describing it."""
    mode = init_mode(ctx, pretrained is not None)
    if pretrained is not None:
        source, label = pretrained["entry"], "student init from pretraining"
    elif mode == "from_teacher":
        source = teachers[0]["entry"]
        label = f"student.init=from_teacher ({teachers[0]['ctx'].choice('teacher')})"
    else:
        return None, {"init": "scratch"}

    def initialize(model: nn.Module) -> dict[str, Any]:
        state = checkpoint.load(source.file("last.pt"))["model"]
        return copy_matching(state, model, label)

    return initialize, {"init": label, "init_weights": source.key}


def run(ctx: Context, cache: dict[str, Any] | None, teachers: list[dict[str, Any]],
        pretrained: dict[str, Any] | None = None) -> dict[str, Any]:
    """Distils the student, from `cache` or, for feature losses, from the live teacher.
    `cache` is read in cache mode only (None will do for the other modes)."""
    loss = build_loss(ctx)
    mode = mode_of(loss)
    budget = ctx.cfg.trainer.student
    initialize, init_inputs = initializer(ctx, teachers, pretrained)
    inputs = {**train_inputs(ctx, "student", "optimizer", "scheduler", budget), **init_inputs}
    inputs["loss"] = container(ctx.cfg.loss)
    with_code(inputs, ctx.cfg.loss)
    check_teachers(ctx, mode, len(teachers))
    if mode == "online":
        inputs["teacher_weights"] = weights_id(teachers[0]["meta"])
        source: Any = OnlineTeacher(teachers[0], list(loss.teacher_layers))
        log.info("student: online teacher (loss=%s reads teacher features %s)",
                 ctx.choice("loss"), ", ".join(loss.teacher_layers))
    elif mode == "cache":
        if cache is None:
            raise ValueError(f"loss={ctx.choice('loss')} reads the soft-label cache; pass it")
        inputs["cache"] = cache["entry"].key
        source = CachedTeacher(cache, ctx.runtime)
        warn_if_approximate(ctx, source, loss)
        log.info("student: teacher logits from the soft-label cache (no teacher in memory)%s",
                 f", replaying {source.views.k} cached views per sample" if source.views else "")
    else:
        source = no_teacher
    entry = ctx.store.entry("student", ctx.choice("student"), inputs)
    # Said only when the student trains: a reused one was logged as trained on a fixed teacher.
    if (mode == "cache" and source.views is None and not entry.complete
            and ctx.cfg.dataset.augment not in (None, "none")):
        log.info("student: the cache holds the teacher's logits on the clean images, the "
                 "student trains on augmented ones (a fixed teacher); cache.views=K caches "
                 "the teacher on K augmented views per image, the pixels the student sees")
    result = train_entry(ctx, entry, role="student", loss_fn=loss, optimizer="optimizer",
                         scheduler="scheduler", budget=budget, label="student",
                         teacher=source, initialize=initialize,
                         views=getattr(source, "views", None))
    return {**result, "mode": mode}


def run_baseline(ctx: Context, teachers: list[dict[str, Any]],
                 pretrained: dict[str, Any] | None = None) -> dict[str, Any]:
    """The same student from the same start, trained on hard labels with the same budget."""
    budget = ctx.cfg.trainer.student
    initialize, init_inputs = initializer(ctx, teachers, pretrained)
    inputs = {**train_inputs(ctx, "student", "optimizer", "scheduler", budget), **init_inputs}
    entry = ctx.store.entry("baseline", ctx.choice("student"), inputs)
    return train_entry(ctx, entry, role="student", loss_fn=CrossEntropy(), optimizer="optimizer",
                       scheduler="scheduler", budget=budget, label="baseline",
                       initialize=initialize)


def main(cfg) -> dict[str, Any]:
    """`kd student`: stage 3 alone (needs the stage-1 teacher in the store, and the stage-2
    cache when the loss reads teacher logits from it)."""
    ctx = build_context(cfg)
    mode = preflight(ctx)
    teachers = teacher_stage.require_all(ctx)
    # Looked up before pretraining trains anything: a missing cache is known at once.
    cache = cache_stage.require(ctx, teachers) if mode == "cache" else None
    pretrained = pretrain_stage.run(ctx, pretrain_stage.prepare(ctx))
    result = run(ctx, cache, teachers, pretrained)
    distributed.on_main(lambda: publish(result["entry"], ctx.run_dir, "student"))
    return result
