"""nn.Linear and Hugging Face's ``Conv1D``: weight gradient Σ_t δ_t a_tᵀ over the positions of an
example (every dim between the batch and the features is a position); ``nn.Bilinear``, the same
with a_t = x1_t ⊗ x2_t."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from noisescale.per_example.factors import DenseFactor, Factor, LinearFactor, acc_sum
from noisescale.per_example.registry import LayerRule, register_layer


def _positions(a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    # (the positions given, not -1: a layer of no input or output feature has none to infer)
    n, t = a.shape[0], math.prod(a.shape[1:-1])
    return a.reshape(n, t, a.shape[-1]), d.reshape(n, t, d.shape[-1])


def linear_factors(module: nn.Module, a: Tensor, d: Tensor) -> dict[str, Factor]:
    a3, d3 = _positions(a, d)
    out: dict[str, Factor] = {}
    if module.weight.requires_grad:
        out["weight"] = LinearFactor(a3, d3)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = DenseFactor(acc_sum(d3, 1))
    return out


def conv1d_hf_factors(module: nn.Module, a: Tensor, d: Tensor) -> dict[str, Factor]:
    """transformers' ``Conv1D`` (every projection of GPT-2): y = x W + b with W stored [in, out]."""
    a3, d3 = _positions(a, d)
    out: dict[str, Factor] = {}
    if module.weight.requires_grad:
        out["weight"] = LinearFactor(a3, d3, transposed=True)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = DenseFactor(acc_sum(d3, 1))
    return out


def _vector(module: nn.Module, x: Tensor) -> bool:
    """A 1-D input is one vector of features, no batch (``LayerRule.unbatched``)."""
    return x.dim() == 1


def _rows(module: nn.Module) -> bool:
    """Every dim between the examples and the features is a position: the examples may come
    flattened together with positions (``LayerRule.flattened``)."""
    return True


LINEAR_RULE = register_layer(
    nn.Linear, LayerRule(linear_factors, flattened=_rows, unbatched=_vector, name="Linear")
)
# registered by name: importing transformers costs seconds and is optional
CONV1D_RULE = register_layer(
    "transformers.pytorch_utils.Conv1D",
    LayerRule(conv1d_hf_factors, flattened=_rows, unbatched=_vector, name="Conv1D"),
)


def _save_both(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Tensor:
    """``nn.Bilinear``'s two inputs side by side, [..., I1 + I2] (their leading dims are equal):
    one tensor, which the engine moves and selects rows of like any input."""
    x1 = args[0] if args else kwargs["input1"]
    x2 = args[1] if len(args) > 1 else kwargs["input2"]
    return torch.cat([x1, x2.to(x1.dtype)], -1)


def bilinear_factors(module: nn.Module, both: Tensor, d: Tensor) -> dict[str, Factor]:
    """y_t = x1_tᵀ W x2_t + b, W [O, I1, I2]: example n's gradient of W is Σ_t δ_t ⊗ x1_t ⊗ x2_t,
    a linear layer's on the outer products a_t = x1_t ⊗ x2_t ([N, T, I1·I2])."""
    i1 = module.in1_features
    x1, x2 = both[..., :i1], both[..., i1:]
    return linear_factors(module, (x1.unsqueeze(-1) * x2.unsqueeze(-2)).flatten(-2), d)


BILINEAR_RULE = register_layer(
    nn.Bilinear, LayerRule(bilinear_factors, save=_save_both, unbatched=_vector, name="Bilinear")
)
