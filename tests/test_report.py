"""report.json / report.md / plots from a sample report dict."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcli import report as report_mod
from kdcli.report import compression, format_bytes, format_count, write_report


def sample_report() -> dict:
    teacher = {
        "name": "resnet20",
        "top1": 80.0,
        "top5": 98.5,
        "macro_f1": 79.25,
        "params": 272474,
        "flops": 40_800_000,
        "size_bytes": 1_100_000,
        "latency_ms": 4.0,
        "train_time_s": 600.0,
    }
    student = {
        "name": "tiny_cnn",
        "top1": 71.25,
        "top5": 96.0,
        "macro_f1": 70.5,
        "agreement": 78.5,
        "params": 54_000,
        "flops": 5_100_000,
        "size_bytes": 220_000,
        "latency_ms": 1.0,
        "train_time_s": 95.0,
    }
    return {
        "kd_version": "0.1.0",
        "versions": {"torch": "2.15.0", "torchvision": "0.30.0", "kd": "0.1.0", "python": "3.11"},
        "wall_time_s": 123.4,
        "latency_threads": 2,
        "dataset": {
            "name": "cifar10_subset",
            "num_classes": 10,
            "train_size": 5000,
            "test_size": 1000,
            "image_size": 32,
        },
        "teacher": teacher,
        "student": student,
        "baseline": {
            "top1": 65.0,
            "top5": 94.0,
            "macro_f1": 64.0,
            "agreement": 70.0,
            "train_time_s": 90.0,
        },
        "compression": compression(teacher, student),
        "distillation_gain": {"top1": 6.25},
        "cache": {
            "bytes_per_sample": 40,
            "num_samples": 5000,
            "format_version": 1,
            "storage": "full",
            "topk": None,
            "views": 0,
            "disk_bytes": 330_000,
        },
        "stages": {"teacher": "trained", "cache": "reused", "student": "resumed", "baseline": None},
        "config": {
            "teacher": {"name": "resnet20", "epochs": 30},
            "student": {"name": "tiny_cnn", "epochs": 20},
            "dataset": {"name": "cifar10_subset"},
            "loss": {
                "_target_": "kdcli.losses.hinton.HintonLoss",
                "temperature": 4.0,
                "ce_weight": 0.1,
                "kd_weight": 0.9,
            },
            "seed": 0,
        },
    }


def write_histories(tmp_path: Path) -> dict[str, Path]:
    teacher = tmp_path / "teacher.csv"
    teacher.write_text("epoch,train/loss,val/top1,lr\n1,2.0,40.0,0.1\n2,1.5,60.0,0.05\n")
    student = tmp_path / "student.csv"
    # No val/top1 column and a blank loss: both must be tolerated.
    student.write_text("epoch,train/loss,train/kd\n1,3.0,1.0\n2,,0.8\n3,2.0,0.5\n")
    return {"teacher": teacher, "student": student}


def test_format_count():
    assert format_count(55) == "55"
    assert format_count(5000) == "5.0K"
    assert format_count(272474) == "0.27M"
    assert format_count(40_800_000) == "40.8M"
    assert format_count(125_000_000) == "125M"
    assert format_count(2_500_000_000) == "2.5G"
    assert format_count(None) == "—"


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**2) == "3.0 MiB"
    assert format_bytes(220_000) == "215 KiB"
    assert format_bytes(None) == "—"


def test_compression_ratios():
    t = {"params": 1000, "flops": 400, "size_bytes": 4000, "latency_ms": 3.0}
    s = {"params": 250, "flops": 100, "size_bytes": 1000, "latency_ms": 1.5, "top1": 50.0}
    assert compression(t, s) == pytest.approx(
        {"params_ratio": 4.0, "size_ratio": 4.0, "flops_ratio": 4.0, "latency_speedup": 2.0}
    )
    assert compression(t, {"params": 0})["params_ratio"] is None
    assert compression({}, s)["latency_speedup"] is None


def test_write_report_full(tmp_path):
    rep = sample_report()
    run_dir = tmp_path / "run"
    confusion = torch.tensor([[5, 1], [2, 7]])
    write_report(
        rep,
        run_dir,
        histories=write_histories(tmp_path),
        confusion=confusion,
        class_names=["cat", "dog"],
    )

    with open(run_dir / "report.json") as f:
        assert json.load(f) == json.loads(json.dumps(rep))

    md = (run_dir / "report.md").read_text()
    assert md.startswith("# kd report: resnet20 → tiny_cnn on cifar10_subset")
    assert (
        "The distilled student (tiny_cnn) reaches 71.2% top-1 vs 65.0% from scratch "
        "(+6.2 points) and 80.0% for the teacher, with 5.0× fewer parameters and 4.0× "
        "lower latency." in md
    )
    header = (
        "| metric | teacher (resnet20) | baseline (from scratch) | distilled student (tiny_cnn) |"
    )
    assert header in md
    assert "| top-1 (%) | 80.00 | 65.00 | 71.25 |" in md
    assert "| top-5 (%) | 98.50 | 94.00 | 96.00 |" in md
    assert "| macro-F1 (%) | 79.25 | 64.00 | 70.50 |" in md
    assert "| agreement with teacher (%) | — | 70.00 | 78.50 |" in md
    assert "| params | 0.27M | 54.0K | 54.0K |" in md  # baseline shares the student's costs
    assert "| FLOPs (2 × multiply-adds) | 40.8M | 5.1M | 5.1M |" in md
    assert "| size | 1.0 MiB | 215 KiB | 215 KiB |" in md
    assert "| latency (ms) | 4.00 | 1.00 | 1.00 |" in md
    assert "| params | 0.27M | 54.0K | 5.0× |" in md  # compression table
    assert "| latency (ms) | 4.00 | 1.00 | 4.0× |" in md
    assert ("Latency is the median CPU fp32 batch-1 forward time with 2 CPU threads, teacher "
            "and student timed in turn;") in md
    assert "| teacher | trained |" in md and "| cache | reused |" in md
    assert "| student | resumed |" in md and "| baseline | not run |" in md
    assert "| bytes per train sample | 40 B |" in md and "| storage | full logits |" in md
    assert "HintonLoss (temperature=4.0, ce_weight=0.1, kd_weight=0.9)" in md
    assert "| teacher.epochs | 30 |" in md and "| student.epochs | 20 |" in md
    assert "| torch | 2.15.0 |" in md

    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == [
        "plots/accuracy_vs_params.png",
        "plots/confusion_matrix.png",
        "plots/training_curves.png",
    ]
    for link in links:
        png = run_dir / link
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run_dir.rglob("*.tmp"))


def test_report_without_baseline_or_cache(tmp_path):
    rep = sample_report()
    rep["baseline"] = None
    rep["cache"] = None
    rep["distillation_gain"] = None
    rep["config"] = None
    del rep["versions"]
    write_report(rep, tmp_path)

    assert json.loads((tmp_path / "report.json").read_text())["baseline"] is None
    md = (tmp_path / "report.md").read_text()
    assert "reaches 71.2% top-1 vs 80.0% for the teacher, with 5.0× fewer parameters" in md
    assert "from scratch (" not in md
    assert "| top-1 (%) | 80.00 | — | 71.25 |" in md
    assert "No soft-label cache was recorded" in md
    assert "| kd | 0.1.0 |" in md  # falls back to kd_version
    assert "plots/training_curves.png" not in md and "confusion_matrix" not in md


@pytest.mark.parametrize("mode, says", [
    ("online", "Not needed: the loss reads teacher features"),
    ("none", "Not needed: the loss reads hard labels only"),
])
def test_report_of_a_run_that_needed_no_cache(tmp_path, mode, says):
    rep = sample_report()
    rep["student"]["mode"] = mode
    rep["cache"] = None
    rep["stages"]["cache"] = "not needed"
    write_report(rep, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| cache | not needed |" in md
    assert says in md and "No soft-label cache was recorded" not in md


def test_a_student_of_the_teachers_size_is_not_called_smaller(tmp_path: Path) -> None:
    # teacher=resnet8 student=resnet8 read "with 1.0× fewer parameters and 1.1× higher latency".
    rep = sample_report()
    rep["compression"].update({"params_ratio": 1.0, "latency_speedup": 0.97})
    write_report(rep, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "with as many parameters and about the same latency." in md


def test_report_with_almost_nothing(tmp_path):
    write_report({"teacher": {"name": "resnet20", "top1": 50.0}, "student": None}, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "No distilled student was evaluated" in md and "50.0% top-1" in md


def test_json_converts_tensors_and_numpy(tmp_path):
    rep = sample_report()
    rep["teacher"]["top1"] = torch.tensor(80.0)
    rep["teacher"]["params"] = np.int64(272474)
    rep["student"]["latency_ms"] = np.float32(1.0)
    rep["config"]["out_dir"] = tmp_path
    rep["wall_time_s"] = float("nan")
    write_report(rep, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["teacher"]["top1"] == 80.0 and data["teacher"]["params"] == 272474
    assert data["student"]["latency_ms"] == 1.0
    assert data["config"]["out_dir"] == str(tmp_path)
    assert data["wall_time_s"] is None  # NaN is not valid JSON


def test_plot_failure_still_writes_markdown(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(report_mod, "_new_figure", broken)
    write_report(sample_report(), tmp_path, histories=write_histories(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "| top-1 (%) | 80.00 | 65.00 | 71.25 |" in md
    assert "![" not in md
    assert "Could not draw" in caplog.text


def test_missing_matplotlib_still_writes_markdown(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    write_report(sample_report(), tmp_path, histories=write_histories(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "| top-5 (%) | 98.50 | 94.00 | 96.00 |" in md
    assert "![" not in md and not (tmp_path / "plots").exists()
    assert "matplotlib unavailable" in caplog.text


def test_atomic_write_keeps_previous_report(tmp_path, monkeypatch):
    write_report(sample_report(), tmp_path)
    before_json = (tmp_path / "report.json").read_bytes()
    before_md = (tmp_path / "report.md").read_bytes()
    files_before = sorted(p.name for p in tmp_path.iterdir())

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    changed = sample_report()
    changed["student"]["top1"] = 1.0
    with pytest.raises(OSError, match="disk full"):
        write_report(changed, tmp_path)

    assert (tmp_path / "report.json").read_bytes() == before_json
    assert (tmp_path / "report.md").read_bytes() == before_md
    assert sorted(p.name for p in tmp_path.iterdir()) == files_before
    assert not list(tmp_path.rglob("*.tmp"))


def test_missing_top5_and_nan_metrics_read_as_dashes(tmp_path):
    # top5 is None with 5 classes or fewer, and every metric NaN for non-finite logits
    # (kdcli.metrics): null in the JSON, "—" in the Markdown, never a number.
    rep = sample_report()
    for role in ("teacher", "student", "baseline"):
        rep[role]["top5"] = None
    rep["student"].update(top1=float("nan"), macro_f1=float("nan"), agreement=float("nan"))
    write_report(rep, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["student"]["top1"] is None and data["teacher"]["top5"] is None
    md = (tmp_path / "report.md").read_text()
    assert "| top-5 (%) | — | — | — |" in md
    assert "| top-1 (%) | 80.00 | 65.00 | — |" in md
    assert "| agreement with teacher (%) | — | 70.00 | — |" in md
    # The student was evaluated: the summary says its logits were not finite, not that it
    # is missing.
    assert "gave non-finite test logits" in md and "No distilled student" not in md


def drawn_figures(monkeypatch) -> dict[str, object]:
    """Collects the report's figures by file name instead of only their PNG bytes."""
    figures: dict[str, object] = {}
    save = report_mod._save_figure

    def keep(fig, path):
        figures[Path(path).name] = fig
        save(fig, path)

    monkeypatch.setattr(report_mod, "_save_figure", keep)
    return figures


def test_report_says_which_checkpoint_and_split_it_evaluates(tmp_path, monkeypatch):
    # Every figure is of last.pt on the test split, but the report named neither, and the
    # curves called the per-epoch test accuracy "Validation".
    figures = drawn_figures(monkeypatch)
    write_report(sample_report(), tmp_path, histories=write_histories(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "on the test split, of each model's final weights (`last.pt`;" in md
    assert "`best.pt` is the epoch with the best test top-1" in md
    titles = [ax.get_title() for ax in figures["training_curves.png"].axes]
    assert titles == ["Training loss", "Test top-1 per epoch"]


def test_wall_time_covers_the_plots(tmp_path, monkeypatch):
    # The wall time was taken before the report's profiling, timing and plots: a run whose
    # stages were all reused read 0.02 s where about 2 s were spent.
    import time

    slow = report_mod._plot_accuracy_vs_params

    def slow_plot(*args):
        time.sleep(0.3)
        return slow(*args)

    monkeypatch.setattr(report_mod, "_plot_accuracy_vs_params", slow_plot)
    rep = sample_report()
    started = time.perf_counter() - 1.0  # the run began a second ago
    write_report(rep, tmp_path, started=started)
    wall = json.loads((tmp_path / "report.json").read_text())["wall_time_s"]
    assert wall >= 1.3 and rep["wall_time_s"] == wall
    md = (tmp_path / "report.md").read_text()
    assert f"Total wall time: {wall:.1f} s (dataset load, every stage" in md


def test_cache_rows_say_train_payload_entry_size_and_views(tmp_path):
    # "total" was the train file's payload alone, ~60 % under the entry on disk, and the views
    # that multiply the bytes per sample were not shown.
    rep = sample_report()
    rep["cache"].update(views=2, bytes_per_sample=80)
    write_report(rep, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| train samples | 5,000 |" in md
    assert "| cached views per sample | 2 |" in md
    assert "| train payload | 391 KiB |" in md  # 80 B x 5000
    assert "| entry on disk | 322 KiB |" in md
    assert "| total |" not in md
    rep["cache"]["views"] = 0
    write_report(rep, tmp_path)
    assert "| cached views per sample | none (plain images) |" in (tmp_path / "report.md"
                                                                    ).read_text()


def test_confusion_matrix_of_many_classes_labels_every_kth_with_integer_colour_ticks(
        tmp_path, monkeypatch):
    # At 100 classes every tick label was drawn and they overlapped into a solid band; the
    # colour bar showed fractional "samples" (0.25, 1.25, ...).
    figures = drawn_figures(monkeypatch)
    confusion = torch.zeros(100, 100, dtype=torch.long)
    confusion[torch.arange(100), torch.arange(100)] = torch.arange(100) % 3  # counts 0..2
    write_report(sample_report(), tmp_path, confusion=confusion,
                 class_names=[f"class{i}" for i in range(100)])
    ax, colorbar = figures["confusion_matrix.png"].axes
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert 10 <= len(labels) <= 30 and labels[:2] == ["0: class0", "4: class4"]
    assert "one label per 4 classes" in ax.get_xlabel()
    ticks = [t for t in colorbar.get_yticks() if 0 <= t <= 2]
    assert ticks and all(float(t).is_integer() for t in ticks)
    figures.clear()
    write_report(sample_report(), tmp_path, confusion=torch.tensor([[5, 1], [2, 7]]),
                 class_names=["cat", "dog"])
    ax = figures["confusion_matrix.png"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog"]


def test_multi_teacher_curves_are_shades_of_the_teacher_colour(tmp_path, monkeypatch):
    # teacher-<name> stages took matplotlib's default cycle: the second teacher was drawn in
    # nearly the baseline's orange.
    from matplotlib.colors import to_rgb

    figures = drawn_figures(monkeypatch)
    histories = write_histories(tmp_path)
    teacher = histories.pop("teacher")
    baseline = tmp_path / "baseline.csv"
    baseline.write_text(teacher.read_text())
    histories.update({"teacher-mlp": teacher, "teacher-tiny_cnn-wide": teacher,
                      "baseline": baseline})
    write_report(sample_report(), tmp_path, histories=histories)
    lines = {line.get_label(): to_rgb(line.get_color())
             for line in figures["training_curves.png"].axes[0].get_lines()}
    shades = [lines["teacher-mlp"], lines["teacher-tiny_cnn-wide"]]
    assert shades[0] != shades[1]
    for r, g, b in shades:
        assert b > r and b > g  # blue, as the teacher
    assert lines["from scratch"] == to_rgb("#dd8452") not in shades


def test_speedup_divides_the_fastest_calls_where_both_were_timed_together():
    # Medians on a busy machine gave one teacher/student pair speed-ups from 2.9x to 12.4x.
    t = {"latency_ms": 7.0, "latency_min_ms": 0.8}
    s = {"latency_ms": 0.3, "latency_min_ms": 0.2}
    assert compression(t, s)["latency_speedup"] == pytest.approx(4.0)
    assert compression({"latency_ms": 3.0}, s)["latency_speedup"] == pytest.approx(10.0)


def test_report_says_when_the_models_were_timed_on_a_busy_machine(tmp_path):
    rep = sample_report()
    rep["latency"] = {"threads": 1, "other_load": 2.6, "cpus": 2, "busy": True}
    rep["latency_threads"] = 1
    write_report(rep, tmp_path)
    md = (tmp_path / "report.md").read_text()
    results = md[md.index("## Results"):md.index("## Compression")]
    assert "with 1 CPU thread" in results
    assert "Timed on a busy machine** (other processes used 2.6 of 2 CPUs)" in results
    assert "Timed on a busy machine" in md[md.index("## Compression"):]
    assert json.loads((tmp_path / "report.json").read_text())["latency"]["busy"] is True
    rep["latency"]["busy"] = False
    write_report(rep, tmp_path)
    assert "busy" not in (tmp_path / "report.md").read_text()


def test_report_says_what_the_models_were_trained_in(tmp_path):
    # report.md never said the precision (bf16 top-1 figures) or that the run was compiled.
    rep = sample_report()
    write_report(rep, tmp_path)
    assert "Trained on" not in (tmp_path / "report.md").read_text()  # an older report.json
    rep["device"] = "cpu, bf16, channels_last, torch.compile (default)"
    write_report(rep, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "\nTrained on cpu, bf16, channels_last, torch.compile (default).\n" in md
    assert md.index("Dataset: ") < md.index("Trained on") < md.index("## Results")
    rep["ranks"] = 2  # torchrun --nproc_per_node=2
    write_report(rep, tmp_path)
    assert ("\nTrained on cpu, bf16, channels_last, torch.compile (default); this run data "
            "parallel over 2 ranks (torchrun).\n") in (tmp_path / "report.md").read_text()


def test_report_warns_of_a_teacher_at_chance_or_below_the_baseline(tmp_path):
    # A review's teacher read 10.67% on 10 classes, under the baseline's 15.33%, and the
    # report's first sentence still read as a distillation result.
    rep = sample_report()
    rep["dataset"]["test_size"] = 150
    assert report_mod.teacher_warning(rep) is None
    rep["teacher"]["top1"], rep["baseline"]["top1"] = 10.67, 15.33
    write_report(rep, tmp_path)
    md = (tmp_path / "report.md").read_text().split("\n")
    assert md[4] == ("**Warning:** The teacher (resnet20) is at chance: 10.7% test top-1 on 10 "
                     "classes, where guessing gets 10.0%. Distilling from it teaches nothing; "
                     "train it longer or check its data and labels.")
    rep["teacher"]["top1"] = 16.0  # above chance + 2 standard errors (14.9) on 150 images
    assert report_mod.teacher_warning(rep) is None
    # The larger split decides: 11% on 100 validation images is not heard over 16% on the 150
    # test images, and is on 300 (a review's 64-image split raised a false alarm).
    rep["teacher"]["val_top1"], rep["dataset"]["val_size"] = 11.0, 100
    assert report_mod.teacher_warning(rep) is None
    rep["dataset"]["val_size"] = 300
    assert "11.0% validation top-1" in report_mod.teacher_warning(rep)
    del rep["teacher"]["val_top1"]
    rep["teacher"]["top1"], rep["baseline"]["top1"] = 50.0, 65.0
    assert report_mod.teacher_warning(rep) == (
        "The teacher (resnet20) is worse than the student trained from scratch: 50.0% against "
        "65.0% test top-1. Distilling from it is unlikely to help; train it longer or pick a "
        "stronger one.")


@pytest.mark.parametrize("start, init, label, headline, than, config_row", [
    ("teacher", "student.init=from_teacher (resnet20)", "teacher init",
     "for the baseline from the teacher's weights",
     "the baseline (the student trained on hard labels, from the teacher's weights)",
     "| student.init | from_teacher |"),
    ("pretrain", "student init from pretraining", "pretrained on cifar10",
     "for the baseline pretrained on cifar10",
     "the baseline (the student trained on hard labels, pretrained on cifar10)",
     "| pretrain.dataset | cifar10 |"),
])
def test_report_names_what_the_baseline_started_from(tmp_path, monkeypatch, start, init, label,
                                                     headline, than, config_row):
    # With student.init=from_teacher (or pretraining) the baseline starts from those weights,
    # but the report called it "from scratch" in its first sentence, its column and its
    # warning, and said nowhere how the student started.
    figures = drawn_figures(monkeypatch)
    rep = sample_report()
    rep["student"]["init"] = rep["baseline"]["init"] = init
    if start == "teacher":
        rep["config"]["student"]["init"] = "from_teacher"
    else:
        rep["config"]["pretrain"] = {"dataset": "cifar10", "epochs": 1, "root": None}
    write_report(rep, tmp_path, histories={"baseline": write_histories(tmp_path)["teacher"]})
    md = (tmp_path / "report.md").read_text()
    assert "from scratch" not in md and "from-scratch" not in md
    assert f"reaches 71.2% top-1 vs 65.0% {headline} (+6.2 points)" in md
    assert f"| metric | teacher (resnet20) | baseline ({label}) |" in md
    assert config_row in md
    assert ("| pretrain.epochs | 1 |" in md) == (start == "pretrain")
    assert [line.get_label() for line in figures["training_curves.png"].axes[0].get_lines()] \
        == [f"baseline ({label})"]
    rep["teacher"]["top1"] = 50.0
    assert report_mod.teacher_warning(rep).startswith(
        f"The teacher (resnet20) is worse than {than}: 50.0% against 65.0% test top-1.")


def test_configuration_lists_no_start_of_a_student_from_scratch(tmp_path):
    rep = sample_report()
    rep["config"]["student"]["init"] = "scratch"
    rep["config"]["pretrain"] = {"dataset": None, "epochs": 0}
    write_report(rep, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| baseline (from scratch) |" in md
    assert "student.init" not in md and "pretrain." not in md  # pretrain.epochs | 0 included


def test_report_gives_the_pretraining_sets_image_counts(tmp_path):
    # `experiment=smoke pretrain.dataset=cifar10 pretrain.epochs=1` pretrained on the preset's
    # 512 images, and nothing said so.
    rep = sample_report()
    rep["student"]["init"] = "student init from pretraining"
    rep["pretrain"] = {"dataset": "cifar10", "train_size": 512, "val_size": None,
                       "test_size": 256, "epochs": 1, "top1": 14.45, "train_time_s": 3.8,
                       "status": "trained"}
    write_report(rep, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert ("Pretraining: **cifar10**, 512 train, 256 test images, 1 epoch, 14.4% top-1 on its "
            "own test split, trained in 3.8 s. The student and the baseline start from these "
            "weights.") in md
    assert "| baseline (pretrained on cifar10) |" in md


def test_report_warns_of_a_collapsed_distilled_student(tmp_path):
    # A review's FitNets student read 8.6% on 10 classes against the baseline's 17.6% (256
    # test images); the report gave the numbers without a word, while a weak teacher got a
    # bold Warning.
    rep = sample_report()
    rep["dataset"]["test_size"] = 256
    rep["config"]["loss"] = {"_target_": "kdcli.losses.fitnets.FitNetsLoss", "ce_weight": 1.0,
                             "hint_weight": 100.0, "student_layer": "block2"}
    rep["teacher"]["top1"], rep["baseline"]["top1"] = 30.0, 17.6
    rep["student"]["top1"] = 8.6
    write_report(rep, tmp_path)
    md = (tmp_path / "report.md").read_text().split("\n")
    assert md[4] == ("**Warning:** The distilled student (tiny_cnn) is at chance: 8.6% test "
                     "top-1 on 10 classes, where guessing gets 10.0%. The distillation term may "
                     "be swamping the labels; lower loss.hint_weight, or train it for more "
                     "epochs (trainer.student.epochs).")
    # On 1,000 images: above chance + 2 standard errors (11.9), but more than two standard
    # errors of the baseline's accuracy (2.4 points) below it.
    rep["dataset"]["test_size"] = 1000
    rep["student"]["top1"] = 14.0
    assert report_mod.student_warning(rep) == (
        "The distilled student (tiny_cnn) is far below the baseline (from scratch): 14.0% "
        "against 17.6% test top-1, more than two standard errors (2.4 points on 1000 images) "
        "apart. Distillation hurt it; lower loss.hint_weight, or train it for more epochs "
        "(trainer.student.epochs).")
    rep["student"]["top1"] = 15.5  # 2.1 points below: within the noise
    assert report_mod.student_warning(rep) is None
    # At chance beside a baseline that does no better: the budget, not the distillation loss.
    rep["student"]["top1"], rep["baseline"]["top1"] = 10.5, 11.0
    assert report_mod.student_warning(rep) == (
        "The distilled student (tiny_cnn) is at chance: 10.5% test top-1 on 10 classes, where "
        "guessing gets 10.0%; the baseline (from scratch) does no better (11.0%), so the "
        "training budget is too short for this data: train for more epochs "
        "(trainer.student.epochs) or check the data and labels.")
    rep["student"]["top1"] = float("nan")  # no accuracy: the summary says why
    assert report_mod.student_warning(rep) is None
    assert report_mod.student_warning(sample_report()) is None


def test_train_time_of_a_reused_stage_is_marked(tmp_path):
    # A reused teacher's "train time" is the one of the run that trained it: unmarked, it
    # read as time this run spent.
    rep = sample_report()
    rep["stages"].update(teacher="reused", baseline="reused")
    write_report(rep, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| train time | 10 min 00 s (reused) | 1 min 30 s (reused) | 1 min 35 s |" in md
    assert "A train time marked (reused) is the one of the run that trained the model" in md
    rep["stages"] = {"teacher-a": "reused", "teacher-b": "trained", "student": "reused"}
    write_report(rep, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| train time | 10 min 00 s | 1 min 30 s | 1 min 35 s (reused) |" in md
    rep["stages"]["teacher-b"] = "reused"
    write_report(rep, tmp_path)
    assert "| train time | 10 min 00 s (reused) |" in (tmp_path / "report.md").read_text()
