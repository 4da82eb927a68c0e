"""FitNets hint loss (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, ICLR 2015, "FitNets: Hints
for Thin Deep Nets"; benchmark setting of CRD: HobbitLong/RepDistiller, distiller_zoo/FitNet.py,
models/util.py ConvReg, scripts/run_cifar_distill.sh).

A learned regressor r maps the student's "guided" layer onto the teacher's "hint" layer:

    hint = mean((r(f_s) - f_t)^2)                       mean over every element, as nn.MSELoss
    loss = ce_weight * CE(s, y) + hint_weight * hint + kd_weight * T^2 * KL(p_t || p_s)

r is sized from the real feature shapes in `setup`: for (N, C, H, W) maps a 1x1
Conv2d(C_s, C_t, bias=False) + BatchNorm2d(C_t), as CRD's ConvReg when the spatial sizes match
(ConvReg's conv bias is dropped: the BatchNorm right after it cancels it); for (N, D) vectors
(e.g. MLP layers) a Linear(D_s, D_t); a map paired with a vector is global-average-pooled to
(N, C) first and joined by a Linear. Shapes are bridged automatically: a student map larger than
the teacher's is adaptive-average-pooled down to the teacher's H x W, a smaller one is upsampled
bilinearly, before r (CRD's ConvReg does this with strided or transposed convs instead).

Defaults follow CRD's CIFAR-100 FitNets runs (`-r 1 -a 0 -b 100`, hint on the output of the second
stage): CE + 100 * hint and no KD term, hence kd_weight 0. Two differences from the sources: CRD's
regressor ends in a ReLU (ConvReg(use_relu=True), the paper's "same non-linearity" as the hint
layer) and r here does not, and the paper's first stage (pre-training the student's lower half on
the hint alone, then KD) is not run: like CRD, the hint is added to the loss from the start.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.losses.base import DistillationLoss, Outputs, check_temperature, check_weights
from kdcli.losses.hinton import kl_div_with_temperature


def as_layer_names(layers: str | Sequence[str]) -> tuple[str, ...]:
    """A config's layer list (list, tuple or Hydra ListConfig; a bare string is one layer)."""
    return (layers,) if isinstance(layers, str) else tuple(str(name) for name in layers)


def feature(outputs: Outputs, layer: str, role: str) -> torch.Tensor:
    """`outputs.features[layer]`, with an error that says which features did arrive."""
    try:
        return outputs.features[layer]
    except KeyError:
        raise KeyError(f"no {role} feature {layer!r} in the outputs (got "
                       f"{sorted(outputs.features) or 'none'}); the {role} needs a FeatureTap "
                       f"on that layer") from None


def resize_spatial(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Brings an (N, C, H, W) map to `size` (H, W): average pooling to shrink (no information is
    invented), bilinear interpolation to grow."""
    size = tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def with_logit_terms(loss: DistillationLoss, name: str, weight: float, term: torch.Tensor,
                     student: Outputs, teacher: Outputs, targets: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """A feature loss's result: `weight * term + loss.ce_weight * CE(s, y)`, plus
    `loss.kd_weight * T^2 * KL(p_t || p_s)` at `loss.temperature` when kd_weight > 0 (not computed
    otherwise). Each term is also returned under its name for the log."""
    ce = F.cross_entropy(student.logits.float(), targets)
    out = {"ce": ce, name: term}
    total = loss.ce_weight * ce + weight * term
    if loss.kd_weight > 0:
        kd = kl_div_with_temperature(student.logits, teacher.logits.detach(), loss.temperature)
        total = total + loss.kd_weight * kd
        out["kd"] = kd
    return {"loss": total, **out}


class FitNets(DistillationLoss):
    """MSE between a learned projection of one student layer and one teacher layer, plus CE."""

    def __init__(self, student_layer: str = "layer2", teacher_layer: str = "layer2",
                 hint_weight: float = 100.0, ce_weight: float = 1.0, kd_weight: float = 0.0,
                 temperature: float = 4.0) -> None:
        super().__init__()
        check_temperature(temperature)
        check_weights(hint_weight=hint_weight, ce_weight=ce_weight, kd_weight=kd_weight)
        self.student_layers = (str(student_layer),)
        self.teacher_layers = (str(teacher_layer),)
        self.hint_weight = hint_weight
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.temperature = temperature
        # Built by setup() once the feature shapes are known; a registered submodule from then on,
        # so its parameters reach the optimizer and its state the checkpoint.
        self.adapter: nn.Module | None = None
        self._pool_student = False  # student map -> (N, C) before a Linear
        self._pool_teacher = False  # teacher map -> (N, C) to meet a Linear's output

    def setup(self, student: Outputs, teacher: Outputs) -> None:
        """Builds the regressor from one probe batch's feature shapes, on the features' device.

        Call it before building the optimizer and before loading a checkpoint's state_dict (the
        adapter's keys only exist once it is built). Calling it again builds a fresh adapter.
        """
        s_layer, t_layer = self.student_layers[0], self.teacher_layers[0]
        s = feature(student, s_layer, "student")
        t = feature(teacher, t_layer, "teacher")
        for x, layer, role in ((s, s_layer, "student"), (t, t_layer, "teacher")):
            if x.ndim not in (2, 4):
                raise ValueError(f"FitNets needs (N, C, H, W) or (N, D) features; {role} layer "
                                 f"{layer!r} gives shape {tuple(x.shape)}")
        device = s.device
        if s.ndim == 4 and t.ndim == 4:
            c_s, c_t = s.shape[1], t.shape[1]
            self.adapter = nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False, device=device),
                                         nn.BatchNorm2d(c_t, device=device))
        else:
            # A vector on either side: compare (N, D) vectors, pooling any map globally.
            self.adapter = nn.Linear(s.shape[1], t.shape[1], device=device)
        self._pool_student = s.ndim == 4 and t.ndim == 2
        self._pool_teacher = s.ndim == 2 and t.ndim == 4

    def hint(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        """mean((r(f_s) - f_t)^2) in float32; the teacher's feature is a constant target."""
        if self.adapter is None:
            raise RuntimeError("FitNets.setup(student, teacher) must run on a probe batch before "
                               "the loss is used: it sizes the regressor from the feature shapes")
        s = student_feature.float()
        t = teacher_feature.float().detach()
        if self._pool_student:
            s = s.mean(dim=(2, 3))
        if self._pool_teacher:
            t = t.mean(dim=(2, 3))
        if s.ndim == 4:
            s = resize_spatial(s, t.shape[-2:])
        return F.mse_loss(self.adapter(s).float(), t)

    def forward(self, student: Outputs, teacher: Outputs | None, targets: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        assert teacher is not None, "FitNets needs a live teacher's features"
        hint = self.hint(feature(student, self.student_layers[0], "student"),
                         feature(teacher, self.teacher_layers[0], "teacher"))
        return with_logit_terms(self, "hint", self.hint_weight, hint, student, teacher, targets)
