"""The branched critical batch size beside the noise scale of the same run: the numbers.

For each branch point, the window the branches cover along the main run, [checkpoint,
checkpoint + budget], and in it:

* the local critical batch size at tolerance τ and its eq. 2.11 reading B_crit
  (:mod:`noisescale.branch.compare`);
* B_simple of the main run over that window: the ratio of the plain means of the tracker's
  unbiased per-step |G|² and tr Σ over the window's steps (App. A.1), with its Fieller interval
  — not the tracker's running EMA, which lags and would mix in earlier training;
* B_noise where it was measured: from :class:`~noisescale.hessian.BNoiseTracker` records, the
  ratio of the plain means of their per-measurement GᵀHG and tr(HΣ) over the window, with its
  Fieller interval, as for B_simple (the records' ``b_noise`` is the tracker's running EMA);
  from summary points ``(examples, b_noise[, low, high])``, one per window, their mean. A
  B_noise point stands where the weights it measured stand: after ``examples`` of training
  (placed by ``step``: after that step of the main run, ``bn.step`` called after
  ``optimizer.step()``). The window's weights are those at [checkpoint, checkpoint + budget):
  the checkpoint's own, not those after the window's last step (until 2026-12-07 [ , ]: with
  checkpoints one budget apart, a window's B_noise averaged in the next checkpoint's point);
* the ratios B_crit/B_simple and cbs/B_simple — what McCandlish et al. predict to be of order 1
  (B_crit ≈ B_noise, B_simple within a small factor) and Merrill et al. doubt.

Units: branch positions, budgets and batch sizes count ``unit`` (examples or tokens). A history
in the other unit is converted record by record with its tokens per example (each record's
own, or ``tokens_per_example``). B_simple is measured at the main run's batch size and
learning rate, i.e. its temperature (App. C); branches whose learning rate keeps ε/B (the
linear rule) see the same temperature, others do not. Pure NumPy, no plotting.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from noisescale import estimators
from noisescale.branch.compare import LocalCriticalBatch
from noisescale.errors import NoiseScaleInputError
from noisescale.report.data import History

UNITS = ("examples", "tokens")


@dataclass(frozen=True)
class NoisePoint:
    """One B_noise measurement along the main run (in the branches' unit)."""

    examples: float
    b_noise: float
    low: float = math.nan
    high: float = math.nan
    #: The measurement's own unbiased GᵀHG and tr(HΣ) (a ``BNoiseTracker`` record's ``ghg``
    #: and ``trace_h_sigma``; ``nan`` for a summary point).
    ghg: float = math.nan
    trace_h_sigma: float = math.nan


@dataclass(frozen=True)
class SideBySideRow:
    """One branch point with the noise scales of its window (module docstring).

    Attributes:
        result: The branched measurement.
        window: (start, end) along the main run.
        loss: The main run's training loss averaged over the window's steps (one batch's loss
            is too noisy to place a checkpoint by; ``nan`` without a history).
        b_simple, b_simple_low, b_simple_high: B_simple over the window with its interval.
        b_simple_steps: Steps of the window that carry |G|² and tr Σ.
        window_steps: The main run's records the window spans, at the median spacing of the
            history's records within one window of it (0 without a history).
        window_covered: The fraction of the window between the history's first and last
            positions (``nan`` without a history): under one half, B_simple rests on the few
            steps at one end of it.
        b_noise, b_noise_low, b_noise_high: B_noise over the window (module docstring).
        b_noise_reason: Why B_noise is not available where its window's measurements are
            (their averaged GᵀHG or tr(HΣ) is not positive); empty otherwise.
        ratio_b_crit: B_crit/B_simple.
        ratio_cbs: cbs/B_simple.
    """

    result: LocalCriticalBatch
    window: tuple[float, float]
    loss: float
    b_simple: float
    b_simple_low: float
    b_simple_high: float
    b_simple_steps: int
    b_noise: float
    b_noise_low: float
    b_noise_high: float
    ratio_b_crit: float
    ratio_cbs: float
    window_steps: int = 0
    window_covered: float = math.nan
    b_noise_reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite numbers as ``null``)."""
        out = {"branch": self.result.as_dict(), "window": list(self.window)}
        for name in (
            "loss",
            "b_simple",
            "b_simple_low",
            "b_simple_high",
            "b_simple_steps",
            "window_steps",
            "window_covered",
            "b_noise",
            "b_noise_low",
            "b_noise_high",
            "b_noise_reason",
            "ratio_b_crit",
            "ratio_cbs",
        ):
            value = getattr(self, name)
            out[name] = value if not isinstance(value, float) or math.isfinite(value) else None
        return out


@dataclass(frozen=True)
class Trajectory:
    """The main run's B_simple (the tracker's own running estimate) against position."""

    examples: np.ndarray
    b_simple: np.ndarray
    low: np.ndarray
    high: np.ndarray


def history_positions(
    history: History, unit: str, tokens_per_example: float | None = None
) -> np.ndarray:
    """Position of every record of ``history`` along the run, in ``unit``.

    Records without a running count are placed by integrating the per-step batch sizes. A
    history in examples that did not count tokens is placed in tokens with
    ``tokens_per_example``.

    Raises:
        NoiseScaleInputError: tokens asked of a history that did not count them, without
            ``tokens_per_example``.
    """
    _check_unit(unit)
    if unit == "tokens":
        pos = history.tokens_seen.copy()
        if not np.any(np.isfinite(pos)):
            per = history.tokens_per_example
            if history.unit == "tokens" and not np.any(np.isfinite(per)):
                # The history counts tokens in its batch sizes (b_big) but not a running total.
                return _integrate(history, history.b_big)
            if history.unit == "examples" and tokens_per_example is not None:
                return history_positions(history, "examples") * float(tokens_per_example)
            raise NoiseScaleInputError(
                f"{history.path!r} did not count tokens; give the tokens per example "
                "(--tokens-per-example) or the branches in examples"
            )
        batch = history.b_big
        if history.unit == "examples" and not np.all(np.isfinite(pos)):
            # its batch sizes count examples: in tokens each record's is times its tokens per
            # example (until 2026-12-07 integrated as tokens where some records counted none:
            # every position tokens-per-example× too small, a review)
            f = b_simple_factors(history, "tokens", tokens_per_example)
            if not np.all(np.isfinite(f)):
                first = int(history.step[~np.isfinite(f)][0])
                raise NoiseScaleInputError(
                    f"{history.path!r} counted tokens on some records only, and its step {first} "
                    "carries no tokens per example to place it in tokens; give the tokens per "
                    "example (--tokens-per-example) or the branches in examples"
                )
            batch = batch * f
        return _fill(history, pos, batch)
    pos = history.examples.copy()
    batch = history.b_big
    if history.unit == "tokens":
        batch = history.b_big / history.tokens_per_example
    return _fill(history, pos, batch)


def b_simple_factors(history: History, unit: str, tokens_per_example: float | None) -> np.ndarray:
    """What each record's B_simple of ``history`` is multiplied by to count ``unit`` (``nan``
    where its tokens per example are unknown: records before the run counted any).

    Each record converts with ``tokens_per_example``, else its own tokens per example: the
    running mean it carries, with which the tracker converted a history in tokens
    (:func:`noisescale.state.per_token`), carried on over records that counted no tokens (the
    running mean did not change there). Not the whole run's mean: with the tokens per example
    changing along the run (16, then 64), a window's B_simple came out 0.4× and 1.6× the truth
    (a hunt).

    Raises:
        NoiseScaleInputError: a change of unit without tokens per example.
    """
    _check_unit(unit)
    if history.unit == unit:
        return np.ones(history.step.size)
    if tokens_per_example is None:
        t = _carried_tokens_per_example(history)
    else:
        t = np.full(history.step.size, float(tokens_per_example))
    t = np.where(t > 0, t, math.nan)
    if not np.any(np.isfinite(t)):
        raise NoiseScaleInputError(
            f"the history counts {history.unit} and the branches {unit}; give the tokens per "
            "example to convert"
        )
    return t if unit == "tokens" else 1.0 / t


def b_simple_trajectory(
    history: History, unit: str = "examples", tokens_per_example: float | None = None
) -> Trajectory:
    """The tracker's running B_simple and its interval against position, in ``unit`` (each
    record converted with its own tokens per example, :func:`b_simple_factors`; records
    without one are left out)."""
    pos = history_positions(history, unit, tokens_per_example)
    f = b_simple_factors(history, unit, tokens_per_example)
    keep = ~history.skipped & np.isfinite(history.b_simple) & (history.b_simple > 0)
    keep &= np.isfinite(pos) & np.isfinite(f)
    return Trajectory(
        pos[keep],
        history.b_simple[keep] * f[keep],
        history.b_simple_low[keep] * f[keep],
        history.b_simple_high[keep] * f[keep],
    )


def window_b_simple(
    history: History,
    start: float,
    end: float,
    *,
    unit: str = "examples",
    tokens_per_example: float | None = None,
    confidence: float = 0.95,
) -> estimators.NoiseEstimate:
    """B_simple over the main run's steps in the window: records with position in (start, end]
    (module docstring). A record's position counts the examples after its step, whose gradient
    was taken before it: the step that ended at ``start`` trained before the branch point and
    is not the window's (until 2026-12-07 it was counted, one step of 11 in a window of 10
    from before the checkpoint, found by tests/fuzz_branch.py).

    The estimate is in ``unit``; ``steps`` says how many records it uses (0: none in the
    window, then B_simple is ``nan``). A history in the other unit is converted record by
    record before the means are taken: |G|² divided by f², tr Σ by f, f of
    :func:`b_simple_factors` (:func:`noisescale.state.per_token`, or its inverse).

    Raises:
        NoiseScaleInputError: a change of unit where a record in the window has no tokens
            per example.
    """
    pos = history_positions(history, unit, tokens_per_example)
    inside = (pos > start) & (pos <= end) & ~history.skipped
    inside &= np.isfinite(history.g2) & np.isfinite(history.trace_sigma)
    if not inside.any():
        return estimators.NoiseEstimate(
            math.nan, math.nan, math.nan, steps=0, reason="no step of the main run in the window"
        )
    f = b_simple_factors(history, unit, tokens_per_example)[inside]
    if not np.all(np.isfinite(f)):
        raise NoiseScaleInputError(
            f"the history counts {history.unit} and the branches {unit}, and its step "
            f"{int(history.step[inside][~np.isfinite(f)][0])} (in the window [{start:g}, "
            f"{end:g}]) has no tokens per example to convert it by (none counted yet); give "
            "--tokens-per-example T (tokens_per_example=), or the branches in "
            f"{history.unit}"
        )
    state = estimators.update_state(
        estimators.init_state(1.0), history.g2[inside] / f**2, history.trace_sigma[inside] / f
    )
    return replace(estimators.b_simple_interval(state, confidence), unit=unit)


def side_by_side(
    results: Sequence[LocalCriticalBatch],
    history: History | None = None,
    *,
    unit: str = "examples",
    tokens_per_example: float | None = None,
    b_noise: Sequence[NoisePoint] = (),
    confidence: float = 0.95,
) -> list[SideBySideRow]:
    """Each branch point with B_simple (and B_noise) over its window and their ratios.

    Args:
        results: Local critical batch sizes along the run.
        history: The main run's tracker history (:func:`noisescale.load_history`), or ``None``.
        unit: What the branches count: ``"examples"`` or ``"tokens"``.
        tokens_per_example: For a history in the other unit that lacks the count.
        b_noise: B_noise measurements along the main run, in ``unit``.
        confidence: Coverage of the B_simple intervals.
    """
    _check_unit(unit)
    rows = []
    pos = history_positions(history, unit, tokens_per_example) if history is not None else None
    finite = pos[np.isfinite(pos)] if pos is not None else np.empty(0)
    span = (math.nan, math.nan)
    if history is not None and pos is not None and finite.size:
        # The history covers its steps' examples: a record at p trained on (p − its batch, p]
        # (until 2026-12-07 from its first record's position on: a window of one main-run step
        # at the run's start read 0% covered and "give the history of the whole run"; a review)
        with np.errstate(invalid="ignore"):
            extent = history.b_big * b_simple_factors(history, unit, tokens_per_example)
        first = pos - np.where(np.isfinite(extent) & (extent > 0), extent, 0.0)
        span = (float(np.nanmin(np.where(np.isfinite(pos), first, np.nan))), float(finite.max()))
    for r in sorted(results, key=lambda r: r.checkpoint):
        start, end = r.checkpoint, r.checkpoint + r.budget
        loss = math.nan
        e: estimators.NoiseEstimate | None = None
        if history is not None and pos is not None:
            e = window_b_simple(
                history,
                start,
                end,
                unit=unit,
                tokens_per_example=tokens_per_example,
                confidence=confidence,
            )
            window = (pos > start) & (pos <= end) & np.isfinite(history.loss)
            if window.any():
                loss = float(history.loss[window].mean())
        # (the weights measured, from the checkpoint's on, not those after the window: module
        # docstring)
        inside = [p for p in b_noise if start <= p.examples < end]
        bn, bn_low, bn_high, bn_reason = _window_b_noise(inside, confidence)
        bs = e.b_simple if e is not None else math.nan
        rows.append(
            SideBySideRow(
                result=r,
                window=(float(start), float(end)),
                loss=loss,
                b_simple=bs,
                b_simple_low=e.low if e is not None else math.nan,
                b_simple_high=e.high if e is not None else math.nan,
                b_simple_steps=e.steps if e is not None else 0,
                b_noise=bn,
                b_noise_low=bn_low,
                b_noise_high=bn_high,
                ratio_b_crit=_ratio(r.b_crit, bs),
                ratio_cbs=_ratio(r.cbs, bs),
                window_steps=_window_steps(finite, start, end),
                window_covered=_covered(span, start, end),
                b_noise_reason=bn_reason,
            )
        )
    return rows


def _window_b_noise(
    inside: Sequence[NoisePoint], confidence: float
) -> tuple[float, float, float, str]:
    """B_noise over a window, its interval and why it is not available (else ""): from
    per-measurement parts when the points carry them (ratio of means, Fieller interval), else
    the mean of the summary points."""
    if not inside:
        return math.nan, math.nan, math.nan, ""
    if all(math.isfinite(p.ghg) and math.isfinite(p.trace_h_sigma) for p in inside):
        state = estimators.update_state(
            estimators.init_state(1.0),
            np.array([p.ghg for p in inside]),
            np.array([p.trace_h_sigma for p in inside]),
        )
        e = estimators.b_simple_interval(state, confidence)
        return e.b_simple, e.low, e.high, estimators.b_noise_unavailable_reason(e.g2, e.trace_sigma)
    return (
        float(np.mean([p.b_noise for p in inside])),
        float(np.mean([p.low for p in inside])),
        float(np.mean([p.high for p in inside])),
        "",
    )


def read_b_noise(
    records: Sequence[dict[str, Any]],
    history: History | None = None,
    unit: str = "examples",
    tokens_per_example: float | None = None,
    *,
    names: Sequence[str] | None = None,
) -> list[NoisePoint]:
    """B_noise points from records with ``examples`` (or ``step``, placed with the history, or
    the other unit, placed where the history counted it, else converted with
    ``tokens_per_example``) and
    either a :class:`~noisescale.hessian.BNoiseTracker`'s per-measurement ``ghg`` and
    ``trace_h_sigma`` (its ``history``: the window's B_noise is computed from them, not from
    the running ``b_noise``) or summary values ``b_noise`` and optionally
    ``b_noise_low``/``b_noise_high`` (e.g. one measurement per window).

    A point stands where the weights it measured do: ``examples`` of training before it, or
    with ``step`` the main run's position after that step — a ``BNoiseTracker`` whose
    ``step`` is called after ``optimizer.step()``, its call count the main run's step (called
    before the forward, its weights are one step earlier: give ``examples``). A window holds
    the points in [checkpoint, checkpoint + budget) (module docstring).

    A ``BNoiseTracker`` measures per example: for branches in tokens its B_noise (value and
    interval) is multiplied by the tokens per example — ``tokens_per_example``, else the
    history's at the record's step. Summary points are read as given, in ``unit``.

    ``names`` says what each record is called in the messages (the command: its file and
    line), ``B_noise record i`` without it.

    Raises:
        NoiseScaleInputError: a record without ``b_noise`` (or ``ghg`` and ``trace_h_sigma``)
            or a position, records that mix the two kinds, a summary point that cannot be a
            B_noise (``b_noise`` not positive, an interval that is not a number or does not
            hold it), or a ``BNoiseTracker``'s record beside branches in tokens without the
            tokens per example to convert it.
    """
    _check_unit(unit)
    pos = history_positions(history, unit, tokens_per_example) if history is not None else None
    other = "examples" if unit == "tokens" else "tokens"
    out = []
    kinds = set()
    converted: list[tuple[str, int | None]] = []  # (the records converted to tokens, by step)
    # each history record's own tokens per example, computed once for all the records (a loop
    # over the history: per record, 500 records beside a history of 20,000 steps took 35 s)
    own: np.ndarray | None = None
    for i, rec in enumerate(records, start=1):
        name = names[i - 1] if names is not None else f"B_noise record {i}"
        parts = (
            isinstance(rec, dict) and _number(rec.get("ghg")) and _number(rec.get("trace_h_sigma"))
        )
        kinds.add(bool(parts))
        if len(kinds) > 1:
            raise NoiseScaleInputError(
                f"{name}: the records mix per-measurement 'ghg' and "
                "'trace_h_sigma' (a BNoiseTracker's) with summary 'b_noise' values; give one "
                "kind"
            )
        if not parts and (not isinstance(rec, dict) or not _number(rec.get("b_noise"))):
            raise NoiseScaleInputError(
                f"{name}: needs a number 'b_noise' (or a BNoiseTracker's 'ghg' and 'trace_h_sigma')"
            )
        index = None
        if _number(rec.get("step")) and history is not None:
            match = np.flatnonzero(history.step == int(rec["step"]))
            index = int(match[0]) if match.size else None
        if _number(rec.get(unit)):
            at = float(rec[unit])
        elif _number(rec.get("step")) and history is not None and pos is not None:
            if index is None:
                raise NoiseScaleInputError(f"{name}: step {rec['step']} is not in the history")
            at = float(pos[index])
        elif _number(rec.get(other)) and tokens_per_example is not None and parts:
            # A BNoiseTracker's record placed in the other unit: at a constant tokens per
            # example the same position, and its B_noise converted below (until 2026-12-07
            # refused as if it had no position, with the option given; a review). A summary
            # value is read in ``unit`` as given: one placed in the other unit is likelier in
            # it too, and stays refused.
            t = float(tokens_per_example)
            if not (math.isfinite(t) and t > 0):
                raise NoiseScaleInputError(
                    f"{name}: the tokens per example must be a positive number, got {t!r}"
                )
            at = float(rec[other]) * t if unit == "tokens" else float(rec[other]) / t
            if history is not None and pos is not None:
                # Beside a history, where it placed the same count: at a constant T a record by
                # `examples` stood elsewhere than the same weights' record by `step` where the
                # tokens per example vary (16, then 64: a window in tokens held 40 records, 15
                # from before it, and read B_noise 5581 for 6481; a hunt, 2026-12-07).
                at = _placed_by_history(history, other, pos, float(rec[other]), at)
        else:
            raise NoiseScaleInputError(
                f"{name}: needs '{unit}' (or 'step' and the run's history"
                + (
                    f", or for a BNoiseTracker's record '{other}' with the tokens per example, "
                    "--tokens-per-example)"
                    if parts
                    else f"; a summary b_noise is read in {unit}: give it and its position in "
                    f"{unit})"
                )
            )
        if parts:
            ghg, trace = float(rec["ghg"]), float(rec["trace_h_sigma"])
            if unit == "tokens":
                # Per example: B_noise in tokens is T times B_noise in examples (scaling
                # tr(HΣ) scales the ratio of means and its Fieller interval alike), T the
                # measured step's own
                if own is None and history is not None and tokens_per_example is None:
                    own = _own_tokens_per_example(history)
                trace *= _tokens_per_example(name, rec, history, index, tokens_per_example, own)
                converted.append((name, index))
            out.append(
                NoisePoint(at, trace / ghg if ghg > 0 else math.nan, ghg=ghg, trace_h_sigma=trace)
            )
            continue
        out.append(_summary_point(name, at, rec))
    if converted and tokens_per_example is not None and history is not None:
        _check_one_figure(converted, history, float(tokens_per_example))
    return out


def _check_one_figure(
    converted: Sequence[tuple[str, int | None]], history: History, tokens_per_example: float
) -> None:
    """Refuse one ``--tokens-per-example`` figure for ``BNoiseTracker`` records (``converted``:
    each one's name and its step's index in ``history``, ``None`` where it has none) whose steps
    the history counted at other tokens per example — a sequence-length curriculum: each
    record's B_noise in tokens is its own step's T times its B_noise per example, and one T
    for all (16, then 64 tokens, given 40) read the B_noise of steps 60–79 0.62× the truth
    (6192 for 9907) until 2026-12-08 (hunt/bnoise_tokens.py). A record without a step is
    refused where the history's counts vary at all (which of them is its own is not known)."""
    own = _own_tokens_per_example(history)
    # (whether the counts vary, from every record's: those counting several steps together
    # are nan in ``own`` where they vary)
    means = _interval_tokens_per_example(history)[0]
    known = means[np.isfinite(means)]
    if known.size < 2 or np.ptp(known) <= 1e-9 * float(np.max(known)):
        return
    steps = [(name, float(own[i])) for name, i in converted if i is not None]
    steps = [(name, t) for name, t in steps if math.isfinite(t)]
    counts = [t for _, t in steps]
    # (a record whose own step's count the history does not give — no step, or a record of
    # the history that counts several steps together — is converted by the one figure,
    # right or not: refused too)
    lost = [name for name, i in converted if i is None or not math.isfinite(own[i])]
    if counts and max(counts) - min(counts) > 1e-9 * max(counts):
        low, high = min(steps, key=lambda x: x[1]), max(steps, key=lambda x: x[1])
        cause = (
            f"the history counted {low[1]:g} tokens per example at {low[0]}'s step and "
            f"{high[1]:g} at {high[0]}'s (a sequence-length curriculum)"
        )
    elif counts and abs(counts[0] - tokens_per_example) > 1e-9 * counts[0] and not lost:
        cause = (
            f"the history counted {counts[0]:g} tokens per example at their steps, and other "
            "counts elsewhere (a sequence-length curriculum)"
        )
    elif lost:
        cause = (
            f"{lost[0]}'s own step's count is not in the history (no step, or the history's "
            f"record there counts several steps together), which counted from "
            f"{float(known.min()):g} to "
            f"{float(known.max()):g} tokens per example along the run (a sequence-length "
            "curriculum), so which is its own is not known"
        )
    else:
        return
    raise NoiseScaleInputError(
        f"the BNoiseTracker records are measured per example and converted to tokens each by "
        f"its own step's tokens per example, but {cause}: one --tokens-per-example "
        f"{tokens_per_example:g} would convert them all alike. Leave --tokens-per-example out "
        "and give each record its 'step' (each is converted by the history's count at its "
        "step, the main run measured every step there: measure_every=1), or give the branches "
        "in examples"
    )


def _own_tokens_per_example(history: History) -> np.ndarray:
    """Each record's own steps' tokens per example: the tokens counted since the record before
    over the examples whose tokens were counted since (from 0 where the history begins at step
    1), those examples being ``tokens_seen / tokens_per_example`` (the running mean's divisor);
    a record that counted none since carries the one before; ``nan`` before the first known.

    A record some steps after the one before (``measure_every``'s unmeasured steps folded into
    it, records missing from the history, a history resumed past step 1) holds the mean over
    those steps, its own step's count only where they all counted alike: where the history's
    counts vary (a sequence-length curriculum), such a record's own count is not known and is
    ``nan`` (:func:`_unknown_own_reason` says why) unless the records before and after it
    counted the same mean (:func:`_like_neighbours`). Until 2026-12-08 it was the mean, and under
    ``measure_every=10`` with 16 tokens to step 45 and 64 after, the record at step 51 —
    steps 42–51, its own 64 — was converted by 44.8 (B_noise 0.70× the truth, no word).

    Where a record holds its measured step's own tokens and the examples they are of
    (``tokens``, ``tokens_examples``: the tracker writes them since 2026-12-08), its own count
    is their ratio, exactly, spans or not: until then such a record under a curriculum was
    refused (measure_every=3, 16 tokens to step 5 and 64 after: the record at step 7, steps
    5–7, refused; its own 64 is in the record)."""
    out, spans = _interval_tokens_per_example(history)
    exact = _measured_tokens_per_example(history)
    known = out[np.isfinite(out)]
    if known.size and np.ptp(known) > 1e-9 * float(np.max(np.abs(known))):
        out = np.where((spans > 1) & ~_like_neighbours(out), math.nan, out)
    # (a history whose running mean never changed — no running count to difference, or one
    # beginning past step 1 — counted that mean at every step)
    carried = _carried_tokens_per_example(history)
    known = carried[np.isfinite(carried)]
    if known.size and np.ptp(known) <= 1e-12 * float(np.max(np.abs(known))):
        out = np.where(np.isfinite(out), out, carried)
    return np.where(np.isfinite(exact), exact, out)


def _measured_tokens_per_example(history: History) -> np.ndarray:
    """Each record's measured step's own tokens per example, ``tokens / tokens_examples``,
    where it records both and they counted some (``nan`` elsewhere: a step that counted no
    token carries the count before it, as the running mean does)."""
    tokens, examples = history.tokens, history.tokens_examples
    if tokens is None or examples is None:
        return np.full(history.step.size, math.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = tokens / examples
    return np.where(np.isfinite(t) & (t > 0) & (examples > 0), t, math.nan)


def _interval_tokens_per_example(history: History) -> tuple[np.ndarray, np.ndarray]:
    """Each record's tokens over the examples counted since the record before that counted
    any (:func:`_own_tokens_per_example`), and the steps that count spans (0 where unknown)."""
    tokens = history.tokens_seen
    with np.errstate(invalid="ignore", divide="ignore"):
        counted = tokens / history.tokens_per_example
    out = np.full(tokens.size, math.nan)
    spans = np.zeros(tokens.size)
    before: tuple[float, float, float] | None = (
        (0.0, 0.0, 0.0) if history.step.size and int(history.step[0]) == 1 else None
    )
    last, last_span = math.nan, 0.0
    for i in range(tokens.size):
        if not (math.isfinite(tokens[i]) and math.isfinite(counted[i])):
            out[i], spans[i] = last, last_span
            continue
        if before is not None and counted[i] - before[1] > 0:
            last = (tokens[i] - before[0]) / (counted[i] - before[1])
            last_span = float(history.step[i]) - before[2]
        out[i], spans[i] = last, last_span
        before = (float(tokens[i]), float(counted[i]), float(history.step[i]))
    return out, spans


def _like_neighbours(means: np.ndarray) -> np.ndarray:
    """Whether each record's mean equals the records' before and after it (those there are):
    steps counted alike through three records' steps, taken as its own step's count — as a
    history whose running mean never changed is (a change of length inside a record's steps
    moves its mean off one of its neighbours')."""
    n = means.size
    out = np.zeros(n, dtype=bool)
    for i in range(n):
        near = [means[j] for j in (i - 1, i + 1) if 0 <= j < n]
        m = means[i]
        out[i] = (
            bool(near)
            and math.isfinite(m)
            and all(math.isfinite(x) and abs(x - m) <= 1e-9 * abs(m) for x in near)
        )
    return out


def _unknown_own_reason(history: History, index: int) -> str:
    """Why the history does not give the tokens per example of record ``index``'s own step
    (``''`` where it does, or where it is unknown for want of any count)."""
    means, spans = _interval_tokens_per_example(history)
    if not (spans[index] > 1 and math.isfinite(means[index])) or _like_neighbours(means)[index]:
        return ""
    known = means[np.isfinite(means)]
    step = int(history.step[index])
    return (
        f"the history's record at step {step} counts the {spans[index]:g} steps since the "
        f"record before together ({means[index]:g} tokens per example on average; "
        "measure_every, or records missing), and its counts vary along the run (from "
        f"{float(known.min()):g} to {float(known.max()):g}: a sequence-length curriculum), so "
        f"step {step}'s own is not known"
    )


def _placed_by_history(
    history: History, other: str, pos: np.ndarray, count: float, fallback: float
) -> float:
    """Where ``history`` stands (``pos``, in the branches' unit) when it had counted ``count``
    in ``other``, interpolated between its records (from 0 at 0 where it begins at step 1);
    ``fallback`` outside its span or where it does not count ``other``."""
    try:
        there = history_positions(history, other)
    except NoiseScaleInputError:
        return fallback
    x, y = there, pos
    if history.step.size and int(history.step[0]) == 1:
        x, y = np.append(0.0, x), np.append(0.0, y)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2 or np.any(np.diff(x) < 0) or not x[0] <= count <= x[-1]:
        return fallback
    return float(np.interp(count, x, y))


def _summary_point(name: str, at: float, rec: dict[str, Any]) -> NoisePoint:
    """A summary point (``b_noise`` and optionally ``b_noise_low``/``b_noise_high``, ``null``
    for an end not known), refused where it cannot be a B_noise: tr(HΣ)/GᵀHG of a measured
    window is positive, and its interval holds it."""
    value = float(rec["b_noise"])
    if not value > 0:
        raise NoiseScaleInputError(
            f"{name}: b_noise {json.dumps(rec['b_noise'])} is not positive, and a B_noise, "
            "tr(HΣ)/GᵀHG, always is: give the measured value, or leave out a window whose "
            "B_noise was not available"
        )
    ends = []
    for key in ("b_noise_low", "b_noise_high"):
        end = rec.get(key)
        if end is not None and not (isinstance(end, int | float) and not isinstance(end, bool)):
            raise NoiseScaleInputError(
                f"{name}: {key} {json.dumps(end)} is not a number (give it, or null or leave it "
                "out where it is not known)"
            )
        ends.append(float(end) if end is not None and not math.isnan(end) else math.nan)
    low, high = ends
    if (not math.isnan(low) and not 0 <= low <= value) or value > high:
        raise NoiseScaleInputError(
            f"{name}: the interval [{json.dumps(rec.get('b_noise_low'))}, "
            f"{json.dumps(rec.get('b_noise_high'))}] does not hold b_noise "
            f"{json.dumps(rec['b_noise'])}: it must run from a lower end ≥ 0 up "
            "to an upper end, through b_noise (or give null for an end not known)"
        )
    return NoisePoint(at, value, low, high)


def _tokens_per_example(
    name: str,
    rec: dict[str, Any],
    history: History | None,
    index: int | None,
    tokens_per_example: float | None,
    own: np.ndarray | None = None,
) -> float:
    """Tokens per example to convert a ``BNoiseTracker``'s record ``name`` (per example) to
    tokens: ``tokens_per_example``, else the history's own count at the record's step
    (:func:`_own_tokens_per_example`, ``own`` where the caller computed it). Until 2026-12-08
    the run's running mean there: under a sequence-length curriculum (16, then 64 tokens from
    step 51) a record at step 75 was converted by 32 for its 64, and windows' B_noise read
    0.46–0.51× the truth without a word (hunt/bnoise_tokens.py)."""
    t = tokens_per_example
    if t is None and history is not None and index is not None:
        t = float((own if own is not None else _own_tokens_per_example(history))[index])
    if t is None or not (math.isfinite(t) and t > 0):
        why = (
            _unknown_own_reason(history, index)
            if tokens_per_example is None and history is not None and index is not None
            else ""
        )
        if why:
            raise NoiseScaleInputError(
                f"{name}: a BNoiseTracker measures B_noise per example, and the branches "
                f"count tokens; {why}. Measure the main run every step (measure_every=1) "
                "around the records, or give the branches in examples"
            )
        where = f"step {rec['step']}" if _number(rec.get("step")) else "its position"
        means = _interval_tokens_per_example(history)[0] if history is not None else None
        known = means[np.isfinite(means)] if means is not None else np.zeros(0)
        if index is None and known.size > 1 and np.ptp(known) > 1e-9 * float(np.max(known)):
            # (one --tokens-per-example, which the message below offers, is refused beside such
            # a history: until 2026-12-08 this said to give it, and the next try was refused)
            raise NoiseScaleInputError(
                f"{name}: a BNoiseTracker measures B_noise per example, and the branches count "
                f"tokens; the record has no 'step', and the history counted from "
                f"{float(known.min()):g} to {float(known.max()):g} tokens per example along the "
                "run (a sequence-length curriculum), so which is its own is not known: give the "
                "record its 'step' (converted by the history's count there), or the branches in "
                "examples"
            )
        raise NoiseScaleInputError(
            f"{name}: a BNoiseTracker measures B_noise per example, and the "
            f"branches count tokens; the tokens per example at {where} are unknown (the "
            "history does not record them there): give --tokens-per-example T "
            "(tokens_per_example=), or the branches in examples"
        )
    return float(t)


def _carried_tokens_per_example(history: History) -> np.ndarray:
    """Each record's tokens per example: its own (the run's running mean), else that of the
    last record before it that has one (a step that counted no tokens leaves the running mean
    as it was); ``nan`` before the first."""
    t = history.tokens_per_example
    last = np.maximum.accumulate(np.where(np.isfinite(t), np.arange(t.size), -1))
    return np.where(last >= 0, t[np.maximum(last, 0)], math.nan)


def _covered(span: tuple[float, float], start: float, end: float) -> float:
    """The fraction of [start, end] in ``span``, the examples the history's steps trained on
    (a review found the first version's count of records at the run's median spacing calling a
    window half-covered when the main run's batch had grown since: records 8× apart)."""
    lo, hi = span
    if not (math.isfinite(lo) and math.isfinite(hi)) or end <= start:
        return math.nan
    inside = min(end, hi) - max(start, lo)
    return max(0.0, inside) / (end - start)


def _window_steps(pos: np.ndarray, start: float, end: float) -> int:
    """Records the window spans at the median spacing of the history's records within one
    window of it (0 where there are none)."""
    near = pos[(pos >= start - (end - start)) & (pos <= end + (end - start))]
    gaps = np.diff(np.sort(near))
    gaps = gaps[gaps > 0]
    return round((end - start) / float(np.median(gaps))) if gaps.size else 0


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def _check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise NoiseScaleInputError(f"unit must be 'examples' or 'tokens', got {unit!r}")


def _integrate(history: History, batch: np.ndarray) -> np.ndarray:
    step = history.step.astype(float)
    b = np.where(np.isfinite(batch), batch, 0.0)
    return np.cumsum(np.diff(step, prepend=0.0) * b)


def _fill(history: History, pos: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """Running counts where recorded, else integrated batch sizes."""
    if np.all(np.isfinite(pos)):
        return pos
    return _integrate(history, batch)
