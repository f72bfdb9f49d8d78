"""The layer-rule registry: how the per-example gradients of one module type are computed.

A *rule* turns what a module's forward saw (its input) and what its backward receives (the gradient
of its output) into one :mod:`factor <noisescale.per_example.factors>` per parameter — an exact,
compact form of every example's gradient of that parameter. Every built-in layer registers itself
here the way a user's layer does (BackPACK's and Opacus's per-layer registries are the model)::

    from noisescale import register_layer
    from noisescale.per_example.factors import DenseFactor

    class HeadwiseLinear(nn.Module):          # y[n, h, :] = x[n, h, :] @ W[h]
        def forward(self, x):
            return torch.einsum("nhd,hde->nhe", x, self.weight)

    @register_layer(HeadwiseLinear)
    def headwise_rule(module, x, grad_output):
        # x: [N, H, D], grad_output: [N, H, E]; example n's gradient of W[h] is x[n, h] ⊗ δ[n, h]
        return {"weight": DenseFactor(torch.einsum("nhd,nhe->nhde", x, grad_output))}

The engine calls the rule in the backward pass, after moving the example dimension to dim 0, with
the rows of a subset already selected. A rule that returns a factor for every trainable parameter
its module owns (keyed by the parameters' names in the module) makes that module exact; the
engine's audit checks, on the first step and whenever the model's structure changes, that the
factors add up to the gradient autograd computed and — for a rule registered outside noisescale —
that they split it among the examples as autograd does (the layer's backward re-run with the
examples weighted), and refuses the step with a message otherwise.

Rules are looked up along the module's class hierarchy; a subclass that overrides ``forward``,
or another method of its base (a convolution's ``_conv_forward``), does not inherit its base's
rule (it may compute something else: :func:`overridden_method`). A rule can also be registered
under a class's qualified name (``"transformers.pytorch_utils.Conv1D"``), so that an optional
library is not imported just to register it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from noisescale.per_example.factors import Factor

__all__ = ["LayerRule", "register_layer", "rule_for", "supported_layers", "unregister_layer"]

Factors = Callable[[nn.Module, Any, Any], dict[str, Factor]]


def save_first_input(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    """The default ``save``: the module's first positional argument."""
    return args[0] if args else next(iter(kwargs.values()))


@dataclass(frozen=True)
class LayerRule:
    """How per-example gradient factors of one module type are computed.

    Attributes:
        factors: ``factors(module, saved, grad_output) -> {param name: Factor}``. ``saved`` is
            what ``save`` returned, ``grad_output`` the gradient of the module's output (a tuple
            of gradients, ``None`` for outputs that received none, when ``outputs`` names
            several), both with the examples in dim 0. Parameters that do not require a
            gradient may be left out.
        save: ``save(module, args, kwargs, output)``: what the backward needs (default: the
            first input). Keep it small: it lives until the module's backward runs.
        check: ``check(module, name)`` raises :class:`~noisescale.errors.UnsupportedModuleError`
            for configurations the rule cannot handle; called when the engine is built and on
            every forward call (e.g. a BatchNorm switched to training mode).
        params: Names of the parameters the rule computes (``None``: all the module's own). A
            module of this type that owns other trainable parameters is refused when the engine
            is built.
        outputs: ``outputs(module, output) -> [tensor, ...]``: the output tensors whose gradients
            the rule needs (default: the output, or its first element for tuples).
        batch_dims: ``batch_dims(module) -> (input dim, [output dims])``: where the examples are
            (default: dim 0 everywhere). Used by rules for time-major layers.
        batch_size: ``batch_size(module, args, kwargs) -> int``: examples in this call (default:
            the size of the input's example dimension).
        native_layout: The rule handles its own layout (``saved`` and the gradients are passed
            as the module saw them, not moved to the example dimension); rows of a subset are
            then selected by ``select``.
        select: ``select(module, saved, rows) -> saved``: the saved state restricted to the
            examples ``rows`` (needed with ``native_layout``).
        shared_rows: ``shared_rows(module, saved) -> bool``: whether dim 0 of ``saved`` holds
            independent rows — a batch, as a convolution's or a GroupNorm's input always has.
            A call on input shared by every example (a positional encoding computed once and
            broadcast to the batch) is then measured as each example making the call on all m
            of those rows: the factors of its k·m rows, summed per example. ``None`` (default):
            each example is given the shared input whole, as a Linear's or LayerNorm's rule
            takes it (leading dimensions are positions).
        flattened: ``flattened(module) -> bool``: whether the rule treats every dimension
            between the examples and the features alike (a Linear's, a LayerNorm's). A call
            whose input has k rows per example, the examples flattened together with positions
            (``x.reshape(-1, D)`` of a batch-first [N, T, D]: OPT's feed-forward block, Swin's
            windows), is then measured as [N, k, …], rows taken as each example's k in turn —
            when the input's autograd history shows that flattening, never for rows selected
            by the data (a router's); the audit checks the order, and a layer whose rows are
            not each example's in turn is treated as shared from the next step on. ``None``
            (default): such a call is treated as shared.
        unbatched: ``unbatched(module, x) -> bool``: whether ``x``, the module's first input,
            is one the module takes without a batch dimension (a Linear's 1-D input, a
            convolution's [C, L]): it holds no example whatever its leading size, and the call
            is measured as shared. ``None`` (default): an input with the example dimension's
            index is taken as batched.
        name: A label for messages.
    """

    factors: Factors
    save: Callable[[nn.Module, tuple, dict[str, Any], Any], Any] = save_first_input
    check: Callable[[nn.Module, str], None] | None = None
    params: tuple[str, ...] | None = ("weight", "bias")
    outputs: Callable[[nn.Module, Any], Sequence[Tensor]] | None = None
    batch_dims: Callable[[nn.Module], tuple[int, Sequence[int]]] | None = None
    batch_size: Callable[[nn.Module, tuple, dict[str, Any]], int] | None = None
    native_layout: bool = False
    select: Callable[[nn.Module, Any, Tensor], Any] | None = None
    shared_rows: Callable[[nn.Module, Any], bool] | None = None
    flattened: Callable[[nn.Module], bool] | None = None
    unbatched: Callable[[nn.Module, Tensor], bool] | None = None
    name: str = field(default="", compare=False)


_RULES: dict[type | str, LayerRule] = {}


def _key(module_type: type | str) -> type | str:
    if isinstance(module_type, str):
        return module_type
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_layer expects an nn.Module subclass, got {module_type!r}")
    return module_type


def register_layer(
    module_type: type[nn.Module] | str,
    rule: LayerRule | Factors | None = None,
    **options: Any,
) -> Any:
    """Register the per-example gradient rule of a module type (the public extension point).

    Three forms::

        register_layer(MyLayer, my_factors)                      # a factors function
        register_layer(MyLayer, LayerRule(my_factors, save=...))  # a full rule
        @register_layer(MyLayer)                                  # as a decorator
        def my_factors(module, x, grad_output): ...

    Args:
        module_type: The ``nn.Module`` subclass, or its qualified name
            ``"package.module.ClassName"`` (matched without importing the package).
        rule: A :class:`LayerRule`, or a factors function (then ``options`` are the other
            :class:`LayerRule` fields).
        **options: :class:`LayerRule` fields when ``rule`` is a function or the decorator form.

    Returns:
        The decorated function (decorator form) or the registered :class:`LayerRule`.

    A registration replaces an earlier one for the same type (built-in rules included).
    """
    key = _key(module_type)
    label = key if isinstance(key, str) else key.__name__

    def add(fn: LayerRule | Factors) -> LayerRule:
        made = fn if isinstance(fn, LayerRule) else LayerRule(fn, **options, name=label)
        if isinstance(fn, LayerRule) and options:
            raise TypeError("give either a LayerRule or a factors function with options")
        _RULES[key] = made
        if isinstance(key, type):
            _FORWARDS[key] = key.__dict__.get("forward", getattr(key, "forward", None))
            _METHODS[key] = {name: inspect.getattr_static(key, name) for name in _methods(key)}
        return made

    if rule is None:

        def decorator(fn: Factors) -> Factors:
            add(fn)
            return fn

        return decorator
    return add(rule)


def unregister_layer(module_type: type[nn.Module] | str) -> None:
    """Remove the rule registered for ``module_type`` (no error if there is none)."""
    _RULES.pop(_key(module_type), None)


# each rule's class's forward when the rule was registered (for classes given as types):
# a forward patched on the class since — a monkeypatch of nn.Linear.forward — is not the one
# the rule was written for (registered_forward)
_FORWARDS: dict[type, Any] = {}
# the same for each of its other methods (_methods): one patched on the class since — a
# monkeypatch of nn.Conv2d._conv_forward — may change what the forward computes
_METHODS: dict[type, dict[str, Any]] = {}


def registered_forward(module: nn.Module) -> Any:
    """The forward that ``module``'s rule was written for — its rule class's own when the rule
    was registered — or ``None`` when not known (a rule registered by name)."""
    for cls in type(module).__mro__:
        if cls is nn.Module:
            return None
        if cls in _FORWARDS:
            return _FORWARDS[cls]
        if _RULES.get(cls) is not None or _RULES.get(_qualname(cls)) is not None:
            return None
    return None


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule for this module, or ``None`` when its type has none, or when it overrides a
    method of the rule's class (:func:`overridden_method`)."""
    found = rule_class(module)
    if found is None or overridden_method(module) is not None:
        return None
    return found[1]


def rule_class(module: nn.Module) -> tuple[type, LayerRule] | None:
    """The nearest class of ``module``'s hierarchy with a registered rule, and that rule."""
    for cls in type(module).__mro__:
        if cls is nn.Module:
            return None
        rule = _RULES.get(cls) or _RULES.get(_qualname(cls))
        if rule is not None:
            return cls, rule
    return None


# methods of a rule's class that no forward relies on: a subclass may override them (_apply,
# run by .to() and .cuda(), is FSDP2's too: fully_shard mixes FSDPModule into a layer's class)
_HARMLESS = frozenset(
    {"reset_parameters", "reset_running_stats", "extra_repr", "_load_from_state_dict", "_apply",
     "from_pretrained"}  # (nn.Embedding's classmethod constructor: a review of 2026-12-06)
)  # fmt: skip


def _methods(cls: type) -> set[str]:
    """The non-dunder methods (and properties) ``cls`` and its bases below ``nn.Module``
    define, less :data:`_HARMLESS`."""
    names = set()
    for base in cls.__mro__:
        if base is nn.Module:
            break
        names.update(
            name
            for name, value in vars(base).items()
            if not name.startswith("__")
            and (
                inspect.isfunction(value)
                or isinstance(value, property | classmethod | staticmethod)
            )
        )
    return names - _HARMLESS


def overridden_method(module: nn.Module) -> str | None:
    """What in ``module`` overrides a method of its rule's class, or ``None``: a method the
    rule's forward may rely on (a convolution's ``_conv_forward``, which a weight
    standardisation or a causal padding overrides; its ``forward``), redefined by a class
    between the module's and the rule's, set on the instance, or replaced on the rule's class
    since the rule was registered (``forward`` set on the instance or replaced on the class is
    not: accelerate's device hooks set it, and the engine checks what such a forward
    changed). The rule was written for what the rule's class computes; any method but a
    harmless few (:data:`_HARMLESS`) may change that."""
    found = rule_class(module)
    if found is None:
        return None
    cls = found[0]
    methods = _methods(cls)
    for sub in type(module).__mro__:
        if sub is cls:
            break
        names = sorted(methods.intersection(vars(sub)))
        if names:
            return f"{sub.__name__}.{names[0]}"
    names = sorted(methods.intersection(vars(module)) - {"forward"})
    if names:
        return f"{names[0]} set on the instance"
    registered = _METHODS.get(cls, {})
    names = sorted(
        name
        for name in methods - {"forward"}
        if name in registered and inspect.getattr_static(cls, name, None) is not registered[name]
    )
    return f"{cls.__name__}.{names[0]} replaced on the class" if names else None


def users_rule(rule: LayerRule) -> bool:
    """Whether ``rule`` was written outside noisescale (its factors function's module): the
    audit checks such a rule's split of the gradient among the examples, which noisescale's
    own rules are tested for."""
    return not getattr(rule.factors, "__module__", "").startswith("noisescale.")


def supported_layers() -> list[str]:
    """Names of the module types with a registered rule."""
    return sorted(k if isinstance(k, str) else k.__name__ for k in _RULES)
