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
  last backward pass of the step (``all_reduce`` then divide by the group size); checked on the
  audits' steps (:meth:`DataParallelSource.check_averaged`).

What one step costs: **one asynchronous all-reduce of a fixed-size float64 buffer** (``WIDTH``
numbers, 39 today — 312 bytes — whatever the number of processes W), waited for only when the
tracker reads its statistics, with no host synchronisation on the way (on CUDA the host-side
numbers go through pinned memory). Every process packs sums, not rows: the examples, Σc and Σc²
of its examples' weights in its local gradient (c = 1/(k·N_j) for mean losses over k
micro-batches of N_j examples), its share of |.grad|² (the whole |.grad|² on rank 0 for
replicated gradients, the squared norm of its local shard on every rank for sharded ones, divided
by the number of ranks holding the same shard), its loss, and for each small-batch source the
number of small batches, Σ 1/size and Σ of their squared mean-gradient norms (plus whether it had
any). The sum over processes is then everything eq. A.2 needs
(:func:`noisescale.estimators.g2_trace_from_sums`), so every process computes bit-identical
estimates in O(1) time and keeps history records of a fixed size. The averaged ``.grad`` is
(1/W)·Σ_r local_r, so example i of process r enters it with weight c_i/W and the big batch is
b_big = (Σc)²/Σc² over all examples of all processes; |G_big|² = |.grad|²/(Σc/W)².

Small-batch sources, each paired with the global big batch:

* those of the single-process tracker (``"subbatch"``, ``"per_example"``, ``"microbatch"``),
  measured on each process's own passes and summed;
* ``"local"`` — each process's whole local gradient, one small batch of its effective size: the
  paper's estimator, and what a single process accumulating the W local batches as micro-batches
  would compute with its ``"microbatch"`` source.

A source some processes lack in a step (a rank without a per-example pass, a conditional layer)
is kept with the small batches of the processes that had it — still unbiased — and the history
records how many lacked it (``"lacking"``).

Refused at construction, each with its cause and what to do instead: FSDP1 (its flat parameters
hide the layers); tensor parallelism, alone or under FSDP2 on a mesh dimension of its own
(parameters placed other than FSDP2's ``(Shard,)`` or HSDP's ``(Replicate, Shard)``: every
process holds a shard of a layer's activations and gradients, and per-example and local norms
would have to be summed over the shards inside each layer's rule); and a module run as a stage
of ``torch.distributed.pipelining`` (its norms cover the stage's parameters, the model's add up
over the stages) — caught at the first forward when the stage is created after the tracker.
"""

from __future__ import annotations

import gc
import math
import sys
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
from noisescale.module_hooks import Hook
from noisescale.per_example import PassNorms, PerExampleNorms
from noisescale.per_example.factors import sqnorm, sqnorm_total
from noisescale.sources.base import Observation, StepNorms, weights_spread

__all__ = ["DataParallelSource", "ReducedStep", "resolve"]

Kind = Literal["ddp", "fsdp", "manual"]

# The fixed-size buffer one step all-reduces (float64): global sums, then per source.
EXAMPLES = 0  # examples of the step
SUM_C = 1  # Σ c over the examples (c: weight of the example in its process's local .grad)
SUM_C2 = 2  # Σ c²
BIG = 3  # the processes' shares of |.grad|² (summed: the averaged gradient's)
LOSS = 4  # Σ of the losses passed to tracker.step()
HAS_LOSS = 5  # processes that passed one
TOKENS = 6  # tokens the step's loss counted (noisescale.tokens)
HAS_TOKENS = 7  # processes that counted them
SOURCES = ("subbatch", "per_example", "microbatch", "local")
FIELDS = 4  # per source: small batches, Σ 1/size, Σ S, processes that had it
# processes that left the step unmeasured (measure_every): such a buffer holds the step's
# examples and tokens only, counted at the next measured step (every process reduces every
# step, so what a checkpoint saves of them is the sum over the processes)
UNMEASURED = 8
# processes that left the step out (a short accumulation window, its divisor unknown: the
# tracker's _short_window_message); the step is then left out on every process
LEFT_OUT = 9
STEP = 10  # the tracker's step number (summed: a check that the processes agree)
PROCESSES = 11  # 1 per process (summed: the processes whose step numbers STEP sums)
# processes where a layer's input rows were picked by index tensors, none of them the examples
# in order (compared on the device: PerExampleNorms.unread_picks); the step is then refused
PICKED = 12
# the passes of every process, where a loss weighs them by weights measured on the device (a
# token mean per micro-batch, each process's own mean: StepNorms.weights_vary): their count,
# Σ c and Σ c² over the finite ones, whose count is PASS_WEIGHED (a pass of no token weighs
# 1/0 = inf: left out; the weights vary where Σc² > (Σc)²/count), Σ b_m·|X̄_m|² and Σ b_m (the big
# batch within each pass, StepNorms.within_passes), and the processes that lacked a pass norm
PASS_COUNT = 13
PASS_C = 14
PASS_C2 = 15
PASS_BIG = 16
PASS_EXAMPLES = 17
PASS_MISSING = 18
# processes whose squared norms overflowed float32 under a grown loss scale (the tracker's
# _loss_scale_message): the step is then left out on every process, as LEFT_OUT's
OVERFLOWED = 19
PASS_WEIGHED = 20  # (the passes of finite weight: PASS_COUNT's comment)
# a process whose passes count no token weighs them 1/0 = inf (its gradient 0), not in SUM_C and
# SUM_C2: its examples take the mean finite pass weight m over every process (as one process's
# pass of no token takes its other passes', StepNorms), added as m·EMPTY_C and m²·EMPTY_C2
# (Σ n and Σ n over its passes; with size_weighted, the whole pass's weight m: Σ 1 and Σ 1/n)
EMPTY_C = 21
EMPTY_C2 = 22
HEAD = 23
WIDTH = HEAD + FIELDS * len(SOURCES)


# process_group='s check (DataParallelSource.check_averaged) projects gradients this many
# elements at a time: two float64 temporaries of 32 MiB at most
_PROJECTION_CHUNK = 1 << 22


def _project(g: Tensor, step: int, index: int) -> tuple[Tensor, Tensor]:
    """(⟨g, v⟩, |g|²) in float64 (MPS: float32), with v a standard normal direction drawn
    from a seed of the step number and the parameter's position — the same on every process
    (:meth:`DataParallelSource.check_averaged`), in chunks of bounded memory."""
    dtype = torch.float32 if g.device.type == "mps" else torch.float64
    gen = torch.Generator(device=g.device)
    gen.manual_seed((step * 1_000_003 + index) % (1 << 62))
    flat = g.reshape(-1)
    proj = torch.zeros((), dtype=dtype, device=g.device)
    sq = torch.zeros((), dtype=dtype, device=g.device)
    for start in range(0, flat.numel(), _PROJECTION_CHUNK):
        x = flat[start : start + _PROJECTION_CHUNK].to(dtype)
        v = torch.randn(x.shape, generator=gen, device=x.device, dtype=dtype)
        proj += torch.dot(x, v)
        sq += torch.dot(x, x)
    return proj, sq


def _column(source: str, field: int) -> int:
    return HEAD + FIELDS * SOURCES.index(source) + field


@dataclass
class ReducedStep:
    """The all-reduce of one step, in flight until :meth:`values` waits for it."""

    buffer: Tensor
    work: Any | None

    def values(self) -> Tensor:
        """The reduced [WIDTH] buffer (waits for the all-reduce; no collective)."""
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


def step_kind(
    values: np.ndarray, step_number: int
) -> Literal["measured", "unmeasured", "left out"]:
    """Whether the processes measured the step, left it unmeasured (``measure_every``) or
    left it out (a short accumulation window, or squared norms overflowed under the loss
    scale, on one process or more: every process leaves it out).

    Raises:
        NoiseScaleInputError: The processes reduced different steps together (their trackers
            count steps differently: another ``measure_every``, or ``step()`` not called by
            every process at every step), so the step's sums mix steps.
    """
    processes = round(float(values[PROCESSES]))
    unmeasured = round(float(values[UNMEASURED]))
    if round(float(values[STEP])) != processes * step_number or 0 < unmeasured < processes:
        raise NoiseScaleInputError(
            f"the processes' trackers reduced different steps together (step {step_number} "
            f"here; the step numbers summed over the {processes} processes give "
            f"{round(float(values[STEP]))}, and {unmeasured} of them left it unmeasured): pass "
            "the same measure_every to every process and call tracker.step() on every process "
            "at every optimizer step"
        )
    if unmeasured:
        return "unmeasured"
    return "left out" if values[LEFT_OUT] > 0 or values[OVERFLOWED] > 0 else "measured"


def resolve_unmeasured(values: np.ndarray, world_size: int) -> tuple[int, float | None]:
    """The examples and tokens (``None`` unless every process counted them) of an unmeasured
    step (``measure_every``: :func:`step_kind`), summed over the processes."""
    counted = round(float(values[HAS_TOKENS])) == world_size
    return round(float(values[EXAMPLES])), float(values[TOKENS]) if counted else None


def weights_vary(values: np.ndarray) -> bool:
    """Whether the step's passes, over all processes, weighed their examples by weights that
    differ (measured on the device: each process's or micro-batch's own token mean), from the
    reduced sums of the finite weights (:data:`PASS_WEIGHED`, :data:`PASS_C`, :data:`PASS_C2`).
    A pass or a process of no token (its weight 1/0, its gradient 0) is not among them, so it
    does not make them vary: processes with tokens beside one without vary only where their
    own weights differ (until 2026-12-07 its inf made the spread nan, read as weights that
    vary: the rest of the run measured within its passes, or refused; a review)."""
    n, c, c2 = values[PASS_WEIGHED], values[PASS_C], values[PASS_C2]
    return bool(n > 1 and weights_spread(n, c, c2))


def resolve(
    values: np.ndarray, world_size: int, within: bool = False
) -> tuple[float, float, int, float | None, dict, float | None]:
    """Global b_big, |G_big|², examples, mean loss, each source's small batches (summed over
    processes) and the tokens counted (``None`` unless every process counted them) from the
    all-reduced buffer. O(1): nothing here loops over processes.

    ``within``: the passes' weights vary with the data (:func:`weights_vary`, now or at an
    earlier step), so the averaged gradient is no big batch for eq. A.2 — the big batch is
    taken within each pass of each process (:meth:`StepNorms.within_passes`), and the sources
    whose small batches are whole passes or processes (``"microbatch"``, ``"local"``) are left
    out; |G_big|² is ``nan`` where a process lacked a pass norm."""
    from noisescale.state import SmallBatches

    sum_c, sum_c2 = values[SUM_C], values[SUM_C2]
    if values[EMPTY_C] > 0 and values[PASS_WEIGHED] > 0:
        # a process of no token: its examples at the mean finite pass weight (EMPTY_C)
        m = values[PASS_C] / values[PASS_WEIGHED]
        sum_c, sum_c2 = sum_c + m * values[EMPTY_C], sum_c2 + m * m * values[EMPTY_C2]
    b_big = sum_c * sum_c / sum_c2 if sum_c2 > 0 else math.nan
    # .grad = (1/W)·Σ_r local_r, so its example weights are c/W
    sqnorm_big = values[BIG] / (sum_c / world_size) ** 2 if sum_c > 0 else math.nan
    if within:
        examples, passes = values[PASS_EXAMPLES], values[PASS_COUNT]
        usable = examples > 0 and values[PASS_MISSING] == 0
        b_big = examples / passes if usable else math.nan
        sqnorm_big = values[PASS_BIG] / examples if usable else math.nan
    loss = values[LOSS] / values[HAS_LOSS] if values[HAS_LOSS] > 0 else None
    sources = {}
    for name in SOURCES:
        if within and name in ("microbatch", "local"):
            continue
        count, inv, total, have = (values[_column(name, f)] for f in range(FIELDS))
        if count > 0:
            sources[name] = SmallBatches(
                float(count), float(inv), float(total), None, world_size - round(float(have))
            )
    tokens = float(values[TOKENS]) if round(float(values[HAS_TOKENS])) == world_size else None
    return float(b_big), float(sqnorm_big), round(float(values[EXAMPLES])), loss, sources, tokens


class DataParallelSource:
    """The local-versus-global gradient norms of a data-parallel step (paper App. A.1).

    Created by the tracker through :meth:`detect`; the tracker calls :meth:`launch` in each
    ``step()``, :meth:`launch_unmeasured` in one ``measure_every`` leaves unmeasured (every
    process must call ``tracker.step()`` the same number of times: it issues one collective)
    and :meth:`resolve` when it reads the statistics (no collective, so
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
        self.stale: set[int] = set()  # (set by the tracker at each step: _stale_grads)
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
        self._hooked_sharded: set[int] = set()  # the sharded parameters they stand for
        self._replicas: dict[int, int] = {}
        self._warned: set[str] = set()
        self._checked_caller = False
        #: the passes' weights have varied with the data at some step (sticky; in checkpoints)
        self.weights_varied = False
        # after the engine's pre-hook, which opens the pass this one looks at
        self._handles.append(model.register_forward_pre_hook(Hook(self._on_model_forward)))
        if kind == "fsdp":
            self._install_fsdp()
        else:
            for i, p in enumerate(self.params):
                self._handles.append(p.register_hook(self._make_local_hook(p, id(p), i)))
        # process_group=, on a step the audits' schedule falls on (check_averaged): the step
        # being projected, and each parameter's local gradient projected, as its hook last saw
        # it (this pass's gradient plus .grad before it: before any averaging, even one that
        # starts while the backward still runs)
        self._project_step: int | None = None
        self._projected: dict[int, tuple[Tensor, Tensor]] = {}

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

        _refuse_pipeline_stage(model)
        _refuse_fsdp1(model)
        fsdp = _is_fsdp2(model)  # refuses parameters split by anything else (tensor parallel)
        if isinstance(model, DistributedDataParallel):
            if getattr(model.module, "_orig_mod", None) is not None and engine.per_example:
                # (steps 1-2 pass, eagerly; Dynamo's own assertion failed at step 3)
                raise NoiseScaleInputError(
                    "DistributedDataParallel around a torch.compile()d model is not supported "
                    "by the per-example hooks (Dynamo fails on them inside DDP's forward): "
                    "compile the wrapped model instead, torch.compile(DistributedDataParallel("
                    "model)), and create the tracker from that — or measure with "
                    "per_example=False, or without torch.compile"
                )
            group = process_group if process_group is not None else model.process_group
            return cls(model, engine, params, group, "ddp", microbatch=microbatch)
        compiled = getattr(model, "_orig_mod", None)
        if isinstance(compiled, DistributedDataParallel):
            # torch.compile(DDP(model)): the wrapper hides DDP, whose averaged .grad was read
            # against this process's batch alone until 2026-12-05 (g2 and tr Σ up to 7.2×
            # off, under a warning asking for what the user had done). DDP averages over its
            # group after the last backward, as process_group= describes (checked exact against
            # eager DDP by a helper)
            group = process_group if process_group is not None else compiled.process_group
            return cls(model, engine, params, group, "manual", microbatch=microbatch)
        if fsdp:
            return cls(model, engine, params, process_group, "fsdp", microbatch=microbatch)
        if process_group is not None:
            return cls(model, engine, params, process_group, "manual", microbatch=microbatch)
        if dist.get_world_size() > 1:
            # (a DistributedDataParallel created after the tracker is refused at the forward:
            # watch_late_wrapper, which the tracker installs in this case)
            warnings.warn(
                "torch.distributed is initialised but the model is neither "
                "DistributedDataParallel nor FSDP2 (fully_shard), so the tracker measures this "
                "process alone. If its gradients are averaged with other processes, create the "
                "tracker from the wrapped model, or pass process_group=. If this model is one "
                "stage of a pipeline, its norms cover that stage's parameters only: pipeline "
                "parallelism is not supported (docs/distributed.md)",
                RuntimeWarning,
                stacklevel=3,
            )
        return None

    # -- hooks --------------------------------------------------------------------------------

    def _install_fsdp(self) -> None:
        from torch.distributed.tensor import DTensor

        for module in self.model.modules():
            # its own parameters, and its children's: a module may read a child's parameter
            # without calling the child (nn.MultiheadAttention passes out_proj.weight to
            # F.multi_head_attention_forward), whose pre-hook then never runs (until 2026-12-07
            # such a parameter was refused as a weight swapped for the call, a hunt)
            # (any descendant's: a review of 2026-12-07 found a block reading a grandchild's
            # weight, self.deep["inner"].weight, measured tr Σ 10% low without a word — only
            # the children's were hooked)
            sharded = {
                n: p
                for n, p in module.named_parameters()
                if p.requires_grad and isinstance(p, DTensor)
            }
            if sharded:
                self._handles.append(
                    module.register_forward_pre_hook(
                        Hook(self._make_fsdp_pre_hook(module, sharded))
                    )
                )

    def _make_fsdp_pre_hook(
        self, module: nn.Module, sharded: dict[str, nn.Parameter]
    ) -> Callable[..., None]:
        from torch.distributed.tensor import DTensor

        def hook(mod: nn.Module, args: tuple) -> None:
            if not torch.is_grad_enabled():
                return
            for name, p in sharded.items():
                if id(p) in self._hooked_sharded:
                    continue  # (hooked already, from this module's or another's pre-hook)
                owner, _, attr = name.rpartition(".")
                full = _parameter_behind(getattr(module.get_submodule(owner), attr))
                if isinstance(full, DTensor) and "." in name:
                    continue  # a child's, not unsharded yet: hooked at its own pre-hook
                if isinstance(full, DTensor):
                    # FSDP2 unshards over its own mesh dimensions only: what is left is split
                    # over another one (tensor parallelism, which construction normally refuses)
                    raise NoiseScaleInputError(
                        _tensor_parallel_message(f"{type(module).__name__}.{name}", full)
                    )
                if id(full) in self._hooked:
                    continue
                # FSDP2 keeps one unsharded parameter per sharded one for the whole run; it
                # stands in for the sharded parameter in the engine's per-pass bookkeeping
                self._hooked[id(full)] = full
                self._hooked_sharded.add(id(p))
                self._handles.append(self.engine.add_parameter_hook(full, p))
                self._handles.append(full.register_hook(self._make_local_hook(full, id(p))))

        return hook

    def _on_model_forward(self, module: nn.Module, args: tuple) -> None:
        if self.engine.is_paused or not torch.is_grad_enabled():
            # (the audit's re-runs of the model, a validation forward: no backward follows, and
            # the pass whose backward comes stays armed)
            return
        self._armed = None
        current = self.engine.current_pass()
        if current is None:
            return
        if current.idle:  # a step measure_every leaves unmeasured: nothing to read
            return
        if self.kind == "manual":
            step = self.engine.steps_collected + 1
            if not self.engine.check_scheduled:
                self._project_step, self._projected = None, {}
            elif self._project_step != step:
                self._project_step, self._projected = step, {}
        if not self._checked_caller:
            # a stage created after the tracker: construction could not see it
            self._checked_caller = True
            stage = _calling_pipeline_stage()
            if stage is not None:
                raise NoiseScaleInputError(_pipeline_message(stage))
        lp = self._local.get(id(current))
        if lp is None:
            # DDP decides at forward time whether the coming backward pass all-reduces
            synced = bool(self.model.require_backward_grad_sync) if self.kind == "ddp" else True
            lp = _LocalPass(self.engine.open_passes(), synced)
            self._local[id(current)] = lp
        # the local accumulated gradient is read in the last (synchronising) pass of several
        self._armed = lp if lp.index >= 2 and lp.synced else None

    def _make_local_hook(
        self, target: Tensor, pid: int, index: int = -1
    ) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if (
                self._project_step == self.engine.steps_collected + 1
                and not self.engine.is_paused
                and not self.engine.idle
            ):
                with torch.no_grad():
                    prev = target.grad
                    local = grad.detach() if prev is None else grad.detach() + prev.detach()
                    self._projected[index] = _project(local, self._project_step, index)
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

    # -- process_group=: is .grad the processes' average? ---------------------------------------

    def check_averaged(self, scale: float, grad_scale: float) -> str | None:
        """``process_group=`` on a plain model, on the steps the audits' schedule falls on (1,
        2, 4, …, 1,024, then one in 1,024): whether ``.grad`` is now the mean over the group's
        processes of their local gradients, as eq. A.2 pairs it with them. A random projection
        of the local gradient — each parameter's, noted by its hook when the backward last
        reached it, before any averaging (also one started from a post-accumulate-grad hook
        while the backward runs) — and of ``.grad`` now, are summed over the processes in one
        small all-reduce; the mean of the local ones
        must equal ``.grad``'s, and ``.grad``'s must be the same on every process. Returns what
        is wrong (the same on every process: it is decided from the reduced sums), or ``None``.
        ``scale``: the loss scale in the local gradients; ``grad_scale``: the one left in
        ``.grad`` (1 after a GradScaler's ``unscale_``).

        The tolerance, 8 rounding errors of the parameters' dtype (at least 1e-5) relative to
        the local gradients' root-mean-square norm, covers an average reduced in that dtype; a
        sum instead of a mean, a missing all-reduce, a clip or rescale after the averaging are
        off by far more, except with a probability of the order of the tolerance per check."""
        if self.kind != "manual" or self.engine.idle or not self.engine.check_scheduled:
            return None
        if str(dist.get_backend(self.group)) == "fake":
            return None  # torch's test backend: collectives that do not communicate
        step = self.engine.steps_collected + 1
        noted = self._projected if self._project_step == step else {}
        self._project_step, self._projected = None, {}
        now = {
            i: _project(p.grad.detach(), step, i)
            for i, p in enumerate(self.params)
            if p.grad is not None
        }
        buf = torch.zeros(5, dtype=torch.float64, device=self.device)
        if noted and set(noted) == set(now):
            local = sum(x[0].to(buf) for x in noted.values())
            local_sq = sum(x[1].to(buf) for x in noted.values())
            g = sum(x[0].to(buf) for x in now.values()) / grad_scale
            parts = (1.0, local / scale, local_sq / scale**2, g, g * g)
            for i, value in enumerate(parts):
                buf[i] = value
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        had, local, local_sq, mine, mine_sq = buf.tolist()
        w = self.world_size
        if round(had) < w or not all(map(math.isfinite, (local, local_sq, mine, mine_sq))):
            return None  # a process without a noted backward this step, or inf/nan (AMP)
        dtypes = {p.dtype for p in self.params if p.dtype.is_floating_point}
        tol = max([1e-5] + [8 * torch.finfo(d).eps for d in dtypes])
        rms = math.sqrt(max(local_sq, 0.0) / w)  # the local gradients' root-mean-square norm
        if rms == 0.0:
            return None
        # per process: .grad's projection against the mean of the local ones, and its spread
        # over the processes (zero when every process holds the same average)
        off = abs(mine - local) / w
        spread = math.sqrt(max(0.0, mine_sq - mine * mine / w) / w)
        if spread <= tol * rms and off <= tol * rms:
            return None
        self._local, self._armed = {}, None  # (the step is discarded)
        if spread > tol * rms:
            what = (
                "the processes hold different gradients in .grad (not all-reduced? averaged "
                "over another group than process_group=?)"
            )
        elif local != 0.0 and abs(mine / local - w) <= 0.01 * w:
            what = (
                f".grad is the sum of the {w} processes' gradients, not their mean (divide by "
                "the group's size after the all_reduce, or use ReduceOp.AVG)"
            )
        else:
            what = (
                ".grad is the same on every process but not the mean of their gradients "
                "(clipped, rescaled or changed after the averaging? averaged over another "
                "group than process_group=? reduced in a lower precision than the parameters', "
                "e.g. through a bf16 buffer, whose rounding the check does not allow: average "
                "in the parameters' dtype, or use DistributedDataParallel with its compression "
                "hook)"
            )
        return (
            f"process_group= says the gradients are averaged over the group's {w} processes "
            f"between the last backward pass and tracker.step(), but {what}. Checked on the "
            "audits' steps by a random projection of the gradients: the local gradients' "
            f"projections average {local / w:.6g}, .grad's {mine / w:.6g}, and .grad's spread "
            f"{spread:.3g} over the processes (tolerance {tol * rms:.3g}). Average after the "
            "step's last backward with dist.all_reduce(p.grad) and p.grad /= world_size (or "
            "op=ReduceOp.AVG) for every parameter, then call tracker.step(), before clipping; "
            "or wrap the model in DistributedDataParallel and let the tracker take its group. "
            "Nothing of this step was recorded"
        )

    def discard(self) -> None:
        """Forget this process's view of the step's passes (the tracker's ``discard()``: the
        step was abandoned)."""
        self._local, self._armed = {}, None

    def remove(self) -> None:
        """Remove this source's hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- per step -----------------------------------------------------------------------------

    def launch(
        self,
        step: StepNorms,
        observations: dict[str, Observation],
        grad_scale: float,
        loss: Tensor | float | None,
        tokens: Tensor | None = None,
        step_number: int = 0,
        picks: Sequence[tuple[str, str, Tensor]] = (),
        left_out: bool = False,
        overflowed: bool = False,
    ) -> ReducedStep:
        """Pack this process's sums for the step and start the all-reduce.

        Args:
            step: This process's passes of the step and their normalisation.
            observations: This process's small-batch sources (sub-batches, per-example,
                micro-batches) as measured on its own passes.
            grad_scale: The loss scale still in ``.grad`` (1 once ``scaler.unscale_`` ran).
            loss: The loss passed to ``tracker.step()``.
            tokens: The tokens this process's loss counted (a device number), if known.
            step_number: The tracker's step number, summed over the processes as a check that
                they reduce the same step (:func:`step_kind`).
            picks: This process's layer inputs picked by index tensors on the device
                (``PerExampleNorms.unread_picks``): the processes where one is not the
                examples in order are counted, and the tracker refuses the step.
            left_out: This process leaves the step out (a short accumulation window): every
                process then does, when it reads the step (:func:`step_kind`). The buffer is
                reduced all the same, so that every process runs the same collectives.
            overflowed: This process's squared norms overflowed float32 under the loss scale:
                left out on every process likewise.

        The weights c may be device tensors (measured from the model's own loss,
        :mod:`noisescale.tokens`); they then enter the buffer on the device, like the norms.
        """
        local, self._local, self._armed = self._local, {}, None
        passes = step.passes
        if any(p.weights is not None for p in passes):
            raise NoiseScaleInputError(
                "preconditioned norms are not supported under data parallelism"
            )
        host = [0.0] * WIDTH
        dev: dict[int, Tensor] = {}

        def put(i: int, value: float | Tensor) -> None:
            if isinstance(value, Tensor):
                dev[i] = value
            else:
                host[i] = float(value)

        host[EXAMPLES] = float(sum(p.batch_size for p in passes))
        sum_c, sum_c2 = step.sum_c, step.sum_c2
        local_inv = None
        if step.data_weighted and host[EXAMPLES] > 0:
            sum_c, sum_c2, local_inv = self._put_no_token(step, sum_c, sum_c2, put)
        put(SUM_C, sum_c)
        put(SUM_C2, sum_c2)
        if tokens is not None:
            put(TOKENS, tokens)
            host[HAS_TOKENS] = 1.0
        host[STEP] = float(step_number)
        host[PROCESSES] = 1.0
        host[LEFT_OUT] = float(left_out)
        host[OVERFLOWED] = float(overflowed)
        if picks:
            put(PICKED, torch.stack([flag for _, _, flag in picks]).any())
        with torch.no_grad():
            for name, obs in observations.items():
                put(_column(name, 0), obs.count)
                put(_column(name, 1), obs.inv_size_sum)
                host[_column(name, 3)] = 1.0
                dev[_column(name, 2)] = obs.sqnorm_sum
            local_sq = self._local_sqnorm(passes, local)
            if local_sq is not None and (isinstance(sum_c, Tensor) or sum_c > 0):
                host[_column("local", 0)] = 1.0
                if local_inv is None:
                    local_inv = sum_c2 / (sum_c * sum_c)
                put(_column("local", 1), local_inv)  # 1/b_local
                host[_column("local", 3)] = 1.0
                d = step.scale * sum_c  # (divided twice: StepNorms.mean_grad_sq)
                local_s = local_sq / d / d
                if isinstance(sum_c, Tensor):
                    # (a process of no token, sum_c 0 here: its gradient 0, |X̄|² 0)
                    local_s = torch.where(sum_c > 0, local_s, local_sq * 0.0)
                dev[_column("local", 2)] = local_s
            # (past 2³² the gradients are unscaled before they are squared: the tracker's
            # step, where |S·Σ g_i|² overflowed float32)
            pre = grad_scale if grad_scale > 2.0**32 else 1.0
            big = self._big_part(pre)
            if big is not None:
                dev[BIG] = big * (pre / grad_scale) ** 2
            if step.data_weighted:
                self._put_passes(step, put, host)
            if loss is not None:
                host[HAS_LOSS] = 1.0
                if isinstance(loss, Tensor):
                    dev[LOSS] = loss.detach().reshape(())
                else:
                    host[LOSS] = float(loss)
        return self._start(host, dev)

    def launch_unmeasured(
        self, examples: int, tokens: Tensor | None, step_number: int
    ) -> ReducedStep:
        """Start the all-reduce of a step ``measure_every`` leaves unmeasured: its examples and
        tokens (``None``: not counted), summed over the processes so that the next measured
        step — or a checkpoint saved on one process — counts every process's."""
        host = [0.0] * WIDTH
        host[EXAMPLES] = float(examples)
        host[STEP] = float(step_number)
        host[PROCESSES] = 1.0
        host[UNMEASURED] = 1.0
        dev: dict[int, Tensor] = {}
        if tokens is not None:
            dev[TOKENS] = tokens.detach()
            host[HAS_TOKENS] = 1.0
        return self._start(host, dev)

    def _start(self, host: list[float], dev: dict[int, Tensor]) -> ReducedStep:
        """The buffer of the host-side and device numbers, and its asynchronous all-reduce."""
        join = getattr(getattr(self.model, "_orig_mod", self.model), "_join_config", None)
        if join is not None and join.enable:
            # (a process that has run out of batches shadows DDP's collectives, not this one:
            # the next all-reduces are paired with the wrong ones and gloo aborts, with no word
            # of ours — a hunt; nothing tells uneven inputs here without a collective)
            self._warn_once(
                "join",
                "DistributedDataParallel.join() is active: the tracker all-reduces a buffer at "
                "every tracker.step(), which join() does not shadow, so every process must call "
                "step() equally often — with uneven inputs the collectives stop matching and the "
                "processes abort (gloo: 'EnforceNotMet … vs …'). Give every process the same "
                "number of batches (DistributedSampler(..., drop_last=True), or an even split); "
                "with equal counts the estimate is exact",
            )
        buffer = self._host_to_device(host)
        for i, value in dev.items():
            # an integer index and a 0-d device tensor: a device-side copy, no host sync
            buffer[i] += value.to(device=self.device, dtype=torch.float64).reshape(())
        work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        return ReducedStep(buffer, work)

    def _host_to_device(self, host: list[float]) -> Tensor:
        """The host-side numbers on the reduction's device, without a host synchronisation:
        through pinned memory and an asynchronous copy on CUDA."""
        values = torch.tensor(host, dtype=torch.float64)
        if self.device.type == "cpu":
            return values
        return values.pin_memory().to(self.device, non_blocking=True)

    def _put_no_token(
        self, step: StepNorms, sum_c: Tensor, sum_c2: Tensor, put: Callable[[int, Any], None]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Σc, Σc² and 1/b_local of a process whose passes count no token (weights 1/0 = inf,
        its gradient 0; :data:`EMPTY_C`) without them: 0, 0 and its own 1/b_local, which does
        not depend on the weight its examples take in :func:`resolve` (on the device, no host
        read; where every weight is finite, the numbers given). Until 2026-12-07 its inf made
        the step's b_big inf/inf: the step skipped without a word but numpy's (a review)."""
        c = step.pass_weights()
        n = torch.tensor(
            [float(p.batch_size) for p in step.passes if p.batch_size > 0],
            dtype=torch.float64,
            device=c.device,
        )
        empty = ~torch.isfinite(c)
        a, b = (torch.ones_like(n), 1.0 / n) if step.size_weighted else (n, n)
        empty_c, empty_c2 = torch.where(empty, a, 0.0).sum(), torch.where(empty, b, 0.0).sum()
        put(EMPTY_C, empty_c)
        put(EMPTY_C2, empty_c2)
        weighed = torch.isfinite(sum_c)
        inv = torch.where(weighed, sum_c2 / (sum_c * sum_c), empty_c2 / (empty_c * empty_c))
        return torch.where(weighed, sum_c, 0.0), torch.where(weighed, sum_c2, 0.0), inv

    def _put_passes(self, step: StepNorms, put: Callable[[int, Any], None], host: list) -> None:
        """This process's passes for the big batch within each pass, where the weights are
        measured on the device and may vary with the data (:data:`PASS_COUNT` …)."""
        if not any(p.batch_size > 0 for p in step.passes):
            return
        # (a pass, or a whole process, of no token weighs 1/0 = inf, its gradient 0: only the
        # finite weights are summed and counted, so such a process adds no weight — until
        # 2026-12-07 its inf made the reduced spread nan, read as weights that vary: the rest
        # of the run measured within its passes, or refused under per_example=False; a review)
        c = step.pass_weights()
        finite = torch.isfinite(c)
        host[PASS_COUNT] = float(len(c))
        put(PASS_WEIGHED, finite.sum().to(torch.float64))
        put(PASS_C, torch.where(finite, c, 0.0).sum())
        put(PASS_C2, torch.where(finite, c * c, 0.0).sum())
        within = step.within_passes()
        if within is None:
            host[PASS_MISSING] = 1.0
            return
        examples = float(sum(p.batch_size for p in step.passes))
        put(PASS_BIG, within[0] * examples)
        host[PASS_EXAMPLES] = examples

    def resolve(
        self, values: np.ndarray
    ) -> tuple[float, float, int, float | None, dict, float | None]:
        """The step's global statistics from the reduced buffer (host side, no collective).
        Once the passes' weights have varied with the data (:func:`weights_vary`), every later
        step is measured within its passes (as the single-process tracker does: choosing by
        each step's own counts would select steps on their data)."""
        self.weights_varied = self.weights_varied or weights_vary(values)
        return resolve(values, self.world_size, within=self.weights_varied)

    def resolve_unmeasured(self, values: np.ndarray) -> tuple[int, float | None]:
        """An unmeasured step's examples and tokens over the processes (module function)."""
        return resolve_unmeasured(values, self.world_size)

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

    def _big_part(self, pre: float = 1.0) -> Tensor | None:
        """This process's share of |.grad|²: shards on every rank, replicated grads on rank 0;
        each gradient divided by ``pre`` first."""
        # (a .grad no backward of the step reached — a parameter removed from the model — is
        # not the step's: the tracker's _stale_grads, a review)
        params = [p for p in self.params if p.grad is not None and id(p) not in self.stale]
        grads = [p.grad for p in params]
        if not grads:
            raise NoiseScaleInputError(
                "no parameter has a gradient: call tracker.step() after loss.backward() and "
                "before optimizer.zero_grad()"
            )
        if self.kind != "fsdp":
            if self.rank != 0:
                return None
            return sqnorm_total([g.detach() / pre if pre != 1.0 else g.detach() for g in grads])
        from torch.distributed.tensor import DTensor

        # grouped by the number of processes holding the same shard, so that each group's sum
        # is divided by a Python number: no weight vector copied to the device per step
        shards: dict[int, list[Tensor]] = {}
        for p in params:
            g = p.grad
            if isinstance(g, DTensor):
                local = g.to_local().detach()
                shards.setdefault(self._replicas_of(p, g), []).append(
                    local / pre if pre != 1.0 else local
                )
            elif self.rank == 0:  # a replicated gradient counts once
                shards.setdefault(1, []).append(g.detach() / pre if pre != 1.0 else g.detach())
        total: Tensor | None = None
        for replicas, group in shards.items():
            part = sqnorm_total(group)
            if replicas > 1:
                part = part / replicas
            total = part if total is None else total + part
        return total

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

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)


def _parameter_behind(t: Tensor) -> Tensor:
    """The parameter itself where a module attribute is a view of it.

    Inside a module that uses one of its parameters directly (``x * self.scale``), the
    per-example engine hands the forward an alias of the parameter (a view that routes its
    gradient); hooking the alias would count the gradient of that one forward only, and
    hooking it as well as the parameter (when a later pass runs without the alias) would count
    it twice. Both hooks belong on the parameter, which FSDP2 keeps for the whole run.
    """
    if isinstance(t, nn.Parameter):
        return t
    with torch._C.DisableTorchFunctionSubclass():  # the alias would answer with another alias
        base = t._base
    return base if isinstance(base, nn.Parameter) else t


def _acc(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _is_fsdp2(model: nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 root; refuses parameters split in any other way.

    FSDP2 places a parameter as ``(Shard(d),)`` on its 1-D mesh, or ``(Replicate(), Shard(d))``
    on HSDP's 2-D mesh; those are the layouts :meth:`DataParallelSource._big_part` sums and the
    hooks see unsharded. Any other placement comes from tensor parallelism
    (``parallelize_module``, alone or under FSDP2 on a mesh dimension of its own), which the
    per-layer hooks cannot sum over: refused, naming the parameter.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.6 has no public FSDP2
        return False
    sharded = [(n, p) for n, p in model.named_parameters() if isinstance(p, DTensor)]
    if not sharded:
        return False
    is_fsdp = isinstance(model, FSDPModule)
    inner_fsdp = any(isinstance(m, FSDPModule) for m in model.modules())
    for name, p in sharded:
        if not (is_fsdp and _fsdp_layout(p)):
            # tensor parallelism alone can give FSDP2's layout (Shard(0) on a 1-D mesh)
            compiled = getattr(model, "_orig_mod", None)
            if isinstance(compiled, FSDPModule) and _fsdp_layout(p):
                raise NoiseScaleInputError(
                    "the model given to the tracker is torch.compile() of an FSDP2 root, whose "
                    "wrapper hides fully_shard from it: compile the layers in place "
                    "(layer.compile(); or the root's forward) before fully_shard and create the "
                    "tracker from the FSDP2 root, or measure without torch.compile"
                )
            if inner_fsdp and _fsdp_layout(p):
                raise NoiseScaleInputError(
                    f"parameter '{name}' is sharded by fully_shard() but the model given to the "
                    "tracker is not an FSDP2 module: apply fully_shard() to the root model as "
                    "well, and create the tracker from it"
                )
            raise NoiseScaleInputError(_tensor_parallel_message(name, p))
    return True


def _fsdp_layout(p: Any) -> bool:
    """``p`` is laid out by FSDP2 alone: ``(Shard,)`` or HSDP's ``(Replicate, Shard)``."""
    placements = tuple(p.placements)
    if len(placements) == 1:
        return placements[0].is_shard()
    return len(placements) == 2 and placements[0].is_replicate() and placements[1].is_shard()


def _tensor_parallel_message(name: str, p: Any) -> str:
    mesh = p.device_mesh
    dims = mesh.mesh_dim_names or tuple(f"dim {i}" for i in range(mesh.ndim))
    layout = ", ".join(
        f"{d} ({n}): {pl}" for d, n, pl in zip(dims, mesh.shape, p.placements, strict=True)
    )
    return (
        f"tensor parallelism is not supported: parameter '{name}' is split over a device mesh "
        f"as [{layout}], not by FSDP2 alone, so each process holds a shard of its gradient and "
        "of its layer's activations, and every norm the tracker reads would miss the other "
        "shards. Measure the noise scale without tensor parallelism, in a run of the same "
        "model and global batch under FSDP2, HSDP or DDP (the noise scale depends on the "
        "model, the data and the point in training, not on how the model is split), e.g. for "
        "a stretch of training resumed from a checkpoint"
    )


def _pipeline_message(stage: Any) -> str:
    return (
        "pipeline parallelism is not supported: the model given to the tracker is stage "
        f"{stage.stage_index} of {stage.num_stages} of a torch.distributed.pipelining schedule, "
        "so it holds only part of the parameters and its gradient norms are that part's; the "
        "whole model's |G|² and tr Σ add up over the stages, which the tracker does not do. "
        "Measure the noise scale without pipeline parallelism, in a run of the same model and "
        "global batch under FSDP2, HSDP or DDP, e.g. for a stretch of training resumed from a "
        "checkpoint"
    )


def _is_pipeline_stage(obj: Any) -> bool:
    # PipelineStage and the traced _PipelineStage share a private base; match them by module
    return type(obj).__module__.startswith("torch.distributed.pipelining") and hasattr(
        obj, "submod"
    )


def _refuse_pipeline_stage(model: nn.Module) -> None:
    """Refuse a model that a ``torch.distributed.pipelining`` stage already runs.

    The stage does not mark its module, so this looks for a stage object referring to it
    (once, at construction, and only if the user imported the pipelining package); a stage
    created after the tracker is caught at the first forward (:func:`_calling_pipeline_stage`).
    """
    if "torch.distributed.pipelining" not in sys.modules:
        return
    for ref in gc.get_referrers(model):
        if _is_pipeline_stage(ref) and ref.submod is model:
            raise NoiseScaleInputError(_pipeline_message(ref))


def _calling_self(match: Callable[[Any], bool]) -> Any | None:
    """The ``self`` of the innermost calling frame that ``match`` accepts, if any: the wrapper
    running the current forward, which marks nothing on the module it runs."""
    frame = sys._getframe(2)
    while frame is not None:
        me = frame.f_locals.get("self")
        if me is not None and match(me):
            return me
        frame = frame.f_back
    return None


def _calling_pipeline_stage() -> Any | None:
    """The pipelining stage whose schedule is running the current forward, if any."""
    if "torch.distributed.pipelining" not in sys.modules:
        return None
    return _calling_self(_is_pipeline_stage)


def _late_wrapper_message(ddp: Any, model: nn.Module) -> str:
    inner = "the model given to the tracker" if ddp.module is model else "a module holding it"
    return (
        f"this forward pass is run by a DistributedDataParallel around {inner}, created after "
        "the tracker (or the tracker was given ddp.module): DDP averages the gradients over "
        f"its {dist.get_world_size(ddp.process_group)} processes, which the tracker, built on "
        "the plain model, would read as this process's own, a wrong |G|² and tr Σ. Create "
        "the tracker from the wrapped model, after the wrap: "
        "GradientNoiseTracker(DistributedDataParallel(model)) (with accelerate, after "
        "accelerator.prepare(model); the Trainer's callback does this itself)"
    )


def watch_late_wrapper(model: nn.Module, engine: PerExampleNorms) -> RemovableHandle | None:
    """For a plain model (no data-parallel source) in a run of several processes, a forward
    pre-hook that refuses a forward a ``DistributedDataParallel`` runs — a DDP created after
    the tracker, or one whose ``.module`` was given to the tracker — whose averaged gradients
    the tracker would take for this process's own; ``None`` in a run of one process. DDP marks
    nothing on the module it wraps, so the hook looks for it in the calling frames, on every
    forward with gradients (6–14 µs; only in this set-up, where the tracker otherwise measures
    each process alone)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    from torch.nn.parallel import DistributedDataParallel

    def hook(module: nn.Module, args: tuple) -> None:
        if engine.is_paused or not torch.is_grad_enabled():
            return
        ddp = _calling_self(
            lambda me: (
                isinstance(me, DistributedDataParallel)
                and any(m is module for m in me.module.modules())
            )
        )
        if ddp is not None:
            raise NoiseScaleInputError(_late_wrapper_message(ddp, module))

    return model.register_forward_pre_hook(Hook(hook))


def _refuse_fsdp1(model: nn.Module) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise NoiseScaleInputError(
            "FullyShardedDataParallel (FSDP1) flattens parameters, which hides them from the "
            "per-layer hooks; use FSDP2 (torch.distributed.fsdp.fully_shard) or "
            "DistributedDataParallel"
        )
