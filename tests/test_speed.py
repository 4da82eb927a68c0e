"""The training loop's speed contract: no host sync per step, bookkeeping read once per epoch.

The speed figures themselves come from `scripts/bench_speed.py` (a benchmark, not a test)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdcli import engine, softlabels
from kdcli.data.datasets import Split
from kdcli.data.loader import BatchLoader
from kdcli.data.transforms import CropFlip, RandomResizedCrop
from kdcli.device import Runtime
from kdcli.losses.base import Outputs
from kdcli.losses.ce import CrossEntropy
from kdcli.losses.hinton import HintonKD


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def setup(device: torch.device, precision: str = "fp32", teacher=engine.no_teacher, loss=None,
          n: int = 64, augment=None, resident: bool = True):
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8),
                  torch.randint(0, 10, (n,), generator=g))
    runtime = Runtime(device, precision, channels_last=precision != "fp32", compile=False)
    model = runtime.prepare(tiny_net())
    loader = BatchLoader(split, 16, device=device, mean=(0.5,) * 3, std=(0.25,) * 3,
                         shuffle=True, augment=augment or CropFlip(2), drop_last=True,
                         memory_format=runtime.memory_format, resident=resident)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    step = engine.TrainStep(model=model, loss_fn=(loss or CrossEntropy()).to(device),
                            optimizer=opt, scheduler=sched, runtime=runtime, teacher=teacher)
    return step, loader


def test_epoch_stats_are_weighted_means_over_the_epoch():
    step, loader = setup(torch.device("cpu"))
    stats = engine.train_epoch(step, loader, 0)
    assert stats.images == 64 and stats.bad_step == -1 and stats.time_s > 0
    assert set(stats.terms) == {"loss", "ce"} and stats.terms["loss"] == stats.terms["ce"]
    assert 0.0 <= stats.top1 <= 100.0
    assert stats.images_per_s == pytest.approx(64 / stats.time_s)


def test_first_non_finite_step_is_reported():
    step, loader = setup(torch.device("cpu"))
    calls = iter(range(100))

    def poison(module, args, output):
        return {**output, "loss": output["loss"] * float("nan")} if next(calls) >= 2 else None

    step.loss_fn.register_forward_hook(poison)
    assert engine.train_epoch(step, loader, 0).bad_step == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision, augment, resident", [
    ("fp32", CropFlip(2), True), ("bf16", CropFlip(2), True),
    ("bf16", RandomResizedCrop(), True), ("bf16", RandomResizedCrop(), False),
], ids=["fp32-cropflip", "bf16-cropflip", "bf16-resizedcrop", "bf16-resizedcrop-host-data"])
def test_no_host_sync_inside_the_loop_on_cuda(precision, augment, resident, tmp_path):
    """From the second step to the last, the engine's loop (next batch and its augmentation,
    forward, loss on teacher logits looked up in a real soft-label cache, backward, optimizer,
    scheduler, bookkeeping) runs with CUDA's sync debug mode set to error: nothing in it waits
    for the GPU. Also with the image folders' RandomResizedCrop, and with the images in host
    memory (device.data=host: each batch gathered there and copied from pinned memory), and
    then its soft labels looked up in the cache file by host indices."""
    device = torch.device("cuda")
    softlabels.write(tmp_path / "train.kdsl", torch.randn(64, 10))
    # With the images in host memory, the soft labels too (a cache too big for the GPU).
    lookup = softlabels.open(tmp_path / "train.kdsl").lookup(device, resident)

    def teacher(b):
        return Outputs(lookup(b.index if resident else b.host_index))

    step, loader = setup(device, precision, teacher=teacher,
                         loss=HintonKD(), augment=augment, resident=resident)
    engine.train_epoch(step, loader, 0)  # warm-up: cuDNN autotuning, allocator
    steps, calls = len(loader), 0

    def advance() -> None:  # called after each step
        nonlocal calls
        calls += 1
        torch.cuda.set_sync_debug_mode("error" if calls < steps else "default")

    try:
        stats = engine.train_epoch(step, loader, 1, advance)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert calls == steps == 4 and stats.bad_step == -1
