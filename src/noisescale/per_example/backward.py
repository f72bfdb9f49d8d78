"""The backward side of a pass: weight gradients as sub-batch products, calls of a layer on input
shared by all examples, the meetings of shared tensors with the batch, and the gradients each
receives turned into factors and routed to the parameters they came from; which rows of a step
are measured (the per-example fraction's draw). A mixin of :class:`~.engine.PerExampleNorms`:
what the backward hooks do, read in one place."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from noisescale.errors import UnsupportedModuleError
from noisescale.per_example import audit as audit_mod
from noisescale.per_example import compiled
from noisescale.per_example import subbatch as subbatch_mod
from noisescale.per_example.embedding import refuse_learned_weights
from noisescale.per_example.factors import (
    DenseFactor,
    EmbeddingFactor,
    Factor,
    LinearFactor,
    NormFactor,
    SliceFactor,
    Subbatches,
    _acc,
    acc_sum,
    fold_rows,
    group_factor,
)
from noisescale.per_example.graph import (
    _MOVED,
    _assembled_rows,
    _batched_grad,
    _flat_size,
    _selected_rows,
    _subset_rows,
    loss_side_params,
)
from noisescale.per_example.messages import (
    _flattened_hint,
    freed_by_fsdp_message,
    nested_message,
)
from noisescale.per_example.passes import (
    PassNorms,
    _Call,
    _plain_weight_grad,
    _product_kind,
    _Slot,
    _WeightJob,
)
from noisescale.per_example.registry import LayerRule
from noisescale.per_example.shared import (
    Meeting,
    Origin,
    SharedTensor,
    Source,
    note_dim1_input,
    per_example_reduce,
    view_relation,
    wrap,
)
from noisescale.per_example.values import (
    _expand_saved,
    _first_size,
    _first_tensor,
    _flat_values,
    _move,
    _owned,
    _pattern,
    _positions,
    _route_sources,
    _shape_pattern,
    _take_rows,
    _unshare,
)

_UNKNOWN = object()  # (PerExampleNorms._begin: not asked yet)


def _sums_in_16_bits(grad: Tensor) -> bool:
    """Whether autograd sums a normalisation layer's affine gradients from this output gradient
    (or an embedding's rows, given its weight) in 16 bits: a bfloat16/float16 tensor on the CPU
    (measured in torch 2.13: the bias gradient of 8,192 rows 9% off a float32 sum)."""
    return grad.device.type == "cpu" and grad.dtype in (torch.bfloat16, torch.float16)


class Backward:
    """:class:`~noisescale.per_example.engine.PerExampleNorms`' backward hooks: each use's
    gradient made into factors and delivered to its parameters."""

    def _uses_products(
        self, module: nn.Module, weight: Tensor, x: Tensor, n: int, per_subbatch: int
    ) -> bool:
        """:func:`~noisescale.per_example.subbatch.uses_products`, remembered for each layer and
        input shape (every product layer asks it at every call)."""
        key = (module, weight.shape, x.shape, x.is_cpu, n, per_subbatch)
        try:
            choice = self._product_choices.get(key)
        except TypeError:  # symbolic sizes
            return subbatch_mod.uses_products(module, x, n, per_subbatch)
        if choice is None:
            choice = subbatch_mod.uses_products(module, x, n, per_subbatch)
            if len(self._product_choices) > 4096:
                self._product_choices.clear()
            self._product_choices[key] = choice
        return choice

    def _product_job(
        self,
        pass_: PassNorms,
        module: nn.Module,
        rule: LayerRule,
        params: dict[str, nn.Parameter],
        weight: nn.Parameter,
        bias: nn.Parameter | None,
    ) -> tuple[_WeightJob, dict[str, nn.Parameter]]:
        """A layer call whose weight (and bias) take sub-batch products, eager or compiled: the
        job that computes their gradients, one use each counted, and the parameters left to the
        layer's rule."""
        job = _WeightJob(pass_, module, weight, _product_kind(module, rule), [True], self, bias)
        pass_.products = True
        for p in (weight, bias):
            if p is not None:
                pass_.uses[id(p)] = pass_.uses.get(id(p), 0) + 1
        if (
            len(params) == (1 if bias is None else 2)
            and params.get("weight") is weight
            and (bias is None or params.get("bias") is bias)
        ):
            return job, {}  # (the common case: the products took every parameter)
        return job, {k: v for k, v in params.items() if v is not weight and v is not bias}

    @staticmethod
    def _readers(pass_: PassNorms, x: Tensor) -> subbatch_mod.Readers | None:
        """The product layers reading the tensor ``x`` itself (this very object, unchanged: the
        same version) in this pass's forward — a query, key and value projection, a gate and up
        projection, a residual block's first convolution and its projection shortcut — whose
        backward may then share one gather of its rows (``Scratch.held``). Paired here, in the
        forward, not by the memory the backward's saved tensors occupy: a saved-tensor unpack
        hook may reload different activations into one buffer. Plain tensors only."""
        if type(x) is not torch.Tensor:
            return None
        entry = pass_.read_by.get(id(x))
        if entry is not None and entry[0]() is x and entry[1] == x._version:
            entry[2].count += 1
            return entry[2]
        readers = subbatch_mod.Readers()
        pass_.read_by[id(x)] = (weakref.ref(x), x._version, readers)
        return readers

    def _bias_with_products(self, module: nn.Module, weight: Tensor) -> nn.Parameter | None:
        """The bias of a layer whose weight takes sub-batch products, when its gradient is
        computed with the weight's (it then runs detached too): unless either has another use."""
        bias = module._parameters.get("bias")
        if (
            bias is None
            or not bias.requires_grad
            or isinstance(bias, (SharedTensor, compiled.CompiledShared))  # (a tuple: Dynamo)
            or id(bias) not in self._param
            or id(bias) in self._multi_use
            or id(weight) in self._multi_use
        ):
            return None
        return bias  # type: ignore[return-value]

    def _on_weight_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        stack = self._weight_calls.get(module)
        if not stack:
            return
        taken = stack[-1]
        if taken is not None:
            weight, bias = taken
            module._parameters["weight"] = weight  # type: ignore[assignment]
            if bias is not None:
                module._parameters["bias"] = bias  # type: ignore[assignment]

    def _weight_backward(
        self, job: _WeightJob, x: Tensor, d: Tensor
    ) -> tuple[Tensor | None, Tensor | None]:
        """The gradients of the weight (and the bias, when taken over) from the sub-batch
        products, and their squared norms."""
        pass_, weight, bias = job.pass_, job.weight, job.bias
        pids = [id(weight)] if bias is None else [id(weight), id(bias)]
        try:
            needed: bool | None = self._reaches_parameters(pids)
        except RuntimeError:  # torch.autograd.grad(): decided when collected
            needed = None
        if needed is False:
            return None, None
        reaches = self._begin(pass_, pids, job.box, needed)
        sb = pass_.subbatches
        if reaches is None or sb is None:
            if job.kind != "conv" and d.shape[:-1] != x.shape[:-1]:
                d = d.reshape(*x.shape[:-1], d.shape[-1])  # the gradient of the output's base
            grad, bias_grad = _plain_weight_grad(job, x, d)
            return grad.to(weight.dtype), None if bias is None else bias_grad.to(bias.dtype)
        # (from here gradient mode is off: _begin leaves a double backward to the plain product)
        job.box.clear()
        weights = pass_.weights
        w2 = None if weights is None else weights.get(id(weight))
        bias_w2 = None if weights is None or bias is None else weights.get(id(bias))
        # a weight with another use (a tied head) keeps its sub-batch gradients for cross terms
        keep = id(weight) in self._multi_use
        if job.kind == "conv":
            out = subbatch_mod.conv_subbatch_grads(
                job.module, x, d, sb, w2, keep, bias is not None, bias_w2, self._scratch,
                job.readers,
            )  # fmt: skip
        else:
            # (the output gradient may be that of the output's base: [N·T, O] for [N, T, O])
            a = x.reshape(x.shape[0], -1, x.shape[-1])
            g = d.reshape(x.shape[0], -1, d.shape[-1])
            out = subbatch_mod.linear_subbatch_grads(
                a, g, sb, w2, job.kind == "conv1d", keep, self._scratch, bias is not None,
                bias_w2, job.readers,
            )  # fmt: skip
        audited = pass_.audit is not None
        grad = out.grad if out.grad.dtype == weight.dtype else out.grad.to(weight.dtype)
        if bias is None:
            factor = NormFactor(out.sq, grad if audited else None, out.kept)
            self._deliver(pass_, {"weight": weight}, {"weight": factor}, reaches)
            return grad, None
        assert out.bias_grad is not None and out.bias_sq is not None
        bias_grad = out.bias_grad
        if bias_grad.dtype != bias.dtype:
            bias_grad = bias_grad.to(bias.dtype)
        if (
            reaches is True
            and not audited
            and out.kept is None
            and self._group_of is None
            and pass_.uses.get(id(weight), 1) == 1
            and pass_.uses.get(id(bias), 1) == 1
        ):
            # the common case, in one addition: both used once, norms weighted where computed
            pass_.covered.add(id(weight))
            pass_.covered.add(id(bias))
            self._accumulate(pass_, id(weight), out.sq + out.bias_sq)
            return grad, bias_grad
        params: dict[str, nn.Parameter] = {"weight": weight, "bias": bias}
        facs: dict[str, Factor] = {
            "weight": NormFactor(out.sq, grad if audited else None, out.kept),
            "bias": NormFactor(out.bias_sq, bias_grad if audited else None),
        }
        self._deliver(pass_, params, facs, reaches)
        return grad, bias_grad

    def _shared_call(
        self,
        pass_: PassNorms,
        module: nn.Module,
        rule: LayerRule,
        label: str,
        params: dict[str, nn.Parameter],
        args: tuple,
        kwargs: dict,
        output: Any,
    ) -> Any:
        """A layer called on input shared by every example: follow its output to the batch."""
        if any(isinstance(v, Tensor) and v.is_nested for v in _flat_values(args, kwargs)):
            # (a jagged tensor's dim 1 is a symbolic size: reading it crashed until 2026-12-06)
            raise UnsupportedModuleError(nested_message(f"the input of layer '{label}'"))
        if isinstance(module, nn.EmbeddingBag):
            refuse_learned_weights(args, kwargs)  # (before they are unshared: a gate's output)
        if rule.native_layout or not isinstance(output, Tensor):
            raise UnsupportedModuleError(
                f"layer '{label}' ({type(module).__name__}) was called on input that is not "
                f"per-example (its example dimension does not have the batch's size "
                f"{pass_.batch_size}); noisescale follows such shared calls only for layers with "
                "one output and the standard layout. Keep its input per-example (dim 0 = "
                "examples), or use per_example=False"
            )
        saved = rule.save(module, _unshare(args), _unshare(kwargs), output)
        size = _first_size(args, kwargs, 0) or 0
        shared = [v for v in _flat_values(args, kwargs) if isinstance(v, SharedTensor)]
        upstream: list[Source] = [
            source
            for v in shared
            for source in v._ns_origin.sources  # type: ignore[attr-defined]
        ]
        picked = next((s.call.picked for s in upstream if s.call is not None and s.call.picked), "")
        if picked:
            why = picked  # (the cause, named at the first call on the picked rows)
        elif shared and (
            expanded := next(
                (pass_.dim1_expansions[id(s)] for s in upstream if id(s) in pass_.dim1_expansions),
                None,
            )
        ):
            labels, shape = expanded
            why = (
                "its input came from parameters used directly, combined only with tensors "
                "whose dim 0 does not have the batch's size (constants, time-major "
                "activations, or the examples flattened together with another dimension); "
                f"among them [{labels}], expanded along dim 1 to the batch's size "
                f"({list(shape)}): if that dimension holds the examples — a sequence-first "
                "layout, as facebookresearch/detr's learned queries "
                "query_embed.weight.unsqueeze(1).repeat(1, bs, 1) for layers with "
                "batch_first=False —, noisescale takes an expansion over the examples along "
                "dim 0 only (and a recurrent layer's initial state along dim 1): build the "
                "layers with batch_first=True and expand along dim 0 "
                "(query_embed.weight.unsqueeze(0).repeat(bs, 1, 1)) — the same function, "
                "measured exactly"
            )
        elif shared:
            why = (
                "its input came from parameters used directly, combined only with tensors "
                "whose dim 0 does not have the batch's size (constants, time-major "
                "activations, or the examples flattened together with another dimension)"
            )
        elif module in self._learned_shared and size != pass_.batch_size:
            why = (
                f"its input's leading dimension {size} is a multiple of the batch's "
                f"{pass_.batch_size} examples, but the audit found its rows are not each "
                "example's rows in turn (x.reshape(-1, D) of a batch-first [N, T, D] is; a "
                "time-major [T, N, D] flattened, or rows routed or sorted across examples, is "
                "not)"
            )
        elif module in self._learned_shared:
            why = (
                f"its input's leading dimension has the batch's size {pass_.batch_size}, but the "
                "audit found its rows are not the examples"
            )
        elif size == pass_.batch_size and (
            selected := _selected_rows(_first_tensor(args, kwargs), size)
        ):
            why = picked = (
                (
                    f"the {size} input rows of layer '{label}', on which it is computed, were "
                    f"moved along the examples ({selected}): each row is another example's "
                    "(keep every example's rows in place along dim 0 — move along the "
                    "positions or features instead —, or use per_example=False)"
                )
                if _MOVED in selected
                else (
                    f"the {size} input rows of layer '{label}', on which it is computed, were "
                    f"picked by a mask or an index ({selected}), so their count equals the "
                    "batch's by coincidence, and which example each row belongs to changes "
                    "with the data (a loss on the masked tokens alone, "
                    "h.view(-1, D)[labels.view(-1) != -100], as ModernBERT's "
                    "sparse_prediction=True does: turn it off, or use per_example=False)"
                )
            )
        elif size == pass_.batch_size and (
            assembled := _assembled_rows(_first_tensor(args, kwargs))
        ):
            why = (
                f"the {size} input rows of layer '{label}' were put together by {assembled} "
                "after the model's forward returned, as many as the examples: which example "
                "each row holds changes with the data (a detection head's regions stacked by "
                "image), and the audit that checks it runs on the forward. Run the layer "
                "inside the model's forward, or use per_example=False"
            )
        elif size == pass_.batch_size:
            first = _first_tensor(args, kwargs)
            why = (
                # (an activation read without a batch dimension — a Linear's 1-D input, a
                # Conv1d's [C, L] — was named a buffer until a review of 2026-12-07)
                f"its input, of leading size {size} like the batch's, is computed from the "
                "examples but read by the layer as one item without a batch dimension (a 1-D "
                "input to a Linear or a norm, a [C, L] input to a Conv1d): the examples become "
                "its features or channels and are mixed. Give the layer a batch dimension "
                "(x.unsqueeze(-1), x.unsqueeze(1)), or use per_example=False"
                if isinstance(first, Tensor) and first.grad_fn is not None
                else f"its input is one of the model's buffers, whose leading size {size} "
                "equals the batch's by coincidence"
            )
        elif subset := _subset_rows(_first_tensor(args, kwargs), pass_.batch_size, label):
            why = picked = f"{subset}, or use per_example=False"
        else:
            first = _first_tensor(args, kwargs)
            n = pass_.batch_size
            # ([T, N, D]; a 2-D input's dim 1 is its features, whatever their number)
            time_major = (
                isinstance(first, Tensor)
                and first.dim() > 2
                and int(first.shape[1]) == n
                and isinstance(size, int)
                and size > 1
            )
            why = f"its input's leading dimension {size} is not the batch's {n} examples" + (
                " — its dim 1 has the batch's size: if that holds the examples, a "
                f"sequence-first (time-major) activation [{size}, {n}, …], as Longformer, LED "
                "and XLNet make inside their layers; "
                "noisescale needs the examples along dim 0 (the time-major built-in layers, "
                "nn.LSTM/GRU/RNN, MultiheadAttention and TransformerEncoder with "
                "batch_first=False, are handled)"
                if time_major
                else _flattened_hint(
                    size,
                    n,
                    no_history=isinstance(first, Tensor)
                    and first.grad_fn is None
                    and _flat_size(rule, module, size, n),
                )
            )
        call = _Call(module, rule, label, params, 0, [saved], size=size, why=why, picked=picked)
        if output.requires_grad and output._base is not None:
            # a view (nn.Linear on [1, T, D] returns one): an in-place operation on it would
            # rebase the view's own history and bypass its edge; a copy of its own (a shared
            # call's output is computed once, not per example: small) keeps the edge below
            output = output.clone()
        source = Source(tensor=output, call=call, label=label)
        if not shared:
            note_dim1_input(pass_, (source,), _flat_values(args, kwargs), pass_.batch_size)
        if output.requires_grad:
            # the edge of the tensor the output's memory belongs to: on input that is itself
            # shared the output is an alias (a shared tensor) of its copy, and an in-place
            # operation on a view of it (DeBERTa's `pos_query_layer /= scale`) rebases that
            # copy's history, past any alias's own node
            with torch._C.DisableTorchFunctionSubclass():
                root = output._base if output._base is not None else output
            source.edge = torch.autograd.graph.get_gradient_edge(root)
            source.version = output._version
        shared = wrap(output, Origin(self, pass_, (source, *upstream), scope=None))
        source.tensor = shared
        pass_.shared_calls.append(call)
        pass_.signature.append(
            ("shared-call", id(module), _pattern(args, kwargs, pass_.batch_size))
        )
        return shared

    # -- meetings (called by SharedTensor) ------------------------------------------------------

    def add_meeting(self, pass_: PassNorms, meeting: Meeting) -> None:
        """Register where a shared tensor meets the batch; its hook runs in the backward."""
        pass_.meetings_added += 1
        if pass_.skipped:
            return
        meeting.box.insert(0, True)  # alive until the backward takes it
        if meeting.kind == "expand":
            plan = [(meeting.shared, None)]
        else:
            plan = [
                (meeting.extra.get("weight"), "weight"),
                (meeting.extra.get("bias"), "bias"),
            ]
        routes: list[tuple[str, Any, Any]] = []
        for operand, role in plan:
            if not isinstance(operand, SharedTensor):
                continue
            origin: Origin = operand._ns_origin  # type: ignore[attr-defined]
            direct = self._direct_route(operand, origin, role, meeting.kind)
            if direct is not None:
                source, relation = direct
                pass_.uses[source.pid] = pass_.uses.get(source.pid, 0) + 1
                routes.append(("direct", role, (source, relation, operand)))
                continue
            for source in origin.sources:
                self._expect_slot(pass_, source)
            routes.append(("vjp", role, (origin, operand)))
        meeting.extra["routes"] = routes
        labels = tuple(sorted(s.label for _, _, r in routes for s in _route_sources(r)))
        pass_.signature.append(
            ("meet", meeting.kind, labels, _shape_pattern(meeting.hooked, pass_.batch_size))
        )
        dim = meeting.extra.get("dim", self.batch_dim())
        meeting.extra["dim"] = dim
        hooked = meeting.hooked
        assert hooked is not None
        pass_.handles.append(
            hooked.register_hook(lambda g, m=meeting, p=pass_: self._on_meeting_grad(p, m, g))
        )
        # (a lookup's target carries its key: an audit may learn that it is shared)
        owner = meeting.extra.get("learn")
        self._add_target(pass_, hooked, dim, owner, f"{meeting.kind} of {', '.join(labels)}")

    def _direct_route(
        self, operand: SharedTensor, origin: Origin, role: str | None, kind: str
    ) -> tuple[Source, tuple[str, int, int]] | None:
        """A meeting whose factor needs no materialised per-example gradient: the shared
        operand is a parameter's alias itself, its transpose or a block of its rows."""
        if kind not in ("linear", "embedding", "conv") or len(origin.sources) != 1:
            return None
        source = origin.sources[0]
        if source.pid is None:
            return None
        relation = view_relation(operand, source.tensor)
        if relation is None:
            return None
        if kind != "linear" and relation[0] != "same":
            return None
        if role == "bias" and relation[0] == "t":
            return None
        return source, relation

    def _expect_slot(self, pass_: PassNorms, source: Source) -> None:
        """One more meeting's gradient for ``source``'s slot of the pass (made on its first,
        which counts one use of each of its parameters)."""
        slot = pass_.slots.get(id(source))
        if slot is None:
            slot = pass_.slots[id(source)] = _Slot(source, pass_=pass_)
            for pid in self._source_pids(source):
                pass_.uses[pid] = pass_.uses.get(pid, 0) + 1
        slot.expected += 1

    def _source_pids(self, source: Source) -> list[int]:
        if source.pid is not None:
            return [source.pid]
        return [id(p) for p in source.call.params.values()]

    def record_unsupported(self, pass_: PassNorms, origin: Origin, op: str) -> None:
        pass_.unsupported.append((origin, op))

    def record_ambiguous(
        self,
        pass_: PassNorms,
        origin: Origin,
        op: str,
        shapes: tuple[tuple, tuple],
        kind: str,
        lookup: int = 0,
    ) -> None:
        """``lookup``: the size k·N of the index that looked the shared rows up (0: none)."""
        pass_.ambiguous.append((origin, op, *shapes, kind, lookup))

    # -- backward hooks -----------------------------------------------------------------------

    def _begin(
        self, pass_: PassNorms, pids: Sequence[int], box: list[Any], known: Any = _UNKNOWN
    ) -> bool | None:
        """The checks every per-example hook makes; ``None``: skip, else ``reaches``. ``known``:
        :meth:`_reaches_parameters`'s answer when the caller has it already (``None`` inside
        torch.autograd.grad())."""
        if self._replaying or self._paused:
            return None
        if torch.is_grad_enabled():
            # create_graph=True (gradient penalties, double backward): the loss that is
            # later backpropagated has second-order terms the factors do not see
            pass_.second_order = True
            return None
        reaches: bool | None
        if known is not _UNKNOWN:
            reaches = known
        else:
            try:
                reaches = self._reaches_parameters(pids)
            except RuntimeError:  # inside torch.autograd.grad(): decided when collected
                reaches = None
        if reaches is False:
            return None
        if not box:
            # a second backward through this output (retain_graph=True): the parameter
            # hooks see the repeated gradient and collect() refuses the step
            pass_.forward_tasks.add(torch._C._current_graph_task_id())
            return None
        self._enter(pass_)
        if not self._measures(pass_, reaches):
            box.clear()
            return None
        return True if reaches is None else reaches

    def _on_call_grad(self, pass_: PassNorms, call: _Call, grads: tuple) -> None:
        reaches = self._begin(pass_, [id(p) for p in call.params.values()], call.box)
        if reaches is None:
            return
        saved = call.box.pop()
        # (no torch.no_grad(): _begin goes on only where gradient mode is off, as in any
        # backward without create_graph)
        first = next((g for g in grads if g is not None), None)
        if first is None:
            return
        rule = call.rule
        if rule.native_layout:
            rows = self._rows(pass_, None, first.device)
            if rows is not None:
                if call.flat:  # (each drawn example's k rows)
                    ks = torch.arange(call.flat, device=rows.device)
                    rows = (rows[:, None] * call.flat + ks).reshape(-1)
                saved = rule.select(call.module, saved, rows)  # type: ignore[misc]
            facs = rule.factors(call.module, saved, grads)
            pass_.unread_picks += self._fallback_unread
            self._fallback_unread = []
            if call.flat:
                facs = {name: fold_rows(f, call.flat) for name, f in facs.items()}
        else:
            g = grads[0]
            if call.flat:
                g = g.unflatten(0, (call.size, call.flat))
            if call.dim != 0:
                g = g.movedim(call.dim, 0)
                saved = _move(saved, call.dim, call.size)
            rows = self._rows(pass_, g, g.device)
            if rows is not None:
                saved = _take_rows(saved, rows, call.size)
                g = g.index_select(0, rows)
            facs = rule.factors(call.module, saved, g)
            if pass_.audit is not None and rule.name == "norm" and _sums_in_16_bits(g):
                # the CPU's LayerNorm/GroupNorm backward adds its weight's and bias's
                # gradients up in 16 bits (Swin's final LayerNorm bias in bf16: 3
                # significant bits left at 32 images); autograd's sum is then no reference
                # for the coverage check — the attribution check still runs
                pass_.audit.skip_sums.update(id(p) for p in call.params.values())
                pass_.audit.unverified = pass_.audit.unverified or (
                    "the coverage of normalisation layers' weights and biases is not "
                    "checked under autocast on the CPU (autograd adds their gradients up "
                    "in 16 bits there)"
                )
            if (
                call.edges is not None
                and pass_.audit is not None
                and rows is None
                and call.dim == 0
                and reaches is True
                and not pass_.compiled
            ):
                self._check_rule(pass_, call, grads, facs)
        self._deliver(pass_, call.params, facs, reaches)

    def _loss_side(self, roots: Any) -> None:
        """A backward starts from ``roots`` (audit.BACKWARD_STARTS): the parameters it reaches
        from outside the model's forwards (:func:`~.graph.loss_side_params`: a walk of the loss
        alone, on every measured step) are noted on the step's passes, which are refused
        (settle.py). The audit's value check runs on its scheduled steps only, and a penalty
        switched on between them — or whose coefficient or hinge was 0 there — was measured
        without a word until 2026-12-07 (52-94% off, a hunt)."""
        if not self.per_example or self._paused or self._replaying or self._recomputing:
            return
        # (a compiled pass whose model-level hooks ran in the graph: ended by its "output"
        # event, traced.py — it never "returned" to an eager hook)
        # (the step's skipped micro-batches too — sub-batch and subset modes measure one a
        # step, and their losses are not followed —: what the walk finds there is carried to
        # the step's measured pass, collect._carry_skipped_loss_side; until a review of
        # 2026-12-07 a term coupling the examples, or a penalty, switched on in a skipped
        # micro-batch went unseen)
        measured = [
            p for p in self.passes if p.returned or (p.compiled and p.nodes_end is not None)
        ]
        if not measured or torch._C._current_graph_task_id() != -1:
            return
        tensors = [roots] if isinstance(roots, Tensor) else list(roots or ())
        # (the step's skipped micro-batches' forwards too: the walk stops at every forward)
        found, whole, shape = loss_side_params(tensors, self.passes, self._param)
        if shape is not None:
            for p in measured:
                p.loss_shapes.add(shape)
        if found:
            names = [self._param_name[pid] for pid in found]
            for p in measured:
                p.loss_side = p.loss_side or names
        elif not whole:
            for p in measured:
                p.loss_side_unchecked = True

    def _note_16_bit_embeddings(self, audit: audit_mod.PassAudit) -> None:
        """An embedding table stored in 16 bits on the CPU: torch's backward adds a row read
        many times up in 16 bits there (bf16, one row read 1,024 times: 4.9% off a float64 sum;
        16,384 times: 14%), so the coverage check may find a remainder that no missed use left
        — BERT in bf16 was refused at its fourth step over ``token_type_embeddings`` (every
        position reads row 0), blaming a missed use alone (a hunt, 2026-12-05). The check keeps
        its tolerance (a loosened one, tried that day, let a penalty worth 8–24% of the table's
        gradient through, a review found); a refusal names this cause and its fix too."""
        for module in self._calls:
            if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                continue
            weight = module.weight
            if _sums_in_16_bits(weight) and weight.requires_grad:
                audit.sixteen_bit_tables.add(id(weight))

    @staticmethod
    def _check_rule(pass_: PassNorms, call: _Call, grads: tuple, facs: dict[str, Factor]) -> None:
        """The audit's check of a rule the user registered (:meth:`PassAudit.check_rule`), on
        the parameters this call alone uses in the pass."""
        assert pass_.audit is not None and call.edges is not None
        edges, gs, shapes = [], [], []
        for item, g in zip(call.edges, grads, strict=False):
            if item is not None and g is not None:
                edges.append(item[0])
                gs.append(g)
                shapes.append(item[1])
        params = {
            name: p
            for name, p in call.params.items()
            if pass_.uses.get(id(p), 1) == 1 and id(p) not in pass_.audit.skip_sums
        }
        pass_.audit.check_rule(call.label, edges, gs, params, facs, shapes)

    def _deliver(
        self,
        pass_: PassNorms,
        params: dict[str, nn.Parameter],
        facs: dict[str, Factor],
        reaches: bool | None,
    ) -> None:
        task = torch._C._current_graph_task_id()
        for pname, factor in facs.items():
            p = params.get(pname)
            if p is None:  # a parameter unfrozen later: collect() reports it
                continue
            if reaches is None:
                if pass_.compiled:
                    factor = _owned(factor, p.shape)
                pass_.deferred.setdefault(task, []).append((p, factor))
            else:
                self._add(pass_, p, factor)

    def _on_meeting_grad(self, pass_: PassNorms, meeting: Meeting, grad: Tensor) -> None:
        pids = [pid for _, _, r in meeting.extra["routes"] for pid in self._route_pids(r)]
        reaches = self._begin(pass_, pids, meeting.box)
        if reaches is None:
            return
        inputs = meeting.box[1:]
        meeting.box.clear()
        try:
            dim = meeting.extra["dim"]
            n = pass_.batch_size
            with torch.no_grad():
                kind = meeting.kind
                if kind == "expand":
                    # s.repeat(N, 1, …): example i's gradient of s is its own block of k rows
                    repeat = meeting.extra.get("repeat", False)
                    g = grad.unflatten(0, (n, -1)) if repeat else grad.movedim(dim, 0)
                    rows = self._rows(pass_, g, g.device)
                    for _, _, (origin, operand) in meeting.extra["routes"]:
                        per = (
                            g.reshape(n, *operand.shape)
                            if repeat
                            else per_example_reduce(grad, tuple(operand.shape), dim, n)
                        )
                        if rows is not None:
                            per = per.index_select(0, rows)
                        self._to_sources(pass_, origin, operand, per, reaches)
                else:
                    x = inputs[0] if inputs else None
                    self._meeting_factors(pass_, meeting, x, grad, dim, n, reaches)
        except RuntimeError as error:
            # the graph of a tensor computed from parameters alone, read before FSDP2 gathers
            # the parameters it saved (FSDP2 resizes an unsharded parameter's storage to 0 when
            # it reshards): a raw "setStorage ... storage of size 0" until 2026-12-07, the
            # data-parallel fuzzer's seeds 7 and 300
            if self._replay_allowed or "storage of size 0" not in str(error):
                raise
            raise UnsupportedModuleError(freed_by_fsdp_message()) from error

    def _meeting_factors(
        self,
        pass_: PassNorms,
        meeting: Meeting,
        x: Tensor,
        grad: Tensor,
        dim: int,
        n: int,
        reaches: bool | None,
    ) -> None:
        kind = meeting.kind
        if kind == "linear":
            a, d = _positions(x, grad, dim, n)
            rows = self._rows(pass_, d, d.device)
            if rows is not None:
                a, d = a.index_select(0, rows), d.index_select(0, rows)
            transposed = meeting.extra["transposed"]
            for route, role, data in meeting.extra["routes"]:
                if role == "weight":
                    factor: Factor = LinearFactor(a, d, transposed=transposed)
                    dense = lambda: torch.einsum(  # noqa: E731
                        "npo,npi->nio" if transposed else "npo,npi->noi", _acc(d), _acc(a)
                    )
                else:
                    factor = DenseFactor(acc_sum(d, 1))
                    dense = lambda: _acc(d).sum(1)  # noqa: E731
                self._route(pass_, route, data, factor, dense, reaches)
        elif kind == "embedding":
            idx = x.movedim(dim, 0) if dim else x
            g = grad.movedim(dim, 0) if dim else grad
            bag = meeting.extra.get("bag_weight")  # F.embedding_bag: [N, L], Σ_t weight·row
            rows = self._rows(pass_, g, g.device)
            if rows is not None:
                idx, g = idx.index_select(0, rows), g.index_select(0, rows)
                bag = bag.index_select(0, rows) if bag is not None else None
            k = idx.shape[0]
            idx2 = idx.reshape(k, -1)
            if bag is not None:
                w3 = bag.unsqueeze(-1).to(g.dtype)
                # (weight 0 selected away, not multiplied: a NaN there, bag_factors)
                d3 = torch.where(w3 != 0, w3 * g.reshape(k, 1, -1), 0)
            else:
                d3 = g.reshape(k, idx2.shape[1], -1)
            pad = meeting.extra.get("padding_idx")
            if pad is not None:
                # (selected away, not multiplied by 0: a NaN there stayed, embedding_factors)
                d3 = torch.where((idx2 != pad).unsqueeze(-1), d3, 0)
            for route, _, data in meeting.extra["routes"]:
                table = data[2] if route == "direct" else data[1]
                factor = EmbeddingFactor(idx2, d3, table.shape[0])
                flat = torch.Size((table.shape[0], math.prod(table.shape[1:])))
                self._route(
                    pass_, route, data, factor, lambda f=factor, s=flat: f.dense(s), reaches
                )
        elif kind == "conv":
            from noisescale.per_example import conv

            rows = self._rows(pass_, grad, grad.device)
            xx, g = x, grad
            if rows is not None:
                xx, g = x.index_select(0, rows), grad.index_select(0, rows)
            spec = meeting.extra["spec"]
            if meeting.extra.get("transposed"):
                # (the adjoint convolution, δ to x: conv.transposed_factors' rule)
                facs = conv.factors(spec, g, xx)
                facs["bias"] = DenseFactor(acc_sum(g.reshape(g.shape[0], g.shape[1], -1), 2))
            else:
                facs = conv.factors(spec, xx, g)
            for route, role, data in meeting.extra["routes"]:
                factor = facs[role]
                self._route(
                    pass_, route, data, factor,
                    lambda f=factor, op=data[-1]: f.dense(op.shape), reaches,
                )  # fmt: skip

    def _route(
        self,
        pass_: PassNorms,
        route: str,
        data: Any,
        factor: Factor,
        dense: Callable[[], Tensor],
        reaches: bool | None,
    ) -> None:
        if route == "direct":
            source, relation, _ = data
            if relation[0] == "t":
                assert isinstance(factor, LinearFactor)
                factor = LinearFactor(factor.a, factor.d, factor.groups, not factor.transposed)
            elif relation[0] == "rows":
                factor = SliceFactor(factor, relation[1], relation[2])
            self._deliver(pass_, {"p": self._param[source.pid]}, {"p": factor}, reaches)
            return
        origin, operand = data
        per = dense()
        # (k given, not -1: an operand of no element, a [0, V] weight, has no -1 to infer)
        per = per.reshape(per.shape[0], *operand.shape)
        self._to_sources(pass_, origin, operand, per, reaches)

    def _to_sources(
        self, pass_: PassNorms, origin: Origin, operand: Tensor, per: Tensor, reaches: bool | None
    ) -> None:
        """Carry per-example gradients of a shared operand back to its sources."""
        sources = origin.sources
        if (
            len(sources) == 1
            and sources[0].tensor is operand
            and (sources[0].edge is None or operand._version == sources[0].version)
        ):
            grads: Sequence[Tensor | None] = [per]
        else:
            # Plain tensors and gradient edges, so that autograd.grad does not dispatch through
            # the shared tensors' __torch_function__: that runs it with subclass dispatch
            # disabled, and a forward activation checkpointing recomputes inside it would then
            # skip the shared tensors' handling and save other tensors than the original
            # forward did (checkpoint's CheckpointError: Mixtral's router, checkpointed)
            with torch._C.DisableTorchFunctionSubclass(), torch.enable_grad():
                output = operand.as_subclass(Tensor)  # an alias, upstream of operand's graph
                edge = torch.autograd.graph.get_gradient_edge
                edges = [s.edge if s.edge is not None else edge(s.tensor) for s in sources]
            with audit_mod.replaying(), torch.enable_grad():
                grads = _batched_grad(output, edges, per.to(operand.dtype))
        for source, g in zip(sources, grads, strict=True):
            slot = pass_.slots.get(id(source))
            if slot is None:
                continue
            if g is not None:
                g = _acc(g)
                slot.total = g if slot.total is None else slot.total + g
            slot.arrived += 1
            if slot.arrived >= slot.expected:
                self._finish_slot(pass_, slot, reaches)
            elif pass_.compiled and slot.total is g:
                slot.total = g.clone()  # it may be a view of the compiled graph's memory

    def _finish_slot(self, pass_: PassNorms, slot: _Slot, reaches: bool | None) -> None:
        del pass_.slots[id(slot.source)]
        source = slot.source
        if source.pid is not None:
            if slot.total is None:
                return
            p = self._param[source.pid]
            # (k given, not -1: a parameter of no element — MobileBERT's LM head's dense
            # weight, [0, V] where its embedding size is its hidden size — made the reshape
            # crash until 2026-12-07, a fuzz hunt; its norm is 0)
            per = slot.total.reshape(slot.total.shape[0], *p.shape)
            self._deliver(pass_, {"p": p}, {"p": DenseFactor(per)}, reaches)
            return
        call: _Call = source.call
        saved = call.box[0]
        if slot.total is None:
            return
        per = slot.total  # [k, *output shape]: each example's gradient of the call's output
        k = per.shape[0]
        rows = call.rule.shared_rows
        if rows is not None and isinstance(saved, Tensor) and rows(call.module, saved):
            # each example made the call on all m rows: the factors of the k·m (example, row)
            # pairs, summed over each example's m rows (contiguous groups of m)
            m = saved.shape[0]
            x = saved.unsqueeze(0).expand(k, *saved.shape).reshape(k * m, *saved.shape[1:])
            facs = call.rule.factors(call.module, x, per.reshape(k * m, *per.shape[2:]))
            index = torch.arange(k * m, device=per.device)
            groups = Subbatches(index, index[:0], k, m, (m,) * k)
            facs = {name: group_factor(f, groups) for name, f in facs.items()}
        else:
            facs = call.rule.factors(call.module, _expand_saved(saved, k), per)
        self._deliver(pass_, call.params, facs, reaches)

    def _route_pids(self, route: Any) -> list[int]:
        if isinstance(route, tuple) and len(route) == 3 and isinstance(route[0], Source):
            return [route[0].pid]
        origin = route[0]
        return [pid for s in origin.sources for pid in self._source_pids(s)]

    def _enter(self, pass_: PassNorms) -> None:
        """Record that the running backward goes through ``pass_``."""
        task = torch._C._current_graph_task_id()
        pass_.tasks.add(task)
        pass_.forward_tasks.add(task)
        self._task_pass.setdefault(task, pass_)

    def _reaches_parameters(self, pids: Sequence[int]) -> bool:
        """Whether the running backward computes gradients of these parameters.

        False for a backward towards the inputs only (adversarial examples, saliency maps).
        """
        for pid in pids:
            node = self._accumulator(pid)
            if node is None or torch._C._will_engine_execute_node(node):
                return True
        return False

    def _measures(self, pass_: PassNorms, reaches: bool | None) -> bool:
        """Whether this pass's per-example norms are computed (decided once per pass).

        Every pass's are for the exact mode (and audited passes). With a subset, the pass at
        ``subset_position`` among those the step's backwards reach is measured, in whatever
        backward later runs through it, and the others are skipped. Inside
        torch.autograd.grad() (``reaches`` ``None``) whether the parameters are reached is known
        only at collect(): such a pass is computed without taking a position.
        """
        if pass_.measured:
            return True
        if pass_.skipped:
            return False
        if self.per_example_fraction >= 1.0:
            return True
        if reaches is None:
            return True
        # one position per backward: the forwards that one backward runs through together
        # (two forwards, one loss) are one pass of the step (merged at collect), measured or
        # skipped together (before 2026-12-04 each forward took a position of its own, so only
        # part of such a pass was measured, the later ones never, and the audit refused)
        task = torch._C._current_graph_task_id()
        measured = self._task_measured.get(task)
        if measured is None:
            position, self._positions = self._positions, self._positions + 1
            measured = self._task_measured[task] = position == self.subset_position
        if measured:
            pass_.measured = self._measured_found = True
            return True
        pass_.skipped = True
        return False

    def _rows(self, pass_: PassNorms, grad: Tensor | None, device: torch.device) -> Tensor | None:
        """The pass's random subset of examples (the same for every layer), or ``None`` for all.

        ⌈fraction·N⌉ rows for a step of N examples (N from the last step while this one is
        running: its first micro-batch does not know how many follow), at most the pass's own.
        They are drawn with replacement, example i with probability q_i = ½/n + ½·π_i/Σπ,
        where π_i = |δ_i|² is the squared norm of example i's rows of the output gradient of
        the layer whose hook runs first (the one nearest the loss: for a classifier or a
        language model, the logits' gradient), which tracks |g_i|². Each drawn norm is later
        weighted by 1/(n·q_i) ≤ 2 (:attr:`PassNorms.row_weights`), so their mean is still
        unbiased for the mean of |g_i|² over the pass (Hansen–Hurwitz), whatever π is; the
        uniform half bounds the weights. An audited pass measures every example.
        """
        if pass_.subbatches is not None:
            return None
        n_pass = pass_.batch_size
        n = max(n_pass, self.last_step_examples or 0)
        k = math.ceil(self.per_example_fraction * n)
        if k >= n_pass:
            return None
        if pass_.rows is None:
            gen = self._generator(device)
            q = torch.full((n_pass,), 1.0 / n_pass, device=device)
            if grad is not None and grad.dim() > 0 and grad.shape[0] == n_pass:
                flat = _acc(grad.detach().reshape(n_pass, -1))
                proxy = torch.linalg.vector_norm(flat, dim=1).square().to(q.dtype)
                total = proxy.sum()
                usable = torch.isfinite(total) & (total > 0)  # no host sync
                q = torch.where(usable, 0.5 * q + 0.5 * proxy / total.clamp_min(1e-30), q)
            # inverse-CDF draws: torch.multinomial validates its input on the host when it draws
            # one sample (a device sync on GPUs, in the torch versions we read)
            cdf = torch.cumsum(q, 0)
            u = torch.rand(k, generator=gen, device=device, dtype=cdf.dtype) * cdf[-1]
            rows = torch.searchsorted(cdf, u, right=True).clamp_max(n_pass - 1)
            pass_.rows = rows
            pass_.row_weights = 1.0 / (n_pass * q[rows])
        if pass_.audited:
            # the audit needs every example; the drawn rows are picked when the pass is
            # collected, so an audited step reports exactly what it would have without the audit
            return None
        return pass_.rows if pass_.rows.device == device else pass_.rows.to(device)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
            gen.manual_seed(self._seed)
        return gen

    def _draw_subset_position(self, reached: int) -> int:
        """Which pass of the next step is measured: drawn on the host (a CPU generator), so
        reading it never waits for a device."""
        gen = self._generator(torch.device("cpu"))
        return int(torch.randint(reached, (1,), generator=gen))

    def _audit_generator(self, device: torch.device) -> torch.Generator:
        """The audit's own random stream: auditing a step never shifts the subset's draws."""
        gen = self._audit_generators.get(device)
        if gen is None:
            gen = self._audit_generators[device] = torch.Generator(device=device)
            gen.manual_seed(self._seed ^ 0x5EED)
        return gen

    def rng_state(self) -> dict[str, list[int]]:
        """The states of the subset generators by device (for checkpoints: an exact resume)."""
        return {str(d): g.get_state().tolist() for d, g in self._generators.items()}

    def set_rng_state(self, state: dict[str, list[int]]) -> None:
        """Restore :meth:`rng_state`."""
        for device, values in state.items():
            self._generator(torch.device(device)).set_state(torch.tensor(values, dtype=torch.uint8))
