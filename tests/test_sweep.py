"""Tests of noisescale.sweep's analysis: goals, EMA, learning-rate selection, the eq. 2.11 fit.

Known answers come from the App. D.1 model in noisescale.sweep.synthetic, whose Pareto fronts
follow eq. 2.11 exactly with B_crit = E_min/S_min in closed form.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from noisescale.errors import NoiseScaleInputError
from noisescale.sweep import (
    Run,
    b_simple_average,
    critical_batch_sizes,
    default_goals,
    ema_lag,
    ema_smoothed,
    fit_pareto,
    goal_crossing,
    pareto_points,
)
from noisescale.sweep.synthetic import SyntheticModel

MODEL = SyntheticModel(b_noise_start=20.0, b_noise_slope=1.0, loss_start=1.0, s_scale=50.0)
BATCH_SIZES = [4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]


# --- EMA ---------------------------------------------------------------------------------------


def test_ema_matches_the_bias_corrected_sum() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    decay = 0.8
    got = ema_smoothed(x, decay)
    for t in range(1, x.size + 1):
        weights = (1 - decay) * decay ** np.arange(t - 1, -1, -1)
        assert got[t - 1] == pytest.approx(weights @ x[:t] / (1 - decay**t), rel=1e-12)


def test_ema_of_a_ramp_lags_by_decay_over_one_minus_decay() -> None:
    decay = 0.9
    t = np.arange(1.0, 400.0)
    lag = t - ema_smoothed(t, decay)
    assert lag[-1] == pytest.approx(decay / (1 - decay), rel=1e-9)


@given(
    st.floats(0.0, 0.99),
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=30),
    st.floats(-100, 100),
)
@settings(max_examples=50, deadline=None)
def test_ema_is_affine_equivariant(decay: float, values: list[float], shift: float) -> None:
    x = np.array(values)
    got = ema_smoothed(3.0 * x + shift, decay)
    np.testing.assert_allclose(got, 3.0 * ema_smoothed(x, decay) + shift, rtol=1e-9, atol=1e-6)
    assert ema_smoothed(x, decay)[0] == pytest.approx(x[0])


def test_ema_lag_is_the_delay_of_a_linear_curve() -> None:
    # On a falling line recorded every 2 steps the smoothed curve reaches a level exactly
    # ema_lag steps after the line does, early (bias-corrected start) and late alike.
    step = np.arange(2.0, 2001.0, 2.0)
    line = 1000.0 - step
    for goal in (990.0, 900.0, 100.0):
        smoothed = ema_smoothed(line, 0.9)
        crossing = goal_crossing(step, step, smoothed, goal)
        assert crossing is not None
        lag = ema_lag(step[: crossing.index + 1], 0.9)
        assert crossing.step - (1000.0 - goal) == pytest.approx(lag, abs=0.2)
    assert ema_lag(step, 0.9) == pytest.approx(0.9 / 0.1 * 2.0, rel=1e-9)
    assert ema_lag(step, 0.0) == 0.0


def test_ema_decay_zero_is_identity_and_bad_decay_is_refused() -> None:
    x = np.array([3.0, 1.0, 2.0])
    np.testing.assert_array_equal(ema_smoothed(x, 0.0), x)
    with pytest.raises(NoiseScaleInputError):
        ema_smoothed(x, 1.0)


# --- goal crossing -----------------------------------------------------------------------------


def test_goal_crossing_interpolates_between_records() -> None:
    step = np.array([10.0, 20.0, 30.0])
    smoothed = np.array([1.0, 0.6, 0.2])
    crossing = goal_crossing(step, step * 8, smoothed, 0.5)
    assert crossing is not None
    assert crossing.step == pytest.approx(22.5)
    assert crossing.examples == pytest.approx(180.0)
    assert crossing.index == 2
    assert goal_crossing(step, step * 8, smoothed, 0.1) is None
    first = goal_crossing(step, step * 8, smoothed, 2.0)
    assert first is not None and first.step == 10.0


def test_smoothed_curve_decides_when_a_noisy_curve_reaches_the_goal() -> None:
    # One early downward spike must not count as reaching the goal once smoothed.
    step = np.arange(1.0, 101.0)
    curve = np.where(step < 60, 1.0, 0.1)
    curve[10] = 0.0
    raw = goal_crossing(step, step, curve, 0.5)
    smooth = goal_crossing(step, step, ema_smoothed(curve, 0.8), 0.5)
    assert raw is not None and raw.step < 11
    assert smooth is not None and 60 < smooth.step < 63


# --- the synthetic model itself ------------------------------------------------------------------


def test_synthetic_runs_reach_goals_at_eq_2_11_steps() -> None:
    goal = 0.2
    runs = MODEL.runs([16, 256], steps=5000)
    for run in runs:
        crossing = goal_crossing(run.step, run.examples, run.metric, goal)
        assert crossing is not None
        # Linear interpolation of a smooth curve between integer steps: error ≪ one step.
        assert crossing.step == pytest.approx(MODEL.steps_to_goal(goal, run.batch_size), abs=0.01)


# --- the eq. 2.11 fit -----------------------------------------------------------------------------


def test_fit_recovers_exact_hyperbola() -> None:
    b = np.array(BATCH_SIZES, dtype=float)
    s = 1000.0 + 3e5 / b
    fit = fit_pareto(s, b * s)
    assert fit.s_min == pytest.approx(1000.0, rel=1e-8)
    assert fit.e_min == pytest.approx(3e5, rel=1e-8)
    assert fit.b_crit == pytest.approx(300.0, rel=1e-8)
    assert fit.at_bound is None
    assert fit.b_crit_stderr == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(fit.steps(b), s, rtol=1e-8)


def test_fit_standard_error_is_calibrated() -> None:
    """Over many seeds the z-score of log B_crit follows Student's t with n − 2 d.o.f."""
    rng = np.random.default_rng(1)
    b = np.geomspace(8, 8 * 2**11, 12)
    b_crit, s_min, sigma = 300.0, 1000.0, 0.1
    n_seeds = 1000
    z = np.empty(n_seeds)
    for i in range(n_seeds):
        s = (s_min + s_min * b_crit / b) * np.exp(sigma * rng.standard_normal(b.size))
        fit = fit_pareto(s, b * s)
        z[i] = (math.log(fit.b_crit) - math.log(b_crit)) / fit.log_b_crit_stderr
    dof = b.size - 2
    expected_std = math.sqrt(dof / (dof - 2))
    # The sample std of t(10) over 1000 draws has relative standard error
    # sqrt((kurtosis − 1)/(4N)) = sqrt(3/4000) ≈ 0.027; allow four of them.
    assert abs(z.std() / expected_std - 1) < 4 * math.sqrt(3 / (4 * n_seeds))
    assert abs(z.mean()) < 4 * expected_std / math.sqrt(n_seeds)
    coverage = np.mean(np.abs(z) < stats.t.ppf(0.975, dof))
    assert abs(coverage - 0.95) < 4 * math.sqrt(0.95 * 0.05 / n_seeds)


def test_fit_standard_error_agrees_with_the_spread_over_seeds() -> None:
    rng = np.random.default_rng(2)
    b = np.geomspace(4, 4096, 11)
    sigma = 0.05
    estimates, stderrs = [], []
    for _ in range(300):
        s = (200.0 + 200.0 * 64.0 / b) * np.exp(sigma * rng.standard_normal(b.size))
        fit = fit_pareto(s, b * s)
        estimates.append(math.log(fit.b_crit))
        stderrs.append(fit.log_b_crit_stderr)
    # The typical stated standard error matches the actual scatter of the estimates (the RMS
    # stated error is an unbiased-variance estimate; its sampling error over 300 seeds is ~4%).
    assert np.sqrt(np.mean(np.square(stderrs))) == pytest.approx(np.std(estimates), rel=0.15)


def test_fit_flags_a_front_without_a_knee() -> None:
    b = np.array([16.0, 64.0, 256.0, 1024.0])
    flat = fit_pareto(np.full(4, 100.0), b * 100.0)
    assert flat.at_bound == "lower" and math.isinf(flat.b_crit_stderr)
    scaling = fit_pareto(1e6 / b, np.full(4, 1e6))
    assert scaling.at_bound == "upper"


def test_fit_needs_three_batch_sizes() -> None:
    with pytest.raises(NoiseScaleInputError, match="at least 3 batch sizes"):
        fit_pareto([100.0, 50.0, 100.0], [1600.0, 3200.0, 1600.0])
    with pytest.raises(NoiseScaleInputError):
        fit_pareto([100.0, -1.0, 3.0], [1.0, 2.0, 3.0])


# --- end to end on synthetic grids ---------------------------------------------------------------


@pytest.mark.parametrize("goal", [0.5, 0.2, 0.1])
def test_noiseless_grid_gives_the_model_b_crit(goal: float) -> None:
    runs = MODEL.runs(BATCH_SIZES, steps=30000)
    (result,) = critical_batch_sizes(runs, [goal], decay=0.0)
    # Interpolating between integer steps is the only error: ≪ 1e-3 of S ≥ 51 steps.
    assert result.fit.b_crit == pytest.approx(MODEL.b_crit(goal), rel=1e-3)
    assert result.fit.s_min == pytest.approx(MODEL.s_min(goal), rel=1e-3)
    assert result.fit.e_min == pytest.approx(MODEL.e_min(goal), rel=1e-3)


def test_noisy_grid_recovers_b_crit_within_its_standard_error() -> None:
    goals = [0.5, 0.25, 0.1]
    z = []
    for seed in range(20):
        runs = MODEL.runs(BATCH_SIZES, steps=20000, every=4, noise=0.1, seed=seed)
        for result in critical_batch_sizes(runs, goals, decay=0.0):
            truth = MODEL.b_crit(result.goal)
            z.append((math.log(result.fit.b_crit) - math.log(truth)) / result.fit.log_b_crit_stderr)
    z_arr = np.array(z)
    # t with 8 d.o.f.: |z| > 5 has probability 1e-3; 60 draws.
    assert np.all(np.abs(z_arr) < 5)
    assert 0.7 < z_arr.std() < 1.8


def test_learning_rate_selection_picks_the_fastest_per_goal() -> None:
    slowdown = {0.01: 3.0, 0.1: 1.0, 1.0: 1.7}
    runs = MODEL.runs(BATCH_SIZES[:5], [0.01, 0.1, 1.0], steps=20000, every=5, slowdown=slowdown)
    points = pareto_points(runs, 0.2, decay=0.0)
    assert [p.batch_size for p in points] == BATCH_SIZES[:5]
    assert all(p.learning_rate == 0.1 for p in points)
    for p in points:
        assert p.steps == pytest.approx(MODEL.steps_to_goal(0.2, p.batch_size), rel=1e-4)


def test_best_learning_rate_may_differ_between_goals() -> None:
    # Run "fast-start" is quicker to the easy goal, "steady" to the hard one (App. A.3).
    step = np.arange(1.0, 1001.0)
    runs = []
    for b in (8, 32, 128):
        early = 1.0 / (1.0 + step * b / 400.0)
        fast_start = np.maximum(early, 0.3)  # plateaus at 0.3
        steady = 1.0 / (1.0 + step * b / 800.0)
        runs.append(Run.from_arrays(f"fast{b}", b, 1.0, step, fast_start))
        runs.append(Run.from_arrays(f"steady{b}", b, 0.1, step, steady))
    easy = pareto_points(runs, 0.5, decay=0.0)
    hard = pareto_points(runs, 0.2, decay=0.0)
    assert {p.learning_rate for p in easy} == {1.0}
    assert {p.learning_rate for p in hard} == {0.1}


def test_goal_no_run_reaches_is_an_error() -> None:
    runs = MODEL.runs(BATCH_SIZES[:4], steps=200)
    with pytest.raises(NoiseScaleInputError, match=r"no run reaches the goal 0\.001"):
        critical_batch_sizes(runs, [0.001], decay=0.0)


def test_a_goal_met_at_step_0_is_refused_with_the_advice_to_lower_it() -> None:
    # Records from step 0 at loss 1: a goal at or above it is met before any training, and was
    # refused as one "no run reaches ...; choose a higher goal", the opposite of the fix.
    runs = []
    for b in (8, 32, 128):
        t = np.arange(0, 101, 5.0)
        runs.append(Run.from_arrays(f"b{b}", b, 0.1, t, 1.0 / (1 + t * b / (b + 32) / 20)))
    for goal in (1.5, 1.0):
        with pytest.raises(NoiseScaleInputError) as err:
            critical_batch_sizes(runs, [goal], decay=0.0)
        assert "at their first record, step 0" in str(err.value)
        assert "choose a lower goal" in str(err.value) and "higher" not in str(err.value)
    (result,) = critical_batch_sizes(runs, [0.9], decay=0.0)
    assert result.fit.b_crit > 0


def test_a_goal_met_at_a_first_record_after_step_0_is_refused_or_its_batch_size_named() -> None:
    # Records every 50 steps from step 50 (no step-0 record): a goal met at each run's first
    # record gives only S <= 50, and was fitted as S = 50 everywhere: "B_crit < 0.0205 (95%)"
    # with the advice to add smaller batch sizes, truth 128 (a review, 2026-12-07).
    runs = []
    for b in (64, 128, 256, 512):
        t = np.arange(50, 5001, 50.0)
        runs.append(Run.from_arrays(f"b{b}", b, 0.1, t, 2 / (1 + t / (1 + 128 / b) / 300)))
    with pytest.raises(NoiseScaleInputError) as err:
        critical_batch_sizes(runs, [1.9], decay=0.0)
    assert "at their first record, step 50" in str(err.value)
    assert "at most that" in str(err.value) and "choose a lower goal" in str(err.value)
    assert "record the metric from step 0" in str(err.value)
    # One batch size's step-0 record below the goal: that batch size was left out without a word.
    runs = []
    for b in (8, 16, 32, 64, 128):
        t = np.arange(0, 2001, 10.0)
        loss = 2.3 / (1 + t / (1 + 40 / b) / 300)
        loss[0] = 2.25 if b == 8 else loss[0]
        runs.append(Run.from_arrays(f"b{b}", b, 0.1, t, loss))
    (result,) = critical_batch_sizes(runs, [2.28], decay=0.0)
    assert [p.batch_size for p in result.points] == [16, 32, 64, 128]
    (named,) = [w for w in result.warnings if "batch size 8 is left out" in w]
    assert "'b8' is at or below it at its first record, step 0" in named
    assert "choose a lower goal" in named


def test_goal_reached_by_two_batch_sizes_is_an_error() -> None:
    runs = MODEL.runs([16, 1024, 2048], steps=60)
    goal = float(MODEL.metric(MODEL.progress(60, 512)))
    with pytest.raises(NoiseScaleInputError, match="only 2 batch size"):
        critical_batch_sizes(runs, [goal], decay=0.0)


def _stopped_short_grid(stop: float, stopped_lr: float) -> list[Run]:
    """Exact eq. 2.11 runs (S_min 500, E_min 64,000: B_crit 128), loss exp(−t/(slowdown·S)),
    learning rates 0.2 (slowdown 1), 0.1 (2) and 0.05 (4); at B = 1024 the run at
    ``stopped_lr`` stops after ``stop``·S steps, the others run on past the goal e⁻¹."""
    runs = []
    for b in (16, 32, 64, 128, 256, 512, 1024):
        s = 500.0 + 64000.0 / b
        for lr, slowdown in ((0.2, 1.0), (0.1, 2.0), (0.05, 4.0)):
            length = stop * s if (b, lr) == (1024, stopped_lr) else 5.0 * slowdown * s
            step = np.arange(1.0, int(length) + 1.0)
            runs.append(
                Run.from_arrays(f"b{b}_lr{lr}", b, lr, step, np.exp(-step / (slowdown * s)))
            )
    return runs


def test_run_stopped_short_of_the_goal_while_ahead_leaves_its_batch_size_out() -> None:
    # The fastest run at B = 1024 stops at 98% of its way to the goal, ahead of the slower rate
    # at every step: S there is unknown, not the slower rate's 2·S (which gave B_crit 81).
    (result,) = critical_batch_sizes(_stopped_short_grid(0.98, 0.2), [math.exp(-1)], decay=0.0)
    assert [p.batch_size for p in result.points] == [16, 32, 64, 128, 256, 512]
    assert all(p.learning_rate == 0.2 for p in result.points)
    assert result.fit.b_crit == pytest.approx(128.0, rel=1e-3)
    (warning,) = result.warnings
    assert (
        "batch size 1024 is left out" in warning and "'b1024_lr0.2' stopped at step 551" in warning
    )
    assert "run it longer, or choose a goal it reaches" in warning
    assert 1024 not in [
        p.batch_size for p in pareto_points(_stopped_short_grid(0.98, 0.2), math.exp(-1), decay=0.0)
    ]


@pytest.mark.parametrize("stop", [0.6, 1.5])
def test_run_stopped_short_of_the_goal_while_behind_is_slower(stop: float) -> None:
    # The slowest rate stops early: at 0.6·S it is behind the fastest (which has not reached the
    # goal yet), at 1.5·S the fastest reached it before: either way B = 1024's point is known.
    (result,) = critical_batch_sizes(_stopped_short_grid(stop, 0.05), [math.exp(-1)], decay=0.0)
    assert [p.batch_size for p in result.points] == [16, 32, 64, 128, 256, 512, 1024]
    assert result.points[-1].steps == pytest.approx(562.5, rel=1e-3) and not result.warnings
    assert result.fit.b_crit == pytest.approx(128.0, rel=1e-3)


def test_diverged_run_stops_at_the_first_non_finite_value() -> None:
    step = np.arange(1.0, 6.0)
    run = Run.from_arrays("r", 8, 0.1, step, [1.0, 0.9, np.nan, 0.1, 0.05])
    assert run.diverged_at_step == 3.0
    np.testing.assert_array_equal(run.step, [1.0, 2.0])
    assert goal_crossing(run.step, run.examples, run.metric, 0.5) is None


def test_variable_batch_size_uses_recorded_examples() -> None:
    # Batch size doubles after step 50: examples, not batch_size × step, are E.
    step = np.arange(1.0, 101.0)
    examples = np.where(step <= 50, 16 * step, 800 + 32 * (step - 50))
    run = Run.from_arrays("r", 16, 0.1, step, 1.0 / step, examples=examples)
    crossing = goal_crossing(run.step, run.examples, run.metric, 1.0 / 80)
    assert crossing is not None and crossing.examples == pytest.approx(800 + 32 * 30)
    np.testing.assert_allclose(run.step_batch_sizes()[[0, 49, 50, 99]], [16, 16, 32, 32])


def test_batch_size_outside_the_examples_per_step_is_refused() -> None:
    # Examples per step a fixed multiple of batch_size at every point, beyond 1.5× either way:
    # another unit (tokens, per device), refused. Within 1.5× at some point (partial batches at
    # epochs' ends, a warm-up recorded sparsely) it is fine; beyond it everywhere but changing (a
    # batch grown far from its nominal size) it is warned about.
    step = np.arange(1.0, 101.0)
    for factor in (1.6, 2, 128, 0.6, 0.5):
        grid = [
            Run.from_arrays(f"r{k}", 16 * k, 0.1, step, 1 / step, examples=factor * 16 * k * step)
            for k in (1, 2, 4)
        ]
        with pytest.raises(
            NoiseScaleInputError,
            match=rf"run 'r1': batch_size 16 but its examples column grows by {factor * 16:g} "
            rf"per step \({factor:g}× batch_size at every point\): the two are in different units",
        ):
            critical_batch_sizes(grid, [0.05], decay=0.0)
        with pytest.raises(NoiseScaleInputError, match="different units"):
            default_goals(grid, decay=0.0)
    # A warm-up from 16 to 32 a step, and the same run nominally 24 or 32, or 34: fine.
    examples = np.where(step <= 50, 16 * step, 800 + 32 * (step - 50))
    for b in (15, 16, 24, 32, 34):
        grid = [
            Run.from_arrays(f"r{k}", b * k, 0.1, step, 1 / step, examples=examples * k)
            for k in (1, 2, 4)
        ]
        (result,) = critical_batch_sizes(grid, [0.01], decay=0.0)  # (0.05: met at first records)
        assert result.points and not any("examples per step" in w for w in result.warnings)
    # Nominally 64 for a batch of 16–32 a step: beyond 1.5× everywhere, changing — a warning.
    grid = [
        Run.from_arrays(f"r{k}", 64 * k, 0.1, step, 1 / step, examples=examples * k)
        for k in (1, 2, 4)
    ]
    (result,) = critical_batch_sizes(grid, [0.01], decay=0.0)  # (0.05: met at first records)
    assert any(
        "run 'r1': its examples per step are 0.25–0.5× its batch_size 64 at every recorded point"
        in w
        for w in result.warnings
    )


def test_sparse_warm_up_and_partial_epochs_are_not_taken_for_another_unit() -> None:
    """A review of 2026-12-06 found the first version of the unit check (batch_size within 5% of
    the examples per step at some point) refusing two ordinary grids: a warm-up from B to 2B
    recorded every 250 steps (each record averages over the ramp: 1.1–2× B), and batches of
    4,096 and 8,192 on 50,000 examples without drop_last recorded once an epoch (0.94× and 0.87×
    at every point). Both fit as before, without a unit warning."""

    def run(name: str, b: float, sizes: np.ndarray, records: np.ndarray) -> Run:
        # loss 1/(1 + s), s the full-batch steps of eq. D.1 with B_noise = 128; examples and
        # batch sizes step by step, recorded at ``records``
        s_steps = np.cumsum(sizes / (sizes + 128.0))
        examples = np.cumsum(sizes)
        i = records.astype(int) - 1
        return Run.from_arrays(name, b, 0.1, records, 1 / (1 + s_steps[i]), examples=examples[i])

    t = np.arange(1.0, 4001.0)
    records = np.arange(250.0, 4001.0, 250.0)
    grid = [
        run(f"B{b}", b, b * (1 + np.minimum(t, 1000.0) / 1000.0), records)
        for b in (16, 64, 256, 1024)
    ]
    # (0.002: 0.01 is met at the first record, step 250, at 256 and 1024, whose steps to it are
    # then unknown; it was fitted as S = 250 there until 2026-12-07)
    (result,) = critical_batch_sizes(grid, [0.002], decay=0.0)
    assert len(result.points) == 4
    assert not any("examples per step" in w for w in result.warnings)
    grid = []
    for b in (1024, 2048, 4096, 8192):
        full, rest = divmod(50_000, b)
        epoch = [b] * full + ([rest] if rest else [])
        sizes = np.array(epoch * 40, dtype=float)
        grid.append(run(f"B{b}", b, sizes, np.arange(1.0, 41.0) * len(epoch)))
    (result,) = critical_batch_sizes(grid, [0.01], decay=0.0)  # (0.05: met at first records)
    assert len(result.points) == 4
    assert not any("examples per step" in w for w in result.warnings)


def test_default_goals_are_reached_by_three_batch_sizes() -> None:
    runs = MODEL.runs([8, 64, 512, 4096], steps=400)
    goals = default_goals(runs, decay=0.0, count=6)
    assert goals == sorted(goals, reverse=True)
    finals = [float(r.metric[-1]) for r in runs]
    assert max(finals) > goals[0] and goals[-1] > min(finals)
    for goal in goals:
        assert len(pareto_points(runs, goal, decay=0.0)) >= 3
    # The geometric midpoints that only the two largest batch sizes reach are dropped.
    assert len(goals) < 6


def test_default_goals_need_three_batch_sizes() -> None:
    with pytest.raises(NoiseScaleInputError, match="needs at least 3"):
        default_goals(MODEL.runs([8, 64], steps=100), decay=0.0)


def test_ema_lag_warning() -> None:
    # The fastest run needs ~51 steps to the goal; an EMA with decay 0.9 trails by ~9.
    runs = MODEL.runs(BATCH_SIZES, steps=200)
    (result,) = critical_batch_sizes(runs, [0.5], decay=0.9)
    assert any("EMA" in w for w in result.warnings)
    (quiet,) = critical_batch_sizes(runs, [0.5], decay=0.0)
    assert not any("EMA" in w for w in quiet.warnings)


# --- B_simple averaged over training (App. D.1) --------------------------------------------------


@pytest.mark.parametrize("batch_size", [4, 64, 2048])
def test_b_simple_average_is_b_crit_for_every_batch_size(batch_size: int) -> None:
    """Averaged over full-batch steps (D.1), B_noise gives E_min/S_min from any one run."""
    goal = 0.1
    (run,) = MODEL.runs([batch_size], steps=int(MODEL.steps_to_goal(goal, batch_size)) + 10)
    crossing = goal_crossing(run.step, run.examples, run.metric, goal)
    assert crossing is not None and run.b_simple is not None
    average = b_simple_average(run.step, run.b_simple, batch_size, until_step=crossing.step)
    # A sum over integer steps in place of the D.1 integral: error O(1/S) ≲ 1/S_min = 0.2%.
    assert average == pytest.approx(MODEL.b_crit(goal), rel=5e-3)


def test_plain_mean_over_steps_of_a_small_batch_run_overestimates_b_crit() -> None:
    goal, batch_size = 0.1, 4
    (run,) = MODEL.runs([batch_size], steps=int(MODEL.steps_to_goal(goal, batch_size)))
    assert run.b_simple is not None
    plain = float(np.mean(run.b_simple))
    assert plain > 1.2 * MODEL.b_crit(goal)


def test_b_simple_average_weights_sparse_records_by_their_steps() -> None:
    # Two records: step 10 (b=100, stands for 10 steps) and step 11 (b=1000, one step).
    got = b_simple_average([10.0, 11.0], [100.0, 1000.0], 100.0)
    w = np.array([10 * 100 / 200, 1 * 100 / 1100])
    assert got == pytest.approx(float(w @ [100.0, 1000.0] / w.sum()))
    assert b_simple_average([1.0, 2.0], [np.nan, -3.0], 8.0) is None


def test_goal_result_reports_median_b_simple_and_json_fields() -> None:
    runs = MODEL.runs(BATCH_SIZES, steps=7000)
    (result,) = critical_batch_sizes(runs, [0.2], decay=0.0)
    # Each point's average is a sum over ≥ 211 integer steps standing in for the D.1 integral.
    assert result.b_simple == pytest.approx(MODEL.b_crit(0.2), rel=5e-3)
    d = result.as_dict()
    assert {"goal", "s_min", "e_min", "b_crit", "b_crit_stderr", "points", "b_simple"} <= set(d)
    assert len(d["points"]) == len(BATCH_SIZES)
    assert d["points"][0]["steps_fit"] == pytest.approx(d["points"][0]["steps"], rel=1e-3)


# --- runs -----------------------------------------------------------------------------------------


def test_run_validation() -> None:
    with pytest.raises(NoiseScaleInputError, match="appears twice"):
        Run.from_arrays("r", 8, 0.1, [1, 2, 2], [1.0, 0.5, 0.4])
    with pytest.raises(NoiseScaleInputError, match="positive"):
        Run.from_arrays("r", 0, 0.1, [1, 2], [1.0, 0.5])
    with pytest.raises(NoiseScaleInputError, match="decrease"):
        Run.from_arrays("r", 8, 0.1, [1, 2], [1.0, 0.5], examples=[10, 5])
    run = Run.from_arrays("r", 8, 0.1, [3, 1, 2], [0.3, 1.0, 0.5])
    np.testing.assert_array_equal(run.metric, [1.0, 0.5, 0.3])
    np.testing.assert_array_equal(run.examples, [8.0, 16.0, 24.0])


def test_b_crit_interval_is_the_profile_likelihood_one() -> None:
    """The interval is the B_crit whose best fit leaves RSS ≤ RSS_min·(1 + t²/(n − 2)) (t on
    n − 2 d.o.f.): its ends found by brute force on a fine grid of B_crit; wider than ± 1.96 SE
    (which covered 71% with three batch sizes, a hunt 2026-12-05)."""
    from noisescale.branch.compare import t_quantile

    rng = np.random.default_rng(3)
    b = np.array([8.0, 64.0, 512.0, 4096.0])
    s = (1000.0 + 1000.0 * 300.0 / b) * np.exp(0.1 * rng.standard_normal(b.size))
    fit = fit_pareto(s, b * s)
    low, high = fit.b_crit_interval(0.95)
    y = np.log(s)
    us = np.linspace(math.log(fit.b_crit) - 3, math.log(fit.b_crit) + 3, 200_001)
    rss = np.array([np.var(y - np.log1p(math.exp(u) / b)) * b.size for u in us[::50]])
    fine = np.interp(us, us[::50], rss)
    inside = us[fine <= fit.residual_std**2 * 2 * (1 + t_quantile(0.95, 2) ** 2 / 2)]
    assert math.log(low) == pytest.approx(inside[0], abs=2e-3)
    assert math.log(high) == pytest.approx(inside[-1], abs=2e-3)
    assert high / low > math.exp(2 * 1.96 * fit.log_b_crit_stderr)
    # S_min's and E_min's: at each end the best fit with ln S_min (ln E_min) held there leaves
    # exactly that RSS (brute force over B_crit); S_min's is open below where B_crit's is
    # above (S_min → 0 as B_crit → ∞).
    threshold = fit.residual_std**2 * 2 * (1 + t_quantile(0.95, 2) ** 2 / 2)
    curve = np.log1p(np.exp(us[::10])[:, None] / b[None, :])
    for shift, (lo, hi) in ((0, fit.s_min_interval()), (1, fit.e_min_interval())):
        assert 0 < lo < (fit.s_min, fit.e_min)[shift] < hi
        for end in (lo, hi):
            a = math.log(end) - shift * us[::10]
            best = np.min(np.sum((y[None, :] - a[:, None] - curve) ** 2, axis=1))
            assert best == pytest.approx(threshold, rel=1e-3)
    wide = fit_pareto(s[:3] * [1.0, 0.6, 0.5], b[:3] * s[:3] * [1.0, 0.6, 0.5])
    assert math.isinf(wide.b_crit_interval()[1]) and wide.s_min_interval()[0] == 0.0
    # At the edge of the search: unbounded on that side (no front without a knee bounds it).
    flat = fit_pareto(np.array([100.0, 110.0, 95.0, 105.0]), b * 100.0)
    assert flat.at_bound == "lower" and flat.b_crit_interval()[0] == 0.0


@pytest.mark.parametrize(
    ("batch_sizes", "b_crit", "sigma"),
    [
        ([4.0, 8.0, 16.0, 32.0, 64.0, 128.0], 0.4, 0.3),  # below every batch size (the hunt's)
        ([64.0, 128.0, 256.0, 512.0], 51_200.0, 0.1),  # far above them
        ([64.0, 128.0, 256.0], 76.0, 0.2),  # inside, three batch sizes
        ([4.0, 8.0, 16.0, 32.0, 64.0, 128.0], 40.0, 0.3),  # inside (the control)
    ],
)
def test_b_crit_interval_holds_the_truth_95_percent_of_the_time(
    batch_sizes: list[float], b_crit: float, sigma: float
) -> None:
    """Log-normal scatter on S, 1,000 fronts: the 95% interval holds the truth at 95% ± 4
    binomial standard errors among the fits inside the search range, and at least that at its
    edge. The delta method's B_crit·exp(±t·SE) held it in 11-17% where B_crit is poorly
    identified (the first two; a hunt, 2026-12-07), and overflowed."""
    rng = np.random.default_rng(51)
    b = np.array(batch_sizes)
    held: dict[bool | str, list[bool]] = {True: [], False: [], "s_min": [], "e_min": []}
    for _ in range(1000):
        s = (1000.0 + 1000.0 * b_crit / b) * np.exp(sigma * rng.standard_normal(b.size))
        fit = fit_pareto(s, b * s)
        low, high = fit.b_crit_interval(0.95)
        held[fit.at_bound is None].append(low <= b_crit <= high)
        low, high = fit.s_min_interval(0.95)
        held["s_min"].append(low <= 1000.0 <= high)
        low, high = fit.e_min_interval(0.95)
        held["e_min"].append(low <= 1000.0 * b_crit <= high)
    # S_min's and E_min's profile intervals, over every fit (the delta method's S·exp(±t·SE)
    # held the truth in 0.74 far above, E_min's in 0.80 below; a review, 2026-12-07)
    for name in ("s_min", "e_min"):
        assert 0.95 - 4 * math.sqrt(0.95 * 0.05 / 1000) < np.mean(held[name]) < 0.99, name
    inside = np.array(held[True])
    assert abs(inside.mean() - 0.95) < 4 * math.sqrt(0.95 * 0.05 / inside.size)
    if len(held[False]) >= 20:
        edge = np.array(held[False])
        assert edge.mean() > 0.95 - 4 * math.sqrt(0.95 * 0.05 / edge.size)


def test_s_min_and_e_min_at_the_search_edge_are_printed_as_intervals_only() -> None:
    """A fit at the upper edge of its search (B_crit 2,000 over batch sizes 8-128, σ 0.1):
    B_crit is printed as a one-sided interval, and S_min and E_min were printed as the edge
    fit's values ("0.01644 ± inf" for a true S_min of 10, a review of 2026-12-07): now as
    their intervals alone, which hold the truth."""
    rng = np.random.default_rng(2)
    batch = 2.0 ** np.arange(3, 8)
    for _ in range(200):
        steps = 10 * (1 + 2000 / batch) * np.exp(0.1 * rng.standard_normal(5))
        fit = fit_pareto(steps, steps * batch)
        if fit.at_bound:
            break
    assert fit.at_bound == "upper"
    text = fit.min_text("s_min")
    assert "±" not in text and "(the fit is at its edge)" in text, text
    low, high = fit.s_min_interval(0.95)
    assert low <= 10 <= high
