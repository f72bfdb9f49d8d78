"""Library misuse is detected, with a message that leads with the fix.

The issue's cases: a loop that never zeroes its gradients (a confidently wrong B_simple before),
per_example=False without accumulation, a tracker created after the first forward, step() twice,
and a preconditioner whose weights span many orders of magnitude.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisescale
from noisescale.errors import NoiseScaleInputError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def test_gradients_never_zeroed_are_refused():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = noisescale.GradientNoiseTracker(model)
    with pytest.raises(NoiseScaleInputError, match=r"^call optimizer\.zero_grad\(\)"):
        for step in range(4):  # step 2 is audited: .grad is found holding step 1's gradient
            x, y = _batch(step)
            F.cross_entropy(model(x), y).backward()
            tracker.step()
            opt.step()  # no zero_grad
    assert tracker.steps == 1 and len(tracker.history) == 1  # step 1 kept, step 2 refused


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zeroed_gradients_pass_either_way(set_to_none):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = noisescale.GradientNoiseTracker(model)
    for step in range(5):
        x, y = _batch(step)
        F.cross_entropy(model(x), y).backward()
        tracker.step()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)  # zeros left in .grad are not stale
    assert len(tracker.history) == 5


def test_micro_batch_mode_without_accumulation_says_to_accumulate():
    model = _model()
    tracker = noisescale.GradientNoiseTracker(model, per_example=False)
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match=r"^accumulate several micro-batches"):
        tracker.step()


def test_tracker_created_after_the_forward_says_so_first():
    model = _model()
    x, y = _batch(0)
    loss = F.cross_entropy(model(x), y)
    tracker = noisescale.GradientNoiseTracker(model)
    loss.backward()
    with pytest.raises(NoiseScaleInputError, match=r"^create the tracker before"):
        tracker.step()


def test_step_twice_says_once_per_optimizer_step():
    model = _model()
    tracker = noisescale.GradientNoiseTracker(model)
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    tracker.step()
    with pytest.raises(NoiseScaleInputError, match=r"^call tracker\.step\(\) once per optimizer"):
        tracker.step()
    model.zero_grad()
    with pytest.raises(NoiseScaleInputError, match=r"^call tracker\.step\(\) once per optimizer"):
        tracker.step()  # gradients zeroed, still no backward


def test_a_preconditioner_spanning_many_orders_is_flagged():
    """Inputs that are almost never non-zero: their weights' second moment is ~0, so Adam's
    1/(√v̂ + ε) is ~1/ε there, far above its median."""
    torch.manual_seed(0)
    model = nn.Linear(20, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-8)
    tracker = noisescale.GradientNoiseTracker(model, precondition=opt, precondition_from=1)
    caught = []
    for _ in range(3):
        x = torch.randn(32, 20)
        x[:, 10:] = 0.0  # half the inputs never active
        y = torch.randint(0, 3, (32,))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            F.cross_entropy(model(x), y).backward()
            tracker.step()
        caught += [str(m.message) for m in w]
        opt.step()
        opt.zero_grad()
    wide = [m for m in caught if "preconditioner 1/(√v̂ + ε)" in m]
    assert len(wide) == 1 and wide[0].startswith("keep the default sub-batches")
