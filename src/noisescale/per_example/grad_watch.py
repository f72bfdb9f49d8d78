"""What happens to ``.grad`` outside the engine: a gradient changed between the backward and
the step (clipping by hand, another library's hook, a skipped ``zero_grad``), and the
hooks of others on the parameters' gradients, run between sentinels so that what they
change is seen. A mixin of :class:`~.engine.PerExampleNorms`."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from noisescale.per_example.graph import _order
from noisescale.per_example.pass_checks import _audit_scheduled
from noisescale.per_example.passes import PassNorms


class GradWatch:
    """:class:`~noisescale.per_example.engine.PerExampleNorms`' watch on ``.grad`` between its
    hooks and the step."""

    def _mark_backward(self, pass_: PassNorms) -> None:
        """Once per backward: when it has finished, note each parameter's ``.grad`` and its
        version on the passes it ran through, for :meth:`changed_grads`. The callback queues
        itself once more, so that it runs after the final callbacks queued meanwhile (DDP's
        reducer writes the reduced gradients into ``.grad`` in one)."""
        task = torch._C._current_graph_task_id()
        if task == self._marking[0]:
            self._marking[1].append(pass_)
            return
        self._check_between(task)
        marked: list[PassNorms] = [pass_]
        self._marking = (task, marked)
        queue = torch.autograd.Variable._execution_engine.queue_callback
        queue(lambda: queue(lambda: self._mark_grads(marked)))

    def _check_between(self, task: int) -> None:
        """At the start of a backward, whether ``.grad`` is still what the step's previous
        backward left (:meth:`_mark_grads`): gradients zeroed between the micro-batches of one
        step leave ``.grad`` holding only the last ones' gradient, which the step's norms
        would be paired with as if it were the whole step's (:meth:`collect` refuses)."""
        if task in self._between_checked:
            return  # (once per backward: at its first root or parameter hook)
        self._between_checked.add(task)
        if self._between is None:
            found = self._compare_marks(0, 1.0, emptied=True)
            self._between = None if found is None else found[0]

    def _mark_grads(self, marked: list[PassNorms]) -> None:
        marks = [
            None if (g := p.grad) is None else (weakref.ref(g), g._version) for p in self._params
        ]
        # on the steps audits fall on (1, 2, 4, …: they read values back anyway), in every mode
        # — and on every step where the gradients live in host memory, where reading a value
        # waits for nothing: a clip written with .grad.data that acts on a spike, or a hook
        # rescaling .grad.data, on a step no audit fell on was recorded without a word until
        # 2026-12-06 (|G|² 22–110% off, a hunt; ≈ 1% of the bench's toy ViT step, 0.5 ms)
        checked = (
            any(p.audit is not None for p in marked)
            or (self._audit_due and not any(p.idle for p in marked))
            or (self._grads_on_host() and not any(p.idle for p in marked))
        )
        prints = self._grad_prints() if checked else None
        for pass_ in marked:
            pass_.grad_marks = marks
            pass_.grad_prints = prints
        if self._marking[1] is marked:
            self._marking = (None, [])

    @property
    def check_scheduled(self) -> bool:
        """Whether the step under way is one the audits' schedule falls on (1, 2, 4, …, 1,024,
        then one in 1,024), counted in measured steps: the same on every process of a run,
        whatever its batches (an audit a new structure asks for is not counted)."""
        return _audit_scheduled(self.steps_collected + 1)

    def changed_grads(self, allowed: int = 0, unscaled_by: float = 1.0) -> tuple[str, str] | None:
        """A parameter whose ``.grad`` was changed after the step's last backward pass and
        before this call — clipped, rescaled, weight decay added, replaced by another tensor,
        given to a parameter that had none, or set to ``None`` while others kept theirs — as
        ``(name, "changed")``; ``(name, "not unscaled")`` when ``.grad`` was unscaled for some
        parameters but not this one (a GradScaler's ``unscale_`` called for one optimizer of
        several); else ``None`` (also when every gradient was set to ``None``: the tracker says
        so itself). ``allowed``: in-place operations expected meanwhile (a GradScaler's
        ``unscale_``, where it counts as one); ``unscaled_by``: the loss scale ``.grad`` was
        divided by meanwhile (``unscale_``), else 1. The marks are those of the last pass whose
        backward has finished (a forward whose output was not backpropagated changes nothing).

        Every step, by version counters (no host read). A change through ``.grad.data`` (a
        version counter of its own), an ``unscale_`` the tracker was not told of, or an
        in-place change of a sharded ``DTensor`` gradient (FSDP2) bumps none: on audited steps
        (1, 2, 4, …, which read values back anyway) — and on every step where the gradients
        live on the CPU — each ``|.grad|²`` noted when the backward had finished is compared
        too, so a loop that does one of these on every step is refused at its first."""
        return self._compare_marks(allowed, unscaled_by, emptied=False)

    def _compare_marks(
        self, allowed: int, unscaled_by: float, emptied: bool
    ) -> tuple[str, str] | None:
        """:meth:`changed_grads` and :meth:`_check_between`: ``.grad`` against the marks of
        the step's last pass whose backward has finished — by version (:meth:`_changed_since`),
        then, where the pass noted them, by value (:meth:`_changed_values`)."""
        # (a pass whose backward reached no parameter — a frozen discriminator in a GAN's
        # generator step — or only torch.autograd.grad's — a gradient logged after the last
        # step — changed no .grad, and its marks say nothing of this step's)
        last = next(
            (
                p
                for p in reversed(self.passes)
                if p.grad_marks is not None and p.received and not (p.grad_only and not p.wrote)
            ),
            None,
        )
        if last is None and not emptied:
            return self._assigned_by_hand()
        if last is None or last.grad_marks is None:
            return None
        changed = self._changed_since(last.grad_marks, allowed, emptied)
        if changed is not None:
            return changed, "changed"
        if last.grad_prints is not None:
            return self._changed_values(last.grad_prints, unscaled_by)
        return None

    def _assigned_by_hand(self) -> tuple[str, str] | None:
        """A step whose every backward was ``torch.autograd.grad``'s (no pass wrote ``.grad``)
        while ``.grad`` is set: the loop wrote ``.grad`` itself (PCGrad-style gradient surgery,
        a task weight applied to the gradient, two batches' gradients averaged by hand) —
        ``(name, "assigned")``, the first parameter with a gradient. Until 2026-12-06 nothing
        was compared there: ``p.grad = 2 * g`` read the examples' norms 4× too small, two
        batches' gradients averaged by hand 4× too large, without a word (a hunt). Even
        ``p.grad = g`` exactly is refused: the loss watch reads the kind of a loss (a plain
        sum declared a mean) and its class weights at the step's own backward only, and an
        autograd.grad taken for something else is no such backward (a review)."""
        taken = [p for p in self.passes if p.received and p.grad_only and not p.wrote]
        if not taken or any(p.idle for p in taken):
            return None
        first = next((q for q in self._params if q.grad is not None), None)
        return None if first is None else (self._param_name[id(first)], "assigned")

    def _grads_on_host(self) -> bool:
        """Whether every parameter lives in host memory (the CPU), as a plain tensor (not a
        sharded ``DTensor``): values read back there cost no wait for a device."""
        on_host = getattr(self, "_on_host", None)
        if on_host is None or on_host[0] != len(self._params):
            host = all(p.device.type == "cpu" and not hasattr(p, "to_local") for p in self._params)
            on_host = (len(self._params), host)
            self._on_host = on_host
        return on_host[1]

    def _grad_prints(self) -> list[Tensor | None] | _Prints:
        """Each parameter's |.grad|² (its local shard's, for a ``DTensor``), in float64 (MPS:
        float32): the same computation on the same values gives the same number, so a later
        difference is a change (:meth:`_changed_values`). On the CPU one vector
        (:class:`_Prints`): one fused norm where every gradient is float32 or float64 (its own
        precision is enough at the comparison's 1e-5), else each in float64."""
        grads = [p.grad for p in self._params]
        if self._grads_on_host():  # (plain tensors there: _grads_on_host)
            with torch.no_grad():
                index = [i for i, g in enumerate(grads) if g is not None]
                present = [grads[i] for i in index]
                if not present:
                    return _Prints((), torch.zeros(0, dtype=torch.float64))
                dtype = present[0].dtype
                if all(g.dtype == dtype for g in present) and dtype in _WIDE_ENOUGH:
                    values = torch.stack(torch._foreach_norm(present, 2)).double().square()
                else:
                    values = torch.stack(
                        [torch.linalg.vector_norm(g, dtype=torch.float64).square() for g in present]
                    )
            return _Prints(tuple(index), values)
        out = []
        with torch.no_grad():
            for p in self._params:
                g = p.grad
                if g is None:
                    out.append(None)
                    continue
                g = (g.to_local() if hasattr(g, "to_local") else g).detach()
                dtype = torch.float32 if g.device.type == "mps" else torch.float64  # (no fp64)
                out.append(torch.linalg.vector_norm(g, dtype=dtype).square())
        return out

    def _changed_values(
        self, prints: list[Tensor | None] | _Prints, unscaled_by: float
    ) -> tuple[str, str] | None:
        """The first parameter whose |.grad|² is no longer the one :meth:`_grad_prints` noted
        (divided by ``unscaled_by``²), as ``(name, "changed")`` — or ``(name, "not unscaled")``
        where it is still the one noted, undivided, while ``.grad`` was to be unscaled. Relative
        differences under 1e-5 are taken as rounding (an ``unscale_`` by a scale that is not a
        power of two) and change no estimate. Reads values back: called on audited passes,
        and on every pass where the gradients live on the CPU."""
        now = self._grad_prints()
        if isinstance(prints, _Prints) and isinstance(now, _Prints) and now.index == prints.index:
            pairs = [(i, None, None) for i in prints.index]
            noted, after = prints.values, now.values
            if not pairs:
                return None
        else:
            noted_list, now_list = (
                _listed(prints, len(self._params)),
                _listed(now, len(self._params)),
            )
            pairs = [
                (i, a, b)
                for i, (a, b) in enumerate(zip(noted_list, now_list, strict=True))
                if a is not None and b is not None
            ]
            if not pairs:
                return None
            noted = torch.stack([a.to(pairs[0][1].device) for _, a, _ in pairs])
            after = torch.stack([b.to(noted.device) for _, _, b in pairs])

        on_host = self._grads_on_host()

        def differs(before: Tensor) -> list[bool]:
            # (nan and inf — a step a GradScaler will skip — compare as unchanged)
            over = (after - before).abs() > 1e-5 * torch.maximum(after, before)
            return _differs_on_host(over) if on_host else over.tolist()

        changed = differs(noted / unscaled_by**2)
        kept = differs(noted) if unscaled_by != 1.0 and any(changed) else None
        for n, (i, _, _) in enumerate(pairs):
            if changed[n]:
                how = "not unscaled" if kept is not None and not kept[n] else "changed"
                return self._param_name[id(self._params[i])], how
        return None

    def _changed_since(self, marks: list, allowed: int, emptied: bool) -> str | None:
        """The first parameter whose ``.grad`` is not the tensor its mark noted (replaced, or
        given where there was none), was changed in place more than ``allowed`` times since, or
        was set to ``None`` — when ``emptied`` counts, or while other parameters kept theirs
        (every gradient set to ``None`` is left to the caller's own message)."""
        noted = emptied_now = 0
        first_emptied = None
        for p, mark in zip(self._params, marks, strict=True):
            g = p.grad
            if mark is None:
                if g is not None:  # a gradient given to a parameter the backward gave none
                    return self._param_name[id(p)]
                continue
            noted += 1
            if g is None:
                if emptied:
                    return self._param_name[id(p)]
                emptied_now += 1
                first_emptied = first_emptied or self._param_name[id(p)]
            elif mark[0]() is not g or g._version - mark[1] > allowed:
                return self._param_name[id(p)]
        return first_emptied if 0 < emptied_now < noted else None

    def _guard_param_hooks(self) -> None:
        """Hooks of others on a parameter's gradient (``p.register_hook``: a mask, a clamp, a
        logger) run between two sentinels, and this engine's own hook after them: the first
        sentinel notes the gradient that arrives, the last one whether it is still that tensor,
        unchanged (its version), so a hook that changes it is found on every step, whether it
        was registered before the tracker or after. The per-example norms are computed before
        such a hook and ``.grad`` after it (:meth:`collect` refuses); micro-batch norms, taken
        by our hook, see what ``.grad`` gets. Checked at each measured forward: ~0.3 µs a
        parameter, and nothing more where no other hook is registered."""
        for pid, p in self._param.items():
            self._guard_post_hooks(pid, p)
            hooks = p._backward_hooks
            guarded = self._sentinels.get(pid)
            if hooks is None or len(hooks) == (1 if guarded is None else 3):
                continue
            if guarded is None:
                entry = p.register_hook(lambda g, pid=pid: self._hook_entry(pid, g))
                leave = p.register_hook(lambda g, pid=pid: self._hook_exit(pid, g))
                guarded = self._sentinels[pid] = (entry, leave)
                self._handles += [entry, leave]
            _order(hooks, guarded[0].id, [self._param_hook[pid].id, guarded[1].id])

    def _guard_post_hooks(self, pid: int, p: nn.Parameter) -> None:
        """Hooks run after the gradient's accumulation (``register_post_accumulate_grad_hook``:
        the Trainer callback's, an optimizer run inside the backward) between two sentinels
        too: one that changes ``.grad`` does so before the backward's end, where
        :meth:`changed_grads` takes its marks, and after every norm was taken."""
        hooks = p._post_accumulate_grad_hooks
        guarded = self._post_sentinels.get(pid)
        if not hooks or len(hooks) == (0 if guarded is None else 2):
            return
        if guarded is None:
            entry = p.register_post_accumulate_grad_hook(
                lambda q, pid=pid: self._hook_entry(pid, q.grad, post=True)
            )
            leave = p.register_post_accumulate_grad_hook(
                lambda q, pid=pid: self._hook_exit(pid, q.grad, post=True)
            )
            guarded = self._post_sentinels[pid] = (entry, leave)
            self._handles += [entry, leave]
        _order(hooks, guarded[0].id, [guarded[1].id])

    def _hook_entry(self, pid: int, grad: Tensor | None, post: bool = False) -> None:
        if not (self._paused or self._replaying):
            self._hook_in[pid, post] = (grad, -1 if grad is None else grad._version)

    def _hook_exit(self, pid: int, grad: Tensor | None, post: bool = False) -> None:
        seen = self._hook_in.pop((pid, post), None)
        if seen is not None and (
            seen[0] is not grad or seen[1] != (-1 if grad is None else grad._version)
        ):
            self._hook_changed.append((pid, post))


def _differs_on_host(over: Tensor) -> list[bool]:
    """Read the comparison of gradients held in host memory, where it waits for no device
    (every step there: :meth:`GradWatch._mark_grads`)."""
    return over.tolist()


# dtypes whose own norm is precise enough to compare at 1e-5 (the 16-bit ones are not)
_WIDE_ENOUGH = (torch.float32, torch.float64)


@dataclass(frozen=True)
class _Prints:
    """|.grad|² of the parameters at ``index`` (those with a gradient), one float64 vector:
    :meth:`GradWatch._grad_prints` on the CPU, where per-parameter tensors cost more Python than
    the norms themselves (the bench's toy ViT: 40 tensors)."""

    index: tuple[int, ...]
    values: Tensor


def _listed(prints: list[Tensor | None] | _Prints, n: int) -> list[Tensor | None]:
    """Per-parameter prints from either form."""
    if not isinstance(prints, _Prints):
        return prints
    out: list[Tensor | None] = [None] * n
    for k, i in enumerate(prints.index):
        out[i] = prints.values[k]
    return out
