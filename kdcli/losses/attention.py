"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention:
Improving the Performance of Convolutional Neural Networks via Attention Transfer"; benchmark
setting of CRD: HobbitLong/RepDistiller, distiller_zoo/AT.py, scripts/run_cifar_distill.sh).

For an (N, C, H, W) map f the spatial attention map is the channel mean of |f|^p, flattened and
L2-normalised per sample:

    a(f) = normalize(mean_c |f_c|^p)                     (N, H*W), unit L2 norm per row
    at   = sum over layer pairs of mean((a(f_s) - a(f_t))^2)      mean over N * H * W
    loss = ce_weight * CE(s, y) + at_weight * at + kd_weight * T^2 * KL(p_t || p_s)

This is AT.py's `at` and `at_loss` (F.normalize(f.pow(p).mean(1).view(N, -1)), then
(a_s - a_t).pow(2).mean(), summed over the pairs by train_student.py); |f|^p is the paper's
definition and equals f.pow(p) for the default p = 2. Channel counts may differ (the channel
mean removes them) and nothing is learned. Spatial sizes are bridged automatically: the student's
map is resized to the teacher's H x W before a(.) (average pooling to shrink, bilinear to grow),
where AT.py instead average-pools whichever map is larger.

Defaults follow CRD's CIFAR-100 AT runs (`-r 1 -a 0 -b 1000`, the outputs of the three residual
stages, p = 2): CE + 1000 * at and no KD term, hence kd_weight 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdcli.losses.base import DistillationLoss, Outputs, check_temperature, check_weights
from kdcli.losses.fitnets import as_layer_names, feature, resize_spatial, with_logit_terms

STAGES = ("layer1", "layer2", "layer3")


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W): channel mean of |f|^p, L2-normalised per sample, in float32."""
    return F.normalize(f.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


def _check_map(x: torch.Tensor, layer: str, role: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"AttentionTransfer needs (N, C, H, W) feature maps; {role} layer "
                         f"{layer!r} gives shape {tuple(x.shape)}. Pick convolutional layers.")


class AttentionTransfer(DistillationLoss):
    """Matches normalised spatial attention maps of paired student/teacher layers, plus CE."""

    def __init__(self, student_layers: Sequence[str] = STAGES,
                 teacher_layers: Sequence[str] = STAGES, at_weight: float = 1000.0,
                 ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0,
                 p: float = 2.0) -> None:
        super().__init__()
        self.student_layers = as_layer_names(student_layers)
        self.teacher_layers = as_layer_names(teacher_layers)
        if len(self.student_layers) != len(self.teacher_layers):
            raise ValueError(f"loss.student_layers and loss.teacher_layers pair up one to one; got "
                             f"{len(self.student_layers)} student layers "
                             f"{list(self.student_layers)} and {len(self.teacher_layers)} teacher "
                             f"layers {list(self.teacher_layers)}")
        if not self.student_layers:
            raise ValueError("AttentionTransfer needs at least one pair of layers")
        check_temperature(temperature)
        if p <= 0:
            raise ValueError(f"loss.p must be > 0, got {p}")
        check_weights(at_weight=at_weight, ce_weight=ce_weight, kd_weight=kd_weight)
        self.at_weight = at_weight
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.p = p

    def _pairs(self, student: Outputs, teacher: Outputs):
        for s_layer, t_layer in zip(self.student_layers, self.teacher_layers, strict=True):
            s = feature(student, s_layer, "student")
            t = feature(teacher, t_layer, "teacher")
            _check_map(s, s_layer, "student")
            _check_map(t, t_layer, "teacher")
            yield s, t

    def setup(self, student: Outputs, teacher: Outputs) -> None:
        """Checks on the probe batch that every paired layer gives a 4-D map. Nothing is built."""
        for _ in self._pairs(student, teacher):
            pass

    def at(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        """One pair's mean((a(f_s) - a(f_t))^2); the teacher's map is a constant target."""
        s = resize_spatial(student_feature.float(), teacher_feature.shape[-2:])
        a_s = attention_map(s, self.p)
        a_t = attention_map(teacher_feature.detach(), self.p)
        return (a_s - a_t).pow(2).mean()

    def forward(self, student: Outputs, teacher: Outputs | None, targets: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        assert teacher is not None, "AttentionTransfer needs a live teacher's features"
        at = sum(self.at(s, t) for s, t in self._pairs(student, teacher))
        return with_logit_terms(self, "at", self.at_weight, at, student, teacher, targets)
