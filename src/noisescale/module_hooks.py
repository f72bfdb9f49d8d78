"""The hooks noisescale puts on a user's modules, and what becomes of them in a copy of the model.

A copy of a model — ``copy.deepcopy``, and through it ``torch.optim.swa_utils.AveragedModel``,
timm's ``ModelEma``, Lightning's weight averaging, an EMA teacher, a twin for sharpness-aware
minimization — takes its modules' hooks with it, and ``torch.save(model)`` pickles them. The copy
is not the model being measured: its parameters are other tensors, whose gradients never reach
the measured ones. So a deep copy or a pickle of a hook noisescale puts on a module is a hook
that does nothing, and the ``loss_function`` noisescale wraps on a Hugging Face model is, in a
copy, the model's own again. A shallow ``copy.copy(model)`` shares the model's parameters,
submodules and hooks' dictionaries: it is the measured model, and its hooks act.

Before 2026-12-04 a copy's forward with gradients on failed with a ``KeyError`` from inside the
engine, and a Hugging Face model with a tracker could not be copied or pickled at all ("cannot
pickle 'AccumulateGrad' object").

**One thread.** A tracker measures the forwards of the thread that created it: its hooks keep
one forward's state at a time (the parameters swapped for aliases, the open pass), and a
forward on another thread at the same moment interleaved with it — a crash inside autograd, an
alias left in the model in place of a Parameter, steps refused for causes that never happened
(a helper's hunt, 2026-12-05). On any other thread a forward with gradients disabled (an
evaluation under ``torch.no_grad()`` or ``torch.inference_mode()``) passes the hooks untouched,
and one with gradients enabled is refused there, before the model runs
(:func:`refuse_foreign_forward`). Backward hooks are not bound to the thread: autograd runs
them on threads of its own, and a forward it re-runs inside a backward (activation
checkpointing's recomputation) belongs to that backward's pass.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from noisescale.errors import NoiseScaleInputError

__all__ = [
    "Hook",
    "Inert",
    "InertWhenCopied",
    "WrappedLoss",
    "foreign_thread",
    "refuse_foreign_forward",
    "registrations",
]


def foreign_thread(owner: int) -> bool:
    """Whether a hook runs on a thread other than ``owner`` (the measuring thread's
    ``threading.get_ident()``) outside any backward (see the module docstring). Never while
    Dynamo traces: asking would break the graph, and a compiled graph does not depend on the
    thread (a compiled forward on another thread is not checked: a gap)."""
    if torch.compiler.is_compiling():
        return False
    return threading.get_ident() != owner and torch._C._current_graph_task_id() == -1


def refuse_foreign_forward(owner: int) -> None:
    """Refuse a forward with gradients enabled on a thread other than ``owner``."""
    names = {t.ident: t.name for t in threading.enumerate()}
    here = threading.current_thread().name
    raise NoiseScaleInputError(
        f"a forward of the tracked model ran with gradients enabled on thread {here!r} while "
        f"the tracker measures the model's forwards on thread {names.get(owner, owner)!r} (the "
        "one that created it); its hooks hold one forward's state at a time, and a forward on "
        "another thread would mix into the measured one. Run the forwards of other threads "
        "(an evaluation, a sampler) under torch.no_grad() or torch.inference_mode(), which "
        "the tracker lets through untouched, or create the tracker on the thread that trains"
    )


_REGISTERED = [0]  # modules and parameters registered on any module in the process
_REGISTRATION_HOOKS: list[Any] = []


def _count_registration(*args: Any) -> None:
    _REGISTERED[0] += 1


def registrations() -> int:
    """How many modules and parameters have been registered on modules in this process since
    the first tracker or engine was created (torch's global registration hooks: one addition
    each). A layer re-created or added, a Parameter assigned to a module's attribute (a bare
    logit scale replaced or tied), peft adapters, ``resize_token_embeddings()`` and
    ``load_state_dict(assign=True)`` register; the tracker and the engine walk the model for
    parameters they were not built on when the count moved."""
    if not _REGISTRATION_HOOKS:
        from torch.nn.modules import module as module_mod

        _REGISTRATION_HOOKS.append(
            module_mod.register_module_module_registration_hook(_count_registration)
        )
        _REGISTRATION_HOOKS.append(
            module_mod.register_module_parameter_registration_hook(_count_registration)
        )
    return _REGISTERED[0]


class Inert:
    """What a noisescale hook becomes in a copy of the model: nothing."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __repr__(self) -> str:
        return "noisescale.module_hooks.Inert()"


class InertWhenCopied:
    """Deep-copied (``copy.deepcopy``) or pickled, an :class:`Inert` hook: the base of every
    hook noisescale puts on a module (:class:`Hook` here, the engine's ``_ModuleHook``)."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict) -> Inert:
        return Inert()

    def __reduce__(self) -> tuple:
        return (Inert, ())


class Hook(InertWhenCopied):
    """A forward (pre-)hook that calls ``fn``, inert in a deep copy or a pickle of the model. (A
    shallow ``copy.copy`` of the model shares it and the parameters: there it acts, as on the
    model.)"""

    __slots__ = ("fn", "owner")

    def __init__(self, fn: Callable[..., Any], owner: int | None = None) -> None:
        self.fn = fn
        self.owner = threading.get_ident() if owner is None else owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if foreign_thread(self.owner):
            return None  # (the engine's own hooks refuse such a forward with gradients)
        return self.fn(*args, **kwargs)


def _original(loss_function: Callable[..., Any]) -> Callable[..., Any]:
    return loss_function


class WrappedLoss:
    """A Hugging Face model's ``loss_function`` wrapped by noisescale (``wrapper``, which calls
    ``original``); in a copy of the model, or a pickle of it, ``original`` alone."""

    __slots__ = ("__wrapped__", "wrapper")

    def __init__(self, original: Callable[..., Any], wrapper: Callable[..., Any]) -> None:
        self.__wrapped__ = original
        self.wrapper = wrapper

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapper(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Callable[..., Any]:
        return self.__wrapped__

    def __reduce__(self) -> tuple:
        return (_original, (self.__wrapped__,))
