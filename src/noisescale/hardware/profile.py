"""Throughput profiles: measured step times, the fitted step-time model, and their JSON form.

Pure math and data: no torch. The measuring side lives in :mod:`noisescale.hardware.timing`.

The step-time model of one device is linear in the micro-batch size b (examples):

    t(b) = α + β·b,

α being the fixed cost of a forward/backward/optimizer pass (kernel launches, optimizer update,
Python) and β the cost per example. The optimizer update's own time u (part of α) is timed apart
(``optimizer_update_s``): an accumulated step of k micro-batches runs k forward/backward passes
but one update, k·(α − u) + β·Σbᵢ + u. It is fitted by least squares to the median step times
(:func:`fit_step_time`). On a GPU, t(b) is flat until the device is saturated; the fit is then
a compromise across the measured range, and ``max_rel_residual`` says how good it is.

N data-parallel devices add one all-reduce of the gradients per optimizer step
(:func:`allreduce_time`):

    t_N(b) = α + β·b + c·(N−1)/N · bytes / bandwidth,

with c = 2 for NCCL's ring all-reduce (a reduce-scatter and an all-gather, each moving (N−1)/N of
the gradient bytes through every device), ``bytes`` the gradient size and ``bandwidth`` the
all-reduce bus bandwidth (NCCL's ``busbw``). The interconnect figures in :data:`INTERCONNECTS` are
assumptions, not measurements.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from noisescale.errors import NoiseScaleInputError
from noisescale.theory import MAX_COUNT

PROFILE_KIND = "noisescale.profile"
PROFILE_VERSION = 1


@dataclass(frozen=True)
class ThroughputPoint:
    """Timed training steps at one micro-batch size.

    Attributes:
        batch_size: Examples per step.
        times_s: Wall-clock seconds of each timed step (after warm-up).
        peak_memory_bytes: Peak device memory allocated during these steps (CUDA only).
    """

    batch_size: int
    times_s: tuple[float, ...]
    peak_memory_bytes: int | None = None

    @property
    def step_time_s(self) -> float:
        """Median step time (s); the median ignores the odd step slowed by the OS or allocator."""
        return statistics.median(self.times_s)

    @property
    def samples_per_s(self) -> float:
        """Throughput at the median step time (examples per second)."""
        return self.batch_size / self.step_time_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "step_time_s": self.step_time_s,
            "samples_per_s": self.samples_per_s,
            "times_s": list(self.times_s),
            "peak_memory_bytes": self.peak_memory_bytes,
        }


@dataclass(frozen=True)
class StepTimeFit:
    """Least-squares fit t(b) = α + β·b of step time against micro-batch size.

    Attributes:
        alpha_s: α, seconds per step independent of the batch.
        beta_s: β, seconds per example.
        alpha_se_s: Standard error of α (None with only two batch sizes: the line is exact).
        beta_se_s: Standard error of β (None with only two batch sizes).
        n_points: Batch sizes in the fit.
        max_rel_residual: Largest |t_measured − t(b)| / t_measured over the points.
    """

    alpha_s: float
    beta_s: float
    alpha_se_s: float | None
    beta_se_s: float | None
    n_points: int
    max_rel_residual: float

    def step_time(self, batch_size: float) -> float:
        """Predicted seconds for one pass over ``batch_size`` examples on one device."""
        return self.alpha_s + self.beta_s * batch_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha_s": self.alpha_s,
            "beta_s": self.beta_s,
            "alpha_se_s": self.alpha_se_s,
            "beta_se_s": self.beta_se_s,
            "n_points": self.n_points,
            "max_rel_residual": self.max_rel_residual,
        }


def fit_step_time(batch_sizes: Sequence[float], step_times_s: Sequence[float]) -> StepTimeFit:
    """Fit t(b) = α + β·b by ordinary least squares, with standard errors.

    The standard errors are the usual OLS ones, s²·(XᵀX)⁻¹ with s² = RSS/(n−2); they need at
    least three distinct batch sizes. A β within :data:`FIT_ROUNDING` of a flat line is 0.

    Args:
        batch_sizes: Micro-batch sizes b (examples), at least two distinct values.
        step_times_s: Measured step time at each batch size (s), e.g. the median of repeats.

    Returns:
        The fitted α, β and their standard errors.
    """
    b = np.asarray(batch_sizes, dtype=float)
    t = np.asarray(step_times_s, dtype=float)
    if b.shape != t.shape or b.ndim != 1:
        raise NoiseScaleInputError("batch sizes and step times must be two lists of equal length")
    if np.unique(b).size < 2:
        raise NoiseScaleInputError("fitting t(b) = α + β·b needs at least two distinct batch sizes")
    if not (np.all(np.isfinite(t)) and np.all(t > 0)):
        raise NoiseScaleInputError("step times must be finite and positive")
    x = np.column_stack([np.ones_like(b), b])
    coef, *_ = np.linalg.lstsq(x, t, rcond=None)
    if _rounding_slope(float(coef[1]), float(coef[0]), float(b.max())):
        coef[1] = 0.0  # a flat line (equal step times) fits β = ±1e-18 by rounding
    residuals = t - x @ coef
    n = b.size
    alpha_se: float | None = None
    beta_se: float | None = None
    if n > 2:
        s2 = float(residuals @ residuals) / (n - 2)
        cov = s2 * np.linalg.inv(x.T @ x)
        alpha_se, beta_se = math.sqrt(cov[0, 0]), math.sqrt(cov[1, 1])
    return StepTimeFit(
        alpha_s=float(coef[0]),
        beta_s=float(coef[1]),
        alpha_se_s=alpha_se,
        beta_se_s=beta_se,
        n_points=int(n),
        max_rel_residual=float(np.max(np.abs(residuals) / t)),
    )


FIT_ROUNDING = 1e-9
"""A fitted β whose change over the timed range, |β|·b_max, is within this fraction of α is the
least-squares rounding of a flat line (equal step times): it is taken as 0, not as a step time
that falls with the batch size (such a profile was refused as too noisy until 2026-12-07, a
fuzzer)."""


FLAT_PRICE_TOLERANCE = 0.05
"""A fitted β < 0 is priced flat (β = 0, α the mean of the medians) only where that flat price
misses no timed median by more than this fraction of the median; beyond it, it is refused."""

MIN_PURE_ERROR_REPEATS = 3
"""Timed steps needed at every batch size for a refused flat price to tell timing noise from
skewed timings (their spread, the pure error)."""

MEDIAN_SE_FACTOR = math.sqrt(math.pi / 2)
"""A median of r normal timings has standard error ≈ √(π/2)·σ/√r = 1.2533·σ/√r (exact as r grows;
it overstates it slightly for few repeats: 0.72 vs 0.67·σ at r = 3)."""

MAD_TO_SIGMA = 1.4826
"""σ of normal timings over their median absolute deviation (1/Φ⁻¹(3/4))."""

LACK_OF_FIT_SES = 4.0
"""A refused flat price names skewed timings where a median misses it by more than this many
standard errors of a median (timing noise within them)."""


def _rounding_slope(beta: float, alpha: float, largest_batch_size: float) -> bool:
    """Whether β is within :data:`FIT_ROUNDING` of a flat line up to the largest batch size."""
    return abs(beta) * largest_batch_size <= FIT_ROUNDING * abs(alpha)


def _misses(
    sizes: np.ndarray, misses: np.ndarray, named: np.ndarray, se: np.ndarray | None = None
) -> str:
    """The named batch sizes' medians' misses (ms), with their standard errors where given."""
    return ", ".join(
        f"b = {int(sizes[i])}: {misses[i] * 1e3:+.3g} ms"
        + ("" if se is None else f" (SE {se[i] * 1e3:.2g} ms)")
        for i in np.flatnonzero(named)
    )


@dataclass(frozen=True)
class Interconnect:
    """An assumed all-reduce bus bandwidth between data-parallel devices.

    Attributes:
        name: Short name (``--interconnect`` value).
        bandwidth_bytes_per_s: All-reduce bus bandwidth (NCCL ``busbw``), bytes per second.
        description: Where the figure comes from; always an assumption, never a measurement.
    """

    name: str
    bandwidth_bytes_per_s: float
    description: str


INTERCONNECTS: dict[str, Interconnect] = {
    ic.name: ic
    for ic in (
        Interconnect(
            "pcie4",
            20e9,
            "PCIe 4.0 x16 between GPUs (32 GB/s per direction peak); assumed all-reduce bus "
            "bandwidth 20 GB/s",
        ),
        Interconnect(
            "pcie5",
            40e9,
            "PCIe 5.0 x16 between GPUs (64 GB/s per direction peak); assumed all-reduce bus "
            "bandwidth 40 GB/s",
        ),
        Interconnect(
            "nvlink3",
            230e9,
            "NVLink 3 / NVSwitch, 8×A100 SXM in one node (600 GB/s per GPU peak); assumed "
            "all-reduce bus bandwidth 230 GB/s",
        ),
        Interconnect(
            "nvlink4",
            400e9,
            "NVLink 4 / NVSwitch, 8×H100 SXM in one node (900 GB/s per GPU peak); assumed "
            "all-reduce bus bandwidth 400 GB/s",
        ),
    )
}
"""Assumed interconnects. The default, ``pcie4``, is the slowest: it never oversells more GPUs."""

DEFAULT_INTERCONNECT = "pcie4"


def allreduce_time(
    grad_bytes: float,
    devices: int,
    bandwidth_bytes_per_s: float,
    *,
    allreduce_factor: float = 2.0,
) -> float:
    """Seconds for one all-reduce of the gradients over N devices: c·(N−1)/N·bytes/bandwidth.

    With ``bandwidth`` the bus bandwidth as NCCL reports it, c = 2 is the ring algorithm (a
    reduce-scatter and an all-gather). The estimate assumes no overlap with the backward pass,
    which makes it an upper bound for DDP (which overlaps bucket all-reduces with backward).

    Args:
        grad_bytes: Bytes of gradient reduced per optimizer step (parameters × bytes per element).
        devices: Data-parallel devices N ≥ 1; one device needs no all-reduce.
        bandwidth_bytes_per_s: All-reduce bus bandwidth, bytes per second.
        allreduce_factor: c, the bus traffic per byte of gradient (2 for a ring).
    """
    # NaN devices or c priced NaN, 2.5 devices a fraction of a ring, and c = -2 a negative time
    # that recommend_batch_size ranked fastest at -4769 s (until 2026-12-07, a review)
    if (
        isinstance(devices, bool)
        or not isinstance(devices, int | float | np.integer | np.floating)
        or not (math.isfinite(devices) and devices >= 1 and devices == math.floor(devices))
    ):
        raise NoiseScaleInputError(
            f"number of devices must be a whole number at least 1, got {devices!r}"
        )
    if not (math.isfinite(allreduce_factor) and allreduce_factor >= 0):
        raise NoiseScaleInputError(
            "allreduce_factor (c, bus bytes per byte of gradient: 2 for a ring) must be a finite "
            f"number ≥ 0, got {allreduce_factor}"
        )
    # `not >` refuses NaN too (until 2026-12-07 a NaN bandwidth or byte count priced NaN and a
    # negative byte count a negative time, without a word, a fuzzer)
    if not bandwidth_bytes_per_s > 0:
        raise NoiseScaleInputError(
            f"all-reduce bandwidth must be positive, got {bandwidth_bytes_per_s}"
        )
    if not (math.isfinite(grad_bytes) and grad_bytes >= 0):
        raise NoiseScaleInputError(
            f"gradient bytes to all-reduce must be a finite number ≥ 0, got {grad_bytes}"
        )
    return allreduce_factor * (devices - 1) / devices * grad_bytes / bandwidth_bytes_per_s


@dataclass(frozen=True)
class ThroughputProfile:
    """A measured throughput profile of one model on one device, as stored in JSON.

    Attributes:
        device: What was measured on (``type``, ``name``, ...).
        model: What was measured (``name``, ``parameters``, ``param_bytes``, ``example_unit``).
        points: Timed batch sizes, ascending.
        fit: Step-time model fitted to the points' medians.
        max_batch_size: Largest micro-batch that fitted in memory (None when not searched).
        max_batch_search: Details of that search (limit, capped, trials), or None.
        settings: How it was measured (warm-up, repeats, optimizer).
        created: ISO-8601 time of the measurement.
        optimizer_update_s: Seconds of the optimizer update alone, the part of α that an
            accumulated step pays once rather than once per micro-batch: the median of
            ``optimizer_update_times_s``, 0 when the timed step had no optimizer, None when it was
            not timed apart (profiles written before noisescale timed it).
        optimizer_update_times_s: Each timed update (s).
        out_of_memory_batch_size: A batch size that ran out of memory while the steps were timed
            (None: none did). The largest batch that fits is below it, whatever
            ``max_batch_size`` says, and no recommendation uses a micro-batch this large.
    """

    device: dict[str, Any]
    model: dict[str, Any]
    points: tuple[ThroughputPoint, ...]
    fit: StepTimeFit
    max_batch_size: int | None = None
    max_batch_search: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    optimizer_update_s: float | None = None
    optimizer_update_times_s: tuple[float, ...] = ()
    out_of_memory_batch_size: int | None = None

    @classmethod
    def from_points(cls, points: Sequence[ThroughputPoint], **fields: Any) -> ThroughputProfile:
        """A profile whose fit is :func:`fit_step_time` of the points' median step times."""
        ordered = tuple(sorted(points, key=lambda p: p.batch_size))
        fit = fit_step_time([p.batch_size for p in ordered], [p.step_time_s for p in ordered])
        return cls(points=ordered, fit=fit, **fields)

    def pricing_fit(self) -> StepTimeFit:
        """The step-time fit batch sizes are priced with (docs/hardware.md).

        The fit, refused where it is not finite. A β < 0 beyond rounding is noise on a flat step
        time or skewed timings (a slow first batch size): it is priced flat — β = 0 and α the
        mean of the medians, with that line's own residual — where that price misses no timed
        median by more than :data:`FLAT_PRICE_TOLERANCE` of it, and refused otherwise, naming
        the sizes and telling skew (a median beyond :data:`LACK_OF_FIT_SES` robust standard
        errors of the repeats' timing noise) from noise (within them: more --repeats). (Until
        2026-12-07 significance tests decided: a 40 ms hiccup inflated the noise and priced a
        skewed profile 18% off, and a real 3% skew was refused more often the more repeats, a
        review.) Every pricing meets this check: reading a profile and
        :func:`~noisescale.hardware.recommend.recommend_batch_size`; ``noisescale profile``
        prints it as a warning and keeps what it measured."""
        fit = self.fit
        if not (math.isfinite(fit.alpha_s) and math.isfinite(fit.beta_s)):
            raise NoiseScaleInputError(
                f"the profile's step-time fit is not finite (α = {fit.alpha_s}, β = "
                f"{fit.beta_s}); re-profile, or correct the file"
            )
        if fit.beta_s >= 0:
            return fit
        if _rounding_slope(fit.beta_s, fit.alpha_s, self.measured_range[1]):
            return replace(fit, beta_s=0.0)
        sizes = np.array([p.batch_size for p in self.points])
        medians = np.array([p.step_time_s for p in self.points])
        alpha = float(np.mean(medians))
        residuals = medians - alpha
        if np.all(np.abs(residuals) <= FLAT_PRICE_TOLERANCE * medians):
            return replace(
                fit,
                alpha_s=alpha,
                beta_s=0.0,
                alpha_se_s=float(np.std(medians, ddof=1)) / math.sqrt(medians.size),
                max_rel_residual=float(np.max(np.abs(residuals) / medians)),
            )
        falls = (
            f"the profile's step time falls with the batch size (β = {fit.beta_s:.3g} s per "
            f"example), and a flat step time {alpha * 1e3:.4g} ms, the medians' mean, misses "
            f"them by more than {FLAT_PRICE_TOLERANCE:.0%}"
        )
        off = np.abs(residuals) > FLAT_PRICE_TOLERANCE * medians
        repeats = np.array([len(p.times_s) for p in self.points])
        if repeats.min() < MIN_PURE_ERROR_REPEATS:
            raise NoiseScaleInputError(
                f"{falls} at {_misses(sizes, residuals, off)}; with fewer than "
                f"{MIN_PURE_ERROR_REPEATS} timed steps at a batch size, timing noise cannot be "
                "told from skewed timings: it cannot price batch sizes; re-profile with more "
                f"--repeats (at least {MIN_PURE_ERROR_REPEATS}) or wider --batch-sizes"
            )
        # robust pure error: the repeats' absolute deviations about their own size's median,
        # pooled, each size's smallest left out (an odd count's own median, 0 by construction;
        # an even count's two middle ones are equal, half their gap: keeping both read σ 0.72×
        # at 4 repeats, 0.78× at 6, and called noise skew, a review; one left out reads 0.95–1.0×
        # for 4–20), so one hiccup does not hide a skew
        deviations = np.concatenate(
            [np.sort(np.abs(np.array(p.times_s) - p.step_time_s))[1:] for p in self.points]
        )
        sigma = MAD_TO_SIGMA * float(np.median(deviations))
        median_se = MEDIAN_SE_FACTOR * sigma / np.sqrt(repeats)
        skewed = np.abs(residuals) > LACK_OF_FIT_SES * median_se
        if skewed.any():
            raise NoiseScaleInputError(
                f"{falls}, beyond {LACK_OF_FIT_SES:g} standard errors of their timing noise at "
                f"{_misses(sizes, residuals, skewed, median_se)}: the timings are skewed "
                "(warm-up, clocks, a slow first batch size) and cannot price batch sizes (more "
                "--repeats will not help); re-profile on an idle device with more --warmup, or "
                "with wider --batch-sizes"
            )
        raise NoiseScaleInputError(
            f"{falls} at {_misses(sizes, residuals, off, median_se)}, within "
            f"{LACK_OF_FIT_SES:g} standard errors of their timing noise: the timings are too "
            "noisy to price batch sizes; re-profile with more --repeats"
        )

    @property
    def grad_bytes(self) -> float:
        """Bytes of gradient all-reduced per step: the trainable parameters' bytes."""
        return float(self.model.get("param_bytes", 0))

    @property
    def largest_fitting_batch_size(self) -> int | None:
        """The largest micro-batch known to fit: the memory search's, lowered below a batch that
        ran out of memory while timing (to the largest timed one); None when neither is known."""
        oom = self.out_of_memory_batch_size
        if oom is None:
            return self.max_batch_size
        if self.max_batch_size is not None and self.max_batch_size < oom:
            return self.max_batch_size
        below = [p.batch_size for p in self.points if p.batch_size < oom]
        return max(below) if below else max(oom - 1, 1)

    @property
    def measured_range(self) -> tuple[int, int]:
        """Smallest and largest timed batch size; the fit extrapolates outside it."""
        return self.points[0].batch_size, self.points[-1].batch_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": PROFILE_KIND,
            "version": PROFILE_VERSION,
            "created": self.created,
            "device": self.device,
            "model": self.model,
            "settings": self.settings,
            "points": [p.to_dict() for p in self.points],
            "fit": self.fit.to_dict(),
            "max_batch_size": self.max_batch_size,
            "max_batch_search": self.max_batch_search,
            "optimizer_update_s": self.optimizer_update_s,
            "optimizer_update_times_s": list(self.optimizer_update_times_s),
            "out_of_memory_batch_size": self.out_of_memory_batch_size,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ThroughputProfile:
        """Read a profile dict written by :meth:`to_dict`, checking kind, version and fields."""
        if not isinstance(data, dict) or data.get("kind") != PROFILE_KIND:
            raise NoiseScaleInputError(f"not a noisescale profile (expected kind {PROFILE_KIND!r})")
        if data.get("version") != PROFILE_VERSION:
            raise NoiseScaleInputError(
                f"unsupported profile version {data.get('version')!r} "
                f"(this noisescale reads version {PROFILE_VERSION})"
            )
        try:
            points = tuple(
                ThroughputPoint(
                    batch_size=_whole(p["batch_size"], "a point's batch_size"),
                    times_s=tuple(_real(t, "a point's times_s") for t in p["times_s"]),
                    peak_memory_bytes=p.get("peak_memory_bytes"),
                )
                for p in data["points"]
            )
            f = data["fit"]
            fit = StepTimeFit(
                alpha_s=_real(f["alpha_s"], "fit.alpha_s"),
                beta_s=_real(f["beta_s"], "fit.beta_s"),
                alpha_se_s=(
                    None
                    if f.get("alpha_se_s") is None
                    else _real(f["alpha_se_s"], "fit.alpha_se_s")
                ),
                beta_se_s=(
                    None if f.get("beta_se_s") is None else _real(f["beta_se_s"], "fit.beta_se_s")
                ),
                n_points=_whole(f["n_points"], "fit.n_points"),
                max_rel_residual=_real(f["max_rel_residual"], "fit.max_rel_residual"),
            )
            max_batch = data.get("max_batch_size")
            # Absent from profiles written before the update was timed apart: None, priced as
            # before (every micro-batch pays the whole α) and said so in the recommendation.
            update = data.get("optimizer_update_s")
            oom = data.get("out_of_memory_batch_size")
            profile = cls(
                device=dict(data["device"]),
                model=dict(data["model"]),
                points=tuple(sorted(points, key=lambda p: p.batch_size)),
                fit=fit,
                max_batch_size=None if max_batch is None else _whole(max_batch, "max_batch_size"),
                max_batch_search=data.get("max_batch_search"),
                settings=dict(data.get("settings") or {}),
                created=str(data.get("created", "")),
                optimizer_update_s=None if update is None else _real(update, "optimizer_update_s"),
                optimizer_update_times_s=tuple(
                    _real(t, "optimizer_update_times_s")
                    for t in data.get("optimizer_update_times_s") or ()
                ),
                out_of_memory_batch_size=(
                    None if oom is None else _whole(oom, "out_of_memory_batch_size")
                ),
            )
        except NoiseScaleInputError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise NoiseScaleInputError(
                f"corrupt profile: missing or malformed field ({err})"
            ) from None
        if not points or any(not p.times_s for p in points):
            raise NoiseScaleInputError("corrupt profile: no timed batch sizes")
        if any(not (math.isfinite(t) and t > 0) for p in points for t in p.times_s):
            raise NoiseScaleInputError("corrupt profile: a step time is not a positive number")
        # the fit's spread, quoted in the recommendation's assumptions: NaN or < 0 hid how well
        # the line fits (read without a word until 2026-12-07, a fuzzer)
        for name in ("alpha_se_s", "beta_se_s", "max_rel_residual"):
            value = getattr(fit, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise NoiseScaleInputError(
                    f"corrupt profile: fit.{name} must be a number ≥ 0, got {value!r}; "
                    "re-profile, or correct the file"
                )
        for p in points:
            peak = p.peak_memory_bytes
            if peak is not None and (
                isinstance(peak, bool)
                or not isinstance(peak, int | float)
                or not (math.isfinite(peak) and peak >= 0 and peak == math.floor(peak))
            ):
                raise NoiseScaleInputError(
                    f"corrupt profile: a point's peak_memory_bytes must be a whole number ≥ 0 "
                    f"or null, got {peak!r}; re-profile, or correct the file"
                )
        _check_search(profile.max_batch_search)
        if math.isfinite(fit.alpha_s) and _rounding_slope(
            fit.beta_s, fit.alpha_s, profile.measured_range[1]
        ):
            # as fit_step_time takes it (a file written before kept β = -1.1e-18, a review)
            profile = replace(profile, fit=replace(fit, beta_s=0.0))
        profile.pricing_fit()
        param_bytes = profile.model.get("param_bytes", 0)
        if (
            isinstance(param_bytes, bool)
            or not isinstance(param_bytes, int | float)
            or not (math.isfinite(param_bytes) and param_bytes >= 0)
        ):
            raise NoiseScaleInputError(
                f"corrupt profile: model.param_bytes must be a number ≥ 0, got {param_bytes!r}"
            )
        update_times = (
            () if profile.optimizer_update_s is None else (profile.optimizer_update_s,)
        ) + profile.optimizer_update_times_s
        if any(not (math.isfinite(t) and t >= 0) for t in update_times):
            raise NoiseScaleInputError(
                "corrupt profile: the optimizer update's time is not a number ≥ 0"
            )
        if profile.out_of_memory_batch_size is not None and any(
            p.batch_size >= profile.out_of_memory_batch_size for p in points
        ):
            raise NoiseScaleInputError(
                "corrupt profile: a timed batch size is at or above out_of_memory_batch_size"
            )
        return profile

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ThroughputProfile:
        """Read a profile JSON file; a missing or corrupt file is a ``NoiseScaleInputError``."""
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise NoiseScaleInputError(f"cannot read profile {path}: {err.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise NoiseScaleInputError(f"profile {path} is not valid JSON: {err}") from None
        try:
            return cls.from_dict(data)
        except NoiseScaleInputError as err:
            raise NoiseScaleInputError(f"profile {path}: {err}") from None


def _check_search(search: Any) -> None:
    """A profile's ``max_batch_search`` as :meth:`MaxBatchSize.state_dict` writes it, in what is
    read of it: ``capped`` (true: the limit is only a lower bound, "at least"), ``converged``
    and the trials. (Until 2026-12-07 it was read unchecked: ``"capped": "false"`` read as
    capped and the recommendation said "at least 32 fit" of a search that found 32 exactly,
    ``"converged": false`` said "at most" of a lower bound, and a list in its place made
    ``noisescale profile``'s summary fail with a TypeError, a review.)"""
    if search is None:
        return
    fix = "re-profile, or correct the file"
    if not isinstance(search, dict):
        raise NoiseScaleInputError(
            f"corrupt profile: max_batch_search must be an object or null, got {search!r}; {fix}"
        )
    for name in ("capped", "converged"):
        if name in search and not isinstance(search[name], bool):
            raise NoiseScaleInputError(
                f"corrupt profile: max_batch_search.{name} must be true or false, got "
                f"{search[name]!r}; {fix}"
            )
    if "capped" not in search:
        raise NoiseScaleInputError(f"corrupt profile: max_batch_search.capped is missing; {fix}")
    if search.get("converged") is False:
        raise NoiseScaleInputError(
            "corrupt profile: the memory search did not converge (max_batch_search.converged "
            "is false: its max_trials ran out), so max_batch_size is only a lower bound of the "
            "largest batch that fits; re-profile (noisescale profile's search converges)"
        )
    limit = search.get("limit")
    if limit is not None:
        _whole(limit, "max_batch_search.limit")
    trials = search.get("trials")
    if not isinstance(trials, list) or not all(
        isinstance(t, list) and len(t) == 2 and isinstance(t[1], bool) for t in trials
    ):
        raise NoiseScaleInputError(
            "corrupt profile: max_batch_search.trials must be a list of [batch size, true or "
            f"false] pairs, got {trials!r}; {fix}"
        )
    for b, _ in trials:
        _whole(b, "a batch size of max_batch_search.trials")


def _real(value: Any, field: str) -> float:
    """A number of a profile, as JSON writes it; a string or boolean is refused naming the field
    (float() took "0.1" for the fit's α or β until 2026-12-07, a fuzzer). Finite and sign are
    checked with the rest in from_dict."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise NoiseScaleInputError(
            f"corrupt profile: {field} must be a number, got {value!r}; re-profile, or correct "
            "the file"
        )
    return float(value)


def _whole(value: Any, field: str) -> int:
    """A batch size (or the fit's count of points) of a profile: a whole JSON number from 1 to
    :data:`MAX_COUNT`, else refused naming the field (until 2026-12-07 int() took 3.5, "64",
    true and 1e20 as 3, 64, 1 and 1e20, and recommend priced them without a word, a hunt)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value == math.floor(value) and 1 <= value <= MAX_COUNT)
    ):
        raise NoiseScaleInputError(
            f"corrupt profile: {field} must be a whole number from 1 to {MAX_COUNT:g}, got "
            f"{value!r}; re-profile, or correct the file"
        )
    return int(value)
