"""`kd export`: a smoke run's student to ONNX, TorchScript and int8 ONNX, checked and reported."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcli import checkpoint, export
from kdcli.data.imagefolder import image_folder
from kdcli.errors import ConfigError, CorruptArtifact, DataError, TrainingDiverged
from tests.conftest import SMOKE, TINY, kd, read_report
from tests.test_imagefolder import write_image_folder

# Few timed runs: the figures are not under test, only that they are there.
FAST = ["--latency-runs", "5", "--warmup", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One smoke run, exported once with --int8; tests that change it work on a copy."""
    tmp = tmp_path_factory.mktemp("export")
    run_dir = tmp / "run"
    kd("train", *SMOKE, f"store={tmp / 'store'}", f"hydra.run.dir={run_dir}", cwd=tmp)
    kd("export", str(run_dir), "--int8", *FAST, cwd=tmp)
    return run_dir


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def read_export(run_dir: Path) -> dict:
    return json.loads((run_dir / "export" / "export.json").read_text())


def test_files_written(run: Path) -> None:
    for name in ("student.onnx", "student.ts", "student.int8.onnx", "export.json", "export.md"):
        assert (run / "export" / name).stat().st_size > 0, name
    assert not list((run / "export").glob(".*")), "temp files left behind"


def test_export_says_how_to_feed_the_model(run: Path) -> None:
    # A deployer had to guess the normalisation and the class order: export.json records them,
    # and following them on raw uint8 images gives exactly what the model was checked on.
    import onnxruntime as ort

    from kdcli.data.datasets import cifar10_subset
    from kdcli.data.loader import BatchLoader

    spec = read_export(run)["input"]
    ds = cifar10_subset()
    assert spec["shape"] == [1, 3, 32, 32] and spec["classes"] == ds.classes
    assert "resize" not in spec  # CIFAR images are used as they are
    raw = ds.test.images[:16]
    mean, std = (torch.tensor(spec[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    x = (raw.float() / 255 - mean) / std
    fed = next(iter(BatchLoader(ds.test, 16, device=torch.device("cpu"), mean=ds.mean,
                                std=ds.std).epoch(0))).images
    torch.testing.assert_close(x, fed, atol=1e-5, rtol=1e-5)
    session = ort.InferenceSession(str(run / "export" / "student.onnx"))
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i:i + 1].numpy()})[0]
                             for i in range(len(x))])
    assert logits.shape == (16, len(spec["classes"]))
    assert "Input: 1×3×32×32 float32 NCHW, RGB" in (run / "export" / "export.md").read_text()


def test_input_spec_of_an_image_folder_names_its_resize_and_crop() -> None:
    from kdcli.data.datasets import Dataset, Split

    split = Split(torch.zeros(1, 3, 224, 224, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))
    ds = Dataset("imf", split, split, ["Dog", "bird"], mean=(0.5,) * 3, std=(0.25,) * 3)
    loader = {"_target_": "kdcli.data.imagefolder.image_folder", "resize": None}
    spec = export.input_spec(ds, loader)
    assert spec["resize"] == "shorter side to 256 px (bilinear), then the centre 224x224 crop"
    assert spec["classes"] == ["Dog", "bird"] and spec["mean"] == [0.5, 0.5, 0.5]
    assert export.input_spec(ds, {**loader, "resize": 224})["resize"].startswith(
        "shorter side to 224 px")


def test_float_formats_match_pytorch_and_the_report(run: Path) -> None:
    data, report = read_export(run), read_report(run)
    atol = data["tolerance"]["atol"]
    assert data["checkpoint"] == "last"  # what the report's student block evaluates
    for fmt in ("pytorch", "onnx", "torchscript"):
        f = data["formats"][fmt]
        # The report's top-1 came from the training device; same weights, within 0.5 points.
        assert abs(f["top1"] - report["student"]["top1"]) <= 0.5, fmt
        assert f["agreement"] >= 99.9, fmt
        assert f["latency_ms"] > 0 and f["size_bytes"] > 0, fmt
    for fmt in ("onnx", "torchscript"):
        assert 0 <= data["formats"][fmt]["max_abs_diff"] <= atol, fmt
    assert data["test_size"] == report["dataset"]["test_size"]
    # Measured on the very images the run evaluated, not only as many.
    assert data["test_fingerprint"] == report["dataset"]["test_fingerprint"]


def test_int8_is_measured(run: Path) -> None:
    q = read_export(run)["formats"]["int8"]
    assert math.isfinite(q["top1"]) and 0 <= q["top1"] <= 100
    assert 0 <= q["agreement"] <= 100
    assert q["calibration_split"] == "train" and q["calibration_images"] == 512
    assert q["size_bytes"] < read_export(run)["formats"]["onnx"]["size_bytes"]
    assert q["method"].startswith(("static", "dynamic"))


def test_report_gets_export_block_and_section(run: Path) -> None:
    report = read_report(run)
    assert set(report["export"]["formats"]) == {"pytorch", "onnx", "torchscript", "int8"}
    assert {"student", "teacher", "config", "stages"} <= set(report)  # the rest is kept
    md = (run / "report.md").read_text()
    assert md.count("## Export") == 1
    assert "student int8 ONNX" in md and "## Results" in md
    table = (run / "export" / "export.md").read_text()
    for row in ("teacher", "student fp32 PyTorch", "student ONNX", "student TorchScript",
                "student int8 ONNX"):
        assert f"| {row}" in table


def test_rerun_replaces_the_section(run: Path, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path / "run")
    kd("export", str(copy), "--formats", "torchscript", *FAST, cwd=tmp_path)
    md = (copy / "report.md").read_text()
    assert md.count("## Export") == 1
    assert "student TorchScript" in md and "student int8 ONNX" not in md
    assert set(read_report(copy)["export"]["formats"]) == {"pytorch", "torchscript"}
    # The first export's ONNX and int8 files are gone: nothing describes them any more.
    assert sorted(p.name for p in (copy / "export").iterdir()) == [
        "export.json", "export.md", "student.ts"]


def test_failed_check_leaves_the_earlier_export_as_it_was(run: Path, tmp_path: Path,
                                                          monkeypatch) -> None:
    # The report and export.json describe the earlier, passing export: OUT's model files must
    # stay the ones they describe, and the failed ones go where nothing says they passed.
    copy = copy_run(run, tmp_path / "run")
    out = copy / "export"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    reports = [(copy / name).read_bytes() for name in ("report.json", "report.md")]

    def fail(name: str, *_: object, **__: object) -> dict:
        raise export.ParityError(f"{name}: made to fail")

    monkeypatch.setattr(export, "check_parity", fail)
    with pytest.raises(export.ParityError, match=f"in {out / 'failed'} for inspection"):
        export.main([str(copy), "--int8", *FAST])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert [(copy / name).read_bytes() for name in ("report.json", "report.md")] == reports
    assert sorted(p.name for p in (out / "failed").iterdir()) == ["student.onnx", "student.ts"]
    assert not list(out.glob(".*")), "staging folder left behind"
    # The next passing export replaces the old one and clears the failed files away.
    monkeypatch.undo()
    export.main([str(copy), "--formats", "torchscript", *FAST])
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "export.md", "student.ts"]


def test_stale_int8_file_is_removed(tmp_path: Path) -> None:
    for name in ("student.onnx", "student.int8.onnx", "student.ts", "notes.txt"):
        (tmp_path / name).write_text("x")
    removed = export.remove_stale(tmp_path, {"student.onnx", "student.ts"})
    assert removed == ["student.int8.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "student.onnx",
                                                          "student.ts"]
    assert export.remove_stale(tmp_path, {"student.onnx", "student.ts"}) == []


def test_store_relative_to_the_training_cwd_is_anchored(tmp_path: Path, monkeypatch) -> None:
    # `store` defaults to a relative path; an image folder's decoded cache lives under it.
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(
        "store: kd-store\nstudent: {name: s}\ndataset:\n  cache_dir: ${store}/datasets\n")
    root = tmp_path / "kd-store"
    (run_dir / "report.json").write_text(json.dumps(
        {"student": {}, "store": {"student": str(root / "student" / "resnet8-abc")}}))
    monkeypatch.chdir(run_dir)  # anywhere but where training ran
    cfg, _ = export.load_run(run_dir)
    assert cfg.dataset.cache_dir == f"{root}/datasets"


def test_relative_dataset_paths_are_read_where_the_run_started(tmp_path: Path) -> None:
    # The image folder is given relative to where `kd train` ran, and the store (with the
    # decoded-image cache) is the default relative `kd-store`; export runs from elsewhere.
    write_image_folder(tmp_path / "imf", train_per_class=8, val_per_class=3)
    run_dir = tmp_path / "run"
    kd("train", *SMOKE, "dataset=imagefolder", "dataset.loader.root=imf", "dataset.image_size=32",
       "baseline=false", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    kd("export", str(run_dir), "--formats", "torchscript", *FAST, cwd=elsewhere)
    assert read_export(run_dir)["test_size"] == 30
    assert not list(elsewhere.iterdir())  # nothing read or decoded relative to here


def test_export_writes_no_cache_where_the_store_is_gone(tmp_path: Path, monkeypatch) -> None:
    # The run's store (and the decoded-image cache in it) is gone: export decodes, and writes
    # nothing outside OUT and the run folder, so it does not recreate the store there.
    write_image_folder(tmp_path / "imf", train_per_class=8, val_per_class=2)
    run_dir = tmp_path / "run"
    kd("train", *SMOKE, "dataset=imagefolder", "dataset.loader.root=imf", "dataset.image_size=32",
       "baseline=false", "trainer.teacher.epochs=1", "trainer.student.epochs=1",
       f"hydra.run.dir={run_dir}", cwd=tmp_path)
    shutil.rmtree(tmp_path / "kd-store")
    kd("export", str(run_dir), "--formats", "torchscript", *FAST, cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imf", "run"]
    # A relative root that is not there is named with the folder it was looked up in.
    monkeypatch.chdir(run_dir)
    with pytest.raises(DataError, match=f"imf \\(looked in {run_dir / 'imf'};"):
        image_folder("imf", image_size=32)


def test_launch_dir_is_where_the_run_started(tmp_path: Path) -> None:
    run_dir, started = tmp_path / "run", tmp_path / "project"
    (run_dir / ".hydra").mkdir(parents=True)
    assert export.launch_dir(run_dir) is None  # no hydra.yaml: paths stay as they are
    (run_dir / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    cwd: {started}\n")
    assert export.launch_dir(run_dir) is None  # the directory is gone
    started.mkdir()
    assert export.launch_dir(run_dir) == started


def test_teacher_is_timed_with_the_formats(run: Path, tmp_path: Path) -> None:
    # report.json's teacher latency was timed when the run finished, maybe under other load;
    # the speed-ups must compare it with nothing but figures timed alongside it.
    copy = copy_run(run, tmp_path / "run")
    report = read_report(copy)
    report["teacher"]["latency_ms"] = 12345.0
    (copy / "report.json").write_text(json.dumps(report))
    kd("export", str(copy), "--formats", "torchscript", *FAST, cwd=tmp_path)
    data = read_export(copy)
    teacher = data["teacher"]
    assert 0 < teacher["latency_ms"] < 12345.0 and teacher["report_latency_ms"] == 12345.0
    assert teacher["weights"] == [str(copy / "checkpoints" / "teacher" / "last.pt")]
    md = (copy / "export" / "export.md").read_text()
    # The speed-up divides the fastest calls, as report.md's does: the medians read 8.9x and
    # 7.3x in two exports of a run whose report.md said 2.8x.
    speedup = export._ratio(teacher["latency_min_ms"],
                            data["formats"]["pytorch"]["latency_min_ms"])
    assert speedup != "—" and data["latency"]["speedup_from"] == "min"
    assert next(line for line in md.splitlines()
                if line.startswith("| student fp32 PyTorch")).endswith(f"| {speedup} |")
    assert "the teacher (PyTorch fp32, `last.pt`) and the formats timed in turns" in md


@pytest.mark.parametrize("load, threads", [(5.0, 1), (0.1, 2)])
def test_export_times_as_the_report_does_and_records_it(run: Path, tmp_path: Path, monkeypatch,
                                                        load: float, threads: int) -> None:
    # Export kept every thread on a busy machine (only a warning) where kd train's report takes
    # one: its speed-ups and report.md's disagreed on the same weights.
    copy = copy_run(run, tmp_path / "run")
    sessions, seen = [], []
    ort_session, torch_predict = export.ort_session, export.torch_predict

    def counting_session(path: Path, n: int):
        sessions.append(n)
        return ort_session(path, n)

    def counting_predict(module):
        fn = torch_predict(module)

        def run(x):
            if len(x) == 1:  # a timed call, not the parity check's batches
                seen.append(torch.get_num_threads())
            return fn(x)
        return run

    monkeypatch.setattr(export, "ort_session", counting_session)
    monkeypatch.setattr(export, "torch_predict", counting_predict)
    monkeypatch.setattr("kdcli.device.usable_cores", lambda: 2)
    monkeypatch.setattr("kdcli.device.machine_load", lambda: (load, 2))
    assert export.main([str(copy), *FAST]) == 0
    assert sessions == [threads] and seen and set(seen) == {threads}
    latency = read_export(copy)["latency"]
    assert {k: latency[k] for k in ("threads", "other_load", "cpus", "busy")} == {
        "threads": threads, "other_load": load, "cpus": 2, "busy": load > 1}
    md = (copy / "export" / "export.md").read_text()
    assert (f"{threads} thread(s)" in md and
            "the speed-ups divide the fastest calls" in md)
    assert ("**Timed on a busy machine** (other processes used 5.0 of 2 CPUs), hence with one "
            "thread" in md) == (load > 1)


def test_a_read_only_run_folder_still_exports_elsewhere(run: Path, tmp_path: Path, monkeypatch,
                                                        caplog) -> None:
    # The export passed, then kd exited 1 with "RUN/.report.json.xxxx.tmp: Read-only file
    # system": the user could not tell the export from the report update.
    import errno

    copy, out = copy_run(run, tmp_path / "run"), tmp_path / "elsewhere"
    before = (copy / "report.json").read_text()
    write = export.atomic_write_text

    def read_only_run(path: Path, text: str) -> None:
        if path.is_relative_to(copy):
            raise OSError(errno.EROFS, "Read-only file system", str(path.parent / ".x.tmp"))
        write(path, text)

    monkeypatch.setattr(export, "atomic_write_text", read_only_run)
    with caplog.at_level(logging.WARNING, logger="kdcli.export"):
        assert export.main([str(copy), "--formats", "torchscript", "--out", str(out),
                            *FAST]) == 0
    assert (out / "student.ts").is_file() and (out / "export.json").is_file()
    assert (copy / "report.json").read_text() == before
    assert (f"exported to {out} (checked; export.json and export.md there); could not add the "
            f"table to {copy / 'report.md'}: Read-only file system") in caplog.text


def test_teacher_without_weights_leaves_the_speed_ups_out(run: Path, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path / "run")
    shutil.rmtree(copy / "checkpoints" / "teacher")
    report = read_report(copy)
    key = next(k for k in report["store"] if k.startswith("teacher-"))
    report["store"][key] = str(tmp_path / "gone" / "teacher" / "entry")
    (copy / "report.json").write_text(json.dumps(report))
    kd("export", str(copy), "--formats", "torchscript", *FAST, cwd=tmp_path)
    teacher = read_export(copy)["teacher"]
    assert teacher["latency_ms"] is None and "weights are gone" in teacher["not_timed"]
    md = (copy / "export" / "export.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith(("| teacher", "| student"))]
    assert len(rows) == 4 and all(row.endswith("| — |") for row in rows)
    assert "The teacher was not timed (teacher " in md and "is not compared" in md


def test_several_teachers_are_timed_one_after_another(tmp_path: Path) -> None:
    # The run config holds only the teachers' merge: each comes from its store entry's inputs.
    run_dir = tmp_path / "run"
    kd("train", *SMOKE, "teacher=[tiny_cnn-wide,tiny_cnn]", "baseline=false",
       f"store={tmp_path / 'store'}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    kd("export", str(run_dir), "--formats", "torchscript", *FAST, cwd=tmp_path)
    teacher = read_export(run_dir)["teacher"]
    assert teacher["latency_ms"] > 0
    assert teacher["weights"] == [str(run_dir / "checkpoints" / f"teacher-{name}" / "last.pt")
                                  for name in ("tiny_cnn-wide", "tiny_cnn")]
    # A model config that no longer hashes to its entry's key is not instantiated.
    meta = next((tmp_path / "store" / "teacher").glob("tiny_cnn-wide-*/meta.json"))
    recorded = json.loads(meta.read_text())
    recorded["inputs"]["model"]["width"] = 8
    meta.write_text(json.dumps(recorded))
    kd("export", str(run_dir), "--formats", "torchscript", *FAST, cwd=tmp_path)
    teacher = read_export(run_dir)["teacher"]
    assert teacher["latency_ms"] is None
    assert "does not match its entry's key" in teacher["not_timed"]


def test_not_a_run_is_one_line(tmp_path: Path) -> None:
    for target in (tmp_path / "missing", tmp_path):
        proc = kd("export", str(target), cwd=tmp_path, check=False)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and str(target) in lines[0]


def test_a_stage_run_alone_is_pointed_at_kd_train(tmp_path: Path) -> None:
    # `kd student` writes no report; the error said only "report.json is missing".
    folder = tmp_path / "student-run"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("student: {}\ndataset: {}\n")
    (folder / "student.log").write_text("")
    proc = kd("export", str(folder), cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "a `kd student` run's folder; `kd train` with the run's overrides" in proc.stderr


def test_changed_test_data_is_refused(run: Path, tmp_path: Path) -> None:
    # The table would set top-1 on other images beside the report's teacher top-1.
    copy = copy_run(run, tmp_path / "run")
    report = read_report(copy)
    report["dataset"]["test_size"] -= 1  # as if an image were added since the run
    (copy / "report.json").write_text(json.dumps(report))
    before = (copy / "export" / "export.json").read_bytes()
    with pytest.raises(DataError, match="test data differs from the run's: 256 test images now, "
                                        "the run evaluated 255"):
        export.main([str(copy), "--formats", "torchscript", *FAST])
    assert (copy / "export" / "export.json").read_bytes() == before


def test_same_size_swap_of_test_images_is_refused(tmp_path: Path) -> None:
    # As many test images as the run evaluated, but one replaced: the size check alone let
    # export.md set top-1 on images the run never saw beside the report's figures.
    write_image_folder(tmp_path / "imf", train_per_class=8, val_per_class=3)
    run_dir = tmp_path / "run"
    kd("train", *TINY, "dataset=imagefolder", "dataset.loader.root=imf", "dataset.image_size=32",
       f"hydra.run.dir={run_dir}", cwd=tmp_path)
    kd("export", str(run_dir), "--formats", "torchscript", *FAST, cwd=tmp_path)
    out = run_dir / "export"
    kept = [*out.iterdir(), run_dir / "report.json", run_dir / "report.md"]
    before = {path: path.read_bytes() for path in kept}
    image = next((tmp_path / "imf" / "val").glob("*/0001.jpg"))
    original = image.read_bytes()
    image.write_bytes(next((tmp_path / "imf" / "train" / image.parent.name).glob("*.jpg"))
                      .read_bytes())  # a train image of the same class
    with pytest.raises(DataError, match=rf"as many test images \(30\) but not the same ones "
                                        rf".*read from {tmp_path / 'imf'}\).*point the "
                                        "dataset back at the images the run used, or retrain"):
        export.main([str(run_dir), "--formats", "torchscript", *FAST])
    assert {path: path.read_bytes() for path in kept} == before
    assert sorted(out.iterdir()) == sorted(kept[:-2]), "staging or failed/ left behind"
    # The image put back, the split is the run's again: it exports.
    image.write_bytes(original)
    export.main([str(run_dir), "--formats", "torchscript", *FAST])
    assert read_export(run_dir)["test_fingerprint"] == \
        read_report(run_dir)["dataset"]["test_fingerprint"]


def test_report_without_test_fingerprint_checks_the_size_alone(run: Path, tmp_path: Path,
                                                              caplog) -> None:
    # A run from before report.json recorded the fingerprint still exports, and says that the
    # test images themselves could not be verified.
    copy = copy_run(run, tmp_path / "run")
    report = read_report(copy)
    del report["dataset"]["test_fingerprint"]
    (copy / "report.json").write_text(json.dumps(report))
    with caplog.at_level(logging.WARNING, logger="kdcli.export"):
        export.main([str(copy), "--formats", "torchscript", *FAST])
    assert "no dataset.test_fingerprint (the run predates it): only the number of test images " \
           "(256) is checked" in caplog.text
    assert read_export(copy)["test_size"] == 256
    report = read_report(copy)  # now with the export block
    report["dataset"]["test_size"] -= 1
    (copy / "report.json").write_text(json.dumps(report))
    with pytest.raises(DataError, match="256 test images now, the run evaluated 255"):
        export.main([str(copy), "--formats", "torchscript", *FAST])


def test_missing_or_mismatched_checkpoint(run: Path, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path / "run")
    (copy / "checkpoints" / "student" / "best.pt").unlink()
    with pytest.raises(CorruptArtifact, match="best.pt"):
        export.main([str(copy), "--checkpoint", "best"])
    # The teacher is wider than the student: its weights cannot load into the student. Copied
    # alone, the file fails the student's checksum first (a damaged copy looks the same).
    student, teacher = copy / "checkpoints" / "student", copy / "checkpoints" / "teacher"
    shutil.copy(teacher / "last.pt", student / "last.pt")
    with pytest.raises(CorruptArtifact, match="fails its checksum.*delete .*last.pt.sha256"):
        export.main([str(copy)])
    shutil.copy(teacher / "last.pt.sha256", student / "last.pt.sha256")
    with pytest.raises(ConfigError, match="does not fit"):
        export.main([str(copy)])


# --------------------------------------------------------------------------- parity check


def test_parity_passes_within_tolerance() -> None:
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]], dtype=np.float32)
    out = export.check_parity("onnx", ref, ref + 1e-4, atol=1e-3, rtol=0)
    assert out["max_abs_diff"] == pytest.approx(1e-4, rel=1e-3)
    assert out["agreement"] == 100.0


def test_parity_failure_names_format_and_difference() -> None:
    ref = np.zeros((4, 3), dtype=np.float32)
    ref[:, 0] = 5.0
    bad = ref.copy()
    bad[2, 1] = 0.25
    with pytest.raises(export.ParityError, match=r"torchscript: max \|logit difference\| 0\.25"):
        export.check_parity("torchscript", ref, bad, atol=1e-3, rtol=1e-3)
    with pytest.raises(export.ParityError, match="onnx: output shape"):
        export.check_parity("onnx", ref, ref[:, :2], atol=1e-3, rtol=1e-3)


def test_non_finite_pytorch_logits_are_blamed_on_the_model(run: Path, tmp_path: Path) -> None:
    ref = np.zeros((2, 3), dtype=np.float32)
    ref[1, 0] = np.nan
    with pytest.raises(export.ParityError, match="the PyTorch model itself gives NaN/inf"):
        export.check_parity("onnx", ref, ref.copy(), atol=1e-3, rtol=1e-3)
    with pytest.raises(export.ParityError, match="non-finite logits where PyTorch's are finite"):
        export.check_parity("onnx", np.zeros_like(ref), ref, atol=1e-3, rtol=1e-3)
    # A diverged student: the export stops before any exporter runs, and says why.
    copy = copy_run(run, tmp_path / "run")
    path = copy / "checkpoints" / "student" / "last.pt"
    state = checkpoint.load(path)
    first = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][first].fill_(float("nan"))
    checkpoint.save(state, path)
    before = (copy / "export" / "export.json").read_bytes()
    with pytest.raises(TrainingDiverged, match=r"model itself .* NaN/inf logits on 256 of 256 "):
        export.main([str(copy), *FAST])
    assert (copy / "export" / "export.json").read_bytes() == before
    assert not (copy / "export" / "failed").exists()


def test_parity_holds_a_loose_tolerance_to_the_predictions() -> None:
    ref = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]], dtype=np.float32)
    flipped = ref.copy()
    flipped[0] = [0.0, 2.0]
    # Every logit is within the (loose) tolerance, but one prediction in three flipped.
    with pytest.raises(export.ParityError, match=r"onnx: top-1 agrees with PyTorch on 66\.67%"):
        export.check_parity("onnx", ref, flipped, atol=10, rtol=0)


def test_replace_section_keeps_what_follows() -> None:
    md = "# r\n\n## Results\n\nx\n\n## Export\n\nold\n\n## Later\n\ny\n"
    new = export.replace_section(md, ["## Export", "", "new"])
    assert new.count("## Export") == 1 and "old" not in new and "new" in new
    assert new.index("## Export") < new.index("## Later") and new.endswith("y\n")
    assert export.replace_section("# r\n", ["## Export", "", "a"]) == "# r\n\n## Export\n\na\n"


def test_onnx_falls_back_to_the_torchscript_based_exporter() -> None:
    class Branchy(torch.nn.Module):
        """Data-dependent control flow: torch.export cannot capture it, tracing can."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    data, exporter = export.export_onnx(Branchy().eval(), torch.ones(2, 4))
    assert exporter == "torchscript-based" and len(data) > 0



def test_onnx_before_torch_2_5_is_the_torchscript_based_export_without_a_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # torch 2.4's onnx.export takes `dynamo=` but not `dynamic_shapes=`: every export there
    # warned that the torch.export-based exporter had failed, for a TypeError of kd's own call.
    real = torch.onnx.export
    calls = []

    def export_2_4(model, args, f=None, *, input_names=None, output_names=None,
                   opset_version=None, dynamic_axes=None, dynamo=False):
        calls.append(dynamo)
        return real(model, args, f, input_names=input_names, output_names=output_names,
                    opset_version=opset_version, dynamic_axes=dynamic_axes, dynamo=False)

    monkeypatch.setattr(torch.onnx, "export", export_2_4)
    with caplog.at_level(logging.INFO, logger="kdcli.export"):
        data, exporter = export.export_onnx(torch.nn.Linear(4, 3).eval(), torch.ones(2, 4))
    assert exporter == "torchscript-based" and len(data) > 0 and calls == [False]
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "needs torch 2.5" in caplog.text

def test_export_md_says_which_precision_each_top1_is() -> None:
    # A review read report.md's student top-1 (36.67, bf16 autocast) against export.md's fp32
    # 37.33, beside a teacher row whose top-1 was report.md's bf16 figure, with no word of it.
    data = {"student": "resnet8", "checkpoint": "last", "test_size": 150,
            "report_top1": 36.67, "report_precision": "bf16",
            "tolerance": {"atol": 1e-3, "rtol": 1e-3, "min_agreement": 99.9},
            "latency": {"runs": 5, "warmup": 2, "threads": 1},
            "teacher": {"name": "resnet8", "top1": 14.0, "size_bytes": 1000, "latency_ms": 2.0},
            "formats": {"pytorch": {"top1": 37.33, "agreement": 100.0, "size_bytes": 500,
                                    "latency_ms": 1.0}}}
    assert export.run_precision({"device": "cpu, bf16, channels_last"}) == "bf16"
    table = export.markdown_table(data)
    assert table[2].startswith("| teacher resnet8 (PyTorch fp32; top-1 from report.json) | "
                               "14.00 (bf16) |")
    assert table[3].startswith("| student `last.pt` as in report.md | 36.67 (bf16) |")
    assert table[4].startswith("| student fp32 PyTorch | 37.33 |")
    notes = "\n".join(export.markdown_notes(data))
    assert "under bf16 autocast" in notes and "evaluated here in fp32" in notes
    data["report_precision"] = "fp32"
    table = export.markdown_table(data)
    assert "| 14.00 |" in table[2] and "| 36.67 |" in table[3]
    assert "Precision:" not in "\n".join(export.markdown_notes(data))
