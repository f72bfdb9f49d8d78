"""Pareto-front figures: a PNG (matplotlib, imported lazily) and a self-contained HTML page.

Both show, log–log, the fewest steps S and the examples E to each goal per batch size (points)
with the fitted hyperbola S/S_min − 1 = (E/E_min − 1)⁻¹ (eq. 2.11, lines), and beside it
B_crit per goal with its standard error, next to the averaged B_simple where measured — the
paper's Fig. 7. :func:`pareto_plot_data` holds every number drawn, so tests check numbers, not
pixels; the HTML page is inline SVG with no scripts or external resources.
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
        "b_crit", "b_crit_stderr", "b_crit_point": (S, E) at B = B_crit i.e. (2·S_min,
        2·E_min), "b_simple"}]}``.
    """
    goals = []
    for i, result in enumerate(results):
        fit = result.fit
        batch = np.array([p.examples / p.steps for p in result.points])
        grid = np.geomspace(batch.min() / CURVE_MARGIN, batch.max() * CURVE_MARGIN, 100)
        stderr = fit.b_crit_stderr if math.isfinite(fit.b_crit_stderr) else None
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
                "b_crit": fit.b_crit,
                "b_crit_stderr": stderr,
                "b_crit_at_bound": fit.at_bound,
                "b_crit_point": (2.0 * fit.s_min, 2.0 * fit.e_min),
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
        front.scatter(*g["b_crit_point"], marker="x", color=g["color"], s=30, zorder=3)
    front.set(
        xscale="log",
        yscale="log",
        xlabel="optimizer steps S",
        ylabel="examples processed E",
        title="Pareto fronts and eq. 2.11 fits (× marks B = B_crit)",
    )
    front.legend(fontsize=8)
    goals = [g["goal"] for g in data["goals"]]
    b_crit = [g["b_crit"] for g in data["goals"]]
    err = [g["b_crit_stderr"] or 0.0 for g in data["goals"]]
    crit.errorbar(goals, b_crit, yerr=err, fmt="o-", color="black", capsize=3, label="B_crit")
    with_simple = [(g["goal"], g["b_simple"]) for g in data["goals"] if g["b_simple"] is not None]
    if with_simple:
        crit.plot(*zip(*with_simple, strict=True), "s--", color="#D55E00", label="B_simple (D.1)")
    crit.set(xscale="log", yscale="log", xlabel=f"goal ({metric})", ylabel="batch size")
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
            f"<td>{_value_with_error(fit.s_min, fit.s_min_stderr)}</td>"
            f"<td>{_value_with_error(fit.e_min, fit.e_min_stderr)}</td>"
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


def _value_with_error(value: float, stderr: float) -> str:
    return f"{value:.3g} ± {stderr:.2g}"


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
            f"{g['b_crit']:.3g}</title></polyline>"
        )
        for p in g["points"]:
            body.append(
                f'<circle class="point" cx="{frame.x(p["steps"]):.2f}" '
                f'cy="{frame.y(p["examples"]):.2f}" r="4" fill="{g["color"]}">'
                f"<title>{html.escape(g['label'])}: B = {p['batch_size']:g}, "
                f"lr = {p['learning_rate']:g}, S = {p['steps']:.4g}, "
                f"E = {p['examples']:.4g}</title></circle>"
            )
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


def _b_crit_svg(data: dict[str, Any]) -> str:
    goals = data["goals"]
    lows = [g["b_crit"] - (g["b_crit_stderr"] or 0.0) for g in goals]
    ys = [g["b_crit"] for g in goals] + [g["b_simple"] for g in goals if g["b_simple"]]
    ys += [v for v in lows if v > 0]
    ys += [g["b_crit"] + (g["b_crit_stderr"] or 0.0) for g in goals]
    xs = [g["goal"] for g in goals]
    if min(xs) <= 0:
        return "<p>(B_crit per goal is drawn against a log axis, which needs positive goals.)</p>"
    frame = _LogFrame(xs, ys, width=420)
    # Training progresses towards lower goals: draw them left to right.
    frame.x_lo, frame.x_hi = frame.x_hi, frame.x_lo
    body = frame.axes(f"goal ({data['metric']}), decreasing", "batch size")
    line = " ".join(f"{frame.x(g['goal']):.1f},{frame.y(g['b_crit']):.1f}" for g in goals)
    body.append(f'<polyline fill="none" stroke="#222" stroke-width="1.2" points="{line}"/>')
    for g, low in zip(goals, lows, strict=True):
        px = frame.x(g["goal"])
        if g["b_crit_stderr"]:
            high = g["b_crit"] + g["b_crit_stderr"]
            y_low = frame.y(low) if low > 0 else frame.height - frame.bottom
            body.append(
                f'<line x1="{px:.1f}" y1="{y_low:.1f}" x2="{px:.1f}" y2="{frame.y(high):.1f}" '
                'stroke="#222"/>'
            )
        body.append(
            f'<circle class="b-crit" cx="{px:.2f}" cy="{frame.y(g["b_crit"]):.2f}" r="4" '
            f'fill="{g["color"]}"><title>goal {g["goal"]:.4g}: B_crit = {g["b_crit"]:.3g}'
            f"</title></circle>"
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
    body.append(f'<text x="{lx + 10}" y="{frame.top + 14}">B_crit ± standard error</text>')
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
