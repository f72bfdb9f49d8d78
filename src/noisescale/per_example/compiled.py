"""The engine under ``torch.compile``: its hooks as operations of the compiled graph.

Dynamo traces module hooks into the graph it compiles. The engine's eager hooks do what a graph
cannot hold — they keep Python state per pass, register tensor hooks on intermediate activations,
draw random sub-batches — so each of them used to split the model's graph (19–21 breaks on a
two-layer GPT). While Dynamo traces, the engine's hooks therefore take a second form, built from
the pieces here:

* what a hook *decides* from the model's structure and shapes (is this call per-example or shared
  by every example? do its weight's sub-batch products pay off?) is decided while tracing — the
  same decision for every run of the compiled graph, guarded by Dynamo like any shape;
* what a hook *does* per pass (open it, count the uses of each parameter, record the pass's
  structure) runs when the graph runs, inside the custom operator ``noisescale::forward_event``,
  which the graph calls in the hook's place and which returns a *token* naming what it recorded;
* what a backward hook *receives* (a layer's output gradient) reaches the engine through an
  identity ``autograd.Function`` on the layer's output (:func:`tap_output`), whose backward hands
  the gradient, the tensors the layer's rule saved and the token to ``noisescale::backward_event``;
  its backward is traced into the compiled backward like any other;
* a weight whose gradient sub-batch mode computes itself, as k products, gets it from
  ``noisescale::weight_grad`` (:func:`tap_weight`);
* a shared call's output (``wpe(arange(T))``) and a parameter its module uses directly (a norm's
  ``weight * x``, a class token's ``expand``) are followed, while tracing, by
  :class:`CompiledShared` to the operation that broadcasts them over the batch, where the same
  identity function collects each example's gradient.

The three operators are registered as *ordered effects*: the compiler keeps them and their order
(an operator without outputs would otherwise be dropped as dead code). The engine then computes
the per-example norms eagerly, on real tensors, with the code it runs without compile — the
numbers are the same.

What stays eager: audited passes (step 1, 2, 4, …; :mod:`~noisescale.per_example.audit` replays
the backward on the eager autograd graph) run with ``torch.compiler.set_stance("force_eager")``
for the duration of their step (:class:`EagerSteps`). A model whose structure the traced hooks
do not follow (:attr:`PerExampleNorms.compile_blocker`: parameters used directly in the
top-level model's forward or outside their layer, time-major layers, rules with their own
layout, the torch.func fallback), or in which a compiled pass meets an operation they do not
follow (a shared tensor transformed before it meets the batch: T5's relative position bias),
runs eagerly while it is measured, and the engine says so once, naming the cause. Its eager
hooks are not run inside the graph behind graph breaks: the shared aliases of its parameters
would enter the compiled graph, which Dynamo cannot trace (a RecursionError, torch 2.13).
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from noisescale.per_example.shared import flatten

if TYPE_CHECKING:
    from noisescale.per_example.engine import PerExampleNorms

__all__ = [
    "SUPPORTED",
    "CompiledShared",
    "EagerSteps",
    "emit_forward",
    "in_compiled_call",
    "register",
    "skip_frames",
    "tap_output",
    "tap_weight",
]

# engines by key: the compiled graph names its engine with an integer constant
_ENGINES: weakref.WeakValueDictionary[int, PerExampleNorms] = weakref.WeakValueDictionary()
_NEXT_KEY = [1]


def register(engine: PerExampleNorms) -> int:
    """The key that names ``engine`` in compiled graphs (kept only as long as the engine)."""
    key = _NEXT_KEY[0]
    _NEXT_KEY[0] += 1
    _ENGINES[key] = engine
    return key


def _engine(key: int) -> PerExampleNorms | None:
    return _ENGINES.get(key)


def _token(value: int) -> Tensor:
    # on the host: reading it in the backward never waits for a device
    return torch.tensor(value, dtype=torch.int64)


# -- the operators --------------------------------------------------------------------------------


@torch.library.custom_op("noisescale::forward_event", mutates_args=())
def _forward_event(
    engine: int, kind: str, site: int, tensors: list[Tensor], sizes: list[int]
) -> Tensor:
    """A hook's per-pass work, at run time: ``PerExampleNorms.on_forward_event``."""
    found = _engine(engine)
    return _token(found.on_forward_event(kind, site, tensors, sizes) if found is not None else 0)


@_forward_event.register_fake
def _(engine: int, kind: str, site: int, tensors: list[Tensor], sizes: list[int]) -> Tensor:
    return torch.empty((), dtype=torch.int64)


@torch.library.custom_op("noisescale::backward_event", mutates_args=())
def _backward_event(engine: int, token: Tensor, tensors: list[Tensor]) -> None:
    """A backward hook's work, at run time: ``PerExampleNorms.on_backward_event``."""
    found = _engine(engine)
    if found is not None:
        found.on_backward_event(int(token), tensors)


@_backward_event.register_fake
def _(engine: int, token: Tensor, tensors: list[Tensor]) -> None:
    return None


@torch.library.custom_op("noisescale::weight_grad", mutates_args=())
def _weight_grad(
    engine: int, site: int, token: Tensor, x: Tensor, d: Tensor, weight: Tensor
) -> Tensor:
    """A weight's gradient from its sub-batch products: ``PerExampleNorms.on_weight_grad``."""
    found = _engine(engine)
    if found is None:
        raise RuntimeError("noisescale: the engine of a compiled graph was garbage-collected")
    grad, _ = found.on_weight_grad(site, int(token), x, d, weight, None)
    return _as_promised(grad, weight)


@_weight_grad.register_fake
def _(engine: int, site: int, token: Tensor, x: Tensor, d: Tensor, weight: Tensor) -> Tensor:
    return torch.empty_like(weight)


@torch.library.custom_op("noisescale::weight_bias_grad", mutates_args=())
def _weight_bias_grad(
    engine: int, site: int, token: Tensor, x: Tensor, d: Tensor, weight: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor]:
    """``noisescale::weight_grad`` for a layer whose bias's gradient comes with its weight's."""
    found = _engine(engine)
    if found is None:
        raise RuntimeError("noisescale: the engine of a compiled graph was garbage-collected")
    grad, bias_grad = found.on_weight_grad(site, int(token), x, d, weight, bias)
    assert bias_grad is not None
    return _as_promised(grad, weight), _as_promised(bias_grad, bias)


@_weight_bias_grad.register_fake
def _(
    engine: int, site: int, token: Tensor, x: Tensor, d: Tensor, weight: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(weight), torch.empty_like(bias)


def _as_promised(grad: Tensor, like: Tensor) -> Tensor:
    """Exactly the layout the compiler was promised (the fakes): a fresh tensor like ``like``."""
    if grad.dtype != like.dtype or grad.stride() != like.stride():
        grad = torch.empty_like(like).copy_(grad)
    return grad


def _register_effects() -> bool:
    try:
        from torch._library.effects import EffectType
    except ImportError:
        return False
    for op in (_forward_event, _backward_event, _weight_grad, _weight_bias_grad):
        register_effect = getattr(op, "register_effect", None)
        if register_effect is None:
            return False
        register_effect(EffectType.ORDERED)
    return True


SUPPORTED = _register_effects()
"""Whether this torch can keep the hooks' operators in a compiled graph (ordered effects)."""


def emit_forward(
    engine: int, kind: str, site: int, tensors: Sequence[Tensor], sizes: Sequence[Any]
) -> Tensor:
    """Call ``noisescale::forward_event`` from traced code; returns its token. Not inside an
    activation checkpoint that would hold the graph's first event (:func:`_checkpoint_first`):
    there the token is 0, which the engine ignores."""
    if _checkpoint_first(engine):
        return torch.zeros((), dtype=torch.int64)
    with torch._C.DisableTorchFunctionSubclass():
        return _forward_event(engine, kind, site, list(tensors), list(sizes))


def _checkpoint_first(engine: int) -> bool:
    """While Dynamo traces (run then, its answer a constant of the graph): whether an event
    emitted now lies inside ``checkpoint(use_reentrant=False)`` with no event before it in the
    graph. AOT autograd recomputes such a region's ordered effects in the backward, which then
    needs the graph's input effect token — ``None`` at run time: "expected all
    tensors_saved_with_vc_check to be Tensors", raised from the compiled forward (torch 2.13,
    ``aot_eager`` and inductor; a precision fuzzer's seed 163). The graph is traced without the
    region's events, and the engine told (``checkpoint_first``): it withholds the pass and runs
    compiled code eagerly from the next step on. ``False`` without the private API."""
    if not torch.compiler.is_compiling():
        return False
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tracer = InstructionTranslator.current_tx().output.current_tracer
    except (ImportError, AttributeError, AssertionError):
        return False
    inside = False
    while getattr(tracer, "parent", None) is not None:
        inside = inside or "checkpoint" in str(getattr(tracer, "source_target", ""))
        tracer = tracer.parent
    if not inside or any(_is_event(node.target) for node in tracer.graph.nodes):
        # (an event before the region: its token, an intermediate, is saved for the backward)
        return False
    found = _engine(engine)
    if found is not None:
        found.checkpoint_first = True
    return True


# (torch.compiler.assume_constant_result, which would import Dynamo with noisescale)
_checkpoint_first._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _is_event(target: Any) -> bool:
    return str(target).startswith("noisescale.")  # (torch.ops.noisescale.*: our operators)


# -- the identity functions whose backward reports ------------------------------------------------


class _OutputTap(torch.autograd.Function):
    """Identity on a layer's output; its backward reports the output gradient. The output is
    returned as itself, marked dirty (as :class:`~noisescale.per_example.subbatch.WeightBySubbatch`
    does), so in-place operations on it stay allowed."""

    @staticmethod
    def forward(ctx: Any, engine: int, token: Tensor, y: Tensor, *saved: Tensor) -> Tensor:
        ctx.engine = engine
        ctx.save_for_backward(token, *saved)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx: Any, d: Tensor) -> tuple[Tensor | None, ...]:
        token, *saved = ctx.saved_tensors
        _backward_event(ctx.engine, token, [*saved, d])
        return (None, None, d, *([None] * len(saved)))


class _ViewTap(torch.autograd.Function):
    """:class:`_OutputTap` for a tensor the forward uses once, right away (a shared operand
    expanded over the batch, a model output): a view, which needs no ``mark_dirty``."""

    @staticmethod
    def forward(ctx: Any, engine: int, token: Tensor, y: Tensor, *saved: Tensor) -> Tensor:
        ctx.engine = engine
        ctx.save_for_backward(token, *saved)
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, d: Tensor) -> tuple[Tensor | None, ...]:
        token, *saved = ctx.saved_tensors
        _backward_event(ctx.engine, token, [*saved, d])
        return (None, None, d, *([None] * len(saved)))


class _WeightTap(torch.autograd.Function):
    """Identity on the output of a layer that ran on a detached weight (and bias); its backward
    returns the weight's (and the bias's) gradient, computed by the engine as sub-batch
    products."""

    @staticmethod
    def forward(
        ctx: Any,
        engine: int,
        site: int,
        token: Tensor,
        y: Tensor,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
    ) -> Tensor:
        ctx.engine, ctx.site, ctx.has_bias = engine, site, bias is not None
        ctx.save_for_backward(token, x, weight, *(() if bias is None else (bias,)))
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx: Any, d: Tensor) -> tuple[Tensor | None, ...]:
        if not ctx.has_bias:
            token, x, weight = ctx.saved_tensors
            grad = _weight_grad(ctx.engine, ctx.site, token, x, d, weight)
            return None, None, None, d, None, grad, None
        token, x, weight, bias = ctx.saved_tensors
        grad, bias_grad = _weight_bias_grad(ctx.engine, ctx.site, token, x, d, weight, bias)
        return None, None, None, d, None, grad, bias_grad


def tap_output(engine: int, token: Tensor, y: Tensor, saved: Sequence[Tensor]) -> Tensor:
    """``y`` itself; the backward reports ``(*saved, ∂L/∂y)`` with ``token``."""
    with torch._C.DisableTorchFunctionSubclass():
        return _OutputTap.apply(engine, token, y, *saved)


def tap_view(engine: int, token: Tensor, y: Tensor, saved: Sequence[Tensor]) -> Tensor:
    """A view of ``y``; the backward reports ``(*saved, ∂L/∂y)`` with ``token``."""
    with torch._C.DisableTorchFunctionSubclass():
        return _ViewTap.apply(engine, token, y, *saved)


def tap_weight(
    engine: int,
    site: int,
    token: Tensor,
    y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
) -> Tensor:
    """``y`` itself; the backward gives ``weight`` (and ``bias``) the gradient the engine
    computes from the layer's input ``x`` and output gradient."""
    with torch._C.DisableTorchFunctionSubclass():
        return _WeightTap.apply(engine, site, token, y, x, weight, bias)


# -- shared calls -------------------------------------------------------------------------------


_ELEMENTWISE_NAMES = frozenset(
    {
        "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "where",
        "addcmul", "addcdiv", "lerp", "maximum", "minimum", "rsub", "__add__", "__radd__",
        "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
        "__truediv__", "__rtruediv__", "__itruediv__", "multiply", "subtract", "divide",
    }
)  # fmt: skip
_EXPAND_NAMES = frozenset({"expand", "expand_as", "broadcast_to"})
# operations that hand back the same values (and gradients): the tensor stays the shared one
_SAME_NAMES = frozenset({"to", "type_as", "contiguous"})


class CompiledShared(Tensor):
    """A shared call's output or a parameter used directly, while Dynamo traces (only then: the
    compiled graph holds plain tensors): followed to the elementwise operation or ``expand``
    that broadcasts it over the batch, which then collects each example's gradient of it — the
    traced counterpart of :class:`~noisescale.per_example.shared.SharedTensor` for its common
    cases (a position table added to the batch, a norm's weight, a class token). Operations that
    keep its values (``.to`` the same dtype, ``.contiguous()``) keep following it; any other is
    reported to the engine (``"unsupported:<op>"``), which withholds the pass and runs compiled
    code eagerly from the next step on.

    ``_ns_compiled`` holds (engine, engine key, the token of its source, the source call's saved
    input — empty for a parameter).
    """

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        flat: list[Any] = []
        flatten((args, kwargs), flat)
        shared = [t for t in flat if isinstance(t, CompiledShared)]
        with torch._C.DisableTorchFunctionSubclass():
            if not shared:
                return func(*args, **kwargs)
            info = shared[0]._ns_compiled
            engine, key = info[0], info[1]
            n = engine.traced_batch_size()
            name = getattr(func, "__name__", "")
            batched = [
                t for t in flat if isinstance(t, Tensor) and not isinstance(t, CompiledShared)
            ]
            batched = [t for t in batched if t.dim() > 0 and t.shape[0] == n]
            if name in _ELEMENTWISE_NAMES and batched and n is not None:
                shapes = [tuple(t.shape) for t in flat if isinstance(t, Tensor)]
                out_shape = tuple(torch.broadcast_shapes(*shapes))
                if len(out_shape) > 0 and out_shape[0] == n:

                    def meet(v: Any) -> Any:
                        return _meet(v, out_shape) if isinstance(v, CompiledShared) else v

                    return func(*_map(args, meet), **_map(kwargs, meet))
            result = func(*args, **kwargs)
            if not isinstance(result, Tensor):
                return result  # a size, a dtype, …
            src = args[0] if args else None
            if (
                name in _EXPAND_NAMES
                and isinstance(src, CompiledShared)
                and n is not None
                and result.dim() > 0
                and result.shape[0] == n
                and _broadcast_along_0(tuple(src.shape), tuple(result.shape))
            ):
                return _meet(src, tuple(result.shape), expanded=result)
            if (
                name in _SAME_NAMES
                and isinstance(src, CompiledShared)
                and result.dtype == src.dtype
                and result.device == src.device
                and result.shape == src.shape
            ):
                return share(result, info)
            emit_forward(key, f"unsupported:{name}", 0, [], [])
            return result


def _broadcast_along_0(src: tuple[int, ...], out: tuple[int, ...]) -> bool:
    lead = len(out) - len(src)
    return lead > 0 or src[0] == 1


def _meet(shared: CompiledShared, shape: tuple[int, ...], expanded: Tensor | None = None) -> Tensor:
    """``shared`` expanded to the batch's ``shape``; each example's gradient of it is reported."""
    _, key, call_token, saved = shared._ns_compiled
    if expanded is None:
        expanded = shared.expand(shape)
    token = emit_forward(key, "meet", 0, [call_token], list(shape))
    return tap_view(key, token, expanded, saved)


def share(output: Tensor, info: tuple) -> CompiledShared:
    """``output`` followed as a shared call's output (while tracing)."""
    with torch._C.DisableTorchFunctionSubclass():
        s = output.as_subclass(CompiledShared)
    s._ns_compiled = info  # type: ignore[attr-defined]
    return s


def _map(value: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(value, list):
        return [_map(v, fn) for v in value]
    if isinstance(value, tuple):
        return tuple(_map(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return fn(value)


def is_compile_wrapper(module: Any) -> bool:
    """Whether ``module`` is ``torch.compile``'s wrapper of a module (an ``OptimizedModule``)."""
    if "torch._dynamo" not in sys.modules:
        return False
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(module, OptimizedModule)


# -- hooks that run outside the graph ----------------------------------------------------------


def skip_frames(fn: Callable, *, recursive: bool) -> None:
    """Run ``fn`` eagerly when Dynamo would compile it as a frame of its own.

    A model's *own* hooks are called by ``nn.Module._call_impl``, which Dynamo does not trace:
    under ``torch.compile(model)`` and ``model.compile()`` it compiles each such hook as a
    separate frame, which gains nothing here; run eagerly, the engine's top-level hooks register
    ordinary tensor hooks on the model's real output. A hook inlined into a traced caller (a
    wrapper module compiled as a whole) takes its traced form as before. ``recursive``: the
    functions ``fn`` calls run eagerly as well (the hooks' eager bodies); otherwise Dynamo still
    sees them, and :func:`in_compiled_call` can tell that the call is compiled (the thin hook
    that dispatches). Without the private API this needs, the hook frames are compiled, which
    works too.
    """
    try:
        from torch._C._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:
        return
    callees = FrameAction.SKIP if recursive else FrameAction.DEFAULT
    try:
        set_code_exec_strategy(fn.__code__, FrameExecStrategy(FrameAction.SKIP, callees))
    except (RuntimeError, TypeError, AttributeError):
        return


def in_compiled_call() -> bool:
    """Whether this eager code runs inside a compiled call (a model's own hook, which Dynamo runs
    as a frame of its own, :func:`skip_frames`): what it hands the forward enters the graph."""
    if "torch._dynamo" not in sys.modules:
        return False
    if not _CALLBACK:
        try:
            from torch._C._dynamo.eval_frame import get_eval_frame_callback
        except ImportError:
            return False
        _CALLBACK.append(get_eval_frame_callback)
    return _CALLBACK[0]() not in (None, False)


_CALLBACK: list[Callable[[], Any]] = []


# -- audited steps run eagerly ------------------------------------------------------------------

_HOLDING: set[int] = set()  # engine keys that want their next step eager
_RESTORE: list[Any] = []  # the set_stance object whose exit restores the user's stance


class EagerSteps:
    """Compiled code runs eagerly while the engine needs an eager step (an audited step).

    An audit replays the backward on the eager autograd graph and compares what each hook saw;
    inside a compiled graph there is neither. ``want(True)`` before such a step sets the compiler
    stance to ``"force_eager"`` (every compiled function, process-wide) until ``want(False)``
    after it; engines that want it at the same time share one stance change, and the stance the
    user had is restored. Without Dynamo imported nothing was compiled and nothing is done.
    """

    def __init__(self, key: int) -> None:
        self.key = key
        weakref.finalize(self, _release, key)

    def want(self, eager: bool) -> None:
        if eager:
            _hold(self.key)
        else:
            _release(self.key)

    @property
    def forced(self) -> bool:
        return self.key in _HOLDING


def _hold(key: int) -> None:
    if key in _HOLDING or "torch._dynamo" not in sys.modules:
        return
    if not _HOLDING:
        try:
            _RESTORE.append(torch.compiler.set_stance("force_eager"))
        except RuntimeError as err:  # called inside a compiled region (tracker.step() compiled)
            warnings.warn(
                f"noisescale: could not run the next (audited) step eagerly ({err}); call "
                "tracker.step() outside compiled code",
                RuntimeWarning,
                stacklevel=4,
            )
            return
    _HOLDING.add(key)


def _release(key: int) -> None:
    if key not in _HOLDING:
        return
    _HOLDING.discard(key)
    if not _HOLDING and _RESTORE:
        try:
            _RESTORE[-1].__exit__(None, None, None)
        except RuntimeError:  # inside a compiled region: the next want() restores it
            _HOLDING.add(key)
            return
        _RESTORE.pop()
