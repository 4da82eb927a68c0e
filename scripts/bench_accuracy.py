"""Accuracy benchmark: each distillation method against the same student trained from scratch.

Runs `kd train` once per method on the real CIFAR-10 pack with one fixed budget and one seed,
sharing a store, so the teacher, its soft-label cache and the from-scratch baseline are trained
once and every method starts from the same teacher. Prints one Markdown table (top-1, agreement
with the teacher, student training wall time) and writes it, with the raw figures as JSON, to
`--out`.

    python scripts/bench_accuracy.py --data ../shared/data/cifar10-jpeg --out bench/accuracy

The default budget (resnet20 -> resnet8, 10 + 10 epochs, batch 128, SGD 0.05 nesterov,
cosine, bf16 where fast) runs in about an hour on a 2-core CPU; raise the epochs on a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# method name -> overrides. Layer names are the CIFAR ResNets' (layer1..layer3).
METHODS: dict[str, list[str]] = {
    "hinton": ["loss=hinton"],
    "mse": ["loss=mse"],
    "dkd": ["loss=dkd"],
    "dist": ["loss=dist"],
    "lskd": ["loss=lskd"],
    "fitnets": ["loss=fitnets"],
    "attention": ["loss=attention"],
    "hinton+views": ["loss=hinton", "cache.views=4"],
}


def run_kd(args: argparse.Namespace, name: str, overrides: list[str]) -> dict:
    run_dir = args.out / name
    cmd = [sys.executable, "-m", "kdcli.cli", "train", "dataset=cifar10",
           f"dataset.loader.root={args.data}", f"teacher={args.teacher}",
           f"student={args.student}", f"trainer.teacher.epochs={args.teacher_epochs}",
           f"trainer.student.epochs={args.student_epochs}", f"seed={args.seed}",
           f"device={args.device}", f"store={args.store}", f"hydra.run.dir={run_dir}",
           *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{name}: kd train failed ({proc.returncode})")
    report = json.loads((run_dir / "report.json").read_text())
    report["bench_wall_s"] = time.perf_counter() - t0
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cifar10-jpeg"))
    ap.add_argument("--out", type=Path, default=Path("bench/accuracy"))
    ap.add_argument("--store", type=Path, default=None, help="default: <out>/store")
    ap.add_argument("--teacher", default="resnet20")
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--student-epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    args = ap.parse_args()
    args.data = args.data.resolve()
    args.out = args.out.resolve()
    args.store = (args.store or args.out / "store").resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    rows, raw = [], {}
    for i, name in enumerate(args.methods):
        # The first run also trains the baseline; later runs reuse it from the store.
        report = run_kd(args, name, METHODS[name] + ([] if i == 0 else ["baseline=false"]))
        raw[name] = report
        if i == 0:
            base, teacher = report["baseline"], report["teacher"]
            rows.append(["from scratch (CE)", base["top1"], base["agreement"],
                         base["train_time_s"], "-"])
        s = report["student"]
        rows.append([name, s["top1"], s["agreement"], s["train_time_s"], s["mode"]])
        print(f"{name}: top-1 {s['top1']:.2f}", flush=True)

    scratch = rows[0][1]
    lines = [
        f"Teacher {args.teacher}: top-1 {teacher['top1']:.2f}% ({args.teacher_epochs} epochs). "
        f"Student {args.student}, {args.student_epochs} epochs, seed {args.seed}, "
        f"device {raw[args.methods[0]]['device']}.",
        "",
        "| method | student top-1 (%) | vs scratch | agreement (%) | train wall time | mode |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, top1, agree, secs, mode in rows:
        delta = "" if name.startswith("from scratch") else f"{top1 - scratch:+.2f}"
        lines.append(f"| {name} | {top1:.2f} | {delta} | {agree:.2f} | {secs / 60:.1f} min "
                     f"| {mode} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {k: {"student": v["student"], "teacher": v["teacher"], "baseline": v["baseline"],
             "stages": v["stages"], "bench_wall_s": v["bench_wall_s"]} for k, v in raw.items()},
        indent=2))


if __name__ == "__main__":
    main()
