"""Which ``torch.amp.GradScaler`` scaled the loss of a step's passes.

``scaler.scale(loss).backward()`` leaves every gradient — ``.grad`` and what the hooks see —
multiplied by the loss scale S until ``unscale_``. A tracker given the scaler (``scaler=``)
divides S out; one not given it read |G|² and tr Σ S² too large (2³² at the default scale),
B_simple unchanged, without a word until 2026-12-05. So while a tracker exists, ``scale`` of
``torch.amp.GradScaler`` (and of any subclass defined by then that overrides it:
``ShardedGradScaler``) notes the scaler on the open passes of every engine whose model outputs
the scaled tensors were computed from — found by a walk up their autograd graph, bounded, from
the scaled tensor to the passes' output nodes (the loss, or the logits it was computed from;
a model that returns its loss, a compiled model) — and the tracker refuses a scaler it was not
given, on every step. The method is wrapped once, in place, and calls the original unchanged;
a scaler that is disabled returns its input and is not noted.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from torch import Tensor

# the engines that want to know (weakly: a tracker that is gone stops listening)
_ENGINES: weakref.WeakSet = weakref.WeakSet()
# nodes walked from a scaled tensor before giving up (a loss is a few operations past the
# model's outputs; the walk does not go on into the model past an output)
_MAX_NODES = 1024


def listen(engine: Any) -> None:
    """Note scalers for ``engine`` (its :meth:`note_scaled`); wraps ``scale`` on first use."""
    _ENGINES.add(engine)
    _wrap_all()


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
            scaled = _original(self, outputs)
            if _ENGINES and scaled is not outputs:
                _note(self, scaled)
            return scaled

        scale._noisescale_original = original  # type: ignore[attr-defined]
        cls.scale = scale  # type: ignore[method-assign]


def _note(scaler: Any, scaled: Any) -> None:
    tensors: list[Tensor] = []
    stack = [scaled]
    while stack:
        x = stack.pop()
        if isinstance(x, Tensor):
            tensors.append(x)
        elif isinstance(x, list | tuple):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
    roots = [t.grad_fn for t in tensors if t.grad_fn is not None]
    if not roots:
        return
    for engine in list(_ENGINES):
        passes = [p for p in engine.passes if p.output_nodes]
        if passes:
            for p in reached(roots, passes):
                p.grad_scaler = scaler


def reached(roots: list[Any], passes: list[Any]) -> list[Any]:
    """The passes whose output nodes a walk up from ``roots`` meets."""
    owners: dict[int, list[Any]] = {}
    for p in passes:
        for key in p.output_nodes:
            owners.setdefault(key, []).append(p)
    found: dict[int, Any] = {}
    seen: set[int] = set()
    stack = list(roots)
    while stack and len(seen) < _MAX_NODES:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        hit = owners.get(id(node))
        if hit:  # an output of a pass: the model's graph lies beyond, not the loss's
            for p in hit:
                found[id(p)] = p
            continue
        stack.extend(nxt for nxt, _ in node.next_functions)
    return list(found.values())
