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
    log.info("%s: copied %d/%d tensors (%.0f%% of values)%s", label, len(copied), len(own),
             100 * n_params / max(total, 1), "; not copied: " + ", ".join(skipped[:12]) +
             (f" (+{len(skipped) - 12} more)" if len(skipped) > 12 else "") if skipped else "")
    return {"copied": copied, "skipped": skipped}
