"""`kd eval`: evaluate a checkpoint on a dataset split and write eval.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kdcli import distributed, engine
from kdcli.checkpoint import atomic_write_text
from kdcli.errors import ConfigError
from kdcli.metrics import classification_metrics, profile_model
from kdcli.report import to_jsonable
from kdcli.stages.common import build_context, build_model, load_weights

log = logging.getLogger(__name__)


def main(cfg) -> dict[str, Any]:
    if cfg.arch not in ("student", "teacher"):
        raise ConfigError(f"arch={cfg.arch!r}; choose student or teacher")
    if cfg.split not in ("train", "val", "test"):
        raise ConfigError(f"split={cfg.split!r}; choose test, train or val (the split "
                          "dataset.val_size holds out of train)")
    ctx = build_context(cfg)
    path = Path(str(cfg.checkpoint)).expanduser()
    hint = (f"it was loaded as arch={cfg.arch} {cfg.arch}={ctx.choice(cfg.arch)}; set arch= and "
            "student=/teacher= to the model the checkpoint was trained as")
    model = load_weights(build_model(ctx, cfg.arch), path, hint)
    logits, labels = engine.predict(model, ctx.eval_loader(cfg.split), ctx.runtime)
    result = {"checkpoint": str(path), "arch": ctx.choice(cfg.arch), "split": cfg.split,
              "dataset": ctx.dataset.name, **classification_metrics(logits, labels, name=str(path)),
              **profile_model(model.float(), ctx.dataset.image_shape)}
    if distributed.is_main():
        atomic_write_text(ctx.run_dir / "eval.json", json.dumps(to_jsonable(result), indent=2))
    top5 = result["top5"]
    log.info("eval %s on %s/%s: top-1 %.2f%%  top-5 %s  macro-F1 %.2f", path,
             ctx.dataset.name, cfg.split, result["top1"],
             "— (5 classes or fewer)" if top5 is None else f"{top5:.2f}%", result["macro_f1"])
    return result
