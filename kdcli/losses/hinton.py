"""Hinton knowledge distillation (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a
Neural Network").

    loss = ce_weight * CE(s, y) + kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T))

The T^2 factor keeps the soft term's gradient scale independent of T. Weights are named: a bare
"alpha" means the KD weight in some codebases and the CE weight in others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcli.losses.base import DistillationLoss, Outputs, check_temperature, check_weights


def kl_div_with_temperature(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) averaged over the batch, times T^2."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
    return kl * temperature**2


class HintonKD(DistillationLoss):
    """Soft targets at temperature T plus the hard-label term."""

    def __init__(self, temperature: float = 4.0, ce_weight: float = 1.0, kd_weight: float = 1.0
                 ) -> None:
        super().__init__()
        check_temperature(temperature)
        check_weights(ce_weight=ce_weight, kd_weight=kd_weight)
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight

    def forward(self, student: Outputs, teacher: Outputs | None, targets: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        assert teacher is not None, f"{type(self).__name__} needs teacher logits"
        ce = F.cross_entropy(student.logits.float(), targets)
        # The teacher is a fixed target: no gradient may flow into it.
        kd = self.soft_term(student.logits, teacher.logits.detach())
        return {"loss": self.ce_weight * ce + self.kd_weight * kd, "ce": ce, "kd": kd}

    def soft_term(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor
                  ) -> torch.Tensor:
        """The KD term, before its weight (a variant changes what the softmax sees)."""
        return kl_div_with_temperature(student_logits, teacher_logits, self.temperature)
