"""The interactive explorer page: one self-contained HTML file (inline SVG, vanilla JS, no network).

Enter a noise scale, slide the batch size (log scale) and read what that batch size costs: the
optimal learning rate relative to the noiseless one (eq. 2.6) on a log–log plot, the point on the
Pareto front of optimisation steps against examples (eq. 2.11), the three regimes shaded, and
readouts identical to ``noisescale calc``.

The readouts carry stable ids (``readout-batch-size``, ``readout-noise-scale``,
``readout-b-over-b-noise``, ``readout-regime``, ``readout-regime-words``, ``readout-lr-over-max``,
``readout-loss-improvement-over-max``, ``readout-steps-over-min``, ``readout-examples-over-min``,
``readout-summary``, ``readout-double-steps``, ``readout-double-examples``) and, except for the
texts, a ``data-value`` attribute with the unrounded number, so a browser test can compare them
with ``calc --json``. The inputs are ``input-noise-scale``, ``input-batch-size`` and the slider
``slider-batch-size`` (its value is log₂ B).
"""

from __future__ import annotations

import html
import json
import math

from noisescale.errors import NoiseScaleInputError
from noisescale.report.text import TEXT_JS
from noisescale.theory import REGIME_FACTOR

#: The slider spans batch sizes 1 … 2^SLIDER_MAX_LOG2 (about 1e9: enough for token batch sizes).
SLIDER_MAX_LOG2 = 30
#: Slider resolution in log₂ B; 0.001 is a 0.07% change, finer than integer rounding above ~1400.
SLIDER_STEP = 0.001


def explore_html(b_noise: float = 1000.0, batch_size: float | None = None) -> str:
    """The explorer page with ``b_noise`` and ``batch_size`` filled in.

    Args:
        b_noise: The initial noise scale B_noise (or B_simple), positive.
        batch_size: The initial batch size, at least 1 (rounded to an integer, as the slider is);
            default the noise scale rounded, brought into the slider's range [1, 2^30].

    Returns:
        The complete HTML document as a string.
    """
    if not (math.isfinite(b_noise) and b_noise > 0):
        raise NoiseScaleInputError(f"the noise scale must be a finite positive number: {b_noise!r}")
    if batch_size is None:
        # the slider's range holds every batch; a noise scale outside it starts at its end
        b = min(max(float(round(b_noise)), 1.0), 2.0**SLIDER_MAX_LOG2)
    else:
        b = float(batch_size)
    if not (math.isfinite(b) and 1 <= b <= 2.0**SLIDER_MAX_LOG2):
        raise NoiseScaleInputError(
            f"the batch size must lie between 1 and 2^{SLIDER_MAX_LOG2}, got {batch_size!r}"
        )
    initial = {
        "bNoise": b_noise,
        "batchSize": max(1, round(b)),
        "regimeFactor": REGIME_FACTOR,
        "sliderMax": SLIDER_MAX_LOG2,
    }
    return (
        _PAGE.replace("__INITIAL__", json.dumps(initial))
        .replace("__TEXT_JS__", TEXT_JS)
        .replace("__SCRIPT__", _SCRIPT)
        .replace("__NOISE__", html.escape(_plain(b_noise)))
        .replace("__SLIDER_MAX__", str(SLIDER_MAX_LOG2))
        .replace("__SLIDER_STEP__", str(SLIDER_STEP))
        .replace("__FACTOR__", f"{REGIME_FACTOR:g}")
    )


def _plain(x: float) -> str:
    """A number as a user would type it: ``2048`` rather than ``2048.0``, else exact."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>noisescale explorer: what a batch size costs</title>
<style>
  body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
         max-width: 1120px; margin: 1.2em auto; padding: 0 1em; }
  h1 { font-size: 1.45em; margin: 0 0 .2em; }
  p.lede { margin: 0 0 1em; color: #555; }
  .controls { display: flex; flex-wrap: wrap; gap: 1.2em; align-items: center;
              background: #f6f7f9; border: 1px solid #e1e4e8; border-radius: 6px;
              padding: .7em 1em; }
  .controls label { font-weight: 600; }
  .controls input[type=text] { width: 8em; font: inherit; padding: .15em .3em; }
  .controls input[type=range] { width: 22em; }
  #error { color: #b00020; font-weight: 600; min-height: 1.4em; margin: .3em 0; }
  .plots { display: flex; flex-wrap: wrap; gap: 1em; }
  figure { margin: 0; }
  figcaption { font-size: .9em; color: #444; max-width: 540px; }
  svg text { font: 12px system-ui, sans-serif; fill: #333; }
  svg .tick { stroke: #ccc; stroke-width: 1; }
  svg .curve { fill: none; stroke-width: 2.5; }
  svg .asymptote { fill: none; stroke: #777; stroke-dasharray: 4 4; stroke-width: 1; }
  table.readouts { border-collapse: collapse; margin-top: .6em; }
  table.readouts td, table.readouts th { padding: .2em .8em; border-bottom: 1px solid #eee;
                                          text-align: left; }
  table.readouts td.num { font-variant-numeric: tabular-nums; text-align: right;
                          font-weight: 600; }
  .regime-small { color: #2e7d32; } .regime-balanced { color: #9a6b00; }
  .regime-large { color: #c62828; }
  #readout-summary { font-weight: 600; margin: .6em 0 .2em; }
  .note { font-size: .88em; color: #555; }
</style>
</head>
<body>
<h1>Batch size explorer</h1>
<p class="lede">McCandlish et al. 2018, <i>An Empirical Model of Large-Batch Training</i>.
Enter your noise scale B<sub>noise</sub> (or B<sub>simple</sub>, as measured by noisescale)
and move the batch size to see what it costs in optimisation steps (time) and in training
examples (compute).</p>
<div class="controls">
  <span><label for="input-noise-scale">Noise scale B<sub>noise</sub></label>
  <input type="text" inputmode="decimal" id="input-noise-scale" value="__NOISE__"></span>
  <span><label for="slider-batch-size">Batch size B</label>
  <input type="range" id="slider-batch-size" min="0" max="__SLIDER_MAX__"
         step="__SLIDER_STEP__" value="0" aria-label="batch size, log scale">
  <input type="text" inputmode="decimal" id="input-batch-size" aria-label="batch size"></span>
</div>
<div id="error" role="alert"></div>
<div class="plots">
  <figure>
    <svg id="plot-lr" width="540" height="350" role="img"
         aria-label="optimal learning rate against batch size"></svg>
    <figcaption>Optimal step size relative to the noiseless one,
      ε<sub>opt</sub>/ε<sub>max</sub> = 1/(1 + B<sub>noise</sub>/B) (eq. 2.6; the loss
      decrease per step ΔL<sub>opt</sub>/ΔL<sub>max</sub> of eq. 2.7 is the same curve).
      Dashed: the linear-scaling asymptote B/B<sub>noise</sub> and the ceiling 1.</figcaption>
  </figure>
  <figure>
    <svg id="plot-pareto" width="540" height="350" role="img"
         aria-label="Pareto front of steps against examples"></svg>
    <figcaption>The Pareto front (S/S<sub>min</sub> − 1)(E/E<sub>min</sub> − 1) = 1
      (eq. 2.11): every batch size is one point on it. The grey dot is B = B<sub>noise</sub>,
      where both cost twice their minimum.</figcaption>
  </figure>
</div>
<p class="note">Shading: <span class="regime-small">small-batch regime</span>
  B &lt; B<sub>noise</sub>/__FACTOR__, <span class="regime-balanced">balanced</span> in between,
  <span class="regime-large">large-batch regime</span> B &gt; __FACTOR__·B<sub>noise</sub>.</p>
<div id="readout-summary"></div>
<table class="readouts">
  <tr><th>batch size B</th><td class="num" id="readout-batch-size"></td>
      <td>noise scale B<sub>noise</sub></td><td class="num" id="readout-noise-scale"></td></tr>
  <tr><th>B / B<sub>noise</sub></th><td class="num" id="readout-b-over-b-noise"></td>
      <td>regime</td><td class="num" id="readout-regime"></td></tr>
  <tr><th>optimal learning rate ε<sub>opt</sub>/ε<sub>max</sub></th>
      <td class="num" id="readout-lr-over-max"></td><td>eq. 2.6</td><td></td></tr>
  <tr><th>loss decrease per step ΔL<sub>opt</sub>/ΔL<sub>max</sub></th>
      <td class="num" id="readout-loss-improvement-over-max"></td><td>eq. 2.7</td><td></td></tr>
  <tr><th>time: optimisation steps S/S<sub>min</sub></th>
      <td class="num" id="readout-steps-over-min"></td><td>eq. 2.11</td><td></td></tr>
  <tr><th>compute: training examples E/E<sub>min</sub></th>
      <td class="num" id="readout-examples-over-min"></td><td>eq. 2.11</td><td></td></tr>
  <tr><th>doubling B: steps ×</th><td class="num" id="readout-double-steps"></td>
      <td>examples ×</td><td class="num" id="readout-double-examples"></td></tr>
</table>
<p id="readout-regime-words"></p>
<p class="note">Generated by <code>noisescale explore</code>. Works offline; nothing is sent
anywhere. The noise scale grows during training (and as 1/temperature, App. C), so measure it
on your run with noisescale and revisit the batch size as it grows.</p>
<script>
"use strict";
const INITIAL = __INITIAL__;
__TEXT_JS__
__SCRIPT__
</script>
</body>
</html>
"""

_SCRIPT = r"""
const FACTOR = INITIAL.regimeFactor;
const SVGNS = "http://www.w3.org/2000/svg";
const SHADE = {small: "#e3f1e3", balanced: "#fdf3cf", large: "#f9e0e0"};
const INK = {small: "#2e7d32", balanced: "#b8860b", large: "#c62828"};
const LABEL = {small: "B \u226a B_noise", balanced: "B \u2248 B_noise", large: "B \u226b B_noise"};

// The paper's formulas, written as in noisescale/theory.py so the numbers agree to the last bit.
function lrOverMax(b, n) { return 1.0 / (1.0 + n / b); }
function stepsOverMin(b, n) { return 1.0 + n / b; }
function examplesOverMin(b, n) { return 1.0 + b / n; }
function regime(b, n) {
  if (b * FACTOR < n) return "small";
  if (b > FACTOR * n) return "large";
  return "balanced";
}

function parsePositive(text) {
  const t = text.trim();
  if (t === "" || !/^[+]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i.test(t)) return NaN;
  const v = Number(t);
  return Number.isFinite(v) && v > 0 ? v : NaN;
}

function el(name, attrs, parent, text) {
  const node = document.createElementNS(SVGNS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function logAxis(d0, d1, r0, r1) {
  const l0 = Math.log10(d0), l1 = Math.log10(d1);
  const f = (v) => r0 + (Math.log10(v) - l0) / (l1 - l0) * (r1 - r0);
  f.domain = [d0, d1];
  return f;
}

function logTicks(d0, d1) {
  const span = Math.log10(d1) - Math.log10(d0);
  const mults = span <= 2.5 ? [1, 2, 5] : [1];
  const ticks = [];
  for (let k = Math.floor(Math.log10(d0)); k <= Math.ceil(Math.log10(d1)); k++) {
    for (const m of mults) {
      const v = m * Math.pow(10, k);
      if (v >= d0 * (1 - 1e-9) && v <= d1 * (1 + 1e-9)) ticks.push(v);
    }
  }
  return ticks;
}

function frame(svg, xdom, ydom, xlabel, ylabel) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = Number(svg.getAttribute("width")), H = Number(svg.getAttribute("height"));
  const box = {left: 62, right: W - 14, top: 14, bottom: H - 46};
  const x = logAxis(xdom[0], xdom[1], box.left, box.right);
  const y = logAxis(ydom[0], ydom[1], box.bottom, box.top);
  const clipId = svg.id + "-clip";
  const defs = el("defs", {}, svg);
  const clip = el("clipPath", {id: clipId}, defs);
  el("rect", {x: box.left, y: box.top, width: box.right - box.left,
              height: box.bottom - box.top}, clip);
  const shades = el("g", {"clip-path": "url(#" + clipId + ")"}, svg);
  const grid = el("g", {}, svg);
  for (const v of logTicks(xdom[0], xdom[1])) {
    el("line", {class: "tick", x1: x(v), x2: x(v), y1: box.top, y2: box.bottom}, grid);
    el("text", {x: x(v), y: box.bottom + 16, "text-anchor": "middle"}, grid, formatNumber(v));
  }
  for (const v of logTicks(ydom[0], ydom[1])) {
    el("line", {class: "tick", x1: box.left, x2: box.right, y1: y(v), y2: y(v)}, grid);
    el("text", {x: box.left - 6, y: y(v) + 4, "text-anchor": "end"}, grid, formatNumber(v));
  }
  el("rect", {x: box.left, y: box.top, width: box.right - box.left,
              height: box.bottom - box.top, fill: "none", stroke: "#555"}, svg);
  el("text", {x: (box.left + box.right) / 2, y: H - 8, "text-anchor": "middle"}, svg, xlabel);
  el("text", {x: 14, y: (box.top + box.bottom) / 2, "text-anchor": "middle",
              transform: "rotate(-90 14 " + (box.top + box.bottom) / 2 + ")"}, svg, ylabel);
  const plot = el("g", {"clip-path": "url(#" + clipId + ")"}, svg);
  return {x, y, box, shades, plot};
}

function shadeBands(f, edges) {
  // edges: [[regime, lo, hi], ...] in data units of the x axis.
  for (const [name, lo, hi] of edges) {
    const x0 = f.x(Math.max(lo, f.x.domain[0])), x1 = f.x(Math.min(hi, f.x.domain[1]));
    if (x1 <= x0) continue;
    el("rect", {x: x0, y: f.box.top, width: x1 - x0, height: f.box.bottom - f.box.top,
                fill: SHADE[name], class: "band-" + name}, f.shades);
    if (x1 - x0 > 72) {  // a label wider than its band would spill into the next one
      el("text", {x: (x0 + x1) / 2, y: f.box.top + 14, "text-anchor": "middle",
                  fill: INK[name]}, f.shades, LABEL[name]);
    }
  }
}

function path(points) {
  return points.map((p, i) => (i ? "L" : "M") + p[0].toFixed(2) + "," + p[1].toFixed(2)).join("");
}

function logspace(a, b, n) {
  const out = [];
  for (let i = 0; i < n; i++) out.push(Math.pow(10, a + (b - a) * i / (n - 1)));
  return out;
}

function drawLr(ratio, lr, name) {
  const xdom = [Math.min(1e-3, ratio / 3), Math.max(1e3, ratio * 3)];
  const ydom = [Math.min(5e-4, lr / 3), 2];
  const f = frame(document.getElementById("plot-lr"), xdom, ydom,
                  "B / B_noise", "\u03b5_opt / \u03b5_max");
  shadeBands(f, [["small", 0, 1 / FACTOR], ["balanced", 1 / FACTOR, FACTOR],
                 ["large", FACTOR, Infinity]]);
  const rs = logspace(Math.log10(xdom[0]), Math.log10(xdom[1]), 300);
  el("path", {class: "asymptote", d: path(rs.map((r) => [f.x(r), f.y(r)]))}, f.plot);
  el("path", {class: "asymptote", d: path([[f.x(xdom[0]), f.y(1)], [f.x(xdom[1]), f.y(1)]])},
     f.plot);
  el("path", {class: "curve", stroke: "#1f4e9c",
              d: path(rs.map((r) => [f.x(r), f.y(lrOverMax(r, 1))]))}, f.plot);
  el("circle", {id: "marker-lr", cx: f.x(ratio), cy: f.y(lr), r: 6.5, fill: INK[name],
                stroke: "#fff", "stroke-width": 2}, f.plot);
}

function drawPareto(e, s, name) {
  const dom = [1, Math.max(100, e * 1.5, s * 1.5)];
  const f = frame(document.getElementById("plot-pareto"), dom, dom,
                  "examples E / E_min (compute)", "steps S / S_min (time)");
  // On the front, E/E_min = 1 + B/B_noise, so the regime edges are vertical lines.
  shadeBands(f, [["small", 1, 1 + 1 / FACTOR], ["balanced", 1 + 1 / FACTOR, 1 + FACTOR],
                 ["large", 1 + FACTOR, Infinity]]);
  const rs = logspace(-6, 6, 600);
  for (const [nm, lo, hi] of [["small", 0, 1 / FACTOR], ["balanced", 1 / FACTOR, FACTOR],
                              ["large", FACTOR, Infinity]]) {
    // Include the band edges themselves so that the coloured segments join up.
    const inBand = rs.filter((r) => r > lo && r < hi);
    const rsBand = [...(lo > 0 ? [lo] : []), ...inBand, ...(Number.isFinite(hi) ? [hi] : [])];
    const pts = rsBand.map((r) => [f.x(examplesOverMin(r, 1)), f.y(stepsOverMin(r, 1))]);
    el("path", {class: "curve", stroke: INK[nm], d: path(pts)}, f.plot);
  }
  el("circle", {cx: f.x(2), cy: f.y(2), r: 4, fill: "#888"}, f.plot);
  el("text", {x: f.x(2) + 7, y: f.y(2) - 7}, f.plot, "B = B_noise");
  el("circle", {id: "marker-pareto", cx: f.x(e), cy: f.y(s), r: 6.5, fill: INK[name],
                stroke: "#fff", "stroke-width": 2}, f.plot);
}

function setReadout(id, value, text) {
  const node = document.getElementById(id);
  node.textContent = text;
  if (value === null) node.removeAttribute("data-value");
  else node.setAttribute("data-value", String(value));
}

const READOUT_IDS = ["batch-size", "noise-scale", "b-over-b-noise", "regime", "lr-over-max",
  "loss-improvement-over-max", "steps-over-min", "examples-over-min", "double-steps",
  "double-examples"];

function update() {
  const n = parsePositive(document.getElementById("input-noise-scale").value);
  const b = parsePositive(document.getElementById("input-batch-size").value);
  const problems = [];
  if (Number.isNaN(n)) problems.push("The noise scale must be a positive number.");
  if (Number.isNaN(b) || b < 1) problems.push("The batch size must be a number of at least 1.");
  document.getElementById("error").textContent = problems.join(" ");
  if (problems.length) {
    for (const id of READOUT_IDS) setReadout("readout-" + id, null, "\u2014");
    setReadout("readout-summary", null, "");
    setReadout("readout-regime-words", null, "");
    return;
  }
  const ratio = b / n, lr = lrOverMax(b, n), s = stepsOverMin(b, n), e = examplesOverMin(b, n);
  const name = regime(b, n);
  const dSteps = stepsOverMin(2 * b, n) / s, dExamples = examplesOverMin(2 * b, n) / e;
  setReadout("readout-batch-size", b, formatBatchSize(b));
  setReadout("readout-noise-scale", n, formatNumber(n));
  setReadout("readout-b-over-b-noise", ratio, formatNumber(ratio));
  setReadout("readout-regime", null, name);
  document.getElementById("readout-regime").className = "num regime-" + name;
  setReadout("readout-lr-over-max", lr, formatNumber(lr));
  setReadout("readout-loss-improvement-over-max", lr, formatNumber(lr));
  setReadout("readout-steps-over-min", s, formatNumber(s));
  setReadout("readout-examples-over-min", e, formatNumber(e));
  setReadout("readout-double-steps", dSteps, formatNumber(dSteps));
  setReadout("readout-double-examples", dExamples, formatNumber(dExamples));
  setReadout("readout-summary", null, summarySentence(b, s, e));
  const words = REGIME_WORDS[name];
  setReadout("readout-regime-words", null, words.charAt(0).toUpperCase() + words.slice(1) + ".");
  drawLr(ratio, lr, name);
  drawPareto(e, s, name);
}

const slider = document.getElementById("slider-batch-size");
const batchInput = document.getElementById("input-batch-size");
slider.addEventListener("input", () => {
  batchInput.value = String(Math.max(1, Math.round(Math.pow(2, Number(slider.value)))));
  update();
});
batchInput.addEventListener("input", () => {
  const b = parsePositive(batchInput.value);
  if (!Number.isNaN(b) && b >= 1) slider.value = String(Math.log2(b));
  update();
});
document.getElementById("input-noise-scale").addEventListener("input", update);
batchInput.value = String(INITIAL.batchSize);
slider.value = String(Math.log2(INITIAL.batchSize));
update();
"""
