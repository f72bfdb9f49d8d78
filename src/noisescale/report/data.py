"""The numbers of a run report, read from a tracker history; no plotting (ArviZ-style data layer).

A history is JSON Lines: a header ``{"kind": "noisescale.history", "version": 1, ...}`` and one
object per optimiser step (``step``, ``skipped``, ``b_big``, ``g2``, ``trace_sigma``, ``g2_ema``,
``trace_sigma_ema``, ``b_simple``, ``b_simple_low``, ``b_simple_high``, ``loss``, ``lr``,
``temperature``, ``examples``, ``sources``), NaN and infinities written as ``null``. The header's
``unit`` says what B_simple, the batch sizes and tr Σ count — ``"examples"`` (also in histories
without it) or ``"tokens"`` (a loss over tokens, :mod:`noisescale.tokens`); records with counted
tokens add ``tokens``, ``tokens_seen`` and ``tokens_per_example``, so the report gives B in both,
and (since 2026-12-08) ``tokens_examples``, the examples of the measured step's own ``tokens``.

Each function here returns the numbers one figure or table of the report shows, so tests check
numbers rather than pixels. The cost analysis treats the measured B_simple as B_noise (paper §2.2:
they differ by a small constant factor) and assumes that a run at another batch size, with its
learning rate tuned, would sit at the same temperature and so see the same noise scale along the
way (App. C).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import numpy as np

from noisescale import estimators, theory
from noisescale.errors import NoiseScaleInputError
from noisescale.theory import MAX_COUNT

HISTORY_KIND = "noisescale.history"
SUPPORTED_VERSIONS = (1,)

#: Per-step fields read as floats (``null`` → NaN). ``step`` is read separately and required.
FLOAT_FIELDS = (
    "b_big",
    "g2",
    "trace_sigma",
    "g2_ema",
    "trace_sigma_ema",
    "b_simple",
    "b_simple_low",
    "b_simple_high",
    "loss",
    "lr",
    "temperature",
    "examples",
    "tokens_seen",
    "tokens_per_example",
)
UNITS = ("examples", "tokens")
#: A record's interval may miss its B_simple by this relative rounding before it is refused.
INTERVAL_SLACK = 1e-9
#: The running counts of a record: finite, not negative, never going down.
COUNTS = ("examples", "tokens_seen")

#: At most this many candidate fixed batch sizes in the cost table.
MAX_CANDIDATES = 12
#: A run with fewer estimated steps than this many time constants 1/(1 − beta) of the tracker's
#: EMA gets a warning: its headline still leans on the first, least settled steps.
MIN_TIME_CONSTANTS = 3.0
#: With ``beta = 1`` (a plain average) the warning needs at least this many estimated steps.
MIN_STEPS_PLAIN_AVERAGE = 100
#: The last interval counts as wide when its upper end exceeds this multiple of its lower end.
WIDE_INTERVAL_RATIO = 10.0
#: B_simple "grew" (or "shrank") when the end of the run is this factor above (below) its start.
TREND_FACTOR = 1.25
#: Start and end of a run, for its trend: this fraction of the estimated steps at each end.
TREND_SPAN = 0.1


class GroupEstimate(NamedTuple):
    """One parameter group's estimate in a history record (``groups=``): its averaged |G|² and
    tr Σ (the groups add up to the total's), B_simple and its interval (NaN where unavailable)."""

    name: str
    b_simple: float
    low: float
    high: float
    g2_ema: float
    trace_sigma_ema: float


#: The fields of a record's per-group entry that :class:`GroupEstimate` reads.
GROUP_FIELDS = ("b_simple", "b_simple_low", "b_simple_high", "g2_ema", "trace_sigma_ema")


@dataclass(frozen=True)
class History:
    """A tracker history as arrays, one entry per recorded step, in step order.

    Every per-step field of :data:`FLOAT_FIELDS` is a float array with NaN where it was ``null``.
    """

    path: str
    header: dict[str, Any]
    step: np.ndarray
    skipped: np.ndarray
    b_big: np.ndarray
    g2: np.ndarray
    trace_sigma: np.ndarray
    g2_ema: np.ndarray
    trace_sigma_ema: np.ndarray
    b_simple: np.ndarray
    b_simple_low: np.ndarray
    b_simple_high: np.ndarray
    loss: np.ndarray
    lr: np.ndarray
    temperature: np.ndarray
    examples: np.ndarray
    tokens_seen: np.ndarray
    tokens_per_example: np.ndarray
    warnings: tuple[str, ...] = ()
    #: The records are B_simple of the Adam-preconditioned gradient P ⊙ g (``precondition=``).
    preconditioned: bool = False
    #: B_simple per parameter group (``groups=``) in the last record, in its order; empty when
    #: the last record has none.
    groups: tuple[GroupEstimate, ...] = ()
    #: Per record, whether its optimizer made no step: skipped with non-finite gradients (its
    #: ``sqnorm_big`` null, as the tracker writes a step a GradScaler skips or one the loop must
    #: not step on); ``None``: none. Such a step spends its batch and makes no progress.
    idle: np.ndarray | None = None
    #: Per record, its measured step's own tokens and the examples they are of (``tokens``,
    #: ``tokens_examples``; NaN where not recorded): that step's own tokens per example, which
    #: a record spanning several steps (``measure_every``) holds beside its running counts.
    tokens: np.ndarray | None = None
    tokens_examples: np.ndarray | None = None

    @property
    def unit(self) -> str:
        """What B_simple and the batch sizes count: ``"examples"`` or ``"tokens"``."""
        return str(self.header.get("unit", "examples"))

    def tokens_per_example_at(self, step: float) -> float:
        """The run's mean tokens per example at the record of ``step`` (the last record up to it
        that has one), else ``nan``: the T̄ its B_simple was converted by. Until 2026-12-07 the
        history's last record's was taken, a later skipped step's, and calc's ``--unit`` and
        report's B_simple in the other unit read the last estimate 3-7% off (a fuzzer)."""
        upto = self.step <= step
        known = self.tokens_per_example[upto & np.isfinite(self.tokens_per_example)]
        return float(known[-1]) if known.size else math.nan


def load_history(path: str | Path) -> History:
    """Read and validate a history file written by the tracker.

    Tolerated, with a warning in :attr:`History.warnings`: an unfinished last line (a run that was
    killed while writing) and steps that go back (a run resumed from a checkpoint: the records
    written after the resume replace the earlier ones from the same steps). A history that
    switches between plain and preconditioned norms (``precondition_from=``) is read from its last
    switch on, with a warning: the two are different quantities and never analysed together.

    Raises:
        NoiseScaleInputError: The file is missing, empty, not a noisescale history, has an
            unsupported version, a corrupt line, or no steps.
    """
    if str(path) == "":  # (Path("") is ".", which was refused as "a directory")
        raise NoiseScaleInputError(
            "the history path is empty (an unset shell variable?): give the history file the "
            "tracker wrote"
        )
    p = Path(path)
    if not p.exists():
        raise NoiseScaleInputError(f"history file {str(p)!r} does not exist")
    if p.is_dir():
        raise NoiseScaleInputError(f"{str(p)!r} is a directory, not a history file")
    try:
        # (utf-8-sig: a byte-order mark, as some editors save, was refused as "not a history")
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise NoiseScaleInputError(f"cannot read history file {str(p)!r}: {err}") from None
    # split at line feeds only: str.splitlines() also breaks at U+2028 and U+0085, which JSON
    # allows unescaped inside a string (a header written with ensure_ascii=False was refused)
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines[-1] == "":
        lines.pop()
    if not any(line.strip() for line in lines):
        raise NoiseScaleInputError(
            f"history file {str(p)!r} is empty; the tracker writes a header line first"
        )
    warnings: list[str] = []
    records: list[tuple[int, dict[str, Any]]] = []
    header: dict[str, Any] | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n") and header is not None:
                warnings.append(f"line {number} is unfinished (the run stopped while writing it)")
                break
            if header is None:
                raise NoiseScaleInputError(
                    f"{str(p)!r} is not a noisescale history: its first line must be a JSON "
                    f'header with "kind": "{HISTORY_KIND}"'
                ) from None
            raise NoiseScaleInputError(
                f"{str(p)!r}, line {number}: not valid JSON ({err.msg}); the file is corrupt"
            ) from None
        if header is None:
            header = _check_header(obj, p)
            continue
        if not isinstance(obj, dict) or not _is_int(obj.get("step")):
            raise NoiseScaleInputError(
                f"{str(p)!r}, line {number}: a step record needs an integer 'step'"
            )
        _check_record(number, obj, p)
        records.append((number, obj))
    assert header is not None  # a non-blank file either yields a header or raised above
    if not records:
        raise NoiseScaleInputError(f"history file {str(p)!r} has a header but no steps yet")
    records = _drop_superseded(records, warnings)
    records = _after_last_switch(records, warnings)
    for name in COUNTS:
        _check_running_count(records, name, p)
    if "precondition_from" in header and not _is_preconditioned(records[-1][1]):
        # (until 2026-12-05 such a run's plain B_simple was shown as its only one, without a
        # word, where the tracker's estimate() says preconditioning has not started)
        warnings.append(
            "this run asked for the Adam-preconditioned noise scale (precondition=), but these "
            "records are plain: preconditioning starts after precondition_from="
            f"{header['precondition_from']} optimizer steps, and the run's optimizer had not "
            "taken them (or never stepped); B_simple here is the plain noise scale, not the "
            "preconditioned one"
        )
    return History(
        path=str(p),
        header=header,
        step=np.array([obj["step"] for _, obj in records], dtype=np.int64),
        skipped=np.array([bool(obj.get("skipped", False)) for _, obj in records]),
        warnings=tuple(warnings),
        preconditioned=_is_preconditioned(records[-1][1]),
        groups=_groups(*records[-1], p),
        idle=np.array([_idle(obj) for _, obj in records], dtype=bool),
        tokens=_float_column(records, "tokens", p),
        tokens_examples=_float_column(records, "tokens_examples", p),
        **{name: _float_column(records, name, p) for name in FLOAT_FIELDS},
    )


def _idle(obj: dict[str, Any]) -> bool:
    """Whether a record's optimizer made no step: skipped, with its big batch's squared norm
    written and not finite (``null``): non-finite gradients, which a GradScaler skips, and which
    a run that goes on finite cannot have stepped on. The tracker writes ``sqnorm_big`` in every
    record; a record without it (written by hand) is taken to have stepped. The other skipped
    records (no small batch, no token, not preconditioned) have a finite norm: the optimizer
    stepped on them."""
    if not obj.get("skipped") or "sqnorm_big" not in obj:
        return False
    norm = obj["sqnorm_big"]
    return not (isinstance(norm, int | float) and math.isfinite(norm))


class BSimpleSeries(NamedTuple):
    """B_simple with its confidence interval against an abscissa (step or loss), and the step."""

    x: np.ndarray
    b_simple: np.ndarray
    low: np.ndarray
    high: np.ndarray
    step: np.ndarray


def b_simple_vs_step(history: History) -> BSimpleSeries:
    """B_simple and its interval at every step where it is available (not skipped, finite, > 0)."""
    keep = _estimated(history)
    return BSimpleSeries(
        history.step[keep].astype(float),
        history.b_simple[keep],
        history.b_simple_low[keep],
        history.b_simple_high[keep],
        history.step[keep].astype(float),
    )


def b_simple_vs_loss(history: History) -> BSimpleSeries:
    """B_simple and its interval against the training loss, where both are available."""
    keep = _estimated(history) & np.isfinite(history.loss)
    return BSimpleSeries(
        history.loss[keep],
        history.b_simple[keep],
        history.b_simple_low[keep],
        history.b_simple_high[keep],
        history.step[keep].astype(float),
    )


class EmaSeries(NamedTuple):
    """The bias-corrected EMAs of |G|² and tr Σ (paper App. A.1); NaN where not positive."""

    step: np.ndarray
    g2_ema: np.ndarray
    trace_sigma_ema: np.ndarray


def ema_series(history: History) -> EmaSeries:
    """|G|² and tr Σ EMAs per step, for a log-scale plot (non-positive values become NaN)."""
    keep = ~history.skipped & (np.isfinite(history.g2_ema) | np.isfinite(history.trace_sigma_ema))
    return EmaSeries(
        history.step[keep].astype(float),
        _positive_or_nan(history.g2_ema[keep]),
        _positive_or_nan(history.trace_sigma_ema[keep]),
    )


class TemperatureSeries(NamedTuple):
    """The temperature T = lr/B per step (paper App. C)."""

    step: np.ndarray
    temperature: np.ndarray


def temperature_series(history: History) -> TemperatureSeries:
    """T per step where recorded, else lr/b_big where both are recorded (positive values only)."""
    t = history.temperature.copy()
    fallback = ~np.isfinite(t) & np.isfinite(history.lr) & (history.b_big > 0)
    t[fallback] = theory.temperature(history.lr[fallback], history.b_big[fallback])
    keep = ~history.skipped & np.isfinite(t) & (t > 0)
    return TemperatureSeries(history.step[keep].astype(float), t[keep])


class Trajectory(NamedTuple):
    """The part of a run where B_simple is available, as the App. D analysis needs it."""

    step: np.ndarray
    batch_size: np.ndarray
    b_noise: np.ndarray
    #: S_min, E_min and ∫√B_noise ds, eq. D.1 step by step (:func:`theory.run_integrals`)
    integrals: theory.TrajectoryIntegrals
    examples: np.ndarray
    #: why ``examples`` may not be exact (a history without the running count)
    warnings: tuple[str, ...] = ()
    #: per step, whether its optimizer made no step (:attr:`History.idle`): left out of the
    #: integrals (ds = 0), its batch spent
    idle: np.ndarray | None = None


def trajectory(history: History) -> Trajectory:
    """Steps, batch sizes, B_simple (as B_noise) and the integrals of App. D over the steps.

    Raises:
        NoiseScaleInputError: Fewer than two steps carry a B_simple estimate.
    """
    estimated = _estimated(history)
    keep = estimated & np.isfinite(history.b_big)
    if keep.sum() < 2:
        lacking = int((estimated & ~keep).sum())
        raise NoiseScaleInputError(
            f"{history.path!r}: only {int(keep.sum())} of {history.step.size} steps carry a "
            "B_simple estimate"
            + (
                f" and their batch size; {lacking} more carry B_simple without 'b_big' (the "
                "step's batch size), which the costs need: write the history with the tracker, "
                "which records it"
                if lacking
                else "; a report needs at least two (train longer, or lower the EMA decay beta)"
            )
        )
    # Records between the first and last estimate that carry their batch size but no estimate
    # (early steps whose |G|² is not yet positive, an estimate unavailable for a while): their
    # B is the run's, B_noise interpolated linearly between the estimates around them, as
    # between sparse records (theory.run_integrals). Until 2026-12-08 they were dropped and
    # their batch sizes interpolated too: a batch changed there priced the interpolated
    # batches (B 8 → 16 at step 20 with no estimate at steps 15–25: S_min 0.16% low) and warned
    # that the batches were interpolated though the history holds them (hunt/interp2.py).
    # Skipped records too: until 2026-12-08 they were dropped here and their batch sizes
    # interpolated (B 8 → 16 at step 20, steps 19–21 skipped: 10, 12, 14 priced, S_min 9.059
    # for 9.107, and a warning that blamed batch sizes the history holds; hunt/skip2.py).
    kept = np.flatnonzero(keep)
    within = np.zeros_like(keep)
    within[kept[0] : kept[-1] + 1] = True
    keep = keep | (within & ~estimated & (history.b_big > 0))
    step = history.step[keep].astype(float)
    batch = history.b_big[keep]
    # A step whose optimizer did not step (non-finite gradients: History.idle) spends its batch
    # but makes no progress: eq. D.1 integrates over optimizer steps, so its ds is 0. Until
    # 2026-12-08 it counted as a step of progress, without a word (one skipped step of 40 at
    # B = B_simple = 16: S_min 20 for 19.5, hunt/skip1b.py).
    idle = (history.idle if history.idle is not None else np.zeros_like(keep))[keep]
    b_noise = np.interp(
        step, history.step[kept].astype(float), history.b_simple[kept].astype(float)
    )
    # the examples (or tokens) seen so far, in the unit of the batch sizes
    examples = (history.tokens_seen if history.unit == "tokens" else history.examples)[keep]
    warnings: tuple[str, ...] = ()
    lacking = estimated & ~keep
    if lacking.any():
        # (left out without a word until 2026-12-07: the costs ended before the headline's step)
        left_out = ", ".join(f"{s:,}" for s in history.step[lacking][:5])
        warnings = (
            f"{int(lacking.sum())} record(s) with a B_simple lack their batch size ('b_big'; "
            f"step(s) {left_out}{', …' if lacking.sum() > 5 else ''}): they are left out of the "
            f"costs and schedules, which cover steps {int(step[0]):,}–{int(step[-1]):,}",
        )
    if not np.all(np.isfinite(examples)):
        # Older or partial records without the running total: add up the batch sizes instead
        examples, taken = _batches_taken(history, keep)
        warnings += taken
    integrals = theory.run_integrals(step, batch, b_noise, idle)
    tiny = np.finfo(float).tiny
    if not (
        all(math.isfinite(v) for v in integrals)
        and integrals.s_min >= tiny
        and all(v == 0 or v >= tiny for v in integrals[1:])
    ):
        # (until 2026-12-07 refused naming TrajectoryIntegrals.s_min for b_big = 1e-320, a
        # review)
        raise NoiseScaleInputError(
            "the run's batch sizes and noise scales are too small or too large to integrate "
            f"(eq. D.1: S_min = {integrals.s_min:g}, E_min = {integrals.e_min:g}, ∫√B_noise ds "
            f"= {integrals.root:g}, beyond the doubles); check the history's b_big and "
            "b_simple, and their unit"
        )
    return Trajectory(step, batch, b_noise, integrals, examples, warnings, idle)


def _batches_taken(history: History, keep: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """The examples seen at each kept record, counted from the first, where the history lacks
    the running count: each record's batch size times the steps it stands for (since the record
    before it; with ``measure_every`` the unmeasured steps before it). Until 2026-12-07 this was
    the trapezoid of b_big over the steps, which counts the step where the batch changed at the
    mean of the two sizes (132 examples for 136, a hunt). Where steps went unrecorded across a
    change of the batch size, or a record lacks it, their batches are unknown: a warning, or
    NaN (the run's examples unknown)."""
    first, last = np.flatnonzero(keep)[[0, -1]]
    span = slice(first + 1, last + 1)
    gaps = np.diff(history.step.astype(float))[first:last]
    batch, before = history.b_big[span], history.b_big[first:last]
    taken = np.concatenate([[0.0], np.cumsum(batch * gaps)])
    examples = taken[keep[first : last + 1]]
    unit = history.unit
    count = "tokens_seen" if unit == "tokens" else "examples"
    if not np.all(np.isfinite(batch)):
        return np.full(examples.shape, np.nan), (
            f"the history has no running count of {unit} ('{count}') and "
            f"{int((~np.isfinite(batch)).sum())} record(s) between steps "
            f"{int(history.step[first]):,} and {int(history.step[last]):,} lack their batch size "
            f"('b_big'): the {unit} the run took are unknown, and so is the adaptive schedule "
            f"with as many {unit}; write the history with the tracker, which records them",
        )
    unsure = (gaps > 1) & (batch != before)
    if not unsure.any():
        return examples, ()
    i = int(np.flatnonzero(unsure)[0])
    return examples, (
        f"the history has no running count of {unit} ('{count}'), and the batch size changed "
        f"from {before[i]:,.4g} to {batch[i]:,.4g} across steps that were not recorded (steps "
        f"{int(history.step[first + i]) + 1:,}–{int(history.step[first + i + 1]):,}"
        + (f", and {int(unsure.sum()) - 1} more such gap(s)" if unsure.sum() > 1 else "")
        + f"): the run's {unit} count those steps at the batch size of the record after them, "
        "an approximation; write the history with the tracker, which records the running count",
    )


def candidate_batch_sizes(traj: Trajectory) -> np.ndarray:
    """Powers of two spanning the measured B_simple and the run's own batch sizes, ×/÷ 2.

    Thinned to every second (third, …) power when there would be more than :data:`MAX_CANDIDATES`;
    the grid always reaches both ends.
    """
    values = np.concatenate([traj.b_noise, traj.batch_size])
    lo = max(0, math.floor(math.log2(values.min())) - 1)
    hi = math.ceil(math.log2(values.max())) + 1
    # The smallest stride (1, 2, 3, … octaves) whose grid from lo reaches hi in few enough points.
    stride = 1
    while math.ceil((hi - lo) / stride) + 1 > MAX_CANDIDATES:
        stride += 1
    return 2.0 ** np.arange(lo, lo + stride * (math.ceil((hi - lo) / stride) + 1), stride)


class RunCost(NamedTuple):
    """What the run itself did over the analysed span, and the model's prediction of it."""

    first_step: int
    last_step: int
    steps: float
    examples: float
    batch_size: float | None
    predicted_steps: float | None
    s_min: float
    e_min: float
    b_crit: float
    #: steps in the span whose optimizer made no step (non-finite gradients): in ``steps``, not
    #: in ``predicted_steps``, which counts the steps that made progress
    idle_steps: int = 0


def run_cost(traj: Trajectory) -> RunCost:
    """The run's steps and examples between its first and last estimate, and S_min, E_min.

    When the run used one batch size throughout, ``predicted_steps`` is eq. D.1 at that size,
    S_min + E_min/B, which reproduces ``steps`` exactly (:func:`theory.run_integrals`), less
    the steps whose optimizer did not step (``idle_steps``), which made no progress.
    """
    s_min, e_min = theory.min_cost(traj.integrals)
    constant = bool(np.all(traj.batch_size == traj.batch_size[0]))
    batch = float(traj.batch_size[0]) if constant else None
    predicted = (
        float(theory.fixed_batch_cost(traj.integrals, None, batch).steps) if constant else None
    )
    return RunCost(
        first_step=int(traj.step[0]),
        last_step=int(traj.step[-1]),
        steps=float(traj.step[-1] - traj.step[0]),
        examples=float(traj.examples[-1] - traj.examples[0]),
        batch_size=batch,
        predicted_steps=predicted,
        s_min=float(s_min),
        e_min=float(e_min),
        b_crit=float(e_min / s_min),
        idle_steps=int(np.sum(traj.idle)) if traj.idle is not None else 0,
    )


class CostRow(NamedTuple):
    """A fixed batch size over the run's trajectory, and an adaptive schedule beside it."""

    batch_size: float
    steps: float
    examples: float
    steps_over_min: float
    examples_over_min: float
    adaptive_steps_same_examples: float
    adaptive_examples_same_steps: float


def cost_table(traj: Trajectory, batch_sizes: Iterable[float]) -> list[CostRow]:
    """What each fixed batch size would have cost to make the run's progress (paper eq. D.1).

    For each B: S = S_min + E_min/B and E = B·S (eq. 2.11 along the trajectory), and the adaptive
    schedule B = √(r·B_simple) (eq. D.6) with r chosen to match either E (then it needs
    S_min + γ·E_min/B steps) or S (then it needs E_min + γ·B·S_min examples), eq. D.4.
    """
    s_min, e_min = theory.min_cost(traj.integrals)
    gamma = theory.adaptive_gamma(traj.integrals)
    rows = []
    for b in batch_sizes:
        steps, examples = theory.fixed_batch_cost(traj.integrals, None, b)
        # eq. D.4 in closed form: inverting E for r subtracted E_min from E = B·S_min + E_min,
        # which loses B·S_min to round-off where B ≪ B_noise (B_simple 6e14, B = 1: 57.76 steps
        # for 56.00, more than the fixed batch's own 56; a fuzzer, tests/fuzz_pages.py)
        adaptive_steps = s_min + gamma * e_min / b
        rows.append(
            CostRow(
                batch_size=float(b),
                steps=float(steps),
                examples=float(examples),
                steps_over_min=float(steps) / s_min,
                examples_over_min=float(examples) / e_min,
                adaptive_steps_same_examples=float(adaptive_steps),
                adaptive_examples_same_steps=float(e_min + gamma * b * s_min),
            )
        )
    return rows


class AdaptiveSummary(NamedTuple):
    """The adaptive schedule of App. D on this run's trajectory."""

    gamma: float
    r_natural: float
    natural_steps: float
    natural_examples: float
    r_same_examples: float
    same_examples_steps: float
    schedule_step: np.ndarray
    schedule_natural: np.ndarray
    #: why ``same_examples_steps`` is NaN, or ""
    same_examples_note: str = ""
    #: the run's examples as the integrals' trapezoid counts them, half a batch at each end:
    #: its count less (B_last − B_first)/2
    examples_used: float = math.nan
    #: the examples the run's batch sizes, interpolated between records, add up to:
    #: E_min + ∫B ds + (B_last − B_first)/2 (report_data warns where the count differs)
    interpolated_examples: float = math.nan


#: A run's count of examples further than this share from its interpolated batch sizes' warns
#: that the costs price batches the run did not use (report_data).
INTERPOLATED_SHARE = 1e-3

#: The adaptive schedule at the run's examples is computed where the examples the records'
#: interpolated batch sizes do not account for are at most this share of E − E_min.
UNRECORDED_SHARE = 1e-3


def adaptive_summary(traj: Trajectory, unit: str = "examples") -> AdaptiveSummary:
    """γ (eq. D.5), the schedule at the natural r = E_min/S_min (footnote 17, where both costs are
    1 + √γ of their minima) and the schedule that uses as many examples as the run did."""
    gamma = theory.adaptive_gamma(traj.integrals)
    r_natural = theory.natural_exchange_rate(traj.integrals)
    natural = theory.adaptive_batch_cost(traj.integrals, None, r_natural)
    run = run_cost(traj)
    # E − E_min as ∫B ds on the integrals' own grid (theory.run_examples_over_min), not the
    # run's count less E_min: that difference is round-off where B ≪ B_noise (one B, B_simple
    # 6e14, B = 1: 53 steps for 56.00, a fuzzer) and, where B changes, it held the trapezoid's
    # ends, (B_last − B_first)/2 examples (B 8 → 63 against B_simple 1e13: 1.4e-8 steps for
    # 45.8, a review, 2026-12-07). The count adds only what the records do not tell: batches
    # that were not the interpolated ones between sparse records (Σ over the steps of a
    # piecewise-linear B is its integral plus (B_last − B_first)/2, exactly), and only where
    # they move E − E_min by at most UNRECORDED_SHARE: where B ≪ B_noise such examples went
    # mostly to progress, not above E_min, and which is the history does not tell.
    above = theory.run_examples_over_min(traj.step, traj.batch_size, traj.b_noise, traj.idle)
    b = traj.batch_size
    # the batches of steps whose optimizer did not step: spent, no progress (neither in E_min
    # nor in ∫B ds), but the run's all the same, so the schedule at the run's examples has them
    idle = float(np.sum(b[traj.idle])) if traj.idle is not None else 0.0
    interpolated = traj.integrals.e_min + above + idle + (b[-1] - b[0]) / 2
    unrecorded = run.examples - interpolated
    if abs(unrecorded) <= 1e-12 * abs(run.examples):  # the same batches, summed otherwise
        unrecorded = 0.0
    root = traj.integrals.root
    r_same = same_steps = math.nan
    note = ""
    if math.isnan(run.examples):
        note = f"the {unit} the run took are unknown (see the warnings)"
    elif not abs(unrecorded) <= UNRECORDED_SHARE * above:
        note = (
            f"the run counted {run.examples:,.6g} {unit}, {abs(unrecorded):,.4g} "
            f"{'fewer' if unrecorded < 0 else 'more'} than its batch sizes interpolated between "
            f"records, against {above:,.4g} {unit} above E_min: the batch sizes of steps without "
            "an estimate (sparse or skipped records, or records before B_simple could be "
            "estimated) decide the comparison, and the history does not tell them; record "
            "every step around the batch-size changes, or change the batch size only once "
            "B_simple is estimated"
        )
    elif not above + idle + unrecorded >= np.finfo(float).tiny:
        note = (
            f"the {unit} above E_min, ∫B ds ≈ ∫B²/B_simple dt, are below the smallest double: "
            "check the history's b_big and b_simple, and their unit"
        )
    else:
        spent = above + idle + unrecorded  # E − E_min, every example the run took
        q = spent / root
        r_same = q * q if q < math.sqrt(np.finfo(float).max) else math.inf
        same_steps = run.s_min + root * (root / spent)  # S_min + root/√r, D.1
    return AdaptiveSummary(
        gamma=gamma,
        r_natural=r_natural,
        natural_steps=float(natural.steps),
        natural_examples=float(natural.examples),
        r_same_examples=r_same,
        same_examples_steps=same_steps,
        schedule_step=traj.step,
        schedule_natural=np.asarray(theory.adaptive_batch_size(traj.b_noise, r_natural)),
        same_examples_note=note,
        examples_used=float(run.examples - (b[-1] - b[0]) / 2),
        interpolated_examples=float(interpolated),
    )


class ParetoCurves(NamedTuple):
    """Predicted Pareto fronts in (E/E_min, S/S_min): fixed batch (γ = 1) and adaptive (γ)."""

    examples_over_min: np.ndarray
    fixed_steps_over_min: np.ndarray
    adaptive_steps_over_min: np.ndarray
    gamma: float


def pareto_curves(traj: Trajectory, points: int = 200) -> ParetoCurves:
    """Eq. 2.11 and eq. D.4 on a log grid of E/E_min from 1.01 to 1000."""
    gamma = theory.adaptive_gamma(traj.integrals)
    e = 1.0 + np.logspace(-2, 3, points)
    return ParetoCurves(
        e,
        np.asarray(theory.pareto_steps_over_min(e)),
        np.asarray(theory.pareto_steps_over_min(e, gamma)),
        gamma,
    )


class Trend(NamedTuple):
    """How B_simple and the loss moved between the start and the end of the run.

    Each end is the median over :data:`TREND_SPAN` of the steps that carry an estimate, so one
    noisy early value does not decide the direction. ``direction`` is ``"grew"``, ``"shrank"``
    or ``"stayed about the same"`` (within a factor :data:`TREND_FACTOR`).
    """

    b_simple_start: float
    b_simple_end: float
    loss_start: float | None
    loss_end: float | None
    direction: str


def b_simple_trend(series: BSimpleSeries, history: History) -> Trend:
    """The direction B_simple took over the run, and the loss over the same steps.

    Raises:
        NoiseScaleInputError: no step carries an estimate.
    """
    if series.b_simple.size == 0:
        raise NoiseScaleInputError(f"{history.path!r}: no step carries a B_simple estimate")
    k = max(1, math.ceil(TREND_SPAN * series.b_simple.size))
    start = float(np.median(series.b_simple[:k]))
    end = float(np.median(series.b_simple[-k:]))
    if end > TREND_FACTOR * start:
        direction = "grew"
    elif end * TREND_FACTOR < start:
        direction = "shrank"
    else:
        direction = "stayed about the same"
    first_steps = np.isin(history.step, series.step[:k]) & np.isfinite(history.loss)
    last_steps = np.isin(history.step, series.step[-k:]) & np.isfinite(history.loss)
    loss_start = float(np.median(history.loss[first_steps])) if first_steps.any() else None
    loss_end = float(np.median(history.loss[last_steps])) if last_steps.any() else None
    return Trend(start, end, loss_start, loss_end, direction)


def run_warnings(history: History, series: BSimpleSeries) -> list[str]:
    """Why the report's headline numbers may not be trustworthy yet: a short run, a wide interval.

    The tracker's estimate is a ratio of EMAs with time constant 1/(1 − beta) steps; until a run
    spans several time constants, the first steps, where the gradient changes fastest, weigh on
    it. An interval open above means |G|² is not yet distinguishable from zero. A run whose
    later records lost the estimate acts on a stale one (:func:`_lost_estimate`).
    """
    out: list[str] = []
    n = int(series.b_simple.size)
    beta = history.header.get("beta")
    if isinstance(beta, int | float) and 0 < beta < 1:
        horizon = 1.0 / (1.0 - float(beta))
        needed = MIN_TIME_CONSTANTS * horizon
        if n < needed:
            out.append(
                f"short run: B_simple is estimated at only {n:,} steps, fewer than "
                f"{MIN_TIME_CONSTANTS:g} time constants of the tracker's EMA (beta {beta:g}: "
                f"{horizon:.0f} steps each, so {math.ceil(needed):,} steps); the headline "
                "numbers still lean on the first steps: train longer before trusting them"
            )
    elif n < MIN_STEPS_PLAIN_AVERAGE:
        out.append(
            f"short run: B_simple is estimated at only {n:,} steps (fewer than "
            f"{MIN_STEPS_PLAIN_AVERAGE}); train longer before trusting the headline numbers"
        )
    if n:
        out.extend(_lost_estimate(history, int(series.step[-1])))
        low, high = float(series.low[-1]), float(series.high[-1])
        if not math.isfinite(high):
            out.append(
                "the last B_simple's interval is open above: |G|² is not yet distinguishable "
                "from zero, so B_simple is not bounded yet; train longer or raise beta"
            )
        elif low > 0 and high > WIDE_INTERVAL_RATIO * low:
            out.append(
                f"the last B_simple's interval [{low:.4g}, {high:.4g}] spans more than a factor "
                f"{WIDE_INTERVAL_RATIO:g}: treat the headline numbers as rough"
            )
    return out


def _lost_estimate(history: History, last_estimate: int) -> list[str]:
    """A warning when the run went on past its last estimate with records that carry none: the
    report's headline and calc's decision then rest on a stale B_simple (a hunt, 2026-12-06:
    calc acted on step 40's of a run that lost it for its last 20 steps, without a word)."""
    later = ~history.skipped & (history.step > last_estimate)
    if not later.any():
        return []
    i = int(np.flatnonzero(later)[-1])
    g2, trace = float(history.g2_ema[i]), float(history.trace_sigma_ema[i])
    reason = (
        estimators.unavailable_reason(g2, trace)
        if math.isfinite(g2) and math.isfinite(trace)
        else "it records no averages"
    )
    meaning = (
        "the noise scale has outgrown what these steps measure, likely far above step "
        f"{last_estimate:,}'s B_simple: a batch size chosen from that estimate is likely too "
        "small, and its regime and ratios point the wrong way"
        if g2 <= 0  # (not a missing average: a NaN says nothing of the noise scale, a review)
        else f"step {last_estimate:,}'s B_simple may no longer hold"
    )
    last = int(history.step[i])
    return [
        f"B_simple's last estimate is from step {last_estimate:,}, but the run went on to step "
        f"{last:,} and its {int(later.sum()):,} later record(s) carry none — at step {last:,} "
        f"{reason}; {meaning}. The numbers here are step {last_estimate:,}'s, not the end of "
        "the run's"
    ]


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows, computed once.

    ``warnings`` holds the history's own (unfinished or repeated lines) and :func:`run_warnings`.
    """

    history: History
    b_simple_step: BSimpleSeries
    b_simple_loss: BSimpleSeries
    emas: EmaSeries
    temperature: TemperatureSeries
    trajectory: Trajectory
    run: RunCost
    costs: list[CostRow]
    adaptive: AdaptiveSummary
    pareto: ParetoCurves
    trend: Trend
    warnings: tuple[str, ...] = ()


def report_data(history: History, batch_sizes: Iterable[float] | None = None) -> ReportData:
    """All the numbers of the run report.

    Args:
        history: From :func:`load_history`.
        batch_sizes: Fixed batch sizes to cost; default :func:`candidate_batch_sizes`.
    """
    traj = trajectory(history)
    candidates = candidate_batch_sizes(traj) if batch_sizes is None else list(batch_sizes)
    series = b_simple_vs_step(history)
    run = run_cost(traj)
    adaptive = adaptive_summary(traj, history.unit)
    sums: tuple[str, ...] = ()
    if run.e_min >= run.examples:  # (unknown examples, NaN: see trajectory's warning)
        # (until 2026-12-06 the trapezoid rule in s put E_min above E wherever B_simple jumped
        # between records, every step recorded or not, and blamed sparse records; eq. D.1 step
        # by step keeps E_min below the interpolated ∫B dt, so only that can disagree with E)
        low, high = float(traj.batch_size.min()), float(traj.batch_size.max())
        cause = (
            f"the batch size changes between sparse records ({low:,.4g} to {high:,.4g}) and is "
            f"interpolated linearly between them, which counts more {history.unit} than the run "
            "recorded: record every step around the batch-size changes"
            if high > low
            else f"the history's running count of {history.unit} disagrees with its batch size "
            f"({low:,.4g}) times the {run.steps:,.0f} steps: the history is inconsistent; "
            "record it again"
        )
        sums = (
            f"E_min ({run.e_min:,.4g}) comes out above the {run.examples:,.4g} {history.unit} "
            f"the run itself used, which no schedule can go below, because {cause}; until then "
            "the costs, B_crit and the schedules below, which rest on these integrals, do not hold",
        )
    else:
        # the batch sizes between records are interpolated linearly; a count they do not add up
        # to (B 8, 16, 8, … recorded at the 8s only: 480 of 720 examples) prices a run the history
        # does not describe: S_min and E_min 33% low, without a word until 2026-12-07 (a review)
        interpolated = adaptive.interpolated_examples  # (adaptive_summary integrates it)
        off = run.examples - interpolated
        if abs(off) > INTERPOLATED_SHARE * run.examples:
            sums = (
                f"the run counted {run.examples:,.6g} {history.unit} between its first and last "
                f"estimate, but its batch sizes ('b_big'), interpolated between the records that "
                f"carry an estimate, add up to {interpolated:,.6g}: the batch size changed at "
                "steps without an estimate (sparse or skipped records, or records before "
                "B_simple could be estimated), and S_min, E_min, the costs and the schedules "
                "below price the interpolated batches, not the run's; record every step around "
                "the batch-size changes, or change the batch size only once B_simple is "
                "estimated",
            )
        else:
            # (a history without the running count says so itself: trajectory's warning)
            sums = _changed_across_gaps(traj, history.unit) if math.isfinite(off) else ()
    return ReportData(
        history=history,
        b_simple_step=series,
        b_simple_loss=b_simple_vs_loss(history),
        emas=ema_series(history),
        temperature=temperature_series(history),
        trajectory=traj,
        run=run,
        costs=cost_table(traj, candidates),
        adaptive=adaptive,
        pareto=pareto_curves(traj),
        trend=b_simple_trend(series, history),
        warnings=(*sums, *traj.warnings, *history.warnings, *run_warnings(history, series)),
    )


def _changed_across_gaps(traj: Trajectory, unit: str) -> tuple[str, ...]:
    """A warning where the batch size differs on either side of steps the trajectory does not
    hold (records missing, skipped, or ``measure_every``'s unmeasured steps) although the run's
    count agrees with the interpolated batches: the count cannot see a change halfway through
    such steps (8 at step 11, 32 from step 13, steps 12-13 missing: 16 and 24 interpolated, 40
    examples either way), but S_min and E_min price 16 and 24 — 8.785 for 8.742 over 31 steps,
    without a word until 2026-12-08 (a review)."""
    gaps = np.diff(traj.step) > 1
    changed = np.flatnonzero(gaps & (np.diff(traj.batch_size) != 0))
    if not changed.size:
        return ()
    i = int(changed[0])
    return (
        f"the batch size changed from {traj.batch_size[i]:,.4g} to "
        f"{traj.batch_size[i + 1]:,.4g} across steps the history does not hold (steps "
        f"{int(traj.step[i]) + 1:,}–{int(traj.step[i + 1]) - 1:,}"
        + (f", and {changed.size - 1} more such gap(s)" if changed.size > 1 else "")
        + f"; missing, skipped or unmeasured records): the {unit} the run counted agree with "
        "the batch sizes interpolated there, but not which step took which, and S_min, E_min, "
        "the costs and the schedules below price the interpolated batches; record every step "
        "around the batch-size changes",
    )


def summary_dict(data: ReportData) -> dict[str, Any]:
    """The report's headline numbers as JSON-ready data (``noisescale report --json``)."""
    bs = data.b_simple_step
    adaptive = data.adaptive
    t = data.history.tokens_per_example_at(bs.step[-1])  # (the last B_simple's own)
    return {
        "history": data.history.path,
        "unit": data.history.unit,
        "tokens_per_example": _finite_or_none(t),
        "steps_recorded": int(data.history.step.size),
        "steps_with_b_simple": int(bs.x.size),
        "b_simple_first": float(bs.b_simple[0]),
        "b_simple_last": float(bs.b_simple[-1]),
        "b_simple_last_interval": [_finite_or_none(bs.low[-1]), _finite_or_none(bs.high[-1])],
        # the last B_simple in both units where tokens were counted
        "b_simple_last_examples": _finite_or_none(
            float(bs.b_simple[-1]) / (t if data.history.unit == "tokens" else 1.0)
        ),
        "b_simple_last_tokens": _finite_or_none(
            float(bs.b_simple[-1]) * (1.0 if data.history.unit == "tokens" else t)
        ),
        "run": {k: _finite_or_none(v) for k, v in data.run._asdict().items()},
        "gamma": adaptive.gamma,
        "adaptive": {
            "r_natural": adaptive.r_natural,
            "natural_steps": adaptive.natural_steps,
            "natural_examples": adaptive.natural_examples,
            "r_same_examples": _finite_or_none(adaptive.r_same_examples),
            "same_examples_steps": _finite_or_none(adaptive.same_examples_steps),
        },
        "fixed_batch_costs": [
            {k: _finite_or_none(v) for k, v in row._asdict().items()} for row in data.costs
        ],
        "b_simple_trend": {k: _finite_or_none(v) for k, v in data.trend._asdict().items()},
        "groups": [
            {
                "name": g.name,
                "b_simple": _finite_or_none(g.b_simple),
                "b_simple_interval": [_finite_or_none(g.low), _finite_or_none(g.high)],
                "trace_sigma_share": _finite_or_none(tr),
                "g2_share": _finite_or_none(g2),
            }
            for g, (tr, g2) in zip(
                data.history.groups, group_shares(data.history.groups), strict=True
            )
        ],
        "warnings": list(data.warnings),
    }


def group_shares(groups: Iterable[GroupEstimate]) -> list[tuple[float, float]]:
    """Each group's share of the averaged tr Σ and of the averaged |G|² (the groups add up to
    the total's; a group's |G|² estimate, unbiased, can be negative where noise swamps it). NaN
    where the sum is not positive and finite."""
    groups = list(groups)

    def shares(values: list[float]) -> list[float]:
        total = math.fsum(values)
        if not (math.isfinite(total) and total > 0):
            return [math.nan] * len(values)
        return [v / total for v in values]

    return list(
        zip(
            shares([g.trace_sigma_ema for g in groups]),
            shares([g.g2_ema for g in groups]),
            strict=True,
        )
    )


def _check_header(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict) or obj.get("kind") != HISTORY_KIND:
        raise NoiseScaleInputError(
            f"{str(path)!r} is not a noisescale history: its first line must be a header with "
            f'"kind": "{HISTORY_KIND}"'
        )
    if obj.get("version") not in SUPPORTED_VERSIONS:
        raise NoiseScaleInputError(
            f"{str(path)!r}: history version {obj.get('version')!r} is not supported "
            f"(this noisescale reads versions {SUPPORTED_VERSIONS})"
        )
    if obj.get("unit", "examples") not in UNITS:
        raise NoiseScaleInputError(
            f"{str(path)!r}: the header's unit {obj.get('unit')!r} is not one of {UNITS}"
        )
    return obj


def _drop_superseded(
    records: list[tuple[int, dict[str, Any]]], warnings: list[str]
) -> list[tuple[int, dict[str, Any]]]:
    kept: list[tuple[int, dict[str, Any]]] = []
    for number, obj in records:
        if kept and obj["step"] <= kept[-1][1]["step"]:
            dropped = 0
            while kept and kept[-1][1]["step"] >= obj["step"]:
                kept.pop()
                dropped += 1
            warnings.append(
                f"line {number}: step {obj['step']} comes again (a resumed run?); the "
                f"{dropped} earlier record(s) from that step on are replaced"
            )
        for name in COUNTS:
            # a running count below the last record's, not below every earlier one's: a run
            # resumed from an earlier checkpoint whose recorded steps do not repeat the
            # abandoned ones (another measure_every); the records that counted past it are the
            # abandoned run's (until a review of 2026-12-07 the file was refused as corrupt)
            now = _count(obj, name)
            if now is None or not kept or _count(kept[-1][1], name, -math.inf) <= now:
                continue
            below = [i for i, (_, o) in enumerate(kept) if _count(o, name, math.inf) <= now]
            if not below:
                continue  # (below every record's: no checkpoint it resumed from — corrupt, refused)
            # (and at least one step of its own batch past the record it falls back to: a
            # single corrupt count, 12 among 8 … 64, read as a resume dropped four valid
            # records, a review of 2026-12-07 — refused as corrupt instead)
            batch = obj.get("b_big")
            gain = now - _count(kept[below[-1]][1], name, now)
            if name == "examples" and isinstance(batch, int | float) and gain < batch:
                continue
            dropped = len(kept) - 1 - below[-1]
            del kept[below[-1] + 1 :]
            warnings.append(
                f"line {number}: {name!r} falls back to {now!r} (a run resumed from an earlier "
                f"checkpoint?); the {dropped} earlier record(s) that counted past it are "
                "replaced"
            )
            break
        kept.append((number, obj))
    return kept


def _count(obj: dict[str, Any], name: str, missing: float | None = None) -> float | None:
    """A record's running count ``name``, where it is a finite number (else ``missing``)."""
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return missing
    try:
        value = float(value)
    except OverflowError:
        return missing
    return value if math.isfinite(value) else missing


def _is_preconditioned(obj: dict[str, Any]) -> bool:
    return obj.get("preconditioned") is True  # absent: no preconditioner was asked for


def _after_last_switch(
    records: list[tuple[int, dict[str, Any]]], warnings: list[str]
) -> list[tuple[int, dict[str, Any]]]:
    """The records from the last switch between plain and preconditioned norms on.

    A tracker with ``precondition=`` measures the plain gradient for its first
    ``precondition_from`` steps and P ⊙ g after: two different quantities (the tracker restarts
    its averages at the switch), which one trajectory or window must not splice together.
    """
    # a plain step the tracker left out after the estimate became preconditioned (an optimizer
    # whose state was not restored on a resume) carries no estimate: no switch
    flags: list[bool] = []
    for _, obj in records:
        left_out = obj.get("skipped") and flags and flags[-1] and not _is_preconditioned(obj)
        flags.append(True if left_out else _is_preconditioned(obj))
    switches = [i for i in range(1, len(flags)) if flags[i] != flags[i - 1]]
    if not switches:
        return records
    i = switches[-1]
    kind = "preconditioned" if flags[i] else "plain"
    other = "plain" if flags[i] else "preconditioned"
    first, last = records[0][1]["step"], records[-1][1]["step"]
    warnings.append(
        f"the history switches from {other} to {kind} gradient norms at step "
        f"{records[i][1]['step']} (precondition_from=): the two measure different quantities "
        f"and are never analysed together, so only steps {records[i][1]['step']}–{last} "
        f"({kind}) are read and steps {first}–{records[i - 1][1]['step']} are left out"
        + (f" ({len(switches)} switches; the last one counts)" if len(switches) > 1 else "")
    )
    return records[i:]


def _groups(number: int, obj: dict[str, Any], path: Path) -> tuple[GroupEstimate, ...]:
    """The per-group estimates of one record (line ``number``), checked."""
    groups = obj.get("groups")
    if groups is None:
        return ()
    if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
        raise NoiseScaleInputError(
            f"{str(path)!r}, line {number}: 'groups' must map each group's name to its "
            "estimate; the file is corrupt"
        )
    out = []
    for name, group in groups.items():
        values = []
        for field in GROUP_FIELDS:
            v = group.get(field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                raise NoiseScaleInputError(
                    f"{str(path)!r}, line {number}: group {name!r} has a non-numeric "
                    f"{field!r} ({v!r}); the file is corrupt"
                )
            values.append(math.nan if v is None else float(v))
        out.append(GroupEstimate(str(name), *values))
    return tuple(out)


def _check_record(number: int, obj: dict[str, Any], path: Path) -> None:
    """Refuse values no tracker writes, naming the line and field (until 2026-12-07 they were
    read as they were, to a matplotlib or overflow error, or printed: a run's examples −11, an
    interval that does not hold its estimate, a hunt): a ``skipped`` that is not a boolean, a
    batch size or running count that is not finite, negative (a batch size not positive) or
    above :data:`MAX_COUNT`, and an interval that does not hold its B_simple."""

    def refuse(field: str, value: Any, why: str) -> NoReturn:
        raise NoiseScaleInputError(
            f"{str(path)!r}, line {number}: {field!r} is {value!r}, but {why}; the file is "
            "corrupt: correct or remove that line"
        )

    skipped = obj.get("skipped", False)
    if not isinstance(skipped, bool):
        refuse("skipped", skipped, "it must be true or false")
    values = {
        k: obj.get(k) for k in ("b_big", *COUNTS, "b_simple", "b_simple_low", "b_simple_high")
    }
    number_of = {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool)  # (others: _float_column)
    }
    b_big = number_of.get("b_big")
    if b_big is not None and not (0 < b_big <= MAX_COUNT):
        refuse(
            "b_big",
            values["b_big"],
            f"a step's batch size is a positive number up to {MAX_COUNT:g}",
        )
    for field in COUNTS:
        if field in number_of and not 0 <= number_of[field] <= MAX_COUNT:
            refuse(
                field, values[field], f"a count of what the run has seen is from 0 to {MAX_COUNT:g}"
            )
    b = number_of.get("b_simple", math.nan)
    low = number_of.get("b_simple_low", math.nan)
    high = number_of.get("b_simple_high", math.nan)
    if low < 0:
        refuse("b_simple_low", values["b_simple_low"], "the interval's lower end is not negative")
    # (a relative slack of INTERVAL_SLACK for the rounding of bounds computed apart from b)
    slack = 1 + INTERVAL_SLACK
    if math.isfinite(b) and b > 0 and high * slack < b:
        field = "b_simple_high"
    elif (math.isfinite(b) and b > 0 and low > b * slack) or low > high * slack:
        field = "b_simple_low"
    else:
        return
    refuse(
        field,
        values[field],
        f"the interval [{values['b_simple_low']!r}, {values['b_simple_high']!r}] must hold "
        f"its B_simple ({values['b_simple']!r})",
    )


def _check_running_count(records: list[tuple[int, dict[str, Any]]], name: str, path: Path) -> None:
    """Refuse a running count (``examples``, ``tokens_seen``) that goes down between records."""
    before: tuple[int, float] | None = None
    for number, obj in records:
        value = obj.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        if before is not None and value < before[1]:
            raise NoiseScaleInputError(
                f"{str(path)!r}, line {number}: {name!r} is {value!r}, below line {before[0]}'s "
                f"{before[1]!r}, but it counts what the run has seen so far and never goes down; "
                "the file is corrupt: correct or remove that line"
            )
        before = (number, value)


def _float_column(records: list[tuple[int, dict[str, Any]]], name: str, path: Path) -> np.ndarray:
    out = np.full(len(records), np.nan)
    for i, (number, obj) in enumerate(records):
        value = obj.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise NoiseScaleInputError(
                f"{str(path)!r}, line {number}: {name!r} must be a number or null, got {value!r}"
            )
        out[i] = value
    return out


def _estimated(history: History) -> np.ndarray:
    b = history.b_simple
    return ~history.skipped & np.isfinite(b) & (b > 0)


def _positive_or_nan(x: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(x) & (x > 0), x, np.nan)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float | np.floating) and not math.isfinite(x):
        return None
    return x
