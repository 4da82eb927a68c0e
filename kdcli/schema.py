"""Checks a composed config before any work: unknown keys, wrong types and unset values, each
reported with its full path (`config: trainer.student.epochs: expected int, got 'abc'`).

Two kinds of node (configs map to code 1:1):
- settings without `_target_` (`cache`, `trainer`, `device`, ...) are declared by the
  dataclasses below: a key they do not declare is a typo, a value of another type a mistake;
- a node with `_target_` (models, loss, optimizers, schedulers, the dataset loader) has its
  target's signature as schema: every key must be a parameter (unless the target takes
  `**kwargs`), values are checked against simple annotations (int, float, bool, str, Literal,
  lists and unions of them), and a required parameter must be set unless kd passes it.

Hydra already refuses a typo'd key on the command line (struct mode). This catches what it
cannot: typos inside YAML files (a user's `--config-dir`), wrong types (`epochs=abc`), values
left `???`, in the configs `teacher=[a,b]` and `pretrain.dataset` compose later, all before
anything is trained or written. A list of options for any other group (`student=[a,b]`, which
Hydra would merge into one config), an empty teacher list and a teacher list in `kd eval` are
refused. Numbers of settings nodes are range-checked too (`at_least`,
`between` on the dataclass fields: a batch size of 0, `epochs=-1`). Allowed names
(`device.precision`, `cache.storage`) and the ranges of a target's own arguments (a loss
weight) stay with the module that reads them.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdcli.errors import ConfigError

# --------------------------------------------------------------------------- node kinds


class Target:
    """A node built by `hydra.utils.instantiate`; its `_target_`'s signature is its schema."""

    # Arguments kd passes at build time: never required in the config.
    passed: ClassVar[tuple[str, ...]] = ()
    # Keys kd reads itself and removes before building, with their types.
    settings: ClassVar[dict[str, Any]] = {}


class Model(Target):
    passed = ("num_classes",)


class StudentModel(Model):
    settings: ClassVar[dict[str, Any]] = {"init": str}


class Optimizer(Target):
    passed = ("params",)


class Scheduler(Target):
    passed = ("optimizer", "epochs", "steps_per_epoch")


class Loss(Target):
    pass


class DatasetLoader(Target):
    pass


# --------------------------------------------------------------------------- value ranges


@dataclass(frozen=True)
class Range:
    """The values a number may take: `low <= v` (`low < v` when `open_low`), `v <= high`."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    # What the number counts, said when the value is not even of the right type: "expected int
    # or null, got 0.1" for `dataset.val_size=0.1` did not say it counts images, not a fraction.
    what: str | None = None

    def allows(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}]"


def at_least(low: float, what: str | None = None) -> Any:
    """A settings field whose value (when not null) must be >= `low`; `what` it counts."""
    return field(metadata={"range": Range(low, what=what)})


def between(low: float, high: float, open_low: bool = False) -> Any:
    """A settings field whose value must lie in [low, high] (or (low, high])."""
    return field(metadata={"range": Range(low, high, open_low)})


# --------------------------------------------------------------------------- settings nodes


@dataclass
class Budget:
    epochs: int = at_least(1)
    batch_size: int = at_least(1)


@dataclass
class Trainer:
    teacher: Budget
    student: Budget
    eval_batch_size: int = at_least(1)
    nan_retries: int = at_least(0)
    # Each retry multiplies the learning rate by this: 0 would stop learning, > 1 raise it.
    nan_lr_factor: float = between(0, 1, open_low=True)


@dataclass
class Cache:
    storage: str
    topk: int = at_least(1)
    batch_size: int = at_least(1)
    teacher_weights: list[float] | None
    views: int = at_least(0)
    check: int = at_least(0)  # 0 = off


@dataclass
class Device:
    type: str
    index: int = at_least(0)
    precision: str
    channels_last: bool | str  # true, false or auto
    compile: bool | str  # false, true, or a torch.compile mode (device.COMPILE_MODES)
    threads: int | None = at_least(1)  # null = one per usable core
    data: str  # auto, device or host


@dataclass
class Pretrain:
    dataset: str | None
    epochs: int = at_least(0)  # 0 = no pretraining
    root: str | None  # the pretraining set's dataset.loader.root; null = its option's default


@dataclass
class Logging:
    tensorboard: bool


@dataclass
class Dataset:
    name: str
    loader: DatasetLoader
    num_classes: int | None
    image_size: int
    in_features: int
    augment: str
    train_size: int | None = at_least(1, "a number of images (null: the whole split)")
    test_size: int | None = at_least(1, "a number of images (null: the whole split)")
    # Held out of train for per-epoch evaluation and best.pt; null or 0 = none (the test
    # split). Whether it leaves every class a training image is checked once the data is loaded.
    val_size: int | None = at_least(
        0, "a number of images to hold out of train (null or 0: none), not a fraction")


# Settings nodes that may hold more keys than they declare: a dataset option may carry values
# for model configs to interpolate (`in_features: ${dataset.in_features}`).
OPEN = (Dataset,)


@dataclass
class Run:
    """The top level of every verb's config (kd.yaml)."""

    seed: int
    deterministic: bool
    baseline: bool
    store: str
    teacher: Model
    student: StudentModel
    dataset: Dataset
    loss: Loss
    optimizer: Optimizer
    scheduler: Scheduler
    teacher_optimizer: Optimizer
    teacher_scheduler: Scheduler
    trainer: Trainer
    device: Device
    cache: Cache
    pretrain: Pretrain
    logging: Logging


@dataclass
class EvalRun(Run):
    """The top level of `kd eval`'s config: kd_eval.yaml adds what to evaluate. Not declared for
    the other verbs: `kd train +checkpoint=x` is an unknown key, and their lists of valid keys
    do not offer these."""

    checkpoint: str
    arch: str
    split: str


def top_level(cfg: DictConfig) -> type:
    """The schema of `cfg`'s top level: EvalRun for `kd eval`'s config, else Run. Outside Hydra
    (library use) a config holding a checkpoint is taken for an eval config."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return EvalRun if HydraConfig.get().job.config_name == "kd_eval" else Run
    return EvalRun if "checkpoint" in cfg else Run


# --------------------------------------------------------------------------- entry point


def validate(cfg: DictConfig) -> None:
    """Raises ConfigError listing every problem of `cfg` (one `config: <path>: ...` line each).
    A valid `cfg` is left with its ints turned to floats where a float is declared.

    Under Hydra (a real run) the configs the run composes later are checked too: each teacher of
    `teacher=[a,b]` as if chosen alone, and the `pretrain.dataset` option.
    """
    lists = _check_group_lists()
    if lists:  # the rest of the config is a merge of the listed options: its problems mislead
        raise ConfigError("\n".join(f"config: {p}" for p in lists))
    teachers = _teacher_options()
    skip = ("teacher",) if teachers else ()  # the merged node: each teacher is checked alone
    problems = _unset(cfg, skip=skip)
    problems += _check_settings(cfg, top_level(cfg), "", skip=skip)
    for name in teachers:
        sub, problem = _recompose([f"teacher={name}"], ("teacher",), f"teacher={name}")
        if problem:
            problems.append(problem)
            continue
        # Its `???` values too. `teacher.<key>=` cannot be given beside teacher=[a,b]
        # (stages.teacher refuses it: no single node to land on), so the YAML is the place.
        problems += [f"{key}: no value given (it is ???) in teacher={name}; with several "
                     "teachers set it in that option's YAML" for key in _missing(sub.teacher,
                                                                              "teacher")]
        problems += [f"{p} (teacher={name})" for p in _check_key(sub, "teacher", Model, "teacher")]
    problems += _check_pretrain(cfg)
    if problems:
        raise ConfigError("\n".join(f"config: {p}" for p in problems))


def normalise(cfg: DictConfig) -> DictConfig:
    """`cfg` with its ints turned to floats where a float is declared, as `validate` leaves a
    valid config: for the configs a run composes again (`teacher=[a,b]`, `pretrain.dataset`),
    which `validate` checked without keeping. Problems are not reported here."""
    _check_settings(cfg, top_level(cfg), "")
    return cfg


def _unset(node: DictConfig, path: str = "", skip: tuple[str, ...] = ()) -> list[str]:
    """One problem per `???` value under `node` (at `path`), in key order, but for the
    top-level keys in `skip`."""
    return [f"{key}: no value given (it is ???); set {key}=..." for key in
            _missing(node, path) if key.split(".", 1)[0].split("[", 1)[0] not in skip]


def _missing(node: DictConfig, path: str = "") -> list[str]:
    """Paths of the `???` values under `node` (at `path`), sorted."""
    return sorted(_missing_keys(OmegaConf.to_container(node, resolve=False), path))


def _missing_keys(node: Any, path: str = "") -> Iterator[str]:
    """Paths of `???` values (OmegaConf.missing_keys stops at a broken interpolation)."""
    if node == "???":
        yield path
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _missing_keys(value, _join(path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _missing_keys(value, f"{path}[{i}]")


def _check_group_lists() -> list[str]:
    """A list of options merges them into one config, the last winning: only `teacher=[a,b]`
    means something (several teachers, each composed alone), and not in `kd eval`."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    from kdcli.stages.common import group_lists

    evaluating = HydraConfig.get().job.config_name == "kd_eval"
    problems = []
    for group, names in group_lists().items():
        given = f"{group}=[{','.join(names)}]"
        if group != "teacher":
            problems.append(f"{given}: {group} takes one option (a list merges them into one "
                            "config, the last winning); only teacher=[a,b] takes several")
        elif evaluating:
            problems.append(f"{given}: kd eval evaluates one model; choose one teacher option")
        elif not names:
            problems.append(f"{given}: no teacher given; choose one (teacher=resnet56) or "
                            "several (teacher=[resnet56,wrn-40-2])")
    return problems


def _teacher_options() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    from kdcli.stages.common import list_override

    return list_override("teacher") or []


def _check_pretrain(cfg: DictConfig) -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    node = cfg.get("pretrain")
    if not isinstance(node, DictConfig):
        return []
    try:
        name, epochs = node.get("dataset"), node.get("epochs")
    except OmegaConfBaseException:
        return []  # reported by the main pass
    if name is None and isinstance(epochs, int) and epochs > 0:
        # Pretraining runs only with both set: say so rather than skip it without a word.
        return [f"pretrain.epochs: {epochs} but pretrain.dataset is null; set "
                "pretrain.dataset=<dataset option> (e.g. cifar10) or pretrain.epochs=0"]
    if not HydraConfig.initialized():
        return []
    if not isinstance(name, str) or not isinstance(epochs, int) or epochs <= 0:
        return []
    from kdcli.stages.pretrain import dataset_overrides

    sub, problem = _recompose(dataset_overrides(cfg), ("dataset",), f"pretrain.dataset={name}")
    if problem:
        return [problem]
    # Its `???` values too: the main pass lists the main config's alone.
    problems = _unset(sub.dataset, "dataset")
    problems += _check_key(sub, "dataset", Dataset, "dataset")
    # The pretraining set's own root is set as pretrain.root, not dataset.loader.root (the
    # main dataset's): say so where a problem names it.
    return [f"{p.replace('set dataset.loader.root=', 'set pretrain.root=')} "
            f"(pretrain.dataset={name})" for p in problems]


def _recompose(extra: list[str], groups: tuple[str, ...], label: str
               ) -> tuple[DictConfig | None, str | None]:
    from kdcli.stages.common import recompose

    try:
        return recompose(extra, groups), None
    except Exception as exc:  # Hydra's errors for an unknown option name, a bad override
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"{label}: {first}"


# --------------------------------------------------------------------------- did you mean

# At most this many guesses for an unknown key: the message stays one line.
MAX_GUESSES = 4
# Sibling nodes of one kind (the teacher's and the student's model, optimizer, scheduler): a
# key of one is no guess for the other, whose chosen option does not take it.
_KINDS = (Model, Optimizer, Scheduler)


def did_you_mean(node: DictConfig, full_key: str, valid: list[str]) -> str:
    """`; did you mean trainer.teacher.epochs, pretrain.epochs?` for `full_key`, a key that
    `node` (the node it was set in, within the whole config) lacks and `valid` lists what it
    has; "" when nothing comes close. The same whether the key came from a YAML, `key=` (Hydra
    refuses it while composing: kdcli.cli) or `+key=`.

    First the close spellings among `valid` (`trainer.student.epoch` -> `trainer.student.epochs`),
    then every path in the config whose last part is the key (`epochs` -> `trainer.teacher.epochs`,
    `trainer.student.epochs`, `pretrain.epochs`), those under `node` first.
    """
    parent, _, key = full_key.rpartition(".")
    close = [_join(parent, k) for k in difflib.get_close_matches(key, valid)]
    kind = _kind_of(parent)
    under, elsewhere = [], []
    for path in _paths(node._get_root()):
        where, _, last = path.rpartition(".")
        if last != key or path == full_key or (kind is not None and where != parent
                                               and _kind_of(where) is kind):
            continue
        (under if path.startswith(f"{parent}.") else elsewhere).append(path)
    guesses = list(dict.fromkeys([*close, *under, *elsewhere]))[:MAX_GUESSES]
    return f"; did you mean {', '.join(guesses)}?" if guesses else ""


def _paths(node: DictConfig, path: str = "") -> Iterator[str]:
    """The path of every key under `node`, a parent before its children, in key order; without
    `_target_` and the like, and at the top without Hydra's own node. Values are not resolved."""
    for key in node.keys():
        key = str(key)
        if (key.startswith("_") and key.endswith("_")) or (not path and key == "hydra"):
            continue
        full = _join(path, key)
        yield full
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not (child._is_missing() or child._is_none()
                                                  or child._is_interpolation()):
            yield from _paths(child, full)


def _kind_of(path: str) -> type | None:
    """Which of _KINDS the node at `path` is declared as (Run's fields), or None."""
    hint: Any = Run
    for part in path.split(".") if path else ():
        if not dataclasses.is_dataclass(hint):
            return None
        hint = typing.get_type_hints(hint).get(part)
    return next((k for k in _KINDS if isinstance(hint, type) and issubclass(hint, k)), None)


# --------------------------------------------------------------------------- walking the tree


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _check_settings(node: Any, schema: type, path: str, skip: tuple[str, ...] = ()
                    ) -> list[str]:
    """A settings node against its dataclass: every key declared, every value typed."""
    if not isinstance(node, DictConfig):
        return [f"{path}: expected a group of settings ({', '.join(_field_names(schema))}), "
                f"got {_show(node)}"]
    hints = typing.get_type_hints(schema)
    ranges = {f.name: f.metadata["range"] for f in dataclasses.fields(schema)
              if "range" in f.metadata}
    problems = []
    for key in node:
        full = _join(path, key)
        if key in skip:
            continue
        if key not in hints:
            if schema not in OPEN:
                names = _field_names(schema)
                problems.append(f"{full}: unknown key (valid: {', '.join(names)}"
                                f"{did_you_mean(node, full, names)})")
            continue
        problems += _check_key(node, key, hints[key], full, ranges.get(key))
    return problems


def _check_range(value: Any, allowed: Range, hint: Any, path: str) -> list[str]:
    """A number of the right type against its field's range (null passes if the type allows)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return []
    if allowed.allows(value):
        return []
    null = "null or " if _matches(None, hint) else ""
    return [f"{path}: must be {null}{allowed.describe()}, got {value!r}"]


def _field_names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def _check_key(node: DictConfig, key: str, hint: Any, path: str, allowed: Range | None = None
               ) -> list[str]:
    """One key of `node` against its declared type, a settings dataclass or a Target kind, and
    its range if `allowed` is given."""
    if OmegaConf.is_missing(node, key):
        return []  # reported once, from OmegaConf.missing_keys
    try:
        value = node[key]
    except OmegaConfBaseException as exc:  # an interpolation that does not resolve
        return [f"{path}: {_omegaconf_message(exc)}"]
    if isinstance(hint, type) and issubclass(hint, Target):
        return _check_target(value, hint, path)
    if dataclasses.is_dataclass(hint):
        return _check_settings(value, hint, path)
    if _is_target_node(value):
        return _check_target(value, Target, path)
    if _matches(value, hint) is False:
        if allowed is not None and allowed.what:
            return [f"{path}: {allowed.what}, got {_show(value)}"]
        return [f"{path}: expected {_describe(hint)}, got {_show(value)}"]
    if allowed is not None and (problems := _check_range(value, allowed, hint, path)):
        return problems
    if not OmegaConf.is_interpolation(node, key):
        _floats_as_declared(node, key, hint)
    return []


def _floats_as_declared(node: DictConfig | ListConfig, key: Any, hint: Any) -> None:
    """An int given where a float is declared becomes that float, in place: `temperature=4` on
    the command line and the YAML's `4.0` are one setting, so they key one store entry (the
    entries already in stores were keyed by the YAML's floats, so those keys stay)."""
    hint = _one_type(hint)
    value = node[key]
    if hint is float:
        if isinstance(value, int) and not isinstance(value, bool):
            node[key] = float(value)
        return
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(value, ListConfig) and origin in _SEQUENCES and origin is not tuple \
            and len(args) == 1:
        for i in range(len(value)):
            if not OmegaConf.is_interpolation(value, i):
                _floats_as_declared(value, i, args[0])


def _one_type(hint: Any) -> Any:
    """`hint` without null (or a tensor) in a union: `float | None` -> `float`; a union of two
    config types (`int | float`) stays as it is."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(hint)
                if a is not type(None) and not _never_from_config(a)]
        if len(rest) == 1:
            return rest[0]
    return hint


def _is_target_node(value: Any) -> bool:
    return isinstance(value, DictConfig) and "_target_" in value


def _search_hint(module: str) -> str:
    """Where kd looked for a `_target_`'s missing top-level module, and how to make it found.
    The installed `kd` script searches sys.path (PYTHONPATH, installed packages), not the
    current directory as `python -m` does. kd does not add the current directory itself: an
    import kd makes of an optional package that is not installed would then run any file of
    that name in whatever folder kd is started from (README, Trust model)."""
    here = next((f for f in (f"{module}.py", module) if (Path.cwd() / f).exists()), None)
    if here is not None and str(Path.cwd()) not in sys.path and "" not in sys.path:
        return (f"; {here} is in the current directory, which the kd script does not search: "
                f"put it on PYTHONPATH (PYTHONPATH=. kd ...)")
    return "; put the folder that holds it on PYTHONPATH: kd searches sys.path, not the " \
           "current directory"


def _check_target(node: Any, kind: type[Target], path: str) -> list[str]:
    """A node with `_target_` against the target's signature."""
    if not _is_target_node(node):
        return [f"{path}: needs a _target_ (the function or class that builds it), got "
                f"{_show(node)}"]
    try:
        target_name = node["_target_"]
    except OmegaConfBaseException as exc:
        return [f"{path}._target_: {_omegaconf_message(exc)}"]
    # What instantiate itself uses (hydra.utils.get_object would also log every failure).
    from hydra._internal.utils import _locate

    try:
        target = _locate(str(target_name))
    except Exception as exc:  # ImportError, AttributeError, or whatever the module raised
        cause = exc.__cause__ or exc
        why = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        question = str(exc).strip().splitlines()[-1]
        if isinstance(cause, ModuleNotFoundError) and cause.name != str(target_name):
            why = f"no module named {cause.name!r}"
            if cause.name == str(target_name).split(".")[0]:
                why += _search_hint(cause.name)
        elif isinstance(cause, (ImportError, AttributeError)) and question.startswith("Are you"):
            why = question  # "Are you sure that 'x' is importable from module 'm'?"
        return [f"{path}._target_: cannot import {target_name!r} ({why})"]
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        return []
    named = {n: p for n, p in params.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    hints = _type_hints(target)
    problems = []
    for key in node:
        key = str(key)
        full = _join(path, key)
        if key.startswith("_") and key.endswith("_"):  # _target_, _partial_, _args_, ...
            continue
        if key in kind.settings:
            problems += _check_key(node, key, kind.settings[key], full)
        elif key in named:
            problems += _check_key(node, key, hints.get(key, Any), full)
        elif not takes_kwargs:
            valid = [n for n in named if n not in kind.passed]
            problems.append(f"{full}: unknown key for {target_name} (valid: "
                            f"{', '.join(valid) or 'none'}{did_you_mean(node, full, valid)})")
    if "_args_" not in node and not node.get("_partial_", False):
        for name, p in named.items():
            # `name in node` is False for a ??? value too, reported once already as unset.
            if p.default is p.empty and name not in node.keys() and name not in kind.passed:
                problems.append(f"{_join(path, name)}: required by {target_name} but not set")
    return problems


def _type_hints(target: Any) -> dict[str, Any]:
    """The resolved annotations of a function or a class's __init__; {} when they cannot be
    resolved (names imported only for type checkers): then values go unchecked."""
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(fn)
    except Exception:
        return {}


# --------------------------------------------------------------------------- types


_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence)


def _never_from_config(hint: Any) -> bool:
    """Types a YAML value can never be (a tensor): ignored in a union (`float | Tensor`)."""
    return isinstance(hint, type) and hint.__module__.startswith("torch") and \
        hint.__name__ == "Tensor"


def _matches(value: Any, hint: Any) -> bool | None:
    """True if `value` fits `hint`, False if it certainly does not, None if we cannot tell."""
    if hint is Any or hint is object:
        return True
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if _is_target_node(value):
        return None  # built first, then passed: its type is the target's return type
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in args
    if origin in (Union, types.UnionType):
        results = [_matches(value, a) for a in args if not _never_from_config(a)]
        if True in results:
            return True
        return None if None in results or not results else False
    if hint in _SEQUENCES or origin in _SEQUENCES:
        if isinstance(value, str):
            # A str is a Sequence: `layers: Sequence[str]` taking one name works.
            return None if collections.abc.Sequence in (hint, origin) else False
        if not isinstance(value, (ListConfig, list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                return False
            results = [_matches(v, a) for v, a in zip(value, args, strict=True)]
        else:
            item = args[0] if args else Any
            results = [_matches(v, item) for v in value]
        return False if False in results else (None if None in results else True)
    return None


def _describe(hint: Any) -> str:
    if hint is None or hint is type(None):
        return "null"
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if not _never_from_config(a))
    if origin in _SEQUENCES:
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
        return f"a list of {_describe(args[0])}" if args else "a list"
    return str(hint)


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, dict):
        return "a group of settings"
    return repr(value)


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    msg = getattr(exc, "msg", None) or str(exc)
    return msg.strip().splitlines()[0]
