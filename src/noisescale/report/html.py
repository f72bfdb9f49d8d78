"""The run report page: one self-contained HTML file (PNG figures inlined as base64, no network).

Besides the figures and tables, the page has a small calculator: type a batch size and it shows
what that fixed batch size would have cost over this run's trajectory, and what an adaptive
schedule with the same number of examples would have needed (eq. D.1, D.4), computed in the page
from S_min, E_min and γ. Its elements have stable ids: ``report-input-batch-size``,
``report-readout-steps``, ``report-readout-examples``, ``report-readout-adaptive-steps``,
``report-readout-saved`` (each readout with a ``data-value``), and ``report-error``.
"""

from __future__ import annotations

import base64
import html
import json
import re

from noisescale import theory
from noisescale.report.data import ReportData, Trend, group_shares
from noisescale.report.figures import FIGURE_NAMES
from noisescale.report.text import (
    TEXT_JS,
    display_path,
    format_batch_size,
    format_count,
    format_number,
)

_CAPTIONS = {
    "b_simple_vs_step": "B<sub>simple</sub> = tr Σ / |G|² (ratio of the EMAs, eq. 2.9) with its "
    "confidence interval, the batch size this run used, and the adaptive schedule "
    "B = √(r·B<sub>simple</sub>) (eq. D.6) at the natural exchange rate r = E<sub>min</sub>/"
    "S<sub>min</sub>.",
    "b_simple_vs_loss": "B<sub>simple</sub> against the training loss. __TREND__",
    "ema": "The bias-corrected moving averages of the unbiased per-step estimates of |G|² and "
    "tr Σ (App. A.1). On this log scale, the gap between the two curves is log B<sub>simple</sub>.",
    "temperature": "The temperature T = lr/B (App. C). The noise scale grows as 1/T, so a "
    "learning-rate decay shows up as a jump in B<sub>simple</sub>.",
    "cost": "Steps and examples needed to make this run's progress, relative to their minima "
    "along the trajectory: fixed batch sizes lie on the hyperbola of eq. 2.11, an adaptive "
    "schedule on the lower front of eq. D.4.",
}

_REGIME_NAMES = {"small": "small-batch", "balanced": "balanced", "large": "large-batch"}

_TITLES = {
    "b_simple_vs_step": "Noise scale during training",
    "b_simple_vs_loss": "Noise scale against loss",
    "ema": "Gradient signal and noise",
    "temperature": "Temperature",
    "cost": "What other batch sizes would have cost",
}


def in_other_unit(unit: str, b: float, tokens_per_example: float) -> str:
    """`` — 93 sequences of 13.2 tokens`` (or ``… tokens at …``): B_simple in the other unit,
    where the run counted tokens; empty otherwise."""
    t = tokens_per_example
    if not (t == t and t > 0 and b == b):
        return ""
    if unit == "tokens":
        return f" — {format_number(b / t)} sequences of {t:.3g} tokens on average"
    return f" — {format_number(b * t)} tokens at {t:.3g} tokens per example"


def report_html(data: ReportData, figures: dict[str, bytes], figures_dir: str | None = None) -> str:
    """The complete report page.

    Args:
        data: The numbers, from :func:`noisescale.report.data.report_data`.
        figures: PNG bytes per name in :data:`~noisescale.report.figures.FIGURE_NAMES`.
        figures_dir: Where the PNG copies were written, to mention on the page (optional).
    """
    run = data.run
    adaptive = data.adaptive
    bs = data.b_simple_step
    e = html.escape
    unit = data.history.unit  # what B_simple, batch sizes and E count: examples or tokens
    sections = []
    for name in FIGURE_NAMES:
        encoded = base64.b64encode(figures[name]).decode("ascii")
        caption = _CAPTIONS[name].replace("__TREND__", trend_sentence(data.trend))
        sections.append(
            f'<figure id="figure-{name}"><h3>{_TITLES[name]}</h3>'
            f'<img alt="{e(_TITLES[name])}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    last_low, last_high = bs.low[-1], bs.high[-1]
    interval = (
        f" (interval {format_number(last_low)}–{format_number(last_high)})"
        if _finite(last_low) and _finite(last_high)
        else ""
    )
    confidence = data.history.header.get("confidence")
    run_batch = (
        f"a fixed batch size of {format_batch_size(run.batch_size)}"
        if run.batch_size is not None
        else "a varying batch size"
    )
    final_regime = (
        f" Against the final B<sub>simple</sub>, that is the "
        f"{_REGIME_NAMES[theory.regime(run.batch_size, float(bs.b_simple[-1]))]} regime."
        if run.batch_size is not None
        else ""
    )
    predicted = (
        f" At {format_batch_size(run.batch_size)}, the model predicts "
        f"{format_count(run.predicted_steps)} steps for this progress; the run took "
        f"{format_count(run.steps)}"
        + (
            f", {run.idle_steps:,} of them without an optimizer step (skipped for non-finite "
            "gradients: their batches spent, no progress made)"
            if run.idle_steps
            else ""
        )
        + "."
        if run.predicted_steps is not None
        else ""
    )
    saved = 1.0 - adaptive.same_examples_steps / run.steps
    trapezoid = (
        f"; {f'{adaptive.examples_used:,.1f}'.removesuffix('.0')} as eq. D.1's trapezoid over "
        "the steps counts "
        "them, half of the first and the last step's batch"
        if adaptive.examples_used != run.examples and _finite(adaptive.examples_used)
        else ""
    )
    same_examples = (
        f"<b>{format_count(adaptive.same_examples_steps)}</b> steps instead of "
        f"{format_count(run.steps)} ({100 * saved:.1f}% fewer; r = "
        f"{format_number(adaptive.r_same_examples)})"
        if _finite(adaptive.same_examples_steps)
        else f"— not computed: {e(adaptive.same_examples_note)}"
    )
    summary = (
        f"<p>{data.history.step.size:,} steps recorded; B<sub>simple</sub> is available at "
        f"{bs.x.size:,} of them, from step {run.first_step:,} to {run.last_step:,}. "
        f"It went from {format_number(bs.b_simple[0])} to "
        f"<b>{format_number(bs.b_simple[-1])}</b> {unit}{interval}"
        + (f" at {100 * confidence:g}% confidence" if isinstance(confidence, float) else "")
        + in_other_unit(
            unit, float(bs.b_simple[-1]), data.history.tokens_per_example_at(bs.step[-1])
        )
        + f". The run used {run_batch}.{final_regime}</p>"
        f"<p>Averaged over the trajectory (App. D), the critical batch size is "
        f"B<sub>crit</sub> = E<sub>min</sub>/S<sub>min</sub> = <b>{format_number(run.b_crit)}</b>: "
        f"the run's progress needs at least S<sub>min</sub> = {format_count(run.s_min)} steps "
        f"(infinitely large batches) and at least E<sub>min</sub> = {format_count(run.e_min)} "
        f"{unit} (tiny batches).{predicted}</p>"
        f"<p>An adaptive batch size B = √(r·B<sub>simple</sub>) (eq. D.6) has γ = "
        f"<b>{adaptive.gamma:.3f}</b> on this trajectory (eq. D.5; 1 means no gain). With as many "
        f"{unit} as this run used ({format_count(run.examples)}{trapezoid}), it would have "
        "needed "
        f"{same_examples}. At the natural exchange rate r = "
        f"E<sub>min</sub>/S<sub>min</sub> it takes {format_count(adaptive.natural_steps)} steps "
        f"and {format_count(adaptive.natural_examples)} {unit}, both 1 + √γ = "
        f"{format_number(1 + adaptive.gamma**0.5)} times their minimum.</p>"
    )
    warnings = "".join(f"<li>{e(w)}</li>" for w in data.warnings)
    warnings_html = f'<ul class="warnings">{warnings}</ul>' if warnings else ""
    rows = "".join(
        "<tr"
        + (' class="this-run"' if run.batch_size == row.batch_size else "")
        + f"><td>{format_batch_size(row.batch_size)}</td>"
        f"<td>{format_count(row.steps)}</td><td>{format_count(row.examples)}</td>"
        f"<td>{format_number(row.steps_over_min)}</td>"
        f"<td>{format_number(row.examples_over_min)}</td>"
        + (
            f"<td>{format_count(row.adaptive_steps_same_examples)} "
            f"({_percent_less(row.adaptive_steps_same_examples, row.steps)})</td>"
            if _finite(row.adaptive_steps_same_examples)
            else "<td>—</td>"
        )
        + f"<td>{format_count(row.adaptive_examples_same_steps)} "
        f"({_percent_less(row.adaptive_examples_same_steps, row.examples)})</td></tr>"
        for row in data.costs
    )
    figures_note = (
        f"<p class=note>PNG copies of the figures: <code>{e(display_path(figures_dir))}</code>.</p>"
        if figures_dir
        else ""
    )
    page_data = {"sMin": run.s_min, "eMin": run.e_min, "gamma": adaptive.gamma}
    default_batch = run.batch_size if run.batch_size is not None else data.costs[0].batch_size
    # One pass over the template: a value is never searched for place-holders, so a history or
    # group named "__DATA__" is shown as named (chained str.replace put the page's JSON there).
    values = {
        "TITLE": e(display_path(data.history.path)),
        "SUMMARY": summary,
        "WARNINGS": warnings_html,
        "FIGURES": "\n".join(sections),
        "ROWS": rows,
        "FIRST": f"{run.first_step:,}",
        "LAST": f"{run.last_step:,}",
        "DEFAULT_BATCH": e(format_batch_size(default_batch)),
        "FIGURES_NOTE": figures_note,
        "GROUPS": _groups_section(data),
        "TEXT_JS": TEXT_JS,
        "DATA": json.dumps(page_data),
        "UNIT": unit,
    }
    return re.sub("__(" + "|".join(values) + ")__", lambda m: values[m.group(1)], _PAGE)


def _groups_section(data: ReportData) -> str:
    """B_simple per parameter group at the last record (``groups=``), or nothing."""
    groups = data.history.groups
    if not groups:
        return ""
    e = html.escape
    unit = data.history.unit
    step = int(data.history.step[-1])

    def cell(x: float, percent: bool = False) -> str:
        if not _finite(x):
            return "<td>—</td>"
        return f"<td>{format_number(100 * x)}%</td>" if percent else f"<td>{format_number(x)}</td>"

    rows = "".join(
        f"<tr><td class=name>{e(g.name)}</td>{cell(g.b_simple)}"
        + (
            f"<td>{format_number(g.low)}–{format_number(g.high)}</td>"
            if _finite(g.low) and _finite(g.high)
            else "<td>—</td>"
        )
        + f"{cell(tr, True)}{cell(g2, True)}</tr>"
        for g, (tr, g2) in zip(groups, group_shares(groups), strict=True)
    )
    return (
        "<h2>B<sub>simple</sub> per parameter group</h2>"
        f"<p>At the last record (step {step:,}), in {unit}: each group's own "
        "B<sub>simple</sub> = tr Σ/|G|² of its parameters' gradient, and its share of the "
        "whole model's averaged tr Σ and |G|² (the groups add up to the whole). A group whose "
        "|G|² estimate is not positive, its noise swamping it so far, has no B<sub>simple</sub> "
        "(—).</p>"
        '<table class="costs"><tr><th>group</th><th>B<sub>simple</sub></th><th>interval</th>'
        "<th>share of tr Σ</th><th>share of |G|²</th></tr>"
        f"{rows}</table>"
    )


def trend_sentence(trend: Trend) -> str:
    """What the B_simple-against-loss figure shows for this run, read from its data."""
    moved = (
        f"In this run B<sub>simple</sub> {trend.direction} (from about "
        f"{format_number(trend.b_simple_start)} to {format_number(trend.b_simple_end)}"
    )
    if trend.loss_start is not None and trend.loss_end is not None:
        moved += (
            f" while the loss went from {format_number(trend.loss_start)} to "
            f"{format_number(trend.loss_end)}"
        )
    moved += ", medians over the first and last tenth of the estimated steps)."
    falling = (
        trend.loss_start is not None
        and trend.loss_end is not None
        and trend.loss_end < trend.loss_start
    )
    if trend.direction == "grew" and falling:
        return moved + (
            " As in the paper (§2.5), the noise scale grew as the loss fell, so the batch size "
            "worth using grew too."
        )
    if trend.direction == "grew":
        return moved
    return moved + (
        " The paper's runs show B<sub>simple</sub> growing as the loss falls; check the "
        "interval and whether the run is long enough before reading a trend into this one."
    )


def _percent_less(new: float, old: float) -> str:
    return f"−{100 * (1 - new / old):.1f}%"


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>noisescale report: __TITLE__</title>
<style>
  body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
         max-width: 1000px; margin: 1.2em auto; padding: 0 1em; }
  h1 { font-size: 1.4em; margin-bottom: .2em; }
  h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
  h3 { font-size: 1em; margin: 1em 0 .3em; }
  figure { margin: 0 0 1.2em; }
  figure img { max-width: 100%; border: 1px solid #eee; }
  figcaption, .note { font-size: .9em; color: #555; }
  table.costs { border-collapse: collapse; font-variant-numeric: tabular-nums; }
  table.costs th, table.costs td { padding: .25em .7em; border-bottom: 1px solid #eee;
                                   text-align: right; }
  table.costs td.name { text-align: left; }
  table.costs tr.this-run td { background: #fff6d6; font-weight: 600; }
  .warnings { color: #8a5a00; }
  .calc { background: #f6f7f9; border: 1px solid #e1e4e8; border-radius: 6px;
          padding: .6em 1em; }
  .calc input { width: 8em; font: inherit; }
  .calc span.num { font-weight: 600; font-variant-numeric: tabular-nums; }
  #report-error { color: #b00020; font-weight: 600; }
</style>
</head>
<body>
<h1>noisescale run report</h1>
<p class="note">History: <code>__TITLE__</code>. McCandlish et al. 2018, <i>An Empirical Model
of Large-Batch Training</i>.</p>
__WARNINGS__
<h2>Summary</h2>
__SUMMARY__
<h2>What a batch size would have cost</h2>
<p>To make the progress this run made from step __FIRST__ to __LAST__ (eq. D.1 along the measured
trajectory, B<sub>simple</sub> standing in for B<sub>noise</sub>):</p>
<table class="costs">
<tr><th>batch size (__UNIT__)</th><th>steps</th><th>__UNIT__</th><th>S/S<sub>min</sub></th>
<th>E/E<sub>min</sub></th><th>adaptive: steps at same __UNIT__</th>
<th>adaptive: __UNIT__ at same steps</th></tr>
__ROWS__
</table>
<div class="calc">
  <label for="report-input-batch-size">Any fixed batch size:</label>
  <input type="text" inputmode="decimal" id="report-input-batch-size"
         value="__DEFAULT_BATCH__">
  → <span class="num" id="report-readout-steps"></span> steps,
  <span class="num" id="report-readout-examples"></span> __UNIT__; an adaptive schedule with
  as many __UNIT__: <span class="num" id="report-readout-adaptive-steps"></span> steps
  (<span class="num" id="report-readout-saved"></span>% fewer).
  <div id="report-error" role="alert"></div>
</div>
__GROUPS__
<h2>Figures</h2>
__FIGURES__
__FIGURES_NOTE__
<h2>How to read this</h2>
<ul class="note">
<li>B<sub>simple</sub> = tr Σ/|G|² (eq. 2.9) is measured at the run's own temperature T = lr/B;
it predicts the critical batch size to within a small factor (paper §3). A run at another batch
size with a well-tuned learning rate sits at about the same temperature (App. C), which is why
the costs above reuse this run's trajectory.</li>
<li>Steps and examples above count the progress between the first and last step with an
estimate; the early steps before the estimate settles are not included.</li>
<li>γ (eq. D.5) measures how much the noise scale varied: the more it grows during training,
the more an adaptive batch size saves. Constant noise scale: γ = 1, no saving.</li>
</ul>
<p class="note">Generated by <code>noisescale report</code>; works offline.</p>
<script>
"use strict";
const DATA = __DATA__;
__TEXT_JS__
function parsePositive(text) {
  const t = text.trim();
  if (t === "" || !/^[+]?(\\d+\\.?\\d*|\\.\\d+)(e[+-]?\\d+)?$/i.test(t)) return NaN;
  const v = Number(t);
  return Number.isFinite(v) && v > 0 ? v : NaN;
}
function show(id, value, text) {
  const node = document.getElementById(id);
  node.textContent = text;
  if (value === null) node.removeAttribute("data-value");
  else node.setAttribute("data-value", String(value));
}
function updateCost() {
  const b = parsePositive(document.getElementById("report-input-batch-size").value);
  const ids = ["report-readout-steps", "report-readout-examples",
               "report-readout-adaptive-steps", "report-readout-saved"];
  if (Number.isNaN(b)) {
    document.getElementById("report-error").textContent =
      "The batch size must be a positive number.";
    for (const id of ids) show(id, null, "\\u2014");
    return;
  }
  document.getElementById("report-error").textContent = "";
  // Eq. D.1 at a fixed B: S = S_min + E_min/B, E = B·S; adaptive at equal E: eq. D.4.
  const steps = DATA.sMin + DATA.eMin / b;
  const examples = b * steps;
  const adaptiveSteps = DATA.sMin + DATA.gamma * DATA.eMin / b;
  const saved = 100 * (1 - adaptiveSteps / steps);
  show("report-readout-steps", steps, formatCount(steps));
  show("report-readout-examples", examples, formatCount(examples));
  show("report-readout-adaptive-steps", adaptiveSteps, formatCount(adaptiveSteps));
  show("report-readout-saved", saved, saved.toFixed(1));
}
document.getElementById("report-input-batch-size").addEventListener("input", updateCost);
updateCost();
</script>
</body>
</html>
"""
