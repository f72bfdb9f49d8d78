"""The hooks on each measured layer in the forward: what a layer call keeps for its rule (its
input, its output's gradient hook), rows flattened over several dimensions, weights used by a
layer's own call or by sub-batch products, recurrent layers' states, and outputs a hook of
someone else's changed on the way. A mixin of :class:`~.engine.PerExampleNorms`: a layer's
forward, read in one place."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad as _fwad
from torch.nn.modules.module import (
    _global_backward_hooks,
    _global_backward_pre_hooks,
    _global_forward_hooks,
    _global_forward_pre_hooks,
)
from torch.nn.utils.rnn import PackedSequence
from torch.utils.hooks import RemovableHandle

from noisescale.errors import UnsupportedModuleError
from noisescale.module_hooks import InertWhenCopied, foreign_thread
from noisescale.per_example import audit as audit_mod
from noisescale.per_example import compiled
from noisescale.per_example import subbatch as subbatch_mod
from noisescale.per_example.factors import Subbatches
from noisescale.per_example.graph import (
    _autocast_enabled,
    _example_major,
    _flat_size,
    _flattened_input,
    _rebasable_base,
    _reshaped_base,
)
from noisescale.per_example.loss_watch import example_dims
from noisescale.per_example.messages import forward_ad_message
from noisescale.per_example.pass_checks import _node_key, _rows_of
from noisescale.per_example.passes import (
    PassNorms,
    _Call,
)
from noisescale.per_example.registry import LayerRule, users_rule
from noisescale.per_example.shared import (
    SharedTensor,
    _has_dual,
    per_example_state,
)
from noisescale.per_example.values import (
    _align,
    _first,
    _first_size,
    _first_tensor,
    _flat_tensors,
    _flat_values,
    _pattern,
    _shape_pattern,
    _tensors,
)


def _after_tensor_hooks(t: Tensor, fn: Callable[[Tensor], None]) -> RemovableHandle:
    """``fn`` on the gradient of ``t`` as its node receives it: after every tensor hook on
    ``t``, whenever registered — a hook the user puts on a layer's output from a forward hook
    that runs after the engine's, or inside the forward (a gradient reversal, a clip), changes
    the gradient autograd propagates, and a tensor hook of the engine's registered before it
    read the gradient unchanged (96% off on unaudited steps; a review found it, 2026-12-05). A
    leaf (no node) keeps a tensor hook."""
    node = t.grad_fn
    if node is None:
        return t.register_hook(fn)
    index = t.output_nr

    def prehook(grads: tuple) -> None:
        if grads[index] is not None:
            fn(grads[index])

    return node.register_prehook(prehook)


# -- a recurrent layer's state [L·D, N, H] with L·D = N ----------------------------------------
#
# :meth:`PerExampleNorms._refuse_square_expansion` searches the state's autograd history for an
# expansion taken as a meeting along dim 0 (PassNorms.square_expansions). Such a meeting gave
# example i the gradient of the expansion's row i; that is right only if row i became the
# state's column i (dim 1, the layer's examples). The search follows, from the state's dim 1,
# the dimension it came from through operations whose correspondence of dimensions is known
# (elementwise ones, views that only add or drop dimensions of size 1, expand, permute,
# transpose, cat and stack along another dimension, select, slice, sum and mean over others);
# through any other, or where that dimension was broadcast, sliced, concatenated or stacked, it
# is lost. A recorded expansion reached along a path where the state's dim 1 is its dim 0 is
# right (h0 [H] expanded over the examples, then viewed to [1, N, H] and expanded over the
# layers); reached where the state's dim 1 is known to be another of its dimensions, the state
# is refused. The search stops at the output of
# a layer the engine measured (PassNorms.call_outputs) reached along its examples' dimension:
# the layer keeps its examples apart, and what its input was made of is its own (an encoder's
# final state made a decoder's initial state, the encoder's input with a class token). Each
# (operation, output, dimension) is visited once, at most _STATE_SEARCH_NODES of them, and none
# made before the earliest recorded expansion. Where the correspondence was lost or the budget
# ran out, the search refuses nothing: the audit decides (its coefficients are distinct for up
# to ten examples, so rows of another example fail it at every step — a review found that
# refusing there refused ordinary encoder-decoders at N = L). It runs only when a pass has such
# an expansion and L·D = N, a small last batch.

_STATE_SEARCH_NODES = 300


_POINTWISE_NODES = {
    f"{name}Backward{k}"
    for name in (
        "Clone", "Alias", "ToCopy", "Tanh", "Sigmoid", "Relu", "Neg", "Exp", "Log", "Sqrt",
        "Rsqrt", "Abs", "Sin", "Cos", "Gelu", "Elu", "LeakyRelu", "Silu", "Softplus",
        "Hardtanh", "Clamp", "Pow", "Mul", "Div", "Add", "Sub", "Rsub", "Where", "Maximum",
        "Minimum", "Lerp", "Addcmul", "Addcdiv", "NativeDropout",
    )
    for k in range(3)
}  # fmt: skip


_RESHAPE_NODES = {
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "UnsqueezeBackward0",
    "UnsqueezeBackward1", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2",
    "SqueezeBackward3", "SqueezeBackward4",
}  # fmt: skip


def _dim_before(
    kind: str, node: Any, out: tuple[int, ...], d: int, inp: tuple[int, ...] | None
) -> int | None:
    """The dimension of one of ``node``'s inputs (shape ``inp``) that its output's dimension
    ``d`` (of ``out``) is, element for element; None if not known, or broadcast."""
    if inp is None:
        return None
    if kind in _POINTWISE_NODES or kind == "ExpandBackward0":
        j = d - (len(out) - len(inp))
        return j if j >= 0 and inp[j] == out[d] else None
    if kind in _RESHAPE_NODES:
        kept_out = [i for i, s in enumerate(out) if s != 1]
        kept_in = [i for i, s in enumerate(inp) if s != 1]
        if out[d] == 1 or [out[i] for i in kept_out] != [inp[i] for i in kept_in]:
            return None
        return kept_in[kept_out.index(d)]
    if kind == "SelectBackward0":
        at = _dim_index(node._saved_dim, len(inp))
        j = d if d < at else d + 1
    elif kind == "SliceBackward0":
        j = None if d == _dim_index(node._saved_dim, len(out)) else d
    elif kind in ("SumBackward1", "MeanBackward1"):
        dims = {_dim_index(x, len(inp)) for x in (node._saved_dim or range(len(inp)))}
        kept = [i for i in range(len(inp)) if node._saved_keepdim or i not in dims]
        j = kept[d] if d < len(kept) and kept[d] not in dims else None
    elif kind == "PermuteBackward0":
        dims = [_dim_index(x, len(out)) for x in node._saved_dims]
        j = dims[d]
    elif kind == "TransposeBackward0":
        a, b = _dim_index(node._saved_dim0, len(out)), _dim_index(node._saved_dim1, len(out))
        j = b if d == a else a if d == b else d
    elif kind == "CatBackward0":
        j = None if d == _dim_index(node._saved_dim, len(out)) else d
    elif kind == "StackBackward0":
        at = _dim_index(node._saved_dim, len(out))
        j = None if d == at else d if d < at else d - 1
    else:
        return None
    return j if j is not None and j < len(inp) and inp[j] == out[d] else None


def _dim_index(dim: int, rank: int) -> int:
    """A saved dimension (autograd keeps -1 as 2⁶⁴ - 1) as an index into ``rank`` dims."""
    dim = int(dim)
    return (dim - 2**64 if dim >= 2**63 else dim) % rank


def _square_expansion_in(
    state: Tensor,
    recorded: dict[tuple[int, int], str],
    layer_outputs: dict[tuple[int, int, int], int],
) -> str | None:
    """The sources of an expansion in ``recorded`` in ``state``'s history reached along a
    known dimension other than its dim 0 — the state's dim 1 (the layer's examples) is known to
    have been another dimension of it: the expansion's rows became layers —, None otherwise
    (see the notes above). Reached where the correspondence of dimensions was lost, or past
    the search's budget, it is left to the audit, whose coefficients are distinct for up to ten
    examples: it refuses such a state at every step where the rows are not the examples'
    (a review, 2026-12-05: refusing them here refused ordinary encoder-decoders, a bridge's
    view, a repeat, an encoder run before a start token)."""
    if state.grad_fn is None or not recorded:
        return None
    # (a node made before the earliest recorded expansion cannot have it in its history)
    floor = min(seq for _, seq in recorded)
    start = (state.grad_fn, state.output_nr, tuple(state.shape), 1)
    seen = {(id(state.grad_fn), state.output_nr, 1)}
    queue: list[tuple[Any, int, tuple[int, ...] | None, int | None]] = [start]
    for node, nr, out, d in queue:
        key = (id(node), node._sequence_nr())
        labels = recorded.get(key)
        if labels is not None:
            if d is not None and d != 0:
                return labels
            continue  # (its operand is shared: no meeting before it)
        if d is not None and layer_outputs.get((*key, nr)) == d:
            continue
        kind = type(node).__name__
        for nxt, output in node.next_functions:
            if nxt is None or nxt._sequence_nr() < floor:
                continue
            inp = audit_mod.node_shape(nxt, output)
            try:
                j = None if d is None or out is None else _dim_before(kind, node, out, d, inp)
            except (AttributeError, TypeError):  # (a torch whose nodes save other names)
                j = None
            if (id(nxt), output, j) in seen:
                continue
            if len(seen) >= _STATE_SEARCH_NODES:
                return None
            seen.add((id(nxt), output, j))
            queue.append((nxt, output, inp, j))
    return None


def _unbatched(rule: LayerRule, module: nn.Module, x: Any) -> bool:
    """Whether ``x``, the first input of a call of ``module``, has no batch dimension at all
    (``LayerRule.unbatched``): whatever its leading size, it holds no example."""
    return rule.unbatched is not None and isinstance(x, Tensor) and rule.unbatched(module, x)


def _packed_output(output: Any) -> PackedSequence | None:
    """A recurrent layer's packed output sequence, or None."""
    if isinstance(output, tuple) and output and isinstance(output[0], PackedSequence):
        return output[0]
    return None


def _accumulation_hooked(module: nn.Module) -> bool:
    """Whether the module's weight or bias has hooks run after its gradient's accumulation
    (``register_post_accumulate_grad_hook``)."""
    for name in ("weight", "bias"):
        p = module._parameters.get(name)
        if p is not None and getattr(p, "_post_accumulate_grad_hooks", None):
            return True
    return False


def _ours(hook: Any) -> bool:
    """Whether a module hook is noisescale's own (any engine's or watcher's)."""
    return isinstance(hook, InertWhenCopied)


def _outputs_kept(output: Any) -> list[tuple[Tensor, Any]]:
    """A layer's output tensors with their autograd nodes, to tell later whether a hook
    replaced one or changed it in place (:meth:`PerExampleNorms._changed_on_the_way`)."""
    return [(t, t.grad_fn) for t in _tensors(output)]


def _same_outputs(kept: list | None, now: list) -> bool:
    """Whether ``now`` holds the very tensors ``kept`` did, each at the same autograd node."""
    return (
        kept is not None
        and len(kept) == len(now)
        and all(a is c and g is h for (a, g), (c, h) in zip(kept, now, strict=True))
    )


def _device_hook_only(module: nn.Module) -> bool:
    """Whether the instance's own ``forward`` is accelerate's wrapper for an
    ``AlignDevicesHook`` alone, or a chain of them (``device_map`` dispatch): they move inputs
    and outputs between devices, which changes no gradient."""
    hooks = sys.modules.get("accelerate.hooks")
    hook = getattr(module, "_hf_hook", None)
    if hooks is None or hook is None:
        return False
    align = getattr(hooks, "AlignDevicesHook", None)
    chained = (
        getattr(hook, "hooks", None) if type(hook) is getattr(hooks, "SequentialHook", 0) else None
    )
    return type(hook) is align or (chained is not None and all(type(h) is align for h in chained))


def _alias_of(held: Any, p: nn.Parameter) -> bool:
    """Whether ``held`` is one of the engine's aliases of parameter ``p`` (a scope hands them
    out for parameters used directly; a compiled forward's are opaque to this check)."""
    if isinstance(held, compiled.CompiledShared):
        return True
    if not isinstance(held, SharedTensor):
        return False
    origin = getattr(held, "_ns_origin", None)
    return origin is not None and any(s.pid == id(p) for s in origin.sources)


def _zero_state(v: Tensor) -> bool:
    """Whether ``v``, a state a cell is given beside its input (``hx``, an LSTM's ``c``), is
    zeros without a history — ``torch.zeros(N*S, D)``, the usual initial state: every row
    alike, so no example's, whatever the order. Read on the CPU only (on an accelerator it
    would wait for the device: not taken, and the call is refused as before). Until a review
    of 2026-12-06 such a state refused a cell on flattened slots, naming the wrong cause."""
    return (
        v.grad_fn is None and not v.requires_grad and v.device.type == "cpu" and not bool(v.any())
    )


def _on_own_examples(pass_: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a call's tensor arguments include the pass's own examples' tensor (one the
    model's forward took with a row per example): the very tensor, the same view of its memory
    (``ids[idx]`` taken again), or on the CPU equal values (no wait for a device)."""
    rows = _rows_of(pass_) if pass_.inputs is not None else []
    return any(
        isinstance(v, Tensor) and any(_same_rows(v, r) for r in rows)
        for v in _flat_values(args, kwargs)
    )


def _same_rows(v: Tensor, r: Tensor) -> bool:
    if v is r:
        return True
    if v.shape != r.shape or v.dtype != r.dtype or v.device != r.device or not v.numel():
        return False
    try:
        if v.data_ptr() == r.data_ptr() and v.stride() == r.stride():
            return True
    except RuntimeError:  # (a tensor subclass without storage: no such comparison)
        return False
    # (values compared outside any dispatch mode only: selective checkpointing's caches every
    # operation it sees)
    return (
        v.device.type == "cpu"
        and not torch._C._len_torch_dispatch_stack()
        and bool(torch.equal(v, r))
    )


class LayerHooks:
    """:class:`~noisescale.per_example.engine.PerExampleNorms`' hooks on the layers with a rule:
    what each call keeps for the backward, and the refusals a layer's forward can show."""

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        replaced = self._on_layer_output(module, args, kwargs, output)
        if (
            self.passes
            and self.passes[-1].returned
            and self._active()
            and not (self._recomputing or self._replaying)
        ):
            # a layer of the model called in the loss code (a two-tower model's item tower):
            # its parameters are measured there, not read by the loss (Backward._loss_side)
            pass_ = self.passes[-1]
            made = {
                _node_key(t.grad_fn)
                for t in _tensors(output if replaced is None else replaced)
                if t.grad_fn is not None
            }
            pass_.called_after |= made
            if (
                pass_.fed_marks is not None
                and torch._C._current_graph_task_id() == -1  # (not a recompute in a backward)
                and _on_own_examples(pass_, args, kwargs)
            ):
                # called on the forward's own examples (its very input tensor: the table
                # looked up again, model.get_input_embeddings()(ids)), what it computes is
                # those examples' rows: a later forward fed from it (R-Drop's second pass on
                # the embeddings plus noise) is theirs again (pass_checks._fed_by), not N new
                # examples — until 2026-12-07 taken as such, every norm 4× off on a toy, up to
                # 55% on GPT-2, without a word (a review)
                pass_.fed_marks |= made
        watch = self._loss_watch
        if watch.forward_pass is not None and not (
            self._recomputing or self._replaying or self._paused
        ):
            outputs = _tensors(output if replaced is None else replaced)
            if watch.in_own_code():
                # a layer the model's own code called (lm_head, CLIP's projections): the
                # audit proves its rows, what the model computes from them on is followed
                watch.mark_layer(watch.forward_pass, outputs, example_dims(module, outputs))
            else:
                watch.note_layer_dims(example_dims(module, outputs))
        elif (
            watch.following()
            and self._active()
            and not self._replaying
            and self.passes[-1] in watch.passes
        ):
            # a layer of the model called in the loss code, after the forward returned (a
            # two-tower model's item tower on the batch's items or on K sampled negatives):
            # the engine reads its rows as the examples where dim 0 has the batch's size, so
            # the watch does too — in-batch negatives u @ v.T, or K = N shared negatives, are
            # then rows of different examples combined (until 2026-12-06 such outputs were
            # constants to the watch and both were measured without a word, a hunt); on the
            # outputs reordered (m.head(m(x).flip(0))) its rows would be the wrong examples'
            # (refused)
            pass_ = self.passes[-1]
            outputs = _tensors(output if replaced is None else replaced)
            inputs = [v for v in _flat_values(args, kwargs) if isinstance(v, Tensor)]
            reason = watch.unfollowed_rows(pass_, inputs)
            if reason is not None:
                label = self._calls[module][1] if module in self._calls else type(module).__name__
                reason = f"layer '{label}' of the model was called in the loss code on {reason}"
            watch.mark_called(pass_, outputs, self.pairs, reason)
        return replaced

    def _on_layer_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        stack = self._weight_calls.get(module)
        taken = stack.pop() if stack else None
        product_weight, product_bias = (None, None) if taken is None else taken
        if product_weight is None and not self._active():
            self.check_forward_transform(f"layer '{self._calls[module][1]}'")
            _, label, params = self._calls[module]
            self._note_unopened(label, [id(p) for p in params.values()], output)
            return None
        rule, label, params = self._calls[module]
        if _fwad._current_level >= 0 and _has_dual(_flat_values((*args, output), kwargs)):
            raise UnsupportedModuleError(forward_ad_message(f"layer '{label}'"))
        pass_ = self._hook_pass()
        self._check_held(module, pass_)
        between = self._changed_on_the_way(module, output)
        if between is not None and not (self._recomputing or self._replaying):
            pass_.between.setdefault(label, between)
        if not pass_.amp:
            # autocast entered inside the model's forward (accelerate wraps ``model.forward``,
            # so the model's own hooks run outside it) still loosens the audit
            pass_.amp = _autocast_enabled()
        outs = list(rule.outputs(module, output)) if rule.outputs is not None else [_first(output)]
        replaced = None  # the output, when this hook replaces it
        if product_weight is not None:
            # The layer ran on a detached weight (_on_weight_enter): its gradient comes from
            # WeightBySubbatch whatever happens next, also when nothing else in the output needs
            # a gradient (a first layer without bias on input data) — or the weight gets none.
            # The bias, when it ran detached too, is computed with it; the rule computes the
            # other parameters.
            job, params = self._product_job(
                pass_, module, rule, params, product_weight, product_bias
            )
            job.readers = self._readers(pass_, args[0])
            x = args[0].detach()
            base = _reshaped_base(module, output)
            if base is None:
                subbatch_mod.weight_by_subbatch(outs[0], x, product_weight, product_bias, job)
            else:
                # The output is a reshaped view of the product's result (nn.Linear on [N, T, I],
                # Conv1D): marking the view dirty makes autograd copy every gradient through
                # the whole base and back (CopySlices, ≈ 3 copies of the output per layer).
                # The base is marked instead, and the layer's output becomes a new view of it,
                # made after — the view the layer made is seen by no one else.
                subbatch_mod.weight_by_subbatch(base, x, product_weight, product_bias, job)
                output = outs[0] = replaced = base.view(output.shape)
        if rule.check is not None:
            rule.check(module, label)  # e.g. a BatchNorm switched to train() since
        if pass_.skipped:
            return replaced
        if product_weight is not None and not params and not kwargs and len(args) == 1:
            # the products took the whole layer (checked in _on_weight_enter: one per-example
            # input, dim 0 the batch's examples, not shared)
            n = pass_.batch_size
            pass_.signature.append(("products", id(module), (_shape_pattern(args[0], n),)))
            base = _rebasable_base(outs[0], 0, n)
            self._add_target(pass_, outs[0], 0, module, label, base)
            return replaced
        if not any(isinstance(o, Tensor) and o.requires_grad for o in outs):
            return replaced
        ctx_dim = self.batch_dim()
        in_dim, out_dims = (
            rule.batch_dims(module)
            if rule.batch_dims is not None
            else (ctx_dim, [ctx_dim] * len(outs))
        )
        single = not kwargs and len(args) == 1 and type(args[0]) is Tensor  # (the common case)
        shared_input = not single and any(
            isinstance(v, SharedTensor) for v in _flat_values(args, kwargs)
        )
        if rule.batch_size is not None:
            size = rule.batch_size(module, args, kwargs)
        elif single:
            size = args[0].shape[in_dim] if args[0].dim() > in_dim else None
        else:
            size = _first_size(args, kwargs, in_dim)
        n = pass_.batch_size
        first = _first_tensor(args, kwargs)
        if size == n and _unbatched(rule, module, first):
            # (no example dim at all: a Linear on a frozen 1-D parameter whose length is the
            # batch's crashed in its rule, a fuzz hunt of 2026-12-07): shared, as with any
            # other length
            self._check_unbatched(pass_, first, n, label)
            size = None
        if (
            size != n
            and not shared_input
            and pass_.n_source is not None
            and first is pass_.n_source
        ):
            # the model's example count came from this layer's input (e.g. EmbeddingBag offsets)
            pass_.batch_size = n = size
            if pass_.subbatches is not None:
                # drawn for the input's leading size (the bags' flat indices): draw again for
                # the examples, before any layer has used them (this is the model's input)
                device = pass_.subbatches.index.device
                pass_.subbatches = (
                    Subbatches.split(n, self.subbatches, self._generator(device), device)
                    if n >= 2 and self.pairs is None
                    else None
                )
        if single and pass_.returned and self._loss_watch.forward_pass is None:
            self._check_loss_code_rows(pass_, module, label, args[0], size)
        if size == n or module in self._learned_shared:
            flat = 0
        elif rule.native_layout:
            flat = self._flat_native_rows(
                pass_, rule, module, label, args, kwargs, outs, size, n, in_dim
            )
        else:
            flat = (
                self._flat_rows(pass_, rule, module, label, args, size, n, in_dim)
                if single
                and isinstance(output, Tensor)
                # (rows kept: not an unbatched convolution's channels, 2026-12-06)
                and output.shape[:1] == args[0].shape[:1]
                else 0
            )
        if flat:
            # the examples flattened together with positions, [N·k, …] (LayerRule.flattened):
            # measured as [N, k, …] (a rule of its own layout takes the rows as they are, and
            # its factors are summed over each example's k rows); the audit checks that the
            # rows are each example's in turn
            if not rule.native_layout:
                args = (args[0].unflatten(0, (n, flat)),)
            pass_.flat_calls.add(module)
        elif (
            shared_input
            or size != n
            or module in self._learned_shared
            or (single and self._rows_not_examples(pass_, args[0], n, label))
        ):
            shared = self._shared_call(pass_, module, rule, label, params, args, kwargs, output)
            return replaced if shared is None else shared
        if product_weight is not None and not params:
            pass_.signature.append(("products", id(module), _pattern(args, kwargs, n)))
            base = _rebasable_base(outs[0], out_dims[0], n)
            self._add_target(pass_, outs[0], out_dims[0], module, label, base)
            return replaced
        saved = rule.save(
            module,
            args,
            kwargs,
            output.unflatten(0, (n, flat)) if flat and not rule.native_layout else output,
        )
        call = _Call(module, rule, label, params, in_dim, [saved], out_dims, n, flat=flat)
        if pass_.square_expansions and not flat:
            # (where _square_expansion_in stops: an encoder's final state made a decoder's)
            for o, d in zip(outs, out_dims, strict=False):
                if isinstance(o, Tensor) and o.grad_fn is not None:
                    pass_.call_outputs[(*_node_key(o.grad_fn), o.output_nr)] = d
        for p in params.values():
            pass_.uses[id(p)] = pass_.uses.get(id(p), 0) + 1
        # ("products": a bias left to the rule)
        tag = "flat-call" if flat else "call" if product_weight is None else "products"
        pattern = (_shape_pattern(args[0], n),) if single else _pattern(args, kwargs, n)
        pass_.signature.append((tag, id(module), pattern))
        hooked = [o for o in outs if isinstance(o, Tensor) and o.requires_grad]
        base = _rebasable_base(outs[0], out_dims[0], n) if len(outs) == 1 and not flat else None
        if (
            self.auditing_enabled
            and users_rule(rule)
            and not flat
            and in_dim == 0
            and all(d == 0 for d in out_dims)
        ):
            # (the base, when the hook is put on it: the view's own node has run by then)
            call.edges = [
                (torch.autograd.graph.get_gradient_edge(t), t.shape)
                if isinstance(t, Tensor) and t.requires_grad
                else None
                for t in ([base] if base is not None else outs)
            ]
        if base is not None:
            # (the whole base of a reshaped view: its hook still fires after an in-place
            # operation on the view, whose own node that operation leaves out of the graph)
            shape = outs[0].shape
            pass_.handles.append(
                base.register_hook(
                    lambda g, c=call, p=pass_, s=shape: self._on_call_grad(p, c, (g.view(s),))
                )
            )
        elif len(outs) == 1:
            pass_.handles.append(
                _after_tensor_hooks(
                    outs[0], lambda g, c=call, p=pass_: self._on_call_grad(p, c, (g,))
                )
            )
        else:
            handle = torch.autograd.graph.register_multi_grad_hook(
                hooked,
                lambda grads, c=call, p=pass_, o=outs, h=hooked: self._on_call_grad(
                    p, c, _align(o, h, grads)
                ),
                mode="all",
            )
            pass_.handles.append(handle)
        packed = _packed_output(output)
        for o, d in zip(outs, out_dims, strict=False):
            if isinstance(o, Tensor) and o.requires_grad:
                rebased = base if o is outs[0] else None
                if packed is not None and o is packed.data:
                    # (a recurrent layer's packed output: its rows by the packing's metadata)
                    d = audit_mod.Packed(
                        packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices
                    )
                self._add_target(pass_, o, audit_mod.FLAT if flat else d, module, label, rebased)
        return replaced

    def _flat_rows(
        self,
        pass_: PassNorms,
        rule: LayerRule,
        module: nn.Module,
        label: str,
        args: tuple,
        size: Any,
        n: int,
        in_dim: int,
    ) -> int:
        """k, when a layer's single input holds each example's k rows in turn: the examples
        flattened together with positions (``x.reshape(-1, D)`` of a batch-first [N, T, D]),
        its leading size k·N, the layer's rule treating positions alike
        (``LayerRule.flattened``), and the input's history showing the flattening
        (:func:`_example_major`: never rows selected, sorted or routed by the data, whose
        order could change from one step to the next) — or, input data without a history,
        its memory showing it: a view flattening one of the model's inputs, [N, a, …] →
        [N·a, …] (:func:`_flattened_input`). 0 otherwise: the call is shared. The
        audit checks the rows' attribution on the first pass of each structure; a layer whose
        rows are not each example's in turn is learned as shared. The examples beneath the
        flattening are checked on every step, as a layer's input of the batch's size is
        (:meth:`_rows_not_examples`): a batch the data reordered (``h[order]``) makes the call
        shared; on an accelerator the comparison is left on the device
        (``pass_.unread_picks``)."""
        if in_dim != 0 or self.batch_dim() != 0 or not _flat_size(rule, module, size, n):
            return 0
        unread: list[tuple[str, Tensor]] = []
        if self._rows_proven(pass_, args[0], n, size, unread):
            pass_.unread_picks += [(label, how, flag) for how, flag in unread]
            return size // n
        return 0

    @staticmethod
    def _rows_proven(
        pass_: PassNorms, v: Tensor, n: int, size: int, unread: list[tuple[str, Tensor]]
    ) -> bool:
        """Whether ``v`` ([size, …]) is proven to hold each example's k rows in turn: by its
        history (:func:`_example_major`, its device comparisons appended to ``unread``) or,
        input data without one, by its memory (:func:`_flattened_input`)."""
        return _example_major(v, n, size, unread) or _flattened_input(v, pass_.inputs, n, size)

    def _flat_native_rows(
        self,
        pass_: PassNorms,
        rule: LayerRule,
        module: nn.Module,
        label: str,
        args: tuple,
        kwargs: dict,
        outs: list,
        size: Any,
        n: int,
        in_dim: int,
    ) -> int:
        """:meth:`_flat_rows` for a rule of its own layout that takes several tensors — an RNN
        cell's input and state, ``gru(upd.reshape(-1, D), slots.reshape(-1, D))`` on the
        examples flattened together with their slots (Slot Attention; refused until 2026-12-06,
        the fix it named impossible for a cell, which takes 2-D input only — a hunt): k when
        every tensor it takes and returns has the leading size k·N and every input is proven
        each example's k rows in turn, as :meth:`_flat_rows` proves one; 0 otherwise."""
        if in_dim != 0 or self.batch_dim() != 0 or not _flat_size(rule, module, size, n):
            return 0
        inputs = [v for v in _flat_values(args, kwargs) if isinstance(v, Tensor)]
        if not inputs or any(
            isinstance(v, SharedTensor) or v.dim() == 0 or v.shape[0] != size
            for v in (*inputs, *outs)
            if isinstance(v, Tensor)
        ):
            return 0
        # (each input's picks beneath its flattening compared on the device on an
        # accelerator, as a Linear's are: a review of 2026-12-06 found a cell on a sorted batch
        # flattened measured without the flag)
        unread: list[tuple[str, Tensor]] = []
        if all(
            self._rows_proven(pass_, v, n, size, unread) or (i > 0 and _zero_state(v))
            for i, v in enumerate(inputs)
        ):
            pass_.unread_picks += [(label, how, flag) for how, flag in unread]
            return size // n
        return 0

    def _on_weight_enter(self, module: nn.Module, args: tuple) -> None:
        """Sub-batch mode: run the layer on a detached weight; its gradient is computed by
        :class:`~noisescale.per_example.subbatch.WeightBySubbatch` (see :meth:`_on_forward`)."""
        stack = self._weight_calls.setdefault(module, [])
        if not self._active():
            stack.append(None)
            return
        pass_ = self._hook_pass()
        self._check_held(module, pass_)
        weight = module._parameters.get("weight")
        use = (
            pass_.subbatches is not None
            and weight is not None
            and self._nothing_between(module)
            # (a hook after the weight's or bias's accumulation — an optimizer stepped inside
            # the backward — would run before the layer's input gradient is computed from the
            # weight, which the products hand autograd from above the layer: torch's in-place
            # error, or with p.data updated the lower layers' .grad 1% off a plain model's,
            # until 2026-12-06, a hunt)
            and not _accumulation_hooked(module)
            and weight.requires_grad
            and not isinstance(weight, SharedTensor)
            and (
                id(weight) not in self._multi_use
                or (
                    not self._seen_compiled
                    and subbatch_mod.keeps_pay(module, args[0], pass_.subbatches.k)
                )
            )
            and id(weight) in self._param
            and module not in self._learned_shared  # its call is shared: no WeightBySubbatch
            and bool(args)
            and isinstance(args[0], Tensor)
            and not isinstance(args[0], SharedTensor)
            and self.batch_dim() == 0
            and args[0].dim() > 0
            and args[0].shape[0] == pass_.batch_size
            and not _unbatched(self._calls[module][0], module, args[0])
            and self._replay_allowed
            and not self._rows_not_examples(
                pass_, args[0], pass_.batch_size, self._calls[module][1]
            )
            and self._uses_products(module, weight, args[0], pass_.batch_size, pass_.subbatches.n)
        )
        if not use:
            stack.append(None)
            return
        module._parameters["weight"] = weight.detach()
        bias = self._bias_with_products(module, weight)
        if bias is not None:
            module._parameters["bias"] = bias.detach()
        stack.append((weight, bias))

    def _hook_state(self) -> int:
        """A fingerprint of every hook that can come between a measured layer and the engine
        (the layers' own, the global ones, a patched ``forward``). Dynamo recompiles a graph
        when they change; a compiled pass run with another state than the last audit saw ran a
        graph no audit has checked (``_audit_wanted``). ≈ 1 µs a layer, on compiled passes."""
        state = [
            tuple(_global_forward_hooks),
            tuple(_global_forward_pre_hooks),
            tuple(_global_backward_hooks),
            tuple(_global_backward_pre_hooks),
        ]
        for m in self._calls:
            forward = m.__dict__.get("forward")
            state.append(
                (
                    tuple(m._forward_pre_hooks),
                    tuple(m._forward_hooks),
                    tuple(m._backward_pre_hooks),
                    tuple(m._backward_hooks),
                    None if forward is None else id(forward),
                )
            )
        return hash(tuple(state))

    def _check_held(self, module: nn.Module, pass_: PassNorms) -> None:
        """Refuse a layer that runs with another tensor than a parameter it held when the
        engine was made (a pre-hook or patched forward swapping ``module.weight`` for the call:
        an EMA copy, a tie by hook; a weight moved by ``prune`` or ``parametrize`` since): its
        rule would credit that parameter with gradients it never received, and the tensor used
        would be counted through its own uses too. Checked at the layer's last pre-hook (the
        engine's: a swap by a pre-hook registered before it) and at its forward hook."""
        _, label, params = self._calls[module]
        for name, p in params.items():
            held = module._parameters.get(name) if "." not in name else p
            if held is p or _alias_of(held, p) or hasattr(p, "placements"):
                # (a DTensor: FSDP2 runs the module on the unsharded parameter it swaps in)
                continue
            # refused when the pass is collected, if its backward reached the parameters (a
            # torch.func.functional_call of other weights with gradients on, never
            # backpropagated — an EMA's evaluation — is not refused; one registered in the
            # model since is refused with every such parameter named)
            pass_.replaced.append((label, name, held))

    def _on_call_enter(self, module: nn.Module, args: tuple) -> None:
        if self._active():
            self._check_held(module, self._hook_pass())

    def _on_recurrent_enter(
        self, module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        """:meth:`_on_call_enter` for nn.RNN/GRU/LSTM, which also makes a learned initial state
        per-example. A state computed from parameters alone (``h0.expand(-1, N, -1)`` of a
        parameter h0 [L·D, 1, H], or a copy or ``repeat`` of it) is shared by the examples until
        the layer runs each example's recurrence from its own column (dim 1): there it meets the
        batch (:func:`~noisescale.per_example.shared.per_example_state`), and the layer is
        called with the per-example state — an ordinary call, whose rule recomputes the
        recurrence from it. Left shared (the call then refused as shared) when the layer's input
        is not the batch's examples, or the state's dim 1 does not have the batch's size."""
        if not self._active():
            return None
        pass_ = self._hook_pass()
        self._check_held(module, pass_)
        in_args = len(args) > 1
        hx = args[1] if in_args else kwargs.get("hx")
        states = hx if isinstance(hx, tuple) else (hx,)
        if pass_.inputs is not None and hx is not None:
            # a state the model was given (recurrent PPO's h0 [1, N, H] from the rollout): its
            # examples are along dim 1, where the permutation checks must permute them (until
            # 2026-12-06 they permuted dim 0 only, and refused such a model whenever its
            # sequences were as long as they were many, T = N, as mixing examples; a hunt)
            given = _flat_tensors(pass_.inputs, [])
            for h in states:
                if any(h is t for t in given) and not any(h is t for t in pass_.state_inputs):
                    pass_.state_inputs.append(h)
        if pass_.skipped:
            return None
        if pass_.square_expansions and pass_.batch_size > 1:  # (one example: all its own)
            for h in states:
                if (
                    isinstance(h, Tensor)
                    and not isinstance(h, SharedTensor)
                    and h.dim() == 3
                    and h.shape[0] == h.shape[1] == pass_.batch_size
                ):
                    self._refuse_square_expansion(module, pass_, h)
        if not any(isinstance(h, SharedTensor) for h in states):
            return None
        x = args[0] if args else kwargs.get("input")
        n = pass_.batch_size
        if isinstance(x, PackedSequence):
            size = int(x.batch_sizes[0])
        elif isinstance(x, Tensor) and not isinstance(x, SharedTensor) and x.dim() == 3:
            size = int(x.shape[0 if module.batch_first else 1])
        else:
            return None
        if size != n or not all(
            not isinstance(h, SharedTensor) or (h.dim() == 3 and h.shape[1] == n) for h in states
        ):
            return None
        made = tuple(
            per_example_state(h, pass_) if isinstance(h, SharedTensor) else h for h in states
        )
        new = made if isinstance(hx, tuple) else made[0]
        if in_args:
            return (args[0], new, *args[2:]), kwargs
        return args, {**kwargs, "hx": new}

    def _refuse_square_expansion(self, module: nn.Module, pass_: PassNorms, state: Tensor) -> None:
        """Refuse a recurrent layer's initial state [L·D, N, H], L·D = N, computed — by any
        operations — from an expansion or repetition the shared tensors took for one over the
        examples along dim 0 (:attr:`PassNorms.square_expansions`) whose dim 0 did not become
        the state's dim 1: a tensor shared by the layers and the examples, h0 [1, 1, H]
        expanded to [L·D, N, H] (or repeated over the layers, then expanded; then a tanh, a
        product, views, a cat …). The layer's examples are along dim 1, and each example's
        gradient of h0 would have been taken from a layer's row: wrong, and an audit can pass
        it (one passed, in a review, after eight steps of another batch size, 3e-5 off; the
        next steps were 2e-4 to 6e-4 off, the repeat-then-expand form up to 2e-3; with a tanh,
        a product or a sum after the expansion, up to 7.4). Where the search cannot tell, the
        audit decides (:func:`_square_expansion_in`)."""
        found = _square_expansion_in(state, pass_.square_expansions, pass_.call_outputs)
        if found is None:
            return
        label = f"layer '{self._labels.get(module, '?')}' ({type(module).__name__})"
        layers = int(state.shape[0])
        raise UnsupportedModuleError(
            f"{label} was given a learned initial state computed from {found}, one state "
            f"shared by its {layers} layers·directions and by the examples, made "
            f"{list(state.shape)}: with as many layers·directions as examples ({layers}), its "
            "expansion over the layers looked like one over the examples along dim 0 (a class "
            "token's), where the layer's examples are along dim 1. Learn one state per "
            "layer (a parameter of shape [num_layers·directions, 1, H], expanded with "
            "h0.expand(-1, N, -1)), or make it with one repeat over layers and examples "
            "together (h0.repeat(num_layers·directions, N, 1)): both are measured exactly"
        )

    def _capture_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        """The layer's own output, before the user's forward hooks run
        (:meth:`_changed_on_the_way`)."""
        if self._active():
            self._captured[module] = _outputs_kept(output)

    def _raw_capture_first(self) -> bool:
        """Whether the engine's global forward hook that keeps rule layers' own outputs is in
        place, first among the global hooks; put it there if not (a layer's call then, not yet
        compared, is audited)."""
        hooks = _global_forward_hooks
        key = self._raw_capture_id
        if key is not None and key in hooks and next(iter(hooks)) == key:
            return True
        if key is None or key not in hooks:
            handle = torch.nn.modules.module.register_module_forward_hook(self._capture_raw)
            self._handles.append(handle)
            self._raw_capture_id = key = handle.id
        hooks.move_to_end(key, last=False)
        return False

    def _capture_raw(self, module: nn.Module, args: tuple, output: Any) -> None:
        """A rule layer's own output, before the global forward hooks
        (:meth:`_raw_capture_first`)."""
        if module in self._forward_ids and self._active() and not foreign_thread(self.thread):
            self._captured_raw[module] = _outputs_kept(output)

    def _changed_on_the_way(self, module: nn.Module, output: Any) -> str | None:
        """What may have changed a rule layer's output before the engine's forward hook got it
        — whose rule then reads the gradient of the changed output as the layer's (``out *
        alpha``: every example's gradient off by alpha) —, or ``None``: a ``forward`` patched
        on the instance (but accelerate's device hooks) or on the layer's class, a forward hook
        the user registered before the tracker (or prepended after it) that replaced the output
        or changed it in place. Such a pass is audited (:meth:`_audit_wanted`:
        on the audit's schedule alone, a factor that was 1 when audited and changed later —
        a fade-in, a scheduled branch scale — was measured 11–24% off without a word until
        2026-12-06, a hunt); a hook that only reads costs nothing."""
        captured = self._captured.pop(module, None)
        raw = self._captured_raw.pop(module, None)
        if "forward" in module.__dict__ and not _device_hook_only(module):
            return "its forward replaced on the instance (module.forward = ...)"
        if type(module).forward is not self._class_forwards.get(type(module), type(module).forward):
            return "its class's forward replaced (a monkeypatch of the layer's class)"
        if any(k != self._raw_capture_id for k in _global_forward_hooks):
            # a global forward hook runs before the layer's own: the layer's output is kept by
            # one of the engine's, put first among them, and compared — a read-only one (torch's
            # ModuleTracker and FlopCounterMode register such) costs nothing (auditing every
            # step under them doubled the step and the FLOPs they count, a review); one that
            # changes the output is audited at every step (taken for read-only at first, it was
            # measured 120% off between audits, a second review)
            if not self._raw_capture_first():
                return "a global forward hook (register_module_forward_hook)"
            after = captured if captured is not None else _outputs_kept(output)
            if not _same_outputs(raw, after):
                return "a global forward hook that changed its output"
        forward_id = self._forward_ids.get(module)
        for key, hook in module._forward_hooks.items():
            if key == forward_id:
                return None
            if key == self._capture_ids.get(module):
                if _same_outputs(captured, _outputs_kept(output)):
                    return None
                return "a forward hook registered before the tracker that changed its output"
            if not _ours(hook):
                # (noisescale's own — this engine's, added since for the fallback, or another
                # engine's on the same model — are not)
                return "a forward hook that runs before noisescale's (prepend=True)"
        return None

    def _nothing_between(self, module: nn.Module) -> bool:
        """Whether the layer's own product reaches the engine's forward hook as it computed it,
        from the input that hook is given, so that the sub-batch products may compute the
        weight's gradient from them: no ``forward`` of the instance's own (a patched
        ``module.forward = …``), no global forward hook (they run before every module's), the
        engine's weight pre-hook the last of the module's pre-hooks (one after it would see the
        detached weight: a penalty read from it, a swap) and its two forward hooks the first
        of the module's (a hook the user registered before the tracker, or prepended after it,
        runs before them and may change the output). Otherwise the call goes to the layer's
        rule, whose per-example gradients the audit checks against autograd's own. (With
        products, the weight's gradient is the products' own: an audit could not see such a
        change. A hook that makes the output require a gradient, as ``enable_input_require_grads``
        does, thus never meets a layer run on a detached weight.)"""
        if "forward" in module.__dict__ or _global_forward_hooks:
            return False
        ids = self._product_hooks.get(module)
        if ids is None:
            return False
        enter, leave, forward = ids
        if next(reversed(module._forward_pre_hooks), None) != enter:
            return False
        hooks = iter(module._forward_hooks)
        return next(hooks, None) == leave and next(hooks, None) == forward

    def _take_unread_picks(self, passes: list[PassNorms]) -> None:
        """The step's :attr:`PassNorms.unread_picks` (passes of backwards that reached the
        parameters: not a metric's forward or a saliency probe's), for the tracker to read with
        the step's statistics. An audited pass's are read now — the audit reads back anyway —
        and a flagged one is refused before the audit's findings are settled: the audit would
        blame the layer the picked rows came from and take it for shared from then on."""
        picks = [pick for p in passes for pick in p.unread_picks]
        audited = [pick for p in passes if p.audited for pick in p.unread_picks]
        if audited:
            flags = torch.stack([flag.to(audited[0][2].device) for _, _, flag in audited])
            bad = [pick for pick, flag in zip(audited, flags.tolist(), strict=True) if flag]
            if bad:
                label, how, _ = bad[0]
                if not label:  # (a whole cause: _items_not_one_each)
                    raise UnsupportedModuleError(f"{how}. Nothing of this step was recorded")
                raise UnsupportedModuleError(
                    f"the input rows of layer '{label}' were picked by {how} (h[idx], or "
                    "h[b, t] with b, t from mask.nonzero()): their count equals the batch's by "
                    "coincidence and which example each belongs to changes with the data. "
                    "Nothing of this step was recorded. Pick one row per example with an "
                    "index along the examples in order, h[torch.arange(N), t] (a batch sorted "
                    "inside the forward: pack it with enforce_sorted=False), or measure with "
                    "per_example=False"
                )
        self.unread_picks = picks
