"""Pareto-front figures: a PNG (matplotlib, imported lazily) and a self-contained HTML page.

Both show, log–log, the fewest steps S and the examples E to each goal per batch size (points)
with the fitted hyperbola S/S_min − 1 = (E/E_min − 1)⁻¹ (eq. 2.11, lines), and beside it
B_crit per goal with its 95% profile-likelihood interval (an end the data do not bound drawn
open, as an arrow to the figure's edge; no point where the fit is at the edge of its search),
next to the averaged B_simple where measured — the paper's Fig. 7. :func:`pareto_plot_data`
holds every number drawn, so tests check numbers, not pixels; the HTML page is inline SVG with
no scripts or external resources.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from noisescale.sweep.pareto import GoalResult

#: One colour per goal, cycled (a colour-blind-safe palette, Okabe & Ito).
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
#: The fitted curves run from this factor below the smallest batch size to this factor above the
#: largest.
CURVE_MARGIN = 4.0


def pareto_plot_data(results: Sequence[GoalResult], *, metric: str = "loss") -> dict[str, Any]:
    """Everything the figures draw, as plain numbers.

    Returns:
        ``{"metric", "goals": [{"goal", "label", "color", "points": [{"batch_size",
        "learning_rate", "steps", "examples"}], "curve": {"steps": [...], "examples": [...]},
        "b_crit", "b_crit_stderr", "b_crit_interval": (low, high), "b_crit_point": (S, E) at
        B = B_crit i.e. (2·S_min, 2·E_min), "b_simple"}]}``. ``b_crit_interval`` is
        :meth:`~noisescale.sweep.ParetoFit.b_crit_interval` at 95%, ``low`` 0 or ``high``
        ``inf`` where the data do not bound it (``None`` without a degree of freedom); at the
        edge of the search ``b_crit`` and ``b_crit_point`` are ``None``: the edge is no estimate
        (until 2026-12-07 it was drawn as one, with a zero-width error bar).
    """
    goals = []
    for i, result in enumerate(results):
        fit = result.fit
        batch = np.array([p.examples / p.steps for p in result.points])
        grid = np.geomspace(batch.min() / CURVE_MARGIN, batch.max() * CURVE_MARGIN, 100)
        stderr = fit.b_crit_stderr if math.isfinite(fit.b_crit_stderr) else None
        interval = fit.b_crit_interval(0.95)
        estimate = fit.at_bound is None
        goals.append(
            {
                "goal": result.goal,
                "label": f"{metric} ≤ {result.goal:.4g}",
                "color": COLORS[i % len(COLORS)],
                "points": [
                    {
                        "batch_size": p.batch_size,
                        "learning_rate": p.learning_rate,
                        "steps": p.steps,
                        "examples": p.examples,
                    }
                    for p in result.points
                ],
                "curve": {
                    "steps": [float(v) for v in fit.steps(grid)],
                    "examples": [float(v) for v in fit.examples(grid)],
                },
                "fit_text": fit.b_crit_text(0.95),
                "b_crit": fit.b_crit if estimate else None,
                "b_crit_stderr": stderr,
                "b_crit_interval": None if math.isnan(interval[0]) else interval,
                "b_crit_at_bound": fit.at_bound,
                "b_crit_point": (2.0 * fit.s_min, 2.0 * fit.e_min) if estimate else None,
                "b_simple": result.b_simple,
            }
        )
    return {"metric": metric, "goals": goals}


def write_pareto_png(
    results: Sequence[GoalResult], path: str | Path, *, metric: str = "loss"
) -> None:
    """Save the Pareto fronts and B_crit per goal as a PNG (matplotlib, Agg backend)."""
    Path(path).write_bytes(pareto_png(results, metric=metric))


def pareto_png(results: Sequence[GoalResult], *, metric: str = "loss") -> bytes:
    """The Pareto fronts and B_crit per goal as PNG bytes (matplotlib, Agg backend)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = pareto_plot_data(results, metric=metric)
    fig, (front, crit) = plt.subplots(1, 2, figsize=(11, 4.5))
    for g in data["goals"]:
        front.plot(g["curve"]["steps"], g["curve"]["examples"], color=g["color"], lw=1.2)
        front.scatter(
            [p["steps"] for p in g["points"]],
            [p["examples"] for p in g["points"]],
            color=g["color"],
            s=18,
            zorder=3,
            label=g["label"],
        )
        if g["b_crit_point"] is not None:
            front.scatter(*g["b_crit_point"], marker="x", color=g["color"], s=30, zorder=3)
    front.set(
        xscale="log",
        yscale="log",
        xlabel="optimizer steps S",
        ylabel="examples processed E",
        title="Pareto fronts and eq. 2.11 fits (× marks B = B_crit)",
    )
    front.legend(fontsize=8)
    estimated = [(g["goal"], g["b_crit"]) for g in data["goals"] if g["b_crit"] is not None]
    if estimated:
        crit.plot(*zip(*estimated, strict=True), "o-", color="black", label="B_crit (95% interval)")
    with_simple = [(g["goal"], g["b_simple"]) for g in data["goals"] if g["b_simple"] is not None]
    if with_simple:
        crit.plot(*zip(*with_simple, strict=True), "s--", color="#D55E00", label="B_simple (D.1)")
    y_lo, y_hi = (10.0**v for v in _log_range(_b_crit_values(data["goals"])))
    for g in data["goals"]:
        for low, high, open_low, open_high in _whiskers(g, y_lo, y_hi):
            crit.plot([g["goal"]] * 2, [low, high], color="black", lw=1)
            for end, is_open, marker in ((low, open_low, "v"), (high, open_high, "^")):
                crit.plot(g["goal"], end, marker if is_open else "_", color="black", ms=7)
    crit.set(xscale="log", yscale="log", xlabel=f"goal ({metric})", ylabel="batch size")
    crit.set_ylim(y_lo, y_hi)
    crit.set_title("critical batch size per goal")
    crit.invert_xaxis()
    crit.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def pareto_html(results: Sequence[GoalResult], *, metric: str = "loss", title: str = "") -> str:
    """A self-contained HTML page: the two figures as inline SVG and a table of the fits."""
    data = pareto_plot_data(results, metric=metric)
    heading = html.escape(title or "Critical batch size from Pareto fronts")
    rows = []
    for g, result in zip(data["goals"], results, strict=True):
        fit = result.fit
        rows.append(
            "<tr>"
            f'<td><span style="color:{g["color"]}">●</span> {result.goal:.4g}</td>'
            f"<td>{html.escape(fit.b_crit_text(0.95))}</td>"
            f"<td>{html.escape(fit.min_text('s_min'))}</td>"
            f"<td>{html.escape(fit.min_text('e_min'))}</td>"
            f"<td>{'' if result.b_simple is None else f'{result.b_simple:.3g}'}</td>"
            f"<td>{len(result.points)}</td>"
            f"<td>{html.escape('; '.join(result.warnings))}</td>"
            "</tr>"
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{heading}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
.figs {{ display: flex; flex-wrap: wrap; gap: 2em; }}
table {{ border-collapse: collapse; margin-top: 1.5em; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 0.3em 0.8em; text-align: right; }}
td {{ white-space: nowrap; }}
td:last-child {{ text-align: left; white-space: normal; font-size: 0.85em; color: #a33; }}
th:last-child {{ text-align: left; }}
svg text {{ font-size: 12px; fill: #222; }}
.grid {{ stroke: #e4e4e4; }}
.axis {{ stroke: #444; }}
</style></head><body>
<h1>{heading}</h1>
<p>Points: per batch size, the fewest optimizer steps S (over learning rates) to reach each
goal and the examples E used; lines: the fit of
S/S<sub>min</sub> − 1 = (E/E<sub>min</sub> − 1)<sup>−1</sup> (McCandlish et al. 2018, eq. 2.11);
× marks B = B<sub>crit</sub> = E<sub>min</sub>/S<sub>min</sub>, where S = 2·S<sub>min</sub> and
E = 2·E<sub>min</sub>. Hover a point for its run.</p>
<div class="figs">
{_front_svg(data)}
{_b_crit_svg(data)}
</div>
<table><tr><th>goal ({html.escape(metric)})</th><th>B<sub>crit</sub></th><th>S<sub>min</sub></th>
<th>E<sub>min</sub></th><th>B<sub>simple</sub> (D.1 average)</th><th>batch sizes</th>
<th>notes</th></tr>
{"".join(rows)}
</table>
</body></html>
"""


def write_pareto_html(
    results: Sequence[GoalResult], path: str | Path, *, metric: str = "loss", title: str = ""
) -> None:
    """Save :func:`pareto_html` to ``path``."""
    Path(path).write_text(pareto_html(results, metric=metric, title=title), encoding="utf-8")


class _LogFrame:
    """A log–log plotting frame inside an SVG of ``width × height`` pixels."""

    def __init__(
        self, xs: Sequence[float], ys: Sequence[float], width: int = 520, height: int = 400
    ) -> None:
        self.width, self.height = width, height
        self.left, self.right, self.top, self.bottom = 70, 15, 15, 45
        self.x_lo, self.x_hi = _log_range(xs)
        self.y_lo, self.y_hi = _log_range(ys)

    def x(self, value: float) -> float:
        span = self.width - self.left - self.right
        return self.left + span * (math.log10(value) - self.x_lo) / (self.x_hi - self.x_lo)

    def y(self, value: float) -> float:
        span = self.height - self.top - self.bottom
        return (
            self.height
            - self.bottom
            - span * (math.log10(value) - self.y_lo) / (self.y_hi - self.y_lo)
        )

    def axes(self, x_label: str, y_label: str, *, reverse_x: bool = False) -> list[str]:
        parts = []
        x0, x1 = self.left, self.width - self.right
        y0, y1 = self.height - self.bottom, self.top
        for tick in _log_ticks(self.x_lo, self.x_hi):
            px = self.x(tick)
            parts.append(f'<line class="grid" x1="{px:.1f}" y1="{y0}" x2="{px:.1f}" y2="{y1}"/>')
            parts.append(
                f'<text x="{px:.1f}" y="{y0 + 16}" text-anchor="middle">{_tick_label(tick)}</text>'
            )
        for tick in _log_ticks(self.y_lo, self.y_hi):
            py = self.y(tick)
            parts.append(f'<line class="grid" x1="{x0}" y1="{py:.1f}" x2="{x1}" y2="{py:.1f}"/>')
            parts.append(
                f'<text x="{x0 - 6}" y="{py + 4:.1f}" text-anchor="end">{_tick_label(tick)}</text>'
            )
        parts.append(f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}"/>')
        parts.append(f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}"/>')
        parts.append(
            f'<text x="{(x0 + x1) / 2:.0f}" y="{self.height - 8}" text-anchor="middle">'
            f"{html.escape(x_label)}</text>"
        )
        parts.append(
            f'<text transform="translate(16,{(y0 + y1) / 2:.0f}) rotate(-90)" '
            f'text-anchor="middle">{html.escape(y_label)}</text>'
        )
        return parts

    def svg(self, body: list[str], label: str) -> str:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" '
            f'height="{self.height}" viewBox="0 0 {self.width} {self.height}" role="img" '
            f'aria-label="{html.escape(label)}">' + "".join(body) + "</svg>"
        )


def _front_svg(data: dict[str, Any]) -> str:
    xs = [v for g in data["goals"] for v in g["curve"]["steps"]]
    ys = [v for g in data["goals"] for v in g["curve"]["examples"]]
    xs += [p["steps"] for g in data["goals"] for p in g["points"]]
    ys += [p["examples"] for g in data["goals"] for p in g["points"]]
    frame = _LogFrame(xs, ys)
    body = frame.axes("optimizer steps S", "examples processed E")
    for g in data["goals"]:
        path = " ".join(
            f"{frame.x(s):.1f},{frame.y(e):.1f}"
            for s, e in zip(g["curve"]["steps"], g["curve"]["examples"], strict=True)
        )
        body.append(
            f'<polyline class="fit" fill="none" stroke="{g["color"]}" stroke-width="1.5" '
            f'points="{path}"><title>{html.escape(g["label"])}: fit, B_crit = '
            f"{html.escape(g['fit_text'])}</title></polyline>"
        )
        for p in g["points"]:
            body.append(
                f'<circle class="point" cx="{frame.x(p["steps"]):.2f}" '
                f'cy="{frame.y(p["examples"]):.2f}" r="4" fill="{g["color"]}">'
                f"<title>{html.escape(g['label'])}: B = {p['batch_size']:g}, "
                f"lr = {p['learning_rate']:g}, S = {p['steps']:.4g}, "
                f"E = {p['examples']:.4g}</title></circle>"
            )
        if g["b_crit_point"] is None:
            continue
        cx, cy = frame.x(g["b_crit_point"][0]), frame.y(g["b_crit_point"][1])
        body.append(
            f'<path d="M{cx - 5:.1f},{cy - 5:.1f}L{cx + 5:.1f},{cy + 5:.1f}'
            f'M{cx - 5:.1f},{cy + 5:.1f}L{cx + 5:.1f},{cy - 5:.1f}" stroke="{g["color"]}" '
            f'stroke-width="2"><title>B_crit = {g["b_crit"]:.3g}</title></path>'
        )
    for i, g in enumerate(data["goals"]):
        ly = frame.top + 14 + 16 * i
        lx = frame.width - frame.right - 150
        body.append(f'<circle cx="{lx}" cy="{ly - 4}" r="4" fill="{g["color"]}"/>')
        body.append(f'<text x="{lx + 10}" y="{ly}">{html.escape(g["label"])}</text>')
    return frame.svg(body, "Pareto fronts: examples against steps per goal")


def _b_crit_values(goals: Sequence[dict[str, Any]]) -> list[float]:
    """The finite values the B_crit panel shows: estimates, interval ends, B_simple."""
    values = [g["b_crit"] for g in goals if g["b_crit"]]
    values += [g["b_simple"] for g in goals if g["b_simple"]]
    values += [v for g in goals if g["b_crit_interval"] for v in g["b_crit_interval"]]
    return [v for v in values if v > 0 and math.isfinite(v)] or [1.0]


def _whiskers(g: dict[str, Any], y_lo: float, y_hi: float) -> list[tuple[float, float, bool, bool]]:
    """A goal's 95% interval as drawn between ``y_lo`` and ``y_hi``: ``[(low, high, open_low,
    open_high)]``, an end the data do not bound at the figure's edge and marked open (no
    whisker without an interval)."""
    if g["b_crit_interval"] is None:
        return []
    low, high = g["b_crit_interval"]
    open_low, open_high = low <= 0.0, math.isinf(high)
    return [(y_lo if open_low else low, y_hi if open_high else high, open_low, open_high)]


def _b_crit_svg(data: dict[str, Any]) -> str:
    goals = data["goals"]
    xs = [g["goal"] for g in goals]
    if min(xs) <= 0:
        return "<p>(B_crit per goal is drawn against a log axis, which needs positive goals.)</p>"
    frame = _LogFrame(xs, _b_crit_values(goals), width=420)
    # Training progresses towards lower goals: draw them left to right.
    frame.x_lo, frame.x_hi = frame.x_hi, frame.x_lo
    body = frame.axes(f"goal ({data['metric']}), decreasing", "batch size")
    line = " ".join(
        f"{frame.x(g['goal']):.1f},{frame.y(g['b_crit']):.1f}" for g in goals if g["b_crit"]
    )
    body.append(f'<polyline fill="none" stroke="#222" stroke-width="1.2" points="{line}"/>')
    for g in goals:
        px = frame.x(g["goal"])
        for low, high, open_low, open_high in _whiskers(g, 10.0**frame.y_lo, 10.0**frame.y_hi):
            y_low, y_high = frame.y(low), frame.y(high)
            body.append(
                f'<line class="b-crit-interval" x1="{px:.1f}" y1="{y_low:.1f}" x2="{px:.1f}" '
                f'y2="{y_high:.1f}" stroke="#222"><title>goal {g["goal"]:.4g}: B_crit = '
                f"{html.escape(g['fit_text'])}</title></line>"
            )
            for y, is_open, tip in ((y_low, open_low, 1), (y_high, open_high, -1)):
                # an open end: an arrow head pointing off the figure; a bounded one: a cap
                body.append(
                    f'<path class="{"open-end" if is_open else "cap"}" d="M{px - 4:.1f},'
                    f"{y - (5 * tip if is_open else 0):.1f}L{px:.1f},{y:.1f}L{px + 4:.1f},"
                    f'{y - (5 * tip if is_open else 0):.1f}" fill="none" stroke="#222"/>'
                )
        if g["b_crit"]:
            body.append(
                f'<circle class="b-crit" cx="{px:.2f}" cy="{frame.y(g["b_crit"]):.2f}" r="4" '
                f'fill="{g["color"]}"><title>goal {g["goal"]:.4g}: B_crit = '
                f"{html.escape(g['fit_text'])}</title></circle>"
            )
        if g["b_simple"]:
            sy = frame.y(g["b_simple"])
            body.append(
                f'<rect class="b-simple" x="{px - 4:.1f}" y="{sy - 4:.1f}" width="8" height="8" '
                f'fill="none" stroke="#D55E00" stroke-width="1.5"><title>goal {g["goal"]:.4g}: '
                f"B_simple = {g['b_simple']:.3g}</title></rect>"
            )
    lx = frame.left + 12
    body.append(f'<circle cx="{lx}" cy="{frame.top + 10}" r="4" fill="#222"/>')
    body.append(
        f'<text x="{lx + 10}" y="{frame.top + 14}">B_crit, 95% interval (arrow: unbounded)</text>'
    )
    if any(g["b_simple"] for g in goals):
        body.append(
            f'<rect x="{lx - 4}" y="{frame.top + 22}" width="8" height="8" fill="none" '
            'stroke="#D55E00" stroke-width="1.5"/>'
        )
        body.append(f'<text x="{lx + 10}" y="{frame.top + 30}">B_simple (D.1 average)</text>')
    return frame.svg(body, "critical batch size per goal")


def _log_range(values: Sequence[float]) -> tuple[float, float]:
    """log10 bounds around positive values with a little margin (at least a factor 3 wide)."""
    logs = [math.log10(v) for v in values if v > 0 and math.isfinite(v)]
    lo, hi = min(logs), max(logs)
    pad = max(0.05 * (hi - lo), (0.5 - (hi - lo)) / 2, 0.0)
    return lo - pad - 0.02, hi + pad + 0.02


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks at 1, 2, 5 × powers of ten inside [10^lo, 10^hi]; only powers of ten when wide."""
    lo, hi = min(lo, hi), max(lo, hi)
    mantissas = (1.0,) if hi - lo > 3 else (1.0, 2.0, 5.0)
    ticks = []
    for exponent in range(math.floor(lo), math.ceil(hi) + 1):
        for m in mantissas:
            value = m * 10.0**exponent
            if lo <= math.log10(value) <= hi:
                ticks.append(value)
    return ticks


def _tick_label(value: float) -> str:
    if 1e-3 <= value < 1e5:
        return f"{value:g}"
    exponent = math.floor(math.log10(value) + 1e-9)
    mantissa = value / 10.0**exponent
    head = "" if abs(mantissa - 1) < 1e-9 else f"{mantissa:g}×"
    return f"{head}10<tspan dy='-6' font-size='9'>{exponent}</tspan>"
