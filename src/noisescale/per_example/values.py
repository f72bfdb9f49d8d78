"""What the hooks are handed: a model's or a layer's arguments and outputs (tensors nested in
tuples, lists and dicts), their sizes along the examples, their structure for the audit, and
what a forward hook saved restricted to some examples."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Transform
from torch.nn.utils.rnn import PackedSequence

from noisescale.per_example import fallback
from noisescale.per_example.factors import DenseFactor, Factor
from noisescale.per_example.passes import PassNorms
from noisescale.per_example.shared import SharedTensor, Source


def _time_major(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention | nn.RNNBase):
        return not module.batch_first
    if isinstance(module, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
        return not module.self_attn.batch_first
    if isinstance(module, nn.TransformerEncoder | nn.TransformerDecoder):
        return bool(module.layers) and not module.layers[0].self_attn.batch_first
    if isinstance(module, nn.Transformer):
        return not module.batch_first
    return False


def _permute_examples(
    v: Any,
    perm: Tensor,
    n: int,
    dim: int,
    source: Tensor | None,
    strict: bool = True,
    states: Sequence[Tensor] = (),
) -> Any:
    """The model's inputs with their examples (dim ``dim`` of size ``n``) permuted by
    ``perm``; raises _SkipCheck for an input that cannot be (a packed sequence, or — when
    ``strict`` — an input other than ``source`` with the batch's size along two dimensions;
    not strict, such an input is taken at its word, the examples in dim ``dim``). ``states``:
    inputs a recurrent layer was given as its initial state (:attr:`PassNorms.state_inputs`),
    whose examples are along dim 1 whatever their other sizes."""
    if isinstance(v, Tensor):
        if any(v is s for s in states):
            if v.dim() != 3 or v.shape[1] != n:
                raise _SkipCheck
            return v.index_select(1, perm.to(v.device))
        if v.dim() <= dim or v.shape[dim] != n:
            return v
        if strict and v is not source and sum(s == n for s in v.shape) > 1:
            raise _SkipCheck  # an input whose example dimension is ambiguous
        return v.index_select(dim, perm.to(v.device))
    if isinstance(v, PackedSequence):
        raise _SkipCheck
    if isinstance(v, dict):
        return {k: _permute_examples(x, perm, n, dim, source, strict, states) for k, x in v.items()}
    if type(v) in (list, tuple):
        return type(v)(_permute_examples(x, perm, n, dim, source, strict, states) for x in v)
    return v


class _SkipCheck(Exception):
    """An input the permutation check cannot permute (a packed sequence)."""


def _tensors(value: Any, packed: bool = False) -> list[Tensor]:
    """The tensors in a model's output (a tensor, or tuples, lists, dicts and dataclasses of
    them, and the parameters of a ``torch.distributions`` object); with ``packed``, only the
    data of its packed sequences."""
    if isinstance(value, Tensor):
        return [] if packed else [value]
    if isinstance(value, PackedSequence):
        return [value.data]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v, packed)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v, packed)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return [t for f in fields for t in _tensors(getattr(value, f.name), packed)]
    if isinstance(value, Distribution | Transform):
        return _distribution_tensors(value, packed)
    return []


def _distribution_tensors(value: Distribution | Transform, packed: bool) -> list[Tensor]:
    """The tensors a distribution holds (a policy's ``Categorical(logits=…)``, ``Normal(mu,
    std)``): its parameters (``loc``, ``scale``, ``logits``, ``_param``, …, each once), those of
    the distributions it wraps (``Independent``'s ``base_dist``, a mixture's components) and of
    a ``TransformedDistribution``'s transforms (their public attributes only: a transform's
    private ones are caches, which a transform kept on the model across steps fills with
    earlier steps' tensors). They are the model's outputs the loss is computed from: the hooks
    on them mark the backward for the ``.grad`` checks and root the audit's replay (until
    2026-12-06 a model returning a distribution had none: clipping before ``step()``,
    ``zero_grad()`` between micro-batches were measured without a word, tr Σ 18-68% off, and
    an ``autograd.grad`` probe made the step refused as ``.grad`` written by hand; a hunt)."""
    found: list[Tensor] = []
    transform = isinstance(value, Transform)
    for name, v in vars(value).items():
        if transform and name.startswith("_"):
            continue
        for t in _tensors(v, packed):
            if not any(t is f for f in found):  # (Categorical's logits is its _param too)
                found.append(t)
    return found


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, tuple | list) else output


def _flat_values(args: tuple, kwargs: dict) -> list[Any]:
    out: list[Any] = []
    for v in (*args, *kwargs.values()):
        if isinstance(v, list | tuple):
            out.extend(v)
        else:
            out.append(v)
    return out


def _size_along(value: Any, dim: int) -> int | None:
    if isinstance(value, PackedSequence):
        return int(value.batch_sizes[0])
    if isinstance(value, Tensor):
        return int(value.shape[dim]) if value.dim() > dim else None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        for v in value:
            size = _size_along(v, dim)
            if size is not None:
                return size
    return None


def _first_size(args: tuple, kwargs: dict, dim: int) -> int | None:
    for value in (*args, *kwargs.values()):
        size = _size_along(value, dim)
        if size is not None:
            return size
    return None


def _batch_tensor(args: tuple, kwargs: dict, dim: int) -> Tensor | None:
    """The tensor :meth:`PerExampleNorms._batch_size_of_model` reads the batch's size from."""
    for value in (*args, *kwargs.values()):
        found = _sized(value, dim)
        if found is not None:
            return found
    return None


def _sized(value: Any, dim: int) -> Tensor | None:
    if isinstance(value, Tensor):
        return value if value.dim() > dim else None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple) and not isinstance(value, PackedSequence):
        for v in value:
            found = _sized(v, dim)
            if found is not None:
                return found
    return None


def _flat_tensors(value: Any, out: list[Tensor]) -> list[Tensor]:
    """Every tensor in nested tuples, lists and dicts, in order."""
    if isinstance(value, Tensor):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _flat_tensors(v, out)
    elif isinstance(value, list | tuple):
        for v in value:
            _flat_tensors(v, out)
    return out


def _replace_first(output: Any, y: Tensor) -> Any:
    """``output`` with its first tensor (:func:`_first`) replaced by ``y``."""
    if isinstance(output, tuple):
        return (y, *output[1:])
    if isinstance(output, list):
        return [y, *output[1:]]
    return y


def _owned(factor: Factor, shape: torch.Size) -> Factor:
    """``factor`` with tensors of its own. A compiled graph reuses the memory of the tensors it
    hands to an event as soon as the event returns; a factor kept for later (the first of several
    uses of a parameter) must not point into it."""
    if dataclasses.is_dataclass(factor) and not isinstance(factor, type):
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(factor):
            value = getattr(factor, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = value.clone()
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                changes[f.name] = _owned(value, shape)
        return dataclasses.replace(factor, **changes)
    return DenseFactor(factor.dense(shape).clone())


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    for v in _flat_values(args, kwargs):
        if isinstance(v, Tensor):
            return v
    return None


def _pattern(args: tuple, kwargs: dict, n: int) -> tuple:
    """Which dimensions of each tensor input have the batch's size (the audit's structure)."""
    out = []
    for v in _flat_values(args, kwargs):
        if isinstance(v, Tensor):
            out.append(_shape_pattern(v, n))
    return tuple(out)


def _shape_pattern(t: Tensor | None, n: int) -> tuple:
    if t is None:
        return ()
    key = (t.shape, n)
    try:
        pattern = _PATTERNS.get(key)
    except TypeError:  # symbolic sizes (a traced forward) are not hashed
        return (t.dim(), tuple(i for i, s in enumerate(t.shape) if s == n))
    if pattern is None:
        pattern = (t.dim(), tuple(i for i, s in enumerate(t.shape) if s == n))
        if len(_PATTERNS) < 4096:
            _PATTERNS[key] = pattern
    return pattern


_PATTERNS: dict[tuple[torch.Size, int], tuple] = {}  # _shape_pattern's, by shape (every layer's)


def _align(outs: list[Any], hooked: list[Tensor], grads: Sequence[Tensor | None]) -> tuple:
    """Gradients in the order of ``outs`` (``None`` where an output was not hooked)."""
    by_id = {id(t): g for t, g in zip(hooked, grads, strict=True)}
    return tuple(by_id.get(id(o)) if isinstance(o, Tensor) else None for o in outs)


def _move(saved: Any, dim: int, n: int) -> Any:
    if isinstance(saved, Tensor):
        return saved.movedim(dim, 0) if saved.dim() > dim and saved.shape[dim] == n else saved
    if isinstance(saved, tuple | list):
        return type(saved)(_move(v, dim, n) for v in saved)
    if isinstance(saved, fallback.Saved):
        return saved.map(lambda v: _move(v, dim, n))
    return saved


def _take_rows(saved: Any, rows: Tensor, n: int) -> Any:
    """What a forward hook saved, restricted to the examples ``rows`` of a batch of ``n``."""
    if isinstance(saved, Tensor):
        return saved.index_select(0, rows) if saved.dim() > 0 and saved.shape[0] == n else saved
    if isinstance(saved, tuple | list):
        return type(saved)(_take_rows(v, rows, n) for v in saved)
    if isinstance(saved, fallback.Saved):
        return saved.map(lambda v: _take_rows(v, rows, n))
    return saved


def _expand_saved(saved: Any, k: int) -> Any:
    """A shared call's saved input as if each of ``k`` examples had made the call."""
    if isinstance(saved, Tensor):
        return saved.unsqueeze(0).expand(k, *saved.shape)
    if isinstance(saved, tuple | list):
        return type(saved)(_expand_saved(v, k) for v in saved)
    return saved


def _unshare(value: Any) -> Any:
    if isinstance(value, SharedTensor):
        with torch._C.DisableTorchFunctionSubclass():
            return value.as_subclass(Tensor).detach()
    if isinstance(value, tuple):
        return tuple(_unshare(v) for v in value)
    if isinstance(value, list):
        return [_unshare(v) for v in value]
    if isinstance(value, dict):
        return {k: _unshare(v) for k, v in value.items()}
    return value


def _positions(x: Tensor, d: Tensor, dim: int, n: int) -> tuple[Tensor, Tensor]:
    """Input and output gradient of a linear map as [N, positions, features]."""
    if dim == 1 and x.dim() == 2 and x.shape[0] % n == 0:
        # attention's output projection on [T·N, E], T-major (F.multi_head_attention_forward):
        # in a time-major context a 2-D input is positions and examples flattened together
        a = x.reshape(-1, n, x.shape[-1]).transpose(0, 1)
        g = d.reshape(-1, n, d.shape[-1]).transpose(0, 1)
    elif x.dim() > dim and x.shape[dim] == n:
        a, g = x.movedim(dim, 0), d.movedim(dim, 0)
    else:
        a, g = x, d
    return a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])


def _route_sources(route: Any) -> list[Source]:
    if isinstance(route, tuple) and len(route) == 3 and isinstance(route[0], Source):
        return [route[0]]
    return list(route[0].sources)


def _device_of(output: Any, pass_: PassNorms) -> torch.device:
    ts = _tensors(output)
    return ts[0].device if ts else torch.device("cpu")
