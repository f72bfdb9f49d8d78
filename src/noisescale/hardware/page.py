"""A self-contained HTML page for a recommendation: the time/cost Pareto front as inline SVG.

No JavaScript, no external files: the page works offline from ``file://``. Hovering a point shows
its numbers through SVG ``<title>`` elements.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable

from noisescale.hardware.profile import ThroughputProfile
from noisescale.hardware.recommend import Candidate, Recommendation

_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_WIDTH, _HEIGHT = 760, 460
_LEFT, _RIGHT, _TOP, _BOTTOM = 80, 150, 20, 60


def _axis_values(
    rec: Recommendation,
) -> tuple[str, str, Callable[[Candidate], float], Callable[[Candidate], float]]:
    """Axis labels and the (time, cost) value of a candidate as plotted."""
    if rec.relative:
        return (
            "time / fastest time",
            "cost / cheapest cost",
            lambda c: c.time_rel,
            lambda c: c.cost_rel,
        )
    if rec.price_per_gpu_hour is not None:
        return (
            "wall-clock time (hours)",
            f"cost ({rec.currency or 'price units'})",
            lambda c: (c.time_s or 0.0) / 3600.0,
            lambda c: c.cost or 0.0,
        )
    return (
        "wall-clock time (hours)",
        rec.hours_unit.replace("-h", "-hours"),
        lambda c: (c.time_s or 0.0) / 3600.0,
        lambda c: c.gpu_hours or 0.0,
    )


def recommendation_html(rec: Recommendation, profile: ThroughputProfile) -> str:
    """The whole page: recommended points, Pareto-front plot and table, assumptions."""
    model = html.escape(str(profile.model.get("name", "model")))
    device = html.escape(str(profile.device.get("name") or profile.device.get("type", "")))
    cards = "".join(
        _card(label, c, rec)
        for label, c in (
            ("fastest", rec.fastest),
            ("balanced", rec.balanced),
            ("cheapest", rec.cheapest),
        )
    )
    rows = "".join(_row(c, rec) for c in rec.pareto_front)
    assumptions = "".join(f"<li>{html.escape(a)}</li>" for a in rec.assumptions)
    target = (
        "relative mode (no target given)"
        if rec.relative
        else f"S<sub>min</sub> = {rec.s_min:.4g} steps, E<sub>min</sub> = {rec.e_min:.4g} examples"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>noisescale recommend: B_noise = {rec.b_noise:g}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 960px; color: #222; }}
h1 {{ font-size: 1.4em; }}
.cards {{ display: flex; gap: 1em; margin: 1em 0; }}
.card {{ border: 1px solid #ccc; border-radius: 6px; padding: 0.6em 1em; flex: 1; }}
.card h2 {{ font-size: 1.05em; margin: 0 0 0.3em 0; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f4f4f4; }}
.note {{ color: #555; font-size: 0.9em; }}
svg text {{ font-family: system-ui, sans-serif; }}
</style></head><body>
<h1>Batch size for B<sub>noise</sub> = {rec.b_noise:g} examples: {model} on {device}</h1>
<p class="note">{target}. Steps S = S<sub>min</sub>(1 + B<sub>noise</sub>/B), examples
E = E<sub>min</sub>(1 + B/B<sub>noise</sub>) (McCandlish et al. 2018, eq. 2.11); time = S × step
time from the measured profile; balanced = least time × cost.</p>
<div class="cards">{cards}</div>
{pareto_svg(rec)}
<h2>Pareto front</h2>
<table><thead><tr><th>B</th><th>devices</th><th>micro-batch × k</th><th>S/S<sub>min</sub></th>
<th>E/E<sub>min</sub></th><th>step time (ms)</th><th>time</th><th>cost</th><th></th></tr></thead>
<tbody>{rows}</tbody></table>
<h2>Assumptions</h2>
<ul>{assumptions}</ul>
</body></html>
"""


def pareto_svg(rec: Recommendation) -> str:
    """Log-log scatter of every candidate's time against cost, the front, the three picks."""
    x_label, y_label, fx, fy = _axis_values(rec)
    xs = [fx(c) for c in rec.candidates]
    ys = [fy(c) for c in rec.candidates]
    x_lo, x_hi = _log_range(xs)
    y_lo, y_hi = _log_range(ys)
    plot_w = _WIDTH - _LEFT - _RIGHT
    plot_h = _HEIGHT - _TOP - _BOTTOM

    def px(v: float) -> float:
        return _LEFT + (math.log10(v) - x_lo) / (x_hi - x_lo) * plot_w

    def py(v: float) -> float:
        return _TOP + plot_h - (math.log10(v) - y_lo) / (y_hi - y_lo) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" aria-label="time/cost Pareto front">',
        f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#999"/>',
    ]
    for value in _log_ticks(x_lo, x_hi):
        x = px(value)
        parts.append(
            f'<line x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{_TOP + plot_h}" stroke="#eee"/>'
            f'<text x="{x:.1f}" y="{_TOP + plot_h + 16}" font-size="11" '
            f'text-anchor="middle">{value:g}</text>'
        )
    for value in _log_ticks(y_lo, y_hi):
        y = py(value)
        parts.append(
            f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_LEFT + plot_w}" y2="{y:.1f}" stroke="#eee"/>'
            f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" font-size="11" '
            f'text-anchor="end">{value:g}</text>'
        )
    parts.append(
        f'<text x="{_LEFT + plot_w / 2:.1f}" y="{_HEIGHT - 18}" font-size="13" '
        f'text-anchor="middle">{html.escape(x_label)}</text>'
        f'<text x="18" y="{_TOP + plot_h / 2:.1f}" font-size="13" text-anchor="middle" '
        f'transform="rotate(-90 18 {_TOP + plot_h / 2:.1f})">{html.escape(y_label)}</text>'
    )
    front = " ".join(f"{px(fx(c)):.1f},{py(fy(c)):.1f}" for c in rec.pareto_front)
    parts.append(
        f'<polyline points="{front}" fill="none" stroke="#444" stroke-width="1.5" '
        'stroke-dasharray="5,3"/>'
    )
    device_counts = sorted({c.devices for c in rec.candidates})
    colour = {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(device_counts)}
    for c in rec.candidates:
        parts.append(
            f'<circle cx="{px(fx(c)):.1f}" cy="{py(fy(c)):.1f}" r="{4 if c.pareto else 3}" '
            f'fill="{colour[c.devices]}" fill-opacity="{0.9 if c.pareto else 0.35}">'
            f"<title>{html.escape(_describe(c))}</title></circle>"
        )
    labels: dict[tuple[int, int], list[str]] = {}
    for label, c in (
        ("fastest", rec.fastest),
        ("balanced", rec.balanced),
        ("cheapest", rec.cheapest),
    ):
        labels.setdefault((c.batch_size, c.devices), []).append(label)
    picks = {(c.batch_size, c.devices): c for c in (rec.fastest, rec.balanced, rec.cheapest)}
    for key, names in labels.items():
        c = picks[key]
        x, y = px(fx(c)), py(fy(c))
        text = f"{', '.join(names)}: B={c.batch_size}, N={c.devices}"
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="8" fill="none" stroke="#000" '
            f'stroke-width="2"/><text x="{x + 11:.1f}" y="{y - 9:.1f}" font-size="12" '
            f'font-weight="bold">{html.escape(text)}</text>'
        )
    for i, n in enumerate(device_counts):
        y = _TOP + 14 + 18 * i
        x = _LEFT + plot_w + 16
        parts.append(
            f'<circle cx="{x}" cy="{y}" r="5" fill="{colour[n]}"/>'
            f'<text x="{x + 10}" y="{y + 4}" font-size="12">{n} device{"s" * (n > 1)}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _describe(c: Candidate) -> str:
    return (
        f"B={c.batch_size}, N={c.devices}, micro-batch {c.split}, S/Smin={c.steps_over_min:.3g}, "
        f"E/Emin={c.examples_over_min:.3g}, step {c.step_time_s * 1e3:.3g} ms, "
        f"time ×{c.time_rel:.3g}, cost ×{c.cost_rel:.3g}"
    )


def _time_text(c: Candidate, rec: Recommendation) -> str:
    if rec.relative or c.time_s is None:
        return f"×{c.time_rel:.3g}"
    return f"{c.time_s / 3600:.3g} h"


def _cost_text(c: Candidate, rec: Recommendation) -> str:
    if rec.relative or c.gpu_hours is None:
        return f"×{c.cost_rel:.3g}"
    hours = f"{c.gpu_hours:.3g} {rec.hours_unit}"
    if c.cost is not None:
        return f"{html.escape(rec.money(c.cost))} ({hours})"
    return hours


def _card(label: str, c: Candidate, rec: Recommendation) -> str:
    return (
        f'<div class="card"><h2>{label}</h2>B = {c.batch_size} on {c.devices} '
        f"device{'s' * (c.devices > 1)}<br>micro-batch {c.split} per device<br>"
        f"time {_time_text(c, rec)}<br>cost {_cost_text(c, rec)}</div>"
    )


def _row(c: Candidate, rec: Recommendation) -> str:
    marks = [
        name
        for name, pick in (
            ("fastest", rec.fastest),
            ("balanced", rec.balanced),
            ("cheapest", rec.cheapest),
        )
        if pick is c
    ]
    return (
        f"<tr><td>{c.batch_size}</td><td>{c.devices}</td><td>{c.split}</td>"
        f"<td>{c.steps_over_min:.3g}</td><td>{c.examples_over_min:.3g}</td>"
        f"<td>{c.step_time_s * 1e3:.4g}</td><td>{_time_text(c, rec)}</td>"
        f"<td>{_cost_text(c, rec)}</td><td>{', '.join(marks)}</td></tr>"
    )


def _log_range(values: list[float]) -> tuple[float, float]:
    logs = [math.log10(v) for v in values if v > 0]
    lo, hi = min(logs), max(logs)
    pad = max(0.05 * (hi - lo), 0.05)
    return lo - pad, hi + pad


def _log_ticks(lo: float, hi: float) -> list[float]:
    # Decades only when the axis spans several; 1-2-5 steps when it spans little.
    mantissas = (1.0,) if hi - lo > 2.5 else (1.0, 2.0, 5.0)
    ticks = []
    for exponent in range(math.floor(lo), math.ceil(hi) + 1):
        for m in mantissas:
            v = m * 10.0**exponent
            if lo <= math.log10(v) <= hi:
                ticks.append(float(f"{v:.6g}"))
    return ticks
