"""Stage 1: train the teacher on hard labels (or reuse the stored one with the same key)."""

from __future__ import annotations

from typing import Any

from kdcli.errors import ConfigError
from kdcli.losses.ce import CrossEntropy
from kdcli.stages.common import (
    Context,
    build_context,
    publish,
    reuse_if_valid,
    train_entry,
    train_inputs,
)
from kdcli.store import Entry


def entry_for(ctx: Context) -> Entry:
    inputs = train_inputs(ctx, "teacher", "teacher_optimizer", "teacher_scheduler", "teacher")
    return ctx.store.entry("teacher", ctx.choice("teacher"), inputs)


def run(ctx: Context) -> dict[str, Any]:
    """Trains, resumes or reuses the teacher; returns {"status", "entry", "meta"}."""
    return train_entry(ctx, entry_for(ctx), role="teacher", loss_fn=CrossEntropy(),
                       optimizer="teacher_optimizer", scheduler="teacher_scheduler",
                       trainer="teacher", label="teacher")


def require(ctx: Context) -> dict[str, Any]:
    """The stored teacher for this config, without training one (for `kd cache`/`kd student`)."""
    entry = entry_for(ctx)
    meta = reuse_if_valid(entry)
    if meta is None:
        raise ConfigError(f"no trained teacher={ctx.choice('teacher')} for this config in store "
                          f"{ctx.store.root}; run `kd teacher` (or `kd train`) with the same "
                          "overrides first")
    return {"status": "reused", "entry": entry, "meta": meta}


def main(cfg) -> dict[str, Any]:
    """`kd teacher`: stage 1 alone."""
    ctx = build_context(cfg)
    result = run(ctx)
    publish(result["entry"], ctx.run_dir, "teacher")
    return result
