"""Splitting a batch that does not fit in memory into gradient-accumulation micro-batches.

Pure arithmetic: no torch. The rule (see :func:`accumulation_split`) prefers micro-batches of equal
size that divide the batch, because then a mean-reduced loss divided by the number of micro-batches
gives exactly the full batch's mean gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from noisescale.errors import NoiseScaleInputError


@dataclass(frozen=True)
class AccumulationSplit:
    """A batch of ``batch_size`` examples run as ``num_micro_batches`` forward/backward passes.

    The micro-batches are as equal as possible: ``batch_size % num_micro_batches`` of them hold
    one example more than the others. When :attr:`equal` is true they all hold
    :attr:`micro_batch_size` examples.

    Attributes:
        batch_size: Examples per optimizer step (on one device).
        num_micro_batches: Forward/backward passes per optimizer step.
    """

    batch_size: int
    num_micro_batches: int

    @property
    def micro_batch_size(self) -> int:
        """The largest micro-batch (examples); the one that must fit in memory."""
        return -(-self.batch_size // self.num_micro_batches)

    @property
    def equal(self) -> bool:
        """Whether every micro-batch holds the same number of examples."""
        return self.batch_size % self.num_micro_batches == 0

    def sizes(self) -> list[int]:
        """Examples in each micro-batch, largest first; they sum to ``batch_size``."""
        q, r = divmod(self.batch_size, self.num_micro_batches)
        return [q + 1] * r + [q] * (self.num_micro_batches - r)

    def loss_weights(self) -> list[float]:
        """Factor for each micro-batch's mean-reduced loss so that the gradients sum to the mean.

        Micro-batch i's loss is weighted by ``size_i / batch_size``; for equal micro-batches this is
        the usual ``1 / num_micro_batches``.
        """
        return [size / self.batch_size for size in self.sizes()]

    def __str__(self) -> str:
        if self.equal:
            return f"{self.micro_batch_size}×{self.num_micro_batches}"
        sizes = self.sizes()
        big = sizes.count(sizes[0])
        return f"{sizes[0]}×{big}+{sizes[-1]}×{len(sizes) - big}"


def accumulation_split(batch_size: int, max_micro_batch_size: int) -> AccumulationSplit:
    """The gradient-accumulation split of ``batch_size`` into micro-batches of at most a maximum.

    The fewest passes is k₀ = ⌈B / m⌉ for batch B and largest micro-batch m. Among k₀ ≤ k < 2·k₀
    the smallest k that divides B is taken, so that all micro-batches hold B/k examples; each extra
    pass costs one more fixed per-pass overhead, and 2·k₀ bounds that cost at less than twice the
    minimum. A power-of-two batch always has such a k (a power of two lies in [k₀, 2·k₀)). When no
    divisor lies in that range (e.g. a prime B > m), the batch is split into k₀ micro-batches whose
    sizes differ by one; weight each micro-batch's mean loss by its size / B
    (:meth:`AccumulationSplit.loss_weights`) to get the exact full-batch mean gradient.

    Args:
        batch_size: Examples per optimizer step on one device, B ≥ 1.
        max_micro_batch_size: The largest micro-batch that fits in memory, m ≥ 1.

    Returns:
        The split; ``num_micro_batches == 1`` when B ≤ m.
    """
    if batch_size < 1:
        raise NoiseScaleInputError(f"batch size must be at least 1, got {batch_size}")
    if max_micro_batch_size < 1:
        raise NoiseScaleInputError(
            f"the largest micro-batch must be at least 1, got {max_micro_batch_size}"
        )
    k0 = -(-batch_size // max_micro_batch_size)
    equal = [k for k in _divisors(batch_size) if k0 <= k < 2 * k0]
    return AccumulationSplit(batch_size, min(equal) if equal else k0)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in small]
