"""Feature taps: read intermediate outputs of named modules with forward hooks.

Feature losses (FitNets, attention transfer) name layers in config (`layer1`, `block2`, ...);
the names are those of `model.named_modules()`. A wrong name fails at build time with the
list of valid ones.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from kdcli.errors import ConfigError


class FeatureTap:
    """Captures the outputs of `layers` of `model` on every forward pass."""

    def __init__(self, model: nn.Module, layers: list[str], role: str = "model",
                 setting: str | None = None) -> None:
        """`setting`: the config key that named `layers`, for the error on a wrong name."""
        modules = dict(model.named_modules())
        for name in layers:
            if name not in modules or name == "":
                close = difflib.get_close_matches(name, modules, n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                valid = ", ".join(n for n in modules if n)
                fix = f"set {setting} to" if setting else "valid layers:"
                raise ConfigError(f"{role} has no layer {name!r}{hint}; {fix} {valid}")
        self.layers = list(layers)
        self.captured: dict[str, torch.Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in layers]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
            self.captured[name] = output

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """The features of the last forward pass (and forget them)."""
        out, self.captured = self.captured, {}
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
