"""Gradient-accumulation micro-batches: each backward pass of a step is a small batch."""

from __future__ import annotations

from noisescale.sources.base import Observation, StepNorms, stack_sum

__all__ = ["MicroBatchSource"]


class MicroBatchSource:
    """The norm of each micro-batch's gradient (one per backward pass; no layer support needed).

    A step with one pass has none. The first pass's norm is read lazily from ``.grad`` when a
    second pass first touches a parameter (:class:`~noisescale.per_example.PerExampleNorms`).
    """

    name = "microbatch"

    def observe(self, step: StepNorms) -> Observation | None:
        if len(step.passes) < 2:
            return None
        sums, groups, count, inv = [], [], 0, 0.0
        for j, p in enumerate(step.passes):
            n = p.batch_size
            if p.grad_sqnorm is None or n == 0:
                continue
            sums.append(step.mean_grad_sq(p.grad_sqnorm.reshape(()), j, float(n)))
            if p.group_grad_sqnorm is not None:
                groups.append(step.mean_grad_sq(p.group_grad_sqnorm, j, float(n)))
            count += 1
            inv += 1.0 / n
        if not sums:
            return None
        return Observation(
            float(count),
            inv,
            stack_sum(sums),
            stack_sum(groups) if len(groups) == len(sums) else None,
        )
