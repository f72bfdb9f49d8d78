"""The torch.func fallback: modules whose parameters meet the batch in an operation without a rule.

Most parameters used directly in a forward are handled exactly and cheaply by following them as
shared tensors (:mod:`~noisescale.per_example.shared`). When a module's parameter meets the batch
in an operation that has no per-example rule (``einsum``, ``bmm``, a custom autograd function…),
the engine measures that module with this fallback from the next step on:

* a deterministic module is re-run per example under ``torch.func.vmap`` with a vector–Jacobian
  product against its output gradient (exact per-example gradients of its own parameters; it costs
  a second forward of that module and materialises its per-example gradients);
* a module that drew random numbers in its forward (dropout) is re-run once on the whole batch with
  the random generators restored to their state before the call, so it draws the same masks, and
  each example's gradient is a vector–Jacobian product with the output gradient restricted to that
  example (batched over the examples, ``is_grads_batched``).

The forward's autocast state (bfloat16/float16) is replayed in both cases. Assumptions: dim 0 of
every tensor argument and of the output is the example dimension, and only the module's main
output carries the gradient — a tensor, the first element of a tuple or list, the first tensor of
a dict or a ``transformers`` ``ModelOutput`` (a submodule's ``logits``) — other outputs that
receive one are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from noisescale.errors import UnsupportedModuleError
from noisescale.per_example.factors import DenseFactor, Factor
from noisescale.per_example.registry import LayerRule

if TYPE_CHECKING:
    from noisescale.per_example.engine import PerExampleNorms


def fallback_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters the fallback is responsible for: the module's own."""
    out = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    if isinstance(module, nn.MultiheadAttention):
        out.update(
            {f"out_proj.{n}": p for n, p in module.out_proj.named_parameters() if p.requires_grad}
        )
    return out


def check(module: nn.Module, name: str) -> None:
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        raise UnsupportedModuleError(
            f"module '{name}' (nn.MultiheadAttention with batch_first=False) would need the "
            "torch.func fallback, which takes dim 0 as the example dimension; construct it with "
            "batch_first=True or use per_example=False"
        )


@dataclass
class Saved:
    """What the forward hook keeps for the fallback: the call's arguments and its context."""

    args: tuple
    kwargs: dict[str, Any]
    autocast: list[tuple[str, torch.dtype]] = field(default_factory=list)
    rng: dict[str, Tensor] | None = None  # generator states before the call, if it drew
    rows: Tensor | None = None

    def map(self, fn: Callable[[Any], Any]) -> Saved:
        """``fn`` applied to every leaf of the arguments, nested ones included (a tuple of
        masks passed as one argument)."""
        return Saved(
            tree_map(fn, self.args), tree_map(fn, self.kwargs), self.autocast, self.rng, self.rows
        )


def _outputs(output: Any) -> list[Any]:
    """A module's outputs in order: a tuple's or list's elements, a dict's values (a
    ``ModelOutput`` is one: its fields that are set), a dataclass's fields; else the output."""
    if isinstance(output, tuple | list):
        return list(output)
    if isinstance(output, dict):
        return list(output.values())
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [getattr(output, f.name) for f in dataclasses.fields(output)]
    return [output]


def main_output(output: Any) -> Any:
    """The output the fallback differentiates: the first of :func:`_outputs` — for a dict or
    a dataclass, the first tensor among them."""
    outs = _outputs(output)
    if isinstance(output, tuple | list):
        return outs[0] if outs else None
    return next((o for o in outs if isinstance(o, Tensor)), None)


def _rng_states() -> dict[str, Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def pre_hook(engine: PerExampleNorms) -> Callable[..., None]:
    """Remember the random generators' states before a fallback module's forward."""

    def hook(module: nn.Module, args: tuple) -> None:
        if engine._active():
            engine._fallback_rng[module] = _rng_states()

    return hook


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    out = []
    for device in ("cpu", "cuda"):
        try:
            if torch.is_autocast_enabled(device):
                out.append((device, torch.get_autocast_dtype(device)))
        except (RuntimeError, TypeError, AttributeError):
            continue
    return out


def rule(engine: PerExampleNorms) -> LayerRule:
    """The fallback as a layer rule of the engine."""

    def save(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Saved:
        before = engine._fallback_rng.pop(module, None)
        after = _rng_states() if before is not None else {}
        drew = before is not None and any(
            not torch.equal(state, after.get(name, state)) for name, state in before.items()
        )
        main = main_output(output)
        for k, extra in enumerate(_outputs(output)):
            if isinstance(extra, Tensor) and extra.requires_grad and extra is not main:
                extra.register_hook(_refuse_extra_output(engine._labels[module], k))
        detached = tree_map(lambda a: a.detach() if isinstance(a, Tensor) else a, args)
        return Saved(detached, kwargs, _autocast_state(), before if drew else None)

    def select(module: nn.Module, saved: Saved, rows: Tensor) -> Saved:
        return Saved(saved.args, saved.kwargs, saved.autocast, saved.rng, rows)

    def factors(module: nn.Module, saved: Saved, grads: tuple) -> dict[str, Factor]:
        d = grads[0]
        label = engine._labels[module]
        engine._recomputing = True
        try:
            if saved.rng is not None:
                grads_pe = _recompute_batch(module, saved, d, label)
            else:
                grads_pe = _per_example_vmap(module, saved, d, label)
        finally:
            engine._recomputing = False
        return {k: DenseFactor(v) for k, v in grads_pe.items()}

    return LayerRule(
        factors,
        save=save,
        params=None,
        native_layout=True,
        select=select,
        outputs=lambda module, output: [main_output(output)],
        name="torch.func fallback",
    )


def _is_batched(x: Any, n: int) -> bool:
    return isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == n


def _autocast(saved: Saved) -> ExitStack:
    stack = ExitStack()
    for device, dtype in saved.autocast:
        stack.enter_context(torch.autocast(device, dtype=dtype))
    return stack


def _per_example_vmap(module: nn.Module, saved: Saved, d: Tensor, name: str) -> dict[str, Tensor]:
    params = {n: p.detach() for n, p in fallback_params(module).items()}
    if not params:
        return {}
    n = d.shape[0]
    if saved.rows is not None:
        saved = saved.map(lambda a: a.index_select(0, saved.rows) if _is_batched(a, n) else a)
        d = d.index_select(0, saved.rows)
        n = d.shape[0]
    # every per-example tensor among the arguments and keywords, nested ones included (e.g.
    # key_padding_mask, or masks passed in a tuple), is split like the input
    leaves, spec = tree_flatten((saved.args, saved.kwargs))
    batched = [_is_batched(leaf, n) for leaf in leaves]
    split = tuple(leaf for leaf, b in zip(leaves, batched, strict=True) if b)

    def one_example(rows: tuple[Tensor, ...], grad: Tensor) -> dict[str, Tensor]:
        it = iter(rows)
        full = [
            next(it).unsqueeze(0) if b else leaf for leaf, b in zip(leaves, batched, strict=True)
        ]
        args, kw = tree_unflatten(full, spec)

        def f(p: dict[str, Tensor]) -> Tensor:
            return main_output(functional_call(module, p, args, kw))

        out, pullback = vjp(f, params)
        return pullback(grad.unsqueeze(0).to(out.dtype))[0]

    try:
        with _autocast(saved):
            grads = vmap(one_example, in_dims=(0, 0))(split, d)
    except Exception as err:  # torch raises many types here; name the module in one clear error
        raise UnsupportedModuleError(
            f"module '{name}' ({type(module).__name__}) uses its parameters in an operation "
            f"without a per-example rule, and the torch.func fallback failed on it "
            f"({type(err).__name__}: {err}). Register a rule for it "
            "(noisescale.register_layer) or use per_example=False"
        ) from err
    return {k: v.detach() for k, v in grads.items()}


def _recompute_batch(module: nn.Module, saved: Saved, d: Tensor, name: str) -> dict[str, Tensor]:
    """Per-example gradients of a module that draws random numbers: one batch recompute with the
    generators restored, then a batched vector–Jacobian product per example."""
    params = {n: p.detach().requires_grad_(True) for n, p in fallback_params(module).items()}
    if not params:
        return {}
    n = d.shape[0]
    rows = saved.rows if saved.rows is not None else torch.arange(n, device=d.device)
    assert saved.rng is not None
    devices = [torch.cuda.current_device()] if "cuda" in saved.rng else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(saved.rng["cpu"])
        if "cuda" in saved.rng:
            torch.cuda.set_rng_state(saved.rng["cuda"])
        with torch.enable_grad(), _autocast(saved):
            out = main_output(functional_call(module, params, saved.args, saved.kwargs))
    k = rows.shape[0]
    onehot = torch.zeros(k, *d.shape, device=d.device, dtype=out.dtype)
    onehot[torch.arange(k, device=d.device), rows] = d.index_select(0, rows).to(out.dtype)
    names = list(params)
    try:
        got = torch.autograd.grad(
            out, [params[p] for p in names], onehot, is_grads_batched=True, allow_unused=True
        )
    except Exception as err:
        raise UnsupportedModuleError(
            f"module '{name}' ({type(module).__name__}): the torch.func fallback could not "
            f"recompute its random forward ({type(err).__name__}: {err}); use per_example=False"
        ) from err
    return {
        nm: (g if g is not None else torch.zeros(k, *params[nm].shape, device=d.device)).detach()
        for nm, g in zip(names, got, strict=True)
    }


def _refuse_extra_output(label: str, k: int) -> Callable[[Tensor], None]:
    def hook(grad: Tensor) -> None:
        if torch.count_nonzero(grad):
            raise UnsupportedModuleError(
                f"output {k} of module '{label}' received a gradient; the torch.func fallback "
                "uses only a module's main output (the first; the first tensor of a dict or "
                "ModelOutput). Do not backpropagate through its other outputs, or use "
                "per_example=False"
            )

    return hook
