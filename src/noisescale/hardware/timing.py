"""Measuring step time against batch size, and describing what was measured.

Timing follows the usual rules for GPU benchmarks (nanoGPT, llm.c): warm-up steps first (cuDNN
autotuning, allocator growth, lazy initialisation), ``torch.cuda.synchronize()`` before starting and
before stopping the clock (kernels run asynchronously), several timed repeats, and the median.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from noisescale.errors import NoiseScaleInputError
from noisescale.hardware.memory import (
    StepFn,
    _clear_grads,
    _is_whole,
    _preserved_state,
    free_memory,
    is_out_of_memory,
)
from noisescale.hardware.profile import ThroughputPoint


def profile_throughput(
    step_fn: StepFn,
    batch_sizes: Iterable[int],
    *,
    warmup: int = 2,
    repeats: int = 5,
    device: torch.device | str = "cpu",
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    timer: Callable[[], float] = time.perf_counter,
    on_out_of_memory: Callable[[int], object] | None = None,
) -> list[ThroughputPoint]:
    """Time ``repeats`` training steps at each batch size, after ``warmup`` untimed ones.

    Batch sizes run in ascending order; the first that runs out of memory ends the sweep (larger
    ones would too), so the result may hold fewer points than requested; ``on_out_of_memory`` is
    then called with that batch size, the smallest seen not to fit. Each step is timed on its
    own between two device synchronisations. On CUDA the peak memory allocated at each batch size
    is recorded too. As in :func:`~noisescale.hardware.memory.find_max_batch_size`, a given
    ``model``/``optimizer`` is restored afterwards.

    Args:
        step_fn: One training step at a batch size, e.g. from
            :func:`~noisescale.hardware.memory.make_training_step`.
        batch_sizes: Micro-batch sizes to time (examples).
        warmup: Untimed steps before the timed ones, at each batch size.
        repeats: Timed steps at each batch size (the profile uses their median).
        device: Device the steps run on (synchronised around each timed step when CUDA).
        model: Model that ``step_fn`` trains, restored afterwards.
        optimizer: Optimizer that ``step_fn`` steps, restored afterwards.
        timer: Clock in seconds.
        on_out_of_memory: Called with the batch size that ran out of memory, if one did.

    Returns:
        One point per batch size that fitted in memory, ascending.
    """
    sync = _checked_sync(warmup, repeats, device)
    sizes = sorted(set(batch_sizes))
    # 2.5 was timed as a batch size and True as 1 until 2026-12-07 (a review)
    if not sizes or not all(_is_whole(b) for b in sizes) or sizes[0] < 1:
        raise NoiseScaleInputError(f"batch sizes to time must be whole numbers ≥ 1, got {sizes}")
    sizes = [int(b) for b in sizes]
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    points: list[ThroughputPoint] = []
    with _preserved_state(model, optimizer):
        for batch_size in sizes:
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            times = _timed_steps(step_fn, batch_size, warmup, repeats, sync, timer)
            _clear_grads(model, optimizer)
            if times is None:
                free_memory()
                if on_out_of_memory is not None:
                    on_out_of_memory(batch_size)
                break
            peak = torch.cuda.max_memory_allocated(dev) if cuda else None
            points.append(ThroughputPoint(batch_size, tuple(times), peak))
    return points


def _timed_steps(
    step_fn: StepFn,
    batch_size: int,
    warmup: int,
    repeats: int,
    sync: Callable[[], None],
    timer: Callable[[], float],
) -> list[float] | None:
    times: list[float] = []
    handling = sys.exc_info()[1]  # (not the step's: is_out_of_memory's chain stops at it)
    try:
        for _ in range(warmup):
            step_fn(batch_size)
        for _ in range(repeats):
            sync()
            t0 = timer()
            step_fn(batch_size)
            sync()
            times.append(timer() - t0)
    except Exception as err:
        if not is_out_of_memory(err, handling=handling):
            raise
        return None  # leaving the except clause frees the failed step's traceback
    return times


def time_optimizer_update(
    step_fn: StepFn,
    update_fn: Callable[[], object],
    batch_size: int,
    *,
    warmup: int = 2,
    repeats: int = 5,
    device: torch.device | str = "cpu",
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> tuple[float, ...]:
    """Time the optimizer update alone: ``repeats`` calls of ``update_fn`` after ``warmup``.

    A profiled training step (:func:`~noisescale.hardware.memory.make_training_step`) includes one
    optimizer update, but an accumulated step of k micro-batches runs k forward/backward passes
    and still only one update; the recommendation needs the update's time on its own to price
    that. One ``step_fn(batch_size)`` first leaves gradients (and optimizer state) for the update
    to work on; the update's cost does not depend on the batch size. ``model``/``optimizer`` are
    restored afterwards, as in :func:`profile_throughput`.

    Args:
        step_fn: One training step at a batch size that leaves its gradients in place (as
            ``make_training_step``'s does: it clears them before, not after, each step).
        update_fn: The optimizer update, e.g. ``optimizer.step``.
        batch_size: A batch size that fits, for the step that makes the gradients.
        warmup: Untimed updates first.
        repeats: Timed updates (a profile uses their median).
        device: Device the update runs on (synchronised around each timed update when CUDA).
        model: Model that ``step_fn`` trains, restored afterwards.
        optimizer: Optimizer that ``update_fn`` steps, restored afterwards.
        timer: Clock in seconds.

    Returns:
        The seconds of each timed update.
    """
    sync = _checked_sync(warmup, repeats, device)
    times: list[float] = []
    with _preserved_state(model, optimizer):
        step_fn(batch_size)
        for _ in range(warmup):
            update_fn()
        for _ in range(repeats):
            sync()
            t0 = timer()
            update_fn()
            sync()
            times.append(timer() - t0)
    return tuple(times)


def _checked_sync(warmup: int, repeats: int, device: torch.device | str) -> Callable[[], None]:
    """Refuse a negative warm-up or no repeats; the device's synchronisation (a no-op off CUDA)."""
    if warmup < 0 or repeats < 1:
        raise NoiseScaleInputError("warm-up must be ≥ 0 and repeats ≥ 1")
    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    return sync


def describe_device(device: torch.device | str) -> dict[str, Any]:
    """What a profile was measured on: device type and name, memory, threads, torch version."""
    dev = torch.device(device)
    info: dict[str, Any] = {"type": dev.type, "torch_version": torch.__version__}
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(
            name=props.name,
            total_memory_bytes=int(props.total_memory),
            capability=f"{props.major}.{props.minor}",
        )
    else:
        info.update(
            name=_cpu_name(),
            cpu_count=os.cpu_count(),
            torch_threads=torch.get_num_threads(),
        )
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_model(model: nn.Module, name: str, **extra: Any) -> dict[str, Any]:
    """What a profile measured: name, trainable parameters and their bytes (the all-reduce size).

    Parameters shared between modules (tied weights) are counted once, as
    ``model.parameters()`` yields them once and DDP reduces them once.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "name": name,
        "parameters": sum(p.numel() for p in trainable),
        "param_bytes": sum(p.numel() * p.element_size() for p in trainable),
        **extra,
    }
