"""End-to-end: the installed CLI on the smoke preset, with real (embedded) CIFAR-10 data."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdcli.device import usable_cores
from tests.conftest import SMOKE, TINY, kd, read_report


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-job sweep over the temperature, sharing a store: the basis of several tests."""
    root = tmp_path_factory.mktemp("sweep")
    kd("train", "-m", *SMOKE, "loss.temperature=2,8", f"store={root / 'store'}",
       f"hydra.sweep.dir={root / 'multi'}", cwd=root)
    return root


def test_sweep_trains_teacher_cache_and_baseline_once(sweep: Path) -> None:
    first, second = read_report(sweep / "multi" / "0"), read_report(sweep / "multi" / "1")
    assert first["stages"] == {"teacher": "trained", "cache": "trained", "student": "trained",
                               "baseline": "trained"}
    # The loss changed, so only the student is retrained; everything upstream is shared.
    assert second["stages"] == {"teacher": "reused", "cache": "reused", "student": "trained",
                                "baseline": "reused"}
    assert first["config"]["loss"]["temperature"] == 2
    assert second["config"]["loss"]["temperature"] == 8
    assert len(list((sweep / "store" / "teacher").glob("*/meta.json"))) == 1
    assert len(list((sweep / "store" / "student").glob("*/meta.json"))) == 2


def test_compiled_sweep_runs_a_feature_loss_after_a_logit_loss(tmp_path: Path) -> None:
    # With device.compile=true, the FitNets job used to reuse the code dynamo compiled for the
    # hinton job's student (same class and shapes, no hooks): its feature taps stayed empty and
    # the job failed with "no student feature 'layer2'". Found on an H100 by bench_speed.
    sweep = tmp_path / "multi"
    kd("train", "-m", "loss=hinton,fitnets", *TINY, "teacher=resnet8", "student=resnet8",
       "device.compile=true", f"store={tmp_path / 'store'}", f"hydra.sweep.dir={sweep}",
       cwd=tmp_path)
    assert read_report(sweep / "0")["student"]["mode"] == "cache"
    assert read_report(sweep / "1")["student"]["mode"] == "online"


def test_report_has_every_promised_field(sweep: Path) -> None:
    run = sweep / "multi" / "0"
    report = read_report(run)
    for role in ("teacher", "student"):
        for key in ("top1", "top5", "macro_f1", "params", "flops", "macs", "size_bytes",
                    "latency_ms"):
            assert isinstance(report[role][key], (int, float)), (role, key)
        assert report[role]["macs"] * 2 == report[role]["flops"]
    assert 0 <= report["student"]["agreement"] <= 100
    assert {"top1", "agreement"} <= set(report["baseline"])
    entry = Path(report["store"]["cache"])
    assert report["cache"]["disk_bytes"] == sum(p.stat().st_size for p in entry.iterdir())
    assert report["cache"]["disk_bytes"] > (report["cache"]["bytes_per_sample"]
                                            * report["cache"]["num_samples"])
    assert report["compression"]["params_ratio"] == pytest.approx(
        report["teacher"]["params"] / report["student"]["params"])
    assert report["compression"]["latency_speedup"] > 0
    assert report["cache"]["bytes_per_sample"] == 20  # 10 classes x float16
    assert set(report["versions"]) >= {"torch", "torchvision", "kd"}
    # One thread where the machine was busy (`test_latency_on_a_busy_machine_...`).
    latency = report["latency"]
    assert report["latency_threads"] == latency["threads"] == (
        1 if latency["busy"] else usable_cores())
    assert report["teacher"]["latency_min_ms"] <= report["teacher"]["latency_ms"]
    assert report["compression"]["latency_speedup"] == pytest.approx(
        report["teacher"]["latency_min_ms"] / report["student"]["latency_min_ms"])
    assert report["config"]["student"]["_target_"] == "kdcli.models.small.tiny_cnn"
    md = (run / "report.md").read_text()
    assert "Teacher" in md or "teacher" in md
    assert f"{report['student']['top1']:.2f}" in md or f"{report['student']['top1']:.1f}" in md


def test_report_wall_time_starts_before_the_dataset_load(monkeypatch) -> None:
    # The clock started after build_context, so a run that spent its time decoding an
    # ImageFolder dataset (and reused every stage) reported a wall time near zero.
    from kdcli.stages import pipeline

    def slow_context(cfg):
        time.sleep(0.3)
        return "ctx"

    seen = {}

    def run(ctx, started):
        seen["waited"] = time.perf_counter() - started
        return {"student": {"top1": 1.0}}

    monkeypatch.setattr(pipeline, "build_context", slow_context)
    monkeypatch.setattr(pipeline, "run", run)
    assert pipeline.main(None) == 1.0
    assert seen["waited"] >= 0.3


def test_a_student_without_finite_logits_fails_the_job_instead_of_returning_nan(
        monkeypatch, tmp_path) -> None:
    # kd train returned NaN to the sweeper: Optuna refuses it and the whole search aborted.
    from types import SimpleNamespace

    from kdcli.errors import TrainingDiverged
    from kdcli.stages import pipeline

    monkeypatch.setattr(pipeline, "build_context", lambda cfg: SimpleNamespace(run_dir=tmp_path))
    monkeypatch.setattr(pipeline, "run", lambda ctx, started: {"student": {"top1": float("nan")}})
    with pytest.raises(TrainingDiverged, match="test logits are not finite"):
        pipeline.main(None)


def test_a_float_typed_as_an_int_reuses_the_entry(sweep: Path) -> None:
    # The sweep typed `loss.temperature=...,8`; `8.0` is the same setting, not a new student.
    kd("train", *SMOKE, "loss.temperature=8.0", f"store={sweep / 'store'}",
       f"hydra.run.dir={sweep / 'as-float'}", cwd=sweep)
    assert set(read_report(sweep / "as-float")["stages"].values()) == {"reused"}


def test_run_folder_has_checkpoints_metrics_and_log(sweep: Path) -> None:
    run = sweep / "multi" / "0"
    for stage in ("teacher", "student", "baseline"):
        for name in ("best.pt", "last.pt"):
            state = torch.load(run / "checkpoints" / stage / name, weights_only=True)
            assert "model" in state
        with open(run / "metrics" / f"{stage}.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert [int(r["epoch"]) for r in rows] == [1, 2]
        assert {"train/loss", "val/top1", "lr"} <= set(rows[0])
    assert (run / "train.log").read_text().count("epoch") >= 6


def test_identical_rerun_reuses_every_stage(sweep: Path) -> None:
    kd("train", *SMOKE, "loss.temperature=2", f"store={sweep / 'store'}",
       f"hydra.run.dir={sweep / 'again'}", cwd=sweep)
    assert set(read_report(sweep / "again")["stages"].values()) == {"reused"}


def test_eval_reproduces_the_reported_accuracy(sweep: Path) -> None:
    ckpt = sweep / "multi" / "0" / "checkpoints" / "student" / "last.pt"
    proc = kd("eval", *SMOKE, f"checkpoint={ckpt}", f"hydra.run.dir={sweep / 'eval'}",
              cwd=sweep)
    result = json.loads((sweep / "eval" / "eval.json").read_text())
    assert result["top1"] == pytest.approx(read_report(sweep / "multi" / "0")["student"]["top1"])
    assert "differ" not in proc.stdout + proc.stderr


def test_eval_with_other_settings_than_the_run_says_so(sweep: Path) -> None:
    # The figures of another test subset (or precision) are not report.md's: kd eval said
    # nothing, and the user took them for the run's.
    ckpt = sweep / "multi" / "0" / "checkpoints" / "student" / "last.pt"
    proc = kd("eval", *SMOKE, "dataset.test_size=32", "device.precision=bf16",
              f"checkpoint={ckpt}", f"hydra.run.dir={sweep / 'eval-other'}", cwd=sweep)
    said = proc.stdout + proc.stderr
    assert (f"eval: dataset, device.precision differ from the run {sweep / 'multi' / '0'}, so "
            "the figures will not be report.md's; its overrides were: ") in said
    assert "loss.temperature=2" in said


@pytest.mark.parametrize("saved, message", [
    # tiny_cnn-wide's weights into the smoke student tiny_cnn: torch's message was cut to its
    # first line, "Error(s) in loading state_dict for TinyCNN:".
    ("wide", "does not fit this architecture: size mismatch for block1.conv.weight: checkpoint "
             "(32, 3, 3, 3) vs model (16, 3, 3, 3) (+15 more); it was loaded as arch=student "
             "student=tiny_cnn; set arch= and student=/teacher= (student._target_= for a model "
             "of your own) to the model the checkpoint was trained as"),
    # A store entry's test_logits.pt is a kd checkpoint without a model: was KeyError: 'model'.
    ("logits", "holds no model weights (it has: labels, logits); give a model checkpoint "
               "(best.pt or last.pt)"),
])
def test_eval_of_a_checkpoint_that_does_not_fit_says_why(workdir: Path, saved: str,
                                                         message: str) -> None:
    from kdcli import checkpoint
    from kdcli.models.small import tiny_cnn

    path = workdir / f"{saved}.pt"
    checkpoint.save({"model": tiny_cnn(width=32).state_dict()} if saved == "wide" else
                    {"logits": torch.zeros(2, 10), "labels": torch.zeros(2)}, path)
    proc = kd("eval", *SMOKE, f"checkpoint={path}", f"hydra.run.dir={workdir / 'eval'}",
              cwd=workdir, check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"error: checkpoint {path} {message}\n"


def _run_checkpoint(run: Path, role: str, target: str, option: str) -> Path:
    """A run folder whose `checkpoints/<role>/last.pt` holds a tiny_cnn(width=32), and whose
    `.hydra/` says it was trained as `<role>._target_: target`, picked as `<role>=option`."""
    from kdcli import checkpoint
    from kdcli.models.small import tiny_cnn

    path = run / "checkpoints" / role / "last.pt"
    path.parent.mkdir(parents=True)
    checkpoint.save({"model": tiny_cnn(width=32).state_dict()}, path)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(f"{role}:\n  _target_: {target}\n")
    (run / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  runtime:\n    choices:\n      {role}: {option}\n")
    return path


def test_eval_of_a_run_checkpoint_names_the_runs_own_target(workdir: Path) -> None:
    # A run with student._target_=mynets.small_net, evaluated without it: the hint said
    # "set ... student=", which cannot select a model of one's own.
    run = workdir / "custom-run"
    path = _run_checkpoint(run, "student", "mynets.small_net", "tiny_cnn")
    proc = kd("eval", *SMOKE, f"checkpoint={path}", f"hydra.run.dir={workdir / 'eval'}",
              cwd=workdir, check=False)
    assert proc.returncode == 1
    assert proc.stderr.endswith(f"it was loaded as arch=student student=tiny_cnn; the run {run} "
                                "trained it as student._target_=mynets.small_net: set "
                                "arch=student student._target_=mynets.small_net\n")


def test_eval_of_a_run_teacher_checkpoint_says_the_whole_fix(workdir: Path) -> None:
    # The hint said "trained it as teacher=tiny_cnn-wide: set that"; setting that gave the same
    # error, since arch=student still loaded the student's model.
    path = _run_checkpoint(workdir / "run", "teacher", "kdcli.models.small.tiny_cnn",
                           "tiny_cnn-wide")
    proc = kd("eval", *SMOKE, f"checkpoint={path}", f"hydra.run.dir={workdir / 'eval'}",
              cwd=workdir, check=False)
    assert proc.returncode == 1
    fix = "arch=teacher teacher=tiny_cnn-wide"
    assert proc.stderr.endswith(f"trained it as teacher=tiny_cnn-wide: set {fix}\n")
    kd("eval", *SMOKE, f"checkpoint={path}", *fix.split(), f"hydra.run.dir={workdir / 'eval'}",
       cwd=workdir)


def test_stages_run_alone_in_order(workdir: Path) -> None:
    store = f"store={workdir / 'store'}"
    proc = kd("student", *SMOKE, store, cwd=workdir, check=False)
    assert proc.returncode == 1
    assert "run `kd teacher`" in proc.stderr
    kd("teacher", *SMOKE, store, cwd=workdir)
    proc = kd("student", *SMOKE, store, cwd=workdir, check=False)
    assert proc.returncode == 1 and "run `kd cache`" in proc.stderr
    # The missing cache is found before the pretraining stage trains anything.
    proc = kd("student", *SMOKE, store, "pretrain.dataset=cifar10_subset", "pretrain.epochs=1",
              cwd=workdir, check=False)
    assert proc.returncode == 1 and "run `kd cache`" in proc.stderr
    assert not (workdir / "store" / "pretrain").exists()
    kd("cache", *SMOKE, store, cwd=workdir)
    kd("student", *SMOKE, store, f"hydra.run.dir={workdir / 'run'}", cwd=workdir)
    assert torch.load(workdir / "run" / "checkpoints" / "student" / "best.pt",
                      weights_only=True)["model"]
    assert len(list((workdir / "store" / "cache").glob("*/train.kdsl"))) == 1


@pytest.mark.parametrize("loss, why", [
    ("loss=fitnets loss.student_layer=block2 loss.teacher_layer=block2",
     "not needed for loss=fitnets (it runs the teacher online); nothing to do"),
    ("loss=ce", "not needed for loss=ce (it reads no teacher); nothing to do"),
])
def test_kd_cache_builds_nothing_for_a_loss_that_reads_no_cache(tmp_path: Path, loss: str,
                                                                 why: str) -> None:
    # It made a full teacher pass and wrote a cache that no student stage would read.
    store = f"store={tmp_path / 'store'}"
    kd("teacher", *TINY, store, *loss.split(), cwd=tmp_path)
    proc = kd("cache", *TINY, store, *loss.split(), cwd=tmp_path)
    assert why in proc.stdout + proc.stderr
    assert not (tmp_path / "store" / "cache").exists()


def test_killed_run_resumes_and_matches_an_uninterrupted_run(workdir: Path) -> None:
    common = [*SMOKE, "trainer.teacher.epochs=30", "baseline=false", "deterministic=true"]
    args = [*common, f"store={workdir / 'store'}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("KD_STORE", None)
    proc = subprocess.Popen([sys.executable, "-m", "kdcli.cli", "train", *args,
                             f"hydra.run.dir={workdir / 'killed'}"], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    last = None
    while time.time() < deadline and proc.poll() is None:
        found = list((workdir / "store" / "teacher").glob("*/last.pt"))
        if found:
            last = found[0]
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert last is not None, "teacher never wrote last.pt"
    assert not (last.parent / "meta.json").exists()
    done = torch.load(last, weights_only=True)["epoch"] + 1
    assert done < 30

    kd("train", *args, f"hydra.run.dir={workdir / 'resumed'}", cwd=workdir)
    report = read_report(workdir / "resumed")
    assert report["stages"]["teacher"] == "resumed"
    with open(workdir / "resumed" / "metrics" / "teacher.csv") as fh:
        epochs = [int(r["epoch"]) for r in csv.DictReader(fh)]
    assert epochs == list(range(1, 31))

    # Deterministic CPU mode: the resumed teacher is bit-identical to one never interrupted.
    kd("teacher", *common, f"store={workdir / 'clean'}", cwd=workdir)
    resumed = torch.load(last, weights_only=True)["model"]
    clean_last = next((workdir / "clean" / "teacher").glob("*/last.pt"))
    clean = torch.load(clean_last, weights_only=True)["model"]
    assert clean_last.parent.name == last.parent.name  # same key: same inputs
    for name, tensor in clean.items():
        assert torch.equal(tensor, resumed[name]), name


# --- bad input: one clear line, non-zero exit, nothing already written is touched -----------

@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    kd("train", *SMOKE, "baseline=false", f"store={root / 'store'}",
       f"hydra.run.dir={root / 'run'}", cwd=root)
    return root


@pytest.mark.parametrize("override, expected", [
    ("loss.temprature=2", "temprature"),
    ("student=resnet9000", "resnet9000"),
    ("dataset=imagenet9", "imagenet9"),
    ("dataset=cifar10 dataset.loader.root=/no/such/cifar", "/no/such/cifar"),
    ("student=resnet18 student.name=notamodel", "notamodel"),
    ("device.precision=fp8", "fp8"),
])
def test_bad_input_is_reported_and_damages_nothing(finished: Path, tmp_path: Path,
                                                    override: str, expected: str) -> None:
    before = _tree_digest(finished)
    proc = kd("train", *SMOKE, "baseline=false", *override.split(), f"store={finished / 'store'}",
              f"hydra.run.dir={tmp_path / 'bad'}", cwd=finished, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    after = _tree_digest(finished)
    assert {k: v for k, v in after.items() if k in before} == before


STAGES = ("teacher", "cache", "pretrain", "student", "baseline")


@pytest.mark.parametrize("verb, override, expected", [
    ("train", "dataset.augment=none cache.views=2", "dataset.augment=none"),
    ("train", "pretrain.dataset=cifar10_subset pretrain.epochs=1 student.init=from_teacher",
     "choose one"),
    ("train", "loss.temperature=0", "temperature must be > 0"),
    ("train", "loss=attention loss.student_layers=[block1,block2] loss.teacher_layers=[block1]",
     "pair up one to one"),
    ("train", "loss=fitnets loss.student_layer=block2 loss.teacher_layer=layer9",
     "teacher=tiny_cnn-wide has no layer 'layer9'"),
    ("train", "loss=fitnets loss.student_layer=nope loss.teacher_layer=block2",
     "student=tiny_cnn has no layer 'nope'"),
    ("train", "teacher=[tiny_cnn,tiny_cnn-wide] loss=fitnets loss.student_layer=block2 "
     "loss.teacher_layer=block2", "exactly one teacher (got 2)"),
    ("train", "cache.teacher_weights=[1,2]", "cache.teacher_weights"),
    ("train", "cache.storage=half", "cache.storage='half'"),
    ("student", "loss.temperature=0", "temperature must be > 0"),
    ("cache", "dataset.augment=none cache.views=2", "dataset.augment=none"),
    # No pretraining data (at the default root, or at pretrain.root): the pretraining set is
    # loaded before the teacher trains, and the key to set is pretrain.root, not the main
    # dataset's dataset.loader.root.
    ("train", "pretrain.dataset=cifar10 pretrain.epochs=1",
     "error: pretrain.dataset=cifar10: no CIFAR-10 data at"),
    ("train", "pretrain.dataset=cifar10 pretrain.epochs=1 pretrain.root=nodata",
     "no CIFAR-10 data at nodata: expected train.npz/test.npz (JPEG pack) or a "
     "cifar-10-batches-py folder; set pretrain.root\n"),
])
def test_config_only_checks_run_before_any_stage(tmp_path: Path, verb: str, override: str,
                                                 expected: str) -> None:
    """A setting that is wrong on its face fails before the teacher (or anything) trains: with
    a real teacher that is hours saved. The store has no stage entry, not even a lock."""
    proc = kd(verb, *SMOKE, *override.split(), f"store={tmp_path / 'store'}",
              f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and expected in proc.stderr
    assert "no trained teacher" not in proc.stderr
    assert [s for s in STAGES if (tmp_path / "store" / s).exists()] == []


def test_unreadable_student_weights_fail_before_any_stage(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_text("not a torch file\n")
    proc = kd("train", *SMOKE, "student=mobilenet_v3_small", "student.weights=junk.pt",
              f"store={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
              check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "junk.pt is not a state dict kd can read safely" in proc.stderr
    assert [s for s in STAGES if (tmp_path / "store" / s).exists()] == []


def test_student_with_wrong_class_count_is_refused(finished: Path) -> None:
    (finished / "mymodels.py").write_text(
        "from torch import nn\n"
        "def five_way(num_classes=10, **_):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))\n")
    proc = kd("train", *SMOKE, "student._target_=mymodels.five_way",
              f"store={finished / 'store'}", f"hydra.run.dir={finished / 'bad5'}",
              cwd=finished, check=False, env={"PYTHONPATH": str(finished)})
    assert proc.returncode == 1
    assert "outputs (5,) classes but dataset cifar10_subset has 10" in proc.stderr


def test_users_own_model_by_target(finished: Path) -> None:
    (finished / "usermodels.py").write_text(
        "from torch import nn\n"
        "def linear(num_classes=10, **_):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))\n")
    kd("student", *SMOKE, "student._target_=usermodels.linear", f"store={finished / 'store'}",
       f"hydra.run.dir={finished / 'user'}", cwd=finished, env={"PYTHONPATH": str(finished)})
    assert (finished / "user" / "checkpoints" / "student" / "best.pt").exists()


def test_an_edited_model_of_ones_own_is_retrained_not_reused(tmp_path: Path) -> None:
    """The key of a stage holds the sha256 of the file defining a `_target_` of the user's own
    and of the user's files it imports: an edit in either retrains the student. A module
    imported by a name in a string is not hashed: an edit there that changes a shape fails on
    reuse, naming the entry to delete."""
    (tmp_path / "mywidth.py").write_text("HIDDEN = 32\n")
    (tmp_path / "myextra.py").write_text("EXTRA = 16\n")
    model = tmp_path / "mymodels.py"
    source = ("import importlib\n"
              "from torch import nn\n"
              "from mywidth import HIDDEN\n"
              "def tiny_mlp(num_classes=10, **_):\n"
              "    extra = importlib.import_module('myextra').EXTRA\n"
              "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, HIDDEN), nn.ReLU(),\n"
              "                         nn.Linear(HIDDEN, extra), nn.ReLU(),\n"
              "                         nn.Linear(extra, num_classes))\n")
    model.write_text(source)
    store = tmp_path / "store"

    def train(run: str, check: bool = True) -> subprocess.CompletedProcess:
        # No .pyc: an edit within the same second that keeps a file's size would go unseen.
        path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
        return kd("train", *TINY, "student._target_=mymodels.tiny_mlp", f"store={store}",
                  f"hydra.run.dir={tmp_path / run}", cwd=tmp_path, check=check,
                  env={"PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"})

    def stages(run: str) -> dict[str, str]:
        return read_report(tmp_path / run)["stages"]

    def student_of_current_code() -> Path:
        code = {name: hashlib.sha256((tmp_path / f"{name}.py").read_bytes()).hexdigest()
                for name in ("mymodels", "mywidth")}
        [student] = [p for p in (store / "student").iterdir() if (p / "meta.json").exists()
                     and json.loads((p / "meta.json").read_text())["inputs"].get("code") == code]
        return student

    train("first")
    assert set(stages("first").values()) == {"trained"}
    # Named after its target, not the smoke preset's student option (tiny_cnn).
    report = read_report(tmp_path / "first")
    assert report["student"]["name"] == "tiny_mlp"
    assert Path(report["store"]["student"]).name.startswith("tiny_mlp-")
    assert "tiny_cnn-wide → tiny_mlp" in (tmp_path / "first" / "report.md").read_text()
    train("same")
    assert set(stages("same").values()) == {"reused"}
    model.write_text(source.replace("nn.ReLU()", "nn.Tanh()"))
    train("edited")
    assert stages("edited") == {"teacher": "reused", "cache": "reused", "student": "trained"}
    student_of_current_code()
    for entry in (store / "teacher").iterdir():  # a shipped model: its key has no code field
        if entry.is_dir():
            assert "code" not in json.loads((entry / "meta.json").read_text())["inputs"]

    (tmp_path / "mywidth.py").write_text("HIDDEN = 48\n")  # imported by mymodels.py
    train("imported")
    assert stages("imported") == {"teacher": "reused", "cache": "reused", "student": "trained"}
    student = student_of_current_code()

    (tmp_path / "myextra.py").write_text("EXTRA = 24\n")  # imported by a name in a string
    proc = train("dynamic", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "does not fit this architecture" in proc.stderr
    assert f"delete {student} (or set store= to another folder) to retrain" in proc.stderr
    shutil.rmtree(student)
    train("deleted")
    assert stages("deleted")["student"] == "trained"


def test_a_run_into_an_earlier_runs_folder_sets_its_outputs_aside(tmp_path: Path) -> None:
    # The second run here trains no baseline: the first run's baseline checkpoints and curve
    # used to stay in the folder, and its learning curve went into the new report's plots.
    run, store = tmp_path / "run", f"store={tmp_path / 'store'}"
    first = [a for a in TINY if a != "baseline=false"] + ["baseline=true"]
    log = kd("train", *first, store, f"hydra.run.dir={run}", cwd=tmp_path)
    log = log.stdout + log.stderr
    assert "training tiny_cnn (1 epoch, best.pt" in log  # read "1 epochs"
    assert "(a fixed teacher)" in log
    (run / "export").mkdir()
    (run / "export" / "student.onnx").write_bytes(b"the first run's student")
    old_report = (run / "report.json").read_text()
    proc = kd("train", *TINY, store, f"hydra.run.dir={run}", cwd=tmp_path)
    assert read_report(run)["baseline"] is None
    # The student is reused: the note on how it trained was logged all the same.
    assert "reusing" in proc.stdout + proc.stderr
    assert "(a fixed teacher)" not in proc.stdout + proc.stderr
    for stale in ("checkpoints/baseline", "metrics/baseline.csv", "export"):
        assert not (run / stale).exists(), stale
    assert (run / "checkpoints" / "student" / "last.pt").exists()
    [earlier] = run.glob("earlier-*")
    assert (earlier / "report.json").read_text() == old_report
    assert (earlier / "export" / "student.onnx").read_bytes() == b"the first run's student"
    assert (earlier / "checkpoints" / "baseline" / "last.pt").exists()
    # Its config went with it (kd export reads it); the folder's own is the new run's.
    assert "baseline=true" in (earlier / ".hydra" / "overrides.yaml").read_text()
    assert "baseline=true" not in (run / ".hydra" / "overrides.yaml").read_text()
    assert "held the outputs of an earlier run" in proc.stdout + proc.stderr


def test_stages_run_one_by_one_into_one_folder_keep_each_others_outputs(tmp_path: Path) -> None:
    run, store = tmp_path / "run", f"store={tmp_path / 'store'}"
    kd("teacher", *TINY, store, f"hydra.run.dir={run}", cwd=tmp_path)
    kd("cache", *TINY, store, f"hydra.run.dir={run}", cwd=tmp_path)
    kd("student", *TINY, store, f"hydra.run.dir={run}", cwd=tmp_path)
    assert (run / "checkpoints" / "teacher" / "last.pt").exists()
    assert (run / "checkpoints" / "student" / "last.pt").exists()
    assert not list(run.glob("earlier-*"))


def test_a_sweep_run_again_into_its_folder_counts_and_lists_only_its_own_jobs(
        tmp_path: Path) -> None:
    # The first sweep's job 2 failed and its job 1 finished; the second sweep has two jobs and
    # its job 1 fails. It used to count the first sweep's folders (3 jobs), and list job 1 in
    # the summary with the metrics of the run before it.
    sweep, store = tmp_path / "multi", f"store={tmp_path / 'store'}"
    kd("train", "-m", *TINY, "loss.temperature=4,8,0", store, f"hydra.sweep.dir={sweep}",
       cwd=tmp_path, check=False)
    proc = kd("train", "-m", *TINY, "loss.temperature=4,0", store, f"hydra.sweep.dir={sweep}",
              cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "error: 1 of 2 job(s) of the sweep failed" in proc.stderr
    assert (sweep / "1" / "failed.json").exists() and not (sweep / "1" / "report.json").exists()
    rows = {r["run"]: r for r in csv.DictReader((sweep / "summary.csv").open())}
    assert set(rows) == {"0", "1"}
    assert "temperature must be > 0" in rows["1"]["error"] and not rows["0"]["error"]


def test_latency_on_a_busy_machine_is_timed_with_one_thread(monkeypatch) -> None:
    # Two threads under load read 288 ms where one read 0.89 ms: multi-threaded PyTorch waits
    # for its slowest thread, which a busy core stalls.
    from types import SimpleNamespace

    from kdcli.stages import pipeline

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    ctx = SimpleNamespace(dataset=SimpleNamespace(image_shape=(4,)))
    monkeypatch.setattr("kdcli.device.usable_cores", lambda: 2)
    monkeypatch.setattr("kdcli.device.machine_load", lambda: (5.0, 2))
    blocks = [{}, {}]
    latency = pipeline._time_together(ctx, blocks, [Probe(), Probe()])
    assert set(seen) == {1}
    assert latency == {"threads": 1, "other_load": 5.0, "cpus": 2, "busy": True,
                       "speedup_from": "min"}
    assert all(b["latency_min_ms"] <= b["latency_ms"] for b in blocks)
    seen.clear()
    monkeypatch.setattr("kdcli.device.machine_load", lambda: (0.5, 2))
    assert pipeline._time_together(ctx, blocks, [Probe(), Probe()])["threads"] == 2
    assert set(seen) == {2}


@pytest.mark.parametrize("load, threads", [(5.0, 1), (0.1, 2)])
def test_eval_times_as_the_report_does_and_records_it(workdir: Path, monkeypatch, caplog,
                                                      load: float, threads: int) -> None:
    # kd eval timed with every core on a busy machine and read 108 ms where report.md's one
    # thread read 0.19 ms for the same checkpoint, with no word of the load or the threads.
    import logging

    from hydra import compose, initialize_config_module

    from kdcli import checkpoint
    from kdcli.models.small import tiny_cnn
    from kdcli.stages import common, evaluate

    path = workdir / "student.pt"
    checkpoint.save({"model": tiny_cnn().state_dict()}, path)
    with initialize_config_module(config_module="kdcli.configs", version_base="1.3"):
        cfg = compose(config_name="kd_eval", overrides=[*SMOKE, f"checkpoint={path}"])
    monkeypatch.setattr(evaluate, "build_context",
                        lambda cfg: common.build_context(cfg, run_dir=workdir / "eval"))
    seen = []  # the thread count of each timed call (batch 1; FLOPs are counted under no_grad)

    def note_threads(module, args) -> None:
        if len(args[0]) == 1 and torch.is_inference_mode_enabled():
            seen.append(torch.get_num_threads())

    def build_model(ctx, arch):
        model = common.build_model(ctx, arch)
        model.register_forward_pre_hook(note_threads)
        return model

    monkeypatch.setattr(evaluate, "build_model", build_model)
    monkeypatch.setattr("kdcli.device.usable_cores", lambda: 2)
    monkeypatch.setattr("kdcli.device.machine_load", lambda: (load, 2))
    with caplog.at_level(logging.INFO):
        evaluate.main(cfg)
    assert seen and set(seen) == {threads}
    result = json.loads((workdir / "eval" / "eval.json").read_text())
    assert result["latency"] == {"threads": threads, "other_load": load, "cpus": 2,
                                 "busy": load > 1}
    assert 0 < result["latency_min_ms"] <= result["latency_ms"]
    said = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("eval "))
    assert f"ms (CPU fp32 batch 1, {threads} thread" in said
    assert ("busy machine: other processes used 5.0 of 2 CPUs" in said) == (load > 1)
