"""How numbers and regimes are written, identically in Python and in the pages' JavaScript.

``format_number`` is Python's ``format(x, ".4g")``; :data:`TEXT_JS` defines JavaScript functions
``formatNumber``, ``formatBatchSize``, ``formatCount`` and ``summarySentence`` that produce the
same strings as their Python namesakes, so the pages read exactly like ``noisescale calc``. (The
number formats can differ only when a value lies exactly halfway between two 4-digit roundings:
Python rounds half to even, JavaScript half up.)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

SIGNIFICANT_DIGITS = 4

#: What each regime of :func:`noisescale.theory.regime` means (paper §2.2, "Implications").
REGIME_WORDS = {
    "small": "small-batch regime (B < B_noise/3): a bigger batch speeds training up almost "
    "linearly at little extra compute",
    "balanced": "balanced regime (B_noise/3 ≤ B ≤ 3·B_noise): near the critical batch size, "
    "where time and compute trade against each other",
    "large": "large-batch regime (B > 3·B_noise): a bigger batch barely cuts the step count and "
    "mostly wastes compute",
}


def format_number(x: float) -> str:
    """Four significant digits, trailing zeros dropped, exponent outside [1e-4, 1e4)."""
    return format(float(x), f".{SIGNIFICANT_DIGITS}g")


def format_batch_size(b: float) -> str:
    """A batch size as an integer when it is one (``4096``), else like :func:`format_number`."""
    return str(int(b)) if float(b).is_integer() and abs(b) < 1e15 else format_number(b)


def format_count(x: float) -> str:
    """A count of steps or examples, rounded, with thousands separators (``1,234,567``).

    Rounds halves up, as JavaScript's ``Math.round`` does (``round`` would round half to even).
    A count that is not known (nan: a history whose examples cannot be counted) is "unknown"
    (until a review of 2026-12-07 ``math.floor`` raised, and the page was not written). A count
    that is not zero but rounds to it is written like :func:`format_number` (``0.003637``): a run
    whose S_min was 0.0036 steps read "S_min = 0 steps" (a fuzzer, tests/fuzz_pages.py).
    """
    if not math.isfinite(x):
        return "unknown" if math.isnan(x) else "∞"
    if x != 0 and abs(x) < 0.5:
        return format_number(x)
    whole = math.floor(x)
    return f"{whole + (1 if x - whole >= 0.5 else 0):,}"


def display_path(path: str | os.PathLike[str]) -> str:
    """A path as a page title or heading shows it: relative to the current folder when inside
    it, else just the file name, so a page never carries the author's absolute paths."""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return p.name


def summary_sentence(batch_size: float, steps_over_min: float, examples_over_min: float) -> str:
    """The one-line verdict on a batch size (eq. 2.11), as ``calc`` and the explorer print it."""
    return (
        f"Training to a given loss at B = {format_batch_size(batch_size)} takes "
        f"{format_number(steps_over_min)}× the fewest possible steps and "
        f"{format_number(examples_over_min)}× the fewest possible examples."
    )


TEXT_JS = (
    "const REGIME_WORDS = "
    + json.dumps(REGIME_WORDS, ensure_ascii=False)
    + ";\n"
    + """
function formatNumber(x) {
  // Same output as Python's format(x, ".4g") (noisescale/report/text.py).
  if (Number.isNaN(x)) return "nan";
  if (!Number.isFinite(x)) return x > 0 ? "inf" : "-inf";
  if (x === 0) return Object.is(x, -0) ? "-0" : "0";
  const [mantissa, exponent] = x.toExponential(__P__ - 1).split("e");
  const e = Number(exponent);
  if (e < -4 || e >= __P__) {
    const m = mantissa.includes(".") ? mantissa.replace(/\\.?0+$/, "") : mantissa;
    return m + "e" + (e < 0 ? "-" : "+") + String(Math.abs(e)).padStart(2, "0");
  }
  let s = x.toFixed(Math.max(0, __P__ - 1 - e));
  if (s.includes(".")) s = s.replace(/0+$/, "").replace(/\\.$/, "");
  return s;
}
function formatBatchSize(b) {
  return Number.isInteger(b) && Math.abs(b) < 1e15 ? String(b) : formatNumber(b);
}
function formatCount(x) {
  if (x !== 0 && Math.abs(x) < 0.5) return formatNumber(x);
  return Math.round(x).toLocaleString("en-US");
}
function summarySentence(b, stepsOverMin, examplesOverMin) {
  return "Training to a given loss at B = " + formatBatchSize(b) + " takes " +
    formatNumber(stepsOverMin) + "\\u00d7 the fewest possible steps and " +
    formatNumber(examplesOverMin) + "\\u00d7 the fewest possible examples.";
}
""".replace("__P__", str(SIGNIFICANT_DIGITS))
)
