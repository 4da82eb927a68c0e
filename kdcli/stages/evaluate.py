"""`kd eval`: evaluate a checkpoint on a dataset split and write eval.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdcli import distributed, engine
from kdcli.checkpoint import atomic_write_text
from kdcli.errors import ConfigError
from kdcli.metrics import classification_metrics, profile_model, time_models
from kdcli.report import to_jsonable
from kdcli.stages.common import build_context, build_model, load_weights

log = logging.getLogger(__name__)


def main(cfg) -> dict[str, Any]:
    if cfg.arch not in ("student", "teacher"):
        raise ConfigError(f"arch={cfg.arch!r}; choose student or teacher")
    if cfg.split not in ("train", "val", "test"):
        raise ConfigError(f"split={cfg.split!r}; choose test, train or val (the split "
                          "dataset.val_size holds out of train)")
    path = Path(str(cfg.checkpoint)).expanduser()
    warn_if_not_as_run(cfg, path)
    ctx = build_context(cfg)
    loaded = ctx.selected(cfg.arch)
    trained = as_trained(path)
    if trained is not None and trained[1] != loaded:
        # `arch` too: `teacher=resnet20` alone still loads the student's model (F2 of a review).
        arch = trained[1].split("=", 1)[0].split(".", 1)[0]
        fix = f"the run {trained[0]} trained it as {trained[1]}: set arch={arch} {trained[1]}"
    else:
        fix = ("set arch= and student=/teacher= (student._target_= for a model of your own) to "
               "the model the checkpoint was trained as")
    hint = f"it was loaded as arch={cfg.arch} {loaded}; {fix}"
    model = load_weights(build_model(ctx, cfg.arch), path, hint)
    logits, labels = engine.predict(model, ctx.eval_loader(cfg.split), ctx.runtime)
    # Timed as kd train's report times (one thread on a busy machine), so the figures compare.
    timed, policy = time_models([model], ctx.dataset.image_shape)
    result = {"checkpoint": str(path), "arch": ctx.choice(cfg.arch), "split": cfg.split,
              "dataset": ctx.dataset.name, **classification_metrics(logits, labels, name=str(path)),
              **profile_model(model.float(), ctx.dataset.image_shape),
              "latency_ms": timed.median_ms[0], "latency_min_ms": timed.min_ms[0],
              "latency": policy.record()}
    if distributed.is_main():
        atomic_write_text(ctx.run_dir / "eval.json", json.dumps(to_jsonable(result), indent=2))
    top5 = result["top5"]
    log.info("eval %s on %s/%s: top-1 %.2f%%  top-5 %s  macro-F1 %.2f  latency %.2f ms (CPU "
             "fp32 batch 1, %s)", path, ctx.dataset.name, cfg.split, result["top1"],
             "— (5 classes or fewer)" if top5 is None else f"{top5:.2f}%", result["macro_f1"],
             result["latency_ms"], policy.describe())
    return result


# What decides the figures report.md shows for a checkpoint, besides the weights.
_AS_RUN = ("dataset", "seed", "device.precision")


def warn_if_not_as_run(cfg: DictConfig, path: Path) -> None:
    """A checkpoint in a run folder (`<run>/checkpoints/<stage>/<file>.pt`) is evaluated with this
    command's settings, not the run's: says which of those that decide the figures (the dataset,
    its subset's seed, the precision, the model) differ, and the run's overrides, which
    reproduce report.md's figures when given to `kd eval` too."""
    if path.parent.parent.name != "checkpoints":
        return
    run = path.parent.parent.parent
    try:
        theirs = OmegaConf.load(run / ".hydra" / "config.yaml")
        overrides = list(OmegaConf.load(run / ".hydra" / "overrides.yaml"))
    except Exception:  # noqa: BLE001 - not a kd run folder, or a damaged one: nothing to compare
        return
    stage = path.parent.name
    model = "teacher" if stage == "teacher" else "student" if stage in (
        "student", "baseline") else None  # `teacher-<name>`: the run config has their merge
    keys = [*_AS_RUN, *([model] if model else [])]
    differ = [key for key in keys if _plain(OmegaConf.select(cfg, key)) !=
              _plain(OmegaConf.select(theirs, key))]
    if differ:
        log.warning("eval: %s differ%s from the run %s, so the figures will not be report.md's; "
                    "its overrides were: %s", ", ".join(differ), "s" if len(differ) == 1 else "",
                    run, " ".join(map(str, overrides)) or "none")


def as_trained(path: Path) -> tuple[Path, str] | None:
    """The run folder a checkpoint lies in (`<run>/checkpoints/<stage>/<file>.pt`) and how that
    run selected the checkpoint's model, as `Context.selected` writes it: `student=resnet8`, or
    `student._target_=mynets.small_net` for a target of the user's own. None outside a kd run
    folder, and for `teacher-<name>` stages (the run config holds their merge)."""
    from kdcli.stages.common import option_target, overriding, selection

    if path.parent.parent.name != "checkpoints":
        return None
    run, stage = path.parent.parent.parent, path.parent.name
    group = "teacher" if stage == "teacher" else "student" if stage in (
        "student", "baseline") else None
    try:
        theirs = OmegaConf.load(run / ".hydra" / "config.yaml")
        choices = OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.runtime.choices
    except Exception:  # noqa: BLE001 - not a kd run folder, or a damaged one
        return None
    option = choices.get(group) if group else None
    if option is None:
        return None
    target = overriding(OmegaConf.select(theirs, f"{group}._target_", default=None),
                        option_target(group, str(option)))
    return run, selection(group, str(option), target)


def _plain(node: Any) -> Any:
    """A config value as plain Python, interpolations as written (both configs hold the same)."""
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
