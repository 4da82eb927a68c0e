"""Batched augmentation on uint8 image tensors, on whatever device the batch lives.

An augmentation is split into `sample` (draw parameters from a generator) and `apply` (use them),
so a run can replay exactly the views it drew: the soft-label cache stores parameters, not pixels.
Images keep their stored size: datasets are decoded once at the size the models see (image
folders: resize + centre crop, the evaluation transform), so evaluation needs no transform.
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
        offsets = params.offsets.to(dev, non_blocking=True)  # pinned by the loader: no stall
        rows = offsets[:, 0:1] + torch.arange(h, device=dev)  # (N, H)
        cols = offsets[:, 1:2] + torch.arange(w, device=dev)  # (N, W)
        flips = params.flips.to(dev, non_blocking=True)  # pinned by the loader: no stall
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        batch = torch.arange(n, device=dev)[:, None, None]
        # Advanced indexing gathers every sample's own window in one op: (N, H, W, C).
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.sample(len(images), generator))


@dataclass
class ResizedCropParams:
    """Per-sample draws of a random resized crop, in units of the image, not pixels.

    `area` (N, A) and `log_ratio` (N, A) are A candidate boxes (fraction of the image area, log
    aspect ratio); the first that fits the image is taken. `position` (N, 2) in [0, 1) places
    the box in the room left (x, y); `flips` (N,) mirrors it.
    """

    area: torch.Tensor
    log_ratio: torch.Tensor
    position: torch.Tensor
    flips: torch.Tensor


class RandomResizedCrop:
    """Inception-style crop (torchvision's `RandomResizedCrop`), resized back to the stored size,
    then a random horizontal flip; one `affine_grid` + `grid_sample` for the whole batch.

    Like torchvision, a box covers `scale` of the image area with an aspect ratio in `ratio`
    (log-uniform), from up to `attempts` draws; when none fits, the whole image is used. Boxes
    are continuous (bilinear sampling), not rounded to whole pixels. Output stays uint8.
    """

    def __init__(self, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                 attempts: int = 10) -> None:
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], "
                             f"got scale={scale}, ratio={ratio}")
        self.scale, self.ratio, self.flip, self.attempts = scale, ratio, flip, attempts

    def sample(self, n: int, generator: torch.Generator) -> ResizedCropParams:
        lo, hi = self.scale
        area = lo + (hi - lo) * torch.rand(n, self.attempts, generator=generator)
        log_lo, log_hi = np.log(self.ratio[0]), np.log(self.ratio[1])
        log_ratio = log_lo + (log_hi - log_lo) * torch.rand(n, self.attempts, generator=generator)
        position = torch.rand(n, 2, generator=generator)
        if self.flip:
            flips = torch.rand(n, generator=generator) < 0.5
        else:
            flips = torch.zeros(n, dtype=torch.bool)
        return ResizedCropParams(area, log_ratio, position, flips)

    @staticmethod
    def boxes(params: ResizedCropParams, height: int, width: int) -> torch.Tensor:
        """(N, 4) boxes `x0, y0, w, h` as fractions of the image width and height."""
        ratio = params.log_ratio.exp()
        # Pixel box w*h = area*H*W with w/h = ratio, in fractions of W and H.
        bw = (params.area * ratio * height / width).sqrt()
        bh = (params.area / ratio * width / height).sqrt()
        fits = (bw <= 1) & (bh <= 1)
        first = fits.int().argmax(dim=1, keepdim=True)  # first fitting candidate
        ok = fits.any(dim=1)
        one = torch.ones(len(ok), device=ok.device)
        bw = torch.where(ok, bw.gather(1, first)[:, 0], one)
        bh = torch.where(ok, bh.gather(1, first)[:, 0], one)
        x0 = params.position[:, 0] * (1 - bw)
        y0 = params.position[:, 1] * (1 - bh)
        return torch.stack([x0, y0, bw, bh], dim=1)

    def apply(self, images: torch.Tensor, params: ResizedCropParams) -> torch.Tensor:
        n, c, h, w = images.shape
        dev = images.device
        # Pinned by the loader: copied without stalling; boxes and theta are built on `dev`.
        params = ResizedCropParams(*(t.to(dev, non_blocking=True) for t in (
            params.area, params.log_ratio, params.position, params.flips)))
        x0, y0, bw, bh = self.boxes(params, h, w).unbind(1)
        # affine_grid maps output coords in [-1, 1] to input coords in [-1, 1] (pixel edges,
        # align_corners=False): x_in = bw * x_out + (2 * x0 + bw - 1), mirrored by a sign.
        sign = torch.where(params.flips, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0] = bw * sign
        theta[:, 0, 2] = 2 * x0 + bw - 1
        theta[:, 1, 1] = bh
        theta[:, 1, 2] = 2 * y0 + bh - 1
        grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                            align_corners=False)
        return out.round_().clamp_(0, 255).to(torch.uint8)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.sample(len(images), generator))


Augment = CropFlip | RandomResizedCrop


def build_augment(name: str | None) -> Augment | None:
    """Named presets so dataset configs don't spell transforms out."""
    presets = {"none": None, "crop_flip": CropFlip(4, True), "flip": CropFlip(0, True),
               "random_resized_crop": RandomResizedCrop()}
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
        if not isinstance(augment, CropFlip):
            from kdcli.errors import ConfigError

            raise ConfigError(f"cached views replay crop offsets and flips (dataset.augment="
                              f"crop_flip or flip), not {type(augment).__name__}")
        gen = torch.Generator().manual_seed(seed)
        params = [augment.sample(n, gen) for _ in range(k)]
        return cls(torch.stack([p.offsets for p in params], 1),
                   torch.stack([p.flips for p in params], 1))
