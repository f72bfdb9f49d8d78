"""The paper's model of large-batch training as closed-form functions (no torch, no plotting).

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training". The single-point functions
(eq. 2.6, 2.7, 2.11, A.3, C.2, D.6) accept floats or NumPy arrays and return the same shape; the
trajectory functions (App. D) take arrays sampled along a training run and integrate them with the
trapezoid rule, or the integrals :func:`run_integrals` takes per step from a recorded run.

Two parameterisations of a run appear here. The paper's App. D parameterises a run by ``s``, the
number of *full-batch* optimiser steps it would have taken (so S_min = ∫ds and E_min = ∫B_noise ds).
A real run is recorded per optimiser step at its own batch size B_t; :func:`full_batch_steps`
converts one into the other (a step at batch B_t is worth B_t/(B_t + B_noise) full-batch steps,
eq. D.1 read backwards).

Throughout, B_simple (eq. 2.9) may stand in for B_noise (eq. 2.8): the paper finds the two differ by
a small constant factor, and B_simple is what the tracker measures.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from noisescale.errors import NoiseScaleInputError

__all__ = [
    "KAPLAN_B_CRIT_EXPONENT",
    "KAPLAN_B_CRIT_SCALE",
    "LR_RULES",
    "REGIME_FACTOR",
    "Cost",
    "TrajectoryIntegrals",
    "adaptive_batch_cost",
    "adaptive_batch_size",
    "adaptive_gamma",
    "b_crit_kaplan",
    "b_noise_at_temperature",
    "examples_over_min",
    "exchange_rate_for_examples",
    "fixed_batch_cost",
    "full_batch_steps",
    "loss_improvement_over_max",
    "lr_central",
    "lr_over_max",
    "min_cost",
    "natural_exchange_rate",
    "pareto_steps_over_min",
    "regime",
    "run_examples_over_min",
    "run_integrals",
    "scaled_lr",
    "steps_over_min",
    "temperature",
]

#: The largest batch size, noise scale or example count any command or file read accepts. Far
#: beyond any training run (10¹⁵ examples), small enough that products of a few of them stay
#: finite.
MAX_COUNT = 1e15

#: A batch size counts as small when B < B_noise/REGIME_FACTOR and as large when
#: B > REGIME_FACTOR·B_noise. With 3, the boundaries are where one of the two costs is within 4/3 of
#: its minimum while the other is 4× its minimum: at B = B_noise/3, E/E_min = 4/3 and S/S_min = 4;
#: at B = 3·B_noise, S/S_min = 4/3 and E/E_min = 4 (eq. 2.11). In between, both are at most 4×.
REGIME_FACTOR = 3.0

#: Kaplan et al. 2020, B_crit(L) = 2.0·10⁸·L^−4.76 tokens, L the language-model loss in nats/token.
KAPLAN_B_CRIT_SCALE = 2.0e8
KAPLAN_B_CRIT_EXPONENT = -4.76

#: Learning-rate scaling rules understood by :func:`scaled_lr`.
LR_RULES = ("linear", "sqrt", "none", "noise")

Regime = Literal["small", "balanced", "large"]
LrRule = Literal["linear", "sqrt", "none", "noise"]


def lr_over_max(batch_size: ArrayLike, b_noise: ArrayLike) -> np.ndarray | float:
    """Optimal step size relative to the noiseless one, ε_opt(B)/ε_max = 1/(1 + B_noise/B).

    Paper eq. 2.6. ``batch_size`` must be positive and ``b_noise`` not negative; B_noise = ∞
    gives the limit 0.

    Raises:
        NoiseScaleInputError: a batch size ≤ 0, a negative noise scale, or NaN.
    """
    b = _checked("batch_size", batch_size)
    return _scalar(1.0 / (1.0 + _checked("b_noise", b_noise, zero=True) / b))


def loss_improvement_over_max(batch_size: ArrayLike, b_noise: ArrayLike) -> np.ndarray | float:
    """Optimal one-step loss improvement relative to the noiseless one, ΔL_opt(B)/ΔL_max.

    Paper eq. 2.7; it has the same form as eq. 2.6 (and the same checks).
    """
    return lr_over_max(batch_size, b_noise)


def steps_over_min(batch_size: ArrayLike, b_noise: ArrayLike) -> np.ndarray | float:
    """Optimisation steps relative to the minimum, S/S_min = 1 + B_noise/B (paper eq. 2.11).

    Raises:
        NoiseScaleInputError: a batch size ≤ 0, a negative noise scale, or NaN.
    """
    b = _checked("batch_size", batch_size)
    return _scalar(1.0 + _checked("b_noise", b_noise, zero=True) / b)


def examples_over_min(batch_size: ArrayLike, b_noise: ArrayLike) -> np.ndarray | float:
    """Training examples relative to the minimum, E/E_min = 1 + B/B_noise (paper eq. 2.11).

    Raises:
        NoiseScaleInputError: a batch size ≤ 0, a negative noise scale, or NaN.
    """
    b = _checked("batch_size", batch_size)
    return _scalar(1.0 + b / _checked("b_noise", b_noise, zero=True))


def regime(batch_size: float, b_noise: float, factor: float = REGIME_FACTOR) -> Regime:
    """Which side of the noise scale a batch size is on (paper §2.2, "Implications").

    Args:
        batch_size: B, in the same unit as ``b_noise`` (examples or tokens).
        b_noise: The noise scale B_noise (or B_simple).
        factor: Width of the balanced band; see :data:`REGIME_FACTOR` for why 3.

    Returns:
        ``"small"`` when B < B_noise/factor (more batch ≈ linear speed-up at little extra compute),
        ``"large"`` when B > factor·B_noise (more batch buys little time and wastes compute), else
        ``"balanced"``. The boundaries themselves count as balanced.
    """
    if not (batch_size > 0 and b_noise > 0 and factor >= 1):
        raise NoiseScaleInputError(
            f"regime needs batch_size > 0, b_noise > 0 and factor >= 1, got "
            f"{batch_size!r}, {b_noise!r}, {factor!r}"
        )
    if batch_size * factor < b_noise:
        return "small"
    if batch_size > factor * b_noise:
        return "large"
    return "balanced"


def lr_central(
    batch_size: ArrayLike, lr_star: float, b_star: float, alpha: float = 1.0
) -> np.ndarray | float:
    """Learning rate as a function of batch size, ε(B) = ε*/(1 + B*/B)^α (paper eq. A.3).

    Args:
        batch_size: B.
        lr_star: ε*, the learning rate approached as B → ∞.
        b_star: B*, the batch size where the learning rate stops growing (of order B_noise; with
            α = 1 and B* = B_noise this is eq. 2.6 scaled by ε_max).
        alpha: 1 for SGD or momentum; the paper finds 0.5 < α < 1 for Adam and RMSProp.

    Raises:
        NoiseScaleInputError: a batch size or ε* ≤ 0, a negative B*, α outside (0, 1], or NaN.
    """
    b = _checked("batch_size", batch_size)
    lr = float(_checked("lr_star", lr_star))
    return _scalar(lr / (1.0 + _checked("b_star", b_star, zero=True) / b) ** _alpha(alpha))


def scaled_lr(
    batch_size: float,
    new_batch_size: float,
    lr: float,
    rule: LrRule = "linear",
    *,
    b_noise: float | None = None,
    alpha: float = 1.0,
) -> float:
    """The learning rate to use when moving from ``batch_size`` to ``new_batch_size``.

    Rules, with k = new_batch_size / batch_size:

    - ``"linear"``: ε·k (Goyal et al. 2017; right for SGD well below B_noise).
    - ``"sqrt"``: ε·√k (keeps the gradient-noise level constant; often used with Adam).
    - ``"none"``: ε unchanged (some Adam/AdamW setups).
    - ``"noise"``: ε·[(1 + B_noise/B)/(1 + B_noise/B')]^α, the ratio of eq. A.3 at the two batch
      sizes with B* = B_noise; with α = 1 this is the ratio of ε_opt of eq. 2.6. It is linear far
      below B_noise and saturates far above it. Needs ``b_noise``.

    Args:
        batch_size: The batch size ``lr`` was tuned at.
        new_batch_size: The batch size to move to.
        lr: The learning rate tuned at ``batch_size``.
        rule: One of :data:`LR_RULES`.
        b_noise: The noise scale, for ``rule="noise"``.
        alpha: The exponent of eq. A.3 for ``rule="noise"`` (1 for SGD, 0.5–1 for Adam).

    Raises:
        NoiseScaleInputError: Unknown rule, non-positive sizes or learning rate, ``"noise"``
            without a positive ``b_noise`` (∞ gives the limit, ε·k^α) or with α outside (0, 1].
    """
    if not (batch_size > 0 and new_batch_size > 0):
        raise NoiseScaleInputError(
            f"batch sizes must be positive, got {batch_size!r} and {new_batch_size!r}"
        )
    if not (math.isfinite(lr) and lr > 0):
        raise NoiseScaleInputError(f"the learning rate must be positive and finite, got {lr!r}")
    k = new_batch_size / batch_size
    if rule == "linear":
        return lr * k
    if rule == "sqrt":
        return lr * math.sqrt(k)
    if rule == "none":
        return lr
    if rule == "noise":
        if b_noise is None or not b_noise > 0:
            raise NoiseScaleInputError(
                f"the 'noise' learning-rate rule needs a positive noise scale, got {b_noise!r}"
            )
        alpha = _alpha(alpha)
        if math.isinf(b_noise):
            return lr * k**alpha  # far below the noise scale: (B'/B)^α
        ratio = float(lr_over_max(new_batch_size, b_noise)) / float(
            lr_over_max(batch_size, b_noise)
        )
        return lr * ratio**alpha
    raise NoiseScaleInputError(f"unknown learning-rate rule {rule!r}; choose one of {LR_RULES}")


def temperature(lr: ArrayLike, batch_size: ArrayLike) -> np.ndarray | float:
    """The training temperature T = ε/B (paper eq. C.1, pure SGD in the small-batch regime).

    Raises:
        NoiseScaleInputError: a negative learning rate, a batch size ≤ 0, or NaN.
    """
    return _scalar(_checked("lr", lr, zero=True) / _checked("batch_size", batch_size))


def b_noise_at_temperature(
    b_noise: ArrayLike, temperature: ArrayLike, new_temperature: ArrayLike
) -> np.ndarray | float:
    """A noise scale measured at one temperature, re-expressed at another (paper eq. C.2).

    In equilibrium B_noise ∝ B_simple ∝ 1/T, so B_noise(T') = B_noise(T)·T/T'. Lowering the learning
    rate tenfold at a fixed batch size therefore raises the noise scale tenfold.

    Raises:
        NoiseScaleInputError: a negative noise scale, a temperature that is not positive and
            finite, or NaN; a temperature below the smallest normal double (unless both are
            equal); a positive, finite noise scale whose value at ``new_temperature`` is below
            the smallest normal double or beyond the largest.
    """
    b = _checked("b_noise", b_noise, zero=True)
    t0 = _checked("temperature", temperature, finite=True)
    t1 = _checked("new_temperature", new_temperature, finite=True)
    if np.any(((t0 < np.finfo(float).tiny) | (t1 < np.finfo(float).tiny)) & (t0 != t1)):
        # as a subnormal B_noise is (until 2026-12-07 T = 1e-320 gave B·T/T' 1.1e-5 off, a
        # review); equal temperatures keep B_noise exactly, however small
        raise NoiseScaleInputError(
            f"a temperature ({temperature!r} or {new_temperature!r}) is below the smallest "
            "normal double (2.2e-308), where its digits are lost, and so is the ratio T/T': "
            "give temperatures of at least 2.2e-308 (only their ratio matters: scale both)"
        )
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        # B·(T/T') first, so equal temperatures give B whatever their size (B·T underflowed for
        # 1e-10·1e-320 until 2026-12-07, a review), else B·T/T' (a ratio beyond the doubles)
        out = b * (t0 / t1)
        out = np.where(_representable(b, out), out, b * t0 / t1)
        # B = 0 or ∞ is its own limit at any temperature (∞·0 gave NaN for T/T' beyond the
        # doubles until 2026-12-07, a review)
        out = np.where((b == 0) | np.isinf(b), b, out)
    bad = ~_representable(b, out)
    if np.any(bad & (b < np.finfo(float).tiny)):
        raise NoiseScaleInputError(
            f"the noise scale B_noise = {b_noise!r} is itself below the smallest normal double "
            "(2.2e-308), where its digits are lost, and so is its value at the new temperature: "
            "give a noise scale of at least 2.2e-308 examples (or 0)"
        )
    if np.any(bad):
        raise NoiseScaleInputError(
            "the numbers underflow or overflow: the noise scale at the new temperature, "
            f"B_noise·T/T' = {b_noise!r}·{temperature!r}/{new_temperature!r}, is beyond the "
            "doubles (below 2.2e-308 or above 1.8e308); use temperatures closer together"
        )
    return _scalar(out)


def _representable(b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Where ``x``, computed from the noise scale ``b``, is a normal double (neither under- nor
    overflowed), or ``b``'s own 0 or ∞."""
    return (b == 0) | np.isinf(b) | ((x >= np.finfo(float).tiny) & np.isfinite(x))


def adaptive_batch_size(b_simple: ArrayLike, r: float) -> np.ndarray | float:
    """The adaptive batch size B = √(r·B_simple) for exchange rate r (paper eq. D.3, D.6).

    Raises:
        NoiseScaleInputError: a negative B_simple, r not positive and finite, or NaN.
    """
    r = float(_checked("r", r, finite=True))
    return _scalar(np.sqrt(r * _checked("b_simple", b_simple, zero=True)))


def pareto_steps_over_min(examples_over_min: ArrayLike, gamma: float = 1.0) -> np.ndarray | float:
    """The Pareto front S/S_min = 1 + γ/(E/E_min − 1) (paper eq. 2.11 with γ = 1, eq. D.4).

    Args:
        examples_over_min: E/E_min, which must exceed 1.
        gamma: γ of eq. D.5: 1 for a fixed batch size (or a constant noise scale), less than 1 for
            an adaptive batch size along a trajectory whose noise scale varies.

    Raises:
        NoiseScaleInputError: E/E_min ≤ 1 (no run uses fewer than E_min examples), γ not
            positive and finite, or NaN.
    """
    e = np.asarray(examples_over_min, dtype=float)
    if not np.all(e > 1.0):
        raise NoiseScaleInputError(
            f"examples_over_min (E/E_min) must be in (1, ∞], got {examples_over_min!r}"
        )
    return _scalar(1.0 + float(_checked("gamma", gamma, finite=True)) / (e - 1.0))


def b_crit_kaplan(loss: ArrayLike) -> np.ndarray | float:
    """Kaplan et al.'s critical batch size of language models, B_crit(L) = 2.0·10⁸·L^−4.76 tokens.

    Args:
        loss: Language-model cross-entropy in nats per token (must be positive).

    Returns:
        The critical batch size in **tokens**.
    """
    loss_array = np.asarray(loss, dtype=float)
    if not np.all(loss_array > 0):
        raise NoiseScaleInputError(f"Kaplan's law needs a positive loss (nats/token), got {loss!r}")
    return _scalar(KAPLAN_B_CRIT_SCALE * loss_array**KAPLAN_B_CRIT_EXPONENT)


class Cost(NamedTuple):
    """Steps and examples a training run takes (paper eq. D.1)."""

    steps: np.ndarray | float
    examples: np.ndarray | float


class TrajectoryIntegrals(NamedTuple):
    """S_min = ∫ds, E_min = ∫B_noise ds and ∫√B_noise ds along a trajectory (paper App. D): every
    cost, γ and exchange rate of the trajectory functions below is built from these three."""

    s_min: float
    e_min: float
    root: float


#: :func:`run_integrals` evaluates eq. D.1 at every step of a run up to this many steps, and on
#: this many evenly spaced points (plus the records) beyond.
MAX_INTEGRAND_POINTS = 2**20


def full_batch_steps(steps: ArrayLike, batch_size: ArrayLike, b_noise: ArrayLike) -> np.ndarray:
    """Full-batch-equivalent steps s reached at each recorded step of a run (eq. D.1 inverted).

    A step at batch size B makes the progress of B/(B + B_noise) full-batch steps (δS = (1 +
    B_noise/B)·δs), so s is the integral of that fraction over the run's steps (trapezoid rule,
    which also bridges gaps where steps were skipped or not recorded).

    For the costs of a recorded run use :func:`run_integrals`, not this s with the trapezoid
    rule in s: where B_noise changes between records, the trapezoid in s multiplies an average
    of B/(B + B_noise) by an average of B_noise, which moves the other way, and overestimates
    E_min (B_simple alternating 10 and 120 at B = 32 read E_min 1.9× its value).

    Args:
        steps: The run's step numbers, strictly increasing.
        batch_size: B at each of those steps.
        b_noise: B_noise (or B_simple) at each of those steps, not negative.

    Returns:
        s at each step, starting from 0 at the first one.
    """
    t, b, noise = _run_arrays(steps, batch_size, b_noise)
    fraction = b / (b + noise)
    return np.concatenate([[0.0], np.cumsum(np.diff(t) * (fraction[1:] + fraction[:-1]) / 2.0)])


def run_integrals(
    steps: ArrayLike, batch_size: ArrayLike, b_noise: ArrayLike, idle: ArrayLike | None = None
) -> TrajectoryIntegrals:
    """S_min, E_min and ∫√B_noise ds of a recorded run, eq. D.1 step by step.

    A step at batch size B makes ds = B/(B + B_noise) full-batch steps, so over the run S_min =
    ∫B/(B + B_noise) dt, E_min = ∫B_noise·B/(B + B_noise) dt and ∫√B_noise ds = ∫√B_noise·B/(B +
    B_noise) dt, each integrand evaluated at every step (trapezoid rule over the steps). Between
    sparse records B_noise and B are interpolated linearly and the integrands evaluated at every
    step in between (on :data:`MAX_INTEGRAND_POINTS` points for longer runs). Since B_noise·B/(B +
    B_noise) < B, E_min stays below the examples ∫B dt, and a fixed B = the run's own predicts
    S_min + E_min/B = the steps it took, exactly.

    Args:
        steps: The run's step numbers, strictly increasing.
        batch_size: B at each of those steps, positive.
        b_noise: B_noise (or B_simple) at each of those steps, not negative.
        idle: Per step of ``steps``, whether the optimizer made no step there (a step skipped
            for non-finite gradients): its examples are spent but it makes no progress, ds = 0
            (eq. D.1 integrates over optimizer steps). Until 2026-12-08 such a step counted as
            progress in the report (:func:`_idle_share`).
    """
    grid, _, noise, ds = _run_grid(steps, batch_size, b_noise)
    share = _idle_share(grid, steps, idle)
    return TrajectoryIntegrals(
        _trapezoid(ds, grid) - float(np.sum(share * ds)),
        _trapezoid(noise * ds, grid) - float(np.sum(share * noise * ds)),
        _trapezoid(np.sqrt(noise) * ds, grid) - float(np.sum(share * np.sqrt(noise) * ds)),
    )


def _idle_share(grid: np.ndarray, steps: ArrayLike, idle: ArrayLike | None) -> np.ndarray:
    """Per point of ``grid``, the weight the trapezoid over the steps gives an idle step there
    and that its integrals must lose: 1 (one step, weight 1 inside the run; on a grid thinned
    to MAX_INTEGRAND_POINTS its own step out of the trapezoid's wider weight), ½ at either end,
    where the trapezoid counts half a step; 0 elsewhere."""
    share = np.zeros(grid.shape)
    if idle is None:
        return share
    flags = np.asarray(idle, dtype=bool)
    at = np.searchsorted(grid, np.asarray(steps, dtype=float)[flags])
    h = np.diff(grid)
    weight = np.concatenate([[0.0], h / 2]) + np.concatenate([h / 2, [0.0]])
    cap = np.ones(grid.shape)
    cap[[0, -1]] = 0.5
    share[at] = np.minimum(weight, cap)[at]
    return share


def run_examples_over_min(
    steps: ArrayLike, batch_size: ArrayLike, b_noise: ArrayLike, idle: ArrayLike | None = None
) -> float:
    """E − E_min of a recorded run, ∫B ds on :func:`run_integrals`' grid and rule.

    At every point B = B·ds/dt + B_noise·ds/dt, so the examples ∫B dt are E_min plus this
    integral exactly, rule for rule. Taking E − E_min as the run's counted examples less E_min
    instead loses it twice: to round-off where B ≪ B_noise (E − E_min ≈ ∫B²/B_noise dt is then
    far below E), and to the trapezoid's ends, which count (B_last − B_first)/2 fewer examples
    than the steps did (a batch growing 8 → 63 against B_simple 1e13: 27.5 examples for 8.5e-9,
    and the adaptive schedule at the run's examples needed 1.4e-8 steps for 45.8; a review,
    2026-12-07).
    """
    grid, b, _, ds = _run_grid(steps, batch_size, b_noise)
    share = _idle_share(grid, steps, idle)
    return _trapezoid(b * ds, grid) - float(np.sum(share * b * ds))


def _run_grid(
    steps: ArrayLike, batch_size: ArrayLike, b_noise: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The points :func:`run_integrals` integrates on: every step (or MAX_INTEGRAND_POINTS), B and
    B_noise interpolated linearly between records, and ds/dt = B/(B + B_noise) there."""
    t, b, noise = _run_arrays(steps, batch_size, b_noise)
    points = int(min(math.floor(t[-1] - t[0]), MAX_INTEGRAND_POINTS)) + 1
    grid = np.union1d(t, np.linspace(t[0], t[-1], max(points, 2)))
    b, noise = np.interp(grid, t, b), np.interp(grid, t, noise)
    return grid, b, noise, b / (b + noise)


def min_cost(s: ArrayLike | TrajectoryIntegrals, b_noise: ArrayLike | None = None) -> Cost:
    """S_min = ∫ds and E_min = ∫B_noise ds along a trajectory (paper App. D, below eq. D.4).

    Here and below, ``s`` and ``b_noise`` are a trajectory B_noise(s), or ``s`` is the
    :class:`TrajectoryIntegrals` of :func:`run_integrals` and ``b_noise`` is left out.
    """
    integrals = _integrals(s, b_noise)
    return Cost(integrals.s_min, integrals.e_min)


def fixed_batch_cost(
    s: ArrayLike | TrajectoryIntegrals, b_noise: ArrayLike | None, batch_size: ArrayLike
) -> Cost:
    """Steps and examples a fixed batch size B needs along a trajectory (paper eq. D.1).

    S = ∫(1 + B_noise(s)/B) ds = S_min + E_min/B and E = B·S. Along any trajectory these satisfy
    eq. 2.11 exactly, with B_crit = E_min/S_min.

    Args:
        s: Full-batch steps (see :func:`full_batch_steps`), strictly increasing, or the
            :class:`TrajectoryIntegrals` of a run (then ``b_noise`` is ``None``).
        b_noise: The noise scale at each s.
        batch_size: One batch size or an array of candidates.

    Returns:
        ``Cost(steps, examples)``, each with the shape of ``batch_size``.
    """
    s_min, e_min = min_cost(s, b_noise)
    # refused as steps_over_min refuses it (until 2026-12-07 B = -64 cost -64.8 steps, a fuzzer)
    b = _checked("batch_size", batch_size)
    steps = s_min + e_min / b
    return Cost(_scalar(steps), _scalar(b * steps))


def adaptive_batch_cost(
    s: ArrayLike | TrajectoryIntegrals, b_noise: ArrayLike | None, r: float
) -> Cost:
    """Steps and examples of the adaptive schedule B(s) = √(r·B_noise(s)) (paper eq. D.1, D.3).

    S = ∫(1 + √(B_noise/r)) ds and E = ∫(√(r·B_noise) + B_noise) ds; these satisfy eq. D.4 with
    the γ of :func:`adaptive_gamma` for every r.
    """
    integrals = _integrals(s, b_noise)
    if not r > 0:
        raise NoiseScaleInputError(f"the exchange rate r must be positive, got {r!r}")
    root = integrals.root
    return Cost(integrals.s_min + root / math.sqrt(r), integrals.e_min + math.sqrt(r) * root)


def adaptive_gamma(s: ArrayLike | TrajectoryIntegrals, b_noise: ArrayLike | None = None) -> float:
    """γ = (∫√B_noise ds)² / (S_min·E_min), the benefit of an adaptive batch size (paper eq. D.5).

    γ = 1 for a constant noise scale (no benefit) and falls towards 0 the more √B_noise varies;
    for B_noise(s) ∝ √s it is 24/25 (eq. D.7).

    Args:
        s: Full-batch steps, strictly increasing (at least two points), or the
            :class:`TrajectoryIntegrals` of a run.
        b_noise: The noise scale at each s, not negative (and not zero throughout).
    """
    return _root_ratio(_with_noise(_integrals(s, b_noise))) ** 2


def natural_exchange_rate(
    s: ArrayLike | TrajectoryIntegrals, b_noise: ArrayLike | None = None
) -> float:
    """r = E_min/S_min, where time and compute are both 1 + √γ of their minima (paper fn. 17)."""
    integrals = _with_noise(_integrals(s, b_noise))
    return integrals.e_min / integrals.s_min


def exchange_rate_for_examples(
    s: ArrayLike | TrajectoryIntegrals, b_noise: ArrayLike | None, examples: float
) -> float:
    """The r whose adaptive schedule processes ``examples`` examples (inverts eq. D.1's E).

    Used to compare an adaptive schedule with a fixed batch size at equal compute. ``examples``
    must exceed E_min, which no schedule can go below.
    """
    integrals = _with_noise(_integrals(s, b_noise))
    if not examples > integrals.e_min:
        raise NoiseScaleInputError(
            f"no schedule reaches the goal with {examples!r} examples; E_min is "
            f"{integrals.e_min:.6g}"
        )
    q = (examples - integrals.e_min) / integrals.root
    if not q * q < math.inf:  # (an OverflowError of ** until 2026-12-07, a review)
        raise NoiseScaleInputError(
            f"the exchange rate for {examples:g} examples overflows (E_min = "
            f"{integrals.e_min:g}, ∫√B_noise ds = {integrals.root:g}); give fewer examples"
        )
    return q * q


def _trajectory_arrays(*arrays: ArrayLike) -> tuple[np.ndarray, ...]:
    """Validate arrays sampled along a run: 1-D, equal length ≥ 2, finite, increasing abscissa."""
    out = tuple(np.asarray(a, dtype=float) for a in arrays)
    first = out[0]
    if first.ndim != 1 or first.size < 2:
        raise NoiseScaleInputError("a trajectory needs at least two points")
    if any(a.shape != first.shape for a in out):
        raise NoiseScaleInputError("trajectory arrays must have the same length")
    if not all(np.all(np.isfinite(a)) for a in out):
        raise NoiseScaleInputError("trajectory arrays must be finite")
    if not np.all(np.diff(first) > 0):
        raise NoiseScaleInputError("steps along a trajectory must be strictly increasing")
    if not np.all(out[-1] >= 0):
        raise NoiseScaleInputError("the noise scale along a trajectory must not be negative")
    return out


def _run_arrays(
    steps: ArrayLike, batch_size: ArrayLike, b_noise: ArrayLike
) -> tuple[np.ndarray, ...]:
    """A recorded run's steps, batch sizes and noise scales (:func:`_trajectory_arrays`), its
    batch sizes positive."""
    t, b, noise = _trajectory_arrays(steps, batch_size, b_noise)
    if not np.all(b > 0):
        raise NoiseScaleInputError("batch sizes along a run must be positive")
    return t, b, noise


def _integrals(
    s: ArrayLike | TrajectoryIntegrals, b_noise: ArrayLike | None
) -> TrajectoryIntegrals:
    """The integrals of a trajectory B_noise(s) (trapezoid rule in s), or ``s`` if it holds them."""
    if isinstance(s, TrajectoryIntegrals):
        if b_noise is not None:
            raise NoiseScaleInputError(
                "give either a trajectory (s, b_noise) or its TrajectoryIntegrals, not both"
            )
        # one built by hand is checked as run_integrals' own are made (until 2026-12-07
        # min_cost priced S_min = NaN and adaptive_gamma blamed E_min = -1 on no noise, a fuzzer)
        for name, zero in (("s_min", False), ("e_min", True), ("root", True)):
            _checked(f"TrajectoryIntegrals.{name}", getattr(s, name), zero=zero, finite=True)
        # and together: until 2026-12-07 γ = 100 for (1, 1, 10), a review
        if (s.e_min > 0) != (s.root > 0) or (s.e_min > 0 and _root_ratio(s) > 1 + 1e-9):
            raise NoiseScaleInputError(
                f"{s} are no trajectory's integrals: (∫√B_noise ds)² ≤ S_min·E_min "
                "(Cauchy–Schwarz) and ∫√B_noise ds > 0 exactly when E_min > 0; build them "
                "with run_integrals"
            )
        return s
    if b_noise is None:
        raise NoiseScaleInputError("a trajectory s needs its b_noise")
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below
        s_arr, noise = _trajectory_arrays(s, b_noise)
        integrals = TrajectoryIntegrals(
            float(s_arr[-1] - s_arr[0]),
            _trapezoid(noise, s_arr),
            _trapezoid(np.sqrt(noise), s_arr),
        )
    if not all(math.isfinite(v) for v in integrals):
        # until 2026-12-07 min_cost gave (inf, inf) and adaptive_gamma an OverflowError, a review
        raise NoiseScaleInputError(
            f"the trajectory's integrals overflow (S_min = {integrals.s_min:g}, E_min = "
            f"{integrals.e_min:g}, ∫√B_noise ds = {integrals.root:g}): rescale s or the noise "
            "scale"
        )
    return integrals


def _root_ratio(integrals: TrajectoryIntegrals) -> float:
    """√γ = ∫√B_noise ds / √(S_min·E_min), ≤ 1 by Cauchy–Schwarz, without overflowing (γ =
    root²/(S_min·E_min) was an OverflowError for (1e200, 1e200, 1e200) until 2026-12-07)."""
    return integrals.root / math.sqrt(integrals.s_min) / math.sqrt(integrals.e_min)


def _with_noise(integrals: TrajectoryIntegrals) -> TrajectoryIntegrals:
    """``integrals``, refusing a trajectory without noise, where γ and r are undefined."""
    if not integrals.e_min > 0:
        raise NoiseScaleInputError("the noise scale is zero all along the trajectory")
    return integrals


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    # np.trapezoid needs NumPy ≥ 2; this is the same rule and works on the 1.x we support.
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def _checked(
    name: str, value: ArrayLike, *, zero: bool = False, finite: bool = False
) -> np.ndarray:
    """``value`` as an array, refusing NaN and values below 0 (or at 0, unless ``zero``) and,
    with ``finite``, ∞; the single-point functions take ∞ as their limit otherwise. (Negative
    noise scales were accepted until 2026-12-06: lr_over_max(64, -100) was −1.78, a hunt.)"""
    a = np.asarray(value, dtype=float)
    ok = (a >= 0.0 if zero else a > 0.0) & (np.isfinite(a) if finite else True)
    if not np.all(ok):
        low, high = "[0" if zero else "(0", "∞)" if finite else "∞]"
        raise NoiseScaleInputError(f"{name} must be in {low}, {high}, got {value!r}")
    return a


def _alpha(alpha: float) -> float:
    """α of eq. A.3, refused outside (0, 1] as :func:`noisescale.schedule.lr_factor` does."""
    if not 0.0 < alpha <= 1.0:
        raise NoiseScaleInputError(f"alpha must be in (0, 1], got {alpha!r}")
    return float(alpha)


def _scalar(x: np.ndarray) -> np.ndarray | float:
    return float(x) if np.ndim(x) == 0 else x
