"""Your own layer, exact per-example norms: one rule in one file.

    python examples/register_layer.py

``HeadwiseLinear`` applies one weight matrix per attention head with an ``einsum`` — an operation
noisescale has no closed form for: without a rule it meets the weight as expanded over the
examples, each example's whole gradient of it materialised (N copies of the weight; an einsum
it cannot read so goes through the torch.func fallback, a per-example re-run). The rule below
gives the engine each example's gradient of the weight in closed form: for y[n, h] = x[n, h] @
W[h] it is x[n, h] ⊗ δ[n, h], summed over any positions in between, and the squared norm is
taken from those factors. The script checks the norms against one backward pass per example.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import noisescale
from noisescale.per_example.factors import DenseFactor


class HeadwiseLinear(nn.Module):
    """y[n, t, h, :] = x[n, t, h, :] @ W[h] + b[h]: a separate projection per head."""

    def __init__(self, heads: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(heads, d_in, d_out) / d_in**0.5)
        self.bias = nn.Parameter(torch.zeros(heads, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nthd,hde->nthe", x, self.weight) + self.bias


@noisescale.register_layer(HeadwiseLinear)
def headwise_rule(module: HeadwiseLinear, x: torch.Tensor, grad_output: torch.Tensor) -> dict:
    """x: the module's input [N, T, H, D]; grad_output: the gradient of its output [N, T, H, E],
    both with the examples in dim 0. Returns each example's gradient of every parameter, as a
    factor (DenseFactor: materialised, [N, *parameter shape]; see noisescale.per_example.factors
    for compact forms)."""
    return {
        "weight": DenseFactor(torch.einsum("nthd,nthe->nhde", x, grad_output)),
        "bias": DenseFactor(grad_output.sum(1)),
    }


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 4 * 6)
        self.heads = HeadwiseLinear(heads=4, d_in=6, d_out=5)
        self.out = nn.Linear(4 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, T, 8]
        h = self.inp(x).unflatten(-1, (4, 6))
        return self.out(torch.tanh(self.heads(h)).flatten(-2)).mean(1)


def main() -> None:
    torch.manual_seed(0)
    model = Model().double()
    x = torch.randn(6, 7, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    with noisescale.per_example_sqnorms(model) as pe:
        F.cross_entropy(model(x), y).backward()
    truth = []
    for i in range(len(x)):
        grads = torch.autograd.grad(
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters())
        )
        truth.append(sum(g.pow(2).sum() for g in grads))
    truth = torch.stack(truth)
    error = float(((pe.sqnorms - truth).abs() / truth).max())
    print("per-example |g_i|²:", [f"{v:.4g}" for v in pe.sqnorms.tolist()])
    print(f"largest relative error against one backward per example: {error:.1e}")
    assert error < 1e-9
    print("HeadwiseLinear has a rule:", "HeadwiseLinear" in noisescale.supported_layers())


if __name__ == "__main__":
    main()
