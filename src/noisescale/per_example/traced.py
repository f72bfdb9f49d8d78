"""The engine under ``torch.compile``: the methods that record, while Dynamo traces the model,
what the eager hooks would see, and that receive the compiled graph's events
(:mod:`~noisescale.per_example.compiled`). A mixin of :class:`~.engine.PerExampleNorms`."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from noisescale.errors import UnsupportedModuleError
from noisescale.module_hooks import InertWhenCopied, foreign_thread, refuse_foreign_forward
from noisescale.per_example import compiled
from noisescale.per_example import subbatch as subbatch_mod
from noisescale.per_example.graph import _autocast_enabled, _flat_size, _sequence_nr
from noisescale.per_example.passes import (
    PassNorms,
    _by_products,
    _Call,
    _plain_weight_grad,
    _product_kind,
    _Record,
    _WeightJob,
)
from noisescale.per_example.registry import save_first_input
from noisescale.per_example.shared import Meeting, Origin, Source
from noisescale.per_example.values import (
    _batch_tensor,
    _first,
    _flat_tensors,
    _flat_values,
    _replace_first,
    _shape_pattern,
    _time_major,
)

if TYPE_CHECKING:
    from noisescale.per_example.engine import PerExampleNorms


class _ModuleHook(InertWhenCopied):
    """The engine's hook on one module (:meth:`PerExampleNorms._hook`): ``eager``, or while
    Dynamo traces it ``traced``. Deep-copied (``copy.deepcopy``: ``AveragedModel``, an EMA, a
    twin) or pickled (``torch.save(model)``) it is inert: the copy is not the model measured
    (:mod:`noisescale.module_hooks`). ``owner``, the layer it was put on: a shallow
    ``copy.copy`` of that layer shares the hook but is a module the engine has no rule for, and
    there the hook does nothing (the model's own hooks have none: a shallow copy of the whole
    model shares its parameters and is the measured model). Before 2026-12-04 the hook was a
    closure: a copy's forward with gradients on failed with a ``KeyError`` inside the engine,
    and ``torch.save(model)`` could not pickle it.

    On a thread other than the engine's (:mod:`noisescale.module_hooks`, "One thread") the
    hook does nothing under ``torch.no_grad()``; with gradients enabled a pre-hook (``post``
    false) refuses the forward there, before the module runs, and a forward hook does nothing
    (torch runs those registered with ``always_call`` after the refusal too)."""

    def __init__(
        self,
        engine: PerExampleNorms,
        eager: Callable,
        traced: Callable | None,
        owner: nn.Module | None,
        opens: bool = False,
        post: bool = False,
    ) -> None:
        self.engine = engine
        self.eager = eager
        self.traced = traced
        self.owner = owner
        self.opens = opens  # the model's own pre-hook, which opens the pass
        self.post = post

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        engine = self.engine
        if foreign_thread(engine.thread):
            if self.post or not torch.is_grad_enabled():
                return None
            if self.owner is not None and args[0] is not self.owner:
                return None  # a copy of the model
            refuse_foreign_forward(engine.thread)
        if torch.compiler.is_compiling():
            if self.traced is not None and (engine.compile_blocker is None or self.opens):
                # (the model's own pre-hook opens the pass also in a graph traced with the
                # blocker: one found by an audit mid-run, which the graph runs' other hooks then
                # report, so that the pass is withheld and the model runs eagerly from then on)
                return self.traced(*args, **kwargs)
            compiled.emit_forward(engine._key, "blocked", 0, [], [])
            return None
        if self.owner is not None and args[0] is not self.owner:
            return None  # a copy of the model
        engine._inside_compiled_call = compiled.in_compiled_call()
        return self.eager(*args, **kwargs)


class Traced:
    """:class:`~noisescale.per_example.engine.PerExampleNorms` under ``torch.compile``: the
    hooks' traced forms and the compiled graph's events.

    While Dynamo traces a compiled model's forward, the hooks take these forms (the design is in
    :mod:`noisescale.per_example.compiled`). They read only what the model's structure and
    shapes decide — never a pass, which changes every step and would make Dynamo recompile —
    and leave the per-pass work to :meth:`on_forward_event`, :meth:`on_backward_event` and
    :meth:`on_weight_grad`, which the compiled graph calls when it runs and which do what the
    eager hooks do."""

    def _why_not_traced(self) -> str | None:
        """What in the model the traced hooks do not follow (``None``: they follow it all)."""
        if not self.per_example:
            return None
        if not compiled.SUPPORTED:
            return (
                "this version of torch cannot keep noisescale's hook operators in a compiled "
                "graph (torch.library custom operators with ordered effects are missing)"
            )
        if not self._replay_allowed:
            return "the model is sharded with FSDP2"
        time_major = sorted(
            self._labels[m]
            for m in self._modules
            if _time_major(m) or isinstance(m, nn.MultiheadAttention)
        )
        if self._model_dim != 0 or time_major:
            return f"layers {time_major} see time-major activations"
        # parameters used directly in their own module's forward are followed (traced scope
        # hooks), except in the top-level model, whose own hooks Dynamo runs outside the trace,
        # and in layers with a rule, which are then also used elsewhere (learned direct uses)
        direct = sorted(
            {
                self._param_name[pid]
                for scope, uses in self._scopes.items()
                for holder, _, pid in uses
                if scope is self.model or holder is self.model or holder in self._calls
            }
        )
        if direct:
            more = f" and {len(direct) - 3} more" if len(direct) > 3 else ""
            return (
                f"parameters {direct[:3]}{more} are used directly in the top-level model's "
                "forward or outside the layer that owns them, which the traced hooks do not "
                "follow"
            )
        for module, (rule, label, _) in self._calls.items():
            if (
                rule.save is not save_first_input
                or rule.outputs is not None
                or rule.batch_dims is not None
                or rule.batch_size is not None
                or rule.native_layout
            ):
                return (
                    f"layer '{label}' ({type(module).__name__}) has a rule with its own inputs, "
                    "outputs or layout (recurrent layers, EmbeddingBag, the torch.func "
                    "fallback), which the traced hooks do not follow"
                )
        return None

    def _update_compile_blocker(self) -> None:
        self.compile_blocker = self._why_not_traced() or self._compile_learned

    def _prepare_compile(self) -> None:
        """Once Dynamo is imported (a compile may follow): the model's own hooks, which Dynamo
        would compile as frames of their own, run eagerly; a model compiled with
        ``model.compile()`` that the traced hooks cannot follow runs eagerly from now on."""
        if "torch._dynamo" not in sys.modules:
            return
        if not self._compile_prepared:
            # Dynamo does not guard on module hooks by default: a graph compiled for another
            # instance of the model's class without hooks (an untracked copy) would run for this
            # one, without the hooks' operators. Graphs compiled from now on check the hooks.
            torch._dynamo.config.skip_nnmodule_hook_guards = False
            self._compile_prepared = True
            # (every module hook's code: _ModuleHook.__call__)
            compiled.skip_frames(_ModuleHook.__call__, recursive=False)
            for eager in self._eager_hooks:
                compiled.skip_frames(eager, recursive=True)
        model = self.model
        if self.compile_blocker is not None and (
            getattr(model, "_compiled_call_impl", None) is not None
            or compiled.is_compile_wrapper(model)
        ):
            self._run_compiled_code_eagerly()

    def _run_compiled_code_eagerly(self) -> None:
        if self._compiled_eagerly:
            return
        self._compiled_eagerly = True
        self._eager_steps.want(True)
        warnings.warn(
            f"noisescale: under torch.compile, {self.compile_blocker}. While the tracker measures "
            "this model, compiled code runs eagerly (torch.compiler.set_stance('force_eager'), "
            "in the whole process, until tracker.remove()): exact, but without the speed of "
            "compilation. Measured inside the compiled graph: layers with a rule (Linear, "
            "convolutions, Embedding, norm layers, Conv1D), and parameters or position tables "
            "added to, multiplied with or expanded over the batch inside a layer; for any model, "
            "per_example=False with gradient accumulation (micro-batch norms)",
            RuntimeWarning,
            stacklevel=3,
        )

    def traced_batch_size(self) -> Any:
        """The batch's size while Dynamo traces the model's forward (``None`` outside one)."""
        t = self._trace_batch
        return None if t is None else t.shape[self._model_dim]

    def _traces(self) -> bool:
        """Whether the traced hooks record the pass being traced: not an unmeasured one
        (``idle``, measure_every), which the model's hook only opens and counts."""
        return self._traces_pass() and not self.idle

    def _traces_pass(self) -> bool:
        return (
            not (self._recomputing or self._paused or self._replaying) and torch.is_grad_enabled()
        )

    def _traced_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._traces_pass():
            return
        tensors = _flat_tensors(args, []) + _flat_tensors(kwargs, [])
        if self.idle:
            # measure_every: an unmeasured step's graph opens its pass (to count its examples)
            # and has no other hook in it. Dynamo guards the graph on ``idle``, which the hooks
            # read while tracing, so measured and unmeasured steps run two graphs; the event
            # says which one this is, checked when it runs (on_forward_event)
            self._trace_batch = None
            compiled.emit_forward(self._key, "open", 1, tensors, [])
            return
        self._trace_batch = _batch_tensor(args, kwargs, self._model_dim)
        compiled.emit_forward(self._key, "open", 0, tensors, [])

    def _traced_model_output(self, module: nn.Module, args: tuple, output: Any) -> Any:
        self._trace_batch = None
        if not self._traces():
            return None
        token = compiled.emit_forward(self._key, "output", 0, [], [])

        def root(t: Any) -> Any:
            if isinstance(t, Tensor) and t.requires_grad:
                return compiled.tap_output(self._key, token, t, ())
            return t

        if isinstance(output, Tensor):
            return root(output)
        if isinstance(output, tuple | list):
            return type(output)(root(v) for v in output)
        if isinstance(output, dict):
            for k, v in list(output.items()):
                output[k] = root(v)
        return None

    def _traced_products(self, module: nn.Module, args: tuple) -> bool:
        """:meth:`_on_weight_enter`'s decision, from what does not change between passes —
        and whether passes are split at all (:meth:`_split`): after a split pass without
        products (a short sequence, a small last batch) they are not, and a graph traced
        before, with products, ran on the unsplit passes after it — refused as a graph break
        that was not, and compiled code run eagerly from then on (a hunt, 2026-12-05). Read
        while tracing, the flag is guarded: a change recompiles."""
        if not (self.subbatches and self.per_example and self._replay_allowed):
            return False
        if self._subbatches_pay is False:
            return False
        rule, _, params = self._calls[module]
        weight = params.get("weight")
        if not _by_products(module, rule) or weight is None:
            return False
        if id(weight) in self._multi_use or module in self._learned_shared:
            return False
        if not self._nothing_between(module):  # (read while tracing: Dynamo guards the hooks)
            return False
        n = self.traced_batch_size()
        x = args[0] if args else None
        if n is None or n < 2 or not isinstance(x, Tensor):
            return False
        if isinstance(x, compiled.CompiledShared) or x.dim() == 0 or x.shape[0] != n:
            return False
        k = min(self.subbatches, n)
        return subbatch_mod.uses_products(module, x, n, -(-n // k))

    def _traced_weight_enter(self, module: nn.Module, args: tuple) -> None:
        if self._traces() and self._traced_products(module, args):
            weight = self._calls[module][2]["weight"]
            bias = self._bias_with_products(module, weight)
            module._parameters["weight"] = weight.detach()  # type: ignore[assignment]
            if bias is not None:
                module._parameters["bias"] = bias.detach()  # type: ignore[assignment]

    def _traced_weight_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._traces() and self._traced_products(module, args):
            params = self._calls[module][2]
            module._parameters["weight"] = params["weight"]
            if "bias" in params:
                module._parameters["bias"] = params["bias"]

    def _traced_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self._traces():
            return None
        params = self._calls[module][2]
        n = self.traced_batch_size()
        if n is None:
            return None
        products = self._traced_products(module, args)
        flat = [v for v in _flat_values(args, kwargs) if isinstance(v, Tensor)]
        x = save_first_input(module, args, kwargs, output)
        shared_input = any(isinstance(v, compiled.CompiledShared) for v in flat)
        sized = _batch_tensor(args, kwargs, 0)
        size = None if sized is None else sized.shape[0]
        if not isinstance(x, Tensor):
            compiled.emit_forward(self._key, "unsupported:a call on a non-tensor", 0, [], [])
            return None
        if (
            not shared_input
            and module not in self._learned_shared
            and _flat_size(self._calls[module][0], module, size, n)
        ):
            # perhaps the examples flattened together with positions, which only the eager
            # hooks can prove (from the input's autograd history) and measure: the pass is
            # withheld and the model runs eagerly while it is measured
            compiled.emit_forward(
                self._key,
                "unsupported:a layer on rows that may be examples flattened together "
                "with positions",
                0,
                [],
                [],
            )
            return None
        if shared_input or size != n or module in self._learned_shared:
            return self._traced_shared_call(module, args, kwargs, output, flat, x)
        out = _first(output)
        if not products and not (isinstance(out, Tensor) and out.requires_grad):
            return None
        site = self._site[module]
        bias = self._bias_with_products(module, params["weight"]) if products else None
        taken = {"weight", "bias"} if bias is not None else {"weight"} if products else set()
        token = compiled.emit_forward(
            self._key, "call", site, flat, [int(products), int(bias is not None)]
        )
        y = out
        if products:
            y = compiled.tap_weight(self._key, site, token, y, x.detach(), params["weight"], bias)
        if any(name not in taken for name in params) and y.requires_grad:
            y = compiled.tap_output(self._key, token, y, (x,))
        return _replace_first(output, y)

    def _traced_shared_call(
        self, module: nn.Module, args: tuple, kwargs: dict, output: Any, flat: list, x: Any
    ) -> Any:
        if not isinstance(output, Tensor) or any(
            isinstance(v, compiled.CompiledShared) for v in flat
        ):
            # a layer on a shared tensor, or one with several outputs: not followed here
            compiled.emit_forward(self._key, "unsupported:a shared call", 0, [], [])
            return None
        site = self._site[module]
        token = compiled.emit_forward(self._key, "shared", site, flat, list(output.shape))
        return compiled.share(output, (self, self._key, token, (x,)))

    def _traced_scope_enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """:meth:`_on_scope_enter` while tracing: the module's parameters, followed as
        :class:`~noisescale.per_example.compiled.CompiledShared` to where they meet the batch."""
        if not self._traces() or self.traced_batch_size() is None:
            return
        for holder, name, pid in self._scopes[module]:
            real = holder._parameters.get(name)
            if real is None or isinstance(real, compiled.CompiledShared):
                continue
            token = compiled.emit_forward(self._key, "param", self._param_index[pid], [], [])
            alias = compiled.share(real, (self, self._key, token, ()))
            holder._parameters[name] = alias  # type: ignore[assignment]

    def _traced_scope_exit(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        for holder, name, pid in self._scopes[module]:
            if isinstance(holder._parameters.get(name), compiled.CompiledShared):
                holder._parameters[name] = self._param[pid]

    def _new_record(self, record: _Record) -> int:
        token = self._next_token
        self._next_token += 1
        self._records[token] = record
        return token

    def on_forward_event(
        self, kind: str, site: int, tensors: Sequence[Tensor], sizes: Sequence[int]
    ) -> int:
        """A traced hook's per-pass work, run by the compiled graph (``noisescale::
        forward_event``); returns the token its backward reports with (0: nothing recorded)."""
        if kind == "open":
            if bool(site) != self.idle:
                self._refuse_graph(traced_idle=bool(site))
            self._open_pass(tuple(tensors), {})
            return 0
        # (not _active(): a compiled forward runs with gradients off; the trace checked them)
        if self._recomputing or self._paused or self._replaying or not self.passes:
            return 0
        pass_ = self.passes[-1]
        pass_.compiled = True
        if not pass_.amp:  # (as _on_forward: autocast entered inside the model's forward)
            pass_.amp = _autocast_enabled()
        if kind == "blocked":  # (also in an unmeasured step's graph: such hooks do not read idle)
            pass_.compiled_blocked = True
            return 0
        if pass_.idle:  # (a block compiled by itself: the model's own hook opened the pass)
            self._refuse_graph(traced_idle=False)
        if kind == "output":
            # (the span's end: the walk of the loss stops inside it; until 2026-12-07 a pass
            # whose model-level hooks ran in the graph had none, and a penalty switched on
            # between audits read 33% off without a word until the next audit)
            pass_.nodes_end = _sequence_nr()
            if self.per_example and not pass_.skipped:
                self._audit_wanted(pass_)
            return self._new_record(_Record("root", pass_))
        if kind.startswith("unsupported:"):
            if pass_.compiled_unsupported is None:
                pass_.compiled_unsupported = kind.partition(":")[2]
            return 0
        if kind == "meet":
            return self._compiled_meeting(pass_, int(tensors[0]), sizes)
        if kind == "param":
            if pass_.skipped:
                return 0
            p = self._params[site]
            pid = id(p)
            pass_.aliased.add(pid)
            meta = torch.empty(p.shape, device="meta")
            source = Source(tensor=meta, pid=pid, label=self._param_name[pid])
            return self._new_record(_Record("param", pass_, source=source))
        module = self._modules[site]
        rule, label, params = self._calls[module]
        if rule.check is not None:
            rule.check(module, label)
        n = pass_.batch_size
        pattern = tuple(_shape_pattern(t, n) for t in tensors)
        if kind == "shared":
            if pass_.skipped:
                return 0
            size = int(tensors[0].shape[0]) if tensors and tensors[0].dim() > 0 else 0
            why = (
                f"its input's leading dimension has the batch's size {n}, but the audit found "
                "its rows are not the examples"
                if module in self._learned_shared
                else f"its input's leading dimension {size} is not the batch's {n} examples"
            )
            call = _Call(module, rule, label, params, 0, [], size=size, why=why)
            operand = torch.empty(tuple(sizes), device="meta")
            source = Source(tensor=operand, call=call, label=label)
            pass_.shared_calls.append(call)
            pass_.signature.append(("shared-call", id(module), pattern))
            return self._new_record(_Record("shared", pass_, call=call, source=source))
        record = _Record("call", pass_)
        if sizes[0]:  # the weight's gradient comes from its sub-batch products
            weight = params["weight"]
            bias = params["bias"] if len(sizes) > 1 and sizes[1] else None  # (and the bias's)
            record.job, params = self._product_job(pass_, module, rule, params, weight, bias)
        token = self._new_record(record)
        if pass_.skipped:
            return token
        if record.job is not None and not params:
            pass_.signature.append(("products", id(module), pattern))
            return token
        record.call = _Call(module, rule, label, params, 0, [None], [0], n)
        for p in params.values():
            pass_.uses[id(p)] = pass_.uses.get(id(p), 0) + 1
        pass_.signature.append(("call" if record.job is None else "products", id(module), pattern))
        return token

    def _refuse_graph(self, traced_idle: bool) -> None:
        """A compiled graph traced for one kind of step (measure_every: measured or not) ran on
        the other — were Dynamo ever to stop guarding its graphs on :attr:`idle`."""
        raise UnsupportedModuleError(
            f"a compiled graph traced for {'an unmeasured' if traced_idle else 'a measured'} "
            f"step ran on {'a measured' if traced_idle else 'an unmeasured'} one "
            "(measure_every): torch.compile did not recompile for the tracker's state, so this "
            "step cannot be measured as asked. Please report it with your torch version; "
            "meanwhile use measure_every=1"
        )

    def _compiled_meeting(self, pass_: PassNorms, call_token: int, shape: Sequence[int]) -> int:
        """:meth:`add_meeting` for a shared call's output broadcast to the batch's ``shape``."""
        shared = self._records.get(call_token)
        if pass_.skipped or shared is None or shared.source is None:
            return 0
        source = shared.source
        origin = Origin(self, pass_, (source,))
        meeting = Meeting("expand", None, origin)
        meeting.box.insert(0, True)  # alive until the backward takes it
        self._expect_slot(pass_, source)
        meeting.extra["routes"] = [("vjp", None, (origin, source.tensor))]
        meeting.extra["dim"] = 0
        n = pass_.batch_size
        hooked = (len(shape), tuple(i for i, s in enumerate(shape) if s == n))
        pass_.signature.append(("meet", "expand", (source.label,), hooked))
        return self._new_record(_Record("meet", pass_, call=shared.call, meeting=meeting))

    def on_backward_event(self, token: int, tensors: Sequence[Tensor]) -> None:
        """A traced hook's backward, run by the compiled backward (``noisescale::
        backward_event``): ``tensors`` are what the hook saved, then the output gradient."""
        record = self._records.get(token)
        if record is None:
            return
        pass_, grad = record.pass_, tensors[-1]
        if record.kind == "root":
            if not (self._replaying or self._paused):
                self._enter(pass_)
        elif record.kind == "call" and record.call is not None:
            call = record.call
            if call.box:  # empty after a first backward through it (retain_graph=True)
                call.box[0] = tensors[0]
            self._on_call_grad(pass_, call, (grad,))
        elif record.kind == "meet" and record.meeting is not None:
            if record.call is not None:  # (a parameter's meeting saves nothing)
                record.call.box[:] = [tensors[0]]  # the shared call's input, for its rule
            self._on_meeting_grad(pass_, record.meeting, grad)

    def on_weight_grad(
        self, site: int, token: int, x: Tensor, d: Tensor, weight: Tensor, bias: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """A weight's (and with ``bias`` the bias's) gradient from its sub-batch products, run
        by the compiled backward (``noisescale::weight_grad``, ``weight_bias_grad``); their
        sub-batch norms are recorded on the way."""
        record = self._records.get(token)
        job = record.job if record is not None else None
        if job is None:  # no pass recorded the call: the plain product
            module = self._modules[site]
            kind = _product_kind(module, self._calls[module][0])
            plain = _WeightJob(None, module, weight, kind, [], bias=bias)  # type: ignore[arg-type]
            return _plain_weight_grad(plain, x, d)
        grad, bias_grad = self._weight_backward(job, x, d)
        if bias is not None and bias_grad is None:
            bias_grad = torch.zeros_like(bias)
        return (grad if grad is not None else torch.zeros_like(weight)), bias_grad
