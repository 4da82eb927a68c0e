"""Model zoo: every shipped model config builds and runs, CIFAR models match published sizes."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import kdcli.configs
from kdcli.errors import ConfigError
from kdcli.models import cifar
from kdcli.models.mlp import mlp
from kdcli.models.small import tiny_cnn
from kdcli.models.vision import torchvision_model
from kdcli.stages.common import check_training, model_skeleton

CONFIGS = Path(kdcli.configs.__file__).parent
STUDENT_YAMLS = sorted((CONFIGS / "student").glob("*.yaml"))


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_teacher_and_student_groups_match() -> None:
    teachers = {p.name: p.read_text() for p in (CONFIGS / "teacher").glob("*.yaml")}
    students = {p.name: p.read_text() for p in STUDENT_YAMLS}
    assert students, "no student configs found"
    assert sorted(teachers) == sorted(students)
    for name, text in students.items():
        assert teachers[name] == text, f"teacher/{name} differs from student/{name}"


@pytest.mark.parametrize("path", STUDENT_YAMLS, ids=lambda p: p.stem)
def test_config_builds_and_runs(path: Path) -> None:
    cfg = OmegaConf.create(
        {"dataset": {"image_size": 32, "in_features": 3 * 32 * 32}, "student": OmegaConf.load(path)}
    )
    OmegaConf.resolve(cfg)
    assert "num_classes" not in cfg.student, "the pipeline passes num_classes, not the YAML"
    torch.manual_seed(0)
    model = instantiate(cfg.student, num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


# Published sizes on CIFAR-100 (CRD, Tian et al. 2020, Table 1 and appendix), in millions.
@pytest.mark.parametrize(
    ("builder", "millions"),
    [
        (cifar.resnet20, 0.27),
        (cifar.resnet56, 0.86),
        (cifar.resnet110, 1.7),
        (cifar.resnet8x4, 1.2),
        (cifar.resnet32x4, 7.4),
        (cifar.wrn_16_2, 0.70),
        (cifar.wrn_40_1, 0.57),
        (cifar.wrn_40_2, 2.2),
        (cifar.vgg8, 3.96),
        (cifar.vgg13, 9.46),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_cifar_param_counts_match_papers(builder, millions: float) -> None:
    count = _num_params(builder(num_classes=100))
    assert count == pytest.approx(millions * 1e6, rel=0.05)


@pytest.mark.parametrize(
    ("builder", "names"),
    [
        (cifar.resnet20, ["conv1", "layer1", "layer2", "layer3", "layer3.2.relu2", "fc"]),
        (cifar.wrn_16_2, ["conv1", "block1", "block2", "block3", "bn1", "fc"]),
        (cifar.vgg8, ["block0", "relu0", "block3", "block4.bn1", "relu4", "classifier"]),
    ],
    ids=["resnet", "wrn", "vgg"],
)
def test_cifar_module_names_for_feature_taps(builder, names: list[str]) -> None:
    model = builder()
    modules = dict(model.named_modules())
    for name in names:
        assert name in modules
    # In-place activations would overwrite tensors a forward hook has captured.
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_cifar_models_accept_other_input_sizes() -> None:
    out = cifar.resnet8(num_classes=3).eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 3)


def test_mlp_named_layers_and_input_check() -> None:
    model = mlp(num_classes=5, in_features=12, hidden=[8, 4], dropout=0.1)
    names = dict(model.named_modules())
    assert {"layers.fc1", "layers.fc2", "layers.dropout2", "classifier"} <= names.keys()
    assert model(torch.randn(2, 3, 2, 2)).shape == (2, 5)
    # It names the key of kd's configs to set, and its value.
    with pytest.raises(ValueError, match=r"\(48 features\); set dataset\.in_features=48 "):
        model(torch.randn(2, 3, 4, 4))


def test_tiny_cnn_small_inputs() -> None:
    model = tiny_cnn(num_classes=4).eval()
    assert 10_000 < _num_params(model) < 50_000
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_torchvision_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="valid names") as excinfo:
        torchvision_model("nonexistent")
    assert "resnet18" in str(excinfo.value)


def test_torchvision_missing_weights_file_names_path() -> None:
    with pytest.raises(ValueError, match="/no/such/file"):
        torchvision_model("mobilenet_v3_small", weights="/no/such/file")


def test_torchvision_weights_that_are_not_a_state_dict_are_named(tmp_path: Path) -> None:
    junk, listed = tmp_path / "junk.pt", tmp_path / "list.pt"
    junk.write_text("not a torch file\n")
    torch.save([1, 2], listed)
    # torch's own text for the first suggests weights_only=False, against kd's trust model.
    with pytest.raises(ValueError, match=r"junk.pt is not a state dict kd can read safely") as e:
        torchvision_model("mobilenet_v3_small", weights=str(junk))
    assert "weights_only" not in str(e.value) and e.value.__cause__ is None
    with pytest.raises(ValueError, match=r"list.pt holds a list, not a state dict"):
        torchvision_model("mobilenet_v3_small", weights=str(listed))


def test_torchvision_loads_local_state_dict(tmp_path: Path) -> None:
    source = torchvision_model("mobilenet_v3_small", num_classes=7, input_size=32)
    path = tmp_path / "student.pt"
    torch.save(source.state_dict(), path)
    loaded = torchvision_model(
        "mobilenet_v3_small", num_classes=7, input_size=32, weights=str(path)
    )
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_torchvision_resnet_stem_adapted_for_small_inputs() -> None:
    small = torchvision_model("resnet18", input_size=32)
    assert small.conv1.stride == (1, 1)
    assert small.conv1.kernel_size == (3, 3)
    assert isinstance(small.maxpool, nn.Identity)
    large = torchvision_model("resnet18", input_size=224)
    assert large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d)


def test_torchvision_small_input_keeps_resolution() -> None:
    # MobileNetV2 at 32x32 should end at 4x4, not the 1x1 of the ImageNet strides.
    model = torchvision_model("mobilenet_v2", input_size=32).eval()
    with torch.no_grad():
        features = model.features(torch.randn(1, 3, 32, 32))
    assert features.shape[-2:] == (4, 4)


def test_torchvision_unhandled_family_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kdcli.models.vision"):
        torchvision_model("squeezenet1_1", input_size=32)
    assert "no small-input adaptation" in caplog.text


def test_copy_matching_warns_when_nothing_of_use_is_copied(
        caplog: pytest.LogCaptureFixture) -> None:
    from kdcli.models.transfer import copy_matching

    # tiny_cnn-wide -> tiny_cnn: only the BatchNorm step counters and the classifier's bias
    # match (0% of the values), which was logged at INFO only.
    with caplog.at_level(logging.INFO, logger="kdcli.models.transfer"):
        result = copy_matching(tiny_cnn(width=32).state_dict(), tiny_cnn(width=16), "init")
    assert len(result["copied"]) == 4
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "(0% of values); nothing of use was copied" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kdcli.models.transfer"):
        copy_matching(tiny_cnn(width=16).state_dict(), tiny_cnn(width=16), "init")
    [record] = caplog.records
    assert record.levelno == logging.INFO and "(100% of values)" in record.getMessage()


def computing_model(num_classes: int = 10) -> nn.Module:
    """A builder that reads a tensor's value, which the meta device cannot give."""
    model = nn.Linear(4, num_classes)
    assert model.weight.abs().sum().item() > 0
    return model


@pytest.mark.parametrize("target, device", [
    ("kdcli.models.small.tiny_cnn", "meta"),
    ("tests.test_models.computing_model", "cpu"),
])
def test_model_skeleton_builds_on_meta_or_falls_back(target: str, device: str) -> None:
    cfg = OmegaConf.create({"student": {"_target_": target, "init": "scratch"}})
    ctx = SimpleNamespace(cfg=cfg, dataset=SimpleNamespace(num_classes=7), choice=lambda r: "x",
                          selected=lambda r: f"{r}=x")
    model = model_skeleton(ctx, "student")
    assert next(model.parameters()).device.type == device
    assert list(model.parameters())[-1].shape == (7,)  # the classifier's bias


class ValueReadingModel(nn.Module):
    """Reads a tensor's value in forward (`.item()`), which the meta device cannot give."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * (1.0 if x.abs().sum().item() >= 0 else 0.0)


def value_reading_model(num_classes: int = 10) -> nn.Module:
    return ValueReadingModel(num_classes)


@pytest.mark.parametrize("target, overrides, error", [
    ("kdcli.models.small.tiny_cnn", {}, None),
    ("tests.test_models.value_reading_model", {}, None),  # meta cannot run it: the CPU does
    ("kdcli.models.mlp.mlp", {"student.in_features": 100},
     "student=x cannot take dataset d's images (3, 8, 8): MLP expects 100 input features, got "
     "input of shape (2, 3, 8, 8) (192 features); set dataset.in_features=192"),
    ("kdcli.models.small.tiny_cnn", {"optimizer.lr": -1.0},
     "optimizer: ValueError: Invalid learning rate: -1.0"),
    ("kdcli.models.small.tiny_cnn", {"scheduler.gamma": 0.0},
     "scheduler: ValueError: gamma must be > 0, got 0.0"),
])
def test_check_training_probes_the_model_and_builds_its_optimizer(
        target: str, overrides: dict, error: str | None) -> None:
    cfg = OmegaConf.create({
        "student": {"_target_": target},
        "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9},
        "scheduler": {"_target_": "kdcli.schedulers.multistep", "gamma": 0.1},
        "trainer": {"student": {"epochs": 2, "batch_size": 4}}})
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    dataset = SimpleNamespace(num_classes=7, image_shape=(3, 8, 8), name="d", train=range(16))
    ctx = SimpleNamespace(cfg=cfg, dataset=dataset, choice=lambda r: "x",
                          selected=lambda r: f"{r}=x")

    def check() -> nn.Module:
        return check_training(ctx, "student", optimizer="optimizer", scheduler="scheduler",
                              budget=cfg.trainer.student)

    if error is None:
        check()
        return
    with pytest.raises(ConfigError) as err:
        check()
    assert str(err.value).startswith(error)
