"""The parameter hooks and the step's results: each parameter's gradient checked (zeroed, stale,
reached), the uses' factors summed into per-example norms, the micro-batch gradient norms
accumulated, and :meth:`~.engine.PerExampleNorms.collect` handing the step's passes to the
tracker. A mixin of :class:`~.engine.PerExampleNorms`: where the norms are formed, read in one
place."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from noisescale.errors import NoiseScaleInputError, UnsupportedModuleError
from noisescale.module_hooks import registrations
from noisescale.per_example import scaler_watch
from noisescale.per_example.factors import (
    Factor,
    NormFactor,
    _acc,
    _flat_rows,
    group_factor,
    sqnorm,
    sqnorm_of_sum,
    weighted_sqnorm,
)
from noisescale.per_example.graph import _accumulator
from noisescale.per_example.messages import (
    _REENTRANT_LEAD,
    SECOND_ORDER,
    _reentrant_checkpointing,
    new_parameters_message,
    sparse_grad_message,
)
from noisescale.per_example.pass_checks import (
    _audit_scheduled,
    _merge_shared_backward,
    _refuse_fed_by_its_own_output,
    _refuse_same_input_twice,
    takes_second_order,
    written_tasks,
)
from noisescale.per_example.passes import PassNorms
from noisescale.per_example.values import _owned

# an audit's finding that rows do not belong to their examples (settle.py's messages)
_AUDIT_FAILED = re.compile(r"audit of this step failed.*do not belong to the examples")


def _first_held(flags: list[tuple[str, Tensor]]) -> str | None:
    """The first name whose device flag is set (one host read for them all), or None."""
    if not flags:
        return None
    held = torch.stack([flag.to(flags[0][1].device) for _, flag in flags])
    return next((name for (name, _), h in zip(flags, held.tolist(), strict=True) if h), None)


def _replaced_message(label: str, name: str, held: Any) -> str:
    """A layer that ran without the parameter the engine found on it when it was created."""
    if held is None:
        return (
            f"module '{label}' no longer holds its parameter '{name}', which it held when the "
            "tracker was created: it was re-parametrized or removed since (torch.nn.utils.prune, "
            "spectral_norm, weight_norm or parametrize applied after the tracker was created, "
            f"which move '{name}' elsewhere; module.{name} = None). Apply them before creating "
            "the tracker, or create a new tracker after changing the model"
        )
    return (
        f"module '{label}' ran with its parameter '{name}' replaced by another tensor for this "
        f"call (a forward pre-hook or a patched forward that sets module.{name}: a weight "
        "swapped for an EMA copy, or tied by a hook; torch.func.functional_call with weights "
        "of your own, a hypernetwork's); noisescale attributes a layer's "
        "per-example gradients to the parameters it held when the tracker was created. Tie "
        f"weights by sharing the Parameter itself (b.{name} = a.{name}) before creating the "
        "tracker; a module that only ever runs on weights given to functional_call needs its "
        f"own frozen (requires_grad_(False) before creating the tracker: '{name}' gets no "
        "gradient, and the weights given are followed to where they were computed); or use "
        "per_example=False"
    )


def _without_cross_terms(uses: list[Factor]) -> bool:
    """Whether one of a parameter's uses in a pass came from sub-batch products that kept no
    sub-batch gradients: the norm of the uses' sum cannot be formed (its cross terms)."""
    return any(isinstance(f, NormFactor) and f.grads is None for f in uses)


def _scale_now(scaler: Any) -> Any:
    """A GradScaler's scale as its backward runs, copied on its device (no host sync):
    ``update()`` inside a one-shot block changes it before the norms are read (a review,
    2026-12-07: 4× off when it doubled). ``None`` where the scaler has no such tensor."""
    get = getattr(scaler, "_get_scale_async", None)
    scale = get() if get is not None else None
    return scale.detach().clone() if isinstance(scale, Tensor) else None


class Collect:
    """:class:`~noisescale.per_example.engine.PerExampleNorms`' parameter hooks, accumulation
    and collection of a step's passes."""

    def _make_param_hook(self, pid: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor | None) -> None:
            if self._paused or self._replaying:
                return
            if grad is None:
                # a compiled backward calls the hooks of parameters it gave no gradient (a
                # submodule run under no_grad or on a detached input, its parameters still
                # trainable): nothing reached them — eager autograd calls no hook (until
                # 2026-12-05 this crashed the backward, or withheld a step blaming a graph
                # break, a hunt)
                return
            if grad.layout is not torch.strided:
                # a sparse gradient (F.embedding(ids, table, sparse=True), which no module's
                # sparse=True shows at construction): until 2026-12-06 the backward crashed in
                # the .grad watch's norm with torch's NotImplementedError, in every mode (a hunt)
                raise UnsupportedModuleError(sparse_grad_message(self._param_name.get(pid, "?")))
            task = torch._C._current_graph_task_id()
            current = self._task_pass.get(task) or (self.passes[-1] if self.passes else None)
            if current is None:
                return
            if self._marking[0] is None and task not in self._between_checked:
                # (before this parameter's gradient is accumulated: a layer the loss code
                # calls — model.head(model(x)) — has its parameters reached before the model's
                # outputs, and its accumulation was taken for a zero_grad between micro-batches
                # until 2026-12-06, a review; not in a backward nested in a marked one — a
                # reentrant checkpoint's, whose outer backward accumulated already)
                self._check_between(task)
            current.tasks.add(task)
            current.param_tasks.add(task)
            self._task_pass.setdefault(task, current)
            if current.grad_scaler is None and (scaler := scaler_watch.task_scaler()) is not None:
                # a GradScaler scaled the loss this backward started from: noted here, where
                # every backward that writes a gradient passes — also a compiled model's steps
                # after its eager audited ones and per_example=False, where no hook on the
                # outputs runs (until 2026-12-05 those recorded the scale² without a word)
                current.grad_scaler = scaler
                current.grad_scale = _scale_now(scaler)
            repeated = pid in current.received
            if repeated:
                current.repeated_backward = True
            current.received.add(pid)
            if not current.wrote and self._accumulates(task, pid):
                current.wrote = True
                if self._writer is None:
                    self._writer = current
            elif task in self._grad_only_tasks:
                current.grad_only = True
            if self._step_marks and not repeated and self._accumulates(task, pid):
                self._check_zeroed(pid)
            if current.idle:
                return
            if current.audit is not None:
                current.audit.record_grad(pid, grad)
                # (the step's first pass that writes .grad: one before it whose gradients
                # only torch.autograd.grad took — a .grad assigned by hand from them — is no
                # excuse, a hunt of 2026-12-06)
                if current is self._writer and not repeated:
                    self._check_stale(current, task, pid)
            if self._first_pass is None and self.lazy_first_pass:
                self._first_pass = current
            first = self._first_pass
            if current is first and self._accumulates(task, pid):
                current.lazy.add(pid)
                return
            if first is not None and pid in first.lazy:
                # runs before AccumulateGrad: .grad still holds the first pass's gradient only
                self._resolve_lazy(first, pid, 1.0)
            self._add_grad_norm(current, pid, grad)

        return hook

    def _check_zeroed(self, pid: int) -> None:
        """Every step, before a parameter's first gradient of the step is accumulated: its
        ``.grad`` must not still be the tensor the last step's last backward left, at the same
        version — then nothing zeroed it (``zero_grad`` sets ``None`` or zeroes in place, which
        bumps the version) and ``.grad`` will sum two steps. Version counters only: no host
        read. Until 2026-12-04 only the audited steps (1, 2, 4, …) checked this, by value
        (:meth:`_check_stale`): a ``zero_grad`` skipped once on another step (``if bad: continue``
        after the backward) was measured without a word. A ``DTensor`` gradient (FSDP2), whose
        in-place changes bump no version of its own, is left to the audited steps."""
        if pid in self._zero_checked:
            return
        self._zero_checked.add(pid)
        mark = self._step_marks.pop(pid, None)
        g = self._param[pid].grad
        if g is not None and (mark is None or g is not mark[0]()) and type(g).__name__ != "DTensor":
            # a .grad neither the last step's nor emptied since: assigned by hand before this
            # backward accumulates into it (torch.autograd.grad's result written to .grad for
            # one micro-batch, backward() for the next: .grad held both, the examples measured
            # the backward's alone — 4× off without a word until 2026-12-06, a hunt). Zeros
            # are fine (p.grad = torch.zeros_like(p)); read once in collect, as _unzeroed
            with torch.no_grad():
                self._handset.append((self._param_name[pid], g.detach().ne(0).any()))
            return
        if mark is None:
            return
        if (
            g is not None
            and g is mark[0]()
            and g._version == mark[1]
            and type(g).__name__ != "DTensor"
        ):
            # zeroed through .data (``p.grad.data.zero_()``) bumps no version of .grad: whether
            # it holds anything is noted on the device, read once in collect — a host read only
            # in loops that leave .grad's version alone
            with torch.no_grad():
                self._unzeroed.append((self._param_name[pid], g.detach().ne(0).any()))

    def _check_stale(self, pass_: PassNorms, task: int, pid: int) -> None:
        """On audited steps: before the step's first backward writes ``.grad``, it must be empty
        (``None``, or zeros after ``zero_grad(set_to_none=False)``); read in :meth:`collect`."""
        old = self._param[pid].grad
        if old is None or type(old).__name__ == "DTensor" or not self._accumulates(task, pid):
            return
        with torch.no_grad():
            sq = sqnorm(old.detach())
        pass_.stale_sqnorm = sq if pass_.stale_sqnorm is None else pass_.stale_sqnorm + sq

    def _add_grad_norm(self, pass_: PassNorms, pid: int, grad: Tensor, factor: float = 1.0) -> None:
        """Add |P ⊙ grad|² of one parameter to the pass's gradient norm (and its group's)."""
        with torch.no_grad():
            w2 = None if pass_.weights is None else pass_.weights.get(pid)
            g = grad.detach()
            sq = sqnorm(g) if w2 is None else (_acc(g).pow(2) * w2).sum()
            if factor != 1.0:
                sq = sq * factor
            pass_.grad_sqnorm = sq if pass_.grad_sqnorm is None else pass_.grad_sqnorm + sq
            if self._group_of is not None:
                if pass_.group_grad_sqnorm is None:
                    pass_.group_grad_sqnorm = sq.new_zeros(self.num_groups)
                pass_.group_grad_sqnorm[self._group_of[pid]] += sq

    def _accumulator(self, pid: int) -> Any:
        """The AccumulateGrad node autograd runs for the parameter now (``None``: not known).

        Autograd makes a new one when the parameter's data changes dtype or device
        (``model.to(device)``, ``model.double()`` after the tracker was built; Hugging Face's
        Switch Transformers casts its router to float32 in every forward): the node held
        from before would never run, and a backward through the layer would be taken for one
        that does not reach its weight."""
        held = self._acc_node.get(pid)
        if held is None:
            return None
        node, dtype, device = held
        p = self._param[pid]
        if p.dtype != dtype or p.device != device:
            node = _accumulator(p)
            self._acc_node[pid] = (node, p.dtype, p.device)
        return node

    def _accumulates(self, task: int, pid: int) -> bool:
        """Whether the running backward writes .grad (backward(), not torch.autograd.grad)."""
        known = self._task_accumulates.get(task)
        if known is None:
            node = self._accumulator(pid)
            try:
                known = node is not None and bool(torch._C._will_engine_execute_node(node))
            except RuntimeError:  # autograd.grad(): .grad is not written, so no lazy reading
                known = False
                self._grad_only_tasks.add(task)
            self._task_accumulates[task] = known
        return known

    def _resolve_lazy(self, pass_: PassNorms, pid: int, factor: float) -> None:
        pass_.lazy.discard(pid)
        grad = self._param[pid].grad
        if grad is not None:
            self._add_grad_norm(pass_, pid, grad, factor)

    def _add(self, pass_: PassNorms, p: nn.Parameter, factor: Factor) -> None:
        pid = id(p)
        pass_.covered.add(pid)
        if p.numel() == 0:
            # a parameter of no element (nn.Embedding(V, 0); MobileBERT's LM head's dense
            # weight, [0, V] where its embedding size is its hidden size): 0 in every norm, and
            # its factors, of no element, not reshaped (crashed until 2026-12-07, a fuzz hunt)
            return
        if pass_.audit is not None:
            pass_.audit.add_sum(pid, factor, p.shape)
        if pass_.subbatches is not None:
            factor = group_factor(factor, pass_.subbatches)
        if pass_.uses.get(pid, 1) == 1:
            w2 = None if pass_.weights is None else pass_.weights.get(pid)
            # a NormFactor's norms were weighted where they were computed
            plain = w2 is None or isinstance(factor, NormFactor)
            self._accumulate(pass_, pid, factor.sqnorm() if plain else weighted_sqnorm(factor, w2))
            return
        waiting = pass_.pending.setdefault(pid, [])
        waiting.append(factor)
        if _without_cross_terms(waiting):
            # a weight measured by sub-batch products turned out to be used again: its cross
            # terms are not available; the next passes measure it from factors instead
            self._multi_use.add(pid)
            pass_.broken = f"parameter '{self._param_name.get(pid, '?')}' is used more than once"
            return
        if len(waiting) == pass_.uses[pid]:
            self._accumulate(pass_, pid, self._sqnorm_of_uses(pass_, p, waiting))
            del pass_.pending[pid]
        elif pass_.compiled and pass_.subbatches is None:  # (sub-batch factors are copies)
            waiting[-1] = _owned(waiting[-1], p.shape)

    @staticmethod
    def _sqnorm_of_uses(pass_: PassNorms, p: nn.Parameter, factors: list[Factor]) -> Tensor:
        w2 = None if pass_.weights is None else pass_.weights.get(id(p))
        if w2 is None:
            return sqnorm_of_sum(factors, p.shape)
        # weighted cross terms have no compact form: sum the materialised uses
        total = sum(f.dense(p.shape) for f in factors)
        return _flat_rows(total.pow(2) * w2).sum(1)

    def _accumulate(self, pass_: PassNorms, pid: int, sq: Tensor) -> None:
        if sq.dtype not in (torch.float32, torch.float64):
            sq = sq.float()
        pass_.raw_sqnorms = sq if pass_.raw_sqnorms is None else pass_.raw_sqnorms + sq
        if self._group_of is not None:
            if pass_.group_sqnorms is None:
                pass_.group_sqnorms = sq.new_zeros(sq.shape[0], self.num_groups)
            pass_.group_sqnorms[:, self._group_of[pid]] += sq

    # -- results ------------------------------------------------------------------------------

    def discard(self) -> None:
        """Drop the step's passes unmeasured and reset the step's state: what :meth:`collect`
        does first, and all a step the tracker refused before collecting it needs (the next
        step starts clean)."""
        passes = self.passes
        self._reset_step()
        for pass_ in passes:
            pass_.release()

    def _reset_step(self) -> None:
        self.passes = []
        self._loss_watch.finish()
        self._loss_watch.reset()
        self._scratch.release()  # (rows kept for layers that read one input: an activation)
        self._context.clear()
        self._records.clear()
        self._shadows.clear()
        self._first_pass = None
        self._positions = 0
        self._task_measured.clear()
        self._forwards = 0
        self._measured_found = False
        self._task_accumulates.clear()
        self._grad_only_tasks.clear()
        self._task_pass.clear()
        self._fallback_versions.clear()
        self._fallback_unread = []
        self._hook_changed, self._between = [], None
        self._between_checked.clear()
        self._unzeroed = []
        self._handset = []
        self._zero_checked.clear()
        self._writer = None
        self._hook_in.clear()
        self._unopened = None
        self._unopened_scopes.clear()  # (a call that raised before its exit: not carried on)
        self._unopened_params = []
        self._unopened_transform = False

    def _learned_state(self) -> tuple[int, ...]:
        """How much the engine has learned about the model (layers for the fallback, direct
        uses followed, shared calls and lookups): a pass that changed it taught the engine."""
        return (
            len(self._fallback),
            sum(len(uses) for uses in self._scopes.values()),
            len(self._learned_shared),
            len(self.learned_shared_lookups),
        )

    def collect(self, grad_rescale: float = 1.0, *, learn: bool = True) -> list[PassNorms]:
        """Finish the open passes and return them, resetting the engine for the next step.

        Passes that no backward reached are dropped; passes one backward ran through together
        (two forwards, one loss) are merged into one.

        Args:
            grad_rescale: What ``.grad`` must be multiplied by to be in the hooks' units again
                (the loss scale, when ``GradScaler.unscale_`` ran after the backward passes).
            learn: When an audit finds a use the engine can handle from the next step on (a
                parameter used outside its module, a layer whose input proved shared, an
                operation that needs the fallback), withhold this pass's per-example norms
                (:attr:`PassNorms.withheld`) and adapt; ``False`` refuses instead (one-shot
                measurements).

        Raises:
            UnsupportedModuleError: if a parameter received a gradient but no per-example
                contribution, or an audit failed in a way the engine cannot adapt to.
            NoiseScaleInputError: if the trainable parameters changed since construction, a
                backward with ``create_graph=True`` fed the parameters' gradients, or two
                backward passes ran through one forward.
        """
        opened = self.passes
        done: list[PassNorms] = []
        unopened, outside = self._unopened, self._unopened_params
        transform = self._unopened_transform
        try:
            done = self._collect(grad_rescale, learn)
        except UnsupportedModuleError as err:
            text = str(err)
            if unopened is None or not any(f"'{name}'" in text for name in outside):
                raise
            # the refused parameters' layer ran before the model's forward (inputs_embeds
            # built by the caller): that use was never seen, whatever the finding says
            raise UnsupportedModuleError(
                _outside_message(self.model, unopened) + f". What noisescale found: {text}"
            ) from err
        else:
            if (
                unopened is not None
                and not transform
                and self._outside_trainable(outside)
                and any(p.raw_sqnorms is not None for p in done)
            ):
                # A use outside every forward whose output a backward reached (noted only
                # then: PassOpening._note_when_reached) is never attributed to an example,
                # whatever the audit says: until 2026-12-07 only the audit's remainder refused
                # it, and a use under its tolerance (10⁻³ of the parameter's gradient) passed —
                # BART's tied table looked up by the caller for inputs_embeds, its head taking
                # most of the gradient: every per-example norm 1.5–2.3·10⁻⁴ off without a word
                # (an HF fuzzer's seed), and on steps no audit falls on any share of it passed
                raise UnsupportedModuleError(_outside_message(self.model, unopened))
            return done
        finally:
            # The step is over: what ties a pass to its autograd graph goes. The graph's
            # hooks hold the pass and the pass held the graph's nodes (the outputs', the
            # audit's roots): a cycle through autograd's C++ nodes that Python's collector
            # cannot see, which kept every step's pass, graph and input batch alive (a
            # ResNet's 64 images a step: +1.5 MB of memory a step, for good).
            for pass_ in (*opened, *done):
                pass_.release()

    def _outside_trainable(self, names: list[str]) -> bool:
        """Whether any of the parameters ``names`` (by name) is trainable now."""
        wanted = set(names)
        return any(
            p.requires_grad for pid, p in self._param.items() if self._param_name.get(pid) in wanted
        )

    def _audit_pending_losses(self) -> None:
        """The next step is audited while a loss shape met on an unaudited step has not passed
        an audit and its window of audits lasts (Settle._new_loss_shape)."""
        for shape in [s for s in self._pending_losses if s in self._audited_losses]:
            del self._pending_losses[shape]
        if not self._pending_losses:
            self._loss_audits_left = 0
        elif self._loss_audits_left > 0:
            self._loss_audits_left -= 1
            self._audit_due = True

    def _collect(self, grad_rescale: float, learn: bool) -> list[PassNorms]:
        done, first = self.passes, self._first_pass
        changed, between = self._hook_changed, self._between
        #: a parameter whose .grad the step found not zeroed since the last one
        #: (:meth:`_check_zeroed`); the tracker refuses the step, a one-shot measurement — whose
        #: norms do not read .grad — does not care
        self.unread_picks = []  # (set below, from the passes of the step's training backwards)
        self.unopened = self._unopened
        self.unopened_transform = self._unopened_transform
        # the parameters of that layer: not learned as direct uses of the forward (a use
        # outside it, inputs_embeds built by the caller, would never be seen)
        self._outside_params = set(self._unopened_params)
        self.unzeroed = _first_held(self._unzeroed)
        self.handset = _first_held(self._handset)
        self._reset_step()  # the step's state reset, whatever is refused below
        if any(p.wrote for p in done):
            # A pass whose gradients only torch.autograd.grad took (the ascent of
            # sharpness-aware minimization, a gradient logged for a held-out batch, the inner
            # step of first-order MAML) is not part of .grad: not a micro-batch of the step (a
            # review found each counted as one, b_big 2x and tr Σ 2.7x off). (Where no pass
            # wrote .grad, they stay: a .grad assigned by hand from them is checked to be that
            # one pass's gradient, GradWatch._assigned_by_hand, or refused by the tracker.)
            for p in done:
                if p.received and p.grad_only and not p.wrote:
                    p.received = set()
        marked = next((p for p in reversed(done) if p.grad_marks and p.received), None)
        self._step_marks = (
            {}
            if marked is None
            else {
                id(p): m
                for p, m in zip(self._params, marked.grad_marks, strict=True)
                if m is not None
            }
        )
        split = [p for p in done if p.subbatches is not None and p.received and not p.skipped]
        if split:
            self._subbatches_pay = any(p.products for p in split)
        reached = sum(1 for p in done if p.received)  # passes of the step, before merging
        if first is not None and first.lazy and reached > 1:
            # parameters no later pass touched: .grad is still the first pass's gradient
            # (``grad_rescale`` undoes an AMP unscale_ of .grad that ran since the backward)
            for pid in list(first.lazy):
                self._resolve_lazy(first, pid, grad_rescale**2)
        if first is not None:
            first.lazy.clear()
        if between is not None:
            raise NoiseScaleInputError(
                "call optimizer.zero_grad() once per optimizer step, after optimizer.step(), "
                f"not between the micro-batches of one step: the gradient of {between!r} was "
                "zeroed (or changed) between two backward passes of this step, so .grad holds "
                "only part of the step's gradient and the estimate would be wrong. Nothing of "
                "this step was recorded. A pass that is not part of the step's gradient (the "
                "ascent pass of sharpness-aware minimization, a probe at other weights) goes "
                "under `with tracker.paused():`, its gradients zeroed before the measured pass — "
                "so does another model's step whose loss reaches this model (a GAN's generator "
                "step through a tracked discriminator, a discriminator step on a fake not "
                "detached), or freeze this model for it (requires_grad_(False)); "
                "with torch.optim.LBFGS, whose closure runs several passes per step, call "
                "tracker.step() inside the closure, after its backward. A step abandoned after "
                "its backward (a loss that is not finite, then zero_grad() and continue; an "
                "exception caught in the loop) needs tracker.discard() before zero_grad(); "
                "to measure only some steps, call tracker.step() every step with "
                "measure_every= instead of skipping it"
            )
        post = [pid for pid, after in changed if after]
        if post:
            names = ", ".join(repr(self._param_name[pid]) for pid in dict.fromkeys(post))
            raise UnsupportedModuleError(
                f"a hook run after the accumulation of the gradient of {names} changed .grad "
                "(a function given to register_post_accumulate_grad_hook: a rescale, a clamp, "
                "an optimizer step inside the backward); noisescale takes every norm before "
                "such a hook and .grad holds the gradient after it, so they would not match. "
                "Apply the change after tracker.step()"
            )
        if changed and self.per_example:
            pids = dict.fromkeys(pid for pid, _ in changed)
            names = ", ".join(repr(self._param_name[pid]) for pid in pids)
            raise UnsupportedModuleError(
                f"a hook on the gradient of {names} changed it (a function given to "
                "register_hook that returns another gradient or changes it in place: a mask, a "
                "clamp, a scale); noisescale measures each example's gradient before such a "
                "hook and .grad holds it after, so the norms would not match .grad. Apply the "
                "change to .grad after tracker.step(), or use per_example=False (micro-batch "
                "norms, taken after the hooks: right for a linear change such as a mask)"
            )
        if any(p.requires_grad != (id(p) in self._param) for p in self._all_params):
            raise NoiseScaleInputError(
                "the model's trainable parameters changed since the tracker (or PerExampleNorms) "
                "was created (a layer or a parameter used directly was frozen or unfrozen); "
                "create a new tracker after changing requires_grad"
            )
        seen = registrations()
        if seen != self._registrations_seen or any(p.audit is not None for p in done):
            # on audited steps (1, 2, 4, …) and whenever a module or parameter was registered
            # anywhere since the last look: a parameter the engine was not built on — a layer
            # re-created or added, a bare Parameter (a logit scale used as `out * self.scale`)
            # added or replaced, resize_token_embeddings(), peft adapters, assign=True loads —
            # would be left out of every norm without a word (until 2026-12-07 looked for on
            # audited steps only: a bare scale replaced at step 5 read 0.9–6.5% off on steps
            # 5–7, a hunt; before a layer's own replaced weight, whose refusal named a hook)
            known = {id(p) for p in self._all_params}  # (unfreezing: the message above)
            new = [
                name
                for name, p in self.model.named_parameters()
                if p.requires_grad and id(p) not in known
            ]
            if new:
                raise NoiseScaleInputError(new_parameters_message(new))
            self._registrations_seen = seen
        for pass_ in done:
            for label, name, held in pass_.replaced if pass_.received else ():
                raise UnsupportedModuleError(_replaced_message(label, name, held))
        for pass_ in done:
            if pass_.deferred and pass_.audit is not None:
                pass_.audit.skip_sums.update(self._param)
            for task, items in pass_.deferred.items():
                if task in pass_.param_tasks:
                    for p, factor in items:
                        self._add(pass_, p, factor)
            pass_.deferred.clear()
            for slot in list(pass_.slots.values()):
                # meetings whose output never reached the loss contribute nothing
                if slot.arrived:
                    self._finish_slot(pass_, slot, True)
            pass_.slots.clear()
            for pid, waiting in list(pass_.pending.items()):
                if _without_cross_terms(waiting):
                    continue  # the pass is broken (withheld below)
                # a use whose output never reached the loss contributes a zero gradient
                self._accumulate(pass_, pid, self._sqnorm_of_uses(pass_, self._param[pid], waiting))
            pass_.pending.clear()
            if pass_.audited and pass_.rows is not None:
                rows = pass_.rows
                if pass_.raw_sqnorms is not None:
                    pass_.raw_sqnorms = pass_.raw_sqnorms.index_select(
                        0, rows.to(pass_.raw_sqnorms.device)
                    )
                if pass_.group_sqnorms is not None:
                    pass_.group_sqnorms = pass_.group_sqnorms.index_select(
                        0, rows.to(pass_.group_sqnorms.device)
                    )
            if pass_.row_weights is not None:  # importance weights of the drawn rows
                w = pass_.row_weights
                if pass_.raw_sqnorms is not None:
                    pass_.raw_sqnorms = pass_.raw_sqnorms * w.to(pass_.raw_sqnorms.dtype)
                if pass_.group_sqnorms is not None:
                    wg = w.to(pass_.group_sqnorms.dtype)[:, None]
                    pass_.group_sqnorms = pass_.group_sqnorms * wg
            pass_.uses.clear()
        # (the passes of backwards that reached the parameters: not a saliency probe's; of
        # them, those that wrote .grad: not torch.autograd.grad's, which are no part of .grad)
        trained = set().union(*(p.param_tasks for p in done))
        wrote = written_tasks(done)
        for pass_ in done:
            sb = pass_.subbatches
            if sb is not None and pass_.received and sum(sb.sizes) != pass_.batch_size:
                # never an estimate from sub-batches that leave examples out (or count rows
                # that are not examples): the sub-batch norms assume a partition of the pass
                raise UnsupportedModuleError(
                    f"the pass's {pass_.batch_size} examples were split into sub-batches of "
                    f"{sum(sb.sizes)} (the example count changed after the split); this is a "
                    "noisescale bug — please report it with the model. Meanwhile measure every "
                    "example: GradientNoiseTracker(model, per_example_fraction=1.0)"
                )
            if takes_second_order(pass_, wrote):
                raise NoiseScaleInputError(SECOND_ORDER)
            if pass_.repeated_backward and pass_.grad_only and not pass_.wrote and wrote:
                # (torch.autograd.grad alone ran through it, twice — two loss terms' gradients
                # taken apart to weigh them, PINNs' learning-rate annealing —, beside a backward
                # that wrote .grad: no part of the step, as above; refused as two backwards
                # until 2026-12-06, a hunt)
                continue
            if pass_.repeated_backward and pass_.grad_only and pass_.wrote:
                # (a hunt, 2026-12-06: a gradient only read — the cosine between two tasks'
                # gradients — was refused as a sum of two backwards, paused() unmentioned)
                raise NoiseScaleInputError(
                    "put a gradient that is only read or logged under `with tracker.paused():` "
                    "(torch.autograd.grad(..., retain_graph=True) ran through the step's forward "
                    "beside its backward — a gradient norm, the cosine between two tasks' "
                    "gradients —, and noisescale cannot tell its part of the examples' norms "
                    "from the backward's); where it is part of the update, add the losses and "
                    "call backward once per forward. A custom autograd.Function whose backward "
                    "calls torch.autograd.grad through the model's layers (a neural ODE's "
                    "adjoint method, torchdiffeq's odeint_adjoint) cannot be measured, "
                    "per_example=False included: backpropagate through the solver's steps "
                    "(torchdiffeq's odeint) instead"
                )
            if pass_.repeated_backward and pass_.param_tasks - pass_.forward_tasks:
                # (a hunt, 2026-12-07: `loss.backward(); penalty.backward()` was told of
                # retain_graph=True, which the user never passed)
                raise NoiseScaleInputError(
                    "a second backward reached the parameters in this step without passing "
                    "through the model's forward — the backward of a term computed from the "
                    "parameters alone, such as a penalty (loss.backward(); penalty.backward()) "
                    "—, so the examples' share of the step's gradient is unknown. Call "
                    "tracker.step() (PerExampleNorms.collect()) after the loss's backward and "
                    "before the term's, so that the term is no part of the step measured; or "
                    "add the term to the loss and call backward once — though a term computed "
                    "from the parameters in the loss is no example's, and noisescale refuses it "
                    "there (an L2 penalty belongs in the optimizer's weight_decay)"
                )
            if pass_.repeated_backward:
                raise NoiseScaleInputError(
                    "two backward passes ran through one forward (retain_graph=True), so the "
                    "gradient norms of their sum are unknown; add the losses and call backward "
                    "once per forward (passes that are not the step's — a measurement such as "
                    "noisescale.hessian.measure_b_noise, whose Hessian-vector products run "
                    "several backward passes through one forward — go under "
                    "`with tracker.paused():`)"
                    + (
                        ". (This step also ran checkpoint(use_reentrant=True), whose forward "
                        "recomputed in a backward noisescale takes for the step's last forward's: "
                        "with several forwards before their backwards, that reads as this — use "
                        "use_reentrant=False, or one backward after each forward)"
                        if any(p.reentrant for p in done)
                        else ""
                    )
                )
        compiled_step = any(p.compiled or p.compiled_call for p in done)
        self._seen_compiled = self._seen_compiled or compiled_step
        # (by value on the audits' steps, in every mode — they read values back anyway —, the
        # passes a backward that wrote .grad ran through; the same tensor, those of the step's
        # training backwards: where one wrote .grad, not a forward whose gradients only
        # torch.autograd.grad took — SAM's ascent on the batch itself, refused as the same
        # examples twice until 2026-12-06, a hunt)
        audited = self._audit_due or any(p.audit is not None for p in done)
        _refuse_same_input_twice(
            [p for p in done if p.tasks & (wrote or trained) and not p.idle],
            by_value=[p for p in done if p.tasks & wrote and not p.idle] if audited else (),
        )
        _refuse_fed_by_its_own_output([p for p in done if p.tasks & trained])
        self._take_unread_picks([p for p in done if p.tasks & trained and not p.idle])
        opened = len(done)
        for p in done:
            if p.batch_size == 1:
                # (the loss watch follows a one-example pass for the groups it joins — their
                # coupling and their plain sum —; how its own loss weighs its one example, a
                # mean over its tokens or its class weight, is its own and weighs nothing
                # against another's: as before 2026-12-06, when such passes went unwatched)
                p.counted_mean = p.counted_inside = p.class_weighted = None
                p.loss_kind_counted = None
        _carry_skipped_loss_side(done)
        done = _merge_shared_backward(done)
        # several forwards in one backward: their positions (counted in forwards) and the
        # step's backwards (counted in passes that received gradients) are not the same count
        merged_any = len(done) < opened
        done = [p for p in done if p.received]
        if done and all(p.idle for p in done):
            return done  # an unmeasured step: the measured steps' schedules stay as they were
        self.steps_collected += 1
        self._audit_due = _audit_scheduled(self.steps_collected + 1)  # the next step's number
        if done:
            self.last_step_examples = sum(p.batch_size for p in done)
            separate = len(done) == reached and not compiled_step and not merged_any
            self.last_step_passes = reached if self.subbatches and separate else 0
            # which pass of the next step is measured: a subset's, or (sub-batch mode) the one
            # micro-batch that is split
            self.subset_position = 0
            if reached > 1 and (self.per_example_fraction < 1.0 or self.last_step_passes > 1):
                self.subset_position = self._draw_subset_position(reached)
        if self.per_example:
            taught: str | None = None  # what an earlier pass of this step taught the engine
            for pass_ in done:
                known = self._learned_state()
                try:
                    self._settle(pass_, learn)
                except UnsupportedModuleError as err:
                    # whether deferred or refused (and caught by a caller who goes on): every
                    # micro-batch of the next step is measured and audited, the deferred one's
                    # position included (in sub-batch mode one a step is), until a step passes
                    self._audit_due = True
                    self.last_step_passes, self.subset_position = 0, 0
                    if taught is not None:
                        # The step's earlier micro-batch taught the engine (a direct use, a
                        # layer for the fallback), from the next step on: this one ran before
                        # that and may meet the same thing. Left out with it, and the next
                        # step is audited (whatever its schedule), so that a cause the lesson
                        # does not explain is refused there, before any step is measured.
                        self._withhold(
                            pass_,
                            f"an earlier micro-batch of this step taught the engine ({taught}); "
                            "this one ran before that and is left out with it (the next step "
                            f"is audited; what this one met: {err})",
                        )
                        continue
                    if pass_.sticky is not None:  # (refused: the structure stays refused)
                        self._refused_structures[pass_.sticky[0]] = pass_.sticky[1]
                    # (an audit that compared rows found them mixed: it replays through
                    # reentrant checkpoints since 2026-12-05, and its cause stands — LoRA
                    # models with examples mixed inside a checkpointed block were told the
                    # checkpoint was the cause, a hunt)
                    if _reentrant_checkpointing(self.model) and not _AUDIT_FAILED.search(str(err)):
                        raise UnsupportedModuleError(
                            f"{_REENTRANT_LEAD}. (What the engine's check met there, for "
                            "reference — a consequence of the reentrant recomputation; the "
                            f"other causes its words list do not apply: {err})"
                        ) from err
                    if not pass_.reentrant:
                        raise
                    # A forward ran inside the backward, with no checkpointing configured:
                    # a custom Function re-running its forward in its backward (Reformer's
                    # reversible layers) as likely as checkpoint(use_reentrant=True).
                    raise UnsupportedModuleError(
                        f"{err}. (This step also ran a forward inside a backward — a custom "
                        "torch.autograd.Function that re-runs its forward in its backward, as "
                        "reversible layers do, or activation checkpointing with "
                        "use_reentrant=True — which the engine may not see whole: if what is "
                        "named above does not explain it, that does; checkpoint with "
                        "use_reentrant=False, or use per_example=False)"
                    ) from err
                if (
                    learn
                    and taught is None
                    and pass_.withheld is not None
                    and self._learned_state() != known
                ):
                    taught = pass_.withheld
        self._audit_pending_losses()
        # an audited step runs eagerly, in compiled models too
        self._eager_steps.want(
            self._compiled_eagerly
            or (self.per_example and self.auditing_enabled and self._audit_due)
        )
        self._prepare_compile()
        return done


def _carry_skipped_loss_side(done: list[PassNorms]) -> None:
    """What the walks of the loss found on a step's skipped micro-batches — a penalty on a
    parameter, the shapes of their losses, which no watch followed — is the step's: carried to
    its measured passes (a skipped pass is not settled), which settle refuses for the penalty
    and withholds for a carried shape no audit has followed (Settle._new_loss_shape)."""
    skipped = [p for p in done if p.skipped and not p.idle and p.batch_size > 1]
    if not skipped:
        return
    shapes = set().union(*(p.loss_shapes for p in skipped))
    side = next((p.loss_side for p in skipped if p.loss_side), None)
    for p in done:
        if not p.skipped:
            p.carried_shapes |= shapes
            if side and not p.loss_side:
                p.loss_side = side


def _outside_message(model: nn.Module, label: str) -> str:
    """The refusal of a step in which layer ``label`` of ``model`` ran outside its forward and a
    backward reached what it computed."""
    return (
        f"layer '{label}' ran with gradients enabled outside a forward of the measured model "
        f"({type(model).__name__}) — e.g. inputs_embeds computed by the caller, "
        "model.get_input_embeddings()(ids), then model(inputs_embeds=...) — so its "
        "parameters' use there was never attributed to examples. Let the model run the layer "
        "(pass input_ids), wrap the layer's call and the model's in one module and measure "
        "that, or use per_example=False"
    )
