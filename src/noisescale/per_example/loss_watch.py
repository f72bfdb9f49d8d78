"""Does the loss keep the examples apart? Following the example axis from the model's outputs
to the backward.

The engine measures |∂ℓ_i/∂θ|² where the gradient reaching the model's outputs is ∂L/∂out.
That is each example's gradient only when the loss is a sum (or mean) of per-example terms,
L = Σ_i ℓ_i(out_i): then ∂L/∂out_i depends on example i alone. A loss that combines examples —
in-batch negatives (a similarity matrix z₁ z₂ᵀ), a normalization by the batch's statistics, a
pairwise term between two forwards' outputs — has no per-example gradients at all, and the
engine would report each example's *share* of the gradient without a word. No audit of the
model reaches it: the loss is computed after the model's last measured layers — outside the
model, or inside its forward (``labels=``, ``return_loss=True``), which the watch then follows
from those layers' outputs on (:meth:`LossWatch.begin_forward`).

On audited passes, from the moment the model's forward returns until the backward is called,
a :class:`~torch.utils._python_dispatch.TorchDispatchMode` follows every ATen operation on a
tensor computed from the model's batched outputs and keeps, for each such tensor, what is known
about how it depends on the examples (an abstract interpretation):

* ``Rows(dim, block, key, n, owner)`` — every index along ``dim`` holds one example's values
  (index j is example (j // block) mod n for a regular layout; ``block`` None for a map known
  only by ``key``), whatever the other indices. The model's batched outputs start so: in the
  model's example dimension, else in the one dimension of the batch's size (time-major), else
  as rows flattened with positions (an irregular map); ``owner`` is the pass (its forward).
* ``One(owner, example)`` — one example's values only (``o[i]``): any function of them stays
  that example's.
* ``_Sum(owners)`` — every element is a sum over examples of a function of one example each
  (what a sum or mean over the examples, a dot product along them, gives): linear operations
  keep it.
* ``Mixed(reason)`` — anything else: examples combined non-linearly, two forwards' rows
  combined, a sum over one forward's examples added to another's rows.

With gradients on, tensors that do not require grad are constants here (a detached batch
statistic that weighs the examples reweighs per-example terms; it does not couple their
gradients); without (inside a custom ``autograd.Function`` or a reentrant checkpoint), every
operand is followed, so the Function's output has the layout of what it computed. A backward
from a ``Mixed`` loss is refused (:attr:`PassNorms.coupled`); an operation this module does not
know, on a tensor that derives from the outputs, is ``Mixed`` too — refused rather than
guessed. A pass whose backward the watch did not see start is withheld
(:attr:`PassNorms.loss_unfollowed`). Both modes sit at the bottom of their stacks (a user's mode
entered around the forward pops itself, not the watch).

Cost: one Python call per ATen operation of the loss on audited steps (steps 1, 2, 4, …, and
every 1024th); the model's forward and the backward run without it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from noisescale.per_example import scaler_watch
from noisescale.per_example.graph import reaches_pass
from noisescale.per_example.messages import (
    CTC_AT_T_EQUAL_N,
    RAN_ALONG,
    ROWS_UNPROVEN,
    RULE_FAILED,
    SIZES_COINCIDE,
)
from noisescale.per_example.shared import flatten
from noisescale.per_example.values import _time_major

__all__ = ["LossWatch"]


@dataclass(frozen=True)
class Rows:
    dim: int
    block: int | None  # None: the map from index to example is known only by `key`
    key: Any  # the pass (regular layouts), or a token for an irregular map
    n: int  # the pass's examples
    owner: int  # the pass (its forward)
    # an irregular map's example of each index along ``dim`` (a long tensor; -1 where one
    # index holds values of several) when the rows were picked from a known map (``o[mask]``,
    # ``o[perm]``, a slice, ``torch.cat`` of such): a mean over them is a mean over the
    # examples only if each example has as many (:meth:`LossWatch._note_uneven_mean`)
    ids: Any = field(default=None, compare=False, repr=False)
    # rows [start, stop) of a regular map's (key, block, start, stop, size) — a slice or a
    # split piece, a chunk of a chunked cross-entropy —, which torch.cat of the consecutive
    # pieces makes that map again (:func:`_joined_span`)
    span: Any = field(default=None, compare=False, repr=False)
    # an irregular map along the last dimension whose values come in runs of ``whole``
    # consecutive ones of a single example each (torch.masked_select by a mask expanded over
    # the trailing dimensions: DistilBERT's distiller), which a view may merge into one index
    # (:func:`_reshape`); 1 where nothing is known
    whole: int = field(default=1, compare=False, repr=False)


@dataclass(frozen=True)
class One:
    """Values of one example only (``o[i]``): any function of them is that example's."""

    owner: int
    example: Any  # its index, or a token when the map is irregular
    n: int = field(default=0, compare=False)  # the pass's examples (0: not known)


@dataclass(frozen=True)
class _Sum:
    owners: frozenset  # the passes whose examples it sums over
    # "sum" or "mean": the tensor is exactly that reduction over the examples of per-example
    # terms (``ℓ.sum()``, ``ℓ.mean()``, ``cross_entropy(..., reduction="sum")``), nothing after
    # it — what the loss_reduction declared must match (LossWatch.backward); None: scaled since,
    # or not known
    plain: str | None = None
    # the elements it summed when every example gave as many (a sum over all of a regular
    # layout: N·T rows of a flattened batch): a division by this count is a mean over each
    # example's equal share, which is a mean over the examples (_note_divided_sum); else None
    count: int | None = None
    # the kind came through a numeric factor (T² · kl, Σ / k): under accumulation such a factor
    # is often the loop's arithmetic (a framework's 1/k, n/total), and the tracker does not hold
    # the kind against the declaration on steps of several micro-batches (LossWatch._kept_kind)
    factored: bool = False
    # a sum of one-example values added one by one, each weight 1 (Python's sum(losses),
    # total += losses[i]): the (owner, example) pairs added so far — every example of the pass
    # once is a plain sum (LossWatch.follow) —, else None
    added: Any = field(default=None, compare=False)


@dataclass(frozen=True)
class Across:
    """Rows of several forwards added row by row along ``dim`` — two views' losses of each
    example, ``loss_one + loss_two`` (BYOL) —: only linear operations keep it, and a sum or
    mean over ``dim`` is the sum of each forward's own sum (``_Sum`` over their owners); any
    other function of it combines two forwards' rows."""

    dim: int
    owners: frozenset


@dataclass(frozen=True)
class Mixed:
    reason: str
    inside: bool = False  # found inside the model's forward (begin_forward), not after it


Layout = Rows | One | _Sum | Across | Mixed


def _moved(layout: Any, dim: int) -> Any:
    """The same map (``Rows``, ``Across``) along another dimension."""
    return dataclasses.replace(layout, dim=dim)


def _ids(layout: Rows, size: int, device: Any) -> Tensor | None:
    """The example (unit) of each of the ``size`` indices along ``layout.dim``; None where
    the map is known by its key only."""
    if layout.block is not None:
        steps = torch.arange(size, device=device)
        return torch.div(steps, layout.block, rounding_mode="floor") % layout.n
    if layout.ids is not None and layout.ids.numel() == size:
        return layout.ids
    return None


def _picked(
    layout: Rows, dim: int, ids: Tensor | None, name: str, span: tuple | None = None
) -> Rows:
    """Rows picked from ``layout``'s (an irregular map, ``ids`` each index's example)."""
    return Rows(dim, None, (name, next(_fresh)), layout.n, layout.owner, ids, span)


def _sliced(layout: Rows, size: int, start: int, stop: int) -> tuple | None:
    """The span of rows [start, stop) of ``layout``'s ``size`` (a regular map's, or a span's)."""
    stop = max(start, stop)
    if layout.block is not None:
        return (layout.key, layout.block, start, stop, size)
    if layout.span is not None:
        key, block, first, _, whole = layout.span
        return (key, block, first + start, first + stop, whole)
    return None


_fresh = itertools.count()

# Pointwise operations linear in their tainted operands (with the other operands constant).
_LINEAR_ANY = {
    "add",
    "sub",
    "rsub",  # (c − Σ ℓ_i, 1 − dice.mean(): refused as non-linear until 2026-12-06, a hunt)
    "neg",
    "clone",
    "_to_copy",
    "alias",
    "positive",
    "lift_fresh_copy",
}
_LINEAR_FIRST = {"div", "masked_fill", "true_divide"}  # linear in the first operand only
_LINEAR_ONE = {"mul", "multiply"}  # linear when one operand is tainted
_SUMS = {"sum", "mean", "nansum"}
# multiplied or divided by a constant (the other operand not followed): scaled, not plain
_SCALINGS = {"mul", "multiply", "div", "true_divide"}
# task weights in a tensor on a stack of sums or means (LossWatch._weighted_kind), and the most
# of them read
_WEIGHINGS = _SCALINGS | {"dot", "vdot"}
_MAX_WEIGHTS = 64
# operations that change a sum's sign or copy it, nothing else: its kind stays
_SIGN_ONLY = {"neg", "positive", "clone", "alias", "_to_copy", "lift_fresh_copy"}
# functions through which no constant factor passes (f(c·x) is no constant times f(x)): what
# they give is a fresh per-example term, not a scaled one — β inside a DPO margin's
# logsigmoid, a temperature inside a softmax (until 2026-12-06 the mark stuck, and a plain sum
# of such terms under "mean" went unchecked, a hunt). Positively homogeneous ones (relu, abs)
# and powers keep the mark: relu(ℓ/N).sum() is a mean.
_UNSCALING = {
    "exp",
    "exp2",
    "expm1",
    "log",
    "log1p",
    "log2",
    "log10",
    "log_sigmoid_forward",
    "sigmoid",
    "logit",
    "tanh",
    "softplus",
    "erf",
    "erfc",
    "sin",
    "cos",
    "atan",
    "asinh",
    "_softmax",
    "_log_softmax",
    "logsumexp",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy",
    "nll_loss_forward",
    "nll_loss2d_forward",
}
_REDUCTIONS = _SUMS | {
    "amax",
    "amin",
    "max",
    "min",
    "logsumexp",
    "prod",
    "norm",
    "linalg_vector_norm",
    "var",
    "std",
    "var_mean",
    "std_mean",
    "argmax",
    "argmin",
    "all",
    "any",
    "median",
    "nanmedian",
    "count_nonzero",
}
_IDENTITY = {"detach", "alias", "lift_fresh", "_to_copy", "clone", "contiguous", "_conj"}
_LOSSES = {
    "mse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "soft_margin_loss",
    "kl_div",
}
# means over what they average (a mean over picked rows is one over the examples only if each
# example has as many: LossWatch._note_uneven_mean)
_MEANS = {
    "mean",
    "nll_loss_forward",
    "nll_loss2d_forward",
    "multi_margin_loss",
    "multilabel_margin_loss_forward",
} | _LOSSES
# the keys of the irregular maps the forward's outputs start with (rows flattened with
# positions, packed sequences): their means are tokens' means, which the token watcher counts
_IRREGULAR = ("flat", "packed")
# the most operations one watch sees before it gives up (forwards that no backward follows,
# outside the model: the model's own forwards run without it)
_MAX_OPS = 100_000


class LossWatch:
    """One step's watch over the loss of its audited passes (see the module doc)."""

    def __init__(self, paused: Any = None) -> None:
        self._dispatch = _Dispatch(self)
        self._function = _Function(self)
        self._pushed = False
        # whether the engine ignores the passes run now (its paused() block): a backward there
        # is not the step's (the engine that owns the watch sets it)
        self.paused: Any = paused or (lambda: False)
        # a mean over a slice of the rows the model ran on was warned about (or rows come in
        # declared pairs: the engine sets it): _warn_rows_left_out
        self.rows_left_warned = False
        self.reset()

    # -- lifecycle ---------------------------------------------------------------------------

    def watch(
        self,
        pass_: Any,
        outputs: list[Tensor],
        dim: int,
        packed: list[Tensor],
        pairs: str | int | None = None,
    ) -> None:
        """Follow the pass's batched ``outputs`` (examples in ``dim``, or in the one other
        dimension of the batch's size — time-major —, or flattened with positions in ``dim``;
        ``packed``: the data of packed sequences among them, rows of examples in their order).

        ``pairs="halves"`` (``paired_rows``: row i and row i + N/2 are one unit, kept in one
        sub-batch) follows the N rows as N/2 units — index j is unit j mod N/2 — so a loss may
        combine the two rows of a pair (a preference pair's chosen and rejected responses,
        concatenated: DPO, a reward model's Bradley-Terry loss) but nothing across pairs.
        An integer G (``grouped_rows``: blocks of G consecutive rows kept in one sub-batch)
        follows them as N/G units — index j is unit j // G — so a loss may combine the rows of
        a block (a listwise loss over a query's G candidates) but nothing across blocks."""
        if self.done:
            self.reset()
        n = pass_.batch_size
        units, block = _units(n, pairs)
        added = False
        for t in [*outputs, *packed]:
            self.inner.pop(t, None)  # (returned: an output of the model, whose replay starts here)
        for t in outputs:
            if t.grad_fn is None or t.dim() == 0:
                continue  # (a parameter returned as it is, a leaf, is no example's: shared)
            layout: Layout | None = None
            if any(t is p for p in packed):
                layout = Rows(0, None, ("packed", id(pass_)), n, id(pass_))
            elif t.dim() > dim and t.shape[dim] == n:
                layout = Rows(dim, block, id(pass_), units, id(pass_))
            else:
                sizes = [i for i, s in enumerate(t.shape) if s == n]
                if len(sizes) == 1:
                    layout = Rows(sizes[0], block, id(pass_), units, id(pass_))
                elif sizes:
                    layout = Mixed(
                        f"an output of shape {list(t.shape)} has the batch's size ({n}) in "
                        f"{SIZES_COINCIDE}, and was used"
                    )
                elif t.dim() > dim and t.shape[dim] % n == 0:
                    # examples flattened with positions, in an order the watch does not know:
                    # each row is one example's, which row whose is known by this key only
                    layout = Rows(dim, None, ("flat", id(pass_), id(t)), n, id(pass_))
                else:
                    # computed from the batch (it has a gradient) but in no layout the watch
                    # knows — a score vector returned as view(2, N/2): which example each
                    # value is was not followed, so nothing computed from it is (before
                    # 2026-12-04 it was not watched at all, and (Σ r)² measured as separable:
                    # norms 2.7e3-3e6 off, a review found)
                    layout = Mixed(
                        f"an output of shape {list(t.shape)} has no dimension of the batch's "
                        f"size ({n}), so which example each of its values belongs to is not "
                        "known, and was used (return the outputs with the examples in a "
                        "dimension of their own and reshape them in the loss)"
                    )
            if layout is not None:
                self.layouts[t] = layout
                added = True
        if added and pass_ not in self.passes:
            self.passes.append(pass_)
        self.resume()

    def begin_forward(self, pass_: Any, pairs: str | int | None = None) -> None:
        """Follow the model's own code in a forward (an audited step's): the loss a model
        computes itself — ``labels=``, CLIP's ``return_loss=True``, nanoGPT's ``(logits,
        loss)`` — which no watch over what follows the forward reaches (until 2026-12-05 an
        in-batch contrastive loss or a plain sum returned by the forward was measured without
        a word). Followed: the code of the model and of the modules it only delegates to (the
        engine's spine: its one child with parameters, and so on — torch.compile's and peft's
        wrappers), with the layers they call that the engine hooks and modules without
        parameters (loss modules); inside the spine's other children nothing is — the audit
        proves the rows of what they return, which start fresh there (:meth:`module_returned`)
        — so that the watch's rules, written for losses, meet the model's own code and not
        its layers' (run through a whole model they refused LoRA models and checkpointed ones
        for nothing: tried and dropped, 2026-12-05)."""
        if self.done:
            self.reset()
        if pass_ not in self.passes:
            self.passes.append(pass_)
        self.forward_pass = pass_
        self._forward_units = _units(pass_.batch_size, pairs)
        self._running = []
        self._seq_first = set()
        self.resume()

    def end_forward(self) -> None:
        self.forward_pass = None
        self._running = []

    def in_own_code(self) -> bool:
        """Whether the followed forward runs the model's own code now (no child running)."""
        return not self._running

    def note_layer_dims(self, dims: list[int | None] | None) -> None:
        """A hooked layer ran inside a child of the model's code with its examples outside dim 0
        (a sequence-first GRU): the child's own outputs are read in dim 1
        (:meth:`module_returned`)."""
        if self._running and dims and any(d not in (None, 0) for d in dims):
            self._seq_first.add(id(self._running[0]))

    def module_called(self, module: Any) -> None:
        """A module with parameters called from the model's own code (the engine's pre-hook on
        the spine's children): its operations are not followed until it returns."""
        if self.forward_pass is not None:
            self._running.append(module)

    def module_returned(self, module: Any, output: Any) -> None:
        if self.forward_pass is None or not self._running or self._running[-1] is not module:
            return
        self._running.pop()
        if not self._running and self.forward_pass is not None:
            leaves: list[Any] = []
            flatten(output, leaves)
            outputs = [t for t in leaves if isinstance(t, Tensor)]
            for t in outputs:
                if t.dim() == 0 and t.requires_grad:
                    # a loss computed inside a module of the model: not followed (begin_forward)
                    self.child_losses[t] = type(module).__name__
            dims = example_dims(module, outputs)
            if dims is None and id(module) in self._seq_first:
                dims = [1] * len(outputs)
            self.mark_layer(self.forward_pass, outputs, dims, hooked=False)

    def mark_layer(
        self,
        pass_: Any,
        outputs: list[Tensor],
        dims: list[int | None] | None = None,
        *,
        hooked: bool = True,
    ) -> None:
        """A module's ``outputs`` returned into the model's own code: rows of examples where
        its layout says so. ``dims``: each output's example dimension where known (a recurrent
        or sequence-first layer's); otherwise dim 0 when it has the batch's size — never a
        guess at another dimension of a hooked layer's output (a head on [N·T, C] with C = N
        was refused as combining examples, a review). The output of a module the engine does
        not hook is read as an output of the model is (:meth:`watch`): one other dimension of
        the batch's size is a sequence-first layout, several are ambiguous (an InfoNCE over a
        sequence-first GRU's state was measured without a word when such outputs were left
        unfollowed, a second review). Not followed: an output without the batch's size in any
        dimension (a shared table's) or with the examples flattened with positions ([N·T, C]:
        the audit proves those rows; what the model's code computes from them is not seen)."""
        if self.forward_pass is not pass_ or self.done:
            return
        n = pass_.batch_size
        units, block = self._forward_units
        for i, t in enumerate(outputs):
            if t.grad_fn is None or t.dim() == 0:
                continue
            self.scaled.pop(t, None)
            self.weighted.pop(t, None)
            layout: Layout | None = None
            at = None if dims is None or i >= len(dims) else dims[i]
            sizes = [d for d, size in enumerate(t.shape) if size == n]
            if at is not None and t.dim() > at and t.shape[at] == n:
                layout = Rows(at, block, id(pass_), units, id(pass_))
            elif t.shape[0] == n:
                # (a child that ran a sequence-first layer reads dim 1 above: a [T, N, H]
                # with T = N read as examples in dim 0 let an in-batch loss over it through,
                # a third review)
                layout = Rows(0, block, id(pass_), units, id(pass_))
            elif not hooked and len(sizes) == 1 and t.shape[0] % n != 0:
                layout = Rows(sizes[0], block, id(pass_), units, id(pass_))
            elif not hooked and sizes:
                layout = Mixed(
                    f"an output of shape {list(t.shape)} of a module of the model has the "
                    f"batch's size ({n}) outside dim 0, and its dim 0 may be the examples "
                    "flattened with positions, so which dimension holds them is not known, and "
                    "it was used in the loss computed in the forward (keep the examples in dim "
                    "0, or compute the loss outside the forward)",
                    True,
                )
            if layout is None:
                self.layouts.pop(t, None)
            else:
                self.layouts[t] = layout
                # an activation the forward may keep without returning it (a forward hook's
                # capture for an activation penalty or a feature loss): the audit's replay,
                # which starts at the model's outputs, cannot weigh a loss term on it by
                # example, and a failed audit names it (PassNorms.inner_used; until 2026-12-06
                # the refusal blamed examples mixed in the forward, a hunt)
                self.inner[t] = pass_

    def following(self) -> bool:
        """Whether the watch follows a loss now (after an audited forward returned)."""
        return self._pushed and not self.done and self.forward_pass is None

    def unfollowed_rows(self, pass_: Any, inputs: list[Tensor]) -> str | None:
        """What is wrong with a hooked layer's ``inputs`` in the loss code, whose dim 0 the
        engine reads as ``pass_``'s examples where it has the batch's size: an input computed
        from the model's outputs in another order than the examples' (its rows would be given
        to the wrong examples); None where every such input is the outputs' rows in order, or
        not computed from them."""
        n = pass_.batch_size
        for t in inputs:
            if t.dim() == 0 or (torch.is_grad_enabled() and not t.requires_grad):
                continue  # (detached: a constant, read row by row as the batch's items are)
            layout = self.layouts.get(t)
            if isinstance(layout, Rows) and layout.block is not None and layout.owner != id(pass_):
                # (an earlier forward's own rows, whatever their count — a second forward of
                # another size read them as its own, 31% off, a review)
                return (
                    "input computed from the outputs of an earlier forward of the model, whose "
                    "rows noisescale would read as the last forward's examples. Call the layer "
                    "on each forward's outputs before the next forward runs"
                )
            if t.shape[0] != n or layout is None:
                # (other input — the batch's items, per-example negatives — is read as rows
                # of the examples, as the engine reads it: mark_called; whether row i is
                # example i's cannot be known — K = N ids shared by all are taken for one
                # each, docs/per_example.md)
                continue
            if not (
                isinstance(layout, Rows)
                and layout.dim == 0
                and layout.block is not None
                and layout.key == id(pass_)
            ):
                return (
                    "input computed from the model's outputs whose rows are not the examples "
                    "in their order (reordered, picked or combined), which noisescale would "
                    "read as example i's row i. Call the layer on the outputs in the examples' "
                    "order and reorder after it, or call it inside the model's forward (rows "
                    "there are checked by the audit)"
                )
        return None

    def rows_not_met(self, pass_: Any, tensors: list[Tensor], dim: int) -> str | None:
        """What is wrong with ``tensors`` — those a shared tensor meets along ``dim``, where
        each has the batch's size — when the watch knows them to hold ``pass_``'s values in
        another layout than its examples in order along ``dim``: the meeting would split
        the shared tensor's gradient along ``dim`` as the examples' (:func:`~.shared.
        _dispatch`). Read where the watch follows: in the loss, and in the model's own code
        on audited steps (a loss the forward computes itself, which no audit reaches when it
        returns a scalar). Until 2026-12-06 (a hunt) Kendall's uncertainty weighting with the
        task losses stacked task-major, ``(exp(-s)[:, None] * stack(losses) + s[:, None])``
        on [T, N] with T = N, gave task t's share of ``s`` to example t: norms 28–136% off,
        tr Σ 1–12% on every step, without a word; and the outputs reordered in the loss,
        ``o.flip(0) * s``, 138% off. None where every tensor the watch knows is the examples in
        order (or not ``pass_``'s)."""
        if self.done or not (
            self.following() or (self.forward_pass is pass_ and not self._running)
        ):
            return None
        for t in tensors:
            layout = self._layout(t)
            if isinstance(layout, Rows | Across):
                mine = (
                    layout.owner == id(pass_)
                    if isinstance(layout, Rows)
                    else id(pass_) in layout.owners
                )
                if not mine:
                    continue
                if layout.dim != dim:
                    return (
                        f"of shape {list(t.shape)}, computed from the model's outputs, whose "
                        f"dim {dim} has the batch's size by coincidence: it holds the examples "
                        f"along dim {layout.dim} (per-task losses stacked task-major, "
                        "torch.stack(losses) → [T, N] with T = N; activations moved "
                        "position-first, [T, …, N])"
                    )
                if (
                    isinstance(layout, Rows)
                    and (layout.block is None or layout.key != id(pass_))
                    and self.following()
                    and not _rows_in_order(layout, t, dim)
                ):
                    # (in the loss only: inside the forward, rows picked or put together by
                    # the data are the engine's to check — engine.check_meeting_rows, proven
                    # by the audit where they are the examples in order)
                    return (
                        f"of shape {list(t.shape)}, computed from the model's outputs, whose "
                        f"rows along dim {dim} are not the examples in their order (picked, "
                        "reordered or put together from them)"
                    )
            elif isinstance(layout, One) and layout.owner == id(pass_):
                return (
                    f"of shape {list(t.shape)}, computed from one example's outputs only, "
                    f"whose dim {dim} has the batch's size by coincidence"
                )
            elif isinstance(layout, _Sum) and id(pass_) in layout.owners:
                return (
                    f"of shape {list(t.shape)}, already summed or averaged over the examples "
                    f"(it holds none of them), whose dim {dim} has the batch's size by "
                    "coincidence"
                )
        return None

    def examples_elsewhere(self, pass_: Any, flat: list[Any], dim: int) -> str | None:
        """Of ``flat``, a tensor the watch follows in the loss holding ``pass_``'s examples
        along another dimension than ``dim``: what it is (:meth:`PerExampleNorms.
        note_met_elsewhere`); else None."""
        if self.done or not self.following():
            return None
        for t in flat:
            layout = self._layout(t) if isinstance(t, Tensor) else None
            if isinstance(layout, Rows) and layout.owner == id(pass_) and layout.dim != dim:
                return (
                    f"a tensor of shape {list(t.shape)} computed from the model's outputs with "
                    f"the examples along dim {layout.dim}, not {dim}"
                )
        return None

    def mark_called(
        self, pass_: Any, outputs: list[Tensor], pairs: str | int | None, reason: str | None
    ) -> None:
        """A hooked layer called in the loss code: with ``reason``, its outputs are refused
        if the loss uses them; else each output the watch did not follow whose dim 0 has the
        batch's size is rows of ``pass_``'s examples, as the engine measures it."""
        n = pass_.batch_size
        units, block = _units(n, pairs)
        if reason is not None:
            # (the output may be the engine's shared tensor, whose operations the watch sees
            # unwrapped: the passes are marked here, not through the output's layout alone)
            for watched in self.passes:
                if watched.coupled is None:
                    watched.coupled = "after the model's forward returned, " + reason
        for t in outputs:
            if t.grad_fn is None or t.dim() == 0:
                continue
            if reason is not None:
                self.layouts[t] = Mixed(reason)
            elif t not in self.layouts and t.shape[0] == n:
                self.layouts[t] = Rows(0, block, id(pass_), units, id(pass_))

    def pause(self) -> None:
        """Stop following (a forward of the model starts: its operations are the engine's).
        Both modes are looked for whatever ``_pushed`` says: a pause inside the function
        mode's own handler (a backward that collects, or recomputes a checkpointed forward)
        cannot take it off — it is off its stack while its handler runs, and goes back on
        after — so the next pause does."""
        _remove(self._dispatch, dispatch=True)
        _remove(self._function, dispatch=False)
        self._pushed = False
        _remove_stale()

    def resume(self) -> None:
        """Follow again, from the bottom of both mode stacks: a mode the user enters around the
        forward and leaves before the backward pops itself, not the watch."""
        if self.passes and not self.done and not self._pushed:
            _refuse_higher_order_operators()
            self.pause()  # (one left on its stack by a pause inside its handler)
            _insert_bottom(self._function, dispatch=False)
            _insert_bottom(self._dispatch, dispatch=True)
            self._pushed = True

    def finish(self) -> None:
        """The step collects: a watched pass whose loss was not followed to a backward is
        marked (withheld by the engine, never measured unchecked)."""
        reason = self.gave_up
        if reason is None and not self.checked:
            reason = (
                "noisescale did not see this pass's backward start (loss.backward(), "
                "torch.autograd.backward or torch.autograd.grad) after its forward, so it "
                "could not check that the loss keeps the examples apart"
            )
        if reason is None and self.lost:
            reason = (
                "noisescale's watch over the loss was taken off the mode stack before the "
                "backward (a TorchDispatchMode or TorchFunctionMode left out of order), so it "
                "could not check that the loss keeps the examples apart"
            )
        if reason is not None:
            for pass_ in self.passes:
                if pass_.coupled is None and pass_.loss_unfollowed is None:
                    pass_.loss_unfollowed = reason

    def reset(self) -> None:
        """End the watch (the step collects): nothing followed any more."""
        self.pause()
        self.layouts: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        # means over slices of the rows a forward ran on: (its pass, its rows) -> the slices
        # [start, stop), read at the step's backward (_warn_rows_left_out)
        self.slices: dict[tuple[int, int], list[tuple[int, int]]] = {}
        # tensors scaled by a constant since the model's outputs (ℓ / N, w · ℓ): a sum of them
        # is not a plain sum over the examples (_Sum.plain)
        self.scaled = WeakTensorKeyDictionary()
        # tensors computed from a cross-entropy / NLL with differing class weights averaged over
        # them (a device bool each): a backward from one is refused by the tracker
        self.weighted = WeakTensorKeyDictionary()
        # layers' outputs inside an audited forward: their pass, until it returns them (mark_layer)
        self.inner = WeakTensorKeyDictionary()
        # tensors computed from a mean over what it counts (_mark_counted_mean): {(id of a
        # pass, inside the forward): a device bool}, read at the backward from them
        self.counted = WeakTensorKeyDictionary()
        # of those, the tensors whose kind "mean" is that counted mean's own — its output,
        # scaled, or added to another such — (a device bool: uneven, or targets ignored):
        # the kind check passes them (PassNorms.loss_kind_counted)
        self.counted_kind = WeakTensorKeyDictionary()
        # terms weighed by a constant tensor (w · ℓ): whether the weights vary other than as a
        # 0/1 mask, and their sum (device tensors), for a sum later divided by it
        # (_note_divided_sum: (w·ℓ).sum() / w.sum(), the class-weighted mean's ratio)
        self.weight_sums = WeakTensorKeyDictionary()
        # sums over rows picked from the examples' (kl_div(s[mask], t[mask], 'sum')): their
        # pass, the number of rows picked and whether the picks are uneven (a device bool), for
        # a division by that number (_note_picked_sum)
        self.picked_sums = WeakTensorKeyDictionary()
        # 0-dim tensors requiring grad that a module of the model returned (a loss computed
        # inside it, not followed), and what is computed from them: the module's class
        self.child_losses = WeakTensorKeyDictionary()
        # storages written in place with followed values: address -> (the storage, weakly —
        # None where it has no storage object —, the layout its other views get)
        self.written: dict[int, tuple[Any, Mixed]] = {}
        self.targets = WeakTensorKeyDictionary()  # the tensors written so (their layouts hold)
        self.passes: list[Any] = []
        self.forward_pass: Any = None  # the pass whose forward is followed (begin_forward)
        self._forward_units = (0, 1)
        self._running: list[Any] = []  # the spine's children running (module_called)
        self._seq_first: set[int] = set()  # of them, those that ran a sequence-first layer
        self.done = False
        self.checked = False  # a backward (or autograd.grad) from the loss was seen
        self.gave_up: str | None = None
        self.followed = 0  # of them, on followed tensors
        self.lost = False  # the dispatch mode was found off its stack at the backward

    # -- the verdict ---------------------------------------------------------------------------

    def backward(self, roots: list[Tensor], *, final: bool, grads: list | None = None) -> None:
        """A backward starts from ``roots``: a root that mixes examples marks the passes.
        ``final``: the step's backward (``backward``), which ends the watch; not for
        ``torch.autograd.grad`` (a gradient penalty's inner gradient comes before the loss).
        ``grads``: the gradients given with the roots (``losses.backward(gradient)``), or None."""
        if self.done or self.paused():
            return
        if not any(isinstance(r, Tensor) and self._layout(r) is not None for r in roots) and (
            # (a walk of the roots' graph, on audited steps only, for roots without a layout)
            reaches_pass(roots, self.passes) is None
        ):
            # another graph's backward: a GAN's discriminator step on G(z).detach() between
            # the generator's forward and its loss (the loop of PyTorch's DCGAN tutorial). Not
            # this pass's: the watch goes on to the loss that is (until 2026-12-06 it ended
            # here, and the generator's loss through a discriminator with BatchNorm in
            # training mode — coupling the examples — was measured without a word, a hunt)
            return
        self.done = final
        self.checked = True
        if final:
            self._rows_left_out()
        if not _on_stack(self._dispatch, dispatch=True):
            self.lost = True
        for at, root in enumerate(roots):
            layout = self._layout(root) if isinstance(root, Tensor) else None
            if isinstance(layout, Mixed):
                for pass_ in self.passes:
                    if pass_.coupled is None:
                        pass_.coupled = (
                            "inside the model's own forward code (a loss it computes itself, "
                            "or its examples combined between its layers), "
                            if layout.inside
                            else "after the model's forward returned, "
                        ) + layout.reason
                return
            if final and isinstance(root, Tensor) and root in self.child_losses:
                for pass_ in self.passes:
                    pass_.child_loss = self.child_losses[root]
            if isinstance(root, Tensor):
                self._apply_marks(root)
            if final and isinstance(root, Tensor) and root in self.weighted:
                flag = self.weighted[root]
                for pass_ in self.passes:
                    previous = pass_.class_weighted
                    pass_.class_weighted = flag if previous is None else previous | flag
            if final and isinstance(layout, Rows | Across) and grads and root not in self.scaled:
                # a backward from the examples' terms themselves, weighted by the gradient
                # given: losses.backward(torch.ones_like(losses)) is their plain sum (until
                # 2026-12-06 its kind was not read, and under "mean" every norm came out N²
                # too large without a word, a hunt), a gradient of 1/numel their mean
                # (a root scaled already — (l / N).backward(ones) is l.mean() — is the user's:
                # the gradient given weighs terms that may hold the 1/N, a review)
                kind = _given_kind(root, layout, grads[at])
                if kind is not None:
                    layout = _Sum(_sum([(root, layout)]).owners, kind)
            if final and isinstance(layout, _Sum) and layout.plain is not None:
                # (the step's loss only: not an earlier torch.autograd.grad's output, a
                # saliency probe's or a gradient penalty's inner sum)
                for pass_ in self.passes:
                    if id(pass_) in layout.owners:
                        pass_.loss_kind = layout.plain
                        pass_.loss_kind_factored = layout.factored
                        pass_.loss_kind_counted = self.counted_kind.get(root)

    def _layout(self, t: Tensor) -> Layout | None:
        layout = self.layouts.get(t)
        if self.written and (layout is None or t._base is not None):
            hit = self.written.get(_storage(t))
            # (the storage itself, not only its address: one freed since — an LSTM kernel's
            # buffer written inside the forward — gives its address to a tensor of the loss,
            # and a packed BiLSTM model was refused at random until 2026-12-06, a hunt)
            if hit is not None and t not in self.targets and _same_storage(hit[0], t):
                return hit[1]
        return layout

    # -- following one operation ---------------------------------------------------------------

    def follow(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if self.done or (self.forward_pass is not None and self._running):
            return  # (inside a module of the model's: begin_forward)
        # Under no_grad, inside a custom autograd.Function's forward or a reentrant checkpoint,
        # operands are followed whatever they require: the Function's output gets the layout of
        # what it computed. With gradients on, a tensor that requires none is a constant.
        grad = torch.is_grad_enabled()
        flat: list[Any] = []
        flatten((args, kwargs), flat)
        if self.child_losses:
            children = [
                self.child_losses[t]
                for t in flat
                if isinstance(t, Tensor) and t.dim() == 0 and t in self.child_losses
            ]
            if children:
                leaves: list[Any] = []
                flatten(out, leaves)
                for t in leaves:
                    if isinstance(t, Tensor) and t.dim() == 0:
                        self.child_losses[t] = children[0]
        known = []
        for t in flat:
            if isinstance(t, Tensor) and (t.requires_grad or not grad):
                layout = self._layout(t)
                if layout is not None:
                    known.append((t, layout))
        if not known:
            return
        if self.inner and self.forward_pass is None:
            for t, _ in known:
                pass_ = self.inner.get(t)
                if pass_ is not None and pass_.inner_used is None:
                    pass_.inner_used = tuple(t.shape)
        self.followed += 1
        if self.followed > _MAX_OPS:
            self.done = True
            self.gave_up = (
                f"the loss ran more than {_MAX_OPS:,} operations on tensors computed from the "
                "model's outputs; noisescale stopped following it"
            )
            return
        leaves: list[Any] = []
        flatten(out, leaves)
        outs = [t for t in leaves if isinstance(t, Tensor)]
        # an in-place operation's target before it (a write that leaves its rows as they were
        # leaves the other views of its memory as they were too)
        before = (
            self._layout(args[0])
            if args and isinstance(args[0], Tensor) and _name(func).endswith("_")
            else None
        )
        try:
            layouts = _rule(func, args, kwargs, known, outs)
        except Exception as err:  # a rule that cannot read the operation: not followed
            layouts = Mixed(f"'aten.{_name(func)}' ({type(err).__name__} {RULE_FAILED})")
        if not isinstance(layouts, list):
            layouts = [layouts] * len(outs)
        name = _name(func).rstrip("_")
        scaled = (any(t in self.scaled for t, _ in known) and name not in _UNSCALING) or (
            name in _SCALINGS
            and len(known) == 1
            and len(flat) > 1
            and _weights_only(flat, known, outs[0].dim() if outs else 0)
        )
        if scaled and name in _SHIFTS and _shifted(flat, known):
            scaled = False  # (1 − cos: an affine shift of the terms is no scaling of the loss)
        if (
            scaled
            and not any(t in self.scaled for t, _ in known)
            and self._new_terms(name, args, known)
        ):
            scaled = False
        inside = self.forward_pass is not None
        marks = [self.counted[t] for t, _ in known if t in self.counted]
        if marks:
            for t in outs:
                for mark in marks:
                    self._add_marks(t, mark)
        sums = [t for t, x in known if isinstance(x, _Sum)]
        if sums and all(t in self.counted_kind for t in sums):
            flag = functools.reduce(lambda a, b: a & b, [self.counted_kind[t] for t in sums])
            for t in outs:
                self.counted_kind[t] = flag
        self._note_weights(name, args, known, outs)
        flags = [self.weighted[t] for t, _ in known if t in self.weighted]
        if flags:
            weighted = flags[0]
            for flag in flags[1:]:
                weighted = weighted | flag
            for t in outs:
                self.weighted[t] = weighted
        for t, layout in zip(outs, layouts, strict=False):
            if isinstance(layout, _Sum) and layout.added is not None and layout.plain is None:
                owners = {owner for owner, _ in layout.added}
                n = self._batch_size(frozenset(owners)) if len(owners) == 1 else None
                if n is not None and len(layout.added) == n:
                    # every example of the pass once, weight 1: Python's sum(losses) is
                    # losses.sum() (until 2026-12-06 its kind was never set, and under
                    # "mean" every norm came out N² too large without a word, a hunt)
                    layout = _Sum(layout.owners, "sum", None, added=layout.added)
            if inside and isinstance(layout, Mixed) and not layout.inside:
                # (an operation without a rule in the model's own code is refused, as after the
                # forward: dropping the thread there, tried first, measured a loss over
                # torch.cdist's logits without a word, a review)
                layout = Mixed(layout.reason, True)
            if layout is not None:
                if (
                    scaled
                    and isinstance(layout, _Sum)
                    and layout.plain is not None
                    and not (name == "mean" and all(isinstance(x, Rows | Across) for _, x in known))
                    # (a kind read already through the factor, c·mean_i ℓ_i, that a move, a
                    # join or a sum of sums keeps: torch.stack([0.5 * ce, 0.3 * mse]).sum()
                    # under "sum" was measured N² off without a word until 2026-12-07, a hunt)
                    and not all(isinstance(x, _Sum) for _, x in known)
                ):
                    # (a mean over the examples of weighted terms is a plain mean of them: the
                    # weights make the terms, not the reduction — CTC's own reduction='mean',
                    # mean(ℓ_i / target_length_i), under "sum" read every norm N² too small
                    # without a word until 2026-12-06, a hunt; a sum of weighted terms stays
                    # the user's, its weights may hold the 1/N)
                    layout = _Sum(layout.owners, None, layout.count)
                # (two plain sums, or means, added as they are keep their kind too: CE +
                # CE_aux under "sum" was measured N² off while CE + 0.1 · CE_aux was refused,
                # a review of 2026-12-06)
                added = (
                    name in ("add", "sub")
                    and len(known) == 2
                    and all(isinstance(x, _Sum) for _, x in known)
                )
                if isinstance(layout, _Sum) and (scaled or (added and layout.plain is None)):
                    kind, flipped = self._kept_kind(name, args, kwargs, known)
                    if kind is not None:
                        layout = _Sum(layout.owners, kind, layout.count, flipped)
                elif (
                    isinstance(layout, _Sum)
                    and layout.plain is None
                    and name in _WEIGHINGS
                    and kwargs.get("rounding_mode") is None
                ):
                    kind, flipped = self._weighted_kind(name, args, known, outs)
                    if kind is not None:
                        layout = _Sum(layout.owners, kind, layout.count, flipped)
                self.layouts[t] = layout
                if scaled:
                    self.scaled[t] = True
        if _name(func) in ("nll_loss_forward", "nll_loss2d_forward"):
            self._note_class_weights(func, args, kwargs, outs)
        # (inside the forward too: a loss the model computes itself over what it counts —
        # SimMIM's (l1·mask).sum() / mask.sum() — which the one-shot norms of each example's
        # own loss refuse unless the token watcher measured its weights, as for transformers'
        # loss_function; until 2026-12-06 not flagged there, and returned N² × each share,
        # up to 12× off, a hunt. The tracker refuses it under "mean" too: counted_mean_message.)
        if _name(func) in ("nll_loss_forward", "nll_loss2d_forward"):
            self._note_counted_mean(func, args, kwargs, known, outs, inside)
        elif _name(func) in ("div", "true_divide"):
            self._note_divided_sum(args, known, outs, inside)
        if name in _MEANS:
            self._note_uneven_mean(func, name, args, kwargs, known, outs, inside)
        self._note_picked_sum(name, args, known, outs, layouts, inside)
        target = args[0] if args and isinstance(args[0], Tensor) else None
        if (
            target is not None
            and _name(func).endswith("_")
            and any(t is not target for t, _ in known)
            # (rows written into the same rows — DETR's tmp[..., :2] += reference, a slice
            # along the features of per-example rows — keep every view's rows; until
            # 2026-12-06 Conditional and Deformable DETR were refused as combining examples,
            # a hunt)
            and not (isinstance(before, Rows) and self.layouts.get(target) == before)
        ):
            # Values computed from the outputs written in place into a tensor: the tensor
            # itself has the layout just computed; any other view of its memory (taken before,
            # or after) is not followed through the write: mixed
            self.targets[target] = True
            storage = _storage(target)
            mixed = Mixed(
                f"'aten.{_name(func)}' wrote values computed from the model's outputs into a "
                "tensor whose memory another tensor of the loss shares"
            )
            self.written[storage] = (_storage_ref(target), mixed)
            # the views followed already (the base a slice was written into: tmp after
            # tmp[:, :2] += o.flip(0)[:, 2:]) kept their own layouts until 2026-12-06, and a
            # loss over the base read the examples apart (measured without a word; found
            # writing a test for DETR's in-place write)
            for other in list(self.layouts.keys()):
                if other is not target and _storage(other) == storage:
                    self.layouts[other] = mixed

    def _batch_size(self, owners: Any) -> int | None:
        """The one batch size of the watched passes among ``owners`` (ids), or None."""
        sizes = {p.batch_size for p in self.passes if id(p) in owners}
        return sizes.pop() if len(sizes) == 1 else None

    def _new_terms(self, name: str, args: tuple, known: list) -> bool:
        """Whether a numeric factor on per-example rows makes new per-example terms rather than
        scaling the loss: any number but 1/N (``ℓ / N`` summed is a mean; ``0.5 ·`` in
        ``gaussian_nll_loss``, ``1 / C`` in ``multilabel_soft_margin_loss``, label smoothing's
        ``1 − ε`` and ``ε / C`` on ``reduction='none'`` rows make terms whose sum is a plain
        sum: until 2026-12-06 they cleared the kind, and such losses under the wrong
        declaration were measured N² apart, a hunt)."""
        t, layout = known[0]
        factor = _number_factor(name, args, t) if isinstance(layout, Rows) else None
        n = self._batch_size({getattr(layout, "owner", None)})
        if factor is None or n is None:
            return False
        # (1/N or 1/numel: ℓ / N summed, tok / (N·T) summed — a mean written as a sum: as
        # given)
        return all(abs(factor * m - 1.0) > 1e-9 for m in (n, t.numel()))

    def _kept_kind(
        self, name: str, args: tuple, kwargs: dict, known: list
    ) -> tuple[str | None, bool]:
        """The kind a plain sum or mean keeps through a constant factor given as a Python
        number, or through adding another of its kind, and whether a factor flipped it: c·Σ ℓ_i
        is still a sum over the examples and c·mean a mean — but Σ divided by N is a mean
        (``kl_div``'s 'batchmean'; flipped: with k = N micro-batches, Lightning's Σ/k, it may
        be the loop's arithmetic, which the tracker does not hold against the declaration under
        accumulation); a factor that is N·m or 1/(N·m) (``mean · N`` or ``T² · mean`` with
        T² = N, ``Σ · 1/(N·T)``) and a sum divided by another number (the step's examples,
        tokens counted on the host) are left unknown, as given. Until 2026-12-06 every factor
        cleared the kind, and a label-smoothed ``cross_entropy(..., reduction='sum')`` — (1 −
        ε)·Σ nll + ε/C·Σ smooth — or KD's ``T² · kl_div(..., reduction='sum')`` under the
        default ``"mean"`` were measured N² off (a hunt). A factor held in a tensor is not read
        (a host sync): unknown, as before — but a GradScaler's scale."""
        if name in ("add", "sub"):
            sums = [x for _, x in known if isinstance(x, _Sum)]

            def single(x: _Sum) -> bool:  # (over one-example forwards only)
                return all(self._batch_size(frozenset({o})) == 1 for o in x.owners)

            # (a mean over one example is its sum: a loss over a loop of one-example forwards,
            # Python's sum of their means, is a plain sum over them all — a review, 2026-12-06)
            kinds = {"sum" if x.plain == "mean" and single(x) else x.plain for x in sums}
            if len(known) == 2 and len(kinds) == 1 and None not in kinds:
                kind = kinds.pop()
                if kind == "mean" and len(sums) == 2 and not sums[0].owners & sums[1].owners:
                    # means of two forwards' examples added: a mean over neither's union but
                    # weights 1/n per forward, the user's
                    return None, False
                return kind, any(x.factored for x in sums)
            return None, False
        if name not in _SCALINGS or len(known) != 1 or not isinstance(known[0][1], _Sum):
            return None, False
        t, layout = known[0]
        kept = layout.plain  # (the input's own kind, kept through its own factors)
        if kept is None or kwargs.get("rounding_mode") is not None or len(args) != 2:
            return None, False
        other = args[1] if args[0] is t else args[0]
        if isinstance(other, Tensor) and other.numel() == 1 and scaler_watch.SCALING[0]:
            return kept, layout.factored  # (a GradScaler's scale: a factor, whatever its value)
        return self._factor_kind(name, layout, _number_factor(name, args, t))

    def _factor_kind(
        self, name: str, layout: _Sum, factor: float | None
    ) -> tuple[str | None, bool]:
        """The kind ``layout``'s plain sum or mean keeps through one constant ``factor`` (its
        absolute value; 1/c for a division), and whether the factor flipped it
        (:meth:`_kept_kind`)."""
        kept = layout.plain
        n = self._batch_size(layout.owners)
        if kept is None or factor is None or n is None:
            return None, False
        if abs(factor - 1.0) < 1e-12:
            return kept, layout.factored  # (Lightning's loss / 1, accelerate's)
        if name in ("div", "true_divide"):
            if kept == "sum" and abs(factor * n - 1.0) < 1e-9:
                return "mean", True  # (Σ/N)
            if kept == "sum":
                # (another divisor normalizes by what the user counts — the step's examples, a
                # model's num_items_in_batch given as a number: taken as given)
                return None, False
        # (a mean times 1/N is a mean, as mean / N is: 0.5 · out.loss at N = 2 under "sum" was
        # taken as given, N² off without a word, until 2026-12-07, a hunt)
        # (and a mean times 1/count is a mean: ℓ.mean() · (1/N) over a vector of the
        # examples' losses, whose count is N, was left unknown — under "sum" measured N² off
        # without a word until 2026-12-07, a hunt — while cross_entropy(…) · (1/N) was refused)
        elif any(
            abs(factor * m - 1.0) < 1e-9
            for m in (
                n if kept == "sum" else 0,
                1.0 / n,
                (layout.count or 0) if kept == "sum" else 0,
                # (a token mean times its count, held in a tensor — (y != -100).sum() with no
                # token ignored — is the sum over the tokens: as given, as mean · N is; refused
                # as a mean under "sum" for a review of 2026-12-07)
                1.0 / layout.count if kept == "mean" and layout.count else 0,
            )
        ) or (kept == "mean" and _whole_multiple(factor, n)):
            # (mean · N, T² · mean with T² = N, Σ · 1/(N·T): either kind; a mean times N·m —
            # a token mean times its N·T tokens, the sum over them — too, as given: refused
            # under "sum" until a review of 2026-12-07)
            return None, False
        return kept, layout.factored  # (label smoothing's 1 − ε and ε/C, KD's T², 1/k)

    def _weighted_kind(
        self, name: str, args: tuple, known: list, outs: list
    ) -> tuple[str | None, bool]:
        """The kind a stack of sums or means of one kind keeps through task weights held in a
        tensor: ``torch.stack(losses) @ w``, ``(torch.stack(losses) * w).sum()`` — a weighted
        sum of means is a mean, of sums a sum — where every nonzero weight would keep it alone
        (:meth:`_factor_kind`) and keeps it alike; else unknown, as given. Until 2026-12-07
        such weights were not read and ``torch.stack([ce, aux]) @ w`` under ``"sum"`` was
        measured N² off without a word (documented as not caught)."""
        if len(known) != 1 or not isinstance(known[0][1], _Sum) or len(args) != 2:
            return None, False
        t, layout = known[0]
        other = args[1] if args[0] is t else args[0]
        if (
            layout.plain is None
            or not isinstance(other, Tensor)
            or other.numel() > _MAX_WEIGHTS
            or other.is_complex()
            # (no broadcast onto more copies: (ce.mean() * torch.ones(N)).sum() is N · mean,
            # as given — a review of 2026-12-07)
            or (name not in ("dot", "vdot") and tuple(outs[0].shape) != tuple(t.shape))
            or (name in ("div", "true_divide") and other is args[0])
        ):
            return None, False
        try:
            values = other.detach().reshape(-1).tolist()
        except Exception:  # (a fake or meta tensor, a subclass that cannot be read)
            return None, False
        divide = name in ("div", "true_divide")
        kinds = {
            self._factor_kind(name, layout, 1.0 / abs(v) if divide else abs(v))
            for v in values
            if v != 0 and math.isfinite(v)
        }
        if len(kinds) != 1 or any(not math.isfinite(v) for v in values):
            return None, False
        return kinds.pop()

    def _note_counted_mean(
        self, func: Any, args: tuple, kwargs: dict, known: list, outs: list, inside: bool = False
    ) -> None:
        """A negative log-likelihood averaged over its targets (``reduction='mean'``) divides
        by the weight of the targets it counts — those not ``ignore_index``, each times its
        class weight — not by the examples: a device flag on the pass that it did
        (:attr:`PassNorms.counted_mean`), which the one-shot norms of each example's own loss
        refuse, and the tracker under ``loss_reduction="mean"`` (until 2026-12-06 it took the
        pass as it was backpropagated, each example fed weighing 1/N, its norm rescaled by the
        pass's N/(counted) — biased, a hunt; ``docs/per_example.md``)."""
        named = _named(func, args, kwargs)
        t, layout = known[0]
        if t is not args[0] or not isinstance(layout, Rows) or named.get("reduction", 1) != 1:
            return
        target, weight = named.get("target"), named.get("weight")
        if not isinstance(target, Tensor):
            return
        flag = (target == named.get("ignore_index", -100)).any()
        if isinstance(weight, Tensor):
            # (class weights alike, 1/C each, divide the mean by their common value: a plain
            # mean — flagged until 2026-12-06, when only the one-shot norms read the flag)
            flag = flag | (weight.amin() != weight.amax())
        self._mark_counted_mean({layout.owner}, lambda pass_: flag, outs, inside)
        for t in outs:
            self.counted_kind[t] = flag

    def _note_uneven_mean(
        self,
        func: Any,
        name: str,
        args: tuple,
        kwargs: dict,
        known: list,
        outs: list,
        inside: bool,
    ) -> None:
        """A mean (``.mean()``, a loss's ``reduction='mean'``) over rows picked from the
        examples' — ``o[mask]``, a masked image model's ``pred[mask]``, ``o[:k]``,
        ``torch.cat`` of such — is a mean over the examples only where every example has as
        many rows there; else it averages over what it counts, flagged as
        :meth:`_note_counted_mean` does (where the picks' map is not known, flagged: the
        one-shot norms refuse, and the tracker under "mean"). Until 2026-12-06 only a
        cross-entropy's ignored targets and class weights were flagged, and the one-shot norms
        of an MSE, an L1 or a BCE over an uneven ``o[mask]`` came out (N/M)² × each
        example's, a review."""
        picked = [(t, x) for t, x in known if isinstance(x, Rows) and x.block is None and x.n > 0]
        if name == "mean":
            picked = [(t, x) for t, x in picked if t is args[0]]
        # (a loss's target may be the followed one: F.mse_loss(t[mask], o[mask]), a review)
        if not picked:
            return
        t, layout = picked[0]
        if isinstance(layout.key, tuple) and layout.key[0] in _IRREGULAR:
            return
        named = _named(func, args, kwargs)
        if name == "mean":
            if layout.dim not in _dims(named.get("dim"), t.dim()):
                return
        elif named.get("reduction", 1) != 1:
            return
        self._warn_rows_left_out(layout)
        flag = self._uneven(layout, t)
        # (a slice of the examples' rows: a divisor of the data's? no — the tracker measures
        # it as backpropagated, as before 2026-12-06's refusal of counted means, which a
        # review found refusing a chunked cross-entropy's and a DQN's slices)
        sliced = layout.span is not None and layout.span[4] == layout.n
        self._mark_counted_mean(
            {layout.owner}, lambda pass_: flag, outs, "slice" if sliced else inside
        )
        for t in outs:
            self.counted_kind[t] = flag

    def _note_picked_sum(
        self, name: str, args: tuple, known: list, outs: list, layouts: list, inside: bool
    ) -> None:
        """A sum over rows picked from the examples' (``kl_div(s[mask], t[mask])``'s sum,
        a soft-target ``cross_entropy``'s), divided by a Python number that is the count of
        the rows picked — ``reduction='batchmean'`` over ``s[mask]``, a soft-target
        cross-entropy's mean — is a mean over those rows: where some examples have more rows
        there than others it averages over what it counts, flagged as
        :meth:`_note_uneven_mean` flags ``.mean()`` (until 2026-12-06 such a sum divided by a
        number was taken as the user's own definition, and the one-shot norms of token-level
        KD over unevenly padded tokens came out (N·c_i/M)² × each example's own, up to 125%
        off, a hunt). Divided by any other number (the examples', N) it is taken as given."""
        if not outs or not isinstance(layouts[0], _Sum):
            return
        if name in _SIGN_ONLY and len(known) == 1 and known[0][0] in self.picked_sums:
            self.picked_sums[outs[0]] = self.picked_sums[known[0][0]]
            return
        if name in ("div", "true_divide", "mul", "multiply") and len(known) == 1:
            t = known[0][0]
            held = self.picked_sums.get(t)
            factor = _number_factor(name, args, t)
            if held is None or factor is None:
                return
            owner, rows, flag = held
            if any(abs(factor * m - 1.0) < 1e-9 for m in rows):
                self._mark_counted_mean({owner}, lambda pass_: flag, outs, inside)
                for out in outs:
                    self.counted_kind[out] = flag
            return
        picked = [(t, x) for t, x in known if isinstance(x, Rows) and x.block is None and x.n > 0]
        if len(picked) != 1 or len(known) != 1:
            return
        t, layout = picked[0]
        flag = self._uneven(layout, t)
        if flag is None:
            return
        # the rows picked, and their elements over the last dim (a soft-target cross-entropy
        # over [M, T, C] divides by M·T)
        rows = {t.shape[layout.dim]}
        if t.dim() > 1 and t.shape[-1]:
            rows.add(t.numel() // t.shape[-1])
        self.picked_sums[outs[0]] = (layout.owner, tuple(rows), flag)

    @staticmethod
    def _uneven(layout: Rows, t: Tensor) -> Tensor | None:
        """Whether the examples have different numbers of rows among ``layout``'s picks (a
        device bool; true where the picks' map is not known), or ``None`` where the rows are
        no picks this can count (a flattened or packed map)."""
        if isinstance(layout.key, tuple) and layout.key[0] in _IRREGULAR:
            return None
        ids = layout.ids
        if ids is None:
            return torch.ones((), dtype=torch.bool, device=t.device)
        # (no host sync: the flag stays on the device until the norms are read)
        counts = torch.zeros(layout.n, dtype=torch.long, device=ids.device)
        counts.index_add_(0, ids.clamp(0, layout.n - 1), torch.ones_like(ids))
        return (counts != counts[0]).any() | (ids < 0).any()

    def _warn_rows_left_out(self, layout: Rows) -> None:
        """Note a mean over a slice of the rows the model ran on, ``o[:k]`` of its n (Python
        integers: no device read); :meth:`_rows_left_out` warns at the step's backward where
        the slices averaged leave rows out."""
        span = layout.span
        if self.rows_left_warned or span is None or span[4] != layout.n:
            return
        start, stop, size = span[2], span[3], span[4]
        if stop - start < size and torch.is_grad_enabled():
            # (a mean under no_grad, a logged statistic, covers no row: a review found the
            # warning lost when a DQN loop logged its next states' mean so)
            self.slices.setdefault((layout.owner, size), []).append((start, stop))

    def _rows_left_out(self) -> None:
        """A loss of means over slices of the rows a forward ran on that leave rows out — a
        DQN's one forward over ``torch.cat([obs, next_obs])``, its loss on the first half and
        the next states only in a detached target: the tracker counts all n rows as examples,
        the left out ones with no gradient, and treats them as independent draws (|G|² low by
        1/(2N − 1), tr Σ about 2× a transition's; a hunt, 2026-12-06). Warned about once,
        with the fixes; slices that together cover the rows (a chunked cross-entropy's means,
        a labeled and an unlabeled half) are not (a review). A term over all the rows that is
        not a slice's mean is not seen here (the warning says so)."""
        slices, self.slices = self.slices, {}
        for (_, size), spans in slices.items():
            at = 0
            for start, stop in sorted(spans):
                if start > at:
                    break
                at = max(at, stop)
            if at >= size or self.rows_left_warned:
                continue
            self.rows_left_warned = True
            kept = ", ".join(f"[{a}, {b})" for a, b in sorted(set(spans)))
            warnings.warn(
                f"noisescale: the loss averages rows {kept} of the {size} rows the model ran "
                f"on, and the tracker counts all {size} as examples: if no other term of the "
                "loss reaches the other rows — a DQN's torch.cat([obs, next_obs]) in one "
                "forward, the next states only in a detached target — they are counted as "
                "examples without gradient, and |G|² and tr Σ come out wrong (|G|² low by "
                f"1/({size} − 1)). Compute those rows in a separate forward under "
                "torch.no_grad(), or, for pairs of halves, pass paired_rows='halves'",
                RuntimeWarning,
                stacklevel=3,
            )

    def _note_class_weights(self, func: Any, args: tuple, kwargs: dict, outs: list) -> None:
        """A cross-entropy / NLL averaged over class weights that differ (uniform ones, 1/C,
        make a constant divisor): the tracker refuses a backward from what it computed
        (:meth:`backward`) — not a weighted loss only logged beside the one trained on (a
        review, 2026-12-05)."""
        named = _named(func, args, kwargs)
        weight = named.get("weight")
        if named.get("reduction", 1) != 1 or not isinstance(weight, Tensor):
            return
        for out in outs:
            self.weighted[out] = weight.amin() != weight.amax()

    def _note_divided_sum(self, args: tuple, known: list, outs: list, inside: bool = False) -> None:
        """A sum (or mean) over the examples divided by a tensor computed from the data — a
        mask's sum, ``(ℓ·m).sum() / m.sum()`` — is a mean over what it counts unless that is
        the number of examples: flagged as :meth:`_note_counted_mean` does.

        A plain mean of unweighted terms divided by a 0-d tensor whose value is no count — a
        detached running average of the loss, ``ce / ema``, or the batch's own loss value,
        ``ce / ce.detach()`` — is that mean times a constant, as ``ce * (1 / ema)`` and
        ``ce / ema.item()`` are (until 2026-12-06 refused by the one-shot norms as averaged
        over what it counts, a hunt). Its terms may still be masked (``torch.where(m, ℓ,
        0).mean() / m.float().mean()``), so a divisor whose value is a count — a whole number,
        or one over the examples or over the elements averaged, a mask's mean — is flagged
        as before (a device test, no host read)."""
        if len(known) != 1 or known[0][0] is not args[0] or not isinstance(known[0][1], _Sum):
            return
        divisor = args[1] if len(args) > 1 else None
        if not isinstance(divisor, Tensor) or divisor.numel() != 1:
            return
        count = known[0][1].count
        scaled_mean = (
            known[0][1].plain == "mean" and divisor.dim() == 0 and divisor.is_floating_point()
        )
        weights = self.weight_sums.get(known[0][0])
        close = alike = None
        if weights is not None:
            _, totals, alike = weights
            d = divisor.detach().to(totals.dtype).reshape(())
            # (16-bit divisors are rounded: a bf16 sum of a few hundred weights to 1%)
            tol = 1e-2 if divisor.dtype in (torch.float16, torch.bfloat16) else 1e-6
            close = ((d - totals).abs() <= tol * totals.abs() + 1e-12).any()

        def flag(pass_: Any) -> Any:
            counted = divisor != pass_.batch_size
            if count is not None and count % max(pass_.batch_size, 1) == 0:
                # every element counted, each example's share alike (cross-entropy's label
                # smoothing divides its smoothing term by its mask's sum, N·T with no target
                # ignored): a mean over the examples of each one's mean
                counted = counted & (divisor != count)
            if scaled_mean:
                # (a weighted mean too — a KL's target distribution, per-example weights, label
                # smoothing's term — divided by its own detached value; refused as averaged
                # over what it counts until 2026-12-07, a hunt. Divided by its weights' total
                # or mean, a ratio, it stays counted)
                like = _count_like(divisor, (1, pass_.batch_size, count or 1))
                counted = counted & (like if close is None else like | close)
            if close is not None:
                # terms weighed alike divided by their weights' total: a plain mean (a mask
                # with nothing left out, 0.5 · ones / their sum), which the tracker, reading
                # these flags since 2026-12-06, measures
                counted = counted & ~(alike & close)
            return counted.reshape(())

        self._mark_counted_mean(known[0][1].owners, flag, outs, inside)
        if weights is not None:
            # weights per example summed and divided by their sum, (w·ℓ).sum() / w.sum(), the
            # weights varying other than as a 0/1 mask (a mask's count is a counted mean): each
            # example's weight depends on the others drawn, the ratio the class-weighted mean
            # is refused for (until 2026-12-06 measured, B_simple 2–3× high with an interval
            # excluding the truth, a hunt)
            real = (weights[0] & close).reshape(())
            for t in outs:
                held = self.weighted.get(t)
                self.weighted[t] = real if held is None else held | real

    def _note_weights(self, name: str, args: tuple, known: list, outs: list) -> None:
        """Per-example terms weighed by a constant tensor (``w · ℓ``, ``ℓ / c``): note whether
        the weights vary other than as a 0/1 mask, and their sum, on the outputs; carried on
        through any operation on one weighed operand (:meth:`_note_divided_sum` reads it)."""
        held = [self.weight_sums[t] for t, _ in known if t in self.weight_sums]
        if held:
            if len(held) == 1 and len(known) == 1:
                for t in outs:
                    self.weight_sums[t] = held[0]
            return
        if (
            name not in _SCALINGS
            or len(known) != 1
            or len(args) != 2
            or not isinstance(known[0][1], Rows | Across)
        ):
            return
        t, layout = known[0]
        other = args[1] if args[0] is t else args[0]
        if not isinstance(other, Tensor) or other.dim() == 0 or other.numel() <= 1:
            return
        d = layout.dim + other.dim() - t.dim()
        if not 0 <= d < other.dim() or other.shape[d] != t.shape[layout.dim]:
            return  # (not one weight per example: a distribution over classes, soft targets)
        with torch.no_grad():
            c = other.detach().double()
            w = 1.0 / c if name in ("div", "true_divide") and other is args[1] else c
            mask = ((w == 0) | (w == 1)).all()
            # one weight per example, repeated along its other dimensions (a mask's rows, soft
            # targets whose rows sum to one — a review found them refused — are no such
            # weights); read as a device flag
            rows = w.movedim(d, 0).reshape(w.shape[d], -1)
            each = (rows == rows[:, :1]).all()
            vary = (w.amin() != w.amax()) & ~mask & each
            # every term weighed alike (a mask with nothing left out, 0.5 · ones): divided by
            # the weights' total, a plain mean over the examples (_note_divided_sum)
            alike = (w.amin() == w.amax()) & (w.amin() != 0)
            # (the weights' own sum, and their sum over every term they weigh: w [N, 1] over
            # tokens [N, T], divided by w.sum() or by w.expand_as(ℓ).sum())
            full = w.expand(torch.broadcast_shapes(w.shape, t.shape))
            # (divided by their sum or their mean: (w·ℓ).mean() / w.mean() is the same ratio)
            totals = torch.stack([w.sum(), full.sum(), w.mean(), full.mean()])
        for out in outs:
            self.weight_sums[out] = (vary, totals, alike)

    def _mark_counted_mean(
        self, owners: Any, flag_of: Any, outs: list, inside: bool = False
    ) -> None:
        """Mark ``outs`` with ``flag_of(pass)`` (a device bool) for the watched passes among
        ``owners`` (their ids): a backward from a tensor computed from them ORs it into
        :attr:`PassNorms.counted_mean` — :attr:`PassNorms.counted_inside` for one inside the
        model's forward (a Hugging Face model's labels= loss: the token watcher's counts decide
        there) — at :meth:`backward`. Until 2026-12-06 the pass was flagged where the mean was
        computed, and a statistic only logged beside the loss (PPO's approximate KL as a masked
        mean, advantages whitened over a mask without gradient) refused a loss that was a mean
        over the examples, naming the statistic's divisor (a hunt)."""
        marks = {}
        for pass_ in self.passes:
            if id(pass_) in owners:
                marks[(id(pass_), inside)] = flag_of(pass_)
        if marks:
            for t in outs:
                self._add_marks(t, marks)

    def _add_marks(self, t: Tensor, marks: dict) -> None:
        held = self.counted.get(t)
        if held is None:
            self.counted[t] = dict(marks)
            return
        for key, flag in marks.items():
            previous = held.get(key)
            held[key] = flag if previous is None or previous is flag else previous | flag

    def _apply_marks(self, root: Tensor) -> None:
        """OR the counted-mean marks ``root`` carries into its passes
        (:meth:`_mark_counted_mean`)."""
        marks = self.counted.get(root)
        if not marks:
            return
        for pass_ in self.passes:
            for inside in (False, True, "slice"):
                flag = marks.get((id(pass_), inside))
                if flag is None:
                    continue
                name = {False: "counted_mean", True: "counted_inside", "slice": "counted_slice"}[
                    inside
                ]
                previous = getattr(pass_, name)
                setattr(pass_, name, flag if previous is None else previous | flag)


def _rows_in_order(layout: Rows, t: Tensor, dim: int) -> bool:
    """Whether ``t``'s rows along ``dim``, picked from the examples', are each example's in
    order (``o[arange(N), last]``, a reward head's last token): read from the picks' map on
    the CPU, where reading it costs no wait (a review of 2026-12-06 found a parameter returned
    by the forward refused where it met such rows in the loss, exact before); on an
    accelerator not read, and the meeting refused."""
    ids = layout.ids
    if ids is None or ids.device.type != "cpu" or ids.dim() != 1:
        return False
    if ids.numel() != t.shape[dim]:
        return False
    return bool((ids == torch.arange(ids.numel(), device=ids.device)).all())


def _count_like(divisor: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """Whether a 0-d divisor's value is a count — a whole number times 1/m for some m of
    ``sizes`` (a mask's sum, its mean over the examples or over the elements averaged), ε
    added or not —: a device bool. 16-bit values are rounded (to 1%)."""
    with torch.no_grad():
        d = divisor.detach().to(torch.float64)
        sixteen = divisor.dtype in (torch.float16, torch.bfloat16)
        like = []
        for m in sizes:
            v = d * m
            # (16-bit: 1% of the value; else 10⁻³ absolute — a relative tolerance took any
            # value times the elements of a large image batch, 5·10⁵, for a whole number: an
            # EMA divisor refused as a count, a review of 2026-12-06)
            slack = 1e-2 * v.abs().clamp(min=1.0) if sixteen else 1e-3
            like.append((v - v.round()).abs() <= slack)
        # (a divisor of 1 changes nothing: an EMA's first value, ce / ema with ema = 1.0,
        # refused as a count at step 1 until a review of 2026-12-06)
        return functools.reduce(lambda a, b: a | b, like) & (d != 1.0)


def example_dims(module: Any, outputs: list[Tensor]) -> list[int | None] | None:
    """The example dimension of each of a built-in layer's (flattened) outputs where it is not
    dim 0: an RNN's output (dim 1 unless ``batch_first``) and states (dim 1), a sequence-first
    attention or transformer layer's (dim 1); ``None`` for any other module."""
    nn = torch.nn
    if isinstance(module, nn.RNNBase):
        return [0 if module.batch_first else 1] + [1] * (len(outputs) - 1)
    if isinstance(module, nn.MultiheadAttention):
        # (its attention weights are [N, L, S] whatever batch_first says)
        return [0 if module.batch_first else 1] + [0] * (len(outputs) - 1)
    return [1] * len(outputs) if _time_major(module) else None


def _units(n: int, pairs: str | int | None) -> tuple[int, int]:
    """(units, block) of a pass of ``n`` rows: ``paired_rows`` ("halves": row i and row
    i + N/2 are one unit) or ``grouped_rows`` (G: blocks of G consecutive rows) — else N
    units of one row."""
    if pairs == "halves" and n % 2 == 0:
        return n // 2, 1
    if isinstance(pairs, int) and not isinstance(pairs, bool) and n % pairs == 0:
        return n // pairs, pairs
    return n, 1


def _number_factor(name: str, args: tuple, t: Tensor) -> float | None:
    """The factor a ``mul`` or ``div`` of the followed ``t`` by a Python number applies (its
    absolute value; 1/c for ``t / c``), or None (another operand, ``c / t``, zero). A number
    held in a one-element tensor that is not followed (a task weight, ``torch.tensor(0.3) *
    ce``; a scheduler's factor; a learned weight's value at this step) is read too: the watch
    runs on audited steps only, which read values back anyway. Until 2026-12-07 such a factor
    was not read, the kind was left unknown, and ``torch.tensor(0.3) * ce`` under ``"sum"``
    was measured N² off without a word (documented as not caught)."""
    if len(args) != 2:
        return None
    other = args[1] if args[0] is t else args[0]
    if isinstance(other, Tensor):
        other = _tensor_number(other)
    if isinstance(other, bool) or not isinstance(other, int | float) or other == 0:
        return None
    if not math.isfinite(other):
        # (a loss times inf or nan — an overflowing step a GradScaler will skip — has no factor:
        # until 2026-12-07 an audited step crashed on it, round(inf) in _whole_multiple, a
        # fuzzer, tests/fuzz_beyond.py)
        return None
    if name in ("div", "true_divide"):
        return 1.0 / abs(other) if args[0] is t else None
    return abs(other)


def _whole_multiple(factor: float, n: int) -> bool:
    """Whether ``factor`` is N·m for a whole m ≥ 1."""
    m = factor / n
    return m >= 1 - 1e-9 and abs(m - round(m)) < 1e-9


def _tensor_number(v: Tensor) -> float | None:
    """The value of a one-element tensor (a boolean gate, ``torch.tensor(True) * ce``, as 1 or
    0), or None (more elements, complex, or a value that cannot be read: a fake tensor under
    tracing)."""
    if v.numel() != 1 or v.is_complex():
        return None
    try:
        value = float(v.detach().reshape(()).item())
    except Exception:  # (a fake or meta tensor, a tensor subclass that cannot be read)
        return None
    return value if math.isfinite(value) else None


def _weights_only(flat: list, known: list, ndim: int) -> bool:
    """Whether the operands besides the followed one weigh the loss or whole examples: single
    numbers (``ℓ / N``, ``T² · kl``, a GradScaler's scale) or constants that vary along the
    examples' dimension only (``w[y] · ℓ``, importance weights normalized or not: whether
    their sum is a sum or a mean over the examples is the user's, taken as given). A constant
    that varies within an example — a target distribution, ``q · log p``; a detached target,
    ``p · z``; a mask over tokens — multiplies each element by its own: the products are new
    per-example terms, whose plain sum is still one. Until 2026-12-06 any constant cleared the
    kind, and ``-(q * o.log_softmax(-1)).sum()`` or KD's ``kl_div(..., reduction='sum')`` under
    the default ``"mean"`` went unrefused, N² off (a hunt)."""
    followed = {id(t) for t, _ in known}
    layout = known[0][1]
    at = layout.dim if isinstance(layout, Rows) else None
    for v in flat:
        if not isinstance(v, Tensor) or id(v) in followed or v.numel() == 1:
            continue
        pad = ndim - v.dim()
        if at is None or any(size != 1 for j, size in enumerate(v.shape) if j + pad != at):
            return False
    return True


# an affine shift of per-example terms by a constant (1 − cos): no scaling of the loss
_SHIFTS = {"add", "sub", "rsub"}


def _shifted(flat: list, known: list) -> bool:
    """Whether an add or sub shifts the followed rows by a constant (a number other than 0, or
    a tensor that is not followed)."""
    if not isinstance(known[0][1], Rows):
        return False
    followed = {id(t) for t, _ in known}
    return any(
        (isinstance(v, Tensor) and id(v) not in followed)
        or (isinstance(v, int | float) and not isinstance(v, bool) and v != 0)
        for v in flat
    )


def _storage_ref(t: Tensor) -> Any:
    """A weak reference to ``t``'s storage object (torch keeps one Python object per storage
    while it lives), or None where it has none to refer to."""
    try:
        return weakref.ref(t.untyped_storage())
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _same_storage(ref: Any, t: Tensor) -> bool:
    """Whether the storage written (``ref``, :func:`_storage_ref`) still lives: then a tensor
    at its address shares its memory (the same storage, or another over the same memory);
    freed, the address is another tensor's now. True where there was nothing to refer to."""
    return ref is None or ref() is not None


def _storage(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(t)


def _refuse_higher_order_operators() -> None:
    """Give every higher-order operator torch has made so far (``flex_attention``,
    ``torch.cond``, …) a rule for the watch's dispatch mode that refuses it by name: torch
    runs none of them under a mode without one, and raised its own NotImplementedError
    inside the model on an audited step (flex_attention at step 1, a hunt, 2026-12-06)."""
    for hop in list(getattr(torch._ops, "_higher_order_ops", {}).values()):
        table = getattr(hop, "python_key_table", None)
        if table is not None and _Dispatch not in table:
            hop.py_impl(_Dispatch)(functools.partial(_refuse_operator, hop.name()))


def _refuse_operator(name: str, mode: Any, *args: Any, **kwargs: Any) -> Any:
    from noisescale.errors import UnsupportedModuleError

    raise UnsupportedModuleError(
        f"torch's higher-order operator '{name}' (flex_attention, torch.cond, torch.while_loop, "
        "…) ran while noisescale followed the model's forward or its loss on a step it audits "
        "(steps 1, 2, 4, …, then one in 1,024), and noisescale cannot follow such operators: "
        "it cannot check that they keep the examples apart. Measure this model with "
        "per_example=False (norms of gradient-accumulation micro-batches, exact for any loss)"
    )


class _Dispatch(TorchDispatchMode):
    def __init__(self, watch: LossWatch) -> None:
        super().__init__()
        self.watch = watch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if torch._C._current_graph_task_id() == -1:
            self.watch.follow(func, args, kwargs, out)
        return out


_BACKWARDS = {Tensor.backward, torch.autograd.backward, torch.autograd.grad}
_GRAD = torch.autograd.grad


def _backward_of(func: Any) -> Any:
    """The function of :data:`_BACKWARDS` that ``func`` is or wraps (functools.wraps, a few
    wrappers deep: audit.install_reentrant_support's, another library's over it), or None."""
    for _ in range(6):
        if func in _BACKWARDS:
            return func
        func = getattr(func, "__wrapped__", None)
        if func is None:
            return None
    return None


class _Function(torch.overrides.TorchFunctionMode):
    """Sees the backward start (``loss.backward()``, ``torch.autograd.backward/grad``)."""

    def __init__(self, watch: LossWatch) -> None:
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.watch._pushed:  # stale (see LossWatch.pause): inert
            return func(*args, **kwargs)
        if isinstance(func, torch._ops.HigherOrderOperator) and _on_stack(
            self.watch._dispatch, dispatch=True
        ):
            # (refused here as its dispatch rule would: torch.cond and torch.while_loop
            # trace their branches under autograd before any mode's rule runs, and on a
            # hooked layer's parameter met torch's own FakeTensor AssertionError, a hunt of
            # 2026-12-06)
            _refuse_operator(func.name(), self)
        if (torch_func := _backward_of(func)) is not None and not self.watch.done:
            if torch_func is Tensor.backward:
                roots = [args[0]]
            else:
                first = args[0] if args else kwargs.get("tensors", kwargs.get("outputs"))
                roots = [first] if isinstance(first, Tensor) else list(first or [])
            final = torch_func is not _GRAD
            if torch_func is Tensor.backward:
                given = args[1] if len(args) > 1 else kwargs.get("gradient")
            else:
                given = args[1] if len(args) > 1 else kwargs.get("grad_tensors")
            if given is None or isinstance(given, Tensor):
                given = [given] * len(roots) if len(roots) == 1 else None
            given = list(given) if given is not None and len(given) == len(roots) else None
            self.watch.backward(roots, final=final, grads=given)
            # the backward runs without the dispatch mode (the function mode is off inside
            # this call; it comes off its stack when the step collects)
            if final and self.watch._pushed:
                _remove(self.watch._dispatch, dispatch=True)
                if not self.watch.done:
                    # another graph's backward, or one in the engine's paused() block: the
                    # watch goes on to the loss after it
                    try:
                        return func(*args, **kwargs)
                    finally:
                        if self.watch._pushed and not self.watch.done:
                            _insert_bottom(self.watch._dispatch, dispatch=True)
        return func(*args, **kwargs)


def _stack(dispatch: bool) -> tuple:
    if dispatch:
        return (
            torch._C._len_torch_dispatch_stack,
            torch._C._get_dispatch_stack_at,
            lambda: torch._C._pop_torch_dispatch_stack(None),
            torch._C._push_on_torch_dispatch_stack,
        )
    return (
        torch._C._len_torch_function_stack,
        torch._C._get_function_stack_at,
        torch._C._pop_torch_function_stack,
        torch._C._push_on_torch_function_stack,
    )


def _on_stack(mode: Any, *, dispatch: bool) -> bool:
    length, get, _, _ = _stack(dispatch)
    return any(get(i) is mode for i in range(length()))


def _remove(mode: Any, *, dispatch: bool) -> None:
    """Take ``mode`` off its stack wherever it is (modes pushed above it stay, in order)."""
    length, _, pop, push = _stack(dispatch)
    if not _on_stack(mode, dispatch=dispatch):
        return
    above = []
    while length():
        top = pop()
        if top is mode:
            break
        above.append(top)
    for m in reversed(above):
        push(m)


def _remove_stale() -> None:
    """Take off any watch's function mode that has nothing left to see — left on the stack by
    a pause inside its handler, or after its backward by a step that never collected (a
    refusal raised first; another engine's, or one whose engine is gone): inert, but a Python
    call per torch call."""
    length, get, _, _ = _stack(False)
    for mode in [get(i) for i in range(length())]:
        if isinstance(mode, _Function) and (not mode.watch._pushed or mode.watch.done):
            _remove(mode, dispatch=False)


def _insert_bottom(mode: Any, *, dispatch: bool) -> None:
    """Put ``mode`` under every mode on its stack (it only observes: what they change, it
    sees changed)."""
    length, _, pop, push = _stack(dispatch)
    above = []
    while length():
        above.append(pop())
    push(mode)
    for m in reversed(above):
        push(m)


# -- the rules ---------------------------------------------------------------------------------


def _given_kind(root: Tensor, layout: Rows | Across, grad: Any) -> str | None:
    """The kind of reduction a backward from per-example terms ``root`` with the gradient
    ``grad`` is: "sum" where every element's weight is 1, "mean" where it is 1/numel over a
    regular layout (each example as many elements), else None (weights: taken as given). One
    host read, on the steps the watch follows."""
    if not isinstance(grad, Tensor) or grad.shape != root.shape or root.numel() == 0:
        return None
    first = grad.reshape(-1)[0]
    if not bool((grad == first).all()):
        return None
    value = float(first)
    if value == 1.0:
        return "sum"
    regular = isinstance(layout, Across) or (layout.block is not None and layout.ids is None)
    if regular and math.isclose(value * root.numel(), 1.0, rel_tol=1e-6):
        return "mean"
    return None


def _added_ones(func: Any, args: tuple, kwargs: dict, known: list) -> frozenset | None:
    """The examples a sum of one-example values added one by one holds (``One + One``,
    ``_Sum(added) + One``, each with weight 1 and each example once), or None."""
    if _named(func, args, kwargs).get("alpha", 1) != 1:
        return None
    pairs: list = []
    for _, layout in known:
        if isinstance(layout, One):
            if isinstance(layout.example, tuple):  # (an irregular map's token: not an index)
                return None
            pairs.append(frozenset({(layout.owner, layout.example)}))
        elif isinstance(layout, _Sum) and layout.added is not None:
            pairs.append(layout.added)
        else:
            return None
    a, b = pairs
    return None if a & b else a | b


def _sum(known: list) -> _Sum:
    """A sum over the examples of the passes the operands come from."""
    owners: set = set()
    for _, layout in known:
        owners |= set(layout.owners) if isinstance(layout, _Sum | Across) else {layout.owner}
    return _Sum(frozenset(owners))


def _name(func: Any) -> str:
    return func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)


def _pointwise_op(func: Any, name: str) -> bool:
    """Tagged pointwise, or the in-place form of an operation tagged so (``masked_fill_``)."""
    if torch.Tag.pointwise in func.tags:
        return True
    packet = getattr(torch.ops.aten, name, None)
    functional = getattr(packet, func._overloadname, None) if packet is not None else None
    return functional is not None and torch.Tag.pointwise in functional.tags


def _named(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    named: dict[str, Any] = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args):
            named[a.name] = args[i]
        elif a.name in kwargs:
            named[a.name] = kwargs[a.name]
        elif a.has_default_value():
            named[a.name] = a.default_value
    return named


def _mixed(func: Any, what: str) -> Mixed:
    return Mixed(f"'aten.{_name(func)}' {what}")


def _unknown(func: Any) -> Mixed:
    """An operation the watch has no rule for: mixed (refused rather than guessed), after the
    forward and in the model's own code alike (where the watch does not go inside its
    layers: :meth:`LossWatch.begin_forward`)."""
    return Mixed(
        f"'aten.{_name(func)}' is an operation noisescale does not follow through the loss"
    )


def _dims(dim: Any, ndim: int) -> set[int]:
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return set(range(ndim))
    if isinstance(dim, int):
        dim = [dim]
    return {d % max(ndim, 1) for d in dim}


def _rule(func: Any, args: tuple, kwargs: dict, known: list, outs: list[Tensor]) -> Any:
    name = _name(func)
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]  # in place: the output is the first operand, with the same rule
    for _, layout in known:
        if isinstance(layout, Mixed):
            return layout
    if not outs:
        return None
    out = outs[0]
    if any(isinstance(layout, Across) for _, layout in known):
        return _across(func, name, args, kwargs, known, out)
    if (
        name == "add"
        and len(known) == 2
        and all(isinstance(x, _Sum) and x.added is not None for _, x in known)
    ):
        # ((l0 + l1) + (l2 + l3): partial sums of one-example values, each example once)
        added = _added_ones(func, args, kwargs, known)
        if added is not None:
            return dataclasses.replace(_sum(known), added=added)
    ones = [layout for _, layout in known if isinstance(layout, One)]
    if ones:
        if len(ones) == len(known) and all(o == ones[0] for o in ones):
            return ones[0]  # any function of one example's values is that example's
        if name == "stack" and len(ones) == len(known):
            rows = _restacked(args, kwargs, known, out)
            if rows is not None:
                return rows
        linear = name in ("cat", "stack") or (
            name in ("add", "sub") and not any(isinstance(x, Rows) for _, x in known)
        )
        if linear and name == "add" and len(known) == 2:
            added = _added_ones(func, args, kwargs, known)
            if added is not None:
                return dataclasses.replace(_sum(known), added=added)
        if linear:
            return _sum(known)
        return _mixed(func, "combined one example's values with other examples'")
    if name in _BATCHED:
        return _batched(func, name, args, kwargs, known, outs)
    if name in _IDENTITY or name == "copy":
        t, layout = known[0]
        if len(known) == 1 and t is args[0] and t.shape == out.shape:
            return layout
    if name in ("view", "_unsafe_view", "reshape"):
        return _reshape(known[0][1], tuple(args[0].shape), tuple(out.shape), func)
    if _pointwise_op(func, name) or name in ("copy", "fill", "_to_copy", "log_sigmoid_forward"):
        return _pointwise(func, name, args, kwargs, known, out)
    if name in _REDUCTIONS:
        return _reduction(func, name, args, kwargs, known, out)
    if name in ("_softmax", "_log_softmax"):
        t, layout = known[0]
        if isinstance(layout, Rows) and (args[1] % t.dim()) != layout.dim:
            return layout
        return _mixed(func, "normalized over the examples")
    if name in ("nll_loss_forward", "nll_loss2d_forward", "multi_margin_loss") or (
        name == "multilabel_margin_loss_forward"
    ):
        return _nll(func, args, kwargs, known, outs)
    if name in _LOSSES:
        named = _named(func, args, kwargs)
        layout = _pointwise(func, "loss", args, kwargs, known, args[0], linear=False)
        if named.get("reduction", 1) == 0 or isinstance(layout, Mixed):
            return layout
        plain = isinstance(layout, Rows) and len(known) == 1
        kind = _REDUCTION_KIND.get(named.get("reduction", 1)) if plain else None
        return _Sum(_sum(known).owners, kind)
    if name in ("mm", "bmm", "addmm", "baddbmm", "dot", "vdot", "mv"):
        return _product(func, name, args, known, out)
    if name in _BATCH_NORMS:
        return _batch_norm(func, name, args, kwargs, known, outs)
    if name in _ATTENTION:
        return _attention(func, known, args, outs)
    return _views(func, name, args, kwargs, known, outs)


# torch's fused attention kernels (F.scaled_dot_product_attention): q, k, v [N, H, T, d]
_ATTENTION = {
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
}


def _attention(func: Any, known: list, args: tuple, outs: list) -> Any:
    """A fused attention attends within each index of dim 0, q, k, v and its mask alike: the
    rows of one map of examples there stay those rows (an attention or pooling over the
    model's outputs in the loss code was refused as combining the examples until 2026-12-06,
    found by a hunt); anything else combines them."""
    layouts = {layout for _, layout in known}
    layout = layouts.pop() if len(layouts) == 1 else None
    if not isinstance(layout, Rows) or layout.dim != 0:
        return _mixed(func, "attended across the examples")
    n = args[0].shape[0]
    return [layout if o.dim() > 0 and o.shape[0] == n else None for o in outs]


def _across(func: Any, name: str, args: tuple, kwargs: dict, known: list, out: Tensor) -> Any:
    """Rows of several forwards added row by row: a sum or mean over their dimension is a sum
    over every forward's examples; linear operations keep them (another forward's rows added,
    a constant factor); anything else combines two forwards' rows."""
    dims = {x.dim for _, x in known if isinstance(x, Across | Rows)}
    if len(dims) != 1 or any(isinstance(x, One | _Sum | Mixed) for _, x in known):
        return _mixed(func, _ACROSS)
    (d,) = dims
    owners = _sum(known).owners
    if name in _SUMS and len(known) == 1 and known[0][0] is args[0]:
        return _reduction(func, name, args, kwargs, known, out)  # (a sum over both, or Across)
    linear = name in ("add", "sub", "neg", "positive", "clone", "alias", "_to_copy") or (
        name in _SCALINGS and len(known) == 1 and (name in _LINEAR_ONE or known[0][0] is args[0])
    )
    if linear and all(t.dim() == out.dim() for t, _ in known):
        return Across(d, owners)
    return _mixed(func, _ACROSS)


# BatchNorm's kernels: in evaluation mode (running statistics) a constant affine map per
# channel, element by element; in training mode a normalization by the batch's statistics
_BATCH_NORMS = {
    "native_batch_norm",
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training",
    "_batch_norm_no_update",
    "_batch_norm_with_update",
    "cudnn_batch_norm",
    "miopen_batch_norm",
}


def _batch_norm(func: Any, name: str, args: tuple, kwargs: dict, known: list, outs: list) -> Any:
    """A BatchNorm after the model's forward — a frozen loss network (a perceptual or
    feature-matching loss through a CNN with BatchNorm), a GAN's critic — keeps every element
    apart in evaluation mode (until 2026-12-06 it was refused as coupling the examples, a
    hunt); in training mode it couples them."""
    named = _named(func, args, kwargs)
    frozen = name in ("_native_batch_norm_legit_no_training", "_batch_norm_no_update") or (
        named.get("training") is False
    )
    stats = named.get("running_mean") is not None and named.get("running_var") is not None
    t, layout = known[0]
    alone = len(known) == 1 and t is args[0] and t.shape == outs[0].shape
    if frozen and stats and alone:
        return [layout] + [None] * (len(outs) - 1)
    if frozen and stats:
        return _mixed(func, "took a tensor computed from the outputs as its statistics")
    if alone and isinstance(layout, Rows) and layout.dim == 1:
        # the examples in the channels: each channel's statistics are one example's values —
        # InstanceNorm, which torch runs as a BatchNorm over [1, N·C, ...] (until 2026-12-06 a
        # loss through an InstanceNorm network was refused, a review)
        return [layout] + [None] * (len(outs) - 1)
    return _mixed(
        func,
        "normalized with statistics of the batch (a BatchNorm in training mode; in evaluation "
        "mode, model.eval(), it uses its running statistics and keeps the examples apart)",
    )


_ACROSS = (
    "combined the values of two forwards' examples (two views of each example compared "
    "pairwise: noisescale measures two forwards through one backward as one micro-batch of "
    "all their rows, each row an example; a preference pair's chosen and rejected responses "
    "through two forwards, as a reward model's trainer may run them, are measured as pairs when "
    "run as one forward on torch.cat([chosen, rejected]) with paired_rows='halves')"
)
_ADDED_ACROSS = (
    "added a sum over one forward's examples to each example of another forward (an anchor or "
    "reference batch through the model whose term is in every example's loss: its rows would "
    "be counted as examples of the step)"
)


def _pointwise(
    func: Any,
    name: str,
    args: tuple,
    kwargs: dict,
    known: list,
    out: Tensor,
    linear: bool | None = None,
) -> Layout:
    rows, sums = [], 0
    for t, layout in known:
        if isinstance(layout, Rows):
            d = layout.dim + (out.dim() - t.dim())
            if d < 0 or t.shape[layout.dim] != out.shape[d]:
                return _mixed(func, "broadcast one example's values over others")
            rows.append(_moved(layout, d))
        else:
            sums += 1
    if rows and any(r.owner != rows[0].owner for r in rows):
        if name in ("add", "sub") and not sums and all(r.dim == rows[0].dim for r in rows):
            # two forwards' rows added row by row (BYOL's loss_one + loss_two, then a mean):
            # linear, so far (until 2026-12-06 refused, a hunt)
            return Across(rows[0].dim, frozenset(r.owner for r in rows))
        return _mixed(func, _ACROSS)
    if rows and any(r != rows[0] for r in rows):
        return _mixed(
            func,
            "combined the values of different examples (e.g. every example with every "
            "other: in-batch negatives, a similarity matrix; or, without "
            "paired_rows='halves', a preference pair's chosen and rejected rows of one batch "
            "— DPO, a reward model's Bradley-Terry loss on torch.cat([chosen, rejected]) —, "
            "which GradientNoiseTracker(model, paired_rows='halves') measures by pair)",
        )
    if not sums:
        return rows[0]
    if linear is None:
        tainted_first = known[0][0] is args[0] and len(known) == 1
        if name == "where":  # linear in the values when the condition is constant
            linear = not any(t is args[0] for t, _ in known)
        else:
            linear = (
                name in _LINEAR_ANY
                or (name in _LINEAR_ONE and len(known) == 1)
                or (name in _LINEAR_FIRST and tainted_first)
            )
    if linear and name in _SIGN_ONLY and len(known) == 1 and isinstance(known[0][1], _Sum):
        # −Σ ℓ_i is the plain sum of the terms −ℓ_i: its kind stays (until 2026-12-06 a leading
        # minus, -F.logsigmoid(m).sum(), cleared it and a plain sum under "mean" went
        # unchecked, a hunt)
        return known[0][1]
    if (
        linear
        and name in ("add", "sub", "rsub")
        and len(known) == 1
        and isinstance(known[0][1], _Sum)
        # (not broadcast: l.mean() + zeros(N) is N copies of the mean, a review)
        and tuple(out.shape) == tuple(known[0][0].shape)
        # (alpha scales add's and sub's second operand, rsub's first: c − α·x)
        and (
            (known[0][0] is args[0]) != (name == "rsub")
            or _named(func, args, kwargs).get("alpha", 1) in (1, -1)
        )
    ):
        # Σ ℓ_i + c (or c − Σ ℓ_i): a constant shift, the plain sum of the terms (until
        # 2026-12-06 losses.sum().add(0) cleared the kind, a hunt)
        return known[0][1]
    if linear:
        if rows and any(
            rows[0].owner != o for _, x in known if isinstance(x, _Sum) for o in x.owners
        ):
            return _mixed(func, _ADDED_ACROSS)
        return _sum(known)
    return _mixed(
        func,
        "combined a sum over the examples non-linearly (e.g. normalized by a batch "
        "statistic, or a product of two sums over the examples)",
    )


def _reduction(func: Any, name: str, args: tuple, kwargs: dict, known: list, out: Tensor) -> Any:
    t, layout = known[0]
    if len(known) > 1 or t is not args[0]:
        return _mixed(func, "reduced with weights computed from the model's outputs")
    named = _named(func, args, kwargs)
    dims = _dims(named.get("dim"), t.dim())
    keep = bool(named.get("keepdim", False))
    if isinstance(layout, Rows | Across) and layout.dim not in dims:
        shift = 0 if keep else sum(1 for d in dims if d < layout.dim)
        return _moved(layout, layout.dim - shift)
    if name in _SUMS:
        kind, factored = ("mean" if name == "mean" else "sum"), False
        if isinstance(layout, _Sum):
            # (reduced over the examples already: a sum or mean over what is left keeps the
            # kind — Σ_c mean_i ℓ_ic is a mean over the examples, mean_c Σ_i one of sums; until
            # 2026-12-06 a mean of a sum lost it, a hunt)
            kind, factored = layout.plain, layout.factored
        count = None
        if isinstance(layout, Rows) and layout.block is not None and dims == set(range(t.dim())):
            count = t.numel()  # (every element: each example's rows alike, a regular layout)
        return _Sum(_sum(known).owners, kind, count, factored)
    return _mixed(func, "reduced over the examples non-linearly (a maximum, a norm, a variance)")


def _nll(func: Any, args: tuple, kwargs: dict, known: list, outs: list[Tensor]) -> Any:
    named = _named(func, args, kwargs)
    t, layout = known[0]
    if t is not args[0] or len(known) > 1 or not isinstance(layout, Rows):
        return _mixed(func, "was given weights computed from the model's outputs")
    classes = 1 if t.dim() >= 2 else 0
    if layout.dim == classes:
        return _mixed(func, "took the examples as classes")
    reduction = named.get("reduction", 1)
    loss = (
        _moved(layout, layout.dim - (layout.dim > classes))
        if reduction == 0
        else _Sum(_sum(known).owners, _REDUCTION_KIND.get(reduction))
    )
    return [loss] + [None] * (len(outs) - 1)


_REDUCTION_KIND = {1: "mean", 2: "sum"}  # ATen's reduction argument


_ROLES = {
    # (operand, dim) -> the output's dim it is placed in, or None: contracted
    "mm": ({0: 0, 1: None}, {0: None, 1: 1}),
    "addmm": ({0: 0, 1: None}, {0: None, 1: 1}),
    "bmm": ({0: 0, 1: 1, 2: None}, {0: 0, 1: None, 2: 2}),
    "baddbmm": ({0: 0, 1: 1, 2: None}, {0: 0, 1: None, 2: 2}),
    "mv": ({0: 0, 1: None}, {0: None}),
    "dot": ({0: None}, {0: None}),
    "vdot": ({0: None}, {0: None}),
}
_SIMILARITY = (
    "multiplied the values of different examples (e.g. every example with every other: "
    "in-batch negatives, a similarity matrix z₁ z₂ᵀ)"
)


def _product(func: Any, name: str, args: tuple, known: list, out: Tensor) -> Layout:
    bias = None
    if name in ("addmm", "baddbmm"):
        bias, args = args[0], args[1:3]
    lay = {id(t): layout for t, layout in known}
    operands = [lay.get(id(args[0])), lay.get(id(args[1]))]
    result: Layout
    if any(isinstance(x, _Sum) for x in operands):
        both = all(x is not None for x in operands)
        result = _mixed(func, "multiplied two sums over the examples") if both else _sum(known)
    else:
        placed, contracted = [], []
        for layout, roles in zip(operands, _ROLES[name], strict=True):
            if isinstance(layout, Rows):
                where = roles[layout.dim]
                if where is None:
                    contracted.append(_moved(layout, 0))
                else:
                    placed.append(_moved(layout, where))
        if contracted:
            # Σ over examples of one example's values (times constants, or times the same
            # example's values): a sum over the examples; with anything else, mixed
            same = len(contracted) == 1 or contracted[0] == contracted[1]
            result = _sum(known) if same and not placed else _mixed(func, _SIMILARITY)
        elif len(placed) == 2 and placed[0] != placed[1]:
            result = _mixed(func, _SIMILARITY)
        else:
            result = placed[0]
    if bias is not None and id(bias) in lay:
        pair = [(out, result), (bias, lay[id(bias)])]
        return _pointwise(func, "add", (out, bias), {}, pair, out)
    return result


def _reshape(layout: Layout, shape: tuple, new: tuple, func: Any) -> Layout:
    if not isinstance(layout, Rows):
        return layout
    if 0 in shape and new[: layout.dim + 1] == shape[: layout.dim + 1]:
        # no element, the examples' dim and those before it kept: no value moves between
        # examples — F.cross_entropy's view of a causal loss's logits on one-token sequences,
        # [N, V, 0] to [N, V, 0, 0] (until 2026-12-07 this rule divided by the empty size, and
        # the loss was refused as combining the examples; its norms are 0, a fuzz hunt)
        return layout
    if layout.block is None:
        # an irregular map (known by its key): kept where each new index along some dim lies
        # within one old index along the examples' dim, the dims before it unchanged
        d = layout.dim
        inner = math.prod(shape[d + 1 :])
        for d2 in range(len(new)):
            tail = math.prod(new[d2 + 1 :])
            if math.prod(new[:d2]) != math.prod(shape[:d]) or tail == 0 or inner % tail:
                continue
            if new[d2] * tail != shape[d] * inner:
                continue
            factor = inner // tail
            key = layout.key if factor == 1 else ("split", layout.key, factor)
            ids, span = layout.ids, layout.span
            if factor != 1:
                ids = None if ids is None else ids.repeat_interleave(factor)
                if span is not None:  # (each row now `factor` rows: a regular map's too)
                    span = (span[0], span[1] * factor, *(x * factor for x in span[2:]))
            return Rows(d2, None, key, layout.n, layout.owner, ids, span)
        if inner == 1:
            # values picked one by one along the last dimension (masked_select's flat result)
            # merged into rows, .view(-1, dim): each row is one example's where the pick took
            # whole runs of at least its length (Rows.whole). Until 2026-12-06 (a hunt) every
            # such merge was refused as combining the examples — DistilBERT's distiller,
            # masked_select(t, mask.unsqueeze(-1).expand_as(t)).view(-1, t.size(-1)), without
            # a padded token
            for d2 in range(len(new)):
                m = math.prod(new[d2 + 1 :])
                if math.prod(new[:d2]) != math.prod(shape[:d]) or m <= 1 or new[d2] * m != shape[d]:
                    continue
                if layout.whole % m:
                    return _mixed(func, ROWS_UNPROVEN)
                ids = None if layout.ids is None else layout.ids[::m]
                key = ("merged", layout.key, m)
                return Rows(d2, None, key, layout.n, layout.owner, ids, None, layout.whole // m)
        return _mixed(func, "reshaped the examples' values so that one index holds several")
    n, d = layout.n, layout.dim
    if shape[d] % (n * layout.block):
        return _mixed(func, "reshaped a part of the examples' values")
    # element f of the flattened tensor is example (f // chunk) mod n
    chunk = layout.block * math.prod(shape[d + 1 :])
    for d2 in range(len(new)):
        tail = math.prod(new[d2 + 1 :])
        if tail == 0 or chunk == 0 or chunk % tail or (new[d2] * tail) % (n * chunk):
            continue
        return Rows(d2, chunk // tail, layout.key, n, layout.owner)
    return _mixed(
        func,
        "reshaped the examples' values so that one index holds several examples (where it only "
        "reorders the rows — FixMatch's interleave/de_interleave, x.reshape(-1, k, ...)"
        ".transpose(0, 1) —, index with the permutation instead, out[perm], which is followed)",
    )


def _whole_runs(t: Tensor, mask: Any, d: int) -> int:
    """How many consecutive values of ``masked_select(t, mask)`` are known to be one
    example's (``t``'s examples along ``d``): the product of ``t``'s trailing dimensions
    after ``d`` along which ``mask`` is constant — of size 1 there, broadcast, or expanded
    (stride 0) — read from its shape and strides (no device read). DistilBERT's distiller's
    ``attention_mask.unsqueeze(-1).expand_as(t)`` picks whole rows of ``t.size(-1)``."""
    if not isinstance(mask, Tensor) or mask.dim() > t.dim():
        return 1
    try:
        if torch.broadcast_shapes(tuple(mask.shape), tuple(t.shape)) != tuple(t.shape):
            return 1
    except RuntimeError:
        return 1
    lead = t.dim() - mask.dim()
    whole = 1
    for i in range(t.dim() - 1, d, -1):
        j = i - lead
        if j >= 0 and mask.shape[j] != 1 and mask.stride(j) != 0:
            break
        whole *= t.shape[i]
    return whole


def _views(func: Any, name: str, args: tuple, kwargs: dict, known: list, outs: list) -> Any:
    t, layout = known[0]
    out = outs[0]
    named = _named(func, args, kwargs)
    if name in ("cat", "stack"):
        return _join(func, name, named, known, out)
    if name == "index_put":
        # x[idx] = v: constants written into a followed tensor keep its layout
        if t is args[0] and len(known) == 1:
            return layout
        return _mixed(func, "wrote values computed from the model's outputs by indices")
    if len(known) > 1 or t is not args[0]:
        if name in ("index", "gather", "index_select", "take_along_dim"):
            return _mixed(func, "picked values by indices computed from the model's outputs")
        return _unknown(func)
    if isinstance(layout, _Sum):
        # (values moved or picked, none repeated: a plain sum's kind stays — losses.sum()[None]
        # .squeeze() cleared it until 2026-12-06, a hunt; an expand or repeat that copies the
        # sum would multiply a later sum of it)
        if name in ("unsqueeze", "squeeze", "permute", "transpose", "t", "select", "slice") or (
            name in ("expand", "repeat") and outs[0].numel() == t.numel()
        ):
            return layout
        if name in ("expand", "unsqueeze", "squeeze", "permute", "transpose", "t", "select"):
            return _sum(known)
        if name in ("slice", "index", "gather", "index_select", "split", "unbind", "chunk"):
            return _sum(known)
        if name in ("diagonal", "diagonal_copy", "trace", "repeat", "flip", "roll"):
            return _sum(known)
        return _unknown(func)
    d = layout.dim

    def keep(new_dim: int) -> Rows:
        return _moved(layout, new_dim)

    def fresh(new_dim: int, ids: Tensor | None = None, span: tuple | None = None) -> Rows:
        return _picked(layout, new_dim, ids, name, span)

    def examples() -> Tensor | None:  # (computed where rows are picked only)
        return _ids(layout, t.shape[d], t.device)

    if name == "expand":
        new = d + out.dim() - t.dim()
        if t.shape[d] != out.shape[new]:
            return _mixed(func, "broadcast one example's values over others")
        return keep(new)
    if name == "unfold":
        # windows along another dimension (framing a signal: torch.stft, x.unfold(-1, n, hop)):
        # each example's windows are its own (refused until 2026-12-06, a hunt)
        if named["dimension"] % max(t.dim(), 1) == d:
            return _mixed(func, "took windows across the examples")
        return keep(d)
    if name == "as_strided":
        kept = _strided_rows(t, d, out, named)
        if kept is None:
            return _mixed(func, "viewed the examples' memory in a layout noisescale cannot read")
        return keep(kept)
    if name == "unsqueeze":
        u = named["dim"] % out.dim()
        return keep(d + (u <= d))
    if name == "squeeze":
        kept = [i for i in range(t.dim()) if t.shape[i] != 1 or i not in _squeezed(named, t)]
        if d not in kept:  # one row of examples (o[i:i + 1].squeeze(0)): one example's
            return _one(layout, 0)
        return keep(kept.index(d))
    if name == "permute":
        order = [p % t.dim() for p in named["dims"]]
        return keep(order.index(d))
    if name in ("transpose", "t"):
        if name == "t":
            a, b = 0, 1 if t.dim() > 1 else 0
        else:
            a, b = named["dim0"] % t.dim(), named["dim1"] % t.dim()
        return keep(b if d == a else a if d == b else d)
    if name == "select":
        s = named["dim"] % t.dim()
        if s == d:
            return _one(layout, named["index"] % t.shape[d])
        return keep(d - (s < d))
    if name == "slice":
        s = named["dim"] % t.dim()
        if s != d:
            return keep(d)
        size = t.shape[d]
        start, stop = named.get("start"), named.get("end")
        start = 0 if start is None else (start + size if start < 0 else min(start, size))
        stop = size if stop is None else (stop + size if stop < 0 else min(stop, size))
        step = named.get("step") or 1
        cycle = None if layout.block is None else layout.n * layout.block
        if cycle and step == 1 and start % cycle == 0 and (stop - start) % cycle == 0:
            return keep(d)  # whole cycles of the examples
        if layout.block and layout.block > 1 and step == layout.block and start < layout.block:
            # one row of each block (grouped_rows: o[0::G], a pair's first row): index k is
            # row start + k·G, whose unit is k mod n
            return Rows(d, 1, layout.key, layout.n, layout.owner)
        ex = examples()
        span = _sliced(layout, size, start, stop) if step == 1 else None
        ids = None if ex is None else ex[start:stop:step]
        return _single(layout, [ids])[0] or fresh(d, ids, span)
    if name in ("split", "split_with_sizes", "unbind", "chunk", "unsafe_split"):
        s = named["dim"] % t.dim()
        if name == "unbind":
            if s == d:
                return [_one(layout, i) for i in range(len(outs))]
            return [keep(d - (s < d)) for _ in outs]
        cycle = None if layout.block is None else layout.n * layout.block
        if s == d and cycle and all(o.shape[d] % cycle == 0 for o in outs):
            return [keep(d) for _ in outs]  # whole cycles of the examples each (pairs' halves)
        if s != d:
            return [keep(d) for _ in outs]
        pieces, at, ex = [], 0, examples()
        for o in outs:
            span = _sliced(layout, t.shape[d], at, at + o.shape[d])
            pieces.append((None if ex is None else ex[at : at + o.shape[d]], span))
            at += o.shape[d]
        ones = _single(layout, [ids for ids, _ in pieces])
        return [one or fresh(d, ids, span) for one, (ids, span) in zip(ones, pieces, strict=True)]
    if name in ("gather", "index_select"):
        s = named["dim"] % t.dim()
        if s != d:
            index = named["index"]
            if name == "index_select" or index.shape[d] == t.shape[d]:
                return keep(d)
            ex = examples()  # (gather's first index.shape[d] rows, each its own)
            return fresh(d, None if ex is None else ex[: index.shape[d]])
        return fresh(d, _gathered(examples(), named["index"], d, name))
    if name == "index":
        return _index(func, named, t, layout, out, fresh, examples)
    if name == "masked_select":
        ids, ex = None, examples()
        if ex is not None:
            along = ex.reshape([-1 if i == d else 1 for i in range(t.dim())]).expand(t.shape)
            ids = torch.masked_select(along, named["mask"].to(ex.device))
        return dataclasses.replace(fresh(0, ids), whole=_whole_runs(t, named["mask"], d))
    if name in ("diagonal", "diagonal_copy"):
        d1, d2 = named.get("dim1", 0) % t.dim(), named.get("dim2", 1) % t.dim()
        if d in (d1, d2):
            # x[k, k + offset]: element k is the example of index k (or k - offset) along d —
            # the other dimension's values are the same example's (rows) or constants
            offset = named.get("offset", 0)
            shifted = offset if d == d2 else -offset
            return keep(t.dim() - 2) if shifted == 0 else fresh(t.dim() - 2)
        rest = [i for i in range(t.dim()) if i not in (d1, d2)]
        return keep(rest.index(d))
    if name == "trace":
        return _sum(known)  # Σ_i x[i, i]: each term one example's
    if name in ("scatter", "scatter_add", "scatter_reduce"):
        if named["dim"] % t.dim() != d:
            return keep(d)
        return _mixed(func, "scattered along the examples")
    if name == "_cdist_forward":
        return keep(d) if d < t.dim() - 1 else _mixed(func, "measured distances across examples")
    if name in ("flip", "roll"):
        dims = _dims(named.get("dims"), t.dim())
        if d not in dims:
            return keep(d)
        ex = examples()
        if ex is None:
            return fresh(d)
        if name == "flip":
            return fresh(d, ex.flip(0))
        listed = [x % t.dim() for x in (named.get("dims") or [])]
        if d not in listed:  # (rolled as one flattened sequence)
            return fresh(d, ex.roll(named["shifts"][0]) if t.dim() == 1 else None)
        return fresh(d, ex.roll(named["shifts"][listed.index(d)]))
    if name in ("topk", "sort", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp"):
        s = named["dim"] % t.dim() if named.get("dim") is not None else t.dim() - 1
        if s == d:
            return _mixed(func, RAN_ALONG)
        return [keep(d) for _ in outs] if len(outs) > 1 else keep(d)
    if name in ("native_layer_norm", "native_group_norm", "native_dropout"):
        if name == "native_layer_norm" and d >= t.dim() - len(named["normalized_shape"]):
            return _mixed(func, "normalized over the examples")
        if name == "native_group_norm" and d != 0:
            return _mixed(func, "normalized over the examples")
        return [keep(d) for _ in outs]
    if name in ("repeat", "tile"):
        reps = list(named.get("repeats") or named.get("dims"))
        shift = len(reps) - t.dim()
        if reps[d + shift] == 1:
            return keep(d + shift)
        ex = examples()
        return fresh(d + shift, None if ex is None else ex.repeat(reps[d + shift]))
    return _unknown(func)


def _restacked(args: tuple, kwargs: dict, known: list, out: Tensor) -> Rows | None:
    """``torch.stack`` of one tensor per example, in the examples' order — rows taken apart
    and computed one by one (TRL's ``selective_log_softmax``: ``torch.stack([f(row) for row
    in logits])``) — is rows again; else ``None``. Until 2026-12-06 it was taken for a sum
    over the examples, and every DPO, GRPO or PPO loss written with TRL's helper was refused
    as combining them (a hunt)."""
    tensors = args[0] if args else kwargs.get("tensors")
    by_id = {id(t): layout for t, layout in known}
    if not isinstance(tensors, list | tuple) or len(tensors) != len(known):
        return None
    layouts = [by_id.get(id(t)) for t in tensors]
    if not all(isinstance(x, One) for x in layouts):
        return None
    owner = layouts[0].owner  # type: ignore[union-attr]
    examples = [x.example for x in layouts]  # type: ignore[union-attr]
    if any(x.owner != owner for x in layouts) or not all(  # type: ignore[union-attr]
        isinstance(e, int) for e in examples
    ):
        return None
    # (the pass's examples, each as often: until a review of 2026-12-06 the count was the
    # largest example's + 1, and a stack of some examples' values — L[:3] of 4, or
    # L + [L[0]] — was read as rows of all, measured under "mean" without a word)
    sizes = {x.n for x in layouts}  # type: ignore[union-attr]
    m, n = len(examples), sizes.pop() if len(sizes) == 1 else 0
    if not n or not all(0 <= e < n for e in examples):
        return None
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if m % n == 0:
        for block in {1, m // n}:
            if all(e == (j // block) % n for j, e in enumerate(examples)):
                return Rows(dim % out.dim(), block, owner, n, owner)
    # every example once in another order (a packed stream's sequences stacked in reverse):
    # rows by the example of each (until 2026-12-06 a sum over the examples of no kind, and
    # its mean measured N² too small under "sum" without a word); some left out or taken
    # twice: rows too, whose mean is flagged as over what it counts (_note_uneven_mean)
    ids = torch.tensor(examples, device=out.device)
    return Rows(dim % out.dim(), None, ("stack", next(_fresh)), n, owner, ids)


def _single(layout: Rows, pieces: list[Tensor | None]) -> list[One | None]:
    """Of pieces of rows picked from the examples' (``ids`` each), those whose rows are all one
    example's: that example's values (``One``), any function of them its own — a packed stream
    of real tokens, ``tok = F.cross_entropy(lo[mask], y[mask], reduction="none")``, cut into
    its sequences, ``tok.split(lens)`` or ``torch.tensor_split``, each sequence's mean stacked
    in order and averaged: a mean over the examples (until 2026-12-06 each piece's mean was
    read as a mean over the examples' rows, refused under "mean" as averaged over what it
    counts and measured N² too small under "sum" without a word, a hunt). One host read of
    the pieces' ids (audited passes only); a regular map's pieces are left as they were."""
    found: list[One | None] = [None] * len(pieces)
    at = [j for j, ids in enumerate(pieces) if ids is not None and ids.numel()]
    if layout.block is not None or not at:
        return found
    ends = torch.stack([torch.stack([pieces[j].amin(), pieces[j].amax()]) for j in at])  # type: ignore[union-attr]
    for j, (low, high) in zip(at, ends.tolist(), strict=True):
        if low == high >= 0:
            found[j] = One(layout.owner, int(low), layout.n)
    return found


def _one(layout: Rows, index: int) -> One:
    if layout.block is None:
        return One(layout.owner, ("irregular", next(_fresh)), layout.n)
    return One(layout.owner, (index // layout.block) % layout.n, layout.n)


# Operations that work on each index of dim 0 apart (a batch of images, sequences, signals):
# examples there stay there. Linear ones keep a sum over the examples a sum.
_BATCHED_LINEAR = {
    "convolution",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "_adaptive_avg_pool2d",
    "_adaptive_avg_pool3d",
    "upsample_nearest1d",
    "upsample_nearest2d",
    "upsample_nearest3d",
    "upsample_linear1d",
    "upsample_bilinear2d",
    "upsample_bicubic2d",
    "upsample_trilinear3d",
    "im2col",
    "pixel_shuffle",
    "pixel_unshuffle",
    "constant_pad_nd",
    "reflection_pad1d",
    "reflection_pad2d",
    "reflection_pad3d",
    "replication_pad1d",
    "replication_pad2d",
    "replication_pad3d",
    "_fft_r2c",
    "_fft_c2c",
    "_fft_c2r",
}
_BATCHED = _BATCHED_LINEAR | {
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "_ctc_loss",
}
_PADDED = {"1d": 1, "2d": 2, "3d": 3}


def _batched(func: Any, name: str, args: tuple, kwargs: dict, known: list, outs: list) -> Any:
    t, layout = known[0]
    if len(known) > 1 or t is not args[0]:
        return _mixed(func, "was given weights computed from the model's outputs")
    if isinstance(layout, _Sum):
        if name in _BATCHED_LINEAR:
            return _sum(known)
        return _mixed(func, "is not linear in a sum over the examples")
    named = _named(func, args, kwargs)
    d = layout.dim
    if name == "_ctc_loss":  # log_probs [T, N, C]: one loss per example
        if t.dim() == 3 and d == 0 and t.shape[0] == t.shape[1]:
            return Mixed(CTC_AT_T_EQUAL_N)
        if t.dim() != 3 or d != 1:
            return _mixed(func, "took the examples for another dimension")
        return [_moved(layout, 0) for _ in outs]
    if name.startswith("_fft_"):
        if d in _dims(named["dim"], t.dim()):
            return _mixed(func, "transformed along the examples")
        return layout
    if name == "constant_pad_nd" or name.startswith(("reflection_pad", "replication_pad")):
        k = len(named["pad"]) // 2 if name == "constant_pad_nd" else _PADDED[name[-2:]]
        return layout if d < t.dim() - k else _mixed(func, "padded along the examples")
    if name == "convolution" and t.dim() != args[1].dim():
        return _mixed(func, "ran an unbatched convolution over the examples")
    if d != 0:
        return _mixed(func, "took another dimension for the batch")
    return [layout for _ in outs]


def _strided_rows(t: Tensor, d: int, out: Tensor, named: dict) -> int | None:
    """The dimension of ``as_strided``'s view ``out`` of ``t`` that holds ``t``'s examples
    (dim ``d``), when every element of the view's index i along it lies in example i's own
    span of memory — the frames torch.stft takes of each example's signal —; else None."""
    size, stride = list(named["size"]), list(named["stride"])
    offset = named.get("storage_offset")
    offset = t.storage_offset() if offset is None else offset
    step, n = t.stride(d), t.shape[d]
    if step <= 0 or any(s < 0 for s in stride) or any(s < 0 for s in t.stride()):
        return None
    own = sum(
        (k - 1) * s for i, (k, s) in enumerate(zip(t.shape, t.stride(), strict=True)) if i != d
    )
    if own + 1 != step:
        # (an example's own elements reaching into the next one's span, or leaving a gap that
        # holds other rows' memory — out[::2] skips every other example's, which a view
        # could read: a review of 2026-12-06)
        return None
    at = [i for i, (k, s) in enumerate(zip(size, stride, strict=True)) if k == n and s == step]
    if len(at) != 1 or offset < t.storage_offset():
        return None
    j = at[0]
    start = offset - t.storage_offset()
    reach = start + sum(
        (k - 1) * s for i, (k, s) in enumerate(zip(size, stride, strict=True)) if i != j
    )
    return j if reach < step else None


def _squeezed(named: dict, t: Tensor) -> set[int]:
    dim = named.get("dim")
    if dim is None:
        return set(range(t.dim()))
    return _dims(dim, t.dim())


def _index(
    func: Any, named: dict, t: Tensor, layout: Rows, out: Tensor, fresh: Any, examples: Any
) -> Any:
    indices = list(named["indices"])
    # a boolean mask spans as many dims as it has
    spans = []
    pos = 0
    for idx in indices:
        width = idx.dim() if isinstance(idx, Tensor) and idx.dtype == torch.bool else 1
        if idx is not None:
            spans.append((pos, pos + width, idx))
        pos += width
    if not spans:
        return layout
    first, last = spans[0][0], spans[-1][1]
    adjacent = all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    covered = {i for a, b, _ in spans for i in range(a, b)}
    res = out.dim() - (t.dim() - len(covered))  # dims of the indexing result
    d = layout.dim
    if d in covered:
        if res == 1:
            # each selected position of a mask (or each index) takes one example's values —
            # which one, the same indices of the examples' map say
            ids, ex = None, examples()
            if ex is not None:
                dims = sorted(covered)
                grid = ex.reshape([-1 if i == d else 1 for i in dims])
                grid = grid.expand([t.shape[i] for i in dims])
                ids = grid[tuple(idx.to(ex.device) for _, _, idx in spans)]
            return fresh(first if adjacent else 0, ids)
        return _mixed(func, "indexed the examples with a multi-dimensional index")
    if adjacent:
        new = d if d < first else d - (last - first) + res
        return _moved(layout, new)
    rest = [i for i in range(t.dim()) if i not in covered]
    return _moved(layout, res + rest.index(d))


def _gathered(ex: Tensor | None, index: Tensor, d: int, name: str) -> Tensor | None:
    """The example of each index along ``d`` of ``gather``'s or ``index_select``'s result
    (-1 where gather's index differs along the other dimensions)."""
    if ex is None:
        return None
    index = index.to(ex.device)
    if name == "index_select" or index.dim() <= 1:
        return ex[index.reshape(-1)]
    rows = index.movedim(d, 0).reshape(index.shape[d], -1)
    if rows.shape[1] == 0:
        return None
    same = (rows == rows[:, :1]).all(1)
    return torch.where(same, ex[rows[:, 0]], torch.full_like(rows[:, 0], -1))


def _joined(named: dict, known: list, dim: int) -> tuple[Tensor | None, int | None]:
    """The example of each index of ``torch.cat``'s result along the examples' ``dim`` (-1
    for a constant's rows), with each forward's examples numbered after the earlier ones', and
    their count: None where a part's map is not known. (Two forwards' outputs joined, a mean
    over their rows — two batches through one model, one loss — is a mean over all their
    examples: until a review of 2026-12-06 a part of another forward left the map unknown and
    the one-shot norms refused it.)"""
    by_id = {id(t): x for t, x in known}
    parts, offsets, total = [], {}, 0
    for t in named.get("tensors", ()):
        x = by_id.get(id(t))
        if x is None:
            if t.dim() > dim:
                parts.append(torch.full((t.shape[dim],), -1, dtype=torch.long, device=t.device))
            continue
        if not isinstance(x, Rows) or x.dim != dim:
            return None, None
        if x.owner not in offsets:
            offsets[x.owner], total = (total, x.n), total + x.n
        if offsets[x.owner][1] != x.n:
            return None, None
        ex = _ids(x, t.shape[dim], t.device)
        if ex is None:
            return None, None
        parts.append(torch.where(ex >= 0, ex + offsets[x.owner][0], ex))
    return (torch.cat(parts), total) if parts else (None, None)


def _joined_cycles(named: dict, known: list, dim: int) -> Rows | None:
    """``torch.cat`` of whole cycles of one regular map — the same examples twice,
    ``torch.cat([x, x])`` or ``[x, 0.5 * x]``, as classifier-free guidance runs a teacher on a
    conditional and an unconditional copy — is that map still (index j is example j mod N):
    its ``.chunk(2)`` gives the examples' rows back (until 2026-12-06 the result was an
    irregular map, and ``c − u`` of its halves was refused as combining examples, a hunt)."""
    by_id = {id(t): x for t, x in known}
    tensors = list(named.get("tensors", ()))
    parts = [by_id.get(id(t)) for t in tensors]
    first = parts[0] if parts else None
    if not isinstance(first, Rows) or first.block is None or first.dim != dim:
        return None
    cycle = first.n * first.block
    for t, x in zip(tensors, parts, strict=True):
        if (
            not isinstance(x, Rows)
            or (x.key, x.block, x.n, x.dim, x.owner)
            != (first.key, first.block, first.n, dim, first.owner)
            or t.shape[dim] % cycle
        ):
            return None
    return Rows(dim, first.block, first.key, first.n, first.owner)


def _joined_span(named: dict, known: list, dim: int, layout: Rows) -> Rows | None:
    """``torch.cat`` of consecutive pieces of one regular map, together all of it — a
    cross-entropy computed in chunks of the flattened tokens and joined again — is that map
    (until 2026-12-06 refused as combining the examples, a hunt)."""
    by_id = {id(t): x for t, x in known}
    at, head = 0, None
    for t in named.get("tensors", ()):
        x = by_id.get(id(t))
        if not isinstance(x, Rows) or x.dim != dim or x.span is None or x.owner != layout.owner:
            return None
        key, block, start, stop, size = x.span
        if head is None:
            head = (key, block, size)
        if (key, block, size) != head or start != at or stop - start != t.shape[dim]:
            return None
        at = stop
    if head is None or at != head[2]:
        return None
    return Rows(dim, head[1], head[0], layout.n, layout.owner)


def _join(func: Any, name: str, named: dict, known: list, out: Tensor) -> Layout:
    lays = []
    s = named.get("dim", 0)
    if any(isinstance(layout, _Sum) for _, layout in known):
        # (joining is linear; one example's values are a sum over examples too; sums or means
        # of one kind joined keep it: torch.stack([ce_mean, aux_mean]).sum())
        kinds = {x.plain if isinstance(x, _Sum) else None for _, x in known}
        plain = kinds.pop() if len(kinds) == 1 else None
        factored = any(isinstance(x, _Sum) and x.factored for _, x in known)
        return _Sum(_sum(known).owners, plain, factored=factored)
    for t, layout in known:
        s_ = s % (t.dim() + (name == "stack"))
        d = layout.dim + (name == "stack" and s_ <= layout.dim)
        if name == "cat" and s_ == layout.dim:
            repeated = _joined_cycles(named, known, s_)
            if repeated is not None:
                return repeated
            whole = _joined_span(named, known, s_, layout)
            if whole is not None:
                return whole
            ids, units = _joined(named, known, s_)
            key = ("cat", next(_fresh))
            return Rows(d, None, key, units or layout.n, layout.owner, ids if units else None)
        lays.append(_moved(layout, d))
    if any(x != lays[0] for x in lays):
        return _mixed(func, "joined the values of different examples")
    return lays[0]
