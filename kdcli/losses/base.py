"""What a loss receives: the student's and teacher's outputs, and the hard labels."""

from __future__ import annotations

from collections.abc import Sequence
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

    Attributes:
        needs_teacher: False for a plain supervised loss (no cache, no teacher at all).
        student_layers, teacher_layers: module names (as in `named_modules()`) whose outputs the
            loss reads from `Outputs.features`. Any layer forces a live teacher (online mode).
    """

    needs_teacher: bool = True
    student_layers: Sequence[str] = ()
    teacher_layers: Sequence[str] = ()

    @property
    def needs_features(self) -> bool:
        return bool(self.student_layers or self.teacher_layers)

    def setup(self, student: Outputs, teacher: Outputs) -> None:
        """Called once before training with the outputs of a probe batch, so a loss can size its
        learned parts (e.g. a FitNets adapter) from the real feature shapes. Default: nothing."""

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the training loop before each epoch (0-based `epoch` of `epochs`, also after
        a resume), for a loss whose weighting follows the schedule (DKD's warmup). Default:
        nothing."""

    def forward(self, student: Outputs, teacher: Outputs | None, targets: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def check_temperature(temperature: float) -> None:
    """Raises ValueError for a temperature that is not > 0 (it divides the logits)."""
    if temperature <= 0:
        raise ValueError(f"loss.temperature must be > 0, got {temperature}")


def check_weights(**weights: float) -> None:
    """Raises ValueError naming a negative term weight: the optimiser would maximise that term
    (a negative kd_weight trains the student away from the teacher). 0 switches a term off."""
    for name, value in weights.items():
        if value < 0:
            raise ValueError(f"loss.{name} must be >= 0, got {value}")
