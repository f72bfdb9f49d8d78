"""Where small-batch gradient norms come from: one protocol, one module per source.

* :mod:`~.subbatch` — k random sub-batches of each backward pass, measured inside it (default);
* :mod:`~.per_example` — every example, or an importance-weighted subset of them;
* :mod:`~.microbatch` — the backward passes of gradient accumulation;
* :mod:`~.distributed` — each process's local gradient against the averaged one (DDP, FSDP2),
  and the reduction that sums every source over the processes in one fixed-size all-reduce.

Each source turns a step's passes (:class:`~.base.StepNorms`) into an :class:`~.base.Observation`
— sums over its small batches — that :func:`noisescale.state.update` pairs with the big batch.
"""

from __future__ import annotations

from noisescale.sources.base import Observation, Source, StepNorms
from noisescale.sources.distributed import DataParallelSource, ReducedStep
from noisescale.sources.microbatch import MicroBatchSource
from noisescale.sources.per_example import PerExampleSource
from noisescale.sources.subbatch import SubbatchSource

__all__ = [
    "DataParallelSource",
    "MicroBatchSource",
    "Observation",
    "PerExampleSource",
    "ReducedStep",
    "Source",
    "StepNorms",
    "SubbatchSource",
]
