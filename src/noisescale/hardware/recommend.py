"""Batch size recommendation: the paper's step/example tradeoff priced on measured hardware.

Pure math: no torch. For a global batch B (examples per optimizer step) the paper's eq. 2.11, with
B_crit = E_min/S_min ≈ B_noise (eq. 2.12), gives the optimisation steps and training examples
needed to reach a fixed loss:

    S = S_min·(1 + B_noise/B),        E = E_min·(1 + B/B_noise) = S·B.

A candidate runs B on N data-parallel devices, each device splitting its B/N examples into k
micro-batches that fit in memory (:func:`~noisescale.hardware.accumulation.accumulation_split`).
With the profiled step-time model t(b) = α + β·b (:mod:`noisescale.hardware.profile`), whose α
includes one optimizer update taking u (timed apart by ``noisescale profile``), a micro-batch's
forward/backward pass takes α − u + β·bᵢ and one optimizer step, k passes and one update, takes

    t_step = Σᵢ (α − u + β·bᵢ) + u + c·(N−1)/N·bytes/bandwidth
           = k·(α − u) + u + β·B/N + t_allreduce(N).

A profile that did not time the update apart (u unknown) is priced with u = 0: every pass pays
the whole α, which overprices accumulation by (k − 1)·u; the assumptions say so.

and the run takes time = S·t_step, GPU-hours = time·N/3600 and money = GPU-hours × price.
Recommended points:

- **fastest**: least wall-clock time (ties: fewest GPU-hours);
- **cheapest**: fewest GPU-hours, hence least money at one price per GPU-hour (ties: least time);
- **balanced**: least time × cost, i.e. the least product of the slowdown over the fastest and
  the extra cost over the cheapest, (time/time_min)·(cost/cost_min). On the paper's ideal
  hardware (Fig. 1: one example per device, N = B devices, no all-reduce) a step takes the same
  time at every B, so time ∝ S and cost ∝ N·S ∝ E, and S·E ∝ (1 + B_noise/B)(1 + B/B_noise) =
  2 + B/B_noise + B_noise/B is least at B = B_noise: the balanced point is then the critical
  batch size, where steps and examples are both twice their minimum.

All three lie on the time/cost Pareto front. Given neither S_min nor E_min, only ratios are known:
times and costs are reported relative to the fastest and cheapest candidates.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from noisescale.errors import NoiseScaleInputError
from noisescale.hardware.accumulation import AccumulationSplit, accumulation_split
from noisescale.hardware.profile import (
    DEFAULT_INTERCONNECT,
    FLAT_PRICE_TOLERANCE,
    INTERCONNECTS,
    Interconnect,
    ThroughputProfile,
    allreduce_time,
)
from noisescale.theory import examples_over_min, steps_over_min

RECOMMENDATION_KIND = "noisescale.recommendation"
RECOMMENDATION_VERSION = 1


@dataclass(frozen=True)
class Candidate:
    """One way to train: global batch B on N devices, each accumulating micro-batches.

    Attributes:
        batch_size: B, examples per optimizer step over all devices.
        devices: N, data-parallel devices.
        split: How each device runs its B/N examples as micro-batches.
        steps_over_min: S/S_min = 1 + B_noise/B (eq. 2.11).
        examples_over_min: E/E_min = 1 + B/B_noise (eq. 2.11).
        step_time_s: Seconds per optimizer step, all-reduce included.
        allreduce_s: The all-reduce's part of ``step_time_s``.
        optimizer_update_s: The optimizer update's part of ``step_time_s``, paid once per step
            however many micro-batches (0 when the profile did not time it apart).
        extrapolated: The largest micro-batch lies outside the profiled batch sizes.
        time_per_s_min_s: Wall-clock seconds per minimal step, (S/S_min)·t_step.
        time_rel: Wall-clock time over the fastest candidate's.
        cost_rel: GPU-hours over the cheapest candidate's.
        steps: S (None without a target).
        examples: E (None without a target).
        time_s: Wall-clock seconds to the target (None without a target).
        gpu_hours: Device-hours to the target (None without a target).
        cost: Money to the target (None without a target or a price).
        pareto: Whether no other candidate is both faster and cheaper.
    """

    batch_size: int
    devices: int
    split: AccumulationSplit
    steps_over_min: float
    examples_over_min: float
    step_time_s: float
    allreduce_s: float
    extrapolated: bool
    time_per_s_min_s: float
    optimizer_update_s: float = 0.0
    time_rel: float = math.nan
    cost_rel: float = math.nan
    steps: float | None = None
    examples: float | None = None
    time_s: float | None = None
    gpu_hours: float | None = None
    cost: float | None = None
    pareto: bool = False

    @property
    def device_time_per_s_min_s(self) -> float:
        """Device-seconds per minimal step, N·(S/S_min)·t_step; proportional to GPU-hours."""
        return self.devices * self.time_per_s_min_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "devices": self.devices,
            "per_device_batch_size": self.split.batch_size,
            "micro_batch_size": self.split.micro_batch_size,
            "num_micro_batches": self.split.num_micro_batches,
            "equal_micro_batches": self.split.equal,
            "steps_over_min": self.steps_over_min,
            "examples_over_min": self.examples_over_min,
            "step_time_s": self.step_time_s,
            "allreduce_s": self.allreduce_s,
            "optimizer_update_s": self.optimizer_update_s,
            "extrapolated": self.extrapolated,
            "time_per_s_min_s": self.time_per_s_min_s,
            "time_rel": self.time_rel,
            "cost_rel": self.cost_rel,
            "steps": self.steps,
            "examples": self.examples,
            "time_s": self.time_s,
            "gpu_hours": self.gpu_hours,
            "cost": self.cost,
            "pareto": self.pareto,
        }


@dataclass(frozen=True)
class Recommendation:
    """Candidates priced on a profile, their Pareto front and the three recommended points.

    Attributes:
        b_noise: The noise scale used as B_crit (examples).
        s_min: Minimum steps S_min (None: relative mode).
        e_min: Minimum examples E_min = S_min·B_noise (None: relative mode).
        price_per_gpu_hour: Price of one device-hour (None: costs in GPU-hours only).
        candidates: Every candidate, by batch size then devices.
        pareto_front: Candidates on the time/cost Pareto front, fastest first.
        fastest: Least wall-clock time.
        cheapest: Fewest GPU-hours.
        balanced: Least time × cost.
        assumptions: What the numbers rest on, in words.
        currency: The currency of the price (``None``: not named).
        device_type: The profiled device's type (``cuda``, ``cpu``, …), which names the hours:
            GPU-hours on a GPU, CPU-hours on a CPU.
        devices_without_candidates: Device counts asked for that divide none of the given batch
            sizes, so that no candidate runs on them.
    """

    b_noise: float
    s_min: float | None
    e_min: float | None
    price_per_gpu_hour: float | None
    candidates: tuple[Candidate, ...]
    pareto_front: tuple[Candidate, ...]
    fastest: Candidate
    cheapest: Candidate
    balanced: Candidate
    assumptions: tuple[str, ...]
    currency: str | None = None
    device_type: str = "cuda"
    devices_without_candidates: tuple[int, ...] = ()

    @property
    def relative(self) -> bool:
        """True when no S_min/E_min was given, so only ratios are known."""
        return self.s_min is None

    @property
    def hours_unit(self) -> str:
        """How device-hours are written: ``GPU-h``, ``CPU-h`` or ``device-h``."""
        return hours_unit(self.device_type)

    def money(self, amount: float) -> str:
        """An amount with its currency (``12.5 USD``), or marked as in the price's units."""
        if self.currency:
            return f"{amount:.4g} {self.currency}"
        return f"{amount:.4g} (price units)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": RECOMMENDATION_KIND,
            "version": RECOMMENDATION_VERSION,
            "b_noise": self.b_noise,
            "s_min": self.s_min,
            "e_min": self.e_min,
            "price_per_gpu_hour": self.price_per_gpu_hour,
            "currency": self.currency,
            "device_type": self.device_type,
            "hours_unit": self.hours_unit,
            "relative": self.relative,
            "devices_without_candidates": list(self.devices_without_candidates),
            "recommended": {
                "fastest": self.fastest.to_dict(),
                "cheapest": self.cheapest.to_dict(),
                "balanced": self.balanced.to_dict(),
            },
            "pareto_front": [c.to_dict() for c in self.pareto_front],
            "candidates": [c.to_dict() for c in self.candidates],
            "assumptions": list(self.assumptions),
        }


def hours_unit(device_type: str) -> str:
    """Device-hours named after the device: ``GPU-h`` (cuda), ``CPU-h`` (cpu), else ``device-h``."""
    return {"cuda": "GPU-h", "cpu": "CPU-h"}.get(device_type, "device-h")


def default_batch_sizes(b_noise: float, max_devices: int = 1, *, devices: int = 1) -> list[int]:
    """Powers of two times ``devices``, from ``devices`` up to the first at or above
    max(32·B_noise, max_devices).

    At B = 32·B_noise a run already needs 33× the minimum examples (eq. 2.11), past any sensible
    price for time. With ``devices`` = N every size divides evenly over N devices: the default
    candidates of N = 3 are 3, 6, 12, …, where powers of two alone would give it none.
    """
    if devices < 1:
        raise NoiseScaleInputError(f"number of devices must be at least 1, got {devices}")
    top = max(32.0 * b_noise, float(max_devices), float(devices), 1.0)
    sizes = [devices]
    while sizes[-1] < top:
        sizes.append(2 * sizes[-1])
    return sizes


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates that no other candidate beats in both time and GPU-hours, fastest first."""
    ordered = sorted(candidates, key=lambda c: (c.time_per_s_min_s, c.device_time_per_s_min_s))
    front: list[Candidate] = []
    best_cost = math.inf
    for c in ordered:
        if c.device_time_per_s_min_s < best_cost:
            front.append(c)
            best_cost = c.device_time_per_s_min_s
    return front


def recommend_batch_size(
    b_noise: float,
    profile: ThroughputProfile,
    *,
    devices: Sequence[int] = (1,),
    s_min: float | None = None,
    e_min: float | None = None,
    price_per_gpu_hour: float | None = None,
    batch_sizes: Sequence[int] | None = None,
    max_micro_batch_size: int | None = None,
    interconnect: Interconnect | None = None,
    allreduce_factor: float = 2.0,
    grad_bytes: float | None = None,
    currency: str | None = None,
) -> Recommendation:
    """Price every (batch size, devices) candidate with eq. 2.11 and the profile; pick three.

    See the module docstring for the model. Give at most one of ``s_min`` and ``e_min``; they
    are tied by E_min = S_min·B_noise (eq. 2.12 with B_crit = B_noise).

    Args:
        b_noise: Measured noise scale (B_noise or B_crit), in the profile's examples.
        profile: Step-time fit, largest micro-batch and gradient bytes of the model.
        devices: Device counts N to consider; a batch is only split over N devices when N
            divides it.
        s_min: Minimum optimisation steps to the target loss.
        e_min: Minimum training examples to the target loss.
        price_per_gpu_hour: Money per device-hour.
        batch_sizes: Global batch sizes to consider, each on the device counts that divide it;
            default :func:`default_batch_sizes` for each device count N (N·2ⁱ).
        max_micro_batch_size: Largest micro-batch that fits; default the profile's memory
            search (without one, each device runs its batch in one pass).
        interconnect: All-reduce bandwidth assumption; default :data:`DEFAULT_INTERCONNECT`.
        allreduce_factor: c in the all-reduce time (2 for a ring).
        grad_bytes: Gradient bytes per all-reduce; default the profile's parameter bytes.
        currency: The currency of ``price_per_gpu_hour``, shown with every cost.

    Returns:
        The priced candidates, their Pareto front and the fastest, cheapest and balanced ones.
    """
    if not (math.isfinite(b_noise) and b_noise > 0):
        raise NoiseScaleInputError(f"the noise scale must be positive and finite, got {b_noise}")
    fit = profile.pricing_fit()
    if s_min is not None and e_min is not None:
        raise NoiseScaleInputError("give at most one of S_min and E_min (E_min = S_min·B_noise)")
    for name, value in (("S_min", s_min), ("E_min", e_min), ("price", price_per_gpu_hour)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise NoiseScaleInputError(f"{name} must be positive and finite, got {value}")
    device_counts = sorted(set(devices))
    if not device_counts or device_counts[0] < 1:
        raise NoiseScaleInputError("device counts must be positive integers")
    if batch_sizes:
        sizes = sorted(set(batch_sizes))
        if sizes[0] < 1:
            raise NoiseScaleInputError("batch sizes must be positive integers")
        pairs = [(b, n) for b in sizes for n in device_counts if b % n == 0]
    else:
        pairs = sorted(
            (b, n)
            for n in device_counts
            for b in default_batch_sizes(b_noise, device_counts[-1], devices=n)
        )
    # Device counts that divide none of the given batch sizes get no candidate: said, not hidden.
    without = tuple(n for n in device_counts if all(pn != n for _, pn in pairs))
    if e_min is not None:
        s_min = e_min / b_noise
    elif s_min is not None:
        e_min = s_min * b_noise
    if (
        s_min is not None
        and e_min is not None
        and not all(math.isfinite(v) and v > 0 for v in (s_min, e_min))
    ):
        raise NoiseScaleInputError(
            f"the target is out of range with B_noise = {b_noise:g}: E_min = S_min·B_noise gives "
            f"S_min = {s_min:g}, E_min = {e_min:g}; check the noise scale and the target"
        )
    if max_micro_batch_size is not None and max_micro_batch_size < 1:
        raise NoiseScaleInputError("the largest micro-batch must be at least 1")
    if grad_bytes is not None and not (math.isfinite(grad_bytes) and grad_bytes >= 0):
        raise NoiseScaleInputError(f"gradient bytes must be finite and ≥ 0, got {grad_bytes}")
    oom = profile.out_of_memory_batch_size
    if max_micro_batch_size is not None and oom is not None and max_micro_batch_size >= oom:
        raise NoiseScaleInputError(
            f"the largest micro-batch ({max_micro_batch_size}) is at or above batch size {oom}, "
            "which ran out of memory when the profile was measured; give a smaller one"
        )
    micro_limit = (
        profile.largest_fitting_batch_size if max_micro_batch_size is None else max_micro_batch_size
    )
    link = interconnect or INTERCONNECTS[DEFAULT_INTERCONNECT]
    nbytes = profile.grad_bytes if grad_bytes is None else grad_bytes
    lo, hi = profile.measured_range
    # The update is part of α; a noisy fit may leave α below the update timed apart, and a pass
    # never costs less than nothing.
    update_s = min(profile.optimizer_update_s or 0.0, max(fit.alpha_s, 0.0))

    raw: list[Candidate] = []
    for batch_size, n in pairs:
        s_ratio = float(steps_over_min(batch_size, b_noise))
        e_ratio = float(examples_over_min(batch_size, b_noise))
        per_device = batch_size // n
        split = (
            accumulation_split(per_device, micro_limit)
            if micro_limit
            else AccumulationSplit(per_device, 1)
        )
        smallest = split.batch_size // split.num_micro_batches
        if fit.step_time(smallest) <= 0:
            raise NoiseScaleInputError(
                f"the profile's fit t(b) = {fit.alpha_s:.3g} + {fit.beta_s:.3g}·b predicts a "
                f"non-positive step time at b = {smallest}; re-profile with more batch sizes "
                "or repeats"
            )
        # Σᵢ (α − u + β·bᵢ) over the k forward/backward passes, and one update u.
        compute_s = (
            split.num_micro_batches * (fit.alpha_s - update_s) + fit.beta_s * per_device + update_s
        )
        ar_s = allreduce_time(
            nbytes, n, link.bandwidth_bytes_per_s, allreduce_factor=allreduce_factor
        )
        step_s = compute_s + ar_s
        raw.append(
            Candidate(
                batch_size=batch_size,
                devices=n,
                split=split,
                steps_over_min=s_ratio,
                examples_over_min=e_ratio,
                step_time_s=step_s,
                allreduce_s=ar_s,
                extrapolated=not lo <= split.micro_batch_size <= hi,
                time_per_s_min_s=s_ratio * step_s,
                optimizer_update_s=update_s,
            )
        )
    if not raw:
        raise NoiseScaleInputError(
            "no candidate: no batch size is divisible by any device count; add batch sizes or "
            "device counts"
        )
    _check_in_range(raw, b_noise)

    t_min = min(c.time_per_s_min_s for c in raw)
    g_min = min(c.device_time_per_s_min_s for c in raw)
    front_keys = {(c.batch_size, c.devices) for c in pareto_front(raw)}
    candidates = tuple(
        _finish(c, t_min, g_min, s_min, e_min, price_per_gpu_hour, front_keys) for c in raw
    )
    _check_in_range(candidates, b_noise)
    front = tuple(
        sorted(
            (c for c in candidates if c.pareto),
            key=lambda c: (c.time_per_s_min_s, c.device_time_per_s_min_s),
        )
    )
    fastest = min(
        candidates, key=lambda c: (c.time_per_s_min_s, c.device_time_per_s_min_s, c.batch_size)
    )
    cheapest = min(
        candidates, key=lambda c: (c.device_time_per_s_min_s, c.time_per_s_min_s, c.batch_size)
    )
    balanced = min(
        candidates,
        key=lambda c: (c.time_rel * c.cost_rel, c.time_per_s_min_s, c.batch_size),
    )
    device_type = str(profile.device.get("type", "cuda"))
    return Recommendation(
        b_noise=b_noise,
        s_min=s_min,
        e_min=e_min,
        price_per_gpu_hour=price_per_gpu_hour,
        currency=currency,
        device_type=device_type,
        devices_without_candidates=without,
        candidates=candidates,
        pareto_front=front,
        fastest=fastest,
        cheapest=cheapest,
        balanced=balanced,
        assumptions=_assumptions(
            b_noise,
            profile,
            micro_limit,
            link,
            allreduce_factor,
            nbytes,
            s_min,
            price_per_gpu_hour,
            currency,
            update_s,
            from_search=max_micro_batch_size is None,
        )
        + _no_candidate_lines(without, sizes if batch_sizes else []),
    )


def _check_in_range(candidates: Sequence[Candidate], b_noise: float) -> None:
    """Refuse inputs so extreme that a candidate's numbers overflow (or vanish) in floats.

    E/E_min = 1 + B/B_noise overflows for a noise scale far below one example (1e-320), an
    all-reduce time for a bandwidth near zero; such numbers would print as inf (or fail as JSON).
    """
    for c in candidates:
        if not math.isfinite(c.examples_over_min):
            raise NoiseScaleInputError(
                f"the noise scale {b_noise:.3g} is too small to price batch sizes: E/E_min = "
                f"1 + B/B_noise overflows at B = {c.batch_size}; give B_noise in examples (a "
                "language model's in sequences), as measured"
            )
        if not (math.isfinite(c.step_time_s) and math.isfinite(c.allreduce_s)):
            raise NoiseScaleInputError(
                f"the step time of B = {c.batch_size} on {c.devices} device(s) overflows "
                f"(all-reduce {c.allreduce_s:g} s): check --bandwidth and --grad-bytes"
            )
        values = (
            c.time_per_s_min_s,
            c.device_time_per_s_min_s,
            c.time_rel,
            c.cost_rel,
            *(v for v in (c.steps, c.examples, c.time_s, c.gpu_hours, c.cost) if v is not None),
        )
        if not all(math.isfinite(v) for v in values if not math.isnan(v)) or any(
            v is not None and v <= 0 for v in (c.steps, c.examples)
        ):
            raise NoiseScaleInputError(
                f"B = {c.batch_size} on {c.devices} device(s) prices out of range (steps "
                f"{c.steps}, examples {c.examples}, time {c.time_s} s, cost {c.cost}): the noise "
                "scale, target, price or profile is too extreme to compute with"
            )


def _no_candidate_lines(devices: Sequence[int], sizes: Sequence[int]) -> tuple[str, ...]:
    if not devices:
        return ()
    counts = ", ".join(map(str, devices))
    shown = ", ".join(map(str, sizes[:8])) + (", …" if len(sizes) > 8 else "")
    return (
        f"No candidate on {counts} device(s): none of the batch sizes given ({shown}) divides "
        "evenly over that many devices, so they were not weighed; give batch sizes that are "
        "multiples of the device count, or leave --batch-sizes out (then each device count N "
        "gets N·2ⁱ).",
    )


def _finish(
    c: Candidate,
    t_min: float,
    g_min: float,
    s_min: float | None,
    e_min: float | None,
    price: float | None,
    front_keys: set[tuple[int, int]],
) -> Candidate:
    fields: dict[str, Any] = {
        "time_rel": c.time_per_s_min_s / t_min,
        "cost_rel": c.device_time_per_s_min_s / g_min,
        "pareto": (c.batch_size, c.devices) in front_keys,
    }
    if s_min is not None and e_min is not None:
        time_s = s_min * c.time_per_s_min_s
        gpu_hours = time_s * c.devices / 3600.0
        fields |= {
            "steps": s_min * c.steps_over_min,
            "examples": e_min * c.examples_over_min,
            "time_s": time_s,
            "gpu_hours": gpu_hours,
            "cost": None if price is None else gpu_hours * price,
        }
    return dataclasses.replace(c, **fields)


def _assumptions(
    b_noise: float,
    profile: ThroughputProfile,
    micro_limit: int | None,
    link: Interconnect,
    allreduce_factor: float,
    grad_bytes: float,
    s_min: float | None,
    price: float | None,
    currency: str | None,
    update_s: float,
    *,
    from_search: bool,
) -> tuple[str, ...]:
    fit = profile.pricing_fit()
    unit = hours_unit(str(profile.device.get("type", "cuda")))
    search = profile.max_batch_search if isinstance(profile.max_batch_search, dict) else {}
    oom = profile.out_of_memory_batch_size
    # A batch that ran out of memory while timing below the search's maximum overrides it.
    lowered = oom is not None and (profile.max_batch_size is None or profile.max_batch_size >= oom)
    capped = from_search and bool(search.get("capped")) and not lowered
    lo, hi = profile.measured_range
    device = profile.device.get("name") or profile.device.get("type", "the profiled device")
    lines = [
        f"B_noise = {b_noise:g} examples is used as the critical batch size B_crit = E_min/S_min "
        "of eq. 2.11-2.12 and held constant over the run; the noise scale usually grows during "
        "training, so use a value averaged over the run to the target loss.",
        "Each batch size is trained with its own tuned learning rate: eq. 2.11 describes "
        "well-tuned runs.",
        f"Step time per device t(b) = α + β·b with α = {fit.alpha_s:.4g} s and "
        f"β = {fit.beta_s:.4g} s/example, fitted on {device} over batch sizes {lo}-{hi} "
        f"(largest relative residual {fit.max_rel_residual:.1%}); extrapolated outside that "
        "range; every device is identical to the profiled one.",
    ]
    if fit.beta_s != profile.fit.beta_s:
        lines.append(
            f"The fitted β = {profile.fit.beta_s:.3g} s/example is below 0 (rounding, noise "
            "or skewed timings), and a flat step time misses no timed median by more than "
            f"{FLAT_PRICE_TOLERANCE:.0%} (at most {fit.max_rel_residual:.1%}): the step time is "
            "taken as flat over the timed batch sizes, priced with β = 0 and α the mean of the "
            "medians."
        )
    optimizer = profile.settings.get("optimizer")
    if profile.optimizer_update_s is None:
        pass_cost = "k·α + β·(its batch)"
        lines.append(
            "The profile did not time the optimizer update apart (written before noisescale "
            "did): it is assumed to cost nothing beyond a pass, so each of a step's k "
            "accumulated passes is charged the whole α, update included, which overprices "
            "accumulation by (k − 1) updates; re-profile to price it exactly."
        )
    elif optimizer == "none" or profile.optimizer_update_s == 0:
        pass_cost = "k·α + β·(its batch)"
        lines.append(
            "The profiled step ran no optimizer update, so none is counted: add your "
            "optimizer's time per step, or profile with one."
        )
    else:
        pass_cost = "k·(α − u) + β·(its batch) + u"
        clamped = (
            f" (timed {profile.optimizer_update_s:.4g} s, more than α: capped at α)"
            if update_s < profile.optimizer_update_s
            else ""
        )
        lines.append(
            f"The optimizer update, part of α, takes u = {update_s:.4g} s{clamped}, timed "
            "apart; it runs once per optimizer step, so an accumulated step of k passes costs "
            f"{pass_cost}."
        )
    if micro_limit and from_search and lowered:
        source = (
            "the memory was not searched"
            if profile.max_batch_size is None
            else f"below the memory search's {profile.max_batch_size}"
        )
        lines.append(
            f"Batch size {oom} ran out of memory while the profile was timed ({source}), so the "
            f"largest micro-batch that fits is below {oom}; the largest timed one, "
            f"{micro_limit}, is used: batches above it are accumulated over k passes costing "
            f"{pass_cost}. Profile with the memory search to find the exact limit."
        )
    elif micro_limit and capped:
        lines.append(
            f"Micro-batches of at least {micro_limit} examples fit in memory (the memory search "
            f"stopped at its limit, {micro_limit}, before running out); batches are split into "
            f"micro-batches of at most {micro_limit}, accumulated over k passes costing "
            f"{pass_cost}: profile with a higher --max-batch-limit if larger ones fit."
        )
    elif micro_limit:
        lines.append(
            f"Micro-batches of at most {micro_limit} examples fit in memory; a device's batch "
            f"above that is accumulated over k passes costing {pass_cost}."
        )
    else:
        lines.append(
            "No memory limit was measured: every device runs its batch in one pass, however large."
        )
    lines.append(
        f"N devices train data-parallel with one all-reduce of {grad_bytes:.4g} gradient bytes "
        f"per optimizer step taking {allreduce_factor:g}·(N−1)/N·bytes/bandwidth (ring "
        f"all-reduce), bandwidth {link.bandwidth_bytes_per_s / 1e9:g} GB/s assumed "
        f"({link.description}); it is not overlapped with backward, and data loading never "
        "limits the step."
    )
    if s_min is None:
        lines.append(
            "No target (E_min or S_min) was given: times and costs are relative, to the fastest "
            "and to the cheapest candidate."
        )
    if price is None:
        lines.append(f"No price was given: cost is counted in {unit} (device-hours).")
    else:
        rate = f"{price:g} {currency}" if currency else f"{price:g}"
        unnamed = "" if currency else " (the price's currency: name it with --currency)"
        lines.append(
            f"Cost = {unit} × {rate} per device-hour{unnamed}: every device is paid for the "
            "whole run."
        )
    return tuple(lines)
