"""Adaptive batch size, warm-up ramps and learning-rate rules (paper App. D, A.2, E.2)."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from noisescale import GradientNoiseTracker, theory
from noisescale.errors import NoiseScaleInputError
from noisescale.estimators import NoiseEstimate
from noisescale.schedule import (
    AdaptiveBatchSize,
    BatchSizeRamp,
    ResizableBatchSampler,
    carry_lr_factor,
    check_lr_schedulers,
    lr_factor,
    quantized_batch_size,
    ramp_batch_size,
    scale_lr,
    target_batch_size,
)


def _estimate(b_simple: float, rel_width: float = 0.1, g2: float = 1.0) -> NoiseEstimate:
    """An estimate with B_simple = tr Σ/|G|² and an interval of the given relative width."""
    half = rel_width * b_simple / 2
    return NoiseEstimate(g2, b_simple * g2, b_simple, b_simple - half, b_simple + half)


# -- pure rules --------------------------------------------------------------------------------


def test_target_is_sqrt_of_r_times_b_simple_or_a_multiple():
    assert target_batch_size(400.0, exchange_rate=100.0) == pytest.approx(200.0)  # eq. D.6
    assert target_batch_size(400.0, factor=0.5) == 200.0
    for bad in ({}, {"exchange_rate": 1.0, "factor": 1.0}, {"exchange_rate": 0.0}):
        with pytest.raises(NoiseScaleInputError):
            target_batch_size(10.0, **bad)
    with pytest.raises(NoiseScaleInputError, match="B_simple"):
        target_batch_size(math.nan, factor=1.0)


@given(
    b=st.floats(0.01, 1e6),
    m=st.integers(1, 64),
    lo_k=st.integers(1, 8),
    span=st.integers(0, 64),
)
def test_quantized_batch_is_a_bounded_multiple_nearest_to_the_target(b, m, lo_k, span):
    lo, hi = lo_k * m, (lo_k + span) * m
    q = quantized_batch_size(b, m, lo, hi)
    assert q % m == 0 and lo <= q <= hi
    if lo <= b <= hi:
        assert abs(q - b) <= m / 2 + 1e-9


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_an_infinite_target_is_the_largest_batch():
    """B_simple ≈ 1e308 with factor 2, or r·B_simple overflowing: the target is infinite and
    the batch is the maximum (math.floor(inf) raised OverflowError, a hunt)."""
    assert quantized_batch_size(math.inf, 8, 8, 64) == 64
    for setting in ({"factor": 2.0}, {"exchange_rate": 4000.0}):
        c = _controller(micro_batch_size=8, max_batch_size=64, interval=1,
                        **{"exchange_rate": None, **setting})  # fmt: skip
        c.step(_estimate(1e308))
        assert c.batch_size == 64


def test_lr_factor_rules_in_closed_form():
    assert lr_factor(400, 100, "none") == 1.0
    assert lr_factor(400, 100, "linear") == 4.0
    assert lr_factor(400, 100, "sqrt") == 2.0
    # eq. A.3: the ratio of ε*/(1 + B*/B)^α at the two batch sizes, here the paper's SVHN
    # relation ε = 0.27·B/(96 + B) (App. D.2, footnote 20), and an Adam-like α = 0.7
    for alpha in (1.0, 0.7):
        want = theory.lr_central(512, 0.27, 96, alpha) / theory.lr_central(64, 0.27, 96, alpha)
        assert lr_factor(512, 64, "paper", b_star=96.0, alpha=alpha) == pytest.approx(want)
    with pytest.raises(NoiseScaleInputError, match="b_star"):
        lr_factor(512, 64, "paper")
    with pytest.raises(NoiseScaleInputError, match="unknown"):
        lr_factor(512, 64, "cubic")  # type: ignore[arg-type]


def test_adascale_gain_from_g2_and_trace():
    # σ² = tr Σ/B₀ = 4, μ² = 1, r = 4: gain = (4 + 1)/(4/4 + 1) = 2.5 (Johnson et al. 2020)
    assert lr_factor(64, 16, "adascale", g2=1.0, trace_sigma=64.0) == pytest.approx(2.5)
    # pure noise: linear scaling; no noise: no scaling; negative averages clamp to 0
    assert lr_factor(64, 16, "adascale", g2=0.0, trace_sigma=64.0) == pytest.approx(4.0)
    assert lr_factor(64, 16, "adascale", g2=-0.1, trace_sigma=64.0) == pytest.approx(4.0)
    assert lr_factor(64, 16, "adascale", g2=1.0, trace_sigma=0.0) == pytest.approx(1.0)
    assert lr_factor(64, 16, "adascale", g2=0.0, trace_sigma=0.0) == 1.0
    with pytest.raises(NoiseScaleInputError, match="adascale"):
        lr_factor(64, 16, "adascale", g2=1.0)


@given(
    b0=st.integers(1, 4096),
    k=st.floats(1.0, 64.0),
    g2=st.floats(1e-6, 1e3),
    tr=st.floats(1e-6, 1e6),
)
def test_adascale_is_the_paper_rule_at_b_simple_and_lies_between_1_and_r(b0, k, g2, tr):
    b = b0 * k
    gain = lr_factor(b, b0, "adascale", g2=g2, trace_sigma=tr)
    assert gain == pytest.approx(lr_factor(b, b0, "paper", b_star=tr / g2), rel=1e-9)
    assert 1.0 - 1e-9 <= gain <= k * (1 + 1e-9)


def test_ramp_batch_size_linear_and_stepwise():
    points = [(0.0, 32), (1000.0, 512)]
    assert ramp_batch_size(0, points, 32, interpolate=True) == 32
    assert ramp_batch_size(500, points, 32, interpolate=True) == 288  # 32 + 240 = 272 → 9×32
    assert ramp_batch_size(5000, points, 32, interpolate=True) == 512
    assert ramp_batch_size(999, points, 32, interpolate=False) == 32
    assert ramp_batch_size(1000, points, 32, interpolate=False) == 512


def test_scale_lr_keeps_the_factor_through_a_lambda_scheduler():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    scale_lr(opt, 4.0, [sched])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4 / 2)
    with pytest.raises(NoiseScaleInputError):
        scale_lr(opt, 0.0)


# -- the adaptive controller -------------------------------------------------------------------


def _controller(**kw) -> AdaptiveBatchSize:
    settings = dict(
        micro_batch_size=16,
        max_batch_size=1024,
        exchange_rate=100.0,
        interval=10,
        hysteresis=1.25,
        max_relative_width=0.5,
    )
    return AdaptiveBatchSize(**{**settings, **kw})


def test_decides_every_interval_steps_and_only_on_narrow_intervals():
    c = _controller()
    assert (c.batch_size, c.num_micro_batches, c.loss_divisor) == (16, 1, 1)
    # √(100·400) = 200 → 13 micro-batches of 16 = 208; read only at step 10
    for _ in range(9):
        assert not c.step(_estimate(400.0))
    assert c.batch_size == 16
    assert not c.step(_estimate(400.0, rel_width=0.8))  # too wide at step 10
    assert c.history[-1]["action"] == "wait: interval too wide"
    for _ in range(9):
        c.step(_estimate(400.0))
    assert c.batch_size == 16
    assert c.step(_estimate(400.0))  # step 20: narrow enough
    assert (c.batch_size, c.num_micro_batches, c.loss_divisor) == (208, 13, 13)
    assert c.state.last_change == 20 and c.state.changes == 1
    assert c.state.examples == 20 * 16


def test_hysteresis_bounds_and_allow_decrease():
    c = _controller(interval=1, batch_size=208)
    assert not c.step(_estimate(484.0))  # target √48400 = 220 → 224: ratio 1.08 < 1.25
    assert c.batch_size == 208
    assert c.step(_estimate(1e8))  # clamped at the maximum
    assert c.batch_size == 1024
    assert c.step(_estimate(1.0))  # √100 = 10 → one micro-batch, the minimum
    assert c.batch_size == 16
    grow_only = _controller(interval=1, batch_size=208, allow_decrease=False)
    assert not grow_only.step(_estimate(1.0))
    assert grow_only.batch_size == 208
    # √(1·36) = 6 lies between the multiples 4 and 8: move to the nearer (8) and stay there
    coarse = _controller(micro_batch_size=4, max_batch_size=64, exchange_rate=1.0, interval=1)
    changed = [coarse.step(_estimate(36.0)) for _ in range(5)]
    assert changed == [True, False, False, False, False] and coarse.batch_size == 8
    not_yet = _controller(interval=1)
    assert not not_yet.step(NoiseEstimate(math.nan, math.nan, math.nan))
    assert not_yet.history[-1]["action"] == "wait: no estimate yet"


def test_factor_target_and_linear_lr_written_to_the_optimizer():
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.1}, {"params": [], "lr": 0.01}])
    c = _controller(exchange_rate=None, factor=0.5, interval=1, optimizer=opt, lr_rule="linear")
    assert c.step(_estimate(256.0))  # 0.5·256 = 128
    assert c.batch_size == 128 and c.lr_factor == 8.0
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.8, 0.08])
    # lr tuned at 64 but starting at 16: the sqrt rule rescales at once
    opt2 = torch.optim.SGD([p], lr=0.1)
    _controller(optimizer=opt2, lr_rule="sqrt", base_batch_size=64)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.05)


def test_a_group_added_later_takes_the_factor_from_its_own_rate():
    """Progressive unfreezing: a group added after a change (at its rate tuned at B₀) takes
    the factor in effect at the next decision, and every group ends at its base × the rule's
    factor; a checkpoint taken before that decision resumes it. Scaling every group by the
    ratio new/old left the added one at 0.4 where the rule puts 1.6 (a hunt)."""

    def run(resume_after_add: bool) -> list[float]:
        p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.1)
        kw = dict(micro_batch_size=4, exchange_rate=None, factor=1.0, interval=1,
                  lr_rule="linear", optimizer=opt)  # fmt: skip
        c = _controller(**kw)
        c.step(_estimate(16.0))  # 4 → 16: factor 4
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4])
        opt.add_param_group({"params": [q], "lr": 0.2})  # tuned at B₀ = 4
        if resume_after_add:
            saved = json.loads(json.dumps(c.state_dict()))
            opt = torch.optim.SGD([{"params": [p], "lr": 0.1}, {"params": [q], "lr": 0.2}])
            opt.load_state_dict(copy.deepcopy(kw["optimizer"].state_dict()))
            c = _controller(**{**kw, "optimizer": opt})
            c.load_state_dict(saved)
        c.step(_estimate(64.0))  # 16 → 64: factor 16
        assert c.lr_factor == 16.0
        return [g["lr"] for g in opt.param_groups]

    assert run(False) == pytest.approx([1.6, 3.2])
    assert run(True) == pytest.approx([1.6, 3.2])


@pytest.mark.parametrize(
    "estimate", [_estimate(64.0, rel_width=5.0), NoiseEstimate(-1.0, 1.0, math.nan, 0.0, math.inf)]
)
def test_a_group_added_takes_the_factor_while_the_gate_waits(estimate):
    """A group added after a change takes the factor in effect at the next decision also when
    it waits ("interval too wide", "no estimate yet"): it stayed at its own rate for as long as
    the gate waited, 0.02 for 0.08 at factor 4 (a hunt)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    c = _controller(micro_batch_size=8, max_batch_size=64, batch_size=32, base_batch_size=8,
                    exchange_rate=None, factor=1.0, interval=1, lr_rule="linear",
                    optimizer=opt)  # fmt: skip
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 0.02})
    c.step(estimate)
    assert c.history[-1]["action"].startswith("wait")
    assert c.lr_factor == 4.0
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 0.08])
    c.step(estimate)  # and only once
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 0.08])


def test_measured_rules_follow_the_estimate():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    c = _controller(interval=1, optimizer=opt, lr_rule="adascale")
    assert c.lr_factor == 1.0  # nothing measured yet, start at B₀
    c.step(_estimate(400.0, g2=2.0))  # → 208
    want = lr_factor(208, 16, "adascale", g2=2.0, trace_sigma=800.0)
    assert c.lr_factor == pytest.approx(want)
    assert opt.param_groups[0]["lr"] == pytest.approx(want)
    paper = _controller(interval=1, lr_rule="paper")  # B* = measured B_simple
    paper.step(_estimate(400.0))
    assert paper.lr_factor == pytest.approx(lr_factor(208, 16, "paper", b_star=400.0))


def test_adamw_moments_are_kept_when_the_batch_changes():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    before = {
        id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for p, s in opt.state.items()
    }
    c = _controller(interval=1, optimizer=opt, lr_rule="sqrt")
    assert c.step(_estimate(400.0))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * math.sqrt(208 / 16))
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, before[id(p)][k]), k


def test_bad_settings_are_refused():
    with pytest.raises(NoiseScaleInputError, match="multiple"):
        _controller(max_batch_size=1000)
    with pytest.raises(NoiseScaleInputError, match="below"):
        _controller(min_batch_size=64, max_batch_size=32)
    with pytest.raises(NoiseScaleInputError, match="exactly one"):
        _controller(factor=1.0)
    with pytest.raises(NoiseScaleInputError, match="hysteresis"):
        _controller(hysteresis=0.9)
    with pytest.raises(NoiseScaleInputError, match="rule"):
        _controller(lr_rule="cubic")
    with pytest.raises(NoiseScaleInputError, match="outside"):
        _controller(batch_size=2048)
    with pytest.raises(NoiseScaleInputError, match="measured"):
        BatchSizeRamp.linear(16, 64, 100, micro_batch_size=16, lr_rule="adascale")


# -- realised with gradient accumulation, driven by the tracker ----------------------------------


def _problem(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = (x @ torch.randn(6, generator=g) > 0).long()
    return x, y


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))


def test_accumulated_gradient_is_the_full_batch_mean_and_the_tracker_sees_the_batch():
    x, y = _problem()
    model = _model()
    tracker = GradientNoiseTracker(model, sync_every=1)
    c = _controller(micro_batch_size=8, batch_size=32, max_batch_size=64, interval=1)
    k = c.num_micro_batches
    for j in range(k):
        xs, ys = x[8 * j : 8 * (j + 1)], y[8 * j : 8 * (j + 1)]
        (F.cross_entropy(model(xs), ys) / c.loss_divisor).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    tracker.step()
    est = tracker.estimate()
    c.step(est)
    assert tracker.history[-1]["b_big"] == 32.0
    model.zero_grad()
    F.cross_entropy(model(x[:32]), y[:32]).backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
    assert c.history[-1]["b_simple"] == est.b_simple


def _run(steps: int, state: dict | None = None, split_at: int | None = None):
    """Train with the tracker driving the controller; optionally resume from ``state``."""
    x, y = _problem()
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tracker = GradientNoiseTracker(model, sync_every=4, per_example_fraction=1.0)
    c = AdaptiveBatchSize(
        micro_batch_size=8,
        max_batch_size=128,
        factor=2.0,
        interval=5,
        hysteresis=1.2,
        max_relative_width=math.inf,
        optimizer=opt,
        lr_rule="sqrt",
    )
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        tracker.load_state_dict(state["tracker"])
        c.load_state_dict(json.loads(state["schedule"]))  # JSON-safe
        start = state["step"]
    seen = []
    for step in range(start, steps):
        g = torch.Generator().manual_seed(step)
        for _ in range(c.num_micro_batches):
            idx = torch.randint(0, len(x), (8,), generator=g)
            (F.cross_entropy(model(x[idx]), y[idx]) / c.loss_divisor).backward()
        seen.append((c.batch_size, opt.param_groups[0]["lr"]))
        tracker.step()
        opt.step()
        opt.zero_grad()
        c.step(tracker)
        if split_at is not None and step + 1 == split_at:
            return seen, {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "tracker": tracker.state_dict(),
                "schedule": json.dumps(c.state_dict()),
                "step": step + 1,
            }
    return seen, None


def test_resumed_run_continues_with_the_same_batch_size_and_lr():
    whole, _ = _run(40)
    first, state = _run(40, split_at=20)
    second, _ = _run(40, state=state)
    assert first + second == whole
    batches = [b for b, _ in whole]
    assert len(set(batches[:20])) > 1 and len(set(batches[20:])) > 1  # changes on both sides
    for b, lr in whole:
        assert lr == pytest.approx(1e-2 * math.sqrt(b / 8))


def test_checkpoint_outside_the_new_bounds_is_refused():
    """A schedule restored into smaller bounds (a smaller device) would train at the saved batch
    until the next decision: refused, and the schedule is left as it was."""
    saved = _controller(micro_batch_size=32, batch_size=32, max_batch_size=1024, interval=1)
    saved.step(_estimate(512.0))
    state = json.loads(json.dumps(saved.state_dict()))
    assert state["state"]["batch_size"] > 128
    small = _controller(micro_batch_size=32, batch_size=32, max_batch_size=128, interval=1)
    with pytest.raises(NoiseScaleInputError, match=r"outside this schedule's .* \[32, 128\]"):
        small.load_state_dict(state)
    assert small.batch_size == 32 and small.state.step == 0
    high = _controller(micro_batch_size=32, batch_size=1024, min_batch_size=1024,
                       max_batch_size=2048, interval=1)  # fmt: skip
    with pytest.raises(NoiseScaleInputError, match="outside"):
        high.load_state_dict(state)
    wide = _controller(micro_batch_size=32, batch_size=32, max_batch_size=1024, interval=1)
    wide.load_state_dict(state)
    assert wide.batch_size == saved.batch_size


# -- the resizable batch sampler -----------------------------------------------------------------


class _Indices(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 103

    def __getitem__(self, i: int) -> int:
        return i


@pytest.mark.parametrize("workers", [0, 2])
def test_resizable_sampler_sees_every_example_once_per_epoch(workers):
    ds = _Indices()
    sampler = ResizableBatchSampler(
        torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(0)), 4
    )
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers)
    sizes = [4, 8, 12, 5, 16, 1]
    for _epoch in range(2):
        seen: list[int] = []
        got_sizes = []
        for j, batch in enumerate(loader):
            seen.extend(batch.tolist())
            got_sizes.append(len(batch))
            sampler.batch_size = sizes[j % len(sizes)]
        assert sorted(seen) == list(range(len(ds)))
        if workers == 0:  # a change applies to the very next batch
            want = [4] + [sizes[j % len(sizes)] for j in range(len(got_sizes) - 1)]
            assert got_sizes[:-1] == want[:-1] and got_sizes[-1] <= want[-1]
        sampler.batch_size = 4


def test_resizable_sampler_drop_last_len_and_schedule_link():
    s = ResizableBatchSampler(10, 4, drop_last=True)
    assert [len(b) for b in s] == [4, 4] and len(s) == 2
    s.batch_size = 3
    assert len(s) == 3 and len(ResizableBatchSampler(10, 3)) == 4
    with pytest.raises(NoiseScaleInputError):
        s.batch_size = 0
    c = _controller(interval=1, batch_sampler=s)
    assert s.batch_size == 16
    c.step(_estimate(400.0))
    assert s.batch_size == 208


def test_batch_sampler_schedule_keeps_every_measured_step():
    """With a ResizableBatchSampler the loop runs one backward per step: a batch change is not
    a change of accumulation, so no step after it is taken for an epoch's short last window."""
    import warnings

    x, y = _problem()
    ds = torch.utils.data.TensorDataset(x, y)
    sampler = ResizableBatchSampler(
        torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(0)), 8
    )
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = GradientNoiseTracker(model, sync_every=1)
    c = AdaptiveBatchSize(
        micro_batch_size=8,
        max_batch_size=64,
        factor=1.0,
        interval=5,
        max_relative_width=math.inf,
        batch_sampler=sampler,
    )
    steps = changes = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "short last window" warning fails the test
        while steps < 30:
            for xb, yb in loader:
                F.cross_entropy(model(xb), yb).backward()
                tracker.step()
                opt.step()
                opt.zero_grad()
                changes += c.step(tracker)
                steps += 1
                if steps == 30:
                    break
    assert changes >= 1 and c.batch_size == 16  # B_simple ≈ 15
    assert tracker.estimate().steps == steps


def _ddp_sampler_worker(rank: int, port: int, out: str) -> None:
    """One of 2 gloo processes: DDP with a ResizableBatchSampler over a DistributedSampler."""
    from datetime import timedelta
    from pathlib import Path

    from torch.utils.data.distributed import DistributedSampler

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    x, y = _problem()
    ds = torch.utils.data.TensorDataset(x, y)
    sampler = ResizableBatchSampler(DistributedSampler(ds, num_replicas=2, rank=rank, seed=0), 4)
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    tracker = GradientNoiseTracker(ddp, sync_every=1)
    c = AdaptiveBatchSize(micro_batch_size=4 * 2, max_batch_size=64, factor=1.0, interval=5,
                          max_relative_width=math.inf, batch_sampler=sampler)  # fmt: skip
    rows, it = [], iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler))
    for _ in range(30):
        xb, yb = next(it)
        before = tracker.examples
        F.cross_entropy(ddp(xb), yb).backward()
        tracker.step()
        opt.step()
        opt.zero_grad()
        rows.append((c.batch_size, len(xb), tracker.examples - before))
        c.step(tracker)
    done = {"rows": rows, "examples": c.state.examples, "tracked": tracker.examples}
    try:  # a global micro-batch that 2 processes cannot share equally
        AdaptiveBatchSize(micro_batch_size=3, max_batch_size=6, factor=1.0, batch_sampler=sampler)
    except NoiseScaleInputError as exc:
        done["refused"] = str(exc)
    Path(out, f"{rank}.json").write_text(json.dumps(done))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_batch_sampler_takes_each_process_share_of_the_global_batch(tmp_path):
    """2 gloo processes: the schedule's batch counts global examples, so each process's batch
    sampler is set to its half. Every rank's sampler was set to the whole global batch, so each
    step trained twice the schedule's batch (8 → 16, 16 → 32) and the schedule's example count
    was half the tracker's (a hunt)."""
    from test_distributed import _spawn, free_port

    assert _spawn(_ddp_sampler_worker, (free_port(), str(tmp_path)), timeout_s=120) == [0, 0]
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert {b for b, _, _ in got["rows"]} > {8}  # the batch changed
        for batch, local, tracked in got["rows"]:
            assert 2 * local == batch == tracked  # the global batch is the schedule's
        assert got["examples"] == got["tracked"] == sum(t for _, _, t in got["rows"])
        assert "micro_batch_size=3 is not divisible by the 2 processes" in got["refused"]


# -- fixed ramps ---------------------------------------------------------------------------------


def test_a_ramp_stepping_down_tells_the_tracker():
    """A stepwise ramp 12 → 4 → 8 (micro-batch 4) realised by accumulation: the step of one
    micro-batch after three is the ramp's, not an epoch's short last window. The ramp never
    told the tracker, which left it out with the wrong cause and its count 4 examples short
    (a hunt)."""
    import warnings

    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    tracker = GradientNoiseTracker(model, sync_every=1, per_example_fraction=1.0)
    ramp = BatchSizeRamp.stepwise([(0, 12), (24, 4), (40, 8)], micro_batch_size=4)
    total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(8):
            x = torch.randn(ramp.batch_size, 3, dtype=torch.float64)
            y = torch.randn(ramp.batch_size, 1, dtype=torch.float64)
            for j in range(ramp.num_micro_batches):
                part = slice(4 * j, 4 * j + 4)
                (F.mse_loss(model(x[part]), y[part]) / ramp.loss_divisor).backward()
            tracker.step()
            model.zero_grad()
            total += ramp.batch_size
            ramp.step(tracker)
    assert [h["b_big"] for h in tracker.history] == [12, 12, 4, 4, 4, 4, 8, 8]
    assert not any(h["skipped"] for h in tracker.history)
    assert tracker.examples == total == 56


def test_linear_ramp_counts_examples_and_scales_lr():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.8)
    ramp = BatchSizeRamp.linear(16, 64, 160, micro_batch_size=16, lr_rule="linear", optimizer=opt)
    assert ramp.batch_size == 16 and opt.param_groups[0]["lr"] == pytest.approx(0.2)  # tuned at 64
    sizes = []
    for _ in range(8):
        sizes.append(ramp.batch_size)
        ramp.step()
    # consumed 0, 16, 32, 64, 96, 144: b = 16 + 48·c/160 = 16, 20.8, 25.6, 35.2, 44.8, 59.2,
    # rounded to multiples of 16
    assert sizes == [16, 16, 32, 32, 48, 64, 64, 64]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.8)
    assert ramp.state.examples == sum(sizes)


def test_stepwise_ramp_in_tokens_resumes():
    # a token ramp: micro-batch of 4 sequences × 128 tokens, doubling at 10k and 40k tokens
    micro = 512
    stages = [(0, 2048), (10_000, 4096), (40_000, 8192)]
    ramp = BatchSizeRamp.stepwise(stages, micro_batch_size=micro, lr_rule="sqrt")
    twin = BatchSizeRamp.stepwise(stages, micro_batch_size=micro, lr_rule="sqrt")
    sizes = []
    for t in range(15):
        if t == 7:
            twin.load_state_dict(json.loads(json.dumps(ramp.state_dict())))
        if t >= 7:
            assert twin.batch_size == ramp.batch_size and twin.lr_factor == ramp.lr_factor
            twin.step()
        sizes.append(ramp.batch_size)
        ramp.step()
    # 2048 per step reaches 10k tokens after 5 steps (10240), 4096 per step 40k after 8 more
    assert sizes == [2048] * 5 + [4096] * 8 + [8192] * 2
    assert ramp.lr_factor == 1.0 and ramp.num_micro_batches == 16
    with pytest.raises(NoiseScaleInputError, match="kind"):
        ramp.load_state_dict(_controller().state_dict())


# -- regressions found by the schedule hunt (2026-12-05) -------------------------------------------


@pytest.mark.parametrize("setting", [{"exchange_rate": math.inf}, {"factor": math.inf}])
def test_infinite_exchange_rate_or_factor_is_refused_at_construction(setting):
    """inf > 0 passed the constructor's check; the first decision then raised OverflowError
    (cannot convert float infinity to integer) in the middle of the run."""
    with pytest.raises(NoiseScaleInputError, match="finite"):
        AdaptiveBatchSize(micro_batch_size=8, max_batch_size=64, interval=1, **setting)
    with pytest.raises(NoiseScaleInputError, match="finite"):
        target_batch_size(50.0, **setting)
    for bad in (math.nan, -1.0, 0.0):
        with pytest.raises(NoiseScaleInputError):
            target_batch_size(50.0, **{next(iter(setting)): bad})


def test_loss_divisor_is_one_with_a_batch_sampler():
    """With a batch sampler the loop runs one backward pass over the whole batch of 64: the
    mean loss needs no division (it returned 64/8 = 8, a gradient 8× too small)."""
    sampler = ResizableBatchSampler(1000, 8)
    c = AdaptiveBatchSize(micro_batch_size=8, max_batch_size=256, batch_size=64, factor=1.0,
                          batch_sampler=sampler)  # fmt: skip
    assert sampler.batch_size == 64 and c.loss_divisor == 1 and c.num_micro_batches == 8
    # the divided loss's gradient equals the whole batch's mean-loss gradient
    w = nn.Parameter(torch.tensor([0.5, -1.0]))
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    y = torch.randn(64, generator=torch.Generator().manual_seed(1))
    ((x @ w - y) ** 2).mean().div(c.loss_divisor).backward()
    want = 2 * x.T @ (x @ w.detach() - y) / 64
    assert torch.allclose(w.grad, want)
    # accumulation without a sampler keeps dividing by the micro-batch count
    assert AdaptiveBatchSize(micro_batch_size=8, max_batch_size=256, batch_size=64,
                             factor=1.0).loss_divisor == 8  # fmt: skip


def _token_estimate(b_tokens: float, t: float, g2: float = 1.0, **kw) -> NoiseEstimate:
    """An estimate in tokens (a token-mean loss): B_simple = tr Σ/|G|² tokens, T tokens each."""
    half = 0.05 * b_tokens
    return NoiseEstimate(g2, b_tokens * g2, b_tokens, b_tokens - half, b_tokens + half,
                         unit="tokens", tokens_per_example=t, **kw)  # fmt: skip


def test_an_estimate_in_tokens_is_converted_to_examples():
    """With a per-token loss B_simple is in tokens while the batch counts sequences: B_simple =
    2048 tokens at T = 32 tokens per sequence is 64 sequences, so factor=1 aims at 64 (it aimed
    at 2048 sequences, T× too large)."""
    c = _controller(micro_batch_size=8, max_batch_size=8192, factor=1.0, exchange_rate=None,
                    interval=1)  # fmt: skip
    c.step(_token_estimate(2048.0, 32.0))
    assert c.batch_size == 64
    assert c.history[-1]["b_simple"] == pytest.approx(64.0)
    assert c.history[-1]["target"] == pytest.approx(64.0)
    # B = √(r·B_simple) with B_simple in examples: √(100·64) = 80
    r = _controller(micro_batch_size=8, max_batch_size=8192, interval=1)
    r.step(_token_estimate(2048.0, 32.0))
    assert r.batch_size == 80


@pytest.mark.parametrize("rule", ["paper", "adascale"])
def test_measured_lr_rules_use_the_estimate_in_examples(rule):
    """The rules "paper" (measured B* = B_simple) and "adascale" (σ² = tr Σ/B₀) need B_simple and
    tr Σ in the batch's unit: B* = 1024 tokens / 16 = 64 sequences, tr Σ = 1024/16 = 64."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    c = _controller(micro_batch_size=8, max_batch_size=8192, factor=2.0, exchange_rate=None,
                    interval=1, lr_rule=rule, optimizer=opt)  # fmt: skip
    c.step(_token_estimate(1024.0, 16.0))
    assert c.batch_size == 128  # 2 × 64
    if rule == "paper":
        want = (1 + 64 / 8) / (1 + 64 / 128)  # eq. A.3 with α = 1 at B₀ = 8
    else:
        sigma2, mu2 = 64.0 / 8, 1.0
        want = (sigma2 + mu2) / (sigma2 / 16 + mu2)
    assert c.lr_factor == pytest.approx(want)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * want)


def test_an_estimate_in_tokens_without_a_token_count_is_refused():
    c = _controller(micro_batch_size=8, max_batch_size=8192, interval=1)
    with pytest.raises(NoiseScaleInputError, match=r"tokens_per_example=.*count_tokens"):
        c.step(_token_estimate(2048.0, math.nan))
    assert c.batch_size == 8 and c.state.changes == 0
    # one not yet available is waited on, as in examples
    c.step(NoiseEstimate(math.nan, math.nan, math.nan, unit="tokens"))
    assert c.history[-1]["action"] == "wait: no estimate yet"


def test_a_token_mean_tracker_drives_the_batch_in_sequences():
    """End to end with a real tracker and a token-mean loss (T = 32 tokens per sequence): the
    batch follows B_simple in sequences (the tracker's own conversion), not in tokens."""
    torch.manual_seed(0)
    vocab, t, micro = 16, 32, 8
    model = nn.Sequential(nn.Embedding(vocab, 16), nn.Linear(16, vocab))
    tracker = GradientNoiseTracker(model, beta=0.9, loss_reduction="token_mean")
    c = AdaptiveBatchSize(micro_batch_size=micro, max_batch_size=8192, factor=1.0, interval=20,
                          max_relative_width=math.inf, hysteresis=1.0)  # fmt: skip
    for _ in range(40):
        for _ in range(c.num_micro_batches):
            x = torch.randint(0, vocab, (micro, t))
            y = (x + torch.randint(0, 3, (micro, t))) % vocab
            loss = F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
            tracker.count_tokens(y)
            (loss / c.loss_divisor).backward()
        tracker.step()
        model.zero_grad()
        c.step(tracker)
    e = tracker.estimate()
    assert e.unit == "tokens" and e.tokens_per_example == t
    want = quantized_batch_size(e.to("examples").b_simple, micro, micro, 8192)
    decided = c.history[-1]
    assert decided["b_simple"] == pytest.approx(e.b_simple / t)
    assert c.batch_size == quantized_batch_size(decided["target"], micro, micro, 8192)
    assert c.batch_size <= 4 * micro and want <= 4 * micro  # B_simple ≈ 1.7 sequences, not 55


_L = torch.optim.lr_scheduler


class _WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """A user's own scheduler computing from base_lrs: kept the factor before scale_lr knew
    schedulers by name, refused by name for a while (a review found), checked by its rate now."""

    def __init__(self, optimizer, warmup, total):
        self.warmup, self.total = warmup, total
        super().__init__(optimizer)

    def get_lr(self):
        t, w = self.last_epoch, self.warmup
        f = (t + 1) / w if t < w else 0.5 * (1 + math.cos(math.pi * (t - w) / (self.total - w)))
        return [b * f for b in self.base_lrs]


_SCHEDULERS = {
    "LambdaLR": lambda o: _L.LambdaLR(o, lambda s: 1 / (1 + s)),
    "MultiplicativeLR": lambda o: _L.MultiplicativeLR(o, lambda s: 0.95),
    "StepLR": lambda o: _L.StepLR(o, 2, 0.5),
    "MultiStepLR": lambda o: _L.MultiStepLR(o, [4, 7], 0.5),
    "ConstantLR": lambda o: _L.ConstantLR(o, 0.5, total_iters=6),
    "LinearLR": lambda o: _L.LinearLR(o, 0.1, 1.0, 5),
    "ExponentialLR": lambda o: _L.ExponentialLR(o, 0.9),
    "PolynomialLR": lambda o: _L.PolynomialLR(o, 10, 2.0),
    "CosineAnnealingLR": lambda o: _L.CosineAnnealingLR(o, 10),
    "CosineAnnealingWarmRestarts": lambda o: _L.CosineAnnealingWarmRestarts(o, 4),
    # (a floor: eta_min was left unscaled, the factor lost by the end of a cycle)
    "CosineAnnealingLR(eta_min)": lambda o: _L.CosineAnnealingLR(o, 10, eta_min=0.05),
    "CosineAnnealingWarmRestarts(eta_min)": lambda o: _L.CosineAnnealingWarmRestarts(
        o, 4, eta_min=0.05
    ),
    "a subclass computing from base_lrs": lambda o: _WarmupCosine(o, 4, 16),
    "OneCycleLR": lambda o: _L.OneCycleLR(o, max_lr=1.0, total_steps=20),
    "CyclicLR": lambda o: _L.CyclicLR(o, 0.1, 1.0, step_size_up=3),
    "ReduceLROnPlateau": lambda o: _L.ReduceLROnPlateau(o, factor=0.5, patience=0, min_lr=0.05),
    "SequentialLR(warm-up, cosine)": lambda o: _L.SequentialLR(
        o, [_L.LinearLR(o, 0.1, 1.0, 5), _L.CosineAnnealingLR(o, 20)], milestones=[5]
    ),
    "SequentialLR(constant, step)": lambda o: _L.SequentialLR(
        o, [_L.ConstantLR(o, 0.5, total_iters=5), _L.StepLR(o, 3, 0.5)], milestones=[5]
    ),
    "SequentialLR(warm-up, one-cycle)": lambda o: _L.SequentialLR(
        o, [_L.LinearLR(o, 0.1, 1.0, 4), _L.OneCycleLR(o, max_lr=1.0, total_steps=20)], [4]
    ),
    "ChainedScheduler": lambda o: _L.ChainedScheduler(
        [_L.ConstantLR(o, 0.5, total_iters=4), _L.ExponentialLR(o, 0.9)]
    ),
}


@pytest.mark.parametrize("name", list(_SCHEDULERS))
def test_scale_lr_factor_holds_through_every_supported_scheduler(name):
    """scale_lr(4) at step 3, then 13 more scheduler steps (past every milestone, cycle and
    plateau floor): the rate is 4× the unscaled run's at every step. OneCycleLR lost the factor
    at the next step, CyclicLR kept 1.14–4×, SequentialLR lost it at the milestone and
    ReduceLROnPlateau at its min_lr floor."""
    import warnings

    runs = []
    for scaled in (False, True):
        p = nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.5, momentum=0.9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched = _SCHEDULERS[name](opt)
            lrs = []
            for step in range(16):
                if scaled and step == 3:
                    scale_lr(opt, 4.0, [sched])
                lrs.append(opt.param_groups[0]["lr"])
                opt.step()
                if isinstance(sched, _L.ReduceLROnPlateau):
                    sched.step(1.0)  # no improvement: halve, down to the floor
                else:
                    sched.step()
        runs.append(lrs)
    plain, scaled_run = runs
    assert scaled_run[:3] == plain[:3]
    assert scaled_run[3:] == pytest.approx([4 * lr for lr in plain[3:]], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", list(_SCHEDULERS))
def test_a_resume_is_exact_whether_the_schedulers_are_loaded_before_or_after(name):
    """A ramp under the linear rule (factor 1/8 at its start) resumed at step 7: the
    optimizer's and the scheduler's states loaded after the schedule is built, or before it
    (its constructor scales them by its starting factor once more: ×1/8, ×4, ×32 for a warm-up
    LambdaLR, a OneCycleLR and a cosine subclass, a hunt), train at the uninterrupted run's rate
    at every step."""
    import warnings

    def run(order: str | None) -> list[float]:
        def build():
            opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5, momentum=0.9)
            sched = _SCHEDULERS[name](opt)
            return opt, sched

        def ramp(opt, sched):
            return BatchSizeRamp.linear(
                64, 512, 2_000, micro_batch_size=64, lr_rule="linear", optimizer=opt,
                lr_schedulers=[sched],
            )  # fmt: skip

        opt, sched = build()
        r, lrs = ramp(opt, sched), []
        for step in range(16):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step(1.0) if isinstance(sched, _L.ReduceLROnPlateau) else sched.step()
            r.step()
            if order is not None and step == 6:
                saved = json.loads(json.dumps(r.state_dict()))
                o_sd, s_sd = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
                opt, sched = build()
                if order == "before":
                    opt.load_state_dict(o_sd)
                    sched.load_state_dict(s_sd)
                r = ramp(opt, sched)
                if order == "after":
                    opt.load_state_dict(o_sd)
                    sched.load_state_dict(s_sd)
                r.load_state_dict(saved)
        return lrs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = run(None)
        assert len(set(whole)) > 3  # the factor and the scheduler both move
        for order in ("after", "before"):
            assert run(order) == pytest.approx(whole, rel=1e-12, abs=1e-15), order


@pytest.mark.parametrize(
    "given",
    [
        "the same",
        "the warm-up dropped",
        "a cosine added",
        "a StepLR for the LambdaLR",
        "the cosines swapped",
    ],
)
def test_a_checkpoint_of_other_schedulers_loads_without_their_rates(given):
    """The rates a checkpoint holds for its schedulers are written back only into as many
    schedulers of the same types in the same order; other schedulers (a finished warm-up
    dropped, a decay added for a new phase) resume at the checkpoint's rate and factor, their
    rates left as they are, with a warning that names the order to load them in. Until
    2026-12-07 such a resume was refused ("holds the rates of 1 … than the 0 given"), a
    StepLR took a LambdaLR's rates and two cosines in swapped order each other's floors without
    a word (a review)."""
    import warnings

    def build(kinds):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
        make = {
            "warm-up": lambda: _L.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5)),
            "step": lambda: _L.StepLR(opt, 2, 0.5),
            "cosine": lambda: _L.CosineAnnealingLR(opt, 100, eta_min=0.05),
            "restarts": lambda: _L.CosineAnnealingWarmRestarts(opt, 50),
        }
        scheds = [make[k]() for k in kinds]
        ramp = BatchSizeRamp.linear(
            64, 512, 2_000, micro_batch_size=64, lr_rule="linear", optimizer=opt,
            lr_schedulers=scheds,
        )  # fmt: skip
        return opt, scheds, ramp

    opt, scheds, ramp = build(["warm-up", "cosine", "restarts"])
    for _ in range(7):
        opt.step()
        for sched in scheds:
            sched.step()
        ramp.step()
    saved, o_sd = json.loads(json.dumps(ramp.state_dict())), copy.deepcopy(opt.state_dict())
    lr, factor = opt.param_groups[0]["lr"], ramp.lr_factor
    assert factor > 1 / 8  # (moved from the starting factor)
    kinds = {
        "the same": ["warm-up", "cosine", "restarts"],
        "the warm-up dropped": ["cosine", "restarts"],
        "a cosine added": ["warm-up", "cosine", "restarts", "cosine"],
        "a StepLR for the LambdaLR": ["step", "cosine", "restarts"],
        "the cosines swapped": ["warm-up", "restarts", "cosine"],
    }[given]
    opt, scheds, ramp = build(kinds)
    floors = [getattr(sched, "eta_min", None) for sched in scheds]
    opt.load_state_dict(o_sd)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ramp.load_state_dict(saved)
    words = [str(w.message) for w in caught]
    assert (opt.param_groups[0]["lr"], ramp.lr_factor) == (lr, factor)
    if given == "the same":
        assert not words
        assert [sched.base_lrs for sched in scheds] == [[0.5 * factor]] * 3
        return
    assert len(words) == 1
    assert "not written back" in words[0]
    assert "Load the schedulers' states after building the schedule" in words[0]
    # nothing written back: each scheduler keeps the rates the constructor scaled (× 1/8)
    assert [getattr(sched, "eta_min", None) for sched in scheds] == floors
    assert [sched.base_lrs for sched in scheds] == [[0.5 / 8]] * len(kinds)


def test_a_schedule_probes_a_scheduler_of_your_own_once():
    """A warm-up + cosine of the user's own to a floor over 2,000 steps, accepted by the
    constructor (its rates follow base_lrs now and 1,000 epochs ahead): state_dict() probed it
    again at every save, and past step 1,000 the floor showed, refused at steps 999 and 1499
    (a review). Flattened once at construction, it is saved and resumed there."""

    class WarmCos(torch.optim.lr_scheduler.LRScheduler):
        def get_lr(self):
            e = self.last_epoch
            f = min(1.0, (e + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(e, 2000) / 2000))
            return [max(b * f, 1e-4) for b in self.base_lrs]

    def build():
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = WarmCos(opt)
        return opt, sched, BatchSizeRamp.linear(
            4, 16, 200, micro_batch_size=4, lr_rule="linear", optimizer=opt,
            lr_schedulers=[sched],
        )  # fmt: skip

    opt, sched, ramp = build()
    for _ in range(1500):
        opt.step()
        sched.step()
        ramp.step()
    saved = json.loads(json.dumps(ramp.state_dict()))
    o_sd, s_sd = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    opt2, sched2, ramp2 = build()
    opt2.load_state_dict(o_sd)
    sched2.load_state_dict(s_sd)
    ramp2.load_state_dict(saved)
    for o, s in ((opt, sched), (opt2, sched2)):
        o.step()
        s.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_a_scheduler_of_your_own_is_probed_once_wherever_it_is_met():
    """The callbacks change the factor with their own list of schedulers (carry_lr_factor), not
    the schedule's: the same warm-up + cosine to a floor, accepted when training started, was
    probed again at each change and refused past step 1,000, mid-run (a review). Probed once per
    scheduler, it is scaled there as at step 0."""

    class WarmCos(torch.optim.lr_scheduler.LRScheduler):
        def get_lr(self):
            e = self.last_epoch
            f = min(1.0, (e + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(e, 2000) / 2000))
            return [max(b * f, 1e-4) for b in self.base_lrs]

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = WarmCos(opt)
    check_lr_schedulers([sched])  # (a callback's on_train_start)
    for _ in range(1500):
        opt.step()
        sched.step()
    lr, base = opt.param_groups[0]["lr"], sched.base_lrs[0]
    carry_lr_factor(opt, 1.0, 2.0, [sched])
    assert opt.param_groups[0]["lr"] == 2.0 * lr and sched.base_lrs[0] == 2.0 * base
    # a scheduler never probed before is still probed where it is first met: at the floor now
    # (step 2,000), its rate is its own, and it is accepted with a warning (until 2026-12-07
    # refused there: a new process resuming the run crashed, a review)
    fresh = WarmCos(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    for _ in range(2000):
        fresh.optimizer.step()
        fresh.step()
    with pytest.warns(RuntimeWarning, match="WarmCos scheduler's rate at its epoch 2000"):
        check_lr_schedulers([fresh])


def test_a_scheduler_of_your_own_is_accepted_alike_in_a_new_process():
    """A warm-up + cosine to an absolute floor (1e-4 from step 2,000), accepted by a schedule
    built at step 0 and run to 2,500: a new process loading the scheduler's state at step 1,999,
    2,000 or 2,500 was refused when the callbacks started training — its epoch now and next
    meet the floor, and the cache of probed schedulers does not outlive a process (a review).
    Decided on the run's epochs 0, 1, 10, 100 and 1,000 alone, it is accepted in every
    process, with a warning that the factor is not kept while its rate is its own, and scaled
    as at the start: its base_lrs double with the factor (the floor, its own, does not)."""
    import warnings

    class WarmCos(torch.optim.lr_scheduler.LRScheduler):
        def get_lr(self):
            e = self.last_epoch
            f = min(1.0, (e + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(e, 2000) / 2000))
            return [max(b * f, 1e-4) for b in self.base_lrs]

    for when in (1999, 2000, 2500):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = WarmCos(opt)
        state = sched.state_dict()
        state.update(last_epoch=when, _step_count=when + 1, _last_lr=[1e-4])
        sched.load_state_dict(state)
        opt.param_groups[0]["lr"] = 1e-4
        with pytest.warns(RuntimeWarning, match="not kept while its rate is its own") as got:
            warnings.simplefilter("always")
            check_lr_schedulers([sched])
        assert f"rate at its epoch {when}" in str(got[0].message)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once per scheduler: accepted from the cache
            scale_lr(opt, 2.0, [sched])
        assert sched.base_lrs == [0.2]
        sched.step()
        assert opt.param_groups[0]["lr"] == 1e-4  # the floor is its own rate: not scaled


def test_a_scheduler_of_your_own_defining_eq_without_hash_is_scaled():
    """A scheduler class defining ``__eq__`` without ``__hash__`` (unhashable) crashed with a raw
    ``TypeError: unhashable type`` from the cache of probed schedulers, a WeakSet (a review).
    Keyed by identity, it is probed, accepted and scaled, the second time from the cache."""

    class Halved(torch.optim.lr_scheduler.LRScheduler):
        def get_lr(self):
            return [b * 0.5 for b in self.base_lrs]

        def __eq__(self, other):
            return self is other

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = Halved(opt)
    check_lr_schedulers([sched])
    scale_lr(opt, 3.0, [sched])
    assert sched.base_lrs == [pytest.approx(0.3, rel=1e-15)]
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.15, rel=1e-15)


def test_a_scheduler_of_your_own_is_probed_alike_wherever_the_run_is():
    """The probe asks the same epochs of the run wherever it is asked (now, next, and the
    run's 1, 10, 100 and 1,000): a schedule built after the scheduler's state was loaded at step
    1,500 (the docs allow either order) refused the warm-up + cosine to a floor (at step 2,000)
    that one built at the start accepted — its probe looked 1,000 epochs ahead, to 2,500 (a
    review). Accepted, it is scaled as it would have been at the start: the rate doubles with
    the factor."""

    class WarmCos(torch.optim.lr_scheduler.LRScheduler):
        def get_lr(self):
            e = self.last_epoch
            f = min(1.0, (e + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(e, 2000) / 2000))
            return [max(b * f, 1e-4) for b in self.base_lrs]

    def trained(steps):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = WarmCos(opt)
        for _ in range(steps):
            opt.step()
            sched.step()
        return opt, sched

    opt, sched = trained(1500)
    opt2, sched2 = trained(0)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    sched2.load_state_dict(copy.deepcopy(sched.state_dict()))
    ramp = BatchSizeRamp.linear(
        8, 16, 200, micro_batch_size=4, lr_rule="linear", base_batch_size=8, optimizer=opt2,
        lr_schedulers=[sched2],
    )  # fmt: skip
    assert ramp.lr_factor == 1.0
    for _ in range(200):
        ramp.step()
    assert ramp.lr_factor == 2.0
    for o, s in ((opt, sched), (opt2, sched2)):
        o.step()
        s.step()
    # (step 1,501: f = 0.5 (1 + cos(0.7505 π)), well above the floor's 1e-4 / 0.1)
    assert opt2.param_groups[0]["lr"] == pytest.approx(2.0 * opt.param_groups[0]["lr"], rel=1e-12)


def test_a_scheduler_of_your_own_on_its_floor_is_warned_at_a_later_change_too():
    """A scheduler of the user's own whose rate follows base_lrs until epoch 2,000 and is an
    absolute floor after it, accepted at step 0 (cached), scaled again at step 2,500 (a callback's
    change of the factor on the floor): the cached object skipped the rate-now check and the
    factor was lost without a word (a review). It is warned once, at the change on the floor."""

    class Floor(torch.optim.lr_scheduler.LRScheduler):
        def get_lr(self):
            return [b if self.last_epoch < 2000 else 1e-4 for b in self.base_lrs]

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = Floor(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scale_lr(opt, 2.0, [sched])  # accepted at the start: nothing to say
    for _ in range(2500):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 1e-4  # its own rate: the factor is not kept there
    with pytest.warns(RuntimeWarning, match="not kept while its rate is its own"):
        scale_lr(opt, 2.0, [sched])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scale_lr(opt, 0.5, [sched])  # (warned once per scheduler)
    assert sched.base_lrs[0] == pytest.approx(0.2)


def test_a_schedule_warns_of_a_floor_its_scheduler_of_your_own_is_on_at_a_change():
    """The same floor through a schedule (a ramp 8 → 16 at step 2,500, on the floor): the
    schedule keeps the list it flattened at construction and handed it on as it was, so the
    rate-now check never ran — the factor 2 lost without a word (a review of the fix above)."""

    class Floor(torch.optim.lr_scheduler.LRScheduler):
        def get_lr(self):
            return [b if self.last_epoch < 2000 else 1e-4 for b in self.base_lrs]

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = Floor(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ramp = BatchSizeRamp.stepwise(
            [(0, 8), (2500 * 8, 16)], micro_batch_size=8, lr_rule="linear", base_batch_size=8,
            optimizer=opt, lr_schedulers=[sched],
        )  # fmt: skip
        for _ in range(2499):
            opt.step()
            sched.step()
            ramp.step()
    opt.step()
    sched.step()
    with pytest.warns(RuntimeWarning, match="not kept while its rate is its own"):
        ramp.step()
    assert ramp.lr_factor == 2.0


def test_under_no_lr_rule_any_scheduler_is_saved_as_none():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    # under lr_rule="none" nothing is scaled: any scheduler is accepted, and none is saved
    own = _OwnScheduler(opt)
    ramp = BatchSizeRamp.linear(64, 512, 2_000, micro_batch_size=64, optimizer=opt,
                                lr_schedulers=[own])  # fmt: skip
    state = json.loads(json.dumps(ramp.state_dict()))
    assert state["lr_scheduler_rates"] is None
    ramp.load_state_dict(state)


def test_adaptive_schedule_keeps_its_factor_past_a_sequential_milestone():
    """End to end: lr_rule="linear" at batch 256 from 32 (factor 8) with warm-up → cosine; after the
    milestone the rate was 0.1 (the factor dropped) where 8 × the cosine's ≈ 0.8 is right."""
    import warnings

    lrs = {}
    for factor in (None, 1.0):
        p = nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.1)
        seq = _L.SequentialLR(opt, [_L.LinearLR(opt, 0.1, 1.0, 5), _L.CosineAnnealingLR(opt, 100)],
                              milestones=[5])  # fmt: skip
        ab = None
        if factor is not None:
            ab = AdaptiveBatchSize(micro_batch_size=32, max_batch_size=1024, factor=factor,
                                   interval=2, lr_rule="linear", optimizer=opt,
                                   lr_schedulers=[seq])  # fmt: skip
        got = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(10):
                opt.step()
                seq.step()
                if ab is not None:
                    ab.step(_estimate(256.0))
                got.append(opt.param_groups[0]["lr"])
        lrs[factor] = got
        if ab is not None:
            assert ab.batch_size == 256 and ab.lr_factor == 8.0
    assert lrs[1.0][1:] == pytest.approx([8 * lr for lr in lrs[None][1:]])
    assert lrs[1.0][-1] == pytest.approx(0.8, rel=0.01)


class _OwnScheduler(torch.optim.lr_scheduler.LRScheduler):
    """A scheduler whose rates noisescale cannot know to follow a factor."""

    def __init__(self, optimizer):
        self.peak = 1.0
        super().__init__(optimizer)

    def get_lr(self):
        return [self.peak / (1 + self.last_epoch) for _ in self.optimizer.param_groups]


def test_a_ramp_in_tokens_sets_the_sampler_in_sequences():
    """The docs' GPT-3 ramp in tokens (micro-batch 8 sequences × 2048 = 16,384 tokens) given a
    batch sampler, which counts sequences: set to 32,768 at the start, 2048× the 16 sequences
    (a hunt). With tokens_per_example the sampler takes tokens / 2048 sequences along the
    ramp; without it, a sampler built for 16 sequences set to 32,768 is warned about."""
    import warnings

    sampler = ResizableBatchSampler(10**7, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # built for the start's 16 sequences: no warning
        ramp = BatchSizeRamp.linear(32_768, 3_145_728, 12e9, micro_batch_size=16_384,
                                    batch_sampler=sampler, tokens_per_example=2048)  # fmt: skip
    assert sampler.batch_size == 16
    for _ in range(3):
        ramp.step(examples=6e9)  # half-way, then past the end
        assert sampler.batch_size * 2048 == ramp.batch_size
    assert sampler.batch_size == 3_145_728 // 2048 == 1536
    with pytest.raises(NoiseScaleInputError, match="not a whole number of sequences"):
        BatchSizeRamp.linear(32_768, 3_145_728, 12e9, micro_batch_size=16_384,
                             batch_sampler=sampler, tokens_per_example=3000)  # fmt: skip
    sampler = ResizableBatchSampler(10**7, 16)
    with pytest.warns(RuntimeWarning, match="built with batch_size=16 but the ramp") as got:
        BatchSizeRamp.linear(32_768, 3_145_728, 12e9, micro_batch_size=16_384,
                             batch_sampler=sampler)  # fmt: skip
    assert "tokens_per_example=" in str(got[0].message)


def test_a_ramp_in_examples_resizes_a_sampler_built_at_another_batch_without_a_word():
    """A ramp in examples (start 16) given a sampler built at the micro-batch of 8, or at a
    resumed run's 64: the sampler was set to 16 right, but a warning said to give
    tokens_per_example= (a hunt). Only a start more than 32× the sampler's batch, a token count
    set on a sampler of sequences, is warned about."""
    import warnings

    for built, micro in [(8, 8), (64, 8), (4, 4)]:
        sampler = ResizableBatchSampler(10**4, built)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            BatchSizeRamp.linear(16, 64, 500, micro_batch_size=micro, batch_sampler=sampler)
        assert sampler.batch_size == 16
    sampler = ResizableBatchSampler(10**4, 2)
    with pytest.warns(RuntimeWarning, match="built with batch_size=2 but .* more than 32×"):
        BatchSizeRamp.linear(128, 256, 500, micro_batch_size=2, batch_sampler=sampler)
    assert sampler.batch_size == 128


def test_a_scheduler_attached_but_not_given_is_warned_about():
    """A LambdaLR on the optimizer but not in lr_schedulers=: its next step() wrote 0.1 over
    the factor's 0.4, the schedule reporting lr_factor 4 with no word (a hunt). Its groups'
    'initial_lr' shows it: warned, naming the fix; given, it keeps the factor."""
    import warnings

    for passed in (False, True):
        p = nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.1)
        sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        c = _controller(micro_batch_size=4, exchange_rate=None, factor=1.0, interval=1,
                        lr_rule="linear", optimizer=opt,
                        lr_schedulers=[sch] if passed else ())  # fmt: skip
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            c.step(_estimate(16.0))  # 4 → 16: factor 4
            c.step(_estimate(64.0))  # 16 → 64: factor 16 (warned once)
        opt.step()
        sch.step()
        words = [str(w.message) for w in got if "initial_lr" in str(w.message)]
        if passed:
            assert not words and opt.param_groups[0]["lr"] == pytest.approx(1.6)
        else:
            assert len(words) == 1 and "lr_schedulers=[scheduler]" in words[0]
            assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # what it warned of


def test_a_finished_warm_up_is_warned_about_conditionally():
    """A LinearLR warm-up that has finished and been dropped leaves 'initial_lr' on the groups
    (as a loaded optimizer state does): the factor is applied (0.1 × 4), but the warning said
    the scheduler's next step() writes over it, though nothing steps it (a hunt). It cannot be
    told from a live one: the words are conditional and say a finished warm-up can be ignored."""
    import warnings

    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=5)
    for _ in range(5):
        opt.step()
        warm.step()
    del warm
    c = _controller(micro_batch_size=4, exchange_rate=None, factor=1.0, interval=1,
                    lr_rule="linear", optimizer=opt)  # fmt: skip
    with pytest.warns(RuntimeWarning, match="initial_lr") as got:
        warnings.simplefilter("always")
        c.step(_estimate(16.0))  # 4 → 16: factor 4
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4)
    words = str(got[0].message)
    assert "was attached" in words and "If it still steps" in words
    assert "a finished warm-up" in words and "can be ignored" in words


def test_an_unsupported_scheduler_is_refused_before_anything_is_written():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    own = _OwnScheduler(opt)
    before = opt.param_groups[0]["lr"]
    with pytest.raises(NoiseScaleInputError, match=r"_OwnScheduler.*LambdaLR"):
        scale_lr(opt, 4.0, [_L.StepLR(opt, 2), own])
    assert opt.param_groups[0]["lr"] == before
    with pytest.raises(NoiseScaleInputError, match="_OwnScheduler"):  # inside a container too
        scale_lr(opt, 4.0, [_L.SequentialLR(opt, [_L.StepLR(opt, 2), own], milestones=[2])])
    with pytest.raises(NoiseScaleInputError, match="_OwnScheduler"):  # at construction
        _controller(lr_rule="linear", optimizer=opt, lr_schedulers=[own])
    with pytest.raises(NoiseScaleInputError, match="_OwnScheduler"):
        BatchSizeRamp.linear(16, 64, 100, micro_batch_size=16, lr_rule="sqrt", optimizer=opt,
                             lr_schedulers=[own])  # fmt: skip
    _controller(lr_rule="none", optimizer=opt, lr_schedulers=[own])  # never scales: accepted


def test_checkpoint_of_another_lr_rule_or_base_is_refused():
    """A "linear" checkpoint at batch 256 (factor 256/32 = 8, lr 0.8) loaded into a "sqrt" schedule
    kept factor 8 and lr 0.8 where √8 = 2.83 and 0.283 are right, until the next decision."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    kw = dict(micro_batch_size=32, max_batch_size=1024, factor=1.0, exchange_rate=None, interval=1)
    saved = _controller(**kw, lr_rule="linear", optimizer=opt)
    saved.step(_estimate(256.0))
    assert (saved.batch_size, saved.lr_factor) == (256, 8.0)
    state = json.loads(json.dumps(saved.state_dict()))

    def fresh(**more):
        q = nn.Parameter(torch.zeros(1))
        o = torch.optim.SGD([q], lr=0.1)
        return _controller(**{**kw, "optimizer": o, **more}), o

    sqrt, o = fresh(lr_rule="sqrt")
    with pytest.raises(NoiseScaleInputError, match=r"lr_rule='linear' there, 'sqrt' here"):
        sqrt.load_state_dict(state)
    assert sqrt.lr_factor == 1.0 and o.param_groups[0]["lr"] == 0.1  # left as it was
    based, _ = fresh(lr_rule="linear", base_batch_size=128, batch_size=128)
    with pytest.raises(NoiseScaleInputError, match=r"base_batch_size=32 there, 128 here"):
        based.load_state_dict(state)
    paper = json.loads(json.dumps(_controller(**kw, lr_rule="paper", b_star=64.0).state_dict()))
    with pytest.raises(NoiseScaleInputError, match=r"b_star=64\.0 there, 128\.0 here"):
        _controller(**kw, lr_rule="paper", b_star=128.0).load_state_dict(paper)
    # the same rule resumes at the saved factor, with other bounds or targets too
    same, o = fresh(lr_rule="linear", max_batch_size=2048, factor=2.0)
    same.load_state_dict(state)
    assert (same.batch_size, same.lr_factor) == (256, 8.0)
    assert o.param_groups[0]["lr"] == pytest.approx(0.8)
    # what does not change a number is not compared (α under "linear"; B₀ under "none")
    fresh(lr_rule="linear", alpha=0.5)[0].load_state_dict(state)
    none = json.loads(json.dumps(_controller(**kw).state_dict()))
    _controller(**kw, base_batch_size=64).load_state_dict(none)
    # a checkpoint written before the configuration was saved cannot be checked: accepted
    old = {k: v for k, v in state.items() if k != "config"}
    fresh(lr_rule="linear")[0].load_state_dict(old)


def test_another_ramps_checkpoint_is_refused():
    """A ramp restored from another ramp's state held its batch (8 where the new ramp says 16)."""
    a = BatchSizeRamp.linear(8, 64, 1000, micro_batch_size=8)
    for _ in range(5):
        a.step()
    state = json.loads(json.dumps(a.state_dict()))
    b = BatchSizeRamp.linear(16, 64, 1000, micro_batch_size=8)
    with pytest.raises(NoiseScaleInputError, match=r"points=.* there, .* here"):
        b.load_state_dict(state)
    assert b.batch_size == 16 and b.state.step == 0
    stepwise = BatchSizeRamp.stepwise([(0, 8), (1000, 64)], micro_batch_size=8)
    with pytest.raises(NoiseScaleInputError, match="interpolate=True there, False here"):
        stepwise.load_state_dict(state)
    p = nn.Parameter(torch.zeros(1))
    sqrt = BatchSizeRamp.linear(8, 64, 1000, micro_batch_size=8, lr_rule="sqrt",
                                optimizer=torch.optim.SGD([p], lr=0.1))  # fmt: skip
    with pytest.raises(NoiseScaleInputError, match="lr_rule='none' there, 'sqrt' here"):
        sqrt.load_state_dict(state)
    same = BatchSizeRamp.linear(8, 64, 1000, micro_batch_size=8)
    same.load_state_dict(state)
    assert same.state == a.state


def test_a_schedule_set_up_with_numpy_numbers_resumes():
    """Settings given as NumPy scalars (read from a config array) are saved as plain numbers:
    the checkpoint's configuration record made the state un-serialisable (a review found)."""
    import numpy as np

    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    ramp = BatchSizeRamp.linear(
        16, 64, np.int64(100), micro_batch_size=16, base_batch_size=np.int64(16), optimizer=opt
    )
    state = json.loads(json.dumps(ramp.state_dict()))
    again = BatchSizeRamp.linear(
        16, 64, 100, micro_batch_size=16, base_batch_size=16, optimizer=opt
    )
    again.load_state_dict(state)
    kw = dict(micro_batch_size=32, max_batch_size=1024, factor=1.0, exchange_rate=None)
    adaptive = _controller(**kw, lr_rule="paper", b_star=np.float32(300.0), optimizer=opt)
    state = json.loads(json.dumps(adaptive.state_dict()))
    _controller(**kw, lr_rule="paper", b_star=300.0, optimizer=opt).load_state_dict(state)


class _WarmupCosineToFloor(_WarmupCosine):
    """A warm-up + cosine down to a floor of its own (min_lr): follows base_lrs early, not
    once the floor dominates."""

    def get_lr(self):
        return [max(lr, 0.02) for lr in super().get_lr()]


class _CountingScheduler(_WarmupCosine):
    """A get_lr that keeps state (a counter of its calls)."""

    def __init__(self, optimizer, warmup, total):
        self.calls = [0]
        super().__init__(optimizer, warmup, total)

    def get_lr(self):
        self.calls[0] += 1
        return super().get_lr()


def test_a_users_scheduler_is_probed_ahead_and_on_a_copy():
    """A second review: a scheduler keeping a floor of its own was accepted by a probe of its
    next rate alone (the factor 4 fell to 1.27 by step 20), and the probe ran the scheduler
    itself (a stateful get_lr's counter moved though it was refused). Probed at epochs 0, 1,
    10, 100 and 1,000 ahead, on a copy sharing the optimizer: refused, and the scheduler and
    the optimizer's rates are as they were."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    floor = _WarmupCosineToFloor(opt, 4, 16)
    with pytest.raises(NoiseScaleInputError, match="_WarmupCosineToFloor"):
        scale_lr(opt, 4.0, [floor])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 4)  # (warm-up: step 0 of 4)
    counting = _CountingScheduler(opt, 4, 16)
    calls = counting.calls[0]
    scale_lr(opt, 2.0, [counting])  # follows its base_lrs at every epoch probed: accepted
    assert counting.calls[0] == calls
