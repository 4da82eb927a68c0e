"""Resolving the `device` config into a Runtime."""

from __future__ import annotations

import contextlib

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

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: Props)
    gpu = device.Runtime(torch.device("cuda", 0), "bf16", True, False)
    assert gpu.data_on_device(2 * 2**30)  # a quarter of the GPU: copied once
    with caplog.at_level("INFO", logger="kdcli.device"):
        assert not gpu.data_on_device(3 * 2**30, "folder train")
        assert not gpu.data_on_device(3 * 2**30, "folder train")
    assert caplog.text.count("folder train: 3.0 GiB of images stay in host memory") == 1
    forced = device.Runtime(torch.device("cuda", 0), "bf16", True, False, data="device")
    assert forced.data_on_device(100 * 2**30)
    cpu = device.Runtime(torch.device("cpu"), "fp32", False, False)
    assert cpu.data_on_device(100 * 2**30)  # one memory: nothing to decide
    assert not device.Runtime(torch.device("cpu"), "fp32", False, False, "host").data_on_device(1)


def test_deterministic_turns_cudnn_autotuning_off_and_back_on(monkeypatch):
    # resolve() ran after seed_everything() and used to turn autotuning on regardless.
    for name, fake in (("is_available", lambda: True), ("device_count", lambda: 1),
                       ("set_device", lambda dev: None)):
        monkeypatch.setattr(torch.cuda, name, fake)
    saved = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        for deterministic in (True, False):  # one process, two sweep jobs
            device.seed_everything(0, deterministic)
            rt = device.resolve(cfg(type="cuda", precision="bf16", threads=None))
            assert rt.device.type == "cuda"
            assert torch.backends.cudnn.benchmark is (not deterministic)
            assert torch.are_deterministic_algorithms_enabled() is deterministic
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.use_deterministic_algorithms(saved[1])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[2:]
