"""Consistent augmented views: the student trains on exactly the pixels the teacher labelled.

The classic bug is a cache that ignores augmentation (teacher logits of the clean image paired
with an augmented student input) or the shuffling order (logits looked up by batch position
instead of sample index). These tests replay the student's own batches through the teacher and
compare with what the cache serves.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from kdcli.errors import CorruptArtifact
from kdcli.stages import cache as cache_stage
from kdcli.stages import teacher as teacher_stage
from kdcli.stages.common import build_context, build_model, load_weights
from kdcli.stages.student import CachedTeacher


def _context(tmp: Path, *overrides: str):
    with initialize_config_module(config_module="kdcli.configs", version_base="1.3"):
        cfg = compose(config_name="kd_train", overrides=[
            "experiment=smoke", "device=cpu", f"store={tmp / 'store'}", *overrides])
    return build_context(cfg, run_dir=tmp / "run")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("views")
    ctx = _context(tmp, "cache.views=3")
    teachers = teacher_stage.run_all(ctx)
    cache = cache_stage.run(ctx, teachers)
    teacher = load_weights(build_model(ctx, "teacher"), teachers[0]["entry"].file("last.pt"))
    return tmp, ctx, teachers, cache, teacher.eval()


def _live(teacher: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return teacher(images)


@pytest.mark.parametrize("data", ["auto", "host"])
def test_cached_logits_are_the_teachers_on_the_replayed_views(built, data) -> None:
    # data=host: the cache stays in its memory-mapped file (as on a GPU it would crowd) and
    # each batch's rows are found by the host copies of its index and views.
    _, ctx, _, cache, teacher = built
    served = CachedTeacher(cache, dataclasses.replace(ctx.runtime, data=data))
    assert served.views is not None and served.views.k == 3
    assert served.lookup.resident == (data == "auto")
    loader = ctx.loader("train", 64, train=True, views=served.views)
    for epoch in (0, 1):  # shuffled, every sample one of its views
        for batch in loader.epoch(epoch):
            asked = dataclasses.replace(batch, index=None, view=None) if data == "host" else batch
            torch.testing.assert_close(served(asked).logits, _live(teacher, batch.images),
                                       atol=2e-2, rtol=2e-3)


def test_views_differ_and_epochs_pick_different_views(built) -> None:
    _, ctx, _, cache, _ = built
    served = CachedTeacher(cache, ctx.runtime)
    logits = served.lookup.tensors["logits"]
    assert not torch.allclose(logits[:, 0].float(), logits[:, 1].float())
    loader = ctx.loader("train", 512, train=True, views=served.views)
    first, second = (next(iter(loader.epoch(e))) for e in (0, 1))
    picked = {int(i): int(v) for i, v in zip(first.index, first.view, strict=True)}
    again = {int(i): int(v) for i, v in zip(second.index, second.view, strict=True)}
    assert set(picked.values()) == {0, 1, 2}
    assert any(picked[i] != again[i] for i in picked)


def test_naive_clean_cache_does_not_match_augmented_inputs(built) -> None:
    # The bug these views exist to avoid: clean-image logits for an augmented student input.
    tmp, _, _, _, teacher = built
    ctx = _context(tmp, "cache.views=0")
    naive = cache_stage.run(ctx, teacher_stage.run_all(ctx))
    served = CachedTeacher(naive, ctx.runtime)
    assert served.views is None
    batch = next(iter(ctx.loader("train", 256, train=True).epoch(0)))
    error = (served(batch).logits - _live(teacher, batch.images)).abs().max()
    assert error > 0.1


def test_check_mode_confirms_and_catches_a_wrong_view(built, monkeypatch) -> None:
    _, ctx, teachers, cache, _ = built
    assert cache_stage.check(ctx, teachers, cache, samples=48) < 2e-2
    real = cache_stage.ViewTable.from_arrays

    def flipped(arrays):
        table = real(arrays)
        return cache_stage.ViewTable(table.offsets, ~table.flips)

    monkeypatch.setattr(cache_stage.ViewTable, "from_arrays", staticmethod(flipped))
    with pytest.raises(CorruptArtifact, match="replayed views"):
        cache_stage.check(ctx, teachers, cache, samples=48)


def test_bytes_per_sample_grow_with_views(built) -> None:
    _, _, _, cache, _ = built
    # 3 views x (10 float16 logits + 2 crop offsets + 1 flip) = 69 bytes.
    assert cache["meta"]["bytes_per_sample"] == 69
    assert cache["meta"]["views"] == 3


def test_cache_stage_compiles_the_teacher_under_device_compile(built, monkeypatch) -> None:
    # The stage is one long teacher inference: under device.compile it runs compiled (in the
    # configured mode), as the hand-written reference of bench_speed does, with the same logits.
    from kdcli.store import Store

    tmp, ctx, teachers, cache, _ = built
    modes = []
    real = torch.compile

    def spy(module, mode="default", **kw):
        modes.append(mode)
        # The mode is recorded, not passed on: older torch (2.4) hands it to the eager backend,
        # which takes no options.
        return real(module, backend="eager")

    monkeypatch.setattr(torch, "compile", spy)
    runtime = dataclasses.replace(ctx.runtime, compile=True, compile_mode="max-autotune")
    compiled_ctx = dataclasses.replace(ctx, runtime=runtime, store=Store(tmp / "compiled"))
    compiled_teachers = [{**t, "ctx": dataclasses.replace(t["ctx"], runtime=runtime)}
                         for t in teachers]
    try:
        again = cache_stage.run(compiled_ctx, compiled_teachers)
    finally:
        torch._dynamo.reset()
    assert again["status"] == "trained" and modes == ["max-autotune"]
    for split in cache_stage.SPLITS:
        torch.testing.assert_close(cache_stage.open_split(again, split).all_views(),
                                   cache_stage.open_split(cache, split).all_views())
