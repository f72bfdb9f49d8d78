"""Thin adapters that run a :class:`~noisescale.tracker.GradientNoiseTracker` inside frameworks.

Import the one you use; neither is imported here, so ``noisescale`` never needs the frameworks:

* ``noisescale.integrations.lightning.NoiseScaleCallback``: a Lightning ``Callback`` that
  measures B_simple and can drive an :class:`~noisescale.schedule.AdaptiveBatchSize` or
  :class:`~noisescale.schedule.BatchSizeRamp` through ``Trainer.accumulate_grad_batches``.
* ``noisescale.integrations.transformers.NoiseScaleCallback``: a Hugging Face ``TrainerCallback``
  that measures B_simple and logs it (the ``Trainer`` fixes its batch for a run).

Both read gradients after the last backward pass of a step and before gradient clipping.
"""

from __future__ import annotations

__all__: list[str] = []
