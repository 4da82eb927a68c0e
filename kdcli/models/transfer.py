"""Initialise one model from another's weights wherever parameter names and shapes match."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def copy_matching(source: dict[str, torch.Tensor], target: nn.Module, label: str
                  ) -> dict[str, list[str]]:
    """Copies every tensor of `source` (a state dict) whose name and shape exist in `target`.

    Returns {"copied": [...], "skipped": ["name: why", ...]} and logs both, so a user sees
    exactly which layers started from the source and which from scratch.
    """
    own = target.state_dict()
    copied, skipped = [], []
    for name, tensor in own.items():
        if name not in source:
            skipped.append(f"{name}: not in source")
        elif source[name].shape != tensor.shape:
            skipped.append(f"{name}: shape {tuple(source[name].shape)} vs {tuple(tensor.shape)}")
        else:
            copied.append(name)
    with torch.no_grad():
        target.load_state_dict({**own, **{n: source[n] for n in copied}})
    n_params = sum(own[n].numel() for n in copied if own[n].is_floating_point())
    total = sum(t.numel() for t in own.values() if t.is_floating_point())
    share = 100 * n_params / max(total, 1)
    # Under 0.5% (shown as 0%: e.g. only BatchNorm step counters matched) the model in effect
    # starts from scratch, which the user asked not to: a warning, not a line among the info.
    useless = share < 0.5
    log.log(logging.WARNING if useless else logging.INFO, "%s: copied %d/%d tensors (%.0f%% of "
            "values)%s%s", label, len(copied), len(own), share,
            "; nothing of use was copied: the model starts as if from scratch (names or shapes "
            "differ)" if useless else "",
            "; not copied: " + ", ".join(skipped[:12]) +
            (f" (+{len(skipped) - 12} more)" if len(skipped) > 12 else "") if skipped else "")
    return {"copied": copied, "skipped": skipped}
