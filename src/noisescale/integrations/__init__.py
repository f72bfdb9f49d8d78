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

__all__: list[str] = []
