"""The largest batch a training step fits in memory, found by an out-of-memory-safe search.

The search (:func:`find_max_batch_size`) doubles the batch until a step runs out of memory, then
bisects between the last batch that fitted and the first that did not, as Lightning's batch-size
finder does in ``binsearch`` mode. Every out-of-memory error is caught, classified by
:func:`is_out_of_memory`, and its memory released *after* the ``except`` clause has ended: the
exception's traceback holds the failed step's frames, and with them its activations.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from noisescale.errors import NoiseScaleInputError
from noisescale.hardware.accumulation import AccumulationSplit, accumulation_split

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MakeBatch = Callable[[int, torch.device], tuple[torch.Tensor, torch.Tensor]]
StepFn = Callable[[int], object]
"""One training step at the given batch size (examples); its return value is ignored."""

_OOM_TYPES: tuple[type[BaseException], ...] = (
    MemoryError,
    torch.cuda.OutOfMemoryError,
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
)
# Lower-cased fragments of allocator errors that torch raises as plain RuntimeError: the CPU
# allocator ("DefaultCPUAllocator: can't allocate memory"), MPS and older CUDA builds ("out of
# memory"), cuBLAS/cuDNN workspace allocations, and cuDNN refusing a batch too large for its
# kernels, which for a batch-size search is the same limit.
_OOM_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "could not allocate",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cudnn_status_not_supported",
    # the CPU allocator's words on Windows (alloc_cpu.cpp's _aligned_malloc branch); Linux's
    # posix_memalign branch says "can't allocate memory" (until 2026-12-07 only that one was
    # known, and a Windows search ended in the raw RuntimeError, a fuzzer)
    "not enough memory",
)


# the most exceptions of a chain looked at (__cause__ / __context__), each once
_CHAIN_LIMIT = 16


def is_out_of_memory(err: BaseException, *, handling: BaseException | None = None) -> bool:
    """Whether an exception means "this batch does not fit in memory" (CUDA, CPU or MPS): an
    out-of-memory error itself, or one raised from it or while it was handled (its
    ``__cause__`` or ``__context__``, followed up to 16 links, each once): a step that wraps
    the error (``raise RuntimeError("step failed") from oom``, a framework's wrapper) ran out of
    memory all the same. (Until 2026-12-07 only the outer exception was looked at, and the
    search raised the wrapper at the first size that did not fit instead of bisecting.) An
    exception raised while an out-of-memory error was being handled counts as one: the step
    ran out of memory at that size whatever its handler did next.

    ``handling``: the exception that was being handled when the step began
    (``sys.exc_info()[1]`` then), where the chain stops: Python makes it the ``__context__`` of
    any exception the step raises, so a search run inside ``except OutOfMemoryError:`` (a
    training run that ran out of memory, sized again) took every error of the step for a memory
    limit (until 2026-12-07: a step raising IndexError above batch 50 gave 50, converged).
    :func:`find_max_batch_size` and the timings pass it."""
    seen: set[int] = set()
    waiting: list[BaseException] = [err]
    while waiting and len(seen) < _CHAIN_LIMIT:
        at = waiting.pop(0)
        if id(at) in seen or at is handling:
            continue
        seen.add(id(at))
        if _is_out_of_memory_itself(at):
            return True
        waiting += [e for e in (at.__cause__, at.__context__) if e is not None]
    return False


def _is_out_of_memory_itself(err: BaseException) -> bool:
    if isinstance(err, _OOM_TYPES):
        return True
    if isinstance(err, RuntimeError):
        message = str(err).lower()
        return any(fragment in message for fragment in _OOM_MESSAGES)
    return False


def free_memory() -> None:
    """Collect garbage and return cached CUDA blocks to the driver (when CUDA is in use)."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def make_training_step(
    model: nn.Module,
    loss_fn: LossFn,
    make_batch: MakeBatch,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str | None = None,
) -> Callable[[int], None]:
    """One training step as a function of the batch size: fresh batch, forward, backward, step.

    Gradients are set to None before each forward pass, as ``optimizer.zero_grad()`` does in a
    training loop, so each step holds the memory of exactly one step's gradients.

    Args:
        model: The model, already on ``device``.
        loss_fn: ``loss_fn(model(inputs), targets)`` returns the scalar loss.
        make_batch: ``make_batch(batch_size, device)`` returns ``(inputs, targets)`` on ``device``.
        optimizer: When given, ``optimizer.step()`` runs after backward (its state counts
            towards memory, as in real training).
        device: Where batches are made; default: the device of the model's first parameter.
    """
    if device is not None:
        target = torch.device(device)
    else:
        first = next(iter(model.parameters()), None)
        target = first.device if first is not None else torch.device("cpu")

    def step(batch_size: int) -> None:
        model.zero_grad(set_to_none=True)
        inputs, targets = make_batch(batch_size, target)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        if optimizer is not None:
            optimizer.step()

    return step


@dataclass(frozen=True)
class MaxBatchSize:
    """Result of :func:`find_max_batch_size`.

    Attributes:
        max_batch_size: Largest batch (examples) whose training step ran without running out of
            memory.
        start: First batch size tried.
        limit: Largest batch size the search was allowed to try (None: unbounded).
        capped: The search stopped at ``limit`` without running out of memory, so the true
            maximum is at least ``max_batch_size``.
        converged: The search bracketed the maximum exactly (one more example runs out of
            memory, as it did once: a one-off out-of-memory error is not tried again and
            lowers the result, docs/hardware.md) or stopped at the limit; False when
            ``max_trials`` ran out first, in which case ``max_batch_size`` is only a lower
            bound: the true maximum lies between it and the smallest batch that ran out of
            memory (or above it, if none did). Raise ``max_trials`` to close the gap.
        trials: Each batch size tried, in order, and whether it fitted.
    """

    max_batch_size: int
    start: int
    limit: int | None
    capped: bool
    converged: bool
    trials: tuple[tuple[int, bool], ...]

    def split(self, batch_size: int) -> AccumulationSplit:
        """The gradient-accumulation split of ``batch_size`` into micro-batches that fit.

        See :func:`~noisescale.hardware.accumulation.accumulation_split` for the rule.
        """
        return accumulation_split(batch_size, self.max_batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {
            "max_batch_size": self.max_batch_size,
            "start": self.start,
            "limit": self.limit,
            "capped": self.capped,
            "converged": self.converged,
            "trials": [[b, fits] for b, fits in self.trials],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> MaxBatchSize:
        return cls(
            max_batch_size=int(state["max_batch_size"]),
            start=int(state["start"]),
            limit=None if state["limit"] is None else int(state["limit"]),
            capped=bool(state["capped"]),
            converged=bool(state["converged"]),
            trials=tuple((int(b), bool(fits)) for b, fits in state["trials"]),
        )


def find_max_batch_size(
    step_fn: StepFn,
    *,
    start: int = 1,
    limit: int | None = None,
    steps_per_trial: int = 2,
    max_trials: int = 64,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    release: Callable[[], None] = free_memory,
) -> MaxBatchSize:
    """The largest batch size whose training step fits in memory (grow ×2, then bisect).

    Starting at ``start``, the batch size doubles (capped at ``limit``) until a trial runs out of
    memory; then the search bisects between the largest batch that fitted and the smallest that
    did not until they are one apart. A trial runs ``steps_per_trial`` steps, because the second
    step can need more memory than the first (optimizer state, allocator fragmentation).

    Out-of-memory errors (:func:`is_out_of_memory`) are caught and their memory freed; any other
    exception propagates. When ``model`` and ``optimizer`` are given, their state (parameters,
    buffers, persistent or not, those a step makes or resizes too, optimizer moments, gradients
    already there) is saved to host memory before the search and restored after, their
    gradients are dropped after every trial,
    and the torch random number generators are restored, so the search leaves training exactly
    where it was.

    On CPU, Linux may hand out memory it does not have and kill the process later instead of
    failing the allocation; pass ``limit`` there. Leave a margin below the result in real
    training: memory fragments over a long run.

    This is the hardware half of choosing a batch size; the noise scale (paper eq. 2.11) gives
    the other half (:mod:`noisescale.hardware.recommend`).

    Args:
        step_fn: One training step at a batch size, e.g. from :func:`make_training_step`.
        start: First batch size to try (a whole number ≥ 1).
        limit: Largest batch size to try; None searches until memory runs out.
        steps_per_trial: Steps run at each batch size.
        max_trials: Most batch sizes to try. When they run out before the search brackets the
            maximum, the result has ``converged=False`` and is a lower bound (for example
            ``start=64, max_trials=2`` with a maximum of 40 returns 32).
        model: Model that ``step_fn`` trains, to restore and clear after the search.
        optimizer: Optimizer that ``step_fn`` steps, to restore after the search.
        release: Frees memory after a trial ran out of memory; the default collects garbage
            (the failed step's reference cycles) and empties the CUDA cache.

    Returns:
        The largest batch that fitted, and the search's trials.

    Raises:
        NoiseScaleInputError: Even batch size 1 does not fit; no batch size tried fits before
            ``max_trials`` runs out (raise it or lower ``start``); or the arguments are invalid.
    """
    for name, value in (
        ("start", start),
        ("steps_per_trial", steps_per_trial),
        ("max_trials", max_trials),
        ("limit", limit),
    ):
        # a float or bool batch size was tried as it was (start=1.5 tried 1.5, 3.0, 6.0 and
        # limit=10.5 returned max_batch_size=10.5, until 2026-12-07, a review)
        if value is not None and not _is_whole(value):
            raise NoiseScaleInputError(f"{name} must be a whole number, got {value!r}")
    if start < 1:
        raise NoiseScaleInputError(f"start must be at least 1, got {start}")
    if limit is not None and limit < start:
        raise NoiseScaleInputError(f"limit ({limit}) must be at least start ({start})")
    if steps_per_trial < 1 or max_trials < 1:
        raise NoiseScaleInputError("steps_per_trial and max_trials must be at least 1")
    trials: list[tuple[int, bool]] = []
    low, high = 0, None  # largest batch that fitted, smallest that did not
    batch_size = start
    with _preserved_state(model, optimizer):
        while len(trials) < max_trials:
            fits = _run_trial(step_fn, batch_size, steps_per_trial)
            _clear_grads(model, optimizer)
            if not fits:
                release()
            trials.append((batch_size, fits))
            if fits:
                low = batch_size
            else:
                high = batch_size
            if high is None:
                if limit is not None and batch_size >= limit:
                    break
                batch_size = 2 * batch_size if limit is None else min(2 * batch_size, limit)
            elif high - low <= 1:
                break
            else:
                batch_size = (low + high) // 2
    if low == 0:
        if high != 1:
            # The bisection towards 1 was cut short: a smaller batch may fit (until 2026-12-06
            # this said to shrink the model or buy memory, a hunt).
            tried = ", ".join(str(b) for b, _ in trials)
            raise NoiseScaleInputError(
                f"the training step ran out of memory at every batch size tried ({tried}) and "
                f"max_trials={max_trials} ran out before the search reached batch size 1, so "
                f"a batch smaller than {high} may fit: raise max_trials or lower start"
            )
        raise NoiseScaleInputError(
            "the training step does not fit in memory at batch size 1; reduce the model or the "
            "example size, or use a device with more memory"
        )
    capped = high is None and limit is not None and low >= limit
    return MaxBatchSize(
        max_batch_size=low,
        start=start,
        limit=limit,
        capped=capped,
        converged=capped or (high is not None and high - low <= 1),
        trials=tuple(trials),
    )


def _is_whole(value: object) -> bool:
    """An int (numpy's too), not a bool: a batch size or a count."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _run_trial(step_fn: StepFn, batch_size: int, steps: int) -> bool:
    handling = sys.exc_info()[1]  # (not the step's: the chain stops at it)
    try:
        for _ in range(steps):
            step_fn(batch_size)
    except Exception as err:
        if not is_out_of_memory(err, handling=handling):
            raise
        # Returning ends the except clause, which drops `err` and its traceback (and with them
        # the failed step's tensors) before the caller frees memory.
        return False
    return True


def _clear_grads(model: nn.Module | None, optimizer: torch.optim.Optimizer | None) -> None:
    if model is not None:
        model.zero_grad(set_to_none=True)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _preserved_state(
    model: nn.Module | None, optimizer: torch.optim.Optimizer | None
) -> Iterator[None]:
    """Save model, optimizer, gradient and RNG state on entry and restore them on exit.

    Copies go to host memory so that they do not take device memory from the search; the
    gradients already there (a loop mid-accumulation) are dropped for the search and put back.
    Buffers that ``state_dict`` leaves out (``persistent=False``) are saved too: a forward pass
    may change them as it changes BatchNorm's statistics (until 2026-12-07 they were left as
    the search's steps had changed them, and gradients already there were lost, a fuzzer).
    """
    model_state = None if model is None else _to_cpu(model.state_dict())
    optimizer_state = None if optimizer is None else _to_cpu(optimizer.state_dict())
    buffers = ([], []) if model is None else _saved_buffers(model)
    grads = _saved_grads(model, optimizer)
    _clear_grads(model, optimizer)
    cuda_devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda_devices):
        try:
            yield
        finally:
            # load_state_dict copies into the existing tensors, so references that an
            # optimizer or the caller holds to the parameters stay valid.
            if model is not None and model_state is not None:
                # buffers first, each as it was (a cache a step made or resized, persistent or
                # not, would fail load_state_dict's strict check or stay as the search left it)
                _restore_buffers(*buffers)
                model.load_state_dict(model_state)
            if optimizer is not None and optimizer_state is not None:
                optimizer.load_state_dict(optimizer_state)
            _clear_grads(model, optimizer)
            for param, (grad, device) in grads:
                param.grad = grad.to(device)
            if model is not None or optimizer is not None:
                free_memory()


_SavedBuffer = tuple[nn.Module, str, torch.Tensor | None, torch.Tensor | None, torch.device | None]


def _saved_buffers(model: nn.Module) -> tuple[list[nn.Module], list[_SavedBuffer]]:
    """The modules, and every module's buffers as they are, persistent or not, a buffer
    registered as None too: ``(module, name, the tensor, its copy on the host, its device)``."""
    modules = list(model.modules())
    saved: list[_SavedBuffer] = []
    for module in modules:
        for name, buf in module._buffers.items():
            if buf is None:
                saved.append((module, name, None, None, None))
            else:
                saved.append((module, name, buf, buf.detach().to("cpu", copy=True), buf.device))
    return modules, saved


def _restore_buffers(modules: list[nn.Module], saved: list[_SavedBuffer]) -> None:
    """Put every buffer back as it was: the same tensor with its saved values (views of it stay
    valid), None where it was None (a cache the steps made), and buffers the steps registered
    removed from the modules there before. (Until 2026-12-07 a cache buffer registered as None
    and made by a step stayed after the search when not persistent, and a persistent one, or
    one a step resized, failed ``load_state_dict`` after the search: "Missing key(s)", "size
    mismatch", a review.)"""
    names: dict[int, set[str]] = {id(module): set() for module in modules}
    for module, name, original, value, device in saved:
        names[id(module)].add(name)
        if original is None or value is None:
            module._buffers[name] = None
            continue
        if original.dtype != value.dtype or original.device != device:
            module._buffers[name] = value.to(device)  # its type changed in place: a new tensor
            continue
        with torch.no_grad():
            if original.shape == value.shape:
                original.copy_(value)
            else:  # resized in place by a step
                original.set_(value.to(device))
        module._buffers[name] = original
    for module in modules:
        for name in [n for n in module._buffers if n not in names[id(module)]]:
            del module._buffers[name]


def _saved_grads(
    model: nn.Module | None, optimizer: torch.optim.Optimizer | None
) -> list[tuple[torch.Tensor, tuple[torch.Tensor, torch.device]]]:
    """The gradients already there on the model's and optimizer's parameters, on the host."""
    params: dict[int, torch.Tensor] = {}
    if model is not None:
        params |= {id(p): p for p in model.parameters()}
    if optimizer is not None:
        params |= {id(p): p for group in optimizer.param_groups for p in group["params"]}
    return [
        (p, (p.grad.detach().to("cpu", copy=True), p.grad.device))
        for p in params.values()
        if p.grad is not None
    ]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
