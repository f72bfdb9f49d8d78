"""Hooks of others on a parameter's gradient (``p.register_hook``: a mask that trains part of a
weight, a conditional clamp, a logger) and after its accumulation
(``register_post_accumulate_grad_hook``: a rescale, an optimizer inside the backward).

The engine measures each example's gradient inside the backward, before such a hook; ``.grad``
holds the gradient after it. A hook that changes the gradient is refused on every step it acts
(registered before the tracker or after — after was measured without a word until 2026-12-03:
a mask on an MLP's first weight read B_simple 182 [152, 229]); a hook that only reads leaves
every number as it was; micro-batch norms (``per_example=False``) are taken after the hooks, so
a linear change (a mask) is measured there exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisescale
from noisescale.errors import UnsupportedModuleError

MODES = [
    pytest.param({}, id="default"),
    pytest.param({"per_example_fraction": 1.0}, id="exact"),
    pytest.param({"per_example_fraction": 0.25}, id="subset"),
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _mask(p: nn.Parameter) -> torch.Tensor:
    return (torch.rand(p.shape, generator=torch.Generator().manual_seed(5)) < 0.3).to(p.dtype)


def _train(model, tracker, steps: int, micro: int = 1) -> None:
    for step in range(steps):
        x, y = _batch(step)
        for xm, ym in zip(x.chunk(micro), y.chunk(micro), strict=True):
            (F.cross_entropy(model(xm), ym) / micro).backward()
        tracker.step()
        model.zero_grad()


@pytest.mark.parametrize("kw", MODES)
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_masking_hook_is_refused(kw, when):
    model = _model()
    mask = _mask(model[0].weight)
    if when == "before":
        model[0].weight.register_hook(lambda g: g * mask)
    tracker = noisescale.GradientNoiseTracker(model, **kw)
    if when == "after":
        model[0].weight.register_hook(lambda g: g * mask)
    with pytest.raises(UnsupportedModuleError, match=r"^a hook on the gradient of '0\.weight'"):
        _train(model, tracker, 1)
    assert tracker.steps == 0


@pytest.mark.parametrize("in_place", [False, True])
def test_a_hook_that_acts_on_one_late_step_is_refused_there(in_place):
    """A clamp that acts only on step 6 (not audited: 1, 2, 4, 8, … are)."""
    model = _model()
    tracker = noisescale.GradientNoiseTracker(model)
    state = {"step": 0}

    def clamp(g):
        if state["step"] != 6:
            return None
        if in_place:
            g.clamp_(-1e-3, 1e-3)
            return None
        return g.clamp(-1e-3, 1e-3)

    model[2].bias.register_hook(clamp)
    for step in range(1, 6):
        state["step"] = step
        _train_one(model, tracker, step)
    state["step"] = 6
    with pytest.raises(UnsupportedModuleError, match=r"gradient of '2\.bias' changed it"):
        _train_one(model, tracker, 6)
    assert tracker.steps == 5
    model.zero_grad()
    state["step"] = 7  # the hook quiet again: the tracker goes on
    _train_one(model, tracker, 7)
    assert tracker.steps == 6


def _train_one(model, tracker, step: int) -> None:
    x, y = _batch(step)
    F.cross_entropy(model(x), y).backward()
    tracker.step()
    model.zero_grad()


@pytest.mark.parametrize("kw", MODES)
def test_hooks_that_only_read_change_nothing(kw):
    """A logger (wandb.watch's kind: it returns None) before and after the tracker, and a hook
    that returns the gradient it was given: the same numbers as without them."""

    def run(hooks: bool):
        model = _model()
        seen = []
        if hooks:
            model[0].weight.register_hook(lambda g: seen.append(float(g.norm())))
        torch.manual_seed(7)  # the sub-batches' and the subset's draws
        tracker = noisescale.GradientNoiseTracker(model, **kw)
        if hooks:
            model[2].weight.register_hook(lambda g: g)
            model[0].weight.register_hook(lambda g: seen.append(float(g.sum())))
        _train(model, tracker, 6)
        assert len(seen) == (12 if hooks else 0)
        return [(r["g2"], r["trace_sigma"]) for r in tracker.history]

    assert run(True) == run(False)


def test_micro_batch_norms_see_a_mask_as_grad_does():
    """per_example=False takes its micro-batch norms after the hooks: a mask M on a linear
    model's weight (per-example gradient x_i) gives exactly the run on the data M ⊙ x."""
    d = 10

    def run(masked_data: bool):
        torch.manual_seed(0)
        model = nn.Linear(d, 1, bias=False)
        mask = _mask(model.weight)[0]
        tracker = noisescale.GradientNoiseTracker(model, per_example=False)
        if not masked_data:
            model.weight.register_hook(lambda g: g * mask)
        g = torch.Generator().manual_seed(3)
        for _ in range(8):
            x = 0.5 + torch.randn(32, d, generator=g)
            if masked_data:
                x = x * mask
            for part in x.chunk(4):
                (model(part).mean() / 4).backward()
            tracker.step()
            model.zero_grad()
        out = [(r["g2"], r["trace_sigma"]) for r in tracker.history]
        assert all(math.isfinite(a) and math.isfinite(b) for a, b in out)
        return out

    for (g1, t1), (g2, t2) in zip(run(False), run(True), strict=True):
        assert g1 == pytest.approx(g2, rel=1e-6, abs=1e-9)
        assert t1 == pytest.approx(t2, rel=1e-6)


@pytest.mark.parametrize("kw", [*MODES, pytest.param({"per_example": False}, id="micro-batches")])
@pytest.mark.parametrize("empty", [False, True])
def test_a_hook_after_accumulation_that_changes_grad_is_refused(kw, empty):
    """Every norm is taken before a post-accumulate hook: one that rescales .grad in place is
    refused in every mode (until 2026-12-03: B_simple 1361 where the loop without it read 227,
    found by a review), and one that empties it (an optimizer step inside the backward) too."""
    model = _model()
    tracker = noisescale.GradientNoiseTracker(model, **kw)

    def rescale(p: nn.Parameter) -> None:
        if empty:  # what an optimizer stepped inside the backward leaves
            p.grad = None
        else:
            p.grad.mul_(0.97)

    model[2].weight.register_post_accumulate_grad_hook(rescale)
    with pytest.raises(UnsupportedModuleError, match=r"^a hook run after the accumulation of"):
        _train(model, tracker, 1, micro=2)


@pytest.mark.parametrize("kw", MODES)
def test_hooks_after_accumulation_that_only_read_change_nothing(kw):
    def run(hooks: bool):
        model = _model()
        seen = []
        if hooks:
            model[0].weight.register_post_accumulate_grad_hook(
                lambda p: seen.append(float(p.grad.norm()))
            )
        torch.manual_seed(7)
        tracker = noisescale.GradientNoiseTracker(model, **kw)
        if hooks:
            model[2].bias.register_post_accumulate_grad_hook(lambda p: None)
        _train(model, tracker, 6, micro=2)
        assert len(seen) == (12 if hooks else 0)
        return [(r["g2"], r["trace_sigma"]) for r in tracker.history]

    assert run(True) == run(False)


class _Seq(nn.Module):
    """Linear layers on sequences: the default measures them by sub-batch products."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))).mean(1))


@pytest.mark.parametrize("kw", MODES)
@pytest.mark.parametrize("step_in", ["optimizer, grad set to None", "p.data updated in place"])
def test_an_optimizer_stepped_inside_the_backward_never_changes_the_gradients(kw, step_in):
    """torch's "optimizer in backward" recipe: a post-accumulate hook per parameter steps its
    optimizer. In the default mode the sub-batch products hand a weight its gradient from above
    the layer, so the hook ran — and changed the weight — before the layer's input gradient was
    computed from it: torch's in-place error inside loss.backward(), or, with ``p.data``
    updated, the lower layers' ``.grad`` 1% off a plain model's and a refusal naming rows of
    the wrong examples (a hunt, 2026-12-06). Such a layer is measured by its rule now: the
    first form is refused naming the hook, in every mode; the second, which leaves ``.grad``,
    gives a plain model's gradients and exact per-example norms."""
    x = torch.randn(8, 32, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(8) % 3

    def build(hooked: bool) -> nn.Module:
        model = _Seq().double()
        if hooked:
            opts = {p: torch.optim.SGD([p], lr=0.05) for p in model.parameters()}

            def hook(p: nn.Parameter) -> None:
                if step_in.startswith("optimizer"):
                    opts[p].step()
                    opts[p].zero_grad()
                else:
                    p.data.add_(p.grad, alpha=-0.5)

            for p in model.parameters():
                p.register_post_accumulate_grad_hook(hook)
        return model

    plain = build(False)
    F.cross_entropy(plain(x), y).backward()
    model = build(True)
    if step_in.startswith("optimizer"):
        tracker = noisescale.GradientNoiseTracker(model, **kw)
        try:
            with pytest.raises(
                UnsupportedModuleError, match=r"^a hook run after the accumulation of"
            ):
                F.cross_entropy(model(x), y).backward()
                tracker.step()
        finally:
            tracker.remove()
        return
    with noisescale.per_example_sqnorms(model) as pe:
        F.cross_entropy(model(x), y).backward()
    for a, b in zip(plain.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-15)
    reference = build(False)
    params = list(reference.parameters())
    want = torch.stack(
        [
            sum(
                g.pow(2).sum()
                for g in torch.autograd.grad(
                    F.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]), params
                )
            )
            for i in range(8)
        ]
    )
    torch.testing.assert_close(pe.sqnorms, want, rtol=1e-9, atol=0)
    model = build(True)
    tracker = noisescale.GradientNoiseTracker(model, **kw)
    try:
        for _ in range(3):
            F.cross_entropy(model(x), y).backward()
            tracker.step()
            model.zero_grad()
    finally:
        tracker.remove()
    assert not any(r["skipped"] for r in tracker.history)


class _ClampedActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x))
        if h.requires_grad:
            h.register_hook(lambda g: g.clamp(-0.01, 0.01))
        return self.head(h)


def test_a_nonlinear_gradient_hook_on_an_activation_is_named_in_the_refusal():
    """(A hunt, 2026-12-06.) ``h.register_hook(lambda g: g.clamp(-c, c))`` on an activation
    makes the rows below it no example's own gradient: refused, fairly, but the message listed
    positions, time-major layers and operations mixing examples, not the hook. It names it."""
    torch.manual_seed(0)
    model = _ClampedActivation()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    with pytest.raises(UnsupportedModuleError, match=r"gradient hook on an activation"):
        with noisescale.per_example_sqnorms(model):
            model(x).pow(2).sum(1).mean().backward()
