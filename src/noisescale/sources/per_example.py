"""Per-example norms as small batches of one (all examples, or an importance-weighted subset)."""

from __future__ import annotations

from noisescale.sources.base import Observation, StepNorms, stack_sum

__all__ = ["PerExampleSource"]


class PerExampleSource:
    """Each measured example is a small batch of size 1.

    With a subset, the engine has already weighted each drawn row by 1/(n·q_i) (importance
    weights, :meth:`~noisescale.per_example.PerExampleNorms._rows`), so their mean is unbiased for
    the mean of |g_i|² over the pass.
    """

    name = "per_example"

    def observe(self, step: StepNorms) -> Observation | None:
        # a step of one example pairs with itself: eq. A.2 from sums leaves it out (B·H = W)
        sums, groups, count = [], [], 0
        for j, p in enumerate(step.passes):
            if p.raw_sqnorms is None or p.subbatches is not None:
                continue
            sums.append(step.mean_grad_sq(p.raw_sqnorms, j, 1.0).sum())
            if p.group_sqnorms is not None:
                groups.append(step.mean_grad_sq(p.group_sqnorms, j, 1.0).sum(0))
            count += p.raw_sqnorms.numel()
        if not sums or sum(p.batch_size for p in step.passes) <= 1:
            return None  # (one example in the whole step: its norm is the big batch's)
        return Observation(
            float(count),
            float(count),
            stack_sum(sums),
            stack_sum(groups) if len(groups) == len(sums) else None,
        )
