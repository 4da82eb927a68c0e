"""Regression tests for bugs found by review: each names what went wrong before the fix."""

from __future__ import annotations

import torch

from kdcli import checkpoint, softlabels
from kdcli.errors import CorruptArtifact


def test_empty_checkpoint_is_corrupt_artifact(tmp_path):
    # checkpoint.load built the message with `str(exc).splitlines()[0]`; torch.load on an
    # empty (or 2-byte) file raises EOFError(""), whose message has no lines, so load() raises
    # IndexError instead of CorruptArtifact: a resume from an empty last.pt (engine.py:105)
    # ends in a traceback rather than "error: checkpoint ... is unreadable".
    path = tmp_path / "last.pt"
    path.write_bytes(b"")
    try:
        checkpoint.load(path)
    except CorruptArtifact as exc:
        assert str(path) in str(exc)
    else:
        raise AssertionError("an empty checkpoint loaded")


def test_logits_beyond_float16_range_are_cached_exactly(tmp_path):
    # softlabels.write once cast every logit to float16, whose largest finite value is 65504:
    # a logit of 7e4 was stored as inf under a valid checksum. Such rows now go to float32.
    path = tmp_path / "train.kdsl"
    logits = torch.tensor([[7.0e4, 0.0, 1.0], [1.0, 2.0, 3.0]])
    softlabels.write(path, logits)
    assert torch.equal(softlabels.open(path).all_logits(), logits)
