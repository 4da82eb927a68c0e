"""What every stage needs: the run context, model building, and training one store entry."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdcli import checkpoint, distributed, engine, tensorboard
from kdcli.data.datasets import Dataset, hold_out, subsample
from kdcli.data.loader import BatchLoader
from kdcli.data.transforms import ViewTable, build_augment
from kdcli.device import Runtime, resolve, seed_everything
from kdcli.errors import ConfigError, CorruptArtifact, KDError
from kdcli.losses.base import DistillationLoss, Outputs
from kdcli.metrics import classification_metrics
from kdcli.models.features import FeatureTap
from kdcli.schema import normalise
from kdcli.store import Entry, Store, user_code

log = logging.getLogger(__name__)

# Bump when a change alters what a stage produces from the same inputs: old entries go stale.
STAGE_VERSION = 1

TRAINED, REUSED, RESUMED = "trained", "reused", "resumed"
# A stage the run skipped because nothing reads its output (the cache, for a loss reading no
# cached teacher logits).
NOT_NEEDED = "not needed"


@dataclass
class Context:
    """Everything a stage reads besides its own config node, built once per run."""

    cfg: DictConfig
    runtime: Runtime
    dataset: Dataset
    store: Store
    run_dir: Path
    # Option names fixed for this context (a multi-teacher run's per-teacher contexts).
    names: dict[str, str] = field(default_factory=dict)
    # The `_target_` of each model option's own YAML, by (group, option): shared with variants.
    own_targets: dict[tuple[str, str], str | None] = field(default_factory=dict, repr=False)

    def variant(self, cfg: DictConfig, names: dict[str, str], dataset: Dataset | None = None
                ) -> Context:
        """The same run with another config (e.g. one of several teachers, a pretraining set)."""
        return replace(self, cfg=cfg, names={**self.names, **names},
                       dataset=dataset if dataset is not None else self.dataset)

    def loader(self, split: str, batch_size: int, train: bool, views: ViewTable | None = None
               ) -> BatchLoader:
        """`batch_size` is the global batch: under torchrun a training loader yields this
        rank's share of it (evaluation runs whole, on rank 0). `views`: replay these cached
        augmented views (with `train=False`, in order, for the cache stage). `split`: train,
        test, or val (held out of train, with `dataset.val_size`)."""
        ds = self.dataset
        world = distributed.world_size() if train else 1
        if batch_size % world:
            raise ConfigError(f"batch size {batch_size} does not split evenly over {world} "
                              "data-parallel ranks; choose a multiple of the world size")
        data = getattr(ds, split)
        if data is None:
            raise ConfigError(f"dataset {ds.name} has no {split} split; set dataset.val_size=N "
                              "to hold N images out of train")
        return BatchLoader(
            data, batch_size // world, device=self.runtime.device, mean=ds.mean,
            std=ds.std, shuffle=train,
            augment=build_augment(self.cfg.dataset.augment) if train or views is not None else None,
            seed=int(self.cfg.seed), drop_last=train, memory_format=self.runtime.memory_format,
            views=views, rank=distributed.rank() if train else 0, world_size=world,
            resident=self.runtime.data_on_device(data.nbytes, f"{ds.name} {split}"),
        )

    def eval_loader(self, split: str = "test") -> BatchLoader:
        return self.loader(split, int(self.cfg.trainer.eval_batch_size), train=False)

    @property
    def selection_split(self) -> str:
        """The split each epoch is evaluated on and best.pt chosen by: the validation split
        held out of train when there is one, else the test split."""
        return "val" if self.dataset.val is not None else "test"

    def choice(self, group: str) -> str:
        """The name of what a config group holds: the option picked (e.g. "resnet20" for
        teacher). A model whose `_target_` is not its option's (`student._target_=
        mymodels.tiny_mlp` on the command line, or set by an experiment) is named after that
        target instead (`tiny_mlp`): the report, the log and its store entry's folder then name
        the model that was trained. The option's other settings may still apply (tiny_cnn's
        width), but the name no longer says what the model is."""
        option = self.option(group)
        target = self.overridden_target(group)
        return target.rsplit(".", 1)[-1] if target else option

    def option(self, group: str) -> str:
        """The option picked for a config group, as the command line or a preset chose it."""
        return self.names.get(group) or option_name(self.cfg, group)

    def selected(self, group: str) -> str:
        """How the config selects a model, for messages that say what to change:
        `student=tiny_cnn`, or `student._target_=mymodels.tiny_mlp` for an overridden target."""
        return selection(group, self.option(group), self.overridden_target(group))

    def overridden_target(self, group: str) -> str | None:
        """The composed `_target_` of model group `group` when it is not the one its option's
        YAML sets, else None (also for other groups, and outside Hydra)."""
        if group not in MODEL_GROUPS:
            return None
        target = self.cfg[group].get("_target_")
        option = self.option(group)
        if (group, option) not in self.own_targets:
            self.own_targets[group, option] = option_target(group, option)
        return overriding(target, self.own_targets[group, option])


def overriding(target: Any, own: str | None) -> str | None:
    """`target` (a model's composed `_target_`) when it is set and is not `own`, its option's
    own (`option_target`; None: unknown, so not taken for an override), else None."""
    return str(target) if own is not None and target is not None and str(target) != own \
        else None


def selection(group: str, option: str, target: str | None) -> str:
    """How a config selects a model, for messages that say what to change: `student=tiny_cnn`,
    or `student._target_=mymodels.tiny_mlp` for an overridden `target` (`overriding`)."""
    return f"{group}._target_={target}" if target else f"{group}={option}"


def list_override(group: str) -> list[str] | None:
    """The options of `group=[a,b,...]` on the command line, or None (also outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        task = list(HydraConfig.get().overrides.task)
    except ValueError:
        return None
    for override in OverridesParser.create().parse_overrides(task):
        if override.key_or_group == group and override.package is None:
            value = override.value()
            return [str(v) for v in value] if isinstance(value, list) else None
    return None


def group_lists() -> dict[str, list[str]]:
    """Command-line overrides that give a config group a list of options (`student=[a,b]`,
    `optimizer@teacher_optimizer=[sgd,adamw]`), by group (with its package); {} outside Hydra.
    A list for a key (`cache.teacher_weights=[1,2]`) is a value, not listed here."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        task = list(HydraConfig.get().overrides.task)
    except ValueError:
        return {}
    loader = GlobalHydra.instance().config_loader()
    lists = {}
    for override in OverridesParser.create().parse_overrides(task):
        value = override.value()
        parent, _, leaf = override.key_or_group.rpartition("/")
        if isinstance(value, list) and leaf in loader.list_groups(parent):
            lists[override.get_key_element()] = [str(v) for v in value]
    return lists


def keyed_overrides(group: str) -> list[str]:
    """Command-line overrides of keys inside `group` (`teacher.width=64`), as Hydra parses them."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = list(HydraConfig.get().overrides.task)
    parsed = OverridesParser.create().parse_overrides(task)
    return [line for line, o in zip(task, parsed, strict=True)
            if o.key_or_group.startswith(group + ".")]


def recompose(extra: list[str], replace_groups: tuple[str, ...]) -> DictConfig:
    """This run's config composed again with `extra` overrides in place of those naming
    `replace_groups` or keys inside them: how one run reaches several options of one group."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hc = HydraConfig.get()
    task = list(hc.overrides.task)
    parsed = OverridesParser.create().parse_overrides(task)
    keep = [line for line, o in zip(task, parsed, strict=True)
            if not any(o.key_or_group == g or o.key_or_group.startswith(g + ".")
                       for g in replace_groups)]
    return normalise(compose(config_name=hc.job.config_name, overrides=keep + extra))


# Groups that select a model: named after their `_target_` when it is overridden (Context.choice).
MODEL_GROUPS = ("teacher", "student")


def option_target(group: str, option: str) -> str | None:
    """The `_target_` that option `group=option` gives on its own (its YAML, with the defaults
    it lists), composed from this run's config search path (shipped configs, `--config-dir`,
    `hydra.searchpath`): "" if it sets none; None outside Hydra or if it cannot be composed."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    try:
        searchpath = [o for o in HydraConfig.get().overrides.hydra
                      if o.lstrip("+").startswith("hydra.searchpath")]
        # Not as the primary config: Hydra looks that up before it adds hydra.searchpath.
        node = compose(overrides=[f"+{group}={option}", *searchpath])
    except Exception:  # noqa: BLE001 - outside Hydra, an option Hydra composes differently
        return None
    target = OmegaConf.select(node, f"{group}._target_", default=None)
    return "" if target is None else str(target)


def option_name(cfg: DictConfig, group: str) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        name = HydraConfig.get().runtime.choices.get(group)
        if name:
            return str(name)
    except ValueError:  # not running under Hydra (library use, tests)
        pass
    node = cfg[group]
    return str(node.get("name") or str(node.get("_target_", group)).rsplit(".", 1)[-1])


def build_context(cfg: DictConfig, run_dir: Path | None = None) -> Context:
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"missing required config value(s): {', '.join(sorted(missing))}")
    store = Store(cfg.store)  # first: an empty store path fails before any work
    seed_everything(int(cfg.seed), bool(cfg.deterministic))
    runtime = resolve(cfg.device)
    distributed.quiet_other_ranks()  # under torchrun rank 0 alone logs to the file
    distributed.init(runtime.device)  # joins the process group under torchrun; else a no-op
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir = distributed.shared_run_dir(Path(run_dir))
    t0 = time.perf_counter()
    dataset = load_dataset(cfg.dataset, int(cfg.seed))
    held = f" / {len(dataset.val)} val (held out of train)" if dataset.val is not None else ""
    log.info("dataset %s: %d train%s / %d test images, %d classes (%.1fs); device %s",
             dataset.name, len(dataset.train), held, len(dataset.test), dataset.num_classes,
             time.perf_counter() - t0, runtime.describe())
    return Context(cfg, runtime, dataset, store, Path(run_dir))


def build(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """`instantiate` with errors a user can act on: Hydra's wrapper is unwrapped to the cause,
    and the message says which config choice failed."""
    try:
        return instantiate(node, **kwargs)
    except Exception as exc:
        cause: BaseException = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, KDError):
            raise cause from None
        raise ConfigError(f"{what}: {type(cause).__name__}: {cause}") from exc


def load_dataset(node: DictConfig, seed: int = 0) -> Dataset:
    """The dataset of a `dataset` node. Under torchrun rank 0 loads it first, decoding and
    writing the decoded-image cache, and the other ranks load it after, from that cache."""
    holder: dict[str, Dataset] = {}
    # Not returned through on_main, which would pickle every image to the other ranks.
    distributed.on_main(lambda: holder.update(ds=_load_dataset(node, seed)))
    return holder["ds"] if "ds" in holder else _load_dataset(node, seed)


def _load_dataset(node: DictConfig, seed: int) -> Dataset:
    ds = build(node.loader, f"dataset={node.get('name')}")
    if not isinstance(ds, Dataset):
        raise ConfigError(f"dataset.loader must return kdcli.data.datasets.Dataset, got {type(ds)}")
    ds.name = str(node.get("name", ds.name))
    if node.get("num_classes") is not None and int(node.num_classes) != ds.num_classes:
        raise ConfigError(f"dataset.num_classes={node.num_classes} but the data at hand has "
                          f"{ds.num_classes} classes")
    if node.get("train_size") or node.get("test_size"):
        ds = subsample(ds, node.get("train_size"), node.get("test_size"), seed)
    if node.get("val_size"):  # from what train_size left: train_size counts train and val
        ds = hold_out(ds, int(node.val_size), seed)
    return ds


def container(node: Any) -> Any:
    """A resolved plain-Python copy of a config node, for store keys and reports."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


# Keys of a model node that configure kd, not the model builder.
_MODEL_SETTINGS = ("init",)


def _build_module(ctx: Context, role: str) -> nn.Module:
    """The `teacher` or `student` model as its builder returns it, for the dataset's classes."""
    node = ctx.cfg[role]
    if any(k in node for k in _MODEL_SETTINGS):
        # Resolve first: a detached copy could no longer reach ${dataset.image_size}.
        plain = OmegaConf.to_container(node, resolve=True)
        node = OmegaConf.create({k: v for k, v in plain.items() if k not in _MODEL_SETTINGS})
    return build(node, f"{ctx.selected(role)}: cannot build model",
                 num_classes=ctx.dataset.num_classes)


def model_skeleton(ctx: Context, role: str) -> nn.Module:
    """The `teacher` or `student` model built on the meta device (modules and shapes, no memory,
    no compute): what a check made before any stage trains needs, e.g. layer names."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            # A `weights=` file loaded into meta tensors is a no-op torch warns about.
            warnings.simplefilter("ignore", UserWarning)
            return _build_module(ctx, role)
    except ConfigError:
        # A builder that computes with its tensors (`.item()`, numpy) cannot run on meta: build
        # it for real (a config error there is reported as such).
        return _build_module(ctx, role)


def build_model(ctx: Context, role: str) -> nn.Module:
    """Builds the `teacher` or `student` model for the dataset and checks its output size."""
    model = _build_module(ctx, role)
    probe(ctx, role, model)
    return ctx.runtime.prepare(model)


def probe(ctx: Context, role: str, model: nn.Module) -> None:
    """Runs `model` on two blank images of the dataset's shape and checks it gives one logit per
    class. A model that cannot take the dataset's images (an MLP sized for other images) is a
    ConfigError naming the option, not a traceback."""
    ds = ctx.dataset
    try:
        out = _forward_blank(model, ds.image_shape, None)
    except (ValueError, RuntimeError) as exc:  # the model's own check, or torch's shape errors
        lines = str(exc).strip().splitlines()
        raise ConfigError(f"{ctx.selected(role)} cannot take dataset {ds.name}'s images "
                          f"{tuple(ds.image_shape)}: {lines[0] if lines else type(exc).__name__}"
                          ) from exc
    _check_logits(ctx, role, out)


def _forward_blank(model: nn.Module, shape: tuple[int, ...], device: torch.device | None
                   ) -> torch.Tensor:
    """The model's output for two zero images of `shape` on `device` (None: torch's default),
    in eval mode, without grad."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.zeros(2, *shape, device=device))
    finally:
        model.train(was_training)


def _check_logits(ctx: Context, role: str, out: torch.Tensor) -> None:
    ds = ctx.dataset
    if out.dim() != 2 or out.shape[1] != ds.num_classes:
        raise ConfigError(f"{ctx.selected(role)} outputs {tuple(out.shape[1:])} classes but "
                          f"dataset {ds.name} has {ds.num_classes}")


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def check_training(ctx: Context, role: str, *, optimizer: str, scheduler: str,
                   budget: DictConfig) -> nn.Module:
    """What `train_entry` builds before its first epoch, built before any stage trains (hours
    sooner, with a real teacher): the model, probed on the dataset's images, and its optimizer
    and scheduler, so that torch's own argument checks (a negative learning rate, a momentum
    Nesterov cannot use) fail at once, naming the config group. Returns the model skeleton."""
    model = model_skeleton(ctx, role)
    out = None
    if _on_meta(model):
        try:
            with torch.device("meta"):  # tensors the forward makes land on meta too
                out = _forward_blank(model, ctx.dataset.image_shape, torch.device("meta"))
        except Exception:  # noqa: BLE001 - an op with no meta kernel, `.item()`: see below
            out = None
    if out is not None:
        _check_logits(ctx, role, out)
    else:
        # Run for real on the CPU (one small batch): it tells a model's real error from a meta
        # limitation. A big model costs about half a second, and only here.
        probe(ctx, role, model if not _on_meta(model) else _build_module(ctx, role))
    steps = check_batch_size(ctx, role, int(budget.batch_size))
    params = list(model.parameters()) or [nn.Parameter(torch.zeros(1))]
    try:
        build_optimization(ctx, params, optimizer, scheduler, int(budget.epochs), steps)
    except KDError:
        if not params[0].is_meta:
            raise
        # An optimizer that touches its tensors when built cannot take meta ones: a real
        # stand-in tells whether the setting itself is wrong.
        build_optimization(ctx, [nn.Parameter(torch.zeros(1))], optimizer, scheduler,
                           int(budget.epochs), steps)
    return model


# The share of the training split an epoch may leave out (drop_last) before a warning.
DROPPED_WARN = 0.1


def check_batch_size(ctx: Context, role: str, batch_size: int) -> int:
    """Steps per epoch of the `role`'s training loader, which drops the last partial batch.
    A batch larger than the training split leaves no step: said here, naming the key, not
    when the stage's first epoch finds nothing to train on (its store entry then started).
    One that drops more than DROPPED_WARN of the split each epoch (352 images at batch 128
    train on 256) is warned about: on a small dataset that is data the user thinks is used."""
    world = distributed.world_size()
    n = len(ctx.dataset.train)
    per_rank = max(1, batch_size // world)
    steps = (n // world) // per_rank
    key = f"trainer.{role}.batch_size"
    dropped = n - steps * per_rank * world
    if steps == 0:
        ranks = (f"; under torchrun the batch is split over {world} ranks, "
                 f"{batch_size // world} per rank from {n // world} images each"
                 if world > 1 else "")
        raise ConfigError(f"{key}={batch_size} is larger than the training split ({n} images"
                          f"{ranks}): the last partial batch is dropped, so no step would "
                          f"train; set {key}={n - n % world} or less")
    if dropped > DROPPED_WARN * n:
        log.warning("%s=%d leaves %d of the %d training images (%.0f%%) out of each epoch "
                    "(%d step(s); the last partial batch is dropped, other images each epoch): "
                    "lower %s, or set one that divides the split, to train on more of them",
                    key, batch_size, dropped, n, 100 * dropped / n, steps, key)
    return steps


def build_optimization(ctx: Context, params: list[nn.Parameter], optimizer: str,
                       scheduler: str, epochs: int, steps_per_epoch: int) -> tuple[Any, Any]:
    """The optimizer and scheduler the config nodes `optimizer` and `scheduler` build for
    `params`: what `train_entry` trains with, and what `check_training` builds beforehand."""
    opt = build(ctx.cfg[optimizer], optimizer, params=params)
    sched = build(ctx.cfg[scheduler], scheduler, optimizer=opt, epochs=epochs,
                  steps_per_epoch=steps_per_epoch)
    return opt, sched


def dataset_inputs(ctx: Context) -> dict[str, Any]:
    """The dataset's part of every stage's store key. `val_size` enters it only when set, so
    the keys of runs without a validation split are what they were before the setting."""
    node = ctx.cfg.dataset
    inputs = {"fingerprint": ctx.dataset.fingerprint(), "augment": node.augment,
              "train_size": node.get("train_size"), "test_size": node.get("test_size")}
    if node.get("val_size"):
        inputs["val_size"] = int(node.val_size)
    # The content hash covers the images and labels a loader of the user's own returns, not the
    # mean and std it returns with them: the hash of its code does.
    return with_code(inputs, node.get("loader"))


def with_code(inputs: dict[str, Any], *nodes: Any) -> dict[str, Any]:
    """`inputs` with the sha256 of the user's own code that `nodes` name by `_target_` added
    under "code" (`kdcli.store.user_code`). Without such code no field is added, so the keys
    of configs naming only kd's and installed packages' code stay as they were."""
    code = user_code(*(container(n) for n in nodes))
    if code:
        inputs["code"] = {**inputs.get("code", {}), **code}
    return inputs


def train_inputs(ctx: Context, role: str, optimizer: str, scheduler: str, budget: DictConfig
                 ) -> dict[str, Any]:
    """Everything that determines a trained model, besides its loss, teacher and init."""
    cfg = ctx.cfg
    return with_code({
        "version": STAGE_VERSION, "model": container(cfg[role]), "dataset": dataset_inputs(ctx),
        "optimizer": container(cfg[optimizer]), "scheduler": container(cfg[scheduler]),
        "budget": {"epochs": int(budget.epochs), "batch_size": int(budget.batch_size)},
        "seed": int(cfg.seed),
        "deterministic": bool(cfg.deterministic), "precision": ctx.runtime.precision,
    }, cfg[role], cfg[optimizer], cfg[scheduler])


def load_weights(model: nn.Module, path: Path, hint: str = "") -> nn.Module:
    """Loads the model weights of a kd checkpoint into `model`. A file without weights, or
    weights of another architecture, is a ConfigError naming the first difference; `hint` (what
    to set instead) is appended to the latter."""
    state = checkpoint.load(path)
    if not isinstance(state.get("model"), dict):
        held = ", ".join(sorted(str(k) for k in state if k != "format")) or "nothing"
        raise ConfigError(f"checkpoint {path} holds no model weights (it has: {held}); give a "
                          "model checkpoint (best.pt or last.pt)")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        why = state_dict_mismatch(model.state_dict(), state["model"])
        raise ConfigError(f"checkpoint {path} does not fit this architecture: "
                          f"{why or str(exc).splitlines()[0]}" + (f"; {hint}" if hint else "")
                          ) from exc
    return model


def load_entry_weights(model: nn.Module, entry: Entry) -> nn.Module:
    """`load_weights` from a store entry's last.pt. Weights that do not fit mean the model's
    code changed since the entry was built in a way its key does not see (a module imported by
    a name in a string, a data file it reads, an installed package): the error says how to
    retrain."""
    return load_weights(model, entry.file("last.pt"), hint=(
        f"the store entry was built from other code for this model (its key holds your files "
        f"that the model's file imports, not modules imported by a name in a string, files it "
        f"reads or installed packages): delete {entry.path} (or set store= to another folder) "
        f"to retrain it"))


def state_dict_mismatch(own: dict[str, torch.Tensor], other: dict[str, Any]) -> str:
    """What keeps `other` (a checkpoint's state dict) from loading into a model whose state dict
    is `own`: its missing and unexpected keys and shape mismatches, the first of each named."""
    def first(names: list[str], what: str) -> list[str]:
        more = f" (+{len(names) - 1} more)" if len(names) > 1 else ""
        return [f"{what} {names[0]}{more}"] if names else []

    missing = [k for k in own if k not in other]
    unexpected = [k for k in other if k not in own]
    sizes = [f"{k}: checkpoint {tuple(other[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in other and hasattr(other[k], "shape")
             and tuple(other[k].shape) != tuple(own[k].shape)]
    return "; ".join(first(sizes, "size mismatch for")
                     + first(missing, "missing from the checkpoint:")
                     + first(unexpected, "not in the model:"))


def resumable(path: Path) -> bool:
    """True when `path` is a readable checkpoint to resume from. A damaged one (a crash while
    the disk filled, a bit flip) is moved aside to `<name>.corrupt` and training starts over."""
    if not path.exists():
        return False
    try:
        checkpoint.load(path)
        return True
    except CorruptArtifact as exc:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        log.warning("%s; moved it to %s and starting this stage over", exc, aside)
        return False


def weights_id(meta: dict[str, Any]) -> str:
    """What a model's weights are keyed by downstream (the cache, a feature-loss student): the
    sha256 of its final weights (`checkpoint.weights_sha256`); for an entry written before kd
    recorded that, the sha256 of its `last.pt` file, so the keys built on it stay."""
    return meta.get("weights_sha256") or meta["files"]["last.pt"]


def reuse_if_valid(entry: Entry) -> dict[str, Any] | None:
    """Returns the entry's meta when it is complete and intact; a damaged one is rebuilt."""
    if not entry.complete:
        return None
    try:
        meta = entry.verify()
    except CorruptArtifact as exc:
        try:
            entry.invalidate()
        except OSError as why:  # a read-only store: it can be neither set aside nor rebuilt
            raise CorruptArtifact(f"{exc}; cannot set it aside to rebuild it ({why.strerror}): "
                                  "repair the store, or set store= to another folder") from why
        log.warning("%s; rebuilding %s", exc, entry.path)
        return None
    entry.mark_used()
    return meta


def train_entry(ctx: Context, entry: Entry, *, role: str, loss_fn: DistillationLoss,
                optimizer: str, scheduler: str, budget: DictConfig, label: str,
                teacher: engine.TeacherFn = engine.no_teacher,
                initialize: Callable[[nn.Module], dict[str, Any]] | None = None,
                views: ViewTable | None = None) -> dict[str, Any]:
    """Trains the `role` model into `entry`, or reuses/resumes it. Returns status and meta.

    `budget` has `epochs` and `batch_size`; `initialize(model)` (e.g. weights from the teacher
    or a pretraining stage) runs on the fresh model and returns what it did, for the meta.
    `views` makes the training loader replay the cached augmented views.
    """
    # Under torchrun rank 0 holds the lock and decides (reuse, resume, train) for every rank.
    with main_lock(entry):
        meta = distributed.on_main(lambda: reuse_if_valid(entry))
        if meta is not None:
            log.info("%s: reusing %s (top-1 %.2f%%)", label, entry.path, meta["metrics"]["top1"])
            return {"status": REUSED, "entry": entry, "meta": meta}
        status = distributed.on_main(
            lambda: RESUMED if resumable(entry.file("last.pt")) else TRAINED)
        torch.manual_seed(int(ctx.cfg.seed))  # same init whatever ran before in this process
        model = build_model(ctx, role)
        init_info = initialize(model) if initialize is not None else {}
        tcfg = budget
        train_loader = ctx.loader("train", int(tcfg.batch_size), train=True, views=views)
        taps = setup_feature_loss(ctx, model, loss_fn, teacher, train_loader)
        inject_nan_for_tests(loss_fn, label)
        # A loss may own parameters (a FitNets adapter): they train with the student.
        params = list(model.parameters()) + list(loss_fn.parameters())
        opt, sched = build_optimization(ctx, params, optimizer, scheduler, int(tcfg.epochs),
                                        len(train_loader))
        # Rank 0 alone evaluates: the other ranks keep no copy of the evaluation splits. Each
        # epoch is evaluated, and best.pt chosen, on the validation split when there is one;
        # the final metrics are the test split's either way.
        split = ctx.selection_split
        val_loader = ctx.eval_loader(split) if distributed.is_main() else None
        log.info("%s: %s %s (%s, best.pt by %s top-1) -> %s", label,
                 "resuming" if status == RESUMED else "training", ctx.choice(role),
                 plural(int(tcfg.epochs), "epoch"), split, entry.path)
        result = engine.fit(
            model=model, train_loader=train_loader, val_loader=val_loader, val_split=split,
            loss_fn=loss_fn, optimizer=opt, scheduler=sched, runtime=ctx.runtime,
            epochs=int(tcfg.epochs), out_dir=entry.path, teacher=teacher, label=label,
            student_taps=taps,
            nan_retries=int(ctx.cfg.trainer.get("nan_retries", 0)),
            nan_lr_factor=float(ctx.cfg.trainer.get("nan_lr_factor", 0.5)),
            on_row=tensorboard.epoch_callback(ctx.run_dir, label, bool(OmegaConf.select(
                ctx.cfg, "logging.tensorboard", default=False))),
        )
        def finish() -> dict[str, Any]:
            test_loader = val_loader if split == "test" else ctx.eval_loader("test")
            logits, labels = engine.predict(model, test_loader, ctx.runtime)
            checkpoint.save({"logits": logits, "labels": labels}, entry.file("test_logits.pt"))
            metrics = classification_metrics(logits, labels, name=label)
            if split == "val" and result.history:  # the final weights' score on the split
                metrics["val_top1"] = result.history[-1].get("val/top1")  # that chooses settings
            log.info("%s: test top-1 %.2f%% (%s)", label, metrics["top1"], status)
            return entry.finish(
                ["last.pt", "best.pt", "metrics.csv", "test_logits.pt"],
                {"name": ctx.choice(role), "metrics": metrics,
                 "train_time_s": result.train_time_s, "images_per_s": result.images_per_s,
                 "epochs": int(tcfg.epochs), "init": init_info,
                 "ranks": distributed.world_size(),
                 "weights_sha256": checkpoint.weights_sha256(
                     checkpoint.load(entry.file("last.pt"))["model"])},
            )

        meta = distributed.on_main(finish)
        return {"status": status, "entry": entry, "meta": meta}


def plural(n: int, noun: str) -> str:
    """`1 epoch`, `3 epochs`: the log read "1 epochs"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


@contextlib.contextmanager
def main_lock(entry: Entry) -> Iterator[None]:
    """The entry's store lock, taken by rank 0 only: the other ranks follow its decisions (they
    must not queue on the lock while rank 0 waits for them inside a collective)."""
    if distributed.is_main():
        with entry.lock():
            yield
    else:
        yield


def inject_nan_for_tests(loss_fn: DistillationLoss, label: str) -> None:
    """Test-only fault hook: KD_TEST_NAN_AT="<stage>:<step>" turns the loss of that stage's
    n-th training step (counted from this process's start of the stage) into NaN."""
    spec = os.environ.get("KD_TEST_NAN_AT")
    if not spec:
        return
    stage, step = spec.rsplit(":", 1)
    if not label.startswith(stage):
        return
    calls = itertools.count()

    def hook(module: nn.Module, args: object, output: dict) -> dict | None:
        if next(calls) == int(step):
            return {**output, "loss": output["loss"] * float("nan")}
        return None

    loss_fn.register_forward_hook(hook)


def setup_feature_loss(ctx: Context, model: nn.Module, loss_fn: DistillationLoss,
                       teacher: engine.TeacherFn, loader: BatchLoader) -> FeatureTap | None:
    """For a feature loss: taps the student's layers and lets the loss size its learned parts
    from one probe batch (no grad, eval mode, so BatchNorm statistics are untouched)."""
    loss_fn.to(ctx.runtime.device)
    if not loss_fn.needs_features:
        return None
    taps = FeatureTap(model, list(loss_fn.student_layers), role=ctx.selected("student"))
    probe = next(iter(loader.epoch(0)))
    model.eval()
    with torch.no_grad(), ctx.runtime.autocast():
        student_out = Outputs(model(probe.images), taps.pop())
        teacher_out = teacher(probe)
    model.train()
    if teacher_out is None:
        raise ConfigError(f"loss={ctx.choice('loss')} reads teacher features but no live teacher "
                          "was given")
    loss_fn.setup(student_out, teacher_out)
    loss_fn.to(ctx.runtime.device)
    return taps


def publish(entry: Entry, run_dir: Path, stage: str, files: tuple[str, ...] = ("best.pt",
            "last.pt")) -> None:
    """Links a store entry's checkpoints and metrics into the run folder (copy if no links),
    each checkpoint with its `.sha256` sidecar: `checkpoint.load` then catches a damaged copy in
    the run folder too (what `kd export` and `kd eval` read)."""
    dest = run_dir / "checkpoints" / stage
    dest.mkdir(parents=True, exist_ok=True)
    for name in files:
        _link(entry.file(name), dest / name)
        sidecar = entry.file(f"{name}.sha256")
        if sidecar.exists():
            _link(sidecar, dest / sidecar.name)
        else:  # an entry from before sidecars: an earlier run's must not judge this file
            (dest / sidecar.name).unlink(missing_ok=True)
    if entry.file("metrics.csv").exists():
        (run_dir / "metrics").mkdir(exist_ok=True)
        _link(entry.file("metrics.csv"), run_dir / "metrics" / f"{stage}.csv")


def _link(src: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
