"""Build the embedded CIFAR-10 subset that ships inside the package.

Takes a class-balanced sample of the CIFAR-10 JPEG pack (default 500 train and 100 test images
per class) and writes it in the same npz layout (`jpeg`, `offsets`, `labels`, `classes`), so the
one loader in `kdcli.data.datasets` reads both. The JPEG bytes are copied, not re-encoded.

    python scripts/make_cifar_subset.py ../shared/data/cifar10-jpeg \
        kdcli/data/assets/cifar10_subset.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def balanced_sample(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
             for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def take(pack: dict, idx: np.ndarray) -> dict:
    offsets = pack["offsets"]
    chunks = [pack["jpeg"][offsets[i]:offsets[i + 1]] for i in idx]
    new_offsets = np.zeros(len(idx) + 1, dtype=np.int64)
    new_offsets[1:] = np.cumsum([len(c) for c in chunks])
    return {"jpeg": np.concatenate(chunks), "offsets": new_offsets,
            "labels": pack["labels"][idx].astype(np.int64), "classes": pack["classes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="folder holding train.npz and test.npz")
    ap.add_argument("out", type=Path, help="output .npz")
    ap.add_argument("--train-per-class", type=int, default=500)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    out = {}
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        pack = dict(np.load(args.src / f"{split}.npz"))
        sub = take(pack, balanced_sample(pack["labels"], per_class, rng))
        out.update({f"{split}_{k}": v for k, v in sub.items() if k != "classes"})
        out["classes"] = sub["classes"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
