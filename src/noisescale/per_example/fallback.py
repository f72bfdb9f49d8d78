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

The forward's autocast state (bfloat16/float16) is replayed in both cases. Either way the re-run
must be the forward again: its output is compared with the forward's (kept), and the inputs it
reads must not have changed since the call (their versions); otherwise the module is refused
(:func:`impure_message`) — randomness drawn outside torch (numpy, Python's ``random``), state
that changes between calls, an input changed in place after the call gave the per-example norms
of another forward without a word until 2026-12-06 (a hunt). The re-run leaves numpy's and
Python's global random states as it found them. Assumptions: dim 0 of
every tensor argument and of the output is the example dimension, and only the module's main
output carries the gradient — its first floating-point tensor with one (:func:`main_leaf`; nested
outputs included: a tuple's first element, a ``transformers`` ``ModelOutput``'s ``logits``) —
other outputs that pass a gradient on are refused, by their path.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from noisescale.errors import UnsupportedModuleError
from noisescale.per_example import graph
from noisescale.per_example.factors import DenseFactor, Factor
from noisescale.per_example.messages import ruleless_hint
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
    main: str | None = None  # the spine of the output leaf differentiated (main_leaf)
    main_path: str = ""  # (its path, for messages)
    out: Tensor | None = None  # the forward's main output (a copy), which the re-run must give
    versions: list[tuple[Tensor, int]] = field(default_factory=list)  # the inputs' at its end

    def map(self, fn: Callable[[Any], Any]) -> Saved:
        """``fn`` applied to every leaf of the arguments, nested ones included (a tuple of
        masks passed as one argument)."""
        return dataclasses.replace(
            self, args=tree_map(fn, self.args), kwargs=tree_map(fn, self.kwargs)
        )


def output_leaves(output: Any, path: str = "", spine: str = "") -> list[tuple[str, str, Any]]:
    """A module's outputs in order, nested ones included — a tuple's or list's elements, a
    dict's values (a ``ModelOutput`` is one: its fields that are set), a dataclass's fields —
    each with its path (``[1]``, ``['hidden_states'][0]``) and its spine: the path with the
    length of every tuple or list on the way (``[1/2]``), by which a per-example re-run finds
    the same output again."""
    if isinstance(output, tuple | list):
        n = len(output)
        # (the first element's place moves with nothing before it: no length)
        items = [
            (f"{path}[{i}]", f"{spine}[{i}/{n}]" if i else f"{spine}[0]", v)
            for i, v in enumerate(output)
        ]
    elif isinstance(output, dict):
        items = [(f"{path}[{k!r}]", f"{spine}[{k!r}]", v) for k, v in output.items()]
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = [
            (f"{path}.{f.name}", f"{spine}.{f.name}", getattr(output, f.name))
            for f in dataclasses.fields(output)
        ]
    else:
        return [(path or "output", spine, output)]
    return [leaf for p, k, v in items for leaf in output_leaves(v, p, k)]


def main_leaf(leaves: list[tuple[str, str, Any]]) -> int | None:
    """Which output the fallback differentiates: the first floating-point tensor with a
    history and a dimension for the examples (a tuple's first element, a ``ModelOutput``'s
    ``logits`` or ``last_hidden_state``; not a mask, a ``None``, a 0-d loss); else the first
    tensor."""
    tensors = [i for i, (_, _, v) in enumerate(leaves) if isinstance(v, Tensor)]
    for i in tensors:
        v = leaves[i][2]
        if v.is_floating_point() and v.requires_grad and v.dim() > 0:
            return i
    return tensors[0] if tensors else None


def main_output(output: Any, saved: Saved | None = None, label: str = "") -> Any:
    """The output the fallback differentiates: :func:`main_leaf`'s, or in a per-example
    re-run the one at the forward's spine (``saved.main``): the same keys, and the same
    positions in tuples and lists of the same lengths. A per-example list (one entry per
    example) before it in a tuple would move it, and another output stand where it was:
    refused."""
    leaves = output_leaves(output)
    if saved is None or saved.main is None:
        index = main_leaf(leaves)
        return None if index is None else leaves[index][2]
    for _, spine, value in leaves:
        if spine == saved.main:
            return value
    raise UnsupportedModuleError(
        f"module '{label}' returned its outputs in another structure when the torch.func "
        f"fallback re-ran it on one example ({_few(tuple(p for p, _, _ in leaves))}) than in "
        f"the forward, where its output was {saved.main_path}: they depend on the batch (a "
        "list with one entry per example), so its output cannot be matched. Register a rule "
        "for it (noisescale.register_layer) or use per_example=False"
    )


# autograd nodes of built-in views: their gradient goes to their input alone
_INPUT_VIEW_NODES = frozenset(
    {"ViewBackward0", "SliceBackward0", "SelectBackward0", "TransposeBackward0", "TBackward0",
     "PermuteBackward0", "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1",
     "ExpandBackward0", "AsStridedBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
     "AliasBackward0", "NarrowBackward0", "UnbindBackward0", "SplitBackward0"}
)  # fmt: skip


def _view_of_input(t: Tensor, inputs: set[int]) -> bool:
    """Whether ``t`` is a view of one of the module's inputs through built-in views only
    (``h[:, :2]``), whose gradient goes to that input alone — not a custom Function's output
    that merely aliases it and gives a parameter a gradient too."""
    base = t._base
    if base is None or id(base) not in inputs:
        return False
    node, target = t.grad_fn, base.grad_fn
    for _ in range(16):
        if node is None or type(node).__name__ not in _INPUT_VIEW_NODES:
            return False
        edges = [e for e in node.next_functions if e[0] is not None]
        if len(edges) != 1:
            return False
        node = edges[0][0]
        if node is target:
            return True
    return False


def _few(paths: tuple[str, ...]) -> str:
    shown = ", ".join(paths[:4]) + (f", … ({len(paths)} in all)" if len(paths) > 4 else "")
    return f"outputs {shown}" if paths else "no output"


def _rng_states() -> dict[str, Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def pre_hook(engine: PerExampleNorms) -> Callable[..., None]:
    """Remember the random generators' states before a fallback module's forward."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if engine._active():
            engine._fallback_rng[module] = _rng_states()
            engine._fallback_versions[module] = _versions((args, kwargs))

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
        for arg, version in engine._fallback_versions.pop(module, []):
            if arg._version != version:
                raise UnsupportedModuleError(
                    f"module '{engine._labels[module]}' changes its input in place in its "
                    "forward, and the torch.func fallback, which re-runs it per example on the "
                    "input it was given, cannot: it would change the input again. Make the "
                    "module work on a copy (x = x + b, not x.add_(b)), register a rule for it "
                    "(noisescale.register_layer), or use per_example=False"
                )
        before = engine._fallback_rng.pop(module, None)
        after = _rng_states() if before is not None else {}
        drew = before is not None and any(
            not torch.equal(state, after.get(name, state)) for name, state in before.items()
        )
        leaves = output_leaves(output)
        main = main_leaf(leaves)
        main_tensor = None if main is None else leaves[main][2]
        if isinstance(main_tensor, Tensor) and main_tensor.dim() == 0 and main_tensor.requires_grad:
            # (until 2026-12-06 the next backward crashed with an IndexError on the 0-d
            # output's gradient, in every mode, a hunt)
            raise UnsupportedModuleError(scalar_output_message(engine._labels[module]))
        inputs = {id(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)}
        # (a view of an input passes its gradient to the input only: h[:, :2])
        for path, _, extra in leaves:
            # Another output that passes a gradient on, computed in the module (not the main
            # output again, as hidden_states[-1] is last_hidden_state; not one of its inputs
            # passed through; not a parameter or other leaf, whose hook would outlive the step)
            if (
                isinstance(extra, Tensor)
                and extra.requires_grad
                and extra.grad_fn is not None
                and extra is not main_tensor
                and id(extra) not in inputs
                and not _view_of_input(extra, inputs)
            ):
                extra.register_hook(_refuse_extra_output(engine._labels[module], path))
        detached = tree_map(lambda a: a.detach() if isinstance(a, Tensor) else a, args)
        return Saved(
            detached,
            kwargs,
            _autocast_state(),
            before if drew else None,
            main=None if main is None else leaves[main][1],
            main_path="" if main is None else leaves[main][0],
            # (a copy: the caller may change the output in place, which autograd allows)
            out=main_tensor.detach().clone() if isinstance(main_tensor, Tensor) else None,
            versions=_versions((detached, kwargs)),
        )

    def select(module: nn.Module, saved: Saved, rows: Tensor) -> Saved:
        return dataclasses.replace(saved, rows=rows)

    def factors(module: nn.Module, saved: Saved, grads: tuple) -> dict[str, Factor]:
        d = grads[0]
        label = engine._labels[module]
        leaves, _ = tree_flatten((saved.args, saved.kwargs))
        # what the per-example re-run splits as examples (the lead of a refusal where its
        # gradients do not add up); the whole-batch re-run, for a module that draws random
        # numbers, splits nothing
        engine._fallback_split[module] = (
            []
            if saved.rng is not None
            else [tuple(leaf.shape) for leaf in leaves if _is_batched(leaf, d.shape[0])]
        )
        if any(t._version != v for t, v in saved.versions):
            raise UnsupportedModuleError(impure_message(label, _INPUT_CHANGED))
        engine._recomputing = True
        states = _outside_rng_states()
        try:
            if saved.rng is not None:
                grads_pe, out = _recompute_batch(module, saved, d, label)
            else:
                grads_pe, out = _per_example_vmap(module, saved, d, label)
        finally:
            engine._recomputing = False
            _restore_outside_rng_states(states)
        if (
            saved.out is not None
            and out is not None
            and (out.is_floating_point() or out.is_complex())
        ):
            differs = _differs(out, saved.out, saved.rows)
            if graph._host_reads_indices(differs):  # (tests patch it: the device path)
                if bool(differs):
                    raise UnsupportedModuleError(impure_message(label, _RERUN_DIFFERS))
            else:  # (on an accelerator: read with the step's statistics, no wait here)
                engine._fallback_unread.append(("", impure_message(label, _RERUN_DIFFERS), differs))
        return {k: DenseFactor(v) for k, v in grads_pe.items()}

    return LayerRule(
        factors,
        save=save,
        params=None,
        native_layout=True,
        select=select,
        outputs=lambda module, output: [main_output(output)],  # (save's main_leaf)
        name="torch.func fallback",
    )


def _is_batched(x: Any, n: int) -> bool:
    return isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == n


def _autocast(saved: Saved) -> ExitStack:
    stack = ExitStack()
    for device, dtype in saved.autocast:
        stack.enter_context(torch.autocast(device, dtype=dtype))
    return stack


def _versions(tree: Any) -> list[tuple[Tensor, int]]:
    """The version of every tensor in ``tree`` (an inference-mode tensor has none: it cannot
    be changed in place)."""
    return [
        (leaf, leaf._version)
        for leaf in tree_flatten(tree)[0]
        if isinstance(leaf, Tensor) and not leaf.is_inference()
    ]


def _outside_rng_states() -> tuple[Any, Any]:
    """numpy's and Python's global random states, which a re-run that draws from them would
    move on: the training loop's draws would change with measuring."""
    return np.random.get_state(), random.getstate()


def _restore_outside_rng_states(states: tuple[Any, Any]) -> None:
    np.random.set_state(states[0])
    random.setstate(states[1])


def _differs(out: Tensor, forward: Tensor, rows: Tensor | None) -> Tensor:
    """A device bool: whether the re-run's output ``out`` (one row per example, ``rows`` of the
    forward's) is not the forward's, beyond rounding: per example, each element within
    1024 ulps of the example's largest (a quarter of it in 16 bits, where the per-example and
    batched kernels round differently)."""
    if rows is not None:
        forward = forward.index_select(0, rows)
    if out.numel() != forward.numel():
        return torch.ones((), dtype=torch.bool, device=out.device)
    dtype = torch.promote_types(forward.dtype, torch.float32)
    a = out.detach().reshape(forward.shape).to(dtype).flatten(1)
    b = forward.to(dtype).flatten(1)
    tol = min(1024 * torch.finfo(forward.dtype).eps, 0.25)
    scale = b.abs().amax(1, keepdim=True) if b.shape[1] else b.new_zeros(b.shape[0], 1)
    return ((a - b).abs() > tol * scale).any() | (a.isnan() != b.isnan()).any()


def impure_message(label: str, seen: str) -> str:
    """Why a fallback module whose re-run is not its forward is refused (``seen``: what showed
    it)."""
    return (
        f"module '{label}' uses its parameters in operations without a per-example rule; the "
        "torch.func fallback that measures such a module re-runs its forward in the backward, "
        f"and {seen}: the module's forward is not a function of its inputs and parameters "
        "(random numbers drawn with numpy or Python's random, state changed between calls — "
        "a counter, a running statistic —, an input changed in place after the call, "
        "h += f(h)), so the per-example gradients would be another forward's. Draw random "
        "numbers with torch (torch.randn, dropout: the fallback replays torch's generators), "
        "keep the state fixed during a step, write h = h + f(h), register a rule for the "
        "module (noisescale.register_layer), or use per_example=False"
    )


#: what :func:`impure_message` names as seen
_RERUN_DIFFERS = "the re-run gave another output than the forward"
_INPUT_CHANGED = "an input of the call was changed in place after it, which the re-run would read"


def _per_example_vmap(
    module: nn.Module, saved: Saved, d: Tensor, name: str
) -> tuple[dict[str, Tensor], Tensor | None]:
    params = {n: p.detach() for n, p in fallback_params(module).items()}
    if not params:
        return {}, None
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

    def one_example(rows: tuple[Tensor, ...], grad: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        it = iter(rows)
        full = [
            next(it).unsqueeze(0) if b else leaf for leaf, b in zip(leaves, batched, strict=True)
        ]
        args, kw = tree_unflatten(full, spec)

        def f(p: dict[str, Tensor]) -> Tensor:
            return main_output(functional_call(module, p, args, kw), saved, name)

        out, pullback = vjp(f, params)
        return pullback(grad.unsqueeze(0).to(out.dtype))[0], out

    try:
        with _autocast(saved):
            grads, outs = vmap(one_example, in_dims=(0, 0))(split, d)
    except UnsupportedModuleError:
        raise  # (the output's structure, above: its own message)
    except Exception as err:  # torch raises many types here; name the module in one clear error
        raise UnsupportedModuleError(
            f"module '{name}' ({type(module).__name__}) uses its parameters in an operation "
            f"without a per-example rule, and the torch.func fallback failed on it "
            f"({type(err).__name__}: {err}). Register a rule for it "
            "(noisescale.register_layer) or use per_example=False" + ruleless_hint(module)
        ) from err
    return {k: v.detach() for k, v in grads.items()}, outs


def _recompute_batch(
    module: nn.Module, saved: Saved, d: Tensor, name: str
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Per-example gradients of a module that draws random numbers: one batch recompute with the
    generators restored, then a batched vector–Jacobian product per example (and the
    recomputed output's rows)."""
    params = {n: p.detach().requires_grad_(True) for n, p in fallback_params(module).items()}
    if not params:
        return {}, None
    n = d.shape[0]
    rows = saved.rows if saved.rows is not None else torch.arange(n, device=d.device)
    assert saved.rng is not None
    devices = [torch.cuda.current_device()] if "cuda" in saved.rng else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(saved.rng["cpu"])
        if "cuda" in saved.rng:
            torch.cuda.set_rng_state(saved.rng["cuda"])
        with torch.enable_grad(), _autocast(saved):
            out = main_output(
                functional_call(module, params, saved.args, saved.kwargs), saved, name
            )
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
    grads = {
        nm: (g if g is not None else torch.zeros(k, *params[nm].shape, device=d.device)).detach()
        for nm, g in zip(names, got, strict=True)
    }
    return grads, out.detach().index_select(0, rows)


def scalar_output_message(label: str) -> str:
    """Why a fallback module whose output is a 0-d tensor is refused."""
    return (
        f"module '{label}' returns a 0-d tensor (a loss reduced over the examples inside the "
        "module: a CRF's NLL with reduction='mean' or 'sum'), and uses its parameters in "
        "operations without a per-example rule; the torch.func fallback that measures such a "
        "module re-runs it per example and needs an output with the examples along dim 0 — "
        "one already summed over them says nothing of each example's gradient. Return each "
        "example's loss from the module (reduction='none'; take the mean outside it), register "
        "a rule for it (noisescale.register_layer), or use per_example=False"
    )


def _refuse_extra_output(label: str, path: str) -> Callable[[Tensor], None]:
    def hook(grad: Tensor) -> None:
        if torch.count_nonzero(grad):
            raise UnsupportedModuleError(
                f"output {path} of module '{label}' received a gradient; the torch.func "
                "fallback differentiates only a module's main output (its first floating-point "
                "tensor with a gradient: a tuple's first element, a ModelOutput's logits or "
                "last_hidden_state). Do not backpropagate through its other outputs, register "
                "a rule for the module (noisescale.register_layer), or use per_example=False"
            )

    return hook
