"""Checks across the passes of one step: the audit schedule, passes one backward ran through
(merged), two forwards on the same input, a forward fed by its own output."""

from __future__ import annotations

import copy
import functools
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from noisescale.errors import NoiseScaleInputError
from noisescale.per_example.factors import MergedSubbatches
from noisescale.per_example.passes import PassNorms
from noisescale.per_example.values import _flat_tensors, _flat_values


def _audit_scheduled(step: int) -> bool:
    """Audit step 1 (steps count from 1), steps 2, 4, 8, …, 1024, and every 1024th after."""
    return step <= 1 or (step <= 1024 and step & (step - 1) == 0) or step % 1024 == 0


def _merge_shared_backward(passes: list[PassNorms]) -> list[PassNorms]:
    """Merge passes that one backward ran through: one micro-batch of all their examples."""
    groups: list[list[PassNorms]] = []
    for pass_ in passes:
        joined = [g for g in groups if any(pass_.tasks & q.tasks for q in g)]
        merged = [pass_]
        for g in joined:
            groups = [h for h in groups if h is not g]  # (by identity: passes hold tensors)
            merged = g + merged
        groups.append(merged)
    out = []
    for group in groups:
        if len(group) == 1:
            out.append(group[0])
            continue
        if any(p.skipped and not p.idle for p in group) and not all(p.skipped for p in group):
            # part of the pass measured: in sub-batch mode with accumulation the micro-batch
            # measured is chosen at the forward, by the last step's passes, and this step ran
            # several forwards in one backward where the last ran one (from the next step on,
            # every forward of such a step is measured). Its per-example gradients would miss
            # the skipped forwards' share of the backward (the audit's coverage check would
            # fail): the pass keeps its micro-batch norm only, as a skipped one does
            group = [_without_norms(p) for p in group]
        first = group[0]
        merged = PassNorms(batch_size=sum(p.batch_size for p in group), weights=first.weights)
        for name in ("raw_sqnorms", "group_sqnorms"):
            parts = [getattr(p, name) for p in group if getattr(p, name) is not None]
            setattr(merged, name, torch.cat(parts) if parts else None)
        for name in ("grad_sqnorm", "group_grad_sqnorm"):
            parts = [getattr(p, name) for p in group if getattr(p, name) is not None]
            setattr(merged, name, sum(parts[1:], parts[0]) if parts else None)
        merged.skipped = all(p.skipped for p in group)
        merged.idle = all(p.idle for p in group)  # (an unmeasured step's: counted, not measured)
        merged.audited = any(p.audited for p in group)
        merged.compiled = any(p.compiled for p in group)
        merged.unaudited = any(p.unaudited for p in group)
        merged.compiled_blocked = any(p.compiled_blocked for p in group)
        merged.compiled_call = any(p.compiled_call for p in group)
        merged.compiled_unsupported = next(
            (p.compiled_unsupported for p in group if p.compiled_unsupported), None
        )
        merged.audits = [p.audit for p in group if p.audit is not None]
        merged.audit = merged.audits[0] if merged.audits else None
        for audit in merged.audits[1:]:
            # the backward's gradients were recorded into one forward's audit, each forward's
            # per-example sums into its own: checked together (until 2026-12-07 the first's
            # alone, with no gradient to compare its sums with, was finished — a tied head, a
            # penalty, a layer called twice passed it without a word, a hunt)
            merged.audit.absorb(audit)
        merged.partly_audited = bool(merged.audits) and any(
            p.audit is None and not p.skipped for p in group
        )
        # a weight measured by sub-batch products that a forward used twice: the merged
        # pass misses its cross terms too (until 2026-12-07 it was measured without them at
        # the first step of sub-batch mode, 44% off, a hunt)
        merged.broken = next((p.broken for p in group if p.broken is not None), None)
        merged.flat_calls = set().union(*(p.flat_calls for p in group))
        merged.unsupported = [u for p in group for u in p.unsupported]
        merged.ambiguous = [u for p in group for u in p.ambiguous]
        merged.coupled = next((p.coupled for p in group if p.coupled), None)
        for name in ("counted_mean", "counted_inside", "counted_labels"):
            flags = [getattr(p, name) for p in group if getattr(p, name) is not None]
            setattr(merged, name, functools.reduce(operator.or_, flags) if flags else None)
        weighted = [p.class_weighted for p in group if p.class_weighted is not None]
        merged.class_weighted = functools.reduce(operator.or_, weighted) if weighted else None
        kinds = {p.loss_kind for p in group}
        merged.loss_kind = kinds.pop() if len(kinds) == 1 else None
        merged.loss_kind_factored = any(p.loss_kind_factored for p in group)
        counted = [p.loss_kind_counted for p in group]
        merged.loss_kind_counted = (
            functools.reduce(operator.and_, counted)
            if counted and all(c is not None for c in counted)
            else None
        )
        merged.grad_scaler = next((p.grad_scaler for p in group if p.grad_scaler), None)
        merged.grad_scale = next((p.grad_scale for p in group if p.grad_scaler), None)
        merged.loss_unfollowed = next((p.loss_unfollowed for p in group if p.loss_unfollowed), None)
        merged.loss_side = next((p.loss_side for p in group if p.loss_side), None)
        merged.loss_side_unchecked = any(p.loss_side_unchecked for p in group)
        merged.loss_shapes = set().union(*(p.loss_shapes for p in group))
        merged.carried_shapes = set().union(*(p.carried_shapes for p in group))
        # how the losses weigh the examples: one loss's weights per backward are measured (or
        # counted); several forwards' in one backward cannot be combined into one pass's
        if any(p.units is not None for p in group):
            merged.units_error = (
                f"{len(group)} forward passes of the model were backpropagated by one backward "
                "(e.g. (loss1 + loss2).backward()) and their losses weigh tokens (a Hugging "
                "Face model's labels=, count_tokens): noisescale reads one loss's token weights "
                "per backward pass and cannot combine several. Call backward() on each "
                "forward's loss in turn (gradient accumulation), or run the examples in one "
                "forward"
            )
        else:
            merged.units_error = next((p.units_error for p in group if p.units_error), None)
        # in sub-batch mode each pass was split (or measured per example): their groups
        # together partition the merged pass (before 2026-12-04 the merged pass had no
        # sub-batches, and the default measured nothing where the exact mode measured it)
        # (a pass of one example is its own: a loss summed over a loop of one-example
        # forwards was skipped at every step of the default mode until 2026-12-06, a hunt)
        if any(p.subbatches is not None or p.unsplit or p.batch_size == 1 for p in group) and all(
            p.raw_sqnorms is not None
            and not p.skipped
            and (p.subbatches is not None or p.unsplit or p.batch_size == 1)
            for p in group
        ):
            if all(p.unsplit or p.batch_size == 1 for p in group):
                merged.unsplit = True
            else:
                merged.subbatches = MergedSubbatches(
                    [p.batch_size if p.subbatches is None else p.subbatches for p in group]
                )
        if any(p.rows is not None or p.skipped for p in group) and not merged.skipped:
            offset, taken, weights = 0, [], []
            for p in group:
                if not p.skipped:
                    r = p.rows if p.rows is not None else torch.arange(p.batch_size)
                    taken.append(r.cpu() + offset)
                    # (the weights already in each part's norms, ones where it measured every
                    # row: a merged subset's norms read as unweighted until 2026-12-07, a fuzzer)
                    w = p.row_weights if p.rows is not None else None
                    weights.append(torch.ones(len(r)) if w is None else w.detach().cpu().double())
                offset += p.batch_size
            merged.rows = torch.cat(taken)
            merged.row_weights = torch.cat(weights)
        for p in group:
            merged.received |= p.received
            merged.covered |= p.covered
            merged.tasks |= p.tasks
            merged.param_tasks |= p.param_tasks
        out.append(merged)
    return out


def written_tasks(passes: Sequence[PassNorms]) -> set[int]:
    """The autograd graph tasks that wrote ``.grad`` through these passes (not
    ``torch.autograd.grad``'s, which are no part of ``.grad``)."""
    return set().union(*(p.param_tasks for p in passes if p.wrote))


def takes_second_order(pass_: PassNorms, wrote: set[int]) -> bool:
    """Whether a backward with create_graph=True ran through ``pass_`` and the step's
    gradient came through it too: the parameters' gradients recorded on it, or a backward of
    ``wrote`` (:func:`written_tasks`) ran through it — several forwards through one backward
    record those gradients on one pass only (R1's penalty on D(real) before a D(fake)
    forward was measured without its second-order terms until 2026-12-06, 38–84% off)."""
    return pass_.second_order and bool(pass_.received or pass_.tasks & wrote)


def _same_input(a: PassNorms, b: PassNorms, by_value: bool = False) -> bool:
    """Whether two passes read the same examples: in one backward, the same tensor or one with
    the same storage, shape and stride (a view); across backwards (two micro-batches), the
    same tensor object at the same version — a buffer refilled in place between them,
    ``buf.copy_(batch)``, holds other examples, and a new tensor on a reused buffer
    (``torch.from_numpy(buf)`` each time, which numpy refills without a version) is taken
    for other examples too."""
    x, y = a.examples, b.examples
    if x is None or y is None:
        return False
    if a.tasks & b.tasks:  # one backward: nothing can have changed the input in between
        if x is y or (
            x.device == y.device
            and x.dtype == y.dtype
            and x.shape == y.shape
            and x.stride() == y.stride()
            and x.data_ptr() == y.data_ptr()
        ):
            return True
    elif x is y and a.examples_version is not None and a.examples_version == b.examples_version:
        return True
    # ``by_value`` (the audits' steps, which read values back anyway): equal values in another
    # tensor — the batch indexed again for the second forward, buf[idx] twice, a .clone(), a
    # second .to(device) — are the same examples too (until 2026-12-06 only the same tensor
    # was seen: an actor-critic's two heads each fed buf[idx] in one backward read B_simple
    # 15.9 for a truth of 7.2, a hunt). Every tensor argument with the batch's rows must be
    # equal, not the first alone (two forwards share an all-ones attention mask, not their
    # input_ids). Within one backward
    # only: two micro-batches (a backward each) of equal inputs may be independent draws — a
    # sampler with replacement at small batches draws one example twice — or other examples
    # (other labels, used outside the model), which no check can tell from the same examples
    # twice (a review found the first version refusing both).
    if not by_value or not a.tasks & b.tasks or a.inputs is None or b.inputs is None:
        return False
    left, right = _rows_of(a), _rows_of(b)
    return (
        bool(left)
        and len(left) == len(right)
        and all(
            u.device == v.device
            and u.dtype == v.dtype
            and u.shape == v.shape
            and (
                # the very same tensor in both forwards of one backward (an attention mask
                # reused beside a copy of the ids: until 2026-12-06 it made the check give
                # up, and an actor-critic's second forward on ids.clone() with the same mask
                # was measured as 2N examples, tr Σ 82% high, a hunt) — as the examples'
                # tensor itself is taken above
                u is v
                # (another tensor on the same memory — one buffer refilled for each forward,
                # new tensors on one numpy buffer: what it holds now is the last batch, not
                # what the first forward read — is not compared)
                or (u.data_ptr() != v.data_ptr() and bool(torch.equal(u, v)))
            )
            for u, v in zip(left, right, strict=True)
        )
    )


def _rows_of(pass_: PassNorms) -> list[Tensor]:
    """The pass's tensor arguments with a row per example (dim 0 of the batch's size)."""
    found: list[Tensor] = []
    _flat_tensors(pass_.inputs, found)
    n = pass_.batch_size
    return [t for t in found if t.dim() > 0 and t.shape[0] == n and t.numel() > 0]


def _refuse_same_input_twice(passes: list[PassNorms], by_value: Sequence[PassNorms] = ()) -> None:
    """Refuse a step whose backward passes ran through two forwards of the model on the same
    input tensor.

    Their rows are the same examples twice (multi-sample dropout, R-Drop's two passes, two
    task heads called in turn on one batch, in one backward or two): each example's gradient
    is the sum of its two rows', but the step takes its 2N rows for 2N independent examples
    (one merged pass, or two micro-batches), so per-example norms, sub-batch and micro-batch
    norms and the noise scale from them are wrong. (Two augmented views are two input tensors,
    which no check can tell from two batches: documented, not detected.) ``by_value``: the
    passes also compared by value (the audits' steps; those whose backward wrote ``.grad`` —
    not SAM's ascent taken by ``torch.autograd.grad`` on ``x.clone()``, no part of the step).
    """
    valued = {id(p) for p in by_value}
    for i, a in enumerate(passes):
        for b in passes[i + 1 :]:
            both = id(a) in valued and id(b) in valued
            if a.batch_size == b.batch_size and _same_input(a, b, both):
                one = bool(a.tasks & b.tasks)
                raise NoiseScaleInputError(
                    f"{'one backward' if one else 'the backward passes of one step'} ran "
                    "through two forward passes of the model on the same input tensor (shape "
                    f"{tuple(a.examples.shape)}, or equal values; e.g. multi-sample dropout, "
                    "R-Drop, two heads called in turn on one batch, or on the batch indexed "
                    "again): its rows are the same examples twice, whose "
                    "gradient is the sum of both rows', so no norm per row is an example's and "
                    f"the step's {a.batch_size + b.batch_size} rows are not independent draws"
                    f"{'' if one else ' (nor are its micro-batches)'}. Run the batch through "
                    "one forward and one loss; with accumulation, give each micro-batch other "
                    "examples (per_example=False then measures any loss within a micro-batch "
                    "exactly). A forward that is not trained (a teacher, a probe) goes under "
                    "torch.no_grad() or tracker.paused()"
                )


def _node_key(node: Any) -> tuple[int, int]:
    return id(node), node._sequence_nr()


def _fed_by(passes: list[PassNorms], args: tuple, kwargs: dict) -> PassNorms | None:
    """The earlier pass of the step whose model outputs a tensor argument of this forward was
    computed from through autograd (``m(m(x))``, ``m(x + m(x))``: a walk of its graph, bounded
    at 512 nodes), or None. (A detached output, the pushforward trick's ``m(m(x).detach())``,
    has no such link: its memory is the output's, but an address an output freed may hold a
    new batch, so memory cannot tell; not detected, documented.)"""
    earlier = [p for p in passes if p.fed_marks]
    if not earlier:
        return None
    for t in _flat_values(args, kwargs):
        if not isinstance(t, Tensor):
            continue
        node, seen, todo = t.grad_fn, set(), []
        while node is not None and len(seen) < 512:
            if id(node) not in seen:
                seen.add(id(node))
                key = _node_key(node)
                for p in earlier:
                    if key in p.fed_marks:  # type: ignore[operator]
                        return p
                todo.extend(n for n, _ in node.next_functions if n is not None)
            node = todo.pop() if todo else None
    return None


def _refuse_fed_by_its_own_output(passes: list[PassNorms]) -> None:
    """Refuse a step in which a trained forward of the model ran on what an earlier trained
    forward of the step returned: a rollout, an unrolled recurrence, self-conditioning with
    gradient. Row i of every call is example i, whose
    gradient is the sum over the calls, but the step took each call's rows for N independent
    examples of their own (a review found b_big 3x and tr Σ up to +164%, silently)."""
    trained = {id(p) for p in passes}
    for p in passes:
        if p.fed_by is not None and id(p.fed_by) in trained:
            raise NoiseScaleInputError(
                "a forward of the model ran on what an earlier forward of this step returned "
                "(a rollout m(m(x)), an unrolled recurrence, self-conditioning with gradient, "
                "m(x + m(x))) or on what a layer of the model computed after it from that "
                "forward's own input (its table looked up again for inputs_embeds, R-Drop's "
                "second pass on the embeddings plus noise), and both were trained: row i of "
                "each call is example i, whose gradient is the sum over the calls, so no row's "
                "norm is an example's and the calls' rows are not independent draws. Wrap the "
                "rollout in one module whose forward calls the model each time and give that "
                "module to the tracker (the repeated calls of its layers are then measured as "
                "one example's), or run a forward that is not trained under torch.no_grad() or "
                "tracker.paused(). Nothing of this step was recorded"
            )


def _without_norms(pass_: PassNorms) -> PassNorms:
    """A copy of the pass without its per-example norms, rows and audit (its micro-batch norm
    and bookkeeping kept)."""
    bare = copy.copy(pass_)
    bare.raw_sqnorms = bare.group_sqnorms = bare.rows = bare.audit = bare.subbatches = None
    bare.unsplit = False
    bare.skipped = True
    return bare
