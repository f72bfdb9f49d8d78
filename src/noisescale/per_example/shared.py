"""Tensors shared by every example, followed to where they meet the batch.

Not every use of a parameter is a call of a layer with a rule. A class token is expanded over the
batch (``cls_token.expand(N, -1, -1)``), a learned position table or a layer scale is added or
multiplied in (``x + pos``, ``gamma * x``), a norm written by a model library scales by its weight
(``weight * x̂``, ``x̂ * (1 + weight)``), an output head reuses an embedding through
``F.linear(h, emb.weight)``, a position table is looked up with indices shared by the batch
(``wpe(arange(T))``, T5's relative-position buckets) and only then added to per-example
activations. In each case the tensor that carries the parameter is the same for every example until
one operation *meets the batch*: it broadcasts the shared tensor over the examples (or contracts it
with per-example activations), and autograd sums the examples' gradients right there.

:class:`SharedTensor` is that tensor. The engine hands it out in place of a parameter while the
module that owns the parameter runs (``module._parameters[name]`` holds an alias of the parameter
for the duration of the call), and in place of the output of a layer with a rule whose input is not
per-example (a *shared call*: its input has no example dimension of the batch's size). Operations
on shared tensors alone give shared tensors (same sources). An operation that meets the batch is
rewritten into an equivalent one whose gradient is per example:

* elementwise broadcasting (``+ − * /``, ``where``, ``addcmul``, …), ``broadcast_tensors`` and
  ``expand``/``broadcast_to``: the shared operand is expanded to the batch's shape first (a
  view; the values are the same), and
  a hook on the expanded tensor receives each example's gradient, [N, *shape];
* ``repeat(N, 1, …)`` (a copy of the shared rows for each example, [N·k, …], as DeBERTa repeats
  its position projections over examples × heads): example i's gradient is its own block of k
  rows, which the audit checks are example i's;
* a batched ``matmul``/``bmm`` with a shared operand broadcast over the examples (DeBERTa's
  position keys [1, H, d, P] against the queries [N, H, T, d]): the shared operand is expanded
  to the batch first, as for an elementwise operation;
* ``F.linear``/``matmul``/``addmm`` with a shared weight (on the right, or on the left of
  per-example columns: ``W @ X`` with X [N, …, R, T], Mamba's ``dt_proj.weight @ time_step``),
  ``F.embedding`` with a shared table and
  ``F.conv*`` with a shared kernel: the per-example gradient is the layer rule's factor (never
  materialised when the shared tensor is the parameter itself or a row block or transpose of it);
* ``F.layer_norm``/``group_norm``/``rms_norm``/``batch_norm`` (evaluation statistics) with a shared
  affine weight: normalisation without affine, then the elementwise rule.

Each example's gradient of the shared tensor is then carried back to its sources (the parameters
and shared calls it was computed from) with one batched vector–Jacobian product through the shared
computation (``torch.autograd.grad(..., is_grads_batched=True)``), and a shared call's per-example
output gradients go through its layer rule as if every example had made the call. An operation
that meets the batch in another way is recorded as unsupported: the owning module then falls back
to :mod:`torch.func` from the next step on, or the step is refused with a message that names the
operation.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad as _fwad

from noisescale.errors import UnsupportedModuleError
from noisescale.per_example.audit import FLAT

if TYPE_CHECKING:
    from noisescale.per_example.engine import PerExampleNorms
    from noisescale.per_example.passes import PassNorms

__all__ = ["SharedTensor", "Source", "per_example_state"]


@dataclass(eq=False)
class Source:
    """Where a shared tensor's gradient must go: a parameter, or the output of a shared call.

    Attributes:
        tensor: The alias of the parameter (or the call's output) handed to the forward; the
            target of the batched vector–Jacobian product.
        pid: ``id`` of the parameter (parameter sources).
        call: The shared call (call sources): module, rule, saved input, label, parameters.
        edge: The call output's gradient edge and ``version`` its version counter when the
            call returned (call sources): an in-place operation on the output afterwards
            (``nn.ReLU(inplace=True)`` in torchvision Swin v2's ``cpb_mlp``) moves the tensor's
            own edge past that operation, whose gradient is not the call's.
    """

    tensor: Tensor
    pid: int | None = None
    call: Any = None
    label: str = ""
    edge: Any = None
    version: int = 0


@dataclass(eq=False)
class Origin:
    """What a shared tensor knows: the engine, the pass it belongs to, its sources."""

    engine: PerExampleNorms
    pass_: PassNorms
    sources: tuple[Source, ...]
    scope: Any = None  # the owner-module call it was created in (for the fallback on failure)
    # the saved-tensor pack hook on top when that call began (a checkpoint's: _CHECKPOINTED)
    under: Any = None


def _origin(t: Any) -> Origin | None:
    return getattr(t, "_ns_origin", None) if isinstance(t, SharedTensor) else None


def wrap(t: Tensor, origin: Origin) -> SharedTensor:
    """``t`` as a shared tensor with ``origin`` (a view: values and autograd history kept)."""
    with torch._C.DisableTorchFunctionSubclass():
        s = t.as_subclass(SharedTensor)
    s._ns_origin = origin  # type: ignore[attr-defined]
    return s


def _plain(t: Tensor) -> Tensor:
    if isinstance(t, SharedTensor):
        with torch._C.DisableTorchFunctionSubclass():
            return t.as_subclass(Tensor)
    return t


def flatten(value: Any, out: list[Any]) -> None:
    """Append the leaves of nested lists, tuples and dicts in ``value`` to ``out``."""
    if isinstance(value, list | tuple):
        for v in value:
            flatten(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            flatten(v, out)
    else:
        out.append(value)


def _map(value: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(value, list):
        return [_map(v, fn) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        mapped = tuple(_map(v, fn) for v in value)
        # torch's named results (topk, max, sort: torch.return_types) keep their type
        return mapped if type(value) is tuple else type(value)(mapped)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return fn(value)


def _merge(origins: list[Origin]) -> Origin:
    first = origins[0]
    if len(origins) == 1:
        return first
    seen: dict[int, Source] = {}
    for o in origins:
        for s in o.sources:
            seen.setdefault(id(s), s)
    return Origin(first.engine, first.pass_, tuple(seen.values()), first.scope, first.under)


class SharedTensor(Tensor):
    """A tensor that is the same for every example: a parameter, or computed from parameters.

    See the module docstring. Only operations that involve a shared tensor pay the Python
    dispatch; everything else in the forward runs as usual.
    """

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        flat: list[Any] = []
        flatten(args, flat)
        flatten(kwargs, flat)
        origins = [o for o in map(_origin, flat) if o is not None]
        if not origins:  # e.g. a property read on a result
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        origin = _merge(origins)
        engine = origin.engine
        if not engine.tracks_shared():
            with torch._C.DisableTorchFunctionSubclass():
                return _unwrap(func(*args, **kwargs))
        return _dispatch(func, args, kwargs, flat, origin)


def _unwrap(value: Any) -> Any:
    return _map(value, lambda v: _plain(v) if isinstance(v, Tensor) else v)


def _rewrap(value: Any, origin: Origin) -> Any:
    def fn(v: Any) -> Any:
        if isinstance(v, Tensor) and not v.requires_grad:
            # no gradient reaches the parameters through it (w.detach(), w > 0, the indices of
            # a top-k): a constant, not a use — followed no further
            return _plain(v) if isinstance(v, SharedTensor) else v
        if isinstance(v, Tensor) and not isinstance(v, SharedTensor):
            return wrap(v, origin)
        if isinstance(v, SharedTensor) and getattr(v, "_ns_origin", None) is None:
            v._ns_origin = origin  # type: ignore[attr-defined]
        return v

    return _map(value, fn)


# -- classification ---------------------------------------------------------------------------

_ELEMENTWISE_NAMES = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "true_divide_",
    "where", "addcmul", "addcmul_", "addcdiv", "addcdiv_", "lerp", "lerp_", "maximum", "minimum",
    "masked_fill", "rsub", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__",
    "__mul__", "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__div__",
    "__rdiv__", "__idiv__", "multiply", "subtract", "divide", "fmax", "fmin",
}  # fmt: skip
# torch.broadcast_tensors: each output an expansion of its input to the common shape, as an
# elementwise operation expands its operands. torch.distributions broadcasts every
# distribution's parameters so (broadcast_all): a Gaussian policy's Normal(mu, log_std.exp())
# with a state-independent log_std was refused until 2026-12-06 (a hunt), where
# log_std.expand_as(mu) was measured
_ELEMENTWISE_NAMES.add("broadcast_tensors")
_EXPAND_NAMES = {"expand", "expand_as", "broadcast_to"}
_LINEAR = {F.linear, torch._C._nn.linear}
_MATMUL_NAMES = {"matmul", "__matmul__", "mm", "bmm"}
_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_TRANSPOSE = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
_NORM = {F.layer_norm, F.group_norm, F.batch_norm, getattr(F, "rms_norm", None)} - {None}


# grouped matrix products (input [S, d] of tokens sorted by group, weight [G, d, o], offsets
# [G]): torch's, and transformers' fallback op
_GROUPED_NAMES = {"_grouped_mm", "grouped_mm", "grouped_mm_fallback"}


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func))


def _batched(t: Any, n: int, dim: int) -> bool:
    """A per-example tensor: not shared, not a parameter, the batch's size along ``dim``."""
    return (
        isinstance(t, Tensor)
        and not isinstance(t, SharedTensor | nn.Parameter)
        and t.dim() > dim
        and t.shape[dim] == n
    )


def _dispatch(func: Any, args: tuple, kwargs: dict, flat: list[Any], origin: Origin) -> Any:
    engine = origin.engine
    pass_ = engine.open_pass()
    if pass_ is not None and _fwad._current_level >= 0 and _has_dual(flat):
        # dual numbers made inside the forward meeting a parameter used directly (x @ self.W):
        # no layer hook sees them (tr Σ 42% off between audits, a review)
        from noisescale.per_example.messages import forward_ad_message  # (import cycle)

        labels = sorted({s.label for s in origin.sources})
        raise UnsupportedModuleError(forward_ad_message(f"parameters {labels}, used directly,"))
    if pass_ is not None and torch._C._functorch.maybe_current_level() is not None:
        labels = sorted({s.label for s in origin.sources})
        engine.check_forward_transform(f"parameters {labels}, used directly,")
    if pass_ is None:  # after the step's passes closed (e.g. a loss term read after forward)
        if engine.passes and not torch.is_grad_enabled():
            _note_custom_function(engine.passes[-1], origin)
        with torch._C.DisableTorchFunctionSubclass():
            return _rewrap(func(*args, **kwargs), origin)
    n, dim = pass_.batch_size, engine.batch_dim()
    batched = [] if engine.weights_only() else [t for t in flat if _batched(t, n, dim)]
    if batched and any(t.grad_fn is None and not t.requires_grad for t in batched):
        # one of the model's buffers holds no example, whatever its leading size: prune's mask
        # on a weight of N output rows (weight_orig * weight_mask) was refused as rows that
        # might be the examples' (2026-12-06)
        buffers = [t for t in batched if engine.is_model_buffer(pass_, t)]
        if buffers and not pass_.returned:
            _note_buffer(engine, pass_, origin, buffers[0])
        batched = [t for t in batched if not any(t is b for b in buffers)]
    if batched and _name(func) in _GROUPED_NAMES:
        # a grouped product's offsets have one entry per group (an expert): with as many
        # experts as examples they are not the examples' (OLMoE at N = 8 experts was refused
        # as '_grouped_mm' with no rule, measured at every other N; a hunt, 2026-12-05). Nor
        # is a frozen grouped weight [E, d, o] of the tokens' product [S, d] (Qwen3-MoE's
        # down_proj beside a LoRA on gate_up_proj, E = N = 4: refused until 2026-12-06, exact
        # at every other N, a hunt)
        batched = [
            t
            for t in batched
            if (t.is_floating_point() or t.is_complex())
            and not _frozen_group_weight(engine, pass_, args, t)
        ]
    if batched and any(getattr(t, "_ns_weight_only", False) for t in batched):
        # computed from parameters alone (VB-LoRA's top-k indices into its vector bank, [r, …]
        # from its logits): no example's, whatever its leading size (at r = N the lookup was
        # taken for the examples' and every step refused until 2026-12-06, a hunt)
        batched = [t for t in batched if not getattr(t, "_ns_weight_only", False)]
    if batched and _name(func) in _INDEX_WRITES and _writes_weights(func, args, kwargs):
        # rows of parameters written into a table that holds no example (peft's trainable
        # tokens: their rows index_copy'd into the frozen embedding, then looked up by the
        # batch): the index is the rows' places in the table — with as many trainable tokens as
        # examples it was taken for the examples' and every step refused until 2026-12-06 (a
        # hunt); the table meets the batch where it is used, as at any other batch size
        batched = []
    if batched:
        # a tensor the loss watch knows to hold the examples elsewhere — along another
        # dimension, summed over, picked — though its dim has the batch's size
        engine.check_met_layout(pass_, origin, batched, dim, _name(func))
    elif pass_.returned and pass_.met_elsewhere is None:
        # (no meeting: one with the examples along another dimension is named if the
        # parameters' gradients are then refused as unfollowed)
        plain = [t for t in flat if isinstance(t, Tensor) and not isinstance(t, SharedTensor)]
        engine.note_met_elsewhere(pass_, origin, plain, dim, _name(func))
    if batched and dim == 0 and not pass_.returned:
        # rows picked or put together by the data, as many as the examples (h[idx] @ W): as
        # for a layer's input (engine._rows_not_examples); a review of 2026-12-06 found them
        # 39% off on unaudited steps
        for t in batched:
            engine.check_meeting_rows(pass_, origin, t, n, _name(func))
    if pass_.returned and n > 1 and not any(_from_outputs(t, pass_) for t in batched):
        # In the loss (the model's forward has returned), meeting the batch only through
        # tensors not computed from the model's outputs — targets, labels, constants (no
        # history, or one of their own: a teacher's table that requires grad) whose dim 0
        # happens to have the batch's size (a fixed table of T = N rows, positions arange(T))
        # — or through none (s.expand(N, …)). Nothing tells them apart, and no audit reaches
        # the loss (its replay starts at the model's outputs; inside the model the audit
        # learns positions from examples). A meeting made here is refused (before 2026-12-03:
        # a table pulled towards a fixed table 44-291% off, looked up by arange(T) 15%,
        # broadcast against a constant 15-40%). (With one example every gradient is its own.)
        count = pass_.meetings_added
        result = _meet(func, args, kwargs, flat, origin, pass_, n, dim, batched)
        if pass_.meetings_added != count:
            shared = next(t for t in flat if isinstance(t, SharedTensor))
            other = batched[0] if batched else result
            shape = tuple(other.shape) if isinstance(other, Tensor) else ()
            # (the model's output, or computed from it, through a layer called on something:
            # its rows came from the batch in a layout the engine did not follow, most likely
            # — a particle simulator's flattened nodes, a loop over the examples joined by
            # cat, a solve on the batch's transpose —, not from parameters alone, as the
            # message said until 2026-12-06, sending the loss inside the forward, a hunt)
            through_layers = any(s.call is not None for s in origin.sources)
            kind = "output" if through_layers and _from_outputs(shared, pass_) else "loss"
            engine.record_ambiguous(pass_, origin, _name(func), (tuple(shared.shape), shape), kind)
        return result
    if batched and origin.scope is not None and _name(func) not in _SAVES_NO_OPERAND:
        # (a parameter's alias itself, read in the function: not a tensor computed before the
        # checkpoint and passed in, which its recomputation gets again — T5's position bias)
        aliases = [s.tensor for s in origin.sources if s.pid is not None]
        if any(any(t is a for a in aliases) for t in flat):
            engine.check_checkpointed_alias(origin, _name(func))
    if not batched and dim == 0 and not engine.weights_only():
        met = _flat_product(func, args, kwargs, origin, pass_, n)
        if met is not None:
            return met
    return _meet(func, args, kwargs, flat, origin, pass_, n, dim, batched)


def _flat_product(
    func: Any, args: tuple, kwargs: dict, origin: Origin, pass_: PassNorms, n: int
) -> Any:
    """A parameter used directly in a product with the examples' rows flattened together with
    positions — ``h.reshape(-1, D) @ W``, ``F.linear(flat, W)``, ``W`` computed from
    parameters (a factorised, tied or weight-normed head) —: met as the same product on the
    rows unflattened, ``[N, k, D]``, flattened back — as exact as ``h @ W`` on the 3-D ``h``
    — where the rows are proven each example's k in turn, as a Linear's flattened input is
    (``engine._flat_rows``: by the flattening in their history, rows picked by the data
    refused or flagged on the device); ``None`` otherwise (refused with a false cause until
    2026-12-06, a hunt)."""
    name = _name(func)
    if not (func in _LINEAR or name in ("matmul", "__matmul__", "mm")) or len(args) < 2:
        return None
    x = args[0]
    if (
        not isinstance(x, Tensor)
        or isinstance(x, SharedTensor | nn.Parameter)
        or x.dim() != 2
        or x.shape[0] <= n
        or x.shape[0] % n
        or not all(isinstance(a, SharedTensor) for a in args[1:] if isinstance(a, Tensor))
    ):
        return None
    unread: list[tuple[str, Tensor]] = []
    if not origin.engine._rows_proven(pass_, x, n, x.shape[0], unread):
        for source in origin.sources:
            pids = [source.pid] if source.pid is not None else source.call.params.values()
            for pid in pids:
                key = pid if isinstance(pid, int) else id(pid)
                pass_.flat_unproven.setdefault(key, (name, x.shape[0]))
        return None
    label = f"{name} of {', '.join(sorted({s.label for s in origin.sources}))}"
    pass_.unread_picks += [(label, how, flag) for how, flag in unread]
    product = torch.matmul if name == "mm" else func
    return product(x.unflatten(0, (n, -1)), *args[1:], **kwargs).flatten(0, 1)


def _note_buffer(engine: Any, pass_: PassNorms, origin: Origin, buffer: Tensor) -> None:
    """Remember, for ``origin``'s sources, the model's buffer with the batch's leading size
    they were combined with (taken for no example's: :attr:`PassNorms.buffer_rows`) — a
    truncated-BPTT state carried between batches in a registered buffer, whose rows are the
    examples'. A refusal of their rows downstream names it and the fix (until 2026-12-06 it
    named only the parameters, a hunt)."""
    if all(id(source) in pass_.buffer_rows for source in origin.sources):
        return  # (noted already: the buffers are searched once a pass per source)
    storage = buffer.untyped_storage().data_ptr()
    name = next(
        (
            name
            for name, b in engine.model.named_buffers()
            if b.untyped_storage().data_ptr() == storage
        ),
        "?",
    )
    for source in origin.sources:
        pass_.buffer_rows.setdefault(id(source), (name, tuple(buffer.shape)))


# meetings whose autograd node saves neither operand, and products that take the alias
# unexpanded: a checkpoint's recomputation that gets the parameter itself instead of its
# alias saves the same tensors (F.linear(x, self.W) in a checkpointed function of a block's
# own forward was exact, and was refused for a while on 2026-12-06, a review)
_SAVES_NO_OPERAND = {
    "add", "add_", "sub", "sub_", "rsub", "__add__", "__radd__", "__iadd__", "__sub__",
    "__rsub__", "__isub__", "subtract", "broadcast_tensors", "linear", "addmm",
} | _EXPAND_NAMES | _MATMUL_NAMES | {"__rmatmul__"}  # fmt: skip


def _has_dual(flat: list[Any]) -> bool:
    """Whether one of the operation's tensors carries a forward-mode AD tangent (read with the
    subclass's dispatch off: ``unpack_dual`` on an alias re-entered this dispatch for ever, a
    review)."""
    with torch._C.DisableTorchFunctionSubclass():
        return any(isinstance(t, Tensor) and _fwad.unpack_dual(t).tangent is not None for t in flat)


_FUNCTION_APPLY = torch.autograd.Function.apply.__func__.__code__  # type: ignore[attr-defined]
_SEARCHED_FRAMES = 24


def _note_custom_function(pass_: PassNorms, origin: Origin) -> None:
    """A shared tensor read with gradients off while a pass is open: inside a custom
    ``torch.autograd.Function``'s forward (a straight-through estimator, ``STE.apply(w)``),
    note the Function's class for the parameters it came from — autograd will run the user's
    backward for them, which noisescale cannot follow a parameter through, and a refusal then
    names it (a read under ``torch.no_grad()`` is not a use: no frame of ``Function.apply``,
    nothing noted). Only such reads pay the walk up the stack (at most
    :data:`_SEARCHED_FRAMES` frames); torch's own Functions (reentrant checkpointing) are not
    noted."""
    frame = sys._getframe(2)
    for _ in range(_SEARCHED_FRAMES):
        if frame is None:
            return
        if frame.f_code is _FUNCTION_APPLY:
            cls = frame.f_locals.get("cls")
            if not isinstance(cls, type) or cls.__module__.split(".")[0] == "torch":
                return
            for source in origin.sources:
                pids = [source.pid] if source.pid is not None else source.call.params.values()
                for pid in pids:
                    pid = pid if isinstance(pid, int) else id(pid)
                    pass_.custom_functions.setdefault(pid, cls.__qualname__)
            return
        frame = frame.f_back


_SEARCHED_NODES = 256


def _from_outputs(t: Tensor, pass_: PassNorms) -> bool:
    """Is ``t`` computed from the model's outputs of ``pass_`` (searching its autograd history
    breadth-first, at most :data:`_SEARCHED_NODES` nodes)? A tensor with a history of its own
    — a teacher's table that requires grad, ``leaf * 1`` — is not (21-270% off when taken for
    the examples', found by a review)."""
    node = t.grad_fn
    if node is None or not pass_.output_nodes:
        return False
    targets = pass_.output_nodes
    seen = {id(node)}
    queue = [node]
    for current in queue:
        if (id(current), current._sequence_nr()) in targets:
            return True
        if len(seen) > _SEARCHED_NODES:
            return False
        for nxt, _ in current.next_functions:
            if nxt is not None and id(nxt) not in seen:
                seen.add(id(nxt))
                queue.append(nxt)
    return False


def _meet(
    func: Any,
    args: tuple,
    kwargs: dict,
    flat: list[Any],
    origin: Origin,
    pass_: PassNorms,
    n: int,
    dim: int,
    batched: list[Tensor],
) -> Any:
    """:func:`_dispatch`'s rewrite of one operation on shared tensors in an open pass."""
    engine = origin.engine
    name = _name(func)
    if name in ("view_as", "reshape_as") and len(args) == 2 and not kwargs:
        # only the other tensor's shape is read: no meeting (an expert's output put back with
        # y.view_as(h) was refused, where y.view(h.shape) is followed; a hunt, 2026-12-06)
        x, other = args
        return x.view(other.shape) if name == "view_as" else x.reshape(other.shape)
    if func in _LINEAR:
        x = args[0] if args else kwargs.get("input")
        if _linear_input(x, n, dim):
            return _linear(func, args, kwargs, origin, pass_, n, dim)
    if name in _MATMUL_NAMES and batched:
        return _matmul(func, args, kwargs, origin, pass_, n, dim)
    if name == "einsum" and batched and dim == 0:
        met = _einsum(func, args, kwargs, origin, pass_, n)
        if met is not None:
            return met
    if name == "tensordot" and batched and dim == 0:
        met = _tensordot(args, kwargs, n)
        if met is not None:
            return met
    if batched and name == "__getitem__" and _is_column_lookup(args):
        # table[:, idx] (a hand-written relative-position bias, rel[:, bucket] with rel [H, K]
        # and bucket [T, T]): the same values as the lookup of the transposed table's rows,
        # its looked-up dims moved back in front — followed (and learned) as that lookup is.
        # Until 2026-12-06 it was refused at T = N as '__getitem__' without a rule, where
        # rel.t()[bucket] was exact (a hunt)
        table, idx = args[0], args[1][1]
        return table.transpose(0, 1)[idx].movedim(idx.dim(), 0)
    if batched and (func is F.embedding or (name == "__getitem__" and _is_lookup(args))):
        key = _lookup_key(origin, name)
        if key in engine.learned_shared_lookups:
            # a lookup the audit found to be by positions, not by example (torchvision MaxViT's
            # table[index.view(-1)] with T² = N): its rows are shared, and meet the batch later
            with torch._C.DisableTorchFunctionSubclass():
                return _rewrap(func(*_unwrap(args), **_unwrap(kwargs)), origin)
        if func is F.embedding:
            return _embedding(args, kwargs, origin, pass_, n, dim, key=key)
        # table[idx] with per-example integer indices: an embedding lookup into the rows
        return _embedding((args[1], args[0]), {}, origin, pass_, n, dim, flatten=True, key=key)
    if func is F.embedding_bag and dim == 0 and (bags := _bag_call(args, kwargs, n)) is not None:
        key = _lookup_key(origin, name)
        if bags.get("scale_grad_by_freq"):
            _refuse_by_frequency("F.embedding_bag", origin)
        if bags.get("mode", "mean") not in ("sum", "mean"):
            # mode='max' (each dimension's gradient to the row that won it): named as the
            # operation noisescale cannot follow
            return _unsupported(func, args, kwargs, origin, pass_)
        if key not in engine.learned_shared_lookups:
            return _embedding_bag(bags, origin, pass_, key)
    if func in _CONV and batched:
        return _conv(func, args, kwargs, origin, pass_, n, dim)
    if func in _CONV_TRANSPOSE and batched:
        return _conv(func, args, kwargs, origin, pass_, n, dim, transposed=True)
    if func in _NORM and batched:
        return _norm(func, args, kwargs, origin, pass_)
    if func is F.scaled_dot_product_attention and batched:
        return _attention(func, args, kwargs, origin, pass_)
    if func is F.prelu and batched and isinstance(args[1], SharedTensor):
        # max(0, x) + w·min(0, x), with w per channel (dim 1) or a single slope
        x, w = args
        shape = (-1,) + (1,) * (x.dim() - 2) if w.numel() > 1 and x.dim() > 1 else (-1,)
        neg = torch.clamp(x, max=0)
        return torch.clamp(x, min=0) + w.reshape(shape) * neg
    if name == "repeat" and dim == 0 and n > 1 and isinstance(args[0], SharedTensor):
        reps = _repeats(args, kwargs)
        src = args[0]
        # (one row repeated is an expansion: learnable as one, _met_expanded)
        key = _expansion_key(origin, src.shape[1:]) if src.dim() and src.shape[0] == 1 else None
        if (
            reps is not None
            and len(reps) == src.dim()
            and reps[0] == n
            and set(reps[1:]) <= {1}
            and key not in engine.learned_shared_lookups
        ):
            # s.repeat(N, 1, …): each example given its own copy of the shared tensor's rows,
            # [N·k, …] (DeBERTa's position projections repeated over examples × heads) — a
            # meeting like an expansion, the examples' rows in turn (the audit proves it)
            with torch._C.DisableTorchFunctionSubclass():
                result = func(*_unwrap(args), **_unwrap(kwargs))
            meeting = Meeting("expand", src, origin, hooked=result)
            meeting.extra.update(dim=FLAT, repeat=True, learn=key)
            engine.add_meeting(pass_, meeting)
            _note_row_meeting(pass_, result, origin, dim)
            return result
        if _repeat_broadcasts(args, kwargs) and not engine.recurrent:
            # (in a model with a recurrent layer such a repeat may be its initial state, whose
            # examples are along dim 1 — h0.repeat(L·D, N, 1) —: marked for the layer, below)
            # s.repeat(N, k, 1) of s [1, 1, D] (MAE's mask token, as its reference code writes
            # it) repeats only dimensions of size 1: s expanded, met as an expansion is (until
            # 2026-12-06 refused, blaming the cat after it, a hunt)
            with torch._C.DisableTorchFunctionSubclass():
                result = func(*_unwrap(args), **_unwrap(kwargs))
            if _met_expanded(src, result, origin, pass_, n, dim):
                return result
            _note_dim1_expansion(src, result, origin, pass_, n)
    if name in _ELEMENTWISE_NAMES or name in _EXPAND_NAMES:
        shapes = [tuple(t.shape) for t in flat if isinstance(t, Tensor)]
        try:
            out_shape = torch.broadcast_shapes(*shapes)
        except RuntimeError:
            out_shape = None
        if out_shape is not None and name in _ELEMENTWISE_NAMES:
            # broadcasting aligns trailing dimensions: an operand with fewer dimensions than
            # the result has its dim 0 elsewhere (a router's per-expert bias [E] added to
            # shared scores [N·T, E], with E = N), so it does not carry the examples
            batched = [t for t in batched if t.dim() == len(out_shape)]
        if name in _EXPAND_NAMES:
            with torch._C.DisableTorchFunctionSubclass():
                result = func(*_unwrap(args), **_unwrap(kwargs))
            src = args[0]
            if isinstance(src, SharedTensor) and _met_expanded(src, result, origin, pass_, n, dim):
                return result
            if isinstance(src, SharedTensor) and dim == 0 and not engine.recurrent:
                _note_dim1_expansion(src, result, origin, pass_, n)
            return _broadcast_of(_rewrap(result, origin), src)
        if out_shape is not None and batched and len(out_shape) > dim and out_shape[dim] == n:
            # (in the loss, _dispatch refuses any meeting through tensors without history)
            rows = None if pass_.returned else _rows_unproven(flat, batched, len(out_shape), n, dim)
            if rows is not None:
                engine.record_ambiguous(
                    pass_, origin, name, rows, "rows", _flat_lookup(flat, n, dim)
                )
            # (a shared operand broadcast against constants only — h0 * torch.ones(L, N, H) —
            # is a meeting along dim 0 that nothing ties to the examples: noted like s.expand)
            constants = dim == 0 and not any(t.requires_grad for t in batched)
            return _elementwise(
                func, args, kwargs, origin, pass_, tuple(out_shape), note_rows=constants
            )
    if name == "__setitem__" and dim == 0 and _masked_assignment(args, n):
        # x[mask] = s: a shared value written into the positions a per-example boolean mask
        # picks (SpecAugment's learned vector in wav2vec2-style models, on by default in
        # training: hidden_states[mask_time_indices] = self.masked_spec_embed) — where(mask, s,
        # x) written back into x, s expanded over the examples and met there like any
        # elementwise operand (each example's gradient of s: its masked positions' rows)
        target, mask, value = args
        if _repeated_rows(value, tuple(target.shape[mask.dim() :])):
            if value.shape[0] == 0:
                # (no row picked — no dropped conditioning this step —: nothing written; an
                # IndexError inside the user's forward until a review of 2026-12-06)
                return None
            value = value[0]  # (the row every written position gets)
        mask = mask.reshape(*mask.shape, *(1,) * (target.dim() - mask.dim()))
        result = _elementwise(
            torch.where, (mask, value, target), {}, origin, pass_, tuple(target.shape)
        )
        with torch._C.DisableTorchFunctionSubclass():
            target.copy_(result)
        return None
    if batched and inspect.isfunction(func):
        # a function written in Python (F.multi_head_attention_forward, …) dispatches once on
        # all its tensors: run its body, whose operations are then seen one by one
        return _composite(func, args, kwargs)
    if batched:
        return _unsupported(func, args, kwargs, origin, pass_)
    if dim == 0:
        note_dim1_input(pass_, origin.sources, flat, n)
    with torch._C.DisableTorchFunctionSubclass():
        result = func(*args, **kwargs)
    if isinstance(result, Tensor) and result.layout != torch.strided:
        _note_sparse(pass_, origin, name)
    result = _rewrap(result, origin)
    if _built_from_weights(func, args, kwargs, flat):
        _map(result, _mark_weight_only)
    if name in _COPY_NAMES and args and hasattr(args[0], "_ns_broadcast"):
        # (a copy of an expansion is still that expansion's values: .contiguous() of h0.expand)
        result = _broadcast_of(result, args[0])
    elif name == "repeat" and args and _repeat_broadcasts(args, kwargs):
        result = _broadcast_of(result, args[0])
    return result


# writes of rows into a table at an index: (input, dim, index, source) — index_put's
# (input, indices, values) —, the written rows' places in the table
_INDEX_WRITES = {"index_copy", "index_add", "index_put", "scatter", "scatter_add"}
_WRITE_ARGS = {
    "index_put": ("input", "indices", "values"),
    "scatter": ("input", "dim", "index", "src"),
    "scatter_add": ("input", "dim", "index", "src"),
}


def _weight_only(t: Any) -> bool:
    """``t`` holds no example: a parameter (a frozen one the engine hands no alias for), a
    parameter's alias, or a tensor computed from such tensors alone (marked
    ``_ns_weight_only`` by :func:`_meet`). (A marked tensor written in place afterwards by
    operations on plain tensors alone keeps its mark: no dispatch sees that write.)"""
    if isinstance(t, nn.Parameter) or getattr(t, "_ns_weight_only", False):
        return True
    origin = _origin(t)
    return origin is not None and any(t is s.tensor and s.pid is not None for s in origin.sources)


def _mark_weight_only(v: Any) -> Any:
    if isinstance(v, Tensor):
        v._ns_weight_only = True  # type: ignore[attr-defined]
    return v


def _write_operands(func: Any, args: tuple, kwargs: dict) -> tuple[Any, Any, Any] | None:
    """(table, index, rows) of an index write (:data:`_INDEX_WRITES`), positional or named;
    ``index`` is index_put's tuple of index tensors. ``None``: another form (a scalar value)."""
    names = _WRITE_ARGS.get(_name(func), ("input", "dim", "index", "source"))
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    table = bound.get("input", bound.get("self"))
    index = bound.get("indices" if names[1] == "indices" else "index")
    rows = bound.get(names[-1])
    if not isinstance(table, Tensor) or not isinstance(rows, Tensor) or index is None:
        return None
    return table, index, rows


def _writes_weights(func: Any, args: tuple, kwargs: dict) -> bool:
    """An index write of rows that hold no example into a table that holds none
    (:func:`_weight_only`), one written row for each index entry: the index numbers the
    rows written (k of them, fixed by the parameters), not the examples, so the result is a
    weight built from parameters — met by the batch where it is used. (Rows broadcast over
    the index, ``table.index_put((idx,), row)``, are not: an index read from the data would
    then write the batch into the table.)"""
    found = _write_operands(func, args, kwargs)
    if found is None:
        return False
    table, index, rows = found
    if not (_weight_only(table) and _weight_only(rows)):
        return False
    indices = list(index) if isinstance(index, list | tuple) else [index]
    if not indices or not all(isinstance(i, Tensor) for i in indices) or rows.dim() == 0:
        return False
    if _name(func) == "index_put":
        return all(i.dim() == 1 and i.shape[0] == rows.shape[0] for i in indices)
    if _name(func) in ("scatter", "scatter_add"):
        return tuple(indices[0].shape) == tuple(rows.shape)
    return indices[0].dim() <= 1  # (index_copy/index_add: torch checks its count)


def _built_from_weights(func: Any, args: tuple, kwargs: dict, flat: list[Any]) -> bool:
    """Every tensor the operation read holds no example (:func:`_weight_only`) — the index
    of an index write of such rows into such a table too (:func:`_writes_weights`) — so its
    results hold none."""
    tensors = [t for t in flat if isinstance(t, Tensor)]
    if not tensors:
        return False
    if all(_weight_only(t) for t in tensors):
        return True
    return _name(func) in _INDEX_WRITES and _writes_weights(func, args, kwargs)


def _frozen_group_weight(engine: Any, pass_: PassNorms, args: tuple, t: Tensor) -> bool:
    """``t`` is the grouped weight [G, d, o] of a grouped product on token rows [S, d]
    (``_grouped_mm(x, w, offs)``), and a model parameter that does not train or a view of
    one: one matrix per group, no example's. (The weight is looked for only when it has the
    batch's size, E = N.)"""
    if (
        len(args) < 2
        or args[1] is not t
        or t.dim() != 3
        or not isinstance(args[0], Tensor)
        or args[0].dim() != 2
        or t.grad_fn is not None
        or t.requires_grad
    ):
        return False
    try:
        if pass_.frozen_storages is None:
            pass_.frozen_storages = {
                p.untyped_storage().data_ptr()
                for p in engine.model.parameters()
                if not p.requires_grad
            } - {0}
        return t.untyped_storage().data_ptr() in pass_.frozen_storages
    except (RuntimeError, NotImplementedError, TypeError):  # (tensors without storage)
        return False


def _note_sparse(pass_: PassNorms, origin: Origin, name: str) -> None:
    """Remember that the parameters behind ``origin`` built a sparse tensor (peft's SHiRA: a
    ``sparse_coo_tensor`` of its values added to a copy of the frozen weight): operations on
    it are not followed, and where their gradients arrive with no use to explain them the
    refusal names it (:meth:`~noisescale.per_example.settle.Settle._refuse_unmet_shared`)."""
    for source in origin.sources:
        pids = [source.pid] if source.pid is not None else source.call.params.values()
        for pid in pids:
            # (the constructor arrives as aten's '_sparse_coo_tensor_with_dims_and_tensors.default')
            op = name.split(".")[0]
            pass_.sparse_built.setdefault(pid if isinstance(pid, int) else id(pid), op)


def _masked_assignment(args: tuple, n: int) -> bool:
    """``x[mask] = s``: ``x`` a per-example tensor (not shared), ``mask`` a boolean tensor of
    its leading dimensions (the examples' first), ``s`` a shared tensor that broadcasts over
    the positions' trailing dimensions."""
    if len(args) != 3:
        return False
    target, mask, value = args
    if (
        not isinstance(value, SharedTensor)
        or not isinstance(target, Tensor)
        or isinstance(target, SharedTensor)
        or not isinstance(mask, Tensor)
        or isinstance(mask, SharedTensor)
        or mask.dtype != torch.bool
        or not 0 < mask.dim() <= target.dim()
        or tuple(mask.shape) != tuple(target.shape[: mask.dim()])
        or target.shape[0] != n
    ):
        return False
    trailing = tuple(target.shape[mask.dim() :])
    if _repeated_rows(value, trailing):
        return True
    try:
        return torch.broadcast_shapes(tuple(value.shape), trailing) == trailing
    except RuntimeError:
        return False


def _repeated_rows(value: Tensor, trailing: tuple) -> bool:
    """``value`` one row repeated for each position written: [k, *trailing] with k = 1 or a
    dim 0 of stride 0 (``null.expand(k, …)``: a learned null embedding written into the rows
    that classifier-free guidance drops, emb[drop] = null.expand(k, -1, -1) — refused until
    2026-12-06 where torch.where(drop, null, emb) was exact, a hunt)."""
    return (
        value.dim() == len(trailing) + 1
        and tuple(value.shape[1:]) == trailing
        and (value.shape[0] <= 1 or value.stride(0) == 0)
    )


def _note_row_meeting(pass_: PassNorms, result: Tensor, origin: Origin, dim: int) -> None:
    """Remember an expansion or repetition taken as a meeting along dim 0
    (:attr:`PassNorms.square_expansions`), for a recurrent layer whose initial state it may
    become, by any operations (its examples along dim 1:
    :meth:`~noisescale.per_example.engine.PerExampleNorms._refuse_square_expansion`)."""
    node = result.grad_fn
    if dim == 0 and node is not None and origin.engine.recurrent:
        labels = ", ".join(sorted(s.label for s in origin.sources))
        pass_.square_expansions[(id(node), node._sequence_nr())] = labels


def _rows_unproven(
    flat: list[Any], batched: list[Tensor], nd: int, n: int, dim: int
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(shared shape, other shape) when a shared operand is not broadcast over the examples —
    it has the batch's size along ``dim`` itself, so the meeting would split its rows as the
    examples' (:func:`per_example_reduce`) — and nothing it meets carries autograd history.

    Inside the forward (the loss has a stricter rule of its own, in :func:`_dispatch`): a
    Mixture-of-Experts' output (shared, its rows the tokens of each example) meets the
    residual stream, which has history, and its rows are the examples'. A table of T rows
    multiplied row by row into the input data, T = N, meets only data without history, and
    whether its rows are the examples' no operation shows (a single example's forward would
    broadcast the table over it): refused by the engine.
    """
    shared = next(
        (
            t
            for t in flat
            if isinstance(t, SharedTensor) and t.dim() == nd and t.dim() > dim and t.shape[dim] == n
        ),
        None,
    )
    if shared is None or any(t.grad_fn is not None for t in batched):
        return None
    return tuple(shared.shape), tuple(batched[0].shape)


_LOOKUP_NODES = {"EmbeddingBackward0", "IndexBackward0"}


def _flat_lookup(flat: list[Any], n: int, dim: int) -> int:
    """The leading size k·N (k > 1) of the integer index that looked up the rows of the shared
    operand :func:`_rows_unproven` found, viewed since to the batch's size along ``dim`` — a
    vector quantizer's codebook looked up by the flattened latents' argmin,
    ``codebook[cdist(z.reshape(-1, D), codebook).argmin(-1)].view_as(z)`` (or F.embedding, an
    nn.Embedding) —; 0 for any other. Only the refusal's message reads it: until 2026-12-06 it
    led with a table whose size equals the batch's by coincidence, which such a lookup is not
    (a hunt). Read once, where that refusal is recorded."""
    for t in flat:
        if not (isinstance(t, SharedTensor) and t.dim() > dim and t.shape[dim] == n):
            continue
        node = _plain(t).grad_fn
        for _ in range(8):
            name = type(node).__name__
            if name not in _VIEWS:
                break
            node = node.next_functions[0][0]
        if type(node).__name__ not in _LOOKUP_NODES:
            continue
        saved = getattr(node, "_saved_indices", None)
        if isinstance(saved, list | tuple):  # (table[idx]: one index per indexed dimension)
            saved = next((i for i in saved if i is not None), None)
        index = saved
        size = index.shape[0] if isinstance(index, Tensor) and index.dim() else 0
        if size > n and size % n == 0:
            return size
    return 0


_VIEWS = {
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "UnsqueezeBackward0",
    "AliasBackward0",
}  # fmt: skip


def _repeats(args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """The sizes of ``t.repeat(*sizes)`` / ``t.repeat(sizes)``, as ints (``None``: symbolic)."""
    rest = args[1:] if len(args) > 1 else (kwargs.get("repeats", ()),)
    if len(rest) == 1 and isinstance(rest[0], tuple | list | torch.Size):
        rest = tuple(rest[0])
    return tuple(rest) if all(type(r) is int for r in rest) else None


def _lookup_key(origin: Origin, name: str) -> tuple:
    """What identifies a lookup for learning that it is shared: where it runs, into which
    parameters' tables, by which operation."""
    pids = tuple(sorted(s.pid for s in origin.sources if s.pid is not None))
    scope = origin.scope
    return ("lookup", id(scope) if scope is not None else None, pids, name)


def _linear_input(x: Any, n: int, dim: int) -> bool:
    if not isinstance(x, Tensor) or isinstance(x, SharedTensor):
        return False
    if dim == 1 and x.dim() == 2:
        # attention's output projection runs on [T·N, E], T-major, inside a time-major context
        return n > 0 and x.shape[0] % n == 0
    return x.dim() > dim and x.shape[dim] == n


_CHECKS = ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic")


def _met_expanded(
    src: SharedTensor, result: Tensor, origin: Origin, pass_: PassNorms, n: int, dim: int
) -> bool:
    """``result``, the shared ``src`` broadcast to it (``expand``, or ``repeat`` of dimensions
    of size 1), meets the batch along ``dim`` when it has the batch's size there: noted as an
    expansion meeting (each example's gradient of ``src`` its share of ``result``'s).

    Not every such expansion is a meeting: a learned kernel expanded over C channels and used
    as a convolution's weight, ``F.conv_transpose2d(h, k.expand(C, 1, 4, 4), groups=C)``, has
    the batch's size along dim 0 when N = C, and nothing at the expansion tells it from a
    class token expanded over the examples. The meeting carries a key the audit may learn
    (as a lookup's): where its rows are found not to be the examples', that step is withheld
    and the expansion stays shared from the next step on, meeting the batch where it is used
    (the convolution, as at any N ≠ C). Until 2026-12-06 it was refused at N = C at every
    step, in every mode (a hunt)."""
    if not (
        result.dim() > dim
        and result.shape[dim] == n
        and _broadcast_along(tuple(src.shape), tuple(result.shape), dim)
    ):
        return False
    key = _expansion_key(origin, result.shape[dim + 1 :])
    if key in origin.engine.learned_shared_lookups:
        return False
    meeting = Meeting("expand", src, origin, hooked=result)
    meeting.extra["learn"] = key
    origin.engine.add_meeting(pass_, meeting)
    _note_row_meeting(pass_, result, origin, dim)
    return True


def note_dim1_input(pass_: PassNorms, sources: Any, values: list[Any], n: int) -> None:
    """Remember, for ``sources``, a tensor among ``values`` with autograd history whose dim 1
    has the batch's size ``n`` and dim 0 another — a time-major [T, N, D] (a scan stacked with
    torch.stack(hs, 0), nn.LSTM(batch_first=False)'s output), a heads-first [H, N, T, d] —
    that they met with no meeting (:attr:`PassNorms.dim1_inputs`): a refusal of the shared
    tensor downstream names that layout (until 2026-12-06 it blamed the loss, a hunt)."""
    shape = next(
        (
            tuple(t.shape)
            for t in values
            if isinstance(t, Tensor)
            and not isinstance(t, SharedTensor)
            and t.grad_fn is not None
            and t.dim() > 2
            and t.shape[1] == n
            and t.shape[0] != n
        ),
        None,
    )
    if shape is not None and n > 1:
        for source in sources:
            pass_.dim1_inputs.setdefault(id(source), shape)


def _note_dim1_expansion(
    src: SharedTensor, result: Tensor, origin: Origin, pass_: PassNorms, n: int
) -> None:
    """Remember an expansion of ``src`` along dim 1 to the batch's size that is not a meeting
    (the examples are along dim 0): learned queries in a sequence-first layout, [Q, N, d]
    (facebookresearch/detr's ``query_embed.weight.unsqueeze(1).repeat(1, bs, 1)``). The
    result stays shared, so a layer downstream is a shared call that a refusal names; until
    2026-12-06 it named only a symptom (its input "not per-example", a hunt)."""
    if (
        result.dim() > 1
        and result.shape[1] == n
        and n > 1
        and _broadcast_along(tuple(src.shape), tuple(result.shape), 1)
    ):
        labels = ", ".join(sorted(s.label for s in origin.sources))
        for source in origin.sources:
            pass_.dim1_expansions[id(source)] = (labels, tuple(result.shape))


def _expansion_key(origin: Origin, rest: tuple) -> tuple:
    """What identifies an expansion of a shared tensor for learning that it is not a meeting
    with the examples (:func:`_met_expanded`): a lookup's key with the operation ``expand``
    and the shape of each expanded row, ``rest`` — a kernel over C = N channels,
    ``k.expand(C, 1, 3, 3)``, is learned apart from the same parameter expanded over the
    examples, ``k.view(1, 9).expand(N, 9)`` (keyed by scope and parameters alone, the one
    learned made the other shared, refused at every later step, a review of 2026-12-06)."""
    return _lookup_key(origin, ("expand", tuple(rest)))


def _broadcast_along(src: tuple[int, ...], out: tuple[int, ...], dim: int) -> bool:
    lead = len(out) - len(src)
    return dim < lead or src[dim - lead] == 1


def _attention(func: Any, args: tuple, kwargs: dict, origin: Origin, pass_: PassNorms) -> Any:
    """``scaled_dot_product_attention`` with a shared additive mask (T5's position bias): the
    mask is added to the scores, so it is expanded to their shape like an elementwise operand."""
    names = ("query", "key", "value", "attn_mask")
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    q, k, mask = bound["query"], bound["key"], bound.get("attn_mask")
    if not isinstance(mask, SharedTensor) or any(
        isinstance(bound.get(n), SharedTensor) for n in ("query", "key", "value")
    ):
        return _unsupported(func, args, kwargs, origin, pass_)
    scores = (*q.shape[:-1], k.shape[-2])
    shape = tuple(torch.broadcast_shapes(tuple(mask.shape), scores))
    with torch._C.DisableTorchFunctionSubclass():
        expanded = mask.expand(shape)
        bound["attn_mask"] = expanded
        result = func(**{k: _plain(v) if isinstance(v, Tensor) else v for k, v in bound.items()})
    origin.engine.add_meeting(pass_, Meeting("expand", mask, mask._ns_origin, hooked=expanded))
    return result


def _composite(func: Any, args: tuple, kwargs: dict) -> Any:
    """Run a Python function's body on shared tensors, so that its operations are seen.

    Such a function (``F.multi_head_attention_forward``) first asks whether any argument
    overrides torch functions and, if so, hands the whole call to the override. The first such
    question is answered "no" (once), so the body runs and each operation in it dispatches on
    the shared tensors it touches.
    """
    scope = func.__globals__
    saved = {name: scope[name] for name in _CHECKS if name in scope}

    def restore() -> None:
        scope.update(saved)

    def once(*_: Any) -> bool:
        restore()
        return False

    for name in saved:
        scope[name] = once
    try:
        return func(*args, **kwargs)
    finally:
        restore()


# -- expansions that have not met the batch yet: a learned initial state -----------------------
#
# A learned initial state of nn.RNN/GRU/LSTM is a parameter h0 [L·D, 1, H] expanded over the
# examples along dim 1 (``h0.expand(-1, N, -1).contiguous()``, ``h0.repeat(1, N, 1)``): the
# expansion does not meet the batch where it is made (the engine's examples are along dim 0
# there, and dim 0 is the layers), so the result stays shared. The recurrent layer is where it
# meets the batch — its dim 1 holds the examples — and :func:`per_example_state` makes the
# meeting there. An expansion remembers the shared tensor it expands (``_ns_broadcast``), so
# that the meeting can be made on that tensor: each example's gradient of h0 is then its own
# column of the state's gradient, [N, L·D, 1, H], and not the state's whole gradient with only
# that column non-zero, [N, L·D, N, H], carried back through the expansion (N times the memory).

_COPY_NAMES = {"contiguous", "clone"}


def _broadcast_of(result: Any, expanded: Any) -> Any:
    """``result`` (a shared tensor whose values are ``expanded`` expanded to its shape, or a
    copy of such an expansion: ``expanded`` then carries the mark), marked with the shared
    tensor expanded and both version counters, which :func:`_broadcast_source` checks: an
    in-place change of either since makes the mark stale. Marked only in a model with a
    recurrent layer, where :func:`per_example_state` reads it."""
    if not isinstance(result, SharedTensor) or not isinstance(expanded, SharedTensor):
        return result
    if result is expanded or not result._ns_origin.engine.recurrent:  # type: ignore[attr-defined]
        return result
    found = _broadcast_source(expanded) if hasattr(expanded, "_ns_broadcast") else None
    src, src_version = found if found is not None else (expanded, expanded._version)
    try:
        shape = tuple(torch.broadcast_shapes(tuple(src.shape), tuple(result.shape)))
    except RuntimeError:
        return result
    if shape != tuple(result.shape):
        return result
    result._ns_broadcast = (src, src_version, result._version)  # type: ignore[attr-defined]
    return result


def _broadcast_source(t: SharedTensor) -> tuple[SharedTensor, int] | None:
    """The shared tensor ``t`` is an expansion (or a copy of one) of, with its version when
    expanded, if neither changed in place since; ``None`` otherwise."""
    mark = getattr(t, "_ns_broadcast", None)
    if mark is None:
        return None
    src, src_version, version = mark
    if src._version != src_version or t._version != version:
        return None
    return src, src_version


def _repeat_broadcasts(args: tuple, kwargs: dict) -> bool:
    """``s.repeat(*sizes)`` repeats only dimensions of size 1 (and adds leading ones): its
    values are those of ``s`` expanded (``h0.repeat(1, N, 1)`` of h0 [L, 1, H])."""
    src = args[0]
    reps = _repeats(args, kwargs)
    if not isinstance(src, SharedTensor) or reps is None or len(reps) < src.dim():
        return False
    tail = reps[len(reps) - src.dim() :]
    return all(r == 1 or size == 1 for r, size in zip(tail, src.shape, strict=True))


def per_example_state(state: SharedTensor, pass_: PassNorms) -> Tensor:
    """A recurrent layer's initial state computed from parameters alone (a learned h0 or c0,
    expanded over the examples along dim 1), made per-example where the layer meets the batch
    with it: a plain tensor of the same values, hooked as a meeting whose examples are along
    dim 1 (:meth:`~noisescale.per_example.engine.PerExampleNorms.add_meeting`). Each example's
    gradient of the state is its own column of the state's gradient (the layer runs each
    example's recurrence from that column alone); it is carried back to the parameters the
    state came from. The layer itself then sees an ordinary per-example call."""
    origin: Origin = state._ns_origin  # type: ignore[attr-defined]
    found = _broadcast_source(state)
    with torch._C.DisableTorchFunctionSubclass():
        if found is not None:
            operand = found[0]
            hooked = operand.expand(state.shape)
            out = hooked.contiguous() if state.is_contiguous() else hooked
        else:
            operand = state
            hooked = out = state.expand(state.shape)
    meeting = Meeting("expand", operand, operand._ns_origin, hooked=hooked)
    meeting.extra["dim"] = 1
    origin.engine.add_meeting(pass_, meeting)
    return out


# -- meetings ---------------------------------------------------------------------------------


@dataclass(eq=False)
class Meeting:
    """One place where a shared tensor meets the batch, and what its backward needs.

    ``hooked`` is the tensor whose gradient arrives: the expanded shared operand (elementwise,
    expand) or the operation's output (linear, embedding, conv).
    """

    kind: str  # "expand" (elementwise included), "linear", "embedding" (bags too), "conv"
    shared: SharedTensor | None
    origin: Origin
    hooked: Tensor | None = None
    box: list[Any] = field(default_factory=list)  # what the backward needs (inputs), emptied
    extra: dict[str, Any] = field(default_factory=dict)


def _elementwise(
    func: Any,
    args: tuple,
    kwargs: dict,
    origin: Origin,
    pass_: PassNorms,
    shape: tuple,
    note_rows: bool = False,
) -> Any:
    """An elementwise operation whose shared operands meet the batch: each expanded to the
    result's shape and hooked. ``note_rows``: remember the expansions of those broadcast along
    dim 0 (:func:`_note_row_meeting`)."""
    engine = origin.engine
    meetings: list[Meeting] = []

    def expand(v: Any) -> Any:
        if isinstance(v, SharedTensor):
            with torch._C.DisableTorchFunctionSubclass():
                e = v.expand(shape)
            m = Meeting("expand", v, origin, hooked=e)
            meetings.append(m)
            if note_rows and _broadcast_along(tuple(v.shape), shape, 0):
                _note_row_meeting(pass_, e, origin, 0)
            return e
        return v

    new_args, new_kwargs = _map(args, expand), _map(kwargs, expand)
    with torch._C.DisableTorchFunctionSubclass():
        result = func(*new_args, **new_kwargs)
    for m in meetings:
        engine.add_meeting(pass_, m)
    return result


def _linear(
    func: Any, args: tuple, kwargs: dict, origin: Origin, pass_: PassNorms, n: int, dim: int
) -> Any:
    x = args[0] if args else kwargs["input"]
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    if isinstance(x, SharedTensor):
        return _unsupported(func, args, kwargs, origin, pass_)
    with torch._C.DisableTorchFunctionSubclass():
        y = F.linear(x, _plain(w), None if b is None else _plain(b))
    m = Meeting("linear", None, origin, hooked=y)
    m.box.append(x.detach())
    m.extra.update(weight=w, bias=b, dim=dim, transposed=False)
    origin.engine.add_meeting(pass_, m)
    return y


def _matmul(
    func: Any, args: tuple, kwargs: dict, origin: Origin, pass_: PassNorms, n: int, dim: int
) -> Any:
    x, w = args[0], args[1]
    if (
        isinstance(x, SharedTensor) != isinstance(w, SharedTensor)
        and not kwargs
        and len(args) == 2
        and min(x.dim(), w.dim()) >= 3
    ):
        # a batched product with a shared operand broadcast over the examples (DeBERTa's
        # queries [N, H, T, d] times its position keys [1, H, d, 2S]): the shared operand is
        # expanded to the batch first, a meeting like an elementwise one's
        shared = x if isinstance(x, SharedTensor) else w
        batch = torch.broadcast_shapes(tuple(x.shape[:-2]), tuple(w.shape[:-2]))
        shape = (*batch, *shared.shape[-2:])
        if dim == 0 and shape[0] == n and tuple(shared.shape[:-2]) != tuple(batch):
            with torch._C.DisableTorchFunctionSubclass():
                e = shared.expand(shape)
                result = func(e, _plain(w)) if shared is x else func(_plain(x), e)
            origin.engine.add_meeting(pass_, Meeting("expand", shared, origin, hooked=e))
            return result
    if (
        isinstance(x, SharedTensor)
        and x.dim() == 2
        and not isinstance(w, SharedTensor)
        and not kwargs
        and len(args) == 2
        and isinstance(w, Tensor)
        and w.dim() >= 3
        and dim == 0
        and w.shape[0] == n
    ):
        # W @ X with a shared 2-D W on the left and examples in dim 0 of X ([N, …, R, T]; Hugging
        # Face Mamba's dt_proj.weight @ time_step [N, R, T]): F.linear on Xᵀ, transposed back —
        # a linear layer on the T columns of each example
        xt = w.transpose(-1, -2)
        with torch._C.DisableTorchFunctionSubclass():
            yt = F.linear(xt, _plain(x))
        m = Meeting("linear", None, origin, hooked=yt)
        m.box.append(xt.detach())
        m.extra.update(weight=x, bias=None, dim=dim, transposed=False)
        origin.engine.add_meeting(pass_, m)
        return yt.transpose(-1, -2)
    if (
        isinstance(w, SharedTensor)
        and w.dim() == 1
        and isinstance(x, Tensor)
        and not isinstance(x, SharedTensor)
        and x.dim() >= 2
        and not kwargs
        and len(args) == 2
    ):
        # x @ q with a shared vector q (a learned query of attention pooling): x @ q[:, None]
        # without its last dimension (refused until 2026-12-06, where [D, 1] was followed; a
        # hunt)
        return torch.matmul(x, w.unsqueeze(-1)).squeeze(-1)
    # x @ W with a shared 2-D W on the right: a linear layer whose weight is stored [in, out]
    if isinstance(x, SharedTensor) or not isinstance(w, SharedTensor) or w.dim() != 2:
        return _unsupported(func, args, kwargs, origin, pass_)
    with torch._C.DisableTorchFunctionSubclass():
        y = func(x, _plain(w))
    m = Meeting("linear", None, origin, hooked=y)
    m.box.append(x.detach())
    m.extra.update(weight=w, bias=None, dim=dim, transposed=True)
    origin.engine.add_meeting(pass_, m)
    return y


def _einsum(func: Any, args: tuple, kwargs: dict, origin: Origin, pass_: PassNorms, n: int) -> Any:
    """``torch.einsum`` of a per-example operand whose first index is the examples' (and the
    output's first) with a shared operand that has no such index — Wav2Vec2-BERT's relative
    keys, einsum("bhld,lrd->bhlr", q, table(distance)) —: the shared operand expanded over the
    examples first and given their index, a meeting like an expansion's (each example's
    gradient of it: its row of the expansion's). Refused until 2026-12-06 (a hunt). None
    where the call is not of that form."""
    if kwargs or len(args) < 2 or not isinstance(args[0], str):
        return None
    operands = (
        list(args[1]) if len(args) == 2 and isinstance(args[1], list | tuple) else list(args[1:])
    )
    equation = args[0].replace(" ", "")
    if len(operands) != 2 or "->" not in equation or "." in equation:
        return None
    inputs, output = equation.split("->")
    subscripts = inputs.split(",")
    if len(subscripts) != 2 or not output:
        return None
    shared = [i for i, t in enumerate(operands) if isinstance(t, SharedTensor)]
    if len(shared) != 1:
        return None
    s, b = shared[0], 1 - shared[0]
    batch, other = operands[b], operands[s]
    letter = subscripts[b][:1]
    # (by its subscripts: w contracted with positions, "oc,tc->to", learned as shared at
    # T = N, made the same w's "ntc,oc->nto" on the activations refused at every later step
    # when keyed by the operation alone, a review of 2026-12-06)
    key = _lookup_key(origin, ("einsum", equation))
    if (
        not isinstance(batch, Tensor)
        or batch.dim() != len(subscripts[b])
        or other.dim() != len(subscripts[s])
        or batch.shape[0] != n
        or not letter
        or letter in subscripts[s]
        or output[0] != letter
        or subscripts[b].count(letter) != 1
        # (the audit found its dim 0 is not the examples': a constant whose dim 0 has the
        # batch's size by coincidence, positions of T = N; left to the fallback and its checks)
        or key in origin.engine.learned_shared_lookups
    ):
        return None
    with torch._C.DisableTorchFunctionSubclass():
        e = other.expand(n, *other.shape)
        pieces = [None, None]
        pieces[s], pieces[b] = e, _plain(batch)
        subs = list(subscripts)
        subs[s] = letter + subs[s]
        result = func(f"{','.join(subs)}->{output}", *pieces)
    meeting = Meeting("expand", other, origin, hooked=e)
    meeting.extra["learn"] = key  # (what the audit may learn is not the examples')
    origin.engine.add_meeting(pass_, meeting)
    return result


def _tensordot(args: tuple, kwargs: dict, n: int) -> Any:
    """``torch.tensordot(a, b, dims)`` of a per-example ``a`` whose dim 0, the examples', is not
    contracted with a shared ``b``: a matrix product after reshapes — ``a``'s free dimensions
    (the examples' first) times ``b`` as a [contracted, free] matrix, ``x @ W`` with a shared
    2-D ``W`` (a linear layer's meeting) —, reshaped back to ``tensordot``'s result. Refused
    as an operation without a rule until 2026-12-06 (a hunt). None where the call is not of
    that form (the shared operand first, dim 0 contracted, ``dims`` a tensor, ``out=``)."""
    bound = dict(zip(("a", "b", "dims"), args, strict=False))
    bound.update(kwargs)
    a, b, dims = bound.get("a"), bound.get("b"), bound.get("dims", 2)
    if (
        set(bound) - {"a", "b", "dims", "out"}
        or bound.get("out") is not None
        or not isinstance(b, SharedTensor)
        or not isinstance(a, Tensor)
        or isinstance(a, SharedTensor)
        or a.dim() == 0
        or a.shape[0] != n
    ):
        return None
    if type(dims) is int:
        if not 0 <= dims <= min(a.dim(), b.dim()):
            return None
        da, db = list(range(a.dim() - dims, a.dim())), list(range(dims))
    elif isinstance(dims, list | tuple) and len(dims) == 2:
        if not all(isinstance(d, list | tuple) for d in dims):
            return None
        da, db = (list(d) for d in dims)
        if not all(type(d) is int for d in (*da, *db)) or len(da) != len(db):
            return None
        if not all(-a.dim() <= d < a.dim() for d in da) or not all(
            -b.dim() <= d < b.dim() for d in db
        ):
            return None
        da, db = [d % a.dim() for d in da], [d % b.dim() for d in db]
    else:
        return None
    if (
        0 in da
        or len(set(da)) != len(da)
        or len(set(db)) != len(db)
        or any(a.shape[i] != b.shape[j] for i, j in zip(da, db, strict=True))
    ):
        return None  # (torch's own errors for a malformed call)
    free_a = [i for i in range(a.dim()) if i not in da]
    free_b = [i for i in range(b.dim()) if i not in db]
    k = 1
    for d in da:
        k *= a.shape[d]
    x = a.permute(*free_a, *da).reshape(*(a.shape[i] for i in free_a), k)
    w = b.permute(*db, *free_b).reshape(k, -1)  # (shared: followed as any view of it)
    y = torch.matmul(x, w)  # (dispatched: x @ W with a shared 2-D W, a linear meeting)
    return y.reshape(*(a.shape[i] for i in free_a), *(b.shape[i] for i in free_b))


def _is_column_lookup(args: tuple) -> bool:
    """``table[:, idx]``: a shared table of two or more dims, its dim 1 indexed by one integer
    tensor, its dim 0 taken whole."""
    key = args[1] if len(args) == 2 else None
    return (
        isinstance(key, tuple)
        and len(key) == 2
        and isinstance(key[0], slice)
        and key[0] == slice(None)
        and isinstance(args[0], SharedTensor)
        and args[0].dim() >= 2
        and _is_lookup((args[0], key[1]))
    )


def _is_lookup(args: tuple) -> bool:
    table, idx = args[0], args[1] if len(args) > 1 else None
    return (
        isinstance(table, SharedTensor)
        and isinstance(idx, Tensor)
        and not isinstance(idx, SharedTensor)
        and idx.dtype in (torch.int64, torch.int32)
        and table.dim() >= 1
    )


def _embedding(
    args: tuple,
    kwargs: dict,
    origin: Origin,
    pass_: PassNorms,
    n: int,
    dim: int,
    *,
    flatten: bool = False,
    key: tuple | None = None,
) -> Any:
    # (sparse too: given by position, as AWD-LSTM's embedded_dropout does, it was dropped
    # until 2026-12-06 — the lookup replayed dense, the parameter's .grad dense)
    names = (
        "input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse",
    )  # fmt: skip
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    idx, w = bound["input"], bound["weight"]
    if bound.get("scale_grad_by_freq") and not isinstance(idx, SharedTensor):
        _refuse_by_frequency("F.embedding", origin)
    if bound.get("sparse") or isinstance(idx, SharedTensor):
        return _unsupported(F.embedding, args, kwargs, origin, pass_)
    with torch._C.DisableTorchFunctionSubclass():
        if flatten:  # table[idx] on a table of any shape: rows of the flattened table
            table = _plain(w)
            # indexing counts a negative index from the end, as Python does (table[ids - 1],
            # id 0 the last row); F.embedding does not: until 2026-12-06 such a lookup raised
            # torch's IndexError in the forward, a hunt. One elementwise pass over the indices,
            # no host read; an index out of range either way still raises torch's IndexError
            idx = torch.where(idx < 0, idx + table.shape[0], idx)
            y = F.embedding(idx, table.reshape(table.shape[0], -1)).reshape(
                *idx.shape, *table.shape[1:]
            )
        else:
            y = F.embedding(
                **{k: _plain(v) if isinstance(v, Tensor) else v for k, v in bound.items()}
            )
    m = Meeting("embedding", None, origin, hooked=y)
    m.box.append(idx)
    from noisescale.per_example.embedding import padding_row

    pad = padding_row(bound.get("padding_idx"), w.shape[0])  # (-1: the last row, as torch's)
    m.extra.update(weight=w, padding_idx=pad, dim=dim, flatten=flatten)
    m.extra["learn"] = key  # what the audit may learn to be shared
    origin.engine.add_meeting(pass_, m)
    return y


_BAG_NAMES = (
    "input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode",
    "sparse", "per_sample_weights", "include_last_offset", "padding_idx",
)  # fmt: skip


def _bag_call(args: tuple, kwargs: dict, n: int) -> dict[str, Any] | None:
    """``F.embedding_bag``'s arguments when its table alone is shared and it makes one bag per
    example (the batch's ``n`` bags); ``None`` otherwise.

    Its input is often not per-example along dim 0 — the bags' indices flattened, the bags cut
    by offsets (with ``include_last_offset=True`` one more than the bags) — so whether it meets
    the batch is read from its count of bags, as nn.EmbeddingBag's rule does; bag i is taken
    for example i (the audit checks that each bag's row of the output is its example's).
    """
    bound = dict(zip(_BAG_NAMES, args, strict=False))
    bound.update(kwargs)
    idx, w = bound.get("input"), bound.get("weight")
    offsets, psw = bound.get("offsets"), bound.get("per_sample_weights")
    if (
        not isinstance(w, SharedTensor)
        or w.dim() != 2
        or not isinstance(idx, Tensor)
        or isinstance(idx, SharedTensor)
        or idx.is_nested
        or idx.is_floating_point()
        or idx.dim() not in (1, 2)
        or (idx.dim() == 1) != isinstance(offsets, Tensor)
        or isinstance(offsets, SharedTensor)
        or isinstance(psw, SharedTensor)
        or bound.get("sparse")
    ):
        return None
    from noisescale.per_example.embedding import bag_count

    last = bool(bound.get("include_last_offset", False)) and idx.dim() == 1
    if bag_count(idx, offsets, last) != n:
        return None
    return bound


def _embedding_bag(bound: dict[str, Any], origin: Origin, pass_: PassNorms, key: tuple) -> Any:
    """``F.embedding_bag`` with a shared table, one bag per example: row i of its output is
    Σ_t weight[i, t] · table[index[i, t]], so example i's gradient of the table is
    EmbeddingFactor(index, weight ⊗ δ) — as nn.EmbeddingBag's rule (padding and 'mean''s count
    in the weights, with or without ``include_last_offset``)."""
    from noisescale.per_example.embedding import bag_rows, padding_row

    idx, w = bound["input"], bound["weight"]
    with torch._C.DisableTorchFunctionSubclass():
        y = F.embedding_bag(
            **{k: _plain(v) if isinstance(v, Tensor) else v for k, v in bound.items()}
        )
    pad = padding_row(bound.get("padding_idx"), w.shape[0])
    last = bool(bound.get("include_last_offset", False)) and idx.dim() == 1
    bag, weight = bag_rows(
        idx, bound.get("offsets"), bound.get("per_sample_weights"), bound.get("mode", "mean"),
        pad, last,
    )  # fmt: skip
    m = Meeting("embedding", None, origin, hooked=y)
    m.box.append(bag)
    m.extra.update(weight=w, padding_idx=None, dim=0, flatten=False, bag_weight=weight)
    m.extra["learn"] = key
    origin.engine.add_meeting(pass_, m)
    return y


class _ConvSpec:
    """The attributes of a convolution module the conv rule reads, for a functional call."""

    def __init__(self, weight: Tensor, bias: Any, dims: int, stride: Any, padding: Any,
                 dilation: Any, groups: int) -> None:  # fmt: skip
        def tup(v: Any) -> Any:
            return (
                v
                if isinstance(v, str)
                else tuple(v)
                if isinstance(v, list | tuple)
                else (v,) * dims
            )

        self.weight, self.bias = weight, bias
        self.stride, self.padding, self.dilation = tup(stride), tup(padding), tup(dilation)
        self.groups = groups
        self.padding_mode = "zeros"
        self.kernel_size = tuple(weight.shape[2:])
        self.out_channels = weight.shape[0]
        self.in_channels = weight.shape[1] * groups


def _conv(
    func: Any,
    args: tuple,
    kwargs: dict,
    origin: Origin,
    pass_: PassNorms,
    n: int,
    dim: int,
    transposed: bool = False,
) -> Any:
    """A convolution of per-example input with a shared weight (a parametrized layer's:
    weight_norm, spectral_norm). ``transposed``: F.conv_transposeNd, measured as the
    convolution it is the adjoint of, input and output gradient exchanged (conv.py's rule for
    nn.ConvTransposeNd; Encodec's weight-normed decoder was refused, a hunt of 2026-12-05),
    its spec without the bias (Σ of the output gradient over positions, the engine's)."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    if transposed:
        names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups")
        names += ("dilation",)
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    x, w = bound["input"], bound["weight"]
    if isinstance(x, SharedTensor) or dim != 0:
        return _unsupported(func, args, kwargs, origin, pass_)
    if transposed:
        from noisescale.per_example.conv import check_output_padding

        labels = ", ".join(sorted(s.label for s in origin.sources))
        check_output_padding(
            bound.get("stride", 1), bound.get("output_padding", 0), f"'{_name(func)}' of {labels}"
        )
    with torch._C.DisableTorchFunctionSubclass():
        y = func(**{k: _plain(v) if isinstance(v, Tensor) else v for k, v in bound.items()})
    spec = _ConvSpec(
        w,
        None if transposed else bound.get("bias"),
        (_CONV_TRANSPOSE if transposed else _CONV)[func],
        bound.get("stride", 1),
        bound.get("padding", 0),
        bound.get("dilation", 1),
        bound.get("groups", 1),
    )
    m = Meeting("conv", None, origin, hooked=y)
    m.box.append(x.detach())
    m.extra.update(spec=spec, weight=w, bias=bound.get("bias"), dim=dim, transposed=transposed)
    origin.engine.add_meeting(pass_, m)
    return y


def _norm(func: Any, args: tuple, kwargs: dict, origin: Origin, pass_: PassNorms) -> Any:
    """Normalisation without the shared affine parameters, then the elementwise rule."""
    x = args[0]
    if func is F.layer_norm or func is getattr(F, "rms_norm", None):
        names = ("input", "normalized_shape", "weight", "bias", "eps")
        if func is not F.layer_norm:
            names = ("input", "normalized_shape", "weight", "eps")
        bound = dict(zip(names, args, strict=False))
        bound.update(kwargs)
        w, b = bound.pop("weight", None), bound.pop("bias", None)
        with torch._C.DisableTorchFunctionSubclass():
            y = func(**{k: _plain(v) if isinstance(v, Tensor) else v for k, v in bound.items()})
        shape: tuple[int, ...] | None = None  # the affine parameters cover the trailing dims
    else:
        if func is F.group_norm:
            names = ("input", "num_groups", "weight", "bias", "eps")
        else:
            names = (
                "input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
                "eps",
            )  # fmt: skip
        bound = dict(zip(names, args, strict=False))
        bound.update(kwargs)
        if func is F.batch_norm and bound.get("training", False):
            return _unsupported(func, args, kwargs, origin, pass_)
        w, b = bound.pop("weight", None), bound.pop("bias", None)
        with torch._C.DisableTorchFunctionSubclass():
            y = func(**{k: _plain(v) if isinstance(v, Tensor) else v for k, v in bound.items()})
        shape = (-1,) + (1,) * (x.dim() - 2)  # per channel (dim 1)
    if w is not None:
        y = y * (w if shape is None else w.reshape(shape))
    if b is not None:
        y = y + (b if shape is None else b.reshape(shape))
    return _plain(y) if isinstance(y, SharedTensor) else y


def _refuse_by_frequency(call: str, origin: Origin) -> None:
    """A functional lookup of the batch with ``scale_grad_by_freq=True`` on parameters: named
    as the module form is (it was refused as an operation without a rule until 2026-12-06)."""
    from noisescale.per_example.embedding import by_frequency_message

    labels = sorted({s.label for s in origin.sources})
    raise UnsupportedModuleError(
        by_frequency_message(
            f"{call}(..., scale_grad_by_freq=True) on parameters {labels}",
            "call it with scale_grad_by_freq=False",
        )
    )


def _unsupported(func: Any, args: tuple, kwargs: dict, origin: Origin, pass_: PassNorms) -> Any:
    origin.engine.record_unsupported(pass_, origin, _name(func))
    with torch._C.DisableTorchFunctionSubclass():
        return _unwrap(func(*args, **kwargs))


# -- per-example gradients of a shared operand ----------------------------------------------------


def per_example_reduce(grad: Tensor, shape: tuple[int, ...], dim: int, n: int) -> Tensor:
    """Each example's gradient of a shared tensor of ``shape`` from the gradient of its expansion.

    ``grad`` has the broadcast shape, with the examples along ``dim``. Returns [N, *shape]: the
    gradient summed over the dimensions the shared tensor was broadcast along, except ``dim``.
    When the shared tensor itself has the batch's size along ``dim`` (no broadcast there),
    example i's gradient is nonzero in row i only.
    """
    out_nd = grad.dim()
    lead = out_nd - len(shape)
    full = (1,) * lead + tuple(shape)
    sum_dims = [j for j in range(out_nd) if j != dim and full[j] == 1 and grad.shape[j] != 1]
    r = grad.sum(sum_dims, keepdim=True) if sum_dims else grad
    if dim >= lead and full[dim] == n and grad.shape[dim] == n and shape[dim - lead] != 1:
        # example i touches row i of the shared tensor only
        rm = r.movedim(dim, 0)  # [N, rest of out dims]
        diag = rm.new_zeros(n, *rm.shape)
        idx = torch.arange(n, device=r.device)
        diag[idx, idx] = rm
        diag = diag.movedim(1, 1 + dim)  # [N, *out dims]
        return diag.reshape(n, *shape)
    return r.movedim(dim, 0).reshape(n, *shape)


def view_relation(w: Tensor, alias: Tensor) -> tuple[str, int, int] | None:
    """How a shared weight relates to a parameter's alias without materialising per-example
    gradients: ``("same", 0, 0)``, ``("t", 0, 0)`` (2-D transpose) or ``("rows", start, stop)``
    (a block of rows). ``None`` otherwise."""
    if w is alias:
        return ("same", 0, 0)
    with torch._C.DisableTorchFunctionSubclass():
        wp, ap = w.as_subclass(Tensor), alias.as_subclass(Tensor)
        if wp.untyped_storage().data_ptr() != ap.untyped_storage().data_ptr():
            return None
        if wp.dtype != ap.dtype:
            return None
        if (
            wp.shape == ap.shape
            and wp.stride() == ap.stride()
            and wp.storage_offset() == ap.storage_offset()
        ):
            return ("same", 0, 0)
        if (
            ap.dim() == 2
            and wp.dim() == 2
            and wp.shape == ap.shape[::-1]
            and wp.stride() == ap.stride()[::-1]
            and wp.storage_offset() == ap.storage_offset()
        ):
            return ("t", 0, 0)
        if (
            ap.dim() >= 1
            and wp.dim() == ap.dim()
            and wp.shape[1:] == ap.shape[1:]
            and wp.stride() == ap.stride()
            and ap.is_contiguous()
        ):
            row = ap.stride(0)
            offset = wp.storage_offset() - ap.storage_offset()
            if row > 0 and offset % row == 0:
                start = offset // row
                stop = start + wp.shape[0]
                if start >= 0 and stop <= ap.shape[0]:
                    return ("rows", start, stop)
    return None
