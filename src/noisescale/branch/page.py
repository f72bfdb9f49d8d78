"""The branched critical batch size beside the noise scale: figures (PNG) and one HTML page.

:func:`plot_data` holds every number the figures draw, so tests check numbers rather than
pixels. The figures are drawn with matplotlib's ``Figure`` directly (no pyplot; imported only
when drawing); the page is one self-contained HTML file, the PNGs inlined, no scripts and no
network.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from noisescale.branch.compare import LocalCriticalBatch
from noisescale.branch.side import SideBySideRow, Trajectory
from noisescale.branch.warmup import WarmupPlan
from noisescale.report.text import format_batch_size, format_count, format_number

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Figure names, in page order; each becomes ``<name>.png`` beside a PNG output.
FIGURE_NAMES = ("side_by_side", "efficiency")
_SIZE = (7.2, 4.2)
_DPI = 110


def plot_data(
    rows: Sequence[SideBySideRow],
    trajectory: Trajectory | None = None,
    plan: WarmupPlan | None = None,
    *,
    unit: str = "examples",
) -> dict[str, Any]:
    """Every number the figures draw.

    Returns:
        ``{"unit", "trajectory": {"x", "b_simple", "low", "high"} | None,
        "points": [{"checkpoint", "x" (window middle), "window", "cbs", "cbs_low", "cbs_high",
        "b_crit", "b_crit_low", "b_crit_high", "b_simple", "b_simple_low", "b_simple_high",
        "b_noise"}], "warmup": {"x", "batch_size"} | None, "efficiency": [{"checkpoint",
        "batch_size", "efficiency", "low", "high"}], "threshold"}``; NaN where not measured.
    """
    points = []
    for row in rows:
        r = row.result
        points.append(
            {
                "checkpoint": r.checkpoint,
                "x": (row.window[0] + row.window[1]) / 2,
                "window": row.window,
                "cbs": r.cbs,
                "cbs_low": r.cbs_low,
                "cbs_high": r.cbs_high,
                "b_crit": r.b_crit,
                "b_crit_low": r.b_crit_low,
                "b_crit_high": r.b_crit_high,
                "b_simple": row.b_simple,
                "b_simple_low": row.b_simple_low,
                "b_simple_high": row.b_simple_high,
                "b_noise": row.b_noise,
            }
        )
    warmup = None
    if plan is not None:
        xs = [x for x, _ in plan.knots] + [plan.total]
        bs = [b for _, b in plan.knots] + [plan.knots[-1][1]]
        warmup = {"x": xs, "batch_size": bs, "base_batch_size": plan.base_batch_size}
    efficiency = [
        {
            "checkpoint": row.result.checkpoint,
            "batch_size": [b.batch_size for b in row.result.batches],
            "efficiency": [b.efficiency for b in row.result.batches],
            "low": [min(b.efficiencies) for b in row.result.batches],
            "high": [max(b.efficiencies) for b in row.result.batches],
        }
        for row in rows
    ]
    tolerance = rows[0].result.tolerance if rows else math.nan
    return {
        "unit": unit,
        "trajectory": None
        if trajectory is None
        else {
            "x": trajectory.examples,
            "b_simple": trajectory.b_simple,
            "low": trajectory.low,
            "high": trajectory.high,
        },
        "points": points,
        "warmup": warmup,
        "efficiency": efficiency,
        "threshold": 1.0 / (1.0 + tolerance),
    }


def plot_side_by_side(data: dict[str, Any]) -> Figure:
    """B_simple along the run, and at each branch point cbs, B_crit and B_simple over the
    window (and B_noise), on one log axis; the warm-up as a staircase."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=_SIZE, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, which="major", alpha=0.3)
    unit = data["unit"]
    values: list[float] = []
    traj = data["trajectory"]
    if traj is not None and len(traj["x"]):
        ok = np.isfinite(traj["low"]) & np.isfinite(traj["high"]) & (traj["low"] > 0)
        ax.fill_between(
            traj["x"],
            np.where(ok, traj["low"], np.nan),
            np.where(ok, traj["high"], np.nan),
            color="C0",
            alpha=0.15,
            lw=0,
        )
        ax.plot(traj["x"], traj["b_simple"], color="C0", lw=1.2, label="B_simple (tracker, EMA)")
        values.extend(np.asarray(traj["b_simple"], dtype=float).tolist())
    pts = data["points"]
    x = np.array([p["x"] for p in pts], dtype=float)
    half = np.array([(p["window"][1] - p["window"][0]) / 2 for p in pts], dtype=float)
    # The markers of one branch point side by side rather than on top of each other.
    span = float(np.ptp(np.concatenate([x - half, x + half]))) if x.size else 1.0
    step = 0.012 * span
    for key, label, marker, color, shift in (
        ("b_simple", "B_simple over the branch window", "s", "C0", -step),
        ("b_crit", "B_crit from branches (eq. 2.11)", "o", "C3", 0.0),
        ("cbs", "local CBS at the tolerance", "D", "C1", step),
    ):
        y = np.array([p[key] for p in pts], dtype=float)
        lo = np.array([p[f"{key}_low"] for p in pts], dtype=float)
        hi = np.array([p[f"{key}_high"] for p in pts], dtype=float)
        ok = np.isfinite(y) & (y > 0)
        if not ok.any():
            continue
        # An end the data do not bound (0 or ∞) drawn open, an arrow off the point; until
        # 2026-12-07 the upper one was a capped whisker at 4·y, read as a bound.
        open_lo, open_hi = ~(np.isfinite(lo) & (lo > 0)), ~np.isfinite(hi)
        err = np.vstack([np.where(open_lo, 0, y - lo), np.where(open_hi, 0, hi - y)])
        for i in np.flatnonzero(ok & (open_lo | open_hi)):
            for is_open, end in ((open_lo[i], y[i] / 4), (open_hi[i], y[i] * 4)):
                if is_open:
                    ax.annotate(
                        "",
                        xy=(x[i] + shift, end),
                        xytext=(x[i] + shift, y[i]),
                        arrowprops={"arrowstyle": "->", "color": color, "lw": 1},
                    )
                    values.append(float(end))
        ax.errorbar(
            x[ok] + shift,
            y[ok],
            yerr=err[:, ok],
            xerr=half[ok] if key == "b_simple" else None,
            fmt=marker,
            color=color,
            ms=5,
            capsize=2,
            lw=1,
            label=label,
        )
        values.extend(y[ok].tolist())
    bn = np.array([p["b_noise"] for p in pts], dtype=float)
    if np.isfinite(bn).any():
        ax.plot(x + 2 * step, bn, "^", color="C2", ms=6, label="B_noise (Hessian)")
        values.extend(bn[np.isfinite(bn)].tolist())
    warm = data["warmup"]
    if warm is not None:
        ax.step(
            warm["x"],
            warm["batch_size"],
            where="post",
            color="0.3",
            lw=1.2,
            label="warm-up fitted to the CBS",
        )
        ax.axhline(warm["base_batch_size"], color="0.5", ls="--", lw=1, label="main run's batch")
        values.extend([*(float(b) for b in warm["batch_size"]), float(warm["base_batch_size"])])
    ax.set_yscale("log")
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if finite:
        ax.set_ylim(min(finite) / 2, max(finite) * 2)
    ax.set_xlabel(f"{unit} consumed by the main run")
    ax.set_ylabel(f"batch size ({unit})")
    ax.set_title("Branched critical batch size beside the noise scale")
    ax.legend(fontsize=7, loc="best")
    return fig


def plot_efficiency(data: dict[str, Any]) -> Figure:
    """η_B against B at each branch point (mean over seeds, range over seeds), and 1/(1 + τ)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=_SIZE, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, which="major", alpha=0.3)
    for i, curve in enumerate(data["efficiency"]):
        b = np.asarray(curve["batch_size"], dtype=float)
        e = np.asarray(curve["efficiency"], dtype=float)
        err = np.vstack([e - np.asarray(curve["low"]), np.asarray(curve["high"]) - e])
        ax.errorbar(
            b,
            e,
            yerr=err,
            fmt="o-",
            ms=4,
            lw=1,
            capsize=2,
            color=f"C{i % 10}",
            label=f"from {format_number(curve['checkpoint'])}",
        )
    ax.axhline(data["threshold"], color="0.3", ls="--", lw=1, label="tolerance: 1/(1 + τ)")
    ax.set_xscale("log", base=2)
    sizes = sorted({b for curve in data["efficiency"] for b in curve["batch_size"]})
    ax.set_xticks(sizes, [format_batch_size(b) for b in sizes])
    ax.minorticks_off()
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(f"branch batch size ({data['unit']})")
    ax.set_ylabel("efficiency η = E_ref(loss)/budget")
    ax.set_title("Examples each batch size turns into progress, against the reference")
    ax.legend(fontsize=7, loc="best")
    return fig


def figures_png(data: dict[str, Any]) -> dict[str, bytes]:
    """Both figures as PNG bytes, by :data:`FIGURE_NAMES`."""
    out = {}
    for name, fig in (
        ("side_by_side", plot_side_by_side(data)),
        ("efficiency", plot_efficiency(data)),
    ):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=_DPI)
        out[name] = buffer.getvalue()
    return out


def branch_html(
    rows: Sequence[SideBySideRow],
    figures: dict[str, bytes],
    *,
    plan: WarmupPlan | None = None,
    title: str = "branched training",
    unit: str = "examples",
    warnings: Sequence[str] = (),
) -> str:
    """The page: summary, table, warm-up, figures, method."""
    e = html.escape
    results: list[LocalCriticalBatch] = [row.result for row in rows]
    tol = results[0].tolerance if results else math.nan
    ref = results[0].reference if results else "smallest"
    conf = results[0].confidence if results else 0.95
    table = "".join(_row_html(row) for row in rows)
    warm = ""
    if plan is not None:
        stages = ", ".join(f"{format_batch_size(b)} from {format_count(x)}" for x, b in plan.knots)
        same = (
            f" In the paper's model (eq. D.1, with the measured B<sub>crit</sub>) it would need "
            f"{format_count(plan.examples_same_progress)} {unit} and "
            f"<b>{format_count(plan.steps_same_progress)}</b> steps to reach the main run's loss: "
            f"{100 * plan.step_saving_same_progress:.1f}% fewer steps."
            if math.isfinite(plan.steps_same_progress)
            # (until 2026-12-07 nothing where there is none: the command's text named why, the
            # page left the prediction out without a word; a review)
            else f" No eq. D.1 prediction at equal progress: {e(plan.same_progress_reason)}."
            if plan.same_progress_reason
            else ""
        )
        warm = (
            f"<h2>Batch-size warm-up fitted to it</h2><p>Stages (batch size from {unit} "
            f"consumed): {e(stages)}. Over {format_count(plan.total)} {unit} it takes "
            f"<b>{format_count(plan.steps_warmup)}</b> optimizer steps against "
            f"{format_count(plan.steps_fixed)} at the main run's batch of "
            f"{format_batch_size(plan.base_batch_size)}: <b>{100 * plan.step_saving:.1f}%</b> "
            f"fewer (Merrill et al. report 43% for OLMo 1B).{same}</p>"
        )
    notes = list(warnings) + [w for r in results for w in r.warnings]
    warn_html = (
        '<ul class="warnings">'
        + "".join(f"<li>{e(w)}</li>" for w in dict.fromkeys(notes))
        + "</ul>"
        if notes
        else ""
    )
    figs = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(figures[name]).decode("ascii")}"></figure>'
        for name in FIGURE_NAMES
        if name in figures
    )
    return _PAGE.format(
        title=e(title),
        unit=unit,
        tol=format_number(tol),
        pct=format_number(100 * tol),
        ref=e(ref),
        conf=format_number(100 * conf),
        rows=table,
        warmup=warm,
        warnings=warn_html,
        figures=figs,
    )


def _interval(low: float, high: float) -> str:
    if not (math.isfinite(low) or math.isfinite(high)):
        return ""
    lo = format_number(low) if math.isfinite(low) else "?"
    hi = format_number(high) if math.isfinite(high) else "∞"
    return f" [{lo}, {hi}]"


def _value(x: float, bound: str | None = None) -> str:
    if not math.isfinite(x):
        return "—"
    prefix = {"upper": "≥ ", "lower": "≤ "}.get(bound or "", "")
    return prefix + format_number(x)


def _row_html(row: SideBySideRow) -> str:
    r = row.result
    flags = []
    if r.cbs_bound == "upper":
        flags.append("CBS beyond the largest batch tested")
    if r.cbs_bound == "lower":
        flags.append("CBS below the second batch size tested")
    if r.crossing:
        flags.append("curves cross")
    cells = [
        format_count(r.checkpoint),
        format_number(row.loss) if math.isfinite(row.loss) else "—",
        _value(r.cbs, r.cbs_bound if r.cbs_bound == "upper" else None)
        + _interval(r.cbs_low, r.cbs_high),
        _value(r.b_crit, r.b_crit_bound) + _interval(r.b_crit_low, r.b_crit_high),
        _value(row.b_simple) + _interval(row.b_simple_low, row.b_simple_high),
        _value(row.ratio_b_crit),
        _value(row.ratio_cbs),
        # (with its interval, as the text and the JSON give it: until 2026-12-07 the page showed
        # B_noise 33.16 alone where they gave [32.66, 33.66]; a hunt)
        _value(row.b_noise) + _interval(row.b_noise_low, row.b_noise_high),
        # (the batch size the efficiencies are against: with --reference best the branch that
        # ended lowest, per checkpoint; until 2026-12-08 only the JSON's reference_batch_size
        # said which, the page named the rule alone)
        html.escape(format_batch_size(r.reference_batch_size))
        if math.isfinite(r.reference_batch_size)
        else "—",
        html.escape("; ".join(flags)),
    ]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>noisescale branch: {title}</title>
<style>
  body {{ font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
         max-width: 1000px; margin: 1.2em auto; padding: 0 1em; }}
  h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.15em; margin-top: 1.5em;
  border-bottom: 1px solid #ddd; }}
  table {{ border-collapse: collapse; font-variant-numeric: tabular-nums; }}
  th, td {{ padding: .25em .6em; border-bottom: 1px solid #eee; text-align: right; }}
  figure img {{ max-width: 100%; border: 1px solid #eee; }}
  .note {{ font-size: .9em; color: #555; }} .warnings {{ color: #8a5a00; }}
</style>
</head>
<body>
<h1>Branched critical batch size: {title}</h1>
<p class="note">Merrill et al. 2025 (branched training) beside McCandlish et al. 2018 (the noise
scale). Batch sizes, checkpoints and budgets in {unit}; intervals at {conf}% confidence over
data orders.</p>
{warnings}
<h2>At each branch point</h2>
<table>
<tr><th>checkpoint</th><th>main-run loss</th><th>local CBS (τ = {tol})</th>
<th>B<sub>crit</sub> (eq. 2.11)</th><th>B<sub>simple</sub> over the window</th>
<th>B<sub>crit</sub>/B<sub>simple</sub></th><th>CBS/B<sub>simple</sub></th>
<th>B<sub>noise</sub></th><th>reference batch ({ref})</th><th>notes</th></tr>
{rows}
</table>
{warmup}
<h2>Figures</h2>
{figures}
<h2>How to read this</h2>
<ul class="note">
<li>From each checkpoint of the main run, branches trained for the same budget at several batch
sizes. The efficiency η of a batch size is the fraction of the budget the reference branch
({ref}) needed to reach the loss that batch size reached; the table names its batch size at each
checkpoint.</li>
<li>The <b>local CBS</b> is the largest batch size that needs at most {pct}% more {unit} than the
reference for the same loss (1/η ≤ 1 + τ), interpolated between the batch sizes tried.</li>
<li><b>B<sub>crit</sub> (eq. 2.11)</b> is the noise scale that makes the measured efficiencies
follow the paper's E = E<sub>min</sub>(1 + B/B<sub>crit</sub>): the critical batch size of
McCandlish et al. over the branch window, to set beside B<sub>simple</sub>. Their paper expects
B<sub>crit</sub>/B<sub>simple</sub> of order one.</li>
<li>B<sub>simple</sub> over the window is the ratio of the main run's mean |G|² and tr Σ over the
steps of the window, at the main run's batch size and learning rate (temperature).</li>
</ul>
<p class="note">Generated by <code>noisescale branch</code>; works offline.</p>
</body>
</html>
"""
