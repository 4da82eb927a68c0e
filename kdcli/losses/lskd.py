"""Logit-standardised KD (Sun, Ren, Li, Wang & Cao, CVPR 2024, "Logit Standardization in
Knowledge Distillation"; official code: sunshangquan/logit-standardization-KD, built on
mdistiller, distillers/KD.py with --logit-stand).

Each sample's logits are z-scored over the classes before Hinton's temperature softmax:

    Z(z) = (z - mean(z)) / (std(z) + eps)          per row, std with Bessel's correction (C - 1)
    loss = ce_weight * CE(s, y) + kd_weight * T^2 * KL(softmax(Z(t) / T) || softmax(Z(s) / T))

Hinton's shared temperature asks the student to match the teacher's logit range and variance
as well as their ranking; a small student often cannot. After Z the KD term sees only the
logits' relations: it is the same for t and a * t + b (a > 0), on either side. T here is the
paper's "base temperature" applied to the standardised logits (the paper reads std * T as each
sample's own temperature): the official runs use 2 or 3 where Hinton KD uses 4. CE stays on
the raw logits, as in the official code.
"""

from __future__ import annotations

import torch

from kdcli.losses.hinton import HintonKD, kl_div_with_temperature

# The official code's guard: (z - mean) / (eps + std). A constant row (std 0) standardises to
# zeros, i.e. a uniform softmax, instead of 0 / 0.
_EPS = 1e-7


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Z-score each row over the classes (last dim), in float32 whatever the input's dtype.

    Cached teacher logits are float16 (student logits bf16 under autocast): z-scores computed
    in that width keep about three significant digits, as subtracting the row's mean cancels
    the leading ones, so the mean, the std and the result are float32.
    torch.std's backward is 0 (not NaN) where the std is 0, so a constant row gives a finite
    gradient, if a large one: Z is scale-free, so its gradient grows as 1 / std, and at std 0
    it is the centred upstream gradient divided by eps, as in the official code.
    """
    logits = logits.float()
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)  # unbiased (C - 1), torch's default, as official
    return (logits - mean) / (std + _EPS)


class LogitStandardKD(HintonKD):
    """Hinton KD on per-sample z-scored logits, plus the hard-label term on the raw logits."""

    def __init__(self, temperature: float = 2.0, ce_weight: float = 1.0, kd_weight: float = 9.0
                 ) -> None:
        super().__init__(temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight)

    def soft_term(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor
                  ) -> torch.Tensor:
        return kl_div_with_temperature(standardize(student_logits), standardize(teacher_logits),
                                       self.temperature)
