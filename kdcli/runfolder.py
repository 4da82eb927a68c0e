"""A run folder that already holds an earlier run: its outputs are set aside, not mixed in.

A run started in a folder that holds a finished or failed run (`hydra.run.dir=` given twice, a
sweep run again into its folder) would otherwise mix the two: the earlier baseline's
checkpoints and learning curve in the new report, an export of a student that is no longer the
one trained, a failed job listed with the metrics of the run before it. Nothing is deleted:
the earlier outputs, its `.hydra/` config included (so `kd export` still reads it), move into
`earlier-<time>/` inside the folder. The log stays and is appended to.

Folders of stage-by-stage runs (`kd teacher`, then `kd student` into the same folder) hold no
report or failure of their own and are left alone: the stages' outputs belong together.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

log = logging.getLogger(__name__)

REPORT = "report.json"
FAILED = "failed.json"  # written into a failed sweep job's folder
# What a run writes into its folder, its log aside.
OUTPUTS = (".hydra", "checkpoints", "metrics", "plots", "tensorboard", REPORT, "report.md",
           "export", FAILED, "eval.json", "summary.md", "summary.csv")
# The folders the earlier outputs go to: `earlier-20261124-031500`, `...+` if taken.
EARLIER = re.compile(r"earlier-\d{8}-\d{6}\+*")


def holds_a_run(folder: Path) -> bool:
    return (folder / REPORT).is_file() or (folder / FAILED).is_file()


def set_aside_earlier_run(folder: Path) -> Path | None:
    """Moves an earlier run's outputs in `folder` into `folder/earlier-<time>/`; returns that
    folder, or None when `folder` holds no finished or failed run."""
    if not holds_a_run(folder):
        return None
    found = [folder / name for name in OUTPUTS if (folder / name).exists()]
    newest = max(p.stat().st_mtime for p in found)
    dest = folder / f"earlier-{time.strftime('%Y%m%d-%H%M%S', time.localtime(newest))}"
    while dest.exists():
        dest = dest.with_name(dest.name + "+")
    dest.mkdir()
    for path in found:
        path.rename(dest / path.name)
    log.warning("%s held the outputs of an earlier run (%s): moved to %s", folder,
                ", ".join(p.name for p in found), dest)
    return dest
