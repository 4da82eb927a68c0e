"""Feature losses (FitNets, attention transfer) against hand computations on (2, 2, 2, 2) maps,
shape bridging, where gradients go, and a resnet8 <- resnet20 step through real FeatureTaps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import kdcli.configs
from kdcli.losses.attention import AttentionTransfer, attention_map
from kdcli.losses.base import DistillationLoss, Outputs
from kdcli.losses.fitnets import FitNets, resize_spatial
from kdcli.losses.hinton import HintonKD
from kdcli.models.cifar import resnet8, resnet20
from kdcli.models.features import FeatureTap
from kdcli.models.small import tiny_cnn

LOSS_DIR = Path(kdcli.configs.__file__).parent / "loss"

# (N, C, H, W) = (2, 2, 2, 2), nested [n][c][h][w]; the student has a negative entry so that
# |f|^p matters for odd p.
S = [[[[1.0, 2.0], [0.0, 1.0]], [[1.0, 0.0], [2.0, -1.0]]],
     [[[0.0, 1.0], [1.0, 0.0]], [[3.0, 1.0], [0.0, 1.0]]]]
T = [[[[2.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, 2.0]]],
     [[[1.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 2.0]]]]
LOGITS_S = [[1.0, 2.0, 0.5], [-1.0, 0.0, 3.0]]
LOGITS_T = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]
TARGETS = [1, 2]


def manual_attention(f: list, p: float) -> list[list[float]]:
    """Per sample: channel mean of |f|^p at each (h, w), in row-major order, over its L2 norm."""
    maps = []
    for sample in f:
        channels, height, width = len(sample), len(sample[0]), len(sample[0][0])
        q = [sum(abs(sample[c][h][w]) ** p for c in range(channels)) / channels
             for h in range(height) for w in range(width)]
        norm = math.sqrt(sum(v * v for v in q))
        maps.append([v / norm for v in q])
    return maps


def manual_at(s: list, t: list, p: float = 2.0) -> float:
    a_s, a_t = manual_attention(s, p), manual_attention(t, p)
    diffs = [(x - y) ** 2 for rs, rt in zip(a_s, a_t, strict=True)
             for x, y in zip(rs, rt, strict=True)]
    return sum(diffs) / len(diffs)


def manual_mse(s: list, t: list) -> float:
    a, b = torch.tensor(s).flatten().tolist(), torch.tensor(t).flatten().tolist()
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / len(a)


def outputs(logits, **features: torch.Tensor) -> Outputs:
    return Outputs(torch.as_tensor(logits), dict(features))


def fitnets_pair(s: torch.Tensor, t: torch.Tensor, **kwargs) -> tuple[FitNets, Outputs, Outputs]:
    """A FitNets on layer "f" of both sides, set up on (s, t)."""
    loss = FitNets(student_layer="f", teacher_layer="f", **kwargs)
    student, teacher = outputs(LOGITS_S, f=s), outputs(LOGITS_T, f=t)
    loss.setup(student, teacher)
    return loss, student, teacher


def make_identity(adapter: nn.Module) -> None:
    """1x1 conv = identity, BatchNorm in eval mode with mean 0, var 1, eps 0: r(x) == x exactly."""
    conv, bn = adapter[0], adapter[1]
    with torch.no_grad():
        conv.weight.copy_(torch.eye(conv.out_channels).view_as(conv.weight))
    bn.eval()
    bn.eps = 0.0  # default 1e-5 would scale by 1/sqrt(1 + eps)


# ------------------------------------------------------------------------------------------------
# Attention transfer


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_attention_map_matches_hand_computation(p: float):
    got = attention_map(torch.tensor(S), p)
    assert got.shape == (2, 4)
    expected = [v for row in manual_attention(S, p) for v in row]
    assert got.flatten().tolist() == pytest.approx(expected, abs=1e-6)


def test_at_value_matches_hand_computation():
    loss = AttentionTransfer(student_layers=["f"], teacher_layers=["f"], at_weight=1000.0)
    student, teacher = outputs(LOGITS_S, f=torch.tensor(S)), outputs(LOGITS_T, f=torch.tensor(T))
    loss.setup(student, teacher)
    out = loss(student, teacher, torch.tensor(TARGETS))
    expected = manual_at(S, T)
    assert expected > 0
    assert out["at"].item() == pytest.approx(expected, rel=1e-5)
    ce = F.cross_entropy(torch.tensor(LOGITS_S), torch.tensor(TARGETS))
    assert out["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(ce.item() + 1000.0 * expected, rel=1e-5)
    assert set(out) == {"loss", "ce", "at"}


def test_at_sums_over_layer_pairs():
    s2 = [[[[v * 0.5 + 1.0 for v in row] for row in ch] for ch in n] for n in T]
    loss = AttentionTransfer(student_layers=("a", "b"), teacher_layers=("x", "y"))
    student = outputs(LOGITS_S, a=torch.tensor(S), b=torch.tensor(s2))
    teacher = outputs(LOGITS_T, x=torch.tensor(T), y=torch.tensor(S))
    out = loss(student, teacher, torch.tensor(TARGETS))
    assert out["at"].item() == pytest.approx(manual_at(S, T) + manual_at(s2, S), rel=1e-5)


def test_at_is_zero_when_student_matches_teacher():
    t = torch.tensor(T)
    loss = AttentionTransfer(student_layers=["f"], teacher_layers=["f"])
    # Maps are normalised, so a positive rescaling of the same features also costs nothing.
    for s in (t.clone(), 3.0 * t):
        out = loss(outputs(LOGITS_S, f=s), outputs(LOGITS_T, f=t), torch.tensor(TARGETS))
        assert out["at"].item() == pytest.approx(0.0, abs=1e-12)
        assert out["loss"].item() == pytest.approx(out["ce"].item(), rel=1e-6)


def test_at_channel_counts_may_differ():
    s = torch.rand(2, 3, 4, 4)
    t = torch.rand(2, 5, 4, 4)
    loss = AttentionTransfer(student_layers=["f"], teacher_layers=["f"])
    out = loss(outputs(LOGITS_S, f=s), outputs(LOGITS_T, f=t), torch.tensor(TARGETS))
    expected = (attention_map(s) - attention_map(t)).pow(2).mean()
    assert out["at"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("student_size", [8, 2], ids=["student_larger", "student_smaller"])
def test_at_bridges_spatial_sizes(student_size: int):
    s = torch.rand(2, 3, student_size, student_size, requires_grad=True)
    t = torch.rand(2, 4, 4, 4)
    loss = AttentionTransfer(student_layers=["f"], teacher_layers=["f"])
    out = loss(outputs(LOGITS_S, f=s), outputs(LOGITS_T, f=t), torch.tensor(TARGETS))
    resized = resize_spatial(s, (4, 4))
    expected = (attention_map(resized) - attention_map(t)).pow(2).mean()
    assert torch.isfinite(out["loss"])
    assert out["at"].item() == pytest.approx(expected.item(), rel=1e-6)
    out["loss"].backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_resize_spatial_pools_down_and_interpolates_up():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    assert torch.equal(resize_spatial(x, (4, 4)), F.avg_pool2d(x, 2))
    small = torch.rand(2, 3, 2, 2)
    up = F.interpolate(small, size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.equal(resize_spatial(small, (4, 4)), up)
    assert resize_spatial(x, (8, 8)) is x


def test_at_gradients_reach_the_student_only():
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T, requires_grad=True)
    logits_s = torch.tensor(LOGITS_S, requires_grad=True)
    logits_t = torch.tensor(LOGITS_T, requires_grad=True)
    loss = AttentionTransfer(student_layers=["f"], teacher_layers=["f"], kd_weight=1.0)
    out = loss(Outputs(logits_s, {"f": s}), Outputs(logits_t, {"f": t}), torch.tensor(TARGETS))
    out["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert logits_s.grad is not None
    assert t.grad is None and logits_t.grad is None
    assert list(loss.parameters()) == []


def test_at_rejects_unpaired_layer_lists():
    with pytest.raises(ValueError, match="pair up"):
        AttentionTransfer(student_layers=["layer1", "layer2"], teacher_layers=["layer2"])


@pytest.mark.parametrize("cls, weight", [
    (FitNets, "hint_weight"), (FitNets, "ce_weight"), (FitNets, "kd_weight"),
    (AttentionTransfer, "at_weight"), (AttentionTransfer, "ce_weight"),
    (AttentionTransfer, "kd_weight"),
])
def test_negative_weight_raises(cls, weight):
    with pytest.raises(ValueError, match=rf"^loss\.{weight} must be >= 0, got -0.5$"):
        cls(**{weight: -0.5})
    cls(**{weight: 0.0})


def test_at_setup_rejects_non_map_features_naming_the_layer():
    loss = AttentionTransfer(student_layers=["layer3", "fc"], teacher_layers=["layer3", "fc"])
    student = outputs(LOGITS_S, layer3=torch.rand(2, 4, 2, 2), fc=torch.rand(2, 3))
    teacher = outputs(LOGITS_T, layer3=torch.rand(2, 4, 2, 2), fc=torch.rand(2, 3))
    with pytest.raises(ValueError, match="'fc'"):
        loss.setup(student, teacher)


def test_layer_lists_accept_listconfig_and_a_bare_string():
    loss = AttentionTransfer(student_layers=OmegaConf.create(["layer1", "layer2"]),
                             teacher_layers=OmegaConf.create(["block1", "block2"]))
    assert loss.student_layers == ("layer1", "layer2")
    assert loss.teacher_layers == ("block1", "block2")
    single = AttentionTransfer(student_layers="layer2", teacher_layers="block2")
    assert single.student_layers == ("layer2",) and single.teacher_layers == ("block2",)
    # The default is a tuple: instances never share a mutable list.
    assert AttentionTransfer().student_layers == ("layer1", "layer2", "layer3")


def test_missing_feature_says_what_arrived():
    loss = AttentionTransfer(student_layers=["layer2"], teacher_layers=["layer2"])
    student = outputs(LOGITS_S, layer2=torch.rand(2, 2, 2, 2))
    teacher = outputs(LOGITS_T, layer1=torch.rand(2, 2, 2, 2))
    with pytest.raises(KeyError, match="teacher feature 'layer2'.*layer1"):
        loss(student, teacher, torch.tensor(TARGETS))


# ------------------------------------------------------------------------------------------------
# FitNets


def test_fitnets_setup_builds_conv_bn_for_maps():
    loss, _, _ = fitnets_pair(torch.rand(2, 3, 4, 4), torch.rand(2, 5, 4, 4))
    conv, bn = loss.adapter
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    assert conv.weight.shape == (5, 3, 1, 1) and conv.bias is None
    assert bn.num_features == 5
    # Registered: the optimizer and the checkpoint see the adapter.
    assert {n for n, _ in loss.named_parameters()} == {
        "adapter.0.weight", "adapter.1.weight", "adapter.1.bias"}
    assert "adapter.1.running_mean" in loss.state_dict()


@pytest.mark.parametrize("s_shape, t_shape", [((2, 6), (2, 9)), ((2, 6, 3, 3), (2, 9)),
                                              ((2, 6), (2, 9, 3, 3))],
                         ids=["vectors", "map_to_vector", "vector_to_map"])
def test_fitnets_setup_builds_linear_when_a_side_is_a_vector(s_shape, t_shape):
    s = torch.rand(*s_shape, requires_grad=True)
    t = torch.rand(*t_shape)
    loss, student, teacher = fitnets_pair(s, t)
    assert isinstance(loss.adapter, nn.Linear)
    assert (loss.adapter.in_features, loss.adapter.out_features) == (6, 9)
    out = loss(student, teacher, torch.tensor(TARGETS))
    s_vec = s.mean(dim=(2, 3)) if s.ndim == 4 else s
    t_vec = t.mean(dim=(2, 3)) if t.ndim == 4 else t
    expected = F.mse_loss(loss.adapter(s_vec), t_vec)
    assert out["hint"].item() == pytest.approx(expected.item(), rel=1e-6)
    out["loss"].backward()
    assert s.grad is not None and loss.adapter.weight.grad is not None


def test_fitnets_hint_is_mse_of_the_adapted_student():
    s, t = torch.rand(2, 3, 4, 4), torch.rand(2, 5, 4, 4)
    loss, student, teacher = fitnets_pair(s, t, hint_weight=100.0)
    out = loss(student, teacher, torch.tensor(TARGETS))
    expected = F.mse_loss(loss.adapter(s), t)
    assert out["hint"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + 100.0 * expected.item(),
                                               rel=1e-6)
    assert set(out) == {"loss", "ce", "hint"}


def test_fitnets_identity_adapter_gives_plain_mse():
    loss, student, teacher = fitnets_pair(torch.tensor(S), torch.tensor(T), hint_weight=100.0)
    make_identity(loss.adapter)
    out = loss(student, teacher, torch.tensor(TARGETS))
    expected = manual_mse(S, T)  # squared differences sum to 26 over 16 entries
    assert expected == pytest.approx(26 / 16)
    assert out["hint"].item() == pytest.approx(expected, rel=1e-6)
    ce = F.cross_entropy(torch.tensor(LOGITS_S), torch.tensor(TARGETS)).item()
    assert out["loss"].item() == pytest.approx(ce + 100.0 * expected, rel=1e-6)
    # ... and zero when the student's map already is the teacher's.
    same = loss(outputs(LOGITS_S, f=torch.tensor(T)), teacher, torch.tensor(TARGETS))
    assert same["hint"].item() == 0.0


@pytest.mark.parametrize("student_size", [8, 2], ids=["student_larger", "student_smaller"])
def test_fitnets_bridges_spatial_sizes(student_size: int):
    s = torch.rand(2, 3, student_size, student_size, requires_grad=True)
    t = torch.rand(2, 5, 4, 4)
    loss, student, teacher = fitnets_pair(s, t)
    out = loss(student, teacher, torch.tensor(TARGETS))
    assert torch.isfinite(out["loss"])
    expected = F.mse_loss(loss.adapter(resize_spatial(s, (4, 4))), t)
    assert out["hint"].item() == pytest.approx(expected.item(), rel=1e-6)
    out["loss"].backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_fitnets_gradients_reach_student_and_adapter_not_teacher():
    s = torch.rand(2, 3, 4, 4, requires_grad=True)
    t = torch.rand(2, 5, 4, 4, requires_grad=True)
    logits_t = torch.tensor(LOGITS_T, requires_grad=True)
    loss = FitNets(student_layer="f", teacher_layer="f", kd_weight=1.0)
    student = Outputs(torch.tensor(LOGITS_S, requires_grad=True), {"f": s})
    teacher = Outputs(logits_t, {"f": t})
    loss.setup(student, teacher)
    loss(student, teacher, torch.tensor(TARGETS))["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    for name, param in loss.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert t.grad is None and logits_t.grad is None


def test_fitnets_forward_before_setup_raises():
    loss = FitNets(student_layer="f", teacher_layer="f")
    with pytest.raises(RuntimeError, match="setup"):
        loss(outputs(LOGITS_S, f=torch.rand(2, 2, 2, 2)),
             outputs(LOGITS_T, f=torch.rand(2, 2, 2, 2)), torch.tensor(TARGETS))


def test_fitnets_rejects_other_ranks_naming_the_layer():
    loss = FitNets(student_layer="tokens", teacher_layer="f")
    with pytest.raises(ValueError, match="'tokens'"):
        loss.setup(outputs(LOGITS_S, tokens=torch.rand(2, 5, 3)),
                   outputs(LOGITS_T, f=torch.rand(2, 2, 2, 2)))


def test_fitnets_state_dict_round_trip_after_setup():
    s, t = torch.rand(2, 3, 4, 4), torch.rand(2, 5, 4, 4)
    loss, student, teacher = fitnets_pair(s, t)
    loss(student, teacher, torch.tensor(TARGETS))  # updates the BatchNorm running stats
    resumed, _, _ = fitnets_pair(s, t)
    resumed.load_state_dict(loss.state_dict())
    loss.eval()
    resumed.eval()
    assert torch.equal(loss.adapter(s), resumed.adapter(s))


def test_feature_losses_compute_in_float32_from_bf16_features():
    s, t = torch.rand(2, 3, 4, 4).bfloat16(), torch.rand(2, 5, 4, 4).bfloat16()
    student, teacher = outputs(LOGITS_S, f=s), outputs(LOGITS_T, f=t)
    fit = FitNets(student_layer="f", teacher_layer="f")
    fit.setup(student, teacher)
    at = AttentionTransfer(student_layers=["f"], teacher_layers=["f"])
    for loss in (fit, at):
        out = loss(student, teacher, torch.tensor(TARGETS))
        assert all(v.dtype == torch.float32 for v in out.values())
        # As the engine calls it under AMP: the adapter's conv runs in bf16, the terms do not.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = loss(student, teacher, torch.tensor(TARGETS))
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())


# ------------------------------------------------------------------------------------------------
# Both


@pytest.mark.parametrize("make", [
    lambda **kw: FitNets(student_layer="f", teacher_layer="f", **kw),
    lambda **kw: AttentionTransfer(student_layers=["f"], teacher_layers=["f"], **kw),
], ids=["fitnets", "attention"])
def test_kd_weight_adds_hintons_kd_term(make):
    targets = torch.tensor(TARGETS)
    student = outputs(LOGITS_S, f=torch.tensor(S))
    teacher = outputs(LOGITS_T, f=torch.tensor(T))
    without, with_kd = make(), make(kd_weight=0.5, temperature=2.0)
    without.setup(student, teacher)
    with_kd.setup(student, teacher)
    with_kd.load_state_dict(without.state_dict())  # same FitNets adapter in both
    base = without(student, teacher, targets)
    out = with_kd(student, teacher, targets)
    assert "kd" not in base
    hinton = HintonKD(temperature=2.0, ce_weight=1.0, kd_weight=1.0)(student, teacher, targets)
    assert out["kd"].item() == pytest.approx(hinton["kd"].item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(base["loss"].item() + 0.5 * hinton["kd"].item(),
                                               rel=1e-6)


@pytest.mark.parametrize("stem", ["fitnets", "attention"])
def test_feature_loss_configs_bind_and_need_features(stem: str):
    loss = instantiate(OmegaConf.load(LOSS_DIR / f"{stem}.yaml"))
    assert isinstance(loss, DistillationLoss)
    assert loss.needs_features and loss.needs_teacher
    assert FitNets().needs_features and AttentionTransfer().needs_features


def _probe(student: nn.Module, teacher: nn.Module, loss: DistillationLoss, x: torch.Tensor
           ) -> tuple[Outputs, Outputs]:
    """One batch through both models with taps on the loss's layers, as the student stage does."""
    s_tap = FeatureTap(student, list(loss.student_layers), role="student")
    t_tap = FeatureTap(teacher, list(loss.teacher_layers), role="teacher")
    try:
        s_logits = student(x)
        with torch.no_grad():
            t_logits = teacher(x)
        return Outputs(s_logits, s_tap.pop()), Outputs(t_logits, t_tap.pop())
    finally:
        s_tap.remove()
        t_tap.remove()


# (config stem, overrides, student factory, the student's modules up to the deepest tapped layer)
END_TO_END = [
    ("fitnets", {}, resnet8, ("conv1", "bn1", "layer1", "layer2")),
    ("attention", {}, resnet8, ("conv1", "bn1", "layer1", "layer2", "layer3")),
    # A tiny_cnn student with its own names; its 8x8 block2 is upsampled to layer2's 16x16.
    ("fitnets", {"student_layer": "block2"}, tiny_cnn, ("block1", "block2")),
    ("attention", {"student_layers": ["block1", "block2", "block3"]}, tiny_cnn,
     ("block1", "block2", "block3")),
]


@pytest.mark.parametrize("stem, overrides, make_student, upstream", END_TO_END,
                         ids=["fitnets", "attention", "fitnets_tiny_cnn", "attention_tiny_cnn"])
def test_resnet20_teacher_to_student_step(stem, overrides, make_student, upstream):
    torch.manual_seed(0)
    cfg = OmegaConf.merge(OmegaConf.load(LOSS_DIR / f"{stem}.yaml"), overrides)
    # CE off: every gradient below then comes through the feature term alone.
    loss = instantiate(cfg, ce_weight=0.0)
    teacher, student = resnet20(), make_student()
    teacher.eval().requires_grad_(False)
    student.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))

    with torch.no_grad():
        probe_s, probe_t = _probe(student, teacher, loss, x)
    loss.setup(probe_s, probe_t)
    # What the optimizer will get on top of the student's: FitNets' adapter, nothing for AT.
    assert bool(list(loss.parameters())) == (stem == "fitnets")

    s_out, t_out = _probe(student, teacher, loss, x)
    out = loss(s_out, t_out, y)
    assert torch.isfinite(out["loss"])
    feature_term = out["hint"] if stem == "fitnets" else out["at"]
    assert feature_term.item() > 0
    out["loss"].backward()

    for name, param in student.named_parameters():
        if name.split(".")[0] in upstream:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:  # downstream of every tapped layer: reached only through the (zero-weight) CE
            assert param.grad is None or not param.grad.any(), name
    for name, param in loss.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"adapter {name}"
    assert all(p.grad is None for p in teacher.parameters())
