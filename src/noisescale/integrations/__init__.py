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

__all__: list[str] = []


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
