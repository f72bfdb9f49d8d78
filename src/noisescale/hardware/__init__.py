"""Hardware-aware batch size: what fits in memory, how fast it runs, what it costs.

The noise scale says how the steps and examples needed to reach a loss trade against the batch
size (McCandlish et al. 2018, eq. 2.11); the hardware says what a step costs. This package joins
them:

- :func:`find_max_batch_size`: the largest micro-batch a training step fits in memory, by an
  out-of-memory-safe search (double, then bisect); :func:`accumulation_split` splits a larger
  batch into micro-batches.
- :func:`profile_throughput`: step time against batch size; :class:`ThroughputProfile` holds the
  points, the fitted t(b) = α + β·b and the memory limit, and reads/writes versioned JSON.
- :func:`recommend_batch_size`: every (batch size, devices, accumulation) candidate priced in
  steps, examples, wall-clock time, GPU-hours and money; the Pareto front; the fastest, cheapest
  and balanced picks.

The accumulation, profile, recommendation and page modules import no torch; the memory search and
the timing do, and load on first use so that `noisescale recommend` starts without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from noisescale.hardware.accumulation import AccumulationSplit, accumulation_split
from noisescale.hardware.profile import (
    DEFAULT_INTERCONNECT,
    INTERCONNECTS,
    Interconnect,
    StepTimeFit,
    ThroughputPoint,
    ThroughputProfile,
    allreduce_time,
    fit_step_time,
)
from noisescale.hardware.recommend import (
    Candidate,
    Recommendation,
    default_batch_sizes,
    pareto_front,
    recommend_batch_size,
)

if TYPE_CHECKING:
    from noisescale.hardware.memory import (
        MaxBatchSize,
        find_max_batch_size,
        free_memory,
        is_out_of_memory,
        make_training_step,
    )
    from noisescale.hardware.timing import (
        describe_device,
        describe_model,
        profile_throughput,
        time_optimizer_update,
    )

__all__ = [
    "DEFAULT_INTERCONNECT",
    "INTERCONNECTS",
    "AccumulationSplit",
    "Candidate",
    "Interconnect",
    "MaxBatchSize",
    "Recommendation",
    "StepTimeFit",
    "ThroughputPoint",
    "ThroughputProfile",
    "accumulation_split",
    "allreduce_time",
    "default_batch_sizes",
    "describe_device",
    "describe_model",
    "find_max_batch_size",
    "fit_step_time",
    "free_memory",
    "is_out_of_memory",
    "make_training_step",
    "pareto_front",
    "profile_throughput",
    "recommend_batch_size",
    "time_optimizer_update",
]

_LAZY = {
    "MaxBatchSize": "noisescale.hardware.memory",
    "find_max_batch_size": "noisescale.hardware.memory",
    "free_memory": "noisescale.hardware.memory",
    "is_out_of_memory": "noisescale.hardware.memory",
    "make_training_step": "noisescale.hardware.memory",
    "describe_device": "noisescale.hardware.timing",
    "describe_model": "noisescale.hardware.timing",
    "profile_throughput": "noisescale.hardware.timing",
    "time_optimizer_update": "noisescale.hardware.timing",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'noisescale.hardware' has no attribute {name!r}")
