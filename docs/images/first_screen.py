"""Draw the README's first picture from a ``make demo`` history: docs/images/noise_scale.png.

Left: the demo's B_simple with its interval against the step, and the batch size it trained
with. Right: what a batch size costs at the noise scale the demo ended with (paper eq. 2.11):
steps S/S_min = 1 + B_noise/B and examples E/E_min = 1 + B/B_noise.

    make demo && python docs/images/first_screen.py runs/demo/history.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from noisescale import theory
from noisescale.report.data import b_simple_vs_step, load_history

OUT = Path(__file__).with_name("noise_scale.png")


def draw(history_path: Path, out: Path) -> None:
    history = load_history(history_path)
    series = b_simple_vs_step(history)
    b_noise = float(series.b_simple[-1])
    batch = float(history.b_big[-1])

    fig = Figure(figsize=(11.0, 3.9), layout="constrained")
    left, right = fig.subplots(1, 2)
    ok = np.isfinite(series.low) & np.isfinite(series.high)
    left.fill_between(
        series.x[ok], series.low[ok], series.high[ok], color="C0", alpha=0.2, lw=0,
        label="95% interval",
    )  # fmt: skip
    left.plot(series.x, series.b_simple, color="C0", lw=1.6, label="noise scale B_simple")
    left.axhline(batch, color="0.3", ls="--", lw=1.2, label=f"batch size used ({batch:g})")
    left.set(yscale="log", ylim=(20, 3000), xlabel="training step", ylabel="examples")
    left.set_title("make demo: the noise scale grows as the MNIST CNN learns")
    left.legend(loc="upper left", fontsize=8)
    left.grid(True, alpha=0.3)

    b = np.logspace(np.log10(b_noise) - 2.2, np.log10(b_noise) + 2.2, 400)
    right.plot(b, theory.steps_over_min(b, b_noise), color="C3", lw=1.8, label="steps S / S_min")
    right.plot(
        b, theory.examples_over_min(b, b_noise), color="C2", lw=1.8, label="examples E / E_min"
    )
    right.axvline(b_noise, color="0.3", ls=":", lw=1.2)
    right.axvspan(b[0], b_noise / 3, color="C3", alpha=0.07)
    right.axvspan(3 * b_noise, b[-1], color="C2", alpha=0.07)
    right.text(b_noise / 20, 25, "below it: doubling B\nhalves the steps", ha="center", fontsize=9)
    right.text(
        b_noise * 20, 25, "above it: doubling B\ndoubles the examples", ha="center", fontsize=9
    )
    right.text(b_noise * 1.15, 1.15, f"B = B_noise ≈ {b_noise:.0f}", fontsize=9)
    right.set(
        xscale="log",
        yscale="log",
        ylim=(1, 200),
        xlabel="batch size B (examples)",
        ylabel="cost relative to its minimum",
    )
    right.set_title(f"What a batch size costs at B_noise = {b_noise:.0f} (eq. 2.11)")
    right.legend(loc="upper center", fontsize=8)
    right.grid(True, alpha=0.3)
    fig.savefig(out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("history", type=Path, help="runs/demo/history.jsonl from make demo")
    parser.add_argument("-o", "--output", type=Path, default=OUT, help=f"default {OUT}")
    args = parser.parse_args()
    draw(args.history, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
