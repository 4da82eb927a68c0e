"""Multi-teacher, pretrained distillation and weight transfer, end to end on the smoke preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdcli import softlabels
from tests.conftest import SMOKE, kd, read_report

TWO = "teacher=[tiny_cnn,tiny_cnn-wide]"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("methods")


def _teacher_test_logits(report: dict, name: str) -> torch.Tensor:
    entry = Path(report["store"][f"teacher-{name}"])
    return torch.load(entry / "test_logits.pt", weights_only=True)["logits"]


@pytest.mark.parametrize("weights, mix", [(None, (0.5, 0.5)), ("[3,1]", (0.75, 0.25))])
def test_two_teachers_each_keyed_and_combined_in_the_cache(root: Path, weights, mix) -> None:
    run = root / f"multi-{mix[0]}"
    extra = [f"cache.teacher_weights={weights}"] if weights else []
    kd("train", *SMOKE, TWO, *extra, "baseline=false", f"store={root / 'store'}",
       f"hydra.run.dir={run}", cwd=root)
    report = read_report(run)
    assert [t["name"] for t in report["teachers"]] == ["tiny_cnn", "tiny_cnn-wide"]
    assert report["teacher"]["members"] == ["tiny_cnn", "tiny_cnn-wide"]
    assert report["teacher"]["params"] == sum(t["params"] for t in report["teachers"])
    assert {"teacher-tiny_cnn", "teacher-tiny_cnn-wide"} <= set(report["stages"])
    # The cached soft labels are the weighted mean of the two teachers' logits.
    a = _teacher_test_logits(report, "tiny_cnn")
    b = _teacher_test_logits(report, "tiny_cnn-wide")
    cache = softlabels.open(Path(report["store"]["cache"]) / "test.kdsl").all_logits()
    torch.testing.assert_close(cache, mix[0] * a + mix[1] * b, atol=2e-2, rtol=1e-3)
    # The mix is in the report (it was only in report.json's config).
    assert report["teacher"]["weights"] == pytest.approx(list(mix))
    md = (run / "report.md").read_text()
    assert "## Teachers" in md and "| teacher | weight in the mix | top-1 (%) |" in md
    assert f"| tiny_cnn | {mix[0]:.2f} |" in md and f"| tiny_cnn-wide | {mix[1]:.2f} |" in md


def test_second_multi_teacher_run_reuses_both_teachers(root: Path) -> None:
    kd("train", *SMOKE, TWO, "loss.temperature=2", "baseline=false",
       f"store={root / 'store'}", f"hydra.run.dir={root / 'multi-again'}", cwd=root)
    stages = read_report(root / "multi-again")["stages"]
    assert stages["teacher-tiny_cnn"] == stages["teacher-tiny_cnn-wide"] == "reused"
    assert stages["cache"] == "reused" and stages["student"] == "trained"


def test_keyed_teacher_override_with_several_teachers_is_refused(root: Path) -> None:
    # With teacher=[a,b] there is no single `teacher` node: the override must not vanish.
    proc = kd("train", *SMOKE, TWO, "teacher.width=64", f"store={root / 'refused'}",
              f"hydra.run.dir={root / 'refused-run'}", cwd=root, check=False)
    assert proc.returncode == 1
    assert "teacher.width=64: cannot be combined with teacher=" in proc.stderr
    assert not (root / "refused" / "teacher").exists()


def test_student_init_from_teacher_copies_matching_tensors(root: Path) -> None:
    # Same architecture: every tensor matches, so the student starts as the teacher.
    kd("train", *SMOKE, "student=tiny_cnn-wide", "student.init=from_teacher",
       "trainer.student.epochs=1", "baseline=false", f"store={root / 'store'}",
       f"hydra.run.dir={root / 'init'}", cwd=root)
    report = read_report(root / "init")
    assert report["student"]["init"].startswith("student.init=from_teacher")
    assert report["student"]["init_copied"] == 20 and report["student"]["init_skipped"] == []
    log = (root / "init" / "train.log").read_text()
    assert "copied 20/20 tensors" in log


def test_student_init_from_teacher_skips_mismatched_shapes(root: Path) -> None:
    kd("train", *SMOKE, "student.init=from_teacher", "baseline=false", f"store={root / 'store'}",
       f"hydra.run.dir={root / 'init-mismatch'}", cwd=root)
    student = read_report(root / "init-mismatch")["student"]
    # tiny_cnn (width 16) from tiny_cnn-wide (width 32): only shape-free tensors match.
    assert student["init_copied"] < 20
    assert any("shape" in s for s in student["init_skipped"])


def test_pretraining_stage_runs_once_and_is_reused(root: Path) -> None:
    common = [*SMOKE, "pretrain.dataset=cifar10_subset", "pretrain.epochs=1", "baseline=false",
              f"store={root / 'store'}"]
    kd("train", *common, f"hydra.run.dir={root / 'pre1'}", cwd=root)
    kd("train", *common, "loss.temperature=8", f"hydra.run.dir={root / 'pre2'}", cwd=root)
    first, second = read_report(root / "pre1"), read_report(root / "pre2")
    assert first["stages"]["pretrain"] == "trained"
    assert second["stages"]["pretrain"] == "reused"
    assert first["student"]["init"] == "student init from pretraining"


def test_init_modes_conflict_is_refused(root: Path) -> None:
    proc = kd("train", *SMOKE, "pretrain.dataset=cifar10_subset", "pretrain.epochs=1",
              "student.init=from_teacher", f"store={root / 'store'}",
              f"hydra.run.dir={root / 'conflict'}", cwd=root, check=False)
    assert proc.returncode == 1 and "choose one" in proc.stderr
