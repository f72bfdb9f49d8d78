"""Sub-batches: each pass's examples split into k random sub-batches inside its one backward.

Paired with the big batch, sub-batch norms cancel each example's own |g_i|² exactly (the |G|²
estimate is the mean of g_i·g_i' over pairs in different sub-batches), so they are nearly as
precise as every example's norm and far more precise than a per-example subset late in training;
see :mod:`noisescale.per_example.subbatch` for how the engine gets them at the cost of the
gradient itself.
"""

from __future__ import annotations

from noisescale.sources.base import Observation, StepNorms, stack_sum

__all__ = ["SubbatchSource"]


class SubbatchSource:
    name = "subbatch"

    def observe(self, step: StepNorms) -> Observation | None:
        sums, groups, count, inv = [], [], 0, 0.0
        for j, p in enumerate(step.passes):
            if p.raw_sqnorms is None or p.subbatches is None:
                continue
            sizes = p.subbatches.sizes
            n = p.subbatches.sizes_tensor(p.raw_sqnorms)
            sums.append(step.mean_grad_sq(p.raw_sqnorms, j, n).sum())
            if p.group_sqnorms is not None:
                groups.append(step.mean_grad_sq(p.group_sqnorms, j, n[:, None]).sum(0))
            count += len(sizes)
            inv += sum(1.0 / s for s in sizes)
        if not sums:
            return None
        return Observation(
            float(count),
            inv,
            stack_sum(sums),
            stack_sum(groups) if len(groups) == len(sums) else None,
        )
