"""A batch-size warm-up fitted to the measured local critical batch sizes, and what it saves.

Merrill et al. 2025 grow the batch size as the measured critical batch size grows (a *batch-size
warm-up*): from each branch point on, train at the largest allowed batch size that was within
the tolerance there. :func:`fit_warmup` builds that schedule as stepwise knots ``(examples
consumed, batch size)`` — the form :meth:`noisescale.schedule.BatchSizeRamp.stepwise` takes —
and predicts what it saves against the main run's fixed batch size B₀:

* **Steps at equal examples** (exact, no model): over the same ``total`` examples, the fixed
  batch takes total/B₀ steps and the warm-up Σ (length of each stage)/(its batch size). This is
  the comparison of Merrill et al. (43% fewer steps for OLMo 1B at the same tokens).
* **Steps at equal progress** (a prediction of the paper's model, eq. D.1): with the noise
  scale B_crit(s) measured by the branches (the eq. 2.11 reading, interpolated between branch
  points, held constant beyond the first and last), a step at batch B makes B/(B + B_crit)
  full-batch steps of progress. The fixed run's progress over ``total`` examples is
  s_end = ∫de/(B₀ + B_crit); the warm-up, with its batch set by the examples *it* has
  consumed, needs dE/ds = B(E) + B_crit(s) examples and dS/ds = 1 + B_crit(s)/B(E) steps per
  unit of progress. Integrated to s_end, that gives the examples and steps the warm-up needs to
  match the fixed run's loss.

Pure NumPy; :meth:`WarmupPlan.ramp` builds the :class:`~noisescale.schedule.BatchSizeRamp`
(and imports torch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from noisescale.branch.compare import LocalCriticalBatch
from noisescale.errors import NoiseScaleInputError

if TYPE_CHECKING:
    from noisescale.schedule import BatchSizeRamp

#: Which end of the measured critical batch size a warm-up follows: the estimate, or the lower
#: end of its interval (safer when few seeds make the estimate noisy).
USE = ("estimate", "low")
#: Integration steps in full-batch progress for the eq. D.1 prediction.
PROGRESS_STEPS = 4000


@dataclass(frozen=True)
class WarmupPlan:
    """A stepwise batch-size warm-up and its predicted savings (module docstring).

    Attributes:
        knots: ``(examples consumed, batch size)`` stages, the first at 0; each batch size
            holds until the next knot.
        base_batch_size: B₀, the fixed batch size compared against.
        total: Examples (tokens) over which steps are counted.
        steps_fixed: total/B₀.
        steps_warmup: Steps of the warm-up over the same examples.
        step_saving: 1 − steps_warmup/steps_fixed.
        examples_same_progress: Examples the warm-up needs for the fixed run's progress (eq.
            D.1 with the measured B_crit; ``nan`` without one).
        steps_same_progress: Steps the warm-up needs for that progress.
        step_saving_same_progress: 1 − steps_same_progress/steps_fixed.
        same_progress_reason: Why there is no prediction at equal progress (``nan``): no
            measured B_crit, or one that is only a bound; empty otherwise.
    """

    knots: tuple[tuple[float, int], ...]
    base_batch_size: int
    total: float
    steps_fixed: float
    steps_warmup: float
    step_saving: float
    examples_same_progress: float
    steps_same_progress: float
    step_saving_same_progress: float
    same_progress_reason: str = ""

    def batch_size_at(self, consumed: float) -> int:
        """The warm-up's batch size after ``consumed`` examples."""
        return stage_batch_size(self.knots, consumed)

    def ramp(self, micro_batch_size: int, **kwargs: Any) -> BatchSizeRamp:
        """The warm-up as a :meth:`~noisescale.schedule.BatchSizeRamp.stepwise` schedule.

        Args:
            micro_batch_size: Every stage's batch size must be a multiple of it.
            **kwargs: Passed on (``lr_rule``, ``base_batch_size``, ``optimizer``, …).
        """
        from noisescale.schedule import BatchSizeRamp

        return BatchSizeRamp.stepwise(list(self.knots), micro_batch_size=micro_batch_size, **kwargs)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite numbers as ``null``)."""
        out: dict[str, Any] = {"knots": [[x, b] for x, b in self.knots]}
        for name in (
            "base_batch_size",
            "total",
            "steps_fixed",
            "steps_warmup",
            "step_saving",
            "examples_same_progress",
            "steps_same_progress",
            "step_saving_same_progress",
            "same_progress_reason",
        ):
            value = getattr(self, name)
            out[name] = value if not isinstance(value, float) or math.isfinite(value) else None
        return out


def stage_batch_size(knots: Sequence[tuple[float, int]], consumed: float) -> int:
    """The batch size of the stage ``consumed`` falls in (stepwise knots, first at 0)."""
    batch = knots[0][1]
    for start, b in knots:
        if consumed >= start:
            batch = b
    return int(batch)


def warmup_steps(knots: Sequence[tuple[float, int]], total: float) -> float:
    """Optimizer steps of a stepwise warm-up over ``total`` examples: Σ stage length/batch size.

    Continuous: each stage's last step is counted fractionally (a real schedule rounds it up,
    at most one step per stage more).

    Example:
        >>> warmup_steps([(0, 8), (1000, 32), (5000, 128)], 10_000)  # 125 + 125 + 39.0625
        289.0625
    """
    steps = 0.0
    for i, (start, b) in enumerate(knots):
        end = knots[i + 1][0] if i + 1 < len(knots) else math.inf
        length = max(0.0, min(end, total) - start)
        steps += length / b
    return steps


def fit_warmup(
    results: Sequence[LocalCriticalBatch],
    *,
    base_batch_size: int,
    total: float,
    batch_sizes: Sequence[int] | None = None,
    use: str = "estimate",
    factor: float = 1.0,
) -> WarmupPlan:
    """The stepwise warm-up that follows the measured local critical batch size.

    From each branch point on (in order along the run), the batch size is the largest allowed
    one at most ``factor`` × the measured critical batch size there (``cbs``, or the lower end
    of its interval with ``use="low"``), never smaller than the previous stage's (a warm-up
    only grows), and at least the smallest allowed. Before the first branch point the batch is
    the smallest allowed one. Branch points whose ``cbs`` is not available are skipped.

    Args:
        results: Local critical batch sizes along the run (:func:`local_critical_batch_sizes`).
        base_batch_size: B₀, the fixed batch size the savings are counted against.
        total: Examples (tokens) over which to count steps, e.g. the main run's length.
        batch_sizes: The allowed batch sizes (default: those the branches tested).
        use: ``"estimate"`` or ``"low"``.
        factor: Multiple of the critical batch size to aim for (≤ 1 is safer).

    Raises:
        NoiseScaleInputError: no results, a bad ``use``/``factor``/``total``, no allowed
            batch size, or ``use="low"`` where a measured CBS has no interval (one seed).
    """
    if not results:
        raise NoiseScaleInputError("a warm-up needs at least one measured branch point")
    if use not in USE:
        raise NoiseScaleInputError(f"use must be one of {', '.join(USE)}, got {use!r}")
    if not (math.isfinite(factor) and factor > 0):
        raise NoiseScaleInputError(f"factor must be positive, got {factor!r}")
    if not (math.isfinite(total) and total > 0):
        raise NoiseScaleInputError(f"total must be a positive number of examples, got {total!r}")
    if base_batch_size < 1:
        raise NoiseScaleInputError(f"base_batch_size must be positive, got {base_batch_size!r}")
    allowed = sorted(
        {int(b) for b in batch_sizes}
        if batch_sizes is not None
        else {int(b.batch_size) for r in results for b in r.batches}
    )
    if not allowed or allowed[0] < 1:
        raise NoiseScaleInputError("the warm-up needs positive allowed batch sizes")
    ordered = sorted(results, key=lambda r: r.checkpoint)
    if use == "low":
        # A point whose CBS was measured without an interval (one seed) has no lower end:
        # skipping it left the warm-up at the smallest batch size there, without a word (until
        # 2026-12-07; a review).
        lacking = [
            r.checkpoint for r in ordered if math.isfinite(r.cbs) and not math.isfinite(r.cbs_low)
        ]
        if lacking:
            raise NoiseScaleInputError(
                "use='low' follows the lower end of the CBS's interval, and the branch point(s) "
                f"at {', '.join(f'{c:g}' for c in lacking)} have none (one seed: no interval); "
                "repeat their branches with other data orders (seeds), or use='estimate'"
            )
    knots: list[tuple[float, int]] = [(0.0, allowed[0])]
    for r in ordered:
        target = (r.cbs if use == "estimate" else r.cbs_low) * factor
        if not (math.isfinite(target) and target > 0):
            continue
        fitting = [b for b in allowed if b <= target * (1 + 1e-9)]
        batch = max(fitting[-1] if fitting else allowed[0], knots[-1][1])
        if batch == knots[-1][1]:
            continue
        if r.checkpoint <= knots[-1][0]:
            knots[-1] = (knots[-1][0], batch)
        else:
            knots.append((float(r.checkpoint), batch))
    steps_fixed = total / base_batch_size
    steps_warm = warmup_steps(knots, total)
    # A B_crit that is only a bound (no batch size lost examples measurably: ≥ the largest;
    # or all lost more than eq. 2.11 allows: ≤ the smallest) is no measurement to integrate:
    # eq. D.1 with the bound's value is neither the prediction nor a bound on it (until
    # 2026-12-07 it was used as measured, without a word; found by tests/fuzz_branch.py).
    bounded = [r for r in ordered if r.b_crit_bound is not None and math.isfinite(r.b_crit)]
    reason = ""
    if bounded:
        e_same, s_same = math.nan, math.nan
        reason = (
            "B_crit is only a bound at "
            + ", ".join(
                f"checkpoint {r.checkpoint:g} ({'≥' if r.b_crit_bound == 'upper' else '≤'} "
                f"{r.b_crit:.3g})"
                for r in bounded
            )
            + ": branch at batch sizes that bracket it to predict the steps at equal progress"
        )
    else:
        e_same, s_same = _same_progress(ordered, knots, base_batch_size, total)
        unmeasured = [r.checkpoint for r in ordered if not math.isfinite(r.b_crit)]
        if not math.isfinite(e_same):
            reason = "no branch point measured B_crit"
        elif unmeasured:
            # Interpolated over, without a word, as if not branched there (until 2026-12-07;
            # since then one with seeds past both ends of the batch sizes has none, a review)
            e_same, s_same = math.nan, math.nan
            reason = (
                "no B_crit at checkpoint(s) "
                + ", ".join(f"{c:g}" for c in unmeasured)
                + " (their warnings say why): measure it there, or leave those branch points "
                "out to predict the steps at equal progress from the others"
            )
    return WarmupPlan(
        knots=tuple(knots),
        base_batch_size=int(base_batch_size),
        total=float(total),
        steps_fixed=steps_fixed,
        steps_warmup=steps_warm,
        step_saving=1.0 - steps_warm / steps_fixed,
        examples_same_progress=e_same,
        steps_same_progress=s_same,
        step_saving_same_progress=1.0 - s_same / steps_fixed,
        same_progress_reason=reason,
    )


def b_crit_along(results: Sequence[LocalCriticalBatch], examples: np.ndarray) -> np.ndarray:
    """The measured B_crit (eq. 2.11 reading) at main-run positions ``examples``.

    Each measurement stands at the middle of its branch window (checkpoint + budget/2);
    between them it is interpolated linearly, beyond them held constant. ``nan`` everywhere
    without a measurement.
    """
    points = sorted(
        (r.checkpoint + r.budget / 2.0, r.b_crit)
        for r in results
        if math.isfinite(r.b_crit) and r.b_crit > 0
    )
    if not points:
        return np.full(np.shape(examples), np.nan)
    x, y = (np.array(v, dtype=float) for v in zip(*points, strict=True))
    return np.interp(examples, x, y)


def _same_progress(
    results: Sequence[LocalCriticalBatch],
    knots: Sequence[tuple[float, int]],
    base_batch_size: int,
    total: float,
) -> tuple[float, float]:
    """Examples and steps the warm-up needs for the fixed run's progress (eq. D.1)."""
    e_main = np.linspace(0.0, total, PROGRESS_STEPS + 1)
    b_crit = b_crit_along(results, e_main)
    if not np.all(np.isfinite(b_crit)):
        return math.nan, math.nan
    # The fixed run: ds/de = 1/(B₀ + B_crit(e)); s as a function of its examples.
    rate = 1.0 / (base_batch_size + b_crit)
    s_main = np.concatenate([[0.0], np.cumsum(np.diff(e_main) * (rate[1:] + rate[:-1]) / 2)])
    s_end = float(s_main[-1])
    ds = s_end / PROGRESS_STEPS
    e_warm, steps = 0.0, 0.0
    for i in range(PROGRESS_STEPS):
        # Midpoint rule in s; B_crit(s) from the fixed run's mapping, B from the warm-up's own
        # examples, advanced to the middle of the interval first.
        s_mid = (i + 0.5) * ds
        crit = float(np.interp(s_mid, s_main, b_crit))
        b_half = stage_batch_size(knots, e_warm)
        e_mid = e_warm + 0.5 * ds * (b_half + crit)
        b = stage_batch_size(knots, e_mid)
        e_warm += ds * (b + crit)
        steps += ds * (1.0 + crit / b)
    return e_warm, steps
