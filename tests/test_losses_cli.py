"""Each loss through the installed CLI on the smoke preset: it builds from `loss=<name>`,
trains a student (logit losses from the cached soft labels, feature losses from a live teacher)
and lands in the report."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import SMOKE, kd, read_report

TARGETS = {
    "mse": "kdcli.losses.mse.LogitMSE",
    "dkd": "kdcli.losses.dkd.DKD",
    "dist": "kdcli.losses.dist.DIST",
    "lskd": "kdcli.losses.lskd.LogitStandardKD",
}
# Feature losses on the smoke nets (tiny_cnn: block1..block3) run the teacher online.
FEATURE = {
    "fitnets": ["loss.student_layer=block2", "loss.teacher_layer=block3"],
    "attention": ["loss.student_layers=[block2,block3]", "loss.teacher_layers=[block2,block3]"],
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for all three runs: the teacher and its cache are trained once, then reused."""
    return tmp_path_factory.mktemp("logit_losses")


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_smoke_run_with_loss(shared: Path, name: str) -> None:
    run_dir = shared / f"run-{name}"
    kd("train", *SMOKE, f"loss={name}", "baseline=false", f"store={shared / 'store'}",
       f"hydra.run.dir={run_dir}", cwd=shared)
    report = read_report(run_dir)
    assert report["config"]["loss"]["_target_"] == TARGETS[name]
    top1 = report["student"]["top1"]
    assert isinstance(top1, (int, float)) and math.isfinite(top1)
    assert report["stages"]["student"] == "trained"
    assert report["student"]["mode"] == "cache"
    assert len(list((shared / "store" / "teacher").glob("*/meta.json"))) == 1


@pytest.mark.parametrize("name", sorted(FEATURE))
def test_feature_loss_runs_the_teacher_online(shared: Path, name: str) -> None:
    run_dir = shared / f"run-{name}"
    kd("train", *SMOKE, f"loss={name}", *FEATURE[name], "baseline=false",
       f"store={shared / 'store'}", f"hydra.run.dir={run_dir}", cwd=shared)
    report = read_report(run_dir)
    assert report["student"]["mode"] == "online"
    # The live teacher gives the logits too: no soft-label cache is built for this run.
    assert report["stages"]["cache"] == "not needed" and report["cache"] is None
    assert "cache" not in report["store"]
    assert math.isfinite(report["student"]["top1"])
    assert "online teacher" in (run_dir / "train.log").read_text()
    # The learned adapter (FitNets) is part of the resumable state.
    state = torch.load(run_dir / "checkpoints" / "student" / "last.pt", weights_only=True)
    assert bool(state["loss"]) == (name == "fitnets")


def test_wrong_layer_name_lists_the_valid_ones(shared: Path) -> None:
    proc = kd("train", *SMOKE, "loss=fitnets", "loss.student_layer=layer9",
              "loss.teacher_layer=block2", "baseline=false", f"store={shared / 'store'}",
              f"hydra.run.dir={shared / 'bad'}", cwd=shared, check=False)
    assert proc.returncode == 1
    assert "has no layer 'layer9'" in proc.stderr and "block2" in proc.stderr
    assert "set loss.student_layer to block1, block1.conv" in proc.stderr  # the key to change


def test_losses_reading_no_cached_logits_need_no_cache(tmp_path: Path) -> None:
    """A feature loss (live teacher) and `loss=ce` (no teacher) neither read nor build the
    soft-label cache: `kd student` runs after `kd teacher` alone, `kd train` writes none."""
    store = f"store={tmp_path / 'store'}"
    kd("teacher", *SMOKE, store, f"hydra.run.dir={tmp_path / 'teacher'}", cwd=tmp_path)
    kd("student", *SMOKE, store, "loss=fitnets", *FEATURE["fitnets"],
       f"hydra.run.dir={tmp_path / 'fitnets'}", cwd=tmp_path)
    assert (tmp_path / "fitnets" / "checkpoints" / "student" / "best.pt").exists()
    run_dir = tmp_path / "ce"
    kd("train", *SMOKE, store, "loss=ce", "baseline=false", f"hydra.run.dir={run_dir}",
       cwd=tmp_path)
    assert not (tmp_path / "store" / "cache").exists()
    report = read_report(run_dir)
    assert report["student"]["mode"] == "none"
    assert report["stages"] == {"teacher": "reused", "cache": "not needed", "student": "trained"}
    assert report["cache"] is None
    assert "Not needed: the loss reads hard labels only" in (run_dir / "report.md").read_text()
    # `kd report` and `kd export` read such a run like any other.
    kd("report", str(run_dir), cwd=tmp_path)
    assert f"{report['student']['top1']:.2f}" in (run_dir / "summary.md").read_text()
    kd("export", str(run_dir), "--formats", "torchscript", "--latency-runs", "3", "--warmup",
       "1", cwd=tmp_path)
    assert (run_dir / "export" / "student.ts").stat().st_size > 0
