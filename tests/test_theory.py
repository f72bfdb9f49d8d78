"""Tests of noisescale.theory against hand-computed values and closed forms."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from noisescale import theory
from noisescale.errors import NoiseScaleInputError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "theory.md"

positive = st.floats(min_value=1e-3, max_value=1e9, allow_nan=False, allow_infinity=False)


# --- eq. 2.6, 2.7, 2.11 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "b_noise", "lr", "steps", "examples"),
    [
        (2048, 2048, 1 / 2, 2.0, 2.0),
        (4096, 2048, 2 / 3, 1.5, 3.0),
        (512, 2048, 1 / 5, 5.0, 1.25),
        (1, 99, 1 / 100, 100.0, 1 + 1 / 99),
    ],
)
def test_single_point_formulas_by_hand(
    batch: float, b_noise: float, lr: float, steps: float, examples: float
) -> None:
    assert theory.lr_over_max(batch, b_noise) == pytest.approx(lr, rel=1e-15)
    assert theory.loss_improvement_over_max(batch, b_noise) == pytest.approx(lr, rel=1e-15)
    assert theory.steps_over_min(batch, b_noise) == pytest.approx(steps, rel=1e-15)
    assert theory.examples_over_min(batch, b_noise) == pytest.approx(examples, rel=1e-15)


def test_single_point_formulas_broadcast_arrays() -> None:
    b = np.array([1024.0, 2048.0, 4096.0])
    np.testing.assert_allclose(theory.lr_over_max(b, 2048), [1 / 3, 1 / 2, 2 / 3], rtol=1e-15)
    np.testing.assert_allclose(theory.steps_over_min(b, 2048), [3, 2, 1.5], rtol=1e-15)
    np.testing.assert_allclose(theory.examples_over_min(b, 2048), [1.5, 2, 3], rtol=1e-15)
    assert isinstance(theory.lr_over_max(3.0, 4.0), float)


@given(batch=positive, b_noise=positive)
def test_every_batch_size_lies_on_the_pareto_front(batch: float, b_noise: float) -> None:
    s = theory.steps_over_min(batch, b_noise)
    e = theory.examples_over_min(batch, b_noise)
    # Subtracting 1 from a rounded s or e loses log2(s/(s−1)) bits: the tolerance follows.
    eps = np.finfo(float).eps
    tol = 4 * eps * (s / (s - 1) + e / (e - 1))
    assert (s - 1) * (e - 1) == pytest.approx(1.0, rel=tol)
    assert theory.pareto_steps_over_min(e) == pytest.approx(s, rel=tol)


@pytest.mark.parametrize(
    ("batch", "expected"),
    [(999, "small"), (1000, "balanced"), (3000, "balanced"), (9000, "balanced"), (9001, "large")],
)
def test_regime_thresholds(batch: float, expected: str) -> None:
    # B_noise = 3000: small below 1000 = B_noise/3, large above 9000 = 3·B_noise.
    assert theory.regime(batch, 3000) == expected


def test_regime_boundaries_are_where_one_cost_is_four_thirds() -> None:
    b_noise = 600.0
    small_edge, large_edge = b_noise / theory.REGIME_FACTOR, b_noise * theory.REGIME_FACTOR
    assert theory.examples_over_min(small_edge, b_noise) == pytest.approx(4 / 3)
    assert theory.steps_over_min(small_edge, b_noise) == pytest.approx(4)
    assert theory.steps_over_min(large_edge, b_noise) == pytest.approx(4 / 3)
    assert theory.examples_over_min(large_edge, b_noise) == pytest.approx(4)


@pytest.mark.parametrize(("batch", "b_noise"), [(0, 10), (10, 0), (-1, 10), (10, float("nan"))])
def test_regime_rejects_non_positive_input(batch: float, b_noise: float) -> None:
    with pytest.raises(NoiseScaleInputError):
        theory.regime(batch, b_noise)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: theory.lr_over_max(64, -100), r"b_noise must be in \[0, ∞\], got -100"),
        (lambda: theory.loss_improvement_over_max(64, -32), r"b_noise must be in \[0, ∞\]"),
        (lambda: theory.steps_over_min(64, -100), r"b_noise must be in \[0, ∞\]"),
        (lambda: theory.steps_over_min(64, math.nan), r"b_noise must be in \[0, ∞\], got nan"),
        (lambda: theory.examples_over_min(64, -100), r"b_noise must be in \[0, ∞\]"),
        (lambda: theory.examples_over_min(-64, 100), r"batch_size must be in \(0, ∞\], got -64"),
        (lambda: theory.lr_over_max([64, 0], 100), r"batch_size must be in \(0, ∞\]"),
        (lambda: theory.lr_central(64, 0.1, -100), r"b_star must be in \[0, ∞\], got -100"),
        (lambda: theory.lr_central(64, -0.1, 100), r"lr_star must be in \(0, ∞\]"),
        (lambda: theory.lr_central(64, 0.1, 100, -1), r"alpha must be in \(0, 1\], got -1"),
        (lambda: theory.b_noise_at_temperature(100, 1, -2), r"new_temperature must be in \(0, ∞\)"),
        (lambda: theory.b_noise_at_temperature(-100, 1, 2), r"b_noise must be in \[0, ∞\]"),
        (lambda: theory.pareto_steps_over_min(0.5), r"\(E/E_min\) must be in \(1, ∞\], got 0\.5"),
        (lambda: theory.pareto_steps_over_min(2, -1), r"gamma must be in \(0, ∞\), got -1"),
        (lambda: theory.adaptive_batch_size(-100, 4), r"b_simple must be in \[0, ∞\]"),
        (lambda: theory.adaptive_batch_size(100, -4), r"r must be in \(0, ∞\), got -4"),
        (lambda: theory.temperature(0.1, -64), r"batch_size must be in \(0, ∞\], got -64"),
    ],
)
def test_single_point_functions_refuse_values_out_of_range(call, message: str) -> None:
    """Until 2026-12-06 these returned numbers outside the quantity's range (lr_over_max(64,
    -100) = −1.78, steps_over_min(64, −100) = −0.56, pareto_steps_over_min(0.5) = −1, a hunt),
    where regime() already refused a negative noise scale."""
    with pytest.raises(NoiseScaleInputError, match=message):
        call()


def test_single_point_functions_take_their_limits() -> None:
    # A noiseless problem (B_noise = 0): ε_opt = ε_max, S = S_min; B_noise = ∞: ε_opt → 0.
    assert theory.lr_over_max(64, 0) == 1.0 and theory.steps_over_min(64, 0) == 1.0
    assert (
        theory.lr_over_max(64, math.inf) == 0.0 and theory.steps_over_min(64, math.inf) == math.inf
    )
    assert theory.examples_over_min(64, math.inf) == 1.0 and theory.lr_central(64, 0.3, 0) == 0.3
    assert theory.pareto_steps_over_min(math.inf) == 1.0


# --- learning rates (App. A.2, scaling rules) -----------------------------------------------------


def test_lr_central_by_hand() -> None:
    assert theory.lr_central(100, 1.0, 100, 1.0) == pytest.approx(0.5)
    assert theory.lr_central(100, 1.0, 100, 0.5) == pytest.approx(1 / math.sqrt(2))
    assert theory.lr_central(300, 0.6, 100, 1.0) == pytest.approx(0.6 * 3 / 4)
    b = np.array([10.0, 1000.0])
    # With α = 1 and B* = B_noise, eq. A.3 is ε* times eq. 2.6.
    np.testing.assert_allclose(
        theory.lr_central(b, 0.3, 250, 1.0), 0.3 * theory.lr_over_max(b, 250)
    )


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("linear", 0.4),
        ("sqrt", 0.2),
        ("none", 0.1),
        # ε_opt(1024)/ε_opt(256) with B_noise = 256: (1024/1280)/(256/512) = 1.6.
        ("noise", 0.16),
    ],
)
def test_scaled_lr_rules_by_hand(rule: str, expected: float) -> None:
    assert theory.scaled_lr(256, 1024, 0.1, rule, b_noise=256) == pytest.approx(expected)


def test_scaled_lr_noise_rule_limits_and_alpha() -> None:
    # Far below B_noise the noise rule is the linear rule; far above it, no scaling.
    assert theory.scaled_lr(8, 16, 0.01, "noise", b_noise=1e9) == pytest.approx(0.02, rel=1e-6)
    # B_noise = ∞ is that limit, (B'/B)^α (a ZeroDivisionError until 2026-12-06, a hunt).
    assert theory.scaled_lr(64, 128, 0.1, "noise", b_noise=math.inf) == pytest.approx(0.2)
    assert theory.scaled_lr(64, 256, 0.1, "noise", b_noise=math.inf, alpha=0.5) == pytest.approx(
        0.2
    )
    assert theory.scaled_lr(1e9, 2e9, 0.01, "noise", b_noise=8) == pytest.approx(0.01, rel=1e-6)
    assert theory.scaled_lr(256, 1024, 0.1, "noise", b_noise=256, alpha=0.5) == pytest.approx(
        0.1 * math.sqrt(1.6)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rule": "cubic"}, "unknown learning-rate rule"),
        ({"rule": "noise"}, "needs a positive noise scale"),
        ({"rule": "noise", "b_noise": -5.0}, "needs a positive noise scale"),
        # α outside (0, 1] returned 0.0695 until 2026-12-06 (lr_factor refused it; a hunt)
        ({"rule": "noise", "b_noise": 100.0, "alpha": -1.0}, r"alpha must be in \(0, 1\], got -1"),
        ({"rule": "noise", "b_noise": 100.0, "alpha": 1.5}, r"alpha must be in \(0, 1\]"),
        ({"lr": -0.1}, "the learning rate must be positive and finite, got -0.1"),
    ],
)
def test_scaled_lr_rejects_bad_rules(kwargs: dict, message: str) -> None:
    with pytest.raises(NoiseScaleInputError, match=message):
        theory.scaled_lr(64, 128, **{"lr": 0.1, **kwargs})


def test_scaled_lr_rejects_non_positive_batch() -> None:
    with pytest.raises(NoiseScaleInputError, match="positive"):
        theory.scaled_lr(0, 128, 0.1)


# --- temperature (App. C) -----------------------------------------------------------------------


def test_temperature_and_rescaling_by_hand() -> None:
    assert theory.temperature(0.1, 128) == pytest.approx(0.1 / 128)
    # Decaying the learning rate tenfold at a fixed batch size: B_noise grows tenfold (eq. C.2).
    t0, t1 = theory.temperature(0.1, 128), theory.temperature(0.01, 128)
    assert theory.b_noise_at_temperature(1000.0, t0, t1) == pytest.approx(10000.0)
    # Linear scaling (ε and B doubled) keeps T and therefore the noise scale.
    t2 = theory.temperature(0.2, 256)
    assert theory.b_noise_at_temperature(1000.0, t0, t2) == pytest.approx(1000.0)
    # (a review, 2026-12-07) equal temperatures give B_noise, however small (B·T underflowed);
    # a result beyond the doubles is refused, not 0 or ∞ (0 and ∞ given are their limits)
    assert theory.b_noise_at_temperature(1e-10, 1e-320, 1e-320) == 1e-10
    assert theory.b_noise_at_temperature(1e-300, 1e200, 1e-200) == pytest.approx(1e100)
    for args in ((100.0, 1e-300, 1e300), (1e300, 1e300, 1e-300), ([1.0, 1e10], 1.0, [2.0, 1e-300])):
        with pytest.raises(NoiseScaleInputError, match="underflow or overflow: the noise scale"):
            theory.b_noise_at_temperature(*args)
    assert theory.b_noise_at_temperature(0.0, 1.0, 1e-300) == 0.0
    assert theory.b_noise_at_temperature(math.inf, 1.0, 2.0) == math.inf


def test_temperature_limits_beyond_the_doubles() -> None:
    """(A review, 2026-12-07.) B = ∞ or 0 is its own limit at any temperature: a ratio T/T'
    beyond the doubles gave ∞·0 = NaN; a noise scale itself subnormal is refused naming that,
    not "use temperatures closer together" (equal temperatures)."""
    assert theory.b_noise_at_temperature(math.inf, 1e-300, 1e300) == math.inf
    assert theory.b_noise_at_temperature(0.0, 1e300, 1e-300) == 0.0
    np.testing.assert_array_equal(
        theory.b_noise_at_temperature([0.0, math.inf, 2.0], 1e-300, 1e-300), [0.0, math.inf, 2.0]
    )
    with pytest.raises(NoiseScaleInputError, match="1e-310 is itself below the smallest normal"):
        theory.b_noise_at_temperature(1e-310, 1.0, 1.0)


@pytest.mark.parametrize("temperatures", [(1e-320, 1e-300), (1e-300, 1e-320), (1.0, 5e-324)])
def test_a_subnormal_temperature_is_refused(temperatures: tuple[float, float]) -> None:
    """(A review, 2026-12-07.) T = 1e-320 is a subnormal double, its digits lost:
    b_noise_at_temperature(2, 1e-320, 1e-300) gave 1.99998e-20, 1.1e-5 off the 2e-20 of eq. C.2,
    while a subnormal B_noise is refused. Refused alike, naming it; equal temperatures, however
    small, keep B_noise exactly (above)."""
    with pytest.raises(NoiseScaleInputError, match=r"below the smallest normal double.*scale both"):
        theory.b_noise_at_temperature(2.0, *temperatures)
    with pytest.raises(NoiseScaleInputError, match="below the smallest normal double"):
        theory.b_noise_at_temperature([2.0, 3.0], [1.0, temperatures[0]], temperatures[1])
    assert theory.b_noise_at_temperature(2.0, 1e-320, 1e-320) == 2.0
    assert theory.b_noise_at_temperature(2.0, 2.3e-308, 4.6e-308) == pytest.approx(1.0, rel=1e-15)


@given(b_noise=positive, t0=positive, t1=positive)
def test_temperature_rescaling_round_trips(b_noise: float, t0: float, t1: float) -> None:
    there = theory.b_noise_at_temperature(b_noise, t0, t1)
    assert theory.b_noise_at_temperature(there, t1, t0) == pytest.approx(b_noise, rel=1e-12)
    assert there * t1 == pytest.approx(b_noise * t0, rel=1e-12)


# --- App. D -------------------------------------------------------------------------------------


def test_adaptive_batch_size_by_hand() -> None:
    assert theory.adaptive_batch_size(400.0, 100.0) == pytest.approx(200.0)
    np.testing.assert_allclose(theory.adaptive_batch_size([1.0, 4.0, 9.0], 4.0), [2, 4, 6])


def test_gamma_is_one_for_a_constant_noise_scale() -> None:
    s = np.linspace(0, 50, 11)
    assert theory.adaptive_gamma(s, np.full_like(s, 123.0)) == pytest.approx(1.0, rel=1e-14)


def test_gamma_of_the_svhn_fit_is_24_over_25() -> None:
    # Eq. D.7: B_crit(s) ≈ 10·√s gives γ = 24/25. √B ∝ s^¼ is not smooth at 0, so the trapezoid
    # error falls as N^−1.25 rather than N^−2; check the value and that rate.
    errors = []
    for n in (1_001, 10_001, 100_001):
        s = np.linspace(0.0, 1.0, n)
        errors.append(abs(theory.adaptive_gamma(s, 10 * np.sqrt(s)) - 24 / 25))
    assert errors[-1] < 1e-6
    rates = np.log10(np.array(errors[:-1]) / np.array(errors[1:]))
    np.testing.assert_allclose(rates, 1.25, atol=0.05)
    # γ does not depend on the constant (10) nor on the length of the run.
    s = np.linspace(0.0, 7.0, 100_001)
    assert theory.adaptive_gamma(s, 3 * np.sqrt(s)) == pytest.approx(24 / 25, abs=1e-6)


def test_gamma_matches_footnote_18_for_a_two_level_noise_scale() -> None:
    # γ = E[√B]²/E[B] (footnote 18): half the run at B = 1, half at B = 100 → 5.5²/50.5.
    s = np.concatenate([np.linspace(0, 1, 1001), np.linspace(1 + 1e-9, 2, 1001)])
    b = np.where(s <= 1, 1.0, 100.0)
    assert theory.adaptive_gamma(s, b) == pytest.approx(5.5**2 / 50.5, rel=1e-6)


@given(
    # some noise that survives the trapezoid rule (a lone 5e-324 halves to zero: refused)
    st.lists(st.floats(min_value=0.0, max_value=1e6), min_size=2, max_size=30).filter(
        lambda b: max(b) > 1e-300
    )
)
def test_gamma_never_exceeds_one(b_noise: list[float]) -> None:
    # Cauchy–Schwarz, which the trapezoid rule (positive weights) preserves exactly.
    s = np.arange(len(b_noise), dtype=float)
    assert 0.0 <= theory.adaptive_gamma(s, b_noise) <= 1.0 + 1e-12


def test_costs_along_a_constant_noise_scale() -> None:
    s = np.linspace(0.0, 1000.0, 5)
    b_noise = np.full_like(s, 256.0)
    s_min, e_min = theory.min_cost(s, b_noise)
    assert (s_min, e_min) == (1000.0, 256_000.0)
    steps, examples = theory.fixed_batch_cost(s, b_noise, np.array([64.0, 256.0, 1024.0]))
    np.testing.assert_allclose(steps, [5000.0, 2000.0, 1250.0])
    np.testing.assert_allclose(examples, [320_000.0, 512_000.0, 1_280_000.0])
    # The adaptive schedule with constant noise is the fixed batch √(r·B_noise).
    adaptive = theory.adaptive_batch_cost(s, b_noise, r=256.0)
    assert adaptive == pytest.approx(theory.fixed_batch_cost(s, b_noise, 256.0))


def test_fixed_batch_cost_is_the_integral_of_eq_2_11() -> None:
    # S = ∫(1 + B_noise/B) ds with B_noise = 10·√s on [0, 100]: S = 100 + (10/B)·(2/3)·1000.
    s = np.linspace(0.0, 100.0, 200_001)
    steps, examples = theory.fixed_batch_cost(s, 10 * np.sqrt(s), 50.0)
    assert steps == pytest.approx(100 + 10 / 50 * 2 / 3 * 1000, rel=1e-6)
    assert examples == pytest.approx(50 * steps, rel=1e-15)


@pytest.mark.parametrize("r", [1.0, 37.0, 5000.0])
def test_adaptive_cost_lies_on_the_gamma_front(r: float) -> None:
    s = np.linspace(0.0, 200.0, 4001)
    b_noise = 5 + 0.3 * s**1.5
    s_min, e_min = theory.min_cost(s, b_noise)
    gamma = theory.adaptive_gamma(s, b_noise)
    steps, examples = theory.adaptive_batch_cost(s, b_noise, r)
    # Eq. D.4 holds exactly for the quadrature too: both sides are the same trapezoid sums.
    assert (steps / s_min - 1) * (examples / e_min - 1) == pytest.approx(gamma, rel=1e-12)
    assert steps / s_min == pytest.approx(theory.pareto_steps_over_min(examples / e_min, gamma))


def test_natural_exchange_rate_balances_time_and_compute() -> None:
    s = np.linspace(0.0, 10.0, 1001)
    b_noise = 100 * (1 + s) ** 2
    r = theory.natural_exchange_rate(s, b_noise)
    s_min, e_min = theory.min_cost(s, b_noise)
    assert r == pytest.approx(e_min / s_min)
    steps, examples = theory.adaptive_batch_cost(s, b_noise, r)
    root_gamma = math.sqrt(theory.adaptive_gamma(s, b_noise))
    assert steps / s_min == pytest.approx(1 + root_gamma, rel=1e-12)
    assert examples / e_min == pytest.approx(1 + root_gamma, rel=1e-12)


def test_exchange_rate_for_examples_inverts_the_adaptive_cost() -> None:
    s = np.linspace(0.0, 10.0, 1001)
    b_noise = 100 * (1 + s) ** 2
    for r in (0.5, 80.0, 9000.0):
        examples = theory.adaptive_batch_cost(s, b_noise, r).examples
        assert theory.exchange_rate_for_examples(s, b_noise, examples) == pytest.approx(r)
    _, e_min = theory.min_cost(s, b_noise)
    with pytest.raises(NoiseScaleInputError, match="E_min"):
        theory.exchange_rate_for_examples(s, b_noise, 0.99 * e_min)


def test_full_batch_steps_by_hand() -> None:
    # Constant B = 64, B_noise = 192: every step is worth 64/256 = 1/4 full-batch step.
    steps = np.arange(0, 101)
    s = theory.full_batch_steps(steps, np.full(101, 64.0), np.full(101, 192.0))
    np.testing.assert_allclose(s, steps / 4)
    # A gap in the steps (skipped or unrecorded) is bridged by the trapezoid rule.
    s_gap = theory.full_batch_steps([0, 1, 5], [64, 64, 64], [192, 192, 192])
    np.testing.assert_allclose(s_gap, [0, 0.25, 1.25])


def test_fixed_cost_at_the_run_batch_reproduces_the_run() -> None:
    # Convert a run at constant B to s, then ask eq. D.1 for B: the run's steps come back.
    steps = np.arange(0, 2001, dtype=float)
    b_noise = 40 * (1 + steps / 80)
    s = theory.full_batch_steps(steps, np.full_like(steps, 64.0), b_noise)
    assert theory.fixed_batch_cost(s, b_noise, 64.0).steps == pytest.approx(2000, rel=1e-6)


def test_run_integrals_are_eq_d1_step_by_step() -> None:
    """(A hunt, 2026-12-06.) B = 32 and B_noise 10, 120, 10, … at every step: the trapezoid in
    the s of :func:`full_batch_steps` read E_min 1.26·10⁴; eq. D.1 per step (ds = B/(B + B_noise),
    E_min = Σ B_noise·ds, the trapezoid over steps: half of each end's term) gives 6.55·10³,
    and the run's own B predicts its 399 steps exactly."""
    steps = np.arange(1, 401)
    noise = np.where(steps % 2, 10.0, 120.0)
    integrals = theory.run_integrals(steps, np.full(400, 32.0), noise)
    ds = 32 / (32 + noise)
    s_min, e_min, root = (
        float(np.sum(w * ds) - (w[0] * ds[0] + w[-1] * ds[-1]) / 2)
        for w in (np.ones(400), noise, np.sqrt(noise))
    )
    assert integrals == pytest.approx((s_min, e_min, root), rel=1e-12)
    assert theory.min_cost(integrals) == pytest.approx((s_min, e_min), rel=1e-12)
    assert theory.fixed_batch_cost(integrals, None, 32.0).steps == pytest.approx(399, rel=1e-12)
    assert theory.adaptive_gamma(integrals) == pytest.approx(root**2 / (s_min * e_min))
    with pytest.raises(NoiseScaleInputError, match="not both"):
        theory.min_cost(integrals, noise)


@pytest.mark.parametrize(
    ("s", "b_noise", "message"),
    [
        ([0.0], [1.0], "at least two"),
        ([0.0, 1.0], [1.0], "same length"),
        ([0.0, 1.0, 1.0], [1.0, 1.0, 1.0], "strictly increasing"),
        ([0.0, 1.0], [1.0, -1.0], "negative"),
        ([0.0, 1.0], [1.0, float("nan")], "finite"),
    ],
)
def test_trajectory_validation(s: list, b_noise: list, message: str) -> None:
    with pytest.raises(NoiseScaleInputError, match=message):
        theory.adaptive_gamma(s, b_noise)


@pytest.mark.parametrize("batch_size", [-64.0, 0.0, float("nan"), np.array([64.0, -1.0])])
def test_fixed_batch_cost_refuses_what_is_no_batch_size(batch_size: object) -> None:
    """(A fuzzer, seed 1, 2026-12-07.) S_min + E_min/B priced B = -64 at -64.8 steps and B = 0
    at (inf, nan); refused as steps_over_min refuses it."""
    integrals = theory.run_integrals([0, 100], [64, 64], [300, 300])
    with pytest.raises(NoiseScaleInputError, match="batch_size must be in"):
        theory.fixed_batch_cost(integrals, None, batch_size)


@pytest.mark.parametrize(
    ("integrals", "field"),
    [
        ((math.nan, -1.0, 2.0), "s_min"),
        ((-1.0, -1.0, 1.0), "s_min"),
        ((0.0, 1.0, 1.0), "s_min"),
        ((1.0, -1.0, 1.0), "e_min"),
        ((1.0, math.inf, 1.0), "e_min"),
        ((1.0, 1.0, -1.0), "root"),
    ],
)
def test_trajectory_integrals_built_by_hand_are_checked(
    integrals: tuple[float, float, float], field: str
) -> None:
    """(A fuzzer, 2026-12-07.) min_cost returned (nan, -1) for TrajectoryIntegrals(nan, -1, 2)
    and adaptive_gamma blamed E_min = -1 on a noise scale "zero all along"; each function that
    takes them names the impossible field."""
    ints = theory.TrajectoryIntegrals(*integrals)
    for call in (
        lambda: theory.min_cost(ints),
        lambda: theory.fixed_batch_cost(ints, None, 64.0),
        lambda: theory.adaptive_batch_cost(ints, None, 4.0),
        lambda: theory.adaptive_gamma(ints),
        lambda: theory.natural_exchange_rate(ints),
        lambda: theory.exchange_rate_for_examples(ints, None, 1e9),
    ):
        with pytest.raises(NoiseScaleInputError, match=f"TrajectoryIntegrals.{field} must be"):
            call()


@pytest.mark.parametrize(
    "integrals", [(1.0, 1.0, 10.0), (1.0, 1.0, 0.0), (1.0, 0.0, 1.0), (4.0, 1.0, 2.0 * (1 + 1e-6))]
)
def test_trajectory_integrals_built_by_hand_are_one_trajectorys(
    integrals: tuple[float, float, float],
) -> None:
    """(A review, 2026-12-07.) Checked field by field only, TrajectoryIntegrals(1, 1, 10) had
    γ = 100 (γ ≤ 1 by Cauchy–Schwarz), (1, 1, 0) γ = 0 and a ZeroDivisionError in
    exchange_rate_for_examples, (1, 0, 1) an adaptive cost: refused, each function naming why."""
    ints = theory.TrajectoryIntegrals(*integrals)
    for call in (
        lambda: theory.min_cost(ints),
        lambda: theory.fixed_batch_cost(ints, None, 64.0),
        lambda: theory.adaptive_batch_cost(ints, None, 4.0),
        lambda: theory.adaptive_gamma(ints),
        lambda: theory.exchange_rate_for_examples(ints, None, 2.0),
    ):
        with pytest.raises(NoiseScaleInputError, match="are no trajectory's integrals"):
            call()
    # at the bound, γ = 1 (a constant noise scale), up to rounding, is one
    assert theory.adaptive_gamma(theory.TrajectoryIntegrals(4.0, 1.0, 2.0 * (1 + 1e-12))) == (
        pytest.approx(1.0, rel=1e-11)
    )


def test_trajectory_integrals_that_overflow() -> None:
    """(A review, 2026-12-07.) γ of (1e200, 1e200, 1e200), a constant B_noise = 1, was an
    OverflowError (root² overflows): it is 1. Integrals of (s, b_noise) beyond the doubles were
    (inf, inf) from min_cost and an OverflowError from adaptive_gamma: refused."""
    assert theory.adaptive_gamma(theory.TrajectoryIntegrals(1e200, 1e200, 1e200)) == 1.0
    assert theory.adaptive_gamma(theory.TrajectoryIntegrals(1e-200, 1e-200, 1e-200)) == 1.0
    for call in (
        lambda: theory.min_cost([-1e308, 1e308], [1, 1]),
        lambda: theory.adaptive_gamma([0, 1e10], [1e300, 1e300]),
        lambda: theory.natural_exchange_rate([0, 1e10], [1e300, 1e300]),
    ):
        with pytest.raises(NoiseScaleInputError, match="the trajectory's integrals overflow"):
            call()
    ints = theory.TrajectoryIntegrals(1.0, 1.0, 1.0)
    assert theory.exchange_rate_for_examples(ints, None, 3.0) == 4.0  # ((3 - 1)/1)²
    with pytest.raises(NoiseScaleInputError, match="exchange rate for 1e\\+200 examples overflows"):
        theory.exchange_rate_for_examples(ints, None, 1e200)


def test_zero_noise_trajectory_has_no_gamma() -> None:
    assert theory.fixed_batch_cost([0, 1], [0, 0], 8) == (1.0, 8.0)
    with pytest.raises(NoiseScaleInputError, match="zero all along"):
        theory.adaptive_gamma([0, 1], [0, 0])


# --- Kaplan's law -------------------------------------------------------------------------------


def test_kaplan_b_crit_by_hand() -> None:
    assert theory.b_crit_kaplan(1.0) == pytest.approx(2.0e8)
    # 2^4.76 = e^(4.76·ln 2) = 27.098…
    assert theory.b_crit_kaplan(2.0) == pytest.approx(2.0e8 / 2**4.76)
    assert theory.b_crit_kaplan(2.0) == pytest.approx(7.3812e6, rel=1e-4)
    np.testing.assert_allclose(
        theory.b_crit_kaplan([3.0, 4.0]), [1.071354e6, 2.724109e5], rtol=1e-6
    )
    with pytest.raises(NoiseScaleInputError, match="positive loss"):
        theory.b_crit_kaplan(0.0)


# --- the numbers quoted in docs/theory.md -------------------------------------------------------


def test_worked_exercise_numbers() -> None:
    b_noise = 2048.0
    now, doubled = 16 * 128, 32 * 128
    assert (now, doubled) == (2048, 4096)
    assert theory.regime(now, b_noise) == theory.regime(doubled, b_noise) == "balanced"
    assert theory.steps_over_min(now, b_noise) == 2.0
    assert theory.examples_over_min(now, b_noise) == 2.0
    assert theory.steps_over_min(doubled, b_noise) == 1.5
    assert theory.examples_over_min(doubled, b_noise) == 3.0
    step_ratio = theory.steps_over_min(doubled, b_noise) / theory.steps_over_min(now, b_noise)
    example_ratio = theory.examples_over_min(doubled, b_noise) / theory.examples_over_min(
        now, b_noise
    )
    assert step_ratio == 0.75 and example_ratio == 1.5
    assert 1 / step_ratio == pytest.approx(1.333, abs=5e-4)
    # GPU-hours: 32 GPUs for 0.75 of the time against 16 for all of it.
    assert 32 * step_ratio / 16 == 1.5
    assert (1 / step_ratio) / 2 == pytest.approx(0.667, abs=5e-4)
    assert theory.scaled_lr(now, doubled, 0.1, "noise", b_noise=b_noise) == pytest.approx(
        0.1333, abs=5e-5
    )
    assert theory.scaled_lr(now, doubled, 0.1, "linear") == pytest.approx(0.2)
    assert theory.scaled_lr(now, doubled, 0.1, "linear") / theory.scaled_lr(
        now, doubled, 0.1, "noise", b_noise=b_noise
    ) == pytest.approx(1.5)
    # If the noise scale grows to 8192, batch 4096 costs S/S_min = 3 and E/E_min = 1.5.
    assert theory.steps_over_min(doubled, 8192) == 3.0
    assert theory.examples_over_min(doubled, 8192) == 1.5


def test_docs_quote_the_tested_numbers() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for quoted in (
        "S/S_min = 2 and E/E_min = 2",
        "S/S_min = 1.5 and E/E_min = 3",
        "25% fewer steps, a 1.333× speed-up",
        "1.5×, 50% more compute",
        "32·0.75 = 24",
        "0.667 parallel efficiency",
        "(2/3)/(1/2) = 1.333×",
        "gives 0.1333 from\n  0.1",
        "S/S_min = 3 and E/E_min = 1.5",
        "7.381·10⁶ tokens at L = 2, 1.071·10⁶ at L = 3,\n2.724·10⁵ at L = 4",
        "within 5·10⁻⁷",
    ):
        assert quoted in text, quoted
    # The code block's printed output is what the library returns.
    rows = re.findall(r"^# (\d+) (\w+) ([\d.]+) ([\d.]+)$", text, flags=re.MULTILINE)
    assert len(rows) == 2
    for batch, name, steps, examples in rows:
        assert theory.regime(int(batch), 2048) == name
        assert str(theory.steps_over_min(int(batch), 2048)) == steps
        assert str(theory.examples_over_min(int(batch), 2048)) == examples


def test_docs_svhn_gamma_accuracy_claim() -> None:
    s = np.linspace(0.0, 1.0, 100_001)
    assert abs(theory.adaptive_gamma(s, 10 * np.sqrt(s)) - 24 / 25) < 5e-7


def test_run_examples_over_min_is_the_examples_less_e_min_without_cancelling() -> None:
    """E − E_min of a run, ∫B ds on run_integrals' points (a review, 2026-12-07): by brute force
    the trapezoid over every step of B²/(B + B_noise), with B and B_noise interpolated between
    sparse records; with E_min it makes up ∫B dt, rule for rule. Against B_simple 1e13 it is 8e-9
    where the examples less E_min (1,952.5 − 1,952.49999…) is round-off."""
    steps = np.array([3.0, 4.0, 10.0, 11.0, 30.0])
    batch = np.array([8.0, 9.0, 40.0, 41.0, 63.0])
    for noise_level in (1e13, 50.0):
        noise = noise_level * np.array([1.0, 2.0, 1.5, 3.0, 1.0])
        grid = np.arange(3.0, 31.0)
        b, n = np.interp(grid, steps, batch), np.interp(grid, steps, noise)
        f = b * b / (b + n)
        want = float(np.sum((f[1:] + f[:-1]) / 2))
        got = theory.run_examples_over_min(steps, batch, noise)
        assert got == pytest.approx(want, rel=1e-12)
        e_min = theory.run_integrals(steps, batch, noise).e_min
        assert e_min + got == pytest.approx(float(np.sum((b[1:] + b[:-1]) / 2)), rel=1e-12)
    assert got > 0 and theory.run_examples_over_min(steps, batch, 1e13 * noise) < 1e-8
