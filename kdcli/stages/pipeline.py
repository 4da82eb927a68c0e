"""`kd train`: teacher(s) -> soft-label cache -> [pretraining] -> student (+ baseline) -> report.

The cache is built only for a loss that reads teacher logits from it (student mode "cache"): a
feature loss runs the teacher online and `loss=ce` reads no teacher, so neither builds one.

Returns the distilled student's test top-1, the value a Hydra sweeper optimises.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from typing import Any

import torch
import torchvision

import kdcli
from kdcli import checkpoint, distributed
from kdcli.errors import TrainingDiverged
from kdcli.metrics import classification_metrics, confusion_matrix, profile_model, time_models
from kdcli.report import compression, student_warning, teacher_warning, write_report
from kdcli.stages import cache as cache_stage
from kdcli.stages import pretrain as pretrain_stage
from kdcli.stages import student as student_stage
from kdcli.stages import teacher as teacher_stage
from kdcli.stages.common import (
    NOT_NEEDED,
    Context,
    build_context,
    build_model,
    container,
    load_entry_weights,
    publish,
)

log = logging.getLogger(__name__)


def run(ctx: Context, started: float | None = None) -> dict[str, Any]:
    """All stages and the report; `started` is the `time.perf_counter()` the run's wall time
    counts from (main takes it before the dataset loads), now if None."""
    started = time.perf_counter() if started is None else started
    mode = student_stage.preflight(ctx)  # config-only checks, before anything trains
    pretrain_set = pretrain_stage.prepare(ctx)  # its data too, as the main dataset's
    teachers = teacher_stage.run_all(ctx)
    cache = None
    if mode == "cache":
        cache = cache_stage.run(ctx, teachers)
        if int(ctx.cfg.cache.get("check") or 0) > 0:
            distributed.on_main(
                lambda: cache_stage.check(ctx, teachers, cache, int(ctx.cfg.cache.check)))
    pretrained = pretrain_stage.run(ctx, pretrain_set)
    del pretrain_set  # its images are not needed past its stage
    student = student_stage.run(ctx, cache, teachers, pretrained)
    baseline = student_stage.run_baseline(ctx, teachers, pretrained) if ctx.cfg.baseline else None

    def finish() -> dict[str, Any]:
        teacher_stage.publish_all(teachers, ctx.run_dir)
        for stage, result in (("student", student), ("baseline", baseline)):
            if result is not None:
                publish(result["entry"], ctx.run_dir, stage)
        report = build_report(ctx, teachers, cache, pretrained, student, baseline, started)
        for warning in (teacher_warning(report), student_warning(report)):
            if warning is not None:
                log.warning("%s", warning)
        s, b = report["student"], report["baseline"]
        log.info("student %s: top-1 %.2f%% (baseline %s, teacher %.2f%%); report: %s",
                 s["name"], s["top1"], f"{b['top1']:.2f}%" if b else "off",
                 report["teacher"]["top1"], ctx.run_dir / "report.md")
        return report

    return distributed.on_main(finish)  # rank 0 writes the report; every rank returns it


def _test_logits(result: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    saved = checkpoint.load(result["entry"].file("test_logits.pt"))
    return saved["logits"], saved["labels"]


def _model_block(ctx: Context, role: str, result: dict[str, Any], teacher_logits=None
                 ) -> tuple[dict[str, Any], torch.nn.Module]:
    """Metrics and costs of one model but its latency (`_time_together`), and the model."""
    logits, labels = _test_logits(result)
    name = ctx.choice(role)
    block = {"name": name,
             **classification_metrics(logits, labels, teacher_logits, name=f"{role} {name}"),
             "train_time_s": result["meta"]["train_time_s"], "status": result["status"]}
    if "val_top1" in result["meta"]["metrics"]:  # with dataset.val_size
        block["val_top1"] = result["meta"]["metrics"]["val_top1"]
    model = load_entry_weights(build_model(ctx, role), result["entry"])
    model = model.float().to(memory_format=torch.contiguous_format)
    block.update(profile_model(model, ctx.dataset.image_shape))
    return block, model


def _time_together(ctx: Context, blocks: list[dict[str, Any]], models: list[torch.nn.Module]
                   ) -> dict[str, Any]:
    """Sets each block's `latency_ms` (median) and `latency_min_ms` (fastest call, what the
    speed-up divides), the models timed in turn under the load check `kd eval` and `kd export`
    make too (kdcli.metrics.latency_policy: one thread on a busy machine); returns the report's
    `latency` block."""
    timed, policy = time_models(models, ctx.dataset.image_shape)
    for block, median, fastest in zip(blocks, timed.median_ms, timed.min_ms, strict=True):
        block["latency_ms"], block["latency_min_ms"] = median, fastest
    return {**policy.record(), "speedup_from": "min"}


def _ensemble_block(blocks: list[dict[str, Any]], logits: torch.Tensor, labels: torch.Tensor,
                    weights: list[float]) -> dict[str, Any]:
    """The teachers as one model: accuracy of the combined logits (their `weights`, summing to
    1, in the mix), costs added up."""
    name = "+".join(b["name"] for b in blocks)
    block = {"name": name, **classification_metrics(logits, labels, name=f"teachers {name}"),
             "members": [b["name"] for b in blocks], "weights": weights}
    for key in ("params", "flops", "macs", "size_bytes", "latency_ms", "latency_min_ms",
                "train_time_s"):
        block[key] = sum(b[key] for b in blocks)
    return block


def _cache_block(cache: dict[str, Any]) -> dict[str, Any]:
    """The soft-label cache's footprint. `bytes_per_sample` is the train file's data region
    (every view, and the alignment padding after each array) per one of its `num_samples`;
    `disk_bytes` is the whole store entry, test file, headers and meta.json included (about
    20 % more for the 5,000/1,000 CIFAR-10 subset, more on a smaller dataset)."""
    block = {k: cache["meta"].get(k) for k in ("bytes_per_sample", "num_samples",
                                               "format_version", "storage", "topk", "views")}
    block["disk_bytes"] = sum(p.stat().st_size for p in cache["entry"].path.rglob("*")
                              if p.is_file())
    return block


def _pretrain_block(ctx: Context, pretrained: dict[str, Any]) -> dict[str, Any]:
    """The pretraining set (an experiment preset's dataset sizes apply to it too), its image
    counts and the pretrained student's result."""
    meta = pretrained["meta"]
    return {"dataset": str(ctx.cfg.pretrain.dataset), **pretrained["images"],
            "epochs": meta.get("epochs"), "top1": meta["metrics"]["top1"],
            "train_time_s": meta.get("train_time_s"), "status": pretrained["status"]}


def build_report(ctx: Context, teachers: list[dict], cache: dict | None,
                 pretrained: dict | None, student: dict, baseline: dict | None,
                 started: float) -> dict[str, Any]:
    """`cache` is None when the student's loss reads no cached logits (stage "not needed");
    `started` is the run's start (`time.perf_counter()`): write_report sets `wall_time_s` from
    it once the costs are profiled, the models timed and the plots drawn."""
    teacher_blocks, models = [], []
    for t in teachers:
        block, model = _model_block(t["ctx"], "teacher", t)
        teacher_blocks.append(block)
        models.append(model)
    member_logits = [_test_logits(t)[0] for t in teachers]
    labels = _test_logits(teachers[0])[1]
    weights = [1.0]
    if len(teachers) == 1:
        t_logits = member_logits[0]
    else:
        weights = (cache["meta"]["weights"] if cache is not None
                   else cache_stage.combine_weights(ctx, len(teachers)))
        t_logits = cache_stage.ensemble(member_logits, weights)
    student_block, student_model = _model_block(ctx, "student", student, t_logits)
    latency = _time_together(ctx, [*teacher_blocks, student_block], [*models, student_model])
    del models, student_model
    t_block = (teacher_blocks[0] if len(teachers) == 1
               else _ensemble_block(teacher_blocks, t_logits, labels, weights))
    init = student["meta"].get("init") or {}
    s_block = {**student_block, "mode": student["mode"],
               "init": student["entry"].inputs["init"],
               "init_copied": len(init.get("copied", [])),
               "init_skipped": init.get("skipped", [])}
    b_block = None
    if baseline is not None:
        b_logits, _ = _test_logits(baseline)
        b_block = {**classification_metrics(b_logits, labels, t_logits, name="baseline"),
                   "train_time_s": baseline["meta"]["train_time_s"],
                   "status": baseline["status"], "init": baseline["entry"].inputs["init"]}
    s_logits, _ = _test_logits(student)
    ds = ctx.dataset
    if len(teachers) == 1:
        stages = {"teacher": teachers[0]["status"]}
    else:
        stages = {f"teacher-{t['ctx'].choice('teacher')}": t["status"] for t in teachers}
    stages["cache"] = cache["status"] if cache is not None else NOT_NEEDED
    if pretrained is not None:
        stages["pretrain"] = pretrained["status"]
    stages["student"] = student["status"]
    if baseline is not None:
        stages["baseline"] = baseline["status"]
    entries = {"cache": cache, "pretrain": pretrained, "student": student, "baseline": baseline}
    entries.update({f"teacher-{t['ctx'].choice('teacher')}": t for t in teachers})
    report = {
        "kd_version": kdcli.__version__,
        "versions": {"kd": kdcli.__version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "python": platform.python_version()},
        "wall_time_s": None,  # set by write_report, after the report's own work
        "device": ctx.runtime.describe(),
        "ranks": distributed.world_size(),  # this run's processes (torchrun), 1 without
        "latency_threads": latency["threads"],
        "latency": latency,
        # test_fingerprint: `kd export` re-evaluates on the test split and checks it still
        # holds these images, not only as many of them.
        "dataset": {"name": ds.name, "num_classes": ds.num_classes, "train_size": len(ds.train),
                    "val_size": len(ds.val) if ds.val is not None else None,
                    "test_size": len(ds.test), "test_fingerprint": ds.test.fingerprint(),
                    "image_size": ds.image_shape[-1]},
        # The teacher(s), student and baseline evaluated each epoch, and chose best.pt, on it.
        "best_pt": {"split": ctx.selection_split,
                    "images": len(ds.val if ds.val is not None else ds.test)},
        "teacher": t_block,
        "teachers": teacher_blocks,
        "student": s_block,
        "baseline": b_block,
        "pretrain": _pretrain_block(ctx, pretrained) if pretrained is not None else None,
        "compression": compression(t_block, s_block),
        "distillation_gain": {"top1": s_block["top1"] - b_block["top1"]} if b_block else None,
        "cache": _cache_block(cache) if cache is not None else None,
        "stages": stages,
        "store": {k: str(v["entry"].path) for k, v in entries.items() if v is not None},
        "config": container(ctx.cfg),
    }
    histories = {p.stem: p for p in sorted((ctx.run_dir / "metrics").glob("*.csv"))}
    write_report(report, ctx.run_dir, histories=histories,
                 confusion=confusion_matrix(s_logits.argmax(-1), labels, ds.num_classes),
                 class_names=ds.classes, started=started)
    return report


def main(cfg) -> float:
    """`kd train`: all stages; returns the sweepers' objective (`objective`). A student whose
    test logits are not finite (top-1 NaN) fails the job after its report is written: a sweeper
    given NaN would abort the whole search (Optuna refuses the value), a failed job it skips."""
    started = time.perf_counter()  # the wall time includes the dataset load (ImageFolder decoding)
    ctx = build_context(cfg)
    report = run(ctx, started)
    if not math.isfinite(float(report["student"]["top1"])):
        raise TrainingDiverged(
            f"the distilled student's test logits are not finite (NaN/inf: an overflow at "
            f"evaluation?), so it has no accuracy; the report is in {ctx.run_dir}; try "
            "device.precision=fp32")
    return objective(report)


def objective(report: dict[str, Any]) -> float:
    """What a sweeper maximises: the student's top-1 on the validation split held out of
    train (`dataset.val_size`), else on the test split, which makes the search's best value
    optimistic."""
    student = report["student"]
    value = student.get("val_top1") if (report.get("best_pt") or {}).get("split") == "val" \
        else None
    return float(student["top1"] if value is None else value)
