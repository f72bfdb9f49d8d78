"""Data parallelism as a noise-scale source: local gradients before averaging, global after.

Paper App. A.1: "when training a model using a data parallel method, we can compute |G_Bsmall|²
and |G_Bbig|² with minimal effort by computing the norm of gradient before and after averaging
between devices. In that case B_small is the local batch size before averaging, and B_big is the
global batch size after averaging." :class:`DataParallelSource` does that inside
:class:`~noisescale.tracker.GradientNoiseTracker` for three set-ups:

* ``"ddp"`` — ``torch.nn.parallel.DistributedDataParallel``. The engine's tensor hook on each
  parameter runs before the parameter's ``AccumulateGrad`` node, and DDP's reducer hooks run after
  it, so the hooks see this process's gradient before any averaging; after ``backward()`` the
  ``.grad`` is the average over processes.
* ``"fsdp"`` — FSDP2 (``torch.distributed.fsdp.fully_shard``). During forward and backward every
  process holds the full, unsharded parameters; autograd accumulates into them (before the
  reduce-scatter), so the hooks go on the unsharded parameters, found when each module runs.
  After ``backward()`` each process holds a shard of the averaged gradient (sharded ``DTensor``).
* ``"manual"`` — a plain model whose gradients the user averages over ``process_group`` after the
  last backward pass of the step (``all_reduce`` then divide by the group size).

What is measured, per process r and optimizer step:

* its local gradient (the sum of its backward passes, before averaging), as |G_local,r|² of the
  mean over its examples with their weights c (1/(k·N_j) for mean losses over k micro-batches of
  N_j examples); its effective size b_r = (Σc)²/Σc²;
* the per-example squared norms (sum and count) and each backward pass's (micro-batch) norm;
* its part of |.grad|²: the whole |.grad|² on rank 0 for replicated gradients (DDP), the squared
  norm of its local shard on every rank for sharded ones (FSDP2), divided by the number of ranks
  holding the same shard (so that the sum over ranks counts every element once);
* its loss.

These go into one row of a [world size, width] float64 buffer (other rows zero) and one
asynchronous ``all_reduce`` per step (a few hundred bytes for 8 processes) gives every process all
rows, waited for only when the tracker reads its statistics. Every process therefore computes
bit-identical estimates. The averaged ``.grad`` is (1/W)·Σ_r local_r, so example i of process r
enters it with weight c_i/W and the big batch is b_big = (Σc)²/Σc² over all examples of all
processes (= W·N for equal local batches N, smaller for uneven ones); |G_big|² = |.grad|²/(Σc/W)².

Three small-batch sources, each paired with the global big batch through eq. A.2:

* ``"per_example"`` — b_small = 1, |G_small|² = mean over all examples of all processes;
* ``"local"`` — one pair per process (b_r, |G_local,r|²), averaged: the paper's estimator, and
  exactly what a single process accumulating the W local batches as micro-batches would compute
  with its ``"microbatch"`` source;
* ``"microbatch"`` — when any process accumulates several backward passes (``no_sync()``), one
  pair per backward pass of every process, averaged.

Costs: one small all-reduce per step and, only when accumulating, one extra squared norm per
parameter in the last backward pass (|.grad + new gradient|², the local accumulated gradient).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from noisescale.errors import NoiseScaleInputError
from noisescale.per_example import PassNorms, PerExampleNorms
from noisescale.per_example.factors import sqnorm, sqnorms

__all__ = ["DataParallelSource", "ReducedStep", "ResolvedStep", "resolve_rows"]

Kind = Literal["ddp", "fsdp", "manual"]

# Columns of each process's row in the one all-reduce per step.
N_EXAMPLES = 0  # examples of the step on this process
SUM_C = 1  # Σ c over its examples (c: weight of the example in its local .grad)
SUM_C2 = 2  # Σ c²
PE_SUM = 3  # Σ |g_i|² of its per-example norms (each example's own loss)
PE_COUNT = 4  # how many per-example norms
LOCAL = 5  # |G_local|² of its local mean gradient
LOCAL_OK = 6  # 1 if LOCAL is this step's whole local gradient
BIG = 7  # its part of |.grad|² (summed over processes: the averaged gradient's)
PASSES = 8  # backward passes of the step
LOSS = 9  # the loss it passed to tracker.step()
HAS_LOSS = 10
OVERFLOW = 11  # 1 if its micro-batches have more distinct sizes than MICRO_GROUPS
MICRO = 12  # then (size, count, Σ|G_j|²) of its micro-batches, per distinct size
MICRO_GROUPS = 2  # full micro-batches and one short last one cover the usual loops
WIDTH = MICRO + 3 * MICRO_GROUPS


@dataclass(frozen=True)
class ResolvedStep:
    """One step's global statistics, the same on every process.

    Attributes:
        b_big: Effective examples of the averaged gradient, (Σc)²/Σc² over all processes.
        sqnorm_big: |G_big|² of the averaged gradient (normalised to a weighted mean).
        examples: Examples of the step over all processes.
        loss: Mean over processes of the losses passed to ``tracker.step()`` (``None`` if none).
        sources: Source name → (small batch sizes, |G_small|² of each), to pair with the big
            batch through eq. A.2 and average.
    """

    b_big: float
    sqnorm_big: float
    examples: int
    loss: float | None
    sources: dict[str, tuple[list[float], np.ndarray]]


@dataclass
class ReducedStep:
    """The all-reduce of one step, in flight until :meth:`values` waits for it."""

    buffer: Tensor
    work: Any | None

    def values(self) -> Tensor:
        """The reduced [world size · width] buffer (waits for the all-reduce; no collective)."""
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.buffer.reshape(-1)


@dataclass
class _LocalPass:
    """This process's view of one backward pass: does it synchronise, its running local norm."""

    index: int  # 1-based position among the step's passes
    synced: bool
    local_sqnorm: Tensor | None = None  # |.grad + this pass's gradient|², summed over parameters
    fresh: set[int] = field(default_factory=set)  # parameters whose .grad was None before it


def resolve_rows(rows: np.ndarray, *, microbatch: bool = True) -> ResolvedStep:
    """Global b_big, |G_big|² and the small-batch sources from the all-reduced rows (App. A.1).

    Args:
        rows: [W, WIDTH] array, row r filled by process r (columns: the module constants).
        microbatch: Build the ``"microbatch"`` source when some process ran several backward
            passes in the step.
    """
    w = rows.shape[0]
    col = rows.sum(0)
    examples = round(float(col[N_EXAMPLES]))
    sum_c, sum_c2 = col[SUM_C], col[SUM_C2]
    b_big = sum_c * sum_c / sum_c2 if sum_c2 > 0 else math.nan
    # .grad = (1/W)·Σ_r local_r, so its example weights are c/W
    sqnorm_big = col[BIG] / (sum_c / w) ** 2 if sum_c > 0 else math.nan
    loss = col[LOSS] / col[HAS_LOSS] if col[HAS_LOSS] > 0 else None
    sources: dict[str, tuple[list[float], np.ndarray]] = {}
    if col[PE_COUNT] > 0 and b_big > 1.0:
        sources["per_example"] = ([1.0], np.array([col[PE_SUM] / col[PE_COUNT]]))
    if w >= 2 and bool(np.all(rows[:, LOCAL_OK] > 0)):
        active = rows[(rows[:, N_EXAMPLES] > 0) & (rows[:, SUM_C2] > 0)]
        b_local = active[:, SUM_C] ** 2 / active[:, SUM_C2]
        keep = b_local < b_big
        if keep.any():
            sources["local"] = (b_local[keep].tolist(), active[keep, LOCAL])
    if microbatch and rows[:, PASSES].max() >= 2 and not np.any(rows[:, OVERFLOW] > 0):
        sizes: list[float] = []
        norms: list[float] = []
        for row in rows:
            for g in range(MICRO_GROUPS):
                size, count, total = row[MICRO + 3 * g : MICRO + 3 * g + 3]
                if count > 0 and size < b_big:
                    # eq. A.2 is linear in |G_small|² at a fixed size, so `count` micro-batches
                    # of one size enter the average exactly as `count` copies of their mean
                    m = round(float(count))
                    sizes.extend([float(size)] * m)
                    norms.extend([total / count] * m)
        if sizes:
            sources["microbatch"] = (sizes, np.asarray(norms))
    return ResolvedStep(float(b_big), float(sqnorm_big), examples, loss, sources)


class DataParallelSource:
    """The local-versus-global gradient norms of a data-parallel step (paper App. A.1).

    Created by the tracker through :meth:`detect`; the tracker calls :meth:`launch` in each
    ``step()`` (every process must call ``tracker.step()`` the same number of times: it issues
    one collective) and :meth:`resolve` when it reads the statistics (no collective, so
    ``tracker.estimate()`` may be called on one process only).

    Args:
        model: The model passed to the tracker (the DDP wrapper, the FSDP2 root, or a plain one).
        engine: The tracker's hook engine; its passes are this process's backward passes.
        params: The trainable parameters (sharded ``DTensor`` for FSDP2).
        group: The process group the gradients are averaged over (``None``: the default group).
        kind: ``"ddp"``, ``"fsdp"`` or ``"manual"`` (see the module docstring).
        microbatch: Build the ``"microbatch"`` source when accumulating.
    """

    def __init__(
        self,
        model: nn.Module,
        engine: PerExampleNorms,
        params: Sequence[nn.Parameter],
        group: Any | None,
        kind: Kind,
        *,
        microbatch: bool = True,
    ) -> None:
        self.model = model
        self.engine = engine
        self.params = list(params)
        self.group = group
        self.kind = kind
        self.microbatch = microbatch
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        backend = str(dist.get_backend(group))
        # gloo reduces CPU tensors; other backends (nccl, …) reduce on the gradients' device
        self.device = (
            torch.device("cpu") if backend == "gloo" or not self.params else self.params[0].device
        )
        self._local: dict[int, _LocalPass] = {}  # id(PassNorms) -> this process's view
        self._armed: _LocalPass | None = None
        self._handles: list[RemovableHandle] = []
        self._hooked: dict[int, Tensor] = {}  # unsharded FSDP2 parameters already hooked
        self._replicas: dict[int, int] = {}
        self._warned: set[str] = set()
        # after the engine's pre-hook, which opens the pass this one looks at
        self._handles.append(model.register_forward_pre_hook(self._on_model_forward))
        if kind == "fsdp":
            self._install_fsdp()
        else:
            for p in self.params:
                self._handles.append(p.register_hook(self._make_local_hook(p, id(p))))

    @classmethod
    def detect(
        cls,
        model: nn.Module,
        engine: PerExampleNorms,
        params: Sequence[nn.Parameter],
        process_group: Any | None = None,
        *,
        microbatch: bool = True,
    ) -> DataParallelSource | None:
        """The data-parallel source for this model, or ``None`` when it trains in one process.

        ``torch.distributed`` must be initialised. A ``DistributedDataParallel`` model averages
        over its own process group, an FSDP2 model over the default group; ``process_group``
        overrides either, and makes a plain model ``"manual"``.
        """
        if not (dist.is_available() and dist.is_initialized()):
            if process_group is not None:
                raise NoiseScaleInputError(
                    "process_group= was given but torch.distributed is not initialised; call "
                    "torch.distributed.init_process_group() before creating the tracker"
                )
            return None
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            group = process_group if process_group is not None else model.process_group
            return cls(model, engine, params, group, "ddp", microbatch=microbatch)
        _refuse_fsdp1(model)
        if _is_fsdp2(model):
            return cls(model, engine, params, process_group, "fsdp", microbatch=microbatch)
        if process_group is not None:
            return cls(model, engine, params, process_group, "manual", microbatch=microbatch)
        if dist.get_world_size() > 1:
            warnings.warn(
                "torch.distributed is initialised but the model is neither "
                "DistributedDataParallel nor FSDP2 (fully_shard), so the tracker measures this "
                "process alone. If its gradients are averaged with other processes, create the "
                "tracker from the wrapped model, or pass process_group=",
                RuntimeWarning,
                stacklevel=3,
            )
        return None

    # -- hooks --------------------------------------------------------------------------------

    def _install_fsdp(self) -> None:
        from torch.distributed.tensor import DTensor

        for module in self.model.modules():
            sharded = {
                n: p
                for n, p in module.named_parameters(recurse=False)
                if p.requires_grad and isinstance(p, DTensor)
            }
            if sharded:
                self._handles.append(
                    module.register_forward_pre_hook(self._make_fsdp_pre_hook(module, sharded))
                )

    def _make_fsdp_pre_hook(
        self, module: nn.Module, sharded: dict[str, nn.Parameter]
    ) -> Callable[..., None]:
        from torch.distributed.tensor import DTensor

        def hook(mod: nn.Module, args: tuple) -> None:
            if not torch.is_grad_enabled():
                return
            for name, p in sharded.items():
                full = getattr(module, name)
                if isinstance(full, DTensor):
                    raise NoiseScaleInputError(
                        f"parameter '{name}' of {type(module).__name__} is still sharded when the "
                        "module runs: create the tracker after fully_shard() has been applied to "
                        "the model and its submodules"
                    )
                if id(full) in self._hooked:
                    continue
                # FSDP2 keeps one unsharded parameter per sharded one for the whole run; it
                # stands in for the sharded parameter in the engine's per-pass bookkeeping
                self._hooked[id(full)] = full
                self._handles.append(self.engine.add_parameter_hook(full, p))
                self._handles.append(full.register_hook(self._make_local_hook(full, id(p))))

        return hook

    def _on_model_forward(self, module: nn.Module, args: tuple) -> None:
        self._armed = None
        current = self.engine.current_pass()
        if self.engine.is_paused or not torch.is_grad_enabled() or current is None:
            return
        lp = self._local.get(id(current))
        if lp is None:
            # DDP decides at forward time whether the coming backward pass all-reduces
            synced = bool(self.model.require_backward_grad_sync) if self.kind == "ddp" else True
            lp = _LocalPass(self.engine.open_passes(), synced)
            self._local[id(current)] = lp
        # the local accumulated gradient is read in the last (synchronising) pass of several
        self._armed = lp if lp.index >= 2 and lp.synced else None

    def _make_local_hook(self, target: Tensor, pid: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            lp = self._armed
            if lp is None or self.engine.is_paused:
                return
            with torch.no_grad():
                # runs before AccumulateGrad: target.grad is the local sum of earlier passes
                prev = target.grad
                g = _acc(grad.detach())
                if prev is None:
                    lp.fresh.add(pid)
                else:
                    g = g + _acc(prev.detach())
                sq = sqnorm(g)
            lp.local_sqnorm = sq if lp.local_sqnorm is None else lp.local_sqnorm + sq

        return hook

    def remove(self) -> None:
        """Remove this source's hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- per step -----------------------------------------------------------------------------

    def launch(
        self,
        passes: Sequence[PassNorms],
        coef: Sequence[float],
        scale: float,
        grad_scale: float,
        loss: Tensor | float | None,
    ) -> ReducedStep:
        """Pack this process's statistics of the step and start the all-reduce.

        Args:
            passes: The step's backward passes on this process (``engine.collect()``).
            coef: Each pass's example weight c in the local ``.grad`` (before the loss scale).
            scale: The AMP loss scale in the hooks' gradients.
            grad_scale: The loss scale still in ``.grad`` (1 once ``scaler.unscale_`` ran).
            loss: The loss passed to ``tracker.step()``.
        """
        local, self._local, self._armed = self._local, {}, None
        if any(p.weights is not None for p in passes):
            raise NoiseScaleInputError(
                "preconditioned norms are not supported under data parallelism"
            )
        sizes = [p.batch_size for p in passes]
        host: dict[int, float] = {
            N_EXAMPLES: float(sum(sizes)),
            SUM_C: sum(n * c for n, c in zip(sizes, coef, strict=True)),
            SUM_C2: sum(n * c * c for n, c in zip(sizes, coef, strict=True)),
            PASSES: float(len(passes)),
        }
        dev: dict[int, Tensor] = {}
        with torch.no_grad():
            per_ex = [
                p.raw_sqnorms / (scale * c) ** 2
                for p, c in zip(passes, coef, strict=True)
                if p.raw_sqnorms is not None
            ]
            if per_ex:
                dev[PE_SUM] = torch.cat(per_ex).sum()
                host[PE_COUNT] = float(sum(t.numel() for t in per_ex))
            local_sq = self._local_sqnorm(passes, local)
            if local_sq is not None:
                dev[LOCAL] = local_sq / (scale * host[SUM_C]) ** 2
                host[LOCAL_OK] = 1.0
            big = self._big_part()
            if big is not None:
                dev[BIG] = big / grad_scale**2
            if loss is not None:
                host[HAS_LOSS] = 1.0
                if isinstance(loss, Tensor):
                    dev[LOSS] = loss.detach().reshape(())
                else:
                    host[LOSS] = float(loss)
            if self.microbatch:
                self._pack_microbatches(passes, sizes, coef, scale, host, dev)
        buffer = torch.zeros(self.world_size, WIDTH, dtype=torch.float64, device=self.device)
        if host:
            idx = list(host)
            buffer[self.rank, idx] = torch.tensor([host[i] for i in idx], dtype=torch.float64).to(
                self.device
            )
        if dev:
            idx = list(dev)
            buffer[self.rank, idx] = torch.stack(
                [dev[i].to(device=self.device, dtype=torch.float64) for i in idx]
            )
        work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        return ReducedStep(buffer, work)

    def resolve(self, values: np.ndarray) -> ResolvedStep:
        """The step's global statistics from the reduced buffer (host side, no collective)."""
        return resolve_rows(values.reshape(self.world_size, WIDTH), microbatch=self.microbatch)

    def _local_sqnorm(
        self, passes: Sequence[PassNorms], local: dict[int, _LocalPass]
    ) -> Tensor | None:
        """|local .grad|² before averaging (still times (scale·Σc)²), or ``None`` if unknown."""
        views = [local.get(id(p)) for p in passes]
        if any(v is None for v in views):
            self._warn_once(
                "no-view",
                "a backward pass ran without a forward call of the model given to the tracker; "
                "the 'local' source is left out",
            )
            return None
        synced = [v.synced for v in views]  # type: ignore[union-attr]
        if self.kind == "ddp" and not synced[-1]:
            raise NoiseScaleInputError(
                "the last backward pass before tracker.step() ran inside model.no_sync(), so "
                ".grad holds this process's gradient, not the average over processes; call "
                "tracker.step() after the backward pass that synchronises"
            )
        if self.kind == "ddp" and any(synced[:-1]):
            self._warn_once(
                "several-syncs",
                "several backward passes of this step synchronised gradients (accumulation "
                "without model.no_sync()), so no process holds its whole local gradient; the "
                "'local' source is left out (per-example and micro-batch sources remain). Run "
                "all but the last micro-batch inside model.no_sync()",
            )
            return None
        if len(passes) == 1:
            return passes[0].grad_sqnorm
        last = views[-1]
        assert last is not None
        earlier: set[int] = set().union(*(p.received for p in passes[:-1]))
        if last.fresh & earlier:
            self._warn_once(
                "reduced-early",
                "gradients of earlier micro-batches were already reduced (FSDP2 accumulation "
                "without set_requires_gradient_sync(False)), so no process holds its whole local "
                "gradient; the 'local' source is left out. Call "
                "model.set_requires_gradient_sync(False) for all but the last micro-batch",
            )
            return None
        if earlier - passes[-1].received:
            self._warn_once(
                "unused-last",
                "some parameters received gradients in earlier micro-batches of the step but "
                "not in the last one, whose hooks read the local accumulated gradient; the "
                "'local' source is left out for such steps",
            )
            return None
        return last.local_sqnorm

    def _big_part(self) -> Tensor | None:
        """This process's share of |.grad|²: shards on every rank, replicated grads on rank 0."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            raise NoiseScaleInputError(
                "no parameter has a gradient: call tracker.step() after loss.backward() and "
                "before optimizer.zero_grad()"
            )
        if self.kind != "fsdp":
            if self.rank != 0:
                return None
            return sqnorms([g.detach() for g in grads]).sum()
        from torch.distributed.tensor import DTensor

        shards: list[Tensor] = []
        weights: list[float] = []
        for p in self.params:
            g = p.grad
            if g is None:
                continue
            if isinstance(g, DTensor):
                shards.append(g.to_local().detach())
                weights.append(1.0 / self._replicas_of(p, g))
            elif self.rank == 0:  # a replicated gradient counts once
                shards.append(g.detach())
                weights.append(1.0)
        if not shards:
            return None
        squares = sqnorms(shards)
        return squares @ torch.tensor(weights, device=squares.device, dtype=squares.dtype)

    def _replicas_of(self, p: nn.Parameter, g: Any) -> int:
        """Processes holding the same shard of ``g``: the sizes of its Replicate mesh dims."""
        cached = self._replicas.get(id(p))
        if cached is not None:
            return cached
        reps = 1
        for dim, placement in enumerate(g.placements):
            if placement.is_partial():
                raise NoiseScaleInputError(
                    "a gradient is a Partial DTensor (not yet reduced) at tracker.step(); call "
                    "it after backward() has finished"
                )
            if placement.is_replicate():
                reps *= g.device_mesh.size(dim)
        self._replicas[id(p)] = reps
        return reps

    def _pack_microbatches(
        self,
        passes: Sequence[PassNorms],
        sizes: Sequence[int],
        coef: Sequence[float],
        scale: float,
        host: dict[int, float],
        dev: dict[int, Tensor],
    ) -> None:
        groups: dict[int, list[Tensor]] = {}
        for p, n, c in zip(passes, sizes, coef, strict=True):
            if p.grad_sqnorm is not None:
                groups.setdefault(n, []).append(p.grad_sqnorm.reshape(()) / (scale * n * c) ** 2)
        if len(groups) > MICRO_GROUPS:
            host[OVERFLOW] = 1.0
            self._warn_once(
                "micro-sizes",
                f"the micro-batches of a step have more than {MICRO_GROUPS} different sizes; "
                "the 'microbatch' source is left out for such steps",
            )
            return
        for g, (n, norms) in enumerate(groups.items()):
            host[MICRO + 3 * g] = float(n)
            host[MICRO + 3 * g + 1] = float(len(norms))
            dev[MICRO + 3 * g + 2] = torch.stack(norms).sum()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)


def _acc(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _is_fsdp2(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.6 has no public FSDP2
        return False
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return False
    if not isinstance(model, FSDPModule):
        raise NoiseScaleInputError(
            "the model has DTensor parameters but is not an FSDP2 module: apply fully_shard() to "
            "the root model as well (tensor parallelism is not supported)"
        )
    return True


def _refuse_fsdp1(model: nn.Module) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise NoiseScaleInputError(
            "FullyShardedDataParallel (FSDP1) flattens parameters, which hides them from the "
            "per-layer hooks; use FSDP2 (torch.distributed.fsdp.fully_shard) or "
            "DistributedDataParallel"
        )
