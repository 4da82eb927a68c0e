"""Multi-layer perceptron on flattened images: the weakest student, and a quick sanity baseline."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten, then `fc1`/`relu1`(/`dropout1`) ... `fcK`/`reluK`, then a linear `classifier`.

    Args:
        num_classes: Output logits.
        in_features: Flattened input size C*H*W (the dataset config's `in_features`).
        hidden: Widths of the hidden layers, first to last; empty for a linear model.
        dropout: Dropout after each hidden activation; no dropout module when 0.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_features: int = 3 * 32 * 32,
        hidden: Sequence[int] = (512, 256),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.flatten = nn.Flatten()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_features
        for i, out in enumerate(hidden, start=1):
            layers[f"fc{i}"] = nn.Linear(width, out)
            layers[f"relu{i}"] = nn.ReLU()
            if dropout > 0:
                layers[f"dropout{i}"] = nn.Dropout(dropout)
            width = out
        self.layers = nn.Sequential(layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.flatten(x)
        if flat.shape[1] != self.in_features:
            # Linear's own error ("mat1 and mat2 shapes cannot be multiplied") hides the cause.
            # kd's mlp options read in_features from the dataset config: name the key to set.
            raise ValueError(
                f"MLP expects {self.in_features} input features, got input of shape "
                f"{tuple(x.shape)} ({flat.shape[1]} features); set dataset.in_features="
                f"{flat.shape[1]} (C*H*W), or in_features for a model built outside kd's configs"
            )
        x = flat
        return self.classifier(self.layers(x))


def mlp(
    num_classes: int = 10,
    in_features: int = 3 * 32 * 32,
    hidden: Sequence[int] = (512, 256),
    dropout: float = 0.0,
) -> nn.Module:
    """Builds an `MLP`; see its docstring for the arguments."""
    return MLP(num_classes, in_features, tuple(hidden), dropout)
