"""A run's report: ``report.json`` for machines, ``report.md`` plus PNG plots for people.

The report dict has the blocks ``kd_version``, ``versions``, ``wall_time_s``, ``dataset``,
``teacher`` and ``student`` (metrics in percent plus ``profile_model`` costs and
``train_time_s``; the student's ``init`` says where it started), ``baseline`` (the student
architecture trained without KD from the same start, its ``init``), ``pretrain`` (the
pretraining stage's set, image counts and top-1; missing without pretraining),
``compression`` (see :func:`compression`), ``distillation_gain``, ``cache`` (soft-label cache
footprint; ``None`` when the loss reads no cached logits), ``stages`` (stage ->
trained/reused/resumed, or "not needed" for a cache nothing reads), ``best_pt`` (the split each
epoch was evaluated on and ``best.pt`` chosen by: ``{"split": "val" or "test", "images": N}``;
missing in reports from before ``dataset.val_size``, which read as the test split) and
``config`` (resolved, plain dict).
Any block of the report dict may be missing or ``None`` when its stage did not run; the writer
renders what is there and says "—" for the rest instead of failing at the end of a long run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from kdcli.checkpoint import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["baseline_start", "compression", "format_bytes", "format_count", "student_warning",
           "teacher_warning", "to_jsonable", "write_report"]

PLOTS_DIR = "plots"
_DASH = "—"
_STAGE_ORDER = ("teacher", "student", "baseline")
_CURVES = ("train/loss", "val/top1")
_STAGE_LABELS = {"teacher": "teacher", "baseline": "from scratch", "student": "distilled student"}
# One colour per role in every plot, so the student is the same green in curves and bars.
_STAGE_COLORS = {"teacher": "#4c72b0", "baseline": "#dd8452", "student": "#55a868"}
# kd's FLOPs count a multiply-add as 2; KD papers' "FLOPs" are often MACs (report.json: macs).
FLOPS_LABEL = "FLOPs (2 × multiply-adds)"


# --------------------------------------------------------------------------- formatting helpers


def format_count(n: float | None) -> str:
    """Human-readable count: ``272474 -> "0.27M"``, ``40.8e6 -> "40.8M"``, ``55 -> "55"``.

    Counts from 100K up are given in M (as KD papers quote parameters), from 1e9 in G.
    """
    if n is None or not _is_finite(n):
        return _DASH
    n = float(n)
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e5), ("K", 1e3)):
        if abs(n) >= scale:
            # "M" starts at 1e5 so small models read 0.27M rather than 272.5K.
            value = n / (1e6 if unit == "M" else scale)
            return f"{_trim(value)}{unit}"
    return f"{n:.0f}" if n == int(n) else f"{n:.2f}"


def format_bytes(n: float | None) -> str:
    """Human-readable size in binary units: ``512 -> "512 B"``, ``1536 -> "1.5 KiB"``."""
    if n is None or not _is_finite(n):
        return _DASH
    n = float(n)
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{_trim(n / scale)} {unit}"
    return f"{n:.0f} B"


def _trim(value: float) -> str:
    """Two decimals below 1, one below 100, none above: ``0.27``, ``40.8``, ``125``."""
    if abs(value) < 1:
        return f"{value:.2f}"
    if abs(value) < 100:
        return f"{value:.1f}"
    return f"{value:.0f}"


def _is_finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _pct(x: Any, digits: int = 2) -> str:
    return f"{float(x):.{digits}f}" if _is_finite(x) else _DASH


def _ratio(x: Any) -> str:
    return f"{float(x):.1f}×" if _is_finite(x) else _DASH


def _threads(report: Mapping[str, Any]) -> str:
    n = report.get("latency_threads")
    return f" with {n} CPU thread{'' if n == 1 else 's'}" if isinstance(n, int) else ""


def _busy_note(report: Mapping[str, Any]) -> str:
    """A sentence saying the models were timed on a busy machine, when the report's `latency`
    block says so (`metrics.latency_policy`); "" otherwise, and for reports from before the
    check."""
    latency = _block(report, "latency")
    if not latency.get("busy"):
        return ""
    load, cpus = latency.get("other_load"), latency.get("cpus")
    where = (f" (other processes used {float(load):.1f} of {cpus} CPUs)" if _is_finite(load)
             else "")
    return (f" **Timed on a busy machine**{where}: the latencies are noisy, the speed-up (the "
            "ratio of the fastest calls) less so; multi-threaded PyTorch suffers most, hence "
            "the one thread.")


def _ms(x: Any) -> str:
    return f"{float(x):.2f}" if _is_finite(x) else _DASH


def _duration(seconds: Any) -> str:
    if not _is_finite(seconds):
        return _DASH
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _block(report: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``report[key]`` as a dict, ``{}`` when missing, ``None`` or not a mapping."""
    value = report.get(key)
    return dict(value) if isinstance(value, Mapping) else {}


def _config(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report's resolved config as a plain dict, ``{}`` when missing."""
    config = report.get("config")
    config = to_jsonable(config) if config is not None else {}
    return config if isinstance(config, dict) else {}


# --------------------------------------------------------------------------- the baseline's start

_SCRATCH = "from scratch"


def baseline_start(report: Mapping[str, Any]) -> str:
    """What the baseline, like the student, started from, as the report labels it: "from
    scratch", "teacher init" (``student.init=from_teacher``) or "pretrained on cifar10"
    (``pretrain.dataset``). Read from the baseline's ``init``, else the student's (the baseline
    always starts like the student); a report with neither is from scratch."""
    init = _block(report, "baseline").get("init") or _block(report, "student").get("init")
    init = str(init or "scratch")
    if init == "scratch":
        return _SCRATCH
    if "from_teacher" in init:
        return "teacher init"
    if "pretraining" in init:
        pretrain = _config(report).get("pretrain")
        dataset = _block(report, "pretrain").get("dataset") or (
            pretrain.get("dataset") if isinstance(pretrain, Mapping) else None)
        return f"pretrained on {dataset}" if dataset else "pretrained"
    return init


def _baseline_how(report: Mapping[str, Any]) -> str:
    """The baseline's start as words after "trained": "from scratch", "from the teacher's
    weights", "pretrained on cifar10"."""
    start = baseline_start(report)
    return "from the teacher's weights" if start == "teacher init" else start


def _baseline_label(report: Mapping[str, Any]) -> str:
    """The baseline in plots: "from scratch", else "baseline (teacher init)" and the like."""
    start = baseline_start(report)
    return start if start == _SCRATCH else f"baseline ({start})"


# --------------------------------------------------------------------------- data


def compression(teacher_profile: Mapping[str, Any], student_profile: Mapping[str, Any]) -> dict:
    """Teacher-over-student ratios of params, size and FLOPs, and the latency speed-up.

    Args:
        teacher_profile: ``profile_model`` output (``params``, ``flops``, ``size_bytes``,
            ``latency_ms``, and ``latency_min_ms`` where timed with the student) for the
            teacher; extra keys are ignored.
        student_profile: The same for the student.

    Returns:
        ``{"params_ratio", "size_ratio", "flops_ratio", "latency_speedup"}``; an entry is
        ``None`` when either side is missing or the student's value is zero. The speed-up is
        the ratio of the fastest calls where both have one, else of the medians.
    """

    def ratio(key: str) -> float | None:
        t, s = teacher_profile.get(key), student_profile.get(key)
        if not (_is_finite(t) and _is_finite(s)) or float(s) == 0:
            return None
        return float(t) / float(s)

    # The fastest calls when both were timed together (`Latencies`): medians swing with the
    # machine's load, and unequally for a long and a short model.
    both = all(_is_finite(p.get("latency_min_ms")) for p in (teacher_profile, student_profile))
    return {
        "params_ratio": ratio("params"),
        "size_ratio": ratio("size_bytes"),
        "flops_ratio": ratio("flops"),
        "latency_speedup": ratio("latency_min_ms" if both else "latency_ms"),
    }


def to_jsonable(obj: Any) -> Any:
    """Converts tensors, numpy values, paths and OmegaConf nodes to plain JSON types.

    Non-finite floats become ``None`` so the file stays strict JSON that any parser reads.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Tensor):
        return to_jsonable(obj.item() if obj.numel() == 1 and obj.ndim == 0 else obj.tolist())
    if type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return to_jsonable(OmegaConf.to_container(obj, resolve=True))
    if hasattr(obj, "tolist") and type(obj).__module__ == "numpy":
        return to_jsonable(obj.tolist())  # numpy scalars and arrays
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


# --------------------------------------------------------------------------- plots


def _read_history(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """``{column: (epochs, values)}`` for ``train/loss`` and ``val/top1``; blanks are skipped."""
    curves: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in _CURVES}
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            epoch = _float_or_none(row.get("epoch"))
            epoch = float(i) if epoch is None else epoch  # no epoch column: use the row number
            for key, (xs, ys) in curves.items():
                value = _float_or_none(row.get(key))
                if value is not None:
                    xs.append(epoch)
                    ys.append(value)
    return curves


def _float_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _new_figure(width: float, height: float) -> Any:
    """A figure on the Agg canvas, without pyplot's global state or GUI backends."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write(path, lambda fh: fh.write(buffer.getvalue()))


def _curve_colors(stages: Any) -> dict[str, Any]:
    """Each stage's colour: its role's, and for a multi-teacher run's ``teacher-<name>`` stages
    shades of the teacher's (darker to lighter), so no teacher is drawn in a colour of
    matplotlib's default cycle, whose second is nearly the baseline's orange."""
    from matplotlib.colors import to_rgb

    colors: dict[str, Any] = {s: _STAGE_COLORS[s] for s in stages if s in _STAGE_COLORS}
    teachers = sorted(s for s in stages if s.startswith("teacher-"))
    base = to_rgb(_STAGE_COLORS["teacher"])
    for i, stage in enumerate(teachers):
        # -0.5 (halfway to black) .. +0.5 (halfway to white); one teacher keeps the colour.
        shade = 0.0 if len(teachers) == 1 else -0.5 + i / (len(teachers) - 1)
        target = 1.0 if shade > 0 else 0.0
        colors[stage] = tuple(c + abs(shade) * (target - c) for c in base)
    return colors


def _plot_training_curves(histories: Mapping[str, Path | str], path: Path,
                          split: str = "test", labels: Mapping[str, str] | None = None) -> bool:
    """Loss and per-epoch top-1 of each stage; `split`: what the top-1 was measured on;
    `labels`: legend entries by stage, over `_STAGE_LABELS`."""
    labels = {**_STAGE_LABELS, **(labels or {})}
    curves = {}
    for stage, csv_path in histories.items():
        try:
            curves[stage] = _read_history(Path(csv_path))
        except OSError as exc:
            log.warning("Skipping the %s history in the report plots: %s", stage, exc)
    if not any(xs for c in curves.values() for xs, _ in c.values()):
        return False

    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(10, 4)
    axes = dict(zip(_CURVES, fig.subplots(1, 2), strict=True))
    colors = _curve_colors(curves)
    for stage in sorted(curves, key=lambda s: (*_STAGE_ORDER, s).index(s)):
        for key, (xs, ys) in curves[stage].items():
            if xs:
                axes[key].plot(
                    xs,
                    ys,
                    marker=".",
                    label=labels.get(stage, stage),
                    color=colors.get(stage),
                )
    axes["train/loss"].set(title="Training loss", xlabel="epoch", ylabel="train/loss")
    measured = "Validation" if split == "val" else "Test"
    axes["val/top1"].set(title=f"{measured} top-1 per epoch", xlabel="epoch",
                         ylabel=f"{measured.lower()} top-1 (%)")
    for ax in axes.values():
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    _save_figure(fig, path)
    return True


def _plot_accuracy_vs_params(rows: list[tuple[str, str, Any, Any]], path: Path) -> bool:
    """Bars of top-1 per model, labelled with each model's parameter count.

    ``rows`` holds ``(role, label, top1, params)``; models without a top-1 are left out.
    """
    rows = [r for r in rows if _is_finite(r[2])]
    if not rows:
        return False
    fig = _new_figure(6, 4)
    ax = fig.subplots()
    labels = [f"{label}\n{format_count(params)} params" for _, label, _, params in rows]
    values = [float(top1) for _, _, top1, _ in rows]
    bars = ax.bar(labels, values, color=[_STAGE_COLORS.get(role) for role, *_ in rows])
    ax.bar_label(bars, labels=[f"{v:.1f}%" for v in values], padding=2)
    ax.set(title="Top-1 accuracy against model size", ylabel="top-1 (%)")
    ax.set_ylim(0, max(100.0, max(values) * 1.1))
    ax.grid(axis="y", alpha=0.3)
    _save_figure(fig, path)
    return True


# Above this many classes the confusion matrix labels every k-th class only: all of them
# overlapped into a solid band at 100 classes.
_MAX_CLASS_LABELS = 30


def _plot_confusion(confusion: Tensor, class_names: list[str] | None, path: Path) -> bool:
    from matplotlib.ticker import MaxNLocator

    matrix = confusion.detach().cpu().long().numpy()
    n = matrix.shape[0]
    names = (
        list(class_names) if class_names and len(class_names) == n else [str(i) for i in range(n)]
    )
    size = max(4.0, min(14.0, 0.5 * n + 2))
    fig = _new_figure(size + 1, size)
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    # Counts are whole samples: no 0.25, 1.25, ... ticks on the colour bar.
    fig.colorbar(image, ax=ax, shrink=0.8, label="samples", ticks=MaxNLocator(integer=True))
    step = -(-n // _MAX_CLASS_LABELS)  # ceil: at most _MAX_CLASS_LABELS labels per axis
    ticks = range(0, n, step)
    labels = [names[i] if step == 1 else f"{i}: {names[i]}" for i in ticks]
    ax.set_xticks(ticks, labels, rotation=45 if step == 1 else 90,
                  ha="right" if step == 1 else "center")
    ax.set_yticks(ticks, labels)
    every = "" if step == 1 else f" (one label per {step} classes)"
    ax.set(title="Confusion matrix (distilled student)", xlabel=f"predicted class{every}",
           ylabel=f"true class{every}")
    if n <= 20:  # beyond this the numbers overlap and the colours carry the message
        threshold = matrix.max() / 2 if matrix.size else 0
        for i in range(n):
            for j in range(n):
                color = "white" if matrix[i, j] > threshold else "black"
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color, fontsize=8)
    _save_figure(fig, path)
    return True


def _make_plots(
    report: Mapping[str, Any],
    run_dir: Path,
    histories: Mapping[str, Path | str] | None,
    confusion: Tensor | None,
    class_names: list[str] | None,
) -> dict[str, str]:
    """Draws every plot it can; returns ``{plot name: path relative to run_dir}``.

    A failing plot (no matplotlib, bad CSV, ...) is logged and skipped: the report matters
    more than any one picture.
    """
    try:
        import matplotlib  # noqa: F401  (fail early and once if it is not installed)
    except Exception as exc:  # noqa: BLE001
        log.warning("matplotlib unavailable, writing the report without plots: %s", exc)
        return {}

    teacher, student = _block(report, "teacher"), _block(report, "student")
    baseline = _block(report, "baseline")
    bar_rows = [
        (
            "teacher",
            f"teacher\n{teacher.get('name', '')}",
            teacher.get("top1"),
            teacher.get("params"),
        ),
        # The baseline is the student architecture, so it has the student's parameter count.
        (
            "baseline",
            _baseline_label(report).replace(" (", "\n(", 1),
            baseline.get("top1"),
            baseline.get("params", student.get("params")),
        ),
        (
            "student",
            f"distilled\n{student.get('name', '')}",
            student.get("top1"),
            student.get("params"),
        ),
    ]

    jobs: dict[str, Callable[[Path], bool]] = {
        "accuracy_vs_params": lambda p: _plot_accuracy_vs_params(bar_rows, p)
    }
    if histories:
        split = _block(report, "best_pt").get("split", "test")
        labels = {"baseline": _baseline_label(report)}
        jobs["training_curves"] = lambda p: _plot_training_curves(histories, p, split, labels)
    if confusion is not None:
        jobs["confusion_matrix"] = lambda p: _plot_confusion(confusion, class_names, p)

    made: dict[str, str] = {}
    for name, job in jobs.items():
        rel = f"{PLOTS_DIR}/{name}.png"
        try:
            if job(run_dir / rel):
                made[name] = rel
        except Exception as exc:  # noqa: BLE001
            log.warning("Could not draw the %s plot: %s", name, exc)
    return made


# --------------------------------------------------------------------------- markdown


def _summary(report: Mapping[str, Any]) -> str:
    teacher, student = _block(report, "teacher"), _block(report, "student")
    baseline, comp = _block(report, "baseline"), _block(report, "compression")
    if not _is_finite(student.get("top1")):
        if student:  # evaluated, but its logits were not finite (an overflow): metrics NaN
            return (f"The distilled student ({student.get('name', 'student')}) gave non-finite "
                    "test logits (NaN/inf: see the log), so it has no accuracy; its metrics are "
                    "left out.")
        if _is_finite(teacher.get("top1")):
            return (
                f"No distilled student was evaluated in this run; the teacher "
                f"({teacher.get('name', 'teacher')}) reaches {_pct(teacher['top1'], 1)}% top-1."
            )
        return "No evaluated model in this run."

    s_top1 = float(student["top1"])
    text = f"The distilled student ({student.get('name', 'student')}) reaches {s_top1:.1f}% top-1"
    against = []
    if _is_finite(baseline.get("top1")):
        gain = _block(report, "distillation_gain").get("top1")
        gain = float(gain) if _is_finite(gain) else s_top1 - float(baseline["top1"])
        how = _baseline_how(report)
        against.append(f"{float(baseline['top1']):.1f}% "
                       f"{how if how == _SCRATCH else 'for the baseline ' + how} "
                       f"({gain:+.1f} points)")
    if _is_finite(teacher.get("top1")):
        against.append(f"{float(teacher['top1']):.1f}% for the teacher")
    if against:
        text += " vs " + " and ".join(against)

    costs = []
    params_ratio, speedup = comp.get("params_ratio"), comp.get("latency_speedup")
    if _is_finite(params_ratio) and float(params_ratio) > 0:
        costs.append(_times(float(params_ratio), "fewer parameters", "more parameters",
                            "as many parameters"))
    if _is_finite(speedup) and float(speedup) > 0:
        costs.append(_times(float(speedup), "lower latency", "higher latency",
                            "about the same latency"))
    if costs:
        text += ", with " + " and ".join(costs)
    return text + "."


def _two_standard_errors(p: float, n: Any) -> float:
    """Two standard errors, in points, of an accuracy `p` (0..1) measured on `n` images (2
    points when the count is unknown): 4.9 points at chance on 150 images of 10 classes, 1.9
    on 1,000."""
    return 200.0 * math.sqrt(p * (1 - p) / n) if _is_finite(n) and n > 0 else 2.0


def _at_chance(model: Mapping[str, Any], report: Mapping[str, Any]) -> str | None:
    """"10.7% test top-1 on 10 classes, where guessing gets 10.0%" when the model's top-1 on
    the larger of its test and validation splits (test when the sizes are unknown or equal) is
    within two standard errors of chance (1/classes); else None. One split decides: a 64-image
    validation split put a student "at chance" whose test top-1 on 256 images was well above."""
    dataset = _block(report, "dataset")
    classes = dataset.get("num_classes")
    if not (isinstance(classes, int) and classes > 1):
        return None
    chance = 100.0 / classes
    splits = [(key, dataset.get(size_key), split)
              for key, size_key, split in (("top1", "test_size", "test"),
                                           ("val_top1", "val_size", "validation"))
              if _is_finite(model.get(key))]
    if not splits:
        return None
    key, n, split = max(splits, key=lambda s: s[1] if _is_finite(s[1]) else 0)  # test on ties
    top1 = float(model[key])
    if top1 <= chance + _two_standard_errors(1.0 / classes, n):
        return f"{top1:.1f}% {split} top-1 on {classes} classes, where guessing gets {chance:.1f}%"
    return None


def teacher_warning(report: Mapping[str, Any]) -> str | None:
    """Says so when the teacher has nothing to teach: its top-1 within two standard errors of
    chance (1/classes, on the larger evaluation split: `_at_chance`), or below the baseline's.
    A review's teacher read 10.67% on 10 classes, under the baseline's 15.33%, and the report's
    first sentence still read as a distillation result. None when the teacher is fine or
    unknown."""
    teacher, baseline = _block(report, "teacher"), _block(report, "baseline")
    if not _is_finite(teacher.get("top1")):
        return None
    name = f"teacher ({teacher['name']})" if teacher.get("name") else "teacher"
    if (chance := _at_chance(teacher, report)) is not None:
        return (f"The {name} is at chance: {chance}. Distilling from it teaches nothing; train "
                "it longer or check its data and labels.")
    if _is_finite(baseline.get("top1")) and float(teacher["top1"]) < float(baseline["top1"]):
        how = _baseline_how(report)
        than = ("the student trained from scratch" if how == _SCRATCH else
                f"the baseline (the student trained on hard labels, {how})")
        return (f"The {name} is worse than {than}: "
                f"{float(teacher['top1']):.1f}% against {float(baseline['top1']):.1f}% test "
                "top-1. Distilling from it is unlikely to help; train it longer or pick a stronger "
                "one.")
    return None


def student_warning(report: Mapping[str, Any]) -> str | None:
    """Says so when distillation broke the student: its top-1 within two standard errors of
    chance (on the larger evaluation split: `_at_chance`), or below the baseline's by more than
    two standard errors (of the baseline's accuracy on the test images). A review's FitNets
    student read 8.6% on 10 classes against the baseline's 17.6%, agreeing with its teacher on
    2% of the images, and the report gave only the numbers. None when the student is fine or
    unknown."""
    student, baseline = _block(report, "student"), _block(report, "baseline")
    if not _is_finite(student.get("top1")):
        return None
    name = f"distilled student ({student['name']})" if student.get("name") else \
        "distilled student"
    weights = [f"loss.{k}" for k, v in (_config(report).get("loss") or {}).items()
               if str(k).endswith("_weight") and k != "ce_weight" and _is_finite(v)]
    advice = (f"lower {' or '.join(weights) if weights else 'the distillation loss weight'}, "
              "or train it for more epochs (trainer.student.epochs)")
    chance = _at_chance(student, report)
    below = None  # "(4.8 points on 256 images)" when more than that under the baseline
    if _is_finite(baseline.get("top1")):
        s_top1, b_top1 = float(student["top1"]), float(baseline["top1"])
        n = _block(report, "dataset").get("test_size")
        margin = _two_standard_errors(min(max(b_top1 / 100, 0.0), 1.0), n)
        if s_top1 < b_top1 - margin:
            below = f"{margin:.1f} points" + (f" on {int(n)} images" if _is_finite(n) and n > 0
                                              else "")
        elif chance is not None:  # the baseline did no better: the budget, not distillation
            return (f"The {name} is at chance: {chance}; the baseline ({baseline_start(report)})"
                    f" does no better ({b_top1:.1f}%), so the training budget is too short for "
                    "this data: train for more epochs (trainer.student.epochs) or check the "
                    "data and labels.")
    if chance is not None:
        return (f"The {name} is at chance: {chance}. The distillation term may be swamping the "
                f"labels; {advice}.")
    if below is not None:
        return (f"The {name} is far below the baseline ({baseline_start(report)}): "
                f"{s_top1:.1f}% against {b_top1:.1f}% test top-1, more than two standard "
                f"errors ({below}) apart. Distillation hurt it; {advice}.")
    return None


def _times(r: float, better: str, worse: str, same: str) -> str:
    """`5.0× fewer parameters`, `2.0× more parameters`, or `same` for a ratio that prints as
    1.0 (a student of the teacher's own architecture read "1.0× fewer parameters")."""
    if f"{max(r, 1 / r):.1f}" == "1.0":
        return same
    return f"{r:.1f}× {better}" if r >= 1 else f"{1 / r:.1f}× {worse}"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    """A Markdown table; ``align`` is one char per column, ``l`` or ``r``."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    # A "|" inside a cell (a config value, say) would split it into two columns.
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _teachers_table(report: Mapping[str, Any]) -> list[str]:
    """Each teacher of a multi-teacher run, and their ensemble (what the cache holds)."""
    members = report.get("teachers") or []
    if len(members) < 2:
        return []
    ensemble = _block(report, "teacher")
    # Each teacher's share of the mix (cache.teacher_weights, normalised), where recorded.
    weights = ensemble.get("weights")
    weights = weights if isinstance(weights, list) and len(weights) == len(members) else None
    rows = [[m.get("name", "?"), *([f"{w:.2f}"] if weights else []), _pct(m.get("top1")),
             _pct(m.get("top5")), format_count(m.get("params")), _ms(m.get("latency_ms"))]
            for m, w in zip(members, weights or [None] * len(members), strict=True)]
    rows.append([f"ensemble ({ensemble.get('name', '')})", *(["1.00"] if weights else []),
                 _pct(ensemble.get("top1")), _pct(ensemble.get("top5")),
                 format_count(ensemble.get("params")), _ms(ensemble.get("latency_ms"))])
    header = ["teacher", *(["weight in the mix"] if weights else []), "top-1 (%)", "top-5 (%)",
              "params", "latency (ms)"]
    return ["## Teachers", "", *_table(header, rows), "",
            "The soft labels are the weighted mean of the teachers' logits; the ensemble's "
            "costs are the sum of its members'." if _block(report, "cache") else
            "The ensemble's logits are the weighted mean of the teachers' (no soft-label cache "
            "was needed); its costs are the sum of its members'.", ""]


def _results_table(report: Mapping[str, Any]) -> list[str]:
    teacher, student = _block(report, "teacher"), _block(report, "student")
    baseline = _block(report, "baseline")
    # The baseline is the student architecture trained without KD, so it shares its costs.
    baseline_costs = {
        k: baseline.get(k, student.get(k)) if baseline else None
        for k in ("params", "flops", "macs", "size_bytes", "latency_ms")
    }
    models = [teacher, {**baseline, **baseline_costs}, student]

    def row(label: str, key: str, fmt: Any, skip_teacher: bool = False) -> list[str]:
        cells = [fmt(m.get(key)) if m else _DASH for m in models]
        if skip_teacher:
            cells[0] = _DASH
        return [label, *cells]

    header = [
        "metric",
        f"teacher ({teacher['name']})" if teacher.get("name") else "teacher",
        f"baseline ({baseline_start(report)})",
        f"distilled student ({student['name']})" if student.get("name") else "distilled student",
    ]
    rows = [
        row("top-1 (%)", "top1", _pct),
        row("top-5 (%)", "top5", _pct),
        row("macro-F1 (%)", "macro_f1", _pct),
        row("agreement with teacher (%)", "agreement", _pct, skip_teacher=True),
        row("params", "params", format_count),
        row(FLOPS_LABEL, "flops", format_count),
        row("size", "size_bytes", format_bytes),
        row("latency (ms)", "latency_ms", _ms),
        ["train time", *(_train_time(report, role, m) for role, m in
                         zip(("teacher", "baseline", "student"), models, strict=True))],
    ]
    return _table(header, rows)


def _status(report: Mapping[str, Any], role: str) -> str | None:
    """How this run got the `role`'s model: trained, reused or resumed (its block's `status`,
    else the Stages block's; a multi-teacher ensemble is reused when all its teachers were)."""
    if status := _block(report, role).get("status"):
        return str(status)
    stages = _block(report, "stages")
    if stages.get(role):
        return str(stages[role])
    members = {v for k, v in stages.items() if k.startswith(f"{role}-")}
    return "reused" if role == "teacher" and members == {"reused"} else None


def _train_time(report: Mapping[str, Any], role: str, model: Mapping[str, Any]) -> str:
    """The model's training time, "3.3 s (reused)" when this run reused it: the time is then
    the one of the run that trained it, not spent in this one."""
    text = _duration(model.get("train_time_s")) if model else _DASH
    return f"{text} (reused)" if text != _DASH and _status(report, role) == "reused" else text


def _reused_note(report: Mapping[str, Any]) -> str:
    if not any(_status(report, role) == "reused" for role in _STAGE_ORDER):
        return ""
    return (" A train time marked (reused) is the one of the run that trained the model; this "
            "run took it from the store.")


def _baseline_noun(report: Mapping[str, Any]) -> str:
    """"from-scratch baseline", or "baseline (hard labels only, from the teacher's weights like the
    student)" and the like."""
    how = _baseline_how(report)
    return ("from-scratch baseline" if how == _SCRATCH
            else f"baseline (hard labels only, {how} like the student)")


def _compression_table(report: Mapping[str, Any]) -> list[str]:
    teacher, student = _block(report, "teacher"), _block(report, "student")
    comp = _block(report, "compression")
    rows = [
        [
            "params",
            format_count(teacher.get("params")),
            format_count(student.get("params")),
            _ratio(comp.get("params_ratio")),
        ],
        [
            FLOPS_LABEL,
            format_count(teacher.get("flops")),
            format_count(student.get("flops")),
            _ratio(comp.get("flops_ratio")),
        ],
        [
            "size",
            format_bytes(teacher.get("size_bytes")),
            format_bytes(student.get("size_bytes")),
            _ratio(comp.get("size_ratio")),
        ],
        [
            "latency (ms)",
            _ms(teacher.get("latency_ms")),
            _ms(student.get("latency_ms")),
            _ratio(comp.get("latency_speedup")),
        ],
    ]
    return _table(["", "teacher", "student", "teacher / student"], rows)


def _cache_lines(report: Mapping[str, Any]) -> list[str]:
    cache = _block(report, "cache")
    if not cache:
        # Only a loss that reads teacher logits from the cache has one built (student mode).
        mode = _block(report, "student").get("mode")
        if mode == "online":
            return ["Not needed: the loss reads teacher features, so the stored teacher ran "
                    "online beside the student."]
        if mode == "none":
            return ["Not needed: the loss reads hard labels only, no teacher outputs."]
        return ["No soft-label cache was recorded for this run."]
    per_sample, count = cache.get("bytes_per_sample"), cache.get("num_samples")
    storage = cache.get("storage") or _DASH
    if storage == "topk" and cache.get("topk") is not None:
        storage = f"top-{cache['topk']} logits"
    elif storage == "full":
        storage = "full logits"
    total = (
        float(per_sample) * float(count) if _is_finite(per_sample) and _is_finite(count) else None
    )
    views = cache.get("views")
    if _is_finite(views):
        # 0: one pass over the plain training images, the student's augmentations not replayed.
        views = str(int(views)) if int(views) > 0 else "none (plain images)"
    rows = [
        ["train samples", f"{int(count):,}" if _is_finite(count) else _DASH],
        ["cached views per sample", views if isinstance(views, str) else _DASH],
        ["bytes per train sample", format_bytes(per_sample)],
        ["train payload", format_bytes(total)],
        ["entry on disk", format_bytes(cache.get("disk_bytes"))],
        ["storage", str(storage)],
        ["format version", str(cache.get("format_version", _DASH))],
    ]
    return [*_table(["soft-label cache", ""], rows, align="ll"), "",
            "The train payload is the train file's logits (every view); the entry on disk adds "
            "the test split's file, the files' headers and `meta.json`."]


def _short_target(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1]


def _find_key(node: Any, key: str, prefix: str = "") -> list[tuple[str, Any]]:
    """Every ``(dotted.path, value)`` in a nested config whose last component is ``key``."""
    found: list[tuple[str, Any]] = []
    if isinstance(node, Mapping):
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if k == key and not isinstance(v, (Mapping, list)):
                found.append((path, v))
            else:
                found += _find_key(v, key, path)
    return found


def _config_rows(report: Mapping[str, Any]) -> list[list[str]]:
    config = _config(report)

    def name_of(section: str, fallback: Any) -> str:
        if fallback:
            return str(fallback)
        node = config.get(section)
        if isinstance(node, Mapping):
            return str(node.get("name") or _short_target(node.get("_target_", _DASH)))
        return str(node) if node is not None else _DASH

    rows = [
        ["teacher", name_of("teacher", _block(report, "teacher").get("name"))],
        ["student", name_of("student", _block(report, "student").get("name"))],
        ["dataset", name_of("dataset", _block(report, "dataset").get("name"))],
    ]
    # Where the student and the baseline start, when not from scratch (the defaults).
    student, pretrain = config.get("student"), config.get("pretrain")
    if isinstance(student, Mapping) and student.get("init") not in (None, "scratch"):
        rows.append(["student.init", str(student["init"])])
    pretrains = isinstance(pretrain, Mapping) and pretrain.get("dataset") is not None
    if pretrains:
        rows.append(["pretrain.dataset", str(pretrain["dataset"])])
    loss = config.get("loss")
    if isinstance(loss, Mapping):
        name = loss.get("name") or _short_target(loss.get("_target_", "loss"))
        # Scalars only: the loss's own knobs (temperature, *_weight, ...), not nested modules.
        knobs = [
            f"{k}={v}"
            for k, v in loss.items()
            if k not in ("_target_", "name", "_partial_") and not isinstance(v, (dict, list))
        ]
        rows.append(["loss", f"{name} ({', '.join(knobs)})" if knobs else str(name)])
    elif loss is not None:
        rows.append(["loss", str(loss)])
    for path, value in _find_key(config, "epochs"):
        if path == "pretrain.epochs" and not pretrains:
            continue  # no pretraining: its epochs setting says nothing about this run
        rows.append([path, str(value)])
    if "seed" in config:
        rows.append(["seed", str(config["seed"])])
    return rows


def _best_pt_text(report: Mapping[str, Any]) -> str:
    """What chose `best.pt`, from the report's ``best_pt`` block (absent: the test split)."""
    best = _block(report, "best_pt")
    if best.get("split") == "val":
        size = best.get("images")
        held = f"{int(size)}-image " if _is_finite(size) else ""
        return (f"`best.pt` is the epoch with the best top-1 on the {held}validation split held "
                "out of train, so the test split played no part in choosing it")
    return ("`best.pt` is the epoch with the best test top-1, so its figures are chosen on the "
            "test split; `dataset.val_size=N` chooses it on N images held out of train instead")


def _dataset_line(report: Mapping[str, Any]) -> str | None:
    ds = _block(report, "dataset")
    if not ds:
        return None
    parts = [f"**{ds.get('name', 'dataset')}**"]
    if ds.get("num_classes") is not None:
        parts.append(f"{ds['num_classes']} classes")
    if ds.get("train_size") is not None:
        parts.append(f"{ds['train_size']} train")
    if ds.get("val_size"):
        parts.append(f"{ds['val_size']} validation (held out of train)")
    if ds.get("test_size") is not None:
        parts.append(f"{ds['test_size']} test images")
    if ds.get("image_size") is not None:
        parts.append(f"{ds['image_size']}×{ds['image_size']} px")
    return "Dataset: " + ", ".join(parts) + "."


def _device_line(report: Mapping[str, Any]) -> str | None:
    """"Trained on cpu, bf16, channels_last.": the precision the top-1 figures were measured in
    (and compile), and the data-parallel ranks of a torchrun run, which report.md did not say;
    None for a report from before it was kept."""
    if not report.get("device"):
        return None
    ranks = report.get("ranks")
    parallel = (f"; this run data parallel over {int(ranks)} ranks (torchrun)"
                if _is_finite(ranks) and ranks > 1 else "")
    return f"Trained on {report['device']}{parallel}."


def _pretrain_line(report: Mapping[str, Any]) -> str | None:
    """The pretraining stage's set, image counts and result; None without pretraining."""
    pre = _block(report, "pretrain")
    if not pre:
        return None
    parts = [f"**{pre.get('dataset', 'dataset')}**"]
    for key, split in (("train_size", "train"), ("val_size", "validation"),
                       ("test_size", "test images")):
        if _is_finite(pre.get(key)) and (key != "val_size" or pre[key]):
            parts.append(f"{int(pre[key]):,} {split}")
    if _is_finite(pre.get("epochs")):
        parts.append(f"{int(pre['epochs'])} epoch{'' if pre['epochs'] == 1 else 's'}")
    if _is_finite(pre.get("top1")):
        parts.append(f"{float(pre['top1']):.1f}% top-1 on its own test split")
    if _is_finite(pre.get("train_time_s")):
        reused = " (reused)" if pre.get("status") == "reused" else ""
        parts.append(f"trained in {_duration(pre['train_time_s'])}{reused}")
    return ("Pretraining: " + ", ".join(parts) + ". The student and the baseline start from "
            "these weights.")


def render_markdown(report: Mapping[str, Any], plots: Mapping[str, str] | None = None) -> str:
    """The human-readable report; ``plots`` maps plot names to paths relative to the run dir."""
    plots = plots or {}
    teacher, student = _block(report, "teacher"), _block(report, "student")
    dataset = _block(report, "dataset")
    title = "kd report"
    if teacher.get("name") or student.get("name"):
        title += f": {teacher.get('name', '?')} → {student.get('name', '?')}"
    if dataset.get("name"):
        title += f" on {dataset['name']}"

    lines = [f"# {title}", "", _summary(report), ""]
    for warning in (teacher_warning(report), student_warning(report)):
        if warning is not None:
            lines += [f"**Warning:** {warning}", ""]
    for line in (_dataset_line(report), _device_line(report), _pretrain_line(report)):
        if line is not None:
            lines += [line, ""]
    if _is_finite(report.get("wall_time_s")):
        lines += [f"Total wall time: {_duration(report['wall_time_s'])} (dataset load, every "
                  "stage run or reused, the report's profiling, timing and plots).", ""]

    lines += ["## Results", ""]
    lines += _results_table(report)
    lines += [
        "",
        (
            "Accuracy metrics in percent on the test split, of each model's final weights "
            f"(`last.pt`; {_best_pt_text(report)}). Latency is the median CPU fp32 "
            f"batch-1 forward time{_threads(report)}, teacher and student timed in turn; the "
            f"{_baseline_noun(report)} shares the student's architecture and costs."
            f"{_busy_note(report)}{_reused_note(report)}"
        ),
        "",
    ]
    if "accuracy_vs_params" in plots:
        lines += [f"![Top-1 against parameters]({plots['accuracy_vs_params']})", ""]

    lines += _teachers_table(report)
    lines += ["## Compression", ""]
    lines += _compression_table(report)
    lines += [""]
    if _is_finite(_block(report, "compression").get("latency_speedup")):
        speedup = ("the ratio of the fastest of each model's timed calls, the ones least "
                   "touched by other processes"
                   if _is_finite(teacher.get("latency_min_ms")) else "the ratio of the medians")
        lines += [f"The latency speed-up is {speedup}.{_busy_note(report)}", ""]

    if "training_curves" in plots:
        lines += [
            "## Training curves",
            "",
            f"![Training curves]({plots['training_curves']})",
            "",
            (
                "Each stage's `train/loss` is its own objective (cross-entropy for the teacher "
                "and the baseline, the distillation loss for the student): compare shapes, "
                "not levels."
            ),
            "",
        ]
    if "confusion_matrix" in plots:
        lines += [
            "## Confusion matrix (distilled student)",
            "",
            f"![Confusion matrix]({plots['confusion_matrix']})",
            "",
        ]

    lines += ["## Stages", ""]
    stages = _block(report, "stages")
    if stages:
        lines += _table(
            ["stage", "status"],
            [[str(k), str(v) if v else "not run"] for k, v in stages.items()],
            align="ll",
        )
    else:
        lines += ["No stage information recorded."]
    lines += ["", "## Soft-label cache", ""]
    lines += _cache_lines(report)

    lines += ["", "## Configuration", ""]
    lines += _table(["setting", "value"], _config_rows(report), align="ll")
    lines += ["", "The full resolved configuration is in `report.json` under `config`.", ""]

    versions = _block(report, "versions")
    if report.get("kd_version") and "kd" not in versions:
        versions["kd"] = report["kd_version"]
    if versions:
        lines += ["## Versions", ""]
        lines += _table(
            ["package", "version"], [[k, str(v)] for k, v in versions.items()], align="ll"
        )
        lines += [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry point


def write_report(
    report: dict,
    run_dir: Path,
    histories: dict[str, Path] | None = None,
    confusion: Tensor | None = None,
    class_names: list[str] | None = None,
    started: float | None = None,
) -> None:
    """Writes ``report.json``, ``report.md`` and ``plots/*.png`` into ``run_dir``.

    Both report files are replaced atomically, so an interrupted run leaves the previous
    report intact. Plots are best effort: a plotting failure is logged, not raised.

    Args:
        report: The run's report dict (see the module docstring); blocks may be ``None``.
        run_dir: The run's output directory; created if missing.
        histories: Stage name (``teacher``/``student``/``baseline``) to its history CSV with
            columns ``epoch``, ``train/loss``, ``val/top1``.
        confusion: The distilled student's ``(C, C)`` test confusion matrix (rows true).
        class_names: Labels for the confusion-matrix axes.
        started: ``time.perf_counter()`` at the start of the run: ``report["wall_time_s"]`` is
            set to the time since, taken after the plots (the last of the report's own work)
            and before the files are written. None keeps the report's value.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = to_jsonable(report)
    # The plots come before the files so the wall time covers them; a plot failure is caught
    # and logged in _make_plots, so it cannot cost us report.json, what scripts and sweeps read.
    plots = _make_plots(data, run_dir, histories, confusion, class_names)
    if started is not None:
        report["wall_time_s"] = data["wall_time_s"] = time.perf_counter() - started
    atomic_write_text(
        run_dir / "report.json",
        json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
    )
    atomic_write_text(run_dir / "report.md", render_markdown(data, plots))
    log.info("Wrote report to %s", run_dir / "report.md")
