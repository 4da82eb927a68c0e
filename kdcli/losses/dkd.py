"""Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu & Liang, CVPR 2022, "Decoupled
Knowledge Distillation"; official code: megvii-research/mdistiller, distillers/DKD.py).

With p = softmax(z / T) and y the target class, the KL of Hinton KD splits into

    TCKD = T^2 * KL([p_t_y, 1 - p_t_y] || [p_s_y, 1 - p_s_y])      binary: target vs the rest
    NCKD = T^2 * KL(q_t || q_s),  q = softmax(z / T - 1000 * onehot(y))   among non-target classes

    loss = ce_weight * CE(s, y) + alpha * TCKD + beta * NCKD

Both KLs are summed over classes and averaged over the batch. `alpha` and `beta` keep the paper's
own names for its two term weights, so values carry over from its tables unchanged. The binary
log-probabilities are taken in log space (logsumexp of log_softmax) rather than as log(sum of
softmax) as in the official code: the same value, without log(0) when a probability underflows.
As in the official code, the DKD term is ramped in linearly over the first `warmup_epochs`
epochs: times min(e / warmup_epochs, 1) in epoch e = 1, 2, ... The official runs warm up for
20 of 240 epochs; `warmup_epochs=auto` keeps that share of a shorter run (epochs / 12, at most
20), a number is taken as given (0: no ramp; one longer than the run is reported, as the term
then never reaches its full weight; under torchrun by rank 0 alone, not once per rank).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F

from kdcli import distributed
from kdcli.losses.base import DistillationLoss, Outputs, check_temperature, check_weights

# The target logit (after dividing by T) is set this far below the row's smallest to drop it from
# the non-target softmax: exp(-1000) is 0 in float32, so the class is removed exactly. (The
# official code subtracts 1000 from the target logit, which stops removing it once a row's
# logits / T span more than ~1000, e.g. at a very small T.)
_MASK = 1000.0

# The official warmup: 20 epochs of a 240-epoch run.
OFFICIAL_WARMUP, OFFICIAL_EPOCHS = 20, 240

log = logging.getLogger(__name__)


def _binary_log_probs(log_p: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """(N, C) log-probabilities -> (N, 2) log [p_target, p_non-target], computed in log space."""
    log_p_gt = log_p.masked_fill(~gt_mask, float("-inf")).logsumexp(dim=1, keepdim=True)
    log_p_other = log_p.masked_fill(gt_mask, float("-inf")).logsumexp(dim=1, keepdim=True)
    return torch.cat([log_p_gt, log_p_other], dim=1)


def _without_target(x: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """`x` with each row's target entry moved _MASK below the row's smallest entry."""
    return torch.where(gt_mask, x.amin(dim=1, keepdim=True) - _MASK, x)


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each summed over classes, averaged over the batch and times T^2."""
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    gt_mask = F.one_hot(targets, num_classes=s.shape[1]).bool()
    batch = s.shape[0]

    tckd_s = _binary_log_probs(F.log_softmax(s, dim=1), gt_mask)
    tckd_t = _binary_log_probs(F.log_softmax(t, dim=1), gt_mask)
    tckd = F.kl_div(tckd_s, tckd_t, log_target=True, reduction="sum") / batch

    nckd_s = F.log_softmax(_without_target(s, gt_mask), dim=1)
    nckd_t = F.log_softmax(_without_target(t, gt_mask), dim=1)
    nckd = F.kl_div(nckd_s, nckd_t, log_target=True, reduction="sum") / batch
    return tckd * temperature**2, nckd * temperature**2


class DKD(DistillationLoss):
    """Target-class and non-target-class KD weighted separately, plus the hard-label term."""

    def __init__(self, ce_weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0,
                 temperature: float = 4.0, warmup_epochs: float | Literal["auto"] = "auto"
                 ) -> None:
        super().__init__()
        check_temperature(temperature)
        check_weights(ce_weight=ce_weight, alpha=alpha, beta=beta)
        if warmup_epochs != "auto":
            check_weights(warmup_epochs=warmup_epochs)
        self.ce_weight = ce_weight
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs
        self.ramp = 1.0  # the DKD term's weight this epoch (warmup)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        warmup = (min(OFFICIAL_WARMUP, epochs * OFFICIAL_WARMUP / OFFICIAL_EPOCHS)
                  if self.warmup_epochs == "auto" else float(self.warmup_epochs))
        self.ramp = min((epoch + 1) / warmup, 1.0) if warmup else 1.0
        if epoch == 0 and warmup > epochs and distributed.is_main():
            log.warning("loss.warmup_epochs=%g is longer than the run (%d epoch%s): the DKD "
                        "term reaches only %.2f of its weight; lower it, or use auto", warmup,
                        epochs, "" if epochs == 1 else "s", epochs / warmup)

    def forward(self, student: Outputs, teacher: Outputs | None, targets: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        assert teacher is not None, "DKD needs teacher logits"
        ce = F.cross_entropy(student.logits.float(), targets)
        # The teacher is a fixed target: no gradient may flow into it.
        tckd, nckd = dkd_terms(student.logits, teacher.logits.detach(), targets, self.temperature)
        kd = self.ramp * (self.alpha * tckd + self.beta * nckd)
        return {"loss": self.ce_weight * ce + kd, "ce": ce, "tckd": tckd, "nckd": nckd, "kd": kd}
