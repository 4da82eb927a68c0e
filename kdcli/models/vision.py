"""Any torchvision classifier by name, with its stem adapted when images are small.

ImageNet stems divide the resolution by 4 (ResNet) or 2 (most others) before the first block,
which leaves almost nothing of a 32x32 image. For `input_size <= 64` these families get the
usual CIFAR treatment instead:

- ResNet, ResNeXt, Wide ResNet: `conv1` becomes a 3x3 stride-1 conv, `maxpool` an Identity.
- MobileNetV2: stride 1 in the stem conv and in the first block of the 24-channel stage
  (`features[2]`), as in the common CIFAR ports, so a 32x32 image ends at 4x4, not 1x1.
- MobileNetV3, EfficientNet (v1 and v2), RegNet, MNASNet: stride 1 in the stem conv.
- ShuffleNetV2: stride 1 in the stem conv, `maxpool` an Identity.
- DenseNet: stride 1 in `features.conv0`, `features.pool0` an Identity.
- VGG: left as is on purpose. It has no strided stem and its five max-pools take 32x32 to 1x1,
  as in CIFAR VGGs (for the CRD VGGs use `kdcli.models.cifar`).

Other families (AlexNet, ConvNeXt, GoogLeNet, Inception v3, MaxViT, SqueezeNet, Swin, ViT) are
built unchanged with a warning; some of them reject 32x32 inputs outright.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

log = logging.getLogger(__name__)

# At 64px an ImageNet stem still leaves ResNet-50 a 2x2 map before its last stage; above that
# the stock stem is the better trade of accuracy for compute.
SMALL_INPUT_MAX = 64


def torchvision_model(
    name: str, num_classes: int = 10, input_size: int = 224, weights: str | None = None
) -> nn.Module:
    """Builds a randomly initialised torchvision classifier, never downloading anything.

    Args:
        name: A torchvision classification model, e.g. `resnet50`, `mobilenet_v3_small`.
        num_classes: Output logits.
        input_size: Image side in pixels; at 64 or less the stem is adapted (see module doc).
        weights: Path of a local state dict (`torch.save(model.state_dict(), path)`) to load
            after the stem adaptation, or None for random init.

    Raises:
        ValueError: Unknown `name`, or `weights` is not an existing file.
    """
    valid = tvm.list_models(module=tvm)
    if name.lower() not in valid:
        raise ValueError(f"unknown torchvision model {name!r}; valid names: {', '.join(valid)}")
    model = tvm.get_model(name.lower(), weights=None, num_classes=num_classes)
    if input_size <= SMALL_INPUT_MAX:
        _adapt_to_small_inputs(model, name, input_size)
    if weights is not None:
        model.load_state_dict(_load_state_dict(weights))
    return model


def _load_state_dict(weights: str) -> dict[str, torch.Tensor]:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(
            f"weights file not found: {weights}. kd never downloads pretrained weights "
            "(names like IMAGENET1K_V1 are not accepted): teachers are trained by kd itself. "
            "Set weights to the path of a local state dict saved with "
            "torch.save(model.state_dict(), path), or to null for random init."
        )
    # weights_only refuses pickled code, so a downloaded file cannot run anything on load.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or pickled code weights_only refuses
        # torch's own text advises weights_only=False, which would let the file run code.
        raise ValueError(f"weights file {path} is not a state dict kd can read safely "
                         f"({type(exc).__name__}); save one with "
                         "torch.save(model.state_dict(), path)") from None
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} holds a {type(state).__name__}, not a state dict; "
                         "save one with torch.save(model.state_dict(), path)")
    return state


def _adapt_to_small_inputs(model: nn.Module, name: str, input_size: int) -> None:
    if isinstance(model, tvm.ResNet):
        old = model.conv1
        model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    elif isinstance(model, tvm.MobileNetV2):
        _unstride(model.features[0])
        _unstride(model.features[2])
    elif isinstance(model, (tvm.MobileNetV3, tvm.EfficientNet)):
        _unstride(model.features[0])
    elif isinstance(model, tvm.RegNet):
        _unstride(model.stem)
    elif isinstance(model, tvm.MNASNet):
        _unstride(model.layers)
    elif isinstance(model, tvm.ShuffleNetV2):
        _unstride(model.conv1)
        model.maxpool = nn.Identity()
    elif isinstance(model, tvm.DenseNet):
        _unstride(model.features.conv0)
        model.features.pool0 = nn.Identity()
    elif isinstance(model, tvm.VGG):
        return  # already fine at 32x32, see the module docstring
    else:
        log.warning(
            "torchvision %s (%s) has no small-input adaptation; building it unchanged for "
            "%dpx inputs, which it may downsample to nothing or reject",
            name,
            type(model).__name__,
            input_size,
        )
        return
    log.info("adapted the stem of torchvision %s to %dpx inputs", name, input_size)


def _unstride(module: nn.Module) -> None:
    """Sets the first strided conv in `module` (in definition order) to stride 1."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.stride != (1, 1):
            m.stride = (1, 1)
            return
    raise RuntimeError(f"no strided conv found in {type(module).__name__}")
