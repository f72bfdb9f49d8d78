"""Hugging Face ``transformers`` callback: B_simple every optimizer step of a ``Trainer`` run.

Usage::

    from noisescale.integrations.transformers import NoiseScaleCallback

    callback = NoiseScaleCallback(history_path="runs/noise.jsonl")
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    trainer.train()
    callback.tracker.estimate()

Where the measurement happens. In ``Trainer._run_epoch`` the last micro-batch's
``training_step`` (forward and ``accelerator.backward``) is followed directly by
``_clip_grad_norm`` and only then by ``on_pre_optimizer_step``, so no ``TrainerCallback`` hook
sees unclipped gradients. The callback therefore reads them from inside backward: a
post-accumulate-grad hook on the parameters queues a function on the autograd engine
(``queue_callback``) that runs when that backward pass has finished — and queues itself once
more, so that it runs after the callbacks others queued during the pass (DDP's, which writes the
averaged gradients into ``.grad``). It steps the tracker when the pass was the step's last
micro-batch, which the Trainer announces through accelerate's ``GradientState.sync_gradients``
before the pass. That is before clipping and before the optimizer step.

The loss. The step's loss is taken from the model output's ``loss`` of each micro-batch: their
mean, or their sum when the Trainer passed ``num_items_in_batch`` to the model (the model then
divided each micro-batch's summed loss by the step's item count, and the micro-batch losses add
up to the step's). It equals the ``loss`` the Trainer logs for that step.

What the Trainer backpropagates. The Trainer divides a micro-batch's loss by the accumulation
only when it believes the loss is not already normalised over the step; the loss the model
returns (with the Trainer's own ``compute_loss``), what an override or a ``compute_loss_func``
returns, is watched (:meth:`GradientNoiseTracker.watch_loss`), so the multiplier it put on each
micro-batch's loss is measured, not assumed. Its ``LabelSmoother`` is measured as a model's own
``loss_function`` is; a ``compute_loss_func`` needs ``loss_reduction`` (see
:meth:`NoiseScaleCallback._watch_trainer_loss`). A loss a model computes itself in a forward
given ``num_items_in_batch`` is probed once for its division by it and, where it divides, measured
in the Trainer's form (:meth:`NoiseScaleCallback._measure_model_items`).

Logging. Every training log (the ``logs`` with a ``loss`` that ``on_log`` receives) gets
``noisescale/b_simple`` (with ``_low``/``_high``), ``noisescale/g2`` and
``noisescale/trace_sigma``, and with a schedule ``noisescale/batch_size`` and
``noisescale/lr_factor``. The Trainer calls its callbacks in list order, and puts the reporting
ones (``report_to``: TensorBoard, Weights & Biases, MLflow, …) before those passed as
``callbacks=[...]``; so that the values reach them, the callback moves itself to the front of the
Trainer's callback list when training starts (it finds the list through the call that runs its
``on_train_begin``; where it cannot, it says so and how to do it by hand). The values are also
written into the ``trainer.state.log_history`` entry of the same log (JSON: values that are not
finite are left out).

Reuse and resume. Every ``train()`` builds a new tracker on the model the Trainer trains in that
call (a second run, ``hyperparameter_search`` with ``model_init``), after removing the hooks of
the previous one; ``callback.tracker`` is the current run's. The callback is an
``ExportableState``: each checkpoint's ``trainer_state.json`` holds the tracker's and the
schedule's state, and ``train(resume_from_checkpoint=...)`` restores them, so the estimates
continue as if the run had not stopped. The callback restores itself from the loaded state
whether or not ``restore_callback_states_from_checkpoint`` is set; with it set, the Trainer
replaces the callback by a new instance built from the saved arguments (find it in
``trainer.callback_handler.callbacks``), which needs them to be JSON values.

Adapting the batch. With a schedule (:class:`~noisescale.schedule.AdaptiveBatchSize` or
:class:`~noisescale.schedule.BatchSizeRamp`, built without an optimizer and with
``micro_batch_size`` equal to the global micro-batch, ``per_device_train_batch_size`` × processes)
the callback writes the schedule's accumulation into ``args.gradient_accumulation_steps``, which
the Trainer reads afresh for every optimizer step: it fetches that many micro-batches, divides
their losses by it and synchronises after the last. Like Lightning, it ends a step where the
epoch's micro-batch count is a multiple of it, so a new value applies at the first step boundary
where that count is a multiple of it (at most k − 1 steps late; always at an epoch start), with
the learning-rate factor at the same moment (the optimizer's rates and the scheduler, of a
kind :func:`~noisescale.schedule.scale_lr` supports). What the data path does not allow:

* The Trainer sizes each epoch's loop (``num_update_steps_per_epoch``) for the accumulation given
  in ``TrainingArguments`` at the start, so a smaller one would end epochs early: start with
  ``gradient_accumulation_steps=1`` (the schedule's own start is applied at the first epoch's
  start). Larger ones end the epoch's data earlier; the loop then idles to its planned end.
* Everything planned in steps was planned for that accumulation: the number of epochs implied by
  ``max_steps`` (a run whose batch grows ends after those epochs, with fewer steps than
  ``max_steps``), the learning-rate schedule's length, ``save_steps``, ``logging_steps``. Train
  for ``num_train_epochs`` with a constant (or warm-up then constant) learning rate.
* A resume skips ``global_step`` × ``gradient_accumulation_steps`` batches, which is not where
  the run was once the accumulation has changed; such a resume is refused with a message (a
  checkpoint taken before the first change resumes exactly).

Limits: ``fp16`` (a ``GradScaler``) is refused, because the scaler is not reachable from a
callback and scaled norms would be averaged across scale changes; ``bf16`` needs no scaler and
works (``tests/test_integrations.py`` states its error against fp32). Under data parallelism
(``accelerate launch``, DDP) the tracker measures each process's local gradient against the
averaged one (paper App. A.1); ``sync_each_batch`` and DeepSpeed are refused. A model whose
loss averages tokens (a causal or masked language model, normalised by ``num_items_in_batch``
when the Trainer passes it) is measured per token, from the weights its own loss gives each
token (:mod:`noisescale.tokens`; ``docs/language_models.md``).
"""

from __future__ import annotations

import json
import math
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from noisescale.errors import NoiseScaleInputError
from noisescale.integrations import (
    drawn_without_replacement,
    estimate_metrics,
    refuse_batch_sampler,
    stepped_optimizer,
)
from noisescale.module_hooks import Hook
from noisescale.per_example.fallback import _outside_rng_states, _restore_outside_rng_states
from noisescale.preconditioning import learning_rate, unwrap_optimizer
from noisescale.schedule import (
    AdaptiveBatchSize,
    BatchSizeRamp,
    carry_lr_factor,
    check_lr_schedulers,
)
from noisescale.tracker import GradientNoiseTracker

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler, ExportableState
except ImportError as exc:
    raise ImportError(
        "noisescale.integrations.transformers needs transformers: "
        "pip install 'noisescale[integrations]'"
    ) from exc

__all__ = ["NoiseScaleCallback"]

STATE_KIND = "noisescale.transformers_callback"
STATE_VERSION = 1


def _sync_gradients() -> bool:
    """Whether the backward pass now running is the last micro-batch of an optimizer step."""
    from accelerate.state import GradientState

    return bool(GradientState().sync_gradients)


def _rng_states() -> tuple[Any, ...]:
    """torch's CPU generator's state and the CUDA devices', with Python's ``random`` and NumPy's
    global generator (for a call repeated as it ran: a layer drop drawn with ``random`` made the
    probe's loss differ, and a model that ignores ``num_items_in_batch`` was refused, a review
    of 2026-12-07)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return torch.random.get_rng_state(), cuda, _outside_rng_states()


def _set_rng_states(states: tuple[Any, ...], devices: list[int]) -> None:
    """Restore :func:`_rng_states`' states, on the CUDA ``devices`` (the ones ``fork_rng``
    puts back afterwards)."""
    cpu, cuda, outside = states
    torch.random.set_rng_state(cpu)
    for d in devices:
        if d < len(cuda):
            torch.cuda.set_rng_state(cuda[d], d)
    _restore_outside_rng_states(outside)


class NoiseScaleCallback(TrainerCallback, ExportableState):
    """Measures B_simple in a Hugging Face ``Trainer`` run, logs it and optionally adapts the batch.

    See the module docstring for where it reads the gradients, the logging order, reuse, resume
    and what adapting the batch under the Trainer can and cannot do.

    Args:
        schedule: An :class:`AdaptiveBatchSize` or :class:`BatchSizeRamp` to drive through
            ``args.gradient_accumulation_steps`` (constructed without ``optimizer``: the callback
            writes the learning rate when it applies a change). ``None`` only measures.
        **tracker_kwargs: Passed to :class:`GradientNoiseTracker` (``loss_reduction``,
            ``per_example``, ``beta``, ``history_path``, …). Under ``torch.distributed`` the
            tracker averages over the default process group unless ``process_group`` is given,
            and only the first process writes ``history_path`` (all compute the same history).
            ``precondition=True`` measures the noise scale preconditioned by the Trainer's own
            optimizer (an Adam, AdamW or RMSprop: ``optim="adamw_torch"``, or one given as
            ``Trainer(optimizers=...)``); an optimizer passed here must be that one.
    """

    def __init__(
        self, schedule: AdaptiveBatchSize | BatchSizeRamp | None = None, **tracker_kwargs: Any
    ) -> None:
        if "scaler" in tracker_kwargs or "optimizer" in tracker_kwargs:
            raise NoiseScaleInputError(
                "the callback takes the optimizer from the Trainer and supports no GradScaler; "
                "do not pass scaler= or optimizer="
            )
        if schedule is not None and schedule.optimizer is not None:
            raise NoiseScaleInputError(
                "give the schedule no optimizer: the callback writes the learning rate itself, "
                "when the Trainer can take the new batch size"
            )
        refuse_batch_sampler(schedule, "TrainingArguments.gradient_accumulation_steps")
        self.schedule = schedule
        self.tracker_kwargs = tracker_kwargs
        self.tracker: GradientNoiseTracker | None = None
        # set by the Trainer when it rebuilds the callback from a checkpoint (see state())
        self.unrestorable_args: list[str] = []
        self.checkpoint: dict[str, Any] | None = None
        self._handles: list[Any] = []
        # the Trainer's attributes replaced while a run is watched: (object, name, previous)
        self._restore: list[tuple[Any, str, Any]] = []
        self._watch_returned = False  # the model's returned loss is the whole (_on_forward)
        self._optimizer: Any = None
        self._lr_scheduler: Any = None
        self._train_batches: int | None = None
        self._queued = False
        self._loss: Tensor | None = None
        self._losses = 0
        self._loss_over_items = False
        self._items_scale = 1
        # whether the model's own loss divides by the num_items_in_batch given to its forward:
        # "divides", "ignores", None until seen (_measure_model_items)
        self._model_items: str | None = None
        self._rng_before: Any = None  # torch's generators before the forward it checks
        self._buffers_before: list[Tensor] | None = None  # the model's buffers then
        self._warned: set[str] = set()
        # the schedule's realisation in the Trainer, saved in checkpoints
        self._applied_micro_batches: int | None = None
        self._applied_lr_factor = 1.0
        self._scaled_groups: int | None = None  # the groups that carry it (None: all of them)
        self._examples_seen = 0  # tracker.examples_trained at the last step
        self._epoch = 0
        self._position = 0  # micro-batches of the current epoch consumed so far
        self._resume_position: int | None = None
        # the frame of the run's train() call, and its thread (_check_alive)
        self._loop: tuple[Any, int] | None = None
        self._ended = False

    # -- run lifecycle ---------------------------------------------------------------------------

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if getattr(args, "fp16", False):
            raise NoiseScaleInputError(
                "NoiseScaleCallback does not support fp16 (a GradScaler it cannot reach); use "
                "bf16, or a plain training loop with GradientNoiseTracker(scaler=...)"
            )
        if self.unrestorable_args:
            raise NoiseScaleInputError(
                "the Trainer rebuilt this callback from a checkpoint "
                "(restore_callback_states_from_checkpoint=True) without its arguments "
                f"{self.unrestorable_args}, which are not JSON values; leave "
                "restore_callback_states_from_checkpoint=False: the callback restores its state "
                "from the checkpoint by itself"
            )
        if model is None:
            raise NoiseScaleInputError("the Trainer passed no model to the callback")
        self._check_sampler(args, kwargs.get("train_dataloader"))
        self._release()
        self._move_ahead_of_reporters(args)
        self._optimizer = kwargs.get("optimizer")
        self._lr_scheduler = kwargs.get("lr_scheduler")
        self._train_batches = _length(kwargs.get("train_dataloader"))
        self.tracker = GradientNoiseTracker(model, **self._tracker_kwargs(args))
        self.tracker._drawn_from = drawn_without_replacement(kwargs.get("train_dataloader"))
        self._watch_trainer_loss(args)
        loop = _trainer_frame()
        self._loop = None if loop is None else (loop, threading.get_ident())
        self._ended = False
        self._warned.discard("ended")
        del loop
        self._handles.append(model.register_forward_pre_hook(Hook(self._check_alive), prepend=True))
        for p in model.parameters():
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        self._handles.append(model.register_forward_hook(Hook(self._on_forward), with_kwargs=True))
        self._handles.append(
            model.register_forward_pre_hook(Hook(self._before_forward), with_kwargs=True)
        )
        self._model_items, self._rng_before, self._buffers_before = None, None, None
        world = int(getattr(args, "world_size", 1))
        average = getattr(args, "average_tokens_across_devices", False)
        self._items_scale = world if world > 1 and average else 1
        self._queued, self._loss, self._losses = False, None, 0
        self._applied_micro_batches, self._applied_lr_factor = None, 1.0
        self._scaled_groups = None
        self._examples_seen, self._epoch, self._position = 0, 0, 0
        self._resume_position = None
        if state.global_step > 0:
            self._resume(args, state)
        elif self.schedule is not None and self.schedule.state.step > 0:
            raise NoiseScaleInputError(
                f"the schedule has already taken {self.schedule.state.step} steps in an earlier "
                "run; give the callback a new schedule for a new run (a resume restores the "
                "schedule from the checkpoint)"
            )
        self.checkpoint = None
        if self.schedule is not None:
            self._check_schedule(args)

    def _resume(self, args: Any, state: Any) -> None:
        """Continue from the checkpoint the Trainer resumed from."""
        saved = self._saved_state(state)
        if saved is None:
            self._warn_once(
                "no-state",
                f"resumed at step {state.global_step} from a checkpoint without noisescale's "
                "state (saved by an older version or without this callback); the estimate "
                "starts afresh",
            )
            return
        self._load(saved)
        if self.schedule is not None:
            self._check_resume_position(args, state)
            if self._applied_micro_batches is not None:
                # continue with the accumulation that was in effect
                args.gradient_accumulation_steps = self._applied_micro_batches

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        position, self._resume_position = self._resume_position, None
        if position:  # a resumed epoch continues where it stopped
            self._position = position
            return
        # state.epoch is the number of epochs completed (exact at an epoch's last step)
        self._epoch, self._position = round(state.epoch or 0), 0
        # the epoch's first micro-batch has index 0, a multiple of any accumulation
        self._apply(args)

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._position += 1

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._position += 1
        if self.schedule is None or self.tracker is None:
            return
        # the step's examples, as trained (an epoch's short last batch): tracker.examples lags
        # on the steps its measure_every leaves unmeasured, and micro-batches ×
        # micro_batch_size overcounted a smaller batch (two hunts)
        examples = self.tracker.examples_trained - self._examples_seen
        self._examples_seen += examples
        self.schedule.step(self.tracker, examples=examples)
        # the Trainer ends a step where (micro-batches of the epoch so far) % k == 0
        if self._position % self.schedule.num_micro_batches == 0:
            self._apply(args)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        # training logs only: evaluation and the end-of-run summary carry no "loss"
        if self.tracker is None or logs is None or "loss" not in logs or self.tracker.steps == 0:
            return
        values = self._metrics()
        logs.update(values)
        # Trainer.log appended a copy of the logs just before calling on_log
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._release()

    # -- ExportableState: saved in every checkpoint's trainer_state.json ---------------------------

    def state(self) -> dict[str, Any]:
        """Constructor arguments and the run's state, for ``trainer_state.json``.

        Arguments that are not JSON values (a schedule, a parameter-group mapping) are listed
        under ``unrestorable_args`` instead: the callback restores its state by itself, and a
        Trainer told to rebuild it (``restore_callback_states_from_checkpoint=True``) gets a
        callback that refuses to train without them.
        """
        saved_args: dict[str, Any] = {}
        unrestorable = ["schedule"] if self.schedule is not None else []
        for name, value in self.tracker_kwargs.items():
            value = str(value) if isinstance(value, Path) else value
            if _is_json(value):
                saved_args[name] = value
            else:
                unrestorable.append(name)
        return {
            "args": saved_args,
            "attributes": {"unrestorable_args": unrestorable, "checkpoint": self._snapshot()},
        }

    def _snapshot(self) -> dict[str, Any] | None:
        if self.tracker is None:
            return None
        return _json_plain(
            {
                "kind": STATE_KIND,
                "version": STATE_VERSION,
                "tracker": self.tracker.state_dict(),
                "schedule": self.schedule.state_dict() if self.schedule is not None else None,
                "applied_micro_batches": self._applied_micro_batches,
                "applied_lr_factor": self._applied_lr_factor,
                "scaled_groups": self._scaled_groups,
                "examples_seen": self._examples_seen,
                "epoch": self._epoch,
                "position": self._position,
            }
        )

    def _saved_state(self, state: Any) -> dict[str, Any] | None:
        """This callback's checkpoint in the state the Trainer loaded (or was rebuilt with)."""
        if self.checkpoint is not None:
            return self.checkpoint
        entry = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(entry, list):
            self._warn_once(
                "several",
                "the checkpoint holds the state of several NoiseScaleCallbacks and cannot tell "
                "which is this one; the estimate starts afresh",
            )
            return None
        if not isinstance(entry, dict):
            return None
        saved = entry.get("attributes", {}).get("checkpoint")
        return saved if isinstance(saved, dict) and saved.get("kind") == STATE_KIND else None

    def _load(self, saved: dict[str, Any]) -> None:
        assert self.tracker is not None
        if int(saved.get("version", 0)) > STATE_VERSION:
            raise NoiseScaleInputError(
                f"the checkpoint's noisescale state has version {saved['version']}, newer than "
                f"this noisescale reads ({STATE_VERSION}); upgrade noisescale"
            )
        self.tracker.load_state_dict(saved["tracker"])
        if self.schedule is not None:
            if saved["schedule"] is None:
                raise NoiseScaleInputError(
                    "the checkpoint was trained without a schedule; resume without one, or start "
                    "a new run"
                )
            self.schedule.load_state_dict(saved["schedule"])
        applied = saved["applied_micro_batches"]
        self._applied_micro_batches = None if applied is None else int(applied)
        self._applied_lr_factor = float(saved["applied_lr_factor"])
        scaled = saved.get("scaled_groups")
        self._scaled_groups = None if scaled is None else int(scaled)
        # (not in checkpoints before 2026-12-07: the tracker's count then, just loaded — 0
        # would count the whole run so far as the next step's examples)
        seen = saved.get("examples_seen")
        self._examples_seen = self.tracker.examples_trained if seen is None else int(seen)
        self._epoch, self._resume_position = int(saved["epoch"]), int(saved["position"])
        if self._train_batches is not None and self._resume_position >= self._train_batches:
            # saved at an epoch's last step: the run continues at the next epoch's start
            self._epoch, self._resume_position = self._epoch + 1, 0

    # -- adapting the batch ----------------------------------------------------------------------

    def _check_schedule(self, args: Any) -> None:
        assert self.schedule is not None
        if self.schedule.lr_rule != "none" and self._lr_scheduler is not None:
            # a scheduler that would drop the factor is refused now, not at the first change
            check_lr_schedulers([self._lr_scheduler])
        processes = int(getattr(args, "world_size", 1))
        micro = int(args.per_device_train_batch_size) * max(1, int(args.n_gpu)) * processes
        if self.schedule.micro_batch_size != micro:
            raise NoiseScaleInputError(
                f"the schedule's micro_batch_size is {self.schedule.micro_batch_size} but the "
                f"Trainer's micro-batch is {micro} examples (per_device_train_batch_size × "
                "devices × processes); build the schedule with that micro_batch_size"
            )
        if self._resume_position is None and args.gradient_accumulation_steps != 1:
            raise NoiseScaleInputError(
                "with a schedule, set gradient_accumulation_steps=1 in TrainingArguments: the "
                "Trainer sizes each epoch's loop for the accumulation it starts with, and the "
                f"schedule's (now {self.schedule.num_micro_batches}) must never be below it"
            )

    def _check_resume_position(self, args: Any, state: Any) -> None:
        """Refuse a resume whose data skip (computed by the Trainer) is not where the run was."""
        assert self._resume_position is not None
        epoch, position, batches = self._epoch, self._resume_position, self._train_batches
        if batches is None:
            raise NoiseScaleInputError(
                "cannot resume an adaptive-batch run whose training dataloader has no length: "
                "where the Trainer resumes cannot be checked against where the run was"
            )
        k = int(args.gradient_accumulation_steps)
        per_epoch = max(batches // k + int(batches % k > 0), 1)
        trainer_epoch = state.global_step // per_epoch
        trainer_position = 0 if args.ignore_data_skip else (state.global_step % per_epoch) * k
        if (trainer_epoch, trainer_position) != (epoch, position):
            raise NoiseScaleInputError(
                f"cannot resume this adaptive-batch run at step {state.global_step}: the run was "
                f"at micro-batch {position} of epoch {epoch}, but the Trainer resumes at "
                f"micro-batch {trainer_position} of epoch {trainer_epoch} (it assumes "
                f"gradient_accumulation_steps={k} for every step, and the schedule changed it). "
                "Resume from a checkpoint taken before the first change, or train with Lightning "
                "or a plain loop to resume adaptive runs"
            )

    def _apply(self, args: Any) -> None:
        """Give the Trainer the schedule's accumulation and learning-rate factor."""
        if self.schedule is None:
            return
        k = self.schedule.num_micro_batches
        args.gradient_accumulation_steps = k
        self._applied_micro_batches = k
        new_factor = self.schedule.lr_factor
        schedulers = [self._lr_scheduler] if self._lr_scheduler is not None else []
        # a group added since (progressive unfreezing) takes the factor from its own rate
        self._scaled_groups = carry_lr_factor(
            self._optimizer,
            self._applied_lr_factor,
            new_factor,
            schedulers,
            scaled_groups=self._scaled_groups,
        )
        self._applied_lr_factor = new_factor

    # -- hooks inside backward ------------------------------------------------------------------

    def _check_alive(self, module: nn.Module, args: Any) -> None:
        """Release the hooks when the model runs a forward with gradients after its Trainer run
        ended without ``on_train_end`` — it raised (an error in the data, a callback, a
        ``KeyboardInterrupt``): ``TrainerCallback`` has no hook for an exception. Until
        2026-12-07 the tracker stayed attached, and the user's own loop on the same model
        afterwards was measured into the failed run's history (and its file) as steps of it,
        every backward a step. The run is alive while the outermost frame of its Trainer's
        methods above ``on_train_begin`` (``train()``: that call, not the code — another
        Trainer's loop or ``trainer.training_step`` called by the user after the failure is
        not the run, a review of 2026-12-07) is on this thread's stack: a forward the run makes
        — a training step, an evaluation inside it, a callback, a subclass's method called from
        ``train()`` — is under it. Forwards in other threads are not judged
        (``nn.DataParallel``'s replicas). The hooks go at the end of the
        forward's backward (:meth:`_step`; removed inside a forward, the module's hooks already
        gathered are called without their keyword arguments) — that step not recorded —, or at
        the next ``train()``."""
        if self._loop is None or self._ended or not torch.is_grad_enabled():
            return
        if torch.compiler.is_compiling():
            return  # (a compiled model's trace: asking would break its graph; eager calls ask)
        loop, thread = self._loop
        if threading.get_ident() != thread:
            return
        frame = sys._getframe(1)
        while frame is not None:
            if frame is loop:
                return
            frame = frame.f_back  # type: ignore[assignment]
        self._ended = True
        self._warn_once(
            "ended",
            "noisescale: the Trainer's run ended without on_train_end (it raised); the "
            "NoiseScaleCallback releases its hooks at the end of this forward's backward, and "
            "neither it nor any step after it is recorded (callback.tracker keeps the run's "
            f"{len(self.tracker.history) if self.tracker is not None else 0} records); "
            "trainer.train() again measures a new run",
        )

    def _before_forward(self, module: nn.Module, args: Any, kwargs: dict) -> None:
        if (
            self._model_items is None
            and torch.is_grad_enabled()
            and kwargs.get("num_items_in_batch") is not None
        ):
            self._rng_before = _rng_states()  # (for _check_model_items, until it has run)
            # (and the buffers as this forward finds them: the probe repeats it from there — an
            # EMA buffer the forward updates and its loss reads made the probe's loss differ,
            # refused as depending on num_items_in_batch otherwise, a review of 2026-12-07)
            self._buffers_before = [b.detach().clone() for b in module.buffers()]

    def _on_forward(self, module: nn.Module, args: Any, kwargs: dict, output: Any) -> None:
        if not torch.is_grad_enabled() or self._ended:
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, Tensor) and loss.dim() == 0:
            items = kwargs.get("num_items_in_batch")
            if items is not None and loss.requires_grad and self.tracker is not None:
                self._measure_model_items(module, args, kwargs, loss, items)
            if self._watch_returned and self.tracker is not None:
                self.tracker.watch_loss(loss)
            loss = loss.detach()
            self._loss = loss if self._loss is None else self._loss + loss
            self._losses += 1
            if kwargs.get("num_items_in_batch") is not None:
                self._loss_over_items = True

    def _measure_model_items(
        self, module: nn.Module, args: Any, kwargs: dict, loss: Tensor, items: Any
    ) -> None:
        """A loss the model computes itself (not through a Hugging Face ``loss_function``,
        whose divisor is read) in a forward given ``num_items_in_batch``: the Trainer then
        divides nothing by the accumulation, taking the model to divide its summed loss by
        that number (its form). Whether it does is seen once (:meth:`_check_model_items`);
        where it does, each micro-batch is measured as a ``compute_loss_func`` in that form
        is: each unit its labels= count (a labelled example, or a token not -100, unshifted,
        as the Trainer counts them) weighs the gradient that reaches the loss over
        ``num_items_in_batch``. Until 2026-12-07 such a loss was read as each micro-batch's
        mean over its examples, undivided: with one example a micro-batch |G|², tr Σ and every
        norm k² too small under k accumulation steps without a word (and on steps after the
        audited ones, with more), under ``loss_reduction='sum'`` num_items_in_batch² too small,
        and refused as a mean over what it counts with a fix the model already applied."""
        assert self.tracker is not None
        pass_ = self.tracker.engine.current_pass()
        units = getattr(pass_, "units", None)
        if pass_ is None or (units is not None and units.measured):
            return  # (a Hugging Face loss_function's: measured with its own divisor)
        decided = self._model_items
        if decided is None:
            decided = self._model_items = self._check_model_items(module, args, kwargs, loss, items)
            if decided is None and loss.dim() == 0 and not bool(loss.detach() != 0):
                # a loss of exactly 0 tells nothing (a first micro-batch whose labels are all
                # -100): its pass is counted as the Trainer's form provisionally — it holds no
                # unit — and the next forward is checked (until a review of 2026-12-07 it was
                # left uncounted, and its step refused as the model's own loss backpropagated
                # in some micro-batches and not in others); a next check that finds the loss
                # ignoring num_items_in_batch refuses that step so, as before
                decided = "divides"
        if decided != "divides":
            return
        labels = kwargs.get("labels")
        if not self.tracker._tokens.measure_items_loss(loss, labels, items, module):
            shown = (
                f"a {labels.dtype} tensor of shape {tuple(labels.shape)}"
                if isinstance(labels, Tensor)
                else type(labels).__name__
            )
            self._release()  # (no tracker left on the model, the Trainer's functions restored)
            raise NoiseScaleInputError(
                "the model divides its loss by the num_items_in_batch the Trainer passes its "
                "forward (the Trainer's form: the step's summed loss over its count), which "
                "noisescale measures from the labels= it counts — class labels, one per "
                "example, or token labels [examples, tokens…] (those not -100) — but this "
                f"forward's labels= is {shown}. Compute the loss in a Trainer.compute_loss "
                "override that calls callback.tracker.count_tokens(labels) after the model's "
                "forward, with NoiseScaleCallback(loss_reduction='num_items_in_batch'), or "
                "return each micro-batch's mean over its examples (ignore num_items_in_batch)"
            )

    def _check_model_items(
        self, module: nn.Module, args: Any, kwargs: dict, loss: Tensor, items: Any
    ) -> str | None:
        """Whether the model's own loss divides by the ``num_items_in_batch`` its forward was
        given (``"divides"``) or ignores it (``"ignores"``: a model that takes ``**kwargs`` and
        returns each micro-batch's mean, as BERT, T5 and BART do — the multiplier the Trainer
        put on it is measured), seen as the ``compute_loss_func``'s is: the forward is run
        again without gradients, with twice that number and the same draws, the tracker
        paused and the model's buffers (BatchNorm's statistics) put back. A declaration the
        loss contradicts is refused, as is a loss that depends on that number otherwise.
        ``None``: nothing to tell yet (a loss of exactly 0)."""
        assert self.tracker is not None
        tracker = self.tracker
        before, self._rng_before = self._rng_before, None
        found, self._buffers_before = self._buffers_before, None
        # every buffer, by its module and name (a forward that assigns a new tensor, an EMA
        # written self.ema = 0.9 * self.ema + …, kept the probe's update until a review of
        # 2026-12-07), and the parameters' versions (one written in place in the forward, a
        # VQ-VAE's codebook, cannot be put back without a copy of every parameter: said)
        buffers = [
            (m, name, b, b.detach().clone())
            for m in module.modules()
            for name, b in m._buffers.items()
            if isinstance(b, Tensor)
        ]
        versions = [(name, p, p._version) for name, p in module.named_parameters()]

        def again() -> Any:
            try:
                if found is not None and len(found) == len(buffers):
                    for (_, _, b, _), value in zip(buffers, found, strict=True):
                        if b.shape == value.shape:
                            b.data.copy_(value)
                with tracker.paused():
                    out = module(*args, **{**kwargs, "num_items_in_batch": items * 2})
            finally:
                for m, name, b, saved in buffers:
                    # (through .data: a buffer the graph saved — BERT's token_type_ids,
                    # BatchNorm's statistics — keeps its version for the backward, which a
                    # copy_ into it broke; BatchNorm's own update does not count there either)
                    m._buffers[name] = b
                    b.data.copy_(saved)
                written = [name for name, p, v in versions if p._version != v]
                if written:
                    warnings.warn(
                        "noisescale: to tell whether the model's own loss divides by the "
                        "num_items_in_batch the Trainer passes it, NoiseScaleCallback ran the "
                        "model's forward once more, without gradients; that forward wrote "
                        f"into its parameters {written[:4]} in place, which keep that second "
                        "update (its buffers and random draws were put back). A forward with "
                        "side effects beyond buffers (parameters updated in place, counters, "
                        "caches) is run twice on the first step this way",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            return out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)

        ratio = _ratio_again(again, loss, before)
        if ratio is None:
            return None
        declared = tracker.loss_reduction
        message = None
        if math.isclose(ratio, 0.5, rel_tol=1e-4):
            if declared in ("mean", "num_items_in_batch"):
                return "divides"
            message = (
                "the model divides its loss by the num_items_in_batch the Trainer passes its "
                "forward (the Trainer's form: the step's summed loss over its count; doubling "
                f"num_items_in_batch halved it), but loss_reduction={declared!r} says it does "
                "not: |G|² and tr Σ would be measured wrong ('sum': by num_items_in_batch "
                "squared). Leave loss_reduction out, or declare 'num_items_in_batch': this "
                "form is measured exactly, its units counted from labels= (each labelled "
                "example, or each token not -100, unshifted, as the Trainer counts them)"
            )
        elif math.isclose(ratio, 1.0, rel_tol=1e-4):
            if declared != "num_items_in_batch":
                return "ignores"
            message = (
                "loss_reduction='num_items_in_batch' says the model divides its loss by the "
                "num_items_in_batch the Trainer passes its forward, but its loss does not "
                "change with it (a model that takes **kwargs and computes each micro-batch's "
                "mean itself, as BERT, T5 and BART do); declare loss_reduction='token_mean' "
                "for a mean over its tokens, or leave it out ('mean') for a mean over its "
                "examples"
            )
        else:
            message = (
                "the model's loss changes with the num_items_in_batch the Trainer passes its "
                f"forward, but not as its divisor (doubling it multiplied the loss by "
                f"{ratio:.4g}, neither 1/2 nor 1: a sum divided by it plus a term that is not, "
                "an auxiliary loss, or a divisor of its own beside it — or the forward draws "
                "from a torch.Generator of its own, which the check cannot repeat), so "
                "noisescale cannot "
                "tell how it weighs the examples; divide the whole loss by num_items_in_batch "
                "(the Trainer's form, measured exactly), or ignore it and return each "
                "micro-batch's mean over its examples"
            )
        self._release()  # (no tracker left on the model, the Trainer's functions restored)
        raise NoiseScaleInputError(message)

    def _on_grad(self, param: Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        # again at the end of the queue: after the callbacks queued during the pass (DDP's
        # finalize_backward, which writes the averaged gradients)
        torch.autograd.Variable._execution_engine.queue_callback(self._step)

    def _step(self) -> None:
        self._queued = False
        if self._ended:  # (a forward after the Trainer's run raised: _check_alive)
            self._loop = None
            self._release()
            return
        if not _sync_gradients():
            return
        assert self.tracker is not None
        lr = None
        if self._optimizer is not None:
            lr = learning_rate(self._optimizer)
        self.tracker.step(loss=self._step_loss(), lr=lr)

    def _step_loss(self) -> Tensor | None:
        """The step's loss as the Trainer logs it, from the model's micro-batch losses."""
        loss, self._loss = self._loss, None
        count, self._losses = self._losses, 0
        over_items, self._loss_over_items = self._loss_over_items, False
        if loss is None:
            return None
        if over_items:
            # each micro-batch's summed loss was divided by the step's item count (over all
            # processes with average_tokens_across_devices): the step's loss is their sum
            return loss * self._items_scale
        return loss / count

    # -- helpers -------------------------------------------------------------------------------

    def _check_sampler(self, args: Any, loader: Any = None) -> None:
        """Refuse a training sampler whose steps or micro-batches are not random draws.

        B_simple's estimate needs each step's examples to be independent draws from the data,
        and the micro-batch and data-parallel sources each part of a step (a micro-batch, a
        process's share) to be a random part of it. ``group_by_length`` puts sequences of
        similar length in one step (B_simple 15.7 [14.8, 16.9] tokens where the truth was 20.0,
        every example measured); ``batch_rebalance`` draws a step at random but sorts it by
        length into micro-batches and processes of different sizes (70.1 [64.8, 75.9] by
        default, 27.0 with sub-batches only; every example measured read 20.6 [20.0, 21.2],
        but the micro-batches' sizes weigh their examples by weights that depend on the data,
        which no estimate here allows: refused under accumulation).
        ``sequential`` keeps the dataset's order: right only for a dataset stored shuffled.
        """
        if isinstance(getattr(loader, "dataset", None), torch.utils.data.IterableDataset):
            return  # (the Trainer builds no sampler for a stream: its order is the stream's)
        strategy = getattr(args, "train_sampling_strategy", "random")
        if getattr(args, "group_by_length", False):  # (the older flag, where it exists)
            strategy = "group_by_length"
        fix = (
            "measure with train_sampling_strategy='random' (a short measurement run is enough "
            "to size the batch)"
        )
        if strategy == "group_by_length":
            raise NoiseScaleInputError(
                "train_sampling_strategy='group_by_length' puts sequences of similar length "
                "in the same step, so a step's examples are not independent draws and B_simple "
                f"would be biased (22% low in a test, every example measured); {fix}"
            )
        if strategy == "batch_rebalance":
            accumulation = int(getattr(args, "gradient_accumulation_steps", 1))
            world = int(getattr(args, "world_size", 1))
            if world > 1 or accumulation > 1:
                # (until 2026-12-05 every example measured without the micro-batch source was
                # accepted: but the micro-batches it sizes by length weigh their examples by
                # 1/(their size), weights that depend on the data, and the tracker then takes
                # the big batch within each micro-batch — which is not a random part)
                parts = "processes" if world > 1 else "accumulation micro-batches"
                raise NoiseScaleInputError(
                    "train_sampling_strategy='batch_rebalance' sorts each step's examples by "
                    f"length into {parts} of different sizes, so each is not a random part of "
                    "the step, which the estimate from micro-batches and sub-batches assumes "
                    "(B_simple 3.5× too high in a test), and each weighs its examples by "
                    "1/(its size), weights that depend on the data, which the step's gradient "
                    f"as the big batch does not allow; {fix}"
                )
        if strategy == "sequential":
            self._warn_once(
                "sequential",
                "train_sampling_strategy='sequential' keeps the dataset's order: B_simple is "
                "right only if the dataset is stored shuffled (each step's examples independent "
                "draws); otherwise use 'random'",
            )

    def _tracker_kwargs(self, args: Any) -> dict[str, Any]:
        kwargs = dict(self.tracker_kwargs)
        given = kwargs.pop("precondition", None)
        if given is not None and given is not False:
            kwargs["precondition"] = self._precondition(given)
        if int(getattr(args, "world_size", 1)) <= 1:
            return kwargs
        if getattr(args, "deepspeed", None):
            raise NoiseScaleInputError(
                "NoiseScaleCallback does not support DeepSpeed (it synchronises every "
                "micro-batch and partitions gradients); use DDP or FSDP2"
            )
        accumulation = args.accelerator_config.gradient_accumulation_kwargs or {}
        if accumulation.get("sync_each_batch"):
            raise NoiseScaleInputError(
                "sync_each_batch=True averages gradients after every micro-batch, so no process "
                "holds its local gradient for the data-parallel estimate; leave it off"
            )
        if int(getattr(args, "process_index", 0)) != 0:
            # every process computes the same history: one file, written by the first
            kwargs.pop("history_path", None)
        if "process_group" not in kwargs and torch.distributed.is_initialized():
            # The Trainer hands callbacks the unwrapped model; the processes' gradients are
            # averaged over the default group (DDP's, FSDP2's)
            kwargs["process_group"] = torch.distributed.group.WORLD
        return kwargs

    def _precondition(self, given: Any) -> Any:
        """The Trainer's optimizer for ``precondition=True``; an optimizer given is accepted
        only if it is the Trainer's (after accelerate's wrapper): the Trainer steps its own,
        and the preconditioner of one that never steps never starts (until 2026-12-05 such a
        run was measured plain throughout, and estimate() gave the plain B_simple)."""
        trainers = unwrap_optimizer(self._optimizer) if self._optimizer is not None else None
        if trainers is None:
            raise NoiseScaleInputError(
                "precondition= needs the Trainer's optimizer, and the Trainer passed none to the "
                "callback's on_train_begin"
            )
        if given is True:
            return trainers
        return stepped_optimizer(
            given,
            [trainers],
            "the optimizer the Trainer",
            f"its {type(trainers).__name__}, built from args.optim or given as "
            "Trainer(optimizers=(optimizer, scheduler))",
            "the Trainer's optimizer (or give yours to the Trainer)",
        )

    def _metrics(self) -> dict[str, float]:
        assert self.tracker is not None
        values = estimate_metrics(
            self.tracker.estimate(),
            self.schedule,
            self._applied_micro_batches,
            self._applied_lr_factor,
        )
        # JSON (trainer_state.json) has no NaN/inf: leave out what is not yet available
        return {k: float(v) for k, v in values.items() if math.isfinite(v)}

    def _move_ahead_of_reporters(self, args: Any) -> None:
        """Put this callback first in the Trainer's list, before TensorBoard, W&B, … ."""
        handler = self._calling_handler()
        if handler is not None:
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)
        elif getattr(args, "report_to", None):
            self._warn_once(
                "order",
                "NoiseScaleCallback could not find the Trainer's callback list to move ahead of "
                "the reporting callbacks, so noisescale/* values reach trainer.state.log_history "
                "but may miss TensorBoard, W&B, …; put it first yourself: "
                "trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(callback))",
            )

    def _calling_handler(self) -> CallbackHandler | None:
        """The ``CallbackHandler`` whose ``call_event`` is running this hook, if any."""
        handler = _caller_of_type(CallbackHandler, 8)
        if handler is None or not any(cb is self for cb in handler.callbacks):
            return None
        return handler

    def _watch_trainer_loss(self, args: Any) -> None:
        """Measure how the Trainer weighs each micro-batch's loss. The Trainer divides it by
        the accumulation only when it believes it is not normalised over the step already
        (``loss_is_scaled_for_ga``): a model that accepts loss kwargs but computes its loss
        itself (BERT, T5), a ``compute_loss`` override returning a mean, a label smoother,
        would otherwise be assumed divided by k where they are not (|G|² and tr Σ k² too
        large). So the micro-batch's whole loss is watched where it is computed — the model's
        returned loss under the Trainer's own ``compute_loss``, an override's return value, a
        ``compute_loss_func``'s — (the gradient that reaches it is the Trainer's multiplier),
        and the label smoother (``label_smoothing_factor``), which
        computes a loss over tokens outside the model from labels the model never sees, is
        measured as the model's own ``loss_function`` is. A ``compute_loss_func`` is refused
        unless ``loss_reduction`` says how it weighs the examples."""
        assert self.tracker is not None
        self._watch_returned = False
        trainer = self._calling_trainer()
        if trainer is None:
            if float(getattr(args, "label_smoothing_factor", 0.0) or 0.0) > 0:
                raise NoiseScaleInputError(
                    "NoiseScaleCallback could not reach the Trainer to measure its label "
                    "smoother (label_smoothing_factor > 0), which weighs tokens outside the model; "
                    "use the callback with transformers.Trainer itself"
                )
            self._warn_once(
                "no-trainer",
                "NoiseScaleCallback could not reach the Trainer, so a loss computed outside the "
                "model (compute_loss_func, a compute_loss override) is taken to be each "
                "micro-batch's mean divided by the accumulation",
            )
            return
        if (
            getattr(trainer, "compute_loss_func", None) is not None
            and "loss_reduction" not in self.tracker_kwargs
        ):
            self._release()  # (no tracker left on the model)
            raise NoiseScaleInputError(
                "the Trainer has a compute_loss_func, whose loss noisescale cannot see into: "
                "the Trainer takes the labels out of the batch before the model's forward "
                "and expects the function to normalise its loss over the whole step by "
                "num_items_in_batch (it does not divide by the accumulation then), which a "
                "mean over examples, a mean over tokens and a sum over tokens do differently. "
                "Say which: NoiseScaleCallback(loss_reduction='num_items_in_batch') if it "
                "returns the Trainer's form, the sum of the examples' losses divided by "
                "num_items_in_batch (one label per example: measured exactly); "
                "loss_reduction='mean' if it returns each micro-batch's mean over its examples "
                "(the weights of the Trainer's scaling are measured). On the first step the "
                "function is called once more with another num_items_in_batch, and a "
                "declaration the loss contradicts is refused. A loss over tokens cannot be "
                "measured here (its tokens cannot be counted): compute it in the model "
                "(labels=) or in a Trainer.compute_loss override that calls "
                "callback.tracker.count_tokens(labels)"
            )
        tracker = self.tracker
        from transformers import Trainer

        smoother_or_func = getattr(trainer, "label_smoother", None) or getattr(
            trainer, "compute_loss_func", None
        )

        own = type(trainer).compute_loss is Trainer.compute_loss
        if own:
            # the Trainer's own compute_loss: the model's returned loss is the micro-batch's
            # whole loss (unless a label smoother or compute_loss_func computes it), watched as
            # the model returns it (_on_forward) — before compute_loss multiplies it in place by
            # the processes (average_tokens_across_devices), which is part of the multiplier
            self._watch_returned = smoother_or_func is None
        else:
            # an override: what it returns is the micro-batch's loss (a model's loss in it may
            # be one term of it)
            compute_loss = trainer.compute_loss
            processes = _processes_in_items(trainer, args)

            def watched(*a: Any, **kw: Any) -> Any:
                out = compute_loss(*a, **kw)
                tracker.watch_loss(out[0] if isinstance(out, tuple) else out)
                items = kw["num_items_in_batch"] if "num_items_in_batch" in kw else _arg(a, 3)
                _give_items_divisor(tracker, items, processes)
                return out

            self._restore.append((trainer, "compute_loss", trainer.__dict__.get("compute_loss")))
            trainer.compute_loss = watched
        loss_func = getattr(trainer, "compute_loss_func", None)
        if loss_func is not None:
            # watched as it returns, before compute_loss multiplies it in place

            unchecked = [True]  # the function's divisor is checked on its first call

            def watched_func(*a: Any, **kw: Any) -> Any:
                # (the generators as the call found them: the probe draws what it drew)
                before = _rng_states() if unchecked else None
                out = loss_func(*a, **kw)
                labels = kw["labels"] if "labels" in kw else _arg(a, 1)
                items = kw["num_items_in_batch"] if "num_items_in_batch" in kw else _arg(a, 2)
                if unchecked and torch.is_grad_enabled() and items is not None:
                    unchecked.clear()
                    self._check_loss_func(loss_func, a, kw, out, labels, items, before)
                measured = tracker.loss_reduction == "num_items_in_batch" and (
                    tracker._tokens.measure_items_loss(out, labels, items)
                )
                if not measured:
                    tracker.watch_loss(out)
                return out

            self._restore.append((trainer, "compute_loss_func", loss_func))
            trainer.compute_loss_func = watched_func
        smoother = getattr(trainer, "label_smoother", None)
        if smoother is not None:
            trainer.label_smoother = tracker.wrap_label_smoother(smoother)
            self._restore.append((trainer, "label_smoother", smoother))
            tracker._trainer_loss_outside = "label_smoothing_factor"
        if getattr(trainer, "compute_loss_func", None) is not None:
            tracker._trainer_loss_outside = "compute_loss_func"

    def _check_loss_func(
        self,
        loss_func: Any,
        a: tuple,
        kw: dict,
        out: Any,
        labels: Any,
        items: Any,
        before: Any = None,
    ) -> None:
        """Refuse a ``loss_reduction`` the ``compute_loss_func`` contradicts. Whether it divides
        by ``num_items_in_batch`` is seen by calling it again, without gradients, with twice
        that number: its loss halves, or stays. Until 2026-12-05 the Trainer's own form (a sum
        divided by num_items_in_batch) was measured under 'mean' with |G|² and tr Σ k² too
        small under k accumulation steps, and under 'sum' (1/num_items_in_batch)² off."""
        if not isinstance(out, Tensor) or out.dim() != 0:
            return
        if "num_items_in_batch" in kw or len(a) < 3:
            again_a, again_kw = a, {**kw, "num_items_in_batch": items * 2}
        else:
            again_a, again_kw = (*a[:2], items * 2, *a[3:]), kw
        ratio = _ratio_again(lambda: loss_func(*again_a, **again_kw), out, before)
        if ratio is None:
            return
        divides = math.isclose(ratio, 0.5, rel_tol=1e-4)
        ignores = math.isclose(ratio, 1.0, rel_tol=1e-4)
        declared = self.tracker_kwargs.get("loss_reduction")
        message = None
        if divides and declared != "num_items_in_batch":
            tokens = isinstance(labels, Tensor) and labels.dim() >= 2
            fix = (
                "a loss over tokens cannot be measured through compute_loss_func (its tokens "
                "cannot be counted): compute it in the model (labels=) or in a "
                "Trainer.compute_loss override that calls callback.tracker.count_tokens(labels)"
                if tokens
                else "declare loss_reduction='num_items_in_batch', which measures this form "
                "exactly, or return each micro-batch's mean and keep 'mean'"
            )
            message = (
                "the compute_loss_func divides its loss by num_items_in_batch (the Trainer's "
                f"form: the step's sum divided by its count), but loss_reduction={declared!r} "
                "says it does not: |G|² and tr Σ would be measured wrong ('mean': k² too small "
                "under k accumulation steps; 'sum': by num_items_in_batch squared); " + fix
            )
        elif ignores and declared == "num_items_in_batch":
            message = (
                "loss_reduction='num_items_in_batch' says the compute_loss_func divides its "
                "loss by num_items_in_batch, but its loss does not change with it; declare "
                "loss_reduction='mean' if it returns each micro-batch's mean over its examples, "
                "or 'sum' for a plain sum"
            )
        elif min(abs(ratio - 0.5), abs(ratio - 1.0)) > 0.02:
            # (until 2026-12-05 measured under whatever was declared, without a word; a term
            # that does not depend on the parameters — label noise, a constant — moves the
            # ratio a little without changing the gradient: not refused below 2%)
            message = (
                "the compute_loss_func's loss changes with num_items_in_batch, but not as its "
                f"divisor (doubling num_items_in_batch multiplied the loss by {ratio:.4g}, "
                "neither 1/2 nor 1: a sum divided by it plus a term that is not, or a divisor "
                "of its own beside it), so noisescale cannot tell how it weighs the examples; "
                "return each micro-batch's mean over its examples (loss_reduction='mean'), a "
                "plain sum ('sum') or the examples' summed loss divided by num_items_in_batch "
                "('num_items_in_batch')"
            )
        if message is not None:
            self._release()  # (no tracker left on the model, the Trainer's functions restored)
            raise NoiseScaleInputError(message)

    def _calling_trainer(self) -> Any | None:
        """The ``transformers.Trainer`` whose method is running this hook, if any."""
        from transformers import Trainer

        return _caller_of_type(Trainer, 12)

    def _release(self) -> None:
        self._loop = None  # (the frame of train(), held while the run lives: _check_alive)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for obj, name, previous in reversed(self._restore):
            if previous is None:
                obj.__dict__.pop(name, None)  # (the class's method again)
            else:
                setattr(obj, name, previous)
        self._restore.clear()
        self._watch_returned = False
        if self.tracker is not None:
            self.tracker.remove()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


def _arg(args: tuple, index: int) -> Any:
    return args[index] if len(args) > index else None


def _processes_in_items(trainer: Any, args: Any) -> int:
    """How many processes' tokens the Trainer's ``num_items_in_batch`` counts and its own
    ``compute_loss`` multiplies the loss by (``average_tokens_across_devices``): a
    ``compute_loss`` override that divides by that count multiplies by it too (as the docs
    ask), so each token weighs that number / ``num_items_in_batch``."""
    if not getattr(args, "average_tokens_across_devices", False):
        return 1
    if int(getattr(args, "world_size", 1)) <= 1:
        return 1
    n_gpu = int(getattr(args, "n_gpu", 1) or 1)
    if n_gpu > 1:
        return n_gpu
    processes = int(getattr(getattr(trainer, "accelerator", None), "num_processes", 1))
    tp = getattr(trainer, "get_tp_size", None)
    return processes // int(tp()) if callable(tp) else processes


def _give_items_divisor(tracker: GradientNoiseTracker, items: Any, processes: int) -> None:
    """With ``loss_reduction="num_items_in_batch"``: the divisor of the pass's summed token
    loss is the ``num_items_in_batch`` the Trainer passed to the ``compute_loss`` override
    (over the processes: divided by their number, which the loss is multiplied by), not the
    tokens counted — the Trainer counts GPT-2's unshifted labels where the loss shifts them,
    and under data parallelism every process's tokens (until 2026-12-05 |G|² and tr Σ read
    (counted / num_items_in_batch)² off in one process, and b_big, |G_big|², tr Σ up to 91%
    off under DDP, without a word)."""
    if tracker.loss_reduction != "num_items_in_batch" or items is None:
        return
    if not isinstance(items, (Tensor, int, float)):
        return
    pass_ = tracker.engine.current_pass()
    units = getattr(pass_, "units", None)
    if units is None or units.measured or units.denominator is not None:
        return  # not counted (refused at the step), measured, or given by count_tokens()
    units.denominator = items / processes if processes != 1 else items


def _ratio_again(call: Any, out: Tensor, before: Any) -> float | None:
    """What ``call()`` — the call that returned the 0-d loss ``out``, repeated without gradients
    with twice its ``num_items_in_batch`` — returns over ``out``: ½ for a loss divided by it, 1
    for one that ignores it. ``before``: torch's generators as that call found them (the
    repeat draws what it drew). ``None`` where there is nothing to tell (not a 0-d tensor, a
    loss of exactly 0)."""
    # (torch's generators as they were after: a loss that draws — label noise, sampled
    # softmax — leaves the run's later draws what they would be without the callback)
    devices = [out.device.index or 0] if out.device.type == "cuda" else []
    after = _rng_states()  # (Python's and NumPy's, which fork_rng leaves alone)
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        if before is not None:
            # the same draws as the call it repeats (label noise drawn anew moved the ratio
            # by its own amount, and a loss that ignores num_items_in_batch was refused; a
            # review found it)
            _set_rng_states(before, devices)
        try:
            again = call()
        finally:
            _set_rng_states(after, devices)
    if not isinstance(again, Tensor) or again.dim() != 0:
        return None
    ratio = float(again.detach().double() / out.detach().double())
    return ratio if math.isfinite(ratio) else None


def _trainer_frame() -> Any | None:
    """The outermost running frame of a method of the ``transformers.Trainer`` that called the
    callback handler running this hook (``train()``), if any: that Trainer is the ``self`` of
    the nearest of 12 frames above the hook's caller that has a Trainer as ``self``."""
    from transformers import Trainer

    frame = sys._getframe(2)
    for _ in range(12):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            return None
        trainer = frame.f_locals.get("self")
        if isinstance(trainer, Trainer):
            break
    else:
        return None
    outermost = frame
    while frame is not None:
        if frame.f_locals.get("self") is trainer:
            outermost = frame
        frame = frame.f_back  # type: ignore[assignment]
    return outermost


def _caller_of_type(kind: type, depth: int) -> Any | None:
    """The ``self`` of the nearest of ``depth`` frames above the hook that called this (the
    hook's caller's caller onwards) that is a ``kind``, if any."""
    frame = sys._getframe(2)
    for _ in range(depth):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, kind):
            return owner
    return None


def _length(loader: Any) -> int | None:
    """Batches per epoch of the Trainer's dataloader (``None`` for iterable datasets)."""
    try:
        return len(loader)
    except TypeError:
        return None


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _json_plain(x: Any) -> Any:
    """``x`` with NumPy scalars and arrays as Python numbers and lists (``trainer_state.json``
    is written with ``json.dumps``, which keeps NaN and infinities)."""
    import numpy as np

    if isinstance(x, dict):
        return {k: _json_plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_plain(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x
