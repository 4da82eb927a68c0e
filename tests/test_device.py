"""Resolving the `device` config into a Runtime."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from kdcli import device
from kdcli.errors import ConfigError


@pytest.fixture(autouse=True)
def keep_thread_count():
    # resolve() sets torch's intra-op thread count on CPU; leave it as the suite had it.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def cfg(**over):
    base = {"type": "cpu", "index": 0, "precision": "fp32", "channels_last": False,
            "compile": False, "threads": 1}
    return OmegaConf.create({**base, **over})


def test_cpu_fp32():
    rt = device.resolve(cfg())
    assert rt.device == torch.device("cpu")
    assert rt.precision == "fp32" and rt.amp_dtype == torch.float32
    assert rt.channels_last is False and rt.memory_format == torch.contiguous_format
    assert rt.compile is False
    assert isinstance(rt.autocast(), contextlib.nullcontext)
    a = torch.ones(2, 3)
    with rt.autocast():
        assert (a @ a.T).dtype == torch.float32
    assert not rt.grad_scaler().is_enabled()
    assert rt.describe() == "cpu, fp32"
    # report.md's "Trained on" line: the compile setting too.
    assert device.resolve(cfg(compile="max-autotune")).describe() == \
        "cpu, fp32, torch.compile (max-autotune)"
    assert torch.get_num_threads() == 1


def test_cpu_bf16_autocast():
    rt = device.resolve(cfg(precision="bf16", channels_last="auto"))
    assert rt.amp_dtype == torch.bfloat16
    assert rt.channels_last is True  # auto: channels_last with reduced precision
    a = torch.ones(2, 3)
    with rt.autocast():
        assert (a @ a.T).dtype == torch.bfloat16
    assert (a @ a.T).dtype == torch.float32
    assert not rt.grad_scaler().is_enabled()
    model = rt.prepare(torch.nn.Conv2d(3, 4, 3))
    assert model.weight.is_contiguous(memory_format=torch.channels_last)


def test_fp16_on_cpu_refused():
    with pytest.raises(ConfigError, match="fp16"):
        device.resolve(cfg(precision="fp16"))


def test_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="cpu"):
        device.resolve(cfg(type="cuda", precision="bf16"))


def test_auto_type_without_cuda_is_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.resolve(cfg(type="auto")).device == torch.device("cpu")


def test_bad_precision_lists_choices():
    with pytest.raises(ConfigError) as err:
        device.resolve(cfg(precision="fp8"))
    msg = str(err.value)
    assert "'fp8'" in msg
    for choice in ("auto", "fp32", "bf16", "fp16"):
        assert choice in msg


def test_bad_type():
    with pytest.raises(ConfigError, match="auto, cpu, cuda"):
        device.resolve(cfg(type="tpu"))


def test_auto_precision_on_cpu():
    assert device.resolve(cfg(precision="auto")).precision in ("fp32", "bf16")


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma"}, "fp32"), ({"avx2", "amx_bf16", "amx_tile"}, "bf16"),
    ({"avx512f", "avx512_bf16"}, "bf16"),
])
def test_auto_precision_follows_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(device, "_cpu_flags", lambda: flags)
    rt = device.resolve(cfg(precision="auto", channels_last="auto"))
    assert rt.precision == expected
    assert rt.channels_last is (expected != "fp32")


def test_threads_setting():
    device.resolve(cfg(threads=2))
    assert torch.get_num_threads() == 2


def test_shipped_cpu_configs_resolve():
    from importlib import resources

    folder = resources.files("kdcli.configs") / "device"
    fp32 = device.resolve(OmegaConf.load(str(folder / "cpu.yaml")))
    bf16 = device.resolve(OmegaConf.load(str(folder / "cpu_bf16.yaml")))
    assert (fp32.device.type, fp32.precision, fp32.channels_last) == ("cpu", "fp32", False)
    assert (bf16.device.type, bf16.precision, bf16.channels_last) == ("cpu", "bf16", True)


def test_data_placement_setting():
    assert device.resolve(cfg()).data == "auto"
    assert device.resolve(cfg(data="host")).data == "host"
    with pytest.raises(ConfigError, match=r"device.data='gpu'.*auto, device, host"):
        device.resolve(cfg(data="gpu"))


def test_data_stays_on_the_host_when_it_would_crowd_the_gpu(monkeypatch, caplog):
    class Props:
        total_memory = 8 * 2**30

    gib = 2**30
    memory = {"free": 8 * gib, "reserved": 0, "allocated": 0}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: Props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (memory["free"], 8 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: memory["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: memory["allocated"])
    gpu = device.Runtime(torch.device("cuda", 0), "bf16", True, False)
    assert gpu.data_on_device(2 * gib)  # a quarter of the GPU: copied once
    with caplog.at_level("INFO", logger="kdcli.device"):
        assert not gpu.data_on_device(3 * gib, "folder train")
        assert not gpu.data_on_device(3 * gib, "folder train")
    assert caplog.text.count("folder train: 3.0 GiB stay in host memory") == 1
    # What is already placed counts: with 5 GiB free, 2 GiB more would leave under half free,
    # unless torch's allocator holds some of the used memory without using it.
    memory["free"] = 5 * gib
    assert gpu.data_on_device(gib) and not gpu.data_on_device(2 * gib, "soft-label cache")
    memory.update(reserved=2 * gib, allocated=gib)
    assert gpu.data_on_device(2 * gib)
    forced = device.Runtime(torch.device("cuda", 0), "bf16", True, False, data="device")
    assert forced.data_on_device(100 * 2**30)
    cpu = device.Runtime(torch.device("cpu"), "fp32", False, False)
    assert cpu.data_on_device(100 * 2**30)  # one memory: nothing to decide
    assert not device.Runtime(torch.device("cpu"), "fp32", False, False, "host").data_on_device(1)


def test_deterministic_turns_cudnn_autotuning_off_and_back_on(fake_gpu):
    # resolve() ran after seed_everything() and used to turn autotuning on regardless.
    saved = torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic in (True, False):  # one process, two sweep jobs
            device.seed_everything(0, deterministic)
            rt = device.resolve(cfg(type="cuda", precision="bf16", threads=None))
            assert rt.device.type == "cuda"
            assert torch.backends.cudnn.benchmark is (not deterministic)
            assert torch.are_deterministic_algorithms_enabled() is deterministic
    finally:
        torch.use_deterministic_algorithms(saved)


@pytest.fixture
def fake_gpu(monkeypatch):
    """One visible CUDA device of a chosen compute capability; restores the global flags."""
    caps = {"cap": (8, 0)}
    for name, fake in (("is_available", lambda: True), ("device_count", lambda: 1),
                       ("set_device", lambda dev: None),
                       ("get_device_capability", lambda dev=None: caps["cap"]),
                       ("get_device_name", lambda dev=None: "Fake GPU")):
        monkeypatch.setattr(torch.cuda, name, fake)
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    yield caps
    (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.allow_tf32) = saved


@pytest.mark.parametrize("cap, expected", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"),
                                           ((9, 0), "bf16")])
def test_auto_precision_on_a_gpu_follows_its_bf16_tensor_cores(fake_gpu, cap, expected):
    # torch.cuda.is_bf16_supported() says True on a T4 (sm75), where bf16 is only emulated.
    fake_gpu["cap"] = cap
    rt = device.resolve(cfg(type="cuda", precision="auto", threads=None))
    assert rt.precision == expected


def test_bf16_asked_of_a_gpu_without_bf16_tensor_cores_warns(fake_gpu, caplog):
    fake_gpu["cap"] = (7, 5)
    with caplog.at_level("WARNING", logger="kdcli.device"):
        rt = device.resolve(cfg(type="cuda", precision="bf16", threads=None))
    assert rt.precision == "bf16"
    assert "Fake GPU has no bf16 tensor cores (compute capability 7.5" in caplog.text
    assert "device=cuda_fp16" in caplog.text
    caplog.clear()
    fake_gpu["cap"] = (8, 6)
    with caplog.at_level("WARNING", logger="kdcli.device"):
        device.resolve(cfg(type="cuda", precision="bf16", threads=None))
    assert caplog.text == ""


def test_tf32_only_under_mixed_precision_and_set_both_ways(fake_gpu):
    for precision, tf32 in (("bf16", True), ("fp32", False), ("fp16", True), ("fp32", False)):
        device.resolve(cfg(type="cuda", precision=precision, threads=None))
        assert torch.backends.cuda.matmul.allow_tf32 is tf32, precision
        assert torch.backends.cudnn.allow_tf32 is tf32, precision


def test_torchrun_rank_without_a_gpu_of_its_own_is_named(fake_gpu, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(device.distributed, "launched", lambda: True)
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=1 has no GPU of its own: this process "
                                          r"sees 1 GPU\(s\); start at most 1 processes"):
        device.resolve(cfg(type="cuda", precision="bf16", threads=None))
    monkeypatch.setattr(device.distributed, "launched", lambda: False)
    with pytest.raises(ConfigError, match=r"device.index=3 but only 1 GPU\(s\) are visible"):
        device.resolve(cfg(type="cuda", index=3, precision="bf16", threads=None))


def test_deterministic_after_cuda_started_warns_about_cublas(monkeypatch, caplog):
    saved = torch.are_deterministic_algorithms_enabled()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
        with caplog.at_level("WARNING", logger="kdcli.device"):
            device.seed_everything(0, True)  # before CUDA starts: the setting takes effect
        assert caplog.text == ""
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        with caplog.at_level("WARNING", logger="kdcli.device"):
            device.seed_everything(0, True)  # a later sweep job, CUDA already up
        assert "cuBLAS keeps its workspace" in caplog.text
        assert "CUBLAS_WORKSPACE_CONFIG=:4096:8" in caplog.text
    finally:
        torch.use_deterministic_algorithms(saved)


@pytest.mark.parametrize("value, expected", [
    (False, (False, "default")), (True, (True, "default")),
    ("reduce-overhead", (True, "reduce-overhead")), ("max-autotune", (True, "max-autotune")),
])
def test_compile_takes_true_false_or_a_torch_compile_mode(value, expected):
    rt = device.resolve(cfg(compile=value))
    assert (rt.compile, rt.compile_mode) == expected


def test_unknown_compile_mode_is_named_with_the_choices():
    with pytest.raises(ConfigError, match=r"device.compile='fast'.*reduce-overhead"):
        device.resolve(cfg(compile="fast"))


def test_the_training_step_compiles_in_the_asked_mode(monkeypatch):
    from kdcli import engine
    from kdcli.losses.ce import CrossEntropy

    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: seen.append(mode) or module)
    rt = device.resolve(cfg(compile="reduce-overhead"))
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.TrainStep(model=model, loss_fn=CrossEntropy(), optimizer=opt,
                     scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), runtime=rt)
    assert seen == ["reduce-overhead"]


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_machine_load_counts_other_processes_not_this_ones_past_work() -> None:
    # The 1-minute load average held the run's own training: a quiet machine read as busy
    # right after it, and the report timed with 1 thread and called the machine busy.
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 1.0:  # this process's own work, just before
        pass
    cpu0 = time.process_time()
    _, cpus = device.machine_load()
    # It sleeps while it samples: what it reads is other processes' work, not this one's.
    assert time.process_time() - cpu0 < 0.05
    assert cpus == device.usable_cores()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy, _ = device.machine_load()
    finally:
        spinner.kill()
        spinner.wait()
    # A spinning process takes most of a core, whatever else this shared machine runs.
    assert busy > 0.6
    assert device.is_busy(busy, cpus)
    assert not device.is_busy(None, cpus) and not device.is_busy(0.2, cpus)


@pytest.mark.parametrize("threads, load, warned", [
    (None, 1.5, True),   # the default, one per core, on a busy machine
    (None, 0.1, False),  # a quiet one
    (2, 1.5, False),     # device.threads set: the user's choice, not sampled
])
def test_training_on_a_busy_machine_with_every_core_is_warned_of(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, threads, load,
        warned) -> None:
    # A review: kd's default 2 threads trained 3-40x slower than 1 while another job ran, and
    # the log said nothing (the latency timing already took 1 thread on a busy machine).
    sampled = []
    monkeypatch.setattr(device, "_busy_checked", False)
    monkeypatch.setattr(device, "default_threads", lambda: 2)
    monkeypatch.setattr(device, "machine_load", lambda window_s: sampled.append(1) or (load, 2))
    device.resolve(cfg(threads=threads))
    device.resolve(cfg(threads=threads))  # a sweep's next job: not sampled again
    assert torch.get_num_threads() == 2
    assert len(sampled) == (0 if threads else 1)
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert lines == ([f"the machine is busy (other processes used {load:.1f} of 2 CPUs): "
                      "training with 2 threads, each step waits for the slowest, which can "
                      "make epochs several times slower; if their img/s is low, set "
                      "device.threads=1"] if warned else [])
