"""The run report's figures, drawn with matplotlib from :mod:`noisescale.report.data`.

Each ``plot_*`` function takes the numbers and returns a matplotlib ``Figure``; :func:`draw_all`
renders them all to PNG bytes (Agg). Figures are built with ``matplotlib.figure.Figure`` directly,
not pyplot, so writing a report never switches the backend of a notebook or script that calls it.
matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from noisescale.report.data import (
    AdaptiveSummary,
    BSimpleSeries,
    CostRow,
    EmaSeries,
    ParetoCurves,
    ReportData,
    RunCost,
    TemperatureSeries,
)
from noisescale.report.text import format_batch_size, format_number

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Figure names, in report order; each becomes ``<name>.png``.
FIGURE_NAMES = ("b_simple_vs_step", "b_simple_vs_loss", "ema", "temperature", "cost")

_SIZE = (7.0, 3.9)
_DPI = 110


def plot_b_simple_vs_step(
    series: BSimpleSeries,
    adaptive: AdaptiveSummary,
    run_step: np.ndarray,
    run_batch_size: np.ndarray,
    unit: str = "examples",
) -> Figure:
    """B_simple with its interval, the run's batch size and the adaptive schedule, per step."""
    fig, ax = _figure()
    _band(ax, series)
    ax.plot(series.x, series.b_simple, color="C0", lw=1.6, label="B_simple (ratio of EMAs)")
    ax.plot(run_step, run_batch_size, color="0.25", lw=1.2, ls="--", label="run's batch size")
    ax.plot(
        adaptive.schedule_step,
        adaptive.schedule_natural,
        color="C2",
        lw=1.2,
        label=f"adaptive √(r·B_simple), r = {adaptive.r_natural:.3g}",
    )
    _log_scale(ax, "y")
    _limit_to_lines(ax, [series.b_simple, run_batch_size, adaptive.schedule_natural])
    ax.set_xlabel("step")
    ax.set_ylabel(unit)
    ax.set_title("Noise scale B_simple during training")
    ax.legend(loc="best", fontsize=8)
    return fig


def plot_b_simple_vs_loss(series: BSimpleSeries, unit: str = "examples") -> Figure:
    """B_simple with its interval against the training loss (loss falls to the right).

    Points coloured by step rather than a line: per-step losses are noisy and not monotonic, and a
    line through them in step order would zigzag.
    """
    fig, ax = _figure()
    if series.x.size:
        ok = np.isfinite(series.low) & np.isfinite(series.high)
        ax.errorbar(
            series.x[ok],
            series.b_simple[ok],
            yerr=[series.b_simple[ok] - series.low[ok], series.high[ok] - series.b_simple[ok]],
            fmt="none",
            ecolor="C0",
            alpha=0.2,
            lw=0.8,
            label="interval",
        )
        points = ax.scatter(
            series.x, series.b_simple, c=series.step, s=9, cmap="viridis", label="B_simple"
        )
        fig.colorbar(points, ax=ax, label="step")
        _log_scale(ax, "y")
        _limit_to_lines(ax, [series.b_simple])
        if series.x.max() > series.x.min():
            ax.set_xlim(series.x.max(), series.x.min())
        ax.legend(loc="best", fontsize=8)
    else:
        _empty(ax, "no step recorded both a loss and a B_simple estimate")
    ax.set_xlabel("training loss (decreasing →)")
    ax.set_ylabel(f"B_simple ({unit})")
    ax.set_title("Noise scale against loss")
    return fig


def plot_ema(emas: EmaSeries) -> Figure:
    """The EMAs of |G|² and tr Σ on a log scale; their ratio is B_simple."""
    fig, ax = _figure()
    if np.any(np.isfinite(emas.g2_ema)) or np.any(np.isfinite(emas.trace_sigma_ema)):
        ax.plot(emas.step, emas.g2_ema, color="C1", lw=1.4, label="|G|² (EMA)")
        ax.plot(emas.step, emas.trace_sigma_ema, color="C4", lw=1.4, label="tr Σ (EMA)")
        _log_scale(ax, "y")
        ax.legend(loc="best", fontsize=8)
    else:
        _empty(ax, "no positive |G|² or tr Σ average recorded")
    ax.set_xlabel("step")
    ax.set_ylabel("squared gradient norm")
    ax.set_title("Gradient signal |G|² and noise tr Σ (App. A.1)")
    return fig


def plot_temperature(series: TemperatureSeries) -> Figure:
    """The temperature T = lr/B per step (App. C: B_noise ∝ 1/T)."""
    fig, ax = _figure()
    if series.step.size:
        ax.plot(series.step, series.temperature, color="C3", lw=1.4)
        _log_scale(ax, "y")
    else:
        _empty(ax, "no learning rate recorded")
    ax.set_xlabel("step")
    ax.set_ylabel("T = lr / B")
    ax.set_title("Temperature (App. C: the noise scale scales as 1/T)")
    return fig


def plot_cost(
    pareto: ParetoCurves,
    costs: list[CostRow],
    run: RunCost,
    adaptive: AdaptiveSummary,
    unit: str = "examples",
) -> Figure:
    """Fixed-batch and adaptive Pareto fronts (eq. 2.11, D.4), the candidates and the run."""
    fig, ax = _figure()
    ax.plot(
        pareto.examples_over_min,
        pareto.fixed_steps_over_min,
        color="0.3",
        lw=1.4,
        label="fixed batch size (eq. 2.11)",
    )
    ax.plot(
        pareto.examples_over_min,
        pareto.adaptive_steps_over_min,
        color="C2",
        lw=1.4,
        label=f"adaptive B = √(r·B_simple), γ = {pareto.gamma:.3f} (eq. D.4)",
    )
    e = np.array([row.examples_over_min for row in costs])
    s = np.array([row.steps_over_min for row in costs])
    ax.plot(e, s, "o", color="C0", ms=5, label="candidate fixed batch sizes")
    for row in costs:
        ax.annotate(
            format_batch_size(row.batch_size),
            (row.examples_over_min, row.steps_over_min),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )
    ax.plot(
        run.examples / run.e_min,
        run.steps / run.s_min,
        "*",
        color="C3",
        ms=12,
        label="this run",
    )
    ax.plot(
        adaptive.natural_examples / run.e_min,
        adaptive.natural_steps / run.s_min,
        "D",
        color="C2",
        ms=6,
        label="adaptive, r = E_min/S_min",
    )
    top = max(float(s.max()), run.steps / run.s_min) * 1.5
    right = max(float(e.max()), run.examples / run.e_min) * 1.5
    _log_scale(ax, "x")
    _log_scale(ax, "y")
    ax.set_xlim(1.0, right)
    ax.set_ylim(1.0, top)
    ax.set_xlabel(f"{unit} E / E_min (compute)")
    ax.set_ylabel("steps S / S_min (time)")
    ax.set_title("Cost of this run's progress at other batch sizes")
    ax.legend(loc="upper right", fontsize=7)
    return fig


def draw_all(data: ReportData) -> dict[str, bytes]:
    """Every figure of the report as PNG bytes, keyed by the names of :data:`FIGURE_NAMES`."""
    figures = {
        "b_simple_vs_step": plot_b_simple_vs_step(
            data.b_simple_step,
            data.adaptive,
            data.trajectory.step,
            data.trajectory.batch_size,
            data.history.unit,
        ),
        "b_simple_vs_loss": plot_b_simple_vs_loss(data.b_simple_loss, data.history.unit),
        "ema": plot_ema(data.emas),
        "temperature": plot_temperature(data.temperature),
        "cost": plot_cost(data.pareto, data.costs, data.run, data.adaptive, data.history.unit),
    }
    out = {}
    for name in FIGURE_NAMES:
        buffer = io.BytesIO()
        figures[name].savefig(buffer, format="png", dpi=_DPI)
        out[name] = buffer.getvalue()
    return out


def _figure() -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=_SIZE, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def _log_scale(ax: Axes, which: str) -> None:
    """A log axis labelled 600, 0.02, 1e+05 (as ``calc`` writes numbers) rather than 6×10²."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            # LogFormatter decides which ticks get a label; we only change how it is written.
            return format_number(x) if super().__call__(x, pos) else ""

    if which == "x":
        ax.set_xscale("log")
        axis = ax.xaxis
    else:
        ax.set_yscale("log")
        axis = ax.yaxis
    axis.set_major_formatter(PlainLogFormatter())
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _limit_to_lines(ax: Axes, lines: list[np.ndarray]) -> None:
    """Fit a log y-axis to the plotted values, so early, very wide intervals do not squash them.

    The intervals still show where they fit; beyond the limits they are clipped.
    """
    values = np.concatenate([np.asarray(v, dtype=float) for v in lines])
    values = values[np.isfinite(values) & (values > 0)]
    if values.size:
        ax.set_ylim(values.min() / 2, values.max() * 2)


def _band(ax: Axes, series: BSimpleSeries) -> None:
    ok = np.isfinite(series.low) & np.isfinite(series.high) & (series.low > 0)
    if ok.any():
        # Where the interval is missing, leave a gap rather than inventing a width.
        low = np.where(ok, series.low, np.nan)
        high = np.where(ok, series.high, np.nan)
        ax.fill_between(series.x, low, high, color="C0", alpha=0.2, lw=0, label="interval")


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
