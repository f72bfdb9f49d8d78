"""nn.Linear: weight gradient Σ_t δ_t a_tᵀ over all leading (sequence) positions of an example."""

from __future__ import annotations

from torch import Tensor, nn

from noisescale.per_example.factors import DenseFactor, Factor, LinearFactor


def save(module: nn.Linear, args: tuple, output: Tensor) -> Tensor:
    return args[0]


def factors(module: nn.Linear, a: Tensor, d: Tensor) -> dict[str, Factor]:
    n = a.shape[0]
    # any leading dims between the batch and the features count as positions of that example
    a3 = a.reshape(n, -1, a.shape[-1])
    d3 = d.reshape(n, -1, d.shape[-1])
    out: dict[str, Factor] = {}
    if module.weight.requires_grad:
        out["weight"] = LinearFactor(a3, d3)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = DenseFactor(d3.sum(1))
    return out
