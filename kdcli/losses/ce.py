"""Plain cross-entropy on hard labels: trains teachers and from-scratch baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcli.losses.base import DistillationLoss, Outputs


class CrossEntropy(DistillationLoss):
    """loss = CE(student logits, labels), with optional label smoothing."""

    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, student: Outputs, teacher: Outputs | None, targets: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(student.logits.float(), targets, label_smoothing=self.label_smoothing)
        return {"loss": ce, "ce": ce}
