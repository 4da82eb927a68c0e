"""What a loss receives: the student's and teacher's outputs, and the hard labels."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Outputs:
    """A model's outputs for one batch: logits, plus named feature maps when a loss asks."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


class DistillationLoss(nn.Module):
    """Base class. `forward(student, teacher, targets)` returns a dict whose "loss" is minimised.

    The other entries (e.g. "ce", "kd") are logged as `train/<name>`. A loss never knows whether
    teacher logits came from the soft-label cache or a live teacher.

    Class attributes:
        needs_teacher: False for a plain supervised loss (no cache, no teacher at all).
        needs_features: True when the loss reads feature maps, which forces a live teacher.
    """

    needs_teacher: bool = True
    needs_features: bool = False

    def forward(self, student: Outputs, teacher: Outputs | None, targets: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        raise NotImplementedError
