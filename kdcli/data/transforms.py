"""Batched augmentation on uint8 image tensors, on whatever device the batch lives.

An augmentation is split into `sample` (draw parameters from a generator) and `apply` (use them),
so a run can replay exactly the views it drew: the soft-label cache stores parameters, not pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

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
