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
