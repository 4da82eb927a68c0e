"""The epoch progress bar: silent where stderr is not a terminal."""

from __future__ import annotations

import pytest

from kdcli.progress import Progress


@pytest.mark.parametrize("enabled", [True, False])
def test_a_bar_off_a_terminal_writes_nothing(enabled: bool, capfd: pytest.CaptureFixture) -> None:
    # rich before 14.3 printed an empty line when a disabled bar stopped: a blank line after
    # every epoch in the logs, and before the one `error:` line a failed run leaves on stderr.
    with Progress("teacher", enabled=enabled) as bar:  # stderr is captured: not a terminal
        task = bar.start_epoch(0, 1, steps=2)
        bar.advance(task)
        bar.end_epoch(task, {"train/loss": 1.0, "val/top1": 50.0})
    assert capfd.readouterr() == ("", "")
