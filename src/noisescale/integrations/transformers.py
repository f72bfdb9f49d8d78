"""Hugging Face ``transformers`` callback: B_simple every optimizer step of a ``Trainer`` run.

Usage::

    from noisescale.integrations.transformers import NoiseScaleCallback

    callback = NoiseScaleCallback(history_path="runs/noise.jsonl")
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    trainer.train()
    callback.tracker.estimate()

Where the measurement happens. In ``Trainer._inner_training_loop`` the last micro-batch's
``training_step`` (forward and ``accelerator.backward``) is followed directly by
``_clip_grad_norm`` and only then by ``on_pre_optimizer_step``, so no ``TrainerCallback`` hook
sees unclipped gradients. The callback therefore reads them from inside backward: a
post-accumulate-grad hook on the parameters queues a function on the autograd engine
(``queue_callback``, as ``DistributedDataParallel`` does) that runs when that backward pass has
finished, and it steps the tracker when the pass was the step's last micro-batch — which the
Trainer announces through accelerate's ``GradientState.sync_gradients`` before the pass. That
is before clipping and before the optimizer step. The step's loss is taken from the model
output's ``loss`` when there is one.

What it adapts: nothing. The ``Trainer`` plans a run from ``per_device_train_batch_size`` and
``gradient_accumulation_steps`` before it starts (steps per epoch, ``max_steps``, the learning-rate
schedule, the position of the last accumulation step of each epoch), so changing either mid-run
desynchronises that plan. Use the measurement to choose ``gradient_accumulation_steps`` for the
next run or for a resumed one, or train with Lightning or a plain loop to adapt within a run.

Limits: ``fp16`` (a ``GradScaler``) is refused, because the scaler is not reachable from a
callback and scaled norms would be averaged across scale changes; ``bf16`` needs no scaler and
works. With losses normalised by ``num_items_in_batch`` (token-count normalisation across the
accumulation), examples are weighted by their token counts, not equally as the tracker assumes
for ``loss_reduction="mean"``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from noisescale.errors import NoiseScaleInputError
from noisescale.tracker import GradientNoiseTracker

try:
    from transformers import TrainerCallback
except ImportError as exc:
    raise ImportError(
        "noisescale.integrations.transformers needs transformers: "
        "pip install 'noisescale[integrations]'"
    ) from exc

__all__ = ["NoiseScaleCallback"]


def _sync_gradients() -> bool:
    """Whether the backward pass now running is the last micro-batch of an optimizer step."""
    from accelerate.state import GradientState

    return bool(GradientState().sync_gradients)


class NoiseScaleCallback(TrainerCallback):
    """Measures B_simple in a Hugging Face ``Trainer`` run and adds it to the logs.

    Each ``on_log`` adds ``noisescale/b_simple`` (with ``_low``/``_high``), ``noisescale/g2`` and
    ``noisescale/trace_sigma`` to the logged values (callbacks after this one and
    ``trainer.state.log_history`` see them).

    Args:
        **tracker_kwargs: Passed to :class:`GradientNoiseTracker` (``loss_reduction``,
            ``per_example``, ``beta``, ``history_path``, …).
    """

    def __init__(self, **tracker_kwargs: Any) -> None:
        if "scaler" in tracker_kwargs or "optimizer" in tracker_kwargs:
            raise NoiseScaleInputError(
                "the callback takes the optimizer from the Trainer and supports no GradScaler"
            )
        self.tracker_kwargs = tracker_kwargs
        self.tracker: GradientNoiseTracker | None = None
        self._optimizer: Any = None
        self._queued = False
        self._loss: Tensor | None = None
        self._handles: list[Any] = []

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if getattr(args, "fp16", False):
            raise NoiseScaleInputError(
                "NoiseScaleCallback does not support fp16 (a GradScaler it cannot reach); use "
                "bf16, or a plain training loop with GradientNoiseTracker(scaler=...)"
            )
        if model is None:
            raise NoiseScaleInputError("the Trainer passed no model to the callback")
        if self.tracker is None:
            self.tracker = GradientNoiseTracker(model, **self.tracker_kwargs)
            for p in model.parameters():
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
            self._handles.append(model.register_forward_hook(self._on_forward))
        self._optimizer = kwargs.get("optimizer")

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if self.tracker is None or logs is None or self.tracker.steps == 0:
            return
        e = self.tracker.estimate()
        values = {
            "noisescale/b_simple": e.b_simple,
            "noisescale/b_simple_low": e.low,
            "noisescale/b_simple_high": e.high,
            "noisescale/g2": e.g2,
            "noisescale/trace_sigma": e.trace_sigma,
        }
        # JSON (trainer_state.json) has no NaN/inf: leave out what is not yet available
        values = {k: float(v) for k, v in values.items() if math.isfinite(v)}
        logs.update(values)
        # Trainer.log appended a copy of the logs just before calling on_log
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.tracker is not None:
            self.tracker.remove()

    # -- hooks inside backward ------------------------------------------------------------------

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, Tensor) and loss.dim() == 0:
            loss = loss.detach()
            self._loss = loss if self._loss is None else self._loss + loss

    def _on_grad(self, param: Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        self._queued = False
        if not _sync_gradients():
            return
        assert self.tracker is not None
        lr = None
        if self._optimizer is not None:
            lr = float(self._optimizer.param_groups[0]["lr"])
        loss, self._loss = self._loss, None
        if loss is not None:
            # the model's loss is per micro-batch: the step's loss is their mean
            loss = loss / max(1, self.tracker.engine.open_passes())
        self.tracker.step(loss=loss, lr=lr)
