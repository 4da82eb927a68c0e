"""Each logit loss through the installed CLI on the smoke preset: it builds from `loss=<name>`,
trains a student from the cached soft labels and lands in the report."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import SMOKE, kd, read_report

TARGETS = {
    "mse": "kdcli.losses.mse.LogitMSE",
    "dkd": "kdcli.losses.dkd.DKD",
    "dist": "kdcli.losses.dist.DIST",
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
    assert len(list((shared / "store" / "teacher").glob("*/meta.json"))) == 1
