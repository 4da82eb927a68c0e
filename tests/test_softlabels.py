"""The soft-label cache format: round trips, sizes, top-k, corruption and atomic writes."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import torch

from kdcli import softlabels
from kdcli.errors import ConfigError, CorruptArtifact
from tests.conftest import mapped_files

PREFIX = 20  # magic (8) + version uint32 (4) + header length uint64 (8)


def logits_of(*shape: int, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def data_start(path) -> int:
    raw = path.read_bytes()
    (head_len,) = struct.unpack("<Q", raw[12:20])
    return PREFIX + head_len


@pytest.fixture
def cache_file(tmp_path):
    path = tmp_path / "train.kdsl"
    softlabels.write(path, logits_of(6, 10))
    return path


def test_round_trip_two_dim(tmp_path):
    logits = logits_of(7, 10)
    header = softlabels.write(tmp_path / "a.kdsl", logits, info={"teacher": "abc"})
    sl = softlabels.open(tmp_path / "a.kdsl")
    assert header["storage"] == "full" and header["views"] == 1
    assert sl.num_samples == 7 and sl.num_classes == 10
    assert sl.header["info"] == {"teacher": "abc"}
    back = sl.all_logits()
    assert back.dtype == torch.float32 and back.shape == (7, 10)
    # float16 keeps 11 significant bits: relative error <= 2^-11.
    torch.testing.assert_close(back, logits, rtol=2**-11, atol=1e-3)
    torch.testing.assert_close(back, logits.half().float(), rtol=0, atol=0)


def test_round_trip_views_and_index(tmp_path):
    logits = logits_of(5, 3, 4)  # (N, V, C)
    softlabels.write(tmp_path / "v.kdsl", logits)
    sl = softlabels.open(tmp_path / "v.kdsl")
    assert sl.header["views"] == 3
    for view in range(3):
        torch.testing.assert_close(sl.all_logits(view), logits[:, view].half().float())
    rows = torch.tensor([4, 0, 2])
    torch.testing.assert_close(sl.logits(rows, view=1), logits[rows, 1].half().float())
    torch.testing.assert_close(sl.logits(np.array([3]), view=2), logits[[3], 2].half().float())


def test_bytes_per_sample_full(tmp_path):
    # (10, 10) fp16 logits = 200 bytes, padded to the next 64-byte boundary: 256.
    header = softlabels.write(tmp_path / "f.kdsl", logits_of(10, 10))
    assert header["data_bytes"] == 256
    sl = softlabels.open(tmp_path / "f.kdsl")
    assert sl.bytes_per_sample == pytest.approx(25.6)
    assert (tmp_path / "f.kdsl").stat().st_size == data_start(tmp_path / "f.kdsl") + 256
    assert data_start(tmp_path / "f.kdsl") % 64 == 0


@pytest.mark.parametrize("n, c, data_bytes, per_sample", [
    (5000, 10, 100_032, 20.0064),  # the README's Speed section: 20 bytes of logits + padding
    (48, 3, 320, 6.6667),  # the README's tiny example: 6 bytes of logits, padding shows
])
def test_bytes_per_sample_counts_the_alignment_padding(tmp_path, n, c, data_bytes, per_sample):
    header = softlabels.write(tmp_path / "f.kdsl", logits_of(n, c))
    assert header["data_bytes"] == data_bytes
    assert softlabels.open(tmp_path / "f.kdsl").bytes_per_sample == pytest.approx(per_sample,
                                                                                 abs=1e-4)


def test_bytes_per_sample_topk(tmp_path):
    # N=4, C=200, k=20: values fp16 4*20*2=160 -> 192; indices int16 160 -> 192;
    # logsumexp fp32 4*4=16 -> 64. Total 448 bytes, 112 per sample.
    softlabels.write(tmp_path / "k.kdsl", logits_of(4, 200), storage="topk", topk=20)
    sl = softlabels.open(tmp_path / "k.kdsl")
    offsets = {a["name"]: a["offset"] for a in sl.header["arrays"]}
    assert offsets == {"values": 0, "indices": 192, "logsumexp": 384}
    assert sl.header["data_bytes"] == 448
    assert sl.bytes_per_sample == pytest.approx(112.0)


def test_auto_storage_threshold():
    assert softlabels.choose_storage(100, "auto", 20) == "full"
    assert softlabels.choose_storage(101, "auto", 20) == "topk"
    assert softlabels.choose_storage(1000, "auto", 1000) == "full"
    assert softlabels.choose_storage(10, "topk", 5) == "topk"
    # A config mistake: one line from the CLI, not a traceback.
    with pytest.raises(ConfigError, match="storage"):
        softlabels.choose_storage(10, "sparse", 5)


def test_topk_reconstruction(tmp_path):
    logits = logits_of(8, 150)
    header = softlabels.write(tmp_path / "t.kdsl", logits, storage="topk", topk=5)
    assert header["storage"] == "topk" and header["topk"] == 5
    sl = softlabels.open(tmp_path / "t.kdsl")
    assert set(sl.arrays) == {"values", "indices", "logsumexp"}
    assert sl.arrays["values"].shape == (8, 1, 5)
    assert sl.arrays["indices"].dtype == np.int16

    dense = sl.all_logits()
    assert dense.shape == (8, 150)
    top_vals, top_idx = logits.topk(5, dim=-1)
    # The top-k entries come back exactly (up to fp16 rounding) at their own classes.
    torch.testing.assert_close(dense.gather(1, top_idx), top_vals, rtol=2**-11, atol=1e-3)
    torch.testing.assert_close(dense.topk(5, dim=-1).indices, top_idx)
    # The rest share the leftover mass evenly: a single value per row outside the top-k.
    mask = torch.ones_like(dense, dtype=torch.bool).scatter_(1, top_idx, False)
    rest = dense[mask].view(8, 145)
    torch.testing.assert_close(rest, rest[:, :1].expand(-1, 145))
    # exp(dense - lse) sums to 1 and the logsumexp is the original one.
    lse = logits.logsumexp(-1)
    torch.testing.assert_close((dense - lse[:, None]).exp().sum(-1), torch.ones(8), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(dense.logsumexp(-1), lse, atol=1e-5, rtol=1e-5)


def test_densify_by_hand():
    # Two of four classes kept with probabilities 1/2 and 1/4: the other two get 1/8 each.
    lse = torch.tensor([0.0])
    values = torch.tensor([[np.log(0.5), np.log(0.25)]], dtype=torch.float32)
    idx = torch.tensor([[2, 0]])
    dense = softlabels.densify(values, idx, lse, 4)
    torch.testing.assert_close(dense.exp(), torch.tensor([[0.25, 0.125, 0.5, 0.125]]))


def test_file_is_memory_mapped(cache_file):
    sl = softlabels.open(cache_file)
    arr = sl.arrays["logits"]
    assert isinstance(arr, np.memmap)
    assert arr.dtype == np.float16 and arr.shape == (6, 1, 10)
    assert arr.offset % 64 == 0



@pytest.mark.parametrize("resident", [True, False], ids=["resident", "in-file"])
@pytest.mark.parametrize("storage", ["full", "topk"])
def test_lookup_matches_dense_logits_per_view(tmp_path, storage, resident):
    logits = logits_of(9, 3, 150, seed=4)  # (N, V, C)
    softlabels.write(tmp_path / "l.kdsl", logits, storage=storage, topk=7)
    sl = softlabels.open(tmp_path / "l.kdsl")
    lookup = sl.lookup(torch.device("cpu"), resident)
    assert lookup.resident is resident
    index = torch.tensor([8, 0, 3, 3])
    view = torch.tensor([2, 0, 1, 2])
    want = torch.stack([sl.logits(index[i:i + 1], int(view[i]))[0] for i in range(4)])
    got = lookup(index, view)
    assert got.dtype == torch.float32 and got.shape == (4, 150)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(lookup(index), sl.logits(index, 0), rtol=0, atol=0)


def test_lookup_keeps_the_stored_width_and_maps_the_file_on_cpu(tmp_path):
    path = tmp_path / "big.kdsl"
    softlabels.write(path, logits_of(2000, 2, 10))
    sl = softlabels.open(path)
    lookup = sl.lookup(torch.device("cpu"))
    held = lookup.tensors["logits"]
    # float16 as stored: half the bytes of float32 logits, and no copy of them either.
    assert held.dtype == torch.float16 and lookup.nbytes == 2000 * 2 * 10 * 2
    if os.path.exists("/proc/self/maps"):
        assert str(path) in mapped_files(held.data_ptr())


def test_flipped_data_byte_fails_checksum(cache_file):
    raw = bytearray(cache_file.read_bytes())
    raw[data_start(cache_file) + 3] ^= 0xFF
    cache_file.write_bytes(bytes(raw))
    with pytest.raises(CorruptArtifact, match="checksum"):
        softlabels.open(cache_file)
    # Without verification the damage goes unnoticed: that is what verify is for.
    softlabels.open(cache_file, verify=False)


def test_truncated_file(cache_file):
    raw = cache_file.read_bytes()
    cache_file.write_bytes(raw[:-10])
    with pytest.raises(CorruptArtifact, match="truncated"):
        softlabels.open(cache_file)


def test_file_cut_inside_header(cache_file):
    cache_file.write_bytes(cache_file.read_bytes()[:30])
    with pytest.raises(CorruptArtifact, match="unreadable"):
        softlabels.open(cache_file)


def test_empty_file(tmp_path):
    (tmp_path / "e.kdsl").write_bytes(b"")
    with pytest.raises(CorruptArtifact):
        softlabels.open(tmp_path / "e.kdsl")


def test_wrong_magic(cache_file):
    raw = cache_file.read_bytes()
    cache_file.write_bytes(b"NOTASOFT" + raw[8:])
    with pytest.raises(CorruptArtifact, match="magic"):
        softlabels.open(cache_file)


def test_newer_format_version_refused(cache_file):
    raw = bytearray(cache_file.read_bytes())
    raw[8:12] = struct.pack("<I", softlabels.VERSION + 1)
    cache_file.write_bytes(bytes(raw))
    with pytest.raises(CorruptArtifact, match="format"):
        softlabels.open(cache_file)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_refused(tmp_path, bad):
    logits = logits_of(4, 10)
    logits[2, 3] = bad
    with pytest.raises(CorruptArtifact, match="non-finite"):
        softlabels.write(tmp_path / "bad.kdsl", logits)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "train.kdsl"
    softlabels.write(path, logits_of(6, 10, seed=1))
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        softlabels.write(path, logits_of(6, 10, seed=2))
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["train.kdsl"]
    torch.testing.assert_close(softlabels.open(path).all_logits(),
                               logits_of(6, 10, seed=1).half().float())


def test_overwrite_replaces_content(tmp_path):
    path = tmp_path / "train.kdsl"
    softlabels.write(path, logits_of(6, 10, seed=1))
    softlabels.write(path, logits_of(3, 10, seed=2))
    sl = softlabels.open(path)
    assert sl.num_samples == 3
    torch.testing.assert_close(sl.all_logits(), logits_of(3, 10, seed=2).half().float())
    assert [p.name for p in tmp_path.iterdir()] == ["train.kdsl"]


@pytest.mark.parametrize("storage, temperature, warns", [
    ("topk", 4.0, True), ("topk", 1.0, True), ("topk", None, True), ("full", 4.0, False)])
def test_student_stage_warns_of_a_topk_cache(caplog, storage, temperature, warns):
    # Top-k targets lose the spread of the classes outside the top k, which the KL reads at any
    # T (15 % off at T=1 in one case, 44 % at T=4), and losses on raw logits too.
    from types import SimpleNamespace

    from kdcli.losses.hinton import HintonKD
    from kdcli.losses.mse import LogitMSE
    from kdcli.stages.student import warn_if_approximate

    lookup = SimpleNamespace(storage=storage, k=20 if storage == "topk" else None,
                             num_classes=1000)
    loss = LogitMSE() if temperature is None else HintonKD(temperature=temperature)
    ctx = SimpleNamespace(choice=lambda group: "mse" if temperature is None else "hinton")
    with caplog.at_level("WARNING", logger="kdcli.stages.student"):
        warn_if_approximate(ctx, SimpleNamespace(lookup=lookup), loss)
    assert ("keeps the top 20 of 1000 teacher logits" in caplog.text) is warns
    if warns:
        assert (f"at loss.temperature={temperature:g}" if temperature else "reads them as logits"
                ) in caplog.text



def test_topk_cache_warning_comes_from_rank_0_alone(caplog, monkeypatch):
    # Under torchrun every rank starts the student stage: each logged the warning.
    from types import SimpleNamespace

    from kdcli.losses.hinton import HintonKD
    from kdcli.stages.student import warn_if_approximate

    lookup = SimpleNamespace(storage="topk", k=20, num_classes=1000)
    ctx = SimpleNamespace(choice=lambda group: "hinton")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, warns in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        caplog.clear()
        with caplog.at_level("WARNING", logger="kdcli.stages.student"):
            warn_if_approximate(ctx, SimpleNamespace(lookup=lookup), HintonKD())
        assert ("keeps the top 20 of 1000 teacher logits" in caplog.text) is warns
