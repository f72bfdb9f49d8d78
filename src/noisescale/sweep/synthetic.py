"""Synthetic training runs whose Pareto fronts follow eq. 2.11 exactly (paper App. D.1).

The model of App. D.1: training is parametrised by full-batch steps s; at batch size B each
optimizer step advances s by ds = B/(B + B_noise(s)). With a noise scale that grows linearly,
B_noise(s) = b_noise_start + b_noise_slope·s, the steps to reach progress s are closed-form,

    t(s) = (1 + b_noise_start/B)·s + b_noise_slope·s²/(2B),

so for any goal reached at progress s_g: S = S_min + E_min/B with S_min = s_g and
E_min = ∫B_noise ds = b_noise_start·s_g + b_noise_slope·s_g²/2, i.e. eq. 2.11 holds exactly
with B_crit = b_noise_start + b_noise_slope·s_g/2, the noise scale averaged over full-batch
steps. The metric falls as a power law in s, loss(s) = loss_start/(1 + s/s_scale).

Used to test :mod:`noisescale.sweep.pareto` against known answers and to try ``noisescale fit``
without training anything. Pure NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from noisescale.sweep.runs import Run


@dataclass(frozen=True)
class SyntheticModel:
    """The D.1 model with a linearly growing noise scale and a power-law loss.

    Attributes:
        b_noise_start: B_noise at the start of training (examples).
        b_noise_slope: growth of B_noise per full-batch step.
        loss_start: the loss at s = 0.
        s_scale: full-batch steps over which the loss halves the first time.
    """

    b_noise_start: float = 20.0
    b_noise_slope: float = 1.0
    loss_start: float = 1.0
    s_scale: float = 50.0

    def progress(self, steps: ArrayLike, batch_size: float) -> np.ndarray:
        """Full-batch steps s made after ``steps`` optimizer steps at ``batch_size`` (eq. D.1)."""
        t = np.asarray(steps, dtype=float)
        a = self.b_noise_slope / (2.0 * batch_size)
        b = 1.0 + self.b_noise_start / batch_size
        if a == 0.0:
            return t / b
        # The positive root of a·s² + b·s − t = 0, written to avoid cancellation.
        return 2.0 * t / (b + np.sqrt(b * b + 4.0 * a * t))

    def metric(self, progress: ArrayLike) -> np.ndarray:
        """The loss after full-batch progress s."""
        return self.loss_start / (1.0 + np.asarray(progress, dtype=float) / self.s_scale)

    def b_noise(self, progress: ArrayLike) -> np.ndarray:
        """The noise scale B_noise after full-batch progress s."""
        return self.b_noise_start + self.b_noise_slope * np.asarray(progress, dtype=float)

    def s_min(self, goal: float) -> float:
        """S_min: full-batch steps to reach ``goal``."""
        return self.s_scale * (self.loss_start / goal - 1.0)

    def e_min(self, goal: float) -> float:
        """E_min = ∫B_noise ds up to the goal (eq. D.1)."""
        s = self.s_min(goal)
        return self.b_noise_start * s + 0.5 * self.b_noise_slope * s * s

    def b_crit(self, goal: float) -> float:
        """B_crit = E_min/S_min (eq. 2.12): B_noise averaged over full-batch steps."""
        return self.e_min(goal) / self.s_min(goal)

    def steps_to_goal(self, goal: float, batch_size: ArrayLike) -> np.ndarray | float:
        """Optimizer steps to ``goal`` at ``batch_size``: S_min + E_min/B (eq. 2.11)."""
        s = self.s_min(goal) + self.e_min(goal) / np.asarray(batch_size, dtype=float)
        return float(s) if np.ndim(s) == 0 else s

    def runs(
        self,
        batch_sizes: Sequence[float],
        learning_rates: Sequence[float] = (1.0,),
        *,
        steps: int,
        slowdown: Mapping[float, float] | None = None,
        noise: float = 0.0,
        metric_noise: float = 0.0,
        every: int = 1,
        seed: int = 0,
    ) -> list[Run]:
        """A grid of runs, one per (batch size, learning rate), recorded every ``every`` steps.

        Args:
            batch_sizes: the grid's batch sizes.
            learning_rates: the grid's learning rates (labels; their effect is ``slowdown``).
            steps: optimizer steps per run.
            slowdown: learning rate → factor ≥ 1 by which that learning rate needs more steps
                (1 for the best); all 1 when ``None``.
            noise: σ of the run-to-run log-normal noise in steps to any goal: each run's clock
                runs exp(σ·z) times slower, z ~ N(0, 1).
            metric_noise: σ of independent log-normal noise on each recorded metric value
                (what the EMA is for).
            every: record one point every ``every`` steps.
            seed: seed of the noise.

        Returns:
            Runs named ``b{B}_lr{lr}`` with ``b_simple`` set to the exact B_noise.
        """
        rng = np.random.default_rng(seed)
        step = np.arange(every, steps + 1, every, dtype=float)
        runs = []
        for b in batch_sizes:
            for lr in learning_rates:
                factor = (slowdown or {}).get(lr, 1.0) * math.exp(noise * rng.standard_normal())
                s = self.progress(step / factor, b)
                loss = self.metric(s)
                if metric_noise:
                    loss = loss * np.exp(metric_noise * rng.standard_normal(step.size))
                runs.append(
                    Run.from_arrays(f"b{b:g}_lr{lr:g}", b, lr, step, loss, b_simple=self.b_noise(s))
                )
        return runs
