"""Preconditioned noise scale: norms of P ⊙ g with Adam's or RMSprop's elementwise preconditioner
(paper footnote 7, App. E.2)."""

from __future__ import annotations

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


def optimizer_steps(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> int:
    """The steps the optimizer has taken, counted by its most-stepped parameter among
    ``params`` (Adam and RMSprop count per parameter); 0 before its first step."""
    steps = [_step(optimizer.state[p]) for p in params if optimizer.state.get(p)]
    return int(max(steps, default=0))


def _step(state: dict[str, Any]) -> float:
    return float(state.get("step", 0))


def preconditioner_weights(
    optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], min_steps: int = 1
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
    if optimizer_steps(optimizer, params) < min_steps:
        return None
    out: dict[int, Tensor] = {}
    with torch.no_grad():
        for p in params:
            group = group_of[id(p)]
            state = optimizer.state.get(p)
            if not state or _step(state) == 0:
                out[id(p)] = torch.zeros_like(p, dtype=_at_least_float32(p).dtype)
                continue
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


def stateless_parameters(
    optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]
) -> list[nn.Parameter]:
    """The parameters whose preconditioner is not defined yet: the optimizer holds no state for
    them (none had a gradient yet), or state that has not stepped (``step`` 0)."""
    return [p for p in params if not optimizer.state.get(p) or _step(optimizer.state[p]) == 0]


def _at_least_float32(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
