"""What measuring within each micro-batch costs in precision (docs/language_models.md).

A loss that divides each micro-batch's summed token loss by that micro-batch's own count
(``loss_reduction="token_mean"``, a Hugging Face model's own mean loss under accumulation) weighs
the micro-batches by weights that depend on the data, and the tracker then takes the big batch
within each micro-batch, losing the pairs of examples across micro-batches. This runs the same
draws from the test pool of ``tests/test_tokens.py`` (``_varying_pool``: a frozen linear model,
sequences of 1–8 tokens, truth known) with that loss and with the step's summed token loss divided
by the step's count (``"num_items_in_batch"``, every token alike), and prints the mean and the
spread of the per-step |G|² and tr Σ (per sequence) for the default source and for every example:

    python bench/token_mean_precision.py 2 4 1000     # micro-batches, sequences each, steps
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

import noisescale

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_tokens import _varying_pool


def main(k: int, b: int, steps: int) -> None:
    model, token_losses, mask, (g2_true, tr_true) = _varying_pool()
    print(f"{k} micro-batches of {b} sequences, {steps} steps; truth |G|² {g2_true:.1f}, "
          f"tr Σ {tr_true:.1f} (per sequence)")  # fmt: skip
    for reduction in ("token_mean", "num_items_in_batch"):
        for kwargs in ({}, {"per_example_fraction": 1.0}):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tracker = noisescale.GradientNoiseTracker(model, loss_reduction=reduction, **kwargs)
                gen = torch.Generator().manual_seed(1)
                for _ in range(steps):
                    draws = [torch.randint(0, len(mask), (b,), generator=gen) for _ in range(k)]
                    total = sum(mask[i].sum() for i in draws)
                    for idx in draws:
                        own = mask[idx].sum() * k
                        divisor = own if reduction == "token_mean" else total
                        (token_losses(idx).sum() / divisor).backward()
                        tracker.count_tokens(mask[idx])
                    tracker.step()
                    model.zero_grad()
                history = tracker.history
                tracker.remove()
            g2 = torch.tensor([r["g2"] * r["tokens_per_example"] ** 2 for r in history])
            tr = torch.tensor([r["trace_sigma"] * r["tokens_per_example"] for r in history])
            source = "every example" if kwargs else "default"
            print(f"{reduction:>18} {source:>13}: |G|² {g2.mean():7.1f} ± sd {g2.std():7.1f}   "
                  f"tr Σ {tr.mean():7.1f} ± sd {tr.std():7.1f}")  # fmt: skip


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:4]] or [2, 4, 1000]
    main(*args)
