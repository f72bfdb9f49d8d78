"""nn.LSTMCell, nn.GRUCell and nn.RNNCell in the user's own loop over time, against brute force.

A cell is called once per step with the state of the step before: each call is measured like a
pair of Linear maps (the gate pre-activations recomputed from the saved input and state, their
gradients from those the call's outputs received) and the calls add up with their cross terms.
They were refused before (the torch.func fallback could not take a module called with its own
output). An LSTMCell's c' feeds its h' inside ATen's composite cell on the CPU, so the gradient
its hook receives already holds that path; the rule tells the two implementations apart by the
outputs' autograd nodes (a fused kernel's, on CUDA, is one node: untested here, and the audit
would refuse a mistake)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_subbatch import assert_exact_both_modes, train_tracked

pytestmark = pytest.mark.usefixtures("float64_default")

N, T = 4, 3


class Loop(nn.Module):
    def __init__(self, cell: nn.Module, initial: bool, head_on_c: bool):
        super().__init__()
        self.cell, self.initial, self.head_on_c = cell, initial, head_on_c
        self.head = nn.Linear(5, 3)
        self.h0 = nn.Parameter(torch.randn(5)) if initial else None

    def forward(self, x):
        n = x.shape[0]
        lstm = isinstance(self.cell, nn.LSTMCell)
        state = None
        if self.initial:
            h0 = self.h0.expand(n, 5)  # a learned initial state, shared by the batch
            state = (h0, torch.zeros(n, 5)) if lstm else h0
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        h = state[0] if lstm else state
        out = self.head(h)
        if lstm and self.head_on_c:
            out = out + state[1].sum(1, keepdim=True)
        return out


CELLS = {
    "LSTMCell": lambda: nn.LSTMCell(3, 5),
    "LSTMCell without biases": lambda: nn.LSTMCell(3, 5, bias=False),
    "GRUCell": lambda: nn.GRUCell(3, 5),
    "RNNCell tanh": lambda: nn.RNNCell(3, 5),
    "RNNCell relu": lambda: nn.RNNCell(3, 5, nonlinearity="relu"),
}


CASES = [
    (cell, initial, head_on_c)
    for cell in CELLS
    for initial in (False, True)
    for head_on_c in ((False, True) if cell.startswith("LSTM") else (False,))
]


@pytest.mark.parametrize(
    ("cell", "initial", "head_on_c"),
    CASES,
    ids=[
        f"{c}-{'learned' if i else 'zero'} state-loss on h{' and c' if h else ''}"
        for c, i, h in CASES
    ],
)
def test_a_cell_in_a_loop_is_exact(cell, initial, head_on_c):
    torch.manual_seed(0)
    model = Loop(CELLS[cell](), initial, head_on_c)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, T, 3, generator=g), torch.randint(0, 3, (N,), generator=g)

    def losses():
        return F.cross_entropy(model(x), y, reduction="none")

    assert_exact_both_modes(model, losses, N)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"per_example_fraction": 0.5}, {"per_example_fraction": 1.0}],
    ids=["sub-batches", "a half subset", "every example"],
)
def test_the_tracker_trains_a_cell_loop(kwargs):
    """Six steps in each of the default (sub-batches), a 1/2 subset of the examples and every
    example; no warning, every step measured."""
    torch.manual_seed(0)
    model = Loop(nn.LSTMCell(3, 5), True, True)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, T, 3, generator=g), torch.randint(0, 3, (16,), generator=g)
    tracker = train_tracked(model, lambda: F.cross_entropy(model(x), y), lr=0.1, **kwargs)
    assert not any(r["skipped"] for r in tracker.history), kwargs
