"""Batched augmentation on uint8 image tensors, on whatever device the batch lives.

An augmentation is split into `sample` (draw parameters from a generator) and `apply` (use them),
so a run can replay exactly the views it drew: the soft-label cache stores parameters, not pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class CropFlipParams:
    """Per-sample crop offsets (N, 2) into the padded image and horizontal flips (N,)."""

    offsets: torch.Tensor
    flips: torch.Tensor


class CropFlip:
    """Random crop after zero padding, then random horizontal flip (the CIFAR standard)."""

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        self.padding = padding
        self.flip = flip

    def sample(self, n: int, generator: torch.Generator) -> CropFlipParams:
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=generator)
        if self.flip:
            flips = torch.rand(n, generator=generator) < 0.5
        else:
            flips = torch.zeros(n, dtype=torch.bool)
        return CropFlipParams(offsets, flips)

    def apply(self, images: torch.Tensor, params: CropFlipParams) -> torch.Tensor:
        n, _, h, w = images.shape
        p = self.padding
        dev = images.device
        padded = F.pad(images, (p, p, p, p)) if p else images
        offsets = params.offsets.to(dev)
        rows = offsets[:, 0:1] + torch.arange(h, device=dev)  # (N, H)
        cols = offsets[:, 1:2] + torch.arange(w, device=dev)  # (N, W)
        flips = params.flips.to(dev)
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        batch = torch.arange(n, device=dev)[:, None, None]
        # Advanced indexing gathers every sample's own window in one op: (N, H, W, C).
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.sample(len(images), generator))


def build_augment(name: str | None) -> CropFlip | None:
    """Named presets so dataset configs don't spell transforms out."""
    presets = {"none": None, "crop_flip": CropFlip(4, True), "flip": CropFlip(0, True)}
    key = "none" if name is None else name
    if key not in presets:
        from kdcli.errors import ConfigError

        raise ConfigError(f"dataset.augment={name!r} is not a known preset; "
                          f"valid: {sorted(presets)}")
    return presets[key]


@dataclass
class ViewTable:
    """K fixed augmented views of every sample: the parameters that replay view v of sample i.

    Stored in the soft-label cache next to the teacher's logits on exactly those views, so the
    student trains on the very pixels the teacher labelled.
    """

    offsets: torch.Tensor  # (N, K, 2) crop offsets
    flips: torch.Tensor  # (N, K) horizontal flips

    @property
    def k(self) -> int:
        return self.flips.shape[1]

    def select(self, index: torch.Tensor, view: torch.Tensor) -> CropFlipParams:
        index, view = index.cpu(), view.cpu()
        return CropFlipParams(self.offsets[index, view], self.flips[index, view])

    def arrays(self) -> dict[str, np.ndarray]:
        """Compact arrays for the cache file: 3 bytes per sample and view."""
        return {"view_offsets": self.offsets.to(torch.int8).numpy(),
                "view_flips": self.flips.to(torch.uint8).numpy()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ViewTable:
        return cls(torch.from_numpy(np.array(arrays["view_offsets"], np.int64)),
                   torch.from_numpy(np.array(arrays["view_flips"], np.bool_)))

    @classmethod
    def sample(cls, augment: CropFlip, n: int, k: int, seed: int) -> ViewTable:
        """Draws K views per sample from a generator seeded by `seed` alone."""
        gen = torch.Generator().manual_seed(seed)
        params = [augment.sample(n, gen) for _ in range(k)]
        return cls(torch.stack([p.offsets for p in params], 1),
                   torch.stack([p.flips for p in params], 1))
