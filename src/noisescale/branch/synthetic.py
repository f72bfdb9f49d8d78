"""Branches whose loss-against-examples curves follow eq. 2.11 with a known critical batch size.

The model is that of :class:`noisescale.sweep.synthetic.SyntheticModel` (paper App. D.1): a run
is parametrised by full-batch steps s, a step at batch size B advances s by B/(B + B_noise(s)),
and B_noise(s) = b_noise_start + b_noise_slope·s. The main run trains at ``base_batch_size``;
its checkpoint after e₀ examples sits at progress s₀ = progress(e₀/B₀, B₀). A branch at batch B
from s₀ then reaches, after t steps, the u = s − s₀ that solves

    u·(1 + B_noise(s₀)/B) + b_noise_slope·u²/(2B) = t,

and a branch at B_ref needs E_ref(u) = u·(B_ref + B_noise(s₀)) + b_noise_slope·u²/2 examples
for the same progress. So the efficiency of B against B_ref after Δ examples is known in closed
form (:meth:`SyntheticBranchModel.efficiency`), and with a constant noise scale
(``b_noise_slope = 0``) it is exactly (B_ref + B_noise)/(B + B_noise): eq. 2.11 with
B_crit = B_noise.

The learning rate matters only if ``lr_sensitivity`` > 0: the clock then runs slower by
1 + k·ln(ε/ε_opt)², with ε_opt(B) = ε_max/(1 + B_noise(s₀)/B) (eq. 2.6), so a grid of learning
rates has a known best one. ``clock_noise`` makes each branch's clock run exp(σ·z) times slower
(a data order that happens to help or hurt), ``loss_noise`` multiplies each reported loss by
exp(σ·z). Pure NumPy; used by the tests and by ``examples/branch_train.py``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from noisescale.errors import NoiseScaleInputError
from noisescale.sweep.synthetic import SyntheticModel


@dataclass(frozen=True)
class SyntheticBranchModel:
    """Branched training in the App. D.1 model (module docstring).

    Attributes:
        model: B_noise(s) and the loss curve.
        base_batch_size: B₀ of the main run the checkpoints come from.
        lr_max: ε_max of eq. 2.6 (only with ``lr_sensitivity`` > 0).
        lr_sensitivity: k of the learning-rate slowdown 1 + k·ln(ε/ε_opt)².
        clock_noise: σ of each branch's log-normal clock factor.
        loss_noise: σ of each reported loss's log-normal factor.
        report_every: Report the loss every this many steps (and at the last).
    """

    model: SyntheticModel = field(default_factory=SyntheticModel)
    base_batch_size: float = 8.0
    lr_max: float = 1.0
    lr_sensitivity: float = 0.0
    clock_noise: float = 0.0
    loss_noise: float = 0.0
    report_every: int = 1

    def progress_at(self, checkpoint: float) -> float:
        """s₀: the main run's full-batch progress after ``checkpoint`` examples."""
        b0 = self.base_batch_size
        return float(self.model.progress(checkpoint / b0, b0))

    def b_noise_at(self, checkpoint: float) -> float:
        """B_noise at the checkpoint."""
        return float(self.model.b_noise(self.progress_at(checkpoint)))

    def branch_progress(self, s0: float, batch_size: float, steps: Any) -> np.ndarray:
        """u = s − s₀ after ``steps`` (continuous) optimizer steps at ``batch_size`` from s₀."""
        t = np.asarray(steps, dtype=float)
        b = float(batch_size)
        a = self.model.b_noise_slope / (2.0 * b)
        lin = 1.0 + float(self.model.b_noise(s0)) / b
        if a == 0.0:
            return t / lin
        return 2.0 * t / (lin + np.sqrt(lin * lin + 4.0 * a * t))

    def reference_examples(self, s0: float, reference_batch_size: float, u: Any) -> np.ndarray:
        """Examples a branch at ``reference_batch_size`` needs from s₀ to progress u."""
        u = np.asarray(u, dtype=float)
        bn0 = float(self.model.b_noise(s0))
        return u * (reference_batch_size + bn0) + 0.5 * self.model.b_noise_slope * u * u

    def efficiency(
        self, checkpoint: float, budget: float, batch_size: float, reference_batch_size: float
    ) -> float:
        """η_B: the fraction of ``budget`` the reference needs for B's progress after ``budget``
        examples, at the tuned learning rate and without noise (closed form, capped at 1)."""
        s0 = self.progress_at(checkpoint)
        u = self.branch_progress(s0, batch_size, budget / batch_size)
        return float(min(1.0, self.reference_examples(s0, reference_batch_size, u) / budget))

    def optimal_lr(self, checkpoint: float, batch_size: float) -> float:
        """ε_opt(B) = ε_max/(1 + B_noise(s₀)/B) (eq. 2.6)."""
        return self.lr_max / (1.0 + self.b_noise_at(checkpoint) / batch_size)

    def train(
        self,
        *,
        batch_size: int,
        learning_rate: float,
        reporter: Any,
        checkpoint: float,
        budget: float,
        seed: int = 0,
    ) -> None:
        """A branch in the ``noisescale branch`` convention: report the loss after each step.

        Trains ⌈budget/batch_size⌉ steps from the checkpoint and calls
        ``reporter.report(step, loss, examples=step·batch_size)``, starting with step 0 (the
        checkpoint's own loss).
        """
        if batch_size < 1 or budget <= 0 or learning_rate <= 0 or checkpoint < 0:
            raise NoiseScaleInputError(
                "a synthetic branch needs a positive batch size, budget and learning rate and a "
                "checkpoint ≥ 0"
            )
        key = f"{seed}|{batch_size}|{checkpoint:.12g}|{learning_rate:.12g}".encode()
        rng = np.random.default_rng(zlib.crc32(key))
        slow = math.exp(self.clock_noise * rng.standard_normal())
        if self.lr_sensitivity:
            off = math.log(learning_rate / self.optimal_lr(checkpoint, batch_size))
            slow *= 1.0 + self.lr_sensitivity * off * off
        s0 = self.progress_at(checkpoint)
        steps = math.ceil(budget / batch_size)
        record = [t for t in range(steps + 1) if t % self.report_every == 0 or t == steps]
        t = np.asarray(record, dtype=float)
        loss = self.model.metric(s0 + self.branch_progress(s0, batch_size, t / slow))
        if self.loss_noise:
            loss = loss * np.exp(self.loss_noise * rng.standard_normal(t.size))
        for step, value in zip(record, loss.tolist(), strict=True):
            reporter.report(step, value, examples=float(step * batch_size))
