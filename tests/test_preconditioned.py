"""Preconditioned noise scale: P = 1/(√v̂ + ε) from the optimizer, applied to every norm alike.

Checked three ways: P against the update the optimizer actually makes; every norm of a step
(per-example, micro-batch, big batch) against brute-force per-example gradients scaled by P; and
unbiasedness of the preconditioned |PG|² and tr(PΣP) on a quadratic with known G and Σ.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import noisescale
from noisescale.errors import NoiseScaleInputError
from noisescale.preconditioning import stateless_parameters, step_counts
from noisescale.tracker import preconditioner_weights

F32 = 8 * torch.finfo(torch.float32).eps


# brute-force references in float64 (the fixture lives in conftest.py)
pytestmark = pytest.mark.usefixtures("float64_default")


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.0, 0.9), eps=1e-3),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(
        ps, lr=0.05, betas=(0.0, 0.8), eps=1e-3, weight_decay=0.0, amsgrad=True
    ),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.05, alpha=0.7, eps=1e-3),
    "rmsprop-centered": lambda ps: torch.optim.RMSprop(
        ps, lr=0.05, alpha=0.7, eps=1e-3, centered=True
    ),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_p_is_what_the_optimizer_divides_by(name):
    """With no momentum (β₁ = 0) the update is −lr·P ⊙ g, P from the state after the step."""
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(7, generator=g))
    opt = OPTIMIZERS[name]([p])
    assert preconditioner_weights(opt, [p]) is None  # no state before the first step
    for _ in range(4):
        grad = torch.randn(7, generator=g) * torch.linspace(0.01, 3.0, 7)
        p.grad = grad.clone()
        before = p.detach().clone()
        opt.step()
        w2 = preconditioner_weights(opt, [p])[id(p)]
        update = (before - p.detach()) / (0.05 * grad)
        assert torch.allclose(update, w2.sqrt(), rtol=1e-10)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.norm(self.conv(x))).flatten(1))


class TiedLM(nn.Module):
    """Tokens → embedding → Linear on each position → LayerNorm → output head tied to the table."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 5)
        self.mix = nn.Linear(5, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 9, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.mix(self.emb(tokens))))).mean(1)


def make_batch(kind: str, n: int, g: torch.Generator):
    if kind == "conv":
        return torch.randn(n, 2, 5, 5, generator=g), torch.randn(n, 3, generator=g)
    return torch.randint(0, 9, (n, 4), generator=g), torch.randn(n, 9, generator=g)


def loss_i(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out - y).pow(2).sum(1)


def manual_p2(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    """P² written out from the optimizers' documented update rules."""
    state, group = opt.state[p], opt.param_groups[0]
    if isinstance(opt, torch.optim.RMSprop):
        v = state["square_avg"]
        if group["centered"]:
            v = v - state["grad_avg"] ** 2
        return 1.0 / (v.sqrt() + group["eps"]) ** 2
    v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
    t = float(state["step"])
    return 1.0 / ((v / (1 - group["betas"][1] ** t)).sqrt() + group["eps"]) ** 2


def _brute_force_norms(model, params, p2, x, y):
    """Per-example mean |P⊙g_i|², micro-batch |P⊙G_j|² (two halves), big-batch |P⊙G|²."""
    grads = [
        torch.autograd.grad(loss_i(model(x[i : i + 1]), y[i : i + 1]).sum(), params)
        for i in range(x.shape[0])
    ]

    def weighted(vecs):
        return float(sum((w * v.pow(2)).sum() for w, v in zip(p2, vecs, strict=True)))

    def mean(rows):
        return [torch.stack(col).mean(0) for col in zip(*rows, strict=True)]

    half = x.shape[0] // 2
    per_ex = float(np.mean([weighted(gi) for gi in grads]))
    micro = [weighted(mean(grads[:half])), weighted(mean(grads[half:]))]
    return per_ex, micro, weighted(mean(grads))


@pytest.mark.parametrize("kind", ["conv", "tied"])
@pytest.mark.parametrize("name", ["adam", "rmsprop-centered"])
def test_every_norm_is_preconditioned(kind, name):
    """Per-example (materialised conv/linear, sparse embedding, tied cross terms), micro-batch
    and big-batch norms all equal brute force with the same P."""
    torch.manual_seed(0)
    model = ConvNet() if kind == "conv" else TiedLM()
    params = list(model.parameters())
    opt = OPTIMIZERS[name](params)
    tracker = noisescale.GradientNoiseTracker(
        model, precondition=opt, precondition_from=1, sync_every=1, per_example_fraction=1.0
    )
    g = torch.Generator().manual_seed(1)
    with pytest.warns(RuntimeWarning, match="not preconditioned"):
        for step in range(3):
            x, y = make_batch(kind, 6, g)
            if step == 2:  # the state the tracked step sees, and brute force at the same θ
                p2 = [manual_p2(opt, p) for p in params]
                with tracker.paused():  # these passes are not training
                    expected = _brute_force_norms(model, params, p2, x, y)
            for xm, ym in zip(x.chunk(2), y.chunk(2), strict=True):
                (loss_i(model(xm), ym).mean() / 2).backward()
            tracker.step()
            opt.step()
            opt.zero_grad()
    history = tracker.history
    assert [r["preconditioned"] for r in history] == [False, True, True]
    record = history[-1]
    per_ex, micro, big = expected
    assert record["sources"]["per_example"]["sqnorm_small"] == pytest.approx(per_ex, rel=F32)
    # the record keeps the mean over the step's micro-batches
    assert record["sources"]["microbatch"]["sqnorm_small"] == pytest.approx(
        float(np.mean(micro)), rel=F32
    )
    assert record["sqnorm_big"] == pytest.approx(big, rel=F32)


class Shift(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta - x


def test_preconditioned_estimates_are_unbiased_on_a_quadratic():
    """L_x = ½ Σ_d h_d(θ_d − x_d)², x ~ N(μ, diag s²): G = h⊙(θ−μ), Σ = diag(h²s²).

    With lr = 0 (θ fixed) RMSprop's state still moves, so P_t changes every step; each step's
    g2 and tr Σ must be unbiased for |P_t ⊙ G|² and tr(P_t Σ P_t) = Σ_d P_d² h_d² s_d².
    """
    d = 5
    h = torch.linspace(0.5, 3.0, d)
    mu, s = torch.linspace(-1.0, 1.0, d), torch.linspace(0.5, 2.0, d)
    model = nn.Sequential(Shift(d))
    opt = torch.optim.RMSprop(model.parameters(), lr=0.0, alpha=0.9)
    tracker = noisescale.GradientNoiseTracker(
        model, precondition=opt, precondition_from=1, beta=1.0
    )
    theta = model[0].theta
    g = torch.Generator().manual_seed(0)
    gen = h * (theta.detach() - mu)
    truth = []
    with pytest.warns(RuntimeWarning, match="not preconditioned"):
        for _ in range(300):
            p2 = preconditioner_weights(opt, [theta])
            if p2 is not None:
                w = p2[id(theta)]
                truth.append((float((w * gen**2).sum()), float((w * h**2 * s**2).sum())))
            x = mu + torch.randn(16, d, generator=g) * s
            for xm in x.chunk(2):
                (0.5 * (h * model(xm).pow(2)).sum(1).mean() / 2).backward()
            tracker.step()
            opt.step()
            opt.zero_grad()
    history = [r for r in tracker.history if r.get("preconditioned")]
    assert len(history) == len(truth) == 299
    for k, key in enumerate(("g2", "trace_sigma")):
        resid = np.array([r[key] for r in history]) - np.array([t[k] for t in truth])
        se = resid.std(ddof=1) / math.sqrt(resid.size)
        assert abs(resid.mean()) <= 4 * se, (key, resid.mean(), se)
    # the estimate restarted at the first preconditioned step (step 2)
    assert tracker.estimate().steps == 299
    assert tracker.state_dict()["preconditioned_from"] == 2


def test_precondition_from_delays_p_and_restarts_the_averages():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = noisescale.GradientNoiseTracker(model, precondition=opt, precondition_from=3)
    g = torch.Generator().manual_seed(0)
    with pytest.warns(RuntimeWarning, match="fewer than precondition_from=3"):
        for _ in range(6):
            model(torch.randn(8, 3, generator=g)).pow(2).mean().backward()
            tracker.step()
            opt.step()
            opt.zero_grad()
    assert [r["preconditioned"] for r in tracker.history] == [False] * 3 + [True] * 3
    assert tracker.estimate().steps == 3
    assert tracker.state_dict()["preconditioned_from"] == 4
    with pytest.raises(NoiseScaleInputError, match="precondition_from"):
        noisescale.GradientNoiseTracker(model, precondition=opt, precondition_from=0)


class _WithHead(nn.Module):
    """A body, and a head the loss reaches only on the steps in ``uses`` (never by default)."""

    def __init__(self, uses=()) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        self.head = nn.Linear(3, 1)
        self.uses, self.step = set(uses), 0

    def forward(self, x):
        out = self.body(x)
        return out + self.head(x) if self.step in self.uses else out


def _preconditioned_run(model, params, steps=8, precondition_from=2):
    opt = torch.optim.Adam(params, lr=1e-2)
    tracker = noisescale.GradientNoiseTracker(
        model, precondition=opt, precondition_from=precondition_from, per_example_fraction=1.0
    )
    g = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        model.step = step
        model(torch.randn(8, 3, generator=g)).pow(2).mean().backward()
        tracker.step()
        opt.step()
        opt.zero_grad()
    return tracker


def test_a_parameter_that_never_gets_a_gradient_does_not_keep_the_norms_plain():
    """Adam holds no state for a trainable head the loss never reaches: until 2026-12-05 every
    step stayed plain for the whole run (B_simple 85% off on a hunt's model), with only the
    warning of a run's first steps. Its weight is zero now (its gradient is too): the same
    numbers as the model without it."""
    torch.manual_seed(0)
    model = _WithHead()
    torch.manual_seed(1)
    plain = _WithHead()
    plain.body.load_state_dict(model.body.state_dict())
    plain.head.requires_grad_(False)
    got = _preconditioned_run(model, model.parameters())
    want = _preconditioned_run(plain, plain.body.parameters())
    assert [r["preconditioned"] for r in got.history] == [False] * 2 + [True] * 6
    for key in ("g2", "trace_sigma", "b_simple"):
        assert [r[key] for r in got.history] == pytest.approx([r[key] for r in want.history])


def test_a_large_parameter_without_gradient_is_no_spread_of_the_preconditioner():
    """An unused 16×16 pooler holds most of the coordinates: its zero weights are not the
    preconditioner's, and the wide-preconditioner warning (which read "inf× its median" in a
    review of the first version) stays quiet when the used coordinates span little."""
    torch.manual_seed(0)
    model = _WithHead()
    model.head = nn.Linear(16, 16)  # never reached by the loss
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _preconditioned_run(model, model.parameters())
    assert not [w for w in caught if "its median" in str(w.message)]


def test_a_parameter_s_first_gradient_leaves_its_step_out_and_does_not_hold_the_others_back():
    """A head reached on steps 5 and 7 only: preconditioning starts at step 3 as asked
    (Adam counts steps per parameter; the head's count held every parameter back before), the
    step of the head's first gradient is left out with a warning (its P is not defined yet),
    and step 7 is measured with the head's P."""
    torch.manual_seed(0)
    model = _WithHead(uses=(5, 7))
    with pytest.warns(RuntimeWarning, match=r"\['head.bias', 'head.weight'\] got their first"):
        tracker = _preconditioned_run(model, model.parameters())
    steps = [r["step"] for r in tracker.history]
    assert steps == [1, 2, 3, 4, 6, 7, 8], steps
    assert [r["preconditioned"] for r in tracker.history] == [False] * 2 + [True] * 5


def _mlp_and_data() -> tuple[nn.Module, torch.Generator]:
    """The resume tests' model (seeded) and the generator of their batches."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)
    ), torch.Generator().manual_seed(0)


def _resumable(model, precondition_from=2, **options):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return opt, noisescale.GradientNoiseTracker(
        model,
        precondition=opt,
        precondition_from=precondition_from,
        per_example_fraction=1.0,
        **options,
    )


def _train(model, tracker, opt, steps, g):
    for _ in range(steps):
        model(torch.randn(8, 3, generator=g)).pow(2).mean().backward()
        tracker.step()
        opt.step()
        opt.zero_grad()


def test_a_preconditioned_checkpoint_is_not_resumed_plain():
    """A checkpoint whose estimate is preconditioned, loaded into a tracker without
    precondition=: refused, as other changes of what is measured are (until 2026-12-05 the
    plain steps were folded into the preconditioned averages: tr Σ 51% off on a hunt's model).
    A plain checkpoint, or one taken before preconditioning began, resumes either way."""
    model, g = _mlp_and_data()
    opt, tracker = _resumable(model)
    _train(model, tracker, opt, 1, g)
    early = tracker.state_dict()
    _train(model, tracker, opt, 4, g)
    late = tracker.state_dict()
    tracker.remove()
    plain = noisescale.GradientNoiseTracker(model, per_example_fraction=1.0)
    with pytest.raises(NoiseScaleInputError, match=r"preconditioned gradient \(precondition="):
        plain.load_state_dict(late)
    plain.load_state_dict(early)
    plain.remove()


def test_a_resumed_tracker_whose_optimizer_has_no_state_leaves_its_plain_steps_out():
    """Resumed with precondition= but a fresh optimizer (its state not restored): the steps
    before it has state again are plain, and are left out of the preconditioned estimate with a
    warning that says so (before 2026-12-05 they were folded in, and the warning promised a
    restart that did not come)."""
    model, g = _mlp_and_data()
    opt, tracker = _resumable(model)
    _train(model, tracker, opt, 5, g)
    state = tracker.state_dict()
    folded = tracker.estimate().steps
    tracker.remove()
    opt, resumed = _resumable(model)
    resumed.load_state_dict(state)
    with pytest.warns(RuntimeWarning, match="preconditioned since step 3, so the step is left"):
        _train(model, resumed, opt, 4, g)
    records = resumed.history
    assert [r["preconditioned"] for r in records] == [False, False, True, True]
    assert [r["skipped"] for r in records] == [True, True, False, False]
    assert resumed.estimate().steps == folded + 2


def test_refusals():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    with pytest.raises(NoiseScaleInputError, match="Adam, AdamW or RMSprop"):
        noisescale.GradientNoiseTracker(
            model, precondition=torch.optim.SGD(model.parameters(), lr=0.1)
        )
    with pytest.raises(NoiseScaleInputError, match="not in the precondition optimizer"):
        noisescale.GradientNoiseTracker(model, precondition=torch.optim.Adam(model[0].parameters()))


def _run(model, tracker, opt, steps, g, stepped=None):
    """``steps`` steps of the MLP regression; ``stepped`` is the optimizer that trains (``opt``
    by default: another one leaves ``opt`` unstepped)."""
    stepping = opt if stepped is None else stepped
    for _ in range(steps):
        model(torch.randn(8, 3, generator=g)).pow(2).mean().backward()
        tracker.step()
        stepping.step()
        stepping.zero_grad()


def _assert_unavailable(e, *fragments):
    assert math.isnan(e.b_simple) and math.isnan(e.g2) and math.isnan(e.trace_sigma)
    assert (e.low, e.high, e.steps) == (0.0, math.inf, 0)
    assert not e.available and e.relative_width == math.inf
    for fragment in fragments:
        assert fragment in e.reason, (fragment, e.reason)


def test_an_estimate_before_preconditioning_starts_is_unavailable_and_says_why():
    """precondition= with an optimizer that never steps (a second Adam passed by mistake): until
    2026-12-05 estimate() returned the plain B_simple, bit-identical to a plain tracker's, with
    reason '' and one warning at step 1 that promised a restart. It is unavailable now, saying
    preconditioning has not started and that this optimizer does not step; a warning says so
    once the tracker has run well past precondition_from. The schedule and the b_simple
    property take it as any unavailable estimate."""
    model, g = _mlp_and_data()
    idle = torch.optim.Adam(model.parameters(), lr=1e-2)
    trains = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = noisescale.GradientNoiseTracker(
        model, precondition=idle, precondition_from=3, groups=True, per_example_fraction=1.0
    )
    with pytest.warns(RuntimeWarning, match="has not stepped in the 10 steps the tracker"):
        _run(model, tracker, idle, 12, g, stepped=trains)
    assert [r["preconditioned"] for r in tracker.history] == [False] * 12
    assert not idle.state
    why = ("preconditioning has not started", "0 of precondition_from=3", "trains this model")
    _assert_unavailable(tracker.estimate(), *why)
    groups = tracker.estimate_groups()
    assert set(groups) == {"0", "2"}
    for e in groups.values():
        _assert_unavailable(e, *why)
    assert math.isnan(tracker.b_simple)
    schedule = noisescale.AdaptiveBatchSize(
        micro_batch_size=8, max_batch_size=64, factor=1.0, interval=1
    )
    assert schedule.step(tracker) is False and schedule.batch_size == 8


def test_an_estimate_in_the_warm_up_is_unavailable_then_preconditioned():
    """The first precondition_from optimizer steps of every run are plain: estimate() is
    unavailable there (it was the plain B_simple, unmarked, before 2026-12-05), naming how far
    the optimizer is; from the first preconditioned step it is the preconditioned average."""
    model, g = _mlp_and_data()
    opt, tracker = _resumable(model, precondition_from=5)
    _run(model, tracker, opt, 3, g)
    e = tracker.estimate()
    _assert_unavailable(e, "preconditioning has not started", "3 of precondition_from=5")
    assert "trains this model" not in e.reason
    _run(model, tracker, opt, 5, g)
    e = tracker.estimate()
    assert e.available and e.reason == "" and e.steps == 3
    records = [r for r in tracker.history if r["preconditioned"]]
    assert e.b_simple == pytest.approx(records[-1]["b_simple"], rel=1e-12)


class _NoBiasCorrection(torch.optim.Adam):
    """An Adam that divides by √v + ε, without v's bias correction (transformers' old
    ``AdamW(correct_bias=False)``, many hand-written Adams)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"])


class _OwnInitGroup(torch.optim.AdamW):
    def _init_group(self, *args, **kwargs):
        return super()._init_group(*args, **kwargs)


class _NewDefaults(torch.optim.AdamW):
    def __init__(self, params):
        super().__init__(params, lr=1e-2, eps=1e-6)


def test_a_subclass_that_overrides_the_update_is_refused():
    """A subclass of Adam passes isinstance whatever its step does: until 2026-12-05 one
    without bias correction was measured with Adam's P (|P ⊙ G|² off by 1 − β₂ᵗ, 0.5% of the
    truth on a hunt's model). A subclass that overrides step or _init_group is refused, naming
    it; one that keeps torch's update (new defaults), and AdamW (a subclass of Adam in this
    torch), are accepted — also after torch wrapped step for its profiler hooks."""
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    for kind, overridden in ((_NoBiasCorrection, "step"), (_OwnInitGroup, "_init_group")):
        opt = kind(model.parameters())
        with pytest.raises(
            NoiseScaleInputError, match=rf"{kind.__name__}, a subclass .* {overridden}"
        ):
            noisescale.GradientNoiseTracker(model, precondition=opt)
    for kind in (_NewDefaults, torch.optim.AdamW, torch.optim.Adam, torch.optim.RMSprop):
        opt = kind(model.parameters())
        opt.zero_grad()
        opt.step()  # wraps type(opt).step in torch's profiler hook
        noisescale.GradientNoiseTracker(model, precondition=opt).remove()


def _twin_runs(wrap):
    """Two identical preconditioned runs, one given ``wrap(opt)``, one ``opt``: their records."""
    out = []
    for wrapped in (True, False):
        model, g = _mlp_and_data()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        tracker = noisescale.GradientNoiseTracker(
            model,
            precondition=wrap(opt) if wrapped else opt,
            precondition_from=2,
            per_example_fraction=1.0,
        )
        assert tracker.precondition is opt
        _train(model, tracker, opt, 5, g)
        out.append(tracker.history)
    return out


def test_accelerate_s_and_lightning_s_optimizer_wrappers_are_unwrapped():
    """accelerate's prepare() wraps the optimizer in AcceleratedOptimizer (same state, one
    process): refused until 2026-12-05 ("got AcceleratedOptimizer"), with no word of
    .optimizer. It and Lightning's LightningOptimizer are unwrapped now (the same records as
    the optimizer itself); another wrapper holding a supported optimizer is refused, saying to
    pass the one inside."""
    accelerate = pytest.importorskip("accelerate")
    lightning = pytest.importorskip("lightning.pytorch.core.optimizer")
    fabric = pytest.importorskip("lightning.fabric.wrappers")
    accelerator = accelerate.Accelerator(cpu=True)

    def fabric_wrap(optimizer):  # (fabric.setup's FabricAdam: a subclass with Fabric's step)
        return fabric._FabricOptimizer(optimizer, strategy=None)

    try:
        for wrap in (accelerator.prepare_optimizer, lightning.LightningOptimizer, fabric_wrap):
            # (Lightning's is a LightningAdam, a subclass of Adam with Lightning's step)
            assert type(wrap(torch.optim.Adam(nn.Linear(1, 1).parameters()))).__name__ in (
                "AcceleratedOptimizer",
                "LightningAdam",
                "FabricAdam",
            )
            got, want = _twin_runs(wrap)
            assert [r["preconditioned"] for r in got] == [False] * 2 + [True] * 3
            assert [r["g2"] for r in got] == [r["g2"] for r in want]
    finally:
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)

    class Holder:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    model = nn.Linear(3, 1)
    with pytest.raises(NoiseScaleInputError, match=r"Holder, a wrapper .*=opt\.optimizer"):
        noisescale.GradientNoiseTracker(
            model, precondition=Holder(torch.optim.Adam(model.parameters()))
        )


class _HeadLater(nn.Module):
    """A body, and a head the loss reaches from step 3 on (the first of them overflows)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.head = nn.Linear(3, 2)
        self.use = False

    def forward(self, x):
        return self.body(x) + self.head(x) if self.use else self.body(x)


def _scaled_run(fused: bool):
    torch.manual_seed(0)
    model = _HeadLater()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    tracker = noisescale.GradientNoiseTracker(
        model, precondition=opt, precondition_from=1, per_example_fraction=1.0, scaler=scaler
    )
    g = torch.Generator().manual_seed(3)
    for step in range(6):
        x, y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
        model.use = step in (2, 3)
        if step == 2:
            y[0, 0] = float("inf")  # an overflow step: the scaler skips opt.step
        scaler.scale((0.5 * (model(x) - y).pow(2).sum(1)).mean()).backward()
        tracker.step()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return opt, model, tracker.history


def test_fused_adam_s_unstepped_state_is_no_state():
    """Fused Adam makes state (step 0, v = 0) for a head whose first gradient comes on a step a
    GradScaler skips for overflow; until 2026-12-05 the head's next step read P = 0/0 = NaN and
    was dropped without a word. That state counts as none now: the step is left out with the
    first-gradient warning, as with non-fused Adam, and the records are non-fused Adam's."""
    with pytest.warns(RuntimeWarning, match=r"\['head.bias', 'head.weight'\] got their first"):
        opt, model, fused = _scaled_run(fused=True)
    _, _, plain = _scaled_run(fused=False)
    assert [r["step"] for r in fused] == [r["step"] for r in plain] == [1, 2, 5, 6]
    assert all(math.isfinite(r["g2"]) for r in fused)
    assert [r["g2"] for r in fused] == pytest.approx([r["g2"] for r in plain], rel=1e-6)
    # the unit: a state whose step is 0 weighs zero and is reported stateless
    opt.state[model.head.weight]["step"].zero_()
    params = list(model.parameters())
    assert torch.all(preconditioner_weights(opt, params)[id(model.head.weight)] == 0)
    assert stateless_parameters(opt, params) == [model.head.weight]


def test_the_wide_preconditioner_warning_quotes_the_epsilon_of_the_widest_group():
    """Groups with ε = 0.1 and ε = 1e-8, the ~0 second moments in the second: until 2026-12-05
    the warning quoted the first group's ε, "P ≈ 1/ε = 1e+01", where P was about 1e+08."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.Adam(
        [{"params": model[2].parameters(), "eps": 0.1}, {"params": model[0].parameters()}],
        lr=1e-3,
        eps=1e-8,
    )
    tracker = noisescale.GradientNoiseTracker(model, precondition=opt, precondition_from=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            x, y = torch.randn(16, 3), torch.randn(16, 2)
            x[:, 2] = 0.0  # an input never non-zero: v = 0 for its weights
            (0.5 * (model(x) - y).pow(2).sum(1)).mean().backward()
            tracker.step()
            opt.step()
            opt.zero_grad()
    wide = [str(w.message) for w in caught if "its median" in str(w.message)]
    assert len(wide) == 1 and "P ≈ 1/ε = 1e+08, ε = 1e-08 in param group 1" in wide[0], wide
    # the quoted P is the largest one: 1/ε of the group, since those coordinates have v = 0
    p2 = preconditioner_weights(opt, list(model.parameters()))
    assert float(p2[id(model[0].weight)].max().sqrt()) == pytest.approx(1e8)


def test_a_resume_with_a_larger_precondition_from_names_it():
    """Optimizer state restored (5 steps) but the default precondition_from=100: until
    2026-12-05 the warning said the optimizer held no second-moment state and to restore it."""
    model, g = _mlp_and_data()
    opt, tracker = _resumable(model)
    _train(model, tracker, opt, 5, g)
    state, optimizer_state = tracker.state_dict(), opt.state_dict()
    tracker.remove()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.load_state_dict(optimizer_state)
    resumed = noisescale.GradientNoiseTracker(model, precondition=opt, per_example_fraction=1.0)
    resumed.load_state_dict(state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, resumed, opt, 2, g)
    messages = [str(w.message) for w in caught]
    assert any("taken 5 steps, fewer than precondition_from=100" in m for m in messages)
    assert not any("holds no second-moment state" in m for m in messages), messages


def test_an_optimizer_recreated_after_preconditioning_started_leaves_its_steps_out():
    """(A hunt, 2026-12-06.) Adam recreated mid-run (a new learning rate, a fresh state): the
    tracker kept weighing the norms by the old optimizer's frozen second moments, preconditioned
    g2 −7.6 against 1,876 by the training optimizer's, without a word. Steps after two in a
    row at which the precondition optimizer did not step are left out now, said once; one
    skipped step is not (reviews)."""
    model, g = _mlp_and_data()
    opt, tracker = _resumable(model)
    try:
        _train(model, tracker, opt, 5, g)
        assert [r["skipped"] for r in tracker.history][2:] == [False] * 3
        new = torch.optim.Adam(model.parameters(), lr=5e-3)
        with pytest.warns(RuntimeWarning, match="precondition= has not stepped in the last 2"):
            # step 6: the old one stepped after step 5; steps 7, 8: it did not
            _run(model, tracker, opt, 4, g, stepped=new)
        assert [r["step"] for r in tracker.history][-1] == 7
        # a single skipped step (a loss-spike guard) is not left out

        class Skipped:
            def step(self):
                pass

            def zero_grad(self):
                model2.zero_grad()

        model2, g2 = _mlp_and_data()
        opt2, tracker2 = _resumable(model2)
        try:
            _train(model2, tracker2, opt2, 4, g2)
            _run(model2, tracker2, opt2, 1, g2, stepped=Skipped())
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                _train(model2, tracker2, opt2, 2, g2)
            assert [r["step"] for r in tracker2.history][-2:] == [6, 7]
        finally:
            tracker2.remove()
    finally:
        tracker.remove()


def test_a_resume_within_a_stalled_optimizer_leaves_the_same_steps_out():
    """Adam recreated after step 5 (the precondition optimizer stalls), the checkpoint taken
    after step 7, once it had missed its step at step 7: the uninterrupted run leaves steps 8
    on out (two tracker steps without its step). Until 2026-12-07 the stall's count was not in
    state_dict and restarted at 0 on resume: steps 8 and 9 were weighed by the stalled
    optimizer's frozen second moments without a word (g2 16.09 for 18.69, B_simple 43.85 for
    44.41, and an interval [7.58, inf) the run never had; a hunt)."""

    def run(resume_at=None):
        model, g = _mlp_and_data()
        opt, tracker = _resumable(model)
        new = torch.optim.Adam(model.parameters(), lr=5e-3)
        records = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _train(model, tracker, opt, 5, g)
            _run(model, tracker, opt, 2 if resume_at else 7, g, stepped=new)
            if resume_at:
                state, saved = tracker.state_dict(), opt.state_dict()
                records += tracker.history
                tracker.remove()
                opt = torch.optim.Adam(model.parameters(), lr=1e-2)
                opt.load_state_dict(saved)
                tracker = noisescale.GradientNoiseTracker(
                    model, precondition=opt, precondition_from=2, per_example_fraction=1.0
                )
                tracker.load_state_dict(state)
                _run(model, tracker, opt, 5, g, stepped=new)
        records += tracker.history
        estimate = tracker.estimate()
        tracker.remove()
        return records, estimate

    (full, truth), (resumed, e) = run(), run(resume_at=7)
    assert [r["step"] for r in full] == [r["step"] for r in resumed] == list(range(1, 8))
    assert [r["g2"] for r in resumed] == pytest.approx([r["g2"] for r in full], rel=1e-12)
    assert (e.g2, e.trace_sigma, e.b_simple, e.low, e.high, e.steps) == pytest.approx(
        (truth.g2, truth.trace_sigma, truth.b_simple, truth.low, truth.high, truth.steps),
        rel=1e-12,
    )


def test_a_preconditioned_checkpoint_is_not_resumed_with_another_preconditioner():
    """An Adam-preconditioned checkpoint loaded into precondition=RMSprop: until 2026-12-07
    RMSprop's 1/(√v + ε) was averaged into Adam's 1/(√v̂ + ε) without a word once it had
    taken precondition_from steps. Refused now, naming both; AdamW (Adam's P) resumes to the
    uninterrupted run's estimate, and so does a checkpoint from before preconditioning
    began."""
    model, g = _mlp_and_data()
    opt, tracker = _resumable(model)
    _train(model, tracker, opt, 1, g)
    early = tracker.state_dict()
    _train(model, tracker, opt, 4, g)
    late = json.loads(json.dumps(tracker.state_dict()))
    tracker.remove()
    rms = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    other = noisescale.GradientNoiseTracker(
        model, precondition=rms, precondition_from=2, per_example_fraction=1.0
    )
    with pytest.raises(NoiseScaleInputError, match=r"by Adam/AdamW's second moments \(since"):
        other.load_state_dict(late)
    other.load_state_dict(early)  # (plain until then: RMSprop's estimate starts afresh)
    other.remove()

    def finish(optimizer_class, state, saved):
        model, g = _mlp_and_data()
        _, tracker = _resumable(model)
        _train(model, tracker, torch.optim.Adam(model.parameters(), lr=1e-2), 5, g)
        tracker.remove()
        opt = optimizer_class(model.parameters(), lr=1e-2)
        opt.load_state_dict(saved)
        tracker = noisescale.GradientNoiseTracker(
            model, precondition=opt, precondition_from=2, per_example_fraction=1.0
        )
        if state is not None:
            tracker.load_state_dict(state)
        return model, g, opt, tracker

    model, g = _mlp_and_data()
    opt, full = _resumable(model)
    _train(model, full, opt, 5, g)
    saved = copy.deepcopy(opt.state_dict())  # (its tensors are the optimizer's own)
    _train(model, full, opt, 3, g)
    model, g, opt, resumed = finish(torch.optim.AdamW, late, saved)
    _train(model, resumed, opt, 3, g)
    e, truth = resumed.estimate(), full.estimate()
    assert (e.g2, e.trace_sigma) == pytest.approx((truth.g2, truth.trace_sigma), rel=1e-12)
    resumed.remove()
    full.remove()


class _Cancelled(nn.Module):
    """The precision fuzzer's seed 4097: a stem bias before an instance norm, and an einsum and a
    linear head behind the norm's zero-initialised bias — gradients zero in exact arithmetic but
    for the norm's bias and the head's."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 6)
        self.norm = nn.InstanceNorm1d(6, affine=True)
        self.w = nn.Parameter(0.3 * torch.randn(6, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.norm(self.stem(x).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.einsum("ntd,ed->nte", h, self.w).mean(1))


def test_a_loss_scale_doubling_every_step_leaves_the_preconditioned_norms_exact():
    """A GradScaler whose scale doubles every step (growth_interval 1), clipping, Adam's default
    ε = 1e-8 with P up to ~1e8 on the coordinates whose gradient is zero in exact arithmetic:
    every record's |P⊙G|² and per-example mean |P⊙g_i|² equal brute force with Adam's state
    before the step, to float64's rounding. (The precision fuzzer called this WRONG-SILENT in
    float32, 0.4-2.5% off: there those coordinates' gradients are float32 rounding, ~1e-8, and P
    makes them O(1), so any two float32 computations differ that much — the oracle's, fixed in
    tests/fuzz_precision.py's _Rounding, hunt/pre_scaler_repro.py.)"""
    torch.manual_seed(0)
    model = _Cancelled()
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=1)
    tracker = noisescale.GradientNoiseTracker(
        model, precondition=opt, precondition_from=1, per_example_fraction=1.0, scaler=scaler
    )
    x, y = torch.randn(4, 3, 3), torch.tensor([0, 1, 2, 1])
    expected = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (step 1 is plain: the optimizer has no state yet)
        for step in range(5):
            if step:
                p2 = [manual_p2(opt, p) for p in params]
                with tracker.paused():
                    grads = [
                        torch.autograd.grad(
                            nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]),
                            params,
                        )
                        for i in range(4)
                    ]
                big = [torch.stack(col).mean(0) for col in zip(*grads, strict=True)]
                per_ex = np.mean(
                    [
                        sum(float((w * g**2).sum()) for w, g in zip(p2, gi, strict=True))
                        for gi in grads
                    ]
                )
                expected.append(
                    (sum(float((w * g**2).sum()) for w, g in zip(p2, big, strict=True)), per_ex)
                )
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            tracker.step()
            torch.nn.utils.clip_grad_norm_(params, 1e30)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    assert scaler.get_scale() == 16.0 * 2**5
    records = tracker.history[1:]
    assert [r["preconditioned"] for r in records] == [True] * 4
    f64 = 64 * torch.finfo(torch.float64).eps
    for record, (big, per_ex) in zip(records, expected, strict=True):
        assert record["sqnorm_big"] == pytest.approx(big, rel=f64)
        assert record["sources"]["per_example"]["sqnorm_small"] == pytest.approx(per_ex, rel=f64)


@pytest.mark.parametrize("sync_every", [1, 32])
def test_a_recreated_optimizer_s_steps_are_left_out_before_the_first_read_too(sync_every):
    """(tests/fuzz_beyond.py, seed 0, 2026-12-07.) The rule above looked at the state folded at
    the last sync only: with the default ``sync_every=32`` and nothing read, preconditioning had
    not "started" for it until the first read, so an optimizer recreated within the first 32
    measured steps after the first preconditioned one — here after step 5 of 12 — left its
    frozen second moments weighing steps 8-12 without a word (the fuzzer: 22 such steps of 30).
    The steps kept and the estimate are now those of a tracker read at every step."""
    runs = []
    for every in (1, sync_every):
        model, g = _mlp_and_data()
        opt, tracker = _resumable(model, sync_every=every)
        try:
            _run(model, tracker, opt, 5, g)
            with pytest.warns(RuntimeWarning, match="precondition= has not stepped in the last 2"):
                _run(model, tracker, opt, 7, g, stepped=torch.optim.Adam(model.parameters()))
            runs.append(([r["step"] for r in tracker.history], tracker.estimate()))
        finally:
            tracker.remove()
    assert runs[0][0] == runs[1][0] == [1, 2, 3, 4, 5, 6, 7]
    assert runs[1][1].g2 == runs[0][1].g2 and runs[1][1].trace_sigma == runs[0][1].trace_sigma


def test_an_optimizer_stepped_before_tracker_step_is_named_with_the_count_read():
    """(A review of tests/fuzz_beyond.py, 2026-12-07.) optimizer.step() between backward() and
    tracker.step(): step 1's norms were drawn with the optimizer at 0 steps, so they are plain,
    but the warning counted the steps at tracker.step() — "the optimizer has taken 1 step,
    fewer than precondition_from=1", false. It now says 0 steps and names the order; the
    records are those of the documented order (P is read during backward either way)."""
    runs = []
    for optimizer_first in (False, True):
        model, g = _mlp_and_data()
        opt, tracker = _resumable(model, precondition_from=1, sync_every=1)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(4):
                    model(torch.randn(8, 3, generator=g)).pow(2).mean().backward()
                    if optimizer_first:
                        opt.step()
                    tracker.step()
                    if not optimizer_first:
                        opt.step()
                    opt.zero_grad()
            said = [str(w.message) for w in caught]
            runs.append([(r["step"], r["preconditioned"], r["g2"]) for r in tracker.history])
        finally:
            tracker.remove()
        assert not any("taken 1 step, fewer than precondition_from=1" in m for m in said), said
        assert any("taken 0 steps, fewer than precondition_from=1" in m for m in said), said
        assert any("between this step's backward" in m for m in said) == optimizer_first, said
    assert [r[:2] for r in runs[1]] == [(1, False), (2, True), (3, True), (4, True)]
    assert runs[1] == runs[0]


@pytest.mark.parametrize(("replaced_after", "kept"), [(4, [1, 5]), (6, [1, 5]), (8, [1, 5, 9])])
def test_a_recreated_optimizer_is_seen_between_measured_steps_too(replaced_after, kept):
    """(A review of tests/fuzz_beyond.py, 2026-12-07.) measure_every=4 measures steps 1, 5, 9:
    the optimizer's step count was watched at measured steps only, so an optimizer replaced
    after step 4 had "moved" since step 5's watch when step 9 came, and step 9 was measured
    with its second moments frozen five steps, without a word. The count is watched at every
    step now: step 9 follows two or more steps without the optimizer (left out, said) unless
    it was replaced after step 8 (one missed step, measured, as the rule says)."""
    model, g = _mlp_and_data()
    opt, tracker = _resumable(model, precondition_from=1, sync_every=1, measure_every=4)
    try:
        _run(model, tracker, opt, replaced_after, g)
        fresh = torch.optim.Adam(model.parameters())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _run(model, tracker, opt, 12 - replaced_after, g, stepped=fresh)
        records = tracker.history
        assert [r["step"] for r in records] == kept
        said = any("has not stepped in the last" in str(w.message) for w in caught)
        assert said == (replaced_after < 8)
        used = [r for r in records if r["preconditioned"]]
        e = tracker.estimate()
        assert e.steps == len(used)
        if len(used) == 1:
            assert e.g2 == pytest.approx(used[0]["g2"], rel=1e-12)
    finally:
        tracker.remove()


class _CountedStep(torch.Tensor):
    """An optimizer step count that counts its reads to the host (a GPU sync each with fused or
    capturable Adam, whose counts are device tensors), while ``counting``."""

    counting = False
    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if cls.counting and func in _HOST_READS:
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


_HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__bool__,
    torch.Tensor.__index__,
}


@pytest.mark.parametrize("measure_every", [1, 3])
def test_the_optimizer_s_step_counts_are_read_twice_a_measured_step_and_never_between(
    measure_every,
):
    """(2026-12-07.) The tracker read each parameter's ``state["step"]`` with ``float()``: at
    every tracker step for the stale-optimizer rule and five times more at a measured step
    (P's bias correction, the count, the parameters without state) — with fused or capturable
    Adam on a GPU one device sync each: 36 at a measured step for this model's 6 stepped
    tensors and 6 at an unmeasured one (~1,800 and 300 for 300 tensors). They are read in one
    copy at a measured step's backward and one at its tracker.step() now (which must see an
    optimizer.step() run between the two: see the test below), none at the others (noted on
    the device, read with the next measured step's), and the records are those of before (the
    other tests here; tests/fuzz_beyond.py)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    unused = nn.Parameter(torch.zeros(2))  # no gradient, never stepped: no state
    model.register_parameter("unused", unused)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = noisescale.GradientNoiseTracker(
        model,
        precondition=opt,
        precondition_from=1,
        per_example_fraction=1.0,
        sync_every=1,
        measure_every=measure_every,
    )
    g = torch.Generator().manual_seed(0)
    reads = []
    try:
        for step in range(1, 10):
            _CountedStep.reads, _CountedStep.counting = 0, True
            model(torch.randn(8, 3, generator=g)).pow(2).mean().backward()
            tracker.step()
            _CountedStep.counting = False
            reads.append(_CountedStep.reads)
            opt.step()
            opt.zero_grad()
            if step == 1:  # Adam made its counts at its first step: make them count their reads
                for state in opt.state.values():
                    state["step"] = state["step"].as_subclass(_CountedStep)
        records = tracker.history
    finally:
        tracker.remove()
        _CountedStep.counting = False
    measured = [r["step"] for r in records]
    assert measured == list(range(1, 10, measure_every))
    assert all(r["preconditioned"] for r in records[1:])
    for step, n in enumerate(reads[1:], start=2):
        assert n == (2 if step in measured else 0), (step, reads)


@pytest.mark.parametrize("measure_every", [1, 3])
def test_a_step_that_leaves_the_version_counters_is_read_too(measure_every):
    """The counts read once at a measured step are not reused at the next: an optimizer step
    replayed from a CUDA graph (capturable Adam) writes ``state["step"]`` without moving its
    version counter, made so here after each eager step. The records are those of a plain
    run (a reuse across steps would read a bias correction a step old)."""
    runs = []
    for hide in (False, True):
        model, g = _mlp_and_data()
        opt, tracker = _resumable(
            model, precondition_from=1, sync_every=1, measure_every=measure_every
        )
        try:
            for _ in range(9):
                model(torch.randn(8, 3, generator=g)).pow(2).mean().backward()
                tracker.step()
                steps = [s["step"] for s in opt.state.values()]
                versions = [s._version for s in steps]
                opt.step()
                opt.zero_grad()
                if hide and versions:
                    torch._C._autograd._unsafe_set_version_counter(tuple(steps), tuple(versions))
            runs.append([(r["step"], r["preconditioned"], r["g2"]) for r in tracker.history])
        finally:
            tracker.remove()
    assert len(runs[0]) == len(range(1, 10, measure_every))
    assert runs[1] == runs[0]


@pytest.mark.parametrize("measure_every", [1, 4])
def test_an_optimizer_step_before_tracker_step_that_leaves_the_version_counters_is_seen(
    measure_every,
):
    """(2026-12-07, a review of the StepWatch.) tracker.step() reused the counts read during
    this step's backward where no step tensor's version counter had moved since; with
    ``optimizer.step()`` run between the two (warned about) and replayed from a CUDA graph
    (capturable Adam: the counts written, the counters held; made so here), the count seen
    stayed a step behind (the stale-optimizer rule's bookkeeping, saved in state_dict: [0, 2]
    at step 3 for [0, 3]). The counts are read afresh at each tracker.step() now, reused within
    the call only; every step's state and the warnings are those of a run whose counters
    move."""
    runs = []
    for hide in (False, True):
        model, g = _mlp_and_data()
        opt, tracker = _resumable(
            model, precondition_from=1, sync_every=1, measure_every=measure_every
        )
        seen = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for step in range(1, 13):
                    model(torch.randn(8, 3, generator=g)).pow(2).mean().backward()
                    counts = [s["step"] for s in opt.state.values()]
                    versions = [s._version for s in counts]
                    if step % 3 == 0:  # optimizer.step() first, its counters held
                        opt.step()
                        if hide and versions:
                            torch._C._autograd._unsafe_set_version_counter(
                                tuple(counts), tuple(versions)
                            )
                        tracker.step()
                    else:
                        tracker.step()
                        opt.step()
                    opt.zero_grad()
                    seen.append(tracker.state_dict()["optimizer_seen"])
            warned = sorted({str(w.message) for w in caught})
            records = [(r["step"], r["preconditioned"], r["g2"]) for r in tracker.history]
            runs.append((seen, warned, records))
        finally:
            tracker.remove()
    assert runs[0][0][2] == [0, 3]  # (step 3: the optimizer's third step seen at once)
    assert runs[1] == runs[0]


def test_step_counts_of_shape_one_are_read_as_numbers():
    """(2026-12-07, a review.) The counts stacked in one copy kept a count of shape (1,) (as a
    loaded state_dict may hold; ``float()`` of it, as before, reads it) a list: step_counts gave
    [[1.0], [1.0]] and the tracker failed on the bias correction. Read as numbers now, and a
    tracker's records are those of the 0-dim counts."""
    runs = []
    for shape in ((), (1,)):
        model, g = _mlp_and_data()
        opt, tracker = _resumable(model, precondition_from=1, sync_every=1)
        try:
            for _ in range(4):
                model(torch.randn(8, 3, generator=g)).pow(2).mean().backward()
                tracker.step()
                opt.step()
                opt.zero_grad()
                for state in opt.state.values():
                    state["step"] = state["step"].reshape(shape)
            params = list(model.parameters())
            assert step_counts(opt, params) == [4.0] * len(params)
            runs.append([(r["step"], r["preconditioned"], r["g2"]) for r in tracker.history])
        finally:
            tracker.remove()
    assert runs[1] == runs[0] and len(runs[0]) == 4


def test_the_counts_noted_between_measured_steps_are_saved():
    """(2026-12-07, a review.) state_dict() saved the stale-optimizer bookkeeping as None where
    the tracker had read no count yet, before reading the counts noted at unmeasured steps: a
    tracker resumed with precondition= from one saved without, one unmeasured step on, saved
    None for [0, 2] (the optimizer at 2 steps, seen 0 steps ago) and a resume from it counted
    the stall from 0 again."""
    model, g = _mlp_and_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    options = dict(per_example_fraction=1.0, measure_every=4, sync_every=1)

    def train(tracker, steps):
        for _ in range(steps):
            model(torch.randn(8, 3, generator=g)).pow(2).mean().backward()
            tracker.step()
            opt.step()
            opt.zero_grad()

    plain = noisescale.GradientNoiseTracker(model, **options)
    try:
        train(plain, 2)
        saved = plain.state_dict()
    finally:
        plain.remove()
    tracker = noisescale.GradientNoiseTracker(
        model, precondition=opt, precondition_from=1, **options
    )
    try:
        tracker.load_state_dict(saved)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(tracker, 1)
        assert tracker.history == []  # (step 3: unmeasured, its count noted)
        assert tracker.state_dict()["optimizer_seen"] == [0, 2]
    finally:
        tracker.remove()
