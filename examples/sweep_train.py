"""A small training function for ``noisescale sweep``: SGD on noisy linear regression (NumPy).

Run the grid, then fit the critical batch size::

    noisescale sweep examples/sweep_train.py:train --batch-sizes 4,16,64,256,1024 \\
        --learning-rates 0.1,0.2,0.4,0.8,1.6 --steps 1500 --study linreg
    noisescale fit sqlite:///sweep.db --study linreg -o pareto.html

The model: inputs x ~ N(0, Λ) with eigenvalues λ_k = 1/k, targets y = x·w* + σ·ε, squared
loss ½(x·w − y)². Each step draws a fresh batch, so the reported loss is the exact population
loss ½(δᵀΛδ + σ²) with δ = w − w*. The simple noise scale B_simple = tr Σ/|G|² (paper eq. 2.9)
is measured the way App. A.1 describes, from two batch sizes — one example and the whole batch
— with unbiased estimates of |G|² and tr Σ (eq. A.2) averaged by bias-corrected EMAs. As the
loss approaches the noise floor σ²/2 the gradient shrinks while its noise does not, so B_simple
and the critical batch size grow during training, as in the paper's Fig. 7.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Decay of the EMAs of |G|² and tr Σ whose ratio is B_simple.
B_SIMPLE_EMA = 0.95


def train(
    batch_size: int,
    learning_rate: float,
    reporter: Any,
    steps: int = 1500,
    dim: int = 32,
    noise: float = 0.5,
    seed: int = 0,
) -> None:
    """Train w by minibatch SGD and report the loss and B_simple after every step.

    Args:
        batch_size: examples per step.
        learning_rate: the SGD step size.
        reporter: ``noisescale sweep``'s reporter (anything with ``report(step, loss, ...)``).
        steps: optimizer steps.
        dim: input dimension.
        noise: σ, the standard deviation of the label noise.
        seed: the teacher w* and the data stream (each grid point gets its own stream).
    """
    eigenvalues = 1.0 / np.arange(1, dim + 1)
    scale = np.sqrt(eigenvalues)
    w_star = np.random.default_rng(seed).normal(size=dim)
    rng = np.random.default_rng([seed, batch_size, round(learning_rate * 1e9)])
    w = np.zeros(dim)
    g2_ema = trace_sigma_ema = 0.0
    for step in range(1, steps + 1):
        x = rng.normal(size=(batch_size, dim)) * scale
        y = x @ w_star + noise * rng.normal(size=batch_size)
        residual = x @ w - y
        grad = x.T @ residual / batch_size
        w -= learning_rate * grad
        delta = w - w_star
        loss = 0.5 * (delta @ (eigenvalues * delta) + noise**2)
        b_simple = None
        if batch_size > 1:
            # Eq. A.2 with B_small = 1 (per-example gradients r_i·x_i) and B_big = batch_size.
            small = float(np.mean(residual**2 * np.sum(x * x, axis=1)))
            big = float(grad @ grad)
            g2 = (batch_size * big - small) / (batch_size - 1)
            trace_sigma = (small - big) / (1.0 - 1.0 / batch_size)
            g2_ema = B_SIMPLE_EMA * g2_ema + (1 - B_SIMPLE_EMA) * g2
            trace_sigma_ema = B_SIMPLE_EMA * trace_sigma_ema + (1 - B_SIMPLE_EMA) * trace_sigma
            # Both EMAs have the same bias correction, which cancels in the ratio; a
            # non-positive |G|² estimate means "not measured yet".
            if g2_ema > 0:
                b_simple = trace_sigma_ema / g2_ema
        reporter.report(step, float(loss), b_simple=b_simple)
        if not np.isfinite(loss):
            return
