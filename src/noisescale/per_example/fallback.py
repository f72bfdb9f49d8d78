"""A torch.func fallback for other modules that own parameters.

The module is re-run per example under ``torch.func.vmap`` with a vector–Jacobian product against
the captured output gradient, giving exact per-example gradients of its own parameters. It costs a
second forward of that module and materialises its per-example gradients, so it suits small
modules (a learned scale, PReLU, attention's input projection), not whole networks.

Assumptions, checked where possible: dim 0 of every tensor argument and of the output is the
example dimension; the module's forward is deterministic (no dropout in training mode); when the
forward returns a tuple, only its first element carries the gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from noisescale.errors import UnsupportedModuleError
from noisescale.per_example.factors import DenseFactor, Factor


def fallback_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters the fallback is responsible for."""
    # MultiheadAttention calls its out_proj's weights itself, never out_proj.forward
    recurse = isinstance(module, nn.MultiheadAttention)
    return {n: p for n, p in module.named_parameters(recurse=recurse) if p.requires_grad}


def check(module: nn.Module, name: str) -> None:
    if isinstance(module, nn.MultiheadAttention):
        if not module.batch_first:
            raise UnsupportedModuleError(
                f"module '{name}' (nn.MultiheadAttention with batch_first=False): noisescale "
                "takes dim 0 as the example dimension; construct it with batch_first=True"
            )
        if module.training and module.dropout > 0:
            raise UnsupportedModuleError(
                f"module '{name}' (nn.MultiheadAttention with dropout={module.dropout}): the "
                "torch.func fallback re-runs the module and cannot reproduce its dropout mask; "
                "set dropout=0 or use per_example=False"
            )


class Saved:
    """What the forward hook keeps for the fallback: the call's arguments."""

    def __init__(self, args: tuple, kwargs: dict[str, Any]) -> None:
        self.args = args
        self.kwargs = kwargs


def save(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Saved:
    return Saved(tuple(a.detach() if isinstance(a, Tensor) else a for a in args), kwargs)


def _is_batched(x: Any, n: int) -> bool:
    return isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == n


def factors(module: nn.Module, saved: Saved, d: Tensor, name: str) -> dict[str, Factor]:
    params = {n: p.detach() for n, p in fallback_params(module).items()}
    if not params:
        return {}
    n = d.shape[0]
    batched = tuple(_is_batched(a, n) for a in saved.args)
    # per-example keyword tensors (e.g. key_padding_mask) are split like the arguments
    kw_batched = {k: v for k, v in saved.kwargs.items() if _is_batched(v, n)}
    kw_fixed = {k: v for k, v in saved.kwargs.items() if k not in kw_batched}

    def one_example(args: tuple, kwargs: dict[str, Tensor], grad: Tensor) -> dict[str, Tensor]:
        full = tuple(a.unsqueeze(0) if b else a for a, b in zip(args, batched, strict=True))
        kw = {**kw_fixed, **{k: v.unsqueeze(0) for k, v in kwargs.items()}}

        def f(p: dict[str, Tensor]) -> Tensor:
            out = functional_call(module, p, full, kw)
            return out[0] if isinstance(out, tuple) else out

        out, pullback = vjp(f, params)
        return pullback(grad.unsqueeze(0).to(out.dtype))[0]

    in_dims = (tuple(0 if b else None for b in batched), 0, 0)
    try:
        grads = vmap(one_example, in_dims=in_dims)(saved.args, kw_batched, d)
    except Exception as err:  # torch raises many types here; name the module in one clear error
        raise UnsupportedModuleError(
            f"module '{name}' ({type(module).__name__}) owns parameters and is not one of the "
            f"layers noisescale handles in closed form; the torch.func fallback failed on it "
            f"({type(err).__name__}: {err}). Use per_example=False (micro-batch norms) or wrap "
            "its parameters in supported layers"
        ) from err
    with torch.no_grad():
        return {k: DenseFactor(v) for k, v in grads.items()}
