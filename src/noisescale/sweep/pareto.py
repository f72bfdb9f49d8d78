"""The critical batch size from a grid of training runs (paper sec. 2.3, App. A.3, App. D.1).

For each goal (a loss or error level): smooth every run's curve with a bias-corrected EMA, find
the step at which it first reaches the goal, keep the fastest learning rate at each batch size
(the Pareto front), fit S/S_min − 1 = (E/E_min − 1)⁻¹ (eq. 2.11) in log space and report
B_crit = E_min/S_min (eq. 2.12) with its standard error. Beside it, the simple noise scale
B_simple averaged over the same stretch of training as D.1 prescribes.

Pure NumPy: no torch, no plotting, no SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from noisescale.errors import NoiseScaleInputError
from noisescale.sweep.runs import Run

#: The fit searches B_crit between (smallest batch size)/SEARCH_SPAN and (largest)·SEARCH_SPAN.
SEARCH_SPAN = 1e4
#: A point whose run reaches the goal within fewer recorded points than this gets a warning: its S
#: rests on an interpolation between the first few records (and the EMA's first values).
MIN_POINTS_TO_GOAL = 5
#: Batch sizes on the Pareto front needed for a fit: two parameters and one residual degree
#: of freedom for the standard error.
MIN_BATCH_SIZES = 3
#: A warning is attached when correcting every point for the EMA's lag at the goal moves B_crit
#: by more than this fraction. With evenly spaced records the lag is the same number of steps at
#: every batch size, which inflates S_min and lowers B_crit by about lag/S_min; with
#: geometrically spaced records it is a fixed fraction of each S, which scales S_min and E_min
#: alike and cancels in B_crit. Refitting measures which case a grid is in.
MAX_LAG_SHIFT = 0.05
#: A run whose examples per step (:meth:`Run.step_batch_sizes`) are at every recorded point more
#: than this factor from its batch_size (above it or below it) counts ``examples`` in another unit
#: than ``batch_size``, or its batch size changed far from the nominal one: B_crit comes out in the
#: unit of ``examples`` and is printed beside ``batch_size``. The factor leaves room for partial
#: batches at epoch ends (a fixed batch of 8,192 on 50,000 examples averages 0.87× per epoch) and
#: for warm-ups recorded sparsely (a ramp from B to 2B averages above 1.1× at every record).
UNIT_FACTOR = 1.5


def ema_smoothed(values: ArrayLike, decay: float) -> np.ndarray:
    """Bias-corrected exponential moving average of a curve (paper App. A.3).

    m_t = decay·m_{t−1} + (1 − decay)·x_t with m_0 = 0, returned as m_t / (1 − decay^t), so the
    first point is x_1 itself and early points are not pulled towards zero. ``decay = 0``
    returns the curve unchanged. The average runs over recorded points, not optimizer steps.

    Raises:
        NoiseScaleInputError: ``decay`` outside [0, 1).
    """
    if not 0.0 <= decay < 1.0:
        raise NoiseScaleInputError(f"the EMA decay must be in [0, 1), got {decay}")
    x = np.asarray(values, dtype=float)
    out = np.empty_like(x)
    m = 0.0
    weight = 0.0
    for t, value in enumerate(x.tolist()):
        m = decay * m + (1.0 - decay) * value
        weight = decay * weight + (1.0 - decay)
        out[t] = m / weight
    return out


def ema_lag(step: ArrayLike, decay: float) -> float:
    """How many steps a bias-corrected EMA trails its curve at the last point.

    The smoothed value at point t is a weighted mean of the points k ≤ t with weights
    ∝ decay^(t−k); its lag is the weighted mean age Σ w_k·(step_t − step_k)/Σ w_k. For a curve
    linear in the step the EMA equals the curve exactly this many steps earlier. With evenly
    spaced points Δ apart it tends to decay/(1 − decay)·Δ once t ≫ 1/(1 − decay).
    """
    s = np.asarray(step, dtype=float)
    if decay == 0.0 or s.size < 2:
        return 0.0
    # Weights below 1e-16 of the newest cannot move the mean: look back only that far.
    horizon = min(s.size, math.ceil(-37.0 / math.log(decay)) + 1)
    tail = s[-horizon:]
    w = decay ** np.arange(horizon - 1, -1, -1, dtype=float)
    return float(w @ (tail[-1] - tail) / w.sum())


@dataclass(frozen=True)
class GoalCrossing:
    """Where a smoothed curve first reaches a goal.

    Attributes:
        step: optimizer steps S to the goal, interpolated linearly between the last recorded
            point above the goal and the first at or below it.
        examples: training examples E processed by then, interpolated the same way.
        index: the first recorded point at or below the goal.
    """

    step: float
    examples: float
    index: int


def goal_crossing(
    step: ArrayLike, examples: ArrayLike, smoothed: ArrayLike, goal: float
) -> GoalCrossing | None:
    """The first point at which a smoothed curve is at or below ``goal``, or ``None``.

    Linear interpolation between recorded points makes S and E continuous in the goal even
    when the metric is recorded every few steps. When the first recorded point already meets
    the goal there is nothing to interpolate from and that point is returned.
    """
    s = np.asarray(step, dtype=float)
    e = np.asarray(examples, dtype=float)
    y = np.asarray(smoothed, dtype=float)
    hits = np.flatnonzero(y <= goal)
    if hits.size == 0:
        return None
    i = int(hits[0])
    if i == 0:
        return GoalCrossing(step=float(s[0]), examples=float(e[0]), index=0)
    frac = (y[i - 1] - goal) / (y[i - 1] - y[i])
    return GoalCrossing(
        step=float(s[i - 1] + frac * (s[i] - s[i - 1])),
        examples=float(e[i - 1] + frac * (e[i] - e[i - 1])),
        index=i,
    )


def b_simple_average(
    step: ArrayLike, b_simple: ArrayLike, batch_size: ArrayLike, *, until_step: float | None = None
) -> float | None:
    """B_simple averaged over training the way B_crit averages the noise scale (App. D.1).

    By eq. D.1 a run at batch size B needs dS = (1 + B_noise/B)·ds steps for ds steps of
    full-batch progress, and over the whole run S_min = ∫ds and E_min = ∫B_noise ds. So
    B_crit = E_min/S_min is the mean of B_noise over *full-batch steps* s. A step of a run at
    batch size B counts as ds = B/(B + B_noise) full-batch steps, which gives the weights

        average = Σ w_t·B_simple(t) / Σ w_t,   w_t = Δt·B_t/(B_t + B_simple(t)),

    with B_simple standing in for B_noise and Δt the steps a recorded point stands for. For
    B ≫ B_simple this is the plain mean over the steps of a large-batch run; for B ≪ B_simple
    it tends to the harmonic mean over steps. The mean over examples (or over steps of a
    small-batch run) would overweight late training, where B_simple is large and progress per
    step is slow, and overestimate B_crit.

    Args:
        step: recorded optimizer steps, increasing.
        b_simple: B_simple at those steps; NaN or ≤ 0 where not measured (skipped).
        batch_size: the batch size of the steps each point stands for (scalar or per point).
        until_step: average only over points at or before this step (the step the goal is
            reached at); all points when ``None``.

    Returns:
        The average, or ``None`` when no point up to ``until_step`` has a B_simple.
    """
    s = np.asarray(step, dtype=float)
    b = np.asarray(b_simple, dtype=float)
    batch = np.broadcast_to(np.asarray(batch_size, dtype=float), s.shape)
    if s.size == 0:
        return None
    # Each point stands for the steps since the previous one (the first: since step 0).
    d_step = np.diff(s, prepend=0.0)
    if d_step[0] <= 0:
        d_step[0] = d_step[1] if s.size > 1 else 1.0
    keep = np.isfinite(b) & (b > 0)
    if until_step is not None:
        keep &= s <= until_step
    if not keep.any():
        return None
    w = d_step[keep] * batch[keep] / (batch[keep] + b[keep])
    return float(np.sum(w * b[keep]) / np.sum(w))


@dataclass(frozen=True)
class ParetoFit:
    """A fit of eq. 2.11 to (S, E) points of a Pareto front, with standard errors.

    Fitted in log space: log S_i = log(S_min + E_min/B_i) with B_i = E_i/S_i, by least squares
    over (log S_min, log E_min); standard errors come from the covariance σ̂²·(JᵀJ)⁻¹ with σ̂²
    the residual variance on n − 2 degrees of freedom, and carry to B_crit = E_min/S_min by the
    delta method in log space: Var(log B_crit) = Var(log E_min) + Var(log S_min) −
    2·Cov(log S_min, log E_min). Linear standard errors are value × log standard error.
    B_crit's interval is not B_crit·exp(±t·SE): it is the profile-likelihood interval
    (:meth:`b_crit_interval`), which may be unbounded on a side.

    Attributes:
        s_min: fewest steps to the goal (the B → ∞ limit).
        e_min: fewest examples to the goal (the B → 0 limit).
        b_crit: E_min/S_min (eq. 2.12), in the unit of the batch sizes.
        s_min_stderr, e_min_stderr, b_crit_stderr: standard errors (``inf`` at a bound).
        log_b_crit_stderr: standard error of ln B_crit.
        log_cov: 2×2 covariance of (log S_min, log E_min).
        residual_std: σ̂, the spread of the log-step residuals (the run-to-run noise).
        n_points: points fitted.
        at_bound: ``"lower"`` when the best fit is at the lower edge of the search (steps do
            not fall with batch size enough to tell), ``"upper"`` when at its upper edge (steps
            ∝ 1/B throughout), else ``None``. Then ``b_crit`` is the search's edge, not an
            estimate nor a bound: the data do not identify B_crit on that side, and what they
            say is :meth:`b_crit_interval`, unbounded there.
        log_steps, inv_batch: the fitted data, ln S_i and 1/B_i (for :meth:`b_crit_interval`).
    """

    s_min: float
    e_min: float
    b_crit: float
    s_min_stderr: float
    e_min_stderr: float
    b_crit_stderr: float
    log_b_crit_stderr: float
    log_cov: np.ndarray
    residual_std: float
    n_points: int
    at_bound: str | None = None
    log_steps: np.ndarray | None = field(default=None, repr=False, compare=False)
    inv_batch: np.ndarray | None = field(default=None, repr=False, compare=False)

    def b_crit_interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """B_crit's profile-likelihood interval: the B_crit whose best fit leaves a residual sum
        of squares RSS ≤ RSS_min·(1 + t²/(n − 2)), t Student's on n − 2 degrees of freedom
        (the F test of B_crit, exact for a model linear in its parameters).

        An end that reaches the edge of the search is unbounded: ``0`` below, ``inf`` above —
        the data do not bound B_crit on that side (at a bound, always on that side). (nan, nan)
        with no degree of freedom (two points). Until 2026-12-07 this was
        B_crit·exp(±t·SE(ln B_crit)), the delta method: on fronts that pin B_crit down poorly
        (B_crit below or above most batch sizes) it held the truth in 11-17% of the fits with no
        extrapolation warning, and overflowed at SE ≈ 60-300 (a hunt).
        """
        from noisescale.branch.compare import t_quantile  # (branch imports this module)

        dof = self.n_points - 2
        if dof < 1 or self.log_steps is None or self.inv_batch is None:
            return math.nan, math.nan
        t = t_quantile(confidence, dof)
        y, inv_b = self.log_steps, self.inv_batch
        rss_min = self.residual_std**2 * dof
        threshold = rss_min * (1.0 + t * t / dof)
        grid = _search_grid(inv_b)
        us = np.append(grid, math.log(self.b_crit))
        order = np.argsort(us, kind="stable")
        us, inside = us[order], np.append(_profile_rss(y, inv_b, grid), rss_min)[order] <= threshold
        first, last = int(np.argmax(inside)), int(inside.size - 1 - np.argmax(inside[::-1]))

        def crossing(out: float, within: float) -> float:
            for _ in range(200):
                mid = (out + within) / 2.0
                if abs(within - out) < 1e-12 or mid in (out, within):
                    break
                if float(_profile_rss(y, inv_b, np.array([mid]))[0]) <= threshold:
                    within = mid
                else:
                    out = mid
            return math.exp(within)

        low = 0.0 if first == 0 else crossing(float(us[first - 1]), float(us[first]))
        high = math.inf if last == us.size - 1 else crossing(float(us[last + 1]), float(us[last]))
        return low, high

    def s_min_interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """S_min's profile-likelihood interval, as :meth:`b_crit_interval`'s (the same F test).

        ``0`` below where B_crit's interval reaches the upper edge of the search (S_min → 0 as
        B_crit → ∞). The delta method's S_min·exp(±t·SE) held the truth in 74% of fronts with
        B_crit 100× above the batch sizes (a review, 2026-12-07).
        """
        return self._profile_interval(0.0, confidence)

    def e_min_interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """E_min's profile-likelihood interval, as :meth:`b_crit_interval`'s (the same F test).

        ``0`` below where B_crit's interval reaches the lower edge of the search (E_min → 0 as
        B_crit → 0). The delta method's E_min·exp(±t·SE) held the truth in 80% of fronts with
        B_crit 10× below the batch sizes (a review, 2026-12-07).
        """
        return self._profile_interval(1.0, confidence)

    def _profile_interval(self, shift: float, confidence: float) -> tuple[float, float]:
        """The profile-likelihood interval of exp(ln S_min + shift·ln B_crit).

        At u = ln B_crit the residual sum of squares is quadratic in a = ln S_min,
        RSS(a, u) = RSS(u) + n·(a − ā(u))² (ā(u) the best a, :func:`_profile_rss`), so the a
        with min over u of RSS(a, u) ≤ the threshold are the union over u of
        ā(u) ± √((threshold − RSS(u))/n): its ends are searched over the grid of u, refined
        around the extremes.
        """
        from noisescale.branch.compare import t_quantile  # (branch imports this module)

        dof = self.n_points - 2
        if dof < 1 or self.log_steps is None or self.inv_batch is None:
            return math.nan, math.nan
        t = t_quantile(confidence, dof)
        y, inv_b = self.log_steps, self.inv_batch
        threshold = self.residual_std**2 * dof * (1.0 + t * t / dof)

        def ends(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """ā(u) + shift·u ∓ the half-width; ±∞ (never an end) where RSS(u) > threshold."""
            r = y[None, :] - np.log1p(np.exp(u)[:, None] * inv_b[None, :])
            centre = r.mean(axis=1) + shift * u
            r -= r.mean(axis=1, keepdims=True)
            room = threshold - np.einsum("ij,ij->i", r, r)
            half = np.sqrt(np.maximum(room, 0.0) / y.size)
            inside = room >= 0
            return np.where(inside, centre - half, np.inf), np.where(inside, -centre - half, np.inf)

        us = np.sort(np.append(_search_grid(inv_b), math.log(self.b_crit)))
        grid_ends = ends(us)
        best = []
        for side in (0, 1):  # the lower end, then (negated) the upper one: each a minimum
            k = int(np.argmin(grid_ends[side]))
            fine = np.linspace(us[max(k - 1, 0)], us[min(k + 1, us.size - 1)], 401)
            best.append(min(float(grid_ends[side][k]), float(ends(fine)[side].min())))
        low, high = math.exp(best[0]), math.exp(-best[1])
        # ln S_min → −∞ as u → ∞, ln E_min → −∞ as u → −∞: open below where that edge is inside
        if math.isfinite(grid_ends[0][-1 if shift == 0.0 else 0]):
            low = 0.0
        return low, high

    def min_text(self, name: str, confidence: float = 0.95) -> str:
        """S_min (``name`` "s_min") or E_min ("e_min") as ``fit`` prints it: ``value ± SE (95%
        [low, high])``, the interval :meth:`s_min_interval` or :meth:`e_min_interval`."""
        value, stderr = getattr(self, name), getattr(self, f"{name}_stderr")
        low, high = getattr(self, f"{name}_interval")(confidence)
        if self.at_bound is not None:
            # (at the search's edge the fitted value is the edge's, no estimate — as B_crit's;
            # until a review of 2026-12-07 printed "0.01644 ± inf" for an S_min of 10)
            if math.isnan(low):
                return "not identified"
            return f"{confidence:.0%} interval {interval_text(low, high)} (the fit is at its edge)"
        text = f"{value:.4g} ± {stderr:.2g}"
        return text if math.isnan(low) else f"{text} ({confidence:.0%} {interval_text(low, high)})"

    def b_crit_text(self, confidence: float = 0.95) -> str:
        """B_crit as ``fit`` prints it: ``value ± SE (95% [low, high] ...)``; at the edge of the
        search, no value (the edge is not an estimate) but the side the interval bounds, if any.
        """
        low, high = self.b_crit_interval(confidence)
        level = f"{confidence:.0%}"
        if self.at_bound is None:
            text = f"{self.b_crit:.4g} ± {self.b_crit_stderr:.2g}"
            if not math.isnan(low):
                text += (
                    f" ({level} {interval_text(low, high)}, profile likelihood, t on "
                    f"{self.n_points - 2} d.o.f.)"
                )
            return text
        if math.isnan(low) or (low == 0.0 and math.isinf(high)):
            return f"not identified ({level} interval {interval_text(0.0, math.inf)})"
        if self.at_bound == "lower":
            return f"< {high:.3g} ({level}; the data do not bound it below)"
        return f"> {low:.3g} ({level}; the data do not bound it above)"

    def steps(self, batch_size: ArrayLike) -> np.ndarray | float:
        """Fitted steps to the goal at batch size B: S = S_min + E_min/B (eq. 2.11)."""
        s = self.s_min + self.e_min / np.asarray(batch_size, dtype=float)
        return float(s) if np.ndim(s) == 0 else s

    def examples(self, batch_size: ArrayLike) -> np.ndarray | float:
        """Fitted examples to the goal at batch size B: E = B·S_min + E_min (eq. 2.11)."""
        e = np.asarray(batch_size, dtype=float) * self.s_min + self.e_min
        return float(e) if np.ndim(e) == 0 else e


def fit_pareto(steps: ArrayLike, examples: ArrayLike) -> ParetoFit:
    """Fit S/S_min − 1 = (E/E_min − 1)⁻¹ (paper eq. 2.11) to Pareto points in log space.

    Each point (S_i, E_i) is a batch size's fewest steps to a goal and the examples used. The
    curve through the points is S(B) = S_min + E_min/B, E(B) = B·S(B) with B = E/S, so the fit
    minimises Σ (log S_i − log(S_min + E_min/B_i))². At a fixed batch size the run-to-run noise
    moves S and E together along B = E/S, so these residuals are the same whether one thinks of
    noise in S or in E. With u = log B_crit fixed the best log S_min is a mean, so the search is
    one-dimensional: a grid over u, then golden-section refinement.

    Raises:
        NoiseScaleInputError: fewer than three points, fewer than three distinct batch sizes,
            or a non-positive step or example count.
    """
    s = np.asarray(steps, dtype=float)
    e = np.asarray(examples, dtype=float)
    if s.shape != e.shape or s.ndim != 1:
        raise NoiseScaleInputError("steps and examples must be 1-D arrays of the same length")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(e)) and np.all(s > 0) and np.all(e > 0)):
        raise NoiseScaleInputError("steps and examples to a goal must be positive and finite")
    batch = e / s
    distinct = np.unique(np.round(np.log(batch), 9)).size
    if distinct < MIN_BATCH_SIZES:
        raise NoiseScaleInputError(
            f"a Pareto fit needs at least {MIN_BATCH_SIZES} batch sizes, got {distinct}"
        )
    y = np.log(s)
    inv_b = 1.0 / batch

    grid = _search_grid(inv_b)
    k = int(np.argmin(_profile_rss(y, inv_b, grid)))
    at_bound = "lower" if k == 0 else "upper" if k == grid.size - 1 else None
    if at_bound:
        u = float(grid[k])
    else:
        u = golden_min(
            lambda v: float(_profile_rss(y, inv_b, np.array([v]))[0]),
            float(grid[k - 1]),
            float(grid[k + 1]),
        )
    f = np.log1p(math.exp(u) * inv_b)
    a = float(np.mean(y - f))
    rss_min = float(_profile_rss(y, inv_b, np.array([u]))[0])
    s_min = math.exp(a)
    b_crit = math.exp(u)
    e_min = s_min * b_crit
    n = s.size
    sigma2 = rss_min / (n - 2)
    if at_bound:
        # At the edge of the search the curvature says nothing about the uncertainty.
        log_cov = np.full((2, 2), np.inf)
        log_b_crit_var = math.inf
    else:
        p = 1.0 / (1.0 + b_crit * inv_b)  # d log S_i / d log S_min; 1 − p is d/d log E_min
        jac = np.column_stack([p, 1.0 - p])
        log_cov = sigma2 * np.linalg.inv(jac.T @ jac)
        log_b_crit_var = max(log_cov[0, 0] + log_cov[1, 1] - 2.0 * log_cov[0, 1], 0.0)
    return ParetoFit(
        s_min=s_min,
        e_min=e_min,
        b_crit=b_crit,
        s_min_stderr=float(s_min * math.sqrt(log_cov[0, 0])),
        e_min_stderr=float(e_min * math.sqrt(log_cov[1, 1])),
        b_crit_stderr=float(b_crit * math.sqrt(log_b_crit_var)),
        log_b_crit_stderr=math.sqrt(log_b_crit_var),
        log_cov=log_cov,
        residual_std=math.sqrt(sigma2),
        n_points=n,
        at_bound=at_bound,
        log_steps=y,
        inv_batch=inv_b,
    )


def interval_text(low: float, high: float) -> str:
    """An interval as printed: ``[a, b]``, with an unbounded end as ``(0`` or ``∞)``."""
    left = "(0" if low == 0.0 else f"[{low:.4g}"
    right = "∞)" if math.isinf(high) else f"{high:.4g}]"
    return f"{left}, {right}"


def _search_grid(inv_b: np.ndarray) -> np.ndarray:
    """The grid of ln B_crit that the fit searches: smallest batch/SEARCH_SPAN to largest·SPAN."""
    lo = math.log(1.0 / float(inv_b.max()) / SEARCH_SPAN)
    hi = math.log(1.0 / float(inv_b.min()) * SEARCH_SPAN)
    return np.linspace(lo, hi, 801)


def _profile_rss(y: np.ndarray, inv_b: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The residual sum of squares of the best ln S_min (a mean) at each ln B_crit in ``u``."""
    r = y[None, :] - np.log1p(np.exp(u)[:, None] * inv_b[None, :])
    r -= r.mean(axis=1, keepdims=True)
    return np.einsum("ij,ij->i", r, r)


def golden_min(f: Callable[[float], float], lo: float, hi: float, tol: float = 1e-10) -> float:
    """Minimiser of a unimodal function on [lo, hi] by golden-section search."""
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c = hi - ratio * (hi - lo)
    d = lo + ratio * (hi - lo)
    fc, fd = f(c), f(d)
    while hi - lo > tol:
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - ratio * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + ratio * (hi - lo)
            fd = f(d)
    return (lo + hi) / 2.0


@dataclass(frozen=True)
class ParetoPoint:
    """The fastest run at one batch size to one goal: a point of the Pareto front.

    Attributes:
        batch_size: the runs' batch size.
        learning_rate: the learning rate of the fastest run.
        run: its name.
        steps: S, optimizer steps to the goal.
        examples: E, examples processed to the goal.
        b_simple: the run's B_simple averaged up to the goal (:func:`b_simple_average`), or
            ``None`` when it has none.
        ema_lag: how many steps the smoothed curve trails the raw one where it reaches the
            goal: the mean age of the EMA's weights (:func:`ema_lag`). For a curve that is
            locally linear, ``steps`` is late by this much.
        points_to_goal: recorded points up to and including the first at or below the goal.
    """

    batch_size: float
    learning_rate: float
    run: str
    steps: float
    examples: float
    b_simple: float | None
    ema_lag: float = 0.0
    points_to_goal: int = 0


@dataclass(frozen=True)
class GoalResult:
    """The critical batch size at one goal.

    Attributes:
        goal: the loss or error level.
        points: the Pareto front, one point per batch size that reached the goal, by batch size.
        fit: the eq. 2.11 fit through them.
        b_simple: the median over the points of their averaged B_simple, or ``None``.
        b_crit_lag_corrected: B_crit refitted with each point moved back by its EMA lag
            (:func:`lag_corrected_b_crit`), or ``None`` when that is not possible.
        warnings: caveats about this goal's numbers.
    """

    goal: float
    points: tuple[ParetoPoint, ...]
    fit: ParetoFit
    b_simple: float | None
    b_crit_lag_corrected: float | None = None
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (infinities become ``None``)."""
        fit = self.fit
        low, high = fit.b_crit_interval(0.95)
        s_low, s_high = fit.s_min_interval(0.95)
        e_low, e_high = fit.e_min_interval(0.95)
        return {
            "goal": self.goal,
            "s_min": fit.s_min,
            "s_min_stderr": _finite(fit.s_min_stderr),
            "s_min_low": _finite(s_low),
            "s_min_high": _finite(s_high),
            "e_min": fit.e_min,
            "e_min_stderr": _finite(fit.e_min_stderr),
            "e_min_low": _finite(e_low),
            "e_min_high": _finite(e_high),
            "b_crit": fit.b_crit,
            "b_crit_stderr": _finite(fit.b_crit_stderr),
            # Student's t on n − 2 degrees of freedom (ParetoFit.b_crit_interval)
            "b_crit_low": _finite(low),
            "b_crit_high": _finite(high),
            "log_b_crit_stderr": _finite(fit.log_b_crit_stderr),
            "b_crit_at_bound": fit.at_bound,
            "b_crit_lag_corrected": self.b_crit_lag_corrected,
            "residual_std": fit.residual_std,
            "b_simple": self.b_simple,
            "points": [
                {
                    "batch_size": p.batch_size,
                    "learning_rate": p.learning_rate,
                    "run": p.run,
                    "steps": p.steps,
                    "examples": p.examples,
                    "steps_fit": fit.steps(p.examples / p.steps),
                    "b_simple": p.b_simple,
                    "ema_lag": p.ema_lag,
                    "points_to_goal": p.points_to_goal,
                }
                for p in self.points
            ],
            "warnings": list(self.warnings),
        }


def pareto_points(runs: Sequence[Run], goal: float, *, decay: float) -> list[ParetoPoint]:
    """The Pareto front at ``goal``: per batch size, the run that reaches it in fewest steps.

    This is App. A.3's learning-rate selection: at each batch size the best learning rate is
    chosen separately for each goal. Ties in steps go to fewer examples, then to the earlier run.
    A batch size is left out when one of its runs stopped before the goal while not behind the
    fastest run that reached it (:func:`critical_batch_sizes` names it in a warning).
    """
    return _front([_SmoothedRun(r, decay) for r in runs], goal)[0]


def critical_batch_sizes(
    runs: Sequence[Run], goals: Sequence[float], *, decay: float
) -> list[GoalResult]:
    """B_crit at each goal from a grid of runs (paper App. A.3, eq. 2.11–2.12).

    Args:
        runs: the grid of runs (several learning rates per batch size).
        goals: metric levels (lower is better).
        decay: the EMA decay used to smooth each curve before looking for a goal.

    Raises:
        NoiseScaleInputError: a goal no run reaches, or one fewer than three batch sizes reach;
            a run whose batch_size disagrees with its examples per step (:func:`_check_units`).
    """
    unit_warnings = _check_units(runs)
    smoothed = [_SmoothedRun(r, decay) for r in runs]
    results = []
    for goal in goals:
        points, left_out = _front(smoothed, goal)
        at_start = [r for r in smoothed if r.at_start(goal)]
        if at_start and len(points) < MIN_BATCH_SIZES:
            # (a goal met at step 0 has no steps to it: "no run reaches ... choose a higher goal"
            # advised the opposite of the fix, a hunt 2026-12-07; one met at a first record at
            # step 50 was fitted as S = 50 everywhere: "B_crit < 0.0205" for a truth of 128)
            raise NoiseScaleInputError(
                f"{len(at_start)} run(s) (e.g. {at_start[0].run.name!r}) are already at or below "
                f"the goal {goal:g} at their first record, {_first_record_text(at_start, goal)}; "
                f"only {len(points)} batch size(s) reach it after their first record: choose a "
                "lower goal, one the runs reach by training" + _record_earlier(at_start)
            )
        if not points and not left_out:
            best = min(
                (float(r.smoothed.min()) for r in smoothed if r.smoothed.size), default=math.nan
            )
            raise NoiseScaleInputError(
                f"no run reaches the goal {goal:g} (the best smoothed value is {best:.6g}); "
                "choose a higher goal"
            )
        if len(points) < MIN_BATCH_SIZES:
            raise NoiseScaleInputError(
                f"only {len(points)} batch size(s) reach the goal {goal:g} "
                f"({', '.join(f'{p.batch_size:g}' for p in points)}); a fit of eq. 2.11 needs "
                f"at least {MIN_BATCH_SIZES}: choose a higher goal or add batch sizes"
                + "".join(f"; {m}" for m in left_out)
            )
        fit = fit_pareto([p.steps for p in points], [p.examples for p in points])
        values = [p.b_simple for p in points if p.b_simple is not None]
        corrected = lag_corrected_b_crit(points) if decay > 0 else fit.b_crit
        results.append(
            GoalResult(
                goal=float(goal),
                points=tuple(points),
                fit=fit,
                b_simple=float(np.median(values)) if values else None,
                b_crit_lag_corrected=corrected,
                warnings=(*unit_warnings, *left_out, *_warnings(points, fit, decay, corrected)),
            )
        )
    return results


def _check_units(runs: Sequence[Run]) -> list[str]:
    """Refuse runs whose ``batch_size`` is in another unit than their ``examples``; warn about
    runs whose examples per step are far from ``batch_size`` throughout.

    The fit's batch sizes are E/S, in the unit of ``examples``; the table shows ``batch_size``
    beside them. A tokens_seen counter beside a batch size in sequences is off by the sequence
    length at every point (a hunt, 2026-12-06: B_crit 1.6e4 printed beside batch sizes 16–1024,
    truth 128). So a run whose examples per step (:meth:`Run.step_batch_sizes`) are the same
    multiple of ``batch_size`` at every one of two or more points, beyond :data:`UNIT_FACTOR`
    either way, is refused — a fixed batch size processes batch_size examples a step, less at an
    epoch's end. One whose examples per step are beyond that factor at every point but change
    (a batch grown far from its nominal size, or records too few to tell) is warned about: its
    B_crit is in the unit of ``examples``. Warm-ups recorded sparsely and partial batches at
    epochs' ends stay within the factor at some point (a first version refused anything not
    within 5% of batch_size at some point: a review found both refused).

    Returns:
        The warnings, one per run warned about.

    Raises:
        NoiseScaleInputError: naming the first refused run, the ratio and the fix.
    """
    warnings = []
    for run in runs:
        sizes = run.step_batch_sizes()
        if not sizes.size:
            continue
        ratios = sizes / run.batch_size
        low, high = float(ratios.min()), float(ratios.max())
        if low <= UNIT_FACTOR and high >= 1.0 / UNIT_FACTOR:
            continue  # (some point within the factor)
        if sizes.size >= 2 and math.isclose(low, high, rel_tol=1e-2):
            raise NoiseScaleInputError(
                f"run {run.name!r}: batch_size {run.batch_size:g} but its examples column grows "
                f"by {float(np.median(sizes)):.6g} per step ({float(np.median(ratios)):.4g}× "
                "batch_size at every point): the two are in different units (e.g. examples "
                "counted in tokens, batch_size in sequences; or per device, or per micro-batch), "
                "and B_crit would come out in the unit of examples; give both in one unit "
                "(batch_size × sequence length for tokens), or leave the examples column out "
                "for runs at a fixed batch size"
            )
        warnings.append(
            f"run {run.name!r}: its examples per step are {low:.4g}–{high:.4g}× its batch_size "
            f"{run.batch_size:g} at every recorded point: B_crit is in the unit of the examples "
            "column — if that is another unit than batch_size (tokens, per device), give both in "
            "one unit"
        )
    return warnings


def lag_corrected_b_crit(points: Sequence[ParetoPoint]) -> float | None:
    """B_crit refitted after moving each Pareto point back by its EMA lag.

    Where the smoothed curve reaches the goal, a locally linear raw curve reached it
    ``ema_lag`` steps earlier, with ``ema_lag`` × (its batch size) fewer examples. Refitting
    eq. 2.11 to the moved points shows how much the smoothing biased B_crit: much, when the lag
    is the same number of steps everywhere (evenly spaced records); little, when it is a fixed
    fraction of each S (geometrically spaced records).

    Returns:
        The refitted B_crit, or ``None`` when a lag reaches the step count itself (nothing is
        left to fit) or the refit is at a bound of the search.
    """
    steps = np.array([p.steps - p.ema_lag for p in points])
    if np.any(steps <= 0):
        return None
    examples = np.array([p.examples * (p.steps - p.ema_lag) / p.steps for p in points])
    refit = fit_pareto(steps, examples)
    return None if refit.at_bound else refit.b_crit


def default_goals(runs: Sequence[Run], *, decay: float, count: int = 6) -> list[float]:
    """Goals spread over the range the runs achieve, each reached by at least three batch sizes.

    Per batch size take the best final smoothed value over learning rates; the goals are
    ``count`` values spaced geometrically (linearly if a value is ≤ 0) strictly between the
    worst and the best of these, at the midpoints of equal intervals, and those that fewer than
    three batch sizes reach are dropped.

    Raises:
        NoiseScaleInputError: fewer than three batch sizes, no goal that three reach, or
            runs whose batch_size disagrees with their examples (:func:`_check_units`).
    """
    _check_units(runs)
    smoothed = [_SmoothedRun(r, decay) for r in runs if r.metric.size]
    finals: dict[float, float] = {}
    for r in smoothed:
        finals[r.run.batch_size] = min(finals.get(r.run.batch_size, math.inf), r.final)
    if len(finals) < MIN_BATCH_SIZES:
        raise NoiseScaleInputError(
            f"the runs have {len(finals)} batch size(s); a fit of eq. 2.11 needs at least "
            f"{MIN_BATCH_SIZES}"
        )
    hi, lo = max(finals.values()), min(finals.values())
    fractions = (np.arange(count) + 0.5) / count
    geometric = lo > 0
    candidates = hi * (lo / hi) ** fractions if geometric else hi + (lo - hi) * fractions
    goals = [float(g) for g in candidates if len(_front(smoothed, float(g))[0]) >= MIN_BATCH_SIZES]
    if not goals:
        raise NoiseScaleInputError(
            "no goal between the worst and best final values is reached by three batch sizes; "
            "give goals with --goal"
        )
    return goals


class _SmoothedRun:
    """A run with its smoothed curve computed once for all goals."""

    def __init__(self, run: Run, decay: float) -> None:
        self.run = run
        self.decay = decay
        self.smoothed = ema_smoothed(run.metric, decay)
        self.final = float(self.smoothed[-1]) if self.smoothed.size else math.inf

    def at_start(self, goal: float) -> bool:
        """Whether the smoothed curve meets ``goal`` at its first record: its steps to the goal
        are then only bounded, by that record's step (none at step 0)."""
        return bool(self.smoothed.size and self.smoothed[0] <= goal)

    def point(self, goal: float) -> ParetoPoint | None:
        """The run's steps and examples to ``goal``; ``None`` where it does not reach it or
        meets it at its first record (:meth:`at_start`)."""
        run = self.run
        crossing = goal_crossing(run.step, run.examples, self.smoothed, goal)
        if crossing is None or crossing.index == 0 or crossing.step <= 0 or crossing.examples <= 0:
            return None
        b_simple = None
        if run.b_simple is not None:
            b_simple = b_simple_average(
                run.step, run.b_simple, run.step_batch_sizes(), until_step=crossing.step
            )
        return ParetoPoint(
            batch_size=run.batch_size,
            learning_rate=run.learning_rate,
            run=run.name,
            steps=crossing.step,
            examples=crossing.examples,
            b_simple=b_simple,
            ema_lag=ema_lag(run.step[: crossing.index + 1], self.decay),
            points_to_goal=crossing.index + 1,
        )


def _front(smoothed: Sequence[_SmoothedRun], goal: float) -> tuple[list[ParetoPoint], list[str]]:
    """The Pareto points at ``goal``, and why batch sizes whose point is unknown were left out.

    A run that ended before the goal (not by diverging) may have been about to reach it first:
    its batch size's point is known only when that run was behind the fastest run that reached
    the goal at its last step (or that run reached the goal by then). Otherwise the batch size
    is left out, with a message naming the run (a hunt, 2026-12-06: a run stopped at 98% of the
    way, ahead of the slower learning rate all along, doubled S at its batch size and moved
    B_crit from 128 to 81 without a word).
    """
    best: dict[float, tuple[ParetoPoint, _SmoothedRun]] = {}
    stopped: list[_SmoothedRun] = []
    left_out: dict[float, str] = {}
    for r in smoothed:
        if r.at_start(goal) and r.run.batch_size not in left_out:
            # (its steps to the goal are at most its first record's: a hunt, 2026-12-07, found
            # such a batch size dropped without a word, or kept with S = that record's step)
            left_out[r.run.batch_size] = (
                f"batch size {r.run.batch_size:g} is left out at the goal {goal:g}: run "
                f"{r.run.name!r} is at or below it at its first record, "
                f"{_first_record_text([r], goal)}, and the fastest run at this batch size is "
                "unknown: choose a lower goal" + _record_earlier([r])
            )
        p = r.point(goal)
        if p is None:
            if r.run.diverged_at_step is None and r.final > goal:
                stopped.append(r)
            continue
        incumbent = best.get(p.batch_size)
        if incumbent is None or (p.steps, p.examples) < (incumbent[0].steps, incumbent[0].examples):
            best[p.batch_size] = (p, r)
    for r in stopped:
        batch_size = r.run.batch_size
        if batch_size not in best or batch_size in left_out:
            continue
        p, fastest = best[batch_size]
        last = float(r.run.step[-1])
        if p.steps <= last:
            continue  # the fastest run was at the goal before this one stopped
        if last >= fastest.run.step[0]:
            value = float(np.interp(last, fastest.run.step, fastest.smoothed))
            if value < r.final:
                continue  # behind the fastest run where it stopped
            where = f"{fastest.run.name!r} was at {value:.6g} there"
        else:
            where = f"{fastest.run.name!r} had no record yet"
        left_out[batch_size] = (
            f"batch size {batch_size:g} is left out at the goal {goal:g}: run {r.run.name!r} "
            f"stopped at step {last:g} (smoothed {r.final:.6g}) before reaching it, not behind "
            f"the fastest run that did ({where}; it reaches the goal at step {p.steps:.6g}), so "
            "the steps to the goal at this batch size are unknown: run it longer, or choose a "
            "goal it reaches"
        )
    points = [best[b][0] for b in sorted(best) if b not in left_out]
    return points, [left_out[b] for b in sorted(left_out)]


def _first_record_text(runs: Sequence[_SmoothedRun], goal: float) -> str:
    """Where runs meeting ``goal`` at their first record have it, and what that leaves known."""
    first = sorted({float(r.run.step[0]) for r in runs})
    start = max(float(r.smoothed[0]) for r in runs)
    text = f"step {', '.join(f'{s:g}' for s in first)} (smoothed {start:.6g}), so "
    if first[-1] <= 0:
        return text + "there are no steps to it to compare"
    return text + "the steps to it are only known to be at most that"


def _record_earlier(runs: Sequence[_SmoothedRun]) -> str:
    """The second fix for runs meeting a goal at a first record after step 0."""
    if all(float(r.run.step[0]) <= 0 for r in runs):
        return ""
    return ", or record the metric from step 0 and more often early on"


def _warnings(
    points: Sequence[ParetoPoint], fit: ParetoFit, decay: float, corrected: float | None
) -> list[str]:
    out = []
    batch_sizes = [p.batch_size for p in points]
    b_lo, b_hi = min(batch_sizes), max(batch_sizes)
    low, high = fit.b_crit_interval(0.95)
    interval = interval_text(low, high)
    scatter = (
        f"or the run-to-run scatter (residual spread of log S {fit.residual_std:.2g}) hides it: "
        "repeat the runs (seeds) or add batch sizes"
    )
    if fit.at_bound == "lower":
        # (the edge is not a bound: name the grid as the cause only where the interval shows it)
        where = (
            f"it lies below every batch size measured (95% interval {interval}): add smaller "
            "batch sizes to measure it"
            if high < b_lo
            else f"its 95% interval is {interval}: either it is below the batch sizes measured "
            f"({b_lo:g}–{b_hi:g}) {scatter}"
        )
        out.append(
            "the fit reached the lower edge of its search: the steps to this goal do not fall "
            f"with batch size enough to bound B_crit from below; {where}"
        )
    elif fit.at_bound == "upper":
        where = (
            f"it lies above every batch size measured (95% interval {interval}): add larger "
            "batch sizes to measure it"
            if low > b_hi
            else f"its 95% interval is {interval}: either it is above the batch sizes measured "
            f"({b_lo:g}–{b_hi:g}) {scatter}"
        )
        out.append(
            "the fit reached the upper edge of its search: the steps to this goal fall as 1/B "
            f"too closely to bound B_crit from above; {where}"
        )
    # (S_min's and E_min's delta-method ± held the truth in 74-80% of such fronts, a review
    # 2026-12-07: their intervals are profile-likelihood ones too)
    unreliable = (
        f"; S_min's and E_min's ± are unreliable there too: their 95% intervals are "
        f"{interval_text(*fit.s_min_interval(0.95))} and {interval_text(*fit.e_min_interval(0.95))}"
    )
    lag = float(np.mean([p.ema_lag for p in points]))
    if decay > 0 and fit.at_bound is None:
        if corrected is None:
            out.append(
                f"the EMA (decay {decay:g}) trails the curves by ~{lag:.3g} steps at the goal, "
                "as long as the fastest run takes to reach it: its effect on B_crit cannot be "
                "measured; lower --ema or record points more often"
            )
        elif abs(corrected / fit.b_crit - 1.0) > MAX_LAG_SHIFT:
            out.append(
                f"the EMA (decay {decay:g}) trails the curves by ~{lag:.3g} steps at the goal; "
                f"moving each point back by its lag gives B_crit = {corrected:.4g} instead of "
                f"{fit.b_crit:.4g} ({corrected / fit.b_crit - 1.0:+.0%}): lower --ema or record "
                "points more often (geometrically spaced records make the lag cancel)"
            )
    early = [p for p in points if p.points_to_goal < MIN_POINTS_TO_GOAL]
    if early:
        sizes = ", ".join(f"{p.batch_size:g}" for p in early)
        out.append(
            f"short runs to this goal: at batch size {sizes}"
            f" it is reached within the first {max(p.points_to_goal for p in early)} recorded "
            "point(s), so S there rests on the first few records: record the metric more often "
            "or choose a harder goal"
        )
    if fit.at_bound is None and not b_lo <= fit.b_crit <= b_hi:
        out.append(
            f"B_crit = {fit.b_crit:.3g} is outside the batch sizes measured "
            f"({b_lo:g}–{b_hi:g}): an extrapolation (95% interval {interval}){unreliable}"
        )
    elif fit.at_bound is None and (low < b_lo or high > b_hi):
        # (the interval, not only the point: 11-17% of such fits held the truth with the delta
        # method's interval and no warning, a hunt 2026-12-07)
        out.append(
            f"B_crit = {fit.b_crit:.3g}, but its 95% interval {interval} reaches beyond the batch "
            f"sizes measured ({b_lo:g}–{b_hi:g}): the front does not pin B_crit down there; add "
            f"batch sizes beyond that end, or repeat the runs to shrink the scatter{unreliable}"
        )
    return out


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
