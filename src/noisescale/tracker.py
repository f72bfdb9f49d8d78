"""GradientNoiseTracker: the simple noise scale of a training run, measured every step.

Two lines in a training loop::

    tracker = noisescale.GradientNoiseTracker(model)          # before the first forward
    ...
    loss.backward()          # after all accumulation micro-batches
    tracker.step(loss=loss)  # before gradient clipping and optimizer.step()
    ...
    tracker.estimate()       # B_simple with its interval, |G|², tr Σ, steps used

Each step pairs small-batch gradient norms with the big batch — the accumulated ``.grad`` of all
of the step's examples — through the unbiased eq. A.2 of the paper. The small batches come from
the sources available: exact per-example norms (module hooks, B_small = 1) and, when the step
accumulates several micro-batches, the micro-batch gradient norms (B_small = micro-batch). The
sources are combined with minimum-variance weights, the per-step |G|² and tr Σ are averaged with
bias-corrected EMAs, and B_simple is their ratio with a Fieller interval (:mod:`estimators`).

Conventions:
    * ``loss_reduction="mean"`` (default): each backward pass's loss is the mean over its
      examples, divided by the number of micro-batches when accumulating; ``"sum"``: the sum over
      examples. B_simple does not depend on the accumulation divisor; |G|² and tr Σ do.
    * Norms are read before clipping; with ``torch.amp.GradScaler`` (pass ``scaler=``) they are
      unscaled (whether or not ``scaler.unscale_`` already ran) and steps with non-finite
      gradients are skipped.
    * Statistics stay on the device; the host reads them once every ``sync_every`` steps, or when
      an estimate, the history or a state_dict is asked for.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from noisescale import estimators as est
from noisescale.errors import NoiseScaleInputError
from noisescale.per_example import LOSS_REDUCTIONS, PerExampleNorms
from noisescale.per_example.factors import sqnorms
from noisescale.sources.distributed import DataParallelSource, ReducedStep

__all__ = ["GradientNoiseTracker"]

HISTORY_KIND = "noisescale.history"
HISTORY_VERSION = 1


@dataclass
class _PendingStep:
    """One step's raw statistics, still on the device."""

    step: int
    b_big: float
    sqnorm_big: Tensor
    sources: dict[str, tuple[list[float], Tensor]]  # name -> (small batch sizes, |G_small|²)
    loss: Tensor | float | None
    lr: float | None
    examples: int
    scale: float
    # per parameter group: (|G_big|² [groups], source -> |G_small|² [small batches, groups])
    groups: tuple[Tensor, dict[str, Tensor]] | None = None
    preconditioned: bool | None = None  # None: no preconditioner asked for
    # data parallel: the step's all-reduce, turned into the fields above by sync()
    reduced: ReducedStep | None = None


class GradientNoiseTracker:
    """Measures B_simple = tr(Σ)/|G|² (paper eq. 2.9) during training, every step, unbiased.

    Args:
        model: The model being trained: plain, wrapped in ``DistributedDataParallel``, or an
            FSDP2 (``fully_shard``) root; create the tracker after wrapping.
        loss_reduction: ``"mean"`` or ``"sum"``: how the backpropagated loss combined the
            examples' own losses (see the module docstring).
        per_example: Measure exact per-example norms with module hooks (the most precise source).
            ``False`` relies on accumulation micro-batches only (no layer support needed).
        per_example_fraction: Compute per-example norms for a random ⌈fraction·N⌉ of a step's
            N examples, drawn afresh every step; ``1.0`` measures every example of every
            micro-batch. When you accumulate, they are drawn from one micro-batch (at most all
            of its examples) at a random position among the step's micro-batches, and the
            others contribute their micro-batch norms only, so the hooks' work is paid once per
            step. Rows are drawn with probabilities that favour large output gradients and
            weighted back, so the subset's weighted mean |g_i|² is still unbiased and catches
            the few examples that carry most of the noise late in training; the hooks' work
            shrinks in proportion.
            The default, 1/16, was chosen by measurement (``bench/README.md``): the interval
            after a given number of steps was about as narrow as with all examples, because
            the noise of |G|² from the big batch dominates, at a fraction of the cost. Use
            ``1.0`` when the batch is much larger than B_simple, when the interval stays open
            late in training (README, known limits), or for exact per-step comparisons.
        microbatch: Use micro-batch gradient norms when a step accumulates several backward
            passes.
        beta: EMA decay for |G|² and tr Σ (paper App. A.1); ``1.0`` averages all steps equally.
        confidence: Coverage of the B_simple interval.
        scaler: A ``torch.amp.GradScaler`` whose loss scale is divided out.
        optimizer: If given, its first parameter group's learning rate is recorded each step
            (for the temperature ε/B, paper App. C).
        history_path: Stream the per-step history to this JSON Lines file (appended at each
            sync, so an interrupted run keeps what was measured).
        sync_every: Steps between host reads of the device statistics.
        fallback: Allow the torch.func fallback for modules without a closed-form norm.
        precondition: An Adam, AdamW or RMSprop optimizer: measure the noise scale of the
            preconditioned gradient P ⊙ g with P = 1/(√v̂ + ε) from its second-moment state
            (paper footnote 7, App. E.2), in the big batch and every small-batch source alike.
            Until the optimizer has taken ``precondition_from`` steps norms are plain, the
            history says ``"preconditioned": false``, and the averages restart at the first
            preconditioned step. Per-example norms then materialise each Linear/conv
            per-example weight gradient (N·O·I elements per layer, in bounded chunks).
        precondition_from: Optimizer steps before P is used. Early on v̂ averages only a few
            squared gradients, so coordinates whose first gradients happened to be tiny get
            P ≈ 1/ε; those steps' huge, noisy norms would dominate the averages for hundreds of
            steps (``docs/beyond_b_simple.md``). ``1`` starts as soon as there is state.
        groups: Also report B_simple per parameter group (:meth:`estimate_groups`, history key
            ``"groups"``): ``True`` or ``"children"`` (each top-level child module),
            ``"param_groups"`` (the optimizer's), or a mapping ``{name: [parameters, modules or
            their names]}``; parameters left out form ``"(other)"``. Per step, the groups' g2
            and tr Σ add up to the total's.
        process_group: The group gradients are averaged over. Under ``torch.distributed``
            a DDP or FSDP2 model is detected and uses its own group; give this for a plain
            model whose gradients you average yourself after the last backward pass.
            Each process's local gradient (before averaging) is then a small batch and the
            averaged one the big batch (paper App. A.1), at the cost of one small all-reduce
            per step; every process must call ``step()`` (:mod:`noisescale.sources`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_reduction: str = "mean",
        *,
        per_example: bool = True,
        per_example_fraction: float = 1 / 16,
        microbatch: bool = True,
        beta: float = 0.99,
        confidence: float = 0.95,
        scaler: Any | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        history_path: str | Path | None = None,
        sync_every: int = 32,
        fallback: bool = True,
        precondition: torch.optim.Optimizer | None = None,
        precondition_from: int = 100,
        groups: bool | str | Mapping[str, Any] | None = None,
        process_group: Any | None = None,
    ) -> None:
        if loss_reduction not in LOSS_REDUCTIONS:
            raise NoiseScaleInputError(
                f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}"
            )
        if not 0.0 < beta <= 1.0:
            raise NoiseScaleInputError(f"beta must be in (0, 1], got {beta}")
        if not 0.0 < confidence < 1.0:
            raise NoiseScaleInputError(f"confidence must be in (0, 1), got {confidence}")
        if sync_every < 1:
            raise NoiseScaleInputError(f"sync_every must be at least 1, got {sync_every}")
        if not 0.0 < per_example_fraction <= 1.0:
            raise NoiseScaleInputError(
                f"per_example_fraction must be in (0, 1], got {per_example_fraction}"
            )
        if not per_example and not microbatch:
            raise NoiseScaleInputError(
                "per_example=False and microbatch=False leave no small-batch source to compare "
                "with the big batch; enable at least one"
            )
        self.model = model
        self.loss_reduction = loss_reduction
        self.microbatch = microbatch
        self.confidence = confidence
        self.scaler = scaler
        self.optimizer = optimizer
        self.sync_every = sync_every
        self.history_path = Path(history_path) if history_path is not None else None
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.precondition = precondition
        if precondition_from < 1:
            raise NoiseScaleInputError(
                f"precondition_from must be at least 1, got {precondition_from}"
            )
        self.precondition_from = precondition_from
        if precondition is not None:
            _check_preconditioner(model, precondition, trainable)
            if optimizer is None:
                optimizer = self.optimizer = precondition
        self._group_names, group_params = _parameter_groups(model, groups, optimizer, trainable)
        group_of = {id(p): g for g, ps in enumerate(group_params) for p in ps}
        self._group_index = [group_of[id(p)] for p in trainable] if group_params else []
        self._group_states = {n: est.init_state(beta) for n in self._group_names}
        self._weights: dict[int, Tensor] | None = None
        self._weights_step = -1
        self._preconditioned_from: int | None = None
        self.engine = PerExampleNorms(
            model,
            per_example=per_example,
            fallback=fallback,
            groups=group_params or None,
            precondition=self._preconditioner_weights if precondition is not None else None,
            per_example_fraction=per_example_fraction,
        )
        self._params = [p for p in model.parameters() if p.requires_grad]
        # DDP, FSDP2 or process_group=: local gradients against the averaged one (App. A.1)
        self._dist = DataParallelSource.detect(
            model, self.engine, self._params, process_group, microbatch=microbatch
        )
        if self._dist is not None:
            # the data-parallel source needs each pass's local norm as the backward computes it
            self.engine.lazy_first_pass = False
        if self._dist is not None and (precondition is not None or group_params):
            raise NoiseScaleInputError(
                "precondition= and groups= are not supported under data parallelism yet"
            )
        self._state = est.init_state(beta)
        self._combiner: dict[str, est.CombinerState] = {}
        self._pending: list[_PendingStep] = []
        self._history: list[dict[str, Any]] = []
        self.steps = 0
        self.skipped_steps = 0
        self.examples = 0
        self._warned: set[str] = set()
        if self.history_path is not None and not self.history_path.exists():
            self._write_lines([self._header()])

    # -- the training-loop API ----------------------------------------------------------------

    def step(self, loss: Tensor | float | None = None, lr: float | None = None) -> None:
        """Record this optimizer step: call after the last ``backward()``, before clipping.

        Args:
            loss: The step's training loss (kept for the history and reports; no host sync).
            lr: The learning rate, if no ``optimizer`` was given.
        """
        scale, grads_unscaled = self._loss_scale()
        passes = self.engine.collect(grad_rescale=scale if grads_unscaled else 1.0)
        if not passes:
            if any(p.grad is not None for p in self._params):
                raise NoiseScaleInputError(
                    "tracker.step() found gradients but saw no forward pass of the model with "
                    "gradients enabled (e.g. torch.utils.checkpoint.checkpoint(model, ..., "
                    "use_reentrant=True) around the whole model): checkpoint blocks inside the "
                    "model instead, and create the tracker before the first forward"
                )
            raise NoiseScaleInputError(
                "tracker.step() was called but no backward pass ran since the last step; call "
                "it once per optimizer step, after loss.backward()"
            )
        self.steps += 1
        if self._dist is not None:
            self._step_distributed(passes, scale, grads_unscaled, loss, lr)
            return
        k = len(passes)
        sizes = [p.batch_size for p in passes]
        n_total = sum(sizes)
        self.examples += n_total
        # Example i of micro-batch j enters .grad with weight c_j (times the loss scale).
        coef = [1.0 / (k * n) if self.loss_reduction == "mean" else 1.0 for n in sizes]
        sum_c = sum(n * c for n, c in zip(sizes, coef, strict=True))
        sum_c2 = sum(n * c * c for n, c in zip(sizes, coef, strict=True))
        b_big = sum_c * sum_c / sum_c2
        grad_scale = 1.0 if grads_unscaled else scale
        weights = passes[0].weights
        sqnorm_big = self._grad_sqnorm(weights) / (grad_scale * sum_c) ** 2

        sources: dict[str, tuple[list[float], Tensor]] = {}
        with torch.no_grad():
            if self.engine.per_example and b_big > 1.0:
                per_ex = [
                    p.raw_sqnorms / (scale * c) ** 2
                    for p, c in zip(passes, coef, strict=True)
                    if p.raw_sqnorms is not None
                ]
                if per_ex:
                    sources["per_example"] = ([1.0], torch.cat(per_ex).mean().reshape(1))
            if self.microbatch and k >= 2:
                usable = [
                    (float(n), p.grad_sqnorm / (scale * n * c) ** 2)
                    for p, n, c in zip(passes, sizes, coef, strict=True)
                    if p.grad_sqnorm is not None and n < b_big
                ]
                if usable:
                    sources["microbatch"] = (
                        [b for b, _ in usable],
                        torch.stack([v.reshape(()) for _, v in usable]),
                    )
        withheld = [p.withheld for p in passes if p.withheld]
        for reason in withheld:
            # an audit taught the engine something; this step's per-example norms are not used
            warnings.warn(
                f"noisescale: step {self.steps}: {reason}; this step's per-example norms are "
                "left out" + (" (its micro-batch norms still count)" if sources else ""),
                RuntimeWarning,
                stacklevel=2,
            )
        if not sources and withheld:
            pass
        elif not sources and any(p.skipped for p in passes):
            self._warn_once(
                "subset-missed",
                "this step had fewer micro-batches than the one before, and the micro-batch "
                "drawn for its per-example subset did not occur, so it has no small-batch norm "
                "and is skipped (this happens on the step where accumulation shrinks to one "
                "micro-batch; per_example_fraction=1.0 avoids it)",
            )
        elif not sources:
            self._warn_once(
                "small-equals-big",
                "this step has one example and no other small-batch source, so the noise cannot "
                "be separated from the gradient (small batch = big batch); the step is skipped. "
                "Use more than one example per step or accumulate several micro-batches.",
            )
        if self.precondition is not None and weights is None:
            self._warn_once(
                "not-preconditioned",
                f"the optimizer has taken fewer than precondition_from={self.precondition_from} "
                "steps, so this step's norms are not preconditioned; the estimate restarts at "
                "the first preconditioned step",
            )
        groups = self._group_sources(
            passes, sizes, coef, scale, b_big, grad_scale * sum_c, weights, sources
        )
        if lr is None and self.optimizer is not None:
            lr = float(self.optimizer.param_groups[0]["lr"])
        loss_value = loss.detach() if isinstance(loss, Tensor) else loss
        self._pending.append(
            _PendingStep(
                self.steps,
                b_big,
                sqnorm_big,
                sources,
                loss_value,
                lr,
                self.examples,
                scale,
                groups,
                None if self.precondition is None else weights is not None,
            )
        )
        if len(self._pending) >= self.sync_every:
            self.sync()

    def estimate(self) -> est.NoiseEstimate:
        """B_simple with its interval, |G|², tr Σ and the number of steps used (App. A.1)."""
        self.sync()
        return est.b_simple_interval(self._state, self.confidence)

    def estimate_groups(self) -> dict[str, est.NoiseEstimate]:
        """B_simple of each parameter group (``groups=``): eq. A.2 with the group's own norms.

        A group's big batch is its part of the step's gradient, its small batches the same
        examples' gradients restricted to the group.
        """
        self.sync()
        return {n: est.b_simple_interval(s, self.confidence) for n, s in self._group_states.items()}

    def paused(self) -> AbstractContextManager[None]:
        """A block whose forward/backward passes are not part of training (e.g. B_noise HVPs)."""
        return self.engine.paused()

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per step (format: docs and :func:`write_history`), synced on access."""
        self.sync()
        return self._history

    @property
    def b_simple(self) -> float:
        """The current B_simple estimate in examples (``nan`` while not available)."""
        return self.estimate().b_simple

    def remove(self) -> None:
        """Read what is pending and remove the hooks from the model."""
        self.sync()
        self.engine.remove()
        if self._dist is not None:
            self._dist.remove()

    # -- host side ----------------------------------------------------------------------------

    def sync(self) -> None:
        """Fold the pending steps into the estimate (one host read for all of them)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        pending = self._resolve_reduced(pending)
        flat: list[Tensor] = []
        for p in pending:
            flat.append(p.sqnorm_big.reshape(1).float())
            flat.extend(v.reshape(-1).float() for _, v in p.sources.values())
            if isinstance(p.loss, Tensor):
                flat.append(p.loss.reshape(1).float())
        group_pos = sum(f.numel() for f in flat)
        for p in pending:
            if p.groups is not None:
                flat.append(p.groups[0].reshape(-1).float())
                flat.extend(v.reshape(-1).float() for v in p.groups[1].values())
        values = torch.cat([f.to(flat[0].device) for f in flat]).cpu().numpy().astype(float)
        records = []
        pos = 0
        for p in pending:
            sqnorm_big = values[pos]
            pos += 1
            per_source: dict[str, tuple[float, float]] = {}
            raw: dict[str, dict[str, Any]] = {}
            for name, (b_small, _) in p.sources.items():
                vals = values[pos : pos + len(b_small)]
                pos += len(b_small)
                g2, tr = est.unbiased_g2_trace(np.asarray(b_small), vals, p.b_big, sqnorm_big)
                per_source[name] = (float(np.mean(g2)), float(np.mean(tr)))
                raw[name] = {
                    "b_small": b_small[0] if len(b_small) == 1 else list(b_small),
                    "sqnorm_small": float(vals.mean()) if len(vals) == 1 else vals.tolist(),
                }
            loss = p.loss
            if isinstance(loss, Tensor):
                loss = float(values[pos])
                pos += 1
            group_values, group_pos = _read_groups(p, values, group_pos)
            group_est = self._group_estimates(p, per_source, group_values)
            self._start_preconditioning(p)
            record = self._fold(p, sqnorm_big, per_source, raw, loss)
            self._fold_groups(record, group_est)
            if p.preconditioned is not None:
                record["preconditioned"] = p.preconditioned
            records.append(record)
        self._history.extend(records)
        if self.history_path is not None:
            self._write_lines(records)

    def _step_distributed(
        self,
        passes: list[Any],
        scale: float,
        grads_unscaled: bool,
        loss: Tensor | float | None,
        lr: float | None,
    ) -> None:
        """A data-parallel step: start its all-reduce; :meth:`sync` resolves it."""
        assert self._dist is not None
        k = len(passes)
        coef = [1.0 / (k * p.batch_size) if self.loss_reduction == "mean" else 1.0 for p in passes]
        reduced = self._dist.launch(passes, coef, scale, 1.0 if grads_unscaled else scale, loss)
        if lr is None and self.optimizer is not None:
            lr = float(self.optimizer.param_groups[0]["lr"])
        nan = torch.full((), math.nan)
        self._pending.append(
            _PendingStep(self.steps, math.nan, nan, {}, None, lr, 0, scale, reduced=reduced)
        )
        if len(self._pending) >= self.sync_every:
            self.sync()

    def _resolve_reduced(self, pending: list[_PendingStep]) -> list[_PendingStep]:
        """Wait for the data-parallel steps' all-reduces; fill in their global statistics."""
        reduced = [p.reduced.values() for p in pending if p.reduced is not None]
        if not reduced:
            return pending
        assert self._dist is not None
        values = torch.cat(reduced).cpu().numpy()
        width = values.size // len(reduced)
        out = []
        for p in pending:
            if p.reduced is None:
                out.append(p)
                continue
            r = self._dist.resolve(values[:width])
            values = values[width:]
            self.examples += r.examples
            if not r.sources:
                self._warn_once(
                    "small-equals-big",
                    "this step has one example over all processes and no other small-batch "
                    "source (small batch = big batch); the step is skipped",
                )
            sources = {
                name: (b_small, torch.from_numpy(vals))
                for name, (b_small, vals) in r.sources.items()
            }
            sqnorm_big = torch.tensor(r.sqnorm_big, dtype=torch.float64)
            out.append(
                replace(
                    p,
                    b_big=r.b_big,
                    sqnorm_big=sqnorm_big,
                    sources=sources,
                    loss=r.loss,
                    examples=self.examples,
                    reduced=None,
                )
            )
        return out

    def _fold(
        self,
        p: _PendingStep,
        sqnorm_big: float,
        per_source: dict[str, tuple[float, float]],
        raw: dict[str, dict[str, Any]],
        loss: float | None,
    ) -> dict[str, Any]:
        finite = math.isfinite(sqnorm_big) and all(
            math.isfinite(g) and math.isfinite(t) for g, t in per_source.values()
        )
        g2 = tr = math.nan
        skipped = not (finite and per_source)
        if skipped:
            self.skipped_steps += 1
            if not finite and self.scaler is None:
                self._warn_once(
                    "non-finite",
                    f"step {p.step} has non-finite gradients; it is left out of the estimate",
                )
        else:
            key = ",".join(sorted(per_source))
            g2, tr = self._combine(key, per_source)
            self._state = est.update_state(self._state, g2, tr)
        e = est.b_simple_interval(self._state, self.confidence)
        return {
            "step": p.step,
            "skipped": skipped,
            "b_big": p.b_big,
            "sqnorm_big": sqnorm_big,
            "g2": g2,
            "trace_sigma": tr,
            "g2_ema": e.g2,
            "trace_sigma_ema": e.trace_sigma,
            "b_simple": e.b_simple,
            "b_simple_low": e.low,
            "b_simple_high": e.high,
            "loss": loss,
            "lr": p.lr,
            "temperature": p.lr / p.b_big if p.lr is not None else None,
            "examples": p.examples,
            "loss_scale": p.scale,
            "sources": raw,
        }

    def _combine(self, key: str, per_source: dict[str, tuple[float, float]]) -> tuple[float, float]:
        names = sorted(per_source)
        pairs = np.array([per_source[n] for n in names])  # [K, 2]: (g2, trace) per source
        if len(names) == 1:
            return float(pairs[0, 0]), float(pairs[0, 1])
        comb = self._combiner.get(key) or est.init_combiner(len(names), self._state.beta)
        w_g2, w_tr = est.combiner_weights(comb)
        self._combiner[key] = est.update_combiner(comb, pairs[:, 0], pairs[:, 1])
        return float(w_g2 @ pairs[:, 0]), float(w_tr @ pairs[:, 1])

    # -- parameter groups and preconditioning -------------------------------------------------

    def _preconditioner_weights(self) -> dict[int, Tensor] | None:
        """P² for the passes of the current step (the state cannot change before its end)."""
        if self._weights_step != self.steps:
            assert self.precondition is not None
            self._weights = preconditioner_weights(
                self.precondition, self._params, min_steps=self.precondition_from
            )
            self._weights_step = self.steps
        return self._weights

    def _start_preconditioning(self, p: _PendingStep) -> None:
        # plain and preconditioned norms measure different quantities: never average them
        if p.preconditioned and self._preconditioned_from is None:
            self._preconditioned_from = p.step
            beta = self._state.beta
            self._state = est.init_state(beta)
            self._combiner.clear()
            self._group_states = {n: est.init_state(beta) for n in self._group_states}

    def _group_sources(
        self,
        passes: list[Any],
        sizes: list[int],
        coef: list[float],
        scale: float,
        b_big: float,
        big_divisor: float,
        weights: dict[int, Tensor] | None,
        sources: dict[str, tuple[list[float], Tensor]],
    ) -> tuple[Tensor, dict[str, Tensor]] | None:
        """The step's norms split by parameter group, normalised exactly as the total's."""
        if not self._group_names:
            return None
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            big = self._group_grad_sqnorms(weights) / big_divisor**2
            if "per_example" in sources:
                per_ex = [
                    p.group_sqnorms / (scale * c) ** 2
                    for p, c in zip(passes, coef, strict=True)
                    if p.group_sqnorms is not None
                ]
                out["per_example"] = torch.cat(per_ex).mean(0, keepdim=True)
            if "microbatch" in sources:
                out["microbatch"] = torch.stack(
                    [
                        p.group_grad_sqnorm / (scale * n * c) ** 2
                        for p, n, c in zip(passes, sizes, coef, strict=True)
                        if p.group_grad_sqnorm is not None and n < b_big
                    ]
                )
        return big, out

    def _group_estimates(
        self,
        p: _PendingStep,
        per_source: dict[str, tuple[float, float]],
        read: tuple[np.ndarray, dict[str, np.ndarray]] | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Per group: (|G_big|², g2, tr Σ) by eq. A.2, combined with the total's source weights.

        The weights are the ones the total uses for this step (read before it updates them), so
        the groups' g2 and tr Σ add up to the total's exactly.
        """
        if read is None:
            return None
        big, small = read
        names = sorted(per_source)
        g2, tr = np.full_like(big, math.nan), np.full_like(big, math.nan)
        if not names or any(n not in small for n in names):
            return big, g2, tr
        w_g2, w_tr = np.ones(1), np.ones(1)
        if len(names) > 1:
            comb = self._combiner.get(",".join(names)) or est.init_combiner(
                len(names), self._state.beta
            )
            w_g2, w_tr = est.combiner_weights(comb)
        g2, tr = np.zeros_like(big), np.zeros_like(big)
        for wg, wt, name in zip(w_g2, w_tr, names, strict=True):
            b_small = np.asarray(p.sources[name][0], dtype=float)[:, None]
            g, t = est.unbiased_g2_trace(b_small, small[name], p.b_big, big[None, :])
            g2 += wg * g.mean(0)
            tr += wt * t.mean(0)
        return big, g2, tr

    def _fold_groups(
        self, record: dict[str, Any], group_est: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    ) -> None:
        if group_est is None:
            return
        big, g2, tr = group_est
        skipped = record["skipped"] or not np.all(np.isfinite(g2) & np.isfinite(tr))
        out: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(self._group_names):
            if not skipped:
                self._group_states[name] = est.update_state(self._group_states[name], g2[i], tr[i])
            e = est.b_simple_interval(self._group_states[name], self.confidence)
            out[name] = {
                "sqnorm_big": float(big[i]),
                "g2": math.nan if skipped else float(g2[i]),
                "trace_sigma": math.nan if skipped else float(tr[i]),
                "g2_ema": e.g2,
                "trace_sigma_ema": e.trace_sigma,
                "b_simple": e.b_simple,
                "b_simple_low": e.low,
                "b_simple_high": e.high,
            }
        record["groups"] = out

    def _group_grad_sqnorms(self, weights: dict[int, Tensor] | None) -> Tensor:
        with torch.no_grad():
            sq, index = [], []
            for p, g in zip(self._params, self._group_index, strict=True):
                if p.grad is not None:
                    grad = p.grad.detach().float().pow(2)
                    sq.append(grad.sum() if weights is None else (grad * weights[id(p)]).sum())
                    index.append(g)
            values = torch.stack(sq)
            idx = torch.tensor(index, device=values.device)
            return values.new_zeros(len(self._group_names)).index_add_(0, idx, values)

    # -- helpers ------------------------------------------------------------------------------

    def _grad_sqnorm(self, weights: dict[int, Tensor] | None = None) -> Tensor:
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            raise NoiseScaleInputError(
                "no parameter has a gradient: call tracker.step() after loss.backward() and "
                "before optimizer.zero_grad()"
            )
        with torch.no_grad():
            if weights is not None:
                return torch.stack(
                    [
                        (p.grad.detach().float().pow(2) * weights[id(p)]).sum()
                        for p in self._params
                        if p.grad is not None
                    ]
                ).sum()
            return sqnorms([g.detach() for g in grads]).sum()

    def _loss_scale(self) -> tuple[float, bool]:
        """The AMP loss scale in the hooks' gradients, and whether ``.grad`` is already unscaled."""
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0, False
        scale = float(scaler.get_scale())
        from torch.amp.grad_scaler import OptState

        unscaled = any(
            s.get("stage") is OptState.UNSCALED for s in scaler._per_optimizer_states.values()
        )
        return scale, unscaled

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _header(self) -> dict[str, Any]:
        return {
            "kind": HISTORY_KIND,
            "version": HISTORY_VERSION,
            "loss_reduction": self.loss_reduction,
            "beta": self._state.beta,
            "confidence": self.confidence,
        }

    def _write_lines(self, records: Iterable[dict[str, Any]]) -> None:
        assert self.history_path is not None
        self.history_path.parent.mkdir(parents=True, exist_ok=True)
        with self.history_path.open("a") as f:
            for r in records:
                f.write(json.dumps(_json_safe(r), allow_nan=False) + "\n")

    def write_history(self, path: str | Path) -> Path:
        """Write the whole history (a header line, then one JSON object per step)."""
        self.sync()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            for r in [self._header(), *self._history]:
                f.write(json.dumps(_json_safe(r), allow_nan=False) + "\n")
        return out

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for a resumed tracker to give the same subsequent estimates."""
        self.sync()
        return {
            "version": HISTORY_VERSION,
            "state": _json_safe(self._state._asdict()),
            "combiner": {k: _json_safe(v._asdict()) for k, v in self._combiner.items()},
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "examples": self.examples,
            "loss_reduction": self.loss_reduction,
            "confidence": self.confidence,
            "group_states": {n: _json_safe(s._asdict()) for n, s in self._group_states.items()},
            "preconditioned_from": self._preconditioned_from,
            "subset_rng": self.engine.rng_state(),
            "subset_step_examples": self.engine.last_step_examples,
            "subset_position": self.engine.subset_position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("loss_reduction", self.loss_reduction) != self.loss_reduction:
            raise NoiseScaleInputError(
                f"the checkpoint was measured with loss_reduction={state['loss_reduction']!r} "
                f"but this tracker uses {self.loss_reduction!r}"
            )
        self._pending.clear()
        self._state = est.NoiseScaleState(**state["state"])
        self._combiner = {
            k: est.CombinerState(
                **{
                    f: np.asarray(x, dtype=float) if isinstance(x, list) else x
                    for f, x in v.items()
                }
            )
            for k, v in state["combiner"].items()
        }
        self.steps = int(state["steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self.examples = int(state["examples"])
        self.confidence = float(state["confidence"])
        saved_groups = state.get("group_states", {})
        if set(saved_groups) != set(self._group_states):
            raise NoiseScaleInputError(
                f"the checkpoint has parameter groups {sorted(saved_groups)} but this tracker "
                f"has {sorted(self._group_states)}; construct it with the same groups="
            )
        self._group_states = {n: est.NoiseScaleState(**v) for n, v in saved_groups.items()}
        self._preconditioned_from = state.get("preconditioned_from")
        self.engine.set_rng_state(state.get("subset_rng", {}))
        self.engine.last_step_examples = state.get("subset_step_examples")
        self.engine.subset_position = int(state.get("subset_position", 0))


def _json_safe(x: Any) -> Any:
    if isinstance(x, np.generic):  # before float: np.float64 is a float subclass
        return _json_safe(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    return x


def _read_groups(
    p: _PendingStep, values: np.ndarray, pos: int
) -> tuple[tuple[np.ndarray, dict[str, np.ndarray]] | None, int]:
    """This step's per-group norms from the flat host copy, and the position after them."""
    if p.groups is None:
        return None, pos
    big_t, small_t = p.groups
    big = values[pos : pos + big_t.numel()]
    pos += big_t.numel()
    small = {}
    for name, t in small_t.items():
        small[name] = values[pos : pos + t.numel()].reshape(tuple(t.shape))
        pos += t.numel()
    return (big, small), pos


_PRECONDITIONERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)


def _check_preconditioner(
    model: nn.Module, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]
) -> None:
    if not isinstance(optimizer, _PRECONDITIONERS):
        raise NoiseScaleInputError(
            f"precondition= takes an Adam, AdamW or RMSprop optimizer (whose second-moment "
            f"state gives the preconditioner), got {type(optimizer).__name__}"
        )
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    missing = sorted(names.get(id(p), "?") for p in params if id(p) not in held)
    if missing:
        raise NoiseScaleInputError(
            f"parameters {missing} are trainable but not in the precondition optimizer, so they "
            "have no preconditioner; freeze them or add them to the optimizer"
        )


def preconditioner_weights(
    optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], min_steps: int = 1
) -> dict[int, Tensor] | None:
    """P² = (√v̂ + ε)⁻² per parameter id: the square of the optimizer's elementwise preconditioner.

    Adam/AdamW divide the (momentum of the) gradient by √v̂ + ε with v̂ = v/(1 − β₂ᵗ) the
    bias-corrected second moment (``max_exp_avg_sq`` with amsgrad); RMSprop by √v + ε (v minus
    the squared mean gradient when centered). The state read is the one left by the previous
    ``optimizer.step()``, fixed while this step's gradients are drawn, so the preconditioned
    norms stay unbiased for |P ⊙ G|² and tr(PΣP). ``None`` while any parameter has taken fewer
    than ``min_steps`` steps.
    """
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out: dict[int, Tensor] = {}
    with torch.no_grad():
        for p in params:
            group = group_of[id(p)]
            state = optimizer.state.get(p)
            if not state or float(state.get("step", 0)) < min_steps:
                return None
            if isinstance(optimizer, torch.optim.RMSprop):
                v = state["square_avg"]
                if group["centered"]:
                    v = v.addcmul(state["grad_avg"], state["grad_avg"], value=-1)
                denom = _at_least_float32(v).sqrt() + group["eps"]
            else:
                v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
                correction = 1.0 - group["betas"][1] ** float(state["step"])
                denom = (_at_least_float32(v) / correction).sqrt() + group["eps"]
            out[id(p)] = denom.pow(-2)
    return out


def _at_least_float32(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _parameter_groups(
    model: nn.Module,
    groups: bool | str | Mapping[str, Any] | None,
    optimizer: torch.optim.Optimizer | None,
    params: list[nn.Parameter],
) -> tuple[list[str], list[list[nn.Parameter]]]:
    """Names and members of the parameter groups: a partition of the trainable ``params``."""
    if groups is None or groups is False:
        return [], []
    tracked = {id(p) for p in params}
    names = {id(p): n for n, p in model.named_parameters()}
    owner: dict[int, str] = {}
    members: dict[str, list[nn.Parameter]] = {}

    def put(group: str, p: nn.Parameter, *, shared_ok: bool) -> None:
        if id(p) not in tracked:
            return
        if id(p) in owner:
            if owner[id(p)] != group and not shared_ok:
                raise NoiseScaleInputError(
                    f"parameter '{names.get(id(p), '?')}' is in groups {owner[id(p)]!r} and "
                    f"{group!r}; each parameter must be in one group"
                )
            return
        owner[id(p)] = group
        members.setdefault(group, []).append(p)

    if groups is True or groups == "children":
        root = model
        # a DistributedDataParallel-style wrapper holds the real model as its only child
        while (
            isinstance(getattr(root, "module", None), nn.Module) and len(list(root.children())) == 1
        ):
            root = root.module
        for name, child in root.named_children():
            for p in child.parameters():
                put(name, p, shared_ok=True)  # a tied parameter belongs to its first user
        for p in root.parameters(recurse=False):
            put("(top)", p, shared_ok=True)
    elif groups == "param_groups":
        if optimizer is None:
            raise NoiseScaleInputError(
                "groups='param_groups' needs the optimizer: pass optimizer= or precondition="
            )
        for i, g in enumerate(optimizer.param_groups):
            for p in g["params"]:
                put(str(g.get("name", f"param_group_{i}")), p, shared_ok=False)
    elif isinstance(groups, Mapping):
        modules = dict(model.named_modules())
        by_name = dict(model.named_parameters())
        for group, spec in groups.items():
            items = [spec] if isinstance(spec, str | nn.Module | Tensor) else list(spec)
            for item in items:
                if isinstance(item, str):
                    if item not in by_name and item not in modules:
                        raise NoiseScaleInputError(
                            f"group {group!r}: {item!r} names no parameter or module of the model"
                        )
                    item = by_name.get(item, modules.get(item))
                if isinstance(item, nn.Module):
                    for p in item.parameters():
                        put(str(group), p, shared_ok=False)
                elif isinstance(item, Tensor):
                    if id(item) not in tracked:
                        raise NoiseScaleInputError(
                            f"group {group!r} holds a tensor that is not a trainable parameter "
                            "of the model"
                        )
                    put(str(group), item, shared_ok=False)
                else:
                    raise NoiseScaleInputError(
                        f"group {group!r}: expected parameters, modules or their names, got "
                        f"{type(item).__name__}"
                    )
    else:
        raise NoiseScaleInputError(
            "groups must be True, 'children', 'param_groups' or a mapping {name: [parameters, "
            f"modules or names]}}, got {groups!r}"
        )
    rest = [p for p in params if id(p) not in owner]
    if rest:
        members.setdefault("(other)", []).extend(rest)
    return list(members), list(members.values())
