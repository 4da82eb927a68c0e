"""Learning-rate schedules, stepped once per optimizer step."""

from __future__ import annotations

import math

import pytest
import torch

from kdcli import schedulers

LR = 0.1


def make_optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=LR, momentum=0.9)


def lrs(optimizer, scheduler, steps: int) -> list[float]:
    """The LR each of the next `steps` optimizer steps uses."""
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_cosine_with_warmup():
    opt = make_optimizer()
    # 10 epochs x 10 steps, warmup 0.5 epoch = 5 steps, floor at 0.1 * lr.
    sched = schedulers.cosine(opt, epochs=10, steps_per_epoch=10, warmup_epochs=0.5,
                              min_lr_ratio=0.1)
    seq = lrs(opt, sched, 101)
    assert seq[0] == pytest.approx(LR / 5)
    assert seq[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.10])
    assert seq[5] == pytest.approx(LR)  # cosine starts at the base LR after warmup
    assert max(seq) == pytest.approx(LR)
    assert seq[100] == pytest.approx(0.1 * LR)
    assert seq[99] == pytest.approx(LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 94 / 95))))
    assert seq[99] < 0.0101
    assert all(a >= b for a, b in zip(seq[5:], seq[6:], strict=False))


def test_cosine_midpoint_without_warmup():
    opt = make_optimizer()
    sched = schedulers.cosine(opt, epochs=4, steps_per_epoch=25, min_lr_ratio=0.1)
    seq = lrs(opt, sched, 101)
    assert seq[0] == pytest.approx(LR)
    # Half-way the cosine factor is 1/2: 0.1 + 0.9 * 0.5 = 0.55.
    assert seq[50] == pytest.approx(0.055)
    assert seq[100] == pytest.approx(0.01)


@pytest.mark.parametrize("milestones", [(0.5, 0.75), (2, 3), (3, 2)])
def test_multistep_fractions_and_epochs(milestones):
    opt = make_optimizer()
    # 4 epochs x 10 steps: milestones at step 20 and 30 either way.
    sched = schedulers.multistep(opt, epochs=4, steps_per_epoch=10, milestones=milestones,
                                 gamma=0.5)
    seq = lrs(opt, sched, 40)
    assert seq[:20] == pytest.approx([0.1] * 20)
    assert seq[20:30] == pytest.approx([0.05] * 10)
    assert seq[30:] == pytest.approx([0.025] * 10)


@pytest.mark.parametrize("gamma", [0.0, -1.0])
def test_multistep_refuses_a_gamma_that_is_not_positive(gamma):
    # gamma=-1 trained on with a negative learning rate.
    with pytest.raises(ValueError, match=r"^gamma must be > 0"):
        schedulers.multistep(make_optimizer(), epochs=10, steps_per_epoch=1, gamma=gamma)


def test_multistep_with_warmup():
    opt = make_optimizer()
    sched = schedulers.multistep(opt, epochs=4, steps_per_epoch=10, milestones=(0.5,), gamma=0.1,
                                 warmup_epochs=0.2)
    seq = lrs(opt, sched, 25)
    assert seq[:3] == pytest.approx([0.05, 0.1, 0.1])
    assert seq[19:21] == pytest.approx([0.1, 0.01])


def test_constant_with_warmup():
    opt = make_optimizer()
    sched = schedulers.constant(opt, epochs=3, steps_per_epoch=4, warmup_epochs=1)
    assert lrs(opt, sched, 8) == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1, 0.1])


def test_state_dict_round_trip(tmp_path):
    def build():
        opt = make_optimizer()
        return opt, schedulers.cosine(opt, epochs=3, steps_per_epoch=10, warmup_epochs=1,
                                      min_lr_ratio=0.0)

    opt, sched = build()
    uninterrupted = lrs(opt, sched, 30)

    opt, sched = build()
    lrs(opt, sched, 13)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
               tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)

    opt, sched = build()  # a resumed run: fresh objects, then the saved state
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    assert sched.last_epoch == 13
    assert lrs(opt, sched, 17) == pytest.approx(uninterrupted[13:])
