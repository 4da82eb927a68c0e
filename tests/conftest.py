"""Shared fixtures: run the installed `kd` on tiny configs with outputs under tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Every end-to-end run uses the smoke preset on the embedded subset, on the CPU, in fp32 so
# results do not depend on whether the machine has fast bf16.
SMOKE = ["experiment=smoke", "device=cpu"]
# The smallest run that still trains every stage: one epoch each, no baseline.
TINY = [*SMOKE, "baseline=false", "trainer.teacher.epochs=1", "trainer.student.epochs=1",
        "dataset.train_size=128", "dataset.test_size=64"]


def kd(*args: str, cwd: Path, env: dict | None = None, check: bool = True
       ) -> subprocess.CompletedProcess:
    """Runs `python -m kdcli.cli ARGS` (the `kd` console script) in `cwd`."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("KD_STORE", None)
    proc = subprocess.run([sys.executable, "-m", "kdcli.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"kd {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def mapped_files(ptr: int) -> list[str]:
    """The files whose mappings in this process contain address `ptr` (Linux)."""
    found = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi and len(fields) >= 6:
                found.append(fields[5])
    return found


def forbid_gathering_views(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes `Split.images` fail on a view (rows of a base, from subsample or hold_out): it
    gathers the view's rows into a new tensor, what kd's own readers must never do (an image
    folder's train split can be a hundred gigabytes, memory-mapped)."""
    from kdcli.data.datasets import Split

    whole = Split.images.fget

    def images(split: Split):
        if split.rows is not None:
            raise AssertionError("a view's images were gathered whole (Split.images)")
        return whole(split)

    monkeypatch.setattr(Split, "images", property(images))


def read_report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
