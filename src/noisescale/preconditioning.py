"""Preconditioned noise scale: norms of P ⊙ g with Adam's or RMSprop's elementwise preconditioner
(paper footnote 7, App. E.2)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from noisescale.errors import NoiseScaleInputError

__all__ = [
    "check_preconditioner",
    "optimizer_steps",
    "preconditioner_weights",
    "stateless_parameters",
    "step_counts",
    "unwrap_optimizer",
]

_PRECONDITIONERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)
# the methods whose math the preconditioner is read for: a subclass must keep torch's own
_MATH = ("step", "_init_group")


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside the wrappers that step it unchanged: accelerate's
    ``AcceleratedOptimizer`` (``.optimizer``), Lightning's ``LightningOptimizer`` and Fabric's
    optimizer (``._optimizer``) hold the same optimizer, with the same state, in one process. (Until
    2026-12-05 an ``AcceleratedOptimizer`` was refused, with no word of ``.optimizer``.)"""
    # (Lightning makes a class per optimizer, LightningAdam, a subclass of LightningOptimizer
    # and Adam whose step is Lightning's: found by its bases, and unwrapped before the check
    # of the update's math)
    bases = {(c.__module__.split(".")[0], c.__name__) for c in type(optimizer).__mro__}
    if ("accelerate", "AcceleratedOptimizer") in bases:
        return unwrap_optimizer(optimizer.optimizer)
    if bases & {
        ("lightning", "LightningOptimizer"),
        ("pytorch_lightning", "LightningOptimizer"),
        ("lightning", "_FabricOptimizer"),  # (fabric.setup's FabricAdam, the same way)
        ("lightning_fabric", "_FabricOptimizer"),
    }:
        return unwrap_optimizer(optimizer._optimizer)
    return optimizer


def learning_rate(optimizer: Any) -> float | None:
    """The learning rate of the optimizer's first parameter group, ``None`` where it has none:
    transformers' ``Adafactor`` in its default relative-step mode keeps ``lr=None`` there
    (``tracker.step()`` crashed on it, a hunt, 2026-12-05)."""
    lr = optimizer.param_groups[0].get("lr")
    return None if lr is None else float(lr)


def check_preconditioner(
    model: nn.Module, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]
) -> None:
    """Refuse an optimizer whose preconditioner is not the √v̂ + ε this module reads.

    A subclass of Adam, AdamW or RMSprop passes ``isinstance`` whatever its ``step`` does (an
    Adam without v's bias correction divides by √v, not √v̂: until 2026-12-05 such a subclass
    was measured with Adam's P, |P ⊙ G|² off by the factor 1 − β₂ᵗ), so its update must be
    torch's own: ``step`` and ``_init_group`` the torch class's functions (torch wraps ``step``
    for its profiler hooks, hence :func:`inspect.unwrap`).
    """
    inner = getattr(optimizer, "optimizer", getattr(optimizer, "_optimizer", None))
    if not isinstance(optimizer, _PRECONDITIONERS) and isinstance(inner, _PRECONDITIONERS):
        raise NoiseScaleInputError(
            f"precondition= got a {type(optimizer).__name__}, a wrapper around the "
            f"{type(inner).__name__} whose second-moment state gives the preconditioner; pass "
            "the optimizer inside it (precondition=opt.optimizer)"
        )
    if not isinstance(optimizer, _PRECONDITIONERS):
        raise NoiseScaleInputError(
            f"precondition= takes an Adam, AdamW or RMSprop optimizer (whose second-moment "
            f"state gives the preconditioner), got {type(optimizer).__name__}"
        )
    kind = type(optimizer)
    if not any(
        isinstance(optimizer, base) and all(_same(kind, base, name) for name in _MATH)
        for base in _PRECONDITIONERS
    ):
        base = next(b for b in reversed(_PRECONDITIONERS) if isinstance(optimizer, b))
        changed = [name for name in _MATH if not _same(kind, base, name)]
        raise NoiseScaleInputError(
            f"precondition= got {kind.__name__}, a subclass of torch's {base.__name__} that "
            f"overrides {', '.join(changed)}: its update may divide by something other than "
            f"{base.__name__}'s {'√v + ε' if base is torch.optim.RMSprop else '√v̂ + ε'} (an "
            "Adam without bias correction divides by √v), and the preconditioner is read from "
            "the state as torch's update would use it; pass a torch.optim.Adam, AdamW or "
            "RMSprop (or a subclass that keeps their step), or measure the plain noise scale "
            "without precondition="
        )
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    missing = sorted(names.get(id(p), "?") for p in params if id(p) not in held)
    if missing:
        raise NoiseScaleInputError(
            f"parameters {missing} are trainable but not in the precondition optimizer, so they "
            "have no preconditioner; freeze them or add them to the optimizer"
        )


def _same(kind: type, base: type, name: str) -> bool:
    """Whether ``kind.name`` is ``base.name`` (both absent counts as the same)."""
    mine, theirs = getattr(kind, name, None), getattr(base, name, None)
    if mine is None or theirs is None:
        return mine is theirs
    return inspect.unwrap(mine) is inspect.unwrap(theirs)


def optimizer_steps(
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter],
    counts: list[float | None] | None = None,
) -> int:
    """The steps the optimizer has taken, counted by its most-stepped parameter among
    ``params`` (Adam and RMSprop count per parameter); 0 before its first step. ``counts``: the
    parameters' counts as :func:`step_counts` read them (read now where not given)."""
    if counts is None:
        counts = step_counts(optimizer, params)
    return _most(counts)


def step_counts(
    optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]
) -> list[float | None]:
    """Each parameter's step count in the optimizer's state (``None``: no state), read to the
    host at once: one device-to-host copy per device holding the counts, where ``float()`` of
    each (until 2026-12-07) synchronised with the device once per parameter — fused or
    capturable Adam keeps ``state["step"]`` on the GPU, ~300 syncs a step for a model of 300
    tensors."""
    sources = _StepSources(optimizer, list(params))
    return sources.resolve(_to_host(sources.stacks()))


def _most(counts: list[float | None]) -> int:
    return int(max((c for c in counts if c is not None), default=0))


class _StepSources:
    """Where each parameter's step count lies: ``None`` (no state), a number, or a tensor
    (Adam's and RMSprop's ``state["step"]``, on the CPU or, fused or capturable, on the
    parameter's device)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        states = optimizer.state
        self.sources: list[Any] = [
            (state.get("step", 0) if state else None) for state in map(states.get, params)
        ]
        self.tensors = [s for s in self.sources if isinstance(s, Tensor)]
        self.versions = [t._version for t in self.tensors]

    def same(self, other: _StepSources) -> bool:
        """Whether the counts are ``other``'s without reading them: the same objects, their
        tensors not written in place since (their version counters)."""
        return (
            self.versions == other.versions
            and len(self.sources) == len(other.sources)
            and all(
                a is b or (not isinstance(a, Tensor) and not isinstance(b, Tensor) and a == b)
                for a, b in zip(self.sources, other.sources, strict=True)
            )
        )

    @torch.no_grad()  # (a differentiable optimizer's counts may require grad)
    def stacks(self) -> list[tuple[Tensor, list[int]]]:
        """The tensors' values now, copied without a device sync: one stack per device (and
        dtype), with the positions in ``tensors`` of its values."""
        if not self.tensors:
            return []
        with contextlib.suppress(RuntimeError):  # (one device, one-element counts: one stack)
            # (flattened: a count of shape (1,), as a state_dict may hold, stacked to (n, 1)
            # read as lists until 2026-12-07, and the tracker failed on [1.0] ** ...; a review)
            stack = torch.stack(self.tensors).reshape(-1)
            if stack.numel() == len(self.tensors):
                return [(stack, list(range(len(self.tensors))))]
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(self.tensors):
            groups.setdefault((t.device, t.dtype), []).append(i)
        return [
            (torch.stack([self.tensors[i].detach().reshape(()) for i in at]), at)
            for at in groups.values()
        ]

    def resolve(self, values: list[float]) -> list[float | None]:
        """The counts, the tensors' being ``values`` (in ``tensors``' order)."""
        tensors = iter(values)
        return [
            None if s is None else next(tensors) if isinstance(s, Tensor) else float(s)
            for s in self.sources
        ]


def _to_host(stacks: list[tuple[Tensor, list[int]]]) -> list[float]:
    """The values of :meth:`_StepSources.stacks`, in ``tensors``' order: one copy per device."""
    by_device: dict[torch.device, list[tuple[Tensor, list[int]]]] = {}
    for stack, at in stacks:
        by_device.setdefault(stack.device, []).append((stack, at))
    values = [0.0] * sum(len(at) for _, at in stacks)
    for group in by_device.values():
        read = torch.cat([stack.double() for stack, _ in group]).tolist()  # the one sync
        for i, v in zip((i for _, at in group for i in at), read, strict=True):
            values[i] = v
    return values


class StepWatch:
    """The precondition optimizer's step counts, read to the host at most once per measured step
    (one copy per device holding them) and never on the others.

    :meth:`note` (an unmeasured step) keeps the most-stepped parameter's count on its device;
    :meth:`read` reads the noted counts and the parameters' counts now back together; a second
    read within the measured step reuses the first's where no step tensor changed since (the
    same objects, their version counters unmoved). The numbers are those
    ``float(state["step"])`` read, the copies being exact, so the tracker decides the same.
    Until 2026-12-07 each tracker step read every parameter's count with ``float()``: with
    fused or capturable Adam on a GPU one device sync per parameter and read, ~300 at an
    unmeasured step of a 300-tensor model and ~1,800 at a measured one. On CPU (300 tensors, a
    loaded 2-core machine) an unmeasured step's note costs about what ``float()`` of each did
    (~1 ms both; ~0.4 ms unloaded), a measured step's about half (3 ms for 5.5-6.6 ms).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        self.optimizer, self.params = optimizer, params
        self._last: _StepSources | None = None  # the sources last read
        self._counts: list[float | None] = []  # their counts
        self._noted: list[tuple[int, list[Tensor]]] = []  # (tracker step, its maxima)

    def note(self, step: int) -> None:
        """Keep the most-stepped parameter's count at tracker step ``step`` (on the device that
        holds it: no sync) for the next :meth:`read`."""
        sources = _StepSources(self.optimizer, self.params)
        numbers = [s for s in sources.sources if s is not None and not isinstance(s, Tensor)]
        most = [stack.amax() for stack, _ in sources.stacks()]
        if numbers or not most:
            most.append(torch.tensor(float(max(numbers, default=0))))
        self._noted.append((step, most))

    def flush(self) -> list[tuple[int, int]]:
        """The counts noted since the last read (tracker step, optimizer steps), in order."""
        if not self._noted:
            return []
        values = _to_host(
            [(m.reshape(1), [i]) for i, m in enumerate(m for _, most in self._noted for m in most)]
        )
        out, at = [], 0
        for step, most in self._noted:
            out.append((step, int(max(values[at : at + len(most)]))))
            at += len(most)
        self._noted = []
        return out

    def read(self, reuse: bool = False) -> tuple[list[tuple[int, int]], list[float | None]]:
        """The counts noted since the last read, and the parameters' counts now. ``reuse``:
        the last read's counts where nothing was noted since and no step tensor changed —
        for a second look within one tracker step only: a step made where version counters
        do not move (an optimizer step replayed from a CUDA graph) is seen by a read."""
        sources = _StepSources(self.optimizer, self.params)
        if reuse and not self._noted and self._last is not None and sources.same(self._last):
            return [], self._counts
        noted = [(m.reshape(1), step) for step, most in self._noted for m in most]
        stacks = sources.stacks()
        values = _to_host(
            [(m, [i]) for i, (m, _) in enumerate(noted)]
            + [(stack, [len(noted) + i for i in at]) for stack, at in stacks]
        )
        out: dict[int, int] = {}
        for (_, step), v in zip(noted, values, strict=False):
            out[step] = max(out.get(step, 0), int(v))
        self._noted = []
        self._last, self._counts = sources, sources.resolve(values[len(noted) :])
        return list(out.items()), self._counts


def preconditioner_weights(
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter],
    min_steps: int = 1,
    counts: list[float | None] | None = None,
) -> dict[int, Tensor] | None:
    """P² = (√v̂ + ε)⁻² per parameter id: the square of the optimizer's elementwise preconditioner.

    Adam/AdamW divide the (momentum of the) gradient by √v̂ + ε with v̂ = v/(1 − β₂ᵗ) the
    bias-corrected second moment (``max_exp_avg_sq`` with amsgrad); RMSprop by √v + ε (v minus
    the squared mean gradient when centered). The state read is the one left by the previous
    ``optimizer.step()``, fixed while this step's gradients are drawn, so the preconditioned
    norms stay unbiased for |P ⊙ G|² and tr(PΣP). ``None`` until the optimizer has taken
    ``min_steps`` steps (counted by its most-stepped parameter: Adam counts per parameter, and a
    head used one step in ten would otherwise hold every other parameter back).

    A parameter the optimizer holds no state for has never had a gradient (a pooler the loss
    does not use): its weight is zero — it adds nothing to any norm while it gets no gradient,
    and a step in which it gets its first one must be left out by the caller
    (:func:`stateless_parameters`), its preconditioner not being defined yet. (Until
    2026-12-05 such a parameter kept every step plain for the whole run, without a word.) State
    that has not stepped counts as none: fused Adam makes it (``step`` 0) on a step a GradScaler
    skips for overflow, where v̂ = 0/(1 − β₂⁰) is not defined (until 2026-12-05 it read P = NaN
    and the next step was dropped without a word).
    """
    params = list(params)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    if counts is None:
        counts = step_counts(optimizer, params)
    if optimizer_steps(optimizer, params, counts) < min_steps:
        return None
    out: dict[int, Tensor] = {}
    with torch.no_grad():
        for p, step in zip(params, counts, strict=True):
            group = group_of[id(p)]
            state = optimizer.state.get(p)
            if not step:  # (no state, or state that has not stepped)
                out[id(p)] = torch.zeros_like(p, dtype=_at_least_float32(p).dtype)
                continue
            if isinstance(optimizer, torch.optim.RMSprop):
                v = state["square_avg"]
                if group["centered"]:
                    v = v.addcmul(state["grad_avg"], state["grad_avg"], value=-1)
                denom = _at_least_float32(v).sqrt() + group["eps"]
            else:
                v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
                correction = 1.0 - group["betas"][1] ** step
                denom = (_at_least_float32(v) / correction).sqrt() + group["eps"]
            out[id(p)] = denom.pow(-2)
    return out


def stateless_parameters(
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter],
    counts: list[float | None] | None = None,
) -> list[nn.Parameter]:
    """The parameters whose preconditioner is not defined yet: the optimizer holds no state for
    them (none had a gradient yet), or state that has not stepped (``step`` 0)."""
    params = list(params)
    if counts is None:
        counts = step_counts(optimizer, params)
    return [p for p, step in zip(params, counts, strict=True) if not step]


def _at_least_float32(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
