"""Thin adapters that run a :class:`~noisescale.tracker.GradientNoiseTracker` inside frameworks.

Import the one you use; neither is imported here, so ``noisescale`` never needs the frameworks:

* ``noisescale.integrations.lightning.NoiseScaleCallback``: a Lightning ``Callback`` that
  measures B_simple and can drive an :class:`~noisescale.schedule.AdaptiveBatchSize` or
  :class:`~noisescale.schedule.BatchSizeRamp` through ``Trainer.accumulate_grad_batches``.
* ``noisescale.integrations.transformers.NoiseScaleCallback``: a Hugging Face ``TrainerCallback``
  that measures B_simple, logs it where the ``Trainer`` reports (TensorBoard, W&B, …) and can
  drive a schedule through ``TrainingArguments.gradient_accumulation_steps``.

Both read gradients after the last backward pass of a step and before gradient clipping, build
a new tracker for every run (``fit``/``train``) and save their state in the framework's
checkpoints. ``docs/integrations.md`` says what each can and cannot do.
"""

from __future__ import annotations

from typing import Any

import torch

from noisescale.errors import NoiseScaleInputError
from noisescale.preconditioning import unwrap_optimizer

__all__: list[str] = []


def stepped_optimizer(given: Any, stepped: list[Any], which: str, listing: str, own: str) -> Any:
    """A callback's ``precondition=`` optimizer, taken only if the framework steps it (each
    wrapper taken off): one it never steps would never start preconditioning, the estimate
    unavailable for good (until 2026-12-05 such a run was measured plain throughout and
    estimate() gave the plain B_simple). ``which``: what it should have been ("the optimizer
    the Trainer"); ``listing``: what the framework steps; ``own``: what precondition=True
    means there, and how to hand the framework one's own."""
    inner = unwrap_optimizer(given)
    if any(inner is unwrap_optimizer(o) for o in stepped):
        return inner
    raise NoiseScaleInputError(
        f"precondition= got {type(given).__name__}, which is not {which} steps ({listing}), so "
        "it would never step and the preconditioned estimate would never start; pass "
        f"precondition=True to precondition with {own}"
    )


def refuse_batch_sampler(schedule: Any, setting: str) -> None:
    """Refuse a schedule built with ``batch_sampler=``: a callback realises the batch through
    the framework's gradient accumulation (``setting``), so a sampler resized as well would
    make each step k × the schedule's batch (a hunt saw 24 → 72 examples a step)."""
    if schedule is not None and schedule.batch_sampler is not None:
        raise NoiseScaleInputError(
            "give the schedule no batch_sampler: the callback realises its batch through "
            f"{setting} over the dataloader's fixed micro-batch, so a ResizableBatchSampler "
            "resized too would make every step the schedule's batch times the accumulation; "
            "build the schedule without batch_sampler= and the dataloader with "
            "batch_size=micro-batch (per process)"
        )


def estimate_metrics(
    estimate: Any, schedule: Any, micro_batches: int | None, lr_factor: float
) -> dict[str, float]:
    """The ``noisescale/*`` values both callbacks log: the estimate, and with a schedule the
    batch size it applies (``micro_batches`` × its micro-batch size) and learning-rate factor."""
    values = {
        "noisescale/b_simple": estimate.b_simple,
        "noisescale/b_simple_low": estimate.low,
        "noisescale/b_simple_high": estimate.high,
        "noisescale/g2": estimate.g2,
        "noisescale/trace_sigma": estimate.trace_sigma,
    }
    if schedule is not None:
        k = micro_batches or 1
        values["noisescale/batch_size"] = float(k * schedule.micro_batch_size)
        values["noisescale/lr_factor"] = lr_factor
    return values


def drawn_without_replacement(loader: Any) -> int | None:
    """The number of examples of the data set a training loader draws from without replacement
    — its sampler a shuffled ``RandomSampler`` (``shuffle=True``, accelerate's seedable one) or
    ``DistributedSampler``, under accelerate's batch-sampler shard too — or ``None`` where it
    cannot tell (another sampler, a dataset without a length). The tracker then warns when
    B_simple is a sizable part of it without ``dataset_size=`` (:class:`GradientNoiseTracker`).
    """
    batches = getattr(loader, "batch_sampler", None)
    while hasattr(batches, "batch_sampler"):  # (accelerate's BatchSamplerShard)
        batches = batches.batch_sampler
    sampler = getattr(batches, "sampler", None)
    data = torch.utils.data
    shuffled = (isinstance(sampler, data.RandomSampler) and not sampler.replacement) or (
        isinstance(sampler, data.DistributedSampler) and sampler.shuffle
    )
    try:
        return len(loader.dataset) if shuffled else None
    except TypeError:  # (no __len__)
        return None
