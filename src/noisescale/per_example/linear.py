"""nn.Linear and Hugging Face's ``Conv1D``: weight gradient Σ_t δ_t a_tᵀ over the positions of an
example (every dim between the batch and the features is a position)."""

from __future__ import annotations

from torch import Tensor, nn

from noisescale.per_example.factors import DenseFactor, Factor, LinearFactor
from noisescale.per_example.registry import LayerRule, register_layer


def _positions(a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    n = a.shape[0]
    return a.reshape(n, -1, a.shape[-1]), d.reshape(n, -1, d.shape[-1])


def linear_factors(module: nn.Module, a: Tensor, d: Tensor) -> dict[str, Factor]:
    a3, d3 = _positions(a, d)
    out: dict[str, Factor] = {}
    if module.weight.requires_grad:
        out["weight"] = LinearFactor(a3, d3)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = DenseFactor(d3.sum(1))
    return out


def conv1d_hf_factors(module: nn.Module, a: Tensor, d: Tensor) -> dict[str, Factor]:
    """transformers' ``Conv1D`` (every projection of GPT-2): y = x W + b with W stored [in, out]."""
    a3, d3 = _positions(a, d)
    out: dict[str, Factor] = {}
    if module.weight.requires_grad:
        out["weight"] = LinearFactor(a3, d3, transposed=True)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = DenseFactor(d3.sum(1))
    return out


def _rows(module: nn.Module) -> bool:
    """Every dim between the examples and the features is a position: the examples may come
    flattened together with positions (``LayerRule.flattened``)."""
    return True


LINEAR_RULE = register_layer(nn.Linear, LayerRule(linear_factors, flattened=_rows, name="Linear"))
# registered by name: importing transformers costs seconds and is optional
CONV1D_RULE = register_layer(
    "transformers.pytorch_utils.Conv1D",
    LayerRule(conv1d_hf_factors, flattened=_rows, name="Conv1D"),
)
