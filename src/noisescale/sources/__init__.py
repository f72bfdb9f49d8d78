"""Where the small- and big-batch gradient norms come from, beyond one process's backward passes.

The per-example hooks and the accumulation micro-batches live in :mod:`noisescale.per_example`
and the tracker; this package adds the data-parallel source of the paper's App. A.1: each
process's local gradient before averaging (B_small = local batch) against the averaged global
gradient (B_big = global batch), for ``DistributedDataParallel`` and FSDP2 (``fully_shard``).
"""

from __future__ import annotations

from noisescale.sources.distributed import DataParallelSource, ReducedStep, ResolvedStep

__all__ = ["DataParallelSource", "ReducedStep", "ResolvedStep"]
