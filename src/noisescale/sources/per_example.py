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

    def __init__(self, unsplit_only: bool = False) -> None:
        #: sub-batch mode: only the passes the engine chose to measure per example (no weight
        #: used sub-batch products), not those too small to split
        self.unsplit_only = unsplit_only

    def observe(self, step: StepNorms) -> Observation | None:
        # a step of one example pairs with itself: eq. A.2 from sums leaves it out (B·H = W)
        if any(p.withheld for p in step.passes):
            # (a micro-batch's per-example norms withheld — its loss new to the audit, a lesson
            # an earlier one taught —: the step's per-example norms are left out whole, as the
            # warning says, and its micro-batch norms still count; until 2026-12-07 the other
            # micro-batches' norms were kept, the mean of a part of the step, 9% off the step's
            # own in the events fuzzer's seed 240)
            return None
        sums, groups, count = [], [], 0
        for j, p in enumerate(step.passes):
            if p.raw_sqnorms is None or p.subbatches is not None:
                continue
            if self.unsplit_only and not p.unsplit:
                continue
            sums.append(step.mean_grad_sq(p.raw_sqnorms, j, 1.0).sum())
            if p.group_sqnorms is not None:
                groups.append(step.mean_grad_sq(p.group_sqnorms, j, 1.0).sum(0))
            count += p.raw_sqnorms.numel()
        if not sums:
            return None
        return Observation(
            float(count),
            float(count),
            stack_sum(sums),
            stack_sum(groups) if len(groups) == len(sums) else None,
        )
