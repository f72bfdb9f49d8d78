"""A pass opened and closed on the model's side: the model's forward pre-hook that opens a pass
(its batch size, the sub-batches drawn), the checks made there (shapes, tied rows, forwards no
backward reached), the model's output taken as the pass's targets, and the hooks on scopes (a
module whose parameters are used directly in its forward). A mixin of
:class:`~.engine.PerExampleNorms`: where a pass starts, read in one place."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad as _fwad
from torch.utils._pytree import tree_leaves as _tree_leaves

from noisescale.errors import NoiseScaleInputError, UnsupportedModuleError
from noisescale.per_example import audit as audit_mod
from noisescale.per_example.factors import Subbatches
from noisescale.per_example.graph import (
    _autocast_enabled,
    _cast_source,
    _checkpoint_recompute,
    _float16_in_use,
    _MirroredCheckpoint,
    _saved_hooks_top,
    _sequence_nr,
)
from noisescale.per_example.messages import (
    _REENTRANT_LEAD,
    forward_ad_message,
    nested_message,
)
from noisescale.per_example.pass_checks import (
    _fed_by,
    _node_key,
)
from noisescale.per_example.passes import PassNorms
from noisescale.per_example.shared import (
    Origin,
    SharedTensor,
    Source,
    _has_dual,
    _plain,
    wrap,
)
from noisescale.per_example.values import (
    _batch_tensor,
    _device_of,
    _first_tensor,
    _flat_values,
    _size_along,
    _tensors,
)


def _called_children(module: nn.Module, spine: frozenset[int]) -> list[nn.Module]:
    """The modules ``module``'s own code may call: its children, and the blocks of its
    containers (an ``nn.ModuleList`` or ``nn.ModuleDict`` is never called, an
    ``nn.Sequential`` may be iterated instead): those blocks' code is theirs, not the model's.
    Until 2026-12-07 the loss watch followed it as the model's own, and read
    ``nn.MultiheadAttention``'s time-major out_proj on [T·N, D] with D = N in a block of a
    ModuleList as a parameter meeting examples along the wrong dimension (a fuzz hunt)."""
    out = []
    for child in module.children():
        out.append(child)
        if id(child) not in spine and isinstance(
            child, nn.ModuleList | nn.ModuleDict | nn.Sequential
        ):
            out += _called_children(child, spine)
    return out


def _inside_functorch() -> bool:
    """Inside a torch.func transform (``vmap(grad(f))`` over the model, the user's per-sample
    gradients): its forwards are no pass of the step — their gradients never reach .grad — and
    drawing sub-batches inside vmap is an error (a review found the tracker broke such a call)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _selective_checkpointing() -> bool:
    """Whether a forward runs inside torch's selective activation checkpointing
    (``checkpoint(..., context_fn=create_selective_checkpoint_contexts(...))``): its caching
    mode is on the dispatch stack."""
    caching = getattr(torch.utils.checkpoint, "_CachingTorchDispatchMode", None)
    if caching is None:
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(isinstance(mode, caching) for mode in _get_current_dispatch_mode_stack())


def _output_edges(output: Any) -> list[tuple[Any, torch.Size]]:
    """The gradient edges a backward through the model's outputs enters by, with the outputs'
    shapes: each output's, and the tensor an output was cast from (accelerate's
    convert_outputs_to_fp32 for the Trainer's bf16=True casts the logits after the loss was
    computed from them: the loss's gradient never reaches the output)."""
    edges = []
    for out in _tensors(output):
        if out.requires_grad:
            edges.append((torch.autograd.graph.get_gradient_edge(out), out.shape))
            source = _cast_source(out)
            if source is not None:
                edges.append((source, out.shape))
    return edges


class PassOpening:
    """:class:`~noisescale.per_example.engine.PerExampleNorms`' forward on the model's side: a
    pass opened by the model's forward, its output's gradients awaited, scopes entered and left."""

    # -- forward hooks ------------------------------------------------------------------------

    def _active(self) -> bool:
        # a forward that checkpoint recomputes inside the audit's replay must do what the
        # original forward did to the tensors, like any recomputation (_hook_pass)
        replaying = self._replaying and not _checkpoint_recompute()
        return (
            not self._recomputing
            and not self._paused
            and not replaying
            and not _inside_functorch()
            and torch.is_grad_enabled()
            and bool(self.passes)
            and not self.passes[-1].idle
            and not self._closed()
        )

    def _note_unopened(
        self, label: str, pids: list[int], output: Any = None, scope: nn.Module | None = None
    ) -> None:
        """Note the step's first layer (or module using parameters ``pids`` directly) that
        ran with gradients enabled outside any forward of the model: before the first, or
        between a pass's backward and the next forward (:meth:`_closed`) — inputs_embeds built
        by the caller, a submodule called by itself —, for the refusal to name
        (:meth:`collect`). Only a call whose ``output`` a backward reaches is noted, when its
        gradient arrives (a ``scope`` module's output, at its exit): a logging call,
        ``model.emb(ids).norm()``, was refused at every step for a while on 2026-12-07 (a
        review); collect() refuses every call noted, under a torch.func transform too."""
        if (
            self._unopened is not None
            or not torch.is_grad_enabled()
            or self._paused
            or self._recomputing
            or self._replaying
        ):
            return
        names = [self._param_name[pid] for pid in pids]
        # (under a torch.func transform — grad, vjp, vmap over functional_call — the model's
        # own call opens no pass either: named so, a hunt of 2026-12-06)
        transform = torch._C._functorch.maybe_current_level() is not None
        if transform and not self.passes:
            self._set_unopened(label, names, transform)  # (no tensor hook reaches it there)
        elif not self.passes or self._closed():
            # (before the first forward too, since 2026-12-07: collect() now refuses any such
            # use a backward reached, where only the audit's remainder did, and a call for
            # logging before the forward is no use)
            if scope is not None:
                self._unopened_scopes[scope] = (label, names, transform)
            else:
                self._note_when_reached(output, label, names, transform)

    def _set_unopened(self, label: str, names: list[str], transform: bool, order: int = -1) -> None:
        """Note the call; of those a backward reached (in reverse order), the first to run is
        the one named (``order``: when it ran)."""
        if self._unopened is None or order < self._unopened_order:
            self._unopened = label
            self._unopened_params = names
            self._unopened_transform = transform
            self._unopened_order = order

    def _note_when_reached(
        self, output: Any, label: str, names: list[str], transform: bool
    ) -> None:
        self._unopened_calls += 1
        order = self._unopened_calls
        for t in _tensors(output):
            if t.requires_grad and t.grad_fn is not None:
                # a pre-hook on the node that made the output, not a hook on the tensor: a
                # backward that stops at the output — torch.autograd.grad(…, inputs=e), an input
                # saliency for a log — does not run the node and is no use of the parameters
                # (refused every step for a while on 2026-12-07, a review)
                t.grad_fn.register_prehook(
                    lambda grads: self._set_unopened(label, names, transform, order)  # type: ignore[func-returns-value]
                )

    def _closed(self) -> bool:
        """Whether the last pass is over: its forward returned and a backward wrote .grad
        through it, and no backward runs now. A layer of the model called then belongs to no
        forward — the next micro-batch's inputs_embeds built by the caller (a pass's own loss
        code runs before its backward). Until 2026-12-07 such a call was taken as the last
        pass's loss code: the next micro-batch's rows measured into that pass's examples, and
        with a first micro-batch whose loss was 0 the audit passed (norms nonzero for examples
        whose loss was 0, 9-36% off, without a word, a hunt)."""
        last = self.passes[-1] if self.passes else None
        return (
            last is not None
            and last.returned
            and last.wrote
            and torch._C._current_graph_task_id() == -1
        )

    def _on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._loss_watch.pause()  # (the model's own operations are the layer hooks' to follow)
        if (
            self._recomputing
            or self._paused
            or self._replaying
            or not torch.is_grad_enabled()
            or _inside_functorch()
        ):
            return
        # what a compiled forward's traced hooks read the batch's size from (its shape only)
        self._trace_batch = _batch_tensor(args, kwargs, self._model_dim)
        self._open_pass(args, kwargs)
        if self.passes and self._inside_compiled_call:
            self.passes[-1].compiled_call = True
        elif (
            self.per_example
            and self.auditing_enabled
            and self._audit_due
            and self._active()
            and not self.passes[-1].skipped
            and self.passes[-1].batch_size > 1
            # (not a recompute inside the backward — the model and its loss in one checkpoint:
            # it began the watch again after the backward's start and the pass was withheld as
            # unchecked, every step, since 2026-12-07's walk reads hooked saved tensors
            # without running the recompute; a review)
            and torch._C._current_graph_task_id() == -1
        ):
            # an audited step's forward is followed in the model's own code: a loss the model
            # computes itself must keep the examples apart too (loss_watch.begin_forward)
            self.passes[-1].forward_watched = True
            self._loss_watch.begin_forward(self.passes[-1], self.pairs)

    def _check_tied_rows(self, n: int) -> None:
        """Under ``paired_rows`` or ``grouped_rows`` every forward — each accumulation
        micro-batch, measured or not, one row or more — must hold whole pairs or groups: one
        split across micro-batches ties them together, and the micro-batch norms would take
        them for independent draws (a review found GRPO with one completion a micro-batch read
        B_simple 0.40x its truth, its interval excluding it)."""
        if self.pairs is None or not self.per_example or not n:
            return
        if isinstance(self.pairs, int) and n % self.pairs:
            g = self.pairs
            raise NoiseScaleInputError(
                f"grouped_rows={g} keeps blocks of {g} consecutive rows together, but this "
                f"forward had N = {n} rows, not a multiple of {g}; feed whole groups in every "
                "forward, each accumulation micro-batch too (every prompt with all its "
                "completions; drop_last=True in the loader), or drop grouped_rows if the rows "
                "are not grouped"
            )
        if not isinstance(self.pairs, int) and n % 2:
            raise NoiseScaleInputError(
                f"paired_rows={self.pairs!r} pairs the rows of a batch in two (row i "
                f"with row {'N − 1 − i' if self.pairs == 'flip' else 'i + N/2'}), but this "
                f"forward had N = {n} rows, an odd number; feed even batches in every forward, "
                "each accumulation micro-batch too (timm's Mixup requires them, drop_last=True "
                "in the loader), or drop paired_rows if the rows are not paired"
            )

    def _check_shapes(self) -> None:
        """Refuse a parameter whose data was given another shape since the tracker was built
        (``resize_token_embeddings()`` assigns the new table to the old Parameter's ``.data``):
        the AccumulateGrad node the engine holds for it expects the old shape, and autograd
        would fail in the backward with an error that does not say why."""
        changed = [pid for pid, shape in self._shapes.items() if self._param[pid].shape != shape]
        if changed:
            names = [self._param_name[pid] for pid in changed]
            raise NoiseScaleInputError(
                f"parameters {names[:6]}{'…' if len(names) > 6 else ''} changed shape after the "
                "tracker was created (resize_token_embeddings() assigns the resized table to "
                "the same Parameter): the tracker was built on the old shapes. Create the "
                "tracker after the model is resized (tracker.remove() first; what it measured "
                "stays in its history)"
            )

    #: Forwards with gradients on that no backward has reached, in one step, from which an
    #: evaluation loop outside ``torch.no_grad()`` is named (:meth:`_watch_unreached`).
    UNREACHED_WARNING = 16

    def _watch_unreached(self) -> None:
        """Warn once when :data:`UNREACHED_WARNING` forwards of the step have had no backward:
        an evaluation loop with gradients on. Each such pass keeps its input batch until the
        step (its graph goes with its outputs, an audited one's too: every evaluation forward
        of an MLP with Dropout, a structure the audits have not seen, kept its activations until
        2026-12-05, 83.9 MB for 40 batches of 256). Counted every :data:`UNREACHED_WARNING`
        forwards."""
        k = self.UNREACHED_WARNING
        if self._unreached_warned or len(self.passes) < k or len(self.passes) % k:
            return
        waiting = sum(1 for p in self.passes if not p.tasks)
        if waiting >= k:
            self._unreached_warned = True
            warnings.warn(
                f"noisescale: {waiting} forwards of the measured model ran with gradients on and "
                "no backward since the last tracker.step() — an evaluation loop outside "
                "torch.no_grad()? Each keeps its input batch until the next step; run "
                "evaluation under torch.no_grad() (or tracker.paused()). Forwards whose losses "
                "are summed and backpropagated together later are measured as they should be",
                RuntimeWarning,
                stacklevel=4,
            )

    def _open_pass(self, args: tuple, kwargs: dict) -> None:
        if torch._C._current_graph_task_id() != -1:
            # a forward re-run during backward (activation checkpointing) belongs to its pass
            return
        # Every forward opens a pass; passes that no backward reaches (a validation forward
        # with grad enabled) are dropped, and passes that one backward ran through together
        # (two forwards, one loss) are merged, when the step collects them.
        self._check_shapes()
        if self.per_example and any(
            isinstance(v, Tensor) and v.is_nested for v in _flat_values(args, kwargs)
        ):
            # (crashed in the audit's replay or the norms until 2026-12-06, a hunt)
            raise UnsupportedModuleError(nested_message("the model's input"))
        if (
            self.per_example
            and _fwad._current_level >= 0
            and torch.is_grad_enabled()
            and _has_dual(_flat_values(args, kwargs))
        ):
            # (a model using its weights directly, x @ self.W, runs no layer whose hook would
            # see the dual numbers: tr Σ 42% off between audits, a review)
            raise UnsupportedModuleError(forward_ad_message("the model"))
        n = self._batch_size_of_model(args, kwargs)
        self._check_tied_rows(n)
        self._watch_unreached()
        fed_by = _fed_by(self.passes, args, kwargs)
        if self.idle:
            self._context.clear()
            self.passes.append(PassNorms(batch_size=n, skipped=True, idle=True, fed_by=fed_by))
            return
        self._guard_param_hooks()
        weights = self.precondition() if self.precondition is not None else None
        # a forward after the step's measured backward (the next accumulation micro-batch)
        # cannot be measured: no layer hooks for it
        skipped = self._measured_found and self.per_example_fraction < 1.0
        if self.subbatches and self.last_step_passes > 1:
            # Sub-batch mode with accumulation: one micro-batch per step, at a random position
            # among the last step's, is split and measured; the others keep their micro-batch
            # norms only (each micro-batch is already a group whose norm the micro-batch source
            # pairs with the step's gradient). The position is drawn before the step, whatever
            # its data, so every sub-batch norm stays unbiased; measuring every micro-batch
            # would cost the sub-batch overhead m times for k·m groups where m + k do nearly as
            # well. Decided here, at the forward, so that skipped micro-batches run plain.
            position, self._forwards = self._forwards, self._forwards + 1
            skipped = skipped or position != self.subset_position
        pass_ = PassNorms(batch_size=n, weights=weights, skipped=skipped or n == 0)
        pass_.fed_by = fed_by
        pass_.forward_skipped = pass_.skipped
        pass_.n_source = _first_tensor(args, kwargs)
        examples = _batch_tensor(args, kwargs, self._model_dim)
        if examples is not None and examples.numel() and examples.stride(self._model_dim):
            # (not one row broadcast to every example: a prompt expanded over the batch)
            pass_.examples = examples
            pass_.examples_version = None if examples.is_inference() else examples._version
        pass_.inputs = (args, kwargs)
        if self.subbatches and self.per_example and n >= 2 and not pass_.skipped:
            unit = self.pairs if isinstance(self.pairs, int) else 2
            if self.pairs is not None and n < 2 * unit:
                pass  # one pair (group): no two sub-batches to compare; no small-batch norm
            elif self.pairs is not None or self._split():
                source = pass_.n_source
                device = source.device if source is not None else torch.device("cpu")
                pass_.subbatches = Subbatches.split(
                    n, self.subbatches, self._generator(device), device, self.pairs
                )
            else:
                pass_.unsplit = True
        pass_.amp = _autocast_enabled()
        self._context.clear()
        self.passes.append(pass_)
        pass_.nodes_at = _sequence_nr()

    #: Sub-batch mode re-checks a model measured per example this often (shapes may change).
    RECHECK_SUBBATCHES = 256

    @property
    def subbatches_pay(self) -> list | None:
        """What :meth:`_split` has learnt, for a state_dict: ``[pays, passes since the last
        split]``, or ``None`` while nothing is known."""
        if self._subbatches_pay is None:
            return None
        return [self._subbatches_pay, self._unsplit_passes]

    @subbatches_pay.setter
    def subbatches_pay(self, value: list | None) -> None:
        if value is None:
            self._subbatches_pay, self._unsplit_passes = None, 0
        else:
            self._subbatches_pay, self._unsplit_passes = bool(value[0]), int(value[1])

    def _split(self) -> bool:
        """Sub-batch mode: split this pass into sub-batches, or measure every example?

        Sub-batches pay where a weight's gradient comes from their products
        (:mod:`~noisescale.per_example.subbatch`). In a pass where none does, every layer's
        sub-batch norms would be merged from its per-example factors, so measuring every
        example instead costs less (no merging) and is more precise (all pairs of examples
        cancel their own norms, not only pairs in different sub-batches): after a split pass
        without products, passes are measured per example, and split again every
        :attr:`RECHECK_SUBBATCHES` passes to see whether that still holds. Both are unbiased.
        """
        if self._subbatches_pay is not False:
            return True
        self._unsplit_passes += 1
        if self._unsplit_passes >= self.RECHECK_SUBBATCHES:
            self._unsplit_passes = 0
            return True
        return False

    def _batch_size_of_model(self, args: tuple, kwargs: dict) -> int:
        if self.examples_of is not None:
            n = self.examples_of(args, kwargs)
            if isinstance(n, Tensor) and n.numel() == 1:
                n = int(n)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise NoiseScaleInputError(
                    f"examples= returned {n!r} for a call of the model; it must return the "
                    "number of examples in the call, an integer ≥ 0"
                )
            return n
        call = self._calls.get(self.model)
        if call is not None and call[0].batch_size is not None:
            return call[0].batch_size(self.model, args, kwargs)
        for value in (*args, *kwargs.values()):
            size = _size_along(value, self._model_dim)
            if size is not None:
                return size
        raise NoiseScaleInputError(
            "the model was called without a tensor argument, so the number of examples is "
            "unknown; pass the batch as a tensor (dim 0 = examples), or — for an object such as "
            "a batch of graphs — measure with per_example=False and tell the tracker how many "
            "examples a call holds: GradientNoiseTracker(model, per_example=False, "
            "examples=lambda args, kwargs: args[0].num_graphs)"
        )

    def _install_spine_hooks(self) -> None:
        """The loss watch follows the model's own code in an audited step's forward
        (:meth:`LossWatch.begin_forward`): hooks on the children with parameters of the model
        and of the modules it only delegates to tell it when one of them runs (not followed)
        and what it returned (rows of examples). Registered once, so that a checkpoint's
        recomputation runs the same hooks; the engine's own layers are followed through."""
        watch = self._loss_watch
        for module in self.model.modules():
            if id(module) not in self._spine:
                continue
            for child in _called_children(module, self._spine):
                if (
                    id(child) in self._spine
                    or child in self._calls
                    or next(child.parameters(), None) is None
                    or isinstance(child, torch.jit.ScriptModule)  # (takes no hooks: followed)
                ):
                    continue
                self._handles.append(
                    child.register_forward_pre_hook(
                        self._hook(
                            lambda m, a: watch.module_called(m), lambda m, a: None, owner=child
                        )
                    )
                )
                self._handles.append(
                    child.register_forward_hook(
                        self._hook(
                            lambda m, a, o: watch.module_returned(m, o),
                            lambda m, a, o: None,
                            owner=child,
                            post=True,
                        ),
                        always_call=True,
                    )
                )

    def _on_model_raised(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._loss_watch.forward_pass is not None:  # (_on_model_output did not run)
            self._loss_watch.end_forward()
            self._loss_watch.pause()

    def _on_model_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        try:
            self._model_output(output)
        finally:
            self._loss_watch.end_forward()
            self._loss_watch.resume()  # (a watched pass's loss may go on after any forward)

    def _model_output(self, output: Any) -> None:
        self._trace_batch = None
        # (a loss the model computed itself, to which its forward may add terms of its own)
        self._returned_loss = isinstance(getattr(output, "loss", None), Tensor)
        self._returned_router_logits_only = (
            not self._returned_loss and getattr(output, "router_logits", None) is not None
        )
        step_forward = (
            self.passes
            and not (self._recomputing or self._paused or self._replaying)
            and torch.is_grad_enabled()
            and torch._C._current_graph_task_id() == -1
        )
        if step_forward:
            self.passes[-1].fed_marks = {
                _node_key(t.grad_fn) for t in _tensors(output) if t.grad_fn is not None
            }
            # (every forward's span of sequence numbers, skipped ones' too: the walk of the
            # loss stops there, Backward._loss_side)
            self.passes[-1].nodes_end = _sequence_nr()
        if not self._active() or torch._C._current_graph_task_id() != -1:
            if step_forward and self.passes[-1].idle and not _inside_functorch():
                self._hook_idle_outputs(self.passes[-1], output)
            return
        pass_ = self.passes[-1]
        if (
            pass_.nodes_at is not None
            and not pass_.returned
            and not (pass_.compiled or pass_.compiled_call)
        ):
            # What the forward did between the layers is part of its structure: a weight used
            # again outside its layer, examples mixed (a batch mean, a roll), a step of the
            # loop that changes only there records other autograd operations — counted by
            # autograd's own sequence number (thread-local, one per node made) — and the
            # pass is audited as a structure never seen (eager forwards: a compiled one
            # makes its graph's nodes, which Dynamo's guards tie to its structure)
            pass_.nodes = _sequence_nr() - pass_.nodes_at
        if self.per_example and not (pass_.skipped or pass_.compiled or pass_.compiled_call):
            # (rows picked along the examples that meet no layer after: (u - v[idx]).pow(2))
            for out in _tensors(output):
                if self._model_dim == 0 and out.dim() > 0 and out.shape[0] == pass_.batch_size:
                    self._refuse_mixed_pick(
                        pass_, out, pass_.batch_size, "the model's output", alone=True
                    )
        pass_.returned = True
        # The replay's roots, by gradient edge: the model's outputs (_output_edges); and the
        # logits a Hugging Face loss was computed from (a wrapper that returns only the loss,
        # noisescale.tokens)
        candidates = _output_edges(output) + pass_.loss_inputs
        pass_.loss_inputs = []
        # (what the loss computes from: shared.py asks whether a tensor there derives from them)
        pass_.output_nodes = {_node_key(edge.node) for edge, _ in candidates}
        dim, seen, roots = self._model_dim, set(), []
        for edge, shape in candidates:
            if (id(edge.node), edge.output_nr) in seen:
                continue
            seen.add((id(edge.node), edge.output_nr))
            batched = len(shape) > dim and shape[dim] == pass_.batch_size
            # the hook, held by the output's node, holds neither the edge nor the node (the
            # audit finds the node as the one the backward runs): a forward no backward reaches
            # would otherwise keep its whole graph alive through that cycle until the step's
            # end (an evaluation loop with gradients on: every batch's activations)
            hook = self._make_root_hook(pass_, edge.output_nr, batched)
            pass_.handles.append(
                edge.node.register_prehook(
                    lambda grads, h=hook, nr=edge.output_nr: (
                        None if grads[nr] is None else h(grads[nr])
                    )
                )
            )
            if batched:
                roots.append(edge)
        try:
            if pass_.skipped or not self.per_example:
                return
            signature = tuple(pass_.signature)
            if self._audit_wanted(pass_):
                pass_.audit = audit_mod.PassAudit(
                    signature,
                    self._audit_generator(_device_of(output, pass_)),
                    pass_.batch_size,
                    amp=pass_.amp,
                    replay=self._replay_allowed,
                    float16=_float16_in_use(self._param.values()),
                )
                if pass_.selective:
                    # selective activation checkpointing allows one backward through its
                    # region: the replay would make the user's own backward fail (it did
                    # until 2026-12-06, a hunt) — unverified, warned, as a reentrant one was
                    pass_.audit.replay = False
                    pass_.audit.unverified = audit_mod.SELECTIVE
                # (one random basis for the step's audits: one backward may run through
                # several of its forwards, whose audits are then joined, pass_checks.py)
                shared = next((p.audit for p in self.passes if p.audit is not None), None)
                if shared is not None and shared is not pass_.audit:
                    pass_.audit.share_projections(shared)
                pass_.audit.nodes = pass_.nodes
                pass_.audit.params = list(self._param.values())
                self._note_16_bit_embeddings(pass_.audit)
                pass_.audit.buffers = list(self.model.buffers())
                pass_.audited = True
                for edge in roots:
                    pass_.audit.add_root(edge, dim)
                for edge, dim, owner, label, rebased in getattr(pass_, "_pending_targets", []):
                    if rebased is not None and rebased[0]._version != rebased[1]:
                        # the view was changed in place since: its node is out of the graph
                        edge, dim = rebased[2], audit_mod.FLAT
                    pass_.audit.add_target(edge, dim, owner, label)
                self._check_permutation(pass_, output)
                if not (pass_.compiled or pass_.compiled_call):
                    # (a pass of one example too: one backward may join several — a loss over
                    # a loop of one-example forwards — whose losses can combine them, an
                    # in-batch contrastive loss measured without a word until 2026-12-06, a
                    # review; a group of one example is never refused for it, settle.py)
                    if (
                        pass_.batch_size > 1
                        and not pass_.forward_watched
                        and any(t.dim() == 0 and t.requires_grad for t in _tensors(output))
                    ):
                        # audited for a structure not seen before, decided once the forward
                        # had run: a loss computed inside it was not followed (begin_forward)
                        pass_.loss_unfollowed = (
                            "the model's forward returned a value it computed itself (a loss?) "
                            "on a step audited for a structure not seen before, whose forward "
                            "noisescale did not follow, so it could not check that the loss "
                            "keeps the examples apart"
                        )
                        self._audit_due = True
                    returned = _tensors(output)
                    for t in returned:  # (an output of the model: not an inner activation)
                        self._loss_watch.inner.pop(t, None)
                    batched = [t for t in returned if not isinstance(t, SharedTensor)]
                    packed = _tensors(output, packed=True)
                    self._loss_watch.watch(pass_, batched, self._model_dim, packed, self.pairs)
        finally:
            if hasattr(pass_, "_pending_targets"):
                del pass_._pending_targets  # type: ignore[attr-defined]

    def _hook_idle_outputs(self, pass_: PassNorms, output: Any) -> None:
        """A forward of a step ``measure_every`` leaves unmeasured: its outputs' nodes note the
        backwards that run through it, as a measured step's do (:meth:`_make_root_hook`), so
        that the step counts the examples of every forward a backward reached — one backward
        through several (``torch.cat([model(a), model(b)])``) all of them, an evaluation
        forward with gradients on none. Until 2026-12-07 nothing noted them there, and the
        parameters' gradients went to the last forward alone: the others' examples were not
        counted (``examples`` and ``tokens_seen`` short, a batch-size schedule behind; a hunt)."""
        for edge, _ in _output_edges(output):
            if edge.node.name().endswith("AccumulateGrad"):
                # (a Parameter the model returns, (logits, self.T): its node is every forward's,
                # and each backward would note them all — counted twice, a review)
                continue
            pass_.handles.append(
                edge.node.register_prehook(
                    lambda grads, nr=edge.output_nr: (
                        None
                        if grads[nr] is None or self._replaying or self._paused
                        else self._enter(pass_)
                    )
                )
            )

    def _add_target(
        self,
        pass_: PassNorms,
        tensor: Tensor,
        dim: int,
        owner: nn.Module | None,
        label: str,
        base: Tensor | None = None,
    ) -> None:
        """Remember a hooked tensor: the audit decided at the end of the forward needs it.
        ``base``: the whole base of ``tensor``, a reshaped view whose rows are each example's
        in turn (:func:`_rebasable_base`), taken instead if the view is changed in place before the
        forward ends (an in-place operation leaves the view's own node out of the graph)."""
        if not self.auditing_enabled:
            return
        if torch._C._len_torch_dispatch_stack() and _selective_checkpointing():
            pass_.selective = True
        edge = torch.autograd.graph.get_gradient_edge(tensor)
        if pass_.audit is not None:  # a recomputed forward of an audited pass
            pass_.audit.add_target(edge, dim, owner, label)
            return
        pending = getattr(pass_, "_pending_targets", None)
        if pending is None:
            pending = pass_._pending_targets = []  # type: ignore[attr-defined]
        rebased = (
            None
            if base is None
            else (tensor, tensor._version, torch.autograd.graph.get_gradient_edge(base))
        )
        pending.append((edge, dim, owner, label, rebased))

    def _make_root_hook(self, pass_: PassNorms, output_nr: int, batched: bool) -> Callable:
        """The hook on an output's node, for its input ``output_nr`` (the audit's root there:
        :meth:`PassAudit.on_root` takes the node as the one the backward runs)."""

        def hook(grad: Tensor) -> None:
            if self._replaying or self._paused:
                return
            self._mark_backward(pass_)
            self._enter(pass_)
            if torch.is_grad_enabled():
                # create_graph=True through the model's output: seen here also where no layer's
                # hook sees it (weights read directly before the engine follows them: a PINN's
                # x @ l1.weight.T, blamed on clipping until 2026-12-06, a hunt); micro-batch
                # norms (per_example=False) take it exactly
                pass_.second_order = pass_.second_order or self.per_example
            elif batched and pass_.audit is not None:
                try:
                    pass_.audit.on_root(output_nr, grad)
                except RuntimeError as err:
                    if "use_reentrant" not in str(err):
                        raise
                    raise UnsupportedModuleError(
                        f"{_REENTRANT_LEAD} (noisescale's audit could not replay it)"
                    ) from err

        return hook

    def _on_scope_enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Hand the forward shared aliases of the parameters it uses directly."""
        frame: list[tuple[nn.Module, str]] = []
        self._scope_frames.setdefault(module, []).append(frame)
        if not self._active() or module in self._fallback:
            scoped = self._scopes.get(module)
            if module is not self.model and scoped:
                # (a module of no rule using its parameters directly, outside any forward:
                # Gemma's and BART's scaled embeddings, inputs_embeds built by the caller —
                # refused by the audit's remainder, the cause unnamed, until 2026-12-07)
                label = self._labels.get(module, type(module).__name__)
                self._note_unopened(label, [pid for _, _, pid in scoped], scope=module)
            return
        pass_ = self._hook_pass()
        if self._inside_compiled_call:
            # a model's own hooks run eagerly inside its compiled call: the aliases would enter
            # the compiled graph, which cannot hold them (compile_blocker)
            pass_.compiled = pass_.compiled_blocked = True
            return
        if pass_.skipped:
            return
        n = pass_.batch_size
        if (
            module is not self.model
            # (a top-level argument first: the common case, without walking the structure)
            and not any(isinstance(a, Tensor) and a.dim() and a.shape[0] == n for a in args)
            and not any(
                isinstance(a, Tensor) and a.dim() and a.shape[0] == n
                for a in _tree_leaves((args, kwargs))
            )
        ):
            pass_.scopes_unbatched.add(id(module))
        self._mirror_in_recompute(module)
        for holder, name, pid in self._scopes[module]:
            real = holder._parameters.get(name)
            if real is None or isinstance(real, SharedTensor):
                continue
            if not real.requires_grad:
                # frozen since (`g.requires_grad_(False)`): no gradient to follow, and collect()
                # refuses the changed trainable parameters (until 2026-12-07 torch's "cannot
                # register a hook on a tensor that doesn't require gradient", a hunt)
                continue
            if id(real) != pid:
                # another Parameter where the engine learned this one: two layer scales tied
                # between audits (`b.g = a.g`: a.g used twice, as if tied before the engine
                # was built) — followed as the one it is, and the pass audited as a structure
                # never seen (until 2026-12-07 each use measured alone, under the old b.g's
                # name, up to 17% off until the next audit, a hunt); a new Parameter is
                # refused by collect()
                pass_.signature.append(("held", id(holder), name, id(real)))
                pid = id(real) if id(real) in self._param else pid
            pass_.aliased.add(pid)
            source = Source(tensor=real, pid=pid, label=self._param_name.get(pid, name))
            origin = Origin(self, pass_, (source,), scope=module, under=_saved_hooks_top())
            alias = wrap(real, origin)
            source.tensor = alias
            self._swapped.setdefault((id(holder), name), []).append(real)
            holder._parameters[name] = alias  # type: ignore[assignment]
            frame.append((holder, name))

    def _mirror_in_recompute(self, module: nn.Module) -> None:
        """The transformers layers whose ``forward`` activation checkpointing recomputes
        (``GradientCheckpointingLayer``: it checkpoints ``forward``, inside the module call, so
        the recomputation runs without the module's hooks) — ``module`` itself and those
        inside it: their checkpoint function is wrapped so that the recomputed forward gets the
        aliases of the parameters ``module`` uses directly, as the forward did — else the
        tensors it saves differ and checkpoint raises (BEiT's layer scale, a parameter
        multiplied in its layer; peft's IA3 and VeRA vectors, learned as direct uses of the
        whole model, read inside each checkpointed decoder layer: ``CheckpointError`` until
        2026-12-04)."""
        layers = self._checkpointing_layers.get(module)
        if layers is None:
            layers = self._checkpointing_layers[module] = [
                m for m in module.modules() if hasattr(m, "gradient_checkpointing")
            ]
        for layer in layers:
            func = getattr(layer, "_gradient_checkpointing_func", None)
            if func is None or not getattr(layer, "gradient_checkpointing", False):
                continue
            if isinstance(func, _MirroredCheckpoint):
                if func.engine is self and module not in func.scopes:
                    func.scopes.append(module)
                continue
            layer._gradient_checkpointing_func = _MirroredCheckpoint(func, self, [module])
            self._mirrored.append(layer)

    def _on_scope_exit(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        unopened = self._unopened_scopes.pop(module, None)
        if unopened is not None:
            self._note_when_reached(output, *unopened)
        frames = self._scope_frames.get(module)
        if not frames:
            return
        for holder, name in reversed(frames.pop()):
            stack = self._swapped.get((id(holder), name))
            if stack:
                holder._parameters[name] = stack.pop()  # type: ignore[assignment]
        if module in self._old_reparametrized:
            # the weight the old pre-hook computed from the aliases stays on the module as a
            # plain attribute: the same values and history, without the pass it came from
            for name, value in list(vars(module).items()):
                if isinstance(value, SharedTensor):
                    setattr(module, name, _plain(value))
