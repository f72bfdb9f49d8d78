"""The protocol every small-batch source follows.

A step's backward passes (:class:`~noisescale.per_example.PassNorms`) carry raw squared norms:
norms of the gradient of the *backpropagated* loss restricted to some examples, times the AMP loss
scale. :class:`StepNorms` knows how each pass weighted its examples (c: 1/(k·N) for a mean loss
over k micro-batches of N examples, 1 for a sum) and turns a raw norm into the squared norm of a
*mean* gradient — the one normalisation every source shares (when the loss weighs tokens, c is
the weight of each token of the pass, measured on the device: :mod:`noisescale.tokens`). A
:class:`Source` reads the passes
and returns an :class:`Observation`: sums over its small batches, which add up across processes
and feed the paper's eq. A.2 (:func:`noisescale.estimators.g2_trace_from_sums`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from noisescale.per_example import PassNorms

__all__ = ["Observation", "Source", "StepNorms"]

Number = float | Tensor  # a host number, or a 0-d device tensor read with the statistics


@dataclass
class StepNorms:
    """One step's passes and their normalisation.

    Attributes:
        passes: The step's backward passes, in order.
        coef: c_j, the weight of one example of pass j in the backpropagated loss (a device
            tensor when measured).
        scale: The AMP loss scale in the hooks' gradients (1 without a scaler).
    """

    passes: list[PassNorms]
    coef: list[Number]
    scale: float
    #: the weights come from counts of the passes' own data (each pass's tokens), so that they
    #: may differ by the data drawn (:meth:`weights_vary`); not where they are fixed by the
    #: passes' sizes (a mean over examples, its multiplier measured)
    data_weights: bool = False
    #: each pass's weights are its own mean over its labelled examples (a classifier's, one
    #: label each): where every label counts, a mean over the pass's examples, whose weight the
    #: loop fixes by the pass's size — so they vary with the data only where a label was left
    #: out, and :meth:`pass_weights` gives each pass's whole weight, c·n
    size_weighted: bool = False

    def __post_init__(self) -> None:
        """A pass whose examples count no token weighs 1/0 = inf (a token mean over none): its
        gradient is 0 under any weight, so it takes the other passes' mean weight (on the
        device) — neither a false spread of the weights nor an infinite Σc. (Until 2026-12-07
        its weight, inf, made the weights differ: the rest of the run measured within its
        micro-batches, b_big halved, or refused under per_example=False; a review.) Where
        every pass counts no token the weights are kept: the step is left out (state.update)."""
        if len(self.passes) < 2 or not self.data_weighted:
            return
        w = self.pass_weights()
        finite = torch.isfinite(w)
        common = torch.where(finite, w, 0.0).sum() / finite.sum().clamp(min=1)
        w = torch.where(finite | ~finite.any(), w, common)
        kept = iter(range(len(w)))
        coef = list(self.coef)
        for j, p in enumerate(self.passes):
            if p.batch_size > 0:
                c = w[next(kept)]
                coef[j] = c / p.batch_size if self.size_weighted else c
        self.coef = coef

    @property
    def sizes(self) -> list[int]:
        return [p.batch_size for p in self.passes]

    @property
    def sum_c(self) -> Number:
        """Σ c over the step's examples."""
        return sum(n * c for n, c in zip(self.sizes, self.coef, strict=True))

    @property
    def sum_c2(self) -> Number:
        return sum(n * c * c for n, c in zip(self.sizes, self.coef, strict=True))

    @property
    def b_big(self) -> Number:
        """The big batch's effective size (Σc)²/Σc²: the step's examples when they weigh alike."""
        c2 = self.sum_c2
        if isinstance(c2, Tensor):
            return self.sum_c**2 / c2
        return self.sum_c**2 / c2 if c2 > 0 else 0.0

    def mean_grad_sq(self, raw: Tensor, j: int, n: Number) -> Tensor:
        """|mean gradient of n examples of pass j|² from a raw squared norm of their sum.

        Divided twice, not by the square: (S·c·n)² overflows float32 once S·c·n reaches 2⁶⁴
        (a loss scale of 2⁵⁸ on a summed loss of 64 examples, under the tracker's guard of
        2⁶³), and a float32 norm divided by inf read |G_big|² = 0 without a word until
        2026-12-07 (the precision fuzzer)."""
        d = self.scale * self.coef[j] * n
        return raw / d / d

    def weights_vary(self) -> Tensor | None:
        """Whether the passes weigh their examples differently by weights that depend on the
        data (a 0-d bool on the device, no host read), or ``None`` where they cannot: one pass,
        or weights fixed by the declaration (host numbers).

        A loss that divides each micro-batch's summed token loss by that micro-batch's own count
        (``loss_reduction="token_mean"``, a Hugging Face model's own mean loss, each process's
        own mean under data parallelism) weighs the micro-batches by 1/(their count): the step's
        gradient Σ_m c_m·X_m is then no big batch for eq. A.2, whose unbiasedness needs weights
        fixed before the examples are drawn (:meth:`within_passes`)."""
        if len(self.passes) < 2 or not self.data_weighted:
            return None
        c = self.pass_weights()
        # (every pass of no token, their weights inf, __post_init__: equal, the step left out)
        spread = weights_spread(float(len(c)), c.sum(), (c * c).sum())
        return spread & torch.isfinite(c).any()

    @property
    def data_weighted(self) -> bool:
        """The weights come from the passes' own counts and were measured on the device, so
        they may differ by the data drawn (:meth:`weights_vary`; under data parallelism,
        across processes)."""
        return self.data_weights and any(isinstance(c, Tensor) for c in self.coef)

    def pass_weights(self) -> Tensor:
        """The weights of the passes that hold examples, stacked on the device (float64): an
        example's, or with :attr:`size_weighted` the whole pass's."""
        device = next(c for c in self.coef if isinstance(c, Tensor)).device
        kept = [
            c * p.batch_size if self.size_weighted else c
            for c, p in zip(self.coef, self.passes, strict=True)
            if p.batch_size > 0
        ]
        return torch.stack(
            [torch.as_tensor(c, dtype=torch.float64, device=device).reshape(()) for c in kept]
        )

    def within_passes(self) -> tuple[Tensor, Tensor | None, float] | None:
        """The big batch taken within each pass: (S, group S, b) with S = Σ_m (b_m/B)·|X̄_m|²,
        X̄_m pass m's mean gradient (its norm divided by its own weight, which is known exactly),
        and b = B/k, so that E S = |G|² + tr Σ·Σ_m (b_m/B)/b_m = |G|² + tr Σ/b — eq. A.2's big
        batch with weights that do not depend on the data. Each pass's small batches then meet
        their own pass's examples only: unbiased where the step's gradient, weighted by the
        data, is not, at the price of the pairs of examples across passes. ``None`` where a
        pass's gradient norm is missing."""
        parts, groups, examples, k = [], [], 0, 0
        for j, p in enumerate(self.passes):
            n = p.batch_size
            if n == 0:
                continue
            if p.grad_sqnorm is None:
                return None
            parts.append(self.mean_grad_sq(p.grad_sqnorm.reshape(()), j, float(n)) * n)
            if p.group_grad_sqnorm is not None:
                groups.append(self.mean_grad_sq(p.group_grad_sqnorm, j, float(n)) * n)
            examples += n
            k += 1
        if not parts:
            return None
        group = torch.stack(groups).sum(0) / examples if len(groups) == len(parts) else None
        return torch.stack(parts).sum() / examples, group, examples / k


#: relative variance of the passes' weights above which they are taken to differ: float64
#: rounding of Σc and Σc² over n passes stays under 2n·2⁻⁵³ of it (2·10⁻¹¹ at 50,000 passes
#: over all processes); counts that differ by 1 in 30,000 are still told apart
VARYING = 1e-10


def weights_spread(n: Any, sum_c: Any, sum_c2: Any) -> Any:
    """Whether weights whose number, sum and sum of squares are given differ (their variance
    over their mean² above :data:`VARYING`) — one test for a single process and for the
    all-reduced sums of every process, so that both decide alike. A pass that counts no token
    weighs 1/0 = inf (its mean nan, its gradient 0) and is no part of them: within a process it
    takes the other passes' weight (:class:`StepNorms`), and across processes only the finite
    weights are summed and counted (:func:`~noisescale.sources.distributed.weights_vary`), so
    that a process of no token does not make them differ. (A nan spread still reads as weights
    that differ; until 2026-12-07 a whole process of no token made it nan: the rest of the run
    measured within its passes, or refused — a review.)"""
    spread = n * sum_c2 - sum_c * sum_c
    return (spread > VARYING * sum_c * sum_c) | (spread != spread)


@dataclass
class Observation:
    """A source's small batches in one step, as sums (device tensors where they are norms).

    Attributes:
        count: W, the number of small batches.
        inv_size_sum: Σ 1/b_r over their sizes.
        sqnorm_sum: Σ S_r of their mean gradients' squared norms (0-d tensor).
        group_sqnorm_sum: The same split by parameter group ([groups]) or ``None``.
    """

    count: float
    inv_size_sum: float
    sqnorm_sum: Tensor
    group_sqnorm_sum: Tensor | None = None


class Source(Protocol):
    """Where small-batch norms come from (per-example, sub-batches, micro-batches, processes)."""

    name: str

    def observe(self, step: StepNorms) -> Observation | None:
        """This step's small batches, or ``None`` when the source has none."""
        ...


def stack_sum(parts: list[Tensor]) -> Tensor:
    """Σ of 0-d tensors (or of rows), in one kernel."""
    return torch.stack(parts).sum(0)
