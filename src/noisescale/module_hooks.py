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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Hook", "Inert", "InertWhenCopied", "WrappedLoss"]


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

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
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
