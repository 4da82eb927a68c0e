"""Learning-rate schedules stepped once per optimizer step, each with an optional linear warmup.

Config: `scheduler=cosine|multistep|constant`; built as
`instantiate(cfg.scheduler, optimizer=opt, epochs=E, steps_per_epoch=S)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _with_warmup(factor: Callable[[int], float], warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return factor(step)

    return f


def cosine(optimizer: Optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0,
           min_lr_ratio: float = 0.0) -> LambdaLR:
    """Cosine decay from the base LR to `min_lr_ratio * lr` over the run, after warmup."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, _with_warmup(factor, warmup))


def multistep(optimizer: Optimizer, epochs: int, steps_per_epoch: int,
              milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1,
              warmup_epochs: float = 0.0) -> LambdaLR:
    """LR times `gamma` at each milestone, given as fractions of the run (0.5 = half-way)
    or, when > 1, as epoch numbers."""
    if gamma <= 0:  # 0 stops learning at the first milestone, < 0 makes the LR negative
        raise ValueError(f"gamma must be > 0, got {gamma}")
    total_epochs = max(1, epochs)
    steps = sorted(int((m if m > 1 else m * total_epochs) * steps_per_epoch) for m in milestones)
    warmup = int(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        return gamma ** sum(step >= s for s in steps)

    return LambdaLR(optimizer, _with_warmup(factor, warmup))


def constant(optimizer: Optimizer, epochs: int, steps_per_epoch: int,
             warmup_epochs: float = 0.0) -> LambdaLR:
    """A fixed LR after warmup."""
    return LambdaLR(optimizer, _with_warmup(lambda step: 1.0, int(warmup_epochs * steps_per_epoch)))
