"""`kd export RUN_DIR`: a finished run's student as ONNX and TorchScript (+ int8 ONNX).

Each exported file is checked against the PyTorch student on the run's whole test split: a
format passes when every logit is within ``atol + rtol * |reference|`` of PyTorch's (numpy's
``allclose`` rule; defaults 1e-3 and 1e-3, far above fp32 round-off, far below a real
exporter bug) and top-1 predictions agree on at least 99.9 % of images.
A failed check is an error naming the format and its largest difference; the files that failed
are moved to ``OUT/failed/`` and OUT's earlier export, if any, and the report stay as they were.

``--int8`` quantizes the exported ONNX model with onnxruntime's static post-training
quantization (QDQ, per-channel int8 weights, MinMax calibration on training images); its
accuracy is measured, not checked, since quantization moves logits by design.

Writes ``OUT/{student.onnx, student.ts, student.int8.onnx, export.json, export.md}`` (OUT is
``RUN_DIR/export`` by default), adds an ``export`` block to ``RUN_DIR/report.json`` and an
``## Export`` section to ``RUN_DIR/report.md``; every file is replaced atomically. Model files
are written into a staging folder in OUT and moved into place only after every check passed. A
model file an earlier export left in OUT and this one did not write (``student.int8.onnx`` after
a re-run without ``--int8``) is deleted, and so is ``failed/``, so OUT holds only what the report
describes.

Latency: the teacher is rebuilt with its ``last.pt`` and timed in turns with the formats, so
the speed-ups compare figures from one session; when it cannot be rebuilt (its weights gone,
say) they are left out and the notes say why. It is timed as ``kd train``'s report times
(``kdcli.metrics.latency_policy``): one thread on a busy machine, speed-ups from the fastest
calls, the threads and the load recorded in ``export.json``.

Trust: the student is rebuilt by instantiating the ``_target_`` in the run's own
``.hydra/config.yaml``, as ``kd train`` did, so export only runs whose config you would run;
so is a single teacher. Of several teachers, each comes from the model config its store entry
recorded, used only when it hashes to the entry key in ``report.json``. Checkpoints are read
with ``weights_only=True``. The config's models and dataset are built in the directory the run
was started in, so its relative paths resolve as they did in training.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import kdcli
from kdcli.checkpoint import atomic_write, atomic_write_text
from kdcli.data import decoded
from kdcli.data.datasets import Dataset, Split
from kdcli.data.loader import BatchLoader
from kdcli.errors import ConfigError, CorruptArtifact, DataError, KDError, TrainingDiverged
from kdcli.metrics import (
    LatencyPolicy,
    classification_metrics,
    latency_policy,
    model_size_bytes,
    time_calls,
)
from kdcli.report import format_bytes, to_jsonable
from kdcli.stages.common import _MODEL_SETTINGS, build, load_dataset, load_weights
from kdcli.store import META, key_of

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
FILES = {"onnx": "student.onnx", "torchscript": "student.ts", "int8": "student.int8.onnx"}
LABELS = {"pytorch": "student fp32 PyTorch", "onnx": "student ONNX",
          "torchscript": "student TorchScript", "int8": "student int8 ONNX"}
OPSET = 18
MIN_AGREEMENT = 99.9  # percent of test images whose top-1 must match PyTorch's
CALIBRATION_BATCH = 64
SECTION = "## Export"
FAILED = "failed"  # OUT/failed/: the files of an export that failed its check


class ParityError(KDError):
    """An exported model's outputs differ from the PyTorch student's beyond the tolerance."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="kd export",
        description="Export a finished run's student to ONNX and TorchScript (optionally int8 "
                    "ONNX), check each against PyTorch on the test split, and report top-1, "
                    "file size and batch-1 CPU latency per format.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a `kd train` output folder")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS),
                   help="formats to export (default: both)")
    p.add_argument("--int8", action="store_true",
                   help="also write student.int8.onnx (static post-training quantization)")
    p.add_argument("--checkpoint", choices=("last", "best"), default="last",
                   help="student weights to export; the report evaluates `last` (default)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/export)")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="absolute logit tolerance atol (default 1e-3)")
    p.add_argument("--rtol", type=float, default=1e-3,
                   help="relative logit tolerance: |diff| <= atol + rtol*|ref| (default 1e-3)")
    p.add_argument("--batches", type=int, default=8,
                   help=f"int8 calibration batches of {CALIBRATION_BATCH} training images "
                        "(default 8 = 512 images)")
    p.add_argument("--latency-runs", type=int, default=50,
                   help="timed batch-1 runs per format and for the teacher; the median is "
                        "reported, the speed-ups divide the fastest (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    args = p.parse_args(argv)
    if args.tolerance < 0 or args.rtol < 0:
        p.error("--tolerance and --rtol must be >= 0")
    if args.batches < 1 or args.latency_runs < 1 or args.warmup < 0:
        p.error("--batches and --latency-runs must be >= 1, --warmup >= 0")
    return args


# --------------------------------------------------------------------------- the run


def load_run(run_dir: Path) -> tuple[DictConfig, dict[str, Any]]:
    """The run's composed config and its report; a ConfigError when RUN_DIR is not a kd run."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory")
    cfg_path, report_path = run_dir / ".hydra" / "config.yaml", run_dir / "report.json"
    for path in (cfg_path, report_path):
        if not path.is_file():
            # `kd student` (and the other stages run alone) write no report: `kd train` does.
            stage = next((f"a `kd {f.stem}` run's folder; " for f in run_dir.glob("*.log")
                          if f.stem in ("teacher", "cache", "student")), "")
            raise ConfigError(f"{run_dir} is not a finished kd run: {path.relative_to(run_dir)} "
                              f"is missing ({stage}`kd train` with the run's overrides reuses "
                              "the stages it finds done and writes the report)")
    try:
        cfg = OmegaConf.load(cfg_path)
        report = json.loads(report_path.read_text())
    except Exception as exc:
        raise CorruptArtifact(f"{run_dir}: cannot read the run's config or report "
                              f"({_first_line(exc)})") from exc
    if not isinstance(cfg, DictConfig) or "student" not in cfg or "dataset" not in cfg:
        raise ConfigError(f"{cfg_path} has no student/dataset config: not a kd train run")
    if not isinstance(report, dict) or not isinstance(report.get("student"), dict):
        raise ConfigError(f"{report_path} has no student block: not a kd train run")
    # `store` defaults to a path relative to where `kd train` ran; anchor it to the store the
    # run used (entries are <root>/<stage>/<name>-<key>), so `${store}/...` paths in the config,
    # e.g. a dataset's decoded-image cache, point where the run left them from any directory.
    entries = report.get("store")
    if isinstance(entries, dict) and entries:
        cfg.store = str(Path(next(iter(entries.values()))).parents[1])
    return cfg, report


def launch_dir(run_dir: Path) -> Path | None:
    """The directory `kd train` ran in (Hydra's ``hydra.runtime.cwd``, in the run's
    ``.hydra/hydra.yaml``): relative paths in the run config, say ``dataset.loader.root=imf``,
    are relative to it. None when the run does not record it or the directory is gone."""
    try:
        cwd = OmegaConf.select(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml"),
                               "hydra.runtime.cwd")
    except Exception as exc:  # noqa: BLE001 - missing or unreadable: paths stay as they are
        log.debug("%s: no hydra.runtime.cwd (%s)", run_dir / ".hydra" / "hydra.yaml",
                  _first_line(exc))
        return None
    if not cwd:
        return None
    if not Path(cwd).is_dir():
        log.warning("%s, where the run was started, is gone: relative paths in its config are "
                    "read from the current directory", cwd)
        return None
    return Path(cwd)


@contextlib.contextmanager
def working_dir(path: Path | None) -> Iterator[None]:
    """Runs the block in `path` (None: where it is), then returns (contextlib.chdir is 3.11+)."""
    before = os.getcwd()
    if path is not None:
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _resolved(cfg: DictConfig, key: str) -> DictConfig:
    """A config node resolved against the whole run config, then detached."""
    try:
        return OmegaConf.create(OmegaConf.to_container(cfg[key], resolve=True))
    except Exception as exc:
        raise ConfigError(f"cannot resolve `{key}` of the run config: {exc}") from exc


def build_student(cfg: DictConfig, num_classes: int, weights: Path) -> nn.Module:
    """The run's student architecture with `weights` loaded, fp32, eval mode, on the CPU."""
    return _build_model(_resolved(cfg, "student"), "student", num_classes, weights)


def build_teachers(run_dir: Path, cfg: DictConfig, report: dict[str, Any], num_classes: int
                   ) -> tuple[list[nn.Module], list[Path]]:
    """The run's teacher(s) with the weights the report evaluates (`last.pt`), fp32, eval mode,
    on the CPU, and the files those weights came from.

    Weights come from ``checkpoints/<stage>/`` in the run folder, else from the store entry
    report.json names. One teacher is built from the run config, as the student is; of several,
    the run config holds only their merge, so each is built from the model config its store
    entry recorded, trusted only when it hashes to the entry key report.json names.

    Raises:
        KDError: what is missing or does not fit, naming the teacher.
    """
    names = [t.get("name") for t in report.get("teachers") or [report.get("teacher") or {}]]
    if not all(isinstance(name, str) and name for name in names):
        raise ConfigError("report.json does not name the teacher")
    entries = report.get("store") if isinstance(report.get("store"), dict) else {}
    models, files = [], []
    for name in names:
        stage = "teacher" if len(names) == 1 else f"teacher-{name}"
        entry = entries.get(f"teacher-{name}")
        entry = Path(entry) if isinstance(entry, str) else None
        candidates = [run_dir / "checkpoints" / stage / "last.pt",
                      *([entry / "last.pt"] if entry else [])]
        weights = next((path for path in candidates if path.is_file()), None)
        if weights is None:
            raise CorruptArtifact(f"teacher {name}'s weights are gone: no "
                                  f"{' or '.join(map(str, candidates))}")
        node = _resolved(cfg, "teacher") if len(names) == 1 else _recorded_model(entry, name)
        models.append(_build_model(node, f"teacher {name}", num_classes, weights))
        files.append(weights)
    return models, files


def _recorded_model(entry: Path | None, name: str) -> DictConfig:
    """The model config a store entry was keyed by, if it still hashes to the entry's key."""
    if entry is None:
        raise ConfigError(f"report.json names no store entry for teacher {name}")
    try:
        inputs = json.loads((entry / META).read_text())["inputs"]
        node = OmegaConf.create(inputs["model"])
    except Exception as exc:
        raise CorruptArtifact(f"teacher {name}: cannot read its model config from "
                              f"{entry / META} ({_first_line(exc)})") from exc
    if not isinstance(node, DictConfig) or not entry.name.endswith(f"-{key_of(inputs)}"):
        raise CorruptArtifact(f"teacher {name}: {entry / META} does not match its entry's key")
    return node


def _build_model(node: DictConfig, what: str, num_classes: int, weights: Path) -> nn.Module:
    node = OmegaConf.create({k: v for k, v in node.items() if k not in _MODEL_SETTINGS})
    model = build(node, f"{what}: cannot build model", num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{what}: _target_ returned {type(model).__name__}, not an nn.Module")
    return load_weights(model, weights).float().eval()


def loader(split: Split, ds: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0
           ) -> BatchLoader:
    """Batches normalised as in training (the dataset's mean/std), no augmentation, CPU."""
    return BatchLoader(split, batch_size, device=torch.device("cpu"), mean=ds.mean, std=ds.std,
                       shuffle=shuffle, seed=seed)


# --------------------------------------------------------------------------- exporters


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"kd export needs `{module}` for this format: "
                          "pip install -e '.[export]' in the kd repository") from exc


def export_onnx(model: nn.Module, example: torch.Tensor) -> tuple[bytes, str]:
    """Serialised ONNX model with a dynamic batch axis, and the exporter that made it.

    The torch.export-based exporter comes first; a model it cannot capture falls back to the
    TorchScript-based one (deprecated in torch, still the most permissive). Torch before 2.5
    has no torch.export-based exporter with a dynamic batch axis: there the TorchScript-based
    one is the exporter, and not a failure to warn of.
    """
    _require("onnx")
    if _has_dynamo_exporter():
        chatter = io.StringIO()  # a failed capture prints whole graphs; keep them for debugging
        try:
            with _quiet(), contextlib.redirect_stdout(chatter), \
                    contextlib.redirect_stderr(chatter):
                program = torch.onnx.export(
                    model, (example,), None, input_names=["images"], output_names=["logits"],
                    dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=OPSET,
                    dynamo=True, verbose=False)
            return program.model_proto.SerializeToString(), "dynamo"
        except Exception as exc:  # noqa: BLE001 - any capture failure: try the other exporter
            log.debug("torch.export output:\n%s", chatter.getvalue())
            log.warning("torch.export-based ONNX export failed (%s); using the TorchScript-based "
                        "exporter", _first_line(exc))
    else:
        log.info("torch %s: ONNX from the TorchScript-based exporter (the torch.export-based "
                 "one, with a dynamic batch axis, needs torch 2.5)", torch.__version__)
    buf = io.BytesIO()
    with _quiet():
        torch.onnx.export(model, (example,), buf, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    return buf.getvalue(), "torchscript-based"


def _has_dynamo_exporter() -> bool:
    """Whether `torch.onnx.export` takes `dynamo=True` with `dynamic_shapes` (torch 2.5 on;
    torch 2.4's `dynamo=True` has no `dynamic_shapes`, so its every export would fail first)."""
    return "dynamic_shapes" in inspect.signature(torch.onnx.export).parameters


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Traces the model (works for any forward without data-dependent control flow)."""
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model, example)
        atomic_write(path, lambda fh: torch.jit.save(traced, fh))


def _first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences the exporters' deprecation and tracer warnings and their per-pass INFO logs;
    what matters about the result is checked by parity."""
    names = ("onnx_ir", "onnxscript", "onnxruntime", "torch")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(max(lg.getEffectiveLevel(), logging.ERROR))
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def quantize_int8(float_path: Path, out_path: Path, calibration: list[np.ndarray]) -> str:
    """Writes the int8 model; returns the method used. Static QDQ per-channel first,
    dynamic (weights only) when static quantization fails for the architecture."""
    _require("onnxruntime")
    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

        def rewind(self) -> None:
            self._batches = iter({"images": b} for b in calibration)

    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".int8-") as tmp:
        prepared, result = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        try:  # shape inference + BN folding help the quantizer; optional
            with _quiet():
                q.quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # noqa: BLE001
            log.info("int8: skipping pre-processing (%s)", type(exc).__name__)
            prepared = float_path
        try:
            with _quiet():
                q.quantize_static(str(prepared), str(result), Reader(),
                                  quant_format=q.QuantFormat.QDQ, per_channel=True,
                                  activation_type=q.QuantType.QInt8,
                                  weight_type=q.QuantType.QInt8,
                                  calibrate_method=q.CalibrationMethod.MinMax)
            method = "static, QDQ, per-channel int8, MinMax calibration"
        except Exception as exc:  # noqa: BLE001
            log.warning("int8: static quantization failed (%s); falling back to dynamic "
                        "quantization (int8 weights, activations quantized at run time)",
                        _first_line(exc))
            with _quiet():
                q.quantize_dynamic(str(prepared), str(result), per_channel=True,
                                   weight_type=q.QuantType.QInt8)
            method = "dynamic (static quantization failed), per-channel int8 weights"
        data = result.read_bytes()
    atomic_write(out_path, lambda fh: fh.write(data))
    return method


# --------------------------------------------------------------------------- running formats


def ort_session(path: Path, threads: int) -> Any:
    ort = _require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # the same CPU budget PyTorch gets
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CorruptArtifact(f"onnxruntime cannot load {path}: {_first_line(exc)}") from exc


Predict = Callable[[np.ndarray], np.ndarray]


def torch_predict(module: Callable[[torch.Tensor], torch.Tensor]) -> Predict:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).float().numpy()

    return run


def ort_predict(session: Any) -> Predict:
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def predict_all(fn: Predict, batches: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([fn(b) for b in batches]).astype(np.float32)


def time_latencies(fns: dict[str, Predict], shape: tuple[int, ...], warmup: int, runs: int,
                   policy: LatencyPolicy) -> dict[str, dict[str, float]]:
    """Each predictor's batch-1 `latency_ms` (median) and `latency_min_ms` (fastest call, what
    the speed-ups divide), timed in turns as kd train's report times its models, with the
    policy's threads (the ONNX sessions were made with them)."""
    x = np.zeros((1, *shape), dtype=np.float32)
    timed = time_calls([lambda fn=fn: fn(x) for fn in fns.values()], warmup=warmup,
                       iters=runs, threads=policy.threads)
    return {name: {"latency_ms": median, "latency_min_ms": fastest}
            for name, median, fastest in zip(fns, timed.median_ms, timed.min_ms, strict=True)}


def check_parity(name: str, reference: np.ndarray, candidate: np.ndarray, *, atol: float,
                 rtol: float, min_agreement: float = MIN_AGREEMENT) -> dict[str, float]:
    """Compares a format's logits with the reference (PyTorch fp32) logits.

    Passes when ``|candidate - reference| <= atol + rtol * |reference|`` everywhere and top-1
    predictions agree on at least ``min_agreement`` percent of rows. A flip needs the two top
    logits within twice the largest difference, so at the default tolerance only near-exact ties
    can flip; the agreement check is what still holds a loosened ``--tolerance`` to the
    predictions.

    Returns:
        ``{"max_abs_diff", "agreement"}``, agreement in percent.

    Raises:
        ParityError: naming the format, the largest difference and the tolerance.
    """
    if reference.shape != candidate.shape:
        raise ParityError(f"{name}: output shape {candidate.shape} differs from PyTorch's "
                          f"{reference.shape}")
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    if not np.isfinite(ref).all():  # then no exporter is to blame
        raise ParityError(f"{name}: the PyTorch model itself gives NaN/inf logits "
                          f"({int((~np.isfinite(ref)).sum())} values), not the exporter")
    if not np.isfinite(cand).all():
        raise ParityError(f"{name}: non-finite logits where PyTorch's are finite")
    diff = np.abs(cand - ref)
    max_diff = float(diff.max()) if diff.size else 0.0
    same = ref.argmax(1) == cand.argmax(1)
    agreement = float(same.mean() * 100.0) if same.size else 100.0
    if not (diff <= atol + rtol * np.abs(ref)).all():
        raise ParityError(f"{name}: max |logit difference| {max_diff:.3g} exceeds the tolerance "
                          f"(atol {atol:g} + rtol {rtol:g} * |logit|)")
    if agreement < min_agreement:
        raise ParityError(f"{name}: top-1 agrees with PyTorch on {agreement:.2f}% of test images "
                          f"(< {min_agreement:g}%); max |logit difference| {max_diff:.3g}")
    return {"max_abs_diff": max_diff, "agreement": agreement}


# --------------------------------------------------------------------------- reports


def _fmt(x: Any, spec: str) -> str:
    return format(float(x), spec) if isinstance(x, (int, float)) and math.isfinite(x) else "—"


def _ratio(num: Any, den: Any) -> str:
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (num, den)) and den > 0
    if not ok:
        return "—"
    return f"{num / den:.1f}×" if num / den >= 1 else f"{num / den:.2f}×"


def run_precision(report: dict[str, Any]) -> str | None:
    """The precision the run evaluated its models in (report.json's ``device``, e.g.
    ``"cpu, bf16, channels_last"``), so its top-1 is not taken for an fp32 figure."""
    parts = [p.strip() for p in str(report.get("device") or "").split(",")]
    return next((p for p in parts if p in ("fp32", "bf16", "fp16")), None)


def _report_top1(top1: Any, precision: str | None) -> str:
    """A top-1 from report.json, marked with its precision unless fp32 like the rest."""
    figure = _fmt(top1, ".2f")
    if figure == "—" or precision == "fp32":
        return figure
    return f"{figure} ({precision or 'run precision'})"


def markdown_table(data: dict[str, Any]) -> list[str]:
    """What each compression step bought: teacher, then the student as report.md evaluated it
    and in each format. Every figure is fp32 (or the format's own) but the top-1 read from
    report.json, which is marked with the run's precision where that is not fp32."""
    teacher = data.get("teacher") or {}
    precision = data.get("report_precision")
    rows = [["step", "top-1 %", "agreement with float student %", "max \\|Δ logit\\|",
             "file size", "smaller than teacher", "latency ms", "faster than teacher"],
            ["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"]]
    # The speed-ups divide the fastest calls, as report.md's Compression table does: medians
    # swing with the load (8.9x and 7.3x in two exports where report.md read 2.8x).
    t_size, t_lat, t_min = (teacher.get(k) for k in ("size_bytes", "latency_ms",
                                                     "latency_min_ms"))
    name = f"teacher {teacher['name']}" if teacher.get("name") else "teacher"
    rows.append([f"{name} (PyTorch fp32; top-1 from report.json)",
                 _report_top1(teacher.get("top1"), precision), "—", "—",
                 format_bytes(t_size), _ratio(t_size, t_size), _fmt(t_lat, ".2f"),
                 _ratio(t_min, t_min)])
    if _fmt(data.get("report_top1"), ".2f") != "—":
        rows.append(["student `last.pt` as in report.md", _report_top1(data["report_top1"],
                                                                       precision),
                     "—", "—", "—", "—", "—", "—"])
    for key, f in data["formats"].items():
        diff = "—" if key == "pytorch" else _fmt(f.get("max_abs_diff"), ".2g")
        rows.append([LABELS[key], _fmt(f["top1"], ".2f"), _fmt(f["agreement"], ".2f"), diff,
                     format_bytes(f["size_bytes"]), _ratio(t_size, f["size_bytes"]),
                     _fmt(f["latency_ms"], ".2f"), _ratio(t_min, f.get("latency_min_ms"))])
    return ["| " + " | ".join(r) + " |" for r in rows]


def markdown_notes(data: dict[str, Any]) -> list[str]:
    tol, teacher = data["tolerance"], data["teacher"]
    if teacher.get("latency_ms") is None:
        timed = "the formats"
    elif len(teacher.get("weights") or []) > 1:
        timed = "the teachers (PyTorch fp32, `last.pt`, one after another) and the formats"
    else:
        timed = "the teacher (PyTorch fp32, `last.pt`) and the formats"
    lines = [
        f"Student `{data['student']}` from `checkpoints/student/{data['checkpoint']}.pt`; "
        f"top-1 and agreement on the {data['test_size']} test images. Latency: median of "
        f"{data['latency']['runs']} batch-1 CPU runs after {data['latency']['warmup']} warm-up "
        f"runs, {data['latency']['threads']} thread(s), {timed} timed in turns so load from "
        "other processes hits them alike; the speed-ups divide the fastest calls, the ones "
        "other processes touched least, as report.md's speed-up does. The teacher's top-1 and "
        "file size are from `report.json`. File size of the PyTorch rows is the saved "
        "`state_dict`.",
        "",
        *_precision_note(data),
        *_untimed_teacher_note(teacher),
        *_busy_note(data["latency"]),
        f"Float formats pass when every logit is within {tol['atol']:g} + {tol['rtol']:g}·|logit| "
        f"of PyTorch's and top-1 agrees on ≥ {tol['min_agreement']:g}% of images.",
    ]
    lines += _input_note(data.get("input"))
    if "onnx" in data["formats"]:
        lines[-1] += f" ONNX opset {data['formats']['onnx']['opset']}, " \
                     f"{data['formats']['onnx']['exporter']} exporter."
    if "int8" in data["formats"]:
        q = data["formats"]["int8"]
        lines += ["", f"int8: {q['method']}; calibrated on {q['calibration_images']} "
                      f"{q['calibration_split']} images. Its accuracy is measured, not checked."]
    return lines


def _precision_note(data: dict[str, Any]) -> list[str]:
    precision = data.get("report_precision")
    if precision == "fp32" or _fmt(data.get("report_top1"), ".2f") == "—":
        return []
    run = f"{precision} autocast" if precision else "the run's precision (report.json `device`)"
    return [f"Precision: the top-1 of the teacher and of the student as in report.md are "
            f"report.json's, evaluated under {run}; the student rows below them are "
            "evaluated here in fp32 (int8: its own). Rounded logits can flip a near-tie, so "
            "the two student figures may differ by a few images.", ""]


def _untimed_teacher_note(teacher: dict[str, Any]) -> list[str]:
    if teacher.get("latency_ms") is not None:
        return []
    reported = teacher.get("report_latency_ms")
    note = f"The teacher was not timed ({teacher.get('not_timed') or 'no weights'}), so its " \
           "latency and the speed-ups are left out"
    if isinstance(reported, (int, float)) and math.isfinite(reported):
        note += f"; `report.json`'s {reported:.2f} ms was timed when the run finished, in " \
                "another session, and is not compared"
    return [note + ".", ""]


def _busy_note(latency: dict[str, Any]) -> list[str]:
    if not latency.get("busy"):
        return []
    load, cpus = latency.get("other_load"), latency.get("cpus")
    where = f" (other processes used {load:.1f} of {cpus} CPUs)" if load is not None else ""
    return [f"**Timed on a busy machine**{where}, hence with one thread, as report.md's "
            "latencies: multi-threaded PyTorch waits for its slowest thread, which a busy core "
            "stalls. The latencies are noisy, the speed-ups (fastest calls) less so.", ""]


def replace_section(markdown: str, section: list[str]) -> str:
    """`markdown` with its `## Export` section (up to the next `## ` heading) replaced by
    `section`, or with `section` appended when it has none."""
    lines = markdown.rstrip("\n").split("\n")
    if SECTION in lines:
        start = lines.index(SECTION)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        tail = lines[end:]
        lines = lines[:start] + section + ([""] + tail if tail else [])
    else:
        lines += ["", *section]
    return "\n".join(lines).rstrip("\n") + "\n"


def input_spec(ds: Dataset, loader: Any) -> dict[str, Any]:
    """What a deployment must do to an image before the exported model, as kd's data path did,
    and what its outputs mean (class index -> name)."""
    from kdcli.data.imagefolder import shorter_side

    c, h, w = ds.image_shape
    spec: dict[str, Any] = {
        "shape": [1, c, h, w], "dtype": "float32", "layout": "NCHW", "color": "RGB",
        "normalize": "x = (pixel / 255 - mean) / std, per channel",
        "mean": list(ds.mean), "std": list(ds.std), "classes": list(ds.classes)}
    if loader is not None and loader.get("_target_") == "kdcli.data.imagefolder.image_folder":
        short = shorter_side(h, loader.get("resize"))
        spec["resize"] = f"shorter side to {short} px (bilinear), then the centre {h}x{w} crop"
    return spec


def _input_note(spec: dict[str, Any] | None) -> list[str]:
    if not spec:
        return []
    fmt = ", ".join(f"{v:.4g}" for v in spec["mean"]), ", ".join(f"{v:.4g}" for v in spec["std"])
    resize = f"{spec['resize']}; " if spec.get("resize") else ""
    return ["", f"Input: {'×'.join(map(str, spec['shape']))} {spec['dtype']} "
                f"{spec['layout']}, {spec['color']}: {resize}pixels / 255, minus mean ({fmt[0]}), "
                f"over std ({fmt[1]}). Output: logits over the {len(spec['classes'])} classes in "
                "`export.json` `input.classes` order."]


def write_outputs(data: dict[str, Any], run_dir: Path, out: Path) -> list[str]:
    """export.json, export.md, the report's `export` block and `## Export` section. A run folder
    that cannot be written (read-only, with `--out` elsewhere) only gets a warning: the export
    itself passed and is in OUT."""
    table, notes = markdown_table(data), markdown_notes(data)
    atomic_write_text(out / "export.json",
                      json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n")
    title = f"# kd export: {data['student']} from {run_dir}"
    atomic_write_text(out / "export.md", "\n".join([title, "", *table, "", *notes]) + "\n")
    try:
        add_to_report(data, table, notes, run_dir, out)
    except OSError as exc:
        log.warning("exported to %s (checked; export.json and export.md there); could not add the "
                    "table to %s: %s", out, run_dir / "report.md", exc.strerror or exc)
    return table


def add_to_report(data: dict[str, Any], table: list[str], notes: list[str], run_dir: Path,
                  out: Path) -> None:
    """The `export` block of RUN/report.json and the `## Export` section of RUN/report.md."""
    report_path = run_dir / "report.json"
    report = json.loads(report_path.read_text())
    report["export"] = data
    atomic_write_text(report_path, json.dumps(to_jsonable(report), indent=2, ensure_ascii=False,
                                              allow_nan=False) + "\n")
    md_path = run_dir / "report.md"
    where = out.relative_to(run_dir) if out.is_relative_to(run_dir) else out
    section = [SECTION, "", f"Files in `{where}/`.", "", *table, "", *notes]
    old = md_path.read_text() if md_path.exists() else ""
    atomic_write_text(md_path, replace_section(old, section))


# --------------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    run_dir = args.run_dir.resolve()
    cfg, report = load_run(run_dir)
    out = (args.out or run_dir / "export").resolve()
    formats = list(dict.fromkeys(args.formats))
    if args.int8 and "onnx" not in formats:
        log.info("--int8 quantizes the ONNX model: exporting ONNX too")
        formats.insert(0, "onnx")
    if "onnx" in formats:  # fail before any work when the extra is not installed
        _require("onnx")
        _require("onnxruntime")

    num_classes = (report.get("dataset") or {}).get("num_classes")
    if not isinstance(num_classes, int):
        raise ConfigError(f"{run_dir / 'report.json'} has no dataset.num_classes")
    weights = run_dir / "checkpoints" / "student" / f"{args.checkpoint}.pt"
    if not weights.exists():
        raise CorruptArtifact(f"{weights} is missing")
    seed = int(cfg.get("seed") or 0)
    # What the run config builds is built where the run started, so its relative paths (the
    # dataset's root, a decoded-image cache, ...) mean what they meant to `kd train`.
    where = launch_dir(run_dir)
    with working_dir(where):
        model = build_student(cfg, num_classes, weights)
        try:  # timed with the formats, so the speed-ups compare figures from one session
            teachers, teacher_files = build_teachers(run_dir, cfg, report, num_classes)
            not_timed = None
        except KDError as exc:
            teachers, teacher_files, not_timed = [], [], str(exc)
            log.warning("the teacher is not timed, so the export shows no speed-up: %s", exc)
        # A decoded-image cache is read where the run left it, never written: export writes
        # only into OUT and the run folder, and the recorded store may be gone (a moved run, a
        # run from another machine), where a new cache would also fake a launch folder.
        with decoded.read_only():
            dataset_cfg = _resolved(cfg, "dataset")
            ds = load_dataset(dataset_cfg, seed)
    if ds.num_classes != num_classes:
        raise ConfigError(f"the run's dataset now has {ds.num_classes} classes, the report "
                          f"says {num_classes}")
    # The table sets the export's top-1 beside the teacher's from report.json: both must be
    # measured on the images the run evaluated.
    check_test_split(ds.test, report.get("dataset") or {}, dataset_cfg.get("loader"), where)
    shape = ds.image_shape
    eval_bs = int(OmegaConf.select(cfg, "trainer.eval_batch_size", default=256) or 256)
    test = list(loader(ds.test, ds, eval_bs))
    if not test:
        raise DataError(f"dataset {ds.name} has no test images to check the export on")
    batches = [b.images.numpy() for b in test]
    labels = torch.cat([b.labels for b in test])
    # The load is checked before the ONNX sessions are made, as they keep their thread count:
    # one on a busy machine, as for report.md's latencies.
    policy = latency_policy()
    threads = policy.threads
    log.info("exporting %s (%s.pt, %d test images, %s) to %s",
             report["student"].get("name", "student"), args.checkpoint, len(labels),
             policy.describe(), out)
    out.mkdir(parents=True, exist_ok=True)
    # Model files are written into a staging folder and moved into OUT only once every check
    # has passed, so OUT never holds a file the report does not describe (nor a failed one).
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        results, predictors = _export_into(staging, model, batches, labels, formats, args,
                                           out, threads, ds, seed)
        timed = dict(predictors)
        if teachers:  # several teachers run one after another, as the ensemble would
            members = [torch_predict(t) for t in teachers]
            timed = {"teacher": lambda x: [fn(x) for fn in members][-1], **timed}
        log.info("timing %s at batch 1 (%d runs each, %s)", ", ".join(timed),
                 args.latency_runs, policy.describe())
        latency = time_latencies(timed, shape, args.warmup, args.latency_runs, policy)
        teacher_ms = latency.pop("teacher", {"latency_ms": None, "latency_min_ms": None})
        for name, ms in latency.items():
            results[name].update(ms)

        reported = report.get("teacher") or {}
        teacher = {**{k: reported.get(k) for k in ("name", "top1", "params", "size_bytes")},
                   **teacher_ms, "report_latency_ms": reported.get("latency_ms")}
        if teachers:
            teacher["weights"] = [str(path) for path in teacher_files]
        else:
            teacher["not_timed"] = not_timed
        data = {
            "student": report["student"].get("name", "student"),
            "checkpoint": args.checkpoint,
            "weights": str(weights),
            "out_dir": str(out),
            "test_size": len(labels),
            "test_fingerprint": ds.test.fingerprint(),
            "input": input_spec(ds, dataset_cfg.get("loader")),
            "report_top1": report["student"].get("top1"),
            "report_precision": run_precision(report),
            "tolerance": {"atol": args.tolerance, "rtol": args.rtol,
                          "min_agreement": MIN_AGREEMENT},
            "latency": {"batch_size": 1, "device": "cpu", "warmup": args.warmup,
                        "runs": args.latency_runs, **policy.record(), "speedup_from": "min"},
            "teacher": teacher,
            "formats": results,
            "versions": _versions(),
        }
        written = {FILES[k] for k in results if k in FILES}
        for name in sorted(written):
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name in remove_stale(out, written):
        log.info("removed %s: left by an earlier export, not written by this one", out / name)
    failed = out / FAILED
    if failed.is_dir():
        shutil.rmtree(failed)
        log.info("removed %s: the files of an earlier export that failed its check", failed)
    table = write_outputs(data, run_dir, out)
    log.info("what each compression step bought (%s):\n%s", out / "export.md", "\n".join(table))
    return 0


def check_test_split(split: Split, recorded: dict[str, Any], loader_cfg: Any,
                     launched: Path | None) -> None:
    """Refuses a test split other than the one the run evaluated: export.md sets the export's
    top-1 beside the teacher's from report.json, so both must be measured on the same images.

    report.json's ``dataset.test_size`` catches images added or removed since the run, its
    ``dataset.test_fingerprint`` (`Split.fingerprint`) a swap of as many: other images or
    labels. A report from before the fingerprint was recorded gets the size check alone, and a
    warning that the images themselves were not verified.

    Args:
        split: The test split as export loaded it.
        recorded: report.json's ``dataset`` block.
        loader_cfg: The run config's ``dataset.loader``, to name the folder read in the error.
        launched: Where the run was started (`launch_dir`): a relative root is relative to it.

    Raises:
        DataError: another number of test images, or other content; nothing is written.
    """
    evaluated = recorded.get("test_size")
    if isinstance(evaluated, int) and evaluated != len(split):
        raise DataError(f"the test data differs from the run's: {len(split)} test images now, "
                        f"the run evaluated {evaluated} (report.json dataset.test_size), so "
                        "top-1 here would not compare with the report's; export with the data "
                        "the run was trained on")
    expected = recorded.get("test_fingerprint")
    if not isinstance(expected, str):
        log.warning("report.json has no dataset.test_fingerprint (the run predates it): only "
                    "the number of test images (%d) is checked, not that they are the images "
                    "the run evaluated", len(split))
        return
    found = split.fingerprint()
    if found != expected:
        root = loader_cfg.get("root") if isinstance(loader_cfg, dict | DictConfig) else None
        read = f" (read from {(launched or Path.cwd()) / Path(str(root)).expanduser()})" \
            if root else ""
        raise DataError(
            f"the test data differs from the run's: as many test images ({len(split)}) but not "
            f"the same ones (sha256 {found[:16]}… now, the run evaluated {expected[:16]}…, "
            "report.json dataset.test_fingerprint), so top-1 here would not compare with the "
            f"report's. The dataset{read} likely points at other images than in training "
            "(another dataset.loader.root, test images replaced or moved between class folders "
            "since), or this machine decodes them differently (another Pillow version); point "
            "the dataset back at the images the run used, or retrain on these")


def _export_into(staging: Path, model: nn.Module, batches: list[np.ndarray],
                 labels: torch.Tensor, formats: list[str], args: argparse.Namespace, out: Path,
                 threads: int, ds: Dataset, seed: int
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, Predict]]:
    """Exports and checks each format in `staging`: each format's results and its predictor,
    to be timed.

    Raises:
        TrainingDiverged: the student's own PyTorch logits are not finite: nothing to compare.
        ParityError: a format failed its check; the files written are moved to OUT/failed/
            (replacing an earlier failure's), and OUT's export is left as it was.
    """
    ref = predict_all(torch_predict(model), batches)
    bad = int((~np.isfinite(ref).all(axis=1)).sum())
    if bad:
        raise TrainingDiverged(
            f"the student model itself (PyTorch, {args.checkpoint}.pt, before any export) gives "
            f"NaN/inf logits on {bad} of {len(ref)} test images, so there is nothing to check "
            "an export against: the run diverged or its weights are damaged; retrain it, or "
            "try the other --checkpoint")
    ref_t = torch.from_numpy(ref)

    def scores(logits: np.ndarray) -> dict[str, float]:
        m = classification_metrics(torch.from_numpy(logits), labels, ref_t)
        return {"top1": m["top1"], "agreement": m["agreement"]}

    predictors: dict[str, Predict] = {"pytorch": torch_predict(model)}
    results: dict[str, dict[str, Any]] = {
        "pytorch": {"file": None, "size_bytes": model_size_bytes(model), **scores(ref)}}
    # Two images: a batch of one would let the exporter fix the batch axis at 1.
    example = torch.from_numpy(np.concatenate([batches[0][:1], batches[0][-1:]]))
    failures: list[ParityError] = []

    def check(name: str, logits: np.ndarray) -> dict[str, float]:
        try:
            return check_parity(name, ref, logits, atol=args.tolerance, rtol=args.rtol)
        except ParityError as exc:  # reported after every format has been tried
            failures.append(exc)
            diff = np.abs(logits.astype(np.float64) - ref) if logits.shape == ref.shape else None
            return {"max_abs_diff": float(diff.max()) if diff is not None else math.nan}

    if "onnx" in formats:
        path = staging / FILES["onnx"]
        proto, exporter = export_onnx(model, example)
        atomic_write(path, lambda fh: fh.write(proto))
        predictors["onnx"] = ort_predict(ort_session(path, threads))
        logits = predict_all(predictors["onnx"], batches)
        results["onnx"] = {"file": path.name, "size_bytes": path.stat().st_size,
                           **scores(logits), **check("onnx", logits), "exporter": exporter,
                           "opset": OPSET}
    if "torchscript" in formats:
        path = staging / FILES["torchscript"]
        export_torchscript(model, example, path)
        with _quiet():
            module = torch.jit.load(str(path), map_location="cpu").eval()
        predictors["torchscript"] = torch_predict(module)
        logits = predict_all(predictors["torchscript"], batches)
        results["torchscript"] = {"file": path.name, "size_bytes": path.stat().st_size,
                                  **scores(logits), **check("torchscript", logits),
                                  "method": "torch.jit.trace"}
    if failures:
        failed = out / FAILED
        shutil.rmtree(failed, ignore_errors=True)
        failed.mkdir()
        for name in (FILES[k] for k in results if k in FILES):
            os.replace(staging / name, failed / name)
        earlier = "the earlier export there and in the report is unchanged" \
            if (out / "export.json").is_file() else "nothing was exported there"
        raise ParityError("; ".join(str(e) for e in failures) +
                          f" (the files that failed are in {failed} for inspection; in {out} "
                          f"{earlier})")
    if args.int8:
        path = staging / FILES["int8"]
        train = loader(ds.train, ds, CALIBRATION_BATCH, shuffle=True, seed=seed)
        calib = [b.images.numpy() for b, _ in zip(train, range(args.batches), strict=False)]
        n_calib = sum(len(b) for b in calib)
        log.info("int8: calibrating on %d training images", n_calib)
        method = quantize_int8(staging / FILES["onnx"], path, calib)
        predictors["int8"] = ort_predict(ort_session(path, threads))
        logits = predict_all(predictors["int8"], batches)
        diff = np.abs(logits.astype(np.float64) - ref)
        results["int8"] = {"file": path.name, "size_bytes": path.stat().st_size,
                           **scores(logits), "max_abs_diff": float(diff.max()),
                           "method": method, "calibration_images": n_calib,
                           "calibration_split": "train"}
    return results, predictors

def remove_stale(out: Path, written: set[str]) -> list[str]:
    """Deletes the exported-model files in `out` that this export did not write (say
    student.int8.onnx after a re-run without --int8), so the folder holds only files that
    export.json and the report describe. Returns the names removed."""
    removed = []
    for name in sorted(set(FILES.values()) - written):
        path = out / name
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(name)
    return removed


def _versions() -> dict[str, str]:
    versions = {"kd": kdcli.__version__, "torch": torch.__version__}
    for name in ("onnx", "onnxruntime"):
        with contextlib.suppress(ImportError):
            versions[name] = importlib.import_module(name).__version__
    return versions
