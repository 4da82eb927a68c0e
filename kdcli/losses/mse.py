"""Logit matching by mean squared error (Ba & Caruana, 2014, "Do Deep Nets Really Need to be
Deep?"; compared with KL in Kim et al., 2021, "Comparing Kullback-Leibler Divergence and Mean
Squared Error Loss in Knowledge Distillation").

    loss = ce_weight * CE(s, y) + kd_weight * mean_{i,c} (s_ic - t_ic)^2

The kd term is `F.mse_loss(s, t)` with reduction "mean", i.e. averaged over all N x C elements,
not summed over classes: multiply `kd_weight` by C for the per-sample sum that some codebases
use. There is no temperature: raw logits are matched. Hinton et al. (2015) note that T^2-scaled
KD tends to this logit matching as T -> infinity (for zero-mean logits); Kim et al. find the
plain MSE on logits often distils better than KL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcli.losses.base import DistillationLoss, Outputs, check_weights


class LogitMSE(DistillationLoss):
    """Regress the student's logits onto the teacher's, plus the hard-label term."""

    def __init__(self, ce_weight: float = 1.0, kd_weight: float = 1.0) -> None:
        super().__init__()
        check_weights(ce_weight=ce_weight, kd_weight=kd_weight)
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight

    def forward(self, student: Outputs, teacher: Outputs | None, targets: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        assert teacher is not None, "LogitMSE needs teacher logits"
        ce = F.cross_entropy(student.logits.float(), targets)
        # The teacher is a fixed target: no gradient may flow into it.
        kd = F.mse_loss(student.logits.float(), teacher.logits.detach().float(), reduction="mean")
        return {"loss": self.ce_weight * ce + self.kd_weight * kd, "ce": ce, "kd": kd}
