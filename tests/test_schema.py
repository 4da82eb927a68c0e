"""Config validation before any work: every shipped option validates; a wrong type, an unknown
key (on the command line or inside a user's YAML) or an unset value is reported with its path."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

import kdcli.configs
from kdcli.errors import ConfigError
from kdcli.schema import did_you_mean, validate
from tests.conftest import SMOKE, kd

CONFIGS = Path(kdcli.configs.__file__).parent
PRIMARY = sorted(p.stem for p in CONFIGS.glob("kd_*.yaml"))
# Groups also selected under another package (the teacher's optimizer and schedule).
PACKAGES = {"optimizer": ["optimizer", "optimizer@teacher_optimizer"],
            "scheduler": ["scheduler", "scheduler@teacher_scheduler"]}
OPTIONS = [f"{package}={path.stem}"
           for group in sorted(p.name for p in CONFIGS.iterdir() if p.is_dir()
                               and not p.name.startswith("__"))
           for path in sorted((CONFIGS / group).glob("*.yaml"))
           for package in PACKAGES.get(group, [group])]


@contextlib.contextmanager
def composed(*overrides: str, config_name: str = "kd_train") -> Iterator[DictConfig]:
    """The config a run of `kd <verb> OVERRIDES` gets, with HydraConfig set as in that run
    (multi-teacher and pretraining options compose more configs through it)."""
    with initialize_config_module(config_module="kdcli.configs", version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides),
                      return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        try:
            yield cfg
        finally:
            HydraConfig.instance().cfg = None  # other tests run outside Hydra


def _fill_required(cfg: DictConfig) -> None:
    """Options may leave inputs for the user (`root: ???`, a data path): give them one."""
    for key in OmegaConf.missing_keys(cfg):
        OmegaConf.update(cfg, key, "/placeholder")


def test_options_were_found() -> None:
    assert {"teacher=resnet20", "loss=dkd", "optimizer@teacher_optimizer=adamw",
            "experiment=smoke", "device=cuda_fp16"} <= set(OPTIONS)


@pytest.mark.parametrize("option", OPTIONS)
def test_every_shipped_option_validates(option: str) -> None:
    with composed(option) as cfg:
        _fill_required(cfg)
        validate(cfg)


@pytest.mark.parametrize("config_name", PRIMARY)
def test_every_primary_config_validates(config_name: str) -> None:
    with composed(config_name=config_name) as cfg:
        _fill_required(cfg)
        validate(cfg)


@pytest.mark.parametrize("overrides", [
    SMOKE,
    ["teacher=[resnet20,resnet8]"],
    # Each teacher is checked as if chosen alone: the merged node would mix their keys.
    ["teacher=[tiny_cnn,resnet18]", "cache.teacher_weights=[2,1]"],
    ["pretrain.dataset=cifar10", "pretrain.epochs=1", "student.init=from_teacher"],
    ["loss=attention", "loss.student_layers=[block2,block3]", "loss.teacher_layers=block3"],
    ["scheduler=multistep", "scheduler.milestones=[10,20]", "device.channels_last=true"],
])
def test_combinations_validate(overrides: list[str]) -> None:
    with composed(*overrides) as cfg:
        validate(cfg)


def test_an_int_where_a_float_is_declared_becomes_that_float() -> None:
    # `loss.temperature=4` typed on the command line and the YAML's `4.0` keyed two store entries,
    # so the identical student was trained again. Ints stay ints where an int is declared, and
    # a union of both (`int | float`) is left as given.
    with composed("loss.temperature=4", "optimizer.lr=1", "cache.teacher_weights=[2,1]",
                  "trainer.student.epochs=3") as cfg:
        validate(cfg)
        assert type(cfg.loss.temperature) is float and cfg.loss.temperature == 4.0
        assert type(cfg.optimizer.lr) is float
        assert [type(w) for w in cfg.cache.teacher_weights] == [float, float]
        assert type(cfg.trainer.student.epochs) is int
    configs = []
    for overrides in (["loss.temperature=4"], []):
        with composed(*overrides) as cfg:
            validate(cfg)
            configs.append(OmegaConf.to_yaml(cfg))
    assert configs[0] == configs[1]


def test_kd_evals_keys_are_valid_in_kd_eval_alone() -> None:
    # `kd train +epochs=3` listed `checkpoint, arch, split` among the valid top-level keys, which
    # only kd eval's config has (`kd train checkpoint=x` is refused), and `+checkpoint=x` passed.
    def problem(*overrides: str, config_name: str = "kd_train") -> str:
        with composed(*SMOKE, *overrides, config_name=config_name) as cfg, \
                pytest.raises(ConfigError) as err:
            validate(cfg)
        return str(err.value)

    message = problem("+epochs=3")
    assert message.startswith("config: epochs: unknown key (valid: seed, deterministic, ")
    assert ", cache, pretrain, logging; did you mean " in message
    assert problem("+checkpoint=best.pt").startswith("config: checkpoint: unknown key")
    assert ", logging, checkpoint, arch, split; did you mean " in problem(
        "+epochs=3", "checkpoint=best.pt", config_name="kd_eval")


def test_users_own_model_by_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As in test_pipeline.test_users_own_model_by_target: a builder taking **kwargs gets the
    # option's other keys (tiny_cnn's width) and is not held to a key list.
    (tmp_path / "schema_usermodels.py").write_text(
        "def linear(num_classes=10, **_):\n    return None\n"
        "def strict(num_classes: int = 10, depth: int = 2):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with composed(*SMOKE, "student._target_=schema_usermodels.linear") as cfg:
        validate(cfg)
    with composed(*SMOKE, "student._target_=schema_usermodels.strict") as cfg, \
            pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value) == ("config: student.width: unknown key for "
                              "schema_usermodels.strict (valid: depth; did you mean "
                              "student.depth?)")


def test_missing_module_of_a_target_says_where_kd_looked(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The installed `kd` script does not search the current directory (`python -m` does): a
    # model file beside the user said only "no module named 'cwd_nets'".
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", str(tmp_path))])

    def problem() -> str:
        with composed(*SMOKE, "student._target_=cwd_nets.small_net") as cfg, \
                pytest.raises(ConfigError) as err:
            validate(cfg)
        return str(err.value)

    assert problem() == (
        "config: student._target_: cannot import 'cwd_nets.small_net' (no module named "
        "'cwd_nets'; put the folder that holds it on PYTHONPATH: kd searches sys.path, not the "
        "current directory)")
    (tmp_path / "cwd_nets.py").write_text("def small_net(num_classes=10, **_):\n    return None\n")
    assert problem() == (
        "config: student._target_: cannot import 'cwd_nets.small_net' (no module named "
        "'cwd_nets'; cwd_nets.py is in the current directory, which the kd script does not "
        "search: put it on PYTHONPATH (PYTHONPATH=. kd ...))")


@pytest.mark.parametrize("overrides, message", [
    (["trainer.student.epochs=abc"], "config: trainer.student.epochs: expected int, got 'abc'"),
    (["trainer.teacher.batch_size=1.5"],
     "config: trainer.teacher.batch_size: expected int, got 1.5"),
    (["seed=true"], "config: seed: expected int, got True"),
    # Read "expected int or null", which did not say it counts images, not a fraction.
    (["dataset.val_size=0.1"], "config: dataset.val_size: a number of images to hold out of "
                               "train (null or 0: none), not a fraction, got 0.1"),
    (["deterministic=1"], "config: deterministic: expected bool, got 1"),
    (["cache.teacher_weights=[1,a]"],
     "config: cache.teacher_weights: expected a list of float or null, got [1, 'a']"),
    (["+cache.topK=5"], "config: cache.topK: unknown key (valid: storage, topk, batch_size, "
                        "teacher_weights, views, check; did you mean cache.topk?)"),
    (["+trainr.epochs=5"], "config: trainr: unknown key (valid: seed,"),
    (["optimizer.lr=fast"], "config: optimizer.lr: expected float, got 'fast'"),
    (["optimizer=adamw", "optimizer.betas=[0.9]"],
     "config: optimizer.betas: expected a list of 2 (float, float), got [0.9]"),
    (["teacher_scheduler.warmup_epochs=soon"],
     "config: teacher_scheduler.warmup_epochs: expected float, got 'soon'"),
    (["+loss.temprature=2"], "config: loss.temprature: unknown key for "
                             "kdcli.losses.hinton.HintonKD (valid: temperature, ce_weight, "
                             "kd_weight; did you mean loss.temperature?)"),
    (["student=resnet18", "student.input_size=big"],
     "config: student.input_size: expected int, got 'big'"),
    (["+teacher.depth=3"],
     "config: teacher.depth: unknown key for kdcli.models.cifar.resnet20 (valid: none)"),
    (["student._target_=kdcli.models.cifar.resnet9000"],
     "config: student._target_: cannot import 'kdcli.models.cifar.resnet9000'"),
    (["dataset=cifar10", "~dataset.loader.root"],
     "config: dataset.loader.root: required by kdcli.data.datasets.cifar10 but not set"),
    (["dataset.image_size=${dataset.nothing}"], "config: dataset.image_size: "),
    (["pretrain.dataset=imagenet9", "pretrain.epochs=1"],
     "config: pretrain.dataset=imagenet9: In 'kd': Could not find 'dataset/imagenet9'"),
])
def test_wrong_type_or_unknown_key_names_the_path(overrides: list[str], message: str) -> None:
    with composed(*overrides) as cfg, pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize("extra, key, guess", [
    # Every path whose last part is the key, wherever it was written.
    ([], "epochs", "; did you mean trainer.teacher.epochs, trainer.student.epochs, "
                   "pretrain.epochs?)"),
    ([], "trainer.epochs", "; did you mean trainer.teacher.epochs, trainer.student.epochs, "
                           "pretrain.epochs?)"),
    ([], "student.lr", "; did you mean optimizer.lr, teacher_optimizer.lr?)"),
    # A close spelling at the key's own level ("+" gave none: `(valid: epochs, batch_size)`).
    ([], "trainer.student.epoch", "; did you mean trainer.student.epochs?)"),
    # No guess: the teacher's width is none for a student whose model takes no width.
    (["student=resnet18"], "student.width", None),
    ([], "zzz", None),
])
def test_an_unknown_key_gets_the_same_guesses_with_or_without_plus(
        extra: list[str], key: str, guess: str | None) -> None:
    # `key=3` is refused by Hydra while composing (kd's line: kdcli.cli.unknown_key_line);
    # `+key=3` adds the key, and the schema refuses it.
    from hydra.errors import ConfigCompositionException

    from kdcli.cli import unknown_key_line

    with pytest.raises(ConfigCompositionException) as refused:
        with composed(*SMOKE, *extra, f"{key}=3"):
            pass
    with composed(*SMOKE, *extra, f"+{key}=3") as cfg, pytest.raises(ConfigError) as added:
        validate(cfg)
    for line in (unknown_key_line(refused.value), str(added.value).removeprefix("config: ")):
        assert line.startswith(f"{key}: unknown key"), line
        if guess is None:
            assert "did you mean" not in line, line
        else:
            assert line.endswith(guess), line


def test_guesses_are_close_spellings_first_then_the_nodes_own_and_at_most_four() -> None:
    cfg = OmegaConf.create({"a": {"rate": 1, "rates": 2}, "b": {"x": {"rate": 3}},
                            "c": {"rate": 4}, "d": {"rate": 5}, "e": {"rate": 6}})
    assert did_you_mean(cfg.a, "a.rat", ["rate", "rates"]) == "; did you mean a.rate, a.rates?"
    assert did_you_mean(cfg.b, "b.rate", ["x"]) == (
        "; did you mean b.x.rate, a.rate, c.rate, d.rate?")
    assert did_you_mean(cfg, "zzz", ["a", "b"]) == ""


@pytest.mark.parametrize("override, message", [
    # A zero batch divides by zero in the loader; epochs=0 trains nothing, then misses last.pt.
    ("trainer.student.batch_size=0", "trainer.student.batch_size: must be >= 1, got 0"),
    ("trainer.teacher.batch_size=-4", "trainer.teacher.batch_size: must be >= 1, got -4"),
    ("trainer.teacher.epochs=0", "trainer.teacher.epochs: must be >= 1, got 0"),
    ("trainer.student.epochs=-3", "trainer.student.epochs: must be >= 1, got -3"),
    ("trainer.eval_batch_size=0", "trainer.eval_batch_size: must be >= 1, got 0"),
    ("trainer.nan_retries=-1", "trainer.nan_retries: must be >= 0, got -1"),
    ("trainer.nan_lr_factor=0", "trainer.nan_lr_factor: must be in (0, 1], got 0"),
    ("trainer.nan_lr_factor=1.5", "trainer.nan_lr_factor: must be in (0, 1], got 1.5"),
    ("cache.batch_size=0", "cache.batch_size: must be >= 1, got 0"),
    ("cache.topk=0", "cache.topk: must be >= 1, got 0"),
    ("cache.views=-1", "cache.views: must be >= 0, got -1"),
    ("cache.check=-1", "cache.check: must be >= 0, got -1"),
    # 0 used to mean "auto" without a word; null is auto.
    ("device.threads=0", "device.threads: must be null or >= 1, got 0"),
    ("device.threads=-2", "device.threads: must be null or >= 1, got -2"),
    ("device.index=-1", "device.index: must be >= 0, got -1"),
    # A negative size sliced `[:-5]`: all but five images.
    ("dataset.train_size=-5", "dataset.train_size: must be null or >= 1, got -5"),
    ("dataset.test_size=0", "dataset.test_size: must be null or >= 1, got 0"),
    ("pretrain.epochs=-1", "pretrain.epochs: must be >= 0, got -1"),
])
def test_out_of_range_value_names_the_path(override: str, message: str) -> None:
    with composed(*SMOKE, override) as cfg, pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value) == f"config: {message}"


@pytest.mark.parametrize("overrides", [
    ["trainer.nan_lr_factor=1", "trainer.nan_retries=0", "cache.check=0", "cache.topk=1"],
    ["device.threads=null", "device.threads=1", "dataset.train_size=null", "pretrain.epochs=0"],
    ["pretrain.dataset=cifar10_subset", "pretrain.epochs=0"],  # 0 = off, e.g. in a sweep
])
def test_values_at_the_edge_of_their_range_validate(overrides: list[str]) -> None:
    with composed(*SMOKE, *overrides) as cfg:
        validate(cfg)


def test_pretraining_set_takes_its_root_from_pretrain_root() -> None:
    # The main dataset's dataset.loader.root does not reach the pretraining set: the error
    # named it all the same.
    with composed("pretrain.dataset=imagefolder", "pretrain.epochs=1") as cfg, \
            pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "set pretrain.root=... (pretrain.dataset=imagefolder)" in str(err.value)
    with composed("pretrain.dataset=imagefolder", "pretrain.epochs=1",
                  "pretrain.root=/data/pool") as cfg:
        validate(cfg)


def test_pretrain_root_is_passed_on_as_written() -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from kdcli.stages.pretrain import dataset_overrides

    root = "/data/a,b=c/it's here"
    cfg = OmegaConf.create({"pretrain": {"dataset": "imagefolder", "root": root}})
    option, setting = OverridesParser.create().parse_overrides(dataset_overrides(cfg))
    assert option.value() == "imagefolder" and setting.key_or_group == "dataset.loader.root"
    assert setting.value() == root


def test_pretrain_epochs_without_a_dataset_is_refused() -> None:
    # Pretraining needs both: epochs alone was skipped without a word.
    with composed(*SMOKE, "pretrain.epochs=2") as cfg, pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value) == ("config: pretrain.epochs: 2 but pretrain.dataset is null; set "
                              "pretrain.dataset=<dataset option> (e.g. cifar10) or "
                              "pretrain.epochs=0")


@pytest.mark.parametrize("config_name, overrides, message", [
    # Hydra merges a list's options, the last winning: the run trained tiny_cnn-wide and
    # reported it as tiny_cnn.
    ("kd_train", ["student=[tiny_cnn,tiny_cnn-wide]"],
     "student=[tiny_cnn,tiny_cnn-wide]: student takes one option (a list merges them into one "
     "config, the last winning); only teacher=[a,b] takes several"),
    ("kd_student", ["optimizer@teacher_optimizer=[sgd,adamw]"],
     "optimizer@teacher_optimizer=[sgd,adamw]: optimizer@teacher_optimizer takes one option"),
    ("kd_train", ["teacher=[]"], "teacher=[]: no teacher given; choose one (teacher=resnet56) "
                                 "or several (teacher=[resnet56,wrn-40-2])"),
    ("kd_eval", ["checkpoint=best.pt", "arch=teacher", "teacher=[tiny_cnn-wide,tiny_cnn]"],
     "teacher=[tiny_cnn-wide,tiny_cnn]: kd eval evaluates one model; choose one teacher option"),
])
def test_a_list_of_options_only_for_teachers(config_name: str, overrides: list[str],
                                             message: str) -> None:
    with composed(*SMOKE, *overrides, config_name=config_name) as cfg, \
            pytest.raises(ConfigError) as err:
        validate(cfg)
    # Only the list: the merged config's own problems would mislead.
    assert str(err.value).startswith(f"config: {message}")
    assert len(str(err.value).splitlines()) == 1


def test_every_problem_is_listed_and_unset_values_too() -> None:
    with composed("trainer.student.epochs=abc", "loss.kd_weight=much",
                  config_name="kd_eval") as cfg, pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).splitlines() == [
        "config: checkpoint: no value given (it is ???); set checkpoint=...",
        "config: loss.kd_weight: expected float, got 'much'",
        "config: trainer.student.epochs: expected int, got 'abc'",
    ]


def test_an_unset_required_argument_is_reported_once() -> None:
    # It was also "required by kdcli.data.imagefolder.image_folder but not set".
    with composed(*SMOKE, "dataset=imagefolder") as cfg, pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value) == ("config: dataset.loader.root: no value given (it is ???); set "
                              "dataset.loader.root=...")


# --- through the CLI: one error line, nothing trained or written -----------------------------


def _only_hydra_files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.parametrize("override, message", [
    ("trainer.student.epochs=abc", "trainer.student.epochs: expected int, got 'abc'"),
    # Out of range: was a ZeroDivisionError traceback from the loader.
    ("trainer.student.batch_size=0", "trainer.student.batch_size: must be >= 1, got 0"),
    # Was a KeyError traceback after the dataset had loaded.
    ("teacher=[]", "teacher=[]: no teacher given; choose one (teacher=resnet56) or several "
                   "(teacher=[resnet56,wrn-40-2])"),
])
def test_wrong_value_on_the_command_line_stops_before_any_work(
        tmp_path: Path, override: str, message: str) -> None:
    proc = kd("train", *SMOKE, override, f"store={tmp_path / 'store'}",
              f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"error: config: {message}\n"
    # The one line: the log's ERROR record was echoed on stdout too; the log file keeps it.
    assert "ERROR" not in proc.stdout and message not in proc.stdout
    assert f"[ERROR] - config: {message}" in (tmp_path / "run" / "train.log").read_text()
    assert not (tmp_path / "store").exists()
    # Only what Hydra writes before handing over: the composed config and the log (and the
    # run folder's lock, kdcli.runfolder).
    assert _only_hydra_files(tmp_path / "run") == {
        ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log",
        ".kd.lock"}
    assert "dataset" not in (tmp_path / "run" / "train.log").read_text()  # not even loaded


def test_typo_inside_a_users_yaml_is_reported_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "myconf" / "loss").mkdir(parents=True)
    (tmp_path / "myconf" / "loss" / "soft.yaml").write_text(
        "_target_: kdcli.losses.hinton.HintonKD\ntemprature: 2.0\nkd_weight: 0.5\n")
    proc = kd("train", "--config-dir", str(tmp_path / "myconf"), *SMOKE, "loss=soft",
              f"store={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}",
              cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr == ("error: config: loss.temprature: unknown key for "
                           "kdcli.losses.hinton.HintonKD (valid: temperature, ce_weight, "
                           "kd_weight; did you mean loss.temperature?)\n")
    assert not (tmp_path / "store").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


# First: hidden in the merged node by the second's value. Last: reported once, as that
# teacher's (not as the merged node's, whose "set teacher.width=..." would be refused).
@pytest.mark.parametrize("teachers", ["[needy,tiny_cnn-wide]", "[tiny_cnn-wide,needy]"])
def test_an_unset_value_in_one_of_several_teachers_is_reported_before_any_work(
        tmp_path: Path, teachers: str) -> None:
    # Each teacher of teacher=[a,b] is composed alone later: a `???` in one's YAML failed only
    # when that teacher was built, after the other stages' work. `teacher.width=` cannot be
    # given beside a list of teachers, so the message points at the YAML.
    (tmp_path / "myconf" / "teacher").mkdir(parents=True)
    (tmp_path / "myconf" / "teacher" / "needy.yaml").write_text(
        "_target_: kdcli.models.small.tiny_cnn\nwidth: ???\n")
    proc = kd("train", "--config-dir", str(tmp_path / "myconf"), *SMOKE,
              f"teacher={teachers}", f"store={tmp_path / 'store'}",
              f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr == ("error: config: teacher.width: no value given (it is ???) in "
                           "teacher=needy; with several teachers set it in that option's YAML\n")
    assert not (tmp_path / "store").exists()
