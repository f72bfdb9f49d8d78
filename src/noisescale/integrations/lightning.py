"""Lightning callback: B_simple every optimizer step, and an adaptive batch through accumulation.

Usage::

    from noisescale.integrations.lightning import NoiseScaleCallback

    callback = NoiseScaleCallback()
    trainer = lightning.Trainer(callbacks=[callback], gradient_clip_val=1.0)
    trainer.fit(model, loader)
    callback.tracker.estimate()

Where the measurement happens. Lightning's precision plugin runs the training-step closure
(forward and backward), then — for 16-bit AMP — ``scaler.unscale_(optimizer)``, then the
``on_before_optimizer_step`` hooks, and only then gradient clipping (``Precision._after_closure``
in ``lightning/pytorch/plugins/precision/precision.py``). So ``on_before_optimizer_step`` sees the
accumulated gradients of all of the step's micro-batches, unscaled and unclipped: the tracker
steps there. Under manual optimisation ``opt.step()`` runs those hooks, so a clip of the user's
before it comes first: refused, naming the fix (automatic optimisation's
``gradient_clip_val``, or a tracker of one's own stepped before the clip).

What the tracker measures is the module whose ``forward`` the ``training_step`` calls: by
default the ``LightningModule`` itself (``self(x)`` in ``training_step``); if ``training_step``
calls a submodule instead (``self.net(x)``), pass ``module="net"``.

Logging. Every ``log_every`` optimizer steps the callback logs ``noisescale/b_simple`` (with
``_low``/``_high``), ``noisescale/g2``, ``noisescale/trace_sigma`` (and with a schedule
``noisescale/batch_size``, ``noisescale/lr_factor``) through ``LightningModule.log_dict``, so
they reach every logger of the trainer (TensorBoard, CSV, Weights & Biases, …) under Lightning's
own step (optimizer steps before this one), at its ``log_every_n_steps`` cadence.

Reuse and resume. Every ``fit`` builds a new tracker on its module (after removing the previous
one's hooks), so a callback reused for a second model or a tuner's trial measures that model.
The tracker, the schedule and what the callback applied are in its ``state_dict``, which
Lightning saves in the ``.ckpt`` and restores with ``fit(..., ckpt_path=...)``: the estimates,
the batch and the learning rate continue as if the run had not stopped (tested from an epoch
boundary). Under a DDP strategy the tracker measures each process's local gradient against
the averaged one (paper App. A.1; the callback gives it the default process group, since
``setup`` sees the module before the strategy wraps it), and only the first process writes
``history_path``. Precision: ``"bf16-mixed"`` works (tested on GPT-2 against ``"32-true"``); with
``"16-mixed"`` the trainer's ``GradScaler`` is divided out.

Adapting the batch. Lightning realises a batch of k micro-batches with
``Trainer.accumulate_grad_batches = k`` (the loss is divided by k for you). The trainer zeroes
gradients at batch indices divisible by k and steps when the epoch's batch count is, so k can
change between optimizer steps only where the epoch's batch count so far is a multiple of the new
k (always at an epoch start); the callback applies a schedule's decision at the first such step
boundary (at most k − 1 steps late) and writes the learning-rate factor at the same moment. A
schedule counts global examples, as the tracker's B_simple and example count do: its
``micro_batch_size`` must equal the dataloader's (per-process) batch size × the number of
processes (checked when training starts), and each process then accumulates
``schedule.num_micro_batches`` of its micro-batches, so the global batch is the schedule's (the
Hugging Face callback follows the same convention). Schedulers that were
sized from ``trainer.estimated_stepping_batches`` (e.g. ``OneCycleLR``) were sized for the
starting accumulation.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from noisescale.errors import GradientsChangedError, NoiseScaleInputError
from noisescale.integrations import (
    drawn_without_replacement,
    estimate_metrics,
    refuse_batch_sampler,
    stepped_optimizer,
)
from noisescale.module_hooks import Hook
from noisescale.preconditioning import learning_rate, unwrap_optimizer
from noisescale.schedule import (
    AdaptiveBatchSize,
    BatchSizeRamp,
    carry_lr_factor,
    check_lr_schedulers,
)
from noisescale.tracker import GradientNoiseTracker

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package of the same code
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(
            "noisescale.integrations.lightning needs Lightning: "
            "pip install 'noisescale[integrations]'"
        ) from exc

__all__ = ["NoiseScaleCallback"]


class NoiseScaleCallback(pl.Callback):
    """Measures B_simple in a Lightning run and optionally adapts the batch size.

    Args:
        schedule: An :class:`AdaptiveBatchSize` or :class:`BatchSizeRamp` to drive through
            ``accumulate_grad_batches`` (constructed without ``optimizer``: the callback writes
            the learning rate when it applies a change). ``None`` only measures.
        module: Dotted name of the submodule whose ``forward`` the ``training_step`` calls;
            ``None`` for the ``LightningModule`` itself.
        log_every: Log ``noisescale/*`` metrics every this many optimizer steps (each log reads
            the estimate, one host synchronisation); 0 turns logging off.
        **tracker_kwargs: Passed to :class:`GradientNoiseTracker` (``loss_reduction``,
            ``per_example``, ``beta``, ``history_path``, …). The AMP scaler is taken from the
            trainer. ``precondition=True`` measures the noise scale preconditioned by the
            LightningModule's own optimizer (an Adam, AdamW or RMSprop returned by
            ``configure_optimizers``; the tracker is then built in ``on_fit_start``, once the
            optimizer exists); an optimizer passed here must be the one the trainer steps.
    """

    def __init__(
        self,
        schedule: AdaptiveBatchSize | BatchSizeRamp | None = None,
        *,
        module: str | None = None,
        log_every: int = 50,
        **tracker_kwargs: Any,
    ) -> None:
        if schedule is not None and schedule.optimizer is not None:
            raise NoiseScaleInputError(
                "give the schedule no optimizer: the callback writes the learning rate itself, "
                "when the trainer can take the new batch size"
            )
        refuse_batch_sampler(schedule, "Trainer.accumulate_grad_batches")
        if log_every < 0:
            raise NoiseScaleInputError(f"log_every must be at least 0, got {log_every}")
        if "scaler" in tracker_kwargs:
            raise NoiseScaleInputError("the AMP scaler is taken from the trainer; do not pass one")
        self.schedule = schedule
        self.module = module
        self.log_every = log_every
        self.tracker_kwargs = tracker_kwargs
        self.tracker: GradientNoiseTracker | None = None
        self._loss: Tensor | None = None
        self._stepped = False
        self._stepped_optimizer: Any = None
        self._examples_seen = 0  # tracker.examples_trained at the last step
        self._applied_micro_batches: int | None = None  # set once the trainer has one of ours
        self._applied_lr_factor = 1.0
        # per optimizer, the groups that carry the applied factor (None: all of them)
        self._scaled_groups: list[int | None] = []
        self._pending_state: dict[str, Any] | None = None
        self._forward_handle: Any = None  # set while a fit is set up
        self._forwards = 0  # forward calls of the measured module with gradients, this step
        # manual optimisation: each of the step's losses' trailing divisors, and the step's
        # divisor decided from them (_decide_divisor)
        self._divisors: list[list[float]] = []
        self._divisor = 1.0
        # the divisor read exactly from a step of k ≥ 2 losses each divided last by k (the
        # loop's accumulation), for a later step over more or fewer losses (_decide_divisor)
        self._accumulation: float | None = None
        self._warned: set[str] = set()

    # -- set-up --------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # every fit measures its own module: a callback reused for a second fit (a new model, a
        # tuner's trial) lets go of the previous one
        self._release()
        if self.tracker_kwargs.get("precondition") is True:
            # the LightningModule's optimizer is made by configure_optimizers, after setup: the
            # tracker is built in on_fit_start, when trainer.optimizers holds it
            self.tracker = None
            return
        self._build(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        given = self.tracker_kwargs.get("precondition")
        if given is True:
            self._build(trainer, pl_module)
        elif given is not None and given is not False:
            _check_module_optimizer(trainer, given)

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A new tracker on the measured module (and a checkpoint's state, if one was loaded)."""
        target: nn.Module = (
            pl_module if self.module is None else pl_module.get_submodule(self.module)
        )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.tracker = GradientNoiseTracker(target, scaler=scaler, **self._tracker_kwargs(trainer))
        self._forward_handle = target.register_forward_pre_hook(Hook(self._on_forward))
        self._forwards, self._divisors, self._accumulation = 0, [], None
        self._loss, self._stepped = None, False
        self._examples_seen = 0
        self._applied_micro_batches, self._applied_lr_factor = None, 1.0
        self._scaled_groups = []
        if self._pending_state is not None:
            self._load(self._pending_state)
            self._pending_state = None
        elif trainer.ckpt_path is None and self.schedule is not None and self.schedule.state.step:
            raise NoiseScaleInputError(
                f"the schedule has already taken {self.schedule.state.step} steps in an earlier "
                "fit; give the callback a new schedule for a new run (a resume restores the "
                "schedule from the checkpoint)"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed run continues with the accumulation that was in effect (possibly mid-epoch,
        # where a pending change may not be applicable yet); a fresh one gets the schedule's
        # start at the first epoch start.
        self._check_sampler(trainer)
        if self.schedule is not None:
            self._check_accumulation_control(trainer, pl_module)
            self._check_micro_batch(trainer)
        if self.schedule is not None and self.schedule.lr_rule != "none":
            # a scheduler that would drop the factor is refused now, not at the first change
            check_lr_schedulers(c.scheduler for c in trainer.lr_scheduler_configs)
        if self.schedule is not None and self._applied_micro_batches is not None:
            trainer.accumulate_grad_batches = self._applied_micro_batches

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the epoch's first batch has index 0, divisible by any accumulation
        self._apply(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning calls no teardown when a fit raises (a refusal, an interrupt): the model
        # kept the tracker's hooks and its engine lived on, walking every later backward of
        # any model in the process (until 2026-12-07). Released as the tracker's own with
        # block releases it on an error: what was pending stays pending, the error is the fit's.
        if self._forward_handle is not None:
            self._forward_handle.remove()
            self._forward_handle = None
        if self.tracker is not None:
            self.tracker.__exit__(type(exception), exception, exception.__traceback__)

    # -- measurement ---------------------------------------------------------------------------

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        # Lightning has already divided each micro-batch's loss by accumulate_grad_batches, so
        # the sum over the step's micro-batches is the step's mean loss (kept on the device).
        # That division is by the full count even in an epoch's short last window: the
        # tracker measures it rather than assume the window's own count. Manual optimisation
        # hands over the user's loss, divided by the accumulation or not: what it was divided
        # by is decided at the step, when its number of losses k is known (_decide_divisor;
        # until 2026-12-06 a loss not divided was assumed divided by k: |G|² and tr Σ k² too
        # large, and then a mean's own count, sum / len(x), was read as the accumulation's:
        # N² too large; two hunts)
        divided_by: Any = trainer.accumulate_grad_batches
        if not pl_module.automatic_optimization:
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            self._divisors.append(_trailing_divisors(loss, scaled=scaler is not None))
            divided_by = self._step_divisor
        self._require_tracker().watch_loss(loss, divided_by=divided_by)
        loss = loss.detach()
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        tracker = self._require_tracker()
        if self._loss is None and pl_module.automatic_optimization:
            # training_step returned None for every batch of this step (skipped): no backward
            # ran, the optimizer has nothing to apply, and there is nothing to measure
            self._forwards = 0
            return
        if self._stepped and (not self._forwards or optimizer is not self._stepped_optimizer):
            # (each optimizer after its own forward, a GAN's generator then discriminator: two
            # objectives' gradients, measured as two steps and averaged into one estimate
            # until 2026-12-05, a helper found)
            raise NoiseScaleInputError(
                "a second optimizer step in one training batch (several optimizers stepped in "
                "one training_step): the tracker measures one optimizer step per batch, the "
                "gradient of the backward passes before it; step one optimizer per batch (or "
                "one over all the parameters), or measure with a GradientNoiseTracker in a "
                "loop of your own, stepping it before the first optimizer step"
            )
        if not self._forwards:
            where = "the LightningModule" if self.module is None else f"'{self.module}'"
            raise NoiseScaleInputError(
                f"no forward call of {where} was seen in this step: training_step must call it "
                "(e.g. self(x)), or pass module='<the submodule training_step calls>'"
            )
        if not pl_module.automatic_optimization:
            self._divisor = self._decide_divisor()
        try:
            tracker.step(loss=self._loss, lr=learning_rate(optimizer))
        except GradientsChangedError as err:
            if pl_module.automatic_optimization:
                raise
            # (the user's clip ran before opt.step(), which runs this hook: until 2026-12-06
            # the tracker's message told a callback user to call tracker.step(), a hunt)
            raise GradientsChangedError(
                "the gradients were changed after the last backward pass of this step and "
                "before opt.step() (self.clip_gradients(), clip_grad_norm_, a rescale of "
                ".grad): under manual optimization (automatic_optimization=False) Lightning runs "
                "on_before_optimizer_step, where NoiseScaleCallback measures the step, inside "
                "opt.step() — after your clip — and the clipped .grad no longer matches the "
                "examples' gradients measured in the backward passes. Clip with automatic "
                "optimization instead (Trainer(gradient_clip_val=...): the callback reads the "
                "gradients before Lightning clips them), or drop the callback and measure with "
                "a GradientNoiseTracker of your own, calling its step() in training_step right "
                "before the clip. Nothing of this step was recorded"
            ) from err
        self._loss, self._forwards = None, 0
        self._stepped = True
        self._stepped_optimizer = optimizer

    def _step_divisor(self) -> float:
        return self._divisor

    def _decide_divisor(self) -> float:
        """Manual optimisation: what each of the step's k losses handed to ``manual_backward``
        was divided by, from the constants they were divided by last. One loss: nothing to
        decide (1, either reading). A trailing k on every loss: k, the loop's accumulation;
        none on any: 1 (not divided). A trailing accumulation read so on an earlier step, on
        every loss of a step of another number: that accumulation (``batch_idx`` restarts each
        epoch, so ``opt.step()`` at ``(batch_idx + 1) % k == 0`` steps across an epoch's end over
        more or fewer losses, each divided by k: until 2026-12-07 assumed divided by their
        number, |G|² 2.25× off with 3 losses / 2, the integrations fuzzer). Any other constant
        (a mean's own count, sum / len(x), or a weight) may be the loss's own normalisation,
        not the accumulation's: k is assumed, as in a plain loop, with a warning."""
        divisors, self._divisors = self._divisors, []
        k = len(divisors)
        if k <= 1 or not any(divisors):
            return 1.0

        def every_loss_by(divisor: float) -> bool:
            return all(any(math.isclose(c, divisor) for c in d) for d in divisors)

        if every_loss_by(k):
            self._accumulation = float(k)
            return float(k)
        if self._accumulation is not None and every_loss_by(self._accumulation):
            return self._accumulation
        self._warn_once(
            "manual_divisor",
            f"manual optimisation: a step backpropagated {k} losses, divided last by constants "
            "that are not their number (a mean written by hand, sum / len(x), or a weight; or "
            "a step across an epoch's end before any step whose losses were each divided by "
            "their number: batch_idx restarts each epoch, so opt.step() at (batch_idx + 1) % "
            "n == 0 steps over more or fewer losses): whether they were divided by the "
            f"accumulation cannot be told, so each is assumed divided by {k}, as in a plain "
            "loop (|G|² and tr Σ are off by the square of the factor if not; B_simple is not). "
            "To have it measured, divide each loss by the number of micro-batches last (loss / "
            "k right before manual_backward), or measure with a GradientNoiseTracker of your "
            "own and call tracker.watch_loss(loss) before that division",
        )
        return float(k)

    def _on_forward(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            self._forwards += 1

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._stepped:
            return
        self._stepped = False
        tracker = self._require_tracker()
        if self.schedule is not None:
            # the step's examples, as trained (an epoch's short last batch, batches of varying
            # size): tracker.examples lags on the steps its measure_every leaves unmeasured,
            # and micro-batches × micro_batch_size overcounted every smaller batch (two hunts)
            examples = tracker.examples_trained - self._examples_seen
            self._examples_seen += examples
            self.schedule.step(tracker, examples=examples)
            ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            # the next batch has index `ready`: a new accumulation k must divide it (see module
            # docstring), else Lightning would skip a zero_grad or step after too few batches
            if ready % self.schedule.num_micro_batches == 0:
                self._apply(trainer)
        if self.log_every and tracker.steps % self.log_every == 0:
            pl_module.log_dict(self._metrics(), on_step=True, on_epoch=False)

    # -- checkpointing ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # Plain Python values only: Lightning loads checkpoints with torch.load(weights_only=True),
        # which refuses NumPy scalars.
        return _plain(
            {
                "tracker": self.tracker.state_dict() if self.tracker is not None else None,
                "schedule": self.schedule.state_dict() if self.schedule is not None else None,
                "applied_micro_batches": self._applied_micro_batches,
                "applied_lr_factor": self._applied_lr_factor,
                "scaled_groups": self._scaled_groups,
                "examples_seen": self._examples_seen,
                "manual_accumulation": self._accumulation,
            }
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._forward_handle is None:  # not set up for a fit yet: load in setup
            self._pending_state = state_dict
        else:
            self._load(state_dict)

    # -- helpers -------------------------------------------------------------------------------

    def _tracker_kwargs(self, trainer: pl.Trainer) -> dict[str, Any]:
        kwargs = dict(self.tracker_kwargs)
        if kwargs.get("precondition") is False:
            kwargs.pop("precondition")
        elif kwargs.get("precondition") is True:
            kwargs["precondition"] = _module_optimizer(trainer)
        if trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return kwargs
        if trainer.global_rank != 0:
            # every process computes the same history: one file, written by the first
            kwargs.pop("history_path", None)
        # setup() sees the module before the strategy wraps it in DDP; its gradients are
        # averaged over the default group
        kwargs.setdefault("process_group", torch.distributed.group.WORLD)
        return kwargs

    def _check_accumulation_control(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        """Refuse a schedule where ``accumulate_grad_batches`` is not the callback's to set.

        Under manual optimisation Lightning ignores ``accumulate_grad_batches`` (it refuses the
        setting when the user passes it, before the callback writes it): every step would keep
        the first batch while the learning rate took the schedule's factor (a hunt saw batch 8
        trained at twice the learning rate, the schedule reporting 16). A
        ``GradientAccumulationScheduler`` writes it too, at its epochs: the batch that ran was
        then neither the schedule's nor measured against the schedule's learning rate.
        """
        fix = "or measure only (NoiseScaleCallback() without a schedule)"
        if not pl_module.automatic_optimization:
            raise NoiseScaleInputError(
                "a batch-size schedule under manual optimisation (automatic_optimization=False): "
                "the callback realises the schedule's batch through "
                "Trainer.accumulate_grad_batches, which Lightning ignores under manual "
                "optimisation, so the run would train at the old batch with the new batch's "
                f"learning rate; use automatic optimisation to adapt the batch, {fix}"
            )
        for cb in trainer.callbacks:
            if isinstance(cb, pl.callbacks.GradientAccumulationScheduler):
                raise NoiseScaleInputError(
                    "a batch-size schedule together with Lightning's GradientAccumulationScheduler"
                    ": both set Trainer.accumulate_grad_batches, so the batch that runs would be "
                    "neither's (and the learning rate the schedule's for another batch); drop "
                    f"the GradientAccumulationScheduler to let the schedule size the batch, {fix}"
                )

    def _check_sampler(self, trainer: pl.Trainer) -> None:
        """Refuse or warn where a step's examples are not random draws from the data.

        B_simple's estimate needs each step's examples to be independent draws. Lightning's
        ``overfit_batches`` turns the loader's shuffling off and replays the same few batches
        every epoch: the steps are not draws from the data (one batch replayed has no gradient
        noise at all, yet its records read tr Σ 6.9), whatever the data's order, so it is
        refused. An unshuffled loader keeps the data's stored order: right only for data stored
        shuffled (11× low on data stored sorted by label, with a confident interval), which the
        callback cannot see, so it warns. A batch sampler of the user's own is not judged.
        """
        overfit = trainer.overfit_batches
        if overfit:
            raise NoiseScaleInputError(
                f"Trainer(overfit_batches={overfit}) replays the same few batches, unshuffled, "
                "every epoch, so the steps are not independent draws from the data and B_simple "
                "would measure the spread of those batches, not the data's gradient noise; "
                "remove the NoiseScaleCallback from an overfitting run, or set overfit_batches=0"
            )
        loaders = _dataloaders(trainer.train_dataloader)
        if self.tracker is not None and len(loaders) == 1:
            self.tracker._drawn_from = drawn_without_replacement(loaders[0])
        for loader in loaders:
            batches = loader.batch_sampler
            if type(batches) is not torch.utils.data.BatchSampler:
                continue  # no automatic batching, or a batch sampler of the user's own
            sampler = batches.sampler
            unshuffled = type(sampler) is torch.utils.data.SequentialSampler or (
                isinstance(sampler, torch.utils.data.DistributedSampler) and not sampler.shuffle
            )
            if unshuffled:
                self._warn_once(
                    "sequential",
                    "the training dataloader is not shuffled (shuffle=False, a "
                    f"{type(sampler).__name__}): it keeps the dataset's order, so B_simple is "
                    "right only if the dataset is stored shuffled (each step's examples "
                    "independent draws); otherwise pass shuffle=True to the DataLoader",
                )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _check_micro_batch(self, trainer: pl.Trainer) -> None:
        """The schedule counts global examples: its micro-batch is every process's together."""
        assert self.schedule is not None
        per_process = _loader_batch_size(trainer.train_dataloader)
        if per_process is None:  # several loaders, or one without a fixed batch size
            return
        world = max(1, int(trainer.world_size))
        micro = per_process * world
        if self.schedule.micro_batch_size != micro:
            raise NoiseScaleInputError(
                f"the schedule's micro_batch_size is {self.schedule.micro_batch_size} but the "
                f"trainer's micro-batch is {micro} examples (the dataloader's batch size "
                f"{per_process} × {world} processes): a schedule counts global examples, as the "
                "tracker's B_simple does; build the schedule with that micro_batch_size"
            )

    def _release(self) -> None:
        if self._forward_handle is not None:
            self._forward_handle.remove()
            self._forward_handle = None
        if self.tracker is not None:
            self.tracker.remove()

    def _load(self, state: dict[str, Any]) -> None:
        assert self.tracker is not None
        if state["tracker"] is not None:
            self.tracker.load_state_dict(state["tracker"])
        if self.schedule is not None and state["schedule"] is not None:
            self.schedule.load_state_dict(state["schedule"])
        applied = state["applied_micro_batches"]
        self._applied_micro_batches = None if applied is None else int(applied)
        self._applied_lr_factor = float(state["applied_lr_factor"])
        self._scaled_groups = list(state.get("scaled_groups", []))
        # (not in checkpoints before 2026-12-07: the tracker's count then, just loaded — 0
        # would count the whole run so far as the next step's examples)
        seen = state.get("examples_seen")
        self._examples_seen = self.tracker.examples_trained if seen is None else int(seen)
        accumulation = state.get("manual_accumulation")  # (not in checkpoints before 2026-12-07)
        self._accumulation = None if accumulation is None else float(accumulation)

    def _apply(self, trainer: pl.Trainer) -> None:
        """Give the trainer the schedule's accumulation and learning-rate factor."""
        if self.schedule is None:
            return
        trainer.accumulate_grad_batches = self.schedule.num_micro_batches
        self._applied_micro_batches = self.schedule.num_micro_batches
        new_factor = self.schedule.lr_factor
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        optimizers = trainer.optimizers

        def own(o: Any) -> list[Any]:
            # each optimizer's schedulers only: a GAN's two schedulers, each given along with
            # both optimizers, had their base rates scaled by the factor twice (a hunt)
            if len(optimizers) == 1:
                return schedulers
            mine = unwrap_optimizer(o)
            return [s for s in schedulers if unwrap_optimizer(s.optimizer) is mine]

        carried = self._scaled_groups + [None] * (len(optimizers) - len(self._scaled_groups))
        self._scaled_groups = [
            carry_lr_factor(o, self._applied_lr_factor, new_factor, own(o), scaled_groups=n)
            for o, n in zip(optimizers, carried, strict=False)
        ]
        self._applied_lr_factor = new_factor

    def _metrics(self) -> dict[str, float]:
        return estimate_metrics(
            self._require_tracker().estimate(),
            self.schedule,
            self._applied_micro_batches,
            self._applied_lr_factor,
        )

    def _require_tracker(self) -> GradientNoiseTracker:
        if self.tracker is None:
            raise NoiseScaleInputError(
                "the callback has no tracker: it is created in setup(stage='fit'), so use it "
                "through Trainer.fit"
            )
        return self.tracker


def _trailing_divisors(loss: Tensor, scaled: bool = False) -> list[float]:
    """What the loss handed to ``manual_backward`` was divided by last: the constant numbers
    it was divided by (``loss / k``) or multiplied by (``loss * (1 / k)``, counted as
    1/factor) at the end of its graph, as the running products from the last one inwards
    (``sum / len(x) / k``: [k, k·len(x)]), empty where none. ``scaled``: the AMP loss scaler
    multiplied it after that (the tracker divides the scale out itself)."""
    node, divisor, divisors = loss.grad_fn, 1.0, []
    if scaled and node is not None and type(node).__name__ == "MulBackward0":
        node = next((f for f, _ in node.next_functions if f is not None), None)
    while node is not None and type(node).__name__ in ("DivBackward0", "MulBackward0"):
        inputs = [f for f, _ in node.next_functions]
        if len(inputs) != 2 or (inputs[0] is None) == (inputs[1] is None):
            break  # (both operands computed, or neither)
        division = type(node).__name__ == "DivBackward0"
        if division and inputs[1] is not None:
            break  # a constant divided by the loss
        constant = node._saved_other if inputs[1] is None else node._saved_self
        # a Python number (a 0-d CPU tensor, read without a device synchronisation)
        if not isinstance(constant, Tensor) or constant.dim() != 0 or constant.is_cuda:
            break
        value = float(constant.tolist())  # (not .item(): the loss watch may be dispatching)
        if value == 0 or not math.isfinite(value):
            break
        divisor = divisor * value if division else divisor / value
        divisors.append(divisor)
        node = inputs[0] if inputs[0] is not None else inputs[1]
    return divisors


def _module_optimizer(trainer: pl.Trainer) -> torch.optim.Optimizer:
    """The LightningModule's one optimizer, for ``precondition=True``."""
    optimizers = list(trainer.optimizers)
    if len(optimizers) != 1:
        raise NoiseScaleInputError(
            "precondition=True preconditions with the LightningModule's optimizer, and "
            f"configure_optimizers returned {len(optimizers)}; pass the one to precondition "
            "with as precondition=<optimizer> (create it in __init__ and return it from "
            "configure_optimizers)"
        )
    return optimizers[0]


def _check_module_optimizer(trainer: pl.Trainer, given: Any) -> None:
    """Refuse a ``precondition=`` optimizer that the trainer does not step (as the Hugging Face
    callback does)."""
    steps = [unwrap_optimizer(o) for o in trainer.optimizers]
    names = ", ".join(type(o).__name__ for o in steps) or "none"
    stepped_optimizer(
        given,
        steps,
        "an optimizer the trainer",
        f"configure_optimizers returned: {names}",
        "the LightningModule's optimizer (or return yours from configure_optimizers)",
    )


def _dataloaders(loaders: Any) -> list[torch.utils.data.DataLoader]:
    """Every ``DataLoader`` in ``trainer.train_dataloader`` (one, or a CombinedLoader's
    iterables: a list, a dict, nested)."""
    if isinstance(loaders, torch.utils.data.DataLoader):
        return [loaders]
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif hasattr(loaders, "iterables"):  # a CombinedLoader
        return _dataloaders(loaders.iterables)
    if isinstance(loaders, list | tuple):
        return [d for x in loaders for d in _dataloaders(x)]
    return []


def _loader_batch_size(loader: Any) -> int | None:
    """The per-process batch size of a single ``DataLoader``; ``None`` where there is none."""
    if not isinstance(loader, torch.utils.data.DataLoader):
        return None
    if loader.batch_size is not None:
        return int(loader.batch_size)
    size = getattr(loader.batch_sampler, "batch_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _plain(x: Any) -> Any:
    """``x`` with NumPy scalars and arrays turned into Python numbers and lists."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x
