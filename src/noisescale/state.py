"""The tracker's state and its pure update, optax style: ``init`` and ``update`` over an explicit
state, no torch, no I/O.

A step arrives as :class:`StepStats`: the big batch (the step's accumulated gradient) and, per
small-batch source, sums over its small batches (:class:`SmallBatches`: how many, Σ 1/size and
Σ of their squared mean-gradient norms — all of which add up across processes). :func:`update`
turns each source into unbiased |G|² and tr Σ (:func:`~noisescale.estimators.g2_trace_from_sums`,
the paper's eq. A.2), combines the sources with minimum-variance weights learnt from earlier steps,
folds the result into the exponentially weighted averages, and returns the step's history record.
Steps whose norms are not finite, or that have no usable small batch, are skipped (counted).
Per-parameter-group estimates use the same source weights, so the groups add up to the total.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from noisescale import estimators as est

__all__ = ["SmallBatches", "StepStats", "TrackerState", "init", "update"]


class SmallBatches(NamedTuple):
    """One source's small batches in one step, as sums.

    Attributes:
        count: W, the number of small batches.
        inv_size_sum: Σ 1/b_r over their sizes b_r (examples).
        sqnorm_sum: Σ S_r, S_r the squared norm of small batch r's mean gradient.
        group_sqnorm_sum: Σ S_r split by parameter group, or ``None``.
        lacking: Processes that had no such small batch in the step (data parallelism).
    """

    count: float
    inv_size_sum: float
    sqnorm_sum: float
    group_sqnorm_sum: np.ndarray | None = None
    lacking: int = 0

    @property
    def size(self) -> float:
        """The harmonic mean size of the small batches."""
        return self.count / self.inv_size_sum if self.inv_size_sum > 0 else math.nan


#: why a step is left out whose loss over tokens counts none (a history record's ``left_out``)
NO_TOKEN = "no token counted: its loss over tokens is 0/0"

#: measure_every's carry when no step went unmeasured: (count, examples, tokens)
NOTHING_UNMEASURED: tuple[int, int, float | None] = (0, 0, 0.0)


class StepStats(NamedTuple):
    """One optimizer step's statistics, read from the device."""

    step: int
    b_big: float
    sqnorm_big: float
    sources: dict[str, SmallBatches]
    examples: int
    loss: float | None = None
    lr: float | None = None
    loss_scale: float = 1.0
    group_sqnorm_big: np.ndarray | None = None
    preconditioned: bool | None = None  # None: no preconditioner asked for
    extra: dict[str, Any] | None = None  # written into the record as is
    tokens: float | None = None  # tokens the step's loss counted, where known
    # "token": the loss weighs tokens; the norms are then those of each example's summed token
    # losses, and the record is given per token (noisescale.tokens)
    definition: str = "example"
    # measure_every: the unmeasured steps since the last measured one — their count, examples
    # and tokens (None where not counted) — seen before this step
    unmeasured: tuple[int, int, float | None] = NOTHING_UNMEASURED


class TrackerState(NamedTuple):
    """Everything the estimate depends on (checkpointed by the tracker)."""

    noise: est.NoiseScaleState
    combiner: dict[str, est.CombinerState]
    groups: dict[str, est.NoiseScaleState]
    steps: int
    skipped_steps: int
    examples: int
    preconditioned_from: int | None
    tokens: float = 0.0  # tokens counted so far
    counted_examples: int = 0  # examples of the steps whose tokens were counted

    @property
    def tokens_per_example(self) -> float:
        """The run's mean tokens per example where they were counted, else ``nan``."""
        return self.tokens / self.counted_examples if self.counted_examples else math.nan


def init(beta: float = 0.99, group_names: tuple[str, ...] = ()) -> TrackerState:
    """An empty state; ``beta`` is the EMA decay of |G|² and tr Σ (paper App. A.1)."""
    return TrackerState(
        est.init_state(beta), {}, {n: est.init_state(beta) for n in group_names}, 0, 0, 0, None
    )


def _per_source(stats: StepStats, dataset_size: int | None) -> dict[str, tuple[float, float]]:
    out = {}
    for name, sb in stats.sources.items():
        if sb.count <= 0 or not stats.b_big * sb.inv_size_sum > sb.count:
            continue  # no small batch smaller than the big one
        g2, tr = est.finite_population(
            *est.g2_trace_from_sums(
                stats.b_big, stats.sqnorm_big, sb.count, sb.inv_size_sum, sb.sqnorm_sum
            ),
            dataset_size,
        )
        out[name] = (float(g2), float(tr))
    return out


def _weights(
    state: TrackerState, names: list[str]
) -> tuple[np.ndarray, np.ndarray, est.CombinerState | None]:
    if len(names) == 1:
        return np.ones(1), np.ones(1), None
    key = ",".join(names)
    comb = state.combiner.get(key) or est.init_combiner(len(names), state.noise.beta)
    w_g2, w_tr = est.combiner_weights(comb)
    return w_g2, w_tr, comb


def update(
    state: TrackerState,
    stats: StepStats,
    confidence: float = 0.95,
    dataset_size: int | None = None,
) -> tuple[TrackerState, dict[str, Any]]:
    """Fold one step into the state; return the new state and the step's history record.

    ``dataset_size``: the batches are drawn without replacement from a data set of that many
    examples; each source's g2 and tr Σ are corrected for it before they are combined and
    averaged (:func:`~noisescale.estimators.finite_population`)."""
    beta = state.noise.beta
    preconditioned_from = state.preconditioned_from
    noise, combiner, groups = state.noise, dict(state.combiner), dict(state.groups)
    if stats.preconditioned and preconditioned_from is None:
        # plain and preconditioned norms measure different quantities: never average them
        preconditioned_from = stats.step
        noise, combiner = est.init_state(beta), {}
        groups = {n: est.init_state(beta) for n in groups}
    per_source = _per_source(stats, dataset_size)
    finite = math.isfinite(stats.sqnorm_big) and all(
        math.isfinite(g) and math.isfinite(t) for g, t in per_source.values()
    )
    # a plain step after the estimate became preconditioned (an optimizer without state: a
    # fresh one after a resume): the two quantities are never averaged together
    plain_after = stats.preconditioned is False and preconditioned_from is not None
    # a step whose loss over tokens counts none (every label ignored): 0/0 — left out, said:
    # its rows' x_i = 0 dropped, |G|² and tr Σ read 1/(1 − q) high, B_simple unbiased (until
    # 2026-12-07 recorded nan without a word, or a ZeroDivisionError with num_items_in_batch=0
    # given as a number; a fuzzer)
    no_token = stats.tokens == 0 and stats.definition in ("token", "labelled")
    skipped = not (finite and per_source) or plain_after or no_token
    g2 = tr = math.nan
    names = sorted(per_source)
    record_groups: dict[str, dict[str, Any]] | None = None
    if not skipped:
        pairs = np.array([per_source[n] for n in names])
        w_g2, w_tr, comb = _weights(state._replace(combiner=combiner), names)
        g2, tr = float(w_g2 @ pairs[:, 0]), float(w_tr @ pairs[:, 1])
        if comb is not None:
            # (S_B, the step's level: the statistics are of the sources' changes between steps
            # relative to the level, which drifts over a run; see update_combiner)
            combiner[",".join(names)] = est.update_combiner(
                comb, pairs[:, 0], pairs[:, 1], stats.sqnorm_big
            )
        noise = est.update_state(noise, g2, tr)
        record_groups = _update_groups(groups, stats, names, w_g2, w_tr, confidence, dataset_size)
    elif groups:
        record_groups = _update_groups(
            groups, stats, [], np.ones(0), np.ones(0), confidence, dataset_size
        )
    e = est.b_simple_interval(noise, confidence)
    examples = state.examples + stats.examples + stats.unmeasured[1]
    record: dict[str, Any] = {
        "step": stats.step,
        "skipped": skipped,
        "b_big": stats.b_big,
        "sqnorm_big": stats.sqnorm_big,
        "g2": g2,
        "trace_sigma": tr,
        "g2_ema": e.g2,
        "trace_sigma_ema": e.trace_sigma,
        "b_simple": e.b_simple,
        "b_simple_low": e.low,
        "b_simple_high": e.high,
        "loss": stats.loss,
        "lr": stats.lr,
        "temperature": stats.lr / stats.b_big if stats.lr is not None and stats.b_big else None,
        "examples": examples,  # seen so far
        "loss_scale": stats.loss_scale,
        "sources": {
            name: {
                "count": sb.count,
                "b_small": sb.size,
                "sqnorm_small": sb.sqnorm_sum / sb.count if sb.count else math.nan,
                **({"lacking": sb.lacking} if sb.lacking else {}),
            }
            for name, sb in stats.sources.items()
        },
    }
    tokens, counted = state.tokens, state.counted_examples
    if stats.tokens is not None:
        tokens, counted = tokens + stats.tokens, counted + stats.examples
        if stats.unmeasured[2] is not None:
            tokens, counted = tokens + stats.unmeasured[2], counted + stats.unmeasured[1]
    if stats.tokens is not None and stats.definition != "labelled":
        # (a classifier's labelled examples are counted as tokens, given in examples: no
        # tokens to record)
        record["tokens"] = stats.tokens
        # the measured step's own examples those tokens are of: its own tokens per example,
        # tokens / tokens_examples, which neither b_big (the effective size (Σc)²/Σc², not the
        # count where examples weigh unlike: 7.5 for micro-batches of 3 and 5 under their own
        # means) nor the running counts (with measure_every's unmeasured steps folded in) give
        record["tokens_examples"] = stats.examples
        record["tokens_seen"] = tokens
        record["tokens_per_example"] = tokens / counted if counted else math.nan
    if record_groups is not None:
        # (before the conversion to tokens, which converts the groups too: until 2026-12-05 they
        # were attached after it and stayed per example in a per-token history, a hunt found)
        record["groups"] = record_groups
    if stats.definition in ("token", "labelled"):
        # (no token counted yet — a first batch all −100, or of length-1 sequences —: per
        # token unknown, nan; a ZeroDivisionError at the first sync lost its window until
        # 2026-12-06, a hunt)
        _per_token(record, tokens / counted if counted and tokens > 0 else math.nan)
    if e.reason:
        record["unavailable"] = e.reason
    if plain_after:
        record["left_out"] = "not preconditioned, after the estimate became preconditioned"
    elif no_token:
        record["left_out"] = NO_TOKEN
    if stats.unmeasured[0]:
        # before this one: measure_every's, and steps left out (tracker._left_out)
        record["unmeasured_steps"] = stats.unmeasured[0]
    if stats.preconditioned is not None:
        record["preconditioned"] = stats.preconditioned
    if stats.extra:
        record.update(stats.extra)
    new = TrackerState(
        noise,
        combiner,
        groups,
        state.steps + 1,
        state.skipped_steps + int(skipped),
        examples,
        preconditioned_from,
        tokens,
        counted,
    )
    return new, record


def per_token(e: est.NoiseEstimate, tokens_per_example: float) -> est.NoiseEstimate:
    """An estimate measured on each example's *summed* token losses, given per token: |G|² of the
    token-mean gradient, tr Σ per token and B_simple in tokens (:mod:`noisescale.tokens`)."""
    from dataclasses import replace

    # (no token counted yet — every label so far −100 —: per token unknown, nan, as in a
    # history record; a ZeroDivisionError in estimate() ended a Trainer's run until 2026-12-07,
    # a hunt)
    t = tokens_per_example if tokens_per_example > 0 else math.nan
    g2, trace_sigma = e.g2 / t**2, e.trace_sigma / t
    # (the reason quotes the averages: in the unit given, as e.g2 and e.trace_sigma are)
    quoted = est.unavailable_reason(e.g2, e.trace_sigma)
    reason = est.unavailable_reason(g2, trace_sigma) if quoted and e.reason == quoted else e.reason
    if math.isnan(t) and (not e.reason or e.reason == quoted):
        reason = (
            "no label counted yet (every label so far is ignored, -100): the loss averages the "
            "counted labels, so the estimate waits for a step that counts some"
        )
    return replace(
        e,
        g2=g2,
        trace_sigma=trace_sigma,
        reason=reason,
        b_simple=e.b_simple * t,
        low=e.low * t,
        high=e.high * t,
        unit="tokens",
        tokens_per_example=t,
    )


def _per_token(record: dict[str, Any], t: float) -> None:
    """:func:`per_token` for a history record (its groups and sources too)."""
    for key in ("sqnorm_big", "g2", "g2_ema"):
        record[key] = record[key] / t**2
    for key in ("trace_sigma", "trace_sigma_ema"):
        record[key] = record[key] / t
    for key in ("b_big", "b_simple", "b_simple_low", "b_simple_high"):
        record[key] = record[key] * t
    for source in record["sources"].values():
        source["b_small"] *= t
        source["sqnorm_small"] /= t**2
    for group in record.get("groups", {}).values():
        for key in ("sqnorm_big", "g2", "g2_ema"):
            group[key] = group[key] / t**2
        for key in ("trace_sigma", "trace_sigma_ema"):
            group[key] = group[key] / t
        for key in ("b_simple", "b_simple_low", "b_simple_high"):
            group[key] = group[key] * t
    if record.get("temperature") is not None:
        record["temperature"] = record["temperature"] / t


def _update_groups(
    groups: dict[str, est.NoiseScaleState],
    stats: StepStats,
    names: list[str],
    w_g2: np.ndarray,
    w_tr: np.ndarray,
    confidence: float,
    dataset_size: int | None,
) -> dict[str, dict[str, Any]]:
    """Per parameter group: eq. A.2 on the group's norms with the total's source weights (read
    before the total updates them), so the groups' g2 and tr Σ add up to the total's."""
    order = list(groups)
    big = stats.group_sqnorm_big
    g2 = np.full(len(order), math.nan)
    tr = np.full(len(order), math.nan)
    usable = (
        big is not None
        and names
        and all(stats.sources[n].group_sqnorm_sum is not None for n in names)
    )
    if usable:
        g2, tr = np.zeros(len(order)), np.zeros(len(order))
        for wg, wt, name in zip(w_g2, w_tr, names, strict=True):
            sb = stats.sources[name]
            g, t = est.finite_population(
                *est.g2_trace_from_sums(
                    stats.b_big, big, sb.count, sb.inv_size_sum, sb.group_sqnorm_sum
                ),
                dataset_size,
            )
            g2 += wg * g
            tr += wt * t
    skipped = not usable or not np.all(np.isfinite(g2) & np.isfinite(tr))
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(order):
        if not skipped:
            groups[name] = est.update_state(groups[name], g2[i], tr[i])
        e = est.b_simple_interval(groups[name], confidence)
        out[name] = {
            "sqnorm_big": float(big[i]) if big is not None else math.nan,
            "g2": math.nan if skipped else float(g2[i]),
            "trace_sigma": math.nan if skipped else float(tr[i]),
            "g2_ema": e.g2,
            "trace_sigma_ema": e.trace_sigma,
            "b_simple": e.b_simple,
            "b_simple_low": e.low,
            "b_simple_high": e.high,
        }
    return out
