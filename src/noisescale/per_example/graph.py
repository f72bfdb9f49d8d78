"""Reading autograd's graph: the nodes a layer's input came through (rows kept apart or
picked by data), a product's reshaped output, hook order, the sequence number and whether
autocast is on, and the batched backward the audit replays (under checkpointing too)."""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks

from noisescale.per_example.registry import LayerRule


def _accumulator(p: Tensor) -> Any:
    """The AccumulateGrad node of a leaf tensor that requires grad."""
    with torch.enable_grad():
        return p.view_as(p).grad_fn.next_functions[0][0]


def _order(hooks: dict, first: int, last: list[int]) -> None:
    """Put hook ``first`` before the others in a tensor's hook dict and the hooks ``last``
    after them, in that order. Reinserted, not moved: autograd calls the hooks in the order of
    the underlying dict, which an ``OrderedDict``'s ``move_to_end`` does not change."""
    keys = list(hooks)
    if keys[:1] == [first] and keys[len(keys) - len(last) :] == last:
        return
    ours = {key: hooks[key] for key in (first, *last)}
    theirs = [(key, hook) for key, hook in hooks.items() if key not in ours]
    hooks.clear()
    hooks[first] = ours[first]
    hooks.update(theirs)
    for key in last:
        hooks[key] = ours[key]


def _cast_source(out: Tensor) -> Any:
    """The gradient edge of the tensor ``out`` is a dtype cast of (``out.float()``), or
    ``None``."""
    fn = out.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return None
    nexts = [e for e in fn.next_functions if e[0] is not None]
    if len(nexts) != 1:
        return None
    return torch.autograd.graph.GradientEdge(*nexts[0])


def _identity(x: Any) -> Any:
    return x


class _MirroredCheckpoint:
    """A transformers layer's ``_gradient_checkpointing_func`` (``checkpoint`` with its
    options), wrapped so that the forward it recomputes in the backward holds the same aliases
    of the parameters used directly in its ``scopes`` (the layer, or a module around it) as the
    forward held (:meth:`_on_scope_enter`, on the step's shadow pass: nothing of it counts). A
    copy or a pickle of the model gets the original function back."""

    __slots__ = ("engine", "original", "scopes")

    def __init__(self, original: Callable[..., Any], engine: Any, scopes: list[nn.Module]) -> None:
        self.original, self.engine, self.scopes = original, engine, scopes

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        engine, scopes = self.engine, self.scopes

        def run(*a: Any, **k: Any) -> Any:
            if not _checkpoint_recompute():
                engine._mirrored_under.append(_saved_hooks_top())
                try:
                    return fn(*a, **k)
                finally:
                    engine._mirrored_under.pop()
            entered = []
            try:
                for scope in list(scopes):
                    engine._on_scope_enter(scope, (), {})
                    entered.append(scope)
                return fn(*a, **k)
            finally:
                for scope in reversed(entered):
                    engine._on_scope_exit(scope, (), {}, None)

        return self.original(run, *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Any:
        return copy.deepcopy(self.original, memo)

    def __reduce__(self) -> tuple:
        return (_identity, (self.original,))


def _batched_grad(output: Tensor, edges: list, rows: Tensor) -> Sequence[Tensor | None]:
    """The vector-Jacobian products of ``output`` for each of ``rows`` (dim 0) at ``edges``:
    one batched backward (``torch.func.vmap`` over autograd), or — where that backward
    recomputes a checkpointed forward that draws random numbers, which vmap cannot run
    (peft's LoKr under activation checkpointing in training mode draws its module dropout: a
    crash until 2026-12-04) — one backward per row, each recomputation replaying the forward's
    random state (checkpoint's ``preserve_rng_state``)."""
    try:
        return torch.autograd.grad(
            output, edges, rows, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except RuntimeError as error:
        if "random operations inside of vmap" not in str(error):
            raise
    per_row = [
        torch.autograd.grad(output, edges, row, retain_graph=True, allow_unused=True)
        for row in rows
    ]
    # (an edge the graph does not reach is None for every row alike)
    return [
        None if per_row[0][j] is None else torch.stack([g[j] for g in per_row])
        for j in range(len(edges))
    ]


def _saved_hooks_top() -> Any:
    """The pack hook of the saved-tensor hooks on top now (a non-reentrant checkpoint's while
    its function runs), or None."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return None if top is None else top[0]


def _checkpoint_recompute() -> bool:
    """Whether this forward is torch.utils.checkpoint's non-reentrant recomputation: inside a
    backward, under the saved-tensor hooks checkpoint installs to collect what it recomputes —
    or, checkpoints nested in the recomputed code (Swin checkpoints stages and their blocks),
    under the hooks of an inner checkpoint's forward, run again as part of the outer one's
    recomputation."""
    if torch._C._current_graph_task_id() == -1:
        return False
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    name = "" if top is None else getattr(top[0], "__qualname__", "")
    return "_recomputation_hook" in name or "_checkpoint_hook" in name


# autograd nodes whose output row r depends on row r of their inputs only (elementwise
# operations, activations, dropout, a LayerNorm over the last dimensions, a copy)
_ROWWISE_NODES = frozenset(
    {
        "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "MulBackward0",
        "MulBackward1", "DivBackward0", "DivBackward1", "NegBackward0", "ReluBackward0",
        "GeluBackward0", "SiluBackward0", "TanhBackward0", "SigmoidBackward0", "EluBackward0",
        "LeakyReluBackward0", "HardswishBackward0", "HardsigmoidBackward0", "SoftplusBackward0",
        "ThresholdBackward0", "NativeDropoutBackward0", "CloneBackward0", "ToCopyBackward0",
        "NativeLayerNormBackward0",
        # CUDA's fused RNN cells (rows in, rows out; 2026-12-06)
        "ThnnFusedLstmCellBackward0", "ThnnFusedGruCellBackward0",
        # a convolution's reflect and replicate padding (its spatial dims only; 2026-12-06)
        "ReflectionPad1DBackward0", "ReflectionPad2DBackward0", "ReflectionPad3DBackward0",
        "ReplicationPad1DBackward0", "ReplicationPad2DBackward0", "ReplicationPad3DBackward0",
    }
)  # fmt: skip


_VIEW_NODES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})


_SPLIT_NODES = frozenset({"SplitBackward0", "SplitWithSizesBackward0", "UnsafeSplitBackward0"})


# the input's position (x @ Wᵀ; a batched convolution's image r is its input image r's alone:
# the frames of a CNN folded into the batch, until 2026-12-06 refused, a hunt)
_PRODUCT_NODES = {"AddmmBackward0": 1, "MmBackward0": 0, "ConvolutionBackward0": 0}


def _flat_size(rule: LayerRule, module: nn.Module, size: Any, n: int) -> bool:
    """Whether a call's leading size could be the examples flattened together with positions:
    a multiple k·N (k > 1) of the batch's, on a layer whose rule treats positions alike."""
    return (
        rule.flattened is not None
        and isinstance(size, int)
        and size > n > 0
        and size % n == 0
        and rule.flattened(module)
    )


def _example_major(
    x: Tensor, n: int, size: int, unread: list[tuple[str, Tensor]] | None = None
) -> bool:
    """Whether ``x`` ([size, …], size = k·N) provably holds each example's k rows in turn.

    With a history: every path back through it passes only through operations that keep rows
    apart (:data:`_ROWWISE_NODES`, views that keep the leading size, a product with a
    parameter) to a view that flattened a tensor whose dim 0 has the N examples, [N, a, …] →
    [N·a·…, …]. An input without a history (input data, a frozen model's activation) is not
    taken, nor is a row selection (``x[idx]``, ``index_select``, a gather: a mixture of
    experts' routing), a transpose or anything else not listed — such rows could be ordered by
    the data, differently at every step. This is necessary, not sufficient: whether each
    output row's gradient comes from its example alone depends on what consumes it, which the
    audit's replay compares (a flattened call no replay compared is not measured).

    A view whose input's leading size is another multiple of ``size`` keeps each row's
    elements together (a view keeps the row-major order): nn.Linear on ``[B·F, P, D]``
    returns ``addmm(...).view(B·F, P, O)`` of ``[B·F·P, O]``, the ``(b t) n d`` layout of
    video transformers written by hand — an MLP block there was taken for a shared call and
    refused until 2026-12-06 (a hunt). A table repeated from parameters alone
    (``frame.repeat(B, 1)``) holds no example, as a bias (refused until 2026-12-06, while the
    same table expanded and reshaped was measured; a hunt). The tensor a flattening view
    flattened is checked, as a layer's input of the batch's size is, for rows picked along
    the examples by the data (:func:`_picked_rows`: a batch sorted inside the forward,
    ``h[order].reshape(B*T, D)``, gave the MLP's rows to the wrong examples on unaudited
    steps until 2026-12-06, tr Σ up to 53% off without a word, a hunt); on an accelerator
    the comparison is appended to ``unread``."""
    fn = x.grad_fn
    if fn is None:
        return False  # no history to read (input data, a frozen activation): shared
    return _example_major_from(fn, n, size, unread)


def _example_major_from(
    fn: Any, n: int, size: int, unread: list[tuple[str, Tensor]] | None
) -> bool:
    """:func:`_example_major` from an autograd node whose tensor has ``size`` leading rows."""
    # (each node with the leading size of its tensor, a multiple of ``size``: the rows of
    # ``x``'s row r are that tensor's rows r·m … r·m + m - 1)
    stack, seen, budget = [(fn, size)], set(), 64
    while stack:
        node, rows = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        budget -= 1
        if budget < 0:
            return False
        name = type(node).__name__
        if name == "AccumulateGrad":
            continue  # a parameter, broadcast over the rows (a bias)
        if name in _VIEW_NODES:
            sizes = [int(s) for s in getattr(node, "_saved_self_sym_sizes", ())]
            if len(sizes) >= 2 and sizes[0] == n and rows % n == 0:
                # the flattening of [N, a, …] into rows·…: each example's rows in turn (a view
                # keeps the row-major order: [N, F·P, D] → [N·F, P, D] too) — of the examples
                # in order, unless the data picked them (h[order], sorted inside the forward)
                beneath = node.next_functions[0][0] if node.next_functions else None
                if beneath is not None and (
                    _picked_rows(beneath, n, unread) is not None
                    or _rows_moved(beneath, tuple(sizes))
                ):
                    return False
                continue
            if sizes and sizes[0] % size == 0:
                # (the same rows, or each split into whole rows or merged with its own)
                stack.extend((f, sizes[0]) for f, _ in node.next_functions)
                continue
            return False
        if name in _SPLIT_NODES:
            # a split along the features keeps rows (an RNN cell's gates, a GLU's halves;
            # 2026-12-06): not one along dim 0
            sizes, dim = getattr(node, "_saved_self_sym_sizes", ()), node._saved_dim
            if not sizes or _dim_of(dim, len(sizes)) == 0:
                return False
            stack.extend((f, rows) for f, _ in node.next_functions)
            continue
        if name in _PRODUCT_NODES:
            edges = node.next_functions
            at = _PRODUCT_NODES[name]
            weight = edges[at + 1][0] if len(edges) > at + 1 else None
            while weight is not None and type(weight).__name__ in ("TBackward0", "ToCopyBackward0"):
                weight = weight.next_functions[0][0]  # transposed, cast (autocast)
            if weight is not None and type(weight).__name__ != "AccumulateGrad":
                return False  # a product with an activation: rows mixed
            stack.extend((f, rows) for i, (f, _) in enumerate(edges) if i != at + 1)
            continue
        if name == "RepeatBackward0" and _parameters_only(node.next_functions[0][0]):
            continue  # a table repeated, made from parameters alone: no example's rows
        if name == "CatBackward0":
            # a cat along the features keeps the rows — a decoder's token embedding beside
            # its state repeated per beam, cat([emb(tok), h.repeat_interleave(B, 0)], -1)
            # (refused as a table's or a shared call's until 2026-12-06, a hunt) —: each part
            # proven in turn, or a table of parameters alone; not a cat along dim 0
            shape = node._input_metadata[0].shape
            if not shape or _dim_of(node._saved_dim, len(shape)) == 0:
                return False
            stack.extend((f, rows) for f, _ in node.next_functions if not _parameters_only(f))
            continue
        if name not in _ROWWISE_NODES:
            return False
        stack.extend((f, rows) for f, _ in node.next_functions)
    return True


def _parameters_only(node: Any, budget: int = 16) -> bool:
    """Whether the tensor of autograd ``node`` was computed from parameters alone: every
    path back through its history ends at a parameter's accumulation. Not where one ends at
    a tensor without a history (input data, a constant: it may hold the batch) or at a leaf
    that is not a parameter (an input that requires grad)."""
    stack = [node]
    while stack:
        node = stack.pop()
        budget -= 1
        if node is None or budget < 0:
            return False
        kind = type(node).__name__
        if kind == "AccumulateGrad":
            if not isinstance(node.variable, nn.Parameter):
                return False
            continue
        if kind in _DATA_INDEXED:
            return False  # (an index or mask autograd has no edge for: it may be the data's)
        stack.extend(f for f, _ in node.next_functions)
    return True


# autograd nodes whose result also depends on an index or a mask without an edge of its own:
# a lookup of parameters by token ids (nn.Embedding's output) is the examples', not
# parameters alone (a review of 2026-12-06: token picks across examples measured 0.3–3% off)
_DATA_INDEXED = frozenset(
    {"EmbeddingBackward0", "EmbeddingBagBackward0", "IndexBackward0", "IndexSelectBackward0",
     "GatherBackward0", "TakeBackward0", "MaskedFillBackward0", "MaskedSelectBackward0",
     "MaskedScatterBackward0", "WhereBackward0", "IndexPutBackward0", "IndexCopyBackward0",
     "IndexAddBackward0", "ScatterBackward0", "ScatterBackward1", "ScatterAddBackward0",
     "ScatterReduceBackward0"}
)  # fmt: skip


def _flattened_input(x: Tensor, inputs: tuple | None, n: int, size: int) -> bool:
    """Whether ``x`` ([size, …], size = k·N), without a history, is one of the model's inputs
    [N, a, …] flattened, ``x.reshape(N·a, …)``: a view of the whole input, in its memory's
    row-major order, so that its rows are each example's in turn — the proof that
    :func:`_example_major` reads from a history, here read from the memory (tokens flattened
    from the raw input before a Linear, ``l(x.reshape(B*T, D))``; until 2026-12 such a call was
    taken for one shared by every example and refused, "its output never met the batch"). A
    copy (a non-contiguous input reshaped), a slice, a transpose or another tensor is not
    taken. ``inputs``: the model's (args, kwargs); only their top-level tensors are read."""
    base = x._base
    if (
        base is None
        or inputs is None
        or x.grad_fn is not None
        or base.dim() < 2
        or base.shape[0] != n
        or x.dim() < 1
        or x.shape[0] != size
        or x.numel() != base.numel()
        or not (x.is_contiguous() and base.is_contiguous())
        or x.data_ptr() != base.data_ptr()
    ):
        return False
    args, kwargs = inputs
    if not any(v is base for v in (*args, *kwargs.values())):
        return False
    # the leading dimensions merged: [N, a, b, …, rest] → [N·a·b…, rest]
    dims = itertools.accumulate(base.shape[:-1], operator.mul)
    rest = tuple(x.shape[1:])
    return any(d == size and rest == tuple(base.shape[j + 1 :]) for j, d in enumerate(dims))


def _rebasable_base(output: Tensor, dim: int, n: int) -> Tensor | None:
    """The tensor to hook for a layer's output gradient instead of the output, if any.

    nn.Linear on [N, T, I] and Hugging Face's Conv1D return a view of a product's result,
    ``addmm(...).view(N, T, O)``. An in-place operation on that view — ``nn.ReLU(inplace=True)``,
    ``h[~mask] = 0`` (Wav2Vec2's padded frames), ``h.mul_(m)`` — rebases it: its gradient then
    flows through the base's new node into the product, and the view's own node, where a hook
    on the view sits, is left out of the graph (until 2026-12-04 such a layer was refused as
    "no use of its parameters"). The whole base, its rows each example's in turn ([N·T, O]:
    the audit's FLAT), keeps its node whatever is done to the view. ``None`` for any other
    output."""
    base = _whole_base(output)
    if (
        base is None
        or dim != 0
        or base.dim() == 0
        or base.shape[0] < n
        or base.shape[0] % max(n, 1)
        or output.dim() == 0
        or output.shape[0] != n
    ):
        return None
    return base


def _whole_base(output: Tensor) -> Tensor | None:
    """The tensor ``output`` is a reshaped view of, when it is the whole base, in the same
    layout (a product's result, ``addmm(...).view(...)``)."""
    base = output._base
    if (
        base is None
        or base._base is not None
        or not base.requires_grad
        or base.numel() != output.numel()
        or not (base.is_contiguous() and output.is_contiguous())
        or base.data_ptr() != output.data_ptr()
    ):
        return None
    return base


def _reshaped_base(module: nn.Module, output: Any) -> Tensor | None:
    """The tensor a product layer's output is a reshaped view of — nn.Linear on [N, T, I] and
    Hugging Face's Conv1D return ``addmm(...).view(...)`` — when the view may be replaced by a
    new one: no forward hook but the engine's saw it (a hook of the user's registered before
    the tracker's would hold the old view), and it is the whole base, in the same layout."""
    if (
        not isinstance(output, Tensor)
        or len(module._forward_hooks) != 2  # _on_weight_exit and _on_forward
        or _global_forward_hooks
    ):
        return None
    return _whole_base(output)


def _autocast_known(device: str) -> bool:
    try:
        torch.is_autocast_enabled(device)
    except (RuntimeError, TypeError):
        return False
    return True


_AUTOCAST_DEVICES = tuple(d for d in ("cpu", "cuda") if _autocast_known(d))


_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def _sequence_nr() -> int | None:
    """The calling thread's autograd sequence number: one more for each autograd node made
    (private to torch; ``None`` where a torch lacks it)."""
    return _GET_SEQUENCE_NR() if _GET_SEQUENCE_NR is not None else None


_GET_SEQUENCE_NR: Callable[[], int] | None = getattr(torch._C._autograd, "_get_sequence_nr", None)


def _autocast_enabled() -> bool:
    """Whether autocast is on for the CPU or CUDA (checked in every measured layer's hook: one
    call into torch where it has one for every device)."""
    if _ANY_AUTOCAST is not None:
        return bool(_ANY_AUTOCAST())
    return any(torch.is_autocast_enabled(d) for d in _AUTOCAST_DEVICES)


def _float16_in_use(params: Any) -> bool:
    """Whether float16 takes part in the step: autocast to float16 on, or a parameter in it
    (bfloat16 has float32's range: no overflow to fear from a factor of 4)."""
    for d in _AUTOCAST_DEVICES:
        try:
            if torch.is_autocast_enabled(d) and torch.get_autocast_dtype(d) == torch.float16:
                return True
        except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - older torch
            return True
    return any(p.dtype == torch.float16 for p in params)


# autograd nodes that pass a tensor's rows on unchanged, in order, or change each element alone
# (looked through, along their first input, from a layer's input back to a pick)
_ROW_PRESERVING = frozenset(
    {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "CloneBackward0",
     "ToCopyBackward0", "ContiguousBackward0", "GeluBackward0", "ReluBackward0",
     "SiluBackward0", "TanhBackward0", "SigmoidBackward0", "NativeDropoutBackward0",
     "MulBackward1", "DivBackward1", "NegBackward0", "LeakyReluBackward0", "EluBackward0",
     "HardtanhBackward0", "SoftplusBackward0", "ThresholdBackward0", "PowBackward0",
     "MulBackward0", "DivBackward0", "AddBackward0", "SubBackward0"}
)  # fmt: skip


def _host_reads_indices(index: Tensor) -> bool:
    """Whether :func:`_selected_rows` reads index tensors' values when the layer runs: on the
    CPU; on an accelerator that would wait for the device, and they are compared there instead
    (a flag the tracker reads with the step's statistics). Tests patch it to take the
    accelerator's way on the CPU."""
    return index.device.type == "cpu"


def _row_origin(x: Tensor | None) -> Any:
    """The autograd node that made ``x``'s rows: its history walked back through views,
    elementwise functions (:data:`_ROW_PRESERVING`, along their first input) and a cat of a
    tensor's slices in order (:func:`_in_order`), at most 8 nodes. None where ``x`` has no
    history, a walk ends at a leaf, or under compilation (no autograd graph to read)."""
    if x is None or x.grad_fn is None or torch.compiler.is_compiling():
        return None
    return _origin_of(x.grad_fn)


def _origin_of(node: Any, branches: list | None = None) -> Any:
    """:func:`_row_origin` from an autograd node (also through a slice or a select along a
    later dimension, ``h[order][:, 1:]``, which keeps the rows: a review of 2026-12-06 found
    the pick beneath it missed)."""
    for _ in range(8):
        kind = type(node).__name__
        if kind in ("SliceBackward0", "SelectBackward0"):
            sizes = getattr(node, "_saved_self_sym_sizes", ())
            if sizes and _dim_of(node._saved_dim, len(sizes)) != 0:
                nxt = node.next_functions
                if not nxt or nxt[0][0] is None:
                    return None
                node = nxt[0][0]
                continue
        if kind not in _ROW_PRESERVING:
            source = _in_order(node)
            if source is None:
                break
            node = source  # (a cat of its slices in order: the tensor itself, looked through)
            continue
        nxt = node.next_functions
        if (
            branches is not None
            and kind in _TWO_SIDED
            and (nxt[0][0] is None or type(nxt[0][0]).__name__ == "AccumulateGrad")
        ):
            # (the other side, where the first holds no rows of the batch — a buffer, a
            # constant, a parameter: pe + h[order]; not where both do, h·λ + h[perm]·(1 − λ),
            # a mixup, which the audit refuses naming the mixing)
            branches.extend(f for f, _ in nxt[1:] if f is not None)
        if not nxt or nxt[0][0] is None:
            return None
        node = nxt[0][0]
    return node


def _along_examples(
    index: Tensor,
    n: int,
    unread: list[tuple[str, Tensor]] | None,
    spelled: str,
    reorders: bool = True,
) -> str | None:
    """Rows picked along the examples' own dimension by ``index`` (its dim 0 the result's
    rows): the examples when every row r is picked from example r (arange(N)); else a pick
    (:func:`_selected_rows`), named — a reordering as the batch sorted inside the forward.
    ``reorders=False``: a 1-D index that only reorders the examples is left to the audit (a
    reordering that restores an order, as pad_packed_sequence's). On an accelerator the
    comparison stays on the device (``unread``)."""
    how = f"an index into the examples' rows that is not them in order ({spelled})"
    order = torch.arange(n, device=index.device).view((n,) + (1,) * (index.dim() - 1))
    in_order = (index == order).all()
    if not reorders and index.dim() == 1:
        in_order = in_order | (index.sort().values == order).all()
    if not _host_reads_indices(index):
        if unread is not None:
            unread.append((how, in_order.logical_not()))
        return None
    if bool(in_order):
        return None
    if index.dim() == 1 and bool((index.sort().values == order).all()):
        return (
            f"an index that reorders the examples ({spelled}: a batch sorted inside the "
            "forward — before pack_padded_sequence, pass enforce_sorted=False, which keeps "
            "the examples' order)"
        )
    return how


def _selected_rows(
    x: Tensor | None, n: int, unread: list[tuple[str, Tensor]] | None = None
) -> str | None:
    """How ``x``'s ``n`` rows were picked so that which example each belongs to depends on the
    data, when its autograd history shows it (through views and elementwise functions): a
    boolean mask over more than the examples' own dimension, or one over (or an index into) a
    tensor of another leading size — the examples flattened with their positions, [N·T, D],
    filtered to the tokens a loss counts — or, on the CPU, several index tensors none of
    which runs along the examples in order (``h[b, t]`` from ``mask.nonzero()``). Their count
    equals the batch's by coincidence, and an audit proves their order for one step's data
    only (before 2026-12-04 such rows were split as the examples on unaudited steps: 19–37%
    off). ``None`` when the history shows no such pick: an index along the examples' own
    dimension — ``h[arange(N), last]``, a time-major ``out[last, arange(N)]`` — is not one.
    On an accelerator several index tensors are not read (that would wait for the device):
    ``None`` then, and ``(how, flag)`` is appended to ``unread``, ``flag`` a device boolean,
    true when none of them is the examples in order — the tracker refuses the step when it
    reads the step's statistics, before they are folded into the estimate."""
    if x is None or x.grad_fn is None or torch.compiler.is_compiling():
        return None
    return _picked_rows(x.grad_fn, n, unread)


def _picked_rows(node: Any, n: int, unread: list[tuple[str, Tensor]] | None = None) -> str | None:
    """:func:`_selected_rows` from the autograd node of a tensor with ``n`` leading rows (also
    the tensor a flattening view flattened: :func:`_example_major`): the first pick among the
    origins of its rows (:func:`_origins`)."""
    for origin in _origins(node):
        how = _picked_at(origin, n, unread) or _moved_at(origin, n, unread)
        if how is not None:
            return how
    return None


# elementwise functions of two tensors, each of whose rows may come from a pick
_TWO_SIDED = frozenset({"AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0"})


def _origins(node: Any, budget: int = 16) -> list[Any]:
    """The nodes that made the rows of ``node``'s tensor: :func:`_origin_of` along the first
    input, and along the others of a sum, difference, product or quotient of two tensors whose
    first holds no rows (``pe + h[order]``: a pick on the right hid behind a buffer on the left
    until a review of 2026-12-06, 4% off on unaudited steps); at most ``budget`` nodes walked."""
    found: list[Any] = []
    stack = [node]
    while stack and budget > 0:
        budget -= 1
        origin = _origin_of(stack.pop(), stack)
        if origin is not None and not any(origin is f for f in found):
            found.append(origin)
    return found


# sums, means and other reductions or normalisations over later dimensions (a dot product's
# (u * v).sum(1), a norm, a softmax over the features): rows kept
_REDUCED = frozenset(
    {"SumBackward1", "MeanBackward1", "LinalgVectorNormBackward0", "AmaxBackward0",
     "AminBackward0", "LogsumexpBackward0", "ProdBackward1", "SoftmaxBackward0",
     "LogSoftmaxBackward0"}
)  # fmt: skip

# elementwise functions of one or several tensors besides :data:`_ROW_PRESERVING`, and a
# batched product (dim 0 its batch): rows kept, every input followed — a review of
# 2026-12-06 found a pick met with other rows behind them measured 5–92% off on unaudited
# steps (exp, abs, logsigmoid, maximum, lerp, addcmul, an einsum's bmm)
_MEETS_ROWS = frozenset(
    {"WhereBackward0", "ExpBackward0", "LogBackward0", "AbsBackward0", "LogSigmoidBackward0",
     "MaximumBackward0", "MinimumBackward0", "LerpBackward0", "LerpBackward1",
     "AddcmulBackward0", "AddcdivBackward0", "SqrtBackward0", "RsqrtBackward0", "SinBackward0",
     "CosBackward0", "ClampBackward0", "ClampBackward1", "ClampMinBackward0",
     "ClampMaxBackward0", "Expm1Backward0", "Log1PBackward0", "ReciprocalBackward0",
     "PowBackward1", "PowBackward2", "Atan2Backward0", "HardswishBackward0", "MishBackward0",
     "SgnBackward0", "SignBackward0", "BmmBackward0"}
)  # fmt: skip


_TRANSPOSES = frozenset({"PermuteBackward0", "TransposeBackward0", "TBackward0"})


def _diagonal_of_rows(node: Any, n: int) -> bool:
    """Whether a diagonal ``node`` takes the main diagonal of an [n, n] product of two
    2-D tensors, ``u @ w.T``, whose right side is a transpose: its entry i meets row i of each."""
    sizes = tuple(getattr(node, "_saved_self_sym_sizes", ()) or ())
    if sizes != (n, n) or node._saved_offset != 0:
        return False
    if {_dim_of(node._saved_dim1, 2), _dim_of(node._saved_dim2, 2)} != {0, 1}:
        return False
    product = node.next_functions[0][0] if node.next_functions else None
    if type(product).__name__ != "MmBackward0" or len(product.next_functions) != 2:
        return False
    second = product.next_functions[1][0]
    return second is None or type(second).__name__ in _TRANSPOSES | {"AccumulateGrad"}


def _input_sizes(node: Any) -> tuple[int, ...] | None:
    """The sizes of a node's (first) input, where the node saved them or the input."""
    sizes = getattr(node, "_saved_self_sym_sizes", None)
    if sizes:
        return tuple(sizes)
    saved = getattr(node, "_saved_self", None)
    if saved is None:
        saved = getattr(node, "_saved_result", None)  # (a softmax keeps its input's shape)
    return tuple(saved.shape) if isinstance(saved, Tensor) else None


def _rows_met(node: Any, ndim: int, n: int, budget: int = 16) -> list[Any]:
    """The nodes whose rows met, row by row, in ``node``'s tensor (``ndim`` dimensions, ``n``
    leading rows): its history walked back through views that keep the leading size,
    elementwise functions (every input of one of several tensors, and of ``torch.where``),
    a cat or stack, a slice or select, a sum or mean along later dimensions; parameters and
    constants left out; at most ``budget`` nodes."""
    found: list[Any] = []
    stack = [(node, ndim)]
    while stack and budget > 0:
        budget -= 1
        node, ndim = stack.pop()
        kind = type(node).__name__
        if kind == "AccumulateGrad":
            continue
        edges = [f for f, _ in node.next_functions if f is not None]
        sizes = getattr(node, "_saved_self_sym_sizes", None)
        if kind in _VIEW_NODES:
            if sizes and sizes[0] == n:
                stack.extend((f, len(sizes)) for f in edges)
                continue
        elif kind in _ROW_PRESERVING or kind in _MEETS_ROWS:
            stack.extend((f, ndim) for f in edges)
            continue
        elif kind in ("CatBackward0", "StackBackward0"):
            if _dim_of(node._saved_dim, ndim) != 0:
                stack.extend((f, ndim - (kind == "StackBackward0")) for f in edges)
                continue
        elif kind == "PermuteBackward0":
            if _dim_of(node._saved_dims[0], ndim) == 0:  # (an einsum's permutes: rows first)
                stack.extend((f, ndim) for f in edges)
                continue
        elif kind.startswith("DiagonalBackward0") and _diagonal_of_rows(node, n):
            # ((u @ w.T).diagonal(): row i of u met with row i of w — a review of 2026-12-06
            # found a pick behind it missed)
            product = node.next_functions[0][0]
            first, second = (f for f, _ in product.next_functions)
            stack.append((first, 2))
            if second is not None and type(second).__name__ in _TRANSPOSES:
                stack.extend((f, 2) for f, _ in second.next_functions if f is not None)
            continue
        elif kind == "UnsqueezeBackward0":
            if _dim_of(node._saved_dim, ndim) != 0:
                stack.extend((f, ndim - 1) for f in edges)
                continue
        elif kind in _REDUCED or kind in ("SliceBackward0", "SelectBackward0", "SqueezeBackward1"):
            sizes = sizes or _input_sizes(node)
            saved = node._saved_dim
            dims = (
                tuple(saved)
                if isinstance(saved, tuple | list)
                else ()
                if saved is None
                else (saved,)
            )
            if sizes and dims and all(_dim_of(d, len(sizes)) != 0 for d in dims):
                stack.extend((f, len(sizes)) for f in edges)
                continue
        if not any(node is f for f in found):
            found.append(node)
    return found


def _dedup_hint(node: Any) -> str:
    """For a pick ``node`` of an embedding's lookup (``emb(uniq)[inv]``): the deduplicated ids
    named, and the fix — until 2026-12-06 such a step, U = N unique ids, was refused saying only
    that the batch was sorted or its examples mixed (a hunt); else ""."""
    source = node.next_functions[0][0] if node.next_functions else None
    if type(source).__name__ not in ("EmbeddingBackward0", "EmbeddingBagBackward0"):
        return ""
    return (
        "; of an embedding's rows looked up for ids deduplicated first — uniq, inv = "
        "ids.unique(return_inverse=True), emb(uniq)[inv]: with as many unique ids as "
        "examples the lookup's rows are taken for the examples, not the ids'. Look the rows up "
        "per example, emb(ids)"
    )


def _mixed_pick(
    x: Tensor | None, n: int, unread: list[tuple[str, Tensor]] | None, alone: bool = False
) -> str | None:
    """Rows of ``x`` ([n, …]) picked along the examples' own dimension by an index that is
    not them in order, met row by row with other rows of the batch (:func:`_rows_met`):
    ``u - v[idx]``, ``top(u + v[idx])``, ``cat([u, v[idx]], 1)``, ``torch.where(c, v,
    v[idx])``, a mixup ``h·λ + h[perm]·(1 − λ)`` — each example's result then reads another
    example's row, and the examples are coupled. ``alone``: a pick met with no other rows
    too, where its index repeats an example (a model's output ``v[idx].sum(1)``; a reordering
    alone is left to the audit). :func:`_selected_rows` followed one side of such an
    operation (the other where the first held no rows of the batch): until 2026-12-06 the
    pick was left to the audit, which proved it for its own step's data only — steps whose
    index happened not to be the examples in order were measured 2–71% off without a word
    (a hunt). A pick along another dimension or over a tensor of another size is
    :func:`_selected_rows`'s; pad_packed_sequence's own reordering is left to the audit. On
    an accelerator the comparison is appended to ``unread``; otherwise the pick is returned,
    spelled, None where there is none."""
    if x is None or x.grad_fn is None or x.dim() == 0 or torch.compiler.is_compiling():
        return None
    met = _rows_met(x.grad_fn, x.dim(), n)
    if len(met) < 2 and not alone:
        return None
    for node in met:
        kind = type(node).__name__
        if kind == "IndexBackward0":
            sizes, indices = node._saved_self_sym_sizes, node._saved_indices
            index = indices[0] if len(indices) == 1 else None
            if index is None or index.dtype == torch.bool or index.dim() != 1:
                continue
            index, spelled = torch.where(index < 0, index + n, index), "h[idx]"
        elif kind in ("IndexSelectBackward0", "GatherBackward0"):
            sizes, index = _source_sizes(node), node._saved_index
            if not sizes or _dim_of(node._saved_dim, len(sizes)) != 0 or index.dim() == 0:
                continue
            if kind.startswith("IndexSelect") and _unpacking(node):
                continue
            spelled = "index_select" if kind.startswith("IndexSelect") else "gather"
        else:
            continue
        if not sizes or sizes[0] != n or index.shape[0] != n:
            continue
        how = f"rows picked along the examples by an index that is not them in order ({spelled}"
        how += f"{_dedup_hint(node)})"
        how += (
            ", met row by row with other rows of the batch"
            if len(met) > 1
            else ", some example's row taken twice"
        )
        found: list[tuple[str, Tensor]] = []  # (this pick's device flag, spelled as how)
        reason = _along_examples(index, n, found, spelled, reorders=len(met) > 1)
        restored = _restores(node, index, n) if index.dim() == 1 else None
        if reason is not None:
            if restored is not None and bool(restored):
                continue  # (a reordering put back: each row its own example's again)
            if reason.startswith("an index that reorders"):
                # (the cause named, not only the mixing: a review of 2026-12-06)
                how += f" — {reason}"
            return how
        if unread is not None:
            unread += [
                (how, flag if restored is None else flag & restored.logical_not())
                for _, flag in found
            ]
    return None


# functions of one tensor along later dimensions, through which a pick's rows keep their order
_ALONG_LATER_ONE = frozenset({"CumsumBackward0", "CumprodBackward0", "LogcumsumexpBackward0"})


def _restores(node: Any, index: Tensor, n: int) -> Tensor | None:
    """For a pick ``node`` of the ``n`` examples' rows by a 1-D ``index``: whether it puts back
    a reordering made beneath it, through functions of that one tensor that keep its rows
    (elementwise, reductions and cumulative functions along later dimensions) — a pick by p
    with p[index] = arange(n), ``h[order].cumsum(1)[order.argsort()]``: a boolean tensor (on
    the index's device), or None where there is no such pick beneath. Until a review of
    2026-12-06 such a put-back, met with other rows, was refused as mixing the examples."""
    source = node.next_functions[0][0] if node.next_functions else None
    ndim = len(_source_sizes(node) or ())  # (the picked tensor's, as the pick saw it)
    for _ in range(8):
        if source is None:
            return None
        kind = type(source).__name__
        if kind == "IndexBackward0":
            indices = source._saved_indices
            p = indices[0] if len(indices) == 1 else None
            if p is None or p.dtype == torch.bool or p.dim() != 1 or p.shape[0] != n:
                return None
            sizes = source._saved_self_sym_sizes
            if not sizes or sizes[0] != n:
                return None
            p = torch.where(p < 0, p + n, p)
            return (p[index] == torch.arange(n, device=p.device)).all()
        edges = [f for f, _ in source.next_functions if f is not None]
        edges = [f for f in edges if type(f).__name__ != "AccumulateGrad"]
        if len(edges) != 1:
            return None  # (another tensor's rows, in the examples' order, met these)
        dim = getattr(source, "_saved_dim", None)
        if kind in _REDUCED or kind in _ALONG_LATER_ONE:
            sizes = _input_sizes(source)
            ndim = len(sizes) if sizes else ndim  # (a cumulative function keeps the shape)
            dims = tuple(dim) if isinstance(dim, tuple | list) else () if dim is None else (dim,)
            if not ndim or not dims or any(_dim_of(d, ndim) == 0 for d in dims):
                return None
        elif kind not in _ROW_PRESERVING and kind not in _MEETS_ROWS:
            return None
        source = edges[0]
    return None


# what every reason :func:`_moved_at` gives says (the refusals tell a move from a pick by it)
_MOVED = "which moves"

# row-copying operations whose window a slice along dim 0 may take out of order
_WINDOWED = frozenset(
    {"RepeatBackward0", "CatBackward0", "ConstantPadNdBackward0", "RollBackward0", "FlipBackward0"}
)


def _moved_at(node: Any, n: int, unread: list[tuple[str, Tensor]] | None) -> str | None:
    """:func:`_picked_rows`'s other reading at one origin: rows moved along the examples'
    dimension by an operation whose arguments change while its kind does not — a roll or a
    flip along dim 0 (or along a dimension a view split from it), a window along dim 0 out of
    a repeat, cat, padding, roll or flip that does not start at its row 0, a padding before
    row 0, an index along a dimension a view split from dim 0 (``h.view(N // 2, 2, D)[:,
    order]``) that is not arange —, named. The structure count that decides an audit sees
    the same nodes whatever the shift, dims, start or order: with the identity on the audited
    steps and a move after, the rows went to the wrong examples on unaudited steps until
    2026-12-06 (3–14.5% off, sub-batch norms up to 60%, a hunt). The identity (shift 0, a
    window from row 0, an index in order) is not a move. On an accelerator an index's
    comparison stays on the device (``unread``)."""
    for _ in range(8):
        kind = type(node).__name__
        if kind in ("RollBackward0", "FlipBackward0"):
            shape = tuple(node._input_metadata[0].shape)
            dims = [_dim_of(d, len(shape)) for d in node._saved_dims]
            if kind == "FlipBackward0":
                moved = any(shape[d] > 1 and _split_from_rows(node, shape, d, n) for d in dims)
                how = f"torch.flip along dims {dims} of a {list(shape)} tensor"
            else:
                shifts = list(node._saved_shifts)
                moved = (
                    any(
                        s % shape[d] != 0 and _split_from_rows(node, shape, d, n)
                        for s, d in zip(shifts, dims, strict=False)
                    )
                    if dims
                    else shifts[0] % max(1, math.prod(shape)) != 0  # (flattened, rolled)
                )
                how = f"torch.roll by {shifts} along dims {dims} of a {list(shape)} tensor"
            return f"{how}, which moves rows to other examples" if moved else None
        if kind == "ConstantPadNdBackward0":
            pad, ndim = list(node._saved_pad), len(node._input_metadata[0].shape)
            front = pad[2 * ndim - 2] if len(pad) >= 2 * ndim else 0
            if front:
                return f"F.pad by {front} rows before the examples', which moves them"
            return None
        if kind == "SliceBackward0":
            sizes = tuple(node._saved_self_sym_sizes)
            if _dim_of(node._saved_dim, len(sizes)) != 0:
                return None
            source = node.next_functions[0][0] if node.next_functions else None
            source = None if source is None else _origin_of(source) or source
            if source is None or type(source).__name__ not in _WINDOWED:
                return None  # (rows of a layer's output: a batch of two views, z[N:])
            start = min(sizes[0], _dim_of(node._saved_start or 0, sizes[0]))
            part = _window_part(source, start, node, sizes[0]) if start else None
            if part is not None:
                node = part  # (a window that is one part of a cat or one copy of a repeat,
                continue  # whole: cat([z1, z2])[N:] — refused as a move until a review)
            if start != 0 or node._saved_step != 1:
                made = type(source).__name__.removesuffix("Backward0")
                return (
                    f"a slice along the examples' dimension from row {start} (step "
                    f"{node._saved_step}) of the {sizes[0]} rows of a {made}, which moves "
                    "rows to other examples"
                )
            node = source  # (a window from row 0: the rows beneath it, read on)
            continue
        if kind == "IndexBackward0" and node._saved_indices:
            sizes = tuple(node._saved_self_sym_sizes)
            at = [d for d, i in enumerate(node._saved_indices) if i is not None]
            if not at or at[0] == 0 or not _split_from_rows(node, sizes, at[0], n):
                return None
            index = node._saved_indices[at[0]]
            how = (
                f"an index along dim {at[0]} of {list(sizes)}, a view that split the examples' "
                "dimension, which moves rows between examples unless it is arange"
            )
            if len(at) > 1 or index.dtype == torch.bool or index.shape != (sizes[at[0]],):
                return how
            in_order = (index == torch.arange(sizes[at[0]], device=index.device)).all()
            if not _host_reads_indices(index):
                if unread is not None:
                    unread.append((how, in_order.logical_not()))
                return None
            return None if bool(in_order) else how
        return None
    return None


def _window_part(source: Any, start: int, node: Any, rows: int) -> Any:
    """For a slice ``node`` along dim 0 from row ``start`` of a ``rows``-row cat or repeat
    along dim 0 (``source``): the node of the part it takes whole — a cat's input, a repeat's
    tensor (one copy of it) — where it takes exactly one, in order; else None."""
    if node._saved_step != 1:
        return None
    end = min(rows, _dim_of(node._saved_end, rows)) if node._saved_end is not None else rows
    kind = type(source).__name__
    if kind == "CatBackward0" and _dim_of(source._saved_dim, 1) == 0:
        at = 0
        for f, nr in source.next_functions:
            meta = getattr(f, "_input_metadata", None) if f is not None else None
            if not meta or len(meta) <= nr or not meta[nr].shape:
                return None
            size = meta[nr].shape[0]
            if at == start and at + size == end:
                return f
            at += size
        return None
    if kind == "RepeatBackward0":
        repeats, sizes = tuple(source._saved_repeats), tuple(source._saved_self_sym_sizes)
        lead = len(repeats) - len(sizes)  # (repeat may add leading dimensions)
        if lead != 0 or not sizes or repeats[0] < 2:
            return None
        m = sizes[0]
        if start % m == 0 and end - start == m:
            nxt = source.next_functions
            return nxt[0][0] if nxt and nxt[0][0] is not None else None
    return None


def _subset_rows(x: Tensor | None, n: int, label: str) -> str | None:
    """How the rows of ``x``, fewer or more than the ``n`` examples, were picked along dim 0 by
    an index or a mask (``h[idx]``, ``index_select``) from the examples' rows or from the
    examples flattened with another dimension ([N·T, …]): named for the refusal of a layer
    run on them (early exit on a subset of the examples written back by ``index_copy``; a
    mixture of depths over the batch's tokens added back before the view). Until 2026-12-06
    those were refused blaming parameters used directly (a hunt). None otherwise."""
    node = _row_origin(x)
    kind = type(node).__name__
    if kind == "IndexBackward0":
        first = node._saved_indices[0] if node._saved_indices else None
        rows = tuple(node._saved_self_sym_sizes)[:1]
        how = "a boolean mask" if first is not None and first.dtype == torch.bool else "an index"
    elif kind == "IndexSelectBackward0" and _dim_of(node._saved_dim, len(_source_sizes(node))) == 0:
        first, rows, how = node._saved_index, tuple(_source_sizes(node))[:1], "index_select"
    else:
        return None
    if first is None or not rows or x is None or rows[0] % n != 0:
        return None
    k = x.shape[0]
    if rows[0] == n:
        return (
            f"the {k} input rows of layer '{label}' were picked by {how} from the batch's {n} "
            "examples: a "
            "subset of them (early exit, stochastic depth), which noisescale follows only where "
            "its rows go back among the batch's by a cat in order, "
            "torch.cat([o, o_rest])[torch.cat([idx, rest]).argsort()] — not written into it "
            "by index_copy, index_put (out[keep] = o), index_add or masked_scatter"
        )
    return (
        f"the {k} input rows of layer '{label}' were picked by {how} from the {rows[0]} rows of "
        f"the batch's {n} examples flattened with another dimension (tokens routed with a "
        "capacity over the batch, a mixture of depths), which noisescale follows only where "
        "they meet the examples along dim 0: add the routed tokens' output to the batch after "
        "viewing it back, h + out.view_as(h), not to the flattened rows before the view"
    )


def _split_from_rows(node: Any, shape: tuple, dim: int, n: int) -> bool:
    """Whether dim ``dim`` of the tensor ``node`` read (``shape``) holds rows of the examples:
    dim 0, or a later one that a view beneath it split from the ``n`` examples' dim 0 ([N, D]
    viewed as [N // 2, 2, D]: its dims 0 and 1; not [N·T, D] viewed as [N, T, D], whose dim 1
    is each example's tokens)."""
    if dim == 0:
        return True
    source = node.next_functions[0][0] if node.next_functions else None
    while source is not None and type(source).__name__ in _ROW_PRESERVING - _VIEW_NODES:
        source = source.next_functions[0][0] if source.next_functions else None
    if source is None or type(source).__name__ not in _VIEW_NODES:
        return False
    before = getattr(source, "_saved_self_sym_sizes", ())
    rows = math.prod(shape[: dim + 1])
    return bool(before) and before[0] == n and shape[0] < n and n % rows == 0


def _picked_at(node: Any, n: int, unread: list[tuple[str, Tensor]] | None) -> str | None:
    """:func:`_picked_rows` at one origin."""
    kind = type(node).__name__
    if kind == "IndexBackward0":
        sizes = tuple(node._saved_self_sym_sizes)
        indices = [t for t in node._saved_indices if t is not None]
        if not indices or not sizes:
            return None
        masks = [t for t in indices if t.dtype == torch.bool]
        if masks:
            one_dim0 = len(indices) == 1 and node._saved_indices[0] is not None
            if one_dim0 and masks[0].dim() == 1 and sizes[0] == n:
                return None  # the examples kept, in order (all of them, when n are)
            how = f"a boolean mask over a {list(sizes)} tensor"
            mask = masks[0]
            if one_dim0 and mask.dim() >= 2 and sizes[0] == n and mask.shape[0] == n:
                # one row picked in each example — a reward head on the last token's state,
                # h[eos_mask] —: the picks run example by example, so the rows are the
                # examples in order (refused as rows the data orders until 2026-12-06, naming a
                # head computed from its own weights alone, a hunt)
                each = mask.reshape(n, -1).sum(1) == 1
                if not _host_reads_indices(mask):
                    if unread is not None:
                        unread.append(
                            (f"{how}, not one row in each example", each.all().logical_not())
                        )
                    return None
                if bool(each.all()):
                    return None
            return how
        if len(indices) == 1:
            index = node._saved_indices[0]
            if index is not None and index.dim() > 0 and index.shape[0] != n:
                return _in_blocks(node, index, sizes, n, unread, "h.reshape(N*T, D)[idx]")
            if index is None or index.dim() == 0:
                # (along another dimension)
                return None
            if sizes[0] != n:
                if index.dim() > 1 and _block_rows(node, index.reshape(-1), sizes, n):
                    # (DynamicViT's keep with its [N, k] index unflattened,
                    # x.reshape(B*T, C)[idx + offset]: the same blocks, checked alike — refused
                    # as a pick until a review of 2026-12-06)
                    return _in_blocks(node, index.reshape(-1), sizes, n, unread, "flat[idx]")
                return f"an index over the {sizes[0]} rows of a {list(sizes)} tensor"
            # along the examples' own dimension: the examples only in order, h[arange(N)] —
            # h[idx] with idx from the data ([0, 0, 1, 2]: a detection head's boxes by image)
            # took row r for example r on unaudited steps until 2026-12-06, 40% off (a hunt)
            spelled = "h[idx]" + _dedup_hint(node)
            return _along_examples(torch.where(index < 0, index + n, index), n, unread, spelled)
        # several index tensors: one along a dimension of the batch's size that is the
        # examples in order (arange) says the rows are the examples — also broadcast along
        # the others' dimensions, x[arange(N)[:, None], idx] (per-example token pruning: its
        # rows were refused as picked by the data until 2026-12-06, a hunt), its dim 0 the
        # result's (not arange(N) broadcast along a dimension after another index's)
        how = f"index tensors over a {list(sizes)} tensor, none of them the examples in order"
        full = list(node._saved_indices) + [None] * (len(sizes) - len(node._saved_indices))
        ndim = len(torch.broadcast_shapes(*(index.shape for index in indices)))
        # (an index broadcast along the others' dimensions counts only on dim 0 where dim 0
        # has the batch's size: at T = N, h[b[:, None], arange(N)[:, None]] has a time index in
        # order and rows of the data's examples, taken for the examples' on unaudited steps
        # until a review of 2026-12-06; a 1-D index along dim 1 still does — a time-major
        # RNN's last step, out[lengths - 1, arange(N)], at T = N as at any T — so h[b, t] at
        # T = N with t = arange(N) stays taken for the examples: a limit in the docs)
        along = [
            index.reshape(n)
            for dim, index in enumerate(full)
            if index is not None
            and sizes[dim] == n
            and (dim == 0 or sizes[0] != n or index.dim() == 1)
            and index.dim() == ndim
            and index.shape[0] == n
            and index.numel() == n
        ]
        if not along:
            return how
        if not _host_reads_indices(along[0]):
            if unread is not None:
                device = along[0].device
                in_order = torch.stack(
                    [
                        (index == torch.arange(n, device=index.device)).all().to(device)
                        for index in along
                    ]
                ).any()
                unread.append((how, in_order.logical_not()))
            return None
        if any(bool((index == torch.arange(n, device=index.device)).all()) for index in along):
            return None
        return how
    if kind in ("IndexSelectBackward0", "GatherBackward0"):
        # the result's dim 0 runs along the index's: picked rows when it has the batch's size
        # and the source's dim 0 another (a gather along dim 0 whose result has one row, a
        # time-major RNN's last step, keeps the examples of dim 1 in order)
        sizes = _source_sizes(node)
        if _dim_of(node._saved_dim, len(sizes)) != 0:
            return None
        index = node._saved_index
        if not sizes or index.dim() == 0:
            return None
        spelled = "index_select" if kind.startswith("IndexSelect") else "gather"
        if index.shape[0] != n:
            return _in_blocks(node, index, tuple(sizes), n, unread, spelled)
        if sizes[0] == n:
            # (along the examples' own dimension, as h[idx] above: index_select, gather,
            # take_along_dim — a review of 2026-12-06 found them 78% off on unaudited steps —
            # but pad_packed_sequence's reordering is left to the audit: it puts a batch packed
            # with enforce_sorted=False back in its order by index_select of the padded
            # output, and the rows are the examples again; any other index_select that
            # reorders the examples is read as h[order] is — a batch sorted inside the forward
            # was measured on unaudited steps until 2026-12-06, tr Σ 53% off, a hunt)
            unpacked = kind.startswith("IndexSelect") and _unpacking(node)
            return _along_examples(index, n, unread, spelled, reorders=not unpacked)
        return f"an index over the {sizes[0]} rows of a {list(sizes)} tensor"
    if kind in ("MaskedSelectBackward0", "TakeBackward0"):
        return "a masked_select or take, whose result is flat"
    return None


def _in_blocks(
    node: Any,
    index: Tensor,
    sizes: tuple,
    n: int,
    unread: list[tuple[str, Tensor]] | None,
    spelled: str,
) -> str | None:
    """Rows picked along dim 0 by ``index`` (``node``'s, of another length than ``n``) from
    a tensor of ``sizes``, which a view then shows with the batch's ``n`` leading rows. Where
    that tensor is the examples flattened with their positions, [N·T, …] (its history shows
    it: :func:`_example_major`), N·k picked rows viewed back to [N, k, …] are the examples'
    only when each block of k holds rows of its own example — ``idx // T`` is b in block b,
    as DynamicViT's ``x.reshape(B*N, C)[idx + offset]`` keeps them —, read on every step as
    :func:`_along_examples` reads an index: until 2026-12-06 the rows were taken for the
    examples' on every step, and a step whose picks crossed examples (a batch-level token
    budget) was measured, tr Σ 6–7% and |G|² 12–21% off without a word (a hunt). Otherwise
    ``None``: along another dimension, or rows that a view takes from another dimension,
    aligned with the source's (a table's rows looked up by the examples' indices)."""
    rows = _block_rows(node, index, sizes, n, unread)
    if not rows:
        return None
    picked = int(index.shape[0])
    how = (
        f"an index into the examples flattened with their positions ({spelled}, {picked} of "
        f"{rows} rows, viewed back as the examples' {picked // n} each) that gives an example "
        "rows of another"
    )
    index = torch.where(index < 0, index + rows, index)
    owner = torch.arange(n, device=index.device).view(n, 1)
    own = (index.reshape(n, -1) // (rows // n) == owner).all()
    if not _host_reads_indices(index):
        if unread is not None:
            unread.append((how, own.logical_not()))
        return None
    return None if bool(own) else how


def _block_rows(
    node: Any,
    index: Tensor,
    sizes: Sequence,
    n: int,
    unread: list[tuple[str, Tensor]] | None = None,
) -> int:
    """The N·T rows of the examples flattened with their positions that ``node`` picks N·k
    of along dim 0 by ``index`` (:func:`_in_blocks`), when its history shows them so; 0
    otherwise."""
    rows = int(sizes[0]) if sizes else 0
    picked = int(index.shape[0]) if index.dim() > 0 else 0
    if rows <= n or rows % n or picked <= n or picked % n:
        return 0
    source = node.next_functions[0][0] if node.next_functions else None
    if type(source).__name__ == "ExpandBackward0" and tuple(source._saved_self_sym_sizes[:1]) == (
        rows,
    ):
        source = source.next_functions[0][0]  # (take_along_dim broadcasts its source)
    if (
        source is None
        or _parameters_only(source)  # (a table's rows, looked up by the examples' indices)
        or not _example_major_from(source, n, rows, unread)
    ):
        return 0
    return rows


# autograd nodes that put together rows along dim 0 from pieces or by an index: which example
# each row of the result holds can change with the data while the operations stay the same
_ASSEMBLING = frozenset(
    {"StackBackward0", "CatBackward0", "IndexAddBackward0", "IndexCopyBackward0",
     "ScatterAddBackward0", "ScatterBackward0", "ScatterBackward1", "ScatterReduceBackward0",
     "IndexPutBackward0"}
)  # fmt: skip
# (not masked_scatter: LLaVA and Qwen2-VL scatter image features into the token embeddings
# with it, whose rows stay the examples; their items are checked on their own, and a pass
# audited every step there cost a re-run each step, a review of 2026-12-06)


_ASSEMBLING_NAMES = {
    "StackBackward0": "torch.stack", "CatBackward0": "torch.cat", "IndexAddBackward0": "index_add",
    "IndexCopyBackward0": "index_copy", "ScatterAddBackward0": "scatter_add",
    "ScatterReduceBackward0": "scatter_reduce", "IndexPutBackward0": "index_put",
    "ScatterBackward0": "scatter", "ScatterBackward1": "scatter",
}  # fmt: skip


def _unpacking(node: Any) -> bool:
    """Whether an ``index_select`` node is ``pad_packed_sequence``'s own, batch-first: it
    reorders the padded output — a transpose of the rows copied into place (``CopySlices``)
    — back to the order the batch had before ``pack_padded_sequence(enforce_sorted=False)``."""
    source = node.next_functions[0][0] if node.next_functions else None
    if source is None or type(source).__name__ != "TransposeBackward0":
        return False  # (a padding written by hand, out[:, :T] = h, then reordered: a review)
    source = source.next_functions[0][0]
    return source is not None and type(source).__name__ == "CopySlices"


def _routed_by_index(x: Tensor | None, n: int) -> bool:
    """Whether ``x``'s rows were taken along the examples by an index (``h[idx]``,
    ``index_select``, ``gather``), in order or not, or N·k of them from the examples
    flattened with their positions and viewed back (:func:`_in_blocks`), through views and
    elementwise functions: an eager step reads the index (:func:`_selected_rows`), a compiled
    one cannot, so such a model's compiled steps run eagerly (``ExampleCheck._audit_wanted``;
    a review of 2026-12-06 found them 78% off under torch.compile)."""
    node = _row_origin(x)
    if node is None:
        return False
    kind = type(node).__name__
    if kind == "IndexBackward0":
        # (one index tensor: h[arange(N), t], a classifier's last token, has the examples in
        # order by construction and its compiled steps stay compiled)
        sizes = tuple(node._saved_self_sym_sizes)
        indices = [t for t in node._saved_indices if t is not None]
        first = node._saved_indices[0] if node._saved_indices else None
        return (
            len(indices) == 1
            and first is not None
            and first.dtype != torch.bool
            and bool(sizes)
            and first.dim() > 0
            and (
                (sizes[0] == n and first.shape[0] == n)
                or (first.shape[0] != n and _block_rows(node, first, sizes, n) > 0)
                or (first.dim() > 1 and _block_rows(node, first.reshape(-1), sizes, n) > 0)
            )
        )
    if kind in ("IndexSelectBackward0", "GatherBackward0"):
        sizes = _source_sizes(node)
        index = node._saved_index
        return (
            _dim_of(node._saved_dim, len(sizes)) == 0
            and bool(sizes)
            and index.dim() > 0
            and (
                (sizes[0] == n and index.shape[0] == n)
                or (index.shape[0] != n and _block_rows(node, index, sizes, n) > 0)
            )
        )
    return False


def _assembled_rows(x: Tensor | None) -> str | None:
    """How ``x``'s rows were put together along dim 0, when its autograd history shows it
    (through views, elementwise functions and slices of dim 0): ``torch.stack`` or
    ``torch.cat`` of pieces (crops of the batch's feature maps by image index, a detection
    head's regions), ``index_add``/``scatter``/``index_put`` by an index (instance pooling).
    Which example each row holds then depends on the data: an audit proves it for its own
    step's data only, so such a pass is audited every step
    (:meth:`ExampleCheck._audit_wanted`) — until 2026-12-06 such rows, the batch's size by
    coincidence, were split as the examples on unaudited steps, 14–30% off without a word (a
    hunt). ``None`` otherwise. (Not a one-hot pooling product, ``one_hot(ids).T @ pixels``:
    its node is a layer's written by hand, ``x @ W``.)"""
    if x is None or x.grad_fn is None or torch.compiler.is_compiling():
        return None
    node, shape = x.grad_fn, tuple(x.shape)
    for _ in range(8):
        kind = type(node).__name__
        if kind not in _ROW_PRESERVING and not (
            kind == "SliceBackward0" and _dim_of(node._saved_dim, len(shape)) == 0
        ):
            source = _in_order(node)
            if source is None:
                break
            node = source  # (a cat of its slices in order: the tensor itself, looked through)
            continue
        if kind in _VIEW_NODES:
            # (the shape before it: a view of the N·T token rows as [N, T, D] puts together
            # no example's row, an index_add over the tokens is not one over the examples; a
            # slice keeps rows of what it slices: zeros(K + 1, C).index_add(...)[:K])
            shape = tuple(node._saved_self_sym_sizes)
        nxt = node.next_functions
        if not nxt or nxt[0][0] is None:
            return None
        node = nxt[0][0]
    kind = type(node).__name__
    if not shape or (shape[0] != x.shape[0] and kind not in ("StackBackward0", "CatBackward0")):
        # (rows of the N·T tokens viewed back to [N, T, …]: an expert's index_add puts each
        # token back in its place; a cat or stack of blocks may move whole examples)
        return None
    if kind in _ASSEMBLING:
        if kind == "IndexPutBackward0":
            # (integer rows along dim 0; not a boolean mask over the examples' positions,
            # h[~mask] = 0 or inputs_embeds[image_mask] = features)
            first = node._saved_indices[0] if node._saved_indices else None
            if first is None or first.dtype == torch.bool:
                return None
            return "index_put"
        if _dim_of(getattr(node, "_saved_dim", 0), len(shape)) == 0:
            return _ASSEMBLING_NAMES.get(kind, "an index")
        return None
    if kind in ("WhereBackward0", "MaskedScatterBackward0"):
        # rows chosen by a mask between the rows in place and rows moved along dim 0
        # (torch.where(keep, h, h.roll(1, 0)), h.masked_scatter(mask, h[idx][mask])): which
        # example a row holds changes with the mask — until 2026-12-06 measured as the
        # examples on unaudited steps, 78% off (a review). Not a mask between rows in place
        # (torch.where(mask, h, 0), LLaVA's image features scattered into their tokens — a
        # source whose rows are no example's, a cat of each image's, read flat: only a
        # source picked by a mask from moved rows is taken for them)
        for at, (edge, _) in enumerate(node.next_functions):
            origin = None if edge is None else _origin_of(edge) or edge
            if origin is None or (
                at == 1 and kind == "MaskedScatterBackward0" and not _masked(origin)
            ):
                continue
            if _moves_rows(origin, shape):
                return "torch.where" if kind == "WhereBackward0" else "masked_scatter"
    return None


def _rows_moved(node: Any, shape: tuple) -> bool:
    """Whether rows of ``node``'s tensor ([N, …], ``shape``) were moved along dim 0 by a
    roll, a flip, a cat or stack of pieces out of order, an index write, or chosen by
    ``torch.where``/``masked_scatter`` between rows in place and moved ones — beneath a
    flattening, where a layer on the flattened rows takes each example's rows in turn (a
    review of 2026-12-06 found them measured as the examples', 0.4% off on unaudited
    steps)."""
    for origin in _origins(node):
        kind = type(origin).__name__
        if kind in ("CatBackward0", "StackBackward0"):
            if _dim_of(origin._saved_dim, len(shape)) == 0:
                return True
            continue
        if kind in ("IndexBackward0", "IndexSelectBackward0", "GatherBackward0"):
            continue  # (picks: read by their index, _picked_rows)
        if _moves_rows(origin, shape):
            return True
        if kind in ("WhereBackward0", "MaskedScatterBackward0") and any(
            edge is not None and _moves_rows(_origin_of(edge) or edge, shape)
            for edge, _ in origin.next_functions
        ):
            return True
    return False


def _masked(node: Any) -> bool:
    """Whether autograd ``node`` is a pick by a boolean mask along dim 0 (``h[mask]``)."""
    if type(node).__name__ != "IndexBackward0" or not node._saved_indices:
        return False
    first = node._saved_indices[0]
    return first is not None and first.dtype == torch.bool


def _moves_rows(node: Any, shape: tuple) -> bool:
    """Whether autograd ``node`` made its tensor's rows from other rows of a tensor with
    ``shape[0]`` rows along dim 0: a roll or flip along it, an index, ``index_select`` or
    ``gather`` along it, an index write (``index_add``, ``scatter``, ``index_put``); looked
    through a boolean mask's flat pick (a ``masked_scatter``'s source). (Not a cat or stack of
    pieces, which LLaVA's image features are; not ``F.embedding`` on a computed table, nor an
    index into a table of another size: a class table's rows.)"""
    kind, ndim = type(node).__name__, len(shape)
    if kind == "IndexBackward0":
        first = node._saved_indices[0] if node._saved_indices else None
        if first is not None and first.dtype == torch.bool:
            source = node.next_functions[0][0] if node.next_functions else None
            origin = None if source is None else _origin_of(source) or source
            return origin is not None and origin is not node and _moves_rows(origin, shape)
        sizes = tuple(node._saved_self_sym_sizes)
        return first is not None and bool(sizes) and sizes[0] == shape[0]
    if kind in ("RollBackward0", "FlipBackward0"):
        dims = [_dim_of(d, ndim) for d in node._saved_dims]
        return not dims or 0 in dims
    if kind in ("IndexSelectBackward0", "GatherBackward0"):
        sizes = _source_sizes(node)
        return _dim_of(node._saved_dim, len(sizes)) == 0 and bool(sizes) and sizes[0] == shape[0]
    if kind in _ASSEMBLING and kind not in ("CatBackward0", "StackBackward0"):
        return _dim_of(getattr(node, "_saved_dim", 0), ndim) == 0
    return False


def _source_sizes(node: Any) -> Sequence:
    """The sizes of the tensor an ``index_select`` or ``gather`` node read (index_select
    saves them; gather saves the tensor itself)."""
    sizes = getattr(node, "_saved_self_sym_sizes", None)
    return node._saved_self.shape if sizes is None else sizes


def _dim_of(dim: int, ndim: int) -> int:
    """A dimension autograd saved (a negative one as an unsigned 64-bit integer: cat(...,
    dim=-2) reads 2**64 - 2), counted from 0 in a tensor of ``ndim`` dimensions."""
    if dim >= 2**63:
        dim -= 2**64
    return dim + ndim if dim < 0 else dim


def _in_order(node: Any) -> Any:
    """The node of the tensor a ``torch.cat`` along dim 0 of its slices in order from its
    first row (``torch.cat([f[:2], f[2:]])``: the tensor itself), or a ``torch.stack`` of its
    rows ``f[0], f[1], …``, rebuilds — no row changes example (a review, 2026-12-06), and the
    walks look through it to how that tensor's rows were made —; None otherwise."""
    kind = type(node).__name__
    if kind not in ("CatBackward0", "StackBackward0"):
        return None
    at, source = 0, None
    for edge, _ in node.next_functions:
        piece = type(edge).__name__ if edge is not None else ""
        if kind == "CatBackward0" and piece == "SliceBackward0":
            rows = edge._saved_self_sym_sizes[0]
            start = min(rows, _dim_of(edge._saved_start or 0, rows))
            end = edge._saved_end
            end = rows if end is None else min(rows, _dim_of(end, rows))
            ok = _dim_of(edge._saved_dim, len(edge._saved_self_sym_sizes)) == 0
            ok = ok and edge._saved_step == 1 and start == at
            at = end
        elif kind == "StackBackward0" and piece == "SelectBackward0":
            ok = edge._saved_dim == 0 and edge._saved_index == at
            at += 1
        else:
            return None
        parent = edge.next_functions[0][0]
        if not ok or parent is None or (source is not None and parent is not source):
            return None
        source = parent
    return source


# the most autograd nodes one walk of :func:`reaches_pass` visits; past it the roots are taken
# to reach the passes (the cautious answer for both callers)
_MAX_WALK = 200_000
_MAX_LOSS_WALK = 4096  # nodes of a loss (loss_side_params)
# autograd Functions that return their tensor inputs as they are, output i for input i:
# DDP's sink over the model's outputs, the identity of a module's full backward hook
_PASS_THROUGH = {"_DDPSinkBackward", "BackwardHookFunctionBackward"}


def _output_keys(passes: Sequence[Any]) -> set[tuple[int, int]]:
    """The (node id, sequence number) keys of ``passes``' outputs (their gradient edges)."""
    return {key for pass_ in passes for key in getattr(pass_, "output_nodes", ())}


# what of an autograd node the loss's shape holds (loss_side_params): its saved attributes that
# say which dimensions it works on and how it reduces — not values (a coefficient, a target)
# nor sizes (another batch, another length) —, by node type
_SHAPE_WORDS = ("dim", "reduction", "shifts", "repeats", "weight", "ignore_index", "transpose")
_SHAPE_ATTRS: dict[str, tuple[str, ...]] = {}
# views whose output's layout (which dimension holds the examples) their attributes do not say
_RESHAPES = {
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
    "ExpandBackward0",
    "AsStridedBackward0",
}


def _hooked_saved(node: Any, attr: str) -> Any:
    """What :func:`_node_shape` holds of a saved tensor (or list of them) packed by a
    saved-tensor hook, read without unpacking it: ``"T"`` (``("?", …)`` for a list), or None
    where none of it is hooked (reading it runs no hook). Unpacking runs the hook: activation
    checkpointing's recomputes the region, and selective checkpointing's allows one — an
    engine's walk of another model's backward (its own forward waiting for its backward, or
    an engine never removed: a Lightning fit a refusal ended) read a LayerNorm's weight in it
    and the user's backward failed, "Trying to backward an extra time" (until 2026-12-07)."""
    raw = getattr(node, "_raw" + attr, None)
    saved = raw if isinstance(raw, list | tuple) else [raw]
    if not any(getattr(s, "unpack_hook", None) is not None for s in saved):
        return None
    if isinstance(raw, list | tuple):  # (a hooked tensor is given: never None)
        return tuple(
            "?" if getattr(s, "unpack_hook", None) is not None or s.unpack() is not None else None
            for s in raw
        )
    return "T"


def _node_shape(node: Any, name: str, sizes: Mapping[int, int]) -> tuple:
    """One node's part of the loss's shape: its name, the structural saved attributes of its
    type (:data:`_SHAPE_WORDS`: ``_saved_dim``, ``_dims``, ``_dim0``/``_dim1``,
    ``_dimension``, ``_keepdim``, ``_shifts``, ``_repeats``, a loss's ``_reduction`` and
    ``_ignore_index``, whether a ``_weight`` is given), and for a reshape its output's
    dimensions marked by the forward whose batch size they have (``sizes``: each size → the
    first pass of that size), each forward at its first such dimension only. Until a review
    of 2026-12-07 only ``_saved_dim`` was held, and a term that moved the examples by
    ``transpose``, ``permute``, ``roll``, ``flip``, ``unfold`` or a reshape from step 9 on — or
    BCE's reduction changed — was measured until the next audit (step 16) without a word."""
    attrs = _SHAPE_ATTRS.get(name)
    if attrs is None:
        attrs = tuple(
            a
            for a in dir(node)
            if a.startswith("_saved_")
            and not a.endswith(("sizes", "strides", "_size", "_stride", "offset"))
            and any(w in a for w in _SHAPE_WORDS)
        )
        _SHAPE_ATTRS[name] = attrs
    # (without the overload's number: the same loss calls another overload under the audit's
    # watch — ctc_loss's tensor lengths, CtcLossBackward1 watched, 0 not —, and each such step
    # after an audit was withheld; its attributes tell the overloads that differ apart)
    parts: list[Any] = [name.rstrip("0123456789")]
    for a in attrs:
        try:
            v = _hooked_saved(node, a)
            if v is None:
                v = getattr(node, a)
        except Exception:  # (a saved tensor freed, an attribute torch cannot give)
            v = "?"
        if isinstance(v, Tensor):
            v = "T"  # (given: class weights, a mask — not their values)
        elif isinstance(v, float):
            continue
        elif isinstance(v, list | tuple):
            v = tuple(x if isinstance(x, int | bool | str | None) else "?" for x in v)
        elif not isinstance(v, int | bool | str | None):
            v = "?"
        parts.append(v)
    if name in _RESHAPES:
        try:
            out = node._input_metadata[0].shape
        except Exception:
            out = None
        if out is not None:
            # (a forward's batch at the first dimension of its size only: a reshape to [n, n]
            # — each example's n values — is one operation whichever dimension the caller
            # meant, and marking both made a shape no audit had seen at that batch size alone:
            # one step withheld with a warning, the statistics fuzzer's seed 75, 2026-12-07.
            # Which forward, not just "a batch": with two forwards of 4 and 3 examples, a
            # reshape of the first's [4, 3] outputs to [3, 4] — across its examples — marked
            # like the audited [4, 3] without it, measured without a word (a review))
            marks: list[Any] = []
            for size in out:
                k = sizes.get(size)
                marks.append("*" if k is None or k in marks else k)
            parts.append(tuple(marks))
    return tuple(parts)


def loss_side_params(
    roots: Sequence[Any], passes: Sequence[Any], params: Mapping[int, Any]
) -> tuple[list[int], bool, int | None]:
    """The parameters among ``params`` (by id) whose gradient a backward from ``roots`` reaches
    from outside ``passes``' forwards: a term of the loss that reads them directly (a weight
    penalty, a regulariser switched on at some step), whose gradient is no example's; and
    whether the walk saw the whole loss. The walk stops at the nodes the forwards made and at
    their outputs — a parameter the forward returned (Kendall's weighting ``s``) is an output —,
    so it covers the loss alone: a few nodes a step, ≈ 1–3 µs each on this project's CPU. It
    gives up past :data:`_MAX_LOSS_WALK` nodes (a loss built in a long Python loop) and says so
    (``False``: the caller withholds the step — until a review of 2026-12-07 a penalty beside
    such a loss went through). Every pass needs its span of sequence numbers (``nodes_at`` to
    ``nodes_end``; a compiled forward's from its compiled function's node):
    ``([], True)`` where one lacks it (a forward still running; left to the audit).

    Third, the loss's shape: a hash of the operations the walk met, in its order — each node's
    name and the dimensions it works on (:func:`_node_shape`), and where it
    stopped (an output of a forward, a node inside one, a leaf) —, or None where the walk did
    not see the whole loss or met a compiled function's node (its operations are not seen: a
    compiled step's loss is left to the audit). The values and sizes are not in it: the same
    loss over another batch has the same shape, and a term added, removed or reduced otherwise
    gives another
    (:meth:`~.settle.Settle._new_loss_shape`)."""
    spans = [(p.nodes_at, p.nodes_end) for p in passes]
    if any(a is None or b is None for a, b in spans):
        return [], True, None
    # a compiled forward opened inside its graph: the compiled function's backward node, which
    # stands for the graph's operations, was made just before the forward ran (not any node
    # made then: a no-grad compiled forward runs no such function)
    heads = {p.nodes_at - 1 for p in passes if getattr(p, "compiled", False)}
    outputs = _output_keys(passes)
    for pass_ in passes:  # (and the layers called in the loss code: measured there)
        outputs |= getattr(pass_, "called_after", set())
    stack = [(r.grad_fn, r.output_nr) for r in roots if isinstance(r, Tensor)]
    seen: dict[tuple[int, int], Any] = {}  # (the nodes held: their ids stay theirs)
    found: list[int] = []
    shape: list[Any] = []
    compiled = False
    sizes: dict[int, int] = {}  # (each batch size → the first pass of that size)
    for k, p in enumerate(passes):
        sizes.setdefault(getattr(p, "batch_size", None), k)
    while stack:
        node, nr = stack.pop()
        if node is None:
            shape.append(None)
            continue
        name = node.name()
        # (a node once, whichever output reached it; a pass-through's outputs each its own)
        key = (id(node), nr if name in _PASS_THROUGH else -1)
        if key in seen:
            shape.append(0)
            continue
        if len(seen) >= _MAX_LOSS_WALK:
            return found, False, None
        seen[key] = node
        seq = node._sequence_nr()
        if (id(node), seq) in outputs:
            shape.append((nr, 1))  # (not its name: eager or compiled, the same output)
            continue
        if seq in heads and name == "CompiledFunctionBackward":
            compiled = True
            continue
        inside = False
        for a, b in spans:
            if a <= seq < b:
                inside = True
                break
        if inside:
            shape.append((nr, 2))
            continue
        variable = getattr(node, "variable", None)
        if variable is not None:
            shape.append((name, id(variable) in params))
            if id(variable) in params and id(variable) not in found:
                found.append(id(variable))
            continue
        shape.append(_node_shape(node, name, sizes))
        edges = node.next_functions
        if name in _PASS_THROUGH and nr < len(edges):
            stack.append(edges[nr])
            continue
        stack.extend(edges)
    return found, True, None if compiled else shape_key(shape)


def shape_key(shape: Sequence[Any]) -> int:
    """A loss's shape (:func:`loss_side_params`) as a signed 64-bit number that is the same in
    every process: the digest of its ``repr`` (names, ints, bools, None and tuples of them).
    Python's ``hash`` of a string is salted per process (``PYTHONHASHSEED``), and the shapes
    the audits passed go through a checkpoint (``GradientNoiseTracker.state_dict``): until
    2026-12-08 they did not, and a run resumed before a spike guard's ``loss * inf`` withheld
    the next ordinary step that the uninterrupted run measured (B_simple 94.96 for 23.75 at
    step 10, resumed after step 3, hunt/spike.py). ≈ 20 µs for a loss of 30 nodes, once a step."""
    digest = hashlib.blake2b(repr(tuple(shape)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def reaches_pass(
    roots: Sequence[Any], passes: Sequence[Any], stops: set[tuple[int, int]] | None = None
) -> bool | None:
    """Whether a backward from ``roots`` reaches a node one of ``passes``' forwards made (an
    output of the model, an activation a hook kept): True; False where it reaches them only
    through one of the edges ``stops`` — (sequence number, output) pairs, the model's own loss
    (noisescale.tokens); None where it does not reach them at all (another graph's backward).
    Output i of an identity over several tensors is followed to its input i only (DDP's sink
    joins the loss with the logits)."""
    outputs = {seq for _, seq in _output_keys(passes)}
    spans = []
    for pass_ in passes:
        first, made = getattr(pass_, "nodes_at", None), getattr(pass_, "nodes", None)
        if first is not None and made is not None:
            spans.append((first, first + made))
    stack = [(r.grad_fn, r.output_nr) for r in roots if isinstance(r, Tensor)]
    seen: set[tuple[int, int, int]] = set()
    stopped = False
    while stack:
        node, nr = stack.pop()
        if node is None:
            continue
        seq = node._sequence_nr()
        if stops and (seq, nr) in stops:
            stopped = True
            continue
        if (id(node), seq, nr) in seen:
            continue
        seen.add((id(node), seq, nr))
        if len(seen) > _MAX_WALK:
            return True
        edges = node.next_functions
        if node.name() in _PASS_THROUGH and nr < len(edges):
            stack.append(edges[nr])
            continue
        if seq in outputs or any(a <= seq < b for a, b in spans):
            return True
        stack.extend(edges)
    return False if stopped else None
