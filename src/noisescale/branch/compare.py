"""The local critical batch size from branches of one run (Merrill et al. 2025), read with eq. 2.11.

A *branch point* is a checkpoint of a training run, taken after it had consumed ``checkpoint``
examples (or tokens). From it, short branches train for the same number of examples Δ (the
*budget*) at several batch sizes B, each with its learning rate, and with several data orders
(*seeds*). Comparing them at equal examples answers the question the noise scale only predicts:
up to which batch size does the run lose (almost) nothing per example?

**Efficiency.** Branch B ends at loss L_B(Δ). The reference branch (the smallest batch size,
or the one with the lowest loss, see ``reference``) needed E_ref(L_B(Δ)) examples to reach
that loss, read off its own curve. The efficiency of B is

    η_B = E_ref(L_B(Δ)) / Δ  ∈ [0, 1],

the fraction of its examples that B turned into progress, counted against the reference. It is
capped at 1: a branch that ends lower than the reference counts as fully efficient.

**Local critical batch size at tolerance τ** (Merrill et al.'s definition, stated in examples
rather than as a loss gap so that it does not depend on the loss's scale): the largest batch
size whose branch needs at most (1 + τ) times the reference's examples, 1/η_B ≤ 1 + τ. Between
the largest tested batch size within the tolerance and the next one it is interpolated linearly
in 1/η_B, which eq. 2.11 makes linear in B.

**Eq. 2.11 reading.** If the branch's stretch of training follows the paper's model with a noise
scale B_crit that is constant over the branch, a run at batch B needs E = E_min(1 + B/B_crit)
examples for a given progress (eq. 2.11), so

    1/η_B = (B + B_crit) / (B_ref + B_crit)

for every B. ``b_crit`` is the B_crit that fits the measured efficiencies (least squares in
log 1/η over the batch sizes above the reference): the critical batch size of McCandlish et al.
measured over the branch's window, the number to set beside B_simple. Under the model the
threshold reads cbs = τ·B_crit + (1 + τ)·B_ref, so at τ = 1 and a small reference it is B_crit.

**Uncertainty.** Both numbers are computed for each seed (every batch size's branch with that
data order against the reference's branch with the same order); the estimate is their geometric
mean and the interval a Student-t interval of their logarithms (exact coverage when the log
estimates are normal and independent across seeds). One seed gives no interval. The learning
rate of each batch size, when several were tried, is the one with the lowest mean loss at the
budget over its seeds (smoothed: where the lag-corrected curves stand for the same examples) —
chosen once, on all seeds, so the interval does not include the
uncertainty of that choice.

Pure NumPy: no torch, no Optuna, no plotting.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from noisescale.errors import NoiseScaleInputError
from noisescale.sweep.pareto import ema_lag, ema_smoothed, goal_crossing, golden_min
from noisescale.sweep.pareto import interval_text as _interval_text
from noisescale.sweep.runs import Run

#: What the other branches are compared against: the smallest batch size's branch, or the one
#: with the lowest loss at the budget (which stays right when curves cross, Zhou et al. 2026).
REFERENCES = ("smallest", "best")
#: Tolerance τ unless told otherwise: a batch size within it needs at most 20% more examples
#: than the reference for the same loss.
DEFAULT_TOLERANCE = 0.2
#: B_crit of the eq. 2.11 fit is searched between (smallest batch)/SPAN and (largest)·SPAN; a
#: fit at either end means the efficiencies do not resolve it.
SPAN = 1e3
#: A branch whose examples stop short of the budget by more than this fraction is refused.
BUDGET_SLACK = 1e-9


@dataclass(frozen=True)
class BranchRun:
    """One branch: from the checkpoint taken at ``checkpoint``, ``budget`` examples at one batch
    size, learning rate and data order.

    Attributes:
        checkpoint: Examples (or tokens) the main run had consumed at the branch point.
        seed: The data order of the branch.
        budget: Examples (or tokens) the branch was asked to train for.
        run: Its curve: ``run.examples`` counts from the branch point (0 at the checkpoint),
            ``run.metric`` is the loss, ``run.batch_size`` and ``run.learning_rate`` its
            settings.
    """

    checkpoint: float
    seed: int
    budget: float
    run: Run

    @property
    def batch_size(self) -> float:
        """The branch's batch size."""
        return self.run.batch_size

    @property
    def learning_rate(self) -> float:
        """The branch's learning rate."""
        return self.run.learning_rate


@dataclass(frozen=True)
class BatchEfficiency:
    """One batch size at one branch point.

    Attributes:
        batch_size: B.
        learning_rate: The learning rate used for the comparison (the best of those tried).
        learning_rates: Every learning rate tried at B.
        loss: Mean loss at the budget over the seeds, at that learning rate (``inf`` when a
            branch diverged).
        efficiency: Mean over the seeds of η_B (1 for the reference).
        efficiencies: η_B per seed, in the order of :attr:`LocalCriticalBatch.seeds`.
        within_tolerance: Whether the mean efficiency is within the tolerance: 1/η ≤ 1 + τ.
    """

    batch_size: float
    learning_rate: float
    learning_rates: tuple[float, ...]
    loss: float
    efficiency: float
    efficiencies: tuple[float, ...]
    within_tolerance: bool

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite numbers as ``null``)."""
        return {
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "learning_rates": list(self.learning_rates),
            "loss": _json(self.loss),
            "efficiency": _json(self.efficiency),
            "efficiencies": [_json(e) for e in self.efficiencies],
            "within_tolerance": self.within_tolerance,
        }


@dataclass(frozen=True)
class LocalCriticalBatch:
    """The local critical batch size at one branch point (module docstring).

    Attributes:
        checkpoint: Where along the main run the branches start (examples or tokens).
        budget: Δ, the examples (tokens) each branch trained for.
        tolerance: τ.
        reference: ``"smallest"`` or ``"best"``.
        reference_batch_size: B_ref.
        cbs: The largest batch size within the tolerance (interpolated), geometric mean over
            seeds; a lower bound when ``cbs_bound == "upper"``.
        cbs_low, cbs_high: Its confidence interval (NaN with one seed; ``inf`` above when
            censored).
        cbs_bound: ``"upper"``: some seed kept even the largest batch size within the
            tolerance (test larger ones); ``"lower"``: the first batch size above the reference
            already falls outside it for every seed, so the value is interpolated from the
            reference (test batch sizes in between); ``None`` otherwise.
        b_crit: B_crit of eq. 2.11 fitted to the efficiencies, geometric mean over seeds.
        b_crit_low, b_crit_high: Its confidence interval.
        b_crit_bound: ``"upper"``/``"lower"`` when a seed's fit ran into the end of the search
            (no batch size lost examples measurably, or all lost more than eq. 2.11 allows).
        seeds: The data orders compared (present at every batch size).
        batches: Every batch size, in increasing order.
        crossing: A batch size above the reference ended at least as low as the reference:
            eq. 2.11 says it cannot, so the curves cross (as under warmup-stable-decay schedules,
            Zhou et al. 2026) or the learning rates are far from tuned.
        confidence: The intervals' nominal coverage.
        warnings: What may make the numbers untrustworthy.
    """

    checkpoint: float
    budget: float
    tolerance: float
    reference: str
    reference_batch_size: float
    cbs: float
    cbs_low: float
    cbs_high: float
    cbs_bound: str | None
    b_crit: float
    b_crit_low: float
    b_crit_high: float
    b_crit_bound: str | None
    seeds: tuple[int, ...]
    batches: tuple[BatchEfficiency, ...]
    crossing: bool
    confidence: float
    warnings: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite numbers as ``null``)."""
        return {
            "checkpoint": self.checkpoint,
            "budget": self.budget,
            "tolerance": self.tolerance,
            "reference": self.reference,
            "reference_batch_size": self.reference_batch_size,
            "cbs": _json(self.cbs),
            "cbs_low": _json(self.cbs_low),
            "cbs_high": _json(self.cbs_high),
            "cbs_bound": self.cbs_bound,
            "b_crit": _json(self.b_crit),
            "b_crit_low": _json(self.b_crit_low),
            "b_crit_high": _json(self.b_crit_high),
            "b_crit_bound": self.b_crit_bound,
            "seeds": list(self.seeds),
            "batches": [b.as_dict() for b in self.batches],
            "crossing": self.crossing,
            "confidence": self.confidence,
            "warnings": list(self.warnings),
        }


def loss_at_budget(branch: BranchRun, *, decay: float = 0.0) -> float:
    """The (EMA-smoothed) loss of a branch after exactly its budget, interpolated between records.

    A branch that diverged before the budget has loss ``inf``.

    Raises:
        NoiseScaleInputError: the branch's records stop short of its budget, or start past it
            (examples counted along the main run instead of from the branch point).
    """
    run = branch.run
    if run.examples.size and run.examples[0] > branch.budget * (1 + BUDGET_SLACK):
        raise NoiseScaleInputError(
            f"the branch at checkpoint {branch.checkpoint:g}, batch size {run.batch_size:g}, "
            f"learning rate {run.learning_rate:g}, seed {branch.seed} reported its first loss at "
            f"{float(run.examples[0]):g} examples, past its budget of {branch.budget:g}: steps "
            "and examples count from the branch point (0 at the checkpoint), not along the main "
            "run; report examples=0 at the checkpoint and the examples the branch itself has seen"
        )
    if run.examples.size and run.examples[-1] >= branch.budget * (1 - BUDGET_SLACK):
        smoothed = ema_smoothed(run.metric, decay)
        return float(np.interp(branch.budget, run.examples, smoothed))
    if run.diverged_at_step is not None:
        return math.inf
    reached = float(run.examples[-1]) if run.examples.size else 0.0
    raise NoiseScaleInputError(
        f"the branch at checkpoint {branch.checkpoint:g}, batch size {run.batch_size:g}, "
        f"learning rate {run.learning_rate:g}, seed {branch.seed} reported up to {reached:g} "
        f"examples, short of its budget of {branch.budget:g}: train for at least the budget "
        "and report the loss at the end"
    )


def lag_at_budget(branch: BranchRun, *, decay: float = 0.0) -> float:
    """How many examples the EMA-smoothed loss at the budget trails the budget (0 unsmoothed).

    The smoothed value at a record is a weighted mean of the records before it
    (:func:`~noisescale.sweep.ema_lag`); for a curve linear in the examples it equals the curve
    this many examples earlier.
    """
    return _lag_at(branch.run.examples, decay, branch.budget)


def _lag_at(examples: np.ndarray, decay: float, x: float) -> float:
    """The EMA's lag (:func:`~noisescale.sweep.ema_lag`) at ``x`` examples, interpolated between
    the records around it as the smoothed curve is (:func:`loss_at_budget`,
    :func:`~noisescale.sweep.goal_crossing`). On a curve linear in the examples the interpolated
    smoothed value is then the raw curve exactly this many examples earlier; the lag at the next
    record instead is off by up to a record's spacing in the EMA's first records, where the lag
    grows from 0 (a hunt, 2026-12-07: B_crit 0.356 for 1.6 at ``--ema 0.9``)."""
    i = int(np.searchsorted(examples, x, side="left"))
    if i == 0:
        return 0.0
    if i >= examples.size:
        return ema_lag(examples, decay)
    after = ema_lag(examples[: i + 1], decay)
    span = float(examples[i] - examples[i - 1])
    if span <= 0:
        return after
    frac = (x - float(examples[i - 1])) / span
    return (1.0 - frac) * ema_lag(examples[:i], decay) + frac * after


def efficiency(reference: BranchRun, loss: float, *, decay: float = 0.0, lag: float = 0.0) -> float:
    """η = E_ref(loss)/Δ: the fraction of the budget the reference needed to reach ``loss``.

    E_ref is where the reference's (smoothed) curve first reaches ``loss``, interpolated between
    its records. ``1`` when it does not reach it within the budget (the other branch did at
    least as well; with smoothing, its lag-corrected curve extended to where the other's loss
    stands for, :func:`_extended_crossing`), ``0`` for a diverged branch (``loss`` = ``inf``).

    With smoothing (``decay`` > 0) both ends are corrected for the EMA's lag: ``loss`` is the
    other branch's smoothed loss at the budget, which stands for its loss ``lag`` examples
    earlier (:func:`lag_at_budget`), and the reference's smoothed curve crosses it late by its
    own lag there, so η = (E_ref − lag_ref)/(Δ − lag). Exact for curves linear in the examples
    over the EMA's span; without the correction η would be biased towards 1 by about
    (1 − η)·lag/Δ.

    Raises:
        NoiseScaleInputError: the reference's first record lies past the branch point and its
            loss there is already below ``loss`` (where it reached it is not measured).
    """
    if not math.isfinite(loss):
        return 0.0
    run = reference.run
    smoothed = ema_smoothed(run.metric, decay)
    crossing = goal_crossing(run.step, run.examples, smoothed, loss)
    if crossing is None:
        reached = _extended_crossing(reference, smoothed, loss, decay, lag)
        return 1.0 if reached is None else float(min(1.0, reached / (reference.budget - lag)))
    if crossing.index == 0 and run.examples[0] > 0 and smoothed[0] < loss:
        # Reached before its first record: anywhere in [0, that record] — η was read as the
        # record's own position (0.5 for 0.3 with the reference first recorded at half the
        # budget, no warning; a review, 2026-12-07).
        raise NoiseScaleInputError(
            f"the reference branch at checkpoint {reference.checkpoint:g} (batch size "
            f"{run.batch_size:g}, learning rate {run.learning_rate:g}, seed {reference.seed}) "
            f"first reported its loss at {float(run.examples[0]):g} examples, and another "
            f"branch's loss at the budget ({loss:g}) lies above that first loss "
            f"({float(smoothed[0]):g}): the reference reached it before its first record, so "
            "how many examples it needed is not measured. Report the loss at the checkpoint "
            "(examples=0) and from the first steps on"
        )
    own_lag = _lag_at(run.examples, decay, crossing.examples)
    reached = max(0.0, crossing.examples - own_lag)
    return float(min(1.0, reached / (reference.budget - lag)))


def _extended_crossing(
    reference: BranchRun, smoothed: np.ndarray, loss: float, decay: float, lag: float
) -> float | None:
    """Where the reference's lag-corrected curve reaches ``loss`` past its last smoothed value.

    Its smoothed loss at the budget stands for its loss ``lag_ref`` examples earlier; where that
    lag exceeds the other branch's (``lag``: records spaced otherwise in examples), the smoothed
    curve ends short of the point the other branch's loss stands for, and not reaching that loss
    says nothing (a review, 2026-12-07: η = 1 for 0.90, with "the curves cross" as the cause).
    The curve is extended linearly by its lag-corrected slope over its last EMA span (exact for
    curves linear there). ``None`` where the lags leave no gap or the curve does not fall.
    """
    run = reference.run
    lag_ref = _lag_at(run.examples, decay, reference.budget)
    if decay == 0.0 or lag_ref <= lag:
        return None
    keep = run.examples < reference.budget
    x = np.append(run.examples[keep], reference.budget)
    y = np.append(smoothed[keep], np.interp(reference.budget, run.examples, smoothed))
    x = x - np.array([_lag_at(run.examples, decay, float(v)) for v in x])
    x, first = np.unique(x, return_index=True)
    y = y[first]
    tail = x >= x[-1] - lag_ref
    if np.count_nonzero(tail) < 2:
        tail[-2:] = True
    slope = float(np.polyfit(x[tail], y[tail], 1)[0])
    if not slope < 0:
        return None
    return float(x[-1] + (loss - y[-1]) / slope)


def _mean_losses_at_equal_examples(
    groups: dict[Any, Sequence[BranchRun]], decay: float
) -> dict[Any, float]:
    """Each group's mean smoothed loss where it stands for the same examples as every other
    group's: each branch's lag-corrected smoothed curve (a record's smoothed value stands for
    the curve its EMA lag earlier, :func:`_lag_at`) read at Δ minus the largest lag at the
    budget among all of them, so that no curve is extrapolated. Exact for curves linear over
    the EMA's span; where every lag is the same it is the mean smoothed loss at the budget.
    ``inf`` for a group with a diverged branch; ``nan`` for one with a branch that reported a
    single record within its budget (where its curve stood earlier is not measured; the callers
    refuse by :func:`_unmeasured_under_ema`)."""
    live = [br for rs in groups.values() for br in rs if br.run.diverged_at_step is None]
    at = min((br.budget - lag_at_budget(br, decay=decay) for br in live), default=0.0)
    out: dict[Any, float] = {}
    for key, rs in groups.items():
        values = []
        for br in rs:
            if br.run.diverged_at_step is not None:
                values.append(math.inf)
                continue
            e = br.run.examples
            keep = e < br.budget
            x = np.append(e[keep], br.budget)
            y = np.append(ema_smoothed(br.run.metric, decay)[keep], loss_at_budget(br, decay=decay))
            # (the lag-corrected positions are the EMA of the record positions: increasing)
            x = x - np.array([_lag_at(e, decay, float(v)) for v in x])
            if x.size == 1 and at < x[0] * (1 - 1e-12):
                # One record within the budget: its smoothed value is that record, the curve at
                # Δ, and where it stood at `at` is not measured. np.interp held it flat, so a
                # branch recorded only at its end read its end loss as its loss at `at`, was
                # chosen by `--reference best` and η refused with "the reference reached it
                # before its first record" (η 0.95 and 0.9 at 16 and 32; a hunt, 2026-12-07).
                values.append(math.nan)
                continue
            if at < x[0] and x.size > 1 and x[1] > x[0]:
                # A branch whose first record stands past that point (it began recording late):
                # its lag-corrected curve extended back along its first stretch, exact for a
                # straight curve. np.interp held its first value there, so that with a
                # reference lagging 74% of Δ a branch first recorded at 62% read 3% of its
                # fall low and `--reference best` chose it (η 1 for 0.95; a review, 2026-12-07).
                values.append(float(y[0] + (at - x[0]) * (y[1] - y[0]) / (x[1] - x[0])))
                continue
            values.append(float(np.interp(at, x, y)))
        out[key] = math.nan if any(math.isnan(v) for v in values) else _mean(values)
    return out


def _refuse_unmeasured(
    groups: dict[Any, Sequence[BranchRun]], ended: dict[Any, float], decay: float, why: str
) -> None:
    """Refuse where :func:`_mean_losses_at_equal_examples` could not read a group (``nan``):
    name its branch with a single record within the budget, and the cause."""
    for key, rs in groups.items():
        if not math.isnan(ended[key]):
            continue
        br = next(
            br
            for br in rs
            if br.run.diverged_at_step is None and not np.any(br.run.examples < br.budget)
        )
        raise NoiseScaleInputError(
            f"--ema {decay:g}: the branch at checkpoint {br.checkpoint:g}, batch size "
            f"{br.run.batch_size:g}, learning rate {br.run.learning_rate:g}, seed {br.seed} "
            f"reported a single loss record within its budget of {br.budget:g} examples, too "
            f"few under --ema to say where its curve stands before the budget; {why} compares "
            "the branches where their smoothed curves stand for the same examples (the budget "
            "less the largest EMA lag). Report its loss at several points from the checkpoint "
            "(examples=0) on, or drop --ema"
        )


def threshold_batch_size(
    batch_sizes: Sequence[float], efficiencies: Sequence[float], tolerance: float
) -> tuple[float, str | None]:
    """The largest batch size with 1/η ≤ 1 + τ, interpolated linearly in 1/η towards the next.

    Args:
        batch_sizes: Increasing batch sizes (the reference among them, with η = 1).
        efficiencies: η at each, in [0, 1].
        tolerance: τ > 0.

    Returns:
        The batch size and ``"upper"`` when even the largest is within the tolerance (the value
        is then the largest batch size, a lower bound), else ``None``.

    Example:
        >>> b, bound = threshold_batch_size([8, 16, 32], [1.0, 0.9, 0.6], 0.5)  # 1/η: 1, 1.11, 1.67
        >>> round(b, 6), bound
        (27.2, None)
    """
    b = np.asarray(batch_sizes, dtype=float)
    eta = np.asarray(efficiencies, dtype=float)
    limit = 1.0 + tolerance
    inverse = np.where(eta > 0, 1.0 / np.maximum(eta, 1e-300), np.inf)
    within = np.flatnonzero(inverse <= limit * (1 + 1e-12))
    if within.size == 0:
        raise NoiseScaleInputError("no batch size is within the tolerance, not even the reference")
    j = int(within[-1])
    if j == b.size - 1:
        return float(b[j]), "upper"
    x0, x1 = inverse[j], inverse[j + 1]
    if not math.isfinite(x1):
        return float(b[j]), None
    return float(b[j] + (limit - x0) / (x1 - x0) * (b[j + 1] - b[j])), None


def b_crit_from_efficiencies(
    batch_sizes: Sequence[float], efficiencies: Sequence[float], reference_batch_size: float
) -> tuple[float, str | None]:
    """B_crit of eq. 2.11 from efficiencies: 1/η = (B + B_crit)/(B_ref + B_crit).

    Least squares in log(1/η) over the batch sizes above the reference whose branch lost a
    measurable fraction of its examples (0 < η < 1). One such batch size gives the closed form
    B_crit = (B − B_ref/η)/(1/η − 1).

    Returns:
        B_crit and ``None``; or a bound: the largest batch size and ``"upper"`` when no batch
        size lost examples measurably (B_crit beyond the search, which spans the tested sizes
        ×/÷ :data:`SPAN`), the smallest and ``"lower"`` when they lost more than eq. 2.11 allows
        even with B_crit → 0 (e.g. a learning rate far from tuned); or ``nan`` and ``None``
        when no batch size above the reference was tested.

    Example:
        >>> b, bound = b_crit_from_efficiencies([8, 16, 64], [1.0, 0.8, 4 / 11], 8)  # B_crit = 24
        >>> round(b, 6), bound
        (24.0, None)
    """
    b = np.asarray(batch_sizes, dtype=float)
    eta = np.asarray(efficiencies, dtype=float)
    above = b > reference_batch_size
    if not above.any():
        return math.nan, None
    usable = above & (eta > 0) & (eta < 1)
    lo, hi = float(b.min()) / SPAN, float(b.max()) * SPAN
    if not usable.any():
        # Every branch above the reference either kept up (η = 1) or diverged (η = 0).
        kept_up = bool(np.any(eta[above] >= 1))
        return (float(b.max()), "upper") if kept_up else (float(b.min()), "lower")
    x = np.log(1.0 / eta[usable])
    bu = b[usable]

    def loss(log_c: float) -> float:
        c = math.exp(log_c)
        model = np.log((bu + c) / (reference_batch_size + c))
        return float(np.sum((x - model) ** 2))

    # A coarse scan first: the sum of squares need not be unimodal over six decades.
    grid = np.linspace(math.log(lo), math.log(hi), 241)
    i = int(np.argmin([loss(g) for g in grid]))
    if i == 0:
        return float(b.min()), "lower"
    if i == grid.size - 1:
        return float(b.max()), "upper"
    return math.exp(golden_min(loss, float(grid[i - 1]), float(grid[i + 1]))), None


def local_critical_batch_size(
    branches: Sequence[BranchRun],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    reference: str = "smallest",
    decay: float = 0.0,
    confidence: float = 0.95,
    reference_batch_size: float | None = None,
) -> LocalCriticalBatch:
    """The local critical batch size at one branch point (module docstring).

    Args:
        branches: All branches of one checkpoint (every batch size, learning rate and seed),
            with one budget.
        tolerance: τ > 0: a batch size is within it when it needs at most (1 + τ) times the
            reference's examples to reach the same loss.
        reference: ``"smallest"`` (the smallest batch size's branch) or ``"best"`` (the lowest
            mean loss at the budget).
        decay: EMA decay over recorded points used to smooth each curve before comparing
            (0: none), corrected for the EMA's lag (:func:`efficiency`). Use it when the loss
            fluctuates from record to record; report the same number of records per branch so
            that every branch is smoothed over the same fraction of its budget.
        confidence: Coverage of the intervals.
        reference_batch_size: With ``reference="smallest"``, the batch size that must be the
            reference: the plan's smallest. Without it a branch point whose smallest batch
            size failed (or is still running) would silently be compared against the next
            one, which moves the local CBS by (1 + τ)·ΔB_ref (eq. 2.11).

    Raises:
        NoiseScaleInputError: no branches, several checkpoints or budgets, fewer than two batch
            sizes, no seed that every batch size ran, a bad tolerance or reference, a branch
            that stopped short of its budget or whose examples do not count from the branch
            point, a reference branch that diverged, or a ``reference_batch_size`` that is
            not the smallest batch size of the branches (absent, or with smaller ones).
    """
    if not branches:
        raise NoiseScaleInputError("no branches to compare")
    _check_settings(tolerance, reference, confidence)
    checkpoints = {b.checkpoint for b in branches}
    budgets = {b.budget for b in branches}
    if len(checkpoints) != 1 or len(budgets) != 1:
        raise NoiseScaleInputError(
            "compare the branches of one checkpoint and one budget at a time, got checkpoints "
            f"{sorted(checkpoints)} and budgets {sorted(budgets)}"
        )
    checkpoint, budget = checkpoints.pop(), budgets.pop()
    warnings: list[str] = []
    by_setting: dict[tuple[float, float], dict[int, BranchRun]] = defaultdict(dict)
    for branch in branches:
        by_setting[(branch.batch_size, branch.learning_rate)][branch.seed] = branch
    sizes = sorted({b for b, _ in by_setting})
    if reference_batch_size is not None:
        if reference != "smallest":
            raise NoiseScaleInputError(
                "reference_batch_size goes with reference='smallest' (the best branch is the "
                "reference under 'best')"
            )
        if not sizes or sizes[0] != reference_batch_size:
            got = ", ".join(f"{b:g}" for b in sizes)
            raise NoiseScaleInputError(
                f"checkpoint {checkpoint:g} has no finished branch at the reference batch size "
                f"{reference_batch_size:g} as the smallest (it has {got}): comparing against "
                "another would move the local critical batch size; run the plan again to "
                "finish its branches"
            )
    if len(sizes) < 2:
        raise NoiseScaleInputError(
            f"checkpoint {checkpoint:g}: branches at {len(sizes)} batch size(s); comparing needs "
            "at least two"
        )
    losses = {
        key: {s: loss_at_budget(r, decay=decay) for s, r in runs.items()}
        for key, runs in by_setting.items()
    }
    chosen: dict[float, float] = {}
    tried: dict[float, tuple[float, ...]] = {}
    for b in sizes:
        lrs = sorted(lr for bb, lr in by_setting if bb == b)
        tried[b] = tuple(lrs)
        # (with --ema where the curves stand for the same examples, as for the reference below:
        # a rate recorded more sparsely trails the budget by more. Until 2026-12-07 the
        # smoothed losses at the budget chose a rate that had not ended lowest — η 0.625 for
        # 0.656 with no warning, a review)
        rates = {lr: list(by_setting[(b, lr)].values()) for lr in lrs}
        ended_at = (
            {lr: _mean(losses[(b, lr)].values()) for lr in lrs}
            if decay == 0 or len(lrs) == 1
            else _mean_losses_at_equal_examples(rates, decay)
        )
        if len(lrs) > 1:
            _refuse_unmeasured(rates, ended_at, decay, "choosing the learning rate")
        chosen[b] = min(lrs, key=lambda lr: ended_at[lr])
        if len(lrs) > 2 and chosen[b] in (lrs[0], lrs[-1]):
            warnings.append(
                f"batch size {b:g}: the best learning rate ({chosen[b]:g}) is at the edge of the "
                "grid tried; widen the grid"
            )
    seed_sets = [set(by_setting[(b, chosen[b])]) for b in sizes]
    seeds = tuple(sorted(set.intersection(*seed_sets)))
    if not seeds:
        raise NoiseScaleInputError(
            f"checkpoint {checkpoint:g}: no seed ran at every batch size (with its best learning "
            "rate); run the missing branches"
        )
    if any(len(s) != len(seeds) for s in seed_sets):
        warnings.append(
            f"only seeds {list(seeds)} ran at every batch size; the others are left out"
        )
    if decay > 0:
        # (a diverged branch's curve stops early: not a different spacing)
        counts = [
            int(np.sum(br.run.examples <= br.budget))
            for b in sizes
            for s in seeds
            if (br := by_setting[(b, chosen[b])][s]).run.diverged_at_step is None
        ]
        if counts and min(counts) > 0 and max(counts) > 2 * min(counts):
            # (a hunt, 2026-12-05: branches reporting every step, --ema 0.9 — B_crit 19.2 for
            # 20 and its interval covering in 49% of experiments, against 95% without it)
            warnings.append(
                f"--ema {decay:g} smooths over records, and the branches report {min(counts)} to "
                f"{max(counts)} records within the budget: the average spans different "
                "fractions of their budgets, its lag correction is then inexact and B_crit's "
                "interval too narrow (49% coverage in a test where every step was reported); "
                "report the same number of evenly spaced points in every branch, or drop --ema"
            )
        # (a review, 2026-12-07: a reference recorded at geometric steps, the others evenly:
        # lags of 46% and 5% of the budget, a loss exp(-k·progress) — B_crit 427 for 1000 and
        # its interval holding the truth in 16 of 40, without a word; the lag correction, and
        # the extension of the reference's curve over the gap, are exact for straight curves)
        shares = [
            lag_at_budget(br, decay=decay) / br.budget
            for b in sizes
            for s in seeds
            if (br := by_setting[(b, chosen[b])][s]).run.diverged_at_step is None and br.budget > 0
        ]
        if shares and max(shares) - min(shares) > 0.1:
            warnings.append(
                f"--ema {decay:g}: the EMA's lag at the budget is {min(shares):.0%} to "
                f"{max(shares):.0%} of the budget across the branches (their records are spaced "
                "differently in examples); the lag correction is exact only for a loss linear in "
                "the examples over that span, and a curved loss biases η and B_crit (427 for "
                "1,000 in a test, its interval holding the truth in 16 of 40); record every "
                "branch at the same examples, or drop --ema"
            )
    mean_loss = {b: _mean(losses[(b, chosen[b])][s] for s in seeds) for b in sizes}
    # Which branch ended lowest, and whether a larger one ended at least as low as the
    # reference: with --ema on the smoothed curves where they stand for the same examples
    # (their smoothed losses at the budget trail it by lags that differ between branches).
    # Until 2026-12-07 the smoothed losses at the budget were compared, so a branch recorded
    # more sparsely (a larger lag) looked worse: `--reference best` chose a reference that had
    # not ended lowest (η 0.702 for 0.667, B_crit 27.5 for 41.7, with no warning), and the
    # crossing flag asked that every seed's η reach 1, not the mean end loss to be as low
    # (found by tests/fuzz_branch_options.py).
    branches = {b: [by_setting[(b, chosen[b])][s] for s in seeds] for b in sizes}
    ended = mean_loss if decay == 0 else _mean_losses_at_equal_examples(branches, decay)
    if reference != "smallest":
        _refuse_unmeasured(branches, ended, decay, "--reference best")
    ref_b = sizes[0] if reference == "smallest" else min(sizes, key=lambda b: ended[b])
    ref_diverged = [s for s in seeds if not math.isfinite(losses[(ref_b, chosen[ref_b])][s])]
    if ref_diverged:
        # Every efficiency is read off the reference's curve; cut short by its divergence, it
        # cannot say how many examples the reference needed, and η would read as 1.
        raise NoiseScaleInputError(
            f"checkpoint {checkpoint:g}: the reference branch (batch size {ref_b:g}, learning "
            f"rate {chosen[ref_b]:g}) diverged before its budget with seed(s) {ref_diverged}; "
            "the other branches are measured against its curve, so this branch point has no "
            "local critical batch size. Rerun the reference at a lower learning rate (or try "
            "several with a learning-rate grid), or compare against reference='best'"
        )
    eta = np.ones((len(sizes), len(seeds)))
    for i, b in enumerate(sizes):
        if b == ref_b:
            continue
        for k, s in enumerate(seeds):
            ref = by_setting[(ref_b, chosen[ref_b])][s]
            branch = by_setting[(b, chosen[b])][s]
            lag = lag_at_budget(branch, decay=decay)
            eta[i, k] = efficiency(ref, losses[(b, chosen[b])][s], decay=decay, lag=lag)
    mean_eta = eta.mean(axis=1)
    # (with --ema the smoothed losses trail by lags that differ between branches: compare where
    # they stand for, as η does; a review, 2026-12-07, found crossing curves blamed for that)
    unread = [b for b in sizes if math.isnan(ended[b])]
    if unread:
        # (a branch with a single record under --ema: where its curve stood is not measured)
        warnings.append(
            f"--ema {decay:g}: batch size(s) {', '.join(f'{b:g}' for b in unread)} reported a "
            "single loss record within the budget, too few to say where the smoothed curve "
            "stands before it; whether the curves cross is not checked there. Report the loss "
            "at several points from the checkpoint on, or drop --ema"
        )
    crossing = any(b > ref_b and ended[b] <= ended[ref_b] for b in sizes)
    if crossing:
        warnings.append(
            "a batch size above the reference ended at least as low as the reference: the loss "
            "curves cross, which eq. 2.11 rules out. Under a warmup-stable-decay schedule "
            "compare in the stable phase with a short budget, or use reference='best'; "
            "otherwise check that the learning rates are tuned"
        )
    per_seed_cbs = [threshold_batch_size(sizes, eta[:, k], tolerance) for k in range(len(seeds))]
    per_seed_crit = [b_crit_from_efficiencies(sizes, eta[:, k], ref_b) for k in range(len(seeds))]
    cbs, cbs_low, cbs_high = _log_t_interval([v for v, _ in per_seed_cbs], confidence)
    crit, crit_low, crit_high = _log_t_interval([v for v, _ in per_seed_crit], confidence)
    cbs_bound = _bound(per_seed_cbs)
    above = [b for b in sizes if b > ref_b]
    if cbs_bound is None and above and all(v < above[0] for v, _ in per_seed_cbs):
        cbs_bound = "lower"
    crit_bound = _bound(per_seed_crit)
    ups = [s for s, (_, b) in zip(seeds, per_seed_crit, strict=True) if b == "upper"]
    downs = [s for s, (_, b) in zip(seeds, per_seed_crit, strict=True) if b == "lower"]
    if ups and downs:
        # One data order's B_crit beyond the largest batch size, another's below the smallest:
        # their geometric mean is no measurement and bounds nothing (until 2026-12-07 it was
        # given as "≥" it — e.g. "≥ 22.6" with seeds at ≥ 32 and ≤ 8 — and integrated by the
        # warm-up's eq. D.1 as a bound; a review).
        warnings.append(
            f"no B_crit: with seed(s) {', '.join(map(str, ups))} no batch size lost examples "
            f"measurably (B_crit ≥ {sizes[-1]:g}), with seed(s) {', '.join(map(str, downs))} "
            f"all lost more than eq. 2.11 allows (B_crit ≤ {sizes[0]:g}): the data orders disagree "
            "beyond the batch sizes compared; check the learning rates (a rate far from tuned "
            "loses more than eq. 2.11 allows) and branch at batch sizes beyond both ends"
        )
        crit = crit_low = crit_high = math.nan
        crit_bound = None
    if cbs_bound == "upper":
        cbs_high = math.inf
    if crit_bound == "upper":
        crit_high = math.inf
    elif crit_bound == "lower":
        crit_low = 0.0
    # Past the batch sizes compared the efficiencies barely move with B_crit and the per-seed
    # estimates' log-t interval is skewed: with B_crit 10× the largest it held the truth in
    # 72-87% (a hunt, 2026-12-07). The data bound B_crit on that side no better than the sizes.
    if len(seeds) > 1 and crit_high > sizes[-1]:
        crit_high = math.inf
    if len(seeds) > 1 and crit_low < ref_b:
        crit_low = 0.0
    if math.isfinite(crit) and (
        crit_high > sizes[-1] or crit_low < ref_b or not ref_b <= crit <= sizes[-1]
    ):
        warnings.append(
            f"B_crit = {crit:.3g}"
            + ("" if len(seeds) == 1 else f" {_interval_text(crit_low, crit_high)}")
            + f" reaches beyond the batch sizes compared ({ref_b:g}–{sizes[-1]:g}): the "
            "efficiencies pin it down only within them, so its interval is open on that side; "
            "branch at batch sizes beyond it to measure it"
        )
    if len(seeds) == 1:
        warnings.append("one seed: no interval; repeat the branches with other data orders")
    batches = tuple(
        BatchEfficiency(
            batch_size=b,
            learning_rate=chosen[b],
            learning_rates=tried[b],
            loss=mean_loss[b],
            efficiency=float(mean_eta[i]),
            efficiencies=tuple(float(e) for e in eta[i]),
            within_tolerance=bool(mean_eta[i] > 0 and 1 / mean_eta[i] <= 1 + tolerance),
        )
        for i, b in enumerate(sizes)
    )
    return LocalCriticalBatch(
        checkpoint=float(checkpoint),
        budget=float(budget),
        tolerance=float(tolerance),
        reference=reference,
        reference_batch_size=float(ref_b),
        cbs=cbs,
        cbs_low=cbs_low,
        cbs_high=cbs_high,
        cbs_bound=cbs_bound,
        b_crit=crit,
        b_crit_low=crit_low,
        b_crit_high=crit_high,
        b_crit_bound=crit_bound,
        seeds=seeds,
        batches=batches,
        crossing=crossing,
        confidence=confidence,
        warnings=tuple(warnings),
    )


def local_critical_batch_sizes(
    branches: Iterable[BranchRun],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    reference: str = "smallest",
    decay: float = 0.0,
    confidence: float = 0.95,
    reference_batch_size: float | None = None,
) -> list[LocalCriticalBatch]:
    """:func:`local_critical_batch_size` at every checkpoint, in order along the run.

    Raises:
        NoiseScaleInputError: no branches, a checkpoint with branches of several budgets, or
            what :func:`local_critical_batch_size` refuses.
    """
    grouped: dict[float, list[BranchRun]] = defaultdict(list)
    for branch in branches:
        grouped[branch.checkpoint].append(branch)
    if not grouped:
        raise NoiseScaleInputError("no branches to compare")
    return [
        local_critical_batch_size(
            grouped[c],
            tolerance=tolerance,
            reference=reference,
            decay=decay,
            confidence=confidence,
            reference_batch_size=reference_batch_size,
        )
        for c in sorted(grouped)
    ]


def t_quantile(confidence: float, dof: int) -> float:
    """The two-sided Student-t quantile t such that P(|T| ≤ t) = ``confidence``, ``dof`` ≥ 1.

    Exact: the t distribution function for whole degrees of freedom in closed form
    (Abramowitz & Stegun 26.7.3–4), inverted by bisection.

    Example:
        >>> round(t_quantile(0.95, 2), 4)
        4.3027
    """
    if not (isinstance(dof, int) and dof >= 1):
        raise NoiseScaleInputError(f"degrees of freedom must be a whole number ≥ 1, got {dof!r}")
    if not 0 < confidence < 1:
        raise NoiseScaleInputError(f"confidence must be in (0, 1), got {confidence!r}")
    target = 0.5 + confidence / 2
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, dof) < target:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_cdf(mid, dof) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _t_cdf(t: float, dof: int) -> float:
    theta = math.atan(t / math.sqrt(dof))
    c2 = math.cos(theta) ** 2
    if dof % 2:
        term, total = 1.0, 0.0
        if dof > 1:
            total = 1.0
            for k in range(1, (dof - 1) // 2):
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
            total *= math.sin(theta) * math.cos(theta)
        return 0.5 + (theta + total) / math.pi
    term, total = 1.0, 1.0
    for k in range(1, dof // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return 0.5 + 0.5 * math.sin(theta) * total


def _log_t_interval(values: Sequence[float], confidence: float) -> tuple[float, float, float]:
    """Geometric mean of positive values and the t interval of their logarithms."""
    v = np.asarray([x for x in values if math.isfinite(x) and x > 0], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    if v.size < 2:
        return float(v[0]), math.nan, math.nan
    logs = np.log(v)
    centre = float(logs.mean())
    half = t_quantile(confidence, int(v.size - 1)) * float(logs.std(ddof=1)) / math.sqrt(v.size)
    return math.exp(centre), math.exp(centre - half), math.exp(centre + half)


def _bound(per_seed: Sequence[tuple[float, str | None]]) -> str | None:
    bounds = {b for _, b in per_seed if b is not None}
    if "upper" in bounds:
        return "upper"
    return "lower" if "lower" in bounds else None


def _check_settings(tolerance: float, reference: str, confidence: float) -> None:
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise NoiseScaleInputError(f"the tolerance must be a positive number, got {tolerance!r}")
    if reference not in REFERENCES:
        raise NoiseScaleInputError(
            f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}"
        )
    if not 0 < confidence < 1:
        raise NoiseScaleInputError(f"confidence must be in (0, 1), got {confidence!r}")


def _mean(values: Iterable[float]) -> float:
    v = list(values)
    return math.inf if not v or any(not math.isfinite(x) for x in v) else float(np.mean(v))


def _json(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
