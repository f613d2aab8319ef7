"""Learning-rate schedules: every curve against hand-computed values, and the LR AdamW really uses.

`lr_multiplier(step, cfg, total)` is the factor on the peak LR for optimizer step `step`
(0-based). Warmup is (step+1)/warmup; afterwards progress = (step-warmup)/(total-warmup).
"""

import math

import pytest
import torch
from torch import nn

from dtrain.config import OptimConfig, ScheduleConfig
from dtrain.optim import build_optimizer, build_scheduler, lr_multiplier, warmup_steps

PEAK = 2e-3


def sched(name, **kw):
    return ScheduleConfig(name=name, **kw)


# (schedule config, total steps, {step: expected multiplier}); every value worked out by hand.
CASES = {
    "constant+warmup4": (
        sched("constant", warmup_steps=4), 20,
        {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0, 10: 1.0, 19: 1.0, 50: 1.0},
    ),
    "linear+warmup2": (
        # after warmup: 1 - progress, progress = (step - 2) / 10
        sched("linear", warmup_steps=2), 12,
        {0: 0.5, 1: 1.0, 2: 1.0, 3: 0.9, 7: 0.5, 11: 0.1, 12: 0.0, 30: 0.0},
    ),
    "linear+warmup2+floor0.2": (
        # 1 - 0.8 * progress
        sched("linear", warmup_steps=2, min_lr_ratio=0.2), 12,
        {0: 0.5, 1: 1.0, 2: 1.0, 3: 0.92, 7: 0.6, 11: 0.28, 12: 0.2, 30: 0.2},
    ),
    "cosine": (
        # 0.5 * (1 + cos(pi * step / 10))
        sched("cosine"), 10,
        {0: 1.0, 2: 0.9045084971874737, 3: 0.7938926261462366, 5: 0.5, 7: 0.2061073738537634,
         9: 0.024471741852423234, 10: 0.0, 15: 0.0},
    ),
    "cosine+warmup5+floor0.1": (
        # 0.1 + 0.9 * 0.5 * (1 + cos(pi * (step - 5) / 20))
        sched("cosine", warmup_steps=5, min_lr_ratio=0.1), 25,
        {0: 0.2, 1: 0.4, 4: 1.0, 5: 1.0, 10: 0.8681980515, 15: 0.55, 20: 0.2318019485, 25: 0.1, 99: 0.1},
    ),
    "step+warmup2": (
        # gamma ** ((step - 2) // 3)
        sched("step", warmup_steps=2, step_size=3, gamma=0.5), 40,
        {0: 0.5, 1: 1.0, 2: 1.0, 4: 1.0, 5: 0.5, 7: 0.5, 8: 0.25, 10: 0.25, 11: 0.125, 14: 0.0625},
    ),
    "exponential+warmup3": (
        # 0.9 ** (step - 3)
        sched("exponential", warmup_steps=3, gamma=0.9), 40,
        {0: 1 / 3, 1: 2 / 3, 2: 1.0, 3: 1.0, 4: 0.9, 5: 0.81, 13: 0.3486784401},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lr_multiplier_matches_hand_computed_values(case):
    cfg, total, expected = CASES[case]
    for step, value in expected.items():
        assert lr_multiplier(step, cfg, total) == pytest.approx(value, abs=1e-9), f"{case} step {step}"


def _single_weight_optimizer(lr):
    """A 1x1 float64 weight under dtrain's own AdamW (plus a bias, which lands in the no-decay group)."""
    model = nn.Linear(1, 1).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    optimizer = build_optimizer(model, OptimConfig(lr=lr, weight_decay=0.0, grad_clip=None))
    assert len(optimizer.param_groups) == 2
    return model, optimizer


@pytest.mark.parametrize("case", list(CASES))
def test_adamw_uses_the_scheduled_lr_at_every_step(case):
    """With a constant gradient g Adam's bias-corrected update is lr * g / (|g| + eps): the
    parameter moves by exactly the LR in force, so the LR really used is measurable."""
    cfg, total, expected = CASES[case]
    model, optimizer = _single_weight_optimizer(PEAK)
    scheduler = build_scheduler(optimizer, cfg, total)
    n_steps = min(total + 3, max(expected) + 1)
    used, moved = [], []
    for _ in range(n_steps):
        used.append([g["lr"] for g in optimizer.param_groups])
        before = model.weight.detach().clone(), model.bias.detach().clone()
        model.weight.grad = torch.ones_like(model.weight)
        model.bias.grad = torch.full_like(model.bias, -3.0)
        optimizer.step()
        scheduler.step()
        moved.append(((before[0] - model.weight).item(), (model.bias - before[1]).item()))
    for step, value in expected.items():
        if step >= n_steps:
            continue
        assert used[step][0] == pytest.approx(PEAK * value, rel=1e-9, abs=1e-15), f"{case} step {step}"
        assert used[step][1] == used[step][0], "both parameter groups follow the schedule"
        # weight moved against its +1 gradient, bias against its -3 gradient, both by the LR
        assert moved[step][0] == pytest.approx(PEAK * value, rel=1e-6, abs=1e-12), f"{case} step {step}"
        assert moved[step][1] == pytest.approx(PEAK * value, rel=1e-6, abs=1e-12), f"{case} step {step}"


def test_get_last_lr_is_the_lr_of_the_step_about_to_run():
    """The loop logs scheduler.get_last_lr() before scheduler.step(): that must be step s's LR."""
    cfg = sched("linear", warmup_steps=4)
    _, optimizer = _single_weight_optimizer(1.0)
    scheduler = build_scheduler(optimizer, cfg, 8)
    seen = []
    for _ in range(8):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    # warmup 0.25 .. 1, then 1 - (step - 4) / 4
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5, 0.25])


def test_scheduler_state_dict_round_trip_continues_the_curve():
    cfg = sched("cosine", warmup_steps=3, min_lr_ratio=0.1)
    model, optimizer = _single_weight_optimizer(PEAK)
    scheduler = build_scheduler(optimizer, cfg, 20)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    saved_opt, saved_sched = optimizer.state_dict(), scheduler.state_dict()
    _, optimizer2 = _single_weight_optimizer(PEAK)
    scheduler2 = build_scheduler(optimizer2, cfg, 20)
    optimizer2.load_state_dict(saved_opt)
    scheduler2.load_state_dict(saved_sched)
    for step in range(7, 20):
        expected = PEAK * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 3) / 17)))
        assert optimizer2.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
        assert scheduler2.get_last_lr()[0] == pytest.approx(expected, rel=1e-12)
        optimizer2.step()
        scheduler2.step()


@pytest.mark.parametrize(
    ("ratio", "explicit", "total", "expected_warmup"),
    [(0.1, 0, 50, 5), (0.25, 0, 10, 2), (0.05, 0, 10, 0), (0.5, 2, 10, 2), (0.0, 0, 10, 0)],
)
def test_warmup_ratio(ratio, explicit, total, expected_warmup):
    """warmup = int(ratio * total) steps; warmup_steps > 0 overrides the ratio."""
    cfg = sched("constant", warmup_ratio=ratio, warmup_steps=explicit)
    assert warmup_steps(cfg, total) == expected_warmup
    for step in range(total):
        expected = (step + 1) / expected_warmup if step < expected_warmup else 1.0
        assert lr_multiplier(step, cfg, total) == pytest.approx(expected)


def test_warmup_ratio_with_cosine_decay():
    # total 40, ratio 0.25 -> 10 warmup steps, then 30 steps of cosine down to 0.2
    cfg = sched("cosine", warmup_ratio=0.25, min_lr_ratio=0.2)
    values = [lr_multiplier(s, cfg, 40) for s in range(45)]
    assert values[:10] == pytest.approx([0.1 * (i + 1) for i in range(10)])
    assert values[10] == pytest.approx(1.0)
    assert values[25] == pytest.approx(0.6)  # halfway: 0.2 + 0.8 * 0.5
    assert values[40:] == pytest.approx([0.2] * 5)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("floor", [0.0, 0.1, 0.5])
def test_min_lr_ratio_is_a_floor(name, floor):
    cfg = sched(name, warmup_steps=3, min_lr_ratio=floor)
    total = 23
    values = [lr_multiplier(s, cfg, total) for s in range(60)]
    decay = values[3:]
    assert all(a >= b - 1e-15 for a, b in zip(decay, decay[1:])), "monotone after warmup"
    assert min(values) == pytest.approx(min(floor, 1 / 3))  # first warmup step or the floor
    assert all(v >= floor - 1e-12 for v in decay)
    assert values[total:] == pytest.approx([floor] * (60 - total)), "stays at the floor past the end"
    # the last step of the run is one decay step above the floor: progress 19/20
    last = values[total - 1]
    if name == "linear":
        assert last == pytest.approx(floor + (1 - floor) / 20)
    else:
        assert last == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 19 / 20)))


def test_min_lr_ratio_floor_through_the_optimizer():
    cfg = sched("cosine", min_lr_ratio=0.25)
    _, optimizer = _single_weight_optimizer(PEAK)
    scheduler = build_scheduler(optimizer, cfg, 8)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(PEAK)
    assert lrs[4] == pytest.approx(PEAK * 0.625)  # 0.25 + 0.75 * 0.5
    assert lrs[8:] == pytest.approx([PEAK * 0.25] * 4)
    assert min(lrs) == pytest.approx(PEAK * 0.25)
