"""Which ``torch.amp.GradScaler`` scaled the loss of a step's passes.

``scaler.scale(loss).backward()`` leaves every gradient — ``.grad`` and what the hooks see —
multiplied by the loss scale S until ``unscale_``. A tracker given the scaler (``scaler=``)
divides S out; one not given it read |G|² and tr Σ S² too large (2³² at the default scale),
B_simple unchanged, without a word until 2026-12-05. So while a tracker exists, ``scale`` of
``torch.amp.GradScaler`` and of its subclasses that override it (``ShardedGradScaler``; also
those defined later: a scaler's construction wraps its class) is wrapped in place: it calls the
original unchanged and puts a pre-hook on each scaled tensor's autograd node, which notes the
scaler against the backward's graph task when that backward starts from it. The engine's hooks
on the parameters' gradients (:meth:`~.engine.PerExampleNorms._make_param_hook`) run later in
the same backward and read the note: the pass's loss was scaled, whatever computed it from the
outputs (the model itself, a penalty beside it, a discriminator, a compiled graph) — no walk
of the graph, which a review found could stop short of the outputs. (Hooks on the outputs
read it until 2026-12-05; a compiled model's unaudited steps have none.) The tracker then refuses a
scaler it was not given, on every step. A scaler that is disabled returns its input unscaled and
is not noted.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch

from noisescale.per_example.values import _tensors

# graph task id -> the scaler whose scaled tensor started that backward (the last few only)
_TASKS: dict[int, Any] = {}
# scale() calls running now: the loss watch keeps a loss's kind through the product with the
# scale tensor there (the kind check held under a GradScaler too, a review of 2026-12-06)
SCALING = [0]
_KEEP = 64


def listen() -> None:
    """Wrap ``scale`` of GradScaler and of its subclasses that override it (idempotent), and
    GradScaler's ``__init__``, so that a subclass defined later is wrapped when first built."""
    _wrap_all()
    base = torch.amp.GradScaler
    init = base.__dict__["__init__"]
    if getattr(init, "_noisescale_original", None) is None:

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, _original: Any = init, **kwargs: Any) -> None:
            _original(self, *args, **kwargs)
            own = type(self).__dict__.get("scale")
            if own is not None and getattr(own, "_noisescale_original", None) is None:
                _wrap_all()  # (a subclass defined after the tracker, with a scale of its own)

        __init__._noisescale_original = init  # type: ignore[attr-defined]
        base.__init__ = __init__  # type: ignore[method-assign]


def task_scaler() -> Any:
    """The scaler noted for the backward running now (None when none scaled its root)."""
    if not _TASKS:
        return None
    return _TASKS.get(torch._C._current_graph_task_id())


def _subclasses(cls: type) -> list[type]:
    out, stack = [], [cls]
    while stack:
        c = stack.pop()
        out.append(c)
        stack.extend(c.__subclasses__())
    return out


def _wrap_all() -> None:
    for cls in _subclasses(torch.amp.GradScaler):
        original = cls.__dict__.get("scale")
        if original is None or getattr(original, "_noisescale_original", None) is not None:
            continue

        @functools.wraps(original)
        def scale(self: Any, outputs: Any, _original: Any = original) -> Any:
            SCALING[0] += 1
            try:
                scaled = _original(self, outputs)
            finally:
                SCALING[0] -= 1
            if scaled is outputs:  # disabled: nothing scaled
                return scaled
            if isinstance(scaled, Iterator):  # (an iterable's scaled values come lazily)
                return _noting(self, scaled)
            _note(self, scaled)
            return scaled

        scale._noisescale_original = original  # type: ignore[attr-defined]
        cls.scale = scale  # type: ignore[method-assign]


def _noting(scaler: Any, values: Iterator[Any]) -> Iterator[Any]:
    for value in values:
        _note(scaler, value)
        yield value


def _note(scaler: Any, scaled: Any) -> None:
    for t in _tensors(scaled):  # (a tensor, or lists, tuples and dicts of them)
        if t.grad_fn is not None:
            t.grad_fn.register_prehook(functools.partial(_started, scaler))


def _started(scaler: Any, grads: Any) -> None:
    """A backward reached a scaled tensor's node: note the scaler against its graph task."""
    task = torch._C._current_graph_task_id()
    if task != -1:
        _TASKS[task] = scaler
        while len(_TASKS) > _KEEP:
            del _TASKS[next(iter(_TASKS))]
