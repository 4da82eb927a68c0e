"""Data parallelism: batch sharding, the single-process no-ops, and a real 2-rank torchrun run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kdcli import device, distributed
from kdcli.data.datasets import Dataset, Split
from kdcli.data.loader import BatchLoader
from kdcli.data.transforms import CropFlip
from kdcli.errors import ConfigError
from kdcli.stages.common import Context
from kdcli.store import Store

CPU = torch.device("cpu")
IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1 / 255, 1 / 255, 1 / 255)}
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# `torchrun --standalone --nproc_per_node=2 kd ...` on the CPU.
TORCHRUN_KD = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "kdcli.cli"]


def torchrun_env(**extra: str) -> dict[str, str]:
    """This process's environment without a store override or torchrun's own variables."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("KD_STORE", None)
    for name in TORCHRUN_ENV:
        env.pop(name, None)
    return env


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def split(n: int, size: int = 6) -> Split:
    g = torch.Generator().manual_seed(n)
    return Split(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                 torch.arange(n))


def loaders(data: Split, per_rank: int, world: int, **kw) -> list[BatchLoader]:
    return [BatchLoader(data, per_rank, device=CPU, shuffle=True, seed=3, augment=CropFlip(2),
                        rank=r, world_size=world, **IDENTITY, **kw) for r in range(world)]


@pytest.mark.parametrize("n, per_rank, world", [(53, 5, 2), (48, 4, 3), (7, 2, 2)])
def test_rank_batches_together_are_the_single_process_batch(n, per_rank, world):
    """Same permutation and augmentation on every rank; at each step the ranks' batches, in rank
    order, are exactly the batch one process would draw with the global batch size."""
    data = split(n)
    (single,) = loaders(data, per_rank * world, 1)
    ranks = loaders(data, per_rank, world)
    for epoch in (0, 1):
        per_rank_batches = [list(r.epoch(epoch)) for r in ranks]
        steps = {len(b) for b in per_rank_batches}
        assert len(steps) == 1  # every rank takes the same number of steps
        for parts, whole in zip(zip(*per_rank_batches), single.epoch(epoch)):  # noqa: B905
            assert len({len(p.index) for p in parts}) == 1  # equal shares
            index = torch.cat([p.index for p in parts])
            k = len(index)  # a partial last batch leaves out < world samples
            assert torch.equal(index, whole.index[:k])
            assert torch.equal(torch.cat([p.images for p in parts]), whole.images[:k])


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shards_disjoint_equal_and_complete(world, drop_last):
    for n in range(world, 40, 3):
        ranks = loaders(split(n), 3, world, drop_last=drop_last)
        seen = [torch.cat([b.index for b in r.epoch(2)] or [torch.empty(0, dtype=torch.long)])
                .tolist() for r in ranks]
        assert len({len(s) for s in seen}) == 1
        flat = sum(seen, [])
        assert len(flat) == len(set(flat))
        assert all(len(list(r.epoch(0))) == len(r) for r in ranks)
        if not drop_last:
            assert n - len(flat) < world


def test_helpers_are_no_ops_without_torchrun():
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert not distributed.launched() and not distributed.active()
    distributed.init(CPU)  # nothing to join
    assert not torch.distributed.is_initialized()
    assert distributed.on_main(lambda: 42) == 42
    obj = {"a": 1}
    assert distributed.broadcast(obj) is obj
    t = torch.ones(3)
    assert distributed.all_reduce_(t) is t and torch.equal(t, torch.ones(3))
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, CPU) is model
    distributed.gradient_averager(list(model.parameters()))()
    distributed.check_in_sync([model], "x")
    distributed.barrier()


def test_threads_split_between_local_ranks(monkeypatch):
    monkeypatch.setattr(device, "usable_cores", lambda: 16)
    assert device.default_threads() == 16
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert device.default_threads() == 4
    monkeypatch.setattr(device, "usable_cores", lambda: 2)
    assert device.default_threads() == 1


def test_training_loader_takes_this_ranks_share_of_the_global_batch(monkeypatch, tmp_path):
    cfg = OmegaConf.create({"seed": 0, "dataset": {"augment": "crop_flip"}})
    runtime = device.resolve(OmegaConf.create({"type": "cpu", "precision": "fp32",
                                               "channels_last": False, "threads": None}))
    ds = Dataset("d", split(40), split(10), [str(i) for i in range(40)])
    ctx = Context(cfg, runtime, ds, Store(tmp_path), tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    train = ctx.loader("train", 8, train=True)
    assert (train.batch_size, train.rank, train.world_size) == (2, 1, 4)
    test = ctx.loader("test", 8, train=False)  # evaluation is whole, on rank 0
    assert (test.batch_size, test.world_size) == (8, 1)
    with pytest.raises(ConfigError, match="multiple of the world size"):
        ctx.loader("train", 10, train=True)


def test_torchrun_two_ranks(tmp_path: Path):
    """`torchrun --nproc_per_node=2 kd train` on the CPU (gloo): the teacher and an online-teacher
    student (FitNets, whose adapter is averaged outside DDP) train data parallel; rank 0 alone
    writes the log, the store entries and one report."""
    env = torchrun_env()
    cmd = [*TORCHRUN_KD, "train", "experiment=smoke", "device=cpu", "hydra.run.dir=run",
           "store=store", "baseline=false", "loss=fitnets", "loss.student_layer=block2",
           "loss.teacher_layer=block2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [p.parent.name for p in tmp_path.rglob("report.json")] == ["run"]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    # FitNets runs the teacher online: no soft-label cache is built (the -m test builds one).
    assert report["stages"] == {"teacher": "trained", "cache": "not needed",
                                "student": "trained"}
    assert report["student"]["mode"] == "online" and not (tmp_path / "store" / "cache").exists()
    assert report["ranks"] == 2
    assert "; this run data parallel over 2 ranks (torchrun)." in \
        (tmp_path / "run" / "report.md").read_text()
    log = (tmp_path / "run" / "train.log").read_text()
    for stage in ("teacher tiny_cnn-wide", "student"):
        assert (f"{stage}: data parallel over 2 ranks, 32 images per rank and step (global batch "
                "64), 8 steps per epoch") in log
    assert log.count("teacher tiny_cnn-wide epoch 1/2") == 1  # rank 1 writes no log
    for stage in ("teacher", "student"):
        (entry,) = [p for p in (tmp_path / "store" / stage).iterdir() if p.is_dir()]
        rows = (entry / "metrics.csv").read_text().splitlines()
        assert len(rows) == 3 and "images_per_s" in rows[0]
        assert json.loads((entry / "meta.json").read_text())["ranks"] == 2
    assert not list(tmp_path.rglob("*.tmp"))


def test_torchrun_sweep_with_compile(tmp_path: Path):
    """A `-m` sweep inside torchrun, with torch.compile: each job trains data parallel over both
    ranks, the compiled step runs under DDP, and rank 0 alone writes the jobs and the summary."""
    env = torchrun_env()
    cmd = [*TORCHRUN_KD, "train", "-m", "experiment=smoke", "device=cpu",
           "device.compile=true", "store=store", "baseline=false", "loss.temperature=2,4",
           "hydra.sweep.dir=multirun/rank-${oc.env:RANK}"]  # as if their clocks differed
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Each rank's Hydra names a sweep folder from its own clock; one is left, rank 0's.
    assert [p.name for p in (tmp_path / "multirun").iterdir()] == ["rank-0"]
    sweep = tmp_path / "multirun" / "rank-0"
    jobs = sorted(p.parent.name for p in tmp_path.rglob("report.json"))
    assert jobs == ["0", "1"]
    assert [p.name for p in tmp_path.rglob("summary.md")] == ["summary.md"]
    assert (sweep / "summary.md").is_file()
    for job in jobs:
        log = (sweep / job / "train.log").read_text()
        assert "student: torch.compile on" in log
        assert log.count("student: data parallel over 2 ranks") == 1
    students = [p for p in (tmp_path / "store" / "student").iterdir() if p.is_dir()]
    assert len(students) == 2
    # The soft-label cache, built under torchrun (rank 0 writes it), serves both jobs.
    assert len(list((tmp_path / "store" / "cache").glob("*/meta.json"))) == 1
    for entry in students:
        assert json.loads((entry / "meta.json").read_text())["ranks"] == 2


def test_other_ranks_outwait_the_collective_timeout_while_rank0_queues(tmp_path: Path):
    """Rank 0 queues for a store entry another process holds for longer than the process
    group's collective timeout (cut to 6 s here; 30 min by default): the other rank waits on
    the key-value store, not in a collective, so the run goes on when the lock is released."""
    import time

    from filelock import FileLock

    env = torchrun_env(KD_DIST_TIMEOUT_S="6")
    args = ["experiment=smoke", "device=cpu", "store=store"]
    first = subprocess.run([sys.executable, "-m", "kdcli.cli", "teacher", *args,
                            "hydra.run.dir=first"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    (entry,) = [p for p in (tmp_path / "store" / "teacher").iterdir() if p.is_dir()]
    lock = FileLock(str(entry) + ".lock")
    lock.acquire()
    try:
        proc = subprocess.Popen(
            [*TORCHRUN_KD, "teacher", *args, "hydra.run.dir=second"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(20)  # both ranks started, rank 0 queued on the lock for > 2 timeouts
        assert proc.poll() is None, proc.communicate()[1][-3000:]
    finally:
        lock.release()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    (log,) = (tmp_path / "second").glob("*.log")
    assert "teacher tiny_cnn-wide: reusing" in log.read_text()


def test_sigterm_to_torchrun_stops_every_rank_with_kds_line(tmp_path: Path):
    """torchrun, sent SIGTERM (Slurm's time limit, `kill`), sends it on to its workers: each
    rank leaves as it would on Ctrl-C, with kd's line, well before torchrun's SIGKILL (30 s
    on), and rank 0's log and the store entry say where it stopped."""
    import signal
    import time

    from kdcli import storecmd

    cmd = [*TORCHRUN_KD, "teacher", "experiment=smoke", "device=cpu", "hydra.run.dir=run",
           "store=store", "trainer.teacher.epochs=40", "dataset.train_size=128",
           "dataset.test_size=64"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=torchrun_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "store" / "teacher").glob("*/last.pt")):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the teacher never saved an epoch"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert time.monotonic() - sent < 20, out[-3000:]
    line = ("terminated by SIGTERM: run the same command again to go on (each stage resumes "
            "from its last saved epoch in the store)")
    assert out.count(line) == 2, out[-3000:]  # one per rank, on stderr
    assert "forcefully exiting" not in out  # no rank needed torchrun's SIGKILL
    log = (tmp_path / "run" / "teacher.log").read_text().strip().splitlines()
    assert log[-1].endswith(f"[WARNING] - {line}")
    (item,) = [i for i in storecmd.scan(tmp_path / "store") if i.stage == "teacher"]
    assert item.status == storecmd.INCOMPLETE and not storecmd.in_use(item)


# One rank stops (a signal) with a collective pending that its peer never joins: its exit must
# not wait for the peer. Here the peer sleeps for a minute; destroy_process_group at exit (the
# graceful way out) would wait for it.
STOPPING_RANK = """
import logging, sys, time
import torch
from kdcli import distributed
logging.basicConfig(filename=f"rank{distributed.rank()}.log", level=logging.INFO)
distributed.init(torch.device("cpu"))
if distributed.is_main():
    torch.distributed.all_reduce(torch.ones(4), async_op=True)  # rank 1 never joins
    logging.getLogger("kdcli").warning("terminated by SIGTERM")
    distributed.exit_if_one_of_several(143)
    sys.exit(1)  # not reached
time.sleep(60)
"""


def test_a_stopped_rank_exits_without_waiting_for_its_peers(tmp_path: Path):
    import time

    (tmp_path / "stopping_rank.py").write_text(STOPPING_RANK)
    cmd = [*TORCHRUN_KD[:-2], "stopping_rank.py"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=torchrun_env(), capture_output=True, text=True,
                          timeout=300)
    # torchrun saw rank 0 end with 143 and stopped rank 1, long before its minute was up.
    assert time.monotonic() - start < 40, proc.stderr[-3000:]
    assert "exitcode: 143" in proc.stderr, proc.stderr[-3000:]
    assert "terminated by SIGTERM" in (tmp_path / "rank0.log").read_text()  # flushed first


def test_on_main_hands_rank0s_result_or_failure_through_the_store(monkeypatch):
    import itertools
    import pickle

    import torch.distributed as dist

    store = dist.HashStore()
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", lambda: store)
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "_on_main_calls", itertools.count())
    # Rank 0: runs fn, publishes its result, then a failure under the next key.
    monkeypatch.setattr(distributed, "is_main", lambda: True)
    assert distributed.on_main(lambda: {"top1": 5.0}) == {"top1": 5.0}
    with pytest.raises(OSError):
        distributed.on_main(lambda: (_ for _ in ()).throw(OSError("disk full")))
    assert pickle.loads(store.get("kd/on_main/0")) == ("ok", {"top1": 5.0})
    # Another rank replaying the same calls gets the result, then the failure as RankFailed.
    monkeypatch.setattr(distributed, "_on_main_calls", itertools.count())
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    ran = []
    assert distributed.on_main(lambda: ran.append(1)) == {"top1": 5.0}
    with pytest.raises(distributed.RankFailed, match="rank 0 failed: OSError: disk full"):
        distributed.on_main(lambda: ran.append(1))
    assert not ran  # fn runs on rank 0 only


def test_rank0_leaves_last_where_its_process_hosts_the_store(monkeypatch):
    # Ranks started with MASTER_ADDR/MASTER_PORT alone (srun; torchrun of torch 2.4): rank 0
    # hosts the key-value store, and exiting first took it away from rank 1, still reading the
    # report's on_main result ("Connection reset by peer").
    import threading
    import time

    import torch.distributed as dist

    store = dist.HashStore()
    destroyed = []
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", lambda: store)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: destroyed.append(True))
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "is_main", lambda: True)
    rank0 = threading.Thread(target=distributed.shutdown)
    rank0.start()
    time.sleep(0.5)
    assert rank0.is_alive() and not destroyed  # rank 0 waits for rank 1
    store.add("kd/left", 1)  # rank 1 checks out at its exit
    rank0.join(timeout=5)
    assert not rank0.is_alive() and destroyed
    # The other ranks do not wait; a rank that never checks out (killed) holds rank 0 only so
    # long.
    store.delete_key("kd/left")
    started = time.monotonic()
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    distributed._leave_together(timeout_s=30)
    monkeypatch.setattr(distributed, "is_main", lambda: True)
    store.delete_key("kd/left")
    distributed._leave_together(timeout_s=0.3)
    assert time.monotonic() - started < 3
