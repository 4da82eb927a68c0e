"""The batch loader: indexes uint8 tensors held in memory, augments and normalises per batch.

No DataLoader, no workers, no per-sample Python: one gather, one augmentation call and one
normalisation per batch. Shuffling and augmentation draw from a generator seeded by
(seed, epoch), so an epoch's data order is a function of the epoch number and a resumed run
sees exactly the batches the interrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kdcli.data.datasets import Split
from kdcli.data.transforms import CropFlip, ViewTable


@dataclass
class Batch:
    index: torch.Tensor  # positions in the split, for looking up cached soft labels
    images: torch.Tensor  # float, normalised, on the target device
    labels: torch.Tensor
    view: torch.Tensor | None = None  # which cached view each sample shows (view replay)


class BatchLoader:
    """Iterates one split in batches.

    Args:
        split: images and labels (moved once to `device`).
        batch_size: samples per batch.
        shuffle: reshuffle every epoch.
        augment: batched augmentation or None.
        mean, std: per-channel normalisation on the [0, 1] scale.
        seed: base seed; epoch e draws from seed * 1_000_003 + e.
        drop_last: drop a final partial batch (training).
        memory_format: torch.channels_last for conv nets on AMX/tensor cores.
        rank, world_size: shard the index list for data-parallel training.
        views: fixed augmented views to replay instead of drawing fresh augmentations: each
            epoch every sample shows one of its K views, chosen at random (or `view=` all one).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        device: torch.device,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        shuffle: bool = False,
        augment: CropFlip | None = None,
        seed: int = 0,
        drop_last: bool = False,
        memory_format: torch.memory_format = torch.contiguous_format,
        rank: int = 0,
        world_size: int = 1,
        views: ViewTable | None = None,
    ) -> None:
        if views is not None and augment is None:
            raise ValueError("replaying cached views needs the augmentation that drew them")
        self.views = views
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.memory_format = memory_format
        self.rank, self.world_size = rank, world_size
        c = self.images.shape[1]
        self.mean = torch.tensor(mean, device=device).view(1, c, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, c, 1, 1) * 255

    def __len__(self) -> int:
        n = len(self.labels) // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def order(self, epoch: int) -> torch.Tensor:
        n = len(self.labels)
        if self.shuffle:
            idx = torch.randperm(n, generator=self.generator(epoch))
        else:
            idx = torch.arange(n)
        per_rank = n // self.world_size
        return idx[self.rank * per_rank:(self.rank + 1) * per_rank] if self.world_size > 1 else idx

    def epoch(self, epoch: int = 0, view: int | None = None) -> Iterator[Batch]:
        """One pass over the split. With `views`, `view=v` shows every sample's view v."""
        order = self.order(epoch)
        gen = self.generator(epoch + 7_919)  # augmentation stream, distinct from the order stream
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            if self.drop_last and len(index) < self.batch_size:
                break
            dev_index = index.to(self.device, non_blocking=True)
            images = self.images[dev_index]
            chosen = None
            if self.views is not None:
                chosen = (torch.full((len(index),), view, dtype=torch.long) if view is not None
                          else torch.randint(self.views.k, (len(index),), generator=gen))
                images = self.augment.apply(images, self.views.select(index, chosen))
                chosen = chosen.to(self.device, non_blocking=True)
            elif self.augment is not None:
                images = self.augment(images, gen)
            images = ((images.float() - self.mean) / self.std).contiguous(
                memory_format=self.memory_format)
            yield Batch(dev_index, images, self.labels[dev_index], chosen)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)
