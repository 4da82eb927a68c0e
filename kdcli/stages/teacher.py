"""Stage 1: train the teacher on hard labels (or reuse the stored one with the same key).

`teacher=[a,b,...]` selects several teachers: each is composed as if chosen alone, trained or
reused under its own key, and the cache stage combines their soft labels.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kdcli import distributed
from kdcli.errors import ConfigError
from kdcli.losses.ce import CrossEntropy
from kdcli.stages.common import (
    Context,
    build_context,
    build_model,
    check_training,
    keyed_overrides,
    list_override,
    load_entry_weights,
    publish,
    recompose,
    reuse_if_valid,
    train_entry,
    train_inputs,
)
from kdcli.store import Entry


def entry_for(ctx: Context) -> Entry:
    inputs = train_inputs(ctx, "teacher", "teacher_optimizer", "teacher_scheduler",
                          ctx.cfg.trainer.teacher)
    return ctx.store.entry("teacher", ctx.choice("teacher"), inputs)


def frozen(teacher: dict[str, Any]) -> nn.Module:
    """A stored teacher (a result of `run_all` / `require_all`) with its weights, in eval mode
    and without gradients: what the cache stage and the online student run."""
    model = load_entry_weights(build_model(teacher["ctx"], "teacher"), teacher["entry"])
    return model.eval().requires_grad_(False)


def contexts(ctx: Context) -> list[Context]:
    """One context per teacher: just `ctx` normally, one per option for `teacher=[a,b,...]`."""
    names = list_override("teacher")
    if not names:
        return [ctx]
    if len(set(names)) != len(names):
        raise ConfigError(f"teacher={names}: each teacher may appear once")
    keyed = keyed_overrides("teacher")
    if keyed:
        # With several teachers a `teacher.<key>` override has no single node to land on.
        raise ConfigError(f"{', '.join(keyed)}: cannot be combined with teacher={names}; set "
                          "the key in each teacher's YAML (e.g. with --config-dir)")
    return [ctx.variant(recompose([f"teacher={name}"], ("teacher",)), {"teacher": name})
            for name in names]


def preflight(ctx: Context) -> list[nn.Module]:
    """Each teacher's training settings, checked before any stage trains: its model probed on
    the dataset's images, its optimizer and scheduler built (`check_training`). Returns the
    teachers' model skeletons, in `contexts` order, for checks on their layers."""
    return [check_training(c, "teacher", optimizer="teacher_optimizer",
                           scheduler="teacher_scheduler", budget=c.cfg.trainer.teacher)
            for c in contexts(ctx)]


def run(ctx: Context) -> dict[str, Any]:
    """Trains, resumes or reuses one teacher; returns {"status", "entry", "meta", "ctx"}."""
    result = train_entry(ctx, entry_for(ctx), role="teacher", loss_fn=CrossEntropy(),
                         optimizer="teacher_optimizer", scheduler="teacher_scheduler",
                         budget=ctx.cfg.trainer.teacher, label=f"teacher {ctx.choice('teacher')}")
    return {**result, "ctx": ctx}


def run_all(ctx: Context) -> list[dict[str, Any]]:
    return [run(c) for c in contexts(ctx)]


def require_all(ctx: Context) -> list[dict[str, Any]]:
    """The stored teachers for this config, without training (for `kd cache`/`kd student`)."""
    results = []
    for c in contexts(ctx):
        entry = entry_for(c)
        meta = distributed.on_main(lambda e=entry: reuse_if_valid(e))  # may set a damaged one aside
        if meta is None:
            raise ConfigError(f"no trained {c.selected('teacher')} for this config in "
                              f"store {c.store.root}; run `kd teacher` (or `kd train`) with the "
                              "same overrides first")
        results.append({"status": "reused", "entry": entry, "meta": meta, "ctx": c})
    return results


def publish_all(teachers: list[dict[str, Any]], run_dir) -> None:
    for t in teachers:
        stage = "teacher" if len(teachers) == 1 else f"teacher-{t['ctx'].choice('teacher')}"
        publish(t["entry"], run_dir, stage)


def main(cfg) -> list[dict[str, Any]]:
    """`kd teacher`: stage 1 alone."""
    ctx = build_context(cfg)
    preflight(ctx)
    results = run_all(ctx)
    distributed.on_main(lambda: publish_all(results, ctx.run_dir))
    return results
