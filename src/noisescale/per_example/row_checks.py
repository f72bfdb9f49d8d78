"""Checks that the rows a forward meets are the examples: rows that are not examples (a loss
computed inside the model, one pick of rows mixed with another), the layout where a shared tensor
meets the batch, time-major and cell counts, and inputs that are the model's own buffers. A
mixin of :class:`~.engine.PerExampleNorms`: the rows' checks, apart from the hooks that call
them."""

from __future__ import annotations

import warnings
from contextlib import suppress
from typing import Any

import torch
from torch import Tensor, nn

from noisescale.errors import NoiseScaleInputError, UnsupportedModuleError
from noisescale.per_example.graph import (
    _MOVED,
    _assembled_rows,
    _mixed_pick,
    _routed_by_index,
    _saved_hooks_top,
    _selected_rows,
)
from noisescale.per_example.messages import mixed_pick_message
from noisescale.per_example.passes import PassNorms
from noisescale.per_example.shared import flatten
from noisescale.per_example.values import _flat_values


def _on_inputs(inputs: Any, storage: int) -> bool:
    """Whether one of the forward's tensor arguments lives on ``storage`` (the input assigned
    to a buffer's name)."""
    found: list[Any] = []
    flatten(inputs, found)
    for t in found:
        if isinstance(t, Tensor):
            with suppress(RuntimeError, NotImplementedError, TypeError):
                if t.untyped_storage().data_ptr() == storage:
                    return True
    return False


def _version_of(t: Tensor) -> int:
    """A tensor's version counter (-1 for an inference tensor, which has none)."""
    return -1 if t.is_inference() else t._version


class RowChecks:
    """:class:`~noisescale.per_example.engine.PerExampleNorms`' checks of the rows met in a
    forward: each says why a dimension of the batch's size is or is not the examples'."""

    def _rows_not_examples(self, pass_: PassNorms, x: Tensor, n: int, label: str) -> bool:
        """Whether ``x``, the input of layer ``label`` with the batch's leading size, holds rows
        that are not the examples by that coincidence: one of the model's buffers, or rows
        picked by a mask or an index (:func:`_selected_rows`). Such a call is shared. (Index
        tensors on an accelerator are checked on the device: ``pass_.unread_picks``.)"""
        if self._is_buffer(pass_, x):
            return True
        self._refuse_mixed_pick(pass_, x, n, f"the input of layer '{label}'")
        unread: list[tuple[str, Tensor]] = []
        picked = _selected_rows(x, n, unread)
        if picked is not None:
            pass_.picked_input = pass_.picked_input or (label, picked)
            return True
        how = self._note_rows(pass_, x, n, label, unread)
        if how is not None:
            if pass_.output_nodes and not pass_.audited:
                # (a layer run in the loss on such rows, after the forward returned: its
                # pass's audit, which would check them, was not due — taken as shared)
                return True
            pass_.assembled.setdefault(label, how)
        return False

    def _check_unbatched(self, pass_: PassNorms, x: Tensor, n: int, label: str) -> None:
        """Refuse ``x``, the input of layer ``label`` without a batch dimension (a Linear's
        1-D input, ``LayerRule.unbatched``) whose leading size is the batch's, where it may
        hold the examples: neither computed from parameters (the audit proves what those
        hold) nor one of the model's buffers or frozen parameters (:meth:`_is_buffer`) — a
        constant made in the forward cannot be told from the examples' data mixed as
        features, which have no per-example gradient."""
        if x.grad_fn is not None or x.requires_grad or self._is_buffer(pass_, x):
            return
        raise UnsupportedModuleError(
            f"layer '{label}' was called on an input of shape {list(x.shape)} without a "
            f"batch dimension (one item's features or channels) whose leading size is the "
            f"batch's ({n}), computed from no parameter and not one of the model's buffers: "
            "noisescale cannot tell a constant shared by every example (measured as a shared "
            "call) from the examples' data mixed together as features (no per-example "
            "gradient). If it is a constant, register it on the model (register_buffer, or a "
            "Parameter with requires_grad=False); if it holds the examples, give the layer a "
            "batch dimension; or use per_example=False. Nothing of this step was recorded"
        )

    def _check_loss_code_rows(
        self, pass_: PassNorms, module: nn.Module, label: str, x: Tensor, size: Any
    ) -> None:
        """A layer of the model called in the loss code, after the forward returned, on rows
        not computed from anything (no history: sampled negatives, ids) and not the model's
        own input: once seen with a count other than the batch's (rows shared by every
        example, measured as a shared call), a later call with the batch's count is refused
        on every step — its rows would be taken for the examples. The loss watch, which
        follows what the loss does with them, runs after audited forwards only: until
        2026-12-06 a two-tower model's negatives scored by ``u @ tower(negs).T`` with K = N
        on an unaudited step were measured as the examples' own rows, +2–19% without a word
        (a hunt)."""
        if x.grad_fn is not None or x.dim() == 0:
            return
        calls = pass_.loss_code_calls
        call = (module, calls.get(module, 0))  # (the items' call and the negatives' apart)
        calls[module] = call[1] + 1
        if size != pass_.batch_size:
            self._loss_code_shared.add(call)
            return
        inputs = [] if pass_.inputs is None else _flat_values(*pass_.inputs)
        if call not in self._loss_code_shared or any(x is t for t in inputs):
            return
        raise UnsupportedModuleError(
            f"layer '{label}' of the model was called in the loss code, after the forward "
            f"returned, on {size} rows not passed to the model's forward — as many as the "
            "batch's examples, while other steps called it on another count (rows shared by "
            "every example, as sampled negatives): noisescale would take each row for one "
            "example's. Call the layer inside the model's forward (pass the negatives to it), "
            "or draw a count of negatives other than the batch size, or measure with "
            "per_example=False. Nothing of this step was recorded"
        )

    def _refuse_mixed_pick(
        self, pass_: PassNorms, x: Tensor, n: int, where: str, alone: bool = False
    ) -> None:
        """Refuse ``x`` (``where``) where rows picked along the examples by an index not them
        in order meet other rows of the batch (:func:`_mixed_pick`; ``alone``: or meet none,
        an example's row taken twice) — on every step: the audit proves an index for its own
        step's data only. On an accelerator the comparison is read with the step's
        statistics (``pass_.unread_picks``, a whole cause)."""
        unread: list[tuple[str, Tensor]] = []
        how = _mixed_pick(x, n, unread, alone)
        if how is not None:
            raise UnsupportedModuleError(
                f"{mixed_pick_message(where, how)}. Nothing of this step was recorded"
            )
        pass_.unread_picks += [("", mixed_pick_message(where, h), f) for h, f in unread]

    def _note_rows(
        self,
        pass_: PassNorms,
        x: Tensor,
        n: int,
        label: str,
        unread: list[tuple[str, Tensor]],
    ) -> str | None:
        """For rows that are not a pick (:func:`_selected_rows` found none), shared by a
        layer's input and a parameter's meeting: note the index comparisons left on the device
        (``unread``) and an index along the examples (``pass_.routed``, for compiled passes);
        return how the rows were put together (:func:`_assembled_rows`), or None."""
        pass_.unread_picks += [(label, how, flag) for how, flag in unread]
        if pass_.routed is None and _routed_by_index(x, n):
            pass_.routed = label
        return _assembled_rows(x)

    def note_met_elsewhere(
        self, pass_: PassNorms, origin: Any, flat: list[Any], dim: int, op: str
    ) -> None:
        """Parameters used directly meeting in ``op``, in the loss, a tensor the loss watch
        knows to hold the examples along another dimension than ``dim`` (without the batch's
        size there: no meeting): noted for the refusal of their gradients, which no meeting
        gave (a per-position weight returned from the forward and applied time-major was
        refused as read outside the forward until 2026-12-06, a hunt)."""
        where = self._loss_watch.examples_elsewhere(pass_, flat, dim)
        if where is not None:
            labels = sorted({s.label for s in origin.sources})
            pass_.met_elsewhere = (labels, f"{labels} met, in the operation '{op}', {where}")

    def check_met_layout(
        self, pass_: PassNorms, origin: Any, batched: list[Tensor], dim: int, op: str
    ) -> None:
        """Parameters meeting ``batched`` along ``dim`` in ``op`` where the loss watch follows
        (the loss; the model's own code on audited steps): refused at once where the watch
        knows one of them holds the examples elsewhere (:meth:`LossWatch.rows_not_met`) —
        the meeting would give each index's share to the example of that index."""
        reason = self._loss_watch.rows_not_met(pass_, batched, dim)
        if reason is None:
            return
        labels = sorted({s.label for s in origin.sources})
        raise UnsupportedModuleError(
            f"a tensor computed from {labels} alone met, in the operation '{op}', a tensor "
            f"{reason}. noisescale would split the gradient of {labels} along dim {dim} as "
            f"if each index there were one example (tasks, experts, heads or positions that "
            f"happen to number {pass_.batch_size}, as many as the batch, taken for the "
            f"examples). Keep the examples in dim {dim} where a shared tensor meets them — "
            "stack per-task losses along dim 1 (torch.stack(losses, dim=1) → [N, T]) and "
            "weigh them with s[None, :]: Kendall's uncertainty weighting is "
            "(torch.exp(-s) * L + s).sum(1).mean() on L [N, T], with s returned by the "
            "forward —, combine a shared tensor with each example's terms before reducing over "
            "the examples, or use per_example=False. Nothing of this step was recorded"
        )

    def check_checkpointed_alias(self, origin: Any, op: str) -> None:
        """Parameters used directly meeting the batch in ``op`` (one whose node saves its
        operands) inside a function that ``torch.utils.checkpoint(use_reentrant=False)`` runs,
        their owner's call begun outside it (``gamma`` of the model itself in
        ``checkpoint(lambda t: self.gamma * f(t), h)``): refused. The forward holds the
        owner's shared alias, expanded to the batch where it meets it; the recomputation in
        the backward, outside the owner's call, gets the parameter itself and saves other
        tensors — torch's CheckpointError at step 1, one-shot and tracker (a hunt,
        2026-12-06). A submodule the function calls, or a transformers layer's checkpoint
        (mirrored: :class:`_MirroredCheckpoint`), enters the owner again when it recomputes."""
        top = _saved_hooks_top()
        if (
            top is None
            or top is origin.under
            or torch._C._current_graph_task_id() != -1
            or "_checkpoint_hook" not in getattr(top, "__qualname__", "")
            or any(top is t for t in self._mirrored_under)
        ):
            return
        labels = sorted({s.label for s in origin.sources})
        raise UnsupportedModuleError(
            f"parameters {labels}, used directly, meet the batch in '{op}' inside a function "
            "that torch.utils.checkpoint(use_reentrant=False) recomputes in the backward, "
            "a function their owner's forward started (checkpoint(self._f, x) in the owner's "
            "own forward, or a closure over the owner's parameter): noisescale follows such "
            "a parameter through an alias it hands out while its owner's forward runs, and the "
            "recomputation, outside that forward, would get the parameter itself and save "
            "other tensors (torch's CheckpointError). Move the parameter into a submodule "
            "that the checkpointed function calls (a LayerScale module inside the block "
            "passed to checkpoint), or use per_example=False. Nothing of this step was "
            "recorded"
        )

    def check_meeting_rows(self, pass_: PassNorms, origin: Any, x: Tensor, n: int, op: str) -> None:
        """Parameters used directly meeting ``x`` in ``op`` inside the forward, ``x`` with the
        batch's leading size: rows picked by the data that are not the examples in order
        (:func:`_selected_rows`) are refused at once, naming the pick; rows put together by
        a stack, a cat or an index_add make the pass audited every step
        (:func:`_assembled_rows`), as a layer's input does (:meth:`_rows_not_examples`)."""
        labels = sorted({s.label for s in origin.sources})
        self._refuse_mixed_pick(pass_, x, n, f"'{op}' of parameters {labels}, used directly,")
        unread: list[tuple[str, Tensor]] = []
        picked = _selected_rows(x, n, unread)
        if picked is not None and _MOVED in picked:
            # (a review of 2026-12-06: a move's refusal gave a pick's cause and fix)
            raise UnsupportedModuleError(
                f"parameters {labels}, used directly, meet in '{op}' {n} rows moved along the "
                f"examples ({picked}): each row is another example's. Keep every example's "
                "rows in place along dim 0 (move along the positions or features instead), or "
                "use per_example=False. Nothing of this step was recorded"
            )
        if picked is not None:
            raise UnsupportedModuleError(
                f"parameters {labels}, used directly, meet in '{op}' {n} rows picked by "
                f"{picked}: their count equals the batch's by coincidence, and which example "
                "each row belongs to changes with the data. Pick one row per example in "
                "order (h[torch.arange(N), t]), or use per_example=False. Nothing of this step "
                "was recorded"
            )
        label = f"{op} of {', '.join(labels)}"
        how = self._note_rows(pass_, x, n, label, unread)
        if how is not None:
            pass_.assembled.setdefault(label, how)

    def _check_time_major_count(self, module: nn.Module, args: tuple) -> None:
        """``per_example=False``: a time-major layer (``batch_first=False``) run on a batched
        input whose time steps have the size the pass counted its examples by, and whose batch
        dimension does not — a model fed time-major input [T, N, ...] has its T counted as the
        examples along dim 0 (until 2026-12-06 without a word: tr Σ and B_simple T/n times the
        truth, a hunt). Refused where the layer reads a tensor with the counted input's two
        leading dimensions (the input, or it embedded or projected: either the count or the
        layer's reading is wrong); warned about once otherwise, where batch-first data or a
        layer run over another batch (words of length N) look the same (reviews found those
        refused at first, and the warning alone leaving the clear case T/n off)."""
        pass_ = None if self._paused or not self._active() else self.open_pass()
        x = args[0] if args else None
        if isinstance(module, nn.RNNCellBase):
            if pass_ is not None and isinstance(x, Tensor):
                self._check_cell_count(pass_, module, x)
            return
        if pass_ is None or not isinstance(x, Tensor) or x.dim() < 3:
            return
        n, source = pass_.batch_size, pass_.n_source
        if x.shape[0] != n or x.shape[1] == n:
            return
        label = f"layer '{self._labels.get(module, type(module).__name__)}' "
        if (
            isinstance(source, Tensor)
            and source.dim() >= 2
            and tuple(source.shape[:2]) == tuple(x.shape[:2])
        ):
            raise NoiseScaleInputError(
                f"{label}({type(module).__name__}, batch_first=False) reads {list(x.shape)}, "
                "the model's input's leading dimensions, with its batch along dim 1 "
                f"({x.shape[1]}), while per_example=False counted its {n} rows along dim 0 as "
                "the examples. If the input is time-major [T, N, ...], tell the tracker how "
                "many examples a call holds: GradientNoiseTracker(model, per_example=False, "
                "examples=lambda args, kwargs: args[0].shape[1]); if it is batch-first, the "
                "layer takes dim 0 for time: construct it with batch_first=True"
            )
        if not self._time_major_warned:
            self._time_major_warned = True
            warnings.warn(
                f"noisescale: {label}({type(module).__name__}, batch_first=False) ran on input "
                f"of shape {list(x.shape)}, its batch along dim 1, while per_example=False "
                f"counted {n} examples in the model's call along dim 0 of its first tensor "
                "argument. If the model's input is time-major [T, N, ...], its T is being "
                "counted as the examples (tr Σ and B_simple wrong by T/N): tell the tracker how "
                "many examples a call holds, GradientNoiseTracker(model, per_example=False, "
                "examples=lambda args, kwargs: args[0].shape[1]). If dim 0 of the model's input "
                "is the examples, the count is right",
                RuntimeWarning,
                stacklevel=2,
            )

    def _check_cell_count(self, pass_: PassNorms, module: nn.Module, x: Tensor) -> None:
        """``per_example=False``: an RNN cell (``nn.GRUCell``, ``nn.LSTMCell``, ``nn.RNNCell``)
        stepped over a time-major input [T, N, ...] — a recurrent policy over a rollout,
        Dreamer's RSSM — reads one time step's N rows, dim 1 of the input, while the pass
        counted the input's T rows along dim 0 as the examples (until 2026-12-06 without a
        word: tr Σ and B_simple T/N times the truth, a hunt; the same model on nn.GRU with
        batch_first=False was refused). Refused where the cell's rows are the counted input's
        dim 1 and not its dim 0."""
        n, source = pass_.batch_size, pass_.n_source
        if (
            x.dim() != 2
            or x.shape[0] == n
            or not isinstance(source, Tensor)
            or source.dim() < 3
            or source.shape[0] != n
            or source.shape[1] != x.shape[0]
        ):
            return
        label = f"layer '{self._labels.get(module, type(module).__name__)}' "
        raise NoiseScaleInputError(
            f"{label}({type(module).__name__}) runs on {x.shape[0]} rows, dim 1 of the model's "
            f"input {list(source.shape)}, while per_example=False counted its {n} rows along "
            "dim 0 as the examples: a cell stepped over a time-major input [T, N, ...] (a "
            "rollout) would have its T counted as the examples. If the input is time-major, "
            "tell the tracker how many examples a call holds: GradientNoiseTracker(model, "
            "per_example=False, examples=lambda args, kwargs: args[0].shape[1]); if its dim 0 "
            "is the examples (the cell run on one example's positions at a time), say so — "
            "examples=lambda args, kwargs: args[0].shape[0] —, which also skips this check"
        )

    def is_model_buffer(self, pass_: PassNorms, x: Tensor) -> bool:
        """Whether ``x`` is one of the model's buffers or a view of one, not expanded over
        the examples (:meth:`_is_buffer`), that holds no example: one the model had when the
        engine was made, not written since (a mask, a position index, a frozen quantizer's
        scale). Not the batch written into a buffer by the forward — ``self.buf.copy_(x)``,
        a transformed copy, or the input assigned to a buffer's name —, which a first version
        took for no example's: such a model was refused, or its backward failed when the
        audit re-ran the forward (two reviews of 2026-12-06). A shared operation's operand
        (:func:`~noisescale.per_example.shared._dispatch`); no value is read."""
        if not self._is_buffer(pass_, x):
            return False
        try:
            storage = x.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError, TypeError):
            return False
        made = self._buffers_made.get(storage)
        if made is None or _on_inputs(pass_.inputs, storage):
            return False
        # (the buffer itself still alive — one replaced and freed leaves its memory to others
        # — and unwritten since)
        held = made[0]()
        return held is not None and made[1] == _version_of(x) == _version_of(held)

    def _is_buffer(self, pass_: PassNorms, x: Tensor) -> bool:
        """Is ``x`` (a layer's input) one of the model's buffers or frozen parameters, or a
        view of one? Its leading size may equal the batch's by coincidence — class embeddings
        [C, D] with C = N, turned into prototypes by a Linear and returned: measured as a
        per-example call, their rows were split as the examples' (35-124% off, found by a
        review) — but a buffer holds no example: the call is shared. Nor does a frozen
        parameter (:meth:`_check_unbatched`). (Computed from a buffer by operations, the
        input is not recognised: a known gap.)"""
        if (
            x.grad_fn is not None
            or x.requires_grad
            # (indices too since 2026-12-06: K = N negative ids in a buffer, embedded by the
            # layers that embed the batch's items, were refused, a hunt; BERT's token types,
            # a buffer expanded over the examples, are theirs: the stride below)
            or (x.dim() > 0 and x.stride(0) == 0)  # (one row for every example: theirs)
            or torch.compiler.is_compiling()
        ):
            return False
        try:
            if pass_.buffer_storages is None:
                frozen = [p for p in self.model.parameters() if not p.requires_grad]
                pass_.buffer_storages = {
                    b.untyped_storage().data_ptr() for b in (*self.model.buffers(), *frozen)
                } - {0}
            return x.untyped_storage().data_ptr() in pass_.buffer_storages
        except (RuntimeError, NotImplementedError, TypeError):  # (tensors without storage)
            return False
