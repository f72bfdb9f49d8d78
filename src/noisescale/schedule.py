"""Adaptive batch size and learning-rate scaling, realised with gradient accumulation.

McCandlish et al. 2018, App. D: the noise scale grows during training, so a batch size that
follows it spends examples where they buy the most progress. With exchange rate r between
examples and steps, the optimal schedule is B = √(r·B_noise) (eq. D.3), measured in practice as
B = √(r·B_simple) (eq. D.6); the paper's theory expects a modest gain, γ of eq. D.5.

Two schedules share one machinery:

* :class:`AdaptiveBatchSize` follows the measured B_simple of a
  :class:`~noisescale.tracker.GradientNoiseTracker`: B = √(r·B_simple) or B = c·B_simple, within
  ``[min_batch_size, max_batch_size]``, a multiple of the micro-batch, changed only when the
  target differs from the current batch by more than a factor (hysteresis), at most every
  ``interval`` steps and only once the B_simple interval is narrow enough.
* :class:`BatchSizeRamp` is a fixed warm-up: linear or stepwise in examples or tokens processed
  (GPT-3, LLaMA 2 and OLMo ramp their batch sizes; see ``docs/adaptive.md``).

Both realise the batch with gradient accumulation: the micro-batch is fixed and
:attr:`~AdaptiveBatchSize.num_micro_batches` says how many the next optimizer step accumulates
(divide each micro-batch's mean loss by :attr:`~AdaptiveBatchSize.loss_divisor`); or a
:class:`ResizableBatchSampler` hands a ``DataLoader`` whole batches whose size changes between
iterations (one backward pass per step; ``loss_divisor`` is then 1). The learning rate
follows a rule (:data:`LR_RULES`) and is written into ``param_group["lr"]`` as a factor
relative to the rate tuned at ``base_batch_size``; the optimizer's state (momentum, Adam
moments) is left as it is.

Under data parallelism batch sizes count global examples, like B_simple and the tracker's
example count: ``micro_batch_size`` is the per-process micro-batch × the number of processes,
and each process accumulates :attr:`~AdaptiveBatchSize.num_micro_batches` of its own
micro-batches (the Lightning and Hugging Face callbacks check this convention).

Typical loop::

    tracker = GradientNoiseTracker(model)
    schedule = AdaptiveBatchSize(micro_batch_size=32, max_batch_size=1024, exchange_rate=2000.0,
                                 optimizer=opt, lr_rule="sqrt")
    micro = iter(loader)                       # yields micro-batches of 32
    for step in range(steps):
        k = schedule.num_micro_batches
        for _ in range(k):
            x, y = next(micro)
            (loss_fn(model(x), y) / schedule.loss_divisor).backward()
        tracker.step()
        opt.step(); opt.zero_grad()
        schedule.step(tracker)                 # may change k and the learning rate
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from torch.utils.data import Sampler

from noisescale import theory
from noisescale.errors import NoiseScaleInputError
from noisescale.estimators import NoiseEstimate

if TYPE_CHECKING:
    from noisescale.tracker import GradientNoiseTracker

__all__ = [
    "LR_RULES",
    "SUPPORTED_LR_SCHEDULERS",
    "AdaptiveBatchSize",
    "AdaptiveBatchSizeState",
    "BatchSizeRamp",
    "BatchSizeRampState",
    "ResizableBatchSampler",
    "carry_lr_factor",
    "check_lr_schedulers",
    "lr_factor",
    "quantized_batch_size",
    "ramp_batch_size",
    "scale_lr",
    "target_batch_size",
]

#: Learning-rate rules: ``"none"``, ``"linear"`` (Goyal et al. 2017), ``"sqrt"``, ``"paper"``
#: (ε(B) = ε*/(1 + B*/B)^α, paper eq. A.3) and ``"adascale"`` (the AdaScale gain, Johnson et al.
#: 2020). See :func:`lr_factor`.
LR_RULES = ("none", "linear", "sqrt", "paper", "adascale")

LrRule = Literal["none", "linear", "sqrt", "paper", "adascale"]

# The decision log travels in every checkpoint; keep only the latest entries so it stays small.
_MAX_HISTORY = 10_000


# -- pure rules --------------------------------------------------------------------------------


def target_batch_size(
    b_simple: float, *, exchange_rate: float | None = None, factor: float | None = None
) -> float:
    """The batch size an adaptive schedule aims for, before bounds and quantisation.

    Either B = √(r·B_simple) for exchange rate r between examples and steps (paper eq. D.3,
    D.6), or B = c·B_simple, a fixed multiple of the critical-batch estimate (B_crit ≈ B_noise,
    eq. 2.12; c = 1 is the knee of the Pareto front).

    Args:
        b_simple: The measured simple noise scale (examples), positive.
        exchange_rate: r, in examples per step, positive and finite; give this or ``factor``.
        factor: c, positive and finite; give this or ``exchange_rate``.

    Example:
        >>> target_batch_size(400.0, exchange_rate=100.0)
        200.0
    """
    if (exchange_rate is None) == (factor is None):
        raise NoiseScaleInputError(
            "give exactly one of exchange_rate (B = √(r·B_simple)) or factor"
        )
    if not (math.isfinite(b_simple) and b_simple > 0):
        raise NoiseScaleInputError(f"B_simple must be positive and finite, got {b_simple!r}")
    if exchange_rate is not None:
        # finite too: an infinite rate gives an infinite target, which no batch realises
        if not (math.isfinite(exchange_rate) and exchange_rate > 0):
            raise NoiseScaleInputError(
                f"exchange_rate must be positive and finite, got {exchange_rate!r}"
            )
        return float(theory.adaptive_batch_size(b_simple, exchange_rate))
    assert factor is not None
    if not (math.isfinite(factor) and factor > 0):
        raise NoiseScaleInputError(f"factor must be positive and finite, got {factor!r}")
    return factor * b_simple


def quantized_batch_size(
    batch_size: float, micro_batch_size: int, min_batch_size: int, max_batch_size: int
) -> int:
    """The nearest multiple of the micro-batch to ``batch_size``, within the bounds.

    The bounds must themselves be multiples of ``micro_batch_size`` (the schedules check this).
    Rounding is to the nearest multiple in linear scale: with micro-batches much smaller than
    the batch the relative error is at most m/(2B).
    """
    if batch_size >= max_batch_size:  # (an infinite target overflowed math.floor, a hunt)
        return int(max_batch_size)
    k = max(1, math.floor(batch_size / micro_batch_size + 0.5))  # halves round up, not to even
    return int(min(max(k * micro_batch_size, min_batch_size), max_batch_size))


def lr_factor(
    batch_size: float,
    base_batch_size: float,
    rule: LrRule = "none",
    *,
    alpha: float = 1.0,
    b_star: float | None = None,
    g2: float | None = None,
    trace_sigma: float | None = None,
) -> float:
    """ε(B)/ε(B₀): the learning rate at batch B relative to the one tuned at B₀.

    Rules, with k = B/B₀:

    - ``"none"``: 1 (some Adam/AdamW setups).
    - ``"linear"``: k (Goyal et al. 2017; SGD well below B_noise).
    - ``"sqrt"``: √k (constant gradient-noise level; often used with Adam, paper App. E.2).
    - ``"paper"``: [(1 + B*/B₀)/(1 + B*/B)]^α, the ratio of ε(B) = ε*/(1 + B*/B)^α (paper eq.
      A.3) at the two batch sizes; α = 1 for SGD, 0.5 < α < 1 for Adam. Linear far below B*,
      flat far above it. Needs ``b_star``.
    - ``"adascale"``: the AdaScale gain (Johnson et al. 2020) from the measured |G|² and tr Σ:
      with σ² = tr Σ/B₀ (the gradient variance at B₀), μ² = |G|² and r = B/B₀,
      gain = (σ² + μ²)/(σ²/r + μ²). It is the ``"paper"`` rule with α = 1 and B* = B_simple
      (eq. 2.6), and AdaScale's learning-rate part only: AdaScale also stretches the schedule's
      clock by the gain, which this factor does not do. Needs ``g2`` and ``trace_sigma``.

    Args:
        batch_size: B, the batch size to run at.
        base_batch_size: B₀, where the optimizer's learning rate was tuned.
        rule: One of :data:`LR_RULES`.
        alpha: α of eq. A.3, for ``"paper"``.
        b_star: B* of eq. A.3 (examples), for ``"paper"``.
        g2: |G|², for ``"adascale"`` (negative averages are treated as 0).
        trace_sigma: tr Σ, for ``"adascale"`` (negative averages are treated as 0).

    Example:
        >>> lr_factor(400, 100, "sqrt"), lr_factor(200, 100, "paper", b_star=100.0)
        (2.0, 1.3333333333333333)
    """
    if not (batch_size > 0 and base_batch_size > 0):
        raise NoiseScaleInputError(
            f"batch sizes must be positive, got {batch_size!r} and {base_batch_size!r}"
        )
    if rule in ("none", "linear", "sqrt"):
        return float(theory.scaled_lr(base_batch_size, batch_size, 1.0, rule))
    if rule == "paper":
        if b_star is None or not (math.isfinite(b_star) and b_star > 0):
            raise NoiseScaleInputError(
                f"the 'paper' learning-rate rule needs a positive B* (b_star), got {b_star!r}"
            )
        if not 0.0 < alpha <= 1.0:
            raise NoiseScaleInputError(f"alpha must be in (0, 1], got {alpha!r}")
        return float(
            theory.scaled_lr(base_batch_size, batch_size, 1.0, "noise", b_noise=b_star, alpha=alpha)
        )
    if rule == "adascale":
        if (
            g2 is None
            or trace_sigma is None
            or not (math.isfinite(g2) and math.isfinite(trace_sigma))
        ):
            raise NoiseScaleInputError(
                "the 'adascale' learning-rate rule needs finite |G|² and tr Σ (g2, trace_sigma)"
            )
        # Average first, then clamp (as for B_simple): negative averages mean "not measurable".
        mu2, sigma2 = max(g2, 0.0), max(trace_sigma, 0.0) / base_batch_size
        if mu2 == 0.0 and sigma2 == 0.0:
            return 1.0
        r = batch_size / base_batch_size
        return (sigma2 + mu2) / (sigma2 / r + mu2)
    raise NoiseScaleInputError(f"unknown learning-rate rule {rule!r}; choose one of {LR_RULES}")


def ramp_batch_size(
    consumed: float,
    points: Sequence[tuple[float, float]],
    micro_batch_size: int,
    *,
    interpolate: bool,
) -> int:
    """The batch size of a warm-up ramp after ``consumed`` examples (or tokens).

    Args:
        consumed: Examples (or tokens) processed so far.
        points: ``(consumed, batch_size)`` knots, consumed strictly increasing from 0.
        micro_batch_size: The result is a multiple of it (rounded to the nearest, at least one).
        interpolate: ``True``: piecewise linear between the knots (GPT-3's linear ramp);
            ``False``: hold each knot's batch size until the next knot (a stepwise ramp).

    Returns:
        The batch size; beyond the last knot, the last knot's batch size.
    """
    xs = [float(x) for x, _ in points]
    bs = [float(b) for _, b in points]
    i = 0
    while i + 1 < len(xs) and consumed >= xs[i + 1]:
        i += 1
    b = bs[i]
    if interpolate and i + 1 < len(xs):
        b += (bs[i + 1] - b) * (consumed - xs[i]) / (xs[i + 1] - xs[i])
    return max(1, math.floor(b / micro_batch_size + 0.5)) * micro_batch_size


_sched = torch.optim.lr_scheduler

#: Schedulers that keep a factor once their ``base_lrs`` are scaled: they either multiply the
#: current ``param_group["lr"]`` (chainable) or recompute the rate from ``base_lrs``.
_BASE_LRS_SCHEDULERS: tuple[type, ...] = (
    _sched.LambdaLR,
    _sched.MultiplicativeLR,
    _sched.StepLR,
    _sched.MultiStepLR,
    _sched.ConstantLR,
    _sched.LinearLR,
    _sched.ExponentialLR,
    _sched.PolynomialLR,
    _sched.CosineAnnealingLR,
    _sched.CosineAnnealingWarmRestarts,
)
#: Schedulers that keep rates of their own besides ``base_lrs``, scaled along by :func:`scale_lr`.
_OWN_RATES_SCHEDULERS: tuple[type, ...] = (
    _sched.OneCycleLR,  # per group: "initial_lr", "max_lr", "min_lr"
    _sched.CyclicLR,  # max_lrs
    _sched.ReduceLROnPlateau,  # min_lrs (the floor would otherwise cap a scaled rate)
)
#: Containers: each child scheduler is scaled (a child keeps its own ``base_lrs``).
_CONTAINER_SCHEDULERS: tuple[type, ...] = (_sched.SequentialLR, _sched.ChainedScheduler)

SUPPORTED_LR_SCHEDULERS = tuple(
    t.__name__ for t in _BASE_LRS_SCHEDULERS + _OWN_RATES_SCHEDULERS + _CONTAINER_SCHEDULERS
)


#: Schedulers of the user's own that :func:`_computes_from_base_lrs` accepted: probed once per
#: scheduler object, wherever it is met again (a callback's change of the factor, a schedule's
#: ``state_dict``). Until 2026-12-07 the probe looked 1,000 epochs ahead of where it was asked:
#: asked again at step 999 it refused a warm-up + cosine to a floor it had accepted at step 0 —
#: a crash mid-run (a review). Keyed by ``id()``, the scheduler itself the value (an id is not
#: reused while its object lives, and an entry goes with it): a ``WeakSet`` hashed it, and a
#: scheduler class defining ``__eq__`` without ``__hash__`` crashed with ``TypeError:
#: unhashable type`` (a review).
_FOLLOWS_BASE_LRS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
#: Schedulers of the user's own already warned of a rate of their own (a floor) now.
_WARNED_OWN_RATE: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


class _Flat(list):
    """What :func:`_flat_schedulers` returned: given to it again, taken as it is (not probed
    again; a schedule keeps its own from construction)."""


def _flat_schedulers(lr_schedulers: Iterable[Any]) -> list[Any]:
    """Every scheduler to scale, children of containers included, each once; unknown ones
    are refused (before anything is written). A scheduler of the user's own is probed
    (:func:`_computes_from_base_lrs`) once (:data:`_FOLLOWS_BASE_LRS`); a schedule flattens
    its schedulers once, at construction, and hands that list on (until 2026-12-07 it probed
    them again at each ``state_dict()``, and a warm-up + cosine to a floor the constructor
    accepted was refused at step 999, a review)."""
    if isinstance(lr_schedulers, _Flat):
        # (a schedule's own list, flattened at construction: a scheduler of the user's own in it
        # is still asked for its rate now at each change — on a floor of its own the factor
        # was lost without a word, a review)
        for s in lr_schedulers:
            if not isinstance(s, _BASE_LRS_SCHEDULERS + _OWN_RATES_SCHEDULERS):
                _computes_from_base_lrs(s, known=True)
        return lr_schedulers
    out = _Flat()
    seen: set[int] = set()

    def visit(s: Any) -> None:
        if id(s) in seen:
            return
        seen.add(id(s))
        if isinstance(s, _CONTAINER_SCHEDULERS):
            for child in s._schedulers:
                visit(child)
            return
        if isinstance(s, _BASE_LRS_SCHEDULERS + _OWN_RATES_SCHEDULERS):
            out.append(s)
            return
        inner = getattr(s, "scheduler", None)  # accelerate's AcceleratedScheduler wraps one
        if inner is not None and inner is not s:
            visit(inner)
            return
        if _computes_from_base_lrs(s, known=_FOLLOWS_BASE_LRS.get(id(s)) is s):
            _FOLLOWS_BASE_LRS[id(s)] = s
            # a scheduler of the user's own that computes its rate from base_lrs or from
            # param_group["lr"] (a warm-up + cosine written as a subclass): scaled like torch's
            # own (a review found such a subclass refused where it had kept the factor exactly)
            out.append(s)
            return
        raise NoiseScaleInputError(
            f"cannot scale the learning rate of a {type(s).__name__} scheduler: a learning-rate "
            "factor (lr_rule other than 'none') is kept only by the schedulers "
            f"{', '.join(SUPPORTED_LR_SCHEDULERS)} (torch.optim.lr_scheduler), whose rates "
            "noisescale knows how to scale, and schedulers of your own whose rate follows their "
            "base_lrs (this one's did not double with them). Write the schedule as a LambdaLR "
            "(any shape: "
            "LambdaLR(optimizer, lambda step: f(step))), or use lr_rule='none'"
        )

    for scheduler in lr_schedulers:
        visit(scheduler)
    return out


def _plain(x: Any) -> Any:
    """A number as a Python int or float (a NumPy or 0-d tensor scalar is not JSON)."""
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return x.item() if hasattr(x, "item") else x


def _computes_from_base_lrs(s: Any, known: bool = False) -> bool:
    """Whether an ``LRScheduler`` noisescale does not know computes its rates in proportion to
    its ``base_lrs`` and the groups' rates: on a copy of it (the optimizer shared, its rates put
    back), ``get_lr()`` asked with both doubled must double at the run's epochs 0, 1, 10, 100
    and 1,000 (a floor or a peak early in the run shows there: a review found a warm-up +
    cosine to its own minimum accepted by a probe of the next rate alone). Decided on those
    epochs alone, the same in every process: until 2026-12-07 its epoch now and the next
    decided too, and a new process resuming at step 1,999 refused a warm-up + cosine to a floor
    (at step 2,000) that the run had accepted at step 0 (the cache of probed schedulers does
    not outlive a process; a review). Where its rate now or next does not follow (a floor or a
    cap reached later, its own rate there, not scaled) it is accepted with a warning that the
    factor is not kept while its rate is its own. An epoch at which its ``get_lr`` cannot be
    asked is skipped; one that cannot be asked now refuses it, as does no epoch answered.
    ``known``: already accepted in this process (:data:`_FOLLOWS_BASE_LRS`): only its rate now
    and next are asked, each time it is met — a floor reached later than epoch 1,000 was
    accepted without a word, and a cached scheduler skipped the warning (a review); warned
    once per scheduler (:data:`_WARNED_OWN_RATE`)."""
    if not isinstance(s, _sched.LRScheduler) or getattr(s, "base_lrs", None) is None:
        return False
    groups = s.optimizer.param_groups
    lrs, base = [g["lr"] for g in groups], list(s.base_lrs)
    try:
        probe = copy.deepcopy(s, {id(s.optimizer): s.optimizer})
    except Exception:  # a scheduler that cannot be copied: not probed, not known to follow
        return False
    enable = getattr(_sched, "_enable_get_lr_call", None)

    def rates(epoch: int, doubled: bool) -> list[float]:
        for g, lr in zip(groups, lrs, strict=True):
            g["lr"] = lr * 2.0 if doubled else lr
        probe.base_lrs = [b * 2.0 for b in base] if doubled else list(base)
        probe.last_epoch = epoch
        inside = enable(probe) if enable is not None else contextlib.nullcontext()
        with warnings.catch_warnings(), inside:
            warnings.simplefilter("ignore")  # (get_lr outside step() warns)
            return [float(x) for x in probe.get_lr()]

    def follows(epoch: int) -> bool:
        before, after = rates(epoch, False), rates(epoch, True)
        return len(after) == len(before) and all(
            math.isclose(a, 2.0 * b, rel_tol=1e-9, abs_tol=1e-300)
            for a, b in zip(after, before, strict=True)
        )

    try:
        answered = 1 if known else 0
        for epoch in () if known else (0, 1, 10, 100, 1000):
            try:
                if not follows(epoch):
                    return False
                answered += 1
            except Exception:
                continue
        if answered:
            own_now = []
            for epoch in (s.last_epoch, s.last_epoch + 1):
                try:
                    if not follows(epoch):
                        own_now.append(epoch)
                except Exception:
                    if epoch == s.last_epoch:
                        return False  # (its rate now cannot be asked)
            if own_now and _WARNED_OWN_RATE.get(id(s)) is not s:
                _WARNED_OWN_RATE[id(s)] = s
                warnings.warn(
                    f"noisescale: the {type(s).__name__} scheduler's rate at its epoch "
                    f"{own_now[0]} does not follow its base_lrs (a floor or a cap of its own): "
                    "its base_lrs are scaled, but the learning-rate factor is not "
                    "kept while its rate is its own. To keep the factor there, write the floor "
                    "relative to base_lrs (max(b * f, b * floor_ratio)) or the schedule as a "
                    "LambdaLR",
                    RuntimeWarning,
                    stacklevel=5,
                )
        return answered > 0
    finally:
        for g, lr in zip(groups, lrs, strict=True):
            g["lr"] = lr


def check_lr_schedulers(lr_schedulers: Iterable[Any]) -> None:
    """Refuse a scheduler :func:`scale_lr` cannot scale (see :data:`SUPPORTED_LR_SCHEDULERS`).

    Raises:
        NoiseScaleInputError: a scheduler (or a container's child) is not a supported kind.
    """
    _flat_schedulers(lr_schedulers)


def scale_lr(
    optimizer: torch.optim.Optimizer, factor: float, lr_schedulers: Iterable[Any] = ()
) -> None:
    """Multiply every parameter group's learning rate by ``factor``, in place, for good.

    The optimizer's state (momentum buffers, Adam moments, step counts) is left as it is. The
    schedulers in ``lr_schedulers`` keep the factor through their later steps (tested past their
    milestones): those that multiply ``param_group["lr"]`` or recompute it from ``base_lrs``
    (``LambdaLR``, ``MultiplicativeLR``, ``StepLR``, ``MultiStepLR``, ``ConstantLR``,
    ``LinearLR``, ``ExponentialLR``, ``PolynomialLR``, ``CosineAnnealingLR``,
    ``CosineAnnealingWarmRestarts``) have ``base_lrs`` scaled; ``OneCycleLR`` its groups'
    ``initial_lr``, ``max_lr`` and ``min_lr``; ``CyclicLR`` its ``base_lrs`` and ``max_lrs``;
    ``ReduceLROnPlateau`` its ``min_lrs``; ``SequentialLR`` and ``ChainedScheduler`` each child;
    the cosines' ``eta_min`` too. An ``LRScheduler`` of the user's own has its ``base_lrs`` scaled
    when its rates follow them (asked on a copy with them doubled, at the run's epochs 0, 1, 10,
    100 and 1,000, they double; a rate of its own now or next, a floor reached, is warned
    about); any other scheduler is
    refused (:data:`SUPPORTED_LR_SCHEDULERS`), before anything is written.

    Raises:
        NoiseScaleInputError: ``factor`` is not positive and finite, or a scheduler is not a
            supported kind.
    """
    if not (math.isfinite(factor) and factor > 0):
        raise NoiseScaleInputError(f"a learning-rate factor must be positive, got {factor!r}")
    schedulers = _flat_schedulers(lr_schedulers)
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
    scaled_groups: set[int] = set()
    for scheduler in schedulers:
        base = getattr(scheduler, "base_lrs", None)
        if base is not None:
            scheduler.base_lrs = [b * factor for b in base]
        if isinstance(scheduler, _sched.OneCycleLR):
            for group in scheduler.optimizer.param_groups:
                if id(group) not in scaled_groups:  # two OneCycleLRs on one optimizer
                    scaled_groups.add(id(group))
                    for key in ("initial_lr", "max_lr", "min_lr"):
                        group[key] = group[key] * factor
        elif isinstance(scheduler, _sched.CyclicLR):
            scheduler.max_lrs = [m * factor for m in scheduler.max_lrs]
        elif isinstance(scheduler, _sched.CosineAnnealingLR | _sched.CosineAnnealingWarmRestarts):
            # the floor the cosine decays to (a review found the factor lost with eta_min > 0:
            # the ratio to the unscaled schedule fell from 3 to 1.00 by the end of the cycle)
            scheduler.eta_min = scheduler.eta_min * factor
        elif isinstance(scheduler, _sched.ReduceLROnPlateau):
            scheduler.min_lrs = [m * factor for m in scheduler.min_lrs]
            if getattr(scheduler, "default_min_lr", None) is not None:
                scheduler.default_min_lr = scheduler.default_min_lr * factor


def _scaled_rates(lr_schedulers: Iterable[Any]) -> list[dict[str, Any]]:
    """What :func:`scale_lr` scales in each scheduler, as plain data (for a checkpoint), with
    the scheduler's type name."""
    out = []
    for s in _flat_schedulers(lr_schedulers):
        rates = {k: _plain_rates(getattr(s, k)) for k in _RATE_ATTRIBUTES if hasattr(s, k)}
        rates["type"] = type(s).__name__
        if isinstance(s, _sched.OneCycleLR):
            rates["groups"] = [
                {k: _plain(g[k]) for k in ("initial_lr", "max_lr", "min_lr") if k in g}
                for g in s.optimizer.param_groups
            ]
        out.append(rates)
    return out


def _set_scaled_rates(lr_schedulers: Iterable[Any], saved: list[dict[str, Any]]) -> None:
    """Write back what :func:`_scaled_rates` saved, where the schedulers are those saved (as
    many, of the same type at each position); where they differ (a finished warm-up dropped, a
    decay added for a new phase), nothing is written back, with a warning: the saved rates
    matter only to schedulers whose states were loaded before the schedule was built. Until
    2026-12-07 such a resume was refused, and the types were not compared (two cosines given
    in swapped order took each other's floors, a review)."""
    schedulers = _flat_schedulers(lr_schedulers)
    fits = len(saved) == len(schedulers) and all(
        rates.get("type", type(s).__name__) == type(s).__name__
        and set(rates) - {"groups", "type"} == {k for k in _RATE_ATTRIBUTES if hasattr(s, k)}
        and len(rates.get("groups", ())) in (0, len(s.optimizer.param_groups))
        for s, rates in zip(schedulers, saved, strict=False)
    )
    if not fits:
        names = [r.get("type", "?") for r in saved]
        warnings.warn(
            f"noisescale: the checkpoint's learning-rate schedulers ({', '.join(names) or 'none'})"
            " are not those given as lr_schedulers= "
            f"({', '.join(type(s).__name__ for s in schedulers) or 'none'}), as many and of the "
            "same type in the same order: the rates the schedule scaled in them are not written "
            "back. Load the schedulers' states after building the schedule (a scheduler whose "
            "state was loaded before has its rates scaled twice: by the checkpoint's factor and "
            "the constructor's). A scheduler new to this run, with no state to load, keeps its "
            "rates scaled by the constructor's starting factor, not the checkpoint's lr_factor",
            RuntimeWarning,
            stacklevel=4,
        )
        return
    for s, rates in zip(schedulers, saved, strict=True):
        for k, v in rates.items():
            if k == "type":
                continue
            if k == "groups":
                for g, keys in zip(s.optimizer.param_groups, v, strict=True):
                    g.update(keys)
            else:
                setattr(s, k, v)


def _plain_rates(x: Any) -> Any:
    return [_plain(v) for v in x] if isinstance(x, list | tuple) else _plain(x)


#: Scheduler attributes :func:`scale_lr` scales (OneCycleLR's rates live in the groups).
_RATE_ATTRIBUTES = ("base_lrs", "max_lrs", "eta_min", "min_lrs", "default_min_lr")


def carry_lr_factor(
    optimizer: torch.optim.Optimizer,
    old_factor: float,
    new_factor: float,
    lr_schedulers: Iterable[Any] = (),
    *,
    scaled_groups: int | None = None,
) -> int:
    """Move ``optimizer`` from the learning-rate factor ``old_factor`` to ``new_factor``.

    Its first ``scaled_groups`` parameter groups (``None``: all) carry ``old_factor``; a group
    after them was added since (``add_param_group``, progressive unfreezing) at its rate tuned at
    the base batch, and takes ``old_factor`` first. Then every group and scheduler is scaled by
    ``new_factor / old_factor`` (:func:`scale_lr`; not called where they are equal). Scaling
    every group by the ratio alone left a group added at factor 4 at 0.4 where the rule put 1.6
    (a hunt found).

    Returns:
        The number of groups now carrying ``new_factor``: pass it back as ``scaled_groups``.
    """
    groups = optimizer.param_groups
    for group in groups[len(groups) if scaled_groups is None else scaled_groups :]:
        group["lr"] = group["lr"] * old_factor
    if new_factor != old_factor:
        scale_lr(optimizer, new_factor / old_factor, lr_schedulers)
    return len(groups)


def _in_examples(estimate: NoiseEstimate) -> NoiseEstimate:
    """``estimate`` in examples, the unit of the schedules' batch sizes (refused if unknown)."""
    if estimate.unit == "examples":
        return estimate
    try:
        return estimate.to("examples")
    except ValueError as exc:
        # acting on it would aim the batch (in examples) at B_simple in tokens: T× too large
        raise NoiseScaleInputError(
            f"the noise-scale estimate is in {estimate.unit} (the loss averages tokens) but the "
            "schedule's batch sizes count examples, and the tokens per example are unknown, so "
            "B_simple cannot be converted: give GradientNoiseTracker tokens_per_example= "
            "(fixed-length sequences), or call tracker.count_tokens(labels) after each forward "
            "(Hugging Face models called with labels= are counted for you)"
        ) from exc


# -- the resizable batch sampler -----------------------------------------------------------------


class ResizableBatchSampler(Sampler[list[int]]):
    """A batch sampler for ``torch.utils.data.DataLoader`` whose batch size can change mid-epoch.

    Each epoch draws every index of the underlying sampler exactly once; batches are cut from
    that stream at whatever :attr:`batch_size` is when the batch is formed. With
    ``num_workers=0`` a change applies to the next batch; with worker processes the
    ``DataLoader`` has already formed up to ``num_workers × prefetch_factor`` batches, which keep
    their size.

    Args:
        sampler: The index order (e.g. ``RandomSampler(dataset)``), or a dataset length for
            sequential order.
        batch_size: Examples per batch, at least 1.
        drop_last: Drop the last batch of an epoch when it is short.
    """

    def __init__(
        self, sampler: Sampler[int] | Iterable[int] | int, batch_size: int, drop_last: bool = False
    ) -> None:
        super().__init__()
        self.sampler: Iterable[int] = range(sampler) if isinstance(sampler, int) else sampler
        self.batch_size = batch_size
        self.drop_last = drop_last

    @property
    def batch_size(self) -> int:
        """Examples in the next batch."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise NoiseScaleInputError(f"batch_size must be a positive integer, got {value!r}")
        self._batch_size = value

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for index in self.sampler:
            batch.append(int(index))
            if len(batch) >= self._batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __len__(self) -> int:
        """Batches per epoch at the current batch size (exact only if it does not change)."""
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self._batch_size if self.drop_last else -(-n // self._batch_size)


# -- the schedules -------------------------------------------------------------------------------


class AdaptiveBatchSizeState(NamedTuple):
    """What an :class:`AdaptiveBatchSize` has decided so far.

    Attributes:
        step: Optimizer steps seen.
        examples: Examples (in the batch-size unit) processed in those steps.
        batch_size: The batch size of the next step.
        lr_factor: ε/ε(base_batch_size) now in effect.
        last_decision: Step of the last decision (0 before the first).
        last_change: Step of the last batch-size change (0 before the first).
        changes: Batch-size changes made.
    """

    step: int
    examples: int
    batch_size: int
    lr_factor: float
    last_decision: int
    last_change: int
    changes: int


class BatchSizeRampState(NamedTuple):
    """Where a :class:`BatchSizeRamp` is.

    Attributes:
        step: Optimizer steps seen.
        examples: Examples (or tokens) processed in those steps.
        batch_size: The batch size of the next step.
        lr_factor: ε/ε(base_batch_size) now in effect.
    """

    step: int
    examples: int
    batch_size: int
    lr_factor: float


class _Realisation:
    """Shared by both schedules: accumulation arithmetic, learning-rate writes, checkpoints."""

    micro_batch_size: int
    base_batch_size: int
    lr_rule: LrRule
    alpha: float
    b_star: float | None
    optimizer: torch.optim.Optimizer | None
    lr_schedulers: list[Any]
    batch_sampler: ResizableBatchSampler | None
    tokens_per_example: int | None = None  # a ramp in tokens: the sampler counts sequences
    history: list[dict[str, Any]]
    _state: AdaptiveBatchSizeState | BatchSizeRampState

    def _init_realisation(
        self,
        micro_batch_size: int,
        optimizer: torch.optim.Optimizer | None,
        lr_schedulers: Iterable[Any],
        batch_sampler: ResizableBatchSampler | None,
        lr_rule: str,
        alpha: float,
        b_star: float | None,
    ) -> None:
        if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int):
            raise NoiseScaleInputError(
                f"micro_batch_size must be an integer, got {micro_batch_size!r}"
            )
        if micro_batch_size < 1:
            raise NoiseScaleInputError(
                f"micro_batch_size must be at least 1, got {micro_batch_size}"
            )
        if lr_rule not in LR_RULES:
            raise NoiseScaleInputError(
                f"unknown learning-rate rule {lr_rule!r}; choose one of {LR_RULES}"
            )
        if lr_rule == "paper" and b_star is not None and not b_star > 0:
            raise NoiseScaleInputError(f"b_star must be positive, got {b_star!r}")
        if not 0.0 < alpha <= 1.0:
            raise NoiseScaleInputError(f"alpha must be in (0, 1], got {alpha!r}")
        self.micro_batch_size = micro_batch_size
        self.lr_rule = lr_rule  # type: ignore[assignment]
        self.alpha = alpha
        self.b_star = b_star
        self.optimizer = optimizer
        self.lr_schedulers = list(lr_schedulers)
        # refused now rather than at the first change, mid-run; flattened (and a scheduler of
        # the user's own probed) once: the list is handed on at each change, save and load
        self._flat_lr_schedulers = (
            _flat_schedulers(self.lr_schedulers) if lr_rule != "none" else self.lr_schedulers
        )
        self.batch_sampler = batch_sampler
        self.history = []
        # the optimizer's first groups that carry lr_factor; a group added later (progressive
        # unfreezing) comes at its own tuned rate and takes the factor at the next _apply
        self._scaled_groups = 0
        self._warned_scheduler = False

    def _check_multiple(self, name: str, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise NoiseScaleInputError(f"{name} must be a positive integer, got {value!r}")
        if value % self.micro_batch_size:
            raise NoiseScaleInputError(
                f"{name}={value} is not a multiple of micro_batch_size={self.micro_batch_size}; "
                "gradient accumulation realises whole micro-batches only"
            )

    @property
    def batch_size(self) -> int:
        """Examples in the next optimizer step."""
        return self._state.batch_size

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches the next optimizer step accumulates."""
        return self.batch_size // self.micro_batch_size

    @property
    def loss_divisor(self) -> int:
        """Divide each backward pass's mean-reduced loss by this before ``backward()``.

        Then ``.grad`` holds the mean gradient over the whole step, as ``loss_reduction="mean"``
        of the tracker expects. With accumulation that is :attr:`num_micro_batches`; with a
        ``batch_sampler`` the loop runs one backward pass over the whole batch, whose mean loss
        is already the step's, so it is 1 (``num_micro_batches`` still says how many
        micro-batches the batch holds).
        """
        return 1 if self.batch_sampler is not None else self.num_micro_batches

    @property
    def lr_factor(self) -> float:
        """The learning rate in effect relative to the one tuned at ``base_batch_size``."""
        return self._state.lr_factor

    def _factor(self, batch_size: int, estimate: NoiseEstimate | None) -> float | None:
        """ε(B)/ε(B₀) under the rule, or ``None`` when the rule needs a measurement it lacks."""
        if self.lr_rule == "paper" and self.b_star is None:
            if estimate is None or not (estimate.available and estimate.b_simple > 0):
                return None
            return lr_factor(
                batch_size,
                self.base_batch_size,
                "paper",
                alpha=self.alpha,
                b_star=estimate.b_simple,
            )
        if self.lr_rule == "adascale":
            if estimate is None or not estimate.available:
                return None
            return lr_factor(
                batch_size,
                self.base_batch_size,
                "adascale",
                g2=estimate.g2,
                trace_sigma=estimate.trace_sigma,
            )
        return lr_factor(
            batch_size, self.base_batch_size, self.lr_rule, alpha=self.alpha, b_star=self.b_star
        )

    def _apply(self, batch_size: int, old_factor: float, new_factor: float) -> None:
        share = None if self.batch_sampler is None else self._sampler_batch(batch_size)
        if self.optimizer is not None:
            if new_factor != old_factor:
                self._warn_unscaled_scheduler()
            self._scaled_groups = carry_lr_factor(
                self.optimizer,
                old_factor,
                new_factor,
                self._flat_lr_schedulers,
                scaled_groups=self._scaled_groups,
            )
        if self.batch_sampler is not None and share is not None:
            self.batch_sampler.batch_size = share

    def _warn_unscaled_scheduler(self) -> None:
        """Warn (once) where a scheduler was attached to the optimizer but not given: torch's
        schedulers mark the groups with ``initial_lr``, and a scheduler that still steps writes
        its own rate over the factor (a hunt saw lr_factor 4 in effect as 1). The mark stays
        after a warm-up has finished and been dropped, or in a loaded optimizer state, so the
        words are conditional."""
        assert self.optimizer is not None
        if self.lr_schedulers or self._warned_scheduler:
            return
        if any("initial_lr" in g for g in self.optimizer.param_groups):
            self._warned_scheduler = True
            warnings.warn(
                "noisescale: a learning-rate scheduler was attached to this optimizer (its "
                "parameter groups carry 'initial_lr'), but the schedule was given none "
                "(lr_schedulers=). If it still steps, its next step() writes its own rate over "
                "the schedule's learning-rate factor, and the run trains at another rate than "
                "lr_factor reports: pass it as lr_schedulers=[scheduler] to scale it along. A "
                "scheduler that no longer steps (a finished warm-up, one of a run whose "
                "optimizer state was loaded) can be ignored",
                RuntimeWarning,
                stacklevel=4,
            )

    def _sampler_batch(self, batch_size: int) -> int:
        """The batch sampler's share of ``batch_size``: this process's, under data parallelism.

        The schedule counts global examples (every process's, as the tracker does); each
        process's sampler was set to the whole global batch until a hunt found every step
        training world × the schedule's batch.
        """
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        tokens = self.tokens_per_example or 1
        if self.micro_batch_size % tokens:
            raise NoiseScaleInputError(
                f"micro_batch_size={self.micro_batch_size} tokens is not a whole number of "
                f"sequences of tokens_per_example={tokens}: the batch sampler counts sequences"
            )
        if self.micro_batch_size // tokens % world:
            sequences = "" if tokens == 1 else f" ({self.micro_batch_size // tokens} sequences)"
            raise NoiseScaleInputError(
                f"micro_batch_size={self.micro_batch_size}{sequences} is not divisible by the "
                f"{world} processes: under data parallelism a schedule counts global examples, "
                "so its micro-batch is the per-process micro-batch × the number of processes, and "
                "each process's batch sampler takes an equal share of every batch; build the "
                f"schedule with micro_batch_size = per-process micro-batch × {world}"
            )
        return batch_size // tokens // world

    def _tell_tracker(self, source: Any) -> None:
        """Tell a tracker given as ``source`` of the accumulation of the next step."""
        expect = getattr(source, "expect_micro_batches", None)
        if expect is not None and self.batch_sampler is None:
            # the loop divides by loss_divisor from the next step: fewer micro-batches there
            # are this schedule's, not an epoch's short last window (which the tracker leaves out).
            # A batch sampler's loop runs one backward per step whatever the batch: nothing to say
            expect(self.num_micro_batches)

    def _record(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        del self.history[:-_MAX_HISTORY]

    def _lrs(self) -> list[float] | None:
        if self.optimizer is None:
            return None
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def _scheduler_rates(self) -> list[dict[str, Any]] | None:
        """The rates the schedule scaled in its schedulers: a resume that loads the schedulers'
        (and optimizer's) states before building the schedule has them scaled once more by the
        constructor's starting factor (a hunt: ×1/8, ×4, ×32); :meth:`_load_common` sets them
        back, whatever the order."""
        if self.optimizer is None or self.lr_rule == "none":  # (nothing scaled; any kind given)
            return None
        return _scaled_rates(self._flat_lr_schedulers)

    def _config(self) -> dict[str, Any]:
        """What fixes the learning-rate factor (and for a ramp, the batch): saved with the state
        so that a checkpoint is restored only into a schedule that computes the same numbers."""
        # (plain numbers: a NumPy scalar given as a setting is not JSON, a review found)
        return {
            "lr_rule": self.lr_rule,
            "base_batch_size": _plain(self.base_batch_size),
            "alpha": _plain(self.alpha),
            "b_star": _plain(self.b_star),
        }

    def _check_config(self, state: dict[str, Any]) -> None:
        saved = state.get("config")
        if saved is None:  # a checkpoint from before the configuration was saved
            return
        mine = json.loads(json.dumps(self._config()))  # as a JSON round trip gives it back
        # only what changes the numbers: the base batch not under "none", α and B* only under
        # "paper"
        rules = {mine["lr_rule"], saved.get("lr_rule", mine["lr_rule"])}
        ignore = set() if rules - {"none"} else {"base_batch_size"}
        if "paper" not in rules:
            ignore |= {"alpha", "b_star"}
        differ = [k for k in mine if k in saved and k not in ignore and saved[k] != mine[k]]
        if differ:
            # the saved lr_factor (and lrs) belong to the checkpoint's rule: loading them here
            # would train at the old rate until the next decision (a ramp: at the old batch)
            what = ", ".join(f"{k}={saved[k]!r} there, {mine[k]!r} here" for k in differ)
            raise NoiseScaleInputError(
                f"the checkpoint was written by a schedule configured differently ({what}); "
                "construct the schedule with the checkpoint's settings to resume it, "
                "or start a new schedule without load_state_dict"
            )

    def _load_common(self, state: dict[str, Any]) -> None:
        if int(state["micro_batch_size"]) != self.micro_batch_size:
            raise NoiseScaleInputError(
                f"the checkpoint used micro_batch_size={state['micro_batch_size']} but this "
                f"schedule uses {self.micro_batch_size}"
            )
        self.history = [dict(h) for h in state.get("history", [])]
        lrs = state.get("lrs")
        if self.optimizer is not None and lrs is not None:
            if len(lrs) != len(self.optimizer.param_groups):
                raise NoiseScaleInputError(
                    f"the checkpoint has {len(lrs)} learning rates but the optimizer has "
                    f"{len(self.optimizer.param_groups)} parameter groups"
                )
            rates = state.get("lr_scheduler_rates")
            if rates is not None:  # (None: a checkpoint from before they were saved)
                _set_scaled_rates(self._flat_lr_schedulers, rates)
            # The optimizer's own state_dict holds the same values; writing them here makes a
            # resume that restores only the schedule continue at the same learning rate too.
            for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                group["lr"] = float(lr)
            self._scaled_groups = int(state.get("scaled_groups", len(lrs)))
        if self.batch_sampler is not None:
            self.batch_sampler.batch_size = self._sampler_batch(self.batch_size)


class AdaptiveBatchSize(_Realisation):
    """Batch size that follows the measured noise scale (paper App. D, eq. D.6).

    Every ``interval`` optimizer steps :meth:`step` reads the tracker's estimate and, when its
    confidence interval is narrow enough (relative width at most ``max_relative_width``), computes
    the target B = √(r·B_simple) or c·B_simple (:func:`target_batch_size`), clamps it to the
    bounds and rounds it to a multiple of the micro-batch. The batch changes only when the
    (clamped, unrounded) target differs from the current batch by more than the ``hysteresis``
    factor and the rounded target is closer to it than the current batch; the learning rate
    follows ``lr_rule`` (:func:`lr_factor`). Changes therefore come at least ``interval`` steps
    apart and the estimate is read (one host synchronisation) only at decisions.

    Batch sizes count examples (sequences, for a language model): an estimate in tokens (a
    loss that averages tokens) is converted with its ``tokens_per_example``, and refused where
    no tokens were counted (:meth:`decide`).

    B_simple depends on the temperature ε/B (paper App. C): a rule that changes ε/B when the
    batch changes (``"none"``, ``"sqrt"``) changes the quantity being measured. Let ``interval``
    be at least the tracker's averaging horizon (≈ (1 + β)/(1 − β) steps) so decisions see the
    new regime.

    Args:
        micro_batch_size: Examples per forward/backward pass; every batch is a multiple of it.
        min_batch_size: Smallest batch (a multiple of the micro-batch); default one micro-batch.
        max_batch_size: Largest batch (a multiple of the micro-batch); e.g. what the hardware
            and the accumulation budget allow.
        exchange_rate: r of eq. D.3/D.6 (examples per step), for B = √(r·B_simple).
        factor: c for B = c·B_simple (give this or ``exchange_rate``).
        batch_size: The batch to start at (default ``min_batch_size``).
        interval: Steps between decisions (and so the least steps between changes).
        hysteresis: Change only when max(target/B, B/target) exceeds this factor (> 1).
        max_relative_width: Act only when (high − low)/B_simple of the tracker's interval is
            at most this (an interval unbounded above has infinite width); ``math.inf`` acts on
            every available estimate.
        allow_decrease: Let the batch shrink when the noise scale falls; ``False`` makes the
            schedule a ramp that only grows.
        lr_rule: How the learning rate follows the batch (:data:`LR_RULES`); ``"none"`` leaves
            it alone.
        base_batch_size: Where the optimizer's learning rate was tuned (default: the starting
            batch). If it differs from the start, the learning rate is rescaled at once (for
            rules that need a measurement, at the first decision).
        alpha: α of eq. A.3 for ``lr_rule="paper"``.
        b_star: B* of eq. A.3 for ``lr_rule="paper"``, in examples; ``None`` uses the measured
            B_simple (in examples) at each decision (with α = 1 that is eq. 2.6).
        optimizer: Whose ``param_group["lr"]`` to write (``None``: compute only; read
            :attr:`lr_factor`).
        lr_schedulers: Schedulers to scale along, so that they keep the factor (the kinds
            :func:`scale_lr` supports; others are refused here unless ``lr_rule="none"``).
        batch_sampler: A :class:`ResizableBatchSampler` to resize with the batch (for loaders
            that yield whole steps rather than micro-batches: one backward per step, so the
            tracker is not told of a change of accumulation). Under ``torch.distributed`` it is
            set to this process's share of the global batch, ``batch_size / world_size``.
    """

    def __init__(
        self,
        *,
        micro_batch_size: int,
        max_batch_size: int,
        min_batch_size: int | None = None,
        exchange_rate: float | None = None,
        factor: float | None = None,
        batch_size: int | None = None,
        interval: int = 100,
        hysteresis: float = 1.25,
        max_relative_width: float = 0.5,
        allow_decrease: bool = True,
        lr_rule: LrRule = "none",
        base_batch_size: int | None = None,
        alpha: float = 1.0,
        b_star: float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr_schedulers: Iterable[Any] = (),
        batch_sampler: ResizableBatchSampler | None = None,
    ) -> None:
        self._init_realisation(
            micro_batch_size, optimizer, lr_schedulers, batch_sampler, lr_rule, alpha, b_star
        )
        min_batch_size = micro_batch_size if min_batch_size is None else min_batch_size
        self._check_multiple("min_batch_size", min_batch_size)
        self._check_multiple("max_batch_size", max_batch_size)
        if max_batch_size < min_batch_size:
            raise NoiseScaleInputError(
                f"max_batch_size={max_batch_size} is below min_batch_size={min_batch_size}"
            )
        start = min_batch_size if batch_size is None else batch_size
        self._check_multiple("batch_size", start)
        if not min_batch_size <= start <= max_batch_size:
            raise NoiseScaleInputError(
                f"batch_size={start} is outside [{min_batch_size}, {max_batch_size}]"
            )
        base = start if base_batch_size is None else base_batch_size
        if isinstance(base, bool) or not isinstance(base, int) or base < 1:
            raise NoiseScaleInputError(f"base_batch_size must be a positive integer, got {base!r}")
        # validates exchange_rate / factor once, so a bad value fails here and not mid-run
        target_batch_size(1.0, exchange_rate=exchange_rate, factor=factor)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise NoiseScaleInputError(f"interval must be a positive integer, got {interval!r}")
        if not hysteresis >= 1.0:
            raise NoiseScaleInputError(f"hysteresis must be at least 1, got {hysteresis!r}")
        if not max_relative_width > 0:
            raise NoiseScaleInputError(
                f"max_relative_width must be positive, got {max_relative_width!r}"
            )
        self.min_batch_size = min_batch_size
        self.max_batch_size = max_batch_size
        self.exchange_rate = exchange_rate
        self.factor = factor
        self.interval = interval
        self.hysteresis = float(hysteresis)
        self.max_relative_width = float(max_relative_width)
        self.allow_decrease = allow_decrease
        self.base_batch_size = base
        factor0 = self._factor(start, None)
        self._state = AdaptiveBatchSizeState(
            step=0,
            examples=0,
            batch_size=start,
            lr_factor=1.0 if factor0 is None else factor0,
            last_decision=0,
            last_change=0,
            changes=0,
        )
        self._apply(start, 1.0, self._state.lr_factor)

    @property
    def state(self) -> AdaptiveBatchSizeState:
        """The decisions so far (an immutable snapshot)."""
        return self._state

    def step(
        self,
        source: GradientNoiseTracker | NoiseEstimate | None = None,
        *,
        examples: int | None = None,
    ) -> bool:
        """Count one optimizer step; every ``interval`` steps, decide the next batch size.

        Call after ``optimizer.step()``: a change applies from the next step on.

        Args:
            source: The tracker (its estimate is read only at decisions) or an estimate. With
                ``None`` the step is counted but nothing is decided.
            examples: Examples the step processed (default: the batch size in effect).

        Returns:
            ``True`` when the batch size or the learning rate changed.
        """
        s = self._state
        s = s._replace(
            step=s.step + 1, examples=s.examples + (s.batch_size if examples is None else examples)
        )
        self._state = s
        if source is None or s.step - s.last_decision < self.interval:
            return False
        estimate = source if isinstance(source, NoiseEstimate) else source.estimate()
        changed = self.decide(estimate)
        if changed:
            self._tell_tracker(source)
        return changed

    def decide(self, estimate: NoiseEstimate) -> bool:
        """Decide now from ``estimate`` (normally :meth:`step` calls this every ``interval``).

        The schedule's batch sizes count examples (sequences, for a language model). An
        estimate in tokens (a loss that averages tokens) is converted with its
        ``tokens_per_example`` before it is used, for the target and for the measured
        learning-rate rules alike; one that cannot be converted is refused.

        Returns:
            ``True`` when the batch size or the learning rate changed.

        Raises:
            NoiseScaleInputError: the estimate is in tokens and no tokens were counted.
        """
        s = self._state._replace(last_decision=self._state.step)
        measured = estimate.available and estimate.b_simple > 0
        estimate = _in_examples(estimate) if measured else estimate
        entry: dict[str, Any] = {
            "step": s.step,
            "examples": s.examples,
            "b_simple": estimate.b_simple,
            "b_simple_low": estimate.low,
            "b_simple_high": estimate.high,
            "relative_width": estimate.relative_width,
        }
        wait = (
            "wait: no estimate yet"
            if not measured
            else "wait: interval too wide"
            if not estimate.relative_width <= self.max_relative_width
            else None
        )
        if wait is not None:
            # a group added since the last decision takes the factor in effect now, as the
            # docs say, also while the gate waits (a hunt found it left at its own rate)
            self._apply(s.batch_size, s.lr_factor, s.lr_factor)
            self._state = s
            self._record({**entry, "action": wait, "batch_size": s.batch_size})
            return False
        raw = target_batch_size(
            estimate.b_simple, exchange_rate=self.exchange_rate, factor=self.factor
        )
        target = quantized_batch_size(
            raw, self.micro_batch_size, self.min_batch_size, self.max_batch_size
        )
        aim = min(max(raw, self.min_batch_size), self.max_batch_size)
        # Hysteresis on the unrounded target; and move only to a batch closer to it than the
        # current one, or a target between two multiples of the micro-batch (6 with multiples
        # of 4) would make the batch flip between them at every decision.
        off = max(aim / s.batch_size, s.batch_size / aim)
        closer = abs(math.log(target / aim)) < abs(math.log(s.batch_size / aim))
        grow = target > s.batch_size
        change = off > self.hysteresis and closer and (grow or self.allow_decrease)
        new_batch = target if change else s.batch_size
        new_factor = self._factor(new_batch, estimate)
        if new_factor is None:
            new_factor = s.lr_factor
        self._apply(new_batch, s.lr_factor, new_factor)
        changed = change or new_factor != s.lr_factor
        self._state = s._replace(
            batch_size=new_batch,
            lr_factor=new_factor,
            last_change=s.step if change else s.last_change,
            changes=s.changes + int(change),
        )
        self._record(
            {
                **entry,
                "action": "change" if change else "keep",
                "target": raw,
                "batch_size": new_batch,
                "lr_factor": new_factor,
            }
        )
        return changed

    def state_dict(self) -> dict[str, Any]:
        """The schedule's decisions, for a resumed run to continue with the same batch and rate."""
        return {
            "kind": "AdaptiveBatchSize",
            "micro_batch_size": self.micro_batch_size,
            "config": self._config(),
            "state": self._state._asdict(),
            "lrs": self._lrs(),
            "lr_scheduler_rates": self._scheduler_rates(),
            "scaled_groups": self._scaled_groups,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the optimizer's learning rates are set to the saved ones.

        Raises:
            NoiseScaleInputError: the saved batch size lies outside this schedule's bounds (a
                resumed job on a smaller device): it would be used until the next decision; or
                the checkpoint's learning-rate rule, ``base_batch_size``, ``alpha`` or
                ``b_star`` differ from this schedule's: its saved factor and rates would be
                used until the next decision.
        """
        if state.get("kind") != "AdaptiveBatchSize":
            raise NoiseScaleInputError(
                f"not an AdaptiveBatchSize state (kind={state.get('kind')!r})"
            )
        self._check_config(state)
        saved = AdaptiveBatchSizeState(**state["state"])
        if not self.min_batch_size <= saved.batch_size <= self.max_batch_size:
            # it would train at that batch (and its learning rate) until the next decision
            raise NoiseScaleInputError(
                f"the checkpoint's batch size {saved.batch_size} lies outside this schedule's "
                f"[min_batch_size, max_batch_size] = [{self.min_batch_size}, "
                f"{self.max_batch_size}]; construct the schedule with bounds that include it "
                "(it moves within them at the next decision), or start a new schedule without "
                "load_state_dict"
            )
        self._state = saved
        self._load_common(state)


class BatchSizeRamp(_Realisation):
    """A fixed batch-size warm-up, linear or stepwise in examples (or tokens) processed.

    Large language models ramp their batch: GPT-3 linearly from 32k tokens to its full batch
    over the first 4–12 billion tokens; LLaMA 2 from 512k to 4M tokens; OLMo 1B doubles it as
    the measured critical batch size grows (Merrill et al. 2025). Build one with
    :meth:`linear` or :meth:`stepwise`; batch sizes, ``over`` and ``micro_batch_size`` share
    one unit (examples, or tokens for sequence models: a micro-batch of 8 sequences of 2048
    tokens is 16384).

    Args:
        points: ``(consumed, batch_size)`` knots, consumed strictly increasing from 0.
        micro_batch_size: Every batch is rounded to a multiple of it.
        interpolate: Linear between knots (``True``) or held until the next knot.
        lr_rule: ``"none"``, ``"linear"``, ``"sqrt"`` or ``"paper"`` (with ``b_star``); the
            measured rules need :class:`AdaptiveBatchSize`.
        base_batch_size: Where the optimizer's learning rate was tuned (default: the final
            batch, so the rate is scaled down during the ramp under ``"linear"``/``"sqrt"``).
        alpha, b_star: Of eq. A.3, for ``lr_rule="paper"``.
        optimizer, lr_schedulers, batch_sampler: As for :class:`AdaptiveBatchSize`.
        tokens_per_example: For a ramp in tokens given a ``batch_sampler`` (which counts
            sequences): the tokens per sequence, so that the sampler takes
            ``batch_size / tokens_per_example`` sequences; ``micro_batch_size`` must be a
            multiple of it. ``None``: the ramp counts examples.
    """

    def __init__(
        self,
        points: Sequence[tuple[float, int]],
        *,
        micro_batch_size: int,
        interpolate: bool,
        lr_rule: LrRule = "none",
        base_batch_size: int | None = None,
        alpha: float = 1.0,
        b_star: float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr_schedulers: Iterable[Any] = (),
        batch_sampler: ResizableBatchSampler | None = None,
        tokens_per_example: int | None = None,
    ) -> None:
        self._init_realisation(
            micro_batch_size, optimizer, lr_schedulers, batch_sampler, lr_rule, alpha, b_star
        )
        if tokens_per_example is not None and (
            isinstance(tokens_per_example, bool)
            or not isinstance(tokens_per_example, int)
            or tokens_per_example < 1
        ):
            raise NoiseScaleInputError(
                f"tokens_per_example must be a positive integer, got {tokens_per_example!r}"
            )
        self.tokens_per_example = tokens_per_example
        if lr_rule == "adascale" or (lr_rule == "paper" and b_star is None):
            raise NoiseScaleInputError(
                f"lr_rule={lr_rule!r} needs a measured noise scale; a fixed ramp takes 'none', "
                "'linear', 'sqrt' or 'paper' with b_star (use AdaptiveBatchSize to follow the "
                "measurement)"
            )
        pts = [(float(x), int(b)) for x, b in points]
        if not pts or pts[0][0] != 0.0:
            raise NoiseScaleInputError("a ramp's first knot must be at 0 examples consumed")
        if any(b[0] <= a[0] for a, b in itertools.pairwise(pts)):
            raise NoiseScaleInputError("a ramp's knots must be strictly increasing in consumed")
        for _, b in pts:
            self._check_multiple("batch_size", b)
        self.points = pts
        self.interpolate = interpolate
        self.base_batch_size = pts[-1][1] if base_batch_size is None else base_batch_size
        if self.base_batch_size < 1:
            raise NoiseScaleInputError(f"base_batch_size must be positive, got {base_batch_size!r}")
        start = ramp_batch_size(0.0, pts, micro_batch_size, interpolate=interpolate)
        factor0 = self._factor(start, None)
        assert factor0 is not None
        self._state = BatchSizeRampState(0, 0, start, factor0)
        built = None if batch_sampler is None else batch_sampler.batch_size
        self._apply(start, 1.0, factor0)
        share = None if built is None else self._sampler_batch(start)
        if share is not None and tokens_per_example is None and share > 32 * built:
            # a ramp in tokens set a sampler of sequences to its token count, 2048× (a hunt); a
            # sampler built at the micro-batch or a resumed run's batch is a few times off
            warnings.warn(
                f"noisescale: the batch sampler was built with batch_size={built} but the ramp "
                f"sets it to {share} (its starting batch of {start}), more than 32× as many: "
                "if the ramp counts tokens, give tokens_per_example= (the sampler counts "
                "sequences, and would take a token count of them); if it counts examples, "
                "ignore this, or build the sampler with the ramp's starting batch",
                RuntimeWarning,
                stacklevel=2,
            )

    @classmethod
    def linear(
        cls, start: int, end: int, over: float, *, micro_batch_size: int, **kwargs: Any
    ) -> BatchSizeRamp:
        """From ``start`` to ``end`` linearly over the first ``over`` examples (or tokens)."""
        if not over > 0:
            raise NoiseScaleInputError(f"a ramp needs a positive length, got over={over!r}")
        return cls(
            [(0.0, start), (float(over), end)],
            micro_batch_size=micro_batch_size,
            interpolate=True,
            **kwargs,
        )

    @classmethod
    def stepwise(
        cls, steps: Sequence[tuple[float, int]], *, micro_batch_size: int, **kwargs: Any
    ) -> BatchSizeRamp:
        """Hold each ``(from_consumed, batch_size)`` until the next (e.g. doubling stages)."""
        return cls(steps, micro_batch_size=micro_batch_size, interpolate=False, **kwargs)

    @property
    def state(self) -> BatchSizeRampState:
        """Where the ramp is (an immutable snapshot)."""
        return self._state

    def step(self, source: Any = None, *, examples: int | None = None) -> bool:
        """Count one optimizer step and move along the ramp.

        Args:
            source: The tracker, told of a new accumulation (``expect_micro_batches``); a
                fixed ramp does not read its estimate. Accepted so that both schedules are
                driven the same way.
            examples: Examples (or tokens) the step processed (default: the batch in effect).

        Returns:
            ``True`` when the batch size changed.
        """
        s = self._state
        done = s.examples + (s.batch_size if examples is None else examples)
        new_batch = ramp_batch_size(
            done, self.points, self.micro_batch_size, interpolate=self.interpolate
        )
        new_factor = self._factor(new_batch, None)
        assert new_factor is not None
        self._apply(new_batch, s.lr_factor, new_factor)
        self._state = BatchSizeRampState(s.step + 1, done, new_batch, new_factor)
        if new_batch != s.batch_size:
            # (a ramp stepping down ran fewer micro-batches than the tracker expected, left out
            # as an epoch's short last window until it was told, a hunt found)
            self._tell_tracker(source)
            self._record(
                {
                    "step": s.step + 1,
                    "examples": done,
                    "action": "change",
                    "batch_size": new_batch,
                    "lr_factor": new_factor,
                }
            )
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """Where the ramp is, for a resumed run to continue with the same batch and rate."""
        return {
            "kind": "BatchSizeRamp",
            "micro_batch_size": self.micro_batch_size,
            "config": self._config(),
            "state": self._state._asdict(),
            "lrs": self._lrs(),
            "lr_scheduler_rates": self._scheduler_rates(),
            "scaled_groups": self._scaled_groups,
            "history": [dict(h) for h in self.history],
        }

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "points": [[_plain(x), _plain(b)] for x, b in self.points],
            "interpolate": self.interpolate,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the optimizer's learning rates are set to the saved ones.

        Raises:
            NoiseScaleInputError: the checkpoint was written by a ramp with other knots,
                interpolation, learning-rate rule, ``base_batch_size``, ``alpha`` or ``b_star``:
                its saved batch and rate are not this ramp's.
        """
        if state.get("kind") != "BatchSizeRamp":
            raise NoiseScaleInputError(f"not a BatchSizeRamp state (kind={state.get('kind')!r})")
        self._check_config(state)
        self._state = BatchSizeRampState(**state["state"])
        self._load_common(state)
