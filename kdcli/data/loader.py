"""The batch loader: indexes uint8 tensors held in memory, augments and normalises per batch.

No DataLoader, no workers, no per-sample Python: one gather, one augmentation call and one
normalisation per batch, on the training device (the split is moved there once, or, when it
does not fit, each batch is gathered on the host and copied from pinned memory). The epoch's
order and augmentation parameters are drawn up front, and copied to a GPU once or from pinned
memory without waiting, so the loop never stalls on the host. Shuffling and augmentation draw
from a generator seeded by (seed, epoch), so an epoch's data order is a function of the epoch
number and a resumed run sees exactly the batches the interrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch

from kdcli.data.datasets import Split
from kdcli.data.transforms import Augment, ViewTable
from kdcli.device import to_device


@dataclass
class Batch:
    index: torch.Tensor  # positions in the split, for looking up cached soft labels
    images: torch.Tensor  # float, normalised, on the target device
    labels: torch.Tensor
    view: torch.Tensor | None = None  # which cached view each sample shows (view replay)
    # The same two on the host: for lookups in host memory (a soft-label cache too big for the
    # GPU) without a copy back from the device.
    host_index: torch.Tensor | None = None
    host_view: torch.Tensor | None = None


class BatchLoader:
    """Iterates one split in batches.

    Args:
        split: images and labels (moved once to `device`); a view (`Split.rows`) is read
            through its rows, its base never copied.
        batch_size: samples per batch.
        shuffle: reshuffle every epoch.
        augment: batched augmentation or None.
        mean, std: per-channel normalisation on the [0, 1] scale.
        seed: base seed; epoch e draws from seed * 1_000_003 + e.
        drop_last: drop a final partial batch (training).
        memory_format: torch.channels_last for conv nets on AMX/tensor cores.
        rank, world_size: data-parallel shard; `batch_size` is then per rank (see `shard`).
        views: fixed augmented views to replay instead of drawing fresh augmentations: each
            epoch every sample shows one of its K views, chosen at random (or `view=` all one).
        resident: hold the split's images on `device` (copied once, the fastest). False keeps
            them where they are (host memory, or a memory-mapped file) and gathers each batch
            there, then copies it to the device from pinned memory without waiting: for a
            dataset larger than the GPU's memory.
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
        augment: Augment | None = None,
        seed: int = 0,
        drop_last: bool = False,
        memory_format: torch.memory_format = torch.contiguous_format,
        rank: int = 0,
        world_size: int = 1,
        views: ViewTable | None = None,
        resident: bool = True,
    ) -> None:
        if views is not None and augment is None:
            raise ValueError("replaying cached views needs the augmentation that drew them")
        self.views = views
        self.resident = resident
        # A view's rows (`Split.rows`) are never copied on the host: images already on
        # `device` (the CPU's memory, a memory-mapped file) are indexed where they are, through
        # the rows mapped once per epoch; to another device a resident split gathers just its
        # own rows, and host batches are gathered from the base.
        if resident and split.base.device != torch.device(device):
            self.images, self.rows = split.gather_to(device), None
        else:
            self.images, self.rows = split.base, split.rows
        self.labels = split.labels.to(device)
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.memory_format = memory_format
        self.rank, self.world_size = rank, world_size
        c = split.image_shape[0]
        self.mean = torch.tensor(mean, device=device).view(1, c, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, c, 1, 1) * 255

    def __len__(self) -> int:
        n = len(self.labels) // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples one epoch yields on this rank."""
        n = len(self.shard(len(self.labels)))
        return n - n % self.batch_size if self.drop_last else n

    def generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def shard(self, n: int) -> torch.Tensor:
        """Positions in an epoch's global order that this rank visits, in its visiting order.

        The global order is cut into global batches of `batch_size * world_size`; rank r takes
        the r-th equal slice of each, so at every step the ranks' batches together form the
        batch a single process would draw. Every rank gets the same count (up to
        `world_size - 1` samples per epoch are left out so the split divides evenly).
        """
        w = self.world_size
        if w == 1:
            return torch.arange(n)
        n -= n % w
        step = self.batch_size * w
        full = n // step
        rows = torch.arange(full * step).view(full, w, self.batch_size)[:, self.rank].reshape(-1)
        share = (n - full * step) // w  # the last, partial global batch
        tail = full * step + self.rank * share + torch.arange(share)
        return torch.cat([rows, tail])

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for `epoch`, in visiting order (on the CPU)."""
        n = len(self.labels)
        if self.shuffle:
            perm = torch.randperm(n, generator=self.generator(epoch))
        else:
            perm = torch.arange(n)
        return perm[self.shard(n)]

    def epoch(self, epoch: int = 0, view: int | None = None) -> Iterator[Batch]:
        """One pass over the split. With `views`, `view=v` shows every sample's view v."""
        n = len(self.labels)
        rows = self.shard(n)
        order = self.order(epoch)
        # Augmentation is drawn for the whole epoch at once, in global order, so a sample's view
        # is the same whatever the world size, and no batch needs a host round trip.
        gen = self.generator(epoch + 7_919)  # augmentation stream, distinct from the order stream
        params, chosen = None, None
        if self.views is not None:
            every = (torch.full((n,), view, dtype=torch.long) if view is not None
                     else torch.randint(self.views.k, (n,), generator=gen))
            chosen = every[rows]
            params = self.views.select(order, chosen)
        elif self.augment is not None:
            params = _rows(self.augment.sample(n, gen), rows)
        index_all = to_device(order, self.device)
        # Rows of `self.images` in visiting order: a view's positions mapped through its rows
        # here, once per epoch, so a step only indexes.
        if self.rows is None:
            source = index_all if self.resident else order
        else:
            source = self.rows[order]
            source = to_device(source, self.device) if self.resident else source
        chosen_all = to_device(chosen, self.device) if chosen is not None else None
        if params is not None and self.device.type == "cuda":
            params = _map(params, torch.Tensor.pin_memory)  # so `apply` copies asynchronously
        # An unshuffled pass on one process over a whole tensor (evaluation, the cache stage)
        # visits rows 0..n-1 in order: each batch is then a slice of the images and labels,
        # read in place, instead of a gather (a copy, and on a GPU two kernels per batch).
        in_order = not self.shuffle and self.world_size == 1 and self.rows is None
        b = self.batch_size
        for start in range(0, len(order), b):
            if self.drop_last and start + b > len(order):
                break
            rows_b = slice(start, start + b)
            index = index_all[rows_b]
            picked = rows_b if in_order else source[rows_b]
            images = self.images[picked] if self.resident else to_device(
                self.images[picked], self.device)
            if params is not None:
                images = self.augment.apply(images, _rows(params, rows_b))
            yield Batch(index, self.normalise(images), self.labels[rows_b if in_order else index],
                        None if chosen_all is None else chosen_all[rows_b],
                        host_index=order[rows_b],
                        host_view=None if chosen is None else chosen[rows_b])

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> float, normalised, in the loader's memory format: one copy, then in place."""
        x = images.to(torch.float32, memory_format=self.memory_format, copy=True)
        return x.sub_(self.mean).div_(self.std)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)


def _map(params, fn):
    """Applies `fn` to every tensor field of an augmentation's parameter dataclass."""
    return type(params)(**{f.name: fn(getattr(params, f.name)) for f in fields(params)})


def _rows(params, rows: torch.Tensor | slice):
    """The parameters of the samples at `rows` (every field has one row per sample)."""
    return _map(params, lambda t: t[rows])
