"""Unbiased estimators of |G|², tr(Σ) and the simple noise scale B_simple (paper App. A.1).

Pure math on floats and NumPy arrays: no torch, no plotting. Everything here is written in the
style of optax — an explicit, immutable state (:class:`NoiseScaleState`) with pure ``init`` /
``update`` functions — so that the stateful tracker is a thin shell around it and every number can
be checked against closed-form truth.

The two facts everything rests on (paper eq. A.1, A.2): for a gradient averaged over B independent
examples, E|G_B|² = |G|² + tr(Σ)/B. Measuring |G_B|² at two batch sizes b_small < b_big gives
unbiased per-step estimates

    g2          = (b_big·|G_big|² − b_small·|G_small|²) / (b_big − b_small)
    trace_sigma = (|G_small|² − |G_big|²) / (1/b_small − 1/b_big)

and B_simple = tr(Σ)/|G|² (eq. 2.9) is estimated as the ratio of (bias-corrected, exponentially
weighted) *averages* of the two — never as an average of per-step ratios, which is biased (the
paper's footnote 12), and never clamped before averaging (single-step g2 is often negative).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from noisescale.errors import NoiseScaleInputError

__all__ = [
    "CombinerState",
    "NoiseEstimate",
    "NoiseScaleState",
    "b_simple_interval",
    "combine_weights",
    "combiner_weights",
    "estimate_from_norms",
    "finite_population",
    "init_combiner",
    "init_state",
    "microbatch_norm_estimates",
    "per_example_norm_estimates",
    "unbiased_g2_trace",
    "update_combiner",
    "update_state",
]


def unbiased_g2_trace(
    b_small: ArrayLike, sqnorm_small: ArrayLike, b_big: ArrayLike, sqnorm_big: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased single-step estimates of |G|² and tr(Σ) from two batch sizes (paper eq. A.2).

    Args:
        b_small: Examples in the small batch (1 for a per-example norm).
        sqnorm_small: |G_small|², the squared norm of the small batch's *mean* gradient (for several
            small batches of the same size, the mean of their squared norms).
        b_big: Examples in the big batch; must exceed ``b_small``.
        sqnorm_big: |G_big|², the squared norm of the big batch's mean gradient.

    Returns:
        ``(g2, trace_sigma)`` with E[g2] = |G|² and E[trace_sigma] = tr(Σ). Either may be negative
        for a single step; average them before forming a ratio.

    Raises:
        ValueError: if a batch size is not positive or ``b_big <= b_small``.
    """
    bs = np.asarray(b_small, dtype=float)
    bb = np.asarray(b_big, dtype=float)
    ns = np.asarray(sqnorm_small, dtype=float)
    nb = np.asarray(sqnorm_big, dtype=float)
    if np.any(bs <= 0) or np.any(bb <= 0):
        raise ValueError(f"batch sizes must be positive, got b_small={b_small}, b_big={b_big}")
    if np.any(bb <= bs):
        raise ValueError(
            f"b_big must exceed b_small (got b_small={b_small}, b_big={b_big}): with one batch "
            "size the noise cannot be separated from the signal; measure per-example norms, "
            "use several micro-batches, or more than one example per step"
        )
    g2 = (bb * nb - bs * ns) / (bb - bs)
    trace_sigma = (ns - nb) / (1.0 / bs - 1.0 / bb)
    return g2, trace_sigma


def g2_trace_from_sums(
    b_big: float,
    sqnorm_big: ArrayLike,
    count: float,
    inv_size_sum: float,
    sqnorm_sum: ArrayLike,
) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased |G|² and tr(Σ) from the big batch and small batches of possibly different sizes,
    given only sums over the small batches (paper eq. A.2, generalised).

    With W small batches of sizes b_r and squared norms S_r of their mean gradients (E S_r =
    |G|² + tr Σ/b_r) and the big batch's S_B (E S_B = |G|² + tr Σ/B), the combinations

        g2 = (B·H·S_B − Σ S_r) / (B·H − W)
        tr = B·W·(Σ S_r/W − S_B) / (B·H − W),     H = Σ 1/b_r,

    are unbiased whatever the sizes, and equal eq. A.2 averaged over the small batches when the
    sizes are equal. They need only W, H and Σ S_r, which add up across processes: a
    data-parallel step reduces a few numbers per source however many processes there are.

    Args:
        b_big: Examples in the big batch, B.
        sqnorm_big: S_B (a scalar, or an array for per-group norms).
        count: W, the number of small batches.
        inv_size_sum: H = Σ 1/b_r.
        sqnorm_sum: Σ S_r (matching ``sqnorm_big``'s shape).

    Raises:
        ValueError: if there is no small batch or they are not smaller than the big batch on
            average (B·H ≤ W).
    """
    bh = float(b_big) * float(inv_size_sum)
    if count <= 0 or not bh > count:
        size = count / inv_size_sum if inv_size_sum else 0.0
        raise ValueError(
            f"small batches (count {count}, mean size {size:g}) must be smaller than the big "
            f"batch ({b_big:g}) to separate noise from signal"
        )
    big = np.asarray(sqnorm_big, dtype=float)
    small = np.asarray(sqnorm_sum, dtype=float)
    denom = bh - count
    g2 = (bh * big - small) / denom
    trace = float(b_big) * (small - count * big) / denom
    return g2, trace


def finite_population(
    g2: ArrayLike, trace_sigma: ArrayLike, dataset_size: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """One step's (g2, trace_sigma) corrected for batches drawn without replacement from a data
    set of N = ``dataset_size`` examples (unchanged for ``None``).

    With the N examples' mean gradient G and s² the trace of their (N − 1)-normalised covariance,
    a batch of b distinct examples has E|G_b|² = |G|² + s²(1/b − 1/N): every pair i ≠ j has
    E g_i·g_j = |G|² − s²/N. Eq. A.2 on such batches therefore gives tr Σ unbiased for s² and
    |G|² unbiased for |G|² − s²/N, and B_simple reads ≈ 1/(1 − B_simple/N) high. Returned:
    g2 + trace_sigma/N (unbiased for |G|²) and trace_sigma·(N − 1)/N (the noise of i.i.d. draws
    from the data set, the paper's Σ: the N-normalised covariance, what sampling with replacement
    from the data set has). Linear, so sources, groups and averages compose. The same holds for
    any quadratic form: (GᵀHG, tr HΣ) of :func:`noisescale.hessian.measure_b_noise` likewise.
    """
    g = np.asarray(g2, dtype=float)
    t = np.asarray(trace_sigma, dtype=float)
    if dataset_size is None:
        return g, t
    n = float(dataset_size)
    return g + t / n, t * (n - 1.0) / n


def check_dataset_size(dataset_size: Any) -> int | None:
    """``dataset_size`` as given to a tracker: ``None`` or an integer ≥ 2, else refused."""
    if dataset_size is None:
        return None
    if isinstance(dataset_size, bool) or not (
        isinstance(dataset_size, (int, np.integer)) and dataset_size >= 2
    ):
        raise NoiseScaleInputError(
            "dataset_size must be None or the number of examples of the data set the batches are "
            "drawn from without replacement (an integer ≥ 2, counted as batch sizes are), got "
            f"{dataset_size!r}"
        )
    return int(dataset_size)


def check_resumed_dataset_size(saved: int | None, current: int | None) -> None:
    """Refuse to resume averages whose steps were corrected for ``dataset_size=saved`` (``None``:
    not corrected) into a tracker built with ``current``: each step's |G|² and tr Σ are
    corrected (:func:`finite_population`) before averaging, and mixed with steps corrected
    otherwise they would be neither."""
    if saved != current:
        raise NoiseScaleInputError(
            f"the saved averages were taken with dataset_size={saved} but this tracker was built "
            f"with dataset_size={current}: each step's |G|² and tr Σ were corrected (or not) for "
            "draws without replacement from that many examples before averaging, and mixed "
            "with steps corrected otherwise they would be neither. Construct the tracker with "
            f"dataset_size={saved} to resume them, or start a new estimate (no load_state_dict)"
        )


def per_example_norm_estimates(
    sqnorms: ArrayLike, sqnorm_big: float, b_big: float | None = None
) -> tuple[float, float]:
    """One step's (g2, trace_sigma) from per-example squared norms |g_i|² and the batch's |G_big|².

    This is eq. A.2 with b_small = 1 and |G_small|² = mean_i |g_i|²; with ``b_big = n`` it is the
    Bessel-corrected sample variance (paper footnote 11). The per-example norms may be those of a
    random subset of the batch: their mean is still an unbiased estimate of E|g_i|².

    Args:
        sqnorms: |∇ℓ_i|² of each example's own loss ℓ_i.
        sqnorm_big: |G_big|² of the mean gradient over the whole batch.
        b_big: Examples in the big batch; defaults to ``len(sqnorms)``.
    """
    s = np.asarray(sqnorms, dtype=float).ravel()
    n = float(s.size if b_big is None else b_big)
    g2, tr = unbiased_g2_trace(1.0, float(s.mean()), n, sqnorm_big)
    return float(g2), float(tr)


def microbatch_norm_estimates(
    b_micro: ArrayLike, sqnorms_micro: ArrayLike, sqnorm_big: float, b_big: float | None = None
) -> tuple[float, float]:
    """One step's (g2, trace_sigma) from k micro-batch norms and the norm of their average.

    Each micro-batch j of b_j examples is paired with the big batch through eq. A.2 and the k
    unbiased pairs are averaged, which for equal micro-batches equals eq. A.2 with
    |G_small|² = mean_j |G_j|².

    Args:
        b_micro: Examples in each micro-batch (a scalar for equal micro-batches).
        sqnorms_micro: |G_j|² of each micro-batch's mean gradient.
        sqnorm_big: |G_big|² of the mean gradient over all micro-batches.
        b_big: Examples in the big batch; defaults to the sum of the micro-batch sizes.
    """
    norms = np.asarray(sqnorms_micro, dtype=float).ravel()
    sizes = np.broadcast_to(np.asarray(b_micro, dtype=float), norms.shape)
    total = float(sizes.sum() if b_big is None else b_big)
    g2, tr = unbiased_g2_trace(sizes, norms, total, sqnorm_big)
    return float(np.mean(g2)), float(np.mean(tr))


class NoiseScaleState(NamedTuple):
    """Exponentially weighted sums over steps of the unbiased per-step |G|² and tr(Σ).

    With decay β and step weights β^(T−t), the state holds the sums needed for the bias-corrected
    EMAs (``w1``, ``g2_sum``, ``trace_sum``) and, with the squared weights, the sums the interval
    needs (``w2``, ``w3``, ``g2_sq``, ``cross``, ``trace_sq``, ``g2_w2``, ``trace_w2``). β = 1
    gives plain sums over all steps. ``count`` is the number of steps folded in. The third
    moments under the squared weights (``w4``, ``g2_cube``, ``g2_sq_trace``, ``g2_trace_sq``,
    ``trace_cube``) correct the interval for the skewness of the per-step estimates; they are
    ``nan`` in a state saved before they were kept (its interval is then uncorrected).
    """

    beta: float
    count: int
    w1: float
    w2: float
    w3: float
    g2_sum: float
    trace_sum: float
    g2_w2: float
    trace_w2: float
    g2_sq: float
    cross: float
    trace_sq: float
    w4: float = math.nan
    g2_cube: float = math.nan
    g2_sq_trace: float = math.nan
    g2_trace_sq: float = math.nan
    trace_cube: float = math.nan


def load_state(saved: dict[str, float | None]) -> NoiseScaleState:
    """A state from its ``_asdict()`` as a checkpoint keeps it (non-finite sums written as
    ``None``; the third moments absent from a checkpoint older than them)."""
    return NoiseScaleState(**{k: math.nan if v is None else v for k, v in saved.items()})


def init_state(beta: float = 0.99) -> NoiseScaleState:
    """An empty state; ``beta`` is the EMA decay (the paper tunes it so estimates are stable).

    The effective number of steps averaged is about (1 + β)/(1 − β) for long runs.
    """
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    return NoiseScaleState(float(beta), 0, *([0.0] * 15))


def update_state(state: NoiseScaleState, g2: ArrayLike, trace_sigma: ArrayLike) -> NoiseScaleState:
    """Fold one step, or a run of consecutive steps (1-D arrays, oldest first), into the state.

    Non-finite entries (steps whose gradients overflowed) are skipped.
    """
    g = np.atleast_1d(np.asarray(g2, dtype=float))
    s = np.atleast_1d(np.asarray(trace_sigma, dtype=float))
    if g.shape != s.shape or g.ndim != 1:
        raise ValueError(
            f"g2 and trace_sigma must be matching 1-D arrays, got {g.shape}, {s.shape}"
        )
    keep = np.isfinite(g) & np.isfinite(s)
    g, s = g[keep], s[keep]
    n = g.size
    if n == 0:
        return state
    b = state.beta
    age = np.arange(n - 1, -1, -1, dtype=float)  # the newest step has age 0
    p1, p2, p3, p4 = b**age, b ** (2 * age), b ** (3 * age), b ** (4 * age)
    d1, d2, d3, d4 = b**n, b ** (2 * n), b ** (3 * n), b ** (4 * n)
    return NoiseScaleState(
        beta=b,
        count=state.count + n,
        w1=state.w1 * d1 + p1.sum(),
        w2=state.w2 * d2 + p2.sum(),
        w3=state.w3 * d3 + p3.sum(),
        g2_sum=state.g2_sum * d1 + p1 @ g,
        trace_sum=state.trace_sum * d1 + p1 @ s,
        g2_w2=state.g2_w2 * d2 + p2 @ g,
        trace_w2=state.trace_w2 * d2 + p2 @ s,
        g2_sq=state.g2_sq * d2 + p2 @ (g * g),
        cross=state.cross * d2 + p2 @ (g * s),
        trace_sq=state.trace_sq * d2 + p2 @ (s * s),
        w4=state.w4 * d4 + p4.sum(),
        g2_cube=state.g2_cube * d2 + p2 @ (g * g * g),
        g2_sq_trace=state.g2_sq_trace * d2 + p2 @ (g * g * s),
        g2_trace_sq=state.g2_trace_sq * d2 + p2 @ (g * s * s),
        trace_cube=state.trace_cube * d2 + p2 @ (s * s * s),
    )


@dataclass(frozen=True)
class NoiseEstimate:
    """An estimate of the simple noise scale with its uncertainty.

    Attributes:
        g2: Estimate of |G|² (the squared norm of the true gradient).
        trace_sigma: Estimate of tr(Σ) (the summed per-example gradient variance).
        b_simple: tr(Σ)/|G|² (eq. 2.9), in examples; ``nan`` while |G|² ≤ 0.
        low: Lower end of the confidence interval for B_simple (``nan`` if not available).
        high: Upper end; ``inf`` when the data cannot yet bound it from above (|G|² is not
            distinguishable from zero), ``nan`` if not available.
        confidence: Nominal coverage of ``[low, high]``.
        steps: Number of steps the estimate uses.
        effective_steps: Kish effective number of steps under the EMA weights.
        reason: Why B_simple is not available (empty when it is).
        unit: What B_simple and tr Σ count: ``"examples"`` (the loss averages examples —
            sequences, for a language model), or ``"tokens"`` (the loss averages tokens, e.g.
            Hugging Face's causal-LM loss; :mod:`noisescale.tokens`).
        tokens_per_example: The run's mean tokens per example where they were counted, for
            :meth:`to`; ``nan`` otherwise.
    """

    g2: float
    trace_sigma: float
    b_simple: float
    low: float = math.nan
    high: float = math.nan
    confidence: float = 0.95
    steps: int = 1
    effective_steps: float = 1.0
    reason: str = ""
    unit: str = "examples"
    tokens_per_example: float = math.nan

    def to(self, unit: str) -> NoiseEstimate:
        """The same estimate in ``"examples"`` or ``"tokens"`` (B_simple, its interval and tr Σ
        scale by the mean tokens per example; |G|² does not).

        A batch of B examples holds B·T̄ tokens on average, so a noise scale of B examples is one
        of B·T̄ tokens and back: a change of unit, not of definition (which the loss fixes).
        """
        if unit not in ("examples", "tokens"):
            raise ValueError(f"unit must be 'examples' or 'tokens', got {unit!r}")
        if unit == self.unit:
            return self
        t = self.tokens_per_example
        if not (math.isfinite(t) and t > 0):
            raise ValueError(
                f"this estimate is in {self.unit} and no tokens were counted, so it cannot be "
                f"given in {unit}: call the model with labels= (Hugging Face) or "
                "tracker.count_tokens(labels) after each forward"
            )
        f = t if unit == "tokens" else 1.0 / t
        return replace(
            self,
            trace_sigma=self.trace_sigma * f,
            b_simple=self.b_simple * f,
            low=self.low * f,
            high=self.high * f,
            unit=unit,
        )

    @property
    def available(self) -> bool:
        """True once B_simple is a finite number."""
        return math.isfinite(self.b_simple)

    @property
    def relative_width(self) -> float:
        """(high − low)/B_simple: the interval's width relative to the estimate."""
        if not self.available or not (math.isfinite(self.low) and math.isfinite(self.high)):
            return math.inf
        return (self.high - self.low) / self.b_simple

    def as_dict(self) -> dict[str, float | str]:
        return {
            "g2": self.g2,
            "trace_sigma": self.trace_sigma,
            "b_simple": self.b_simple,
            "b_simple_low": self.low,
            "b_simple_high": self.high,
            "confidence": self.confidence,
            "steps": self.steps,
            "effective_steps": self.effective_steps,
            "unit": self.unit,
            "tokens_per_example": self.tokens_per_example,
        }


def b_simple_interval(state: NoiseScaleState, confidence: float = 0.95) -> NoiseEstimate:
    """B_simple = EMA[tr Σ]/EMA[|G|²] with a Fieller confidence interval.

    The per-step estimates (g2_t, trace_t) are treated as independent across steps (fresh batches)
    with a common mean under the EMA weights w_t = β^(T−t)/Σβ^(T−t). The variances of the two
    weighted means and their covariance are estimated from the weighted residuals with the exact
    small-sample correction for those weights. Fieller's theorem then inverts
    |mean_trace − R·mean_g2| ≤ z·sd(mean_trace − R·mean_g2) for R; unlike the delta method it
    stays honest when |G|² is barely above zero, where the interval becomes unbounded above.
    The per-step estimates are quadratic in the gradients, so skewed, and a symmetric pivot
    misses on one side: each end is moved outward (never inward) to where the
    skewness-corrected pivot puts it (:func:`_skew_shift`). Where the steps are few and their
    skew strong, the interval still covers somewhat less than ``confidence`` (README). The
    lower end is clamped at 0 because B_simple cannot be negative.

    An estimate that is not there says so: while the averaged |G|² or tr Σ is not positive (|G|²
    not yet distinguishable from zero, or small-batch norms too noisy for the steps so far),
    ``b_simple`` is ``nan``, the interval is [0, ∞) — it does not look like a tight one — and
    ``reason`` says why; the interval is ``nan`` with fewer than two steps.
    """
    if state.count == 0 or state.w1 <= 0:
        nan = math.nan
        return NoiseEstimate(nan, nan, nan, nan, nan, confidence, 0, 0.0, "no step measured yet")
    g = state.g2_sum / state.w1
    s = state.trace_sum / state.w1
    # Average first, then judge: single steps are often negative; the averages are not, unless
    # the measurement cannot yet resolve them.
    reason = unavailable_reason(g, s)
    b_simple = s / g if not reason else math.nan
    n_eff = state.w1**2 / state.w2
    low = high = math.nan
    if state.count >= 2:
        sw2 = state.w2 / state.w1**2  # Σ w_t²
        sw3 = state.w3 / state.w1**3  # Σ w_t³
        # E[Σ w_t² (x_t − x̄)(y_t − ȳ)] = cov(x, y) · (Σw² − 2Σw³ + (Σw²)²) for iid steps.
        correction = sw2 - 2.0 * sw3 + sw2 * sw2
        if correction > 0:
            inv = 1.0 / (state.w1**2)

            def centred(sq: float, x_w2: float, y_w2: float, mx: float, my: float) -> float:
                # Σ w_t² (x_t − x̄)(y_t − ȳ), expanded over the stored sums
                return inv * (sq - mx * y_w2 - my * x_w2) + mx * my * sw2

            var_unit_gg = centred(state.g2_sq, state.g2_w2, state.g2_w2, g, g) / correction
            var_unit_ss = centred(state.trace_sq, state.trace_w2, state.trace_w2, s, s) / correction
            var_unit_gs = centred(state.cross, state.g2_w2, state.trace_w2, g, s) / correction
            # variances of the weighted means
            # round-off in the expanded sums can leave tiny negative variances: project back
            v_gg, v_ss = max(sw2 * var_unit_gg, 0.0), max(sw2 * var_unit_ss, 0.0)
            bound = math.sqrt(v_gg * v_ss)
            v_gs = min(max(sw2 * var_unit_gs, -bound), bound)
            q = _t_quantile(confidence, n_eff - 1.0)
            cov = (v_ss, v_gg, v_gs)
            low, high = _fieller(s, g, *cov, q)
            shift = _skew_shift(state, g, s, cov, q)
            if shift is not None:
                # each end moved for the skewness — never inward: the estimated skewness is
                # noisy, and letting it narrow a side costs more coverage than it gains
                low = min(low, _shifted_end(s, g, cov, q, shift, low, 0))
                high = max(high, _shifted_end(s, g, cov, q, shift, high, 1))
    if reason and state.count >= 2:
        low, high = 0.0, math.inf
    return NoiseEstimate(
        float(g),
        float(s),
        float(b_simple),
        float(low),
        float(high),
        confidence,
        state.count,
        float(n_eff),
        reason,
    )


def unavailable_reason(g2: float, trace_sigma: float) -> str:
    """Why B_simple is not available from these averages of |G|² and tr Σ ("" when it is);
    the numbers quoted are these, in the unit they are given in."""
    if not g2 > 0:
        return (
            f"the averaged |G|² is {g2:.3g}, not positive: the gradient is not yet "
            "distinguishable from the noise (more steps, a larger batch or a more precise "
            "small-batch source will resolve it)"
        )
    if not trace_sigma > 0:
        return (
            f"the averaged tr Σ is {trace_sigma:.3g}, not positive: the small-batch norms are "
            "too noisy for the steps so far to separate the noise"
        )
    return ""


def b_noise_unavailable_reason(ghg: float, trace_h_sigma: float) -> str:
    """Why B_noise is not available from these averages of GᵀHG and tr(HΣ) ("" when it is),
    as :func:`unavailable_reason` for B_simple."""
    if not ghg > 0:
        return (
            f"the averaged GᵀHG is {ghg:.3g}, not positive: the curvature along the gradient "
            "is not yet distinguishable from the noise (more measurements or larger parts will "
            "resolve it), or the loss is not convex along the gradient, where B_noise is not "
            "defined"
        )
    if not trace_h_sigma > 0:
        return (
            f"the averaged tr(HΣ) is {trace_h_sigma:.3g}, not positive: the parts' own "
            "quadratic forms are too noisy for the measurements so far to separate the noise "
            "(more measurements or larger parts will resolve it)"
        )
    return ""


def _t_quantile(confidence: float, dof: float) -> float:
    """Two-sided Student-t quantile for ``dof`` degrees of freedom (may be fractional; at
    least 1).

    The variances come from the same steps as the means, so the pivot is t- rather than
    normal-distributed; the effective number of steps sets the degrees of freedom. Exact at
    every level and dof (scipy's inverse of the t distribution function, a few µs; until
    2026-12-06 a Cornish–Fisher series that was 12% narrow at 3 dof and 99.9%).
    """
    from scipy.special import stdtrit

    return float(stdtrit(max(dof, 1.0), 0.5 + confidence / 2.0))


def _skew_shift(
    state: NoiseScaleState, g: float, s: float, cov: tuple[float, float, float], q: float
) -> Callable[[float], float] | None:
    """δ(R) of the skewness-corrected Fieller pivot |D(R) + δ(R)| ≤ q·sd(D(R)), or ``None``
    while it cannot be estimated (fewer than three steps, or a state saved without the third
    moments).

    D(R) = mean tr − R·mean g2 is a weighted mean of the steps' d_t = tr_t − R·g2_t, which are
    quadratic in the gradients and so skewed; a symmetric t-pivot then misses on one side. For
    a weighted mean with weights w_t (Σw = 1) of independent steps, the studentised pivot
    T = (D − μ)/sd̂ has mean −γ/2 and third cumulant −2γ to order n^(−1/2), γ = κ₃Σw³/
    (σ²Σw²)^(3/2) the skewness of D — as for the plain mean (Hall 1992, §3.5; Johnson 1978) with
    Σw³, Σw² in place of 1/n², 1/n. Cornish–Fisher then puts T's quantiles at ∓q − γ(2q² + 1)/6,
    that is |D + δ − μ| ≤ q·sd̂ with δ = κ₃(D)(2q² + 1)/(6·var(D)). κ₃ of a step is estimated
    without bias from the squared-weight residuals: E Σw_t²(d_t − D)³ = κ₃(Σw² − 3Σw³ + 3Σw⁴
    − Σw²Σw³) (n/((n − 1)(n − 2)) for equal weights). κ₃(D(R)) is a cubic in R, var(D(R)) the
    quadratic the Fieller interval uses.
    """
    w1 = state.w1
    sw2, sw3, sw4 = state.w2 / w1**2, state.w3 / w1**3, state.w4 / w1**4
    correction = sw2 - 3.0 * sw3 + 3.0 * sw4 - sw2 * sw3
    inv = 1.0 / w1**2
    raw3 = (state.g2_cube, state.g2_sq_trace, state.g2_trace_sq, state.trace_cube)
    if state.count < 3 or not correction > 0 or not all(map(math.isfinite, raw3)):
        return None
    if cov[0] <= 1e-10 * s * s and cov[1] <= 1e-10 * g * g:
        # (steps alike to rounding: their third moment is rounding noise over rounding noise)
        return None
    mean = {"g": g, "s": s}
    first = {"g": state.g2_w2 * inv, "s": state.trace_w2 * inv}  # Σ w_t² x_t
    second = {"gg": state.g2_sq * inv, "gs": state.cross * inv, "ss": state.trace_sq * inv}
    third = dict(zip(("ggg", "ggs", "gss", "sss"), (x * inv for x in raw3), strict=True))

    def centred(x: str, y: str, z: str) -> float:
        # Σ w_t² (x_t − x̄)(y_t − ȳ)(z_t − z̄), expanded over the stored sums
        mx, my, mz = mean[x], mean[y], mean[z]
        return (
            third[x + y + z]
            - mx * second[y + z]
            - my * second[x + z]
            - mz * second[x + y]
            + mx * my * first[z]
            + mx * mz * first[y]
            + my * mz * first[x]
            - mx * my * mz * sw2
        )

    # κ₃ of D(R) = Σ w_t (tr_t − R·g2_t): k[j] is the coefficient of (−R)^j
    k = [centred(*key) * sw3 / correction for key in ("sss", "gss", "ggs", "ggg")]
    v_ss, v_gg, v_gs = cov
    factor = (2.0 * q * q + 1.0) / 6.0

    def shift(r: float) -> float:
        var = v_ss - 2.0 * r * v_gs + r * r * v_gg
        kappa = k[0] - 3.0 * r * k[1] + 3.0 * r * r * k[2] - r**3 * k[3]
        return factor * kappa / var if var > 0 else 0.0

    return shift


def _shifted_end(
    s: float,
    g: float,
    cov: tuple[float, float, float],
    q: float,
    shift: Callable[[float], float],
    end: float,
    side: int,
) -> float:
    """One end (``side`` 0 low, 1 high) of {R ≥ 0 : |s − R·g + δ(R)| ≤ q·sd(s − R·g)}, found from
    the plain Fieller end as the fixed point of R ↦ Fieller end with tr shifted by δ(R) (δ
    varies slowly with R: a few rounds settle it; rounds that alternate around the fixed point
    are damped).

    δ(R) grows linearly in R (a cubic κ₃ over a quadratic variance), with slope c: where
    |c − |G|²| ≤ q·sd(|G|²) the corrected set is unbounded above (its pivot grows no faster
    than its sd), and the rounds run away — ×71 a round in a review's 9-step state, where a
    bounded [0, 1317] came back as [0, 8.4e17], a finite number no "unbounded" check saw. That
    high end is ∞. An end the rounds still do not settle is the outward limit: ∞ above, 0
    below."""
    v_gg = cov[1]
    if side == 1:
        far = 1e8 * (abs(end) + 1.0) if math.isfinite(end) else 1e8
        slope = _quietly(lambda: float(shift(2.0 * far) - shift(far))) / far
        if abs(slope - g) <= q * math.sqrt(max(v_gg, 0.0)):
            return math.inf
    change, last = math.inf, 0.0
    for _ in range(40):
        if not math.isfinite(end):
            return end
        delta = _quietly(lambda e=end: float(shift(e)))
        if not math.isfinite(delta):
            # rounds running away past float range (r³ overflowed): not settling — the outward
            # limit. Until 2026-12-07 the nan went on into _fieller, which read it as (0, 0),
            # and numpy's overflow warnings reached the user (a fuzzer of the statistics)
            break
        new = _fieller(s + delta, g, cov[0], cov[1], cov[2], q)[side]
        if not math.isfinite(new):
            return new
        step = new - end
        if step * last < 0:  # (alternating: damp)
            new = end + 0.5 * step
        change, last = abs(new - end), step
        if change <= 1e-12 * abs(end):
            return new
        end = new
    if change <= 1e-6 * abs(end):
        return end
    return math.inf if side == 1 else 0.0


def _quietly(value: Callable[[], float]) -> float:
    """``value()``, nan where it overflows: numpy's scalars warn (silenced here) and Python's
    floats raise — a state resumed from a checkpoint holds Python floats, and its r³ raised
    OverflowError out of estimate() until 2026-12-07 (a review)."""
    try:
        with np.errstate(all="ignore"):
            return value()
    except OverflowError:
        return math.nan


def _fieller(
    num: float, den: float, v_nn: float, v_dd: float, v_nd: float, z: float
) -> tuple[float, float]:
    """Fieller interval for num/den given the (co)variances of the two means and a quantile z.

    The Fieller set {R : (num − R·den)² ≤ z²·var(num − R·den)} is a bounded interval when den is
    clearly non-zero, and otherwise one or two unbounded rays. B_simple cannot be negative, so the
    set is restricted to R ≥ 0 and its hull is returned (``inf`` as the upper end when unbounded).
    """
    z2 = z * z
    # (num − R·den)² − z²(v_nn − 2R·v_nd + R²·v_dd) = a·R² − 2b·R + c ≤ 0
    a = den * den - z2 * v_dd
    b = num * den - z2 * v_nd
    c = num * num - z2 * v_nn
    disc = b * b - a * c
    if a > 0:
        # disc ≥ 0 for a positive semi-definite covariance; below 0 only by round-off
        root = math.sqrt(max(disc, 0.0))
        lo, hi = (b - root) / a, (b + root) / a
        return max(0.0, lo), max(0.0, hi)
    if disc < 0 or a == 0:
        return 0.0, math.inf
    root = math.sqrt(disc)
    r_lo, r_hi = sorted(((b - root) / a, (b + root) / a))
    # a < 0: the set is (−inf, r_lo] ∪ [r_hi, inf); its part on R ≥ 0, as a hull:
    return (0.0, math.inf) if r_lo >= 0 else (max(0.0, r_hi), math.inf)


def estimate_from_norms(
    b_small: float | ArrayLike,
    sqnorm_small: float | ArrayLike,
    b_big: float | ArrayLike,
    sqnorm_big: float | ArrayLike,
    *,
    beta: float = 1.0,
    confidence: float = 0.95,
) -> NoiseEstimate:
    """B_simple, |G|² and tr(Σ) from squared gradient norms at two batch sizes (eq. A.2, 2.9).

    Scalars give a single-step estimate. Sequences (one entry per step, oldest first) are combined
    as the ratio of the (by default equally weighted, ``beta=1``) means of the per-step unbiased
    |G|² and tr(Σ), with a confidence interval when there are two or more steps.

    Example:
        >>> est = estimate_from_norms(1, 10.0, 100, 1.09)
        >>> round(est.g2, 6), round(est.trace_sigma, 6), round(est.b_simple, 6)
        (1.0, 9.0, 9.0)

    Returns:
        A :class:`NoiseEstimate` whose ``b_simple`` is ``nan`` (not an exception) when the
        averaged |G|² ≤ 0.
    """
    bs, ns, bb, nb = np.broadcast_arrays(
        *(
            np.atleast_1d(np.asarray(x, dtype=float))
            for x in (b_small, sqnorm_small, b_big, sqnorm_big)
        )
    )
    g2, tr = unbiased_g2_trace(bs, ns, bb, nb)
    state = update_state(init_state(beta), g2, tr)
    return b_simple_interval(state, confidence)


def combine_weights(cov: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Minimum-variance weights (summing to one) for averaging unbiased estimates of one quantity.

    Given the covariance matrix C of K unbiased estimators, w = C⁻¹1 / (1ᵀC⁻¹1). Used to combine
    the small-batch sources of one step (per-example, micro-batch, data-parallel local): each is
    unbiased, so any fixed weights keep the combination unbiased; these minimise its variance.
    Falls back to equal weights when C is singular or not positive definite.
    """
    c = np.asarray(cov, dtype=float)
    k = c.shape[0]
    ones = np.ones(k)
    try:
        np.linalg.cholesky(c)
        w = np.linalg.solve(c, ones)
    except np.linalg.LinAlgError:
        return ones / k
    total = w.sum()
    if not np.isfinite(total) or total <= 0:
        return ones / k
    return w / total


class CombinerState(NamedTuple):
    """EMA mean and second moments of K sources' per-step (g2, trace_sigma) estimates, each
    step's taken as its change from the step before, over a scale of the levels before those two
    steps (:func:`update_combiner`)."""

    beta: float
    count: int
    weight: float
    mean_g2: np.ndarray
    mean_trace: np.ndarray
    outer_g2: np.ndarray
    outer_trace: np.ndarray
    # the last step's level and its sources' g2 and trace_sigma (None: none yet)
    level: float | None = None
    last_g2: np.ndarray | None = None
    last_trace: np.ndarray | None = None
    # the changes' scale: an EMA (LEVEL_DECAY) of the levels of the steps before the last one
    # (None: none yet; since STATE_VERSION 5)
    scale: float | None = None


#: a step is not folded into the combiner's statistics where its level is over this many times
#: the step's before (or under its 1/LEVEL_JUMP), or the step before's over this many times the
#: scale (its level jumped). 16 since 2026-12-08 (4 and 2 before): a small big batch's S_B
#: moves over 4× between steps from its own noise in a third of the steps (2 processes' local
#: batches of 4 and 12, a fuzzer), and leaving those out selects pairs of steps whose big-batch
#: noise nearly cancels, which enters the sources' tr Σ with unequal coefficients — with the
#: step before's S_B as the scale, tr Σ's weights 0.62 where the optimum's are 0.08, its variance
#: 1.78× the optimum's (1.04× now; test_combiner_weights_of_local_and_per_example_sources_...)
LEVEL_JUMP = 16.0

#: the decay of the level's EMA that scales the changes folded (the last ~2 levels)
LEVEL_DECAY = 0.5


def init_combiner(k: int, beta: float = 0.99) -> CombinerState:
    """Statistics for combining ``k`` small-batch sources of the same steps."""
    z, zz = np.zeros(k), np.zeros((k, k))
    return CombinerState(float(beta), 0, 0.0, z, z.copy(), zz, zz.copy())


def _within(x: float, ref: float) -> bool:
    return ref > 0 and ref / LEVEL_JUMP <= x <= LEVEL_JUMP * ref


def update_combiner(
    state: CombinerState, g2: ArrayLike, trace_sigma: ArrayLike, level: float = 1.0
) -> CombinerState:
    """Fold one step's per-source estimates (arrays of length K) into the statistics.

    ``level``: a positive scale of the step (the tracker gives the big batch's squared norm
    S_B = |G|² + tr Σ/B + noise). The sources' errors scale with the step's |G|² and tr Σ, which
    drift over a run (|G|² falls; under ``precondition=`` Adam's first steps, P ≈ 1/ε, are 10⁸×
    the later ones). Folded raw, as until 2026-12-07, the steps of the largest level dominated
    the covariance, the level's drift entered it as a common component far above the sources'
    differences, and the weights turned extreme (w = −22.4 and 23.4 seen; 10–10⁵× the variance
    of equal weights, a fuzzer). So each source's estimate is folded as its change from the
    step before over a scale of the level, (x_t − x_{t−1})/ℓ: the steps' batches are
    independent, so its covariance is (C_t + C_{t−1})/ℓ² — twice the errors' relative
    covariance where it is the level² times a fixed one, and the weights, blind to a common
    scale, are its weights — while the level cancels (up to its change in one step, common to
    the sources, which the weights are blind to too). The scale ℓ is an EMA (``LEVEL_DECAY``)
    of the levels of the steps *before* t − 1, independent of both steps' batches: one that
    shares a step's noise bends the weights — the step's own S_B (tried: 18–880× the optimum's
    variance of tr Σ in the fuzzer's seeds); the step before's, S_{t−1}, as until 2026-12-08
    (weights 0.62 for an optimum's 0.08 where S_B's noise is as large as its mean — 2
    processes' local batches of 4 and 12 —, tr Σ's variance 1.2× equal weights'; a fuzzer).
    A step whose level moved over ``LEVEL_JUMP``× from the step before's, or whose step before
    moved so from the scale, is not folded (its relative change would outweigh every other
    step's); the scale restarts at a level that far from it."""
    g = np.asarray(g2, dtype=float)
    s = np.asarray(trace_sigma, dtype=float)
    prev, prev_g, prev_s, scale = state.level, state.last_g2, state.last_trace, state.scale
    new_scale = scale
    if prev is not None and math.isfinite(prev) and prev > 0:
        near = scale is not None and _within(prev, scale)
        new_scale = LEVEL_DECAY * scale + (1 - LEVEL_DECAY) * prev if near else prev
    state = state._replace(level=float(level), last_g2=g, last_trace=s, scale=new_scale)
    if prev is None or prev_g is None or prev_s is None or scale is None:
        return state
    if not (math.isfinite(level) and _within(level, prev) and _within(prev, scale)):
        return state
    g = (g - prev_g) / scale
    s = (s - prev_s) / scale
    b = state.beta
    w = state.weight * b + 1.0
    keep = 1.0 - 1.0 / w  # weight of the old statistics in the new EMA

    def ema(old: np.ndarray, new: np.ndarray) -> np.ndarray:
        return keep * old + (1.0 - keep) * new

    return state._replace(
        count=state.count + 1,
        weight=w,
        mean_g2=ema(state.mean_g2, g),
        mean_trace=ema(state.mean_trace, s),
        outer_g2=ema(state.outer_g2, np.outer(g, g)),
        outer_trace=ema(state.outer_trace, np.outer(s, s)),
    )


def combiner_weights(state: CombinerState, min_steps: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-variance weights for g2 and for trace_sigma from the steps seen so far.

    Weights come only from earlier steps, so they are independent of the step they are applied
    to and the combination stays unbiased. Equal weights until ``min_steps`` steps are learnt
    from (``count``: a step the combiner did not fold — the first two, one whose level jumped, see
    :func:`update_combiner` — does not count).
    """
    k = state.mean_g2.shape[0]
    if state.count < min_steps:
        return np.ones(k) / k, np.ones(k) / k
    cov_g = state.outer_g2 - np.outer(state.mean_g2, state.mean_g2)
    cov_s = state.outer_trace - np.outer(state.mean_trace, state.mean_trace)
    return combine_weights(cov_g), combine_weights(cov_s)
