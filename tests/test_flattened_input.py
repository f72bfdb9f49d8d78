"""Tokens flattened from the model's raw input, ``l(x.reshape(B*T, D))``, then viewed back.

A layer that treats positions alike (Linear, LayerNorm, …) on the examples flattened together
with positions is measured when its rows are provably each example's in turn. For an
activation the proof is its history (a view of [N, T, D]); raw input data has none, and until
2026-12 such a call was taken for one shared by every example and refused ("its output never
met the batch"). A view of the model's own input [N, T, D] flattened in its memory's order
holds the proof in its memory: it is measured — exact against brute force in the exact and the
default sub-batch modes, with and without the input added back. A copy (a transposed input
reshaped) proves nothing and is still refused.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import noisescale
from noisescale.errors import UnsupportedModuleError
from test_subbatch import assert_exact_both_modes, train_tracked

pytestmark = pytest.mark.usefixtures("float64_default")

N, T, D = 5, 3, 4


class FlatTokens(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.l, self.ln = nn.Linear(D, D), nn.LayerNorm(D)
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        b, t, d = x.shape
        if self.how == "flatten":
            h = self.ln(self.l(x.flatten(0, 1))).unflatten(0, (b, t))
        elif self.how == "4d":  # [N, 1, T, D] flattened over its three leading dimensions
            h = self.ln(self.l(x.unsqueeze(1).reshape(b * t, d))).view(b, t, d)
        else:
            h = self.ln(self.l(x.reshape(b * t, d))).view(b, t, d)
        if self.how == "residual":
            h = h + x
        return self.head(torch.tanh(h))


def _case(how: str):
    torch.manual_seed(0)
    model = FlatTokens(how)
    x = torch.randn(N, T, D, generator=torch.Generator().manual_seed(1))
    return model, x, lambda: model(x).pow(2).sum((1, 2))


@pytest.mark.parametrize("how", ["plain", "residual", "flatten", "4d"])
def test_tokens_flattened_from_the_raw_input_are_exact(how):
    model, _, losses = _case(how)
    assert_exact_both_modes(model, losses, N)


def test_the_tracker_trains_on_tokens_flattened_from_the_raw_input():
    model, _, losses = _case("residual")
    tracker = train_tracked(model, lambda: losses().mean())
    assert tracker.history, "no step measured"


def test_a_copy_of_the_input_flattened_is_still_refused():
    """``x.transpose(0, 1).reshape(T*N, D)`` copies a time-major input: rows not proven."""

    class TimeMajor(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(D, D)

        def forward(self, x):
            b, t, d = x.shape
            return self.l(x.transpose(0, 1).reshape(t * b, d)).view(t, b, d).transpose(0, 1)

    torch.manual_seed(0)
    model = TimeMajor()
    x = torch.randn(N, T, D)
    with pytest.raises(UnsupportedModuleError, match="never met the batch"):
        with noisescale.per_example_sqnorms(model, loss_reduction="sum"):
            model(x).pow(2).sum().backward()
