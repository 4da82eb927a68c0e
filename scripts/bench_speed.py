"""Speed benchmark: kd's stages against plain PyTorch loops on the same model, data and settings.

Everything runs in one process, kd and the reference interleaved round by round (the order
alternating), after one warm-up round each, so load on the machine hits both alike. kd runs its
own code: the engine's `train_epoch` (the loop `fit` runs each epoch, timed from the first batch
drawn to the last metric read) with kd's BatchLoader, loss, optimizer and scheduler from the
composed config; the cache stage through `kdcli.stages.cache.run` (its whole wall time: building
the teacher, loading its weights, inference on both splits, writing and checksumming the files).

Rows (per precision):
  teacher          kd's engine vs a hand-written loop: uint8 images in memory, batched random crop
                   + flip, SGD, the same precision and memory format   target >= 0.9
                   ... and vs a torchvision-transforms DataLoader loop (for reference)
  cache            kd's cache stage vs raw teacher inference over the same images   >= 0.9
  student (cache)  kd from the soft-label cache vs a hand-written student-only loop with the same
                   KL loss on precomputed logits                                    >= 0.9
  cache vs online  kd from the cache vs kd's online-teacher mode (FitNets, live teacher) >= 2

    python scripts/bench_speed.py                          # resnet56 -> resnet20, CIFAR-10 pack
    python scripts/bench_speed.py --subset                 # embedded 5k/1k subset, no download
    python scripts/bench_speed.py --device cuda --precision bf16 --steps 50 --compile
    python scripts/bench_speed.py --device cuda --precision bf16 --compile reduce-overhead

Default settings take about 8 minutes on a quiet 2-core CPU (fp32 and bf16); `--steps` and
`--rounds` scale it. Prints one Markdown table and writes it with the raw figures (every round,
peak RSS per timed section, cache bytes per sample) to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import kdcli
from kdcli import checkpoint, engine
from kdcli.data.datasets import Split
from kdcli.device import _fast_precision, resolve
from kdcli.losses.ce import CrossEntropy
from kdcli.metrics import count_flops
from kdcli.stages import cache as cache_stage
from kdcli.stages import teacher as teacher_stage
from kdcli.stages.common import Context, build, build_context, build_model, setup_feature_loss
from kdcli.stages.student import CachedTeacher, OnlineTeacher, build_loss
from kdcli.store import Store

# ---------------------------------------------------------------------------------------------
# Memory: the peak resident set of each timed section (Linux resets VmHWM on writing 5 to
# /proc/self/clear_refs); elsewhere the process peak so far.


def reset_peak(device: torch.device) -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    if device.type == "cuda":  # only then: a CPU benchmark on a GPU host leaves CUDA alone
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(field: str = "VmHWM") -> float:
    """Peak resident set since the last reset (VmHWM), or the current one (VmRSS), in MiB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# The references: what a person writes by hand.


class PlainTrain:
    """A plain training loop: uint8 images held on the device, each batch indexed, randomly
    cropped (pad 4) and flipped in one gather, normalised, then forward/backward/SGD under the
    same autocast and memory format as kd. With `teacher_logits`, the Hinton KD loss on them."""

    def __init__(self, model: torch.nn.Module, split: Split, *, batch: int, device: torch.device,
                 precision: str, channels_last: bool, mean, std, lr: float = 0.05,
                 teacher_logits: torch.Tensor | None = None, temperature: float = 4.0,
                 ce_weight: float = 1.0, kd_weight: float = 0.9,
                 compile: str | None = None) -> None:
        self.device, self.batch = device, batch
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=self.fmt).train()
        if compile:  # like for like with kd's device.compile=<mode>
            self.model = torch.compile(self.model, mode=compile)
        self.padded = F.pad(split.gather_to(device), (4, 4, 4, 4))  # padded once, up front
        self.labels = split.labels.to(device)
        self.teacher = None if teacher_logits is None else teacher_logits.to(device)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                   weight_decay=5e-4)
        self.t, self.ce_w, self.kd_w = temperature, ce_weight, kd_weight
        self.perm = torch.empty(0, dtype=torch.long, device=device)
        self.h, self.w = split.image_shape[-2:]
        self.channels = torch.arange(split.image_shape[0], device=device)[None, :, None, None]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.perm) < self.batch:
            self.perm = torch.randperm(len(self.labels), device=self.device)
        idx, self.perm = self.perm[:self.batch], self.perm[self.batch:]
        dev, n = self.device, len(idx)
        dy, dx = torch.randint(0, 9, (2, n, 1), device=dev)
        rows = dy + torch.arange(self.h, device=dev)
        cols = dx + torch.arange(self.w, device=dev)
        cols = torch.where(torch.rand(n, 1, device=dev) < 0.5, cols.flip(1), cols)
        x = self.padded[idx[:, None, None, None], self.channels, rows[:, None, :, None],
                        cols[:, None, None, :]]
        x = (x.to(torch.float32, memory_format=self.fmt) - self.mean) / self.std
        return x, idx

    def loss(self, out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(out.float(), self.labels[idx])
        if self.teacher is None:
            return ce
        t = self.t
        kd = F.kl_div(F.log_softmax(out.float() / t, -1), F.log_softmax(self.teacher[idx] / t, -1),
                      log_target=True, reduction="batchmean") * t * t
        return self.ce_w * ce + self.kd_w * kd

    def run(self, steps: int) -> tuple[int, float]:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            x, idx = self.next_batch()
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                loss = self.loss(self.model(x), idx)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        float(loss.detach())  # waits for the device
        return steps * self.batch, time.perf_counter() - t0


class TorchvisionTrain(PlainTrain):
    """The textbook loop: a Dataset of PIL images with torchvision transforms (RandomCrop(32,
    padding=4), RandomHorizontalFlip, ToTensor, Normalize) behind a DataLoader with workers.

    The workers start, and deliver the first batch, before the clock starts, and stop when the
    round ends, so they never take CPU from the other sections.
    """

    def __init__(self, model, split: Split, *, workers: int, **kw) -> None:
        super().__init__(model, split, **kw)
        import torchvision.transforms as T

        tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(kw["mean"], kw["std"])])
        self.loader = torch.utils.data.DataLoader(
            _PilDataset(split, tf), batch_size=self.batch, shuffle=True, drop_last=True,
            num_workers=workers, pin_memory=self.device.type == "cuda")

    def run(self, steps: int) -> tuple[int, float]:
        it = iter(self.loader)
        batch = next(it)
        sync(self.device)
        t0 = time.perf_counter()
        for i in range(steps):
            x, y = batch if i == 0 else next(it)
            x = x.to(self.device, non_blocking=True, memory_format=self.fmt)
            y = y.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                loss = F.cross_entropy(self.model(x).float(), y)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        float(loss.detach())
        seconds = time.perf_counter() - t0
        del it  # stops the workers
        return steps * self.batch, seconds


class _PilDataset(torch.utils.data.Dataset):
    def __init__(self, split: Split, transform) -> None:
        self.hwc = split.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = split.labels.numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.hwc[i])), int(self.labels[i])


class PlainInference:
    """Raw teacher inference: the teacher over uint8 batches, normalised, logits kept."""

    def __init__(self, model, splits: list[Split], *, batch: int, device, precision,
                 channels_last, mean, std, compile: str | None = None) -> None:
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=self.fmt).eval()
        if compile:
            self.model = torch.compile(self.model, mode=compile)
        self.images = [s.gather_to(device) for s in splits]
        self.batch, self.device = batch, device
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    @torch.inference_mode()
    def run(self) -> tuple[int, float]:
        sync(self.device)
        t0 = time.perf_counter()
        n = 0
        for images in self.images:
            out = []
            for i in range(0, len(images), self.batch):
                x = (images[i:i + self.batch].to(torch.float32, memory_format=self.fmt)
                     - self.mean) / self.std
                with torch.autocast(self.device.type, dtype=self.dtype,
                                    enabled=self.dtype is not None):
                    out.append(self.model(x).float())
            torch.cat(out).cpu()
            n += len(images)
        return n, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------


class Rounds:
    """Timed sections run round-robin; round 0 is warm-up. Keeps images, seconds and peak RSS."""

    def __init__(self, rounds: int, device: torch.device) -> None:
        self.rounds, self.device = rounds, device
        self.results: dict[str, list[dict[str, float]]] = {}

    def play(self, sections: dict[str, Callable[[int], tuple[int, float]]]) -> None:
        names = list(sections)
        for r in range(self.rounds + 1):
            shift = r % len(names)  # rotate the order so no side always runs first
            for name in names[shift:] + names[:shift]:
                gc.collect()
                reset_peak(self.device)
                before = peak_mib("VmRSS")
                images, seconds = sections[name](r)
                record = {"round": r, "images": images, "seconds": seconds,
                          "images_per_s": images / seconds, "peak_rss_mib": peak_mib(),
                          "rss_before_mib": before}
                if self.device.type == "cuda":
                    record["peak_cuda_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
                self.results.setdefault(name, []).append(record)
                print(f"  round {r}{' (warm-up)' if r == 0 else ''}  {name:<22} "
                      f"{record['images_per_s']:8.1f} img/s", file=sys.stderr, flush=True)

    def profile(self, sections: dict[str, Callable[[int], tuple[int, float]]], path: Path,
                r: int) -> None:
        """One more round of each section (as round `r`) under cProfile (where host time goes,
        waits on the device included) and torch.profiler (operators' host and device time);
        the top entries of both are appended to `path`."""
        import cProfile
        import io
        import pstats

        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        for name, section in sections.items():
            sync(self.device)
            prof = cProfile.Profile()
            with torch_profile(activities=activities) as tprof:
                prof.enable()
                images, seconds = section(r)
                prof.disable()
                sync(self.device)
            stats = io.StringIO()
            pstats.Stats(prof, stream=stats).sort_stats("cumulative").print_stats(30)
            sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            with path.open("a") as fh:
                fh.write(f"\n==== {name}: {images / seconds:.1f} img/s under the profilers\n")
                fh.write(stats.getvalue())
                fh.write(tprof.key_averages().table(sort_by=sort, row_limit=25))

    def rate(self, name: str) -> float:
        """Images per second over the timed rounds (total images / total time)."""
        timed = [x for x in self.results[name] if x["round"] > 0]
        return sum(x["images"] for x in timed) / sum(x["seconds"] for x in timed)

    def spread(self, name: str) -> float:
        rates = [x["images_per_s"] for x in self.results[name] if x["round"] > 0]
        return statistics.pstdev(rates) / statistics.mean(rates) if len(rates) > 1 else 0.0

    def peak(self, name: str, field: str = "peak_rss_mib") -> float | None:
        values = [x[field] for x in self.results[name] if x["round"] > 0 and field in x]
        return max(values) if values else None


def compose(args: argparse.Namespace, precision: str, extra: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    data = (["dataset=cifar10_subset"] if args.subset else
            ["dataset=cifar10", f"dataset.loader.root={args.data}",
             f"dataset.train_size={args.cache_images}", f"dataset.test_size={args.test_images}"])
    overrides = [
        *data, f"teacher={args.teacher}", f"student={args.student}", f"device={args.device}",
        f"device.precision={precision}", "device.channels_last=auto",
        f"device.compile={args.compile or 'false'}", f"seed={args.seed}",
        f"trainer.teacher.batch_size={args.batch}", f"trainer.student.batch_size={args.batch}",
        f"cache.batch_size={args.cache_batch}", f"store={args.store}", *extra,
    ]
    if args.threads:
        overrides.append(f"device.threads={args.threads}")
    with initialize_config_module("kdcli.configs", version_base="1.3"):
        return hydra_compose("kd_train", overrides=overrides)


def kd_trainer(ctx: Context, role: str, loss_fn, optimizer: str, scheduler: str, epochs: int,
               teacher=engine.no_teacher, features: bool = False):
    """kd's own training step and loader for `role`, built as `train_entry` builds them."""
    torch.manual_seed(int(ctx.cfg.seed))
    model = build_model(ctx, role)
    loader = ctx.loader("train", int(ctx.cfg.trainer[role].batch_size), train=True)
    taps = setup_feature_loss(ctx, model, loss_fn, teacher, loader) if features else None
    loss_fn.to(ctx.runtime.device)
    params = list(model.parameters()) + list(loss_fn.parameters())
    opt = build(ctx.cfg[optimizer], optimizer, params=params)
    sched = build(ctx.cfg[scheduler], scheduler, optimizer=opt, epochs=epochs,
                  steps_per_epoch=len(loader))
    step = engine.TrainStep(model=model, loss_fn=loss_fn, optimizer=opt, scheduler=sched,
                            runtime=ctx.runtime, teacher=teacher, student_taps=taps)

    def run(r: int) -> tuple[int, float]:
        stats = engine.train_epoch(step, loader, r)
        return stats.images, stats.time_s

    return model, run


def plain_model(ctx: Context, role: str) -> torch.nn.Module:
    """The same architecture, built straight from its constructor (not through kd)."""
    from hydra.utils import get_method
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(ctx.cfg[role], resolve=True)
    kwargs = {k: v for k, v in node.items() if k not in ("_target_", "init")}
    torch.manual_seed(int(ctx.cfg.seed))
    return get_method(node["_target_"])(num_classes=ctx.dataset.num_classes, **kwargs)


def online_overrides(ctx: Context) -> list[str]:
    """FitNets on the middle stage: `layer2` for the CIFAR ResNets, `block2` for WRN and others."""
    names = dict(build_model(ctx, "student").named_modules())
    layer = "layer2" if "layer2" in names else "block2"
    return ["loss=fitnets", f"loss.student_layer={layer}", f"loss.teacher_layer={layer}"]


def bench_precision(args, precision: str, base: Context, memory: bool
                    ) -> tuple[list[dict], dict]:
    cfg = compose(args, precision, [])
    runtime = resolve(cfg.device)
    ctx = dataclasses.replace(base, cfg=cfg, runtime=runtime,
                              store=Store(Path(args.store) / precision))
    ds = ctx.dataset
    n_train = args.steps * args.batch
    if len(ds.train) < n_train:
        raise SystemExit(f"--steps x --batch = {n_train} exceeds the {len(ds.train)} training "
                         "images; raise --cache-images or lower --steps")
    # Training phases run `steps` steps per round on the first n_train images: an epoch of kd's
    # loader is exactly one round, and its sample indices are rows of the cache built below.
    prefix = ds.train.select(torch.arange(n_train))
    tctx = ctx.variant(cfg, {}, dataset=dataclasses.replace(ds, train=prefix))
    kw = {"batch": args.batch, "device": runtime.device, "precision": precision,
          "channels_last": runtime.channels_last, "mean": ds.mean, "std": ds.std,
          "compile": args.compile}
    epochs = args.rounds + 1 + args.profile  # --profile: one more round of each section
    print(f"[{precision}] {runtime.describe()}, {torch.get_num_threads()} threads",
          file=sys.stderr, flush=True)

    # (a) teacher stage
    teacher_model, kd_teacher = kd_trainer(tctx, "teacher", CrossEntropy(), "teacher_optimizer",
                                           "teacher_scheduler", epochs)
    plain = PlainTrain(plain_model(tctx, "teacher"), prefix, **kw)
    sections = {"kd teacher": kd_teacher, "plain teacher": lambda r: plain.run(args.steps)}
    if args.tv_workers >= 0:
        tv = TorchvisionTrain(plain_model(tctx, "teacher"), prefix, workers=args.tv_workers, **kw)
        sections["torchvision teacher"] = lambda r: tv.run(args.steps)
    rounds = Rounds(args.rounds, runtime.device)
    rounds.play(sections)

    # The teacher just trained becomes a store entry, as the teacher stage would leave it.
    entry = teacher_stage.entry_for(ctx)
    checkpoint.save({"model": teacher_model.state_dict(), "epoch": 0}, entry.file("last.pt"))
    meta = entry.finish(["last.pt"], {"name": ctx.choice("teacher"), "metrics": {"top1": 0.0}})
    teachers = [{"entry": entry, "meta": meta, "ctx": ctx}]
    teacher_state = {k: v.detach().cpu() for k, v in teacher_model.state_dict().items()}
    del teacher_model

    # (b) cache stage: the whole stage, from building the teacher to the checksummed files
    built: dict = {}

    def kd_cache(r: int) -> tuple[int, float]:
        if "cache" in built:
            import shutil

            shutil.rmtree(built.pop("cache")["entry"].path)
        t0 = time.perf_counter()
        built["cache"] = cache_stage.run(ctx, teachers)
        seconds = time.perf_counter() - t0
        return len(ds.train) + len(ds.test), seconds

    infer_model = plain_model(ctx, "teacher")
    infer_model.load_state_dict(teacher_state)
    infer = PlainInference(infer_model, [ds.train, ds.test], **{**kw, "batch": args.cache_batch})
    cache_sections = {"kd cache": kd_cache, "raw teacher inference": lambda r: infer.run()}
    rounds.play(cache_sections)
    if args.profile:
        rounds.profile(cache_sections, args.out / f"profile-{precision}.txt", epochs - 1)
    cache = built["cache"]

    # (c) student from the cache, (d) student with the live teacher (kd's online mode)
    cached = CachedTeacher(cache, runtime)
    _, kd_student = kd_trainer(tctx, "student", build_loss(tctx), "optimizer", "scheduler",
                               epochs, teacher=cached)
    logits = cache_stage.open_split(cache, "train").all_logits()[:n_train]
    loss_cfg = tctx.cfg.loss
    plain_student = PlainTrain(plain_model(tctx, "student"), prefix, teacher_logits=logits,
                               temperature=float(loss_cfg.temperature),
                               ce_weight=float(loss_cfg.ce_weight),
                               kd_weight=float(loss_cfg.kd_weight), **kw)
    octx = tctx.variant(compose(args, precision, online_overrides(tctx)), {})
    online_loss = build_loss(octx)
    live = OnlineTeacher(teachers[0], list(online_loss.teacher_layers))
    _, kd_online = kd_trainer(octx, "student", online_loss, "optimizer", "scheduler", epochs,
                              teacher=live, features=True)
    student_sections = {"kd student (cache)": kd_student,
                        "plain student": lambda r: plain_student.run(args.steps),
                        "kd student (online)": kd_online}
    rounds.play(student_sections)
    if args.profile:
        rounds.profile(student_sections, args.out / f"profile-{precision}.txt", epochs - 1)

    def row(stage, kd_name, ref_name, reference, target):
        kd_rate, ref_rate = rounds.rate(kd_name), rounds.rate(ref_name)
        return {"stage": stage, "precision": precision, "kd_images_per_s": kd_rate,
                "reference": reference, "reference_images_per_s": ref_rate,
                "ratio": kd_rate / ref_rate, "target": target,
                "kd_peak_rss_mib": rounds.peak(kd_name), "ref_peak_rss_mib": rounds.peak(ref_name),
                "kd_peak_cuda_mib": rounds.peak(kd_name, "peak_cuda_mib"),
                "ref_peak_cuda_mib": rounds.peak(ref_name, "peak_cuda_mib"),
                "kd_spread": rounds.spread(kd_name), "ref_spread": rounds.spread(ref_name)}

    rows = [row("teacher", "kd teacher", "plain teacher",
                "plain loop, uint8 in memory, batched crop+flip", 0.9)]
    if args.tv_workers >= 0:
        rows.append(row("teacher", "kd teacher", "torchvision teacher",
                        f"torchvision transforms + DataLoader ({args.tv_workers} workers)", None))
    rows += [
        row("cache", "kd cache", "raw teacher inference", "raw teacher inference", 0.9),
        row("student (cache)", "kd student (cache)", "plain student",
            "plain student-only loop, KL on precomputed logits", 0.9),
        row("student (cache)", "kd student (cache)", "kd student (online)",
            f"kd online teacher ({octx.cfg.loss._target_.rsplit('.', 1)[-1]})", 2.0),
    ]
    if memory:
        peaks = stage_memory(args, precision, online_overrides(tctx), Path(args.store).parent /
                             f"memory-{precision}")
        for r, names in zip(rows, ([["kd teacher"]] * (2 if args.tv_workers >= 0 else 1)
                                   + [["kd cache"], ["kd student (cache)"],
                                      ["kd student (cache)", "kd student (online)"]]),
                            strict=True):
            r["stage_peak_rss_mib"] = [peaks[n] for n in names]
    flops = {role: count_flops(build_model(tctx, role), tuple(ds.image_shape))
             for role in ("teacher", "student")}
    extra = {"rounds": rounds.results, "runtime": runtime.describe(), "flops": flops,
             "threads": torch.get_num_threads(),
             # The train file's data region per training sample: its logits (every view) and
             # the alignment padding after them (under 64 bytes per array); the whole entry
             # adds the files' headers, the test split's logits and meta.json.
             "cache_bytes_per_sample": cache["meta"]["bytes_per_sample"],
             "cache_disk_bytes": sum(p.stat().st_size for p in cache["entry"].path.rglob("*")
                                     if p.is_file()),
             "cache_samples": cache["meta"]["num_samples"],
             "train_images_per_round": n_train,
             "cache_images_per_round": len(ds.train) + len(ds.test)}
    if memory:
        extra["stage_memory"] = peaks
    return rows, extra


# Runs a module as `python -m` would, then writes the process's own peak RSS (VmHWM, KiB) to a
# file at exit: a fresh exec starts a fresh high-water mark, unlike a child's ru_maxrss, which
# Linux carries over from the forked copy of the parent.
_REPORT_PEAK = """
import atexit, runpy, sys
out, module = sys.argv[1], sys.argv[2]
def report():
    with open("/proc/self/status") as fh:
        kib = next(line.split()[1] for line in fh if line.startswith("VmHWM:"))
    with open(out, "w") as fh:
        fh.write(kib)
atexit.register(report)
sys.argv = ["kd", *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def stage_memory(args, precision: str, online: list[str], workdir: Path) -> dict[str, float]:
    """Peak RSS (MiB) of each real kd stage run alone in a fresh process (`kd teacher`, `kd
    cache`, `kd student` from the cache and with the live teacher), one epoch of the benchmark's
    training images from the embedded subset, plus the bare interpreter with torch and kd
    imported. The student stage in cache mode builds no teacher: its peak shows it."""
    common = [
        "dataset=cifar10_subset", f"dataset.train_size={args.steps * args.batch}",
        f"dataset.test_size={args.test_images}", f"teacher={args.teacher}",
        f"student={args.student}", f"device={args.device}", f"device.precision={precision}",
        "device.channels_last=auto", "trainer.teacher.epochs=1", "trainer.student.epochs=1",
        f"trainer.teacher.batch_size={args.batch}", f"trainer.student.batch_size={args.batch}",
        f"cache.batch_size={args.cache_batch}", f"store={workdir / 'store'}", f"seed={args.seed}",
    ]
    kd = ["kdcli.cli"]
    runs = {
        "python + torch + kd": ["kdcli.stages.pipeline"],
        "kd teacher": [*kd, "teacher", *common],
        "kd cache": [*kd, "cache", *common],
        "kd student (cache)": [*kd, "student", *common],
        "kd student (online)": [*kd, "student", *common, *online],
    }
    peaks = {}
    workdir.mkdir(parents=True, exist_ok=True)
    for i, (name, argv) in enumerate(runs.items()):
        log, peak = workdir / f"{i}.log", workdir / f"{i}.peak"
        run_dir = [f"hydra.run.dir={workdir / str(i)}"] if argv[0] == "kdcli.cli" else []
        with open(log, "w") as fh:
            proc = subprocess.run([sys.executable, "-c", _REPORT_PEAK, str(peak), *argv, *run_dir],
                                  stdout=fh, stderr=fh)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{log.read_text()[-3000:]}")
        peaks[name] = int(peak.read_text()) / 1024
        print(f"  {name:<22} peak RSS {peaks[name]:6.0f} MiB (fresh process)", file=sys.stderr,
              flush=True)
    return peaks


def markdown(rows: list[dict], extras: dict, args, rss_base: float) -> str:
    lines = ["| stage | precision | kd img/s | reference | ref img/s | kd / ref | target "
             "| kd stage peak RSS (MiB) |",
             "| --- | --- | ---: | --- | ---: | ---: | --- | ---: |"]
    for r in rows:
        target = "" if r["target"] is None else f">= {r['target']:g}"
        ok = "" if r["target"] is None else (" ✓" if r["ratio"] >= r["target"] else " ✗")
        rss = r.get("stage_peak_rss_mib")
        rss = "" if rss is None else "/".join(f"{x:.0f}" for x in rss)
        lines.append(f"| {r['stage']} | {r['precision']} | {r['kd_images_per_s']:.0f} "
                     f"| {r['reference']} | {r['reference_images_per_s']:.0f} "
                     f"| **{r['ratio']:.2f}**{ok} | {target} | {rss} |")
    first = next(iter(extras.values()))
    memory = next((e["stage_memory"] for e in extras.values() if "stage_memory" in e), None)
    lines += ["", f"{args.teacher} -> {args.student}, batch {args.batch}, {args.steps} steps x "
              f"{args.rounds} timed rounds (+1 warm-up), interleaved; "
              f"{first['cache_images_per_round']} images per cache round; "
              f"{first['runtime']}, {first['threads']} threads; cache "
              f"{first['cache_bytes_per_sample']:.2f} bytes per training sample (the train "
              f"file's logits and alignment padding; the whole store entry "
              f"{first['cache_disk_bytes'] / first['cache_samples']:.1f}); process RSS before the "
              f"first stage (torch, data) {rss_base:.0f} MiB; torch {torch.__version__}."]
    f_t, f_s = first["flops"]["teacher"], first["flops"]["student"]
    lines[-1] += (f" Forward FLOPs per image: teacher {f_t / 1e6:.0f} M, student "
                  f"{f_s / 1e6:.0f} M, so cache vs online can reach about 1 + F_t / (3 F_s) = "
                  f"{1 + f_t / (3 * f_s):.2f} (a training step ~ 3 forwards).")
    gpu = [r for r in rows if r.get("kd_peak_cuda_mib") is not None]
    if gpu:
        lines[-1] += " Peak GPU memory allocated (MiB, kd / reference): " + "; ".join(
            f"{r['stage']} {r['precision']} vs {r['reference']}: {r['kd_peak_cuda_mib']:.0f} / "
            f"{r['ref_peak_cuda_mib']:.0f}" for r in gpu) + "."
    if memory:
        lines[-1] += (f" Peak RSS: each kd stage alone in a fresh process, one epoch of the "
                      f"same images from the embedded subset (python + torch + kd imported: "
                      f"{memory['python + torch + kd']:.0f} MiB); online row: cache / online.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path,
                    default=Path(os.environ.get("KD_CIFAR10", "../shared/data/cifar10-jpeg")),
                    help="CIFAR-10 pack (train.npz/test.npz) or cifar-10-batches-py")
    ap.add_argument("--subset", action="store_true", help="use the embedded 5k/1k subset")
    ap.add_argument("--teacher", default="resnet56")
    ap.add_argument("--student", default="resnet20")
    ap.add_argument("--device", default="cpu", help="device config: cpu, cuda, auto")
    ap.add_argument("--precision", nargs="+", default=None,
                    help="each benchmarked separately (default: fp32, plus what precision "
                         "auto picks: bf16 where fast, fp16 on GPUs without bf16)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="training steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (after 1 warm-up)")
    ap.add_argument("--cache-images", type=int, default=5000, help="train images (full pack)")
    ap.add_argument("--test-images", type=int, default=1000, help="test images (full pack)")
    ap.add_argument("--cache-batch", type=int, default=256)
    ap.add_argument("--tv-workers", type=int, default=2,
                    help="DataLoader workers of the torchvision row (-1: skip the row)")
    ap.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                    help="torch.compile kd's models (device.compile=MODE) and the references', "
                         "in torch.compile's MODE (default; reduce-overhead: CUDA graphs)")
    ap.add_argument("--threads", type=int, default=None, help="default: one per usable core")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory", action="store_true",
                    help="skip the per-stage peak RSS runs (fresh processes)")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed rounds, one more round of the cache and student "
                         "sections under cProfile and torch.profiler: <out>/profile-*.txt")
    ap.add_argument("--out", type=Path, default=Path("bench/speed"))
    args = ap.parse_args()
    args.data = args.data.expanduser().resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    logging_setup()

    with tempfile.TemporaryDirectory(prefix="kd-speed-") as tmp:
        args.store = Path(tmp) / "store"
        base_cfg = compose(args, "fp32", [])
        base = build_context(base_cfg, run_dir=Path(tmp) / "run")
        rss_base = peak_mib("VmRSS")
        device = base.runtime.device
        fast = _fast_precision(device)  # bf16, fp16 on GPUs without bf16, fp32 on other CPUs
        precisions = args.precision or ["fp32", *([fast] if fast != "fp32" else [])]
        rows, extras = [], {}
        for i, precision in enumerate(precisions):
            # Stage memory once, for the last precision (bf16 where fast: what `auto` picks).
            memory = not args.no_memory and i == len(precisions) - 1
            r, e = bench_precision(args, precision, base, memory)
            rows += r
            extras[precision] = e
    table = markdown(rows, extras, args, rss_base)
    print(table)
    (args.out / "speed.md").write_text(table + "\n")
    (args.out / "speed.json").write_text(json.dumps({
        "rows": rows, "per_precision": extras, "args": {k: str(v) for k, v in vars(args).items()},
        "versions": {"kd": kdcli.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "peak_rss_mib_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_first_stage_mib": rss_base,
    }, indent=2))


def logging_setup() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    main()
