"""Faults injected on purpose: NaN losses, damaged checkpoints and store entries."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from tests.conftest import SMOKE, kd, read_report

NO_BASELINE = [*SMOKE, "baseline=false"]


def _entry(store: Path, stage: str) -> Path:
    (entry,) = [p for p in (store / stage).iterdir() if p.is_dir()]
    return entry


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    store = tmp_path / "store"
    # smoke: 512 images / batch 64 = 8 steps per epoch; call 10 is epoch 2, step 3.
    proc = kd("train", *NO_BASELINE, f"store={store}", f"hydra.run.dir={tmp_path / 'run'}",
              cwd=tmp_path, check=False, env={"KD_TEST_NAN_AT": "student:10"})
    assert proc.returncode == 1
    assert "loss became NaN/inf at epoch 2, step 3" in proc.stderr
    assert "Traceback" not in proc.stderr
    entry = _entry(store, "student")
    assert not (entry / "meta.json").exists()
    state = torch.load(entry / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values()
                                       if v.is_floating_point())


def test_nan_retry_goes_back_with_a_lower_learning_rate(tmp_path: Path) -> None:
    kd("train", *NO_BASELINE, "trainer.nan_retries=1", "scheduler=constant",
       f"store={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
       env={"KD_TEST_NAN_AT": "student:10"})
    log = (tmp_path / "run" / "train.log").read_text()
    assert "retrying from epoch 2 with the learning rate x0.5" in log
    with open(tmp_path / "run" / "metrics" / "student.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["lr"]) == float(rows[0]["lr"]) / 2
    assert read_report(tmp_path / "run")["stages"]["student"] == "trained"


def test_damaged_stored_teacher_is_detected_and_rebuilt(tmp_path: Path) -> None:
    store = tmp_path / "store"
    kd("teacher", *SMOKE, f"store={store}", cwd=tmp_path)
    last = _entry(store, "teacher") / "last.pt"
    blob = bytearray(last.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    last.write_bytes(bytes(blob))
    kd("teacher", *SMOKE, f"store={store}", f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    log = (tmp_path / "again" / "teacher.log").read_text()
    assert f"store entry file {last} does not match its checksum; rebuilding" in log
    assert "training tiny_cnn-wide" in log
    # Rebuilt: the file loads again and the entry is complete.
    assert (last.parent / "meta.json").exists()
    torch.load(last, weights_only=True)


def test_truncated_checkpoint_of_an_interrupted_stage_is_set_aside(tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = kd("train", *NO_BASELINE, f"store={store}", cwd=tmp_path, check=False,
              env={"KD_TEST_NAN_AT": "teacher:10"})
    assert proc.returncode == 1
    last = _entry(store, "teacher") / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    kd("train", *NO_BASELINE, f"store={store}", f"hydra.run.dir={tmp_path / 'run'}",
       cwd=tmp_path)
    assert (last.parent / "last.pt.corrupt").exists()
    assert read_report(tmp_path / "run")["stages"]["teacher"] == "trained"
    assert "starting this stage over" in (tmp_path / "run" / "train.log").read_text()
