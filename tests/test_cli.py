"""The `kd` dispatcher: usage, per-command help, and tab completion through it.

Completion is driven the way the shell drives it: COMP_LINE/COMP_POINT in the environment and
`kd -sc query=bash` in a subprocess (no torch import: about a second each).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdcli import cli


def run_kd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdcli.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def complete(line: str) -> list[str]:
    proc = run_kd("-sc", "query=bash", env={"COMP_LINE": line, "COMP_POINT": str(len(line))})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_usage_lists_every_command(capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["kd", "--help"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for verb in (*cli.COMMANDS, *cli.PLAIN_COMMANDS):
        assert f"\n  {verb} " in out, verb
    assert "kd --completion bash" in out


def test_train_help_shows_groups_options_and_examples() -> None:
    proc = run_kd("train", "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("kd train: all stages")
    assert "usage: kd train [GROUP=OPTION ...]" in out and "examples:" in out
    assert "dataset: cifar10, cifar10_subset, imagefolder" in out
    assert "loss: attention, ce, dist, dkd, fitnets, hinton, lskd, mse" in out
    assert "hydra/sweeper=kd_optuna" in out and "hydra/launcher=kd_slurm" in out
    assert "-m, --multirun" in out  # the flags
    assert "temperature: 4.0" in out  # the composed config
    assert run_kd("help", "train").stdout == out  # `kd help train` is the same


def test_image_folder_examples_pick_an_imagenet_teacher() -> None:
    # The examples kept the default teacher, resnet20, a CIFAR net of 0.27 M parameters, at
    # 224 px: more FLOPs than the mobilenet_v3_small student and fewer parameters.
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for text in (run_kd("--help").stdout, run_kd("train", "--help").stdout, readme):
        commands = text.replace("\\\n", " ").splitlines()
        examples = [c for c in commands if "kd train dataset=imagefolder" in c]
        assert examples and all("teacher=" in c for c in examples), examples


def test_help_lists_kds_flags_not_hydras_version_and_completion() -> None:
    # Hydra's block offered `--version` (Hydra's) and its own -sc completion next to kd's.
    out = run_kd("train", "--help").stdout
    assert "-m, --multirun" in out and "-c, --cfg job|hydra|all" in out and "--hydra-help" in out
    assert "Show Hydra's version" not in out and "-sc install" not in out


def test_a_verbs_version_is_kds() -> None:
    # `kd train --version` reached Hydra's own flag: "Hydra 1.3.8", where `kd --version` says kd's.
    from kdcli import __version__

    assert run_kd("--version").stdout == f"kd {__version__}\n"
    for verb in ("train", "eval"):
        proc = run_kd(verb, "experiment=smoke", "--version")
        assert (proc.returncode, proc.stdout) == (0, f"kd {__version__}\n")


def test_eval_help_has_its_own_header() -> None:
    out = run_kd("eval", "--help").stdout
    assert out.startswith("kd eval: evaluate a checkpoint")
    assert "checkpoint: ???" in out


@pytest.mark.parametrize(("line", "expected", "absent"), [
    ("kd tr", ["train"], ["teacher"]),
    ("kd ", ["train", "teacher", "cache", "student", "eval", "report", "export"], []),
    ("kd e", ["eval", "export"], ["train"]),
    ("kd train tea", ["teacher=", "teacher_optimizer."], ["student="]),
    ("kd train teacher=resnet5", ["teacher=resnet50", "teacher=resnet56"], ["teacher=resnet8"]),
    ("kd train -m dataset=", ["dataset=imagefolder", "dataset=cifar10"], []),
    ("kd student loss=d", ["loss=dkd", "loss=dist"], ["loss=hinton"]),
    ("kd eval chec", ["checkpoint="], []),
    ("kd train hydra/sweeper=", ["hydra/sweeper=kd_optuna", "hydra/sweeper=basic"], []),
    ("kd report ", [], ["train"]),  # paths: left to the shell's file-name completion
    ("kd store ", ["list", "prune"], ["train"]),
    ("kd store p", ["prune"], ["list"]),
    ("kd store prune ", [], ["prune", "list"]),  # then a path
])
def test_completion_query(line: str, expected: list[str], absent: list[str]) -> None:
    words = complete(line)
    assert set(expected) <= set(words), words
    assert not set(absent) & set(words), words


def test_completion_stops_at_the_cursor() -> None:
    line = "kd train tea student=resnet8"
    proc = run_kd("-sc", "query=bash", env={"COMP_LINE": line, "COMP_POINT": "12"})
    assert "teacher=" in proc.stdout.split()


def test_hydras_install_advice_through_a_verb_gives_kds_script() -> None:
    # `kd train --help` repeats Hydra's advice `eval "$(kd train -sc install=bash)"`.
    assert run_kd("train", "-sc", "install=bash").stdout == run_kd("--completion",
                                                                   "bash").stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_script_completes_verbs_and_overrides() -> None:
    """Sources `kd --completion bash` in bash and calls its function as readline would."""
    bindir = Path(sys.executable).parent
    if not (bindir / "kd").exists():
        pytest.skip("the kd console script is not installed beside this Python")
    script = r'''
eval "$(kd --completion bash)"
for line in "kd tr" "kd train tea" "kd train teacher=resnet5"; do
    COMP_LINE="$line"; COMP_POINT=${#line}
    read -ra COMP_WORDS <<< "$line"; COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
    _kd_completion
    echo "${COMPREPLY[*]}"
done
complete -p kd
'''
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    verbs, overrides, values, registered = proc.stdout.strip().split("\n")
    assert verbs == "train"
    assert "teacher=" in overrides.split()
    assert values.split() == ["teacher=resnet50", "teacher=resnet56"]
    assert registered.endswith(" kd") and "_kd_completion" in registered


@pytest.mark.parametrize("override, line", [
    # Hydra advised `+loss.temprature=2`, which adds the typo as a key.
    ("loss.temprature=2", "loss.temprature: unknown key (valid: temperature, ce_weight, "
                          "kd_weight; did you mean loss.temperature?)"),
    ("trainr.seed=1", "trainr: unknown key (valid: teacher, student, dataset, loss, optimizer, "
                      "scheduler, teacher_optimizer, teacher_scheduler, trainer, device, seed, "
                      "deterministic, baseline, store, cache, pretrain, logging; did you mean "
                      "trainer, pretrain?)"),
    ("trainer.epochs=3", "trainer.epochs: unknown key (valid: teacher, student, eval_batch_size, "
                         "nan_retries, nan_lr_factor; did you mean trainer.teacher.epochs, "
                         "trainer.student.epochs, pretrain.epochs?)"),
    # Every path that ends in the key; a close spelling at the key's own level.
    ("epochs=3", "epochs: unknown key (valid: teacher, student, dataset, loss, optimizer, "
                 "scheduler, teacher_optimizer, teacher_scheduler, trainer, device, seed, "
                 "deterministic, baseline, store, cache, pretrain, logging; did you mean "
                 "trainer.teacher.epochs, trainer.student.epochs, pretrain.epochs?)"),
    ("trainer.student.epoch=3", "trainer.student.epoch: unknown key (valid: epochs, batch_size; "
                                "did you mean trainer.student.epochs?)"),
    ("trainer.student.zzz=3", "trainer.student.zzz: unknown key (valid: epochs, batch_size)"),
])
def test_unknown_key_on_the_command_line_is_one_line(tmp_path: Path, override: str,
                                                     line: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "kdcli.cli", "train", override], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == f"error: config: {line}\n"
    assert not list(tmp_path.iterdir())  # refused before any folder is made


def test_a_sweep_refusing_a_key_of_a_swept_group_says_why_and_what_to_do(tmp_path: Path
                                                                         ) -> None:
    # Hydra checks the keys set for every job against the group's default option before the
    # sweep: the line did not say that the refusal was not about loss=fitnets.
    proc = subprocess.run([sys.executable, "-m", "kdcli.cli", "train", "-m", "loss=hinton,fitnets",
                           "loss.student_layer=block2", "loss.teacher_layer=block2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == (
        "error: config: loss.student_layer: unknown key (valid: temperature, ce_weight, "
        "kd_weight); a -m sweep checks it before any job runs, against the loss option chosen "
        "without the sweep (its default), not each of loss=hinton,fitnets: sweep options that "
        "take other keys in separate runs, or give ++loss.student_layer=block2 (a job whose "
        "option lacks the key then fails alone, the others run)\n")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, line", [
    (["train", "student=resnet9"],
     "error: config: student=resnet9: no such option (did you mean resnet8, resnet56, "
     "resnet50?; options: efficientnet_b0, mlp, mlp-large, "),
    (["train", "-m", "experiment=smoke", "loss=hinton,dkdd"],
     "error: config: loss=dkdd: no such option (did you mean dkd?; options: attention, ce, "
     "dist, dkd, fitnets, hinton, lskd, mse); one of your own: --config-dir DIR with "
     "DIR/loss/dkdd.yaml\n"),
])
def test_an_unknown_option_is_one_line_with_the_options(tmp_path: Path, args: list[str],
                                                        line: str) -> None:
    # Hydra's own text was 35 lines for a student (each option on a line, its config search
    # path, HYDRA_FULL_ERROR advice): the only bad input that was not kd's one line.
    proc = subprocess.run([sys.executable, "-m", "kdcli.cli", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith(line) and proc.stderr.count("\n") == 1, proc.stderr
    assert not list(tmp_path.rglob("*.pt"))  # a sweep stops before its first job


def test_plus_still_adds_a_key() -> None:
    proc = run_kd("train", "+loss.temprature=2", "--cfg", "job", "-p", "loss")
    assert proc.returncode == 0, proc.stderr
    assert "temprature: 2" in proc.stdout


@pytest.mark.parametrize("flags", [["-m", "--cfg", "job"], ["--multirun", "--cfg=hydra"]])
def test_cfg_with_multirun_is_one_line(flags: list[str]) -> None:
    # Hydra refused the pair with a bare ValueError traceback.
    proc = run_kd("train", "loss.temperature=2,4", *flags)
    assert proc.returncode == 2
    assert proc.stderr == ("error: --cfg shows one job's config: drop -m and give each swept "
                           "key one value (or see the sweeper's settings with --cfg hydra -p "
                           "hydra.sweeper, without -m)\n")
