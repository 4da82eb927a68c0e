"""DIST (Huang, You, Wang, Qian & Xu, NeurIPS 2022, "Knowledge Distillation from A Stronger
Teacher"; official code: hunto/DIST_KD, classification/lib/models/losses/dist_kd.py).

With Y_s = softmax(s / T), Y_t = softmax(t / T) (N x C) and rho the Pearson correlation,

    inter = T^2 * (1 - mean_i rho(Y_s[i, :], Y_t[i, :]))   each sample's ranking of the classes
    intra = T^2 * (1 - mean_c rho(Y_s[:, c], Y_t[:, c]))   each class's ranking of the samples

    loss = ce_weight * CE(s, y) + beta * inter + gamma * intra

Correlation instead of KL asks the student to match the teacher's relative preferences, not its
exact probabilities, which matters when the teacher is much stronger. The intra term correlates
across the batch, so it depends on batch composition (a class column that is constant over the
batch, e.g. with N = 1, contributes a constant 1 and no gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcli.losses.base import DistillationLoss, Outputs, check_temperature, check_weights

# The official code's guard against a zero-variance row: rho = cov / (std_a * std_b + eps).
_EPS = 1e-8


def pearson_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of two (N, C) matrices -> (N,)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + _EPS)


def inter_class_relation(y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """1 - mean over samples of the correlation between their class distributions."""
    return 1 - pearson_correlation(y_s, y_t).mean()


def intra_class_relation(y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """1 - mean over classes of the correlation between their columns across the batch."""
    return inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))


class DIST(DistillationLoss):
    """Inter- and intra-class Pearson correlation between the softened predictions, plus CE."""

    def __init__(self, ce_weight: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
                 temperature: float = 1.0) -> None:
        super().__init__()
        check_temperature(temperature)
        check_weights(ce_weight=ce_weight, beta=beta, gamma=gamma)
        self.ce_weight = ce_weight
        self.beta = beta
        self.gamma = gamma
        self.temperature = temperature

    def forward(self, student: Outputs, teacher: Outputs | None, targets: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        assert teacher is not None, "DIST needs teacher logits"
        ce = F.cross_entropy(student.logits.float(), targets)
        y_s = F.softmax(student.logits.float() / self.temperature, dim=1)
        # The teacher is a fixed target: no gradient may flow into it.
        y_t = F.softmax(teacher.logits.detach().float() / self.temperature, dim=1)
        inter = self.temperature**2 * inter_class_relation(y_s, y_t)
        intra = self.temperature**2 * intra_class_relation(y_s, y_t)
        kd = self.beta * inter + self.gamma * intra
        return {"loss": self.ce_weight * ce + kd, "ce": ce, "inter": inter, "intra": intra,
                "kd": kd}
